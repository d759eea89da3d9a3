"""The published cells (configs/experiments.yaml) and the CIFAR-100 teacher fine-tuning configs:
every cell expands to a train.py command line that parses, train.sh runs cells by name, and the
published numbers are those of docs/published_cifar100.tsv, each with its source, and the authors' flags per
cell are applied."""
import csv
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

VARIANTS = {f'rsd-{name}': flags for name, flags in [
    ('lambda0.05', ('--rsd-loss-weight', '0.05')), ('lambda0.075', ('--rsd-loss-weight', '0.075')),
    ('lambda0.15', ('--rsd-loss-weight', '0.15')), ('lambda0.2', ('--rsd-loss-weight', '0.2')),
    ('gamma0.5', ('--rsd-gamma', '0.5')), ('gamma1', ('--rsd-gamma', '1')), ('gamma4', ('--rsd-gamma', '4')),
    ('gamma6', ('--rsd-gamma', '6')), ('kappa0', ('--rsd-kappa', '0')), ('kappa0.001', ('--rsd-kappa', '0.001')),
    ('kappa0.02', ('--rsd-kappa', '0.02'))]}
RSD_ABLATION_PAIRS = ('swin_t-resnet18', 'mixer_b16-deit_t', 'convnext_t-resmlp_s12')
DISTILLATION = 220


def distillation_cells(cells):
    return {name: cell for name, cell in cells.items() if cell.teacher and cell.variant is None}


def test_every_teacher_student_and_method_is_one_named_cell(cells):
    expected = {f'cifar100-{method}-{teacher}-{student}': (TEACHERS[teacher], STUDENTS[student], method)
                for teacher in TEACHERS for student in STUDENTS for method in METHODS}
    assert len(expected) == DISTILLATION
    assert {name: (cell.teacher, cell.student, cell.method)
            for name, cell in distillation_cells(cells).items()} == expected
    # Then the variants (the RSD supplementary's ablations, OFA on the logits only), each student alone and each
    # teacher's fine-tuning.
    variants = {name: cell for name, cell in cells.items() if cell.variant}
    expected_variants = {f'cifar100-{variant}-{pair}' for variant in VARIANTS for pair in RSD_ABLATION_PAIRS}
    expected_variants |= {'cifar100-ofa-logits-swin_t-resnet18', 'cifar100-ofa-logits-convnext_t-resmlp_s12'}
    assert set(variants) == expected_variants
    alone = {name: cell.student for name, cell in cells.items() if cell.teacher is None}
    assert alone == {**{f'cifar100-vanilla-{key}': model for key, model in STUDENTS.items()},
                     **{f'cifar100-finetune-{key}': model for key, model in TEACHERS.items()}}
    assert len(cells) == DISTILLATION + len(expected_variants) + len(STUDENTS) + len(TEACHERS) == 264


def tsv_rows():
    with open(os.path.join(ROOT, 'docs', 'published_cifar100.tsv'), newline='') as f:
        return list(csv.DictReader(f, delimiter='\t'))


# The method labels of docs/published_cifar100.tsv whose setting is the method's default.
DEFAULT_LABELS = {'rsd[lambda=0.1]': 'rsd', 'rsd[gamma=2]': 'rsd', 'rsd[norm]': 'rsd', 'rsd[mse]': 'rsd',
                  'rsd[kappa=0.01]': 'rsd', 'ofa[logit-only]': 'ofa-logits'}
# Ablations the table cannot express with a flag of ours: their definitions are not in either code base.
NOT_CARRIED = {'rsd[w/o norm]', 'rsd[huber]', 'rsd[logits]'}


