"""Datasets, transforms and loaders.

Every dataset type returns PIL images, so the same timm transforms serve all of them. The loaders ship
uint8 batches and normalise on the device, as timm's prefetcher does; small images (CIFAR 32 px, digits
8 px) are shipped at their native size and upsampled to the student's input size on the device
(`resize_crop`), where the reference code bases upsample on the host. `--device-resize off` and
`--no-prefetcher` give back the host paths.
"""
import contextlib
import functools
import math
import os
import pickle
import random

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, get_worker_info
from torchvision.datasets import CIFAR100, ImageFolder
from torchvision.transforms.functional import pil_to_tensor

from .errors import UserError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# Per dataset type: classes and normalisation. Crop and interpolation are the student's (data_config).
DATASET_DEFAULTS = {
    'cifar100': dict(num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD),
    'imagenet': dict(num_classes=1000, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
    'folder': dict(num_classes=None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
    'digits': dict(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    'fake': dict(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}
# Sets normalised with their own statistics; ImageNet and image folders take the model's, as the reference does.
STATS_OF_THE_SET = ('cifar100', 'digits', 'fake')


class CIFAR100Folder(CIFAR100):
    """torchvision's CIFAR-100 reader, checking that the files exist rather than their MD5 sums.

    The on-disk format is unchanged; this lets a local copy (or the tests' tiny pickles) load without the
    download-time checksums, which `--dataset-download` still verifies.
    """

    native_size = 32

    def _check_integrity(self):
        files = [name for name, _ in self.train_list + self.test_list] + [self.meta['filename']]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name)) for name in files)

    def _load_meta(self):
        path = os.path.join(self.root, self.base_folder, self.meta['filename'])
        try:
            with open(path, 'rb') as f:
                self.classes = pickle.load(f, encoding='latin1')[self.meta['key']]
        except Exception as e:
            raise damaged_cifar_file(path, e) from None
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def damaged_cifar_file(path, error):
    return UserError(f"CIFAR-100 file '{path}' cannot be read ({type(error).__name__}: "
                     f"{' '.join(str(error).split())[:120] or 'no detail'}): it is truncated or damaged; delete the "
                     f"folder '{os.path.dirname(path)}' and run again to download it anew (or copy a complete one there)")


def read_cifar100(root, train):
    """One split of CIFAR-100; a truncated or damaged pickle is named in one line."""
    try:
        return CIFAR100Folder(root, train=train)
    except UserError:
        raise
    except Exception as e:
        raise damaged_cifar_file(os.path.join(root, CIFAR100.base_folder, 'train' if train else 'test'), e) from None


def cifar100_root(data_dir, download):
    """Accept both the folder holding `cifar-100-python/` and that folder itself; download into it if allowed.

    As the reference, a missing CIFAR-100 is downloaded (torchvision checks the archive's MD5) unless
    --no-dataset-download; without network the error says where to put the files.
    """
    if os.path.basename(os.path.normpath(data_dir)) == CIFAR100.base_folder:
        data_dir = os.path.dirname(os.path.normpath(data_dir))
    folder = os.path.join(data_dir, CIFAR100.base_folder)
    if all(os.path.isfile(os.path.join(folder, f)) for f in ('train', 'test', 'meta')):
        return data_dir
    where = (f"looked for train, test and meta in '{os.path.abspath(folder)}'. Put the python version of "
             f"CIFAR-100 (cifar-100-python.tar.gz, extracted) there")
    if not download:
        raise UserError(f"CIFAR-100 not found: {where}, or leave out --no-dataset-download to fetch it.")
    try:
        CIFAR100(data_dir, train=True, download=True)
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a corrupt download
        raise UserError(f"CIFAR-100 not found and the download failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}): {where}.") from None
    return data_dir


def infer_dataset_type(data_dir):
    """What DATA holds when --dataset is not given: cifar-100-python/ -> cifar100, train/ + val/ -> folder."""
    from .config import DATASETS
    if data_dir:
        if (os.path.basename(os.path.normpath(data_dir)) == CIFAR100.base_folder
                or os.path.isdir(os.path.join(data_dir, CIFAR100.base_folder))):
            return 'cifar100'
        if all(os.path.isdir(os.path.join(data_dir, split)) for split in ('train', 'val')):
            return 'folder'
    what = f"'{data_dir}' holds neither cifar-100-python/ nor train/ and val/" if data_dir else 'no data folder given'
    raise UserError(f"--dataset not given and {what}; choose one of {', '.join(DATASETS)} "
                    f"(cifar100 is downloaded into DATA when missing)")


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
        self.native_size = 8

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
        self.image_size = self.native_size = image_size
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
    """(train, val) datasets without transforms; `args.dataset` picks the type (inferred from DATA when empty)."""
    if not args.dataset:
        args.dataset = infer_dataset_type(args.data_dir)
    if args.dataset == 'cifar100':
        if not args.data_dir:
            raise UserError('--dataset cifar100 needs the data folder as the first argument')
        root = cifar100_root(args.data_dir, args.dataset_download)
        train = read_cifar100(root, train=True)
        val = read_cifar100(root, train=False)
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
        if args.train_subset > len(train):
            raise UserError(f'--train-subset {args.train_subset} is more than the {len(train)} training images; '
                            f'give at most {len(train)}, or leave it out to train on all of them')
        train = fixed_subset(train, args.train_subset, args.seed)
    return train, val


def fixed_subset(dataset, size, seed):
    order = np.random.RandomState(seed).permutation(len(dataset))[:size]
    subset = Subset(dataset, sorted(order.tolist()))
    subset.targets = [dataset.targets[i] for i in subset.indices]
    return subset


def dataset_num_classes(args, dataset):
    """The class count of the data: the dataset type's, or the number of class folders."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if args.dataset in ('folder', 'imagenet'):
        return len(dataset.classes)
    if args.dataset == 'fake':
        return getattr(dataset, 'num_classes', None) or args.num_classes or DATASET_DEFAULTS['fake']['num_classes']
    return DATASET_DEFAULTS[args.dataset]['num_classes']


def check_num_classes(args, dataset, whose='--num-classes'):
    """The class count to build the model with: the data's, or --num-classes when it is the same.

    Fewer classes than the data's labels fail inside the loss at the first step; more give a head whose extra
    outputs never see a label. Both are refused here, before any model is built.
    """
    data_classes = dataset_num_classes(args, dataset)
    if args.num_classes and args.num_classes != data_classes:
        raise UserError(f"{whose} {args.num_classes}, but the {args.dataset} data has {data_classes} classes "
                        f"(labels 0..{data_classes - 1}); leave --num-classes out to use the data's count, or give "
                        f"--num-classes {data_classes}")
    return data_classes


class DataLoadingError(UserError):
    """A sample that could not be read or transformed, named by its index and the transform step.

    Raised in a loader worker, it reaches the main process re-created from its text with the worker's
    traceback in front; only the last line, ours, is kept so that the user sees one line.
    """

    def __init__(self, message):
        lines = [line for line in str(message).strip().splitlines() if line.strip()]
        if len(lines) > 1 and 'Traceback' in str(message):
            message = lines[-1].split(f'{type(self).__name__}: ', 1)[-1]
        super().__init__(message)


def describe_sample(dataset, i):
    """'Name set' and, for image files, the file's path: what a user needs to find a bad sample."""
    while isinstance(dataset, Subset):
        dataset, i = dataset.dataset, dataset.indices[i]
    samples = getattr(dataset, 'samples', None)
    path = f" ('{samples[i][0]}')" if isinstance(samples, list) and 0 <= i < len(samples) else ''
    return f'{type(dataset).__name__} set{path}'


def one_line(value):
    return ' '.join(repr(value).split())


def seed_sample(sample_seed):
    """Seed the generators timm's and torchvision's transforms draw from (random, numpy, torch) for one sample."""
    random.seed(sample_seed)
    np.random.seed(sample_seed % 2 ** 32)
    # The CPU generator alone: torch.manual_seed also seeds every accelerator, ~0.5 ms per call.
    torch.default_generator.manual_seed(sample_seed % 2 ** 64)


@contextlib.contextmanager
def generators_kept():
    """In the main process (--workers 0), put the generators' states back after seeding samples, so that the
    training loop's own draws (mixup, random erasing, dropout) are the same with and without workers."""
    if get_worker_info() is not None:
        yield
        return
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


class TransformedDataset(Dataset):
    """`dataset` through `transform`. Keys may be `(index, sample_seed)` pairs (from SeededSampler): the
    generators are then seeded per sample, so an image's augmentation depends only on the run's seed, the
    epoch and its place in the epoch, not on which worker, process or resumed run draws it.

    With `with_index`, items are (image, target, index), the index into this dataset (CRD's memory bank).
    """

    def __init__(self, dataset, transform, with_index=False):
        self.dataset = dataset
        self.transform = transform
        self.with_index = with_index

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, keys):
        """A batch of samples; the loader calls this rather than __getitem__ once per sample."""
        if not any(isinstance(key, tuple) for key in keys):
            return [self[key] for key in keys]
        with generators_kept():  # once per batch: saving numpy's state costs ~0.3 ms
            return [self[key] for key in keys]

    def __getitem__(self, key):
        i, sample_seed = key if isinstance(key, tuple) else (key, None)
        step = 'reading the image'
        try:
            image, target = self.dataset[i]
            if sample_seed is not None:
                seed_sample(sample_seed)
            for step in getattr(self.transform, 'transforms', [self.transform]):
                image = step(image)
        except Exception as e:
            where = step if isinstance(step, str) else f'transform step {one_line(step)}'
            raise DataLoadingError(f'sample {i} of the {describe_sample(self.dataset, i)} failed in {where}: '
                                   f'{type(e).__name__}: {" ".join(str(e).split())}') from e
        return (image, target, i) if self.with_index else (image, target)


