"""The OFA-KD / RSD train.py's command lines and args.yaml are accepted, and the flags they share with ours mean
the same: every flag of the reference parses, its args.yaml trains, --dist-bn, --use-ema-teacher, several
EMAs, --bce-loss, --log-wandb, the dataset downloaded by default and inferred from the data folder."""
import os
import sys
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy

import train
from conftest import write_cifar100
from helpers import cli_error, run_command, summary_rows
from xkd import data, models
from xkd.config import parse_args, check_args
from xkd.errors import UserError

# Every flag of the reference train.py (VISION-SJTU/RSD, a superset of Hao840/OFAKD's), each with its default or a
# sample value, as one command line; --apex-amp and --native-amp are left out: on the command line they are errors.
REFERENCE_COMMAND_LINE = """
--model resnet18 --teacher deit_tiny_patch16_224 --teacher-pretrained t.pth --use-ema-teacher
--distiller ofa --gt-loss-weight 1.0 --kd-loss-weight 1.0 --kd-temperature 1 --ofa-eps 1
--ofa-stage 1 2 3 4 --ofa-loss-weight 1 --ofa-temperature 1 --dist-beta 1 --dist-gamma 1
--dist-tau 1 --dkd-alpha 1 --dkd-beta 2 --dkd-temperature 1 --correlation-scale 0.02
--correlation-feat-dim 128 --crd-feat-dim 128 --crd-k 16384 --crd-momentum 0.5
--crd-temperature 0.07 --rkd-distance-weight 25 --rkd-angle-weight 50 --rkd-eps 1e-12 --rkd-squared
--fitnet-stage 1 2 3 4 --fitnet-loss-weight 1 --rsd-stage -1 --rsd-loss-weight 0.1 --rsd-kappa 0.01
--rsd-gamma 2 --speedtest --eval-interval 1 --eval-interval-end 0.75 --dataset cifar100
--train-split train --val-split validation --dataset-download --class-map map.txt --pretrained
--initial-checkpoint init.pth --num-classes 1000 --gp avg --img-size 32 --input-size 3 32 32
--crop-pct 0.9 --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --interpolation bicubic --batch-size 128
--validation-batch-size 16 --opt sgd --opt-eps 1e-8 --opt-betas 0.9 0.999 --momentum 0.9
--weight-decay 2e-05 --clip-grad 5.0 --clip-mode norm --layer-decay 0.65 --sched cosine --lr 0.05
--lr-noise 0.5 0.8 --lr-noise-pct 0.67 --lr-noise-std 1.0 --lr-cycle-mul 1.0 --lr-cycle-decay 0.5
--lr-cycle-limit 1 --lr-k-decay 1.0 --warmup-lr 0.0001 --min-lr 1e-06 --epochs 300
--epoch-repeats 0.0 --start-epoch 0 --decay-epochs 100 --warmup-epochs 3 --cooldown-epochs 0
--patience-epochs 10 --decay-rate 0.1 --no-aug --scale 0.08 1.0 --ratio 0.75 1.3333333333333333
--hflip 0.5 --vflip 0.0 --color-jitter 0.4 --aa rand-m9-mstd0.5-inc1 --aug-repeats 0 --aug-splits 0
--jsd-loss --bce-loss --bce-target-thresh 0.2 --reprob 0.0 --remode pixel --recount 1 --resplit
--mixup 0.0 --cutmix 0.0 --cutmix-minmax 0.2 0.8 --mixup-prob 1.0 --mixup-switch-prob 0.5
--mixup-mode batch --mixup-off-epoch 0 --smoothing 0.1 --train-interpolation random --drop 0.0
--drop-connect 0.1 --drop-path 0.1 --drop-block 0.1 --bn-momentum 0.1 --bn-eps 1e-5 --sync-bn
--dist-bn reduce --split-bn --model-ema --model-ema-force-cpu --model-ema-decay 0.9998 --seed 42
--worker-seeding all --log-interval 200 --recovery-interval 0 --checkpoint-hist 10 --workers 8
--save-images --amp --no-ddp-bb --pin-mem --no-prefetcher --output out
--experiment x --eval-metric top1 --tta 0 --local_rank 0 --dist_url env:// --use-multi-epochs-loader
"""

