"""RSD (SPEC.md section 3): the loss by hand and against a plain float64 formulation, the Gram form
against the D x D form (values and gradients), the projector, stage features, parameter counts."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import custom_model  # noqa: F401  (registers the demo and Swin-N/P models with timm)
import distillers.rsd as rsd
from distillers import get_distiller
from helpers import build_distiller, create, distiller_args
from distillers.rsd import rsd_loss, rsd_loss_correlation, rsd_loss_gram


pytestmark = pytest.mark.usefixtures('one_thread')


def plain_rsd(student, teacher, kappa, rows_per_block=1000):
    """Independent float64 NumPy version of SPEC.md: standardise, C = Z^_t^T Z^_s / B, sum the terms.

    C is formed a block of rows at a time so that large D fits in memory.
    """
    student, teacher = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)

    def standardise(x):
        return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-5)  # np.std is the biased std

    student, teacher = standardise(student), standardise(teacher)
    loss = 0.0
    for start in range(0, student.shape[1], rows_per_block):
        block = teacher[:, start:start + rows_per_block].T @ student / len(student)  # rows of C
        on_diagonal = np.diagonal(block, offset=start)
        loss += ((on_diagonal - 1) ** 2).sum() + kappa * ((block ** 2).sum() - (on_diagonal ** 2).sum())
    return loss


# --- the loss --------------------------------------------------------------------------------------

@pytest.mark.parametrize('form', [rsd_loss, rsd_loss_correlation, rsd_loss_gram])
def test_hand_worked(form):
    # B = 2, D = 2. Student columns (1, 3) and (5, 1): means 2, 3, biased stds 1, 2 -> standardised
    # (-1, 1) and (1, -1). Teacher columns (0, 2) and (0, 4) -> (-1, 1) and (-1, 1).
    # C = Z^_t^T Z^_s / 2: C_00 = (1 + 1) / 2 = 1, C_01 = (-1 - 1) / 2 = -1, C_10 = 1, C_11 = -1.
    # loss = (1 - 1)^2 + (-1 - 1)^2 + kappa * ((-1)^2 + 1^2) = 4 + 2 kappa; kappa = 0.5 -> 5
    # (the 1e-5 beside the std moves this by about 1e-4).
    student = torch.tensor([[1.0, 5.0], [3.0, 1.0]])
    teacher = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    assert form(student, teacher, 0.5).item() == pytest.approx(5.0, rel=1e-4)
    assert form(student, teacher, 0.5).item() == pytest.approx(plain_rsd(student, teacher, 0.5), rel=1e-6)


# D < B, D = B, D >> B; the D x D form is left out where D x D is large (that is the Gram form's point).
@pytest.mark.parametrize('form, batch_size, dim', [
    (form, batch_size, dim) for form in (rsd_loss_correlation, rsd_loss_gram)
    for batch_size, dim in [(16, 4), (32, 32), (8, 3000), (4, 10000)]
    if form is rsd_loss_gram or dim <= 3000])
def test_forms_match_plain_formulation(form, batch_size, dim):
    generator = torch.Generator().manual_seed(dim)
    teacher = torch.randn(batch_size, dim, generator=generator)
    student = 0.5 * teacher + torch.randn(batch_size, dim, generator=generator)  # correlated, as in training
    expected = plain_rsd(student, teacher, 0.01)
    assert form(student, teacher, 0.01).item() == pytest.approx(expected, rel=1e-4)


def test_initial_value_is_about_d_plus_kappa_d_squared_over_b():
    # Independent inputs: C_ii ~ N(0, 1/B) so the diagonal gives about D, the off-diagonal kappa D^2 / B.
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 128, 768, generator=generator)
    assert rsd_loss(student, teacher, 0.01).item() == pytest.approx(768 + 0.01 * 768 ** 2 / 128, rel=0.05)


def test_gram_and_correlation_forms_agree_with_gradients():
    for batch_size, dim in [(64, 16), (6, 700)]:
        generator = torch.Generator().manual_seed(batch_size)
        student = torch.randn(batch_size, dim, generator=generator, requires_grad=True)
        teacher = torch.randn(batch_size, dim, generator=generator, requires_grad=True)
        loss_gram = rsd_loss_gram(student, teacher, 0.3)
        grads_gram = torch.autograd.grad(loss_gram, [student, teacher])
        loss_corr = rsd_loss_correlation(student, teacher, 0.3)
        grads_corr = torch.autograd.grad(loss_corr, [student, teacher])
        assert loss_gram.item() == pytest.approx(loss_corr.item(), rel=1e-5)
        for grad_gram, grad_corr in zip(grads_gram, grads_corr):
            torch.testing.assert_close(grad_gram, grad_corr, rtol=1e-4, atol=1e-4 * grad_corr.abs().max().item())


def test_gram_backward_gradcheck():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: rsd_loss_gram(s, t, 0.3), (student, teacher))


def test_constant_dimension_keeps_gradients_finite():
    # A dead unit (constant over the batch) must not turn the gradient into NaN.
    student = torch.randn(6, 10)
    student[:, 3] = 2.0
    for form in (rsd_loss_gram, rsd_loss_correlation):
        leaf = student.clone().requires_grad_()
        form(leaf, torch.randn(6, 10), 0.01).backward()
        assert torch.isfinite(leaf.grad).all()


def test_rsd_loss_picks_the_gram_form_when_d_exceeds_b(monkeypatch):
    calls = []
    monkeypatch.setattr(rsd, 'rsd_loss_gram', lambda *args: calls.append('gram') or torch.zeros(()))
    monkeypatch.setattr(rsd, 'rsd_loss_correlation', lambda *args: calls.append('correlation') or torch.zeros(()))
    rsd.rsd_loss(torch.randn(8, 100), torch.randn(8, 100), 0.01)
    rsd.rsd_loss(torch.randn(128, 64), torch.randn(128, 64), 0.01)
    assert calls == ['gram', 'correlation']


def test_match_size_pools_larger_and_interpolates_smaller_teacher_maps():
    teacher_map = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(rsd._match_size(teacher_map, (2, 2)), F.avg_pool2d(teacher_map, 2))
    assert rsd._match_size(teacher_map, (4, 4)) is teacher_map
    constant = torch.full((1, 1, 1, 1), 3.0)
    torch.testing.assert_close(rsd._match_size(constant, (2, 2)), torch.full((1, 1, 2, 2), 3.0))


# --- the distiller ---------------------------------------------------------------------------------

def build(student, teacher, input_size, **overrides):
    return build_distiller('rsd', student, teacher, input_size=input_size, **overrides)


def test_flags_defaults():
    args = distiller_args('rsd')
    assert (args.rsd_loss_weight, args.rsd_kappa, args.rsd_gamma, args.rsd_stage) == (0.1, 0.01, 2, [-1])
    parser = argparse.ArgumentParser()
    get_distiller('rsd').add_arguments(parser)
    assert parser.parse_args(['--rsd-stage', '-1', '2', '4']).rsd_stage == [-1, 2, 4]


def test_embedding_stage_loss_and_gradients():
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher')
    distiller = build(student, teacher, 32)
    projector = distiller.projectors['embedding']
    assert [type(m).__name__ for m in projector] == ['Linear', 'BatchNorm1d', 'GELU', 'Linear']
    assert projector[0].weight.shape == (2 * 128, 128) and projector[3].weight.shape == (96, 2 * 128)
    assert projector[0].bias is None and projector[3].bias is None
    assert projector[0].weight.std().item() == pytest.approx(0.02, rel=0.1)

    image, label = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    logits, losses = distiller(image, label)
    assert set(losses) == {'loss_gt', 'loss_rsd'}
    # The classifier reads the unprojected embedding: the logits are the student's own.
    distiller.eval()
    with torch.no_grad():
        torch.testing.assert_close(distiller(image, label)[0], student(image))
    distiller.train()

    # loss_rsd = lambda * rsd_loss(projector(s), t).
    _, student_features = rsd.forward_features(student, image)
    _, teacher_features = distiller.teacher_features(image)
    expected = 0.1 * rsd_loss(projector(student_features[-1]), teacher_features[-1], 0.01)
    _, losses = distiller(image, label)
    assert losses['loss_rsd'].item() == pytest.approx(expected.item(), rel=1e-5)

    sum(losses.values()).backward()
    assert all(p.grad is not None for p in projector.parameters())
    assert student.conv1[0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize('student_name, teacher_name, input_size, student_kwargs, teacher_kwargs', [
    # map student <- token teacher: teacher grid 8 pooled to the student's 8, 4, 2, 1
    ('demo_resnet_student', 'demo_vit_teacher', 32, {}, {}),
    # token student with a class token <- map teacher: teacher grids 8, 4, 2, 1 interpolated to 8
    ('demo_vit_teacher', 'demo_resnet_student', 32, {}, {}),
    # token student without prefix tokens <- map teacher, grids 16, 8, 4, 2 on both sides
    ('swin_nano_patch4_window7_224', 'demo_resnet_student', 64,
     {'img_size': 64, 'window_size': 4, 'num_classes': 10}, {}),
], ids=['map<-tokens', 'vit<-map', 'swin<-map'])
def test_stage_features(student_name, teacher_name, input_size, student_kwargs, teacher_kwargs):
    student, teacher = create(student_name, **student_kwargs), create(teacher_name, **teacher_kwargs)
    distiller = build(student, teacher, input_size, rsd_stage=[1, 2, 3, 4, -1])
    assert set(distiller.projectors) == {'stage1', 'stage2', 'stage3', 'stage4', 'embedding'}
    teacher_channels = [rsd.stage_info(teacher, k, input_size)[-1 if rsd.feature_format(teacher) == 'tokens' else 0]
                        for k in (1, 2, 3, 4)]
    for k, channels in zip((1, 2, 3, 4), teacher_channels):
        layers = distiller.projectors[f'stage{k}']
        assert [type(m).__name__ for m in layers] == ['Conv2d', 'BatchNorm2d', 'GELU', 'Conv2d']
        assert layers[3].out_channels == channels

    image, label = torch.randn(4, 3, input_size, input_size), torch.randint(0, 10, (4,))
    _, losses = distiller(image, label)
    assert set(losses) == {'loss_gt', 'loss_rsd'} and torch.isfinite(losses['loss_rsd'])
    sum(losses.values()).backward()
    for projector in distiller.projectors.values():
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in projector.parameters())
    assert any(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_stage_loss_is_rsd_of_the_flattened_maps():
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher', patch_size=4)
    distiller = build(student, teacher, 32, rsd_stage=[2]).eval()
    image = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, losses = distiller(image, torch.zeros(4, dtype=torch.long))
        _, student_features = rsd.forward_features(student, image)
        _, teacher_features = distiller.teacher_features(image)
        # Student stage 2 is 32 x 4 x 4; the teacher's 8 x 8 grid of 96-d tokens (class token dropped) is
        # average-pooled 2 x 2 to 4 x 4; D = 96 * 16 = 1536 > B, so the Gram form is used.
        teacher_map = F.avg_pool2d(teacher_features[1][:, 1:].transpose(1, 2).reshape(4, 96, 8, 8), 2)
        projected = distiller.projectors['stage2'](student_features[1])
        expected = 0.1 * rsd_loss_correlation(projected.flatten(1), teacher_map.flatten(1), 0.01)
    assert losses['loss_rsd'].item() == pytest.approx(expected.item(), rel=1e-4)


def test_stage_errors():
    with pytest.raises(ValueError, match='--rsd-stage'):
        build(create('demo_resnet_student'), create('demo_vit_teacher'), 32, rsd_stage=[0])


def test_extra_state_round_trip():
    source = build(create('demo_resnet_student'), create('demo_vit_teacher'), 32, rsd_stage=[-1, 3])
    target = build(create('demo_resnet_student'), create('demo_vit_teacher'), 32, rsd_stage=[-1, 3])
    for p in source.projectors.parameters():
        torch.nn.init.normal_(p)
    target.load_extra_state_dict(source.extra_state_dict())
    for key, value in source.projectors.state_dict().items():
        torch.testing.assert_close(target.projectors.state_dict()[key], value)


@pytest.mark.parametrize('student_name, teacher_name, expected', [
    ('resnet18', 'swin_tiny_patch4_window7_224', 1_312_768),    # 512*1024 + 2*1024 + 1024*768
    ('deit_tiny_patch16_224', 'convnext_tiny', 369_408),       # 192*384 + 2*384 + 384*768
    ('mobilenetv2_100', 'swin_tiny_patch4_window7_224', 5_248_000),  # 1280*2560 + 2*2560 + 2560*768
])
def test_extra_parameters_match_spec(student_name, teacher_name, expected):
    distiller = build(create(student_name, num_classes=100), create(teacher_name, num_classes=100), 224,
                      num_classes=100)
    assert sum(p.numel() for p in distiller.extra_parameters()) == expected


@pytest.mark.parametrize('gamma, hidden', [(0.5, 256), (1, 512), (6, 3072)])
def test_gamma_of_the_ablation_sets_the_projector_width(gamma, hidden):
    """RSD supplementary Table 10 runs gamma 1/2, 1, 2, 4 and 6: the hidden width is gamma * D_s."""
    with torch.device('meta'):
        student, teacher = create('resnet18', num_classes=100), create('swin_tiny_patch4_window7_224', num_classes=100)
        distiller = build(student, teacher, 224, num_classes=100, rsd_gamma=gamma)
    first, norm, _, last = distiller.projectors['embedding']
    assert (first.out_features, norm.num_features, last.in_features) == (hidden, hidden, hidden)
    parser = argparse.ArgumentParser()
    get_distiller('rsd').add_arguments(parser)
    assert parser.parse_args(['--rsd-gamma', '0.5']).rsd_gamma == 0.5


def test_gamma_that_gives_a_fractional_width_is_refused():
    with pytest.raises(ValueError, match='--rsd-gamma 0.3 gives a projector width of'):
        build(create('demo_resnet_student'), create('demo_vit_teacher'), 32, rsd_gamma=0.3)
    with pytest.raises(ValueError, match='--rsd-gamma must be positive'):
        build(create('demo_resnet_student'), create('demo_vit_teacher'), 32, rsd_gamma=0)
