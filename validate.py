#!/usr/bin/env python3
"""Evaluate a checkpoint and print one JSON line: top1, top5, loss, count, and the protocol behind them
(img_size, crop_pct, interpolation, mean, std) with the model's param_count in millions.

    python validate.py data/cifar100 --dataset cifar100 --num-classes 100 \
        --model swin_tiny_patch4_window7_224 --checkpoint pretrained/swin_tiny_patch4_window7_224_cifar100.pth

The checkpoint is one written by train.py (its student; `--use-ema` for the EMA weights, falling back to
the plain weights with a warning when there are none, as timm's validate.py does), one written by the
reference code bases' timm CheckpointSaver, or a plain timm/torch state dict, wrapped under `state_dict`/`model`
or not, with or without `module.` prefixes; older timm layouts are converted (see xkd.models.load_weights).
Flags left out are taken from the arguments a checkpoint carries (model, classes, input size).
`--results-file FILE` appends the JSON line to FILE as well, one line per evaluation.
"""
import argparse
import json
import os
import sys

import torch

from xkd import data, distributed, engine, models
from xkd.config import DATASETS, ArgumentParser, ParseKwargs, add_data_arguments, add_runtime_arguments
from xkd.errors import UserError
from xkd.logger import setup_logging
from xkd.run import resolve_amp_dtype, resolve_input_size, run_cli


def build_parser():
    parser = ArgumentParser(description='Evaluate a checkpoint on a validation set.')
    add_data_arguments(parser)
    add_runtime_arguments(parser)
    parser.add_argument('--model', default=None, help='timm model name (default: the checkpoint\'s)')
    parser.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs,
                        help='extra keyword arguments for the model, key=value (default: the checkpoint\'s)')
    parser.add_argument('--checkpoint', required=True, help='file to evaluate')
    parser.add_argument('--use-ema', action='store_true',
                        help='evaluate the EMA weights of a checkpoint (its plain weights, with a warning, if none)')
    parser.add_argument('--results-file', default='', metavar='FILE',
                        help='also append the JSON line to FILE')
    parser.set_defaults(dataset=None, batch_size=256, workers=2)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.results_file and os.path.isdir(args.results_file):
        raise UserError(f"--results-file '{args.results_file}' is a folder; give a file path (the JSON line is "
                        f"appended to it), e.g. {os.path.join(args.results_file, 'results.jsonl')}")
    if args.results_file and not os.path.isdir(os.path.dirname(os.path.abspath(args.results_file))):
        raise UserError(f"--results-file '{args.results_file}': its folder does not exist; create it first")
    checkpoint = models.read_checkpoint(args.checkpoint, '--checkpoint')
    saved = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved or {}  # the reference saver's Namespace
    args.model = args.model or saved.get('model')
    args.dataset = args.dataset or saved.get('dataset') or 'imagenet'
    if args.dataset not in DATASETS:
        raise UserError(f"unknown dataset type '{args.dataset}'; known: {', '.join(DATASETS)}")
    given_classes = args.num_classes
    args.num_classes = args.num_classes or saved.get('num_classes')
    if not args.input_size and not args.img_size and saved.get('input_size'):
        args.input_size = saved['input_size']
    model_kwargs = args.model_kwargs if args.model_kwargs is not None else saved.get('model_kwargs', {})
    models.check_model_name(args.model)

    env = distributed.init_distributed(args.local_rank, args.device)
    setup_logging(is_main=env.is_main)
    _, val_set = data.create_datasets(args)
    # A classifier of another class count scores 0 (or nonsense) on this data: refuse rather than print it.
    args.num_classes = data.check_num_classes(
        args, val_set, '--num-classes' if given_classes else f"the checkpoint's run had --num-classes")
    args.input_size = resolve_input_size(args, args.model)
    model = models.create_model(args.model, args.num_classes, args.input_size, **model_kwargs)
    state_dict = models.checkpoint_state_dict(checkpoint, args.checkpoint, '--checkpoint', use_ema=args.use_ema)
    models.load_weights(model, state_dict, args.model, args.checkpoint, args.num_classes, '--checkpoint')
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    args.amp_dtype = resolve_amp_dtype(args, env.device)

    data_config = data.data_config(args)
    loader = data.create_eval_loader(data.TransformedDataset(val_set, data.eval_transform(data_config)),
                                     args.validation_batch_size or args.batch_size, args.workers,
                                     env.rank, env.world_size, args.pin_mem)
    metrics = engine.evaluate(model, loader, args, env)
    if env.is_main:
        report_line(args, metrics, data_config, models.count_parameters(model.parameters()))
    distributed.cleanup(env)
    return metrics


def report_line(args, metrics, data_config, param_count):
    """The JSON line on stdout (and appended to --results-file): the numbers with the protocol that gave them,
    the keys named as in timm's validate.py results (param_count in millions, img_size the square side)."""
    line = json.dumps({
        'model': args.model, 'checkpoint': args.checkpoint, 'top1': round(metrics['top1'], 4),
        'top5': round(metrics['top5'], 4), 'loss': round(metrics['loss'], 6), 'count': metrics['count'],
        'param_count': round(param_count / 1e6, 4), 'img_size': data_config['input_size'][-1],
        'crop_pct': data_config['crop_pct'], 'interpolation': data_config['interpolation'],
        'mean': list(data_config['mean']), 'std': list(data_config['std'])})
    print(line, flush=True)
    if args.results_file:
        with open(args.results_file, 'a') as f:
            f.write(line + '\n')


if __name__ == '__main__':
    sys.exit(run_cli(main))
