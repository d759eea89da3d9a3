#!/usr/bin/env python3
"""The training step with the live teacher against the step served by --teacher-cache, and the cost of
writing the cache, for the papers' heavier pairs.

    python bench/teacher_cache.py                 # three pairs at 224 px, batch 8, fp32: a few minutes on 2 cores
    python bench/teacher_cache.py --pairs resnet18:swin_tiny_patch4_window7_224 --rounds 9

For each student <- teacher pair (random weights, KD: the method reads the teacher's logits), one process
times, interleaved round by round after a warm-up so that a noisy machine slows them alike:
- `student`: the student's step alone (vanilla), the floor a cache can reach;
- `live`: the KD step with the teacher's forward, as without a cache;
- `write`: the KD step with the teacher's forward whose logits are written to a cache (a first run);
- `cached`: the KD step whose teacher logits are read from that cache (the fingerprint check included).
It prints the median ms of each and the ratios cached/live (targets: <= 0.60, 0.50, 0.35 for the three
default pairs) and write/live (target: <= 1.05). The interleaved write/live moves by several per cent with the
machine's noise; the cache's own cost per step is also timed alone (recording a batch, then serving it back),
and `cache write/live` is 1 + that recording time over the live step.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distillers  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from xkd import engine, models  # noqa: E402
from xkd.config import build_parser  # noqa: E402
from xkd.distributed import DistEnv  # noqa: E402
from xkd.teacher_cache import TeacherCache  # noqa: E402

PAIRS = ('resnet18:swin_tiny_patch4_window7_224', 'deit_tiny_patch16_224:convnext_tiny',
         'deit_tiny_patch16_224:mixer_b16_224')
TARGETS = {'resnet18:swin_tiny_patch4_window7_224': 0.60, 'deit_tiny_patch16_224:convnext_tiny': 0.50,
           'deit_tiny_patch16_224:mixer_b16_224': 0.35}


def machine():
    """CPU model, cores, torch and timm versions: what every figure in the README names."""
    import platform
    import timm
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return (f'{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch '
            f'{torch.__version__.split("+")[0]}, timm {timm.__version__}')


def build(method, student_name, teacher, bench_args):
    args = build_parser().parse_args(['--distiller', method])
    args.num_classes, args.input_size = bench_args.num_classes, (3, bench_args.img_size, bench_args.img_size)
    torch.manual_seed(0)
    student = models.create_model(student_name, args.num_classes, args.input_size)
    distiller_class = distillers.get_distiller(method)
    distiller = distiller_class(student, teacher if distiller_class.requires_teacher else None,
                                torch.nn.CrossEntropyLoss(), args)
    optimizer = create_optimizer_v2(distiller, opt='sgd', lr=0.01, momentum=0.9, weight_decay=1e-4)
    return distiller, optimizer, args


def batches(bench_args, steps):
    """A fixed batch per step: the cache's fingerprint check wants the batch a step was written with."""
    generator = torch.Generator().manual_seed(0)
    size = bench_args.img_size
    return [(torch.randn(bench_args.batch_size, 3, size, size, generator=generator),
             torch.arange(bench_args.batch_size) % bench_args.num_classes) for _ in range(steps)]


def time_pair(pair, bench_args, folder):
    student_name, teacher_name = pair.split(':')
    torch.manual_seed(1)
    teacher = models.create_model(teacher_name, bench_args.num_classes, (3, bench_args.img_size, bench_args.img_size))
    teacher.eval().requires_grad_(False)
    steps = bench_args.warmup + bench_args.rounds
    data = batches(bench_args, steps)
    env = DistEnv(device=torch.device('cpu'))
    # live_first: the live step timed beside `write`; live: beside `student` and `cached`.
    built = {name: build('vanilla' if name == 'student' else 'kd', student_name, teacher, bench_args)
             for name in ('student', 'live_first', 'live', 'write', 'cached')}
    cache = TeacherCache(folder, {'pair': pair}, ('logits',), 'float32', bench_args.batch_size, steps)
    built['write'][0].teacher_cache = built['cached'][0].teacher_cache = cache
    times = {name: [] for name in built}

    def step(name, index):
        distiller, optimizer, args = built[name]
        distiller.train()
        images, targets = data[index]
        cache.at_step(index)
        start = time.perf_counter()
        engine.train_step(distiller, distiller, images, targets, 0, optimizer, args, env)
        if index >= bench_args.warmup:
            times[name].append(time.perf_counter() - start)

    # Epoch 0 written (live and write interleaved), then read (student, live and cached interleaved).
    cache.start_epoch(0)
    for index in range(steps):
        for name in ('live_first', 'write'):
            step(name, index)
    cache.end_epoch()
    cache.start_epoch(0)
    assert cache.reading, 'the benchmark cache was not written whole'
    for index in range(steps):
        for name in ('student', 'live', 'cached'):
            step(name, index)
    cache.end_epoch()
    medians = {name: statistics.median(values) * 1000 for name, values in times.items() if values}
    medians.update(cache_io_ms(data, bench_args, os.path.join(folder, 'io')))
    return medians


def cache_io_ms(data, bench_args, folder):
    """The cache's own cost per step, without the model: recording a batch's logits (with its fingerprint),
    and serving them back (fingerprint check included). Medians in ms."""
    logits = torch.randn(bench_args.batch_size, bench_args.num_classes)
    cache = TeacherCache(folder, {'io': True}, ('logits',), 'float32', bench_args.batch_size, len(data))
    times = {'write_io': [], 'read_io': []}
    for name in times:
        cache.start_epoch(0)
        for index, (images, _) in enumerate(data):
            cache.at_step(index)
            start = time.perf_counter()
            cache.serve(images, lambda: {'logits': logits})
            times[name].append(time.perf_counter() - start)
        cache.end_epoch()
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', nargs='+', default=list(PAIRS), help='STUDENT:TEACHER timm names')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--rounds', type=int, default=5, help='timed steps per variant')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per variant first')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    bench_args = parser.parse_args(argv)
    if bench_args.threads:
        torch.set_num_threads(bench_args.threads)
    print(f'{machine()}; {bench_args.img_size} px, batch {bench_args.batch_size}, fp32, KD, '
          f'random weights; median of {bench_args.rounds} steps after {bench_args.warmup} warm-up', flush=True)
    print('| student <- teacher | student alone (ms) | live (ms) | write (ms) | cached (ms) | cached/live | '
          'target | write/live | cache write, read (ms) | cache write/live |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    start = time.time()
    folder = tempfile.mkdtemp(prefix='teacher-cache-bench-')
    try:
        for pair in bench_args.pairs:
            ms = time_pair(pair, bench_args, os.path.join(folder, pair.replace(':', '-')))
            student_name, teacher_name = pair.split(':')
            target = TARGETS.get(pair)
            print(f"| {student_name} <- {teacher_name} | {ms['student']:.0f} | {ms['live']:.0f} | {ms['write']:.0f} | "
                  f"{ms['cached']:.0f} | {ms['cached'] / ms['live']:.2f} | "
                  f"{'-' if target is None else f'<= {target:.2f}'} | {ms['write'] / ms['live_first']:.3f} | "
                  f"{ms['write_io']:.1f}, {ms['read_io']:.1f} | {1 + ms['write_io'] / ms['live']:.3f} |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f'Wall time {time.time() - start:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
