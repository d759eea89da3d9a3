"""Checkpoints: timm's CheckpointSaver layout, with everything a distillation run needs to resume.

A checkpoint holds the student under `state_dict` (timm's convention, so timm's own tools read it), the
distiller's extra modules under `distiller`, optimizer, scheduler, AMP scaler, EMA, epoch, best metric,
RNG states and the arguments. The saver writes `tmp.pth.tar` and renames it to `last.pth.tar`, so a
process killed while saving leaves the previous `last.pth.tar` whole.
"""
import os
import random

import numpy as np
import torch
from timm.utils import CheckpointSaver, get_state_dict, unwrap_model

from .errors import UserError

LAST = 'last.pth.tar'


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

    def __init__(self, distiller, optimizer, scheduler, args, model_ema, amp_scaler, checkpoint_dir, max_history):
        super().__init__(model=distiller.student, optimizer=optimizer, args=args, model_ema=model_ema,
                         amp_scaler=amp_scaler, checkpoint_dir=checkpoint_dir, max_history=max_history)
        self.distiller = distiller
        self.scheduler = scheduler

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
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, unwrap_model)
        torch.save(state, save_path)


def resolve_resume(resume, output_dir):
    """`--resume auto` -> the run's last.pth.tar if there is one, else '' (start fresh)."""
    if resume != 'auto':
        return resume
    path = os.path.join(output_dir, LAST)
    return path if os.path.isfile(path) else ''


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"--resume '{path}' does not exist")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated or corrupt file: tell the user which one to use instead
        folder = os.path.dirname(os.path.abspath(path))
        others = sorted(f for f in os.listdir(folder) if f.endswith('.pth.tar') and f not in (
            os.path.basename(path), 'tmp.pth.tar'))
        hint = (f"; resume from another checkpoint in {folder}: {', '.join(others)}" if others else
                '; no other checkpoint is in its folder, so start the run again')
        raise UserError(f"checkpoint '{path}' is damaged and cannot be read ({type(e).__name__}){hint}") from None


def resume(path, distiller, optimizer, scheduler, model_ema, amp_scaler, saver):
    """Restore a run; returns the epoch to start from."""
    checkpoint = load_checkpoint(path)
    for key in ('state_dict', 'optimizer', 'epoch'):
        if key not in checkpoint:
            raise UserError(f"'{path}' is not a training checkpoint of train.py (no '{key}'); "
                            f"use --teacher-pretrained or --pretrained-path for plain weights")
    saved_method = checkpoint.get('distiller_name')
    if saved_method is not None and saved_method != distiller.args.distiller:
        raise UserError(f"'{path}' was written by a '{saved_method}' run; resume it with --distiller {saved_method}")
    try:
        distiller.student.load_state_dict(checkpoint['state_dict'])
        distiller.load_extra_state_dict(checkpoint.get('distiller', {}))
    except (RuntimeError, KeyError) as e:
        raise UserError(f"'{path}' does not fit this run's student or distiller: {str(e).splitlines()[0]}") from None
    optimizer.load_state_dict(checkpoint['optimizer'])
    scheduler.load_state_dict(checkpoint['scheduler'])
    if amp_scaler is not None and 'amp_scaler' in checkpoint:
        amp_scaler.load_state_dict(checkpoint['amp_scaler'])
    if model_ema is not None and 'state_dict_ema' in checkpoint:
        unwrap_model(model_ema).load_state_dict(checkpoint['state_dict_ema'])
    if 'rng' in checkpoint:
        set_rng_state(checkpoint['rng'])
    if 'saver' in checkpoint and saver is not None:
        saver.load_state_dict(checkpoint['saver'])
    return checkpoint['epoch'] + 1
