"""DKD and DIST: hand-worked values, independent formulations, soft labels, the DKD warm-up."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distillers import get_distiller
from helpers import distiller_args
from distillers.dist import dist_loss
from distillers.dkd import dkd_loss
from distillers.kd import kd_loss


def log_probs(*probabilities):
    """Logits whose softmax is exactly the given probabilities."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


# --- DKD -------------------------------------------------------------------------------------------

def test_dkd_hand_worked():
    # sample 0, target 0: p_s = (1/3, 1/3, 1/3), p_t = (1/2, 1/4, 1/4)
    #   b_s = (1/3, 2/3), b_t = (1/2, 1/2): TCKD = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8)
    #   non-target p^_s = p^_t = (1/2, 1/2): NCKD = 0
    # sample 1, target 1: p_s = (1/4, 1/4, 1/2), p_t = (1/3, 1/3, 1/3)
    #   b_s = (1/4, 3/4), b_t = (1/3, 2/3): TCKD = 1/3 ln(4/3) + 2/3 ln(8/9)
    #   classes {0, 2}: p^_s = (1/3, 2/3), p^_t = (1/2, 1/2): NCKD = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8)
    logits_student = log_probs([1 / 3, 1 / 3, 1 / 3], [1 / 4, 1 / 4, 1 / 2])
    logits_teacher = log_probs([1 / 2, 1 / 4, 1 / 4], [1 / 3, 1 / 3, 1 / 3])
    target = torch.tensor([0, 1])
    tckd = (0.5 * math.log(9 / 8) + (1 / 3 * math.log(4 / 3) + 2 / 3 * math.log(8 / 9))) / 2
    nckd = (0 + 0.5 * math.log(9 / 8)) / 2
    alpha, beta = 1.5, 2.0
    loss = dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature=1.0)
    assert loss.item() == pytest.approx(alpha * tckd + beta * nckd, rel=1e-10)
    # Logits scaled by T at temperature T give the same distributions, times T^2.
    loss_t2 = dkd_loss(2 * logits_student, 2 * logits_teacher, target, alpha, beta, temperature=2.0)
    assert loss_t2.item() == pytest.approx(4 * (alpha * tckd + beta * nckd), rel=1e-10)


def mdistiller_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """The mdistiller formulation, with probabilities and masks (fine for moderate logits)."""
    gt_mask = F.one_hot(target, logits_student.shape[1]).bool()
    p_student = F.softmax(logits_student / temperature, dim=1)
    p_teacher = F.softmax(logits_teacher / temperature, dim=1)

    def binary(p):
        return torch.stack([(p * gt_mask).sum(1), (p * ~gt_mask).sum(1)], dim=1)

    b_student, b_teacher = binary(p_student), binary(p_teacher)
    tckd = (b_teacher * (b_teacher.log() - b_student.log())).sum() / target.shape[0]
    p_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_p_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_p_student_part2, p_teacher_part2, reduction='sum') / target.shape[0]
    return (alpha * tckd + beta * nckd) * temperature ** 2


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_dkd_matches_mdistiller(temperature):
    generator = torch.Generator().manual_seed(0)
    logits_student = torch.randn(16, 10, generator=generator, dtype=torch.float64) * 3
    logits_teacher = torch.randn(16, 10, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, 10, (16,), generator=generator)
    expected = mdistiller_dkd(logits_student, logits_teacher, target, 1.0, 8.0, temperature)
    assert dkd_loss(logits_student, logits_teacher, target, 1.0, 8.0, temperature).item() == pytest.approx(
        expected.item(), rel=1e-8)


