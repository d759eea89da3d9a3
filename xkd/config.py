"""Flags, YAML defaults and argument checks.

As in timm's train.py: `--config` names a YAML file whose keys become argparse defaults, and the command
line wins over it. Unlike timm, a YAML key that no flag knows is an error, so a typo in a recipe cannot
silently fall back to a default.
"""
import argparse
import difflib
import logging
import sys

import yaml

import distillers
from .errors import UserError
from .yaml_file import load_yaml

_logger = logging.getLogger(__name__)

DATASETS = ('cifar100', 'imagenet', 'folder', 'digits', 'fake')


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: what was wrong and where to look."""

    def error(self, message):
        ignored = [f'--{key.replace("_", "-")}' for key in REFERENCE_RUN_STATE
                   if f'--{key.replace("_", "-")}' in message.split()]
        if ignored:
            message += (f" ({', '.join(ignored)}: state that the OFA-KD / RSD train.py records, with no meaning here; "
                        f"--amp is the mixed-precision flag)")
        self.exit(2, f'error: {message}; see {self.prog} --help\n')


class ParseKwargs(argparse.Action):
    """`--model-kwargs depth=6 embed_dim=96` -> {'depth': 6, 'embed_dim': 96} (values parsed as YAML)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            if '=' not in item:
                parser.error(f"{option_string} expects key=value pairs, got '{item}'")
            key, value = item.split('=', 1)
            kwargs[key] = yaml.safe_load(value)
        setattr(namespace, self.dest, kwargs)


def add_data_arguments(parser):
    group = parser.add_argument_group('Data')
    group.add_argument('data_dir', nargs='?', default='', metavar='DATA',
                       help='dataset folder (not needed for --dataset digits or fake)')
    group.add_argument('--dataset', '-d', default='', choices=('',) + DATASETS, metavar='{' + ','.join(DATASETS) + '}',
                       help='cifar100: torchvision CIFAR-100 files; imagenet/folder: DATA/train and DATA/val '
                            'ImageFolders; digits: scikit-learn digits (offline); fake: synthetic images '
                            '(default: what DATA holds, cifar-100-python/ or train/ + val/)')
    group.add_argument('--dataset-download', action=argparse.BooleanOptionalAction, default=True,
                       help='download CIFAR-100 (checksums verified) into DATA when it is missing, as the reference '
                            'does; --no-dataset-download forbids it')
    group.add_argument('--fake-samples', type=int, default=256, help='training images of --dataset fake')
    group.add_argument('--train-subset', type=int, default=0,
                       help='train on a fixed subset of this many images (0: all)')
    group.add_argument('--num-classes', type=int, default=None, help='classes (default: the dataset\'s)')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N',
                       help='input image size C H W (default: the student\'s)')
    group.add_argument('--img-size', type=int, default=None, help='input image size (square)')
    group.add_argument('--crop-pct', type=float, default=None,
                       help='eval centre-crop fraction (default: the student\'s timm data configuration)')
    group.add_argument('--mean', type=float, nargs=3, default=None,
                       help='normalisation mean (default: CIFAR-100\'s for cifar100, else the model\'s or the set\'s)')
    group.add_argument('--std', type=float, nargs=3, default=None,
                       help='normalisation std (default: CIFAR-100\'s for cifar100, else the model\'s or the set\'s)')
    group.add_argument('--interpolation', default=None,
                       help='resize interpolation for evaluation (default: the student\'s)')
    group.add_argument('-b', '--batch-size', type=int, default=128, help='batch size per process')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None,
                       help='evaluation batch size per process (default: --batch-size)')
    group.add_argument('-j', '--workers', type=int, default=4, help='data loading processes per training process')
    group.add_argument('--pin-mem', action='store_true', help='pin loader memory (faster host-to-GPU copies)')
    return group


