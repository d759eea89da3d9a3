"""The benchmarks still run and print their tables (their figures are read by people, never asserted)."""
import importlib.util
import os
import subprocess
import sys

import pytest

from xkd import hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model', 'demo_resnet_student', '--teacher', 'demo_vit_teacher', '--img-size', '32', '--num-classes', '10',
        '--rounds', '1', '--warmup', '1']


def variant_names(output):
    rows = [line for line in output.splitlines() if line.startswith('| ')]
    return [row.split('|')[1].strip() for row in rows[1:]], rows[1:]


def test_step_benchmark_prints_every_variant():
    # One thread: on a shared two-core machine two spinning OpenMP threads are several times slower.
    result = subprocess.run([sys.executable, 'bench/step.py'] + TINY + ['--methods', 'ofa', '--precisions', 'fp32',
                                                                         'bf16', '--threads', '1'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names, rows = variant_names(result.stdout)
    emulated = ' (emulated)' if hardware.native_bfloat16() is False else ''
    assert names == ['student', 'floor', 'ofa fp32', 'ofa bf16' + emulated]
    assert all(row.split('|')[5].strip() == '-' for row in rows)  # CPU memory only with --memory
    assert 'Teacher forward alone (float32): no_grad' in result.stdout and 'Wall time ' in result.stdout


@pytest.fixture
def step_module():
    spec = importlib.util.spec_from_file_location('bench_step', os.path.join(ROOT, 'bench', 'step.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('flags, expected', [
    ({'avx2', 'fma'}, ['student', 'floor', 'kd fp32']),  # emulated: bf16 skipped, and the output says so
    ({'avx2', 'amx_bf16'}, ['student', 'floor', 'kd fp32', 'kd bf16']),
])
def test_step_benchmark_times_bfloat16_by_default_only_where_it_is_native(step_module, monkeypatch, capsys,
                                                                          one_thread, flags, expected):
    monkeypatch.setattr(hardware, 'cpu_flags', lambda: flags)
    monkeypatch.setattr(step_module.torch.cuda, 'is_available', lambda: False)
    step_module.main(TINY + ['--methods', 'kd', '--warmup', '0'])
    output = capsys.readouterr().out
    assert variant_names(output)[0] == expected
    assert ('bf16 rows skipped: this CPU has no native bfloat16' in output) == (len(expected) == 3)


def test_peak_memory_of_a_variant_comes_from_a_fresh_process(step_module):
    bench_args = step_module.parse(TINY + ['--threads', '1'])
    peak_mib = step_module.peak_rss_of('ofa bf16', bench_args)
    assert 100 < peak_mib < 10_000  # torch alone takes a few hundred MiB; nan would mean the process failed


def test_loader_benchmark_prints_every_path_and_the_speed_up():
    result = subprocess.run([sys.executable, 'bench/loader.py', '--images', '64', '--batch-size', '16',
                             '--img-size', '64', '--workers', '1'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split('|')[1:-1] for line in result.stdout.splitlines() if line.startswith('| ')][1:]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [
        (recipe, path) for recipe in ('cnn.yaml', 'vit_mlp.yaml')
        for path in ('host (--no-prefetcher)', 'uint8 (--device-resize off)', 'device (default)')]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    assert float(result.stdout.strip().splitlines()[-1].split('speed-up ')[1]) > 0


def test_teacher_cache_benchmark_prints_its_ratios():
    result = subprocess.run([sys.executable, 'bench/teacher_cache.py', '--pairs', 'demo_resnet_student:demo_vit_teacher',
                             '--img-size', '32', '--num-classes', '10', '--rounds', '2', '--threads', '1'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith('| demo_resnet_student')]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].strip('|').split('|')]
    assert len(cells) == 10 and all(float(cells[i]) > 0 for i in (1, 2, 3, 4, 5, 7, 9))
    assert all(float(value) > 0 for value in cells[8].split(','))
