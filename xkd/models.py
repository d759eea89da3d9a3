"""Building student and teacher through `timm.create_model`, and reading weight files.

Every model, our own included (custom_model registers them), is made by name, so adding a backbone means
registering it with timm; nothing here knows a model family.
"""
import argparse
import difflib
import logging
import os
import pickle
import re
import sys

import timm
import torch

import custom_model  # noqa: F401  (registers our architectures with timm)
from .errors import UserError, require_file

_logger = logging.getLogger(__name__)

# Where checkpoints keep EMA weights (timm's CheckpointSaver: state_dict_ema), in the order timm's
# load_checkpoint looks for them.
EMA_KEYS = ('state_dict_ema', 'model_ema')


def check_model_name(name, flag='--model'):
    if not name:
        raise UserError(f'{flag} is required: a timm model name such as resnet18')
    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    if not close:
        close = timm.list_models(f'*{name.split("_")[0]}*')[:4]
    hint = f"; did you mean {', '.join(close)}?" if close else '; see timm.list_models()'
    raise UserError(f"unknown model '{name}' for {flag}{hint}")


# Constructor arguments that train.py passes from its own flags; any other comes from --model-kwargs/--teacher-kwargs.
KWARG_FLAGS = {'drop_rate': '--drop', 'drop_path_rate': '--drop-path', 'drop_block_rate': '--drop-block',
               'global_pool': '--gp'}


def create_model(name, num_classes, input_size, pretrained=False, pretrained_path='', kwargs_flag='--model-kwargs',
                 **kwargs):
    """`timm.create_model` at our input size; `pretrained_path` loads a local file through `load_weights`.

    Transformers and MLPs fix their token grid at construction, so the image size is passed to the models
    that take one (`img_size`); convolutional models run at any size and are built as they are.
    """
    pretrained = pretrained and not pretrained_path
    kwargs = dict(num_classes=num_classes, pretrained=pretrained, **kwargs)
    size = input_size[-1]
    try:
        try:
            model = timm.create_model(name, img_size=size, **kwargs)
            # timm keeps the pretrained_cfg's size; some models (LeViT, EfficientFormer-V2, VOLO) record
            # the size they were built for nowhere else, and custom_forward probes them at that size.
            model.pretrained_cfg = dict(model.pretrained_cfg, input_size=tuple(input_size))
        except TypeError as e:
            if 'img_size' not in str(e):
                raise
            model = timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        key = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        user_kwargs = {k: v for k, v in kwargs.items() if k not in ('num_classes', 'pretrained', *KWARG_FLAGS)}
        if not key:
            if not user_kwargs:
                raise
            given = ' '.join(f'{k}={v}' for k, v in user_kwargs.items())
            raise UserError(f"{kwargs_flag} {given}: building '{name}' failed ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:160]}); check the values against the model's "
                            f"constructor") from None
        flag = KWARG_FLAGS.get(key.group(1), kwargs_flag)
        raise UserError(f"{flag}: '{name}' takes no argument '{key.group(1)}'; leave it out, or check the name "
                        f"against the model's constructor (timm.create_model('{name}', ...))") from None
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise UserError(f"could not load pretrained weights for '{name}' ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}); without network, download them elsewhere and "
                        f"pass --pretrained-path FILE") from None
    if pretrained_path:
        state_dict = read_state_dict(pretrained_path, '--pretrained-path')
        load_weights(model, state_dict, name, pretrained_path, num_classes, '--pretrained-path', new_head=True)
    elif pretrained:
        pretrained_classes = timm.get_pretrained_cfg_value(name, 'num_classes')
        if pretrained_classes and pretrained_classes != num_classes:
            _logger.info(f"Pretrained '{name}' from the timm hub: its {pretrained_classes}-class classifier was "
                         f"dropped; a new {num_classes}-class head starts from random weights")
        else:
            _logger.info(f"Pretrained '{name}' from the timm hub")
    return model


def read_checkpoint(path, flag='--teacher-pretrained'):
    """What a weight file holds, read without running code from it.

    `torch.load(weights_only=True)` reads tensors and plain containers; we also allow `argparse.Namespace`,
    because timm's CheckpointSaver (the reference train.py's saver) stores the run's arguments as one.
    Any other Python object is refused, and the message names its class.
    """
    require_file(path, flag)
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r'GLOBAL (\S+) was not an allowed global', str(e))
        if not unsafe:
            raise UserError(f"{flag} '{path}' cannot be read as a checkpoint (UnpicklingError: "
                            f"{str(e).splitlines()[0][:200]}); is the file complete?") from None
        raise UserError(f"{flag} '{path}' holds a Python object of class {unsafe.group(1)}, which is not read "
                        f"because unpickling it could run code from the file (only tensors, plain containers and "
                        f"argparse.Namespace are); if you trust the file, save its weights alone: "
                        f"torch.save(torch.load(path, weights_only=False)['state_dict'], 'weights.pth')") from None
    except Exception as e:  # truncated, not a torch file, or not readable: all mean the same to the user
        raise UserError(f"{flag} '{path}' cannot be read as a checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); is the file complete?") from None