def add_runtime_arguments(parser):
    group = parser.add_argument_group('Runtime')
    group.add_argument('--amp', action='store_true', help='mixed precision (autocast), on GPU and CPU')
    group.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'),
                       help='autocast dtype (default: float16 on GPU, with a gradient scaler; bfloat16 on CPU)')
    group.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    group.add_argument('--torchcompile', action='store_true',
                       help='torch.compile the training step (student, teacher, losses) and evaluation')
    group.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    group.add_argument('--local-rank', '--local_rank', type=int, default=None, dest='local_rank',
                       help='set by torch.distributed.launch; the LOCAL_RANK variable is used otherwise')
    group.add_argument('--seed', type=int, default=42, help='random seed')
    return group


def build_parser():
    parser = ArgumentParser(
        description='Cross-architecture knowledge distillation (OFA, RSD, HCD, KD, DKD, DIST) on timm models.')
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of flag defaults')
    add_data_arguments(parser)

    group = parser.add_argument_group('Models')
    group.add_argument('--model', default='resnet18', help='student: a timm model name')
    group.add_argument('--pretrained', action='store_true', help='start the student from pretrained weights')
    group.add_argument('--pretrained-path', default='',
                       help='local file for --pretrained (instead of the timm hub)')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra keyword arguments for the student, key=value')
    group.add_argument('--drop', type=float, default=0.0, help='student dropout rate')
    group.add_argument('--drop-path', type=float, default=None, help='student drop-path rate')
    group.add_argument('--drop-connect', type=float, default=None,
                       help="the reference's old name of --drop-path (used when --drop-path is not given)")
    group.add_argument('--drop-block', type=float, default=None, help='student drop-block rate (CNNs that have it)')
    group.add_argument('--gp', default=None, help="student global pool type (timm's global_pool; default: the model's)")
    group.add_argument('--teacher', default='', help='teacher: a timm model name')
    group.add_argument('--teacher-pretrained', default='', metavar='FILE', help='teacher weights file')
    group.add_argument('--use-ema-teacher', action='store_true',
                       help="take the teacher's EMA weights (state_dict_ema) from --teacher-pretrained")
    group.add_argument('--teacher-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra keyword arguments for the teacher, key=value')
    group.add_argument('--teacher-dtype', default=None, choices=('float32', 'bfloat16', 'float16'),
                       help="keep the frozen teacher's weights in this dtype (default: the AMP dtype under --amp, "
                            "else float32); its outputs are cast back to float32 before any loss")
    group.add_argument('--eval-teacher', action='store_true',
                       help='evaluate the teacher on the validation set before training')
    group.add_argument('--teacher-cache', default='', metavar='DIR',
                       help="read the teacher's outputs of each epoch from DIR when a run of the same key wrote "
                            "them, else run the teacher and write them there (see README, Teacher cache)")
    group.add_argument('--teacher-cache-dtype', default='float32', choices=('float32', 'float16', 'bfloat16'),
                       help='how the cache stores the outputs: float32 is exact; the others halve the disk')
    group.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm for the student (distributed)')
    group.add_argument('--dist-bn', default='reduce', choices=('reduce', 'broadcast', ''),
                       help="after each epoch, before evaluation, average ('reduce') or copy from rank 0 "
                            "('broadcast') the BatchNorm statistics of all processes; '' keeps each rank's own")

    group = parser.add_argument_group('Distillation')
    group.add_argument('--distiller', default='vanilla',
                       help=f'method: one of {", ".join(distillers.distiller_names())}')
    group.add_argument('--gt-loss-weight', type=float, default=1.0, help='weight of the ground-truth loss')
    group.add_argument('--kd-loss-weight', type=float, default=1.0, help='weight of the logit distillation loss')
    group.add_argument('--kd-temperature', type=float, default=1.0, help='temperature of KD')
    for name in distillers.distiller_names():
        distillers.get_distiller(name).add_arguments(parser.add_argument_group(f'{name} distiller'))

    group = parser.add_argument_group('Optimizer and schedule')
    group.add_argument('--epochs', type=int, default=300)
    group.add_argument('--opt', default='sgd', help='timm optimizer name (sgd is Nesterov SGD)')
    group.add_argument('--opt-eps', type=float, default=None)
    group.add_argument('--opt-betas', type=float, nargs='+', default=None)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=2e-5)
    group.add_argument('--clip-grad', type=float, default=None, help='gradient clipping threshold')
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    group.add_argument('--lr', type=float, default=0.05, help='learning rate (for the per-process batch times '
                                                              'the world size; scale it yourself)')
    group.add_argument('--sched', default='cosine', help='timm scheduler name')
    group.add_argument('--sched-on-updates', action='store_true', help='step the schedule every update')
    group.add_argument('--min-lr', type=float, default=1e-6)
    group.add_argument('--warmup-lr', type=float, default=1e-4)
    group.add_argument('--warmup-epochs', type=int, default=0)
    group.add_argument('--cooldown-epochs', type=int, default=0)
    group.add_argument('--decay-epochs', type=float, default=100)
    group.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1)
    group.add_argument('--patience-epochs', type=int, default=10, help='plateau schedule: epochs without improvement')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='PCT',
                       help='learning-rate noise on (and off) as fractions or epochs of the schedule')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, help='learning-rate noise limit')
    group.add_argument('--lr-noise-std', type=float, default=1.0, help='learning-rate noise std')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, help='cosine cycle length multiplier')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, help='learning-rate decay per cosine cycle')
    group.add_argument('--lr-cycle-limit', type=int, default=1, help='number of cosine cycles')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='k-decay of cosine/poly schedules')

    group = parser.add_argument_group('Augmentation and regularisation')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (0: off)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (0: off)')
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    group.add_argument('--aa', default=None, help='timm AutoAugment/RandAugment policy, e.g. rand-m9-mstd0.5-inc1')
    group.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    group.add_argument('--remode', default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--color-jitter', type=float, default=0.4)
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    group.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='random-resized-crop scale')
    group.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.], help='random-resized-crop ratio')
    group.add_argument('--train-interpolation', default='random',
                       help="training interpolation: random (the reference's default), bilinear, bicubic; "
                            "'' for the student's own")
    group.add_argument('--model-ema', action='store_true', help='keep an EMA of the student weights')
    group.add_argument('--model-ema-decay', type=float, nargs='+', default=[0.9998],
                       help='EMA decay; several values keep several EMAs, each evaluated, saved and resumed')
    group.add_argument('--bce-loss', action='store_true',
                       help="binary cross-entropy (timm's BinaryCrossEntropy) as the ground-truth loss")
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='binarise the (smoothed or mixed) BCE targets at this threshold')

    group = parser.add_argument_group('Output and checkpoints')
    group.add_argument('--output', default='./output', help='parent folder of the run folders')
    group.add_argument('--experiment', default='', help='run folder name (default: from dataset, method, models)')
    group.add_argument('--resume', default='', metavar='PATH',
                       help="checkpoint to continue from, or 'auto' for the run's last.pth.tar")
    group.add_argument('--checkpoint-hist', type=int, default=3, help='how many best checkpoints to keep')
    group.add_argument('--log-interval', type=int, default=50, help='steps between progress lines')
    group.add_argument('--eval-interval', type=int, default=1, help='epochs between evaluations')
    group.add_argument('--log-wandb', action='store_true', help='also log to Weights & Biases (needs wandb)')

    add_loader_arguments(parser)
    add_runtime_arguments(parser)
    add_reference_arguments(parser)
    return parser


