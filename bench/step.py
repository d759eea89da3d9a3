#!/usr/bin/env python3
"""Time of one training step for every distiller, against the floor the reference code bases pay.

    python bench/step.py                    # resnet18 <- deit_tiny at 64 px, batch 8: under a minute on 2 cores
    python bench/step.py --model resnet18 --teacher swin_tiny_patch4_window7_224 --img-size 224 --batch-size 8 \
        --rounds 9 --warmup 2 --precisions fp32 bf16 --memory      # the full table (minutes)

Variants, interleaved round by round after a warm-up so that a noisy machine slows them alike:
- `student`: the student's own step (vanilla);
- `floor`: the student's step plus the teacher's float32 forward under no_grad, what the reference code
  bases pay before any distillation loss (in their order: student, then teacher);
- each registered distiller in each of `--precisions`: fp32; bf16 (`--amp --amp-dtype bfloat16`, the
  teacher then kept in bfloat16, as train.py does); fp16 on CUDA (`--amp`, float16 with a gradient scaler).
By default bf16 is timed only where the hardware computes it natively: a CPU without AVX512-BF16 or AMX
emulates it about ten times slower than float32, which would measure the emulation and take minutes. Asked
for there (`--precisions fp32 bf16`), its rows are marked "(emulated)".
It prints the median ms per step, images per second, the ratio to the float32 floor, peak memory of the
step (CUDA: max allocated; CPU with `--memory`: peak resident memory of a fresh process stepping that
variant alone, the models and optimizer state included) and the distiller's extra parameters.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distillers  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from xkd import engine, hardware, models  # noqa: E402
from xkd.config import build_parser  # noqa: E402
from xkd.distributed import DistEnv  # noqa: E402


class Floor(distillers.Distiller):
    """The student's step plus a float32 teacher forward under no_grad whose output no loss reads, in the
    reference code bases' order: the student first, then the teacher."""

    def forward(self, image, label, epoch=0):
        logits = self.student(image)
        with torch.no_grad():
            self.teacher(image.float())
        return logits, {'loss_gt': self.gt_loss(logits, label)}


AMP_FLAGS = {'fp32': [], 'bf16': ['--amp', '--amp-dtype', 'bfloat16'], 'fp16': ['--amp', '--amp-dtype', 'float16']}
EMULATED = ' (emulated)'


def variant_names(methods, precisions):
    return ['student', 'floor'] + [f'{m} {precision}' for precision in precisions for m in methods]


def native_bfloat16(device):
    """True, False (emulated) or None (unknown) for bfloat16 on `device`."""
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return hardware.native_bfloat16()


def choose_precisions(requested, device):
    """The precisions to time and a note for the output: by default fp32, plus bf16 where it is native."""
    if requested:
        if 'fp16' in requested and device.type != 'cuda':
            sys.exit('bench/step.py: fp16 (float16 autocast with a gradient scaler) needs a CUDA GPU')
        return list(dict.fromkeys(requested)), ''
    if native_bfloat16(device) is False:
        return ['fp32'], (f'bf16 rows skipped: this {device.type.upper()} has no native bfloat16 (no AVX512-BF16 '
                          f'or AMX), so they would time its emulation, about 10x float32; '
                          f'--precisions fp32 bf16 times them anyway, marked{EMULATED}')
    return ['fp32', 'bf16'], ''


