"""OFA (SPEC.md section 3): the loss by hand and against the reference formulation, the eps flag, the
branches for map and token students (with and without a class token), parameter counts."""
import math

import pytest
import torch
import torch.nn.functional as F

import custom_model  # noqa: F401  (registers the demo and Swin-N/P models with timm)
from custom_forward import forward_features
from helpers import build_distiller, create, distiller_args
from distillers.ofa import TokenBranch, num_mergers, ofa_loss


pytestmark = pytest.mark.usefixtures('one_thread')


def log_probs(*probabilities):
    """Logits whose softmax is exactly the given probabilities."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


# --- the loss --------------------------------------------------------------------------------------

def test_ofa_loss_hand_worked():
    # eps = 2: w_c = p_t,c^2 off the target, (1 + p_t,y)^2 - 1 on it.
    # sample 0, target 0: p_t = p_s = (1/2, 1/4, 1/4): w = (5/4, 1/16, 1/16),
    #   loss = 5/4 ln 2 + 2 * 1/16 * ln 4 = 3/2 ln 2
    # sample 1, target 2: p_t = (1/4, 1/4, 1/2), p_s uniform: w = (1/16, 1/16, 5/4), sum 11/8,
    #   loss = 11/8 ln 3
    logits_student = log_probs([1 / 2, 1 / 4, 1 / 4], [1 / 3, 1 / 3, 1 / 3])
    logits_teacher = log_probs([1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 4, 1 / 2])
    target_mask = F.one_hot(torch.tensor([0, 2]), 3).double()
    expected = (1.5 * math.log(2) + 11 / 8 * math.log(3)) / 2
    assert ofa_loss(logits_student, logits_teacher, target_mask, 2.0, 1.0).item() == pytest.approx(expected, rel=1e-12)
    # eps = 1: w = p_t, the cross-entropy with the teacher's distribution:
    # (1/2 ln 2 + 2 * 1/4 ln 4) / 2 + ln 3 / 2
    expected_eps1 = (1.5 * math.log(2) + math.log(3)) / 2
    assert ofa_loss(logits_student, logits_teacher, target_mask, 1.0, 1.0).item() == pytest.approx(
        expected_eps1, rel=1e-12)
    # T divides the logits; there is no T^2 factor.
    assert ofa_loss(3 * logits_student, 3 * logits_teacher, target_mask, 2.0, 3.0).item() == pytest.approx(
        expected, rel=1e-12)


def reference_ofa_loss(logits_student, logits_teacher, target_mask, eps, temperature=1.):
    """The OFA-KD code base's formulation (log of the softmax)."""
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    prod = (pred_teacher + target_mask) ** eps
    return torch.sum(-(prod - target_mask) * torch.log(pred_student), dim=-1).mean()


@pytest.mark.parametrize('eps, temperature', [(1.0, 1.0), (1.5, 1.0), (1.2, 4.0)])
def test_ofa_loss_matches_reference(eps, temperature):
    generator = torch.Generator().manual_seed(0)
    logits_student = torch.randn(16, 10, generator=generator, dtype=torch.float64) * 3
    logits_teacher = torch.randn(16, 10, generator=generator, dtype=torch.float64) * 3
    target_mask = F.one_hot(torch.randint(0, 10, (16,), generator=generator), 10).double()
    assert ofa_loss(logits_student, logits_teacher, target_mask, eps, temperature).item() == pytest.approx(
        reference_ofa_loss(logits_student, logits_teacher, target_mask, eps, temperature).item(), rel=1e-10)


def test_ofa_loss_finite_for_confident_student():
    # log(softmax) of the reference underflows to -inf here; log_softmax does not.
    logits_student = torch.tensor([[200.0, -200.0, 0.0]], requires_grad=True)
    loss = ofa_loss(logits_student, torch.zeros(1, 3), F.one_hot(torch.tensor([0]), 3).float(), 1.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits_student.grad).all()


# --- branches and the distiller --------------------------------------------------------------------

def make_args(**overrides):
    return distiller_args('ofa', **overrides)


def build(student, teacher, **overrides):
    return build_distiller('ofa', student, teacher, **overrides)


def test_flags_defaults():
    args = make_args()
    assert (args.ofa_eps, args.ofa_stage, args.ofa_loss_weight, args.ofa_temperature) == ([1.0], [1, 2, 3, 4], 1.0, 1.0)


