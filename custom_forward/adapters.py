"""Adapters: how each model family gives its four stage features and its pooled embedding.

`forward_features` looks up the model's class (walking its MRO, so subclasses inherit their parent's
adapter) in a small registry. timm families with `forward_intermediates` use `IntermediatesAdapter`;
`HookAdapter` is the fallback for models that lack it. To support a new backbone, subclass one of them
and register it with `@register_adapter(YourModelClass)` (see "Adding a backbone" in README.md).
"""
from typing import Dict, List, Sequence, Tuple, Type

import torch
import torch.nn as nn

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

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def embedding_dim(self, model: nn.Module) -> int:
        # timm's name for the width of the pre-logits features, the input of the classifier.
        return model.head_hidden_size

    def image_size(self, model: nn.Module) -> Tuple[int, int]:
        """The (H, W) the model was configured for; used when `stage_info` is given no input size."""
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
        """Logits and embedding from the final features.

        The embedding is timm's pre-logits output, i.e. exactly what the classifier reads; running the
        classifier on it gives the logits of `model(x)` without pooling or norming twice. In train mode
        with head dropout (`drop_rate`) the embedding is therefore the dropped-out one.
        """
        embedding = model.forward_head(final, pre_logits=True)
        return model.get_classifier()(embedding), embedding

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
    """The adapter registered for the model's class or its nearest registered base class."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        # Reading features from `.module` would bypass the wrapper's forward and with it DDP's gradient
        # bookkeeping, so refuse rather than unwrap silently.
        raise UnsupportedModelError(
            f"got a {type(model).__name__} wrapper; pass the unwrapped model (`.module`) and wrap the "
            "distiller, not the student, in DDP")
    for model_class in type(model).__mro__:
        if model_class in _ADAPTERS:
            return _ADAPTERS[model_class]
    known = ', '.join(sorted(c.__name__ for c in _ADAPTERS))
    raise UnsupportedModelError(
        f"custom_forward does not know how to read stage features from {type(model).__module__}."
        f"{type(model).__name__}. Add a small adapter for it in custom_forward/ (subclass IntermediatesAdapter "
        f"if it has timm's forward_intermediates, else HookAdapter) and register it with "
        f"@register_adapter({type(model).__name__}); see 'Adding a backbone' in README.md. Known classes: {known}")


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
