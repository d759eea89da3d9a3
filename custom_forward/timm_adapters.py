"""The explicit adapters: the timm families whose docs/features.md features the general rule does not give.

Every other timm model goes through `GeneralAdapter` (adapters.py); for the families of the docs/features.md table it
gives exactly the table's features:

| family | stages 1..4 by the general rule | embedding |
|---|---|---|
| ResNet | last four of stem, layer1..layer4: layer1..layer4 | global average pool |
| ConvNeXt | the four stage outputs | head-normed pool |
| VisionTransformer (ViT, DeiT, DeiT-distilled) | blocks 2, 4, 10, 12 as tokens, prefix tokens kept | normed class token |
| SwinTransformer | the four stage outputs, before downsampling, as tokens | mean of the normed tokens |
| MlpMixer (MLP-Mixer, ResMLP) | blocks 2, 4, 10, 12 as tokens | mean of the normed tokens |

One family keeps an adapter of its own:

- EfficientNet (MobileNetV2, EfficientNet, MNASNet, ...): the documented stage 4 is the 1280-channel map after
  conv_head, which forward_intermediates does not offer as a level (its last level is the 320-channel
  output of the last block), but returns as the final features.
"""
from timm.models.efficientnet import EfficientNet

from .adapters import IntermediatesAdapter, register_adapter


@register_adapter(EfficientNet)
class EfficientNetAdapter(IntermediatesAdapter):
    def stages(self, model, x):
        # Feature indices 1..3 are the ends of the stride-4, 8 and 16 stages; the final features are the
        # stride-32 map after conv_head and bn2 (1280 channels for MobileNetV2), used as stage 4.
        final, stage_features = model.forward_intermediates(x, indices=[1, 2, 3])
        return final, [*stage_features, final]