def cell_of_row(row, cells):
    """The cell name of one published row, or None for a setting we do not carry."""
    method = row['method']
    if method in NOT_CARRIED:
        return None
    short = {model: key for key, model in {**TEACHERS, **STUDENTS}.items()}
    if method == 'teacher':
        return f"cifar100-finetune-{short[row['teacher']]}"
    if method == 'student':
        return f"cifar100-vanilla-{short[row['student']]}"
    match = re.fullmatch(r'rsd\[(lambda|gamma|kappa)=([0-9./]+)\]', method)
    if method in DEFAULT_LABELS:
        method = DEFAULT_LABELS[method]
    elif match:
        value = {'1/2': '0.5'}.get(match.group(2), match.group(2))
        method = f'rsd-{match.group(1)}{value}'
    return f"cifar100-{method}-{short[row['teacher']]}-{short[row['student']]}"


def test_every_published_number_is_carried_with_its_source(cells):
    """Each of the 90 rows of docs/published_cifar100.tsv (the published CIFAR-100 top-1 values gathered with
    their sources) is a number of its cell, second-hand ones marked so; only the three ablations we cannot
    express are left out. No cell has a number that the list does not hold."""
    rows = tsv_rows()
    assert len(rows) == 90
    carried = 0
    accounted = set()
    for row in rows:
        name = cell_of_row(row, cells)
        if name is None:
            continue
        numbers = cells[name].published
        matching = [number for number in numbers if number.top1 == float(row['top1'])
                    and number.second_hand == row['source'].split(' | ')[1].startswith('SECONDARY')]
        assert matching, (row, numbers)
        accounted.update((name, number) for number in matching)
        carried += 1
    assert carried == 82
    every_number = {(name, number) for name, cell in cells.items() for number in cell.published}
    assert every_number == accounted
    # Two sources that disagree are both kept, the paper's own first.
    assert [number.top1 for number in cells['cifar100-finetune-vit_s'].published] == [92.44, 92.04]
    assert cells['cifar100-rsd-swin_t-resnet18'].published_top1 == 83.92


def test_find_published(cells):
    assert experiments.find_published(cells, 'cifar100', 'mixer_b16_224', 'deit_tiny_patch16_224', 'rsd') == 78.5
    assert experiments.find_published(cells, 'imagenet', 'mixer_b16_224', 'deit_tiny_patch16_224', 'rsd') is None
    # A vanilla run of a teacher is its fine-tuning; of a student, the student alone.
    teacher_top1 = {model: experiments.find_published(cells, 'cifar100', '-', model, 'vanilla')
                    for model in TEACHER_CONFIGS}
    assert teacher_top1 == {'swin_tiny_patch4_window7_224': 89.26, 'vit_small_patch16_224': 92.44,
                            'mixer_b16_224': 87.62, 'convnext_tiny': 88.42}
    assert experiments.find_published(cells, 'cifar100', '-', 'resnet18', 'vanilla') == 74.01
    assert experiments.find_published(cells, 'cifar100', '-', 'swin_pico_patch4_window7_224', 'vanilla') is None
    # By cell name, a variant; a name whose models differ from the run's is not taken.
    assert experiments.find_published(cells, 'cifar100', 'swin_tiny_patch4_window7_224', 'resnet18', 'rsd',
                                      'cifar100-rsd-gamma0.5-swin_t-resnet18') == 83.78
    assert experiments.find_published(cells, 'cifar100', 'swin_tiny_patch4_window7_224', 'resnet18', 'rsd',
                                      'cifar100-rsd-gamma0.5-mixer_b16-deit_t') == 83.92


# The authors' flags per cell (configs/experiments.yaml, cell_flags), as the reference's issue threads give them.
AUTHOR_FLAGS = {
    **{f'cifar100-ofa-{teacher}-{student}': ('--ofa-loss-weight', '0.1')
       for teacher in TEACHERS for student in ('resnet18', 'mobilenetv2')},
    'cifar100-ofa-swin_t-resnet18': ('--ofa-loss-weight', '0.1', '--lr', '0.1'),
    **{f'cifar100-kd-convnext_t-{student}': ('--min-lr', '1.0e-6', '--model-ema', '--model-ema-decay', '0.99996',
                                             '--amp') for student in ('deit_t', 'swin_p')},
}


