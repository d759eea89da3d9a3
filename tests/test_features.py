"""The feature contract of SPEC.md 2.1: shapes per family, logits equal to model(x), stage_info,
what each stage and embedding is (checked against forward hooks), autograd, and the token helpers."""
import pytest
import timm
import torch
import torch.nn as nn

import custom_model  # noqa: F401  (registers the custom and demo models with timm)
from custom_forward import (
    HookAdapter,
    UnsupportedModelError,
    embedding_dim,
    feature_format,
    forward_features,
    isotropic_stage_blocks,
    map_to_tokens,
    num_prefix_tokens,
    register_adapter,
    split_prefix_tokens,
    stage_info,
    strip_prefix_tokens,
    tokens_to_map,
)

# name, create_model kwargs, input size, format, prefix tokens, shapes of stages 1..4 and embedding.
SPEC_TABLE = [
    ('resnet18', {}, 224, 'map', 0, [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7), (512,)]),
    ('mobilenetv2_100', {}, 224, 'map', 0, [(24, 56, 56), (32, 28, 28), (96, 14, 14), (1280, 7, 7), (1280,)]),
    ('convnext_tiny', {}, 224, 'map', 0, [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7), (768,)]),
    ('deit_tiny_patch16_224', {}, 224, 'tokens', 1, [(197, 192)] * 4 + [(192,)]),
    ('vit_small_patch16_224', {}, 224, 'tokens', 1, [(197, 384)] * 4 + [(384,)]),
    ('swin_tiny_patch4_window7_224', {}, 224, 'tokens', 0,
     [(3136, 96), (784, 192), (196, 384), (49, 768), (768,)]),
    ('mixer_b16_224', {}, 224, 'tokens', 0, [(196, 768)] * 4 + [(768,)]),
    ('resmlp_12_224', {}, 224, 'tokens', 0, [(196, 384)] * 4 + [(384,)]),
    ('swin_nano_patch4_window7_224', {}, 224, 'tokens', 0,
     [(3136, 64), (784, 128), (196, 256), (49, 512), (512,)]),
    ('swin_pico_patch4_window7_224', {}, 224, 'tokens', 0,
     [(3136, 48), (784, 96), (196, 192), (49, 384), (384,)]),
]

# The same families at small inputs, as the distiller tests use them.
SMALL_TABLE = [
    ('resnet18', {}, 64, 'map', 0, [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512,)]),
    ('mobilenetv2_100', {}, 64, 'map', 0, [(24, 16, 16), (32, 8, 8), (96, 4, 4), (1280, 2, 2), (1280,)]),
    ('convnext_tiny', {}, 64, 'map', 0, [(96, 16, 16), (192, 8, 8), (384, 4, 4), (768, 2, 2), (768,)]),
    ('deit_tiny_patch16_224', {'img_size': 32}, 32, 'tokens', 1, [(5, 192)] * 4 + [(192,)]),
    ('vit_small_patch16_224', {'img_size': 64}, 64, 'tokens', 1, [(17, 384)] * 4 + [(384,)]),
    ('swin_tiny_patch4_window7_224', {'img_size': 64, 'window_size': 4}, 64, 'tokens', 0,
     [(256, 96), (64, 192), (16, 384), (4, 768), (768,)]),
    ('swin_nano_patch4_window7_224', {'img_size': 64, 'window_size': 4}, 64, 'tokens', 0,
     [(256, 64), (64, 128), (16, 256), (4, 512), (512,)]),
    ('mixer_s16_224', {'img_size': 64}, 64, 'tokens', 0, [(16, 512)] * 4 + [(512,)]),
    ('resmlp_12_224', {'img_size': 64}, 64, 'tokens', 0, [(16, 384)] * 4 + [(384,)]),
    ('demo_vit_teacher', {}, 32, 'tokens', 1, [(17, 96)] * 4 + [(96,)]),
    ('demo_vit_teacher', {'class_token': False, 'global_pool': 'avg'}, 32, 'tokens', 0, [(16, 96)] * 4 + [(96,)]),
    ('demo_vit_teacher', {'reg_tokens': 4}, 32, 'tokens', 5, [(21, 96)] * 4 + [(96,)]),
    ('demo_resnet_student', {}, 32, 'map', 0, [(16, 8, 8), (32, 4, 4), (64, 2, 2), (128, 1, 1), (128,)]),
]


