"""The training epoch and the evaluation loop.

Loss values stay on the device during the epoch; they are read (one synchronisation) only every
`--log-interval` steps and at the end of the epoch. A non-finite loss is caught at those reads, before
the next checkpoint is written, so the last checkpoint on disk is always a good one.
"""
import logging
import math
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.utils import dispatch_clip_grad

from .config import mixup_active
from .data import DataLoadingError
from .distributed import all_reduce_sum, check_replicas
from .errors import UserError
from .run import seed_everything

_logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    pass


def autocast_context(args, device):
    if not args.amp:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, args.amp_dtype))


def format_eta(seconds):
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def train_step(model, distiller, images, targets, epoch, optimizer, args, env, scaler=None, indices=None):
    """Forward (under autocast with --amp), backward, clip, update. Returns the summed loss and its terms.

    `model` is what runs the forward (the distiller, possibly DDP-wrapped or compiled); `distiller` gives
    the parameters to clip. The images' dataset `indices` go to distillers that ask for them (CRD's memory).
    """
    extra = {'indices': indices} if indices is not None and getattr(distiller, 'needs_indices', False) else {}
    with autocast_context(args, env.device):
        _, losses = model(images, targets, epoch=epoch, **extra)
    losses = {key: value.float() for key, value in losses.items()}
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if args.clip_grad is not None:
            scaler.unscale_(optimizer)
            dispatch_clip_grad(distiller.parameters(), args.clip_grad, mode=args.clip_mode)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if args.clip_grad is not None:
            dispatch_clip_grad(distiller.parameters(), args.clip_grad, mode=args.clip_mode)
        optimizer.step()
    return loss, losses


class AugmentationRandomness:
    """The random generators' states of the batch-level augmentation (random erasing on the device, mixup and
    cutmix), kept apart from the training's own draws (dropout, drop-path, a method's sampling such as CRD's
    negatives). The batches an epoch yields then depend only on (seed, epoch, rank), whatever the method draws
    between them: every method of a table shows the teacher the same inputs, which --teacher-cache relies on.
    Entered around each batch's augmentation; it swaps its states in and the training's back out."""

    def __init__(self, seed, device):
        saved = self._states(device)
        seed_everything(seed)
        self.device = device
        self.state = self._states(device)
        self._restore(saved)

    @staticmethod
    def _states(device):
        cuda = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
        return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda

    def _restore(self, states):
        python, numpy, cpu, cuda = states
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def __enter__(self):
        self.saved = self._states(self.device)
        self._restore(self.state)
        return self

    def __exit__(self, *exc):
        self.state = self._states(self.device)
        self._restore(self.saved)
        return False


def create_mixup(args):
    """timm's Mixup/CutMix from the flags, or None when both are off."""
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.num_classes)


def start_epoch(loader, epoch, args, env):
    """Seed an epoch as train.py does: its randomness depends only on (seed, epoch, rank), so a resumed run
    repeats it exactly and tools/teacher_cache.py builds the same batches."""
    seed_everything(args.seed + 1000 * epoch + env.rank)
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(args.seed + epoch)


def training_batches(loader, epoch, args, env, mixup_fn=None, last_checkpoint=''):
    """The epoch's training batches as the student and the teacher see them: on the device, through mixup or
    cutmix, in the memory format asked for; the batch-level augmentation draws from its own generators."""
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False  # the targets stay smoothed one-hot, as the reference's
    # Its own seed: not the training's (seed + 1000 epoch + rank, start_epoch), so the two streams differ.
    augmentation = AugmentationRandomness(args.seed + 1000 * epoch + 500 + env.rank, env.device)
    for images, targets, indices in batches_or_stop(loader, epoch, last_checkpoint, augmentation):
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        indices = indices.to(env.device, non_blocking=True)
        if mixup_fn is not None:
            with augmentation:
                images, targets = mixup_fn(images, targets)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, targets, indices