# The papers' code ran timm 0.6.5, whose default weights (and so data configuration) of these models were
# the ones under these tags; timm 1.x made other weights the default (resnet18: a1_in1k, 0.95 bicubic).
REFERENCE_TAGS = {'resnet18': 'tv_in1k', 'convnext_tiny': 'fb_in1k'}


def model_pretrained_cfg(model_name):
    """The timm pretrained configuration a model name had in the reference code bases (None if unknown)."""
    name = model_name if '.' in model_name or model_name not in REFERENCE_TAGS else (
        f'{model_name}.{REFERENCE_TAGS[model_name]}')
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else None


def data_config(args):
    """The student's timm data configuration, as the reference resolves it: input size, crop_pct and
    interpolation come from the model (`resolve_data_config`), flags override; the mean and std are
    CIFAR-100's for CIFAR-100, the model's for ImageNet and image folders, the set's own for digits/fake.

    Returns a dict with input_size, mean, std, crop_pct, interpolation (the evaluation interpolation).
    """
    overrides = {'input_size': tuple(args.input_size) if args.input_size else None, 'img_size': args.img_size,
                 'crop_pct': args.crop_pct, 'interpolation': args.interpolation, 'mean': args.mean, 'std': args.std}
    config = resolve_data_config(overrides, pretrained_cfg=model_pretrained_cfg(args.model))
    dataset_stats = DATASET_DEFAULTS[args.dataset]['mean'], DATASET_DEFAULTS[args.dataset]['std']
    if args.dataset in STATS_OF_THE_SET:
        config['mean'], config['std'] = (tuple(args.mean or dataset_stats[0]), tuple(args.std or dataset_stats[1]))
    return {key: config[key] for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')}


def train_interpolation(args, config):
    """--train-interpolation; as in the reference, an empty value means the model's interpolation."""
    return args.train_interpolation or config['interpolation']


def create_transforms(args):
    config = data_config(args)
    train = create_transform(
        config['input_size'], is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, color_jitter=args.color_jitter or None, auto_augment=args.aa,
        interpolation=train_interpolation(args, config), mean=config['mean'], std=config['std'],
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


def sample_seed(seed, epoch, position):
    return (seed * 1_000_003 + epoch) * 1_000_000_007 + position


class SeededSampler(Sampler):
    """A distributed sampler's indices, each paired with the seed of its augmentation.

    The seed depends on (run seed, epoch, position in the epoch's global order): rank r of N takes positions
    r, r + N, ..., so N processes augment each image exactly as one process does, whatever the workers.
    """

    def __init__(self, sampler, seed):
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        rank, world_size = self.sampler.rank, self.sampler.num_replicas
        for step, index in enumerate(self.sampler):
            yield index, sample_seed(self.seed, self.epoch, rank + step * world_size)

    def __len__(self):
        return len(self.sampler)


class SeededRepeatAugSampler(RepeatAugSampler):
    """timm's RepeatAugSampler (--aug-repeats: each image several times per epoch, spread over the processes,
    the epoch as long as without), its permutation drawn from (seed, epoch) rather than the epoch alone."""

    def __init__(self, dataset, num_replicas, rank, num_repeats, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, num_repeats=num_repeats)
        self.seed = seed

    def __iter__(self):
        epoch = self.epoch
        self.epoch = self.seed * 1_000_003 + epoch
        try:
            return super().__iter__()  # builds the whole list at once
        finally:
            self.epoch = epoch


def create_train_loader(dataset, args, rank, world_size, pin_memory=False):
    """A loader whose order and augmentation depend only on (seed, epoch): call `sampler.set_epoch` each epoch.

    The sampler splits each epoch's permutation across ranks, so N processes with batch b see the same
    images, augmented alike, in the same steps as one process with batch N*b.
    """
    if args.aug_repeats:
        sampler = SeededRepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=args.aug_repeats,
                                         seed=args.seed)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                     drop_last=True)
    if len(sampler) < args.batch_size:
        raise UserError(f'the training set has {len(dataset)} images, fewer than one batch of '
                        f'{args.batch_size} per process x {world_size} processes; lower --batch-size')
    return DataLoader(dataset, batch_size=args.batch_size, sampler=SeededSampler(sampler, args.seed),
                      num_workers=args.workers, pin_memory=pin_memory, drop_last=True,
                      persistent_workers=args.workers > 0, generator=torch.Generator())