def build(name, bench_args, teachers, device):
    """A distiller, its optimizer and its arguments for variant `name`; `teachers` maps dtype to teacher."""
    method, _, precision = name.partition(' ')
    distiller_name = {'student': 'vanilla', 'floor': 'vanilla'}.get(method, method)
    flags = ['--distiller', distiller_name] + AMP_FLAGS[precision or 'fp32']
    args = build_parser().parse_args(flags + bench_args.extra)
    args.num_classes, args.input_size = bench_args.num_classes, (3, bench_args.img_size, bench_args.img_size)
    torch.manual_seed(0)
    student = models.create_model(bench_args.model, args.num_classes, args.input_size).to(device)
    distiller_class = Floor if method == 'floor' else distillers.get_distiller(distiller_name)
    teacher = teachers[torch.float32 if method == 'floor' else models.teacher_dtype(args)]
    distiller = distiller_class(student, teacher if distiller_class.requires_teacher else None,
                                torch.nn.CrossEntropyLoss(), args)
    # The batch's samples are the whole "training set" of methods that index it (CRD).
    distiller.bind_train_data(torch.arange(bench_args.batch_size) % bench_args.num_classes)
    distiller.to(device)
    optimizer = create_optimizer_v2(distiller, opt='sgd', lr=0.01, momentum=0.9, weight_decay=1e-4)
    if bench_args.channels_last:
        distiller.to(memory_format=torch.channels_last)
    return distiller, optimizer, args


def make_batch(bench_args, device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(bench_args.batch_size, 3, bench_args.img_size, bench_args.img_size, generator=generator)
    targets = torch.arange(bench_args.batch_size) % bench_args.num_classes  # the labels bound in `build`
    if bench_args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images.to(device), targets.to(device)


def make_teachers(bench_args, device):
    """The same teacher weights in float32 and in each AMP dtype (what train.py keeps under --amp)."""
    torch.manual_seed(1)
    teacher = models.create_model(bench_args.teacher, bench_args.num_classes,
                                  (3, bench_args.img_size, bench_args.img_size)).to(device)
    if bench_args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    teacher.eval().requires_grad_(False)
    return {dtype: teacher if dtype == torch.float32 else copy.deepcopy(teacher).to(dtype)
            for dtype in (torch.float32, torch.bfloat16, torch.float16)
            if dtype != torch.float16 or device.type == 'cuda'}


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_variants(bench_args, device):
    teachers = make_teachers(bench_args, device)
    images, targets = make_batch(bench_args, device)
    indices = torch.arange(len(targets), device=device)
    env = DistEnv(device=device)
    built = {name: build(name, bench_args, teachers, device)
             for name in variant_names(bench_args.methods, bench_args.precisions)}
    scalers = {name: torch.amp.GradScaler('cuda') for name in built if name.endswith(' fp16')}
    peak_memory = {}

    def step(name):
        distiller, optimizer, args = built[name]
        distiller.train()
        engine.train_step(distiller, distiller, images, targets, 0, optimizer, args, env, scalers.get(name),
                          indices=indices)

    def teacher_forward(context):
        with context():
            teachers[torch.float32](images)

    # The float32 teacher's forward alone, under each grad mode, timed in the same rounds as the steps.
    calls = {name: (lambda name=name: step(name)) for name in built}
    calls.update({f'teacher forward, {context.__name__}': (lambda context=context: teacher_forward(context))
                  for context in (torch.no_grad, torch.inference_mode)})
    times = {name: [] for name in calls}
    for name, call in calls.items():
        for _ in range(bench_args.warmup):
            call()
        if device.type == 'cuda' and name in built:
            torch.cuda.reset_peak_memory_stats()
            call()
            peak_memory[name] = torch.cuda.max_memory_allocated() / 2 ** 20
    for _ in range(bench_args.rounds):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    extra = {name: models.count_parameters(built[name][0].extra_parameters()) for name in built}
    return {name: statistics.median(t) for name, t in times.items()}, peak_memory, extra


def peak_rss_of(name, bench_args):
    """Peak resident memory (MiB) of a fresh process running the variant's steps (models, optimizer included)."""
    command = [sys.executable, os.path.abspath(__file__), '--memory-of', name] + bench_args.passthrough
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        return float('nan')
    return json.loads(result.stdout.strip().splitlines()[-1])['peak_mib']


def proc_status_mib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    return float('nan')


def measure_memory_alone(name, bench_args):
    """Peak resident memory while the variant steps, after one warm-up step (Linux: VmHWM reset by clear_refs)."""
    device = torch.device('cpu')
    teachers = make_teachers(bench_args, device)
    images, targets = make_batch(bench_args, device)
    indices = torch.arange(len(targets), device=device)
    distiller, optimizer, args = build(name, bench_args, teachers, device)
    env = DistEnv(device=device)
    engine.train_step(distiller.train(), distiller, images, targets, 0, optimizer, args, env, indices=indices)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak (high-water mark) to the current resident size
    for _ in range(2):
        engine.train_step(distiller, distiller, images, targets, 0, optimizer, args, env, indices=indices)
    print(json.dumps({'peak_mib': proc_status_mib('VmHWM')}))


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--teacher', default='deit_tiny_patch16_224')
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--num-classes', type=int, default=100)
    parser.add_argument('--methods', nargs='+', default=None, help='distillers (default: all but vanilla)')
    parser.add_argument('--precisions', nargs='+', choices=tuple(AMP_FLAGS), default=None,
                        help='precisions of the distiller rows (default: fp32, and bf16 where it is native)')
    parser.add_argument('--rounds', type=int, default=5, help='timed steps per variant')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per variant first')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    parser.add_argument('--memory', action='store_true',
                        help='CPU: peak memory of each variant, one fresh process each (slow; CUDA always measures)')
    parser.add_argument('--memory-of', default=None, help=argparse.SUPPRESS)
    parser.add_argument('extra', nargs='*', help='train.py flags for every variant, after --')
    args = parser.parse_args(argv)
    args.methods = args.methods or [m for m in distillers.distiller_names() if m != 'vanilla']
    args.passthrough = ['--model', args.model, '--teacher', args.teacher, '--img-size', str(args.img_size),
                        '--batch-size', str(args.batch_size), '--num-classes', str(args.num_classes),
                        '--threads', str(args.threads)] + (['--channels-last'] if args.channels_last else []) \
        + (['--'] + args.extra if args.extra else [])
    return args