def train_one_epoch(epoch, model, distiller, loader, optimizer, scheduler, args, env, mixup_fn=None,
                    scaler=None, model_ema=None, recorder=None, last_checkpoint=''):
    """One pass over `loader`; `model` is the distiller, wrapped by DDP when distributed.

    Returns the epoch's mean of each weighted loss term and of their sum, `loss`.
    """
    model.train()
    steps = len(loader)
    cache = distiller.teacher_cache
    if cache is not None:
        cache.start_epoch(epoch)
    sums, count = {}, 0
    interval_images, interval_start = 0, time.time()
    epoch_start = time.time()
    for step, (images, targets, indices) in enumerate(training_batches(loader, epoch, args, env, mixup_fn,
                                                                       last_checkpoint)):
        if cache is not None:
            cache.at_step(step)
        loss, losses = train_step(model, distiller, images, targets, epoch, optimizer, args, env, scaler, indices)
        if model_ema is not None:
            model_ema.update(distiller.student, step=epoch * steps + step)

        detached = {'loss': loss.detach(), **{key: value.detach() for key, value in losses.items()}}
        for key, value in detached.items():
            sums[key] = sums[key] + value if key in sums else value.clone()
        count += 1
        interval_images += images.shape[0] * env.world_size
        num_updates = epoch * steps + step + 1
        scheduler.step_update(num_updates=num_updates)

        last_step = step + 1 == steps
        if (step + 1) % args.log_interval == 0 or last_step:
            values = {key: value.item() for key, value in detached.items()}
            check_finite(values, epoch, step, steps, last_checkpoint)
            check_replicas(distiller, env)
            lr = optimizer.param_groups[0]['lr']
            elapsed = time.time() - interval_start
            rate = interval_images / max(elapsed, 1e-9)
            eta = (time.time() - epoch_start) / (step + 1) * (steps - step - 1)
            terms = '  '.join(f'{key} {value:.4f}' for key, value in values.items())
            _logger.info(f'Train: {epoch} [{step + 1:>{len(str(steps))}}/{steps}]  {terms}  lr {lr:.3e}  '
                         f'{rate:.1f} img/s  ETA {format_eta(eta)}')
            if recorder is not None:
                recorder.step(num_updates, values, lr)
            interval_images, interval_start = 0, time.time()

    means = {key: value / count for key, value in sums.items()}
    means = {key: all_reduce_sum(value.clone(), env).item() / env.world_size for key, value in means.items()}
    check_finite(means, epoch, steps - 1, steps, last_checkpoint)
    if cache is not None:
        cache.end_epoch()  # only a whole, finite epoch becomes readable
    return means


def last_good(last_checkpoint):
    return f"the last good checkpoint is '{last_checkpoint}'" if last_checkpoint else 'no checkpoint was written yet'


def batches_or_stop(loader, epoch, last_checkpoint, augmentation=None):
    """The loader's batches; a sample that cannot be loaded stops the run, naming it and the last good checkpoint.
    Each batch is drawn under `augmentation`'s generators (random erasing on the device draws there)."""
    augmentation = augmentation or nullcontext()
    batches = iter(loader)
    while True:
        try:
            with augmentation:
                batch = next(batches)
        except StopIteration:
            return
        except DataLoadingError as e:
            raise DataLoadingError(f'{e}; stopped in epoch {epoch}; {last_good(last_checkpoint)}. Fix that sample '
                                   f'or the transform, then continue with --resume') from None
        yield batch


def check_finite(values, epoch, step, steps, last_checkpoint):
    if all(math.isfinite(v) for v in values.values()):
        return
    terms = ', '.join(f'{key}={value:.4g}' for key, value in values.items())
    where = last_good(last_checkpoint)
    raise NonFiniteLossError(f'loss became non-finite by epoch {epoch} step {step + 1}/{steps} ({terms}); '
                             f'stopped instead of training on garbage; {where}. '
                             f'Lower --lr, set --clip-grad, or check the teacher weights')


@torch.no_grad()
def evaluate(model, loader, args, env):
    """Top-1, top-5 and mean cross-entropy over the whole set; each rank takes a shard, the sums are reduced."""
    model.eval()
    # A teacher kept in a lower dtype (--teacher-dtype) takes its input in that dtype.
    dtype = next(model.parameters()).dtype
    totals = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss sum, top1 hits, top5 hits, count
    for images, targets in loader:
        images = images.to(env.device, dtype=dtype, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(args, env.device):
            logits = model(images)
        logits = logits.float()
        correct = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.eq(targets[:, None])
        totals += torch.stack([F.cross_entropy(logits, targets, reduction='sum').double(),
                               correct[:, :1].sum().double(), correct.sum().double(),
                               torch.tensor(images.shape[0], dtype=torch.float64, device=env.device)])
    all_reduce_sum(totals, env)
    loss_sum, top1_hits, top5_hits, count = totals.tolist()
    count = max(count, 1)
    return {'loss': loss_sum / count, 'top1': 100 * top1_hits / count, 'top5': 100 * top5_hits / count,
            'count': int(count)}
