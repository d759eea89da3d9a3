"""FitNet, CC, RKD, CRD and BKD: each loss against an independent float64 formula written here, the
gradients where a side is detached, the FitNet aligners' shapes, parameter counts and spatial layout,
and CRD's negative sampling, memory update and loss wiring."""
import itertools
import math
import re
import os

import numpy as np
import pytest
import timm
import torch

from custom_forward import feature_format, num_prefix_tokens, stage_info

from distillers.bkd import bkd_loss
from distillers.correlation import cc_loss
from distillers.crd import ContrastMemory, crd_nce_loss
from distillers.fitnet import Aligner, fitnet_loss
from distillers.rkd import rkd_loss
from helpers import ROOT, build_distiller, cli_error, create


def smooth_l1(difference):
    difference = abs(difference)
    return 0.5 * difference ** 2 if difference < 1 else difference - 0.5


# --- BKD -------------------------------------------------------------------------------------------

def test_bkd_loss_equals_the_binary_cross_entropy_formula():
    generator = torch.Generator().manual_seed(0)
    logits_student = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 3
    logits_teacher = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 3
    zs, zt = logits_student.numpy(), logits_teacher.numpy()
    total = 0.
    for b in range(6):
        p = np.exp(zt[b]) / np.exp(zt[b]).sum()
        for c in range(9):
            sigmoid = 1 / (1 + math.exp(-zs[b, c]))
            total += -(p[c] * math.log(sigmoid) + (1 - p[c]) * math.log(1 - sigmoid))
    assert bkd_loss(logits_student, logits_teacher).item() == pytest.approx(total / 54, rel=1e-6)


def test_bkd_loss_gives_no_gradient_to_the_teacher():
    logits_student = torch.randn(4, 5, requires_grad=True)
    logits_teacher = torch.randn(4, 5, requires_grad=True)
    bkd_loss(logits_student, logits_teacher).backward()
    assert logits_teacher.grad is None and logits_student.grad.abs().sum() > 0


# --- CC --------------------------------------------------------------------------------------------

def test_cc_loss_equals_the_consecutive_sample_formula():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    s, t = student.numpy(), teacher.numpy()
    products = [sum(abs(s[i, j] - t[i, j]) * abs(s[i + 1, j] - t[i + 1, j]) for j in range(5)) for i in range(6)]
    assert cc_loss(student, teacher).item() == pytest.approx(sum(products) / 6, rel=1e-12)


def test_cc_loss_trains_both_projections():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    cc_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0


# --- RKD -------------------------------------------------------------------------------------------

def rkd_formula(student, teacher, distance_weight, angle_weight, squared, eps):
    """RKD in float64 with loops: distances normalised by their mean positive entry, triplet cosines at i."""
    def distances(x):
        n = len(x)
        d = np.zeros((n, n))
        for i, j in itertools.product(range(n), repeat=2):
            if i != j:
                square = max(float(((x[i] - x[j]) ** 2).sum()), eps)
                d[i, j] = square if squared else math.sqrt(square)
        return d / d[d > 0].mean()

    def cosines(x):
        n = len(x)
        out = []
        for i, j, k in itertools.product(range(n), repeat=3):
            u, v = x[j] - x[i], x[k] - x[i]
            nu, nv = np.linalg.norm(u), np.linalg.norm(v)
            out.append(0. if nu == 0 or nv == 0 else float(u @ v / (nu * nv)))
        return np.array(out)

    ds, dt = distances(student), distances(teacher)
    loss_distance = np.mean([smooth_l1(a - b) for a, b in zip(ds.ravel(), dt.ravel())])
    loss_angle = np.mean([smooth_l1(a - b) for a, b in zip(cosines(student), cosines(teacher))])
    return distance_weight * loss_distance + angle_weight * loss_angle