def test_recipe_teacher_checkpoint_and_flags_of_each_cell(cells):
    for cell in cells.values():
        family = 'cnn' if cell.student in CNN_STUDENTS else 'vit_mlp'
        if cell.teacher is None:
            expected_recipe = TEACHER_CONFIGS.get(cell.student, f'configs/cifar/{family}.yaml')
            assert (cell.recipe, cell.method, cell.teacher_checkpoint) == (expected_recipe, 'vanilla', None), cell.name
            continue
        assert cell.recipe == f'configs/cifar/{family}.yaml', cell.name
        assert cell.teacher_checkpoint == f'pretrained/{cell.teacher}_cifar100.pth', cell.name
        assert cell.method_flags == (('--ofa-eps', '1.0') if cell.method == 'ofa' else ()), cell.name
    for name, cell in distillation_cells(cells).items():
        assert cell.extra_flags == AUTHOR_FLAGS.get(name, ()), name
        assert bool(cell.extra_sources) == (name in AUTHOR_FLAGS), name
    assert all('OFAKD issue' in source for name in AUTHOR_FLAGS for source in cells[name].extra_sources)
    # A variant adds its flags after the cell's; a flag given twice keeps only the later value.
    assert cells['cifar100-rsd-kappa0-swin_t-resnet18'].extra_flags == ('--rsd-kappa', '0')
    assert cells['cifar100-ofa-logits-swin_t-resnet18'].extra_flags == ('--ofa-loss-weight', '0', '--lr', '0.1')
    assert cells['cifar100-ofa-logits-convnext_t-resmlp_s12'].extra_flags == ('--ofa-loss-weight', '0')


def test_every_model_is_known_to_timm(cells):
    for name in {cell.teacher for cell in cells.values() if cell.teacher} | {cell.student for cell in cells.values()}:
        check_model_name(name)


@pytest.mark.parametrize('method', METHODS + ('vanilla',))
def test_cell_arguments_parse_as_train_py_flags(cells, method):
    if method not in distillers.distiller_names():
        pytest.skip(f"distiller '{method}' is not registered yet")
    for cell in (cell for cell in cells.values() if cell.method == method):
        args = parse_args(cell.train_arguments('data/cifar100'))
        assert (args.data_dir, args.model, args.teacher, args.distiller) == (
            'data/cifar100', cell.student, cell.teacher or '', method)
        assert (args.num_classes, args.dataset) == (100, 'cifar100')
        assert args.experiment == cell.name
        if cell.student in TEACHER_CONFIGS:  # a teacher's fine-tuning recipe
            assert args.pretrained and args.opt == 'adamw'
            continue
        assert (args.epochs, args.batch_size) == (300, 128)
        if cell.teacher:
            assert args.teacher_pretrained == cell.teacher_checkpoint
        lr = 0.1 if cell.name in ('cifar100-ofa-swin_t-resnet18', 'cifar100-ofa-logits-swin_t-resnet18') else None
        if cell.student in CNN_STUDENTS:
            assert (args.opt, args.lr, args.weight_decay) == ('sgd', lr or 0.05, 2e-3), cell.name
        else:
            assert (args.opt, args.lr, args.mixup, args.cutmix) == ('adamw', 5e-4, 0.8, 1.0)
        if method == 'ofa':
            assert args.ofa_eps == [1.0]
            expected_weight = 0.1 if cell.student in CNN_STUDENTS else 1.0
            assert args.ofa_loss_weight == (0.0 if cell.variant == 'ofa-logits' else expected_weight), cell.name
        if cell.name in AUTHOR_FLAGS and method == 'kd':
            assert (args.min_lr, args.model_ema, args.model_ema_decay, args.amp) == (1e-6, True, [0.99996], True)
        if cell.variant in VARIANTS:
            flag, value = VARIANTS[cell.variant]
            assert getattr(args, flag[2:].replace('-', '_')) == float(value), cell.name


