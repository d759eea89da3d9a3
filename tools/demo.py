#!/usr/bin/env python3
"""The embedded demo (`bash train.sh` with no arguments): distillation end to end, offline, on a CPU.

1. A small ViT teacher (`demo_vit_teacher`) is trained from scratch on scikit-learn's handwritten digits
   (8x8, upsampled to 32 px, a fixed 70/30 split) and saved under pretrained/.
2. A small CNN student (`demo_resnet_student`) is trained on a fixed subset of 300 training images, alone and
   with every distiller that runs on this pair, each through train.py exactly as a real run. The teacher's
   outputs are computed once: the first distilled run writes them to OUTPUT/teacher-cache and the others read
   them (`--no-teacher-cache` runs the teacher every time; the results are the same bits).
3. A table: run, distiller, test top-1 (last epoch and best), wall time, run folder; a figure of the
   students' curves and a CKA map of the teacher's stages against the RSD student's.

The student sees fewer images than the teacher did, which is the setting where a teacher has most to give.
One seed on 539 test images moves by about a point: `--seeds N` trains every student with N seeds (the
teacher once) and the table gives mean ± standard deviation per method.
"""
import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distillers  # noqa: E402
from xkd.yaml_file import load_yaml  # noqa: E402

TEACHER_CONFIG = 'configs/demo/teacher.yaml'
STUDENT_CONFIG = 'configs/demo/student.yaml'
TEACHER_FILE = 'pretrained/demo_vit_teacher_digits.pth'

# Per-method flags for a 30-epoch run (DKD's warm-up is 20 epochs by default, for 240-epoch recipes) on 300
# images (CRD's 16,384 negatives are a third of CIFAR-100's training set; 256 is most of the demo's).
METHOD_FLAGS = {
    'dkd': ['--dkd-warmup', '5'],
    'crd': ['--crd-k', '256'],
}
METHOD_ORDER = ['vanilla', 'kd', 'dkd', 'dist', 'ofa', 'rsd', 'hcd']


def run_train(argv, log_path):
    """One train.py run in its own process, its output kept in a file; returns wall seconds."""
    start = time.time()
    with open(log_path, 'w') as log:
        status = subprocess.call([sys.executable, os.path.join(ROOT, 'train.py')] + argv, cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT)
    if status != 0:
        with open(log_path) as log:
            tail = ''.join(log.readlines()[-15:])
        sys.exit(f'demo: train.py failed (exit {status}); the end of {log_path}:\n{tail}')
    return time.time() - start


def read_summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        rows = [row for row in csv.DictReader(f) if row['eval_top1'] != '']
    last = float(rows[-1]['eval_top1'])
    best = max(float(row['eval_top1']) for row in rows)
    return last, best


