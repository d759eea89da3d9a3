"""The small models of the embedded demo (README.md, "The embedded demo"): scikit-learn's 8x8 digits upsampled to 32x32,
10 classes, trained from scratch on two CPU cores in about a minute.

The mean and std are those of the digit pixels scaled to [0, 1] (value / 16) and bilinearly upsampled,
the same for the three channels of the grey image.
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer

from ._build import build_from_scratch

DIGITS_MEAN = (0.305, 0.305, 0.305)
DIGITS_STD = (0.324, 0.324, 0.324)


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': None,
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': DIGITS_MEAN, 'std': DIGITS_STD, **kwargs,
    }


# timm's register_model reads the pretrained cfgs from this module-level name.
default_cfgs = generate_default_cfgs({
    'demo_vit_teacher': _cfg(fixed_input_size=True, first_conv='patch_embed.proj', classifier='head'),
    'demo_resnet_student': _cfg(pool_size=(1, 1), first_conv='conv1.0', classifier='fc'),
})


@register_model
def demo_vit_teacher(pretrained=False, **kwargs) -> VisionTransformer:
    """ViT for 32 px: patch 8 (a 4x4 grid plus a class token: each patch is 2x2 pixels of the 8x8 digit),
    width 96, 6 blocks of 3 heads, MLP ratio 2. Patch 4 trained no better on the digits, at four times the cost."""
    model_args = dict(
        img_size=32, patch_size=8, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.,
        class_token=True, global_pool='token')
    return build_from_scratch(VisionTransformer, 'demo_vit_teacher', pretrained, **dict(model_args, **kwargs))


@register_model
def demo_resnet_student(pretrained=False, **kwargs) -> ResNet:
    """ResNet with one BasicBlock per stage, channels 16-32-64-128 and a 16-channel stem.

    timm's single 7x7 stem conv is fixed at 64 channels; its 'deep' stem (3x3 convs of widths stem_width,
    stem_width, 2 * stem_width) is the one whose width can be set, so stem_width 8 gives the 16 channels
    that layer1 takes. The stem (stride 2, then max pool) takes 32 px to 8x8, the digits' own
    resolution, so the stages are 8x8, 4x4, 2x2 and 1x1.
    """
    model_args = dict(
        block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_type='deep', stem_width=8)
    return build_from_scratch(ResNet, 'demo_resnet_student', pretrained, **dict(model_args, **kwargs))