def read_state_dict(path, flag='--teacher-pretrained', use_ema=False):
    """The state dict of a weight file: plain, or as `checkpoint_state_dict` finds it in a checkpoint."""
    return checkpoint_state_dict(read_checkpoint(path, flag), path, flag, use_ema)


def checkpoint_state_dict(checkpoint, path, flag, use_ema=False):
    """The weights in a checkpoint, as timm's `load_checkpoint` picks them: with `use_ema`, `state_dict_ema`
    or `model_ema` when present, else (with a warning) the plain weights; then `state_dict`, `model` or the
    dict itself; `module.` prefixes stripped."""
    if use_ema and not (isinstance(checkpoint, dict) and any(isinstance(checkpoint.get(k), dict) for k in EMA_KEYS)):
        _logger.warning(f"{flag} '{path}' holds no EMA weights (no {' or '.join(EMA_KEYS)}); --use-ema falls back "
                        f"to its plain weights, as timm's load_checkpoint does")
    state_dict = unwrap_state_dict(checkpoint, use_ema)
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        keys = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"{flag} '{path}' holds no state dict of tensors (keys: {keys})")
    return state_dict


def unwrap_state_dict(checkpoint, use_ema=False):
    if isinstance(checkpoint, dict):
        keys = (EMA_KEYS if use_ema else ()) + ('state_dict', 'model')
        for key in keys:
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        return {}
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in checkpoint.items()}


def classifier_keys(model):
    """State-dict keys of the model's classifier; a distilled DeiT has two heads, and `get_classifier()`
    returns both as a tuple."""
    heads = model.get_classifier() if hasattr(model, 'get_classifier') else None
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    head_parameters = {id(p) for head in heads if isinstance(head, torch.nn.Module) for p in head.parameters()}
    return {k for k, p in model.named_parameters() if id(p) in head_parameters}


def checkpoint_filter(model):
    """timm's `checkpoint_filter_fn` for the model's family (looked up in the module of its class, then of its
    base classes), which maps checkpoints of other layouts onto timm's own; None where the family has none."""
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        filter_fn = getattr(module, 'checkpoint_filter_fn', None)
        if callable(filter_fn):
            return filter_fn
    return None


def mismatched_keys(model_state, state_dict):
    """Keys missing from the file, keys the model lacks, and keys whose shapes differ."""
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    reshaped = [k for k in model_state if k in state_dict and state_dict[k].shape != model_state[k].shape]
    return missing, unexpected, reshaped


def convert_layout(model, state_dict):
    """`state_dict` in today's timm layout of the model, with a one-line account of what changed ('' if nothing).

    Older timm versions, which the OFA-KD and RSD code bases use (0.6.5), stored some families differently:
    Swin put the patch merging at the end of stage i (timm 1.x: start of stage i+1), named its classifier
    `head`, and saved the `relative_position_index` and `attn_mask` buffers; BEiT saved
    `relative_position_index`. timm's pretrained loading passes every file through the family's
    `checkpoint_filter_fn`; we do the same, but only when the file does not fit the model as it is, and keep
    the result only when it fits better, so that a mismatch is reported in the file's own key names.
    """
    model_state = model.state_dict()
    before = sum(map(len, mismatched_keys(model_state, state_dict)))
    filter_fn = checkpoint_filter(model)
    if before == 0 or filter_fn is None:
        return state_dict, ''
    try:
        converted = filter_fn(dict(state_dict), model)
    except Exception:  # a file of another architecture: the strict load names its keys
        return state_dict, ''
    if sum(map(len, mismatched_keys(model_state, converted))) >= before:
        return state_dict, ''
    return converted, describe_conversion(state_dict, converted, filter_fn)


