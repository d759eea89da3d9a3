"""Set-up of a run shared by train.py and validate.py: input size, output folder, seeding, CLI errors."""
import logging
import os
import random
import sys

import numpy as np
import timm
import torch

from .errors import UserError

_logger = logging.getLogger(__name__)


def resolve_input_size(args, model_name):
    """--input-size, else --img-size, else the student's own default size."""
    if args.input_size:
        return tuple(args.input_size)
    if args.img_size:
        return (3, args.img_size, args.img_size)
    return tuple(timm.get_pretrained_cfg_value(model_name, 'input_size') or (3, 224, 224))


def resolve_amp_dtype(args, device):
    """--amp-dtype, else float16 on GPU (with a gradient scaler) and bfloat16 on CPU."""
    return args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')


def default_experiment(args):
    name = f'{args.dataset}-{args.distiller}-{args.model}'
    if args.teacher and args.distiller != 'vanilla':
        name += f'-from-{args.teacher}'
    return name


def output_folder(args):
    """The run folder: `--output/--experiment`; a fresh run never writes into another run's folder."""
    base = os.path.join(args.output or './output', args.experiment or default_experiment(args))
    if args.resume or not os.path.exists(os.path.join(base, 'last.pth.tar')):
        return base
    if args.experiment:
        raise UserError(f"run folder '{base}' already holds a run; continue it with --resume auto, "
                        f"or choose another --experiment (e.g. {args.experiment}-seed{args.seed + 1})")
    suffix = 1
    while os.path.exists(f'{base}-{suffix}'):
        suffix += 1
    return f'{base}-{suffix}'


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def run_cli(main, argv=None):
    """Run `main`; a UserError becomes one line on stderr and exit status 2, with no traceback."""
    try:
        main(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    return 0
