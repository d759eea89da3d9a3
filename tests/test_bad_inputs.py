"""Bad or unusual input, table-driven: every row ends in one line on stderr with exit status 2 (what was wrong,
what to do; no traceback), or in a run that does what was meant with a warning line. Then the states a kill
or a user leaves in a run folder, and the files a refused run must leave as they were."""
import argparse
import os
import re
import shutil
import subprocess

import pytest
import timm
import torch

import train
import validate
from conftest import write_image_folder
from helpers import ROOT
from xkd.run import run_cli

import sys
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import collect_results  # noqa: E402
import experiments  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')

FAST = ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
        '--workers', '0', '--model', 'demo_resnet_student']
CIFAR = ['{cifar}', '--img-size', '32', '--batch-size', '8', '--epochs', '1', '--workers', '0',
         '--model', 'demo_resnet_student', '--train-subset', '16']
KD = ['--distiller', 'kd', '--teacher', 'demo_vit_teacher', '--teacher-pretrained', '{teacher}']
VALIDATE = ['--img-size', '32', '--workers', '0', '--model', 'demo_resnet_student']

# (row id, program, argv, pattern of the one error line). {names} are filled from the `places` fixture.
ERRORS = [
    # Silent, wrong before: now refused.
    ('clip-grad negative', 'train', FAST + ['--clip-grad', '-1'], r'--clip-grad must be positive, got -1.0 .*leave it out'),
    ('clip-grad zero', 'train', FAST + ['--clip-grad', '0'], r'--clip-grad must be positive, got 0.0'),
    ('teacher without distiller', 'train', FAST + ['--teacher', 'demo_vit_teacher', '--teacher-pretrained', '{missing}'],
     r'--teacher, --teacher-pretrained given, but no --distiller: the default, vanilla, trains the student alone.*'
     r'OFA-KD default was ofa'),
    ('min-lr above lr', 'train', FAST + ['--lr', '0.01', '--min-lr', '0.1'], r'--min-lr 0.1 is above --lr 0.01'),
    ('warmup not below epochs', 'train', FAST + ['--warmup-epochs', '1'],
     r'--warmup-epochs 1 is not below --epochs 1: the run would never leave warm-up'),
    ('warmup from a recipe', 'train', ['--config', 'configs/cifar/cnn.yaml'] + FAST + ['--epochs', '3'],
     r"--warmup-epochs 3 \(from 'configs/cifar/cnn.yaml'\) is not below --epochs 3"),
    ('num-classes above the data', 'train', CIFAR + ['--num-classes', '200'],
     r'--num-classes 200, but the cifar100 data has 100 classes .*leave --num-classes out'),
    ('num-classes below the data', 'train', CIFAR + ['--num-classes', '20'],
     r'--num-classes 20, but the cifar100 data has 100 classes'),
    ('validate: checkpoint of another class count', 'validate',
     ['{cifar}', '--dataset', 'cifar100', '--checkpoint', '{run}/last.pth.tar'] + VALIDATE,
     r"the checkpoint's run had --num-classes 10, but the cifar100 data has 100 classes"),
    ('validate: num-classes against the data', 'validate',
     ['{cifar}', '--dataset', 'cifar100', '--num-classes', '10', '--checkpoint', '{teacher}'] + VALIDATE,
     r'--num-classes 10, but the cifar100 data has 100 classes'),
    # Tracebacks before: now one line.
    ('truncated CIFAR-100 train pickle', 'train', ['{bad_cifar}'] + CIFAR[1:],
     r"CIFAR-100 file '.*cifar-100-python/train' cannot be read .*truncated or damaged; delete the folder"),
    ('truncated CIFAR-100 meta', 'train', ['{bad_meta}'] + CIFAR[1:],
     r"CIFAR-100 file '.*cifar-100-python/meta' cannot be read"),
    ('model-kwargs unknown key', 'train', FAST + ['--model-kwargs', 'foo=1'],
     r"--model-kwargs: 'demo_resnet_student' takes no argument 'foo'"),
    ('teacher-kwargs unknown key', 'train', FAST + KD + ['--teacher-kwargs', 'bar=2'],
     r"--teacher-kwargs: 'demo_vit_teacher' takes no argument 'bar'"),
    ('device cuda without one', 'train', FAST + ['--device', 'cuda'],
     r'--device cuda, but this machine has no CUDA device'),
    ('device unknown', 'train', FAST + ['--device', 'tpu'], r"--device 'tpu' is not a device"),
    ('output under a file', 'train', FAST + ['--output', '{teacher}/runs'],
     r"cannot write the run folder '.*teacher.pth/runs/.*' \(NotADirectoryError.*choose an --output"),
    ('validate: results-file is a folder', 'validate',
     ['--dataset', 'fake', '--fake-samples', '16', '--checkpoint', '{teacher}', '--results-file', '{tmp}'] + VALIDATE,
     r"--results-file '.*' is a folder; give a file path"),
    ('validate: results-file in a missing folder', 'validate',
     ['--dataset', 'fake', '--checkpoint', '{teacher}', '--results-file', '{missing}/r.jsonl'] + VALIDATE,
     r'its folder does not exist'),
    # Misleading lines before.
    ('resume: another class count', 'train', FAST + ['--resume', '{run}/last.pth.tar', '--num-classes', '5'],
     r"does not fit this run's student demo_resnet_student: 2 shapes differ \(fc.weight \(10, 128\) vs \(5, 128\).*"
     r"num_classes 10 \(now 5\): resume with the same --model and --num-classes"),
    ('resume: another model', 'train', FAST + ['--resume', '{run}/last.pth.tar', '--model', 'demo_vit_teacher'],
     r"does not fit this run's student demo_vit_teacher: .*missing.*unexpected.*model 'demo_resnet_student'"),
    ('resume: the reference code base\'s checkpoint', 'train', FAST + ['--resume', '{reference}'],
     r"is a checkpoint of the OFA-KD / RSD train.py.*--pretrained-path \(as the student\) or --teacher-pretrained"),
    ('resume: damaged, its hard links not offered', 'train', FAST + ['--resume', '{damaged}/last.pth.tar'],
     r"damaged and cannot be read .*--resume FILE \(in .*: checkpoint-0.pth.tar\)$"),
    ('resume: a folder', 'train', FAST + ['--resume', '{run}'],
     r"--resume '.*' is a folder, not a checkpoint file: give the file inside it .*last.pth.tar"),
    ('teacher-pretrained: a folder', 'train', FAST + ['--distiller', 'kd', '--teacher', 'demo_vit_teacher',
                                                       '--teacher-pretrained', '{tmp}'],
     r"--teacher-pretrained '.*' is a folder, not a checkpoint file"),
    ('validate: checkpoint a folder', 'validate', ['--dataset', 'fake', '--checkpoint', '{run}'] + VALIDATE,
     r"--checkpoint '.*' is a folder, not a checkpoint file.*it holds .*last.pth.tar"),
    ('resume auto: incomplete tmp.pth.tar, no last', 'train', FAST + ['--resume', 'auto', '--output', '{killed}',
                                                                      '--experiment', 'incomplete'],
     r"no last.pth.tar in '.*incomplete' and its tmp.pth.tar is incomplete .*checkpoint-0.pth.tar"),
    ('resume auto: checkpoints but no last', 'train', FAST + ['--resume', 'auto', '--output', '{killed}',
                                                              '--experiment', 'no-last'],
     r"no last.pth.tar in '.*no-last', but other checkpoints are there.*checkpoint-0.pth.tar"),
    ('resume: another method', 'train', FAST + KD + ['--resume', '{run}/last.pth.tar'],
     r"was written by a 'vanilla' run; resume it with --distiller vanilla"),
    ('resume: missing file', 'train', FAST + ['--resume', '{missing}'], r"--resume '.*' does not exist \(use --resume auto"),
    ('drop above 1', 'train', FAST + ['--drop', '1.5'], r'--drop is a probability, in \[0, 1\]; got 1.5'),
    ('drop-path above 1', 'train', FAST + ['--drop-path', '2'], r'--drop-path is a probability'),
    ('reprob above 1', 'train', FAST + ['--reprob', '2'], r'--reprob is a probability'),
    ('hflip above 1', 'train', FAST + ['--hflip', '2'], r'--hflip is a probability'),
    ('mixup-prob above 1', 'train', FAST + ['--mixup', '0.5', '--mixup-prob', '3'], r'--mixup-prob is a probability'),
    ('min-lr negative', 'train', FAST + ['--min-lr', '-1'], r'--min-lr must not be negative'),
    ('warmup-lr negative', 'train', FAST + ['--warmup-lr', '-1'], r'--warmup-lr must not be negative'),
    ('color-jitter negative', 'train', FAST + ['--color-jitter', '-1'], r'--color-jitter must not be negative'),
    ('momentum not below 1', 'train', FAST + ['--momentum', '2'], r'--momentum 2.0 is not below 1'),
    ('crop-pct 0', 'train', FAST + ['--crop-pct', '0'], r'--crop-pct is the share .* in \(0, 1\]'),
    ('crop-pct above 1', 'train', FAST + ['--crop-pct', '5'], r'--crop-pct is the share'),
    ('img-size 0', 'train', FAST + ['--img-size', '0'], r'--img-size must be a positive number of pixels'),
    ('input-size of one channel', 'train', FAST + ['--input-size', '1', '32', '32'], r'with 3 channels'),
    ('scale reversed', 'train', FAST + ['--scale', '1', '0.1'], r'--scale is a range MIN MAX'),
    ('unknown optimizer', 'train', FAST + ['--opt', 'adamm'], r"--opt 'adamm' is not a timm optimizer; close names: adam"),
    ('unknown scheduler', 'train', FAST + ['--sched', 'cosin'], r"--sched 'cosin' is not a timm scheduler"),
    ('unknown augmentation policy', 'train', FAST + ['--aa', 'nonsense'], r"--aa 'nonsense' is not a policy timm knows"),
    ('unknown interpolation', 'train', FAST + ['--train-interpolation', 'cubic'],
     r"--train-interpolation 'cubic' is not an interpolation"),
    ('model-kwargs of the wrong type', 'train', FAST + ['--model', 'demo_vit_teacher', '--model-kwargs', 'depth=abc'],
     r"--model-kwargs depth=abc: building 'demo_vit_teacher' failed \(TypeError"),
    ('config a folder', 'train', ['--config', '{tmp}'] + FAST, r"config file '.*' is a folder; give a YAML file"),
    ('a corrupt image names its file', 'train', ['{bad_folder}', '--dataset', 'folder'] + FAST[2:],
     r"sample \d+ of the ImageFolder set \('.*class_1/2.png'\) failed in reading the image: "
     r"UnidentifiedImageError"),
    ('train-subset above the data', 'train', FAST + ['--train-subset', '100000'],
     r'--train-subset 100000 is more than the 32 training images'),
    # Already one line; kept so.
    ('odd batch with mixup', 'train', FAST + ['--batch-size', '7', '--mixup', '0.8'], r'--batch-size 7 is odd'),
    ('zero epochs', 'train', FAST + ['--epochs', '0'], r'--epochs must be a positive integer, got 0'),
    ('negative lr', 'train', FAST + ['--lr', '-1'], r'--lr must not be negative'),
    ('smoothing 1', 'train', FAST + ['--smoothing', '1'], r'--smoothing must be in \[0, 1\)'),
    ('kd temperature 0', 'train', FAST + KD + ['--kd-temperature', '0'], r'--kd-temperature must be positive'),
    ('unknown flag', 'train', FAST + ['--learning-rate', '0.1'], r'unrecognized arguments: --learning-rate'),
    ('unknown distiller', 'train', FAST + ['--distiller', 'nope'], r"unknown distiller 'nope'"),
    ('unknown model', 'train', FAST + ['--model', 'resnet_nope'], r'resnet_nope'),
    ('missing config', 'train', ['--config', '{missing}.yaml'] + FAST, r"config file '.*' does not exist"),
    ('config with an unknown key', 'train', ['--config', '{bad_config}'] + FAST, r"unknown key 'learning_rate'"),
    ('ofa-eps of the wrong length', 'train', FAST + KD[:4] + ['--distiller', 'ofa', '--ofa-stage', '1', '2',
                                                              '--ofa-eps', '1', '1'],
     r'--ofa-eps takes one value or len\(--ofa-stage\) \+ 1 = 3 values'),
    ('rsd-gamma giving a fractional width', 'train', FAST + ['--distiller', 'rsd', '--teacher', 'demo_vit_teacher',
                                                             '--rsd-gamma', '0.3'],
     r'--rsd-gamma 0.3 gives a projector width of'),
    ('cifar100 without a data folder', 'train', FAST[2:] + ['--dataset', 'cifar100'], r'needs the data folder'),
    ('image folder missing', 'train', ['{missing}', '--dataset', 'folder'] + FAST[2:],
     r"image folder '.*' not found|data folder '.*' does not exist"),
    ('sync-bn on CPU', 'train', FAST + ['--sync-bn'], r'--sync-bn needs GPUs'),
    ('float16 AMP on CPU', 'train', FAST + ['--amp', '--amp-dtype', 'float16', '--device', 'cpu'], r'bfloat16'),
    ('validate: missing checkpoint', 'validate', ['--dataset', 'fake', '--checkpoint', '{missing}'] + VALIDATE,
     r"--checkpoint '.*' does not exist"),
    ('experiments: unknown cell', 'experiments', ['cifar100-rsd-swin_t-resnet19'],
     r"unknown experiment 'cifar100-rsd-swin_t-resnet19'; close names: cifar100-rsd-swin_t-resnet18"),
    ('collect_results: only an unreadable run', 'collect', ['{bad_runs}/short'],
     r"no readable runs under .*short: '.*summary.csv' line 3 has fewer fields than its header"),
]

