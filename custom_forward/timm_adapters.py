"""Adapters for the timm families of docs/features.md, all built on timm's `forward_intermediates`.

| family | stages 1..4 | embedding |
|---|---|---|
| ResNet | outputs of layer1..layer4 | global average pool |
| EfficientNet (MobileNetV2, ...) | last block at stride 4, 8, 16; the map after conv_head | its pool |
| ConvNeXt | the four stage outputs | head-normed pool |
| VisionTransformer (ViT, DeiT) | blocks 2, 4, 10, 12 as tokens, prefix tokens kept | normed class token |
| SwinTransformer | the four stage outputs, before downsampling, as tokens | mean of the normed tokens |
| MlpMixer (MLP-Mixer, ResMLP) | blocks 2, 4, 10, 12 as tokens | mean of the normed tokens |

Isotropic models of another depth use `isotropic_stage_blocks`.
"""
import torch
from timm.models.convnext import ConvNeXt
from timm.models.deit import VisionTransformerDistilled
from timm.models.efficientnet import EfficientNet
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .adapters import IntermediatesAdapter, isotropic_stage_blocks, register_adapter
from .tokens import map_to_tokens


def _require_four_stages(model, num_stages):
    if num_stages != 4:
        raise ValueError(f"{type(model).__name__} has {num_stages} stages; stage features need exactly 4")


def _isotropic_indices(model):
    """0-based block indices for forward_intermediates."""
    return [block - 1 for block in isotropic_stage_blocks(len(model.blocks))]


@register_adapter(ResNet)
class ResNetAdapter(IntermediatesAdapter):
    def stages(self, model, x):
        # forward_intermediates index 0 is the stem; 1..4 are layer1..layer4.
        return model.forward_intermediates(x, indices=[1, 2, 3, 4])


@register_adapter(EfficientNet)
class EfficientNetAdapter(IntermediatesAdapter):
    def stages(self, model, x):
        # Feature indices 1..3 are the ends of the stride-4, 8 and 16 stages; the final features are the
        # stride-32 map after conv_head and bn2 (1280 channels for MobileNetV2), used as stage 4.
        final, stage_features = model.forward_intermediates(x, indices=[1, 2, 3])
        return final, [*stage_features, final]


@register_adapter(ConvNeXt)
class ConvNeXtAdapter(IntermediatesAdapter):
    def stages(self, model, x):
        _require_four_stages(model, len(model.stages))
        return model.forward_intermediates(x, indices=[0, 1, 2, 3])


@register_adapter(VisionTransformer)
class VisionTransformerAdapter(IntermediatesAdapter):
    format = 'tokens'

    def stages(self, model, x):
        final, stage_features = model.forward_intermediates(
            x, indices=_isotropic_indices(model), return_prefix_tokens=True, output_fmt='NLC')
        if model.num_prefix_tokens:
            # timm hands back (patch tokens, prefix tokens) pairs; consumers get them in model order.
            stage_features = [torch.cat((prefix, patch), dim=1) for patch, prefix in stage_features]
        return final, stage_features

    def num_prefix_tokens(self, model):
        return model.num_prefix_tokens

    def image_size(self, model):
        return model.patch_embed.img_size or super().image_size(model)


@register_adapter(VisionTransformerDistilled)
class DistilledVisionTransformerAdapter(VisionTransformerAdapter):
    def head(self, model, final):
        # Two classifiers (class and distillation token) whose outputs forward_head averages, so the
        # logits cannot be one classifier applied to the pre-logits; the head is cheap to run twice.
        return model.forward_head(final), model.forward_head(final, pre_logits=True)


@register_adapter(SwinTransformer)
class SwinTransformerAdapter(IntermediatesAdapter):
    format = 'tokens'

    def stages(self, model, x):
        _require_four_stages(model, len(model.layers))
        # timm's stages downsample at their start, so each stage output is "before downsampling".
        # forward_intermediates gives NCHW; map_to_tokens turns it into [B, H*W, C] without a copy.
        final, stage_features = model.forward_intermediates(x, indices=[0, 1, 2, 3])
        return final, [map_to_tokens(feature) for feature in stage_features]

    def image_size(self, model):
        return model.patch_embed.img_size


@register_adapter(MlpMixer)
class MlpMixerAdapter(IntermediatesAdapter):
    format = 'tokens'

    def stages(self, model, x):
        return model.forward_intermediates(x, indices=_isotropic_indices(model), output_fmt='NLC')

    def image_size(self, model):
        return model.stem.img_size
