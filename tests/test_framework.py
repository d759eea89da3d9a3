"""train.py / validate.py end to end on tiny data: config merge, datasets, outputs, checkpoints, errors."""
import json
import os

import pytest
import timm
import torch
import yaml

import train
import validate
from distillers.kd import kd_loss
from xkd import data
from xkd.config import build_parser, parse_args
from xkd.errors import UserError
from helpers import cli_error

FAST = ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
        '--workers', '0', '--log-interval', '2', '--model', 'demo_resnet_student']


def teacher_checkpoint(path, wrap=True):
    """A demo ViT teacher's weights as train.py users get them: under state_dict, with DDP's module. prefix."""
    teacher = timm.create_model('demo_vit_teacher', num_classes=10)
    state_dict = {f'module.{k}': v for k, v in teacher.state_dict().items()}
    torch.save({'state_dict': state_dict, 'epoch': 3} if wrap else teacher.state_dict(), path)
    return teacher


# ---------------------------------------------------------------- config

def test_yaml_gives_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / 'run.yaml'
    config.write_text('lr: 0.5\nepochs: 7\nmodel: resnet34\nwarmup-epochs: 2\n')
    args = parse_args(['--config', str(config), '--epochs', '3'])
    assert (args.lr, args.epochs, args.model, args.warmup_epochs) == (0.5, 3, 'resnet34', 2)


def test_recipes_parse_with_the_published_values():
    args = parse_args(['--config', 'configs/cifar/cnn.yaml'])
    assert (args.dataset, args.epochs, args.batch_size, args.lr, args.min_lr) == ('cifar100', 300, 128, 0.05, 1e-3)
    assert (args.opt, args.weight_decay, args.warmup_epochs, args.warmup_lr) == ('sgd', 2e-3, 3, 1e-4)
    args = parse_args(['--config', 'configs/cifar/vit_mlp.yaml'])
    assert (args.opt, args.lr, args.clip_grad, args.mixup, args.cutmix, args.aa) == (
        'adamw', 5e-4, 5.0, 0.8, 1.0, 'rand-m9-mstd0.5-inc1')
    args = parse_args(['--config', 'configs/imagenet/cnn.yaml'])
    assert (args.sched, args.decay_epochs, args.lr, args.batch_size) == ('step', 30, 0.1, 64)
    args = parse_args(['--config', 'configs/imagenet/vit_mlp.yaml'])
    assert (args.model_ema, args.model_ema_decay, args.lr) == (True, [0.99996], 1e-3)


def test_unknown_yaml_key_is_rejected_by_name(tmp_path):
    config = tmp_path / 'typo.yaml'
    config.write_text('lr: 0.1\nwarmup_epoch: 3\n')
    with pytest.raises(UserError, match=r"unknown key 'warmup_epoch'.*warmup_epochs"):
        parse_args(['--config', str(config)])


def test_malformed_yaml_names_file_and_line(tmp_path):
    config = tmp_path / 'broken.yaml'
    config.write_text('lr: 0.1\nepochs: [3\nmodel: resnet18\n')
    with pytest.raises(UserError, match=r"broken.yaml' line \d+.*does not parse"):
        parse_args(['--config', str(config)])


def test_both_local_rank_spellings_parse():
    assert parse_args(['--local-rank', '1']).local_rank == 1
    assert parse_args(['--local_rank=3']).local_rank == 3


# ---------------------------------------------------------------- data

def make_args(**overrides):
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_cifar100_reads_the_python_pickles(cifar_dir):
    train_set, val_set = data.create_datasets(make_args(dataset='cifar100', data_dir=cifar_dir))
    assert (len(train_set), len(val_set)) == (300, 100)
    image, label = train_set[5]
    assert image.size == (32, 32) and label == 5
    # Pointing at the cifar-100-python folder itself works too.
    train_set, _ = data.create_datasets(make_args(dataset='cifar100',
                                                  data_dir=os.path.join(cifar_dir, 'cifar-100-python')))
    assert len(train_set) == 300


