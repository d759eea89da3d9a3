#!/usr/bin/env python3
"""Fill a teacher-output cache before the runs that will read it: the teacher alone, no student.

    python tools/teacher_cache.py DATA --config configs/cifar/cnn.yaml --model resnet18 \
        --teacher swin_tiny_patch4_window7_224 --teacher-pretrained pretrained/swin_tiny_patch4_window7_224_cifar100.pth \
        --num-classes 100 --teacher-cache /scratch/teacher-cache [--epochs 300]

It takes train.py's command line (the flags that make the key: data, recipe, seed, batch size, the student
whose data configuration the runs use), builds the training batches exactly as train.py does, epoch by epoch,
and writes the teacher's logits and pooled embedding of each, so that any method that reads them (all but
fitnet and rsd on stage maps) is served. Epochs already in the cache are skipped. It prints each epoch's
progress and the cache's size on disk.
"""
import logging
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distillers  # noqa: E402
from xkd import data, distributed, engine, models  # noqa: E402
from xkd.config import check_args, parse_args  # noqa: E402
from xkd.errors import UserError  # noqa: E402
from xkd.logger import setup_logging  # noqa: E402
from xkd.run import resolve_amp_dtype, resolve_input_size, run_cli  # noqa: E402
from xkd.teacher_cache import open_for_run  # noqa: E402

_logger = logging.getLogger('teacher_cache')


class Filler(distillers.Distiller):
    """The teacher's side of a distiller that reads both cached fields, with no student to train."""
    teacher_reads = ('logits', 'embedding')


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def main(argv=None):
    args = parse_args(argv)
    if not args.teacher_cache or not args.teacher:
        raise UserError('give --teacher-cache DIR and the --teacher (with --teacher-pretrained) of the runs to serve')
    args.distiller = 'hcd'  # the key holds no method; hcd's checks are those of a logits-and-embedding reader
    check_args(args)
    env = distributed.init_distributed(args.local_rank, args.device)
    args.device_type, args.world_size = env.device.type, env.world_size
    args.amp_dtype = resolve_amp_dtype(args, env.device)
    setup_logging(is_main=env.is_main)
    train_set, val_set = data.create_datasets(args)
    args.num_classes = data.check_num_classes(args, train_set)
    args.input_size = resolve_input_size(args, args.model)
    teacher = models.create_teacher(args).to(env.device, dtype=models.teacher_dtype(args))
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    filler = Filler(torch.nn.Identity(), teacher, None, args)
    train_loader, _ = data.create_loaders(args, train_set, val_set, env.device, env.rank, env.world_size)
    cache = open_for_run(args, Filler, teacher, len(train_set), len(train_loader), env.rank, env.world_size)
    filler.teacher_cache = cache
    mixup_fn = engine.create_mixup(args)
    start = time.time()
    for epoch in range(args.epochs):
        if cache.epoch_is_complete(epoch):
            _logger.info(f'epoch {epoch}: already in the cache')
            continue
        engine.start_epoch(train_loader, epoch, args, env)  # as train.py: the same batches come out
        cache.start_epoch(epoch)
        for step, (images, _, _) in enumerate(engine.training_batches(train_loader, epoch, args, env, mixup_fn)):
            cache.at_step(step)
            with engine.autocast_context(args, env.device):
                filler.teacher_features(images)
        cache.end_epoch()
        _logger.info(f'epoch {epoch + 1}/{args.epochs} written; {folder_bytes(cache.folder) / 2 ** 20:.1f} MiB in '
                     f'{cache.folder}; {time.time() - start:.0f} s')
    _logger.info(f'Teacher cache {cache.folder}: {args.epochs} epochs, {folder_bytes(cache.folder) / 2 ** 20:.1f} MiB')
    distributed.cleanup(env)
    return cache.folder


if __name__ == '__main__':
    sys.exit(run_cli(main))
