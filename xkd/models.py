"""Building student and teacher through `timm.create_model`, and reading weight files.

Every model, our own included (custom_model registers them), is made by name, so adding a backbone means
registering it with timm; nothing here knows a model family.
"""
import difflib
import logging
import os

import timm
import torch

import custom_model  # noqa: F401  (registers our architectures with timm)
from .errors import UserError

_logger = logging.getLogger(__name__)


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


def create_model(name, num_classes, input_size, pretrained=False, pretrained_path='', **kwargs):
    """`timm.create_model` at our input size.

    Transformers and MLPs fix their token grid at construction, so the image size is passed to the models
    that take one (`img_size`); convolutional models run at any size and are built as they are.
    """
    pretrained_classes = timm.get_pretrained_cfg_value(name, 'num_classes') if pretrained else None
    if pretrained_path:
        state_dict = read_state_dict(pretrained_path, '--pretrained-path')
        # timm drops the classifier when the file's class count differs from ours; tell it the file's.
        classifier = timm.get_pretrained_cfg_value(name, 'classifier')
        classifier_weight = state_dict.get(f'{classifier}.weight') if isinstance(classifier, str) else None
        pretrained_classes = classifier_weight.shape[0] if classifier_weight is not None else num_classes
        kwargs['pretrained_cfg_overlay'] = dict(file=pretrained_path, num_classes=pretrained_classes)
        pretrained = True
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
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise UserError(f"could not load pretrained weights for '{name}' ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}); without network, download them elsewhere and "
                        f"pass --pretrained-path FILE") from None
    if pretrained:
        source = pretrained_path or 'the timm hub'
        if pretrained_classes and pretrained_classes != num_classes:
            _logger.info(f"Pretrained '{name}' from {source}: its {pretrained_classes}-class classifier was "
                         f"dropped; a new {num_classes}-class head starts from random weights")
        else:
            _logger.info(f"Pretrained '{name}' from {source}")
    return model


def read_state_dict(path, flag='--teacher-pretrained'):
    """A state dict from a file: plain, or under `state_dict` / `state_dict_ema` / `model`, `module.` stripped."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} '{path}' does not exist")
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            checkpoint = load_file(path)
        else:
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, not a torch file, or not readable: all mean the same to the user
        raise UserError(f"{flag} '{path}' cannot be read as a checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); is the file complete?") from None
    state_dict = unwrap_state_dict(checkpoint)
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{flag} '{path}' holds no state dict of tensors (keys: {list(checkpoint)[:8]})")
    return state_dict


def unwrap_state_dict(checkpoint, use_ema=False):
    if isinstance(checkpoint, dict):
        keys = ('state_dict_ema', 'state_dict', 'model') if use_ema else ('state_dict', 'model')
        for key in keys:
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict):
        return {}
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in checkpoint.items()}


def load_weights(model, state_dict, name, path, num_classes, flag):
    """Strict load with errors that say which keys or which head size did not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:3])}")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} keys, e.g. {', '.join(unexpected[:3])}")
        raise UserError(f"{flag} '{path}' does not fit model '{name}': {'; '.join(detail)}. "
                        f"Is it a checkpoint of a different architecture?")
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    head_keys = {k for k, v in model.named_parameters() if classifier is not None
                 and any(v is p for p in classifier.parameters())}
    for key, tensor in own.items():
        if state_dict[key].shape != tensor.shape:
            if key in head_keys:
                raise UserError(f"{flag} '{path}': its classifier has {state_dict[key].shape[0]} classes but "
                                f"--num-classes is {num_classes}; fine-tune the teacher for this dataset "
                                f"or set --num-classes {state_dict[key].shape[0]}")
            raise UserError(f"{flag} '{path}' does not fit model '{name}': '{key}' has shape "
                            f"{tuple(state_dict[key].shape)} in the file and {tuple(tensor.shape)} in the model "
                            f"(a different size of the architecture, or a different input size?)")
    model.load_state_dict(state_dict)


def create_teacher(args):
    """The frozen teacher: built, its weights loaded, in eval mode with no gradients."""
    teacher = create_model(args.teacher, args.num_classes, args.input_size, **args.teacher_kwargs)
    if args.teacher_pretrained:
        state_dict = read_state_dict(args.teacher_pretrained)
        load_weights(teacher, state_dict, args.teacher, args.teacher_pretrained, args.num_classes,
                     '--teacher-pretrained')
        _logger.info(f"Loaded teacher '{args.teacher}' from {args.teacher_pretrained}")
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
