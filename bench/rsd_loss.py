"""Forward + backward time and peak memory of `rsd_loss` (auto: the Gram form when D > B) against the
plain D x D correlation form, at B = 128.

    python bench/rsd_loss.py            # D = 768, 4096, 16384 both forms; 50176, 200704 auto only
    python bench/rsd_loss.py --quick    # skips the plain form at D = 16384 (a few GB, tens of seconds)
    python bench/rsd_loss.py --threads 1  # on a machine shared with other jobs: OpenMP threads waiting
                                          # for a busy core make the many small ops of the Gram form erratic

Each (form, D) runs in a fresh subprocess so that its peak memory is its own: the peak RSS
(ru_maxrss) over the first forward + backward pass minus the RSS before the inputs are allocated (after
imports and one tiny warm-up call), so inputs and gradient count. Later passes are not included: there
the C allocator's fragmentation, not the loss, decides the RSS. Times are the best of the passes run in
MIN_SECONDS (at least 2), as timeit reports: the others also measure whatever else runs on the machine.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

BATCH_SIZE = 128
BOTH_FORMS = (768, 4096, 16384)
GRAM_ONLY = (50176, 200704)
KAPPA = 0.01
MIN_SECONDS = 2.0


def current_rss_kib():
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024


def worker(form, dim, batch_size, threads):
    """Runs in the subprocess; prints one JSON line."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    torch.set_num_threads(threads)
    from distillers.rsd import rsd_loss, rsd_loss_correlation

    loss_fn = {'auto': rsd_loss, 'plain': rsd_loss_correlation}[form]
    torch.manual_seed(0)
    # One tiny call first, so that one-off library set-up (thread pools, BLAS buffers) is not counted.
    loss_fn(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), KAPPA).backward()
    baseline_kib = current_rss_kib()
    student = torch.randn(batch_size, dim, requires_grad=True)
    teacher = torch.randn(batch_size, dim)
    times = []
    while len(times) < 2 or (sum(times) < MIN_SECONDS and len(times) < 1000):
        start = time.perf_counter()
        loss_fn(student, teacher, KAPPA).backward()
        times.append(time.perf_counter() - start)
        student.grad = None
        if len(times) == 1:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({'seconds': min(times), 'peak_mib': (peak_kib - baseline_kib) / 1024}))


def run(form, dim, batch_size, threads):
    result = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', form, str(dim),
                             '--batch-size', str(batch_size), '--threads', str(threads)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='skip the plain form at D = 16384')
    parser.add_argument('--batch-size', type=int, default=BATCH_SIZE)
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads (default: all cores)')
    parser.add_argument('--worker', nargs=2, metavar=('FORM', 'DIM'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.batch_size, args.threads)
        return

    print(f"rsd_loss forward + backward, B = {args.batch_size}, float32, {args.threads} threads")
    header = (f"{'D':>8} | {'auto ms':>9} {'auto MiB':>9} | {'plain ms':>9} {'plain MiB':>9} | "
              f"{'speed-up':>8} {'mem ratio':>9}")
    print(header)
    print('-' * len(header))
    for dim in BOTH_FORMS + GRAM_ONLY:
        auto = run('auto', dim, args.batch_size, args.threads)
        plain = None
        if dim in BOTH_FORMS and not (args.quick and dim == BOTH_FORMS[-1]):
            plain = run('plain', dim, args.batch_size, args.threads)
        row = f"{dim:>8} | {auto['seconds'] * 1e3:>9.1f} {auto['peak_mib']:>9.1f} | "
        if plain:
            row += (f"{plain['seconds'] * 1e3:>9.1f} {plain['peak_mib']:>9.1f} | "
                    f"{plain['seconds'] / auto['seconds']:>7.1f}x "
                    f"{plain['peak_mib'] / max(auto['peak_mib'], 1.0):>8.1f}x")
        else:
            row += f"{'-':>9} {'-':>9} | {'-':>8} {'-':>9}"
        print(row, flush=True)


if __name__ == '__main__':
    main()