REFERENCE_DESTS = """
model teacher teacher_pretrained use_ema_teacher distiller gt_loss_weight kd_loss_weight kd_temperature ofa_eps ofa_stage ofa_loss_weight ofa_temperature dist_beta dist_gamma dist_tau dkd_alpha dkd_beta dkd_temperature correlation_scale correlation_feat_dim crd_feat_dim crd_k crd_momentum crd_temperature rkd_distance_weight rkd_angle_weight rkd_eps rkd_squared fitnet_stage fitnet_loss_weight rsd_stage rsd_loss_weight rsd_kappa rsd_gamma speedtest eval_interval eval_interval_end data_dir dataset train_split val_split dataset_download class_map pretrained initial_checkpoint num_classes gp img_size input_size crop_pct mean std interpolation batch_size validation_batch_size opt opt_eps opt_betas momentum weight_decay clip_grad clip_mode layer_decay sched lr lr_noise lr_noise_pct lr_noise_std lr_cycle_mul lr_cycle_decay lr_cycle_limit lr_k_decay warmup_lr min_lr epochs epoch_repeats start_epoch decay_epochs warmup_epochs cooldown_epochs patience_epochs decay_rate no_aug scale ratio hflip vflip color_jitter aa aug_repeats aug_splits jsd_loss bce_loss bce_target_thresh reprob remode recount resplit mixup cutmix cutmix_minmax mixup_prob mixup_switch_prob mixup_mode mixup_off_epoch smoothing train_interpolation drop drop_connect drop_path drop_block bn_momentum bn_eps sync_bn dist_bn split_bn model_ema model_ema_force_cpu model_ema_decay seed worker_seeding log_interval recovery_interval checkpoint_hist workers save_images amp apex_amp native_amp no_ddp_bb pin_mem no_prefetcher output experiment eval_metric tta local_rank dist_url use_multi_epochs_loader
""".split()

# The args.yaml the reference's train.py writes for the CIFAR-100 CNN recipe (configs/cifar/cnn.yaml) and RSD
# ResNet18 <- Swin-T with an EMA of decay 0.99996, plus the run state that timm-derived scripts record (prefetcher, device, ...).
REFERENCE_ARGS_YAML = """\
aa: null
amp: false
apex_amp: false
aug_repeats: 0
aug_splits: 0
batch_size: 128
bce_loss: false
bce_target_thresh: null
bn_eps: null
bn_momentum: null
checkpoint_hist: 10
class_map: ''
clip_grad: null
clip_mode: norm
color_jitter: 0
cooldown_epochs: 0
correlation_feat_dim: 128
correlation_scale: 0.02
crd_feat_dim: 128
crd_k: 16384
crd_momentum: 0.5
crd_temperature: 0.07
crop_pct: null
cutmix: 0.0
cutmix_minmax: null
data_dir: data/cifar100
dataset: cifar100
dataset_download: true
decay_epochs: 100
decay_rate: 0.1
device: 0
dist_beta: 1
dist_bn: reduce
dist_gamma: 1
dist_tau: 1
dist_url: env://
distiller: rsd
distributed: true
dkd_alpha: 1
dkd_beta: 2
dkd_temperature: 1
drop: 0.0
drop_block: null
drop_connect: null
drop_path: null
epoch_repeats: 0.0
epochs: 300
eval_interval: 1
eval_interval_end: 0.75
eval_metric: top1
experiment: ''
fitnet_loss_weight: 1
fitnet_stage:
- 1
- 2
- 3
- 4
gp: null
gt_loss_weight: 1.0
hflip: 0.5
img_size: null
initial_checkpoint: ''
input_size: null
interpolation: ''
jsd_loss: false
kd_loss_weight: 1.0
kd_temperature: 1
layer_decay: null
local_rank: 0
log_interval: 200
lr: 0.05
lr_cycle_decay: 0.5
lr_cycle_limit: 1
lr_cycle_mul: 1.0
lr_k_decay: 1.0
lr_noise: null
lr_noise_pct: 0.67
lr_noise_std: 1.0
mean: null
min_lr: 0.001
mixup: 0.0
mixup_mode: batch
mixup_off_epoch: 0
mixup_prob: 1.0
mixup_switch_prob: 0.5
model: resnet18
model_ema: true
model_ema_decay:
- 0.99996
model_ema_force_cpu: false
momentum: 0.9
native_amp: false
no_aug: false
no_ddp_bb: false
no_prefetcher: false
num_classes: 100
ofa_eps:
- 1
ofa_loss_weight: 1
ofa_stage:
- 1
- 2
- 3
- 4
ofa_temperature: 1
opt: sgd
opt_betas: null
opt_eps: null
output: ''
patience_epochs: 10
pin_mem: false
prefetcher: true
pretrained: false
rank: 0
ratio:
- 0.75
- 1.3333333333333333
recount: 1
recovery_interval: 0
remode: pixel
reprob: 0.0
resplit: false
rkd_angle_weight: 50
rkd_distance_weight: 25
rkd_eps: 1.0e-12
rkd_squared: false
rsd_gamma: 2
rsd_kappa: 0.01
rsd_loss_weight: 0.1
rsd_stage: -1
save_images: false
scale:
- 0.08
- 1.0
sched: cosine
seed: 42
smoothing: 0.1
speedtest: false
split_bn: false
start_epoch: null
std: null
sync_bn: false
teacher: swin_tiny_patch4_window7_224
teacher_pretrained: pretrained/swin_tiny_patch4_window7_224_cifar100.pth
torchscript: false
train_interpolation: random
train_split: train
tta: 0
use_ema_teacher: false
use_multi_epochs_loader: false
val_split: validation
validation_batch_size: null
vflip: 0.0
warmup_epochs: 3
warmup_lr: 0.0001
weight_decay: 0.002
worker_seeding: all
workers: 8
world_size: 8
"""


