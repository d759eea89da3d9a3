"""The feature contract of docs/features.md: logits, four stage features and the embedding from one pass."""
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .adapters import eval_mode, full_input_size, get_adapter

InputSize = Union[int, Sequence[int]]

# model -> {(C, H, W): [shape of stage 1..4 and of the embedding, without batch]}; weak so that the
# cache never keeps a model alive.
_FEATURE_SHAPES = weakref.WeakKeyDictionary()


def forward_features(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Run `model` once on `x`; return its logits and five features.

    `logits` are those of `model(x)` (same weights, same mode). `feats[0..3]` are stages 1..4, maps
    [B, C, H, W] or tokens [B, L, D] (see `feature_format`; tokens include `num_prefix_tokens(model)`
    prefix tokens first), and `feats[4]` (= `feats[-1]`) is the pooled pre-logits embedding [B, D].
    Works in train and eval mode and with autograd. Features may be non-contiguous views (Swin's
    tokens are): use `reshape`, not `view`, on them.
    """
    return get_adapter(model).forward(model, x)


def feature_format(model: nn.Module) -> str:
    """'map' if the stage features are [B, C, H, W], 'tokens' if they are [B, L, D]."""
    return get_adapter(model).feature_format(model)


def num_prefix_tokens(model: nn.Module) -> int:
    """Number of prefix (class, distillation, register) tokens leading each token stage feature."""
    return get_adapter(model).num_prefix_tokens(model)


def embedding_dim(model: nn.Module) -> int:
    """Width D of the pooled pre-logits embedding `feats[-1]`."""
    return get_adapter(model).embedding_dim(model)


def stage_info(model: nn.Module, k: int, input_size: Optional[InputSize] = None) -> Tuple[int, ...]:
    """Shape without the batch of stage k (1..4): (C, H, W) for maps, (L, D) for tokens; k = -1: (D,).

    `input_size` is (C, H, W), (H, W) or an int image size; by default the size the model was built for
    (its patch embedding's img_size, else its pretrained_cfg). The shapes come from one batch-1 forward
    in eval mode without gradients, cached per model and input size; the model's modes are restored.
    """
    if k not in (1, 2, 3, 4, -1):
        raise ValueError(f"stage k must be 1, 2, 3, 4 or -1 (the embedding), got {k}")
    shapes = _feature_shapes(model, full_input_size(model, input_size))
    return shapes[k - 1] if k > 0 else shapes[-1]


def _feature_shapes(model: nn.Module, input_size: Tuple[int, int, int]) -> List[Tuple[int, ...]]:
    shapes_by_size = _FEATURE_SHAPES.setdefault(model, {})
    if input_size not in shapes_by_size:
        shapes_by_size[input_size] = _probe_feature_shapes(model, input_size)
    return shapes_by_size[input_size]


def _probe_feature_shapes(model: nn.Module, input_size: Tuple[int, int, int]) -> List[Tuple[int, ...]]:
    parameter = next(model.parameters(), None)
    x = torch.zeros(1, *input_size,
                    device=parameter.device if parameter is not None else None,
                    dtype=parameter.dtype if parameter is not None else None)
    with eval_mode(model), torch.no_grad():
        _, feats = forward_features(model, x)
    return [tuple(feature.shape[1:]) for feature in feats]