def create_eval_loader(dataset, batch_size, workers, rank=0, world_size=1, pin_mem=False):
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=workers, pin_memory=pin_mem, drop_last=False, persistent_workers=workers > 0)


# ---------------------------------------------------------------- uint8 batches, float on the device

# The filters resize_crop reproduces; PIL's others (box, hamming, lanczos) have no device form here.
DEVICE_INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest')


def interpolation_names(interpolation):
    modes = interpolation if isinstance(interpolation, (tuple, list)) else (interpolation,)
    return [getattr(mode, 'value', mode) for mode in modes]


class NativeSizeCrop:
    """The host half of the device resize: timm's RandomResizedCrop parameters, its interpolation choice and
    the flip are drawn here, in the order and from the generators timm's own transforms use, but not applied.
    The image stays at its native size; `colour` (RandAugment, AutoAugment, colour jitter) runs on it there.
    Returns (uint8 CHW image, [top, left, height, width, flip, interpolation index]).
    """

    def __init__(self, crop, hflip, colour):
        self.crop, self.hflip, self.colour = crop, hflip, colour

    def __call__(self, image):
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        modes = interpolation_names(self.crop.interpolation)
        mode = random.choice(modes) if isinstance(self.crop.interpolation, (tuple, list)) else modes[0]
        flip = self.hflip > 0 and torch.rand(1).item() < self.hflip
        image = pil_to_tensor(self.colour(image))
        params = torch.tensor([top, left, height, width, float(flip), DEVICE_INTERPOLATIONS.index(mode)])
        return image, params

    def __repr__(self):
        return f'NativeSizeCrop(crop={one_line(self.crop)}, hflip={self.hflip}, colour={one_line(self.colour)})'


