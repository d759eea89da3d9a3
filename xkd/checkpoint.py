"""Checkpoints: timm's CheckpointSaver layout, with everything a distillation run needs to resume.

A checkpoint holds the student under `state_dict` (timm's convention, so timm's own tools read it), the
distiller's extra modules under `distiller`, optimizer, scheduler, AMP scaler, EMA, epoch, best metric,
RNG states and the arguments. The saver writes `tmp.pth.tar` and renames it to `last.pth.tar`, so a
process killed while saving leaves the previous `last.pth.tar` whole.
"""
import logging
import os
import random

import numpy as np
import torch
from timm.utils import CheckpointSaver, get_state_dict, unwrap_model

from .errors import UserError, require_file

_logger = logging.getLogger(__name__)

LAST = 'last.pth.tar'
# Arguments that say where and how a run was started, not what it trains: not reported as changes on resume.
NOT_A_CHANGE = ('resume', 'output_dir', 'config', 'local_rank', 'device_type', 'world_size', 'workers', 'log_wandb')


def rng_state():
    """RNG states in types `torch.load(weights_only=True)` accepts."""
    state = {'torch': torch.get_rng_state(), 'python': random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state['numpy'] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


class DistillationSaver(CheckpointSaver):
    """timm's saver (last, model_best, best `max_history` by top-1) writing our extra state."""

    def __init__(self, distiller, optimizer, scheduler, args, model_emas, amp_scaler, checkpoint_dir, max_history):
        super().__init__(model=distiller.student, optimizer=optimizer, args=args, amp_scaler=amp_scaler,
                         checkpoint_dir=checkpoint_dir, max_history=max_history)
        self.distiller = distiller
        self.scheduler = scheduler
        self.model_emas = model_emas

    def _save(self, save_path, epoch, metric=None):
        state = {
            'epoch': epoch,
            'arch': self.args.model,
            'args': dict(vars(self.args)),
            'version': 2,
            'state_dict': get_state_dict(self.model, unwrap_model),
            'distiller_name': self.args.distiller,
            'distiller': self.distiller.extra_state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'rng': rng_state(),
            'metric': metric,
            'saver': self.state_dict(epoch, metric),
        }
        if self.amp_scaler is not None:
            state['amp_scaler'] = self.amp_scaler.state_dict()
        if self.model_emas is not None:
            # The first EMA under timm's key, so timm's tools and validate.py --use-ema read it; all of them by decay.
            state['state_dict_ema'] = get_state_dict(self.model_emas.emas[0], unwrap_model)
            state['state_dict_emas'] = self.model_emas.state_dicts()
        torch.save(state, save_path)


TMP = 'tmp.pth.tar'


def resolve_resume(resume, output_dir):
    """`--resume auto` -> the run's last.pth.tar; '' (start fresh) only when the folder holds no checkpoint.

    timm's saver writes tmp.pth.tar, unlinks last.pth.tar and renames tmp to last: a kill between the two
    leaves a complete tmp.pth.tar and no last.pth.tar. That file is resumed from (it is the newer epoch);
    if it is not complete, or other checkpoints are there without a last.pth.tar, the run stops with one line
    rather than start over and overwrite them.
    """
    if resume != 'auto':
        return resume
    path = os.path.join(output_dir, LAST)
    if os.path.isfile(path):
        return path
    tmp = os.path.join(output_dir, TMP)
    if os.path.isfile(tmp):
        try:
            state = torch.load(tmp, map_location='cpu', weights_only=True)
            complete = isinstance(state, dict) and all(key in state for key in ('state_dict', 'optimizer', 'epoch'))
        except Exception:
            complete = False
        if complete:
            _logger.warning(f"no {LAST} in '{output_dir}', but a complete {TMP} of epoch {state['epoch']} (a run "
                            f"stopped while saving): resuming from it")
            return tmp
        raise UserError(f"no {LAST} in '{output_dir}' and its {TMP} is incomplete (the run stopped while saving "
                        f"it); resume from another checkpoint with --resume FILE"
                        + _other_checkpoints(output_dir, tmp) + ", or delete the folder to start over")
    others = _other_checkpoints(output_dir, None)
    if others:
        raise UserError(f"no {LAST} in '{output_dir}', but other checkpoints are there; resume from one with "
                        f"--resume FILE{others}, or delete them to start over")
    return ''


def _other_checkpoints(folder, excluded):
    """'; in FOLDER: a, b' for the checkpoint files in the folder other than `excluded` and its hard links
    (timm's checkpoint-N and model_best are links to the last.pth.tar they were saved as)."""
    if not os.path.isdir(folder):
        return ''
    others = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith('.pth.tar') or name == TMP or not os.path.isfile(path):
            continue
        if excluded is not None and os.path.exists(excluded) and os.path.samefile(path, excluded):
            continue
        others.append(name)
    return f" (in {folder}: {', '.join(others)})" if others else ''


def load_checkpoint(path):
    require_file(path, '--resume')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        if _reference_checkpoint(path):
            raise UserError(f"'{path}' is a checkpoint of the OFA-KD / RSD train.py, not of this one, so its "
                            f"optimizer and schedule cannot be resumed here; start a run from its weights with "
                            f"--pretrained-path (as the student) or --teacher-pretrained (as the teacher)") from None
        # A truncated or corrupt file: tell the user which other one to use instead.
        folder = os.path.dirname(os.path.abspath(path))
        others = _other_checkpoints(folder, path)
        hint = (f"; resume from another checkpoint with --resume FILE{others}" if others else
                '; no other checkpoint is in its folder, so start the run again')
        raise UserError(f"checkpoint '{path}' is damaged and cannot be read ({type(e).__name__}){hint}") from None


def _reference_checkpoint(path):
    """Whether the file reads as timm's CheckpointSaver wrote it in the reference train.py (Namespace args)."""
    from .models import read_checkpoint
    try:
        state = read_checkpoint(path, '--resume')
    except UserError:
        return False
    return isinstance(state, dict) and 'state_dict' in state and not isinstance(state.get('args'), dict)


def _mismatch(module, state_dict):
    """Which keys are missing, unexpected or of another shape, in a few words."""
    own = module.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    shapes = [f'{key} {tuple(state_dict[key].shape)} vs {tuple(own[key].shape)}' for key in own
              if key in state_dict and hasattr(state_dict[key], 'shape') and state_dict[key].shape != own[key].shape]
    parts = []
    for label, items in (('shapes differ', shapes), ('missing', missing), ('unexpected', unexpected)):
        if items:
            parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    return '; '.join(parts)


def changed_arguments(saved, args):
    """'name old -> new' for each argument the command line changed since the checkpoint was written."""
    current = vars(args)
    changes = []
    for key in sorted(set(saved) | set(current)):
        if key in NOT_A_CHANGE:
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, tuple):
            old = list(old)
        if isinstance(new, tuple):
            new = list(new)
        if old != new:
            changes.append(f'{key} {old!r} -> {new!r}')
    return changes


