"""Swin-Nano and Swin-Pico, the small Swin students of the OFA-KD and RSD papers.

Both are timm's SwinTransformer with depths 2-2-2-2 and heads 2-4-8-16; only the embedding width differs
(64 for nano, 48 for pico). Keyword arguments (num_classes, img_size, window_size, drop_path_rate, ...)
override the defaults as for timm's own Swin models.
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer

from ._build import build_from_scratch


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head.fc', **kwargs,
    }


# timm's register_model reads the pretrained cfgs from this module-level name.
default_cfgs = generate_default_cfgs({
    'swin_nano_patch4_window7_224': _cfg(),
    'swin_pico_patch4_window7_224': _cfg(),
})


@register_model
def swin_nano_patch4_window7_224(pretrained=False, **kwargs) -> SwinTransformer:
    """Swin-N: embed 64, depths 2-2-2-2, heads 2-4-8-16, 224 px, window 7."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=64, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
    return build_from_scratch(
        SwinTransformer, 'swin_nano_patch4_window7_224', pretrained, **dict(model_args, **kwargs))


@register_model
def swin_pico_patch4_window7_224(pretrained=False, **kwargs) -> SwinTransformer:
    """Swin-P: embed 48, depths 2-2-2-2, heads 2-4-8-16, 224 px, window 7."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16))
    return build_from_scratch(
        SwinTransformer, 'swin_pico_patch4_window7_224', pretrained, **dict(model_args, **kwargs))
