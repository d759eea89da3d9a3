#!/usr/bin/env python3
"""A markdown table of results from train.py run folders.

    python tools/collect_results.py output/                       every run folder under output/
    python tools/collect_results.py 'output/cifar100-rsd-*' output/other-run --csv results.csv

Each run folder holds `args.yaml` and `summary.csv` (and `log.txt`). Runs whose arguments differ only in
the seed (and in bookkeeping such as the run folder or the number of loader workers) are one row: best
and last top-1 as mean ± sample std over them, how many runs, epochs done of epochs planned, the
distiller's extra parameters (from log.txt), the published top-1 of the matching cell of
configs/experiments.yaml (the run's --experiment when it names a cell, as train.sh sets it; otherwise the cell
of the same models and method at its defaults) and ours minus published (best top-1 mean minus the cell's
first published number; the CSV also has that number's source). Rows that share teacher, student and method but differ in other arguments
name those arguments in a `settings` column.
"""
import argparse
import csv
import dataclasses
import glob
import os
import re
import statistics
import sys
from typing import List, Optional

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
from experiments import find_cell, load_experiments  # noqa: E402
from xkd.errors import UserError  # noqa: E402  (experiments put the repository root on the path)
from xkd.yaml_file import load_yaml  # noqa: E402

# Arguments that do not change what a run computes, or that differ between the seeds of one experiment.
BOOKKEEPING_ARGS = ('seed', 'experiment', 'output', 'resume', 'data_dir', 'workers', 'pin_mem', 'log_interval',
                    'checkpoint_hist', 'device', 'dataset_download', 'eval_teacher', 'validation_batch_size',
                    'amp_dtype')
# Weight files are compared by file name: the same teacher lives under different folders on different machines.
PATH_ARGS = ('teacher_pretrained', 'pretrained_path')
EXTRA_PARAMETERS = re.compile(r'extra modules: ([0-9.]+) M parameters')


@dataclasses.dataclass
class Run:
    folder: str
    args: dict
    summary: List[dict]
    extra_parameters: Optional[float]

    @property
    def top1(self):
        """eval_top1 of the epochs that were evaluated, in order."""
        return [float(row['eval_top1']) for row in self.summary if row.get('eval_top1', '') != '']

    @property
    def epochs_done(self):
        return len(self.summary)

    @property
    def teacher(self):
        # A vanilla run trains the student alone; its config may still name a teacher.
        return '-' if self.args.get('distiller') == 'vanilla' else self.args.get('teacher') or '-'

    @property
    def models(self):
        return self.args.get('dataset'), self.teacher, self.args.get('model'), self.args.get('distiller')


def find_run_folders(paths):
    """Run folders (those with an args.yaml) named by `paths`, which may be globs or parents of runs."""
    folders = []
    for pattern in paths:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.exists(match) for match in matches):
            raise UserError(f"'{pattern}' matches no file or folder")
        for match in matches:
            for folder, subfolders, files in os.walk(match):
                if 'args.yaml' in files:
                    folders.append(os.path.normpath(folder))
                    subfolders.clear()
                subfolders.sort()  # runs in name order, whatever the file system's order
    unique = list(dict.fromkeys(folders))
    if not unique:
        raise UserError(f"no run folders (folders with an args.yaml written by train.py) under {', '.join(paths)}")
    return unique


class UnreadableRun(Exception):
    """A run folder whose summary.csv cannot be read as train.py writes it; the run is left out with a warning."""


def read_run(folder):
    args = load_yaml(os.path.join(folder, 'args.yaml'), 'run arguments')
    summary = []
    summary_path = os.path.join(folder, 'summary.csv')
    if os.path.isfile(summary_path):  # absent until the first epoch ends
        with open(summary_path, newline='') as f:
            summary = list(csv.DictReader(f))
        for line, row in enumerate(summary, start=2):
            check_summary_row(row, summary_path, line)
    return Run(folder, args, summary, read_extra_parameters(folder))


def check_summary_row(row, path, line):
    """A row as train.py writes it: every column filled in (eval columns may be empty), epoch and top-1 numbers."""
    if None in row or any(value is None for value in row.values()):
        raise UnreadableRun(f"'{path}' line {line} has {'more' if None in row else 'fewer'} fields than its header "
                            f"(a run stopped while writing it?)")
    try:
        int(row.get('epoch', ''))
        if row.get('eval_top1', '') != '':
            float(row['eval_top1'])
    except ValueError:
        raise UnreadableRun(f"'{path}' line {line}: epoch {row.get('epoch')!r} or eval_top1 "
                            f"{row.get('eval_top1')!r} is not a number") from None


def read_extra_parameters(folder):
    """Millions of extra parameters from the log's start-of-run line ('... extra modules: X M parameters')."""
    path = os.path.join(folder, 'log.txt')
    if not os.path.isfile(path):
        return None
    with open(path, errors='replace') as f:
        found = EXTRA_PARAMETERS.findall(f.read())
    return float(found[-1]) if found else None


def hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(hashable(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, hashable(item)) for key, item in value.items()))
    return value


def settings(args):
    """The arguments that decide what a run computes, as a hashable mapping."""
    kept = {}
    for key, value in args.items():
        if key in BOOKKEEPING_ARGS:
            continue
        if key in PATH_ARGS and value:
            value = os.path.basename(value)
        kept[key] = hashable(value)
    return tuple(sorted(kept.items()))


