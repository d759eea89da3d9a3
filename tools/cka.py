#!/usr/bin/env python3
"""Linear CKA between every teacher stage and every student stage: how alike the two representations are.

    python tools/cka.py data/cifar100 --dataset cifar100 --num-classes 100 \
        --model resnet18 --checkpoint output/cifar100-rsd-swin_t-resnet18/model_best.pth.tar \
        --teacher swin_tiny_patch4_window7_224 \
        --teacher-pretrained pretrained/swin_tiny_patch4_window7_224_cifar100.pth \
        --samples 512 --output output/cka

Features are stages 1..4 and the pooled embedding, as custom_forward's `forward_features` gives them,
flattened per image, on a fixed subset of the validation set. Writes a heatmap PNG (teacher stages down,
student stages across, values written in the cells) and the same numbers as CSV.

Linear CKA (Kornblith et al., 2019), with X [N, D_x] and Y [N, D_y] column-centred:
    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = <X X^T, Y Y^T>_F / (||X X^T||_F ||Y Y^T||_F)
The second (Gram) form needs N x N matrices only, so stage features of 200,000 values per image fit.
Memory: all features of the subset are held at once, N x (sum of the feature sizes of both models)
floats; 512 images of Swin-T and ResNet18 at 224 px take about 2 GB.
"""
import csv
import os
import sys

import matplotlib

matplotlib.use('Agg')  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from custom_forward import forward_features, stage_info  # noqa: E402
from xkd import data, models  # noqa: E402
from xkd.config import ArgumentParser, add_data_arguments  # noqa: E402
from xkd.errors import UserError  # noqa: E402
from xkd.logger import setup_logging  # noqa: E402
from xkd.run import resolve_input_size, run_cli  # noqa: E402

STAGE_NAMES = ('stage 1', 'stage 2', 'stage 3', 'stage 4', 'embedding')


def _centred(features):
    features = features.flatten(1)
    return features - features.mean(dim=0, keepdim=True)


def centred_gram(features):
    """X X^T of the column-centred features [N, ...], in float64 (the products are summed in float32)."""
    centred = _centred(features.float())
    return (centred @ centred.T).double()


def cka_from_grams(gram_a, gram_b):
    """CKA from two centred Gram matrices: <K, L>_F / (||K||_F ||L||_F)."""
    return float((gram_a * gram_b).sum() / (gram_a.norm() * gram_b.norm()))


def linear_cka(features_a, features_b):
    """Linear CKA of two representations of the same N inputs ([N, D_a] and [N, D_b]; extra dims are
    flattened). 1 for identical representations; invariant to orthogonal transforms and isotropic
    scaling of either. Uses D x D products when both widths are at most N, N x N Gram matrices otherwise.
    """
    if features_a.shape[0] != features_b.shape[0]:
        raise ValueError(f'linear_cka needs the same inputs on both sides: got {features_a.shape[0]} and '
                         f'{features_b.shape[0]} rows')
    if features_a.shape[0] < 2:
        raise ValueError('linear_cka needs at least 2 inputs (features are centred over them)')
    a, b = features_a.flatten(1), features_b.flatten(1)
    if max(a.shape[1], b.shape[1]) > a.shape[0]:
        return cka_from_grams(centred_gram(a), centred_gram(b))
    a, b = _centred(a.double()), _centred(b.double())
    return float((b.T @ a).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()))


@torch.no_grad()
def collect_features(models_to_run, loader, device):
    """For each model, its five features (stages 1..4, embedding) over the loader, flattened, on the CPU."""
    for model in models_to_run:
        model.eval().to(device)
    collected = [[[] for _ in STAGE_NAMES] for _ in models_to_run]
    for images, _ in loader:
        images = images.to(device)
        for model, per_stage in zip(models_to_run, collected):
            _, features = forward_features(model, images)
            for stage, feature in zip(per_stage, features):
                stage.append(feature.flatten(1).float().cpu())
    return [[torch.cat(stage) for stage in per_stage] for per_stage in collected]


def cka_map(student, teacher, loader, device):
    """Linear CKA of every teacher feature (rows) with every student feature (columns): a 5 x 5 tensor,
    in the order of STAGE_NAMES (stages 1..4, then the pooled embedding)."""
    teacher_features, student_features = collect_features([teacher, student], loader, device)
    teacher_grams = [centred_gram(features) for features in teacher_features]
    student_grams = [centred_gram(features) for features in student_features]
    return torch.tensor([[cka_from_grams(t, s) for s in student_grams] for t in teacher_grams])


