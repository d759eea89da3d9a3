"""Shared test helpers: building distillers directly, and running train.py to a user error."""
import argparse
import csv
import os
import subprocess

import timm
import torch

import train
from distillers import get_distiller
from xkd.run import run_cli


def distiller_args(name, num_classes=10, input_size=32, **overrides):
    """The method's flag defaults plus what train.py sets before building a distiller."""
    parser = argparse.ArgumentParser()
    get_distiller(name).add_arguments(parser)
    args = parser.parse_args([])
    vars(args).update(dict(gt_loss_weight=1.0, kd_loss_weight=1.0, kd_temperature=1.0, num_classes=num_classes,
                           input_size=(3, input_size, input_size)), **overrides)
    return args


def build_distiller(name, student, teacher, criterion=None, **overrides):
    torch.manual_seed(0)
    return get_distiller(name)(student, teacher, criterion or torch.nn.CrossEntropyLoss(),
                               distiller_args(name, **overrides))


def create(name, **kwargs):
    """A timm model with seeded random weights."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def cli_error(capsys, argv, main=train.main):
    """Run a command line that must fail: exit status 2, one line on stderr, no training step before it."""
    capsys.readouterr()
    try:
        status = run_cli(main, argv)
    except SystemExit as exit:  # argparse's own usage errors
        status = exit.code
    assert status == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count('\n') == 0 and err.startswith('error: '), err
    assert 'Train: ' not in captured.out, 'a training step ran before the error'
    return err


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(command, env=None):
    """Run a command in the repository root with one OpenMP thread; it must succeed. Returns its output."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def summary_rows(run_dir):
    """The rows of a run's summary.csv, as dicts."""
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def sigkill_when_logged(command, log, marker, timeout=300):
    """Start `command` in the repository root and SIGKILL it as soon as `marker` appears in the file `log`
    (a real kill: no handler runs, loader workers included). Returns the process's exit status."""
    import signal
    import time
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not (log.exists() and marker in log.read_text()):
            assert process.poll() is None and time.time() < deadline, 'the run ended before it could be killed'
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode
