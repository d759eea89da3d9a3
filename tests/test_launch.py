"""The command lines our users bring from the OFA-KD and RSD code bases, run verbatim (2 processes, Gloo).

Only sizes are overridden so that they finish in seconds: 32 px images and one epoch, on a CIFAR-100 folder
of random pickles and a Swin-T teacher checkpoint of random weights written here.
"""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from helpers import run_command, summary_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = ['--img-size', '32', '--epochs', '1', '--warmup-epochs', '0']


@pytest.fixture(scope='module')
def swin_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'swin_tiny_cifar100.pth'
    model = timm.create_model('swin_tiny_patch4_window7_224', img_size=32, num_classes=100)
    torch.save({'model': model.state_dict()}, path)
    return str(path)


def test_ofa_readme_command_with_torch_distributed_launch(cifar_dir, swin_teacher, tmp_path):
    output = run_command([sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', 'train.py',
                          cifar_dir, '--config', 'configs/cifar/cnn.yaml', '--model', 'resnet18',
                          '--teacher', 'swin_tiny_patch4_window7_224', '--teacher-pretrained', swin_teacher,
                          '--num-classes', '100', '--distiller', 'ofa', '--ofa-eps', '1.0']
                         + SHRINK + ['--output', str(tmp_path), '--experiment', 'ofa'])
    assert '2 process(es)' in output and 'batch 128 per process (256 in all)' in output
    rows = summary_rows(tmp_path / 'ofa')
    assert len(rows) == 1 and float(rows[0]['train_loss_ofa']) > 0
    assert os.path.isfile(tmp_path / 'ofa' / 'last.pth.tar')


def test_train_sh_launches_n_processes(cifar_dir, swin_teacher, tmp_path):
    output = run_command(['bash', 'train.sh', '2'] + SHRINK + ['--output', str(tmp_path), '--experiment', 'rsd'],
                 env={'DATA': cifar_dir, 'TEACHER': swin_teacher})
    assert '2 process(es)' in output
    rows = summary_rows(tmp_path / 'rsd')
    assert len(rows) == 1 and 'train_loss_rsd' in rows[0]


def test_train_sh_rejects_a_non_number(tmp_path):
    result = subprocess.run(['bash', 'train.sh', 'two'], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and 'number of processes' in result.stderr


def test_validate_readme_command(cifar_dir, tmp_path):
    """SPEC.md's validate.py line, verbatim, from a folder holding data/cifar100 and the teacher file."""
    os.makedirs(tmp_path / 'data')
    os.symlink(cifar_dir, tmp_path / 'data' / 'cifar100')
    os.makedirs(tmp_path / 'pretrained')
    model = timm.create_model('swin_tiny_patch4_window7_224', num_classes=100)
    checkpoint = tmp_path / 'pretrained' / 'swin_tiny_patch4_window7_224_cifar100.pth'
    torch.save({'state_dict': model.state_dict()}, checkpoint)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'validate.py'), 'data/cifar100', '--dataset', 'cifar100',
         '--num-classes', '100', '--model', 'swin_tiny_patch4_window7_224',
         '--checkpoint', 'pretrained/swin_tiny_patch4_window7_224_cifar100.pth'],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '2'})
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line['count'] == 100 and set(line) >= {'top1', 'top5', 'loss'}