# (row id, argv, pattern of the warning): the run goes on and does what the flags that count say.
WARNINGS = [
    ('dkd with --kd-temperature', FAST + ['--distiller', 'dkd', '--teacher', 'demo_vit_teacher', '--kd-temperature', '4'],
     r'--kd-temperature has no effect with --distiller dkd \(not read by this method\); the flag that counts here '
     r'is --dkd-temperature'),
    ('rsd with --kd-loss-weight', FAST + ['--distiller', 'rsd', '--teacher', 'demo_vit_teacher', '--kd-loss-weight', '2'],
     r'--kd-loss-weight has no effect with --distiller rsd .*the flag that counts here is --rsd-loss-weight'),
    ('teacher with an explicit vanilla', FAST + ['--distiller', 'vanilla', '--teacher', 'demo_vit_teacher'],
     r'--teacher has no effect with --distiller vanilla, which trains the student alone'),
    ('kd with an OFA flag', FAST + KD + ['--ofa-eps', '1.5'],
     r'--ofa-eps has no effect with --distiller kd \(a flag of --distiller ofa\)'),
]

PROGRAMS = {'train': train.main, 'validate': validate.main, 'experiments': experiments.main,
            'collect': collect_results.main}


def save_run(folder, epochs=1, extra=()):
    """A finished train.py run of the demo student (vanilla, fake data) in `folder`."""
    assert run_cli(train.main, FAST + ['--epochs', str(epochs), '--output', str(folder.parent),
                                       '--experiment', folder.name, *extra]) == 0


