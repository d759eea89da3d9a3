"""Every family of tools/families.py through custom_forward's general rule (or its explicit adapter): five
features, logits equal to model(x), stage_info equal to the shapes returned; the README's family table is
what the generator makes of the same list; what the rule picks (last four levels, isotropic blocks, the
first level repeated for three-stage models, prefix tokens from the probe); OFA training a step with new
families on each side."""
import copy
import functools
import os
import sys

import pytest
import torch
import torch.nn as nn

from custom_forward import (
    UnsupportedModelError, feature_format, forward_features, num_prefix_tokens, stage_info)
from helpers import ROOT, build_distiller, create
from xkd.models import create_model

sys.path.insert(0, os.path.join(ROOT, 'tools'))
import families  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


@functools.lru_cache(maxsize=None)
def checked(index):
    """The family's row of the table, checked once per session (the README test reuses the rows)."""
    return families.check_family(families.FAMILIES[index])


@pytest.mark.parametrize('index', range(len(families.FAMILIES)), ids=[f.model for f in families.FAMILIES])
def test_family_gives_the_feature_contract(index):
    checked(index)


def test_readme_family_table_is_generated_from_the_checked_list():
    with open(families.README) as f:
        readme = f.read()
    expected = families.markdown_table([checked(i) for i in range(len(families.FAMILIES))])
    assert families.readme_table(readme) == expected, 'run `python tools/families.py --write`'


def test_at_least_twelve_new_families_go_through_the_general_rule():
    old = {'ResNet', 'EfficientNet / MobileNetV2', 'ConvNeXt', 'ViT / DeiT', 'DeiT distilled', 'Swin', 'MLP-Mixer',
           'ResMLP'}
    new = [f.family for f in families.FAMILIES if f.family not in old]
    assert len(new) >= 12
    for required in ('MobileNetV3', 'MobileNetV4', 'RegNet', 'EfficientFormer', 'FastViT', 'EdgeNeXt', 'PVT-v2',
                     'CAFormer (MetaFormer)', 'EVA-02', 'BEiT-v2', 'SwinV2', 'LeViT'):
        assert required in new


# --- what the general rule picks ----------------------------------------------------------------------

def levels_of(model, x):
    """All feature levels forward_intermediates offers, as timm gives them (NCHW, prefix tokens dropped)."""
    return model.forward_intermediates(x, intermediates_only=True)


def test_hierarchical_model_gives_its_last_four_levels():
    # MobileNetV3: levels are the stride-2 stem and the ends of the stride 4, 8, 16, 32 stages.
    model, x = create('mobilenetv3_small_050').eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, feats = forward_features(model, x)
        levels = levels_of(model, x)
    assert len(levels) == 5
    for feature, level in zip(feats[:4], levels[1:]):
        torch.testing.assert_close(feature, level, rtol=0, atol=0)
    torch.testing.assert_close(feats[-1], model.forward_head(model.forward_features(x), pre_logits=True))


@pytest.mark.parametrize('name, kwargs, img_size', [
    ('levit_128s', {'img_size': 64, 'depth': (1, 1, 1)}, 64),
    ('efficientvit_m0', {'img_size': 64}, 64),
])
def test_three_stage_model_repeats_its_first_level(name, kwargs, img_size):
    model, x = create(name, **kwargs).eval(), torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        _, feats = forward_features(model, x)
        levels = levels_of(model, x)
    assert len(levels) == 3
    as_levels = feats[:4] if feature_format(model) == 'map' else [
        f.transpose(1, 2).reshape(level.shape) for f, level in zip(feats[:4], [levels[0], *levels])]
    for feature, level in zip(as_levels, [levels[0], levels[0], levels[1], levels[2]]):
        torch.testing.assert_close(feature, level, rtol=0, atol=0)
    assert stage_info(model, 1, img_size) == stage_info(model, 2, img_size) != stage_info(model, 3, img_size)


