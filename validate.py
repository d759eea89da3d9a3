#!/usr/bin/env python3
"""Evaluate a checkpoint and print one JSON line: top1, top5, loss, count.

    python validate.py data/cifar100 --dataset cifar100 --num-classes 100 \
        --model swin_tiny_patch4_window7_224 --checkpoint pretrained/swin_tiny_patch4_window7_224_cifar100.pth

The checkpoint is one written by train.py (its student; `--use-ema` for the EMA weights) or a plain
timm/torch state dict, wrapped under `state_dict`/`model` or not, with or without `module.` prefixes.
Flags left out are taken from the arguments a train.py checkpoint carries (model, classes, input size).
"""
import json
import sys

import torch

from xkd import data, distributed, engine, models
from xkd.config import DATASETS, ArgumentParser, ParseKwargs, add_data_arguments, add_runtime_arguments
from xkd.errors import UserError
from xkd.run import resolve_amp_dtype, resolve_input_size, run_cli


def build_parser():
    parser = ArgumentParser(description='Evaluate a checkpoint on a validation set.')
    add_data_arguments(parser)
    add_runtime_arguments(parser)
    parser.add_argument('--model', default=None, help='timm model name (default: the checkpoint\'s)')
    parser.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs,
                        help='extra keyword arguments for the model, key=value (default: the checkpoint\'s)')
    parser.add_argument('--checkpoint', required=True, help='file to evaluate')
    parser.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of a train.py checkpoint')
    parser.set_defaults(dataset=None, batch_size=256, workers=2)
    return parser


def read_checkpoint(path):
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--checkpoint '{path}' does not exist") from None
    except Exception as e:
        raise UserError(f"--checkpoint '{path}' cannot be read ({type(e).__name__}); is the file complete?") from None


def main(argv=None):
    args = build_parser().parse_args(argv)
    checkpoint = read_checkpoint(args.checkpoint)
    saved = checkpoint.get('args', {}) if isinstance(checkpoint, dict) else {}
    args.model = args.model or saved.get('model')
    args.dataset = args.dataset or saved.get('dataset') or 'imagenet'
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset type '{args.dataset}'; known: {', '.join(DATASETS)}")
    args.num_classes = args.num_classes or saved.get('num_classes')
    if not args.input_size and not args.img_size and saved.get('input_size'):
        args.input_size = saved['input_size']
    model_kwargs = args.model_kwargs if args.model_kwargs is not None else saved.get('model_kwargs', {})
    models.check_model_name(args.model)
    if args.use_ema and 'state_dict_ema' not in checkpoint:
        raise UserError(f"--use-ema: '{args.checkpoint}' has no EMA weights (train with --model-ema)")

    env = distributed.init_distributed(args.local_rank, args.device)
    _, val_set = data.create_datasets(args)
    args.num_classes = args.num_classes or data.dataset_num_classes(args, val_set)
    args.input_size = resolve_input_size(args, args.model)
    model = models.create_model(args.model, args.num_classes, args.input_size, **model_kwargs)
    state_dict = models.unwrap_state_dict(checkpoint, use_ema=args.use_ema)
    models.load_weights(model, state_dict, args.model, args.checkpoint, args.num_classes, '--checkpoint')
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    args.amp_dtype = resolve_amp_dtype(args, env.device)

    loader = data.create_eval_loader(data.TransformedDataset(val_set, data.eval_transform(data.data_config(args))),
                                     args.validation_batch_size or args.batch_size, args.workers,
                                     env.rank, env.world_size, args.pin_mem)
    metrics = engine.evaluate(model, loader, args, env)
    if env.is_main:
        print(json.dumps({'model': args.model, 'checkpoint': args.checkpoint, 'top1': round(metrics['top1'], 4),
                          'top5': round(metrics['top5'], 4), 'loss': round(metrics['loss'], 6),
                          'count': metrics['count']}), flush=True)
    distributed.cleanup(env)
    return metrics


if __name__ == '__main__':
    sys.exit(run_cli(main))