@pytest.fixture(scope='module')
def places(tmp_path_factory, cifar_dir):
    """Files and folders the rows name: data, a finished run, damaged and foreign checkpoints, killed runs."""
    root = tmp_path_factory.mktemp('bad')
    places = {'tmp': str(root), 'missing': str(root / 'missing'), 'cifar': cifar_dir}
    torch.manual_seed(0)
    places['teacher'] = str(root / 'teacher.pth')
    torch.save(timm.create_model('demo_vit_teacher', num_classes=10).state_dict(), places['teacher'])
    for name, damaged in (('bad_cifar', 'train'), ('bad_meta', 'meta')):
        copy = root / name
        shutil.copytree(cifar_dir, copy)
        path = copy / 'cifar-100-python' / damaged
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
        places[name] = str(copy)
    save_run(root / 'runs' / 'done')
    places['run'] = str(root / 'runs' / 'done')
    # What timm's CheckpointSaver in the reference train.py writes: args as an argparse.Namespace.
    places['reference'] = str(root / 'reference.pth.tar')
    torch.save({'epoch': 3, 'arch': 'demo_resnet_student', 'state_dict': timm.create_model(
        'demo_resnet_student', num_classes=10).state_dict(), 'optimizer': {}, 'version': 2,
        'args': argparse.Namespace(model='demo_resnet_student', num_classes=10)}, places['reference'])
    # A damaged last.pth.tar; timm's checkpoint-0 and model_best are hard links to it, another epoch is not.
    damaged = root / 'damaged'
    damaged.mkdir()
    (damaged / 'last.pth.tar').write_bytes(b'not a whole checkpoint')
    os.link(damaged / 'last.pth.tar', damaged / 'model_best.pth.tar')
    shutil.copy(os.path.join(places['run'], 'last.pth.tar'), damaged / 'checkpoint-0.pth.tar')
    places['damaged'] = str(damaged)
    # Killed between the saver's unlink of last.pth.tar and its rename of tmp.pth.tar, with tmp incomplete;
    # and a folder where only checkpoint-N is left.
    killed = root / 'killed'
    for name in ('incomplete', 'no-last'):
        shutil.copytree(places['run'], killed / name)
        os.remove(killed / name / 'last.pth.tar')
    (killed / 'incomplete' / 'tmp.pth.tar').write_bytes(b'half a checkpoint')
    places['killed'] = str(killed)
    places['bad_folder'] = write_image_folder(str(root / 'folder'))
    (root / 'folder' / 'train' / 'class_1' / '2.png').write_bytes(b'not an image')
    places['bad_config'] = str(root / 'bad.yaml')
    (root / 'bad.yaml').write_text('learning_rate: 0.1\n')
    # Runs for collect_results: a row cut short, a top-1 that is not a number, and a good run.
    bad_runs = root / 'collect'
    for name, last_row in (('short', '1,2.0'), ('text', '1,2.0,1.0,2.0,abc,90.0,0.05'), ('good', None)):
        folder = bad_runs / name
        folder.mkdir(parents=True)
        (folder / 'args.yaml').write_text('dataset: fake\nmodel: demo_resnet_student\ndistiller: vanilla\nepochs: 2\n')
        rows = ['epoch,train_loss,eval_loss,eval_loss_unused,eval_top1,eval_top5,lr', '0,2.0,1.0,2.0,50.0,90.0,0.05']
        (folder / 'summary.csv').write_text('\n'.join(rows + ([last_row] if last_row else [])) + '\n')
    places['bad_runs'] = str(bad_runs)
    return places