def test_eps_length_error():
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher')
    with pytest.raises(ValueError, match=r'--ofa-eps takes one value or len\(--ofa-stage\) \+ 1 = 5 values'):
        build(student, teacher, ofa_eps=[1.0, 1.5])
    with pytest.raises(ValueError, match='--ofa-stage'):
        build(student, teacher, ofa_stage=[0, 2])
    distiller = build(student, teacher, ofa_stage=[2, 4], ofa_eps=[1.1, 1.2, 1.5])
    assert (distiller.stage_eps, distiller.final_eps) == ([1.1, 1.2], 1.5)


def test_num_mergers():
    # 224 px: the reference's counts; small inputs: merge until the grid is at most 7.
    assert [num_mergers(grid) for grid in (56, 28, 14, 7, 16, 8, 4, 2)] == [3, 2, 1, 0, 2, 1, 0, 0]


def check_losses_and_gradients(distiller, student, teacher, input_size, num_classes=10):
    image = torch.randn(4, 3, input_size, input_size)
    label = torch.randint(0, num_classes, (4,))
    logits, losses = distiller(image, label)
    assert logits.shape == (4, num_classes)
    assert set(losses) == {'loss_gt', 'loss_kd', 'loss_ofa'}
    assert all(torch.isfinite(value) and value.dim() == 0 for value in losses.values())
    sum(losses.values()).backward()
    for branch in distiller.branches.values():
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in branch.parameters())
    assert any(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_map_student_token_teacher():
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher')  # 32 px; D* = max(128, 96)
    distiller = build(student, teacher)
    channels = [[block[5].out_channels for block in list(distiller.branches[f'stage{k}'])[:4 - k]] for k in (1, 2, 3)]
    assert channels == [[32, 64, 128], [64, 128], [128]]  # doubling, the last block giving D*
    assert distiller.branches['stage4'][0].out_channels == 128
    check_losses_and_gradients(distiller, student, teacher, 32)


def test_vit_student_with_class_token_map_teacher():
    student, teacher = create('demo_vit_teacher', patch_size=4), create('demo_resnet_student')  # 8 x 8 grid, 1 prefix token
    distiller = build(student, teacher)
    for k in (1, 2, 3, 4):
        branch = distiller.branches[f'stage{k}']
        assert isinstance(branch, TokenBranch) and branch.num_prefix == 1
        assert len(branch.mergers) == 1 and len(branch.blocks) == max(4 - k, 1)
    check_losses_and_gradients(distiller, student, teacher, 32)


def test_token_branch_reads_the_class_token():
    student, teacher = create('demo_vit_teacher', patch_size=4).eval(), create('demo_resnet_student')
    branch = build(student, teacher).branches['stage4'].eval()
    tokens = torch.randn(2, 65, 96)
    changed = tokens.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(branch(tokens), branch(changed))


def test_swin_student_without_prefix_tokens():
    # 64 px: grids 16, 8, 4, 2 with dims 64, 128, 256, 512 -> 2, 1, 0, 0 mergers; stage 3 needs the
    # tokens widened to 512 without merging.
    student = create('swin_nano_patch4_window7_224', img_size=64, window_size=4, num_classes=10)
    teacher = create('demo_resnet_student')
    distiller = build(student, teacher, input_size=64)
    merger_counts = [len(distiller.branches[f'stage{k}'].mergers) for k in (1, 2, 3, 4)]
    assert merger_counts == [2, 1, 1, 0]
    assert type(distiller.branches['stage3'].mergers[0][1]).__name__ == 'Linear'
    first, last = distiller.branches['stage1'].mergers
    assert type(first[1]).__name__ == 'GELU' and type(last[1]).__name__ == 'Identity'
    check_losses_and_gradients(distiller, student, teacher, 64)


def test_losses_are_the_weighted_ofa_terms():
    student, teacher = create('demo_resnet_student'), create('demo_vit_teacher')
    distiller = build(student, teacher, ofa_stage=[2, 4], ofa_eps=[1.1, 1.2, 1.5], kd_loss_weight=0.5,
                      ofa_loss_weight=3.0, ofa_temperature=2.0).eval()
    image, label = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    # Soft (mixup) labels use their argmax as the target class.
    soft_label = 0.6 * F.one_hot(label, 10) + 0.4 * F.one_hot(label.roll(1), 10)
    with torch.no_grad():
        _, losses = distiller(image, soft_label)
        _, hard_losses = distiller(image, label)
        logits_student, feats = forward_features(student, image)
        logits_teacher = teacher(image)
        mask = F.one_hot(label, 10).float()
        expected_kd = 0.5 * ofa_loss(logits_student, logits_teacher, mask, 1.5, 2.0)
        expected_ofa = 3.0 * (ofa_loss(distiller.branches['stage2'](feats[1]), logits_teacher, mask, 1.1, 2.0)
                              + ofa_loss(distiller.branches['stage4'](feats[3]), logits_teacher, mask, 1.2, 2.0))
    for result in (losses, hard_losses):
        assert result['loss_kd'].item() == pytest.approx(expected_kd.item(), rel=1e-5)
        assert result['loss_ofa'].item() == pytest.approx(expected_ofa.item(), rel=1e-5)


def test_extra_state_round_trip():
    source = build(create('demo_vit_teacher'), create('demo_resnet_student'))
    target = build(create('demo_vit_teacher'), create('demo_resnet_student'))
    for p in source.branches.parameters():
        torch.nn.init.normal_(p)
    target.load_extra_state_dict(source.extra_state_dict())
    for key, value in source.branches.state_dict().items():
        torch.testing.assert_close(target.branches.state_dict()[key], value)


@pytest.mark.parametrize('student_name, expected_millions', [('resnet18', 1.63), ('mobilenetv2_100', 2.53)])
def test_extra_parameters_match_spec(student_name, expected_millions):
    student = create(student_name, num_classes=100)
    teacher = create('swin_tiny_patch4_window7_224', num_classes=100)
    distiller = build(student, teacher, num_classes=100, input_size=224)
    assert round(sum(p.numel() for p in distiller.extra_parameters()) / 1e6, 2) == expected_millions


def reference_total_loss(args, logits_student, logits_teacher, branch_logits, label, criterion):
    """The OFA total loss as the OFA-KD / RSD code computes it (distillers/ofa.py of github.com/Hao840/OFAKD,
    the same file in github.com/VISION-SJTU/RSD, read at their fetched HEADs):

    - in __init__, when --ofa-eps holds a single value it is replaced by a list that repeats that value
      len(--ofa-stage) + 1 times (one per stage, one more for the final logits); a length check follows;
    - in forward, each listed stage is paired with the eps at its position (a zip of the stage list with the
      expanded eps list), its branch's logits go through the OFA loss against the teacher's final logits,
      and the branch losses are summed and multiplied by --ofa-loss-weight;
    - the final logits go through the OFA loss with the last eps, times --kd-loss-weight;
    - the ground-truth term is --gt-loss-weight times the criterion; the three terms are returned apart
      and the train loop adds them.
    """
    eps = list(args.ofa_eps)
    if len(eps) == 1:
        eps = [eps[0] for _ in range(len(args.ofa_stage) + 1)]
    assert len(args.ofa_stage) + 1 == len(eps)
    target_mask = F.one_hot(label, logits_student.size(-1)).double()
    branch_losses = [reference_ofa_loss(branch_logits[stage], logits_teacher, target_mask, stage_eps,
                                        args.ofa_temperature)
                     for stage, stage_eps in zip(args.ofa_stage, eps)]
    loss_ofa = args.ofa_loss_weight * sum(branch_losses)
    loss_gt = args.gt_loss_weight * criterion(logits_student, label)
    loss_kd = args.kd_loss_weight * reference_ofa_loss(logits_student, logits_teacher, target_mask, eps[-1],
                                                       args.ofa_temperature)
    return loss_gt + loss_kd + loss_ofa, len(branch_losses)


@pytest.mark.parametrize('eps', [1.0, 1.5])
def test_one_eps_and_four_stages_total_loss_equals_the_reference(eps):
    """--ofa-eps X --ofa-stage 1 2 3 4: the reference expands X to all four stages and the logits, so it
    trains all four branches; ours computes the same total on the same inputs, branches and weights."""
    student, teacher = create('demo_resnet_student').double(), create('demo_vit_teacher').double()
    distiller = build(student, teacher, ofa_stage=[1, 2, 3, 4], ofa_eps=[eps], ofa_loss_weight=0.1,
                      kd_loss_weight=1.0).double().eval()
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(8, 3, 32, 32, generator=generator, dtype=torch.float64)
    label = torch.randint(0, 10, (8,), generator=generator)
    _, losses = distiller(image, label)
    ours = sum(losses.values())
    with torch.no_grad():
        logits_student, features = forward_features(student, image)
        logits_teacher = teacher(image)
        branch_logits = {stage: distiller.branches[f'stage{stage}'](features[stage - 1]) for stage in (1, 2, 3, 4)}
    expected, num_terms = reference_total_loss(distiller.args, logits_student, logits_teacher, branch_logits,
                                               label, distiller.criterion)
    assert num_terms == 4
    # The teacher's logits pass through float32 on our side (its dtype rule), hence 1e-6 and not 1e-12.
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    # All four branches are trained: each gets a non-zero gradient from the total.
    ours.backward()
    for stage in (1, 2, 3, 4):
        grads = [p.grad for p in distiller.branches[f'stage{stage}'].parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f'stage {stage} branch untrained'
