#!/usr/bin/env python3
"""The table of published experiments (configs/experiments.yaml), expanded into named cells.

    python tools/experiments.py --list                           one cell a line
    python tools/experiments.py cifar100-rsd-swin_t-resnet18     its train.py arguments, shell-quoted
    python tools/experiments.py cifar100-rsd-swin_t-resnet18 --one-per-line   the same, for scripts

A cell is one teacher x student x method of the table, named <dataset>-<method>-<teacher>-<student>
by the table's short names. train.sh launches cells by name; collect_results.py reads the published
numbers from here. Only PyYAML is imported, so that listing cells is instant.
"""
import argparse
import dataclasses
import difflib
import os
import shlex
import signal
import sys
from typing import Optional, Tuple


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from xkd.errors import UserError  # noqa: E402
from xkd.yaml_file import load_yaml  # noqa: E402

TABLE = os.path.join(ROOT, 'configs', 'experiments.yaml')
TABLE_KEYS = ('dataset', 'num_classes', 'teacher_checkpoint', 'teachers', 'students', 'methods', 'published_top1')


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    dataset: str
    num_classes: int
    teacher: str
    student: str
    recipe: str
    method: str
    method_flags: Tuple[str, ...]
    teacher_checkpoint: str
    published_top1: Optional[float]
    teacher_published_top1: Optional[float]  # the fine-tuned teacher's own top-1

    def train_arguments(self, data_dir):
        """The train.py command line of this cell (paths relative to the repository root)."""
        return [data_dir, '--config', self.recipe, '--model', self.student, '--teacher', self.teacher,
                '--teacher-pretrained', self.teacher_checkpoint, '--num-classes', str(self.num_classes),
                '--distiller', self.method, *self.method_flags, '--experiment', self.name]


def _section(table, key, path, fields):
    """A mapping of short names to entries, each entry holding at least `fields`."""
    section = table.get(key)
    if not isinstance(section, dict) or not section:
        raise UserError(f"'{path}': '{key}' must be a non-empty mapping of short names to entries")
    for short_name, entry in section.items():
        missing = [field for field in fields if not isinstance(entry, dict) or field not in entry]
        if missing:
            raise UserError(f"'{path}': {key}.{short_name} lacks {', '.join(missing)}")
    return section


def _methods(table, path):
    methods = table.get('methods')
    if not isinstance(methods, dict) or not methods:
        raise UserError(f"'{path}': 'methods' must map distiller names to lists of flags")
    for method, flags in methods.items():
        if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
            raise UserError(f"'{path}': methods.{method} must be a list of strings, e.g. [--ofa-eps, '1.0']; "
                            f"got {flags!r}")
    return methods


def read_table(path=TABLE):
    """The table as written, its shape checked so that a typo fails here rather than in a launched run."""
    table = load_yaml(path, 'experiment table')
    unknown = sorted(set(table) - set(TABLE_KEYS))
    missing = [key for key in TABLE_KEYS if key not in table]
    if unknown or missing:
        raise UserError(f"'{path}': unknown keys {unknown}, missing keys {missing}; expected {', '.join(TABLE_KEYS)}")
    return table


def load_experiments(path=TABLE):
    """Every cell of the table, by name, in the table's order (teacher, then student, then method)."""
    table = read_table(path)
    teachers = _section(table, 'teachers', path, ('model', 'finetune_config'))
    students = _section(table, 'students', path, ('model', 'recipe'))
    methods = _methods(table, path)
    experiments = {}
    for teacher_key, teacher in teachers.items():
        for student_key, student in students.items():
            for method, flags in methods.items():
                name = f"{table['dataset']}-{method}-{teacher_key}-{student_key}"
                experiments[name] = Experiment(
                    name=name, dataset=table['dataset'], num_classes=int(table['num_classes']),
                    teacher=teacher['model'], student=student['model'], recipe=student['recipe'], method=method,
                    method_flags=tuple(flags),
                    teacher_checkpoint=table['teacher_checkpoint'].format(model=teacher['model']),
                    published_top1=None, teacher_published_top1=teacher.get('published_top1'))
    published = table['published_top1'] or {}
    unknown = [name for name in published if name not in experiments]
    if unknown:
        raise UserError(f"'{path}': published_top1 names cells that the table does not make: "
                        f"{', '.join(unknown)}")
    return {name: dataclasses.replace(experiment, published_top1=published.get(name))
            for name, experiment in experiments.items()}


def get_experiment(name, experiments):
    if name in experiments:
        return experiments[name]
    close = difflib.get_close_matches(name, list(experiments), n=5, cutoff=0.6)
    if not close:
        close = [known for known in experiments if name and name in known][:5]
    hint = f"; close names: {', '.join(close)}" if close else ''
    raise UserError(f"unknown experiment '{name}'{hint} (bash train.sh --list shows all "
                    f"{len(experiments)})")


def find_published(experiments, dataset, teacher, student, method):
    """The published top-1 of the cell with these models and method, or None.

    A vanilla run of one of the table's teachers is that teacher's fine-tuning: its published top-1 is the
    teacher's own.
    """
    for experiment in experiments.values():
        if method == 'vanilla' and (experiment.dataset, experiment.teacher) == (dataset, student):
            return experiment.teacher_published_top1
        if (experiment.dataset, experiment.teacher, experiment.student, experiment.method) == (
                dataset, teacher, student, method):
            return experiment.published_top1
    return None


def listing(experiments):
    """One line per cell, in aligned columns: name, teacher, student, method, published top-1."""
    rows = [(e.name, e.teacher, e.student, e.method,
             '-' if e.published_top1 is None else f'{e.published_top1:.2f}') for e in experiments.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ['  '.join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]) for row in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('cell', nargs='?', help='a cell name (see --list)')
    parser.add_argument('--list', action='store_true', help='print every cell, one a line')
    parser.add_argument('--data', default='data/cifar100', help='the data folder put first in the arguments')
    parser.add_argument('--one-per-line', action='store_true',
                        help='one argument a line, unquoted (for scripts reading them into an array)')
    parser.add_argument('--table', default=TABLE, help='the experiment table')
    args = parser.parse_args(argv)
    if args.list == bool(args.cell):
        parser.error('give either --list or one cell name')
    try:
        experiments = load_experiments(args.table)
        if args.list:
            print('\n'.join(listing(experiments)))
            return 0
        arguments = get_experiment(args.cell, experiments).train_arguments(args.data)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print('\n'.join(arguments) if args.one_per_line else shlex.join(arguments))
    return 0


if __name__ == '__main__':
    # `--list | head` closes the pipe early; end quietly, as other listing tools do.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