pytestmark = pytest.mark.usefixtures('one_thread')


def create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def check_contract(model, img_size, fmt, prefix, shapes, input_size=None):
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        expected_logits = model(x)
        logits, feats = forward_features(model, x)
    assert len(feats) == 5
    assert [tuple(f.shape[1:]) for f in feats] == shapes
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    assert [stage_info(model, k, input_size) for k in (1, 2, 3, 4, -1)] == shapes
    assert feature_format(model) == fmt
    assert num_prefix_tokens(model) == prefix
    assert embedding_dim(model) == shapes[-1][0]


@pytest.mark.parametrize('name, kwargs, img_size, fmt, prefix, shapes', SPEC_TABLE,
                         ids=[r[0] for r in SPEC_TABLE])
def test_spec_table_at_224(name, kwargs, img_size, fmt, prefix, shapes):
    check_contract(create(name, **kwargs), img_size, fmt, prefix, shapes)


@pytest.mark.parametrize('name, kwargs, img_size, fmt, prefix, shapes', SMALL_TABLE,
                         ids=[f'{r[0]}-{i}' for i, r in enumerate(SMALL_TABLE)])
def test_small_inputs(name, kwargs, img_size, fmt, prefix, shapes):
    # Models built for the size (patch models via img_size, the demo models by default) know it;
    # the CNNs at 64 px are told.
    input_size = None if kwargs or name.startswith('demo_') else img_size
    check_contract(create(name, **kwargs), img_size, fmt, prefix, shapes, input_size)


def test_stage_info_input_size_forms():
    model = create('resnet18')
    assert stage_info(model, 2) == (128, 28, 28)  # pretrained_cfg input size: 224
    assert stage_info(model, 2, 64) == stage_info(model, 2, (64, 64)) == (128, 8, 8)
    assert stage_info(model, 2, (3, 64, 64)) == (128, 8, 8)
    assert stage_info(create('resnet18', in_chans=1), 4, 32) == (512, 1, 1)
    with pytest.raises(ValueError, match='stage k'):
        stage_info(model, 0)


def test_stage_info_keeps_modes_and_batchnorm_statistics():
    model = create('demo_resnet_student').train()
    model.layer1.eval()  # e.g. a frozen part: must stay in eval mode
    running_mean = model.bn1.running_mean.clone()
    assert stage_info(model, 1) == (16, 8, 8)
    assert model.training and model.layer2.training and not model.layer1.training
    torch.testing.assert_close(model.bn1.running_mean, running_mean, rtol=0, atol=0)


def outputs_of(model, module_names, x):
    """Reference features: outputs of the named modules during a plain forward."""
    caught = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: caught.__setitem__(name, output)) for name in module_names]
    model(x)
    for handle in handles:
        handle.remove()
    return [caught[name] for name in module_names]


