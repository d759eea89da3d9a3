"""The teacher-output cache (`--teacher-cache DIR`): the frozen teacher's outputs of an epoch, written by the
first run and read by the next ones of the same key instead of running the teacher.

Every image's augmentation here is a function of (seed, epoch, position), so the teacher sees the same batch
at the same step of the same epoch in every run of a table; what it computes from it is then the same too.
The cache stores, per epoch, the fields the method reads (`logits`, the pooled `embedding`), one `.npy` file
each, with one row per image in batch order, and a fingerprint of each batch's input (its float64 sum and
sum of squares). A reader checks the fingerprint of every batch it serves: a batch the teacher did not see
is an error, never a wrong target. Files are written under a temporary name and renamed when the epoch is
complete, so a killed run leaves nothing that a reader takes.

One folder per key under DIR (`manifest.json` says what the key holds): the teacher and a hash of its
weights, the data, the seed, the batch layout, every flag that changes the teacher's input, and what decides
its numerics (dtype, AMP, device, memory format, torch version).
"""
import hashlib
import json
import logging
import os

import numpy as np
import torch

from .errors import UserError

_logger = logging.getLogger(__name__)

FIELDS = ('logits', 'embedding')
DTYPES = {'float32': np.float32, 'float16': np.float16, 'bfloat16': None}  # bfloat16: stored as its uint16 bits
# Flags that change which images the teacher sees, in which order and batches, or how it computes.
KEY_ARGS = ('teacher', 'teacher_kwargs', 'use_ema_teacher', 'teacher_dtype', 'dataset', 'num_classes',
            'fake_samples', 'train_subset', 'seed', 'input_size', 'batch_size', 'world_size', 'aug_repeats',
            'scale', 'ratio', 'hflip', 'vflip', 'color_jitter', 'aa', 'reprob', 'remode', 'recount', 'mixup',
            'cutmix', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode', 'mixup_off_epoch',
            'smoothing', 'train_interpolation', 'interpolation', 'mean', 'std', 'crop_pct', 'device_resize',
            'no_prefetcher', 'amp', 'amp_dtype', 'channels_last', 'device_type', 'teacher_cache_dtype')


def weights_digest(module):
    """sha256 of a module's state (names, shapes, dtypes and bytes), the teacher's identity in the key."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(f'{name}{tuple(tensor.shape)}{tensor.dtype}'.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return digest.hexdigest()


def key_manifest(args, teacher, num_train_images, steps_per_epoch):
    """What the cache folder's name stands for, as a readable mapping."""
    values = {}
    for name in KEY_ARGS:
        value = getattr(args, name, None)
        values[name] = list(value) if isinstance(value, tuple) else value
    # The data configuration as resolved from the student's timm defaults (interpolation, crop, mean/std),
    # which the flags above only override.
    from .data import data_config, train_interpolation
    config = data_config(args)
    values['data_config'] = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    values['data_config']['train_interpolation'] = train_interpolation(args, config)
    values.update(teacher_weights=weights_digest(teacher), train_images=num_train_images,
                  steps_per_epoch=steps_per_epoch, torch=torch.__version__.split('+')[0])
    return values


def fingerprint(images):
    """Two float64 numbers that change with any pixel of the batch: its sum and its sum of squares."""
    flat = images.detach().reshape(-1).double()
    return torch.stack([flat.sum(), flat.square().sum()]).cpu().numpy()