@pytest.mark.parametrize('squared', [False, True])
def test_rkd_loss_equals_the_distance_and_angle_formula(squared):
    generator = torch.Generator().manual_seed(2)
    # Different widths on the two sides: relations need no projector. Features are [B, C, 1, 1] maps,
    # flattened as the reference does.
    student = torch.randn(6, 4, 1, 1, generator=generator, dtype=torch.float64)
    teacher = torch.randn(6, 7, generator=generator, dtype=torch.float64) * 2
    expected = rkd_formula(student.flatten(1).numpy(), teacher.numpy(), 25., 50., squared, 1e-12)
    assert rkd_loss(student, teacher, 25., 50., squared=squared).item() == pytest.approx(expected, rel=1e-9)


def test_rkd_teacher_side_has_no_gradient_and_duplicates_stay_finite():
    student = torch.randn(5, 8)
    student[3] = student[1]  # a zero distance and a zero difference vector
    student.requires_grad_(True)
    teacher = torch.randn(5, 6, requires_grad=True)
    loss = rkd_loss(student, teacher, 25., 50.)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_rkd_loss_is_zero_for_a_scaled_copy():
    # Distances are normalised by their mean and angles are scale-free: a scaled teacher is matched exactly.
    teacher = torch.randn(6, 5, dtype=torch.float64)
    assert rkd_loss(3 * teacher, teacher, 25., 50.).item() == pytest.approx(0., abs=1e-12)


# --- CRD -------------------------------------------------------------------------------------------

def test_crd_nce_loss_equals_the_reference_formula():
    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 9, generator=generator, dtype=torch.float64) * 2
    num_data, eps = 40, 1e-7
    noise = 8 / num_data
    p = scores.numpy()
    total = 0.
    for i in range(5):
        total += math.log(p[i, 0] / (p[i, 0] + noise + eps))
        total += sum(math.log(noise / (p[i, j] + noise + eps)) for j in range(1, 9))
    assert crd_nce_loss(scores, num_data).item() == pytest.approx(-total / 5, rel=1e-12)


def bound_memory(targets, feat_dim=4, seed=0):
    memory = ContrastMemory(feat_dim)
    memory.bind(torch.as_tensor(targets), seed)
    return memory


def test_crd_negatives_come_uniformly_from_the_other_classes():
    # About 5,000 samples of uneven classes (one class of a single sample, one absent), 2,000 draws of 500.
    rng = np.random.RandomState(0)
    sizes = np.r_[rng.randint(20, 250, size=38), 0, 1]
    targets = rng.permutation(np.repeat(np.arange(40), sizes))
    num_data = len(targets)
    memory = bound_memory(targets)
    torch.manual_seed(0)
    indices = torch.as_tensor(rng.choice(num_data, size=2000, replace=False))
    negatives = memory.sample_negatives(indices, 500)
    assert negatives.shape == (2000, 500) and negatives.min() >= 0 and negatives.max() < num_data
    targets_t = torch.as_tensor(targets)
    assert not (targets_t[negatives] == targets_t[indices][:, None]).any(), 'a negative of the same class'
    # Uniform over the other classes' samples: the class of a negative is chosen with probability
    # n_c / (N - n_own); compare the counts of the classes drawn for the samples of class 0.
    own = targets_t[indices] == 0
    drawn = torch.bincount(targets_t[negatives[own]].flatten(), minlength=40).double()
    counts = torch.bincount(targets_t, minlength=40).double()
    expected = counts / (num_data - counts[0]) * drawn.sum()
    expected[0] = 0
    assert drawn[0] == 0
    chi_square = (((drawn - expected) ** 2)[expected > 0] / expected[expected > 0]).sum().item()
    assert chi_square < 80, f'chi-square {chi_square:.1f} on 38 degrees of freedom'
    # ... and over the samples within a class: the draws of one class's samples are spread evenly.
    member = torch.nonzero(targets_t == 1).flatten()
    per_sample = torch.bincount(negatives[~(targets_t[indices] == 1)].flatten(), minlength=num_data)[member].double()
    assert per_sample.std() / per_sample.mean() < 0.15


