#!/usr/bin/env python3
"""Host cost per image of the CIFAR-100 recipes' training loader: the host path against the device path.

    python bench/loader.py                  # configs/cifar/cnn.yaml and vit_mlp.yaml at 224 px
    python bench/loader.py --images 256     # shorter

Paths, each measured in this one run on the same synthetic 32 px images:
- `host (--no-prefetcher)`: the reference's way, and ours before the device path: each image is cropped,
  upsampled to 224 px, augmented and normalised to float32 on the host;
- `uint8 (--device-resize off)`: the same on the host, shipped as uint8 and normalised on the device;
- `device (default)`: the host ships the native 32 px uint8 image and its crop box; the crop, the resize to
  224 px and the flip run batched on the device (RandAugment and colour jitter stay on the host, at 32 px).
`1 worker` is images/s of what one loader worker does (transforms and collation, timed in this process);
`loader` is images/s of the whole DataLoader with `--workers` processes. The device's own share (resize,
normalisation) is not host work and is not counted. The last line, `speed-up N`, is the CNN recipe's
device path against its host path, one worker each.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import Dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import custom_model  # noqa: E402,F401
from PIL import Image  # noqa: E402
from xkd import data  # noqa: E402
from xkd.config import parse_args  # noqa: E402
from xkd.run import resolve_input_size  # noqa: E402

PATHS = {'host (--no-prefetcher)': ['--no-prefetcher'], 'uint8 (--device-resize off)': ['--device-resize', 'off'],
         'device (default)': ['--device-resize', 'on']}


class CifarLikeImages(Dataset):
    """Random 32 px images held in memory as CIFAR-100's reader holds them (a uint8 array, PIL on access)."""
    native_size = 32

    def __init__(self, count, seed=0):
        self.images = np.random.RandomState(seed).randint(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 100 for i in range(count)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return Image.fromarray(self.images[i]), self.targets[i]


def build(config, flags, bench_args):
    args = parse_args(['--config', os.path.join(ROOT, config), '--img-size', str(bench_args.img_size),
                       '--batch-size', str(bench_args.batch_size), '--workers', str(bench_args.workers), *flags])
    args.input_size = resolve_input_size(args, args.model)
    images = CifarLikeImages(bench_args.images)
    train, _ = data.create_loaders(args, images, CifarLikeImages(args.batch_size, seed=1), torch.device('cpu'))
    return train.loader


def one_worker(loader):
    """Images/s of a worker's share: the dataset's transforms and the collation of whole batches."""
    loader.sampler.set_epoch(0)
    keys = list(loader.sampler)
    size = loader.batch_size
    batches = [keys[i:i + size] for i in range(0, len(keys) - size + 1, size)]
    loader.collate_fn(loader.dataset.__getitems__(batches[0]))  # warm-up
    start = time.perf_counter()
    for batch in batches[1:]:
        loader.collate_fn(loader.dataset.__getitems__(batch))
    return (len(batches) - 1) * size / (time.perf_counter() - start)


def whole_loader(loader):
    """Images/s of the DataLoader over a whole epoch, its (persistent) workers started by a first epoch."""
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for images, *_ in loader:
            count += len(images[0] if isinstance(images, (list, tuple)) else images)
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', nargs='+', default=['configs/cifar/cnn.yaml', 'configs/cifar/vit_mlp.yaml'])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--images', type=int, default=1024, help='images per measurement')
    parser.add_argument('--workers', type=int, default=2)
    bench_args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f'CIFAR-like 32 px images to {bench_args.img_size} px, batch {bench_args.batch_size}, '
          f'{bench_args.images} images per measurement; {os.cpu_count()} CPUs')
    print(f'\n| recipe | path | 1 worker img/s | loader ({bench_args.workers} workers) img/s | x host |')
    print('|---|---|---:|---:|---:|')
    speedups = {}
    for config in bench_args.configs:
        rates = {}
        for name, flags in PATHS.items():
            loader = build(config, flags, bench_args)
            rates[name] = one_worker(loader), whole_loader(loader)
            del loader
        host = rates['host (--no-prefetcher)'][0]
        for name, (single, whole) in rates.items():
            print(f'| {os.path.basename(config)} | {name} | {single:.0f} | {whole:.0f} | {single / host:.2f} |')
        speedups[config] = rates['device (default)'][0] / host
    cnn = next((c for c in speedups if c.endswith('cnn.yaml')), next(iter(speedups)))
    print(f'\nspeed-up {speedups[cnn]:.1f}')


if __name__ == '__main__':
    main()
