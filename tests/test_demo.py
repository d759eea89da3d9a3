"""tools/demo.py --seeds: every student trained with several seeds, the table giving mean ± std per method.

The demo's train.py runs are made in-process here (the real demo starts one process per run) and cut to one
epoch, so the test checks the seeds' bookkeeping, not the demo's figures."""
import os
import statistics
import sys
import time

import yaml

import train

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools')
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import demo  # noqa: E402


def test_seeds_train_each_student_several_times_and_report_mean_and_std(monkeypatch, tmp_path, capsys, one_thread):
    def run_in_process(argv, log_path):
        start = time.time()
        train.main(argv + ['--workers', '0'])
        return time.time() - start

    pictured = {}
    monkeypatch.setattr(demo, 'run_train', run_in_process)
    monkeypatch.setattr(demo, 'draw_pictures', lambda output, run_dirs, teacher: pictured.update(run_dirs) or [])
    monkeypatch.setattr(demo, 'TEACHER_FILE', str(tmp_path / 'teacher.pth'))
    demo.main(['--output', str(tmp_path / 'runs'), '--methods', 'vanilla', 'kd', '--seeds', '2', '--epochs', '1'])
    output = capsys.readouterr().out

    for method in ('vanilla', 'kd'):
        folders = [tmp_path / 'runs' / f'student-{method}-seed{seed}' for seed in (42, 43)]
        seeds = [yaml.safe_load((folder / 'args.yaml').read_text())['seed'] for folder in folders]
        assert seeds == [42, 43]
        lasts, bests = zip(*(demo.read_summary(str(folder)) for folder in folders))
        row = next(line for line in output.splitlines() if line.startswith('| student') and f'| {method} ' in line)
        cells = [cell.strip() for cell in row.split('|')[1:-1]]
        assert cells[2] == '2'
        assert cells[3] == f'{statistics.mean(lasts):.2f} ± {statistics.stdev(lasts):.2f}'
        assert cells[4] == f'{statistics.mean(bests):.2f} ± {statistics.stdev(bests):.2f}'
        assert pictured[method] == str(folders[0])  # the curves and the CKA map read the first seed's runs
    assert 'mean ± std over seeds 42..43' in output


def test_one_seed_prints_the_value_itself():
    assert demo.mean_std([97.5]) == '97.50'
    assert demo.mean_std([97.0, 98.0, 96.0]) == '97.00 ± 1.00'


def test_the_students_after_the_first_read_the_teachers_outputs_from_the_cache(monkeypatch, tmp_path, capsys,
                                                                                 one_thread):
    from test_teacher_cache import TeacherCalls

    def run_in_process(argv, log_path):
        start = time.time()
        train.main(argv + ['--workers', '0'])
        return time.time() - start

    monkeypatch.setattr(demo, 'run_train', run_in_process)
    monkeypatch.setattr(demo, 'draw_pictures', lambda output, run_dirs, teacher: [])
    monkeypatch.setattr(demo, 'TEACHER_FILE', str(tmp_path / 'teacher.pth'))
    calls = TeacherCalls(monkeypatch)
    counts = {}
    real = demo.run_train

    def counted(argv, log_path):
        before = calls.count
        seconds = real(argv, log_path)
        counts[argv[argv.index('--distiller') + 1]] = calls.count - before
        return seconds
    monkeypatch.setattr(demo, 'run_train', lambda argv, log_path: counted(argv, log_path) if '--distiller' in argv
                        else real(argv, log_path))
    demo.main(['--output', str(tmp_path / 'runs'), '--methods', 'kd', 'dkd', 'rsd', '--epochs', '1'])
    assert counts['kd'] > 0 and counts['dkd'] == 0 and counts['rsd'] > 0  # rsd reads the embedding: kd wrote logits
    assert os.path.isdir(tmp_path / 'runs' / 'teacher-cache')