def test_crd_memory_update_is_the_momentum_average_renormalised():
    memory = bound_memory([0, 1, 0, 1, 2, 2], feat_dim=3)
    before_student, before_teacher = memory.bank_student.clone().double(), memory.bank_teacher.clone().double()
    indices = torch.tensor([4, 1])
    student = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    teacher = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    memory.update(indices, student, teacher, momentum=0.5)
    for bank, before, vectors in ((memory.bank_student, before_student, student),
                                  (memory.bank_teacher, before_teacher, teacher)):
        for row in range(6):
            if row in (4, 1):
                mixed = 0.5 * before[row] + 0.5 * vectors[[4, 1].index(row)].double()
                expected = mixed / mixed.norm()
            else:
                expected = before[row]
            assert torch.allclose(bank[row].double(), expected, atol=1e-7), row


def test_crd_banks_start_the_same_for_the_same_seed_and_in_the_reference_range():
    a, b = bound_memory(list(range(10)) * 3, feat_dim=128, seed=5), bound_memory(list(range(10)) * 3, 128, seed=5)
    assert torch.equal(a.bank_student, b.bank_student) and torch.equal(a.bank_teacher, b.bank_teacher)
    assert a.bank_student.abs().max() <= 1 / math.sqrt(128 / 3)
    assert not torch.equal(a.bank_student, a.bank_teacher)


def test_crd_forward_scores_each_side_against_the_other_sides_bank():
    torch.manual_seed(0)
    student, teacher = create('demo_resnet_student', num_classes=10), create('demo_vit_teacher', num_classes=10)
    distiller = build_distiller('crd', student, teacher, crd_k=5, crd_feat_dim=8)
    targets = [i % 10 for i in range(30)]
    distiller.bind_train_data(targets)
    distiller.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([3, 7, 1, 2])
    indices = torch.tensor([3, 17, 21, 12])
    negatives = torch.tensor([[i + j + 1 for j in range(5)] for i in range(4)]) % 30
    distiller.memory.sample_negatives = lambda index, k: negatives
    bank_student, bank_teacher = distiller.memory.bank_student.double(), distiller.memory.bank_teacher.double()
    with torch.no_grad():
        from custom_forward import forward_features
        embedding_student = forward_features(distiller.student, images)[1][-1]
        embedding_teacher = forward_features(teacher, images)[1][-1]
        v_student = distiller.embed_student(embedding_student).double()
        v_teacher = distiller.embed_teacher(embedding_teacher).double()
    _, losses = distiller(images, labels, indices=indices)

    def nce(vectors, bank):
        index = torch.cat([indices[:, None], negatives], dim=1)
        scores = torch.exp((bank[index] * vectors[:, None, :]).sum(-1) / 0.07)
        z = scores.mean() * 30
        p, noise = (scores / z).numpy(), 5 / 30
        total = sum(math.log(p[i, 0] / (p[i, 0] + noise + 1e-7)) +
                    sum(math.log(noise / (p[i, j] + noise + 1e-7)) for j in range(1, 6)) for i in range(4))
        return -total / 4, z.item()

    loss_student, z_student = nce(v_student, bank_teacher)
    loss_teacher, z_teacher = nce(v_teacher, bank_student)
    assert losses['loss_kd'].item() == pytest.approx(loss_student + loss_teacher, rel=1e-4)
    assert distiller.memory.z_student.item() == pytest.approx(z_student, rel=1e-5)
    assert distiller.memory.z_teacher.item() == pytest.approx(z_teacher, rel=1e-5)
    # The banks moved for the batch's samples only; Z stays fixed after the first batch.
    moved = (distiller.memory.bank_student.double() != bank_student).any(dim=1)
    assert sorted(torch.nonzero(moved).flatten().tolist()) == sorted(indices.tolist())
    distiller(images, labels, indices=indices)
    assert distiller.memory.z_student.item() == pytest.approx(z_student, rel=1e-5)


