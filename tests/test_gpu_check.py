"""bench/gpu_check.sh: valid bash, and (slow) its CPU-checkable parts run, print the table and set the exit status.

There is no GPU here: the GPU rows are SKIP in CPU=1 mode; the script itself is what is tested."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'bench', 'gpu_check.sh')


def run_script(tmp_path, methods):
    env = {**os.environ, 'CPU': '1', 'METHODS': methods, 'OUT': str(tmp_path / 'gpu_check'), 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(['bash', SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    rows = {line.split('|')[1].strip(): line.split('|')[2].strip() for line in result.stdout.splitlines()
            if line.startswith('| ') and not line.startswith('| check') and not line.startswith('| variant')}
    return result, rows


def test_gpu_check_is_valid_bash():
    result = subprocess.run(['bash', '-n', SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_gpu_check_cpu_mode_passes_and_prints_the_table(tmp_path):
    result, rows = run_script(tmp_path, 'kd')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert rows['kd, --amp bfloat16'] == 'PASS' and rows['ofa, --amp --channels-last'] == 'PASS'
    assert rows['bench/step.py'] == 'PASS' and rows['kd, 2 processes, NCCL'] == 'SKIP'
    assert '| kd fp32 |' in result.stdout  # the benchmark's own table follows
    assert '0 failed' in result.stdout


@pytest.mark.slow
def test_gpu_check_exits_non_zero_when_a_check_fails(tmp_path):
    result, rows = run_script(tmp_path, 'nosuch')
    assert result.returncode != 0
    assert rows['nosuch, --amp bfloat16'] == 'FAIL' and rows['bench/step.py'] == 'FAIL'