def resume(path, distiller, optimizer, model_emas, amp_scaler, saver):
    """Restore a run's state: weights, optimizer moments, EMAs, scaler, RNG; returns the epoch to start from.

    The command line is the plan: the learning-rate schedule is not restored but rebuilt from the flags and
    stepped to the start epoch by the caller (as timm's train.py does), and the optimizer keeps this command
    line's hyper-parameters (lr, weight decay, momentum, betas) with the checkpoint's moments.
    """
    checkpoint = load_checkpoint(path)
    for key in ('state_dict', 'optimizer', 'epoch'):
        if key not in checkpoint:
            raise UserError(f"'{path}' is not a training checkpoint of train.py (no '{key}'); "
                            f"use --teacher-pretrained or --pretrained-path for plain weights")
    saved_method = checkpoint.get('distiller_name')
    if saved_method is not None and saved_method != distiller.args.distiller:
        raise UserError(f"'{path}' was written by a '{saved_method}' run; resume it with --distiller {saved_method}")
    saved_args = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
    current = distiller.args
    what = [f"{key} {saved_args[key]!r} (now {getattr(current, key)!r})" for key in ('model', 'num_classes')
            if key in saved_args and saved_args[key] != getattr(current, key, None)]
    cause = (f"; the checkpoint's run had {', '.join(what)}: resume with the same --model and --num-classes, "
             f"or use a new --output/--experiment for this run" if what else '')
    mismatch = _mismatch(distiller.student, checkpoint['state_dict'])
    if mismatch:
        raise UserError(f"'{path}' does not fit this run's student {current.model}: {mismatch}{cause}")
    try:
        distiller.load_extra_state_dict(checkpoint.get('distiller', {}))
    except (RuntimeError, KeyError) as e:
        raise UserError(f"'{path}' does not fit this run's {current.distiller} modules: "
                        f"{' '.join(str(e).split())[:300]}{cause}") from None
    distiller.student.load_state_dict(checkpoint['state_dict'])
    planned = [{key: value for key, value in group.items() if key != 'params'} for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint['optimizer'])
    for group, hyper_parameters in zip(optimizer.param_groups, planned):
        group.update(hyper_parameters)
    if amp_scaler is not None and 'amp_scaler' in checkpoint:
        amp_scaler.load_state_dict(checkpoint['amp_scaler'])
    if model_emas is not None:
        states = checkpoint.get('state_dict_emas')
        if states is None and 'state_dict_ema' in checkpoint:  # one EMA, written before several were kept
            states = {f'{model_emas.decays[0]!r}': checkpoint['state_dict_ema']}
        fresh = model_emas.load_state_dicts(states or {}, distiller.student)
        if fresh:
            _logger.info(f"EMA decay {', '.join(f'{d:g}' for d in fresh)} not in '{path}': "
                         f"started from the resumed student's weights")
    if 'rng' in checkpoint:
        set_rng_state(checkpoint['rng'])
    if 'saver' in checkpoint and saver is not None:
        saver.load_state_dict(checkpoint['saver'])
    changes = changed_arguments(checkpoint.get('args', {}), distiller.args)
    _logger.info(f"Arguments changed since '{path}': {'; '.join(changes)}" if changes else
                 f"Arguments unchanged since '{path}'")
    return checkpoint['epoch'] + 1