def test_every_reference_flag_parses():
    args = parse_args(['data/cifar100'] + REFERENCE_COMMAND_LINE.split())
    missing = [dest for dest in REFERENCE_DESTS if dest not in vars(args) and dest not in ('apex_amp', 'native_amp')]
    assert len(REFERENCE_DESTS) == 139 and not missing
    assert args.model_ema_decay == [0.9998] and args.cutmix_minmax == [0.2, 0.8] and args.dist_bn == 'reduce'


@pytest.mark.parametrize('flag', ['--apex-amp', '--native-amp', '--prefetcher', '--torchscript'])
def test_reference_run_state_on_the_command_line_is_an_unknown_flag(capsys, flag):
    err = cli_error(capsys, ['--dataset', 'fake', flag])
    assert f'unrecognized arguments: {flag}' in err and '--amp is the mixed-precision flag' in err


def test_reference_flag_without_meaning_here_is_accepted_only_at_its_default(capsys):
    check_args(parse_args(['--dataset', 'fake', '--tta', '0', '--eval-metric', 'top1', '--dist-url', 'env://']))
    err = cli_error(capsys, ['--dataset', 'fake', '--tta', '2'])
    assert "--tta 2: this flag of the OFA-KD / RSD train.py is accepted only at its default (0)" in err


def test_the_reference_args_yaml_trains(tmp_path, teacher_file, caplog):
    config = tmp_path / 'args.yaml'
    config.write_text(REFERENCE_ARGS_YAML)
    with caplog.at_level('WARNING'):
        result = train.main(['--config', str(config), '--dataset', 'fake', '--fake-samples', '16', '--img-size', '32',
                             '--batch-size', '8', '--workers', '0', '--model', 'demo_resnet_student',
                             '--teacher', 'demo_vit_teacher', '--teacher-kwargs', 'depth=4',
                             '--teacher-pretrained', teacher_file, '--num-classes', '10', '--epochs', '1', '--warmup-epochs', '0',
                             '--output', str(tmp_path / 'runs')])
    warnings = [r.getMessage() for r in caplog.records if 'ignored' in r.getMessage()]
    assert len(warnings) == 1, warnings
    for key in ('apex_amp', 'native_amp', 'torchscript', 'local_rank', 'rank', 'world_size', 'device',
                'distributed', 'prefetcher'):
        assert key in warnings[0]
    rows = summary_rows(result['output_dir'])
    assert len(rows) == 1 and float(rows[0]['train_loss_rsd']) > 0 and rows[0]['eval_ema_top1'] != ''
    last = torch.load(os.path.join(result['output_dir'], 'last.pth.tar'), weights_only=True)
    assert list(last['state_dict_emas']) == ['0.99996'] and last['args']['model_ema_decay'] == [0.99996]


def test_a_real_unknown_yaml_key_is_still_an_error_with_close_matches(tmp_path):
    config = tmp_path / 'args.yaml'
    config.write_text(REFERENCE_ARGS_YAML + 'model_ema_decy: 0.99\n')
    with pytest.raises(UserError, match=r"unknown key 'model_ema_decy'.*did you mean model_ema_decay"):
        parse_args(['--config', str(config)])


@pytest.mark.parametrize('smoothing, mixup, thresh', [(0.1, 0.0, None), (0.1, 0.0, 0.2), (0.0, 0.8, None)])
def test_bce_loss_is_timms_binary_cross_entropy(smoothing, mixup, thresh):
    args = parse_args(['--dataset', 'fake', '--bce-loss', '--smoothing', str(smoothing), '--mixup', str(mixup)]
                      + (['--bce-target-thresh', str(thresh)] if thresh is not None else []))
    criterion = train.create_criterion(args)
    assert isinstance(criterion, BinaryCrossEntropy)
    logits, label = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 0])
    # Under mixup the targets arrive smoothed already; otherwise the criterion smooths the one-hot targets.
    target = F.one_hot(label, 5).float()
    if not mixup:
        target = target * (1 - smoothing) + smoothing / 5
    if thresh is not None:
        target = (target > thresh).float()
    expected = F.binary_cross_entropy_with_logits(logits, target)
    assert criterion(logits, target if mixup else label).item() == pytest.approx(expected.item(), rel=1e-6)


