"""Feature extraction for distillation (docs/features.md): logits, four stage features and the pooled
pre-logits embedding of any supported model from one forward pass.

    from custom_forward import forward_features, stage_info
    logits, feats = forward_features(model, x)   # feats[0..3] stages 1..4, feats[-1] embedding [B, D]
    stage_info(model, 2)                         # (C, H, W) for maps, (L, D) for tokens; -1 -> (D,)

Distillers read model features only through this package. Any timm model with `forward_intermediates`
goes through one general rule (`adapters.GeneralAdapter`); `timm_adapters` holds the few explicit
adapters that remain and says why; `adapters` holds the registry and the base classes for adding a
backbone without `forward_intermediates`.
"""
from . import timm_adapters  # noqa: F401  (registers the explicit adapters)
from .adapters import (
    FeatureAdapter,
    GeneralAdapter,
    HookAdapter,
    IntermediatesAdapter,
    UnsupportedModelError,
    get_adapter,
    isotropic_stage_blocks,
    register_adapter,
)
from .features import embedding_dim, feature_format, forward_features, num_prefix_tokens, stage_info
from .tokens import map_to_tokens, split_prefix_tokens, strip_prefix_tokens, tokens_to_map

__all__ = [
    'FeatureAdapter', 'GeneralAdapter', 'HookAdapter', 'IntermediatesAdapter', 'UnsupportedModelError', 'embedding_dim',
    'feature_format', 'forward_features', 'get_adapter', 'isotropic_stage_blocks', 'map_to_tokens',
    'num_prefix_tokens', 'register_adapter', 'split_prefix_tokens', 'stage_info', 'strip_prefix_tokens',
    'tokens_to_map',
]