# What each stage and embedding is, per SPEC.md 2.1: name, kwargs, input size, the modules whose outputs
# are stages 1..4, and the embedding computed from stage 4 by hand.
MEANINGS = [
    ('resnet18', {}, 64, ['layer1', 'layer2', 'layer3', 'layer4'],
     lambda model, last: last.mean(dim=(2, 3))),
    # blocks.1, .2, .4 end the stride 4, 8, 16 stages; bn2 closes conv_head (norm and activation).
    ('mobilenetv2_100', {}, 64, ['blocks.1', 'blocks.2', 'blocks.4', 'bn2'],
     lambda model, last: last.mean(dim=(2, 3))),
    ('convnext_tiny', {}, 64, ['stages.0', 'stages.1', 'stages.2', 'stages.3'],
     lambda model, last: model.head.norm(last.mean(dim=(2, 3), keepdim=True)).flatten(1)),
    ('deit_tiny_patch16_224', {'img_size': 32}, 32, ['blocks.1', 'blocks.3', 'blocks.9', 'blocks.11'],
     lambda model, last: model.norm(last)[:, 0]),
    # Depth 6: blocks 1, 2, 5, 6.
    ('demo_vit_teacher', {}, 32, ['blocks.0', 'blocks.1', 'blocks.4', 'blocks.5'],
     lambda model, last: model.norm(last)[:, 0]),
    # timm's Swin stages merge patches at their start, so a stage output is the pre-downsampling one.
    ('swin_nano_patch4_window7_224', {'img_size': 64, 'window_size': 4}, 64,
     ['layers.0', 'layers.1', 'layers.2', 'layers.3'],
     lambda model, last: model.norm(last).mean(dim=1)),
    ('resmlp_12_224', {'img_size': 64}, 64, ['blocks.1', 'blocks.3', 'blocks.9', 'blocks.11'],
     lambda model, last: model.norm(last).mean(dim=1)),
]


@pytest.mark.parametrize('name, kwargs, img_size, stage_modules, embedding_of', MEANINGS,
                         ids=[f'{r[0]}-{i}' for i, r in enumerate(MEANINGS)])
def test_stages_and_embedding_are_what_the_spec_names(name, kwargs, img_size, stage_modules, embedding_of):
    model, x = create(name, **kwargs), torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        _, feats = forward_features(model, x)
        for feature, expected in zip(feats, outputs_of(model, stage_modules, x)):
            if feature_format(model) == 'tokens' and expected.dim() == 4:
                expected = expected.flatten(1, 2)  # Swin's NHWC stage output
            torch.testing.assert_close(feature, expected)
        torch.testing.assert_close(feats[-1], embedding_of(model, feats[3]))


def test_isotropic_stage_blocks():
    assert isotropic_stage_blocks(12) == [2, 4, 10, 12]
    assert isotropic_stage_blocks(6) == [1, 2, 5, 6]
    assert isotropic_stage_blocks(24) == [4, 8, 20, 24]
    assert isotropic_stage_blocks(4) == [1, 2, 3, 4]
    for depth in range(4, 49):
        blocks = isotropic_stage_blocks(depth)
        assert 1 <= blocks[0] < blocks[1] < blocks[2] < blocks[3] == depth
    with pytest.raises(ValueError, match='at least 4 blocks'):
        isotropic_stage_blocks(3)


def test_distilled_deit_logits_and_both_prefix_tokens():
    model = create('deit_tiny_distilled_patch16_224', img_size=32)
    check_contract(model, 32, 'tokens', 2, [(6, 192)] * 4 + [(192,)])


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(
            *[nn.Conv2d(3 if i == 0 else 8, 8, 3, stride=2, padding=1) for i in range(4)])
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


def test_unknown_family_is_a_clear_error_and_a_hook_adapter_adds_it():
    model = TinyNet()
    with pytest.raises(UnsupportedModelError, match=r'TinyNet.*register_adapter\(TinyNet\)'):
        forward_features(model, torch.randn(1, 3, 32, 32))
    assert issubclass(UnsupportedModelError, ValueError)

    @register_adapter(TinyNet)
    class TinyNetAdapter(HookAdapter):
        stage_modules = ('blocks.0', 'blocks.1', 'blocks.2', 'blocks.3')
        classifier_module = 'fc'

    x = torch.randn(2, 3, 32, 32)
    logits, feats = forward_features(model, x)
    torch.testing.assert_close(logits, model(x))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 16, 16), (8, 8, 8), (8, 4, 4), (8, 2, 2), (8,)]
    assert stage_info(model, 3, (3, 32, 32)) == (8, 4, 4) and embedding_dim(model) == 8


def test_hook_adapter_must_name_its_modules():
    with pytest.raises(ValueError, match='four stage_modules and a classifier_module'):
        @register_adapter(TinyNet)
        class IncompleteAdapter(HookAdapter):
            stage_modules = ('blocks.0', 'blocks.1', 'blocks.2', 'blocks.3')