def add_loader_arguments(parser):
    """The data-path flags of the reference train.py (and --device-resize, ours)."""
    group = parser.add_argument_group('Data path')
    group.add_argument('--no-prefetcher', action='store_true',
                       help='make float batches on the host (normalised in the workers) instead of uint8 batches '
                            'normalised on the device')
    group.add_argument('--device-resize', default='auto', choices=('auto', 'on', 'off'),
                       help='crop, resize and flip small images (CIFAR, digits, fake) on the device; auto: where '
                            'the images are smaller than the input size')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='repeated augmentation: each image this many times per epoch, spread over processes '
                            "(timm's RepeatAugSampler; 0: off)")
    group.add_argument('--mixup-off-epoch', type=int, default=0, help='turn mixup/cutmix off from this epoch (0: never)')
    group.add_argument('--cutmix-minmax', type=float, nargs=2, default=None,
                       help='cutmix box ratio min and max (timm Mixup; replaces the cutmix alpha when set)')
    return group


# Flags of the OFA-KD / RSD train.py that mean nothing here, each accepted at the reference's default so
# that its command lines and its args.yaml parse; any other value is an error saying what to do instead.
UNSUPPORTED_REFERENCE_FLAGS = {
    # flag: (type, nargs or None, reference default, what to do instead)
    'speedtest': (bool, None, False, 'time a step with bench/step.py'),
    'eval-interval-end': (float, None, 0.75, 'use --eval-interval'),
    'train-split': (str, None, 'train', 'put the training images in DATA/train'),
    'val-split': (str, None, 'validation', 'put the validation images in DATA/val'),
    'class-map': (str, None, '', 'name the class folders as the classes'),
    'initial-checkpoint': (str, None, '', 'use --pretrained --pretrained-path FILE'),
    'layer-decay': (float, None, None, 'not supported for distillers, whose extra modules have no layer order'),
    'epoch-repeats': (float, None, 0.0, 'raise --epochs instead'),
    'start-epoch': (int, None, None, 'use --resume, which restores the epoch'),
    'no-aug': (bool, None, False, 'set --scale 1 1 --ratio 1 1 --hflip 0 --color-jitter 0'),
    'vflip': (float, None, 0.0, 'not supported'),
    'aug-splits': (int, None, 0, 'AugMix splits are not supported'),
    'jsd-loss': (bool, None, False, 'AugMix splits are not supported'),
    'resplit': (bool, None, False, 'AugMix splits are not supported'),
    'split-bn': (bool, None, False, 'AugMix splits are not supported'),
    'bn-momentum': (float, None, None, 'not supported'),
    'bn-eps': (float, None, None, 'not supported'),
    'model-ema-force-cpu': (bool, None, False, 'EMAs stay on the training device'),
    'worker-seeding': (str, None, 'all', 'workers are always seeded from (seed, epoch, rank)'),
    'recovery-interval': (int, None, 0, 'a killed run resumes from its last epoch with --resume auto'),
    'save-images': (bool, None, False, 'not supported'),
    'no-ddp-bb': (bool, None, False, 'DDP always broadcasts buffers'),
    'eval-metric': (str, None, 'top1', 'the best checkpoints are chosen by top-1'),
    'tta': (int, None, 0, 'not supported'),
    'dist-url': (str, None, 'env://', 'set MASTER_ADDR and MASTER_PORT'),
    'use-multi-epochs-loader': (bool, None, False, 'not supported'),
}