def stage_labels(model, input_size):
    """'stage 1 (64x56x56)', ..., 'embedding (512)': the feature names with their shapes."""
    shapes = [stage_info(model, k, input_size) for k in (1, 2, 3, 4, -1)]
    return [f"{name} ({'x'.join(str(size) for size in shape)})" for name, shape in zip(STAGE_NAMES, shapes)]


def save_cka_map(matrix, row_labels, col_labels, png_path, csv_path, title='', row_axis='teacher',
                 col_axis='student'):
    """The map as a heatmap with the values written in (PNG) and as a table (CSV, rows first)."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    figure, axis = plt.subplots(figsize=(1.3 * len(col_labels) + 3.5, 1.0 * len(row_labels) + 2.5))
    image = axis.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap='viridis')
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j].item()
            axis.text(j, i, f'{value:.2f}', ha='center', va='center', color='black' if value > 0.6 else 'white')
    axis.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha='right')
    axis.set_yticks(range(len(row_labels)), row_labels)
    axis.set_xlabel(col_axis)
    axis.set_ylabel(row_axis)
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label='linear CKA')
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    with open(csv_path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow([f'{row_axis} \\ {col_axis}'] + list(col_labels))
        writer.writerows([label] + [f'{value:.6f}' for value in row] for label, row in zip(row_labels, matrix.tolist()))


def build_parser():
    parser = ArgumentParser(description='Linear CKA map between the stages of a teacher and a student.')
    add_data_arguments(parser)
    group = parser.add_argument_group('Models and output')
    group.add_argument('--model', required=True, help='student: a timm model name')
    group.add_argument('--checkpoint', required=True, metavar='FILE',
                       help="the student's weights (a train.py checkpoint or a plain state dict)")
    group.add_argument('--teacher', required=True, help='teacher: a timm model name')
    group.add_argument('--teacher-pretrained', required=True, metavar='FILE', help="the teacher's weights")
    group.add_argument('--samples', type=int, default=512, help='validation images to compare on')
    group.add_argument('--output', default='output/cka', help='folder for the PNG and the CSV')
    group.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    group.add_argument('--seed', type=int, default=0, help='seed of the fixed validation subset')
    return parser


def load_model(name, path, args, flag):
    model = models.create_model(name, args.num_classes, args.input_size)
    models.load_weights(model, models.read_state_dict(path, flag), name, path, args.num_classes, flag)
    return model


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging()  # shows the weight reader's line when it converts a file of an older timm layout
    if args.samples < 2:
        raise UserError(f'--samples must be at least 2 (CKA centres features over the images), got {args.samples}')
    for name, flag in ((args.model, '--model'), (args.teacher, '--teacher')):
        models.check_model_name(name, flag)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    train_set, val_set = data.create_datasets(args)
    args.num_classes = args.num_classes or data.dataset_num_classes(args, train_set)
    args.input_size = resolve_input_size(args, args.model)
    student = load_model(args.model, args.checkpoint, args, '--checkpoint')
    teacher = load_model(args.teacher, args.teacher_pretrained, args, '--teacher-pretrained')

    subset = data.fixed_subset(val_set, min(args.samples, len(val_set)), args.seed)
    transform = data.eval_transform(data.data_config(args))
    loader = data.create_eval_loader(data.TransformedDataset(subset, transform), args.batch_size, args.workers)
    matrix = cka_map(student, teacher, loader, device)

    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, f'cka-{args.model}-vs-{args.teacher}')
    save_cka_map(matrix, stage_labels(teacher, args.input_size), stage_labels(student, args.input_size),
                 f'{stem}.png', f'{stem}.csv',
                 title=f'Linear CKA on {len(subset)} {args.dataset} validation images',
                 row_axis=f'teacher {args.teacher}', col_axis=f'student {args.model}')
    print(f'CKA map of {args.model} against {args.teacher} on {len(subset)} images: {stem}.png, {stem}.csv')
    return matrix


if __name__ == '__main__':
    sys.exit(run_cli(main))