def group_runs(runs):
    """Runs grouped by their settings: each group is one experiment repeated over seeds."""
    groups = {}
    for run in runs:
        groups.setdefault(settings(run.args), []).append(run)
    return list(groups.values())


def distinguishing_settings(groups):
    """For each group, 'key=value' of the arguments in which it differs from the groups of the same models."""
    labels = [''] * len(groups)
    by_models = {}
    for index, group in enumerate(groups):
        by_models.setdefault(group[0].models, []).append(index)
    for indices in by_models.values():
        if len(indices) < 2:
            continue
        settings_of = {index: dict(settings(groups[index][0].args)) for index in indices}
        keys = sorted(set().union(*settings_of.values()))
        differing = [key for key in keys if len({one.get(key) for one in settings_of.values()}) > 1]
        for index in indices:
            labels[index] = ', '.join(f'{key}={format_value(settings_of[index].get(key))}' for key in differing)
    return labels


def format_value(value):
    if isinstance(value, tuple):
        return ' '.join(format_value(item) for item in value)
    return str(value)


def mean_std(values):
    """(mean, sample std) of the values; std is None for one value and both are None for none."""
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(mean, std):
    if mean is None:
        return '-'
    return f'{mean:.2f}' if std is None else f'{mean:.2f} ± {std:.2f}'


def format_range(values):
    low, high = min(values), max(values)
    return str(low) if low == high else f'{low}-{high}'


def summarise(group, settings_label, experiments):
    """One table row for the runs of one experiment."""
    first = group[0]
    evaluated = [run for run in group if run.top1]
    best_mean, best_std = mean_std([max(run.top1) for run in evaluated])
    last_mean, last_std = mean_std([run.top1[-1] for run in evaluated])
    extra = sorted({run.extra_parameters for run in group if run.extra_parameters is not None})
    dataset, teacher, student, method = first.models
    # A run launched by cell name (train.sh sets --experiment CELL) is that cell, a variant included.
    names = [run.args.get('experiment') for run in group if run.args.get('experiment') in experiments]
    cell = find_cell(experiments, dataset, teacher, student, method, names[0] if names else None)
    published = cell.published_top1 if cell else None
    return {
        'dataset': dataset, 'teacher': teacher, 'student': student, 'method': method,
        'settings': settings_label,
        'best_top1_mean': best_mean, 'best_top1_std': best_std, 'last_top1_mean': last_mean,
        'last_top1_std': last_std, 'runs': len(group),
        'epochs_done': format_range([run.epochs_done for run in group]),
        'epochs_planned': first.args.get('epochs', '?'),  # part of the settings, so the same for the group
        'extra_params_m': ', '.join(f'{value:.3f}' for value in extra) or None,
        'published_top1': published,
        'published_source': cell.published[0].source if cell and cell.published else None,
        'ours_minus_published': None if published is None or best_mean is None else best_mean - published,
        'folders': ';'.join(run.folder for run in group),
    }


def collect(paths):
    runs, left_out = [], []
    for folder in find_run_folders(paths):
        try:
            runs.append(read_run(folder))
        except UnreadableRun as e:
            left_out.append(f'run {folder}: {e}; fix or delete that line to include it')
    if not runs:
        raise UserError(f"no readable runs under {', '.join(paths)}: {left_out[0]}")
    for reason in left_out:
        print(f'warning: left out {reason}', file=sys.stderr)
    groups = group_runs(runs)
    experiments = load_experiments()
    rows = [summarise(group, label, experiments) for group, label in zip(groups, distinguishing_settings(groups))]
    return sorted(rows, key=lambda row: tuple(str(row[key]) for key in ('dataset', 'teacher', 'student', 'method',
                                                                         'settings')))


def markdown_table(rows):
    show_settings = any(row['settings'] for row in rows)
    header = ['dataset', 'teacher', 'student', 'method'] + (['settings'] if show_settings else []) + [
        'best top-1', 'last top-1', 'runs', 'epochs', 'extra params (M)', 'published top-1', 'ours - published']
    lines = []
    for row in rows:
        cells = [row['dataset'], row['teacher'], row['student'], row['method']]
        cells += [row['settings'] or '-'] if show_settings else []
        cells += [format_mean_std(row['best_top1_mean'], row['best_top1_std']),
                  format_mean_std(row['last_top1_mean'], row['last_top1_std']), str(row['runs']),
                  f"{row['epochs_done']}/{row['epochs_planned']}", row['extra_params_m'] or '-',
                  '-' if row['published_top1'] is None else f"{row['published_top1']:.2f}",
                  '-' if row['ours_minus_published'] is None else f"{row['ours_minus_published']:+.2f}"]
        lines.append([str(cell) for cell in cells])
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]

    def format_line(cells):
        return '| ' + ' | '.join(cell.ljust(width) for cell, width in zip(cells, widths)) + ' |'

    separator = '|' + '|'.join('-' * (width + 2) for width in widths) + '|'
    return '\n'.join([format_line(header), separator] + [format_line(line) for line in lines])


def write_csv(rows, path):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: '' if value is None else value for key, value in row.items()} for row in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', metavar='RUN_DIR', help='run folders, globs, or folders holding runs')
    parser.add_argument('--csv', default='', metavar='FILE', help='also write the rows, unformatted, to FILE')
    args = parser.parse_args(argv)
    try:
        rows = collect(args.runs)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(markdown_table(rows))
    if args.csv:
        write_csv(rows, args.csv)
    return 0


if __name__ == '__main__':
    sys.exit(main())
