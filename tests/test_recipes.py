"""The published cells (configs/experiments.yaml) and the CIFAR-100 teacher fine-tuning configs:
every cell expands to a train.py command line that parses, train.sh runs cells by name, and the
published numbers are those of SPEC.md section 4."""
import os
import re
import subprocess
import sys

import pytest
import timm
import torch

import distillers
from xkd.config import parse_args
from xkd.errors import UserError
from xkd.models import check_model_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, 'tools') not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, 'tools'))

import experiments  # noqa: E402

TEACHERS = {'swin_t': 'swin_tiny_patch4_window7_224', 'vit_s': 'vit_small_patch16_224',
            'mixer_b16': 'mixer_b16_224', 'convnext_t': 'convnext_tiny'}
STUDENTS = {'resnet18': 'resnet18', 'mobilenetv2': 'mobilenetv2_100', 'deit_t': 'deit_tiny_patch16_224',
            'swin_p': 'swin_pico_patch4_window7_224', 'resmlp_s12': 'resmlp_12_224'}
METHODS = ('kd', 'ofa', 'rsd', 'hcd', 'dkd', 'dist', 'fitnet', 'correlation', 'rkd', 'crd', 'bkd')
CNN_STUDENTS = ('resnet18', 'mobilenetv2_100')
# SPEC.md section 4: RSD paper tables 9-11.
PUBLISHED = {'cifar100-ofa-swin_t-resnet18': 80.54, 'cifar100-rsd-swin_t-resnet18': 83.92,
             'cifar100-ofa-mixer_b16-deit_t': 73.90, 'cifar100-rsd-mixer_b16-deit_t': 78.50,
             'cifar100-ofa-convnext_t-resmlp_s12': 81.22, 'cifar100-rsd-convnext_t-resmlp_s12': 84.21}
TEACHER_CONFIGS = {'swin_tiny_patch4_window7_224': 'configs/cifar/teachers/swin_tiny.yaml',
                   'vit_small_patch16_224': 'configs/cifar/teachers/vit_small.yaml',
                   'mixer_b16_224': 'configs/cifar/teachers/mixer_b16.yaml',
                   'convnext_tiny': 'configs/cifar/teachers/convnext_tiny.yaml'}


@pytest.fixture(scope='module')
def cells():
    return experiments.load_experiments()


def run_script(command, env=None):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})


# ---------------------------------------------------------------- the table

def test_every_teacher_student_and_method_is_one_named_cell(cells):
    assert len(cells) == len(TEACHERS) * len(STUDENTS) * len(METHODS) == 220
    expected = {f'cifar100-{method}-{teacher}-{student}': (TEACHERS[teacher], STUDENTS[student], method)
                for teacher in TEACHERS for student in STUDENTS for method in METHODS}
    assert {name: (cell.teacher, cell.student, cell.method) for name, cell in cells.items()} == expected


def test_published_numbers_are_those_of_the_spec(cells):
    assert {name: cell.published_top1 for name, cell in cells.items() if cell.published_top1 is not None} == PUBLISHED
    assert experiments.find_published(cells, 'cifar100', 'mixer_b16_224', 'deit_tiny_patch16_224', 'rsd') == 78.5
    assert experiments.find_published(cells, 'imagenet', 'mixer_b16_224', 'deit_tiny_patch16_224', 'rsd') is None
    # A vanilla run of a teacher is its fine-tuning: the RSD release's teacher top-1.
    teacher_top1 = {model: experiments.find_published(cells, 'cifar100', '-', model, 'vanilla')
                    for model in TEACHER_CONFIGS}
    assert teacher_top1 == {'swin_tiny_patch4_window7_224': 89.26, 'vit_small_patch16_224': 92.44,
                            'mixer_b16_224': 87.62, 'convnext_tiny': 88.42}
    assert experiments.find_published(cells, 'cifar100', '-', 'resnet18', 'vanilla') is None


