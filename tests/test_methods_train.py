"""Every distiller through train.py, for a CNN student with a token teacher and a token student with a CNN
teacher: one epoch on fake data, each loss term finite and written to summary.csv."""
import math

import pytest

import distillers
import train
from helpers import summary_rows

METHODS = [m for m in distillers.distiller_names() if m != 'vanilla']
PAIRS = {
    'cnn-student-vit-teacher': ['--model', 'demo_resnet_student', '--teacher', 'demo_vit_teacher',
                                '--teacher-kwargs', 'patch_size=4'],
    'vit-student-cnn-teacher': ['--model', 'demo_vit_teacher', '--model-kwargs', 'depth=4', 'embed_dim=48',
                                'patch_size=4', '--teacher', 'demo_resnet_student'],
}
METHOD_FLAGS = {'rsd': ['--rsd-stage', '-1', '2'], 'ofa': ['--ofa-stage', '2', '4', '--ofa-eps', '1', '1.2', '1.5'],
                'crd': ['--crd-k', '64']}


@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('pair', sorted(PAIRS))
@pytest.mark.parametrize('method', METHODS)
def test_one_epoch_of_each_method(tmp_path, method, pair):
    train.main(['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
                '--workers', '0', '--distiller', method, '--output', str(tmp_path), '--experiment', 'run']
               + PAIRS[pair] + METHOD_FLAGS.get(method, []))
    row = summary_rows(tmp_path / 'run')[-1]
    losses = {key: float(value) for key, value in row.items() if key.startswith('train_loss')}
    assert 'train_loss_gt' in losses and len(losses) >= 3, losses
    assert all(math.isfinite(value) for value in losses.values()), losses