def test_dkd_decomposes_kd():
    # Per sample, KD = TCKD + (1 - p_t,y) NCKD (the DKD paper's eq. 7).
    generator = torch.Generator().manual_seed(1)
    logits_student = torch.randn(1, 7, generator=generator, dtype=torch.float64)
    logits_teacher = torch.randn(1, 7, generator=generator, dtype=torch.float64)
    target = torch.tensor([3])
    p_target_teacher = logits_teacher.softmax(-1)[0, 3].item()
    dkd = dkd_loss(logits_student, logits_teacher, target, 1.0, 1 - p_target_teacher, 1.0)
    assert dkd.item() == pytest.approx(kd_loss(logits_student, logits_teacher).item(), rel=1e-10)


def test_dkd_extreme_logits_stay_finite():
    # A confident teacher puts probabilities below float32's range; mdistiller's log(softmax) gives NaN here.
    logits_student = torch.tensor([[200.0, -200.0, 0.0], [-300.0, 300.0, 0.0]], requires_grad=True)
    logits_teacher = torch.tensor([[-200.0, 200.0, 0.0], [300.0, -300.0, 0.0]])
    loss = dkd_loss(logits_student, logits_teacher, torch.tensor([0, 1]), 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits_student.grad).all()


# --- DIST ------------------------------------------------------------------------------------------

def test_dist_hand_worked():
    # Rows: p_t = (1/2, 1/4, 1/4), p_s = (1/4, 1/2, 1/4): centred (1/6, -1/12, -1/12) and (-1/12, 1/6, -1/12),
    #   dot = -1/48, norms^2 = 6/144 each, Pearson = (-1/48) / (1/24) = -1/2.
    #   Second row identical for both: Pearson 1. inter = 1 - (-1/2 + 1) / 2 = 3/4.
    # Columns (over the 2 samples): class 0 p_s = (1/4, 1/4) constant -> 0 (the eps keeps it finite);
    #   class 1 p_t = (1/4, 1/4) constant -> 0; class 2 (1/4, 1/2) for both -> 1. intra = 1 - 1/3 = 2/3.
    logits_student = log_probs([1 / 4, 1 / 2, 1 / 4], [1 / 4, 1 / 4, 1 / 2])
    logits_teacher = log_probs([1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 4, 1 / 2])
    assert dist_loss(logits_student, logits_teacher, 1.0, 1.0, 1.0).item() == pytest.approx(3 / 4 + 2 / 3, abs=1e-6)
    assert dist_loss(logits_student, logits_teacher, 2.0, 3.0, 1.0).item() == pytest.approx(2 * 3 / 4 + 3 * 2 / 3,
                                                                                           abs=1e-6)
    # tau scales the logits inside the softmax and the loss by tau^2.
    assert dist_loss(2 * logits_student, 2 * logits_teacher, 1.0, 1.0, 2.0).item() == pytest.approx(
        4 * (3 / 4 + 2 / 3), abs=1e-5)


def test_dist_matches_corrcoef():
    generator = torch.Generator().manual_seed(0)
    logits_student = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    logits_teacher = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    tau = 2.0
    p_student, p_teacher = (logits_student / tau).softmax(-1), (logits_teacher / tau).softmax(-1)

    def mean_pearson(a, b):
        return torch.stack([torch.corrcoef(torch.stack([x, y]))[0, 1] for x, y in zip(a, b)]).mean()

    inter = 1 - mean_pearson(p_student, p_teacher)
    intra = 1 - mean_pearson(p_student.T, p_teacher.T)
    expected = tau ** 2 * (0.5 * inter + 3.0 * intra)
    assert dist_loss(logits_student, logits_teacher, 0.5, 3.0, tau).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dist_gradient_finite_for_constant_columns():
    logits_student = torch.zeros(1, 4, requires_grad=True)
    dist_loss(logits_student, torch.zeros(1, 4), 1.0, 1.0, 1.0).backward()
    assert torch.isfinite(logits_student.grad).all()


# --- distillers ------------------------------------------------------------------------------------

class Tiny(nn.Sequential):
    def __init__(self, num_classes=5):
        super().__init__(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))