def pil_filter_weights(start, step, low, high, out_size, in_size, mode):
    """[B, out_size, in_size] weights of PIL's resampling along one axis: output pixel j reads the input
    around `start + (j + 0.5) * step` (edge coordinates), with PIL's kernels (triangle; Keys cubic, a = -0.5;
    nearest), widened by the step when reducing (antialias), cut to input pixels in [low, high) and
    renormalised there, as PIL does at a crop's edge."""
    device = start.device
    centre = start[:, None] + (torch.arange(out_size, device=device) + 0.5) * step[:, None]
    pixel = torch.arange(in_size, device=device) + 0.5
    width = step.clamp(min=1)[:, None, None]
    distance = (pixel - centre[:, :, None]) / width
    x = distance.abs()
    triangle = (1 - x).clamp(min=0)
    a = -0.5
    cubic = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))
    nearest = ((pixel - centre[:, :, None] > -0.5) & (pixel - centre[:, :, None] <= 0.5)).float()
    mode = mode.long()[:, None, None]
    weights = torch.where(mode == 0, triangle, torch.where(mode == 1, cubic, nearest))
    inside = (pixel.floor() >= low[:, None, None]) & (pixel.floor() < high[:, None, None])
    weights = weights * inside
    return weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)


def resize_crop(images, boxes, size, clamp_to_box=True):
    """Crop each image of a uint8 batch to its box (top, left, height, width in pixels), resize it to `size`
    with its interpolation and flip it where asked: one pass of two batched matrix products.

    This is PIL's resize of the crop, as the host transforms compute it, up to PIL's final rounding to uint8
    (at most one grey level apart). grid_sample would be one call too, but its bicubic kernel is Keys' a = -0.75
    where PIL's is -0.5 (35 grey levels apart on CIFAR-like noise) and it reads pixels beyond the crop's
    edge. With `clamp_to_box` off, the box is a window on the whole image resized (evaluation's centre crop).
    """
    batch, channels, height, width = images.shape
    top, left, box_height, box_width, flip, mode = boxes.float().unbind(1)
    out_height, out_width = size
    if clamp_to_box:
        rows_low, rows_high, cols_low, cols_high = top, top + box_height, left, left + box_width
    else:
        zeros = torch.zeros_like(top)
        rows_low, rows_high, cols_low, cols_high = zeros, zeros + height, zeros, zeros + width
    rows = pil_filter_weights(top, box_height / out_height, rows_low, rows_high, out_height, height, mode)
    cols = pil_filter_weights(left, box_width / out_width, cols_low, cols_high, out_width, width, mode)
    cols = torch.where(flip[:, None, None] > 0, cols.flip(1), cols)
    # PIL resizes rows first and stores that pass in uint8: cubic overshoots are cut there, then again.
    wide = (images.float() @ cols.transpose(1, 2)[:, None]).add_(0.5).floor_().clamp_(0, 255)
    return (rows[:, None] @ wide).clamp_(0, 255)


