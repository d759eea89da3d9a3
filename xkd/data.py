"""Datasets, transforms and loaders.

Every dataset type returns PIL images, so the same timm transforms serve all of them: small images
(CIFAR 32 px, digits 8 px) are upsampled to the student's input size by those transforms, as the
reference code bases do for CIFAR-100 at 224 px.
"""
import os
import pickle
import random

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.datasets import CIFAR100, ImageFolder

from .errors import UserError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# Per dataset type: classes, normalisation and eval crop. Small-image sets are resized whole (crop 1.0).
DATASET_DEFAULTS = {
    'cifar100': dict(num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD, crop_pct=1.0),
    'imagenet': dict(num_classes=1000, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.875),
    'folder': dict(num_classes=None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.875),
    'digits': dict(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0),
    'fake': dict(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0),
}


class CIFAR100Folder(CIFAR100):
    """torchvision's CIFAR-100 reader, checking that the files exist rather than their MD5 sums.

    The on-disk format is unchanged; this lets a local copy (or the tests' tiny pickles) load without the
    download-time checksums, which `--dataset-download` still verifies.
    """

    def _check_integrity(self):
        files = [name for name, _ in self.train_list + self.test_list] + [self.meta['filename']]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name)) for name in files)

    def _load_meta(self):
        with open(os.path.join(self.root, self.base_folder, self.meta['filename']), 'rb') as f:
            self.classes = pickle.load(f, encoding='latin1')[self.meta['key']]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def cifar100_root(data_dir, download):
    """Accept both the folder holding `cifar-100-python/` and that folder itself."""
    if os.path.basename(os.path.normpath(data_dir)) == CIFAR100.base_folder:
        data_dir = os.path.dirname(os.path.normpath(data_dir))
    folder = os.path.join(data_dir, CIFAR100.base_folder)
    if not download and not all(os.path.isfile(os.path.join(folder, f)) for f in ('train', 'test', 'meta')):
        raise UserError(
            f"CIFAR-100 not found: looked for train, test and meta in '{os.path.abspath(folder)}'. "
            f"Put the python version of CIFAR-100 (cifar-100-python.tar.gz, extracted) there, "
            f"or add --dataset-download to fetch it.")
    return data_dir


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), read offline.

    The split is fixed (a seeded permutation, 70 % train), so every run of the demo sees the same images.
    """

    def __init__(self, train, transform=None, train_fraction=0.7, split_seed=0):
        from sklearn.datasets import load_digits
        digits = load_digits()
        order = np.random.RandomState(split_seed).permutation(len(digits.target))
        cut = int(round(train_fraction * len(order)))
        self.indices = order[:cut] if train else order[cut:]
        # 0..16 grey levels to 0..255 RGB
        self.images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        self.targets = [int(t) for t in digits.target[self.indices]]
        self.transform = transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[self.indices[i]], mode='L').convert('RGB')
        return (self.transform(image) if self.transform else image), self.targets[i]


class FakeDataset(Dataset):
    """Synthetic images whose class is visible (a class-coloured square on noise), for tests and smoke runs.

    Each image is drawn from a generator seeded by its index, so the data are the same in every process.
    """

    def __init__(self, num_samples, num_classes, image_size=32, seed=0, transform=None):
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed
        self.transform = transform
        self.targets = [i % num_classes for i in range(num_samples)]
        palette = np.random.RandomState(1234).randint(0, 256, size=(num_classes, 3))
        self.palette = palette.astype(np.uint8)

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        rng = np.random.RandomState(self.seed * 1_000_003 + i)
        size = self.image_size
        image = rng.randint(0, 256, size=(size, size, 3)).astype(np.uint8)
        half = size // 2
        top, left = rng.randint(0, size - half + 1, size=2)
        image[top:top + half, left:left + half] = self.palette[self.targets[i]]
        image = Image.fromarray(image)
        return (self.transform(image) if self.transform else image), self.targets[i]


def image_folder(data_dir, split):
    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise UserError(f"image folder '{os.path.abspath(path)}' not found: --dataset imagenet/folder expects "
                        f"DATA/train and DATA/val, each with one sub-folder of images per class")
    try:
        return ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"image folder '{os.path.abspath(path)}' has no usable class folders ({e})") from None


def create_datasets(args):
    """(train, val) datasets without transforms; `args.dataset` picks the type."""
    if args.dataset == 'cifar100':
        if not args.data_dir:
            raise UserError('--dataset cifar100 needs the data folder as the first argument')
        root = cifar100_root(args.data_dir, args.dataset_download)
        train = CIFAR100Folder(root, train=True, download=args.dataset_download)
        val = CIFAR100Folder(root, train=False)
    elif args.dataset in ('imagenet', 'folder'):
        if not args.data_dir:
            raise UserError(f'--dataset {args.dataset} needs the data folder as the first argument')
        if not os.path.isdir(args.data_dir):
            raise UserError(f"data folder '{os.path.abspath(args.data_dir)}' does not exist")
        train, val = image_folder(args.data_dir, 'train'), image_folder(args.data_dir, 'val')
        if train.classes != val.classes:
            raise UserError(f"'{args.data_dir}': train/ has {len(train.classes)} classes and val/ has "
                            f"{len(val.classes)}; both need the same class folders")
    elif args.dataset == 'digits':
        train, val = DigitsDataset(train=True), DigitsDataset(train=False)
    elif args.dataset == 'fake':
        num_classes = args.num_classes or DATASET_DEFAULTS['fake']['num_classes']
        train = FakeDataset(args.fake_samples, num_classes, seed=0)
        val = FakeDataset(max(args.fake_samples // 4, num_classes), num_classes, seed=1)
    else:
        raise UserError(f"unknown dataset type '{args.dataset}'; known: {', '.join(DATASET_DEFAULTS)}")
    if args.train_subset:
        train = fixed_subset(train, args.train_subset, args.seed)
    return train, val


def fixed_subset(dataset, size, seed):
    order = np.random.RandomState(seed).permutation(len(dataset))[:size]
    subset = Subset(dataset, sorted(order.tolist()))
    subset.targets = [dataset.targets[i] for i in subset.indices]
    return subset


def dataset_num_classes(args, train_set):
    """The class count of the data: the dataset type's, or the number of class folders."""
    default = DATASET_DEFAULTS[args.dataset]['num_classes']
    if args.dataset == 'folder':
        return len(train_set.classes)
    return default