def test_cifar100_transform_upsamples_with_cifar_statistics(cifar_dir):
    args = make_args(dataset='cifar100', data_dir=cifar_dir, input_size=(3, 64, 64))
    config = data.data_config(args)
    assert config['mean'] == data.CIFAR100_MEAN and config['std'] == data.CIFAR100_STD
    train_transform, val_transform = data.create_transforms(args)
    image, _ = data.create_datasets(args)[1][0]
    assert val_transform(image).shape == (3, 64, 64)
    assert train_transform(image).shape == (3, 64, 64)


def test_missing_cifar100_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match=r"CIFAR-100 not found: looked .*cifar-100-python.*--no-dataset-download"):
        data.create_datasets(make_args(dataset='cifar100', data_dir=str(tmp_path), dataset_download=False))


def test_missing_cifar100_is_downloaded_by_default_and_no_network_says_where_to_put_it(tmp_path, monkeypatch):
    import urllib.error
    calls = []

    def no_network(self, *args, **kwargs):
        calls.append(self.root)
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(data.CIFAR100, 'download', no_network)
    with pytest.raises(UserError, match=r"download failed \(URLError.*looked for train, test and meta in "
                                        r"'.*cifar-100-python'\. Put the python version"):
        data.create_datasets(make_args(dataset='cifar100', data_dir=str(tmp_path)))
    assert calls == [str(tmp_path)]


@pytest.mark.parametrize('kind', ['imagenet', 'folder'])
def test_image_folders(folder_dir, kind):
    args = make_args(dataset=kind, data_dir=folder_dir)
    train_set, val_set = data.create_datasets(args)
    assert (len(train_set), len(val_set)) == (12, 12)
    assert data.dataset_num_classes(args, train_set) == 3  # the class folders, also for an ImageNet subset


def test_image_folder_in_the_wrong_layout(tmp_path):
    (tmp_path / 'images').mkdir()
    with pytest.raises(UserError, match=r"train.*expects DATA/train and DATA/val"):
        data.create_datasets(make_args(dataset='folder', data_dir=str(tmp_path)))


def test_digits_has_a_fixed_split():
    train_set, val_set = data.create_datasets(make_args(dataset='digits'))
    assert len(train_set) + len(val_set) == 1797 and len(train_set) == 1258
    again, _ = data.create_datasets(make_args(dataset='digits'))
    assert list(again.indices[:20]) == list(train_set.indices[:20])
    image, label = train_set[0]
    assert image.size == (8, 8) and 0 <= label < 10


def test_fake_data_is_the_same_every_time():
    first, _ = data.create_datasets(make_args(dataset='fake', fake_samples=12, num_classes=4))
    second, _ = data.create_datasets(make_args(dataset='fake', fake_samples=12, num_classes=4))
    assert len(first) == 12 and first[3][1] == 3
    assert list(first[3][0].getdata()) == list(second[3][0].getdata())


# ---------------------------------------------------------------- losses

def test_kd_loss_by_hand():
    # One sample, two classes, T = 2: p_t = softmax([0, 2] / 2) = softmax([0, 1]), p_s = softmax([0, 0]) = (.5, .5).
    logits_student = torch.tensor([[0.0, 0.0]])
    logits_teacher = torch.tensor([[0.0, 2.0]])
    e = torch.e
    p_t = torch.tensor([1 / (1 + e), e / (1 + e)])
    kl = (p_t * (p_t / 0.5).log()).sum()
    expected = 4 * kl  # T^2 = 4
    assert torch.allclose(kd_loss(logits_student, logits_teacher, 2.0), expected, atol=1e-6)
    assert kd_loss(logits_teacher, logits_teacher, 3.0).abs() < 1e-7


# ---------------------------------------------------------------- train.py and validate.py