def main(argv=None):
    bench_args = parse(argv)
    if bench_args.threads:
        torch.set_num_threads(bench_args.threads)
    if bench_args.memory_of:
        return measure_memory_alone(bench_args.memory_of, bench_args)
    start = time.perf_counter()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    bench_args.precisions, note = choose_precisions(bench_args.precisions, device)
    print(f'{bench_args.model} <- {bench_args.teacher}, {bench_args.img_size} px, batch {bench_args.batch_size}, '
          f'{device.type}, {torch.get_num_threads()} threads, median of {bench_args.rounds} interleaved steps',
          flush=True)
    if note:
        print(note, flush=True)
    medians, peak_memory, extra = time_variants(bench_args, device)
    if device.type == 'cpu' and bench_args.memory:
        peak_memory = {name: peak_rss_of(name, bench_args) for name in medians if name in extra}
    emulated = native_bfloat16(device) is False
    teacher_times = {name: medians.pop(name) for name in list(medians) if name.startswith('teacher forward')}
    floor = medians['floor']
    memory_label = 'peak MiB' if device.type == 'cuda' else 'peak RSS MiB'
    print(f"\n| variant | ms/step | img/s | x floor | {memory_label} | extra params |")
    print('|---|---:|---:|---:|---:|---:|')
    for name, seconds in medians.items():
        memory = peak_memory.get(name)
        memory_cell = f'{memory:.0f}' if memory is not None else '-'
        label = name + (EMULATED if emulated and name.endswith(' bf16') else '')
        print(f'| {label} | {seconds * 1000:.1f} | {bench_args.batch_size / seconds:.1f} | {seconds / floor:.3f} | '
              f'{memory_cell} | {extra[name] / 1e6:.3f} M |')
    no_grad, inference = teacher_times['teacher forward, no_grad'], teacher_times['teacher forward, inference_mode']
    print(f'\nTeacher forward alone (float32): no_grad {no_grad * 1000:.1f} ms, inference_mode '
          f'{inference * 1000:.1f} ms ({inference / no_grad:.3f} x)')
    print(f'Wall time {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
    main()
