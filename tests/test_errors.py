"""Bad input fails before any training step, exits 2 and prints one line: what was wrong, what to do."""
import pytest
import timm
import torch

import distillers
import train
from helpers import cli_error
from xkd.run import run_cli

FAST = ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
        '--workers', '0', '--model', 'demo_resnet_student']


def test_unknown_dataset_type_on_the_command_line(capsys):
    err = cli_error(capsys, FAST + ['--dataset', 'cifar10'])
    assert "invalid choice: 'cifar10'" in err and 'cifar100' in err


def test_unknown_dataset_type_in_a_config(capsys, tmp_path):
    config = tmp_path / 'c.yaml'
    config.write_text('dataset: svhn\n')
    err = cli_error(capsys, ['--config', str(config)])
    assert "unknown dataset type 'svhn'" in err


def test_teacher_weights_missing(capsys, tmp_path):
    err = cli_error(capsys, FAST + ['--distiller', 'kd', '--teacher', 'demo_vit_teacher',
                                    '--teacher-pretrained', str(tmp_path / 'nope.pth')])
    assert 'nope.pth' in err and 'does not exist' in err


def test_teacher_weights_unreadable(capsys, tmp_path):
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'this is not a checkpoint')
    err = cli_error(capsys, FAST + ['--distiller', 'kd', '--teacher', 'demo_vit_teacher',
                                    '--teacher-pretrained', str(garbage), '--output', str(tmp_path)])
    assert 'cannot be read' in err and 'garbage.pth' in err


def test_negative_epochs(capsys):
    err = cli_error(capsys, FAST + ['--epochs', '-3'])
    assert '--epochs must be a positive integer, got -3' in err


def test_float16_amp_on_cpu_points_to_bfloat16(capsys):
    err = cli_error(capsys, FAST + ['--amp', '--amp-dtype', 'float16', '--device', 'cpu'])
    assert 'bfloat16' in err


def test_wrong_length_of_ofa_eps(capsys):
    if 'ofa' not in distillers.distiller_names():
        pytest.skip('OFA is not registered')
    err = cli_error(capsys, FAST + ['--distiller', 'ofa', '--teacher', 'demo_vit_teacher',
                                    '--ofa-stage', '1', '2', '--ofa-eps', '1.0', '1.0'])
    assert '--ofa-eps' in err and '3' in err


def test_non_finite_loss_stops_the_run_with_step_values_and_checkpoint(capsys, tmp_path):
    teacher = timm.create_model('demo_vit_teacher', num_classes=10)
    state_dict = teacher.state_dict()
    state_dict['head.weight'] = torch.full_like(state_dict['head.weight'], float('nan'))
    path = tmp_path / 'nan_teacher.pth'
    torch.save(state_dict, path)
    capsys.readouterr()
    status = run_cli(train.main, FAST + ['--distiller', 'kd', '--teacher', 'demo_vit_teacher', '--teacher-pretrained',
                                         str(path), '--log-interval', '1', '--output', str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2
    assert 'non-finite by epoch 0 step 1/4' in err and 'loss_kd=nan' in err and 'no checkpoint' in err
    assert not (tmp_path / 'fake-kd-demo_resnet_student-from-demo_vit_teacher' / 'last.pth.tar').exists()


def test_a_fresh_run_never_overwrites_a_named_run(capsys, tmp_path):
    args = FAST + ['--output', str(tmp_path), '--experiment', 'mine']
    train.main(args)
    err = cli_error(capsys, args)
    assert 'already holds a run' in err and '--resume auto' in err


def test_sync_bn_on_cpu_says_it_needs_gpus(capsys):
    err = cli_error(capsys, FAST + ['--sync-bn', '--device', 'cpu'])
    assert '--sync-bn needs GPUs' in err


@pytest.mark.parametrize('flags', [['--mixup', '0.8'], ['--cutmix', '1.0'], ['--cutmix-minmax', '0.2', '0.8']])
def test_odd_batch_with_mixup_stops_before_any_model_is_built(capsys, monkeypatch, flags):
    built = []
    monkeypatch.setattr(train.models, 'create_model', lambda *a, **k: built.append(a))
    err = cli_error(capsys, FAST + ['--batch-size', '7'] + flags)
    assert '--batch-size 7 is odd' in err and 'even --batch-size' in err and 'pairs' in err
    assert not built


def test_odd_batch_with_mixup_from_a_recipe_yaml(capsys, monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(train.models, 'create_model', lambda *a, **k: built.append(a))
    config = tmp_path / 'recipe.yaml'
    config.write_text('mixup: 0.8\ncutmix: 1.0\nbatch_size: 9\n')
    err = cli_error(capsys, ['--config', str(config)] + [f for f in FAST if f not in ('--batch-size', '8')])
    assert '--batch-size 9 is odd' in err and 'recipe' in err
    assert not built
    # The shipped vit_mlp recipe turns mixup on: an odd batch on the command line stops the same way.
    err = cli_error(capsys, ['--config', 'configs/cifar/vit_mlp.yaml'] + FAST + ['--batch-size', '5', '--warmup-epochs', '0'])
    assert '--batch-size 5 is odd' in err


def test_odd_batch_without_mixup_is_fine():
    args = train.parse_args(FAST + ['--batch-size', '7'])
    train.check_args(args)  # no mixup: an odd batch is allowed