# Keys that the reference's args.yaml records about its run (not flags here): skipped in a YAML file with one
# warning; on the command line they are unknown flags.
REFERENCE_RUN_STATE = ('apex_amp', 'native_amp', 'torchscript', 'local_rank', 'rank', 'world_size', 'distributed',
                       'prefetcher', 'device')


def add_reference_arguments(parser):
    """The rest of the OFA-KD / RSD train.py's flags: those that mean nothing here, accepted only at the
    reference's defaults (its baseline methods' flags are declared by their distillers)."""
    group = parser.add_argument_group('Flags of the OFA-KD / RSD train.py')
    for flag, (kind, nargs, default, instead) in UNSUPPORTED_REFERENCE_FLAGS.items():
        help_text = f'reference flag, accepted at its default only: {instead}'
        names = [f'--{flag}'] + (['--dist_url'] if flag == 'dist-url' else [])  # the reference spells it so
        if kind is bool:
            group.add_argument(*names, action='store_true', help=help_text)
        else:
            group.add_argument(*names, type=kind, nargs=nargs, default=default, help=help_text)


def yaml_defaults(parser, path):
    """Turn a YAML file into argparse defaults, rejecting keys that no flag knows."""
    actions = {action.dest: action for action in parser._actions}
    known = set(actions) - {'help', 'config'}
    defaults, run_state = {}, []
    for key, value in load_yaml(path).items():
        dest = str(key).replace('-', '_')
        if dest in REFERENCE_RUN_STATE and not _our_value(dest, value):
            run_state.append(str(key))
            continue
        if dest in DERIVED_KEYS:
            continue
        if dest not in known:
            close = difflib.get_close_matches(dest, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else '; see train.py --help for the flags'
            raise UserError(f"config '{path}': unknown key '{key}' (no flag --{dest.replace('_', '-')}){hint}")
        if actions[dest].nargs in ('+', '*') and value is not None and not isinstance(value, (list, dict)):
            value = [value]  # `ofa_eps: 1.5` means the one-element list of `--ofa-eps 1.5`
        defaults[dest] = value
    if run_state:
        _logger.warning(f"config '{path}': ignored {', '.join(run_state)}: the OFA-KD / RSD train.py records them "
                        f"about its own run; here they follow from the launcher and --amp")
    return defaults


def _our_value(dest, value):
    """`device` is also our flag; the reference records a CUDA index there (0, 'cuda:0'), which is not."""
    return dest == 'device' and value in (None, 'cpu', 'cuda')


# Filled in by train.py after parsing; kept out of args.yaml so that the file works as a --config.
DERIVED_KEYS = ('device_type', 'world_size', 'output_dir', 'config', 'local_rank')


def run_arguments(args):
    """The merged arguments as plain YAML-able values, for args.yaml."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in DERIVED_KEYS}


def parse_args(argv=None, parser=None):
    """Merge `--config` YAML defaults with the command line; the command line wins."""
    parser = parser or build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**yaml_defaults(parser, known.config))
    return parser.parse_args(argv)


def command_line_dests(argv, parser=None):
    """The destinations of the flags written on the command line (not those a --config file set)."""
    parser = parser or build_parser()
    dests = set()
    for token in sys.argv[1:] if argv is None else argv:
        if token == '--':
            break
        action = parser._option_string_actions.get(token.split('=', 1)[0]) if token.startswith('--') else None
        if action is not None:
            dests.add(action.dest)
    return dests


def distiller_flags(name):
    """The dests of the flags a distiller declares itself."""
    parser = argparse.ArgumentParser(add_help=False)
    distillers.get_distiller(name).add_arguments(parser)
    return {action.dest for action in parser._actions}


def command_line_warnings(args, argv):
    """Flags written on the command line that the chosen distiller does not read, one warning each; a teacher
    given to a method that trains the student alone is an error (it would never be read)."""
    given = command_line_dests(argv)
    method = distillers.get_distiller(args.distiller)
    warnings = []
    named = sorted(given & {'teacher', 'teacher_pretrained', 'teacher_kwargs', 'use_ema_teacher'})
    if named and not method.requires_teacher:
        flags = ', '.join(f"--{dest.replace('_', '-')}" for dest in named)
        chosen = 'distiller' in given or (args.config and 'distiller' in load_yaml(args.config))
        if not chosen:  # the default: the user most likely forgot --distiller
            raise UserError(f'{flags} given, but no --distiller: the default, vanilla, trains the student alone and '
                            f'never reads the teacher; add --distiller (kd, ofa, rsd, ...; the OFA-KD default was '
                            f'ofa) or leave out the teacher flags')
        warnings.append(f'{flags} has no effect with --distiller {args.distiller}, which trains the student alone')
    flags_of = {name: distiller_flags(name) for name in distillers.distiller_names()}
    own = flags_of[args.distiller]
    for dest in sorted(given):
        owners = [name for name, flags in flags_of.items() if name != args.distiller and dest in flags]
        unread = dest in SHARED_METHOD_FLAGS and dest not in method.reads_shared_flags
        if not (owners or unread):
            continue
        flag = '--' + dest.replace('_', '-')
        suffix = dest.split('_', 1)[-1]
        counts = sorted(f"--{other.replace('_', '-')}" for other in own if other.split('_', 1)[-1] == suffix)
        whose = f"a flag of --distiller {' / '.join(owners)}" if owners else 'not read by this method'
        warnings.append(f"{flag} has no effect with --distiller {args.distiller} ({whose})"
                        + (f"; the flag that counts here is {' '.join(counts)}" if counts else ''))
    return warnings


# Flags that several methods share; each distiller lists those it reads in `reads_shared_flags`.
SHARED_METHOD_FLAGS = ('kd_temperature', 'kd_loss_weight')


# timm's scheduler names (create_scheduler_v2); anything else fails there after the models are built.
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'rsqrt', 'constant')


def check_ranges(args):
    """Rates, probabilities, sizes and names that torch or timm would reject with a traceback mid-run, or
    accept and silently misuse (a probability of 2 is 'always'; a momentum of 1 or more diverges)."""
    def flag(dest):
        return '--' + dest.replace('_', '-')

    rates = ('drop', 'drop_path', 'drop_connect', 'drop_block', 'reprob', 'hflip', 'mixup_prob', 'mixup_switch_prob')
    for dest in rates:
        value = getattr(args, dest, None)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f'{flag(dest)} is a probability, in [0, 1]; got {value}')
    if args.momentum is not None and args.momentum >= 1:
        raise UserError(f'--momentum {args.momentum} is not below 1: SGD would diverge; the recipes use 0.9')
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UserError(f'--crop-pct is the share of the resized image kept by the centre crop, in (0, 1]; '
                        f'got {args.crop_pct}')
    if args.img_size is not None and args.img_size < 1:
        raise UserError(f'--img-size must be a positive number of pixels, got {args.img_size}')
    if args.input_size is not None and (args.input_size[0] != 3 or min(args.input_size) < 1):
        raise UserError(f'--input-size is channels height width, with 3 channels (the images are RGB); got '
                        f"{' '.join(map(str, args.input_size))}")
    for dest in ('scale', 'ratio'):
        low, high = getattr(args, dest)
        if not 0 < low <= high:
            raise UserError(f'{flag(dest)} is a range MIN MAX with 0 < MIN <= MAX; got {low} {high}')
    from timm.data.transforms import _str_to_pil_interpolation as interpolations
    for dest, extra in (('interpolation', ('',)), ('train_interpolation', ('', 'random'))):
        value = getattr(args, dest, '') or ''
        if value not in (*extra, *interpolations):
            raise UserError(f"{flag(dest)} '{value}' is not an interpolation; use one of "
                            f"{', '.join(extra[1:] + tuple(interpolations))} (or '' for the model's)")
    if args.aa:
        from timm.data import create_transform
        try:  # timm parses the policy string when the transform is built: try it on a tiny size now
            create_transform(8, is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            raise UserError(f"--aa '{args.aa}' is not a policy timm knows ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:120]}); e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, "
                            f"original") from None
    if args.sched not in SCHEDULERS:
        raise UserError(f"--sched '{args.sched}' is not a timm scheduler; use one of {', '.join(SCHEDULERS)}")
    from timm.optim import list_optimizers
    known = list_optimizers()
    if args.opt.lower() not in known and args.opt.lower().split('_')[-1] not in known:
        close = difflib.get_close_matches(args.opt.lower(), known, n=3)
        raise UserError(f"--opt '{args.opt}' is not a timm optimizer" +
                        (f"; close names: {', '.join(close)}" if close else '') + ' (sgd, adamw, lamb, ...)')


def mixup_active(args):
    """Whether timm's Mixup runs on each training batch (mixup, cutmix or a cutmix box range is on)."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_args(args):
    """Range checks on the merged arguments, before anything heavy is built."""
    if args.dataset and args.dataset not in DATASETS:
        raise UserError(f"unknown dataset type '{args.dataset}'; known: {', '.join(DATASETS)}")
    for flag, (_, _, default, instead) in UNSUPPORTED_REFERENCE_FLAGS.items():
        value = getattr(args, flag.replace('-', '_'))
        if value != default:
            raise UserError(f"--{flag} {value}: this flag of the OFA-KD / RSD train.py is accepted only at its default "
                            f"({default!r}) here; {instead}")
    if args.dist_bn not in ('reduce', 'broadcast', ''):  # a YAML config bypasses argparse's choices
        raise UserError(f"--dist-bn must be reduce, broadcast or '' (empty), got '{args.dist_bn}'")
    try:
        distiller_class = distillers.get_distiller(args.distiller)
    except distillers.UnknownDistillerError as e:
        raise UserError(str(e)) from None
    positive = {'epochs': args.epochs, 'batch_size': args.batch_size, 'log_interval': args.log_interval,
                'eval_interval': args.eval_interval, 'checkpoint_hist': args.checkpoint_hist,
                'fake_samples': args.fake_samples}
    for name, value in positive.items():
        if value is None or value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    non_negative = {'lr': args.lr, 'weight_decay': args.weight_decay, 'warmup_epochs': args.warmup_epochs,
                    'smoothing': args.smoothing, 'mixup': args.mixup, 'cutmix': args.cutmix,
                    'reprob': args.reprob, 'workers': args.workers, 'train_subset': args.train_subset,
                    'gt_loss_weight': args.gt_loss_weight, 'kd_loss_weight': args.kd_loss_weight,
                    'min_lr': args.min_lr, 'warmup_lr': args.warmup_lr, 'color_jitter': args.color_jitter,
                    'momentum': args.momentum}
    for name, value in non_negative.items():
        if value is not None and value < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if args.clip_grad is not None and not args.clip_grad > 0:
        # timm scales every gradient by clip / norm: a negative threshold ascends, zero never learns.
        raise UserError(f'--clip-grad must be positive, got {args.clip_grad} (a negative threshold reverses every '
                        f'gradient, 0 stops learning); leave it out for no clipping')
    if args.min_lr > args.lr:
        raise UserError(f'--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the schedule would rise instead of '
                        f'decay; give a --min-lr below --lr (the recipes use about lr / 50)')
    if args.warmup_epochs and args.warmup_epochs >= args.epochs:
        where = f" (from '{args.config}')" if args.config else ''
        raise UserError(f'--warmup-epochs {args.warmup_epochs}{where} is not below --epochs {args.epochs}: the run '
                        f'would never leave warm-up; give fewer --warmup-epochs (e.g. --warmup-epochs 0 for a '
                        f'short test run) or more --epochs')
    if mixup_active(args) and args.batch_size % 2:
        # timm's Mixup pairs each image with its mirror in the batch and asserts an even length mid-step.
        raise UserError(f'--batch-size {args.batch_size} is odd, but mixup/cutmix is on (--mixup {args.mixup}, '
                        f'--cutmix {args.cutmix}, from the command line or the --config recipe): mixup pairs '
                        f'images inside a batch, so use an even --batch-size (e.g. {args.batch_size + 1}) or '
                        f'--mixup 0 --cutmix 0')
    check_ranges(args)
    if args.kd_temperature <= 0:
        raise UserError(f'--kd-temperature must be positive, got {args.kd_temperature}')
    if not 0 <= args.smoothing < 1:
        raise UserError(f'--smoothing must be in [0, 1), got {args.smoothing}')
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f'--num-classes must be positive, got {args.num_classes}')
    if args.model_ema and not all(0 < decay < 1 for decay in args.model_ema_decay):
        raise UserError(f'--model-ema-decay values must be in (0, 1), got {args.model_ema_decay}')
    if args.model_ema and len(set(args.model_ema_decay)) != len(args.model_ema_decay):
        raise UserError(f'--model-ema-decay lists a decay twice: {args.model_ema_decay}')
    if args.bce_target_thresh is not None and not 0 <= args.bce_target_thresh <= 1:
        raise UserError(f'--bce-target-thresh must be in [0, 1], got {args.bce_target_thresh}')
    if args.log_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError('--log-wandb needs the wandb package (pip install wandb); leave the flag out '
                            'to log to TensorBoard and summary.csv only') from None
    try:
        distiller_class.check_args(args)
    except ValueError as e:
        raise UserError(str(e)) from None