def test_recipe_teacher_checkpoint_and_flags_of_each_cell(cells):
    for cell in cells.values():
        family = 'cnn' if cell.student in CNN_STUDENTS else 'vit_mlp'
        assert cell.recipe == f'configs/cifar/{family}.yaml', cell.name
        assert cell.teacher_checkpoint == f'pretrained/{cell.teacher}_cifar100.pth', cell.name
        assert cell.method_flags == (('--ofa-eps', '1.0') if cell.method == 'ofa' else ()), cell.name


def test_every_model_is_known_to_timm(cells):
    for name in {cell.teacher for cell in cells.values()} | {cell.student for cell in cells.values()}:
        check_model_name(name)


@pytest.mark.parametrize('method', METHODS)
def test_cell_arguments_parse_as_train_py_flags(cells, method):
    if method not in distillers.distiller_names():
        pytest.skip(f"distiller '{method}' is not registered yet")
    for cell in (cell for cell in cells.values() if cell.method == method):
        args = parse_args(cell.train_arguments('data/cifar100'))
        assert (args.data_dir, args.model, args.teacher, args.distiller) == (
            'data/cifar100', cell.student, cell.teacher, method)
        assert (args.num_classes, args.dataset, args.epochs, args.batch_size) == (100, 'cifar100', 300, 128)
        assert args.teacher_pretrained == cell.teacher_checkpoint and args.experiment == cell.name
        if cell.student in CNN_STUDENTS:
            assert (args.opt, args.lr, args.weight_decay) == ('sgd', 0.05, 2e-3)
        else:
            assert (args.opt, args.lr, args.mixup, args.cutmix) == ('adamw', 5e-4, 0.8, 1.0)
        if method == 'ofa':
            assert args.ofa_eps == [1.0]


def test_a_typo_in_the_table_fails_with_its_key(tmp_path):
    with open(experiments.TABLE) as f:
        text = f.read()
    table = tmp_path / 'experiments.yaml'
    table.write_text(text.replace('cifar100-rsd-swin_t-resnet18: 83.92', 'cifar100-rsd-swin-resnet18: 83.92'))
    with pytest.raises(UserError, match='published_top1 names cells .*cifar100-rsd-swin-resnet18'):
        experiments.load_experiments(str(table))
    table.write_text(text.replace("ofa: [--ofa-eps, '1.0']", 'ofa: --ofa-eps 1.0'))
    with pytest.raises(UserError, match='methods.ofa must be a list of strings'):
        experiments.load_experiments(str(table))
    table.write_text(text.replace('  resnet18: {model: resnet18, recipe: configs/cifar/cnn.yaml}',
                                  '  resnet18: {model: resnet18}'))
    with pytest.raises(UserError, match='students.resnet18 lacks recipe'):
        experiments.load_experiments(str(table))


# ---------------------------------------------------------------- tools/experiments.py