def test_crd_without_bound_labels_or_indices_says_what_is_missing():
    distiller = build_distiller('crd', create('demo_resnet_student', num_classes=10),
                                create('demo_vit_teacher', num_classes=10), crd_k=4)
    with pytest.raises(RuntimeError, match='bind_train_data'):
        distiller(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), indices=torch.tensor([0, 1]))


# --- FitNet ----------------------------------------------------------------------------------------

# (student shape, format, prefix), (teacher shape, format, prefix), kind, scale, parameters by the formula
ALIGNERS = {
    'resnet18<-swin_t stage 1': (((64, 56, 56), 'map', 0), ((3136, 96), 'tokens', 0), 'same', 1, 64 * 96 + 96),
    'deit_t<-convnext_t stage 1': (((197, 192), 'tokens', 1), ((96, 56, 56), 'map', 0), 'unpatchify', 4,
                                   192 * 96 * 16 + 96 * 16),
    'deit_t<-convnext_t stage 4': (((197, 192), 'tokens', 1), ((768, 7, 7), 'map', 0), 'patchify', 2,
                                   192 * 4 * 768 + 768),
    'mobilenetv2<-vit_s stage 1': (((24, 56, 56), 'map', 0), ((197, 384), 'tokens', 1), 'patchify', 4,
                                   24 * 16 * 384 + 384),
    'mobilenetv2<-vit_s stage 4': (((1280, 7, 7), 'map', 0), ((197, 384), 'tokens', 1), 'unpatchify', 2,
                                   1280 * 384 * 4 + 384 * 4),
    'swin_p<-mixer_b16 stage 1': (((3136, 48), 'tokens', 0), ((196, 768), 'tokens', 0), 'patchify', 4,
                                  48 * 16 * 768 + 768),
    'deit_t<-swin_t stage 1': (((197, 192), 'tokens', 1), ((3136, 96), 'tokens', 0), 'unpatchify', 4,
                               192 * 96 * 16 + 96 * 16),
    'map<-map, other grid': (((64, 8, 8), 'map', 0), ((32, 4, 4), 'map', 0), 'resample', 1, 64 * 32 + 32),
    'registers, odd ratio': (((53, 16), 'tokens', 4), ((20, 3, 3), 'map', 0), 'resample', 1, 16 * 20 + 20),
}


def teacher_target_shape(shape, feature_format, prefix):
    return (shape[0] - prefix, shape[1]) if feature_format == 'tokens' else shape


@pytest.mark.parametrize('pairing', sorted(ALIGNERS))
def test_fitnet_aligner_shape_kind_and_parameter_count(pairing):
    (student_shape, student_format, student_prefix), (teacher_shape, teacher_format, teacher_prefix), kind, scale, \
        parameters = ALIGNERS[pairing]
    aligner = Aligner(student_shape, student_format, student_prefix, teacher_shape, teacher_format, teacher_prefix)
    assert (aligner.kind, aligner.scale) == (kind, scale)
    assert sum(p.numel() for p in aligner.parameters()) == parameters
    output = aligner(torch.randn(2, *student_shape))
    assert output.shape == (2, *teacher_target_shape(teacher_shape, teacher_format, teacher_prefix))


def test_fitnet_unpatchify_keeps_each_student_token_over_its_own_teacher_patch():
    # DeiT-style student (class token + 4x4 grid) onto a map 2x finer: a change of one student token moves
    # exactly the 2x2 teacher positions under it (the reference's reshape of tokens would scatter it along a row).
    aligner = Aligner((17, 6), 'tokens', 1, (5, 8, 8), 'map', 0)
    tokens = torch.randn(1, 17, 6)
    changed = tokens.clone()
    changed[0, 1 + 1 * 4 + 2] += 1  # patch token at grid row 1, column 2
    difference = (aligner(changed) - aligner(tokens)).abs().sum(dim=1)[0]
    assert sorted(map(tuple, torch.nonzero(difference > 0).tolist())) == [(2, 4), (2, 5), (3, 4), (3, 5)]
    changed = tokens.clone()
    changed[0, 0] += 1  # the class token is dropped
    assert torch.equal(aligner(changed), aligner(tokens))


