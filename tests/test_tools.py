"""tools/: result tables, learning curves and CKA maps, on run folders written here by hand and by train.py."""
import csv
import os
import statistics
import sys

import matplotlib.image
import pytest
import timm
import torch
import yaml

import train

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools')
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import cka  # noqa: E402
import collect_results  # noqa: E402
import plot_runs  # noqa: E402

FAST = ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
        '--workers', '0', '--log-interval', '2', '--model', 'demo_resnet_student']
SUMMARY_COLUMNS = ['epoch', 'train_loss', 'train_loss_gt', 'train_loss_rsd', 'eval_loss', 'eval_top1', 'eval_top5',
                   'lr']
RSD_SWIN_RESNET = dict(dataset='cifar100', model='resnet18', teacher='swin_tiny_patch4_window7_224',
                       teacher_pretrained='/data/pretrained/swin_tiny_patch4_window7_224_cifar100.pth',
                       distiller='rsd', epochs=3, lr=0.05, seed=42, output='output', workers=4)


def write_run(folder, args, top1, extra_params=None, columns=SUMMARY_COLUMNS):
    """A run folder as train.py leaves it: args.yaml, summary.csv (one row per top-1 value; None: not
    evaluated that epoch) and, when `extra_params` is given, the log line that counts them."""
    os.makedirs(folder)
    with open(os.path.join(folder, 'args.yaml'), 'w') as f:
        yaml.safe_dump(args, f)
    with open(os.path.join(folder, 'summary.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for epoch, value in enumerate(top1):
            row = {column: 1.0 / (epoch + 1) for column in columns if column.startswith('train_loss')}
            evaluated = value is not None
            row.update(epoch=epoch, eval_loss=2.0 if evaluated else '', eval_top1=value if evaluated else '',
                       eval_top5=min(100.0, value + 20) if evaluated else '', lr=0.05)
            writer.writerow(row)
    if extra_params is not None:
        with open(os.path.join(folder, 'log.txt'), 'w') as f:
            f.write(f'2026-01-01 10:00:00,000 INFO Student {args["model"]}: 11.220 M parameters; '
                    f'{args["distiller"]} extra modules: {extra_params:.3f} M parameters\n')
    return folder


def table_rows(text):
    """The markdown table as dicts, header names as keys."""
    lines = [line for line in text.strip().splitlines() if line.startswith('|')]
    header = [cell.strip() for cell in lines[0].strip('|').split('|')]
    return [dict(zip(header, (cell.strip() for cell in line.strip('|').split('|')))) for line in lines[2:]]


@pytest.fixture
def hand_written_runs(tmp_path):
    """Two seeds of one RSD setting, one RSD run with another lr, an unfinished OFA run, a vanilla run."""
    runs = tmp_path / 'runs'
    write_run(runs / 'rsd-seed1', dict(RSD_SWIN_RESNET, seed=1, experiment='rsd-seed1'), [50.0, 70.0, 60.0], 1.313)
    # Another machine: other teacher folder and worker count, same settings.
    write_run(runs / 'rsd-seed2', dict(RSD_SWIN_RESNET, seed=2, experiment='rsd-seed2', workers=8,
                                       teacher_pretrained='/elsewhere/swin_tiny_patch4_window7_224_cifar100.pth'),
              [55.0, None, 68.0], 1.313)
    write_run(runs / 'rsd-lr0.1', dict(RSD_SWIN_RESNET, lr=0.1, experiment='rsd-lr0.1'), [40.0, 45.0, 44.0], 1.313)
    write_run(runs / 'nested' / 'ofa', dict(RSD_SWIN_RESNET, distiller='ofa', experiment='ofa'), [30.0, 35.0],
              columns=['epoch', 'train_loss', 'train_loss_gt', 'train_loss_kd', 'train_loss_ofa', 'eval_loss',
                       'eval_top1', 'eval_top5', 'lr'])
    write_run(runs / 'alone', dict(RSD_SWIN_RESNET, distiller='vanilla', experiment='alone'), [20.0, 25.0, 24.0],
              0.0, columns=['epoch', 'train_loss', 'train_loss_gt', 'eval_loss', 'eval_top1', 'eval_top5', 'lr'])
    return runs


@pytest.fixture(scope='module')
def real_run(tmp_path_factory):
    """One epoch of RSD through train.py, with a random demo ViT teacher: (run folder, teacher file)."""
    root = tmp_path_factory.mktemp('real')
    teacher_path = root / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model('demo_vit_teacher', num_classes=10).state_dict(), teacher_path)
    result = train.main(FAST + ['--distiller', 'rsd', '--teacher', 'demo_vit_teacher', '--teacher-pretrained',
                                str(teacher_path), '--output', str(root / 'runs'), '--experiment', 'rsd-demo'])
    return result['output_dir'], str(teacher_path)


# ---------------------------------------------------------------- collect_results.py

def test_seeds_are_averaged_and_other_settings_kept_apart(hand_written_runs, capsys):
    assert collect_results.main([str(hand_written_runs)]) == 0
    rows = table_rows(capsys.readouterr().out)
    by_key = {(row['method'], row['settings']): row for row in rows}
    assert len(rows) == 4

    seeds = by_key[('rsd', 'lr=0.05')]
    best_std = statistics.stdev([70.0, 68.0])  # best of seed 2 is its last: its epoch 1 was not evaluated
    last_std = statistics.stdev([60.0, 68.0])
    assert seeds['best top-1'] == f'69.00 ± {best_std:.2f}' and seeds['last top-1'] == f'64.00 ± {last_std:.2f}'
    assert (seeds['runs'], seeds['epochs'], seeds['extra params (M)']) == ('2', '3/3', '1.313')
    assert seeds['teacher'] == 'swin_tiny_patch4_window7_224' and seeds['student'] == 'resnet18'
    assert seeds['published top-1'] == '83.92'  # cifar100-rsd-swin_t-resnet18 in configs/experiments.yaml
    assert seeds['ours - published'] == '-14.92'  # best top-1 mean 69.00 - 83.92

    other_lr = by_key[('rsd', 'lr=0.1')]
    assert (other_lr['best top-1'], other_lr['last top-1'], other_lr['runs']) == ('45.00', '44.00', '1')

    unfinished = by_key[('ofa', '-')]
    assert unfinished['epochs'] == '2/3' and unfinished['extra params (M)'] == '-'  # no log.txt
    assert unfinished['published top-1'] == '80.54'

    alone = by_key[('vanilla', '-')]
    # ResNet18 alone on CIFAR-100: cifar100-vanilla-resnet18, the "from scratch" number.
    assert alone['teacher'] == '-' and alone['published top-1'] == '74.01' and alone['extra params (M)'] == '0.000'
    assert alone['ours - published'] == '-49.01'


def test_a_run_named_after_a_variant_cell_gets_the_variants_number(tmp_path, capsys):
    runs = tmp_path / 'runs'
    write_run(runs / 'kappa0', dict(RSD_SWIN_RESNET, rsd_kappa=0.0, experiment='cifar100-rsd-kappa0-swin_t-resnet18'),
              [80.0, 83.0, 82.0], 1.313)
    # A name of a cell with other models is not taken: this one falls back to the RSD cell at its defaults.
    write_run(runs / 'misnamed', dict(RSD_SWIN_RESNET, rsd_kappa=0.01, experiment='cifar100-rsd-kappa0-mixer_b16-deit_t'),
              [80.0, 81.0, 82.0], 1.313)
    assert collect_results.main([str(runs), '--csv', str(tmp_path / 'r.csv')]) == 0
    rows = {row['settings']: row for row in table_rows(capsys.readouterr().out)}
    assert rows['rsd_kappa=0.0']['published top-1'] == '83.90'  # RSD supp. T11, kappa = 0
    assert rows['rsd_kappa=0.0']['ours - published'] == '-0.90'
    assert rows['rsd_kappa=0.01']['published top-1'] == '83.92'
    with open(tmp_path / 'r.csv') as f:
        sources = {row['published_source'] for row in csv.DictReader(f)}
    assert sources == {'RSD supp. T11', 'RSD supp. T9 (lambda 0.1), T10 (gamma 2), T11 (Norm., MSE, kappa 0.01)'}


def test_globs_and_csv(hand_written_runs, tmp_path, capsys):
    table = tmp_path / 'results.csv'
    assert collect_results.main([str(hand_written_runs / 'rsd-seed*'), '--csv', str(table)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]['runs'] == '2' and 'settings' not in rows[0]
    with open(table) as f:
        (row,) = list(csv.DictReader(f))
    assert float(row['best_top1_mean']) == 69.0 and float(row['last_top1_std']) == pytest.approx(5.657, abs=1e-3)
    assert row['epochs_done'] == '3' and row['epochs_planned'] == '3' and row['published_top1'] == '83.92'


def test_a_run_without_epochs_is_counted(tmp_path, capsys):
    folder = tmp_path / 'just-started'
    folder.mkdir()
    (folder / 'args.yaml').write_text(yaml.safe_dump(RSD_SWIN_RESNET))
    assert collect_results.main([str(folder)]) == 0
    (row,) = table_rows(capsys.readouterr().out)
    assert (row['best top-1'], row['epochs'], row['runs']) == ('-', '0/3', '1')


@pytest.mark.parametrize('path, message', [('missing', 'matches no file or folder'),
                                           ('empty', 'no run folders')])
def test_nothing_to_collect_says_so(tmp_path, capsys, path, message):
    (tmp_path / 'empty').mkdir()
    assert collect_results.main([str(tmp_path / path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and message in err and '\n' not in err


def test_a_real_run_is_collected(real_run, capsys):
    run_dir, _ = real_run
    assert collect_results.main([os.path.dirname(run_dir)]) == 0
    (row,) = table_rows(capsys.readouterr().out)
    # RSD projector of demo_resnet_student (128) to demo_vit_teacher (96), gamma 2:
    # 128*256 + BatchNorm 2*256 + 256*96 = 57,856 parameters.
    assert (row['dataset'], row['teacher'], row['student'], row['method']) == (
        'fake', 'demo_vit_teacher', 'demo_resnet_student', 'rsd')
    assert (row['runs'], row['epochs'], row['extra params (M)'], row['published top-1']) == ('1', '1/1', '0.058', '-')
    assert 0.0 <= float(row['best top-1']) <= 100.0


# ---------------------------------------------------------------- plot_runs.py

def test_plot_runs_draws_top1_and_every_loss(hand_written_runs, real_run, tmp_path, capsys):
    png = tmp_path / 'curves.png'
    assert plot_runs.main([str(hand_written_runs), real_run[0], '--output', str(png)]) == 0
    assert '6 run(s) plotted' in capsys.readouterr().out
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 300 and image.shape[1] > 600
    runs = [collect_results.read_run(folder) for folder in collect_results.find_run_folders([str(hand_written_runs)])]
    # Runs are found in name order: alone (gt), nested/ofa (kd, ofa), rsd-* (rsd).
    assert plot_runs.curve_columns(runs) == ['eval_top1', 'train_loss', 'train_loss_gt', 'train_loss_kd',
                                             'train_loss_ofa', 'train_loss_rsd']
    epochs, values = plot_runs.curve(runs[[os.path.basename(r.folder) for r in runs].index('rsd-seed2')], 'eval_top1')
    assert (epochs, values) == ([0, 2], [55.0, 68.0])  # the epoch without evaluation is skipped


def test_plot_runs_labels_runs_of_the_same_name_by_path(tmp_path):
    first = write_run(tmp_path / 'a' / 'run', RSD_SWIN_RESNET, [1.0])
    second = write_run(tmp_path / 'b' / 'run', RSD_SWIN_RESNET, [2.0])
    runs = [collect_results.read_run(folder) for folder in (first, second)]
    assert plot_runs.run_labels(runs) == [os.path.join('a', 'run'), os.path.join('b', 'run')]


# ---------------------------------------------------------------- cka.py

def random_orthogonal(size, generator):
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q


@pytest.mark.parametrize('width', [8, 100])  # narrower than N (D x D form) and wider (N x N Gram form)
def test_cka_of_a_representation_with_itself_is_one(width):
    features = torch.randn(40, width, generator=torch.Generator().manual_seed(0))
    assert cka.linear_cka(features, features) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize('width', [8, 100])
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(width):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, width, generator=generator, dtype=torch.float64)
    y = x[:, :5] @ torch.randn(5, 6, generator=generator, dtype=torch.float64) + 0.5 * torch.randn(
        40, 6, generator=generator, dtype=torch.float64)
    reference = cka.linear_cka(x, y)
    assert 0.05 < reference < 0.95
    transformed = 3.7 * x @ random_orthogonal(width, generator)
    assert cka.linear_cka(transformed, y) == pytest.approx(reference, abs=1e-6)
    assert cka.linear_cka(x, 0.01 * y @ random_orthogonal(6, generator)) == pytest.approx(reference, abs=1e-6)


def test_cka_of_one_dimensional_features_is_the_squared_correlation():
    # By hand: x = (1, 2, 3, 4), y = (1, 3, 2, 5); centred x = (-1.5, -.5, .5, 1.5), y = (-1.75, .25, -.75, 2.25);
    # cov = 2.625 + -.125 + -.375 + 3.375 = 5.5, var x = 5, var y = 3.0625 + .0625 + .5625 + 5.0625 = 8.75;
    # r^2 = 5.5^2 / (5 * 8.75) = 30.25 / 43.75.
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = torch.tensor([[1.0], [3.0], [2.0], [5.0]])
    assert cka.linear_cka(x, y) == pytest.approx(30.25 / 43.75, abs=1e-9)


def test_both_forms_agree():
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 12, generator=generator), torch.randn(30, 20, generator=generator)
    gram_form = cka.cka_from_grams(cka.centred_gram(x), cka.centred_gram(y))
    assert cka.linear_cka(x, y) == pytest.approx(gram_form, abs=1e-6)
    # Image-shaped features are flattened per image.
    assert cka.linear_cka(x.reshape(30, 3, 2, 2), y) == pytest.approx(gram_form, abs=1e-6)


def test_cka_needs_the_same_images_on_both_sides():
    with pytest.raises(ValueError, match='same inputs'):
        cka.linear_cka(torch.randn(10, 3), torch.randn(9, 3))


def test_cka_map_end_to_end(real_run, tmp_path, capsys):
    run_dir, teacher_path = real_run
    output = tmp_path / 'cka'
    matrix = cka.main(['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8',
                       '--workers', '0', '--model', 'demo_resnet_student',
                       '--checkpoint', os.path.join(run_dir, 'last.pth.tar'), '--teacher', 'demo_vit_teacher',
                       '--teacher-pretrained', teacher_path, '--samples', '10', '--output', str(output)])
    assert matrix.shape == (5, 5) and bool(((matrix > -1e-6) & (matrix < 1 + 1e-6)).all())
    stem = output / 'cka-demo_resnet_student-vs-demo_vit_teacher'
    image = matplotlib.image.imread(f'{stem}.png')
    assert image.shape[0] > 300 and image.shape[1] > 300
    with open(f'{stem}.csv') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['teacher demo_vit_teacher \\ student demo_resnet_student', 'stage 1 (16x8x8)',
                       'stage 2 (32x4x4)', 'stage 3 (64x2x2)', 'stage 4 (128x1x1)', 'embedding (128)']
    assert [row[0] for row in rows[1:]] == ['stage 1 (17x96)', 'stage 2 (17x96)', 'stage 3 (17x96)',
                                            'stage 4 (17x96)', 'embedding (96)']
    written = torch.tensor([[float(value) for value in row[1:]] for row in rows[1:]], dtype=matrix.dtype)
    assert torch.allclose(written, matrix, atol=1e-6)


def test_cka_map_of_a_model_with_itself_has_a_unit_diagonal():
    from xkd import data
    from xkd.config import build_parser
    args = build_parser().parse_args(['--dataset', 'fake', '--img-size', '32'])
    args.input_size = (3, 32, 32)
    _, val_set = data.create_datasets(args)
    loader = data.create_eval_loader(
        data.TransformedDataset(data.fixed_subset(val_set, 12, 0), data.eval_transform(data.data_config(args))), 6, 0)
    model = timm.create_model('demo_resnet_student', num_classes=10)
    matrix = cka.cka_map(model, model, loader, torch.device('cpu'))
    assert torch.allclose(matrix.diagonal(), torch.ones(5, dtype=matrix.dtype), atol=1e-6)
    assert torch.allclose(matrix, matrix.T, atol=1e-6)