def fill(argv, places):
    return [item.format(**places) for item in argv]


@pytest.mark.parametrize('row_id, program, argv, pattern', ERRORS, ids=[row[0] for row in ERRORS])
def test_bad_input_ends_in_one_line(row_id, program, argv, pattern, places, capsys):
    if row_id == 'device cuda without one' and torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    capsys.readouterr()
    try:  # train.py and validate.py raise UserError (run_cli prints it); the tools return their status
        status = run_cli(PROGRAMS[program], fill(argv, places)) if program in ('train', 'validate') else \
            PROGRAMS[program](fill(argv, places))
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status == 2, captured.out[-2000:] + err[-2000:]
    assert 'Traceback' not in captured.out + err
    assert err.count('\n') == 0 and err.startswith('error: '), err
    assert re.search(pattern, err), err
    assert 'Train: ' not in captured.out, 'a training step ran before the error'


@pytest.mark.parametrize('row_id, argv, pattern', WARNINGS, ids=[row[0] for row in WARNINGS])
def test_flag_of_another_method_warns_and_runs(row_id, argv, pattern, places, capsys, tmp_path):
    capsys.readouterr()
    assert run_cli(train.main, fill(argv, places) + ['--output', str(tmp_path)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in (captured.out + captured.err).splitlines() if 'WARNING' in line]
    assert any(re.search(pattern, line) for line in warnings), warnings


def test_the_table_is_large():
    assert len(ERRORS) + len(WARNINGS) >= 40


def test_collect_results_leaves_out_unreadable_runs_with_a_warning(places, capsys):
    assert collect_results.main([places['bad_runs']]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2 and all(line.startswith('warning: left out run ') for line in warnings), warnings
    assert any('short' in line and 'fewer fields than its header' in line for line in warnings)
    assert any('text' in line and "eval_top1 'abc' is not a number" in line for line in warnings)
    table = captured.out.strip().splitlines()
    assert len(table) == 3 and 'demo_resnet_student' in table[2]  # header, rule, the good run


# ---------------------------------------------------------------- what a kill or a user leaves

def test_resume_auto_takes_a_complete_tmp_checkpoint_when_last_is_missing(tmp_path, capsys):
    """Killed between timm's unlink of last.pth.tar and the rename of tmp.pth.tar while saving epoch 0 of two:
    the run resumes from tmp.pth.tar and ends with the weights of the uninterrupted run, not from scratch."""
    run = tmp_path / 'run'
    save_run(run, epochs=2)
    whole = torch.load(run / 'last.pth.tar', weights_only=True)
    # checkpoint-0 is the epoch-0 checkpoint (a hard link of last.pth.tar as it was then): put it where the
    # saver had written it, and remove what came later.
    (run / 'checkpoint-0.pth.tar').rename(run / 'tmp.pth.tar')
    for name in ('last.pth.tar', 'checkpoint-1.pth.tar', 'model_best.pth.tar'):
        if (run / name).exists():
            os.remove(run / name)
    capsys.readouterr()
    assert run_cli(train.main, FAST + ['--epochs', '2', '--output', str(tmp_path), '--experiment', 'run',
                                       '--resume', 'auto']) == 0
    out = capsys.readouterr().out
    assert 'no last.pth.tar' in out and 'complete tmp.pth.tar of epoch 0' in out and 'at epoch 1' in out
    resumed = torch.load(run / 'last.pth.tar', weights_only=True)
    assert resumed['epoch'] == whole['epoch'] == 1
    for key, value in whole['state_dict'].items():
        torch.testing.assert_close(resumed['state_dict'][key], value, rtol=0, atol=0)


def snapshot(folder):
    return {name: (path.read_bytes(), path.stat().st_mtime_ns) for name in ('args.yaml', 'log.txt', 'summary.csv')
            for path in [folder / name]}


@pytest.mark.parametrize('flags', [['--model', 'demo_vit_teacher'], ['--num-classes', '5'],
                                   ['--distiller', 'kd', '--teacher', 'demo_vit_teacher']],
                         ids=['another model', 'another class count', 'another method'])
def test_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path, capsys, flags):
    save_run(tmp_path / 'run')
    before = snapshot(tmp_path / 'run')
    status = run_cli(train.main, FAST + ['--output', str(tmp_path), '--experiment', 'run', '--resume', 'auto',
                                         '--epochs', '2'] + flags)
    assert status == 2 and capsys.readouterr().err.startswith('error: ')
    assert snapshot(tmp_path / 'run') == before


def test_train_sh_prints_train_py_line_last(tmp_path):
    """The launcher's report of a failed process comes first; train.py's one line is the last, exit status 2."""
    result = subprocess.run(['bash', 'train.sh', '1'] + FAST + ['--clip-grad', '-1', '--output', str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith('error: --clip-grad must be positive'), lines[-5:]
