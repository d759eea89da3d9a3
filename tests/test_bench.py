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