@pytest.mark.parametrize('method', ['vanilla', 'kd'])
def test_one_epoch_then_validate(tmp_path, method, capsys):
    teacher_path = tmp_path / 'teacher.pth'
    teacher = teacher_checkpoint(teacher_path)
    config = tmp_path / 'run.yaml'
    config.write_text('lr: 0.01\nsmoothing: 0.0\n')
    result = train.main(FAST + ['--config', str(config), '--distiller', method, '--teacher', 'demo_vit_teacher',
                                '--teacher-pretrained', str(teacher_path), '--output', str(tmp_path / 'runs'),
                                '--experiment', method, '--lr', '0.02'])
    run = tmp_path / 'runs' / method
    assert result['output_dir'] == str(run)
    for name in ('args.yaml', 'summary.csv', 'log.txt', 'last.pth.tar', 'model_best.pth.tar',
                 'checkpoint-0.pth.tar'):
        assert (run / name).is_file(), name
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(run))

    saved_args = yaml.safe_load((run / 'args.yaml').read_text())
    assert saved_args['lr'] == 0.02 and saved_args['smoothing'] == 0.0 and saved_args['distiller'] == method
    assert parse_args(['--config', str(run / 'args.yaml')]).lr == 0.02  # args.yaml works as a config

    header, row = (run / 'summary.csv').read_text().strip().splitlines()
    columns = header.split(',')
    expected_losses = ['train_loss', 'train_loss_gt'] + (['train_loss_kd'] if method == 'kd' else [])
    assert columns == ['epoch'] + expected_losses + ['eval_loss', 'eval_top1', 'eval_top5', 'lr']

    checkpoint = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)
    for key in ('state_dict', 'distiller', 'optimizer', 'scheduler', 'epoch', 'args', 'rng'):
        assert key in checkpoint, key
    student = timm.create_model('demo_resnet_student', num_classes=10)
    student.load_state_dict(checkpoint['state_dict'])  # timm's layout: the student alone
    teacher_keys = set(teacher.state_dict())
    assert not teacher_keys & set(checkpoint['state_dict'])

    log = (run / 'log.txt').read_text()
    assert 'extra modules: 0.000 M parameters' in log and 'Best top-1' in log

    capsys.readouterr()
    metrics = validate.main(['--dataset', 'fake', '--fake-samples', '32', '--model', 'demo_resnet_student',
                             '--checkpoint', str(run / 'last.pth.tar'), '--workers', '0'])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) >= {'top1', 'top5', 'loss', 'count'} and line['count'] == 10
    header_row = dict(zip(columns, row.split(',')))
    assert abs(line['top1'] - float(header_row['eval_top1'])) < 1e-6
    assert metrics['count'] == 10


def test_validate_reads_plain_state_dicts(tmp_path, capsys):
    model = timm.create_model('demo_resnet_student', num_classes=10)
    plain = tmp_path / 'plain.pth'
    torch.save({'model': {f'module.{k}': v for k, v in model.state_dict().items()}}, plain)
    validate.main(['--dataset', 'fake', '--fake-samples', '32', '--model', 'demo_resnet_student',
                   '--num-classes', '10', '--img-size', '32', '--checkpoint', str(plain), '--workers', '0'])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line['count'] == 10 and 0 <= line['top1'] <= 100


def test_eval_teacher_logs_its_accuracy(tmp_path):
    teacher_path = tmp_path / 'teacher.pth'
    teacher_checkpoint(teacher_path, wrap=False)
    train.main(FAST + ['--distiller', 'kd', '--teacher', 'demo_vit_teacher', '--teacher-pretrained',
                       str(teacher_path), '--eval-teacher', '--output', str(tmp_path), '--experiment', 'x'])
    assert 'Teacher top-1' in (tmp_path / 'x' / 'log.txt').read_text()


# ---------------------------------------------------------------- errors a user sees

def test_unknown_model_suggests_close_names(capsys, tmp_path):
    err = cli_error(capsys, FAST + ['--model', 'resnet_18', '--output', str(tmp_path)])
    assert "unknown model 'resnet_18'" in err and 'resnet18' in err