def test_a_typo_in_the_table_fails_with_its_key(tmp_path):
    with open(experiments.TABLE) as f:
        text = f.read()
    table = tmp_path / 'experiments.yaml'

    def fails_with(old, new, message):
        assert old in text, old
        table.write_text(text.replace(old, new, 1))
        with pytest.raises(UserError, match=message):
            experiments.load_experiments(str(table))

    fails_with('  cifar100-rsd-swin_t-resnet18:\n', '  cifar100-rsd-swin-resnet18:\n',
               'published names cells .*cifar100-rsd-swin-resnet18')
    fails_with("ofa: [--ofa-eps, '1.0']", 'ofa: --ofa-eps 1.0', 'methods.ofa must be a list of strings')
    fails_with('    recipe: configs/cifar/cnn.yaml\n', '', 'students.resnet18 lacks recipe')
    fails_with('{top1: 83.36, source: RSD supp. T9}', '{top1: 83.36}', r'published.cifar100-rsd-lambda0.05.* entries')
    fails_with('{top1: 83.36, source: RSD supp. T9}', "{top1: '83.36', source: RSD supp. T9}", 'entries must be')
    fails_with('    students: [resnet18, mobilenetv2]', '    students: [resnet81]', r'cell_flags\[0\].students')
    fails_with('  - method: kd\n', '  - method: kdd\n', r"cell_flags\[2\].method 'kdd'")
    fails_with('pairs: [swin_t-resnet18, convnext_t-resmlp_s12]', 'pairs: [swin_t-resnet99]',
               'variants.ofa-logits.pairs')


# ---------------------------------------------------------------- tools/experiments.py

HEADER = ['cell', 'teacher', 'student', 'method', 'published', 'source', 'flags', 'beyond', 'the', "method's",
          'defaults']


def test_experiments_lists_cells_and_prints_arguments(capsys):
    assert experiments.main(['--list']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 264 and lines[0].split() == HEADER
    columns = [lines[0].index(title) for title in ('teacher', 'student', 'method', 'published', 'source', 'flags')]
    ofa = lines[2]
    assert [ofa[:columns[0]].strip()] + [ofa[a:b].strip() for a, b in zip(columns, columns[1:] + [None])] == [
        'cifar100-ofa-swin_t-resnet18', 'swin_tiny_patch4_window7_224', 'resnet18', 'ofa', '80.54',
        'RSD supp. T11 (row OFA) (+1 more)', '--ofa-loss-weight 0.1 --lr 0.1']
    vit_s = next(line for line in lines if line.startswith('cifar100-finetune-vit_s '))
    assert '92.44/92.04' in vit_s and vit_s.endswith(' -')
    assert experiments.main(['cifar100-ofa-swin_t-resnet18', '--data', '/data/cifar']) == 0
    assert capsys.readouterr().out.strip() == (
        '/data/cifar --config configs/cifar/cnn.yaml --model resnet18 --teacher swin_tiny_patch4_window7_224 '
        '--teacher-pretrained pretrained/swin_tiny_patch4_window7_224_cifar100.pth --num-classes 100 '
        '--distiller ofa --ofa-eps 1.0 --ofa-loss-weight 0.1 --lr 0.1 --experiment cifar100-ofa-swin_t-resnet18')
    assert experiments.main(['cifar100-vanilla-resnet18', '--about']) == 0
    about = capsys.readouterr().out
    assert '74.01  2nd-hand: RSD main table' in about and 'flags beyond the method\'s defaults: none' in about
    assert '--teacher' not in about


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
    assert len(lines) == 1 + 264 and lines[0].split() == HEADER
    rsd = next(line for line in lines if line.startswith('cifar100-rsd-convnext_t-resmlp_s12 '))
    assert rsd.split()[:5] == ['cifar100-rsd-convnext_t-resmlp_s12', 'convnext_tiny', 'resmlp_12_224', 'rsd', '84.21']
    assert rsd.endswith('(+1 more)  -')


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
                         str(teacher_path), '--img-size', '32', '--epochs', '1', '--warmup-epochs', '0', '--batch-size', '16',
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
    assert {cell.teacher for cell in cells.values() if cell.teacher} == set(TEACHER_CONFIGS)


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