def test_experiments_lists_cells_and_prints_arguments(capsys):
    assert experiments.main(['--list']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 220
    assert lines[1].split() == ['cifar100-ofa-swin_t-resnet18', 'swin_tiny_patch4_window7_224', 'resnet18', 'ofa',
                                '80.54']
    assert experiments.main(['cifar100-ofa-swin_t-resnet18', '--data', '/data/cifar']) == 0
    assert capsys.readouterr().out.strip() == (
        '/data/cifar --config configs/cifar/cnn.yaml --model resnet18 --teacher swin_tiny_patch4_window7_224 '
        '--teacher-pretrained pretrained/swin_tiny_patch4_window7_224_cifar100.pth --num-classes 100 '
        '--distiller ofa --ofa-eps 1.0 --experiment cifar100-ofa-swin_t-resnet18')


def test_an_unknown_cell_names_close_ones(capsys):
    assert experiments.main(['cifar100-rsd-swin-resnet18']) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and err.startswith("error: unknown experiment 'cifar100-rsd-swin-resnet18'")
    assert 'cifar100-rsd-swin_t-resnet18' in err


# ---------------------------------------------------------------- train.sh

def test_train_sh_lists_the_cells():
    result = run_script(['bash', 'train.sh', '--list'])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 220
    rsd = next(line for line in lines if line.startswith('cifar100-rsd-convnext_t-resmlp_s12 '))
    assert rsd.split() == ['cifar100-rsd-convnext_t-resmlp_s12', 'convnext_tiny', 'resmlp_12_224', 'rsd', '84.21']


@pytest.mark.parametrize('argv, message', [
    (['cifar100-rsd-swin_t-resnet19', '2'], r"unknown experiment 'cifar100-rsd-swin_t-resnet19'; close names: "
                                            r"cifar100-rsd-swin_t-resnet18"),
    (['two'], r'number of processes'),
    (['cifar100-rsd-swin_t-resnet18'], r'number of processes .*got nothing'),
    (['cifar100-rsd-swin_t-resnet18', 'x'], r"number of processes .*got 'x'"),
])
def test_train_sh_errors_are_one_line(argv, message):
    result = run_script(['bash', 'train.sh'] + argv)
    assert result.returncode == 2 and result.stdout == ''
    err = result.stderr.strip()
    assert '\n' not in err and err.startswith('error: ') and re.search(message, err), err


def test_train_sh_runs_a_cell_by_name(cifar_dir, tmp_path):
    # The cell's own checkpoint is not there in a test; a later --teacher-pretrained wins (argparse: last one).
    teacher_path = tmp_path / 'swin_t_cifar100.pth'
    torch.save(timm.create_model('swin_tiny_patch4_window7_224', img_size=32, num_classes=100).state_dict(),
               teacher_path)
    result = run_script(['bash', 'train.sh', 'cifar100-rsd-swin_t-resnet18', '1', '--teacher-pretrained',
                         str(teacher_path), '--img-size', '32', '--epochs', '1', '--batch-size', '16',
                         '--train-subset', '32', '--workers', '0', '--output', str(tmp_path)],
                        env={'DATA': cifar_dir})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / 'cifar100-rsd-swin_t-resnet18'
    saved = parse_args(['--config', str(run_dir / 'args.yaml')])
    assert (saved.model, saved.teacher, saved.distiller, saved.num_classes) == (
        'resnet18', 'swin_tiny_patch4_window7_224', 'rsd', 100)
    assert (saved.opt, saved.weight_decay, saved.epochs) == ('sgd', 2e-3, 1)  # the recipe, then the extra flags
    assert 'train_loss_rsd' in (run_dir / 'summary.csv').read_text().splitlines()[0]
    assert 'rsd extra modules: 1.313 M parameters' in (run_dir / 'log.txt').read_text()  # SPEC.md: 1.313 M


# ---------------------------------------------------------------- teacher fine-tuning configs

def test_every_teacher_of_the_table_has_a_fine_tuning_config(cells):
    table = experiments.read_table()
    assert {teacher['model']: teacher['finetune_config'] for teacher in table['teachers'].values()} == TEACHER_CONFIGS
    assert {cell.teacher for cell in cells.values()} == set(TEACHER_CONFIGS)


@pytest.mark.parametrize('model, path', sorted(TEACHER_CONFIGS.items()))
def test_teacher_configs_are_fine_tuning_recipes(model, path):
    args = parse_args(['--config', path])
    assert (args.model, args.pretrained, args.distiller, args.num_classes, args.dataset) == (
        model, True, 'vanilla', 100, 'cifar100')
    assert args.opt == 'adamw' and 1e-4 <= args.lr <= 5e-4 and args.sched == 'cosine'
    assert 30 <= args.epochs <= 100 and 0 < args.warmup_epochs < args.epochs and args.min_lr < args.lr
    assert 0 < args.mixup <= 0.8 and 0 < args.cutmix <= 1.0 and args.smoothing == 0.1
    # The command line of the config's header parses with it, as the README shows it.
    args = parse_args(['data/cifar100', '--distiller', 'vanilla', '--model', model, '--pretrained',
                       '--num-classes', '100', '--config', path])
    assert args.model == model and args.data_dir == 'data/cifar100'
