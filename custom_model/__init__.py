"""Extra architectures registered with timm: importing this package makes `timm.create_model(name)`
build them (docs/features.md). None has pretrained weights; each refuses `pretrained=True`.

- `swin_nano_patch4_window7_224`, `swin_pico_patch4_window7_224`: the small Swin students of the papers.
- `demo_vit_teacher`, `demo_resnet_student`: the embedded demo's 32 px models for the digits data.
"""
from .demo import demo_resnet_student, demo_vit_teacher
from .swin import swin_nano_patch4_window7_224, swin_pico_patch4_window7_224

__all__ = [
    'demo_resnet_student', 'demo_vit_teacher', 'swin_nano_patch4_window7_224', 'swin_pico_patch4_window7_224',
]