class TransformedDataset(Dataset):
    """`dataset` with `transform` applied; with `with_index` each item also carries its index (the training
    loop passes it to distillers with `needs_indices`, CRD's memory banks)."""

    def __init__(self, dataset, transform, with_index=False):
        self.dataset = dataset
        self.transform = transform
        self.with_index = with_index

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, target = self.dataset[i]
        return (self.transform(image), target, i) if self.with_index else (self.transform(image), target)


def data_config(args):
    defaults = DATASET_DEFAULTS[args.dataset]
    return dict(
        input_size=tuple(args.input_size),
        mean=tuple(args.mean or defaults['mean']),
        std=tuple(args.std or defaults['std']),
        crop_pct=args.crop_pct or defaults['crop_pct'],
        interpolation=args.interpolation,
    )


def create_transforms(args):
    config = data_config(args)
    train = create_transform(
        config['input_size'], is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, color_jitter=args.color_jitter or None, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=config['mean'], std=config['std'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    val = eval_transform(config)
    return train, val


def eval_transform(config):
    return create_transform(config['input_size'], is_training=False, interpolation=config['interpolation'],
                            mean=config['mean'], std=config['std'], crop_pct=config['crop_pct'])


class ShardSampler(Sampler):
    """Every rank takes every world_size-th index, in order, with no padding: evaluation counts each image once."""

    def __init__(self, length, rank, world_size):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def create_train_loader(dataset, args, rank, world_size):
    """A loader whose order depends only on (seed, epoch): call `sampler.set_epoch` each epoch.

    The sampler splits each epoch's permutation across ranks, so N processes with batch b see the same
    images in the same steps as one process with batch N*b.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    if len(sampler) < args.batch_size:
        raise UserError(f'the training set has {len(dataset)} images, fewer than one batch of '
                        f'{args.batch_size} per process x {world_size} processes; lower --batch-size')
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                      pin_memory=args.pin_mem, drop_last=True, persistent_workers=False,
                      worker_init_fn=seed_worker, generator=torch.Generator())


def create_eval_loader(dataset, batch_size, workers, rank=0, world_size=1, pin_mem=False):
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=workers, pin_memory=pin_mem, drop_last=False)


def seed_worker(worker_id):
    """Seed numpy and random in each loader worker from torch's per-worker seed (itself set per epoch)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
