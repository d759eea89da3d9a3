"""configs/imagenet/stronger.yaml (the reference's stronger-teacher ImageNet recipe: LAMB, BCE on the labels,
repeated augmentation, EMA, a BEiT-v2 teacher) parses to what it says and trains a step on tiny models."""
import math

import pytest
from timm.loss import BinaryCrossEntropy

import train
from helpers import summary_rows
from xkd.config import parse_args

RECIPE = 'configs/imagenet/stronger.yaml'


def test_the_recipe_parses_to_the_reference_settings():
    args = parse_args(['--config', RECIPE])
    assert (args.opt, args.lr, args.epochs, args.batch_size) == ('lamb', 5e-3, 300, 256)
    assert args.bce_loss and args.aug_repeats == 3 and args.model_ema and args.model_ema_decay == [0.9998]
    assert args.teacher == 'beitv2_large_patch16_224'
    assert isinstance(train.create_criterion(args), BinaryCrossEntropy)


@pytest.mark.usefixtures('one_thread')
def test_the_recipe_trains_a_step_with_a_tiny_beitv2_teacher(tmp_path):
    """The recipe as written, with tiny models of the same families and fake data in place of ImageNet."""
    train.main(['--config', RECIPE, '--dataset', 'fake', '--num-classes', '10', '--fake-samples', '16',
                '--img-size', '32', '--batch-size', '8', '--epochs', '1', '--warmup-epochs', '0', '--workers', '0',
                '--model', 'demo_resnet_student', '--teacher', 'beitv2_base_patch16_224',
                '--teacher-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', 'patch_size=8',
                '--distiller', 'ofa', '--output', str(tmp_path), '--experiment', 'run'])
    row = summary_rows(tmp_path / 'run')[-1]
    assert math.isfinite(float(row['train_loss_gt'])) and math.isfinite(float(row['train_loss_kd']))
    assert float(row['eval_ema_top1']) >= 0