class TeacherCache:
    """The cache folder of one key, serving or recording the teacher's outputs batch by batch."""

    def __init__(self, root, manifest, fields, dtype, batch_size, steps_per_epoch, rank=0, world_size=1):
        if not fields or any(field not in FIELDS for field in fields):
            raise ValueError(f'cached fields must be among {FIELDS}, got {fields}')
        self.fields = tuple(fields)
        self.dtype = dtype
        self.batch_size = batch_size
        self.steps = steps_per_epoch
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = os.path.join(root, digest)
        try:
            os.makedirs(self.folder, exist_ok=True)
            manifest_path = os.path.join(self.folder, 'manifest.json')
            if not os.path.isfile(manifest_path):
                with open(manifest_path + '.tmp', 'w') as f:
                    json.dump(manifest, f, indent=1, sort_keys=True, default=str)
                os.replace(manifest_path + '.tmp', manifest_path)
        except OSError as e:
            raise UserError(f"--teacher-cache: cannot write '{self.folder}' ({type(e).__name__}: "
                            f"{e.strerror or e}); choose a folder you can write, or leave --teacher-cache out") from None
        # Under DDP each process reads and writes its own rows (its shard of every batch) in files of its own.
        self.shard = f'.rank{rank}of{world_size}' if world_size > 1 else ''
        self.epoch = self.step = None
        self.reading = False
        self.stored = {}
        self.recorded = {}
        self.recorded_steps = 0

    def path(self, epoch, field, temporary=False):
        """The file of one field of an epoch. The temporary name is the writing process's own, so two runs of
        one key writing the same epoch at once never write into one file; each renames a whole file, and both
        files hold the same bytes."""
        name = f'epoch{epoch:04d}{self.shard}.{field}.npy'
        return os.path.join(self.folder, name + (f'.tmp{os.getpid()}' if temporary else ''))

    def epoch_is_complete(self, epoch):
        return all(os.path.isfile(self.path(epoch, field)) for field in self.fields + ('fingerprint',))

    def disk_bytes_per_epoch(self, dims):
        itemsize = np.dtype(DTYPES[self.dtype] or np.uint16).itemsize
        rows = self.steps * self.batch_size
        return rows * itemsize * sum(dims[field] for field in self.fields) + self.steps * 16

    def start_epoch(self, epoch):
        self.epoch, self.step = epoch, None
        self.reading = self.epoch_is_complete(epoch)
        self.stored, self.recorded, self.recorded_steps = {}, {}, 0
        if self.reading:
            for field in self.fields + ('fingerprint',):
                self.stored[field] = self._open(self.path(epoch, field), field)
        _logger.info(f"Teacher cache {self.folder}: epoch {epoch} " +
                     ('read from the cache (the teacher does not run)' if self.reading else
                      'computed by the teacher and written to the cache'))

    def _open(self, path, field):
        rows = self.steps if field == 'fingerprint' else self.steps * self.batch_size
        try:
            array = np.load(path, mmap_mode='r')
            if array.ndim != 2 or array.shape[0] != rows:
                raise ValueError(f'{array.shape[0] if array.ndim else 0} rows where {rows} were written')
        except Exception as e:
            raise UserError(f"teacher cache file '{path}' is damaged ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:120]}); delete it (or its folder) to have it written "
                            f"again, or leave --teacher-cache out to run the teacher") from None
        return array

    def at_step(self, step):
        self.step = step

    def serve(self, images, compute):
        """The fields of this step's batch: read from the cache, or computed by `compute()` and recorded."""
        if self.step is None or self.step >= self.steps:
            raise RuntimeError('TeacherCache.serve outside a step of the epoch')
        seen = fingerprint(images)
        if self.reading:
            stored = np.asarray(self.stored['fingerprint'][self.step])
            if not np.array_equal(stored, seen):
                raise UserError(f"teacher cache '{self.folder}' epoch {self.epoch} step {self.step}: the batch is not "
                                f"the one the cache was written for (fingerprint {seen.tolist()} vs "
                                f"{stored.tolist()}); delete the folder, or leave --teacher-cache out")
            rows = slice(self.step * self.batch_size, (self.step + 1) * self.batch_size)
            return {field: self._to_tensor(self.stored[field][rows], images.device) for field in self.fields}
        outputs = compute()
        self._record(seen, outputs)
        return outputs

    def _to_tensor(self, rows, device):
        array = np.array(rows)
        tensor = torch.from_numpy(array)
        if self.dtype == 'bfloat16':
            tensor = tensor.view(torch.bfloat16)
        return tensor.to(device=device, dtype=torch.float32)

    def _record(self, seen, outputs):
        if self.step == 0:
            self.recorded = {'fingerprint': np.lib.format.open_memmap(
                self.path(self.epoch, 'fingerprint', True), mode='w+', dtype=np.float64, shape=(self.steps, 2))}
        fingerprints = self.recorded.get('fingerprint')
        if fingerprints is None:  # joined mid-epoch (a resumed run): this epoch is not recorded
            return
        fingerprints[self.step] = seen
        rows = slice(self.step * self.batch_size, (self.step + 1) * self.batch_size)
        for field in self.fields:
            value = outputs[field].detach().float().reshape(self.batch_size, -1)
            if field not in self.recorded:
                self.recorded[field] = np.lib.format.open_memmap(
                    self.path(self.epoch, field, True), mode='w+', dtype=DTYPES[self.dtype] or np.uint16,
                    shape=(self.steps * self.batch_size, value.shape[1]))
            if self.dtype == 'bfloat16':
                stored = value.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
            else:
                stored = value.cpu().numpy().astype(DTYPES[self.dtype], copy=False)
            self.recorded[field][rows] = stored
        self.recorded_steps = self.step + 1

    def end_epoch(self):
        """Make a fully recorded epoch visible to readers (rename), and let go of the files."""
        complete = not self.reading and 'fingerprint' in self.recorded and self.recorded_steps == self.steps
        for array in self.recorded.values():
            array.flush()
        if complete:
            for field in self.fields + ('fingerprint',):
                os.replace(self.path(self.epoch, field, True), self.path(self.epoch, field))
        self.recorded, self.stored = {}, {}
        self.recorded_steps = 0


def open_for_run(args, distiller_class, teacher, num_train_images, steps_per_epoch, rank=0, world_size=1):
    """The cache of this run, or None (with one log line saying why) when the teacher must run live."""
    if teacher is None:
        _logger.info('--teacher-cache: this method has no teacher; nothing is cached')
        return None
    fields = distiller_class.cached_teacher_fields(args)
    if fields is None:
        _logger.info(f"--teacher-cache: --distiller {args.distiller} reads the teacher's stage maps, which are not "
                     f"cached; the teacher runs live")
        return None
    from custom_forward import embedding_dim
    manifest = key_manifest(args, teacher, num_train_images, steps_per_epoch)
    cache = TeacherCache(args.teacher_cache, manifest, fields, args.teacher_cache_dtype, args.batch_size,
                         steps_per_epoch, rank, world_size)
    per_epoch = cache.disk_bytes_per_epoch({'logits': args.num_classes, 'embedding': embedding_dim(teacher)})
    processes = f' (each of {world_size} processes)' if world_size > 1 else ''
    _logger.info(f"Teacher cache {cache.folder} ({', '.join(fields)}, {args.teacher_cache_dtype}): "
                 f"{per_epoch / 2 ** 20:.1f} MiB per epoch, {per_epoch * args.epochs / 2 ** 30:.2f} GiB for "
                 f"{args.epochs} epochs{processes}")
    return cache