def test_wrapped_model_is_refused():
    with pytest.raises(UnsupportedModelError, match='unwrapped model'):
        forward_features(nn.DataParallel(create('demo_resnet_student')), torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize('name, kwargs, img_size', [
    ('demo_resnet_student', {}, 32),
    ('mobilenetv2_100', {}, 32),
    ('demo_vit_teacher', {}, 32),
    ('swin_pico_patch4_window7_224', {'img_size': 32, 'window_size': 2}, 32),
    ('mixer_s16_224', {'img_size': 32}, 32),
])
def test_gradients_flow_in_train_mode(name, kwargs, img_size):
    model = create(name, **kwargs).train()
    x = torch.randn(2, 3, img_size, img_size)
    # The same seed draws the same stochastic depth (Swin's default drop_path_rate is 0.1); batch norm
    # uses the statistics of the same batch in both calls.
    torch.manual_seed(1)
    expected_logits = model(x)
    torch.manual_seed(1)
    logits, feats = forward_features(model, x)
    torch.testing.assert_close(logits, expected_logits)
    first_weight = next(model.parameters())
    for feature in feats:
        model.zero_grad()
        feature.pow(2).mean().backward(retain_graph=True)
        assert first_weight.grad is not None and first_weight.grad.abs().sum() > 0


def test_token_helpers():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 prefix + 2x2 patches, D = 3
    prefix, patches = split_prefix_tokens(tokens, 1)
    assert prefix.shape == (2, 1, 3) and patches.shape == (2, 4, 3)
    torch.testing.assert_close(strip_prefix_tokens(tokens, 1), patches)
    fmap = tokens_to_map(tokens, num_prefix=1)
    assert fmap.shape == (2, 3, 2, 2)
    # Row-major grid: patch token n sits at (n // W, n % W).
    torch.testing.assert_close(fmap[:, :, 1, 0], patches[:, 2])
    torch.testing.assert_close(map_to_tokens(fmap), patches)
    assert tokens_to_map(patches).shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match='square grid'):
        tokens_to_map(tokens)  # 5 tokens without stripping the class token


def test_vit_tokens_round_trip_to_timm_nchw_layout():
    model, x = create('deit_tiny_patch16_224', img_size=64), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, feats = forward_features(model, x)
        timm_maps = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    torch.testing.assert_close(tokens_to_map(feats[0], num_prefix_tokens(model)), timm_maps[0])


def test_custom_and_demo_models_build_through_timm():
    assert {'swin_nano_patch4_window7_224', 'swin_pico_patch4_window7_224',
            'demo_vit_teacher', 'demo_resnet_student'} <= set(timm.list_models())
    nano = create('swin_nano_patch4_window7_224', num_classes=100, drop_path_rate=0.1)
    assert (nano.embed_dim, nano.num_classes) == (64, 100)
    assert [stage.blocks[0].attn.num_heads for stage in nano.layers] == [2, 4, 8, 16]
    assert [len(stage.blocks) for stage in nano.layers] == [2, 2, 2, 2]
    assert create('swin_pico_patch4_window7_224').embed_dim == 48

    teacher = create('demo_vit_teacher')
    assert (teacher.num_classes, len(teacher.blocks), teacher.embed_dim, teacher.patch_embed.img_size) == (
        10, 6, 96, (32, 32))
    assert (teacher.blocks[0].attn.num_heads, teacher.blocks[0].mlp.fc1.out_features) == (3, 192)
    assert teacher.pretrained_cfg['input_size'] == (3, 32, 32)
    assert create('demo_vit_teacher', depth=4, num_classes=3).num_classes == 3
    student = create('demo_resnet_student')
    assert (student.num_classes, student.bn1.num_features, student.num_features) == (10, 16, 128)

    for name in ('swin_nano_patch4_window7_224', 'swin_pico_patch4_window7_224',
                 'demo_vit_teacher', 'demo_resnet_student'):
        with pytest.raises(ValueError, match='no published pretrained weights'):
            timm.create_model(name, pretrained=True)
