"""What every model of this package shares: no published weights exist, so pretrained weights can only
come from a local file (`--pretrained-path`, i.e. a pretrained_cfg with `file` set)."""
from timm.models import build_model_with_cfg


def build_from_scratch(model_class, variant, pretrained, **kwargs):
    """Build `variant` with timm's builder (pretrained_cfg, kwarg defaults); weights only from a local file."""
    local_file = (kwargs.get('pretrained_cfg_overlay') or {}).get('file')
    if pretrained and not local_file:
        raise ValueError(
            f"{variant} has no published pretrained weights (it is trained from scratch); create it with "
            "pretrained=False, or give a checkpoint of your own with --pretrained-path")
    return build_model_with_cfg(model_class, variant, pretrained=pretrained, **kwargs)
