#!/usr/bin/env python3
"""The embedded demo (`bash train.sh` with no arguments): distillation end to end, offline, on a CPU.

1. A small ViT teacher (`demo_vit_teacher`) is trained from scratch on scikit-learn's handwritten digits
   (8x8, upsampled to 32 px, a fixed 70/30 split) and saved under pretrained/.
2. A small CNN student (`demo_resnet_student`) is trained on a fixed subset of 300 training images, alone and
   with every distiller that runs on this pair, each through train.py exactly as a real run.
3. A table: run, distiller, test top-1 (last epoch and best), wall time, run folder; a figure of the
   students' curves and a CKA map of the teacher's stages against the RSD student's.

The student sees fewer images than the teacher did, which is the setting where a teacher has most to give.
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distillers  # noqa: E402

TEACHER_CONFIG = 'configs/demo/teacher.yaml'
STUDENT_CONFIG = 'configs/demo/student.yaml'
TEACHER_FILE = 'pretrained/demo_vit_teacher_digits.pth'

# Per-method flags for a 30-epoch run (DKD's warm-up is 20 epochs by default, for 240-epoch recipes) on 300
# images (CRD's 16,384 negatives are a third of CIFAR-100's training set; 256 is most of the demo's).
METHOD_FLAGS = {
    'dkd': ['--dkd-warmup', '5'],
    'crd': ['--crd-k', '256'],
}
METHOD_ORDER = ['vanilla', 'kd', 'dkd', 'dist', 'ofa', 'rsd', 'hcd']


def run_train(argv, log_path):
    """One train.py run in its own process, its output kept in a file; returns wall seconds."""
    start = time.time()
    with open(log_path, 'w') as log:
        status = subprocess.call([sys.executable, os.path.join(ROOT, 'train.py')] + argv, cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT)
    if status != 0:
        with open(log_path) as log:
            tail = ''.join(log.readlines()[-15:])
        sys.exit(f'demo: train.py failed (exit {status}); the end of {log_path}:\n{tail}')
    return time.time() - start


def read_summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        rows = [row for row in csv.DictReader(f) if row['eval_top1'] != '']
    last = float(rows[-1]['eval_top1'])
    best = max(float(row['eval_top1']) for row in rows)
    return last, best


def export_teacher(run_dir, path):
    """The teacher's best weights as a plain state dict, the form --teacher-pretrained takes."""
    checkpoint = torch.load(os.path.join(run_dir, 'model_best.pth.tar'), map_location='cpu', weights_only=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(checkpoint['state_dict'], path)


def draw_pictures(output, methods, teacher_file):
    """The students' curves on one figure, and a CKA map of the teacher against the RSD (or last) student."""
    run_dirs = [os.path.join(output, f'student-{method}') for method in methods]
    curves = os.path.join(output, 'curves.png')
    subprocess.check_call([sys.executable, os.path.join(ROOT, 'tools', 'plot_runs.py'), *run_dirs, '-o', curves,
                           '--title', 'Demo students on the digits'], cwd=ROOT, stdout=subprocess.DEVNULL)
    cka_student = 'rsd' if 'rsd' in methods else methods[-1]
    subprocess.check_call([sys.executable, os.path.join(ROOT, 'tools', 'cka.py'), '--dataset', 'digits',
                           '--img-size', '32', '--workers', '0', '--samples', '539',
                           '--model', 'demo_resnet_student',
                           '--checkpoint', os.path.join(output, f'student-{cka_student}', 'last.pth.tar'),
                           '--teacher', 'demo_vit_teacher', '--teacher-pretrained', teacher_file,
                           '--output', output], cwd=ROOT, stdout=subprocess.DEVNULL)
    cka = os.path.join(output, 'cka-demo_resnet_student-vs-demo_vit_teacher.png')
    return [f'Curves of the students: {os.path.relpath(curves, ROOT)}',
            f'CKA map, teacher stages against the {cka_student} student\'s: {os.path.relpath(cka, ROOT)} (and .csv)']


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output', default='output/demo', help='parent folder of the demo runs')
    parser.add_argument('--methods', nargs='+', default=None, help='distillers to run (default: all that apply)')
    parser.add_argument('--reuse-teacher', action='store_true',
                        help=f'use {TEACHER_FILE} if it exists instead of training the teacher again')
    args = parser.parse_args()

    known = distillers.distiller_names()
    methods = args.methods or [m for m in METHOD_ORDER if m in known]
    unknown = [m for m in methods if m not in known]
    if unknown:
        sys.exit(f"demo: unknown distiller(s) {', '.join(unknown)}; known: {', '.join(known)}")
    output = os.path.abspath(os.path.join(ROOT, args.output))
    os.makedirs(output, exist_ok=True)
    teacher_file = os.path.join(ROOT, TEACHER_FILE)
    demo_start = time.time()
    rows = []

    teacher_dir = os.path.join(output, 'teacher')
    if args.reuse_teacher and os.path.isfile(teacher_file) and os.path.isdir(teacher_dir):
        print(f'teacher: reusing {TEACHER_FILE}', flush=True)
        seconds = 0.0
    else:
        print('teacher: training demo_vit_teacher on the digits ...', flush=True)
        shutil.rmtree(teacher_dir, ignore_errors=True)
        seconds = run_train(['--config', TEACHER_CONFIG, '--output', output, '--experiment', 'teacher'],
                            os.path.join(output, 'teacher.out'))
        export_teacher(teacher_dir, teacher_file)
    last, best = read_summary(teacher_dir)
    rows.append(('teacher (ViT, all 1258 train images)', '-', last, best, seconds, teacher_dir))
    print(f'teacher: top-1 {last:.2f} in {seconds:.0f} s, saved to {TEACHER_FILE}', flush=True)

    for method in methods:
        run_dir = os.path.join(output, f'student-{method}')
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f'student: {method} ...', flush=True)
        argv = ['--config', STUDENT_CONFIG, '--distiller', method, '--teacher-pretrained', teacher_file,
                '--output', output, '--experiment', f'student-{method}'] + METHOD_FLAGS.get(method, [])
        seconds = run_train(argv, os.path.join(output, f'student-{method}.out'))
        last, best = read_summary(run_dir)
        rows.append(('student (CNN, 300 train images)', method, last, best, seconds, run_dir))
        print(f'student: {method} top-1 {last:.2f} in {seconds:.0f} s', flush=True)

    pictures = draw_pictures(output, methods, teacher_file)

    print()
    header = ('run', 'distiller', 'test top-1', 'best top-1', 'wall time', 'run folder')
    lines = [header] + [(run, method, f'{last:.2f}', f'{best:.2f}', f'{seconds:.0f} s', os.path.relpath(folder, ROOT))
                        for run, method, last, best, seconds, folder in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print('| ' + ' | '.join(cell.ljust(width) for cell, width in zip(line, widths)) + ' |')
        if i == 0:
            print('|' + '|'.join('-' * (width + 2) for width in widths) + '|')
    print(f'\nDigits test set: 539 images. Total time {time.time() - demo_start:.0f} s. '
          f'Run folders (args.yaml, summary.csv, log.txt, checkpoints, TensorBoard) under {os.path.relpath(output, ROOT)}/')
    for picture in pictures:
        print(picture)


if __name__ == '__main__':
    main()