def export_teacher(run_dir, path):
    """The teacher's best weights as a plain state dict, the form --teacher-pretrained takes."""
    checkpoint = torch.load(os.path.join(run_dir, 'model_best.pth.tar'), map_location='cpu', weights_only=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(checkpoint['state_dict'], path)


def draw_pictures(output, run_dirs, teacher_file):
    """The students' curves on one figure, and a CKA map of the teacher against the RSD (or last) student.

    `run_dirs` maps each method to one of its run folders (the first seed's)."""
    curves = os.path.join(output, 'curves.png')
    subprocess.check_call([sys.executable, os.path.join(ROOT, 'tools', 'plot_runs.py'), *run_dirs.values(), '-o',
                           curves, '--title', 'Demo students on the digits'], cwd=ROOT, stdout=subprocess.DEVNULL)
    cka_student = 'rsd' if 'rsd' in run_dirs else list(run_dirs)[-1]
    subprocess.check_call([sys.executable, os.path.join(ROOT, 'tools', 'cka.py'), '--dataset', 'digits',
                           '--img-size', '32', '--workers', '0', '--samples', '539',
                           '--model', 'demo_resnet_student',
                           '--checkpoint', os.path.join(run_dirs[cka_student], 'last.pth.tar'),
                           '--teacher', 'demo_vit_teacher', '--teacher-pretrained', teacher_file,
                           '--output', output], cwd=ROOT, stdout=subprocess.DEVNULL)
    cka = os.path.join(output, 'cka-demo_resnet_student-vs-demo_vit_teacher.png')
    return [f'Curves of the students: {os.path.relpath(curves, ROOT)}',
            f'CKA map, teacher stages against the {cka_student} student\'s: {os.path.relpath(cka, ROOT)} (and .csv)']


def mean_std(values):
    """'mean ± sample std' of several runs; the value itself for one run."""
    if len(values) == 1:
        return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def print_table(header, lines):
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    for i, line in enumerate([header] + lines):
        print('| ' + ' | '.join(cell.ljust(width) for cell, width in zip(line, widths)) + ' |')
        if i == 0:
            print('|' + '|'.join('-' * (width + 2) for width in widths) + '|')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='output/demo', help='parent folder of the demo runs')
    parser.add_argument('--methods', nargs='+', default=None, help='distillers to run (default: all that apply)')
    parser.add_argument('--seeds', type=int, default=1,
                        help='seeds per student (--seed 42, 43, ...); with more than one the table gives mean ± std')
    parser.add_argument('--epochs', type=int, default=None,
                        help="epochs of every run instead of the configs' (a quick check; the figures change)")
    parser.add_argument('--reuse-teacher', action='store_true',
                        help=f'use {TEACHER_FILE} if it exists instead of training the teacher again')
    parser.add_argument('--no-teacher-cache', action='store_true',
                        help="run the teacher in every student's run instead of reading its outputs from "
                             "OUTPUT/teacher-cache, which the first distilled student writes")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        sys.exit(f'demo: --seeds must be at least 1, got {args.seeds}')

    def epochs(config):
        """--epochs for a quick check, with the config's warm-up shortened to fit (train.py refuses a warm-up
        that never ends)."""
        if not args.epochs:
            return []
        warmup = min(int(load_yaml(os.path.join(ROOT, config), 'config').get('warmup_epochs', 0)), args.epochs - 1)
        return ['--epochs', str(args.epochs), '--warmup-epochs', str(warmup)]

    known = distillers.distiller_names()
    methods = args.methods or [m for m in METHOD_ORDER if m in known]
    unknown = [m for m in methods if m not in known]
    if unknown:
        sys.exit(f"demo: unknown distiller(s) {', '.join(unknown)}; known: {', '.join(known)}")
    output = os.path.abspath(os.path.join(ROOT, args.output))
    os.makedirs(output, exist_ok=True)
    teacher_file = os.path.join(ROOT, TEACHER_FILE)
    demo_start = time.time()
    rows = []

    teacher_dir = os.path.join(output, 'teacher')
    if args.reuse_teacher and os.path.isfile(teacher_file) and os.path.isdir(teacher_dir):
        print(f'teacher: reusing {TEACHER_FILE}', flush=True)
        seconds = 0.0
    else:
        print('teacher: training demo_vit_teacher on the digits ...', flush=True)
        shutil.rmtree(teacher_dir, ignore_errors=True)
        seconds = run_train(['--config', TEACHER_CONFIG, '--output', output, '--experiment', 'teacher']
                            + epochs(TEACHER_CONFIG),
                            os.path.join(output, 'teacher.out'))
        export_teacher(teacher_dir, teacher_file)
    last, best = read_summary(teacher_dir)
    rows.append(('teacher (ViT, all 1258 train images)', '-', [last], [best], [seconds], teacher_dir))
    print(f'teacher: top-1 {last:.2f} in {seconds:.0f} s, saved to {TEACHER_FILE}', flush=True)

    # The students share one teacher, recipe and seed: the first distilled run writes the teacher's outputs, the
    # others read them (the teacher's weights are in the key, so a retrained teacher gets a new folder).
    teacher_cache = [] if args.no_teacher_cache else ['--teacher-cache', os.path.join(output, 'teacher-cache')]
    seeds = [42 + i for i in range(args.seeds)]
    first_runs = {}
    for method in methods:
        results = []
        for seed in seeds:
            # One seed keeps the folder names of a plain demo run; several get a suffix each.
            experiment = f'student-{method}' + (f'-seed{seed}' if args.seeds > 1 else '')
            run_dir = os.path.join(output, experiment)
            shutil.rmtree(run_dir, ignore_errors=True)
            label = method + (f' seed {seed}' if args.seeds > 1 else '')
            print(f'student: {label} ...', flush=True)
            teacher_flags = [] if method == 'vanilla' else ['--teacher-pretrained', teacher_file] + teacher_cache
            argv = ['--config', STUDENT_CONFIG, '--distiller', method, '--output', output, '--experiment', experiment,
                    '--seed', str(seed)] + teacher_flags + METHOD_FLAGS.get(method, []) + epochs(STUDENT_CONFIG)
            seconds = run_train(argv, os.path.join(output, f'{experiment}.out'))
            last, best = read_summary(run_dir)
            results.append((last, best, seconds, run_dir))
            print(f'student: {label} top-1 {last:.2f} in {seconds:.0f} s', flush=True)
        lasts, bests, times, run_dirs = (list(column) for column in zip(*results))
        first_runs[method] = run_dirs[0]
        folder = run_dirs[0] if args.seeds == 1 else os.path.join(output, f'student-{method}-seed*')
        rows.append(('student (CNN, 300 train images)', method, lasts, bests, times, folder))

    pictures = draw_pictures(output, first_runs, teacher_file)

    print()
    seeds_note = '' if args.seeds == 1 else f', mean ± std over seeds {seeds[0]}..{seeds[-1]}'
    header = ('run', 'distiller', 'seeds', f'test top-1{seeds_note}', 'best top-1', 'wall time per run', 'run folder')
    print_table(header, [(run, method, str(len(lasts)), mean_std(lasts), mean_std(bests),
                          f'{statistics.mean(times):.0f} s', os.path.relpath(folder, ROOT))
                         for run, method, lasts, bests, times, folder in rows])
    print(f'\nDigits test set: 539 images. Total time {time.time() - demo_start:.0f} s. '
          f'Run folders (args.yaml, summary.csv, log.txt, checkpoints, TensorBoard) under {os.path.relpath(output, ROOT)}/')
    for picture in pictures:
        print(picture)


if __name__ == '__main__':
    main()