def describe_conversion(before, after, filter_fn):
    """'11 keys renamed, 7 dropped (attn_mask, relative_position_index)'. A tensor is followed by its memory:
    found under another key it was renamed, found nowhere it was dropped; a new tensor under an old key was
    converted (e.g. a resampled position embedding), under a new key added."""
    names_by_address = {tensor.data_ptr(): key for key, tensor in before.items() if tensor.numel()}
    renamed = converted = added = 0
    kept_addresses = set()
    for key, tensor in after.items():
        source = names_by_address.get(tensor.data_ptr()) if tensor.numel() else None
        if source is not None:
            kept_addresses.add(tensor.data_ptr())
            renamed += source != key
        elif key in before:
            converted += not (tensor.shape == before[key].shape and torch.equal(tensor, before[key]))
        else:
            added += 1
    dropped = [key for key, tensor in before.items()
               if tensor.numel() and tensor.data_ptr() not in kept_addresses and key not in after]
    dropped_kinds = ', '.join(sorted({key.rsplit('.', 1)[-1] for key in dropped}))
    counts = [(renamed, 'keys renamed'), (len(dropped), f'dropped ({dropped_kinds})'), (converted, 'converted'),
              (added, 'added')]
    summary = ', '.join(f'{count} {what}' for count, what in counts if count) or 'no key changed'
    return f"converted from an older timm layout by {filter_fn.__module__}.{filter_fn.__name__}: {summary}"


def load_weights(model, state_dict, name, path, num_classes, flag, new_head=False):
    """Strict load, after timm's conversion of older layouts, with errors that say which keys or which head
    size did not match. With `new_head` (fine-tuning) a classifier of another class count, or none, is left
    at its random initialisation, as timm's pretrained loading does."""
    state_dict, conversion = convert_layout(model, state_dict)
    if conversion:
        _logger.info(f"{flag} '{path}': {conversion}")
    own = model.state_dict()
    head_keys = classifier_keys(model)
    missing, unexpected, reshaped = mismatched_keys(own, state_dict)
    new_head_keys = [k for k in head_keys if k in missing or k in reshaped] if new_head else []
    missing = [k for k in missing if k not in new_head_keys]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:3])}")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} keys, e.g. {', '.join(unexpected[:3])}")
        raise UserError(f"{flag} '{path}' does not fit model '{name}': {'; '.join(detail)}. "
                        f"Is it a checkpoint of a different architecture?")
    for key in reshaped:
        if key in new_head_keys:
            continue
        if key in head_keys:
            raise UserError(f"{flag} '{path}': its classifier has {state_dict[key].shape[0]} classes but "
                            f"--num-classes is {num_classes}; fine-tune the teacher for this dataset "
                            f"or set --num-classes {state_dict[key].shape[0]}")
        raise UserError(f"{flag} '{path}' does not fit model '{name}': '{key}' has shape "
                        f"{tuple(state_dict[key].shape)} in the file and {tuple(own[key].shape)} in the model "
                        f"(a different size of the architecture, or a different input size?)")
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in new_head_keys}, strict=not new_head_keys)
    if new_head_keys:
        file_classes = next((state_dict[k].shape[0] for k in new_head_keys if k in state_dict), None)
        dropped = f'its {file_classes}-class classifier was dropped' if file_classes else 'it has no classifier'
        _logger.info(f"Pretrained '{name}' from {path}: {dropped}; a new {num_classes}-class head starts from "
                     f"random weights")
    elif new_head:
        _logger.info(f"Pretrained '{name}' from {path}")


def create_teacher(args):
    """The frozen teacher: built, its weights loaded, in eval mode with no gradients."""
    teacher = create_model(args.teacher, args.num_classes, args.input_size, kwargs_flag='--teacher-kwargs',
                           **args.teacher_kwargs)
    if args.teacher_pretrained:
        state_dict = read_state_dict(args.teacher_pretrained, use_ema=args.use_ema_teacher)
        load_weights(teacher, state_dict, args.teacher, args.teacher_pretrained, args.num_classes,
                     '--teacher-pretrained')
        _logger.info(f"Loaded teacher '{args.teacher}' from {args.teacher_pretrained}"
                     + (' (EMA weights)' if args.use_ema_teacher else ''))
    else:
        _logger.warning('!' * 80)
        _logger.warning(f"NO TEACHER WEIGHTS: '{args.teacher}' is randomly initialised (no --teacher-pretrained). "
                        f"Distilling from it only makes sense as a smoke test.")
        _logger.warning('!' * 80)
    teacher.eval().requires_grad_(False)
    return teacher


def teacher_dtype(args):
    """--teacher-dtype, else the AMP dtype under --amp: the frozen teacher needs no float32 master weights,
    and autocast would otherwise cast all of its weights again at every step."""
    name = args.teacher_dtype or (args.amp_dtype if args.amp else 'float32')
    return getattr(torch, name)


def count_parameters(parameters):
    return sum(p.numel() for p in parameters)
