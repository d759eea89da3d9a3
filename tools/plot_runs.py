#!/usr/bin/env python3
"""Learning curves of several runs on one figure: eval top-1, then each train loss term, against epoch.

    python tools/plot_runs.py output/demo --output curves.png
    python tools/plot_runs.py output/cifar100-ofa-swin_t-resnet18 output/cifar100-rsd-swin_t-resnet18 -o ofa_rsd.png

RUN_DIRS are run folders, globs or folders holding runs, as for collect_results.py. One subplot per
quantity of summary.csv (eval_top1, train_loss, train_loss_gt, train_loss_kd, ...); a run is drawn in
every subplot whose column it has, labelled by its folder name.
"""
import argparse
import math
import os
import sys

import matplotlib

matplotlib.use('Agg')  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
from collect_results import find_run_folders, read_run  # noqa: E402
from xkd.errors import UserError  # noqa: E402

TOP1 = 'eval_top1'


def curve_columns(runs):
    """eval_top1 first, then the train loss columns in the order the runs first show them."""
    losses = []
    for run in runs:
        for column in (run.summary[0] if run.summary else {}):
            if column.startswith('train_loss') and column not in losses:
                losses.append(column)
    return [TOP1] + losses


def run_labels(runs):
    """Folder names, or paths when two runs share a folder name."""
    names = [os.path.basename(run.folder) for run in runs]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([run.folder for run in runs])
    return [os.path.relpath(run.folder, common) for run in runs]


def curve(run, column):
    """(epochs, values) of the rows where `column` has a value (evaluation may skip epochs)."""
    points = [(int(row['epoch']), float(row[column])) for row in run.summary if row.get(column, '') != '']
    return [epoch for epoch, _ in points], [value for _, value in points]


def plot_runs(runs, path, title=''):
    columns = curve_columns(runs)
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    # One colour per run in every subplot, though not every run has every loss term.
    colours = [f'C{i % 10}' for i in range(len(runs))]
    for axis, column in zip(axes.flat, columns):
        for run, colour in zip(runs, colours):
            epochs, values = curve(run, column)
            if epochs:
                axis.plot(epochs, values, color=colour, marker='.' if len(epochs) < 30 else None)
        axis.set_title('eval top-1 (%)' if column == TOP1 else column.replace('train_', 'train '))
        axis.set_xlabel('epoch')
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(columns):]:
        axis.axis('off')
    legend_columns = min(4, len(runs))
    figure.legend([Line2D([], [], color=colour) for colour in colours], run_labels(runs), loc='lower center',
                  ncol=legend_columns, frameon=False)
    if title:
        figure.suptitle(title)
    legend_rows = math.ceil(len(runs) / legend_columns)
    figure.tight_layout(rect=(0, min(0.5, (0.25 * legend_rows + 0.1) / figure.get_figheight()), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', metavar='RUN_DIR', help='run folders, globs, or folders holding runs')
    parser.add_argument('-o', '--output', default='runs.png', help='the PNG to write')
    parser.add_argument('--title', default='', help='figure title')
    args = parser.parse_args(argv)
    try:
        runs = [read_run(folder) for folder in find_run_folders(args.runs)]
        started = [run for run in runs if run.summary]
        if not started:
            raise UserError('none of the runs has finished an epoch yet (no summary.csv rows)')
        plot_runs(started, args.output, args.title)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'{len(started)} run(s) plotted to {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