def build(name, **overrides):
    args = distiller_args(name, num_classes=5, input_size=4, **overrides)
    torch.manual_seed(0)
    criterion = lambda logits, label: torch.sum(-label * F.log_softmax(logits, -1), -1).mean() if label.dim() > 1 \
        else F.cross_entropy(logits, label)
    return get_distiller(name)(Tiny(), Tiny(), criterion, args)


def test_dkd_flags_and_warmup():
    distiller = build('dkd')
    # No warm-up by default, as the OFA-KD / RSD code: the full term from the first step.
    assert (distiller.args.dkd_alpha, distiller.args.dkd_beta, distiller.args.dkd_temperature,
            distiller.args.dkd_warmup) == (1.0, 2.0, 1.0, 0)
    image, label = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    full = dkd_loss(distiller.student(image), distiller.teacher(image), label, 1.0, 2.0, 1.0)
    _, losses = distiller(image, label, epoch=0)
    assert losses['loss_kd'].item() == pytest.approx(full.item(), rel=1e-6)
    distiller.args.dkd_warmup = 20  # mdistiller's CIFAR schedule
    for epoch, factor in [(0, 0.05), (4, 0.25), (19, 1.0), (37, 1.0)]:  # 0-based epochs, counted from 1
        _, losses = distiller(image, label, epoch=epoch)
        assert losses['loss_kd'].item() == pytest.approx(factor * full.item(), rel=1e-6)
    assert set(losses) == {'loss_gt', 'loss_kd'}


def reference_dist(logits_student, logits_teacher, beta, gamma, tau):
    """DIST as the OFA-KD / RSD code computes it: mean Pearson over rows, then over columns."""
    p_student, p_teacher = (logits_student / tau).softmax(1), (logits_teacher / tau).softmax(1)

    def relation(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean()

    return tau ** 2 * (beta * relation(p_student, p_teacher) + gamma * relation(p_student.T, p_teacher.T))


@pytest.mark.parametrize('name', ['dkd', 'dist'])
def test_kd_loss_weight_multiplies_the_term_as_in_the_reference(name):
    """The reference multiplies DKD's and DIST's term by --kd-loss-weight (as KD's); ours once ignored it."""
    distiller = build(name, kd_loss_weight=2.0)
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(16, 3, 4, 4, generator=generator)
    label = torch.randint(0, 5, (16,), generator=generator)
    _, losses = distiller(image, label, epoch=0)
    with torch.no_grad():
        student, teacher = distiller.student(image).double(), distiller.teacher(image).double()
    if name == 'dkd':
        term = mdistiller_dkd(student, teacher, label, 1.0, 2.0, 1.0)
    else:
        term = reference_dist(student, teacher, 1.0, 1.0, 1.0)
    print(f'{name}: --kd-loss-weight 2 gives loss_kd {losses["loss_kd"].item():.4f}; reference formula: '
          f'2 x {term.item():.4f} = {2 * term.item():.4f}')
    assert losses['loss_kd'].item() == pytest.approx(2 * term.item(), rel=1e-5)
    distiller.args.kd_loss_weight = 0.0
    _, losses = distiller(image, label, epoch=0)
    assert losses['loss_kd'].item() == 0.0


def test_dist_flags():
    distiller = build('dist')
    assert (distiller.args.dist_beta, distiller.args.dist_gamma, distiller.args.dist_tau) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize('name', ['dkd', 'dist'])
def test_soft_labels_use_the_argmax(name):
    distiller = build(name)
    image, label = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    soft_label = 0.7 * F.one_hot(label, 5) + 0.3 * F.one_hot(label.roll(1), 5)
    _, hard_losses = distiller(image, label, epoch=3)
    _, soft_losses = distiller(image, soft_label, epoch=3)
    assert soft_losses['loss_kd'].item() == pytest.approx(hard_losses['loss_kd'].item(), rel=1e-6)
    total = sum(soft_losses.values())
    total.backward()
    assert all(p.grad is not None for p in distiller.student.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())
