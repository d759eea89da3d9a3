"""The benchmarks still run and print their tables (their figures are read by people, never asserted)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_benchmark_prints_every_variant():
    result = subprocess.run([sys.executable, 'bench/step.py', '--model', 'demo_resnet_student',
                             '--teacher', 'demo_vit_teacher', '--img-size', '32', '--num-classes', '10',
                             '--rounds', '1', '--warmup', '1', '--methods', 'ofa'],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith('| ')]
    names = [row.split('|')[1].strip() for row in rows[1:]]
    assert names == ['student', 'floor', 'ofa fp32', 'ofa bf16']
    assert 'Teacher forward alone (float32): no_grad' in result.stdout
    assert all(row.split('|')[5].strip() != 'nan' for row in rows[1:])  # peak memory measured


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