def test_use_ema_teacher_loads_the_teachers_ema_weights(tmp_path, caplog):
    torch.manual_seed(0)
    plain = timm.create_model('demo_resnet_student', num_classes=10).state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in plain.items()}
    path = tmp_path / 'teacher.pth'
    torch.save({'state_dict': plain, 'state_dict_ema': ema}, path)
    base = ['--dataset', 'fake', '--img-size', '32', '--teacher', 'demo_resnet_student', '--teacher-pretrained',
            str(path), '--num-classes', '10']
    for flags, expected in (([], plain), (['--use-ema-teacher'], ema)):
        args = parse_args(base + flags)
        args.input_size = (3, 32, 32)
        teacher = models.create_teacher(args)
        assert all(torch.equal(teacher.state_dict()[k], expected[k]) for k in expected)
    torch.save({'state_dict': plain}, path)
    args = parse_args(base + ['--use-ema-teacher'])
    args.input_size = (3, 32, 32)
    with caplog.at_level('WARNING'):
        models.create_teacher(args)
    assert 'holds no EMA weights' in caplog.text


def test_log_wandb_without_wandb_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None)  # import fails as when it is not installed
    err = cli_error(capsys, ['--dataset', 'fake', '--log-wandb'])
    assert '--log-wandb needs the wandb package (pip install wandb)' in err


def test_log_wandb_logs_each_epoch(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(('init', kw)),
                                 log=lambda row, step: calls.append(('log', row, step)),
                                 finish=lambda: calls.append(('finish',)))
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    result = train.main(['--dataset', 'fake', '--fake-samples', '16', '--img-size', '32', '--batch-size', '8',
                         '--workers', '0', '--model', 'demo_resnet_student', '--epochs', '2', '--log-wandb',
                         '--output', str(tmp_path)])
    assert calls[0][0] == 'init' and calls[0][1]['config']['epochs'] == 2 and calls[-1] == ('finish',)
    logged = [c for c in calls if c[0] == 'log']
    assert [c[2] for c in logged] == [0, 1] and {'train_loss', 'eval_top1', 'lr'} <= set(logged[0][1])
    assert os.path.isdir(result['output_dir'])


@pytest.mark.parametrize('layout, expected', [('cifar', 'cifar100'), ('cifar-inner', 'cifar100'),
                                               ('folder', 'folder')])
def test_dataset_is_inferred_from_the_data_folder(tmp_path, layout, expected):
    if layout.startswith('cifar'):
        write_cifar100(str(tmp_path), train_images=4, test_images=2)
        root = str(tmp_path / 'cifar-100-python') if layout == 'cifar-inner' else str(tmp_path)
    else:
        os.makedirs(tmp_path / 'train' / 'a')
        os.makedirs(tmp_path / 'val' / 'a')
        root = str(tmp_path)
    assert data.infer_dataset_type(root) == expected


def test_an_unrecognised_data_folder_lists_the_choices(tmp_path, capsys):
    err = cli_error(capsys, [str(tmp_path), '--model', 'demo_resnet_student'])
    assert "--dataset not given" in err and 'cifar100, imagenet, folder, digits, fake' in err


REFERENCE_CIFAR_CNN_YAML = """\
epochs: 300
batch_size: 128
lr: 0.05
min_lr: 1e-3
opt: sgd
weight_decay: 2e-3
sched: cosine
warmup_epochs: 3
color_jitter: 0
smoothing: 0.1
"""


def test_rsd_readme_launch_line_without_dataset_runs_as_written(cifar_dir, tmp_path):
    """The RSD README's line, with the reference's own configs/cifar/cnn.yaml (which names no dataset):
    the folder's cifar-100-python/ says it is CIFAR-100. Sizes shrunk as in test_launch.py."""
    teacher = tmp_path / 'swin_tiny_cifar100.pth'
    torch.save({'model': timm.create_model('swin_tiny_patch4_window7_224', img_size=32, num_classes=100).state_dict()},
               teacher)
    config = tmp_path / 'cnn.yaml'
    config.write_text(REFERENCE_CIFAR_CNN_YAML)
    output = run_command([sys.executable, 'train.py', cifar_dir, '--config', str(config), '--model', 'resnet18',
                          '--teacher', 'swin_tiny_patch4_window7_224', '--teacher-pretrained', str(teacher),
                          '--num-classes', '100', '--distiller', 'ofa', '--ofa-eps', '1.0',
                          '--img-size', '32', '--epochs', '1', '--warmup-epochs', '0', '--workers', '0', '--output', str(tmp_path),
                          '--experiment', 'readme'])
    assert 'Run folder' in output
    rows = summary_rows(tmp_path / 'readme')
    assert len(rows) == 1 and float(rows[0]['train_loss_ofa']) > 0
    assert torch.load(tmp_path / 'readme' / 'last.pth.tar', weights_only=True)['args']['dataset'] == 'cifar100'