def test_fitnet_patchify_maps_each_student_patch_to_one_teacher_token():
    aligner = Aligner((3, 8, 8), 'map', 0, (17, 5), 'tokens', 1)
    feature = torch.randn(1, 3, 8, 8)
    changed = feature.clone()
    changed[0, :, 5, 2] += 1  # in the 2x2 patch at row 2, column 1 of the 4x4 teacher grid
    difference = (aligner(changed) - aligner(feature)).abs().sum(dim=-1)[0]
    assert torch.nonzero(difference > 0).flatten().tolist() == [2 * 4 + 1]


def test_fitnet_loss_is_the_mean_square_and_leaves_the_teacher_alone():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    expected = sum((a - b) ** 2 for a, b in zip(student.detach().flatten().tolist(), teacher.detach().flatten().tolist()))
    loss = fitnet_loss(student, teacher)
    assert loss.item() == pytest.approx(expected / 96, rel=1e-12)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def experiment_pairs():
    from xkd.yaml_file import load_yaml
    table = load_yaml(os.path.join(ROOT, 'configs', 'experiments.yaml'), 'experiment table')
    return sorted((student['model'], teacher['model']) for student in table['students'].values()
                  for teacher in table['teachers'].values())


def test_fitnet_builds_for_every_pair_of_the_experiment_table():
    """Every teacher x student of configs/experiments.yaml at 224 px (models on the meta device: shapes only),
    DeiT-T <- ConvNeXt-T included, where the reference fails."""
    counts, models = {}, {}
    for student_name, teacher_name in experiment_pairs():
        with torch.device('meta'):
            for name in (student_name, teacher_name):
                models.setdefault(name, timm.create_model(name, num_classes=100))
            student, teacher = models[student_name], models[teacher_name]
            distiller = build_distiller('fitnet', student, teacher, num_classes=100, input_size=224)
            for stage in (1, 2, 3, 4):
                output = distiller.aligners[f'stage{stage}'](torch.empty(2, *stage_info(student, stage, 224)))
                teacher_shape = stage_info(teacher, stage, 224)
                if feature_format(teacher) == 'tokens':
                    teacher_shape = (teacher_shape[0] - num_prefix_tokens(teacher), teacher_shape[1])
                assert output.shape == (2, *teacher_shape), (student_name, teacher_name, stage)
        counts[student_name, teacher_name] = sum(p.numel() for p in distiller.extra_parameters())
    assert len(counts) == 20
    assert counts['resnet18', 'swin_tiny_patch4_window7_224'] == 523_680
    assert counts['deit_tiny_patch16_224', 'convnext_tiny'] == 1_109_376


# --- the distillers ---------------------------------------------------------------------------------

PAIRS = {
    'cnn<-vit': (('demo_resnet_student', {}), ('demo_vit_teacher', {'patch_size': 4})),
    'vit<-cnn': (('demo_vit_teacher', {'depth': 4, 'embed_dim': 48, 'patch_size': 4}), ('demo_resnet_student', {})),
}


@pytest.mark.parametrize('pair', sorted(PAIRS))
@pytest.mark.parametrize('method, key, follows_kd_weight', [
    ('fitnet', 'loss_fitnet', False), ('correlation', 'loss_kd', True), ('rkd', 'loss_kd', True),
    ('crd', 'loss_kd', True), ('bkd', 'loss_kd', True)])
