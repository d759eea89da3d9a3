"""The tiny architectures of the old-timm fixtures, built the same way under timm 0.6.5 and today's timm.

Imported by make_checkpoints.py (under timm 0.6.5) and by tests/test_old_timm.py (under today's timm);
it uses only what both versions have.
"""
import contextlib
import sys

import timm

NUM_CLASSES = 10
IMG_SIZE = 32

# family, timm model name, the function of its timm module that builds the model from the entrypoint's
# arguments, the architecture arguments that replace the entrypoint's own (few blocks, narrow), and keyword
# arguments for create_model itself (those the entrypoint accepts).
MODELS = [
    ('Swin', 'swin_tiny_patch4_window7_224', '_create_swin_transformer',
     dict(embed_dim=6, depths=[2, 2, 1, 1], num_heads=[1, 1, 2, 2], window_size=4), {}),
    ('ViT', 'vit_small_patch16_224', '_create_vision_transformer',
     dict(patch_size=8, embed_dim=24, depth=2, num_heads=2), {}),
    ('DeiT distilled', 'deit_tiny_distilled_patch16_224', '_create_deit',
     dict(patch_size=8, embed_dim=24, depth=2, num_heads=2), {}),
    ('BEiT', 'beit_base_patch16_224', '_create_beit',
     dict(patch_size=8, embed_dim=24, depth=2, num_heads=2), {}),
    ('ConvNeXt', 'convnext_tiny', '_create_convnext',
     dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32]), {}),
    ('MLP-Mixer', 'mixer_b16_224', '_create_mixer',
     dict(patch_size=8, num_blocks=2, embed_dim=24), {}),
    ('ResMLP', 'resmlp_12_224', '_create_mixer',
     dict(patch_size=8, num_blocks=2, embed_dim=24), {}),
    ('MobileNetV2', 'mobilenetv2_035', '_create_effnet',
     dict(num_features=64), dict(depth_multiplier=0.1)),
]


@contextlib.contextmanager
def architecture_overrides(name, creator, arch_kwargs):
    """While active, `timm.create_model(name, ...)` builds `name` with `arch_kwargs` in place of the
    entrypoint's own architecture arguments.

    Many entrypoints write `dict(patch_size=16, ..., **kwargs)`, which refuses a repeated key, so the
    overrides cannot be passed to create_model; they are given to the family's builder function instead.
    """
    module = sys.modules[timm.models.model_entrypoint(name).__module__]
    original = getattr(module, creator)

    def create_with_overrides(variant, pretrained=False, **kwargs):
        return original(variant, pretrained=pretrained, **{**kwargs, **arch_kwargs})

    setattr(module, creator, create_with_overrides)
    try:
        yield
    finally:
        setattr(module, creator, original)