def block_outputs(model, x, blocks):
    caught = {}
    handles = [model.blocks[b].register_forward_hook(
        lambda module, args, output, b=b: caught.__setitem__(b, output)) for b in blocks]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [caught[b] for b in blocks]


@pytest.mark.parametrize('name, kwargs, img_size, prefix', [
    # Depth 6: blocks 1, 2, 5, 6 (1-based), class token kept first.
    ('eva02_tiny_patch14_224', {'img_size': 28, 'depth': 6}, 28, 1),
    ('eva02_tiny_patch14_224', {'img_size': 28, 'depth': 6, 'num_reg_tokens': 4}, 28, 5),
    ('beitv2_large_patch16_224', {'img_size': 32, 'depth': 6, 'embed_dim': 64, 'num_heads': 2}, 32, 1),
])
def test_isotropic_model_gives_rule_blocks_with_prefix_tokens(name, kwargs, img_size, prefix):
    model, x = create(name, **kwargs).eval(), torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        _, feats = forward_features(model, x)
    assert feature_format(model) == 'tokens' and num_prefix_tokens(model) == prefix
    for feature, expected in zip(feats, block_outputs(model, x, [0, 1, 4, 5])):
        torch.testing.assert_close(feature, expected)


def test_layout_comes_from_the_model_not_its_name():
    # The same class as a token model and, without its class token, with no prefix tokens; a name the
    # adapter has never seen (a registered alias would do the same).
    with_cls = create('deit_tiny_patch16_224', img_size=32, depth=4)
    without = create('deit_tiny_patch16_224', img_size=32, depth=4, class_token=False, global_pool='avg')
    registers = create('deit_tiny_patch16_224', img_size=32, depth=4, reg_tokens=2)
    assert [num_prefix_tokens(m) for m in (with_cls, without, registers)] == [1, 0, 3]
    assert stage_info(without, 1) == (4, 192) and stage_info(registers, 1) == (7, 192)


def test_distilled_heads_average_in_eval_and_follow_the_model_in_train():
    # EfficientFormer's and LeViT's eval-mode heads average two classifiers.
    for name, kwargs, img_size in [
            ('efficientformer_l1', {'depths': (1, 1, 1, 2), 'embed_dims': (16, 32, 64, 128)}, 224),
            ('levit_128s', {'img_size': 64, 'depth': (1, 1, 1)}, 64)]:
        model, x = create(name, **kwargs).eval(), torch.randn(2, 3, img_size, img_size)
        assert model.head_dist is not None
        with torch.no_grad():
            logits, feats = forward_features(model, x)
            torch.testing.assert_close(logits, model(x), rtol=0, atol=1e-5)
            torch.testing.assert_close(logits, (model.head(feats[-1]) + model.head_dist(feats[-1])) / 2)
            # What a classifier-on-embedding shortcut would have given:
            assert not torch.allclose(logits, model.head(feats[-1]), rtol=1e-2, atol=0)
        model.train()
        torch.manual_seed(3)
        expected = model(x)
        torch.manual_seed(3)
        logits, feats = forward_features(model, x)
        torch.testing.assert_close(logits, expected)
        feats[0].mean().backward()
        assert next(model.parameters()).grad is not None


def test_head_dropout_after_the_pre_logits_is_kept_in_train_mode():
    # MobileNetV3 applies its dropout between the pre-logits and the classifier.
    model = create('mobilenetv3_small_050', drop_rate=0.5).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    expected = model(x)
    torch.manual_seed(5)
    logits, _ = forward_features(model, x)
    torch.testing.assert_close(logits, expected)