def eval_boxes(config, height, width):
    """The window of a square native image that timm's eval transform (resize to input size / crop_pct,
    centre-crop the input size) keeps, as a box in native pixels for `resize_crop(clamp_to_box=False)`."""
    out_height, out_width = config['input_size'][1:]
    resized_height, resized_width = (math.floor(out_height / config['crop_pct']),
                                     math.floor(out_width / config['crop_pct']))
    top = int(round((resized_height - out_height) / 2.0))
    left = int(round((resized_width - out_width) / 2.0))
    fy, fx = height / resized_height, width / resized_width
    return [top * fy, left * fx, out_height * fy, out_width * fx, 0.0,
            float(DEVICE_INTERPOLATIONS.index(interpolation_names(config['interpolation'])[0]))]


class DeviceLoader:
    """A DataLoader whose batches arrive on the device as float, normalised there.

    As timm's PrefetchLoader: the host ships uint8 (4x fewer bytes than float32) from pinned memory with
    non-blocking copies, and normalisation and random erasing run on the device. With `resize`, the host ships
    native-size images with their crop boxes and the resize-crop-flip runs here too (`resize_crop`); evaluation's
    resize and centre crop as well. We keep
    our own loop because our batches carry dataset indices and crop boxes beside (images, targets). Without
    `mean`, the batches are already float (the --no-prefetcher path) and are only moved.
    """

    def __init__(self, loader, device, mean=None, std=None, random_erasing=None, resize=None, eval_box=None):
        self.loader, self.device = loader, device
        self.mean = None if mean is None else torch.tensor([255 * m for m in mean], device=device).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor([255 * s for s in std], device=device).view(1, -1, 1, 1)
        self.random_erasing, self.resize, self.eval_box = random_erasing, resize, eval_box

    def __len__(self):
        return len(self.loader)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def generator(self):
        return self.loader.generator

    @property
    def dataset(self):
        return self.loader.dataset

    def __iter__(self):
        for images, *rest in self.loader:
            boxes = None
            if isinstance(images, (tuple, list)):
                images, boxes = images
            images = images.to(self.device, non_blocking=True)
            rest = [value.to(self.device, non_blocking=True) for value in rest]
            if self.resize is not None:
                if boxes is None:
                    boxes = torch.tensor([self.eval_box(*images.shape[2:])]).expand(images.shape[0], -1)
                images = resize_crop(images, boxes.to(self.device, non_blocking=True), self.resize,
                                     clamp_to_box=self.eval_box is None)
            if self.mean is not None:
                images = images.float().sub_(self.mean).div_(self.std)
            if self.random_erasing is not None:
                images = self.random_erasing(images)
            yield (images, *rest)