def test_distiller_terms_and_the_kd_loss_weight(pair, method, key, follows_kd_weight):
    """Each term is weighted as in the reference: all but FitNet's by --kd-loss-weight; every extra module
    gets a gradient and the teacher none."""
    (student_name, student_kwargs), (teacher_name, teacher_kwargs) = PAIRS[pair]
    values = {}
    for weight in (1.0, 3.0):
        student = create(student_name, num_classes=10, **student_kwargs)
        teacher = create(teacher_name, num_classes=10, **teacher_kwargs)
        distiller = build_distiller(method, student, teacher, kd_loss_weight=weight, crd_k=6, seed=0)
        distiller.bind_train_data([i % 10 for i in range(20)])
        torch.manual_seed(1)
        _, losses = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), indices=torch.arange(4)) \
            if distiller.needs_indices else distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
        assert set(losses) == {'loss_gt', key}
        values[weight] = losses[key]
    assert values[3.0].item() == pytest.approx((3.0 if follows_kd_weight else 1.0) * values[1.0].item(), rel=1e-5)
    values[3.0].backward()
    for parameter in distiller.extra_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize('method', ['fitnet', 'correlation', 'rkd', 'crd', 'bkd'])
def test_distiller_under_bfloat16_autocast_with_a_bfloat16_teacher(method):
    student = create('demo_resnet_student', num_classes=10)
    teacher = create('demo_vit_teacher', num_classes=10).to(torch.bfloat16)
    distiller = build_distiller(method, student, teacher, crd_k=6)
    distiller.bind_train_data([i % 10 for i in range(20)])
    extra = {'indices': torch.arange(4)} if distiller.needs_indices else {}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, losses = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), **extra)
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in distiller.extra_parameters())
    if method == 'crd':
        assert distiller.memory.bank_student.dtype == torch.float32


@pytest.mark.parametrize('flags, message', [
    (['--distiller', 'rkd', '--batch-size', '1'], 'rkd compares the samples of a batch .* --batch-size >= 2'),
    (['--distiller', 'correlation', '--batch-size', '1'], 'correlation compares the samples of a batch'),
    (['--distiller', 'crd', '--crd-momentum', '1'], r'--crd-momentum must be in \[0, 1\), got 1.0'),
    (['--distiller', 'fitnet', '--fitnet-stage', '0', '2'], '--fitnet-stage takes distinct stages among 1 2 3 4'),
    (['--distiller', 'crd', '--num-classes', '1', '--fake-samples', '8'], 'crd draws its negatives from the other '
                                                                          'classes; the training set has only one'),
])
def test_bad_flags_are_one_line_errors(capsys, tmp_path, flags, message):
    err = cli_error(capsys, ['--dataset', 'fake', '--fake-samples', '16', '--img-size', '32', '--workers', '0',
                             '--model', 'demo_resnet_student', '--teacher', 'demo_vit_teacher', '--batch-size', '4',
                             '--epochs', '1', '--output', str(tmp_path)] + flags)
    assert re.search(message, err), err


def test_fitnet_distiller_sums_the_stages_times_a_tenth_without_the_teachers_class_token():
    from custom_forward import forward_features
    student = create('demo_resnet_student', num_classes=10)
    teacher = create('demo_vit_teacher', num_classes=10, patch_size=4)
    distiller = build_distiller('fitnet', student, teacher, fitnet_loss_weight=2.0, fitnet_stage=[1, 3, 4])
    images = torch.randn(3, 3, 32, 32)
    _, losses = distiller(images, torch.tensor([0, 1, 2]))
    with torch.no_grad():
        student_features = forward_features(student, images)[1]
        teacher_features = forward_features(teacher, images)[1]
        expected = 0.
        for stage in (1, 3, 4):
            aligned = distiller.aligners[f'stage{stage}'](student_features[stage - 1]).double()
            patches = teacher_features[stage - 1][:, 1:].double()  # the class token dropped
            expected += ((aligned - patches) ** 2).sum().item() / aligned.numel()
    assert losses['loss_fitnet'].item() == pytest.approx(0.1 * 2.0 * expected, rel=1e-5)