def test_batch_norm_in_the_head_is_updated_once_per_step_as_by_the_model():
    # MobileNetV4's norm_head (here on a tiny MobileNetV3) runs in the pre-logits part of the head, which
    # forward_features runs twice.
    model = create('mobilenetv3_small_050', head_norm=True).train()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(forward_features(model, x)[0], reference(x))
    for name in ('norm_head', 'blocks.0.0.bn1'):
        for ours, theirs in zip(model.get_submodule(name).buffers(), reference.get_submodule(name).buffers()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


class NoPreLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward_intermediates(self, x):
        return self.conv(x), [self.conv(x)]

    def forward_head(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def test_a_model_built_for_another_size_is_probed_at_it_or_told_how():
    # timm's LeViT records its image size nowhere: probed at its pretrained_cfg's 224 px it fails.
    model = create('levit_128s', img_size=64, depth=(1, 1, 1))
    with pytest.raises(ValueError, match=r"could not probe LevitDistilled at \(3, 224, 224\).*input_size"):
        feature_format(model)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 64, 64))  # as xkd.models.create_model does
    assert feature_format(model) == 'tokens' and stage_info(model, 4) == (1, 384)
    built = create_model('levit_128s', 10, (3, 64, 64), depth=(1, 1, 1))
    assert feature_format(built) == 'tokens' and stage_info(built, 1) == (16, 128)


def test_general_rule_refuses_a_head_without_pre_logits():
    with pytest.raises(UnsupportedModelError, match='pre_logits.*HookAdapter'):
        forward_features(NoPreLogits(), torch.randn(1, 3, 8, 8))


def test_the_only_explicit_adapter_left_is_efficientnet():
    rows = [checked(i) for i in range(len(families.FAMILIES))]
    assert [row['class'] for row in rows if not row['stages 1..4'].startswith('general')] == ['EfficientNet']


# --- a distiller that reads stage maps, with new families on each side -----------------------------

@pytest.mark.parametrize('student, student_kwargs, teacher, teacher_kwargs, img_size', [
    ('mobilenetv3_small_050', {}, 'eva02_tiny_patch14_224', {'depth': 4}, 28),
    ('pvt_v2_b0', {'depths': (1, 1, 1, 1)}, 'convnext_atto', {}, 32),
    ('levit_128s', {'depth': (1, 1, 1)}, 'convnext_atto', {}, 64),
    ('efficientvit_m0', {}, 'swinv2_tiny_window8_256',
     {'window_size': 2, 'embed_dim': 16, 'depths': (1, 1, 1, 1), 'num_heads': (1, 1, 1, 1)}, 64),
])
def test_ofa_trains_a_step_with_new_families(student, student_kwargs, teacher, teacher_kwargs, img_size):
    # Built as train.py builds them: at the run's input size (LeViT then runs at nothing else).
    num_classes, input_size = 10, (3, img_size, img_size)
    torch.manual_seed(0)
    student = create_model(student, num_classes, input_size, **student_kwargs)
    teacher = create_model(teacher, num_classes, input_size, **teacher_kwargs)
    distiller = build_distiller('ofa', student, teacher, num_classes=num_classes, input_size=img_size).train()
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.1)
    before = {name: p.detach().clone() for name, p in distiller.named_parameters() if p.requires_grad}
    images, labels = torch.randn(4, 3, img_size, img_size), torch.randint(0, num_classes, (4,))
    logits, losses = distiller(images, labels)
    assert logits.shape == (4, num_classes) and set(losses) == {'loss_gt', 'loss_kd', 'loss_ofa'}
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    for stage, branch in distiller.branches.items():
        assert any(not torch.equal(p, before[f'branches.{stage}.{name}']) for name, p in branch.named_parameters())
    assert any(not torch.equal(p, before[f'student.{name}']) for name, p in student.named_parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize('method', ['rsd', 'hcd'])
def test_rsd_and_hcd_build_and_step_for_a_three_stage_student_of_an_eva_teacher(method):
    torch.manual_seed(0)
    student = create_model('levit_128s', 10, (3, 64, 64), depth=(1, 1, 1))
    teacher = create_model('eva02_tiny_patch14_224', 10, (3, 64, 64), depth=4)
    distiller = build_distiller(method, student, teacher, num_classes=10, input_size=64).train()
    logits, losses = distiller(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))
    assert all(torch.isfinite(value) for value in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