def native_image_size(dataset):
    """The side of a set's images when they are all square and alike (CIFAR, digits, fake), else None."""
    dataset = dataset.dataset if isinstance(dataset, Subset) else dataset
    return getattr(dataset, 'native_size', None)


def device_resize_applies(args, native_size, config):
    """Why the device resize cannot run (a sentence), or '' when it can."""
    if args.no_prefetcher:
        return '--no-prefetcher keeps the float path on the host'
    if native_size is None:
        return f'--dataset {args.dataset} has images of varying size'
    if native_size >= min(config['input_size'][1:]):
        return f'the images ({native_size} px) are not smaller than the input size'
    modes = interpolation_names(train_interpolation_names(args, config)) + [config['interpolation']]
    unsupported = [mode for mode in modes if mode not in DEVICE_INTERPOLATIONS]
    if unsupported:
        return f"interpolation '{unsupported[0]}' has no device form (use bilinear, bicubic, nearest or random)"
    return ''


def train_interpolation_names(args, config):
    interpolation = train_interpolation(args, config)
    return ['bilinear', 'bicubic'] if interpolation == 'random' else [interpolation]


def create_loaders(args, train_set, val_set, device, rank=0, world_size=1):
    """The training loader (yielding images, targets, dataset indices) and the evaluation loader
    (images, targets), both on `device`, as the flags ask: uint8 batches normalised on the device (default),
    the crop and resize of small images on the device too (`--device-resize auto`), or float batches made on
    the host (`--no-prefetcher`)."""
    config = data_config(args)
    pin_memory = args.pin_mem or device.type == 'cuda'
    eval_batch = args.validation_batch_size or args.batch_size
    if args.no_prefetcher:
        train_transform, val_transform = create_transforms(args)
        train = create_train_loader(TransformedDataset(train_set, train_transform, with_index=True), args, rank,
                                    world_size, pin_memory)
        val = create_eval_loader(TransformedDataset(val_set, val_transform), eval_batch, args.workers, rank,
                                 world_size, pin_memory)
        return DeviceLoader(train, device), DeviceLoader(val, device)

    why_not = device_resize_applies(args, native_image_size(train_set), config)
    if args.device_resize == 'on' and why_not:
        raise UserError(f'--device-resize on: {why_not}')
    on_device = args.device_resize == 'on' or (args.device_resize == 'auto' and not why_not)
    random_erasing = None
    if args.reprob > 0:
        random_erasing = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device=device)
    kwargs = dict(is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                  color_jitter=args.color_jitter or None, auto_augment=args.aa,
                  interpolation=train_interpolation(args, config), use_prefetcher=True,
                  mean=config['mean'], std=config['std'])  # RandAugment fills with the mean colour
    if on_device:
        crop_flip, colour, _ = create_transform(config['input_size'], separate=True, **kwargs)
        train_transform = NativeSizeCrop(crop_flip.transforms[0], args.hflip, colour)
        val_transform = MaybePILToTensor()
    else:
        train_transform = create_transform(config['input_size'], **kwargs)
        val_transform = create_transform(config['input_size'], is_training=False, use_prefetcher=True,
                                         interpolation=config['interpolation'], crop_pct=config['crop_pct'])
    train = create_train_loader(TransformedDataset(train_set, train_transform, with_index=True), args, rank,
                                world_size, pin_memory)
    val = create_eval_loader(TransformedDataset(val_set, val_transform), eval_batch, args.workers, rank,
                             world_size, pin_memory)
    size = tuple(config['input_size'][1:]) if on_device else None
    return (DeviceLoader(train, device, config['mean'], config['std'], random_erasing, resize=size),
            DeviceLoader(val, device, config['mean'], config['std'], resize=size,
                         eval_box=functools.partial(eval_boxes, config)))
