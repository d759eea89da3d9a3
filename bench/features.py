"""Cost of `forward_features` against a plain `model(x)`, per model family.

Both run on the same input, in eval mode without gradients, interleaved (alternating which goes first)
after a warm-up. `ratio` is the median over repetitions of the ratio within each adjacent pair, so that
changes in machine load between repetitions cancel out; the times are medians too. `best ratio` is the
ratio of the fastest repetitions, the least disturbed by other processes on a shared machine. The
ratio should stay at or below 1.05: one pass, no extra norm, pool or copy of note.

    python bench/features.py                      # the default families, 224 px, batch 4, one thread
    python bench/features.py --img-size 160 --batch-size 2 --reps 5 --models resnet18 swin_tiny_patch4_window7_224
"""
import argparse
import os
import statistics
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import custom_model  # noqa: E402,F401  (lets --models name the custom and demo models)
from custom_forward import forward_features  # noqa: E402

DEFAULT_MODELS = [
    'resnet18', 'mobilenetv2_100', 'convnext_tiny', 'deit_tiny_patch16_224',
    'swin_tiny_patch4_window7_224', 'resmlp_12_224',
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--reps', type=int, default=11, help='timed repetitions of each call')
    parser.add_argument('--warmup', type=int, default=2, help='untimed repetitions of each call first')
    # One thread by default: the ratio is what is measured, and a single thread is far less disturbed
    # than two spinning ones when the machine's cores are shared with other processes.
    parser.add_argument('--threads', type=int, default=1, help="torch threads; 0 keeps torch's default")
    return parser.parse_args()


def seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def compare(model, x, reps, warmup):
    """Median seconds of model(x) and of forward_features(model, x), median ratio and ratio of minima."""
    calls = {'plain': lambda: model(x), 'features': lambda: forward_features(model, x)}
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for rep in range(reps):
        order = list(calls) if rep % 2 == 0 else list(reversed(calls))
        for name in order:
            times[name].append(seconds(calls[name]))
    ratios = [features / plain for plain, features in zip(times['plain'], times['features'])]
    return (statistics.median(times['plain']), statistics.median(times['features']), statistics.median(ratios),
            min(times['features']) / min(times['plain']))


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"batch {args.batch_size}, {args.img_size} px, {args.reps} reps after {args.warmup} warm-up, "
          f"{torch.get_num_threads()} threads, eval mode, no grad")
    header = f"{'model':<32} {'model(x) ms':>12} {'forward_features ms':>20} {'ratio':>7} {'best ratio':>11}"
    print(header)
    print('-' * len(header))
    for name in args.models:
        # Models with a fixed input size (patch embeddings) must be built for the size benchmarked.
        fixed_size = timm.models.get_pretrained_cfg(name).fixed_input_size
        kwargs = {'img_size': args.img_size} if fixed_size else {}
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
        with torch.no_grad():
            plain, features, ratio, best_ratio = compare(model, x, args.reps, args.warmup)
        print(f"{name:<32} {plain * 1e3:>12.1f} {features * 1e3:>20.1f} {ratio:>7.3f} {best_ratio:>11.3f}",
              flush=True)


if __name__ == '__main__':
    main()
