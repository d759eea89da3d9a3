"""Conversions between token features [B, L, D] and feature maps [B, C, H, W] shared by the distillers.

Prefix tokens (class, distillation, register tokens) come first in timm's token layout; their count is
`num_prefix_tokens(model)`. The results may be views of the input: use `reshape`, not `view`, on them.
"""
import math
from typing import Tuple

import torch


def split_prefix_tokens(tokens: torch.Tensor, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, P + N, D] -> (prefix tokens [B, P, D], patch tokens [B, N, D])."""
    return tokens[:, :num_prefix], tokens[:, num_prefix:]


def strip_prefix_tokens(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """[B, P + N, D] -> patch tokens [B, N, D]."""
    return tokens[:, num_prefix:]


def tokens_to_map(tokens: torch.Tensor, num_prefix: int = 0) -> torch.Tensor:
    """Patch tokens of a square grid, [B, P + N, D] -> [B, D, sqrt(N), sqrt(N)], prefix tokens dropped."""
    patch_tokens = strip_prefix_tokens(tokens, num_prefix)
    batch, num_patches, dim = patch_tokens.shape
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"cannot lay {num_patches} patch tokens on a square grid (tokens {tuple(tokens.shape)}, "
            f"num_prefix={num_prefix}); is num_prefix right for this model?")
    return patch_tokens.transpose(1, 2).reshape(batch, dim, side, side)


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C], row-major over the grid as timm's patch tokens are."""
    return feature_map.flatten(2).transpose(1, 2)
