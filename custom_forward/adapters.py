"""Adapters: how a model gives its four stage features and its pooled embedding.

`get_adapter` looks up the model's class (walking its MRO, so subclasses inherit their parent's
adapter) in a small registry of explicit adapters. A model with none uses `GeneralAdapter`, one rule
for every model with timm's `forward_intermediates` and `forward_head`. `HookAdapter` is the base for
models that lack them: subclass it and register it with `@register_adapter(YourModelClass)` (see
"Adding a backbone" in README.md).
"""
import inspect
import weakref
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from .tokens import map_to_tokens

FEATURE_FORMATS = ('map', 'tokens')

_ADAPTERS: Dict[type, 'FeatureAdapter'] = {}


class UnsupportedModelError(ValueError):
    """No feature adapter is registered for the model's class (nor for any of its base classes)."""


class FeatureAdapter:
    """One model family's answer to "which tensors are stages 1..4, and what is the embedding".

    Subclasses set `format` ('map': [B, C, H, W], 'tokens': [B, L, D]) and implement `forward`.
    The other methods have defaults that suit timm models.
    """

    format = 'map'

    def forward(self, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Logits exactly as `model(x)` gives them, and [stage1, stage2, stage3, stage4, embedding]."""
        raise NotImplementedError

    def feature_format(self, model: nn.Module) -> str:
        return self.format

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def embedding_dim(self, model: nn.Module) -> int:
        # timm's name for the width of the pre-logits features, the input of the classifier.
        return model.head_hidden_size

    def image_size(self, model: nn.Module) -> Tuple[int, int]:
        """The (H, W) the model was configured for; used when `stage_info` is given no input size.

        A model built for another size than its pretrained_cfg says (`img_size=64`) records it on itself or
        its patch embedding; timm keeps the pretrained_cfg as it was.
        """
        for module in model.modules():
            size = getattr(module, 'img_size', None)
            if size is not None:
                return to_2tuple(size)
        cfg = getattr(model, 'pretrained_cfg', None)
        if not cfg or 'input_size' not in cfg:
            raise ValueError(
                f"{type(model).__name__} has no pretrained_cfg['input_size'] to take its image size from; "
                "pass input_size=(C, H, W)")
        return tuple(cfg['input_size'][1:])


class IntermediatesAdapter(FeatureAdapter):
    """For timm models: stages from `forward_intermediates`, embedding and logits from `forward_head`."""

    def stages(self, model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The final features (what `forward_features` returns) and the four stage features."""
        raise NotImplementedError

    def head(self, model: nn.Module, final: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits and embedding from the final features, both from the model's own `forward_head`.

        The head runs twice (a pool, a norm or 1x1 conv and a linear layer: cheap next to the trunk) because
        the classifier applied to the pre-logits is not always `model(x)`: distilled heads (DeiT,
        EfficientFormer, LeViT, PiT) average two classifiers in eval mode, and some heads (MobileNetV3) apply
        dropout after the pre-logits. Logits come first so that they draw the same random numbers as
        `model(x)`; with head dropout in train mode the embedding has its own dropout mask.
        """
        logits = model.forward_head(final)
        return logits, model.forward_head(final, pre_logits=True)

    def forward(self, model, x):
        final, stage_features = self.stages(model, x)
        logits, embedding = self.head(model, final)
        return logits, [*stage_features, embedding]


class HookAdapter(FeatureAdapter):
    """Fallback for models without `forward_intermediates`: runs the model's own forward once.

    Stage features are the outputs of the four modules named in `stage_modules`, caught by forward
    hooks; the embedding is the input of the module named `classifier_module`. A stage output that a
    later module modifies in place would be seen modified, so name modules whose outputs are not reused
    that way (block or stage outputs are fine).
    """

    stage_modules: Sequence[str] = ()
    classifier_module: str = ''

    def __init__(self):
        # Checked here, at registration: an empty name would silently hook the whole model.
        if len(self.stage_modules) != 4 or not self.classifier_module:
            raise ValueError(
                f"{type(self).__name__} must name four stage_modules and a classifier_module, got "
                f"{tuple(self.stage_modules)} and {self.classifier_module!r}")

    def forward(self, model, x):
        caught = {}

        def keep_output(name):
            return lambda module, args, output: caught.__setitem__(name, output)

        handles = [model.get_submodule(name).register_forward_hook(keep_output(name))
                   for name in self.stage_modules]
        handles.append(model.get_submodule(self.classifier_module).register_forward_pre_hook(
            lambda module, args: caught.__setitem__('embedding', args[0])))
        try:
            logits = model(x)
        finally:
            for handle in handles:
                handle.remove()
        return logits, [caught[name] for name in self.stage_modules] + [caught['embedding']]

    def embedding_dim(self, model):
        return model.get_submodule(self.classifier_module).in_features


class Layout(NamedTuple):
    """What the probe of `GeneralAdapter` found out about one model."""
    num_levels: int            # feature levels forward_intermediates offers
    isotropic: bool            # all levels of one shape (ViT, EVA, BEiT, Mixer) rather than stages
    level_indices: List[int]   # 0-based levels used as stages 1..4 (the first may repeat)
    tokens: bool               # the model works on tokens, so its stage features are given as tokens
    num_prefix_tokens: int     # class, distillation and register tokens leading each token stage
    embedding_dim: int
    head_norms: List[str]      # modules with running statistics that the pre-logits part of the head runs
    intermediates_kwargs: Dict  # for forward_intermediates: prefix tokens returned where the model has them


class GeneralAdapter(IntermediatesAdapter):
    """The rule for any model with timm's `forward_intermediates` and `forward_head` and no adapter of its own.

    - Stages: an isotropic model's levels (blocks) are taken by `isotropic_stage_blocks` (blocks 2, 4, 10,
      12 of 12); a hierarchical model gives its last four levels (timm counts a stride-2 stem as a level,
      so ResNet's are layer1..layer4). A model with fewer than four levels (LeViT, PiT, EfficientViT-M
      have three stages) repeats its first level in the missing early slots: stages 1..4 = levels
      1, 1, 2, 3; the branches of stages 1 and 2 then read the same, earliest feature.
    - Format: tokens when the model works on tokens, i.e. its final features (what `forward_features`
      returns) are [B, L, D] or it declares timm's channels-last `output_fmt = 'NHWC'` (Swin); maps otherwise.
      Token stages of an isotropic model keep their prefix tokens (class, distillation, registers) first;
      hierarchical token stages are the patch tokens of timm's NCHW maps, row-major.
    - Embedding and logits: from `forward_head` (see `IntermediatesAdapter.head`). Where the pre-logits
      part of the head has batch norm (MobileNetV4's norm_head), the second head call in train mode leaves
      its running statistics as the first call left them, so they are updated once per step, as by `model(x)`.

    Everything size-independent (levels, format, prefix count, embedding width) comes from one probe per
    model: a batch-1 forward of zeros in eval mode without gradients, cached while the model lives.
    """

    def __init__(self):
        self._layouts = weakref.WeakKeyDictionary()

    def layout(self, model: nn.Module, x: Optional[torch.Tensor] = None) -> Layout:
        """The model's layout, probed on the first call (at the size of `x` if given, else the model's own)."""
        if model not in self._layouts:
            self._layouts[model] = self._probe(model, x)
        return self._layouts[model]

    def feature_format(self, model):
        return 'tokens' if self.layout(model).tokens else 'map'

    def num_prefix_tokens(self, model):
        return self.layout(model).num_prefix_tokens

    def embedding_dim(self, model):
        return self.layout(model).embedding_dim

    def head(self, model, final):
        logits = model.forward_head(final)
        if not model.training or not self.layout(model).head_norms:
            return logits, model.forward_head(final, pre_logits=True)
        statistics = [(buffer, buffer.clone()) for name in self.layout(model).head_norms
                      for buffer in model.get_submodule(name).buffers()]
        embedding = model.forward_head(final, pre_logits=True)
        with torch.no_grad():
            for buffer, value in statistics:
                buffer.copy_(value)
        return logits, embedding

    def stages(self, model, x):
        layout = self.layout(model, x)
        wanted = sorted(set(layout.level_indices))
        final, levels = model.forward_intermediates(x, indices=wanted, **layout.intermediates_kwargs)
        features = dict(zip(wanted, (self._as_feature(level, layout.tokens) for level in levels)))
        return final, [features[index] for index in layout.level_indices]

    @staticmethod
    def _as_feature(level: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], tokens: bool) -> torch.Tensor:
        # timm gives each level as an NCHW map, paired with its prefix tokens [B, P, D] where there are any.
        feature_map, prefix = level if isinstance(level, tuple) else (level, None)
        if not tokens:
            return feature_map
        patch_tokens = map_to_tokens(feature_map)
        return torch.cat((prefix, patch_tokens), dim=1) if prefix is not None else patch_tokens

    def _probe(self, model: nn.Module, x: Optional[torch.Tensor]) -> Layout:
        if 'pre_logits' not in inspect.signature(model.forward_head).parameters:
            raise UnsupportedModelError(
                f"{type(model).__name__}.forward_head takes no pre_logits argument, so the pooled embedding "
                "cannot be read from it; register a HookAdapter for it (see 'Adding a backbone' in README.md)")
        if x is not None:
            probe = torch.zeros_like(x[:1])
        else:
            parameter = next(model.parameters(), None)
            probe = torch.zeros(1, *full_input_size(model, None),
                                device=parameter.device if parameter is not None else None,
                                dtype=parameter.dtype if parameter is not None else None)
        # Models with prefix tokens (ViT, EVA, BEiT) drop them from the levels unless asked to return them.
        accepts_prefix = 'return_prefix_tokens' in inspect.signature(model.forward_intermediates).parameters
        intermediates_kwargs = {'return_prefix_tokens': True} if accepts_prefix else {}
        head_norms = []
        hooks = [module.register_forward_hook(lambda *args, name=name: head_norms.append(name))
                 for name, module in model.named_modules() if getattr(module, 'track_running_stats', False)]
        try:
            with eval_mode(model), torch.no_grad():
                final, levels = model.forward_intermediates(probe, **intermediates_kwargs)
                head_norms.clear()
                embedding = model.forward_head(final, pre_logits=True)
        except (RuntimeError, AssertionError) as e:
            if x is not None:
                raise
            # Models built for another image size than their pretrained_cfg names, that record it nowhere
            # (timm's LeViT, EfficientFormer-V2), cannot run at the guessed size.
            raise ValueError(
                f"could not probe {type(model).__name__} at {tuple(probe.shape[1:])}, the input size its "
                f"pretrained_cfg names ({type(e).__name__}: {str(e).splitlines()[0][:120]}); if it was built for "
                "another size, set model.pretrained_cfg['input_size'] to it, or call "
                "stage_info(model, 1, input_size) first") from None
        finally:
            for hook in hooks:
                hook.remove()
        if not levels:
            raise UnsupportedModelError(f"{type(model).__name__}.forward_intermediates offers no feature levels")
        shapes = [tuple((level[0] if isinstance(level, tuple) else level).shape) for level in levels]
        num_levels = len(levels)
        isotropic = num_levels >= 4 and len(set(shapes)) == 1
        if isotropic:
            level_indices = [block - 1 for block in isotropic_stage_blocks(num_levels)]
        elif num_levels >= 4:
            level_indices = list(range(num_levels - 4, num_levels))
        else:
            level_indices = [0] * (5 - num_levels) + list(range(1, num_levels))
        tokens = final.dim() == 3 or getattr(model, 'output_fmt', None) == 'NHWC'
        prefix = levels[0][1].shape[1] if isinstance(levels[0], tuple) and tokens and isotropic else 0
        return Layout(num_levels, isotropic, level_indices, tokens, prefix, embedding.shape[-1],
                      list(dict.fromkeys(head_norms)), intermediates_kwargs)


def register_adapter(*model_classes: type):
    """Class decorator: register an instance of the decorated adapter for each of `model_classes`."""
    def register(adapter_class: Type[FeatureAdapter]) -> Type[FeatureAdapter]:
        adapter = adapter_class()
        if adapter.format not in FEATURE_FORMATS:
            raise ValueError(
                f"{adapter_class.__name__}.format is {adapter.format!r}; expected one of {FEATURE_FORMATS}")
        for model_class in model_classes:
            _ADAPTERS[model_class] = adapter
        return adapter_class
    return register


def get_adapter(model: nn.Module) -> FeatureAdapter:
    """The adapter registered for the model's class or its nearest registered base class; else, for a model
    with timm's `forward_intermediates` and `forward_head`, the general rule."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        # Reading features from `.module` would bypass the wrapper's forward and with it DDP's gradient
        # bookkeeping, so refuse rather than unwrap silently.
        raise UnsupportedModelError(
            f"got a {type(model).__name__} wrapper; pass the unwrapped model (`.module`) and wrap the "
            "distiller, not the student, in DDP")
    for model_class in type(model).__mro__:
        if model_class in _ADAPTERS:
            return _ADAPTERS[model_class]
    if hasattr(model, 'forward_intermediates') and hasattr(model, 'forward_head'):
        return GENERAL_ADAPTER
    raise UnsupportedModelError(
        f"custom_forward does not know how to read stage features from {type(model).__module__}."
        f"{type(model).__name__}: it has no timm forward_intermediates/forward_head. Add a small HookAdapter "
        f"for it in custom_forward/ naming its four stage modules and its classifier, and register it with "
        f"@register_adapter({type(model).__name__}); see 'Adding a backbone' in README.md")


def isotropic_stage_blocks(depth: int) -> List[int]:
    """1-based numbers of the blocks used as stages 1..4 of an isotropic model with `depth` blocks.

    Blocks 2, 4, 10, 12 at depth 12 (the reference code bases); for other depths
    round(depth * b / 12) for b in 2, 4, 10, and the last block, nudged up where rounding would make
    two stages share a block.
    """
    if depth < 4:
        raise ValueError(
            f"an isotropic model needs at least 4 blocks to give 4 distinct stages, got depth {depth}")
    blocks = [round(depth * b / 12) for b in (2, 4, 10)] + [depth]
    for i in range(4):
        blocks[i] = max(blocks[i], blocks[i - 1] + 1 if i else 1)
    return blocks


GENERAL_ADAPTER = GeneralAdapter()


class eval_mode:
    """Context manager: the model in eval mode (batch norm neither fails on batch 1 nor updates its running
    statistics), each module's flag restored on exit, as a model may hold some submodules in eval mode."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc_info):
        for module, training in self.modes:
            module.training = training


def full_input_size(model: nn.Module, input_size) -> Tuple[int, int, int]:
    """(C, H, W) from an int image size, (H, W), (C, H, W) or None (the size the model was built for)."""
    if input_size is None:
        input_size = get_adapter(model).image_size(model)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if len(input_size) == 2:
        input_size = (_input_channels(model), *input_size)
    return tuple(int(size) for size in input_size)


def _input_channels(model: nn.Module) -> int:
    # The first conv knows the channel count even when the model was built with another in_chans than
    # its pretrained_cfg's input_size says.
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    first_conv = cfg.get('first_conv')
    if isinstance(first_conv, str):
        return model.get_submodule(first_conv).in_channels
    if 'input_size' in cfg:
        return cfg['input_size'][0]
    raise ValueError(f"cannot tell the input channels of {type(model).__name__}; pass input_size=(C, H, W)")
