"""HCD (SPEC.md section 3): the orthogonality loss by hand, the projectors and the Complementary Feature
Mapper for map and token students, the losses against their definitions, where gradients go, the flags,
a train.py run, parameter counts."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import custom_model  # noqa: F401  (registers the demo and Swin-N/P models with timm)
import train
from custom_forward import forward_features
from distillers import get_distiller
from helpers import build_distiller, create, distiller_args
from distillers.hcd import TokenProjector, orthogonality_loss, sublogit_kd_loss
from distillers.kd import kd_loss


pytestmark = pytest.mark.usefixtures('one_thread')


# --- the orthogonality loss ------------------------------------------------------------------------

def with_target_column(non_target_rows, target, value=0.0):
    """[n, K-1] rows -> [1, n, K] with `value` inserted as the target column."""
    rows = torch.as_tensor(non_target_rows, dtype=torch.float64)
    column = torch.full((rows.shape[0], 1), float(value), dtype=torch.float64)
    return torch.cat([rows[:, :target], column, rows[:, target:]], dim=1)[None]


def test_identical_sublogits():
    # Every pair has cosine 1: hinge (1 - tau)^2, frobenius 1.
    fused = with_target_column([[1.0, 2.0, -3.0]] * 3, target=1, value=9.0)
    target = torch.tensor([1])
    assert orthogonality_loss(fused, target, 0.5).item() == pytest.approx(0.25, rel=1e-12)
    assert orthogonality_loss(fused, target, 0.2, 'hinge').item() == pytest.approx(0.64, rel=1e-12)
    assert orthogonality_loss(fused, target, 0.5, 'frobenius').item() == pytest.approx(1.0, rel=1e-12)


def test_orthogonal_sublogits_give_zero():
    # Orthogonal off the target; the large target column would make them similar if it were kept.
    fused = with_target_column([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.5]], target=0, value=50.0)
    fused[0, :, 0] = torch.tensor([50.0, 60.0, 70.0], dtype=torch.float64)
    target = torch.tensor([0])
    for form in ('hinge', 'frobenius'):
        assert orthogonality_loss(fused, target, 0.5, form).item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize('cosine, expected_hinge', [(0.45, 0.0), (0.5, 0.0), (0.8, 0.3 ** 2), (-0.9, 0.0)])
def test_tau_threshold(cosine, expected_hinge):
    # n = 2: both ordered pairs (0, 1) and (1, 0) have G = cosine; the mean over them is the one value.
    rows = [[3.0, 0.0], [3.0 * cosine, 3.0 * math.sqrt(1 - cosine ** 2)]]
    fused, target = with_target_column(rows, target=2, value=-4.0), torch.tensor([2])
    assert orthogonality_loss(fused, target, 0.5).item() == pytest.approx(expected_hinge, abs=1e-12)
    assert orthogonality_loss(fused, target, 0.5, 'frobenius').item() == pytest.approx(cosine ** 2, rel=1e-12)


def test_mean_over_samples_and_pairs():
    # Sample 0: identical rows (hinge 0.25 per pair); sample 1: orthogonal rows (0). Mean 0.125.
    fused = torch.cat([with_target_column([[1.0, 1.0], [1.0, 1.0]], target=0),
                       with_target_column([[1.0, 0.0], [0.0, 1.0]], target=2)])
    assert orthogonality_loss(fused, torch.tensor([0, 2]), 0.5).item() == pytest.approx(0.125, rel=1e-12)


def reference_orthogonality(fused, target, tau, form):
    """A per-sample loop: delete the target column, normalise, Gram, average the off-diagonal terms."""
    terms = []
    for sample, y in zip(fused, target.tolist()):
        kept = torch.cat([sample[:, :y], sample[:, y + 1:]], dim=1)
        kept = kept / kept.norm(dim=1, keepdim=True)
        gram = kept @ kept.T
        for i in range(len(gram)):
            for j in range(len(gram)):
                if i != j:
                    terms.append(F.relu(gram[i, j] - tau) ** 2 if form == 'hinge' else gram[i, j] ** 2)
    return torch.stack(terms).mean()


@pytest.mark.parametrize('form', ['hinge', 'frobenius'])
def test_target_column_is_removed(form):
    generator = torch.Generator().manual_seed(0)
    fused = torch.randn(6, 4, 10, generator=generator, dtype=torch.float64) + 1.0  # some pairs above tau
    target = torch.tensor([0, 9, 3, 3, 5, 1])
    loss = orthogonality_loss(fused, target, 0.3, form)
    assert loss.item() == pytest.approx(reference_orthogonality(fused, target, 0.3, form).item(), rel=1e-12)
    changed = fused.clone()
    changed[torch.arange(6), :, target] = torch.randn(6, 4, generator=generator, dtype=torch.float64) * 100
    assert orthogonality_loss(changed, target, 0.3, form).item() == pytest.approx(loss.item(), rel=1e-12)


def test_gradient_where_the_hinge_is_active():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(1, 1, 8, generator=generator, dtype=torch.float64)
    fused = (base + 0.1 * torch.randn(2, 3, 8, generator=generator, dtype=torch.float64)).requires_grad_()
    target = torch.tensor([2, 5])
    loss = orthogonality_loss(fused, target, 0.5)
    assert loss.item() > 0  # near-identical rows: every pair is above tau
    loss.backward()
    non_target = torch.ones(2, 8, dtype=torch.bool)
    non_target[torch.arange(2), target] = False
    assert (fused.grad[non_target[:, None, :].expand(2, 3, 8)].abs() > 1e-6).all()
    assert (fused.grad[torch.arange(2), :, target] == 0).all()

    # Orthogonal rows: the hinge is inactive and so is its gradient; frobenius still pulls.
    orthogonal = with_target_column([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], target=1, value=3.0).requires_grad_()
    orthogonality_loss(orthogonal, torch.tensor([1]), 0.5).backward()
    assert (orthogonal.grad == 0).all()


def test_unknown_form():
    with pytest.raises(ValueError, match='hinge, frobenius'):
        orthogonality_loss(torch.randn(2, 3, 5), torch.tensor([0, 1]), 0.5, 'cosine')


# --- the distiller ---------------------------------------------------------------------------------

def make_args(name='hcd', **overrides):
    return distiller_args(name, **overrides)


def build(student, teacher, name='hcd', criterion=None, **overrides):
    return build_distiller(name, student, teacher, criterion, **overrides)


def test_flags():
    args = distiller_args('hcd')
    assert (args.hcd_stages, args.hcd_n, args.hcd_cfm_hidden, args.hcd_kl_weight, args.hcd_ce_weight,
            args.hcd_ortho_weight, args.hcd_ortho_tau, args.hcd_ortho_form, args.hcd_detach_target) == (
        [1, 2, 3, 4], 4, 0, 1.0, 1.0, 1.0, 0.5, 'hinge', True)
    parser = argparse.ArgumentParser()
    get_distiller('hcd').add_arguments(parser)
    assert parser.parse_args(['--no-hcd-detach-target']).hcd_detach_target is False
    assert parser.parse_args(['--hcd-detach-target']).hcd_detach_target is True
    assert parser.parse_args(['--hcd-stages', '2', '4']).hcd_stages == [2, 4]
    assert parser.parse_args(['--hcd-ortho-form', 'frobenius']).hcd_ortho_form == 'frobenius'


@pytest.mark.parametrize('overrides, message', [
    ({'hcd_stages': [0, 2]}, r'--hcd-stages takes distinct stages among 1 2 3 4; got \[0, 2\]'),
    ({'hcd_stages': [5]}, r'--hcd-stages takes distinct stages among 1 2 3 4'),
    ({'hcd_stages': [2, 2]}, r'--hcd-stages takes distinct stages'),
    ({'hcd_n': 1}, r'--hcd-n .* must be an integer >= 2, got 1'),
    ({'hcd_ortho_tau': 1.0}, r'--hcd-ortho-tau .* must be in \[-1, 1\), got 1.0'),
    ({'hcd_ortho_tau': -1.5}, r'--hcd-ortho-tau .* must be in \[-1, 1\), got -1.5'),
    ({'hcd_cfm_hidden': -1}, r'--hcd-cfm-hidden must be 0 .* or a positive width, got -1'),
    ({'hcd_ortho_form': 'cosine'}, r"--hcd-ortho-form must be one of hinge, frobenius; got 'cosine'"),
])
def test_check_args(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_distiller('hcd').check_args(make_args(**overrides))


def test_check_args_accepts_the_edges():
    get_distiller('hcd').check_args(make_args(hcd_n=2, hcd_ortho_tau=-1.0, hcd_cfm_hidden=0, hcd_stages=[4]))


def check_gradients(distiller, student, teacher, input_size, num_classes=10):
    image = torch.randn(4, 3, input_size, input_size)
    label = torch.randint(0, num_classes, (4,))
    logits, losses = distiller(image, label)
    assert logits.shape == (4, num_classes)
    assert set(losses) == {'loss_gt', 'loss_kd', 'loss_hcd_kl', 'loss_hcd_ce', 'loss_hcd_ortho'}
    assert all(torch.isfinite(value) and value.dim() == 0 for value in losses.values())
    sum(losses.values()).backward()
    for modules in (distiller.projectors, distiller.feature_mappers):
        for module in modules.values():
            assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                       for p in module.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_map_student_token_teacher():
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher')  # D* = max(128, 96)
    distiller = build(student, teacher)
    # OFA's map branch without its Linear: SepConvs (k < 4) or a 1x1 conv (k = 4), pooling, flatten.
    assert [type(m).__name__ for m in distiller.projectors['stage2']] == ['SepConv', 'SepConv',
                                                                           'AdaptiveAvgPool2d', 'Flatten']
    assert [type(m).__name__ for m in distiller.projectors['stage4']] == ['Conv2d', 'AdaptiveAvgPool2d', 'Flatten']
    for k in (1, 2, 3, 4):
        mapper = distiller.feature_mappers[f'stage{k}']
        assert isinstance(mapper, torch.nn.Linear) and mapper.weight.shape == (4 * 10, 128 + 96)
    check_gradients(distiller, student, teacher, 32)


def test_cfm_and_sublogit_shapes():
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher')
    image = torch.randn(3, 3, 32, 32)
    _, student_features = forward_features(student, image)
    for hidden in (0, 24):
        distiller = build(student, teacher, hcd_n=3, hcd_cfm_hidden=hidden, hcd_stages=[2, 4])
        _, teacher_features = distiller.teacher_features(image)
        assert set(distiller.projectors) == set(distiller.feature_mappers) == {'stage2', 'stage4'}
        for k in (2, 4):
            projected = distiller.projectors[f'stage{k}'](student_features[k - 1])
            assert projected.shape == (3, 128)
            shared = distiller.feature_mappers[f'stage{k}'](torch.cat([projected, teacher_features[-1]], dim=1))
            assert shared.shape == (3, 3 * 10)
            sublogits = distiller.sublogits(k, student_features[k - 1], teacher_features[-1])
            assert sublogits.shape == (3, 3, 10)
            torch.testing.assert_close(sublogits, shared.reshape(3, 3, 10))
        if hidden:
            mapper = distiller.feature_mappers['stage2']
            assert [type(m).__name__ for m in mapper] == ['Linear', 'ReLU', 'Linear']
            assert mapper[0].weight.shape == (24, 128 + 96) and mapper[2].weight.shape == (30, 24)
    check_gradients(distiller, student, teacher, 32)


def test_vit_student_with_class_token_cnn_teacher():
    student = create('demo_vit_teacher', depth=4, embed_dim=48)
    teacher = create('resnet18', num_classes=10)  # D* = max(48, 512)
    distiller = build(student, teacher)
    projector = distiller.projectors['stage1']
    assert isinstance(projector, TokenProjector) and projector.num_prefix == 1
    assert projector.proj.weight.shape == (512, 48)
    assert distiller.feature_mappers['stage1'].weight.shape == (40, 512 + 512)
    # The class token is stripped: changing it leaves u_k as it was.
    tokens = torch.randn(2, 65, 48)
    changed = tokens.clone()
    changed[:, 0] += 5.0
    torch.testing.assert_close(projector(tokens), projector(changed))
    check_gradients(distiller, student, teacher, 32)


def test_swin_student_cnn_teacher():
    student = create('swin_nano_patch4_window7_224', img_size=32, window_size=2, num_classes=10)
    teacher = create('demo_resnet_student')  # D* = max(512, 128)
    distiller = build(student, teacher)
    assert [distiller.projectors[f'stage{k}'].proj.weight.shape[1] for k in (1, 2, 3, 4)] == [64, 128, 256, 512]
    assert all(distiller.projectors[f'stage{k}'].num_prefix == 0 for k in (1, 2, 3, 4))
    check_gradients(distiller, student, teacher, 32)


def test_losses_are_the_weighted_terms():
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher')
    distiller = build(student, teacher, hcd_stages=[1, 3], hcd_n=3, kd_loss_weight=0.5, kd_temperature=2.0,
                      gt_loss_weight=0.7, hcd_kl_weight=2.0, hcd_ce_weight=0.3, hcd_ortho_weight=5.0,
                      hcd_ortho_tau=0.1).eval()
    image, label = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    soft_label = 0.6 * F.one_hot(label, 10) + 0.4 * F.one_hot(label.roll(1), 10)
    with torch.no_grad():
        _, losses = distiller(image, soft_label)
        logits_student, student_features = forward_features(student, image)
        logits_teacher, teacher_features = forward_features(teacher, image)
        expected_kl = expected_ce = expected_ortho = 0.
        for k in (1, 3):
            u = distiller.projectors[f'stage{k}'](student_features[k - 1])
            shared = distiller.feature_mappers[f'stage{k}'](torch.cat([u, teacher_features[-1]], dim=1))
            fused = shared.reshape(4, 3, 10) + logits_teacher[:, None]
            # mean_i T^2 KL(softmax(f_i / T) || softmax(z_s / T)), and mean_i CE(f_i, y) with the soft label.
            expected_kl += sum(kd_loss(logits_student, fused[:, i], 2.0) for i in range(3)) / 3
            expected_ce += sum(F.cross_entropy(fused[:, i], soft_label) for i in range(3)) / 3
            expected_ortho += orthogonality_loss(fused, label, 0.1)  # the argmax of the soft label
        expected = {'loss_gt': 0.7 * F.cross_entropy(logits_student, soft_label),
                    'loss_kd': 0.5 * kd_loss(logits_student, logits_teacher, 2.0),
                    'loss_hcd_kl': 2.0 * expected_kl, 'loss_hcd_ce': 0.3 * expected_ce,
                    'loss_hcd_ortho': 5.0 * expected_ortho}
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5), key
    assert expected['loss_hcd_ortho'].item() > 0


def test_losses_are_float32_under_autocast():
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher')
    distiller = build(student, teacher)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, losses = distiller(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in losses.values())


def test_sublogit_kd_loss_is_the_mean_over_sublogits():
    generator = torch.Generator().manual_seed(0)
    logits_student = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    fused = torch.randn(5, 3, 7, generator=generator, dtype=torch.float64)
    # KL(p || q) = sum p (log p - log q), batch-averaged, times T^2, then averaged over the sub-logits.
    p = F.softmax(fused / 3.0, dim=-1)
    log_q = F.log_softmax(logits_student / 3.0, dim=-1)[:, None]
    expected = 9.0 * (p * (p.log() - log_q)).sum(dim=-1).mean()
    assert sublogit_kd_loss(logits_student, fused, 3.0).item() == pytest.approx(expected.item(), rel=1e-12)


def cfm_and_projector_gradients(distiller):
    return [p.grad for modules in (distiller.projectors, distiller.feature_mappers) for p in modules.parameters()]


@pytest.mark.parametrize('detach', [True, False])
def test_detached_target_keeps_the_kl_out_of_the_cfm(detach):
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher')
    distiller = build(student, teacher, gt_loss_weight=0.0, kd_loss_weight=0.0, hcd_ce_weight=0.0,
                      hcd_ortho_weight=0.0, hcd_detach_target=detach)
    _, losses = distiller(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    sum(losses.values()).backward()
    grads = cfm_and_projector_gradients(distiller)
    if detach:
        assert all(g is None or (g == 0).all() for g in grads)
    else:
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # Either way the KL term trains the student's logits.
    assert student.fc.weight.grad is not None and student.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_extra_state_round_trip():
    source = build(create('demo_vit_teacher', depth=4, embed_dim=48), create('demo_resnet_student'),
                   hcd_cfm_hidden=16)
    target = build(create('demo_vit_teacher', depth=4, embed_dim=48), create('demo_resnet_student'),
                   hcd_cfm_hidden=16)
    assert set(source.extra_modules()) >= {'projectors', 'feature_mappers'}
    for p in source.extra_parameters():
        torch.nn.init.normal_(p)
    target.load_extra_state_dict(source.extra_state_dict())
    for name, module in source.extra_modules().items():
        for key, value in module.state_dict().items():
            torch.testing.assert_close(target.extra_modules()[name].state_dict()[key], value)


# --- train.py ---------------------------------------------------------------------------------------

FAST = ['--dataset', 'fake', '--fake-samples', '32', '--img-size', '32', '--batch-size', '8', '--epochs', '1',
        '--workers', '0', '--log-interval', '2', '--distiller', 'hcd']


@pytest.mark.parametrize('model_flags', [
    ['--model', 'demo_resnet_student', '--teacher', 'demo_vit_teacher'],
    ['--model', 'demo_vit_teacher', '--model-kwargs', 'depth=4', 'embed_dim=48', '--teacher', 'resnet18',
     '--no-hcd-detach-target', '--hcd-cfm-hidden', '32'],
], ids=['cnn-student', 'token-student'])
def test_train_one_epoch(tmp_path, model_flags):
    train.main(FAST + model_flags + ['--output', str(tmp_path), '--experiment', 'hcd'])
    run = tmp_path / 'hcd'
    header, row = (run / 'summary.csv').read_text().strip().splitlines()
    columns = dict(zip(header.split(','), row.split(',')))
    for key in ('train_loss_gt', 'train_loss_kd', 'train_loss_hcd_kl', 'train_loss_hcd_ce', 'train_loss_hcd_ortho'):
        assert math.isfinite(float(columns[key])), key
    checkpoint = torch.load(run / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert set(checkpoint['distiller']) >= {'projectors', 'feature_mappers'}


# --- parameter counts -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def models_at_224():
    names = ('resnet18', 'swin_tiny_patch4_window7_224', 'deit_tiny_patch16_224', 'convnext_tiny')
    return {name: create(name, num_classes=100) for name in names}


def count(distiller):
    return sum(p.numel() for p in distiller.extra_parameters())


@pytest.mark.parametrize('student_name, teacher_name, student_dim, teacher_dim', [
    ('resnet18', 'swin_tiny_patch4_window7_224', 512, 768),
    ('deit_tiny_patch16_224', 'convnext_tiny', 192, 768),
], ids=['resnet18<-swin_t', 'deit_t<-convnext_t'])
def test_extra_parameters(models_at_224, student_name, teacher_name, student_dim, teacher_dim):
    student, teacher = models_at_224[student_name], models_at_224[teacher_name]
    num_classes, num_sub, stages = 100, 4, 4
    branch_dim = max(student_dim, teacher_dim)  # D*
    setting = dict(num_classes=num_classes, input_size=224)
    hcd = build(student, teacher, **setting)
    ofa = build(student, teacher, 'ofa', **setting)
    rsd = build(student, teacher, 'rsd', **setting)
    projectors = sum(p.numel() for p in hcd.projectors.parameters())
    mappers = sum(p.numel() for p in hcd.feature_mappers.parameters())
    assert mappers == stages * ((branch_dim + teacher_dim) * num_sub * num_classes + num_sub * num_classes)
    if student_name == 'resnet18':
        # OFA's map branches less their Linear(D*, K).
        assert projectors == count(ofa) - stages * (branch_dim * num_classes + num_classes)
    else:
        # LayerNorm(D_s) + Linear(D_s, D*) per stage: DeiT's stages are all D_s wide.
        assert projectors == stages * (2 * student_dim + student_dim * branch_dim + branch_dim)
    print(f"\n{student_name} <- {teacher_name}, 100 classes: HCD {count(hcd):,} (projectors {projectors:,}, "
          f"CFMs {mappers:,}); OFA {count(ofa):,}; RSD {count(rsd):,}")