def test_unknown_distiller_lists_the_known_ones(capsys, tmp_path):
    err = cli_error(capsys, FAST + ['--distiller', 'rds', '--output', str(tmp_path)])
    assert "unknown distiller 'rds'" in err and 'kd' in err and 'vanilla' in err


def test_missing_data_folder(capsys, tmp_path):
    err = cli_error(capsys, [str(tmp_path / 'nowhere'), '--dataset', 'cifar100',
                                         '--output', str(tmp_path)])
    assert 'CIFAR-100 not found' in err


def test_malformed_yaml_on_the_command_line(capsys, tmp_path):
    config = tmp_path / 'bad.yaml'
    config.write_text('lr: [0.1\n')
    err = cli_error(capsys, ['--config', str(config)])
    assert 'bad.yaml' in err and 'line' in err


def test_distiller_needs_a_teacher(capsys, tmp_path):
    err = cli_error(capsys, FAST + ['--distiller', 'kd', '--output', str(tmp_path)])
    assert '--teacher' in err


def test_teacher_checkpoint_of_another_architecture(capsys, tmp_path):
    wrong = tmp_path / 'wrong.pth'
    torch.save(timm.create_model('demo_resnet_student', num_classes=10).state_dict(), wrong)
    err = cli_error(capsys, FAST + ['--distiller', 'kd', '--teacher', 'demo_vit_teacher',
                                                '--teacher-pretrained', str(wrong), '--output', str(tmp_path)])
    assert 'does not fit model' in err and 'missing' in err


def test_teacher_head_with_another_class_count(capsys, tmp_path):
    path = tmp_path / 'teacher100.pth'
    torch.save(timm.create_model('demo_vit_teacher', num_classes=100).state_dict(), path)
    err = cli_error(capsys, FAST + ['--distiller', 'kd', '--teacher', 'demo_vit_teacher',
                                                '--teacher-pretrained', str(path), '--output', str(tmp_path)])
    assert '100 classes' in err and '--num-classes is 10' in err


def test_fine_tuning_from_a_local_file_drops_a_mismatched_classifier(tmp_path):
    imagenet_model = timm.create_model('demo_resnet_student', num_classes=100)
    weights = tmp_path / 'imagenet.pth'
    torch.save({'state_dict': imagenet_model.state_dict()}, weights)
    train.main(FAST + ['--pretrained-path', str(weights), '--output', str(tmp_path), '--experiment', 'ft',
                       '--lr', '0', '--min-lr', '0'])
    assert 'its 100-class classifier was dropped' in (tmp_path / 'ft' / 'log.txt').read_text()
    tuned = torch.load(tmp_path / 'ft' / 'last.pth.tar', weights_only=True)['state_dict']
    assert torch.equal(tuned['conv1.0.weight'], imagenet_model.state_dict()['conv1.0.weight'])
    assert tuned['fc.weight'].shape == (10, 128)


def test_yaml_scalar_for_a_list_flag_is_a_one_element_list(tmp_path):
    config = tmp_path / 'ofa.yaml'
    config.write_text('ofa_eps: 1.5\nrsd_stage: -1\n')
    args = parse_args(['--config', str(config)])
    assert args.ofa_eps == [1.5] and args.rsd_stage == [-1]


def test_validate_use_ema_reads_the_ema_weights(tmp_path, capsys):
    train.main(FAST + ['--model-ema', '--model-ema-decay', '0.5', '--output', str(tmp_path), '--experiment', 'ema'])
    checkpoint = str(tmp_path / 'ema' / 'last.pth.tar')
    capsys.readouterr()
    validate.main(['--dataset', 'fake', '--fake-samples', '32', '--checkpoint', checkpoint, '--workers', '0',
                   '--use-ema'])
    ema_line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = (tmp_path / 'ema' / 'summary.csv').read_text().splitlines()
    row = dict(zip(summary[0].split(','), summary[1].split(',')))
    assert abs(ema_line['top1'] - float(row['eval_ema_top1'])) < 1e-6 and ema_line['count'] == 10
