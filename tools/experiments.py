#!/usr/bin/env python3
"""The table of published experiments (configs/experiments.yaml), expanded into named cells.

    python tools/experiments.py --list                           a header, then one cell a line
    python tools/experiments.py cifar100-rsd-swin_t-resnet18 --about   its flags and published numbers, with sources
    python tools/experiments.py cifar100-rsd-swin_t-resnet18     its train.py arguments, shell-quoted
    python tools/experiments.py cifar100-rsd-swin_t-resnet18 --one-per-line   the same, for scripts

A cell is one teacher x student x method of the table, named <dataset>-<method>-<teacher>-<student>
by the table's short names, or a named variant of a method (<dataset>-<variant>-<teacher>-<student>), a
student alone (<dataset>-vanilla-<student>) or a teacher's fine-tuning (<dataset>-finetune-<teacher>). train.sh launches cells by name; collect_results.py reads the published
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
TABLE_KEYS = ('dataset', 'num_classes', 'teacher_checkpoint', 'teachers', 'students', 'methods', 'cell_flags',
              'variants', 'published')
SECOND_HAND = '2nd-hand'


@dataclasses.dataclass(frozen=True)
class Published:
    """One published top-1 (%) with its short source; docs/published_cifar100.tsv has each source in full."""
    top1: float
    source: str

    @property
    def second_hand(self):
        return self.source.startswith(SECOND_HAND)


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    dataset: str
    num_classes: int
    teacher: Optional[str]      # timm name; None for a model trained alone
    student: str                # the model trained (the teacher itself in a fine-tuning cell)
    recipe: str
    method: str                 # the distiller
    method_flags: Tuple[str, ...]
    extra_flags: Tuple[str, ...]  # beyond the method's defaults: the authors' flags for this cell, then the variant's
    extra_sources: Tuple[str, ...]  # where each group of extra flags comes from
    variant: Optional[str]
    teacher_checkpoint: Optional[str]
    published: Tuple[Published, ...]

    @property
    def published_top1(self):
        """The first published number (the paper's own where there is one), or None."""
        return self.published[0].top1 if self.published else None

    def train_arguments(self, data_dir):
        """The train.py command line of this cell (paths relative to the repository root)."""
        teacher = ['--teacher', self.teacher, '--teacher-pretrained', self.teacher_checkpoint] if self.teacher else []
        return [data_dir, '--config', self.recipe, '--model', self.student, *teacher,
                '--num-classes', str(self.num_classes), '--distiller', self.method, *self.method_flags,
                *self.extra_flags, '--experiment', self.name]


def _flag_list(flags, where, path):
    if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
        raise UserError(f"'{path}': {where} must be a list of strings, e.g. [--ofa-eps, '1.0']; got {flags!r}")
    return tuple(flags)


def merge_flags(*flag_lists):
    """The flag lists one after another, a flag given again replacing its earlier value in place
    (argparse would take the last anyway; this keeps the printed command line free of dead flags)."""
    groups = {}
    for flags in flag_lists:
        for flag in flags:
            if flag.startswith('--'):
                current = groups[flag] = [flag]
            else:
                current.append(flag)
    return tuple(token for group in groups.values() for token in group)


def _text(value, where, path):
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"'{path}': {where} must be a non-empty text")
    return value


def _published(entries, where, path):
    """A list of {top1, source} entries as Published numbers."""
    if entries is None:
        return ()
    if not isinstance(entries, list) or not entries:
        raise UserError(f"'{path}': {where} must be a list of {{top1: NUMBER, source: TEXT}} entries")
    numbers = []
    for entry in entries:
        if (not isinstance(entry, dict) or set(entry) != {'top1', 'source'}
                or isinstance(entry['top1'], bool) or not isinstance(entry['top1'], (int, float))):
            raise UserError(f"'{path}': {where} entries must be {{top1: NUMBER, source: TEXT}}; got {entry!r}")
        numbers.append(Published(float(entry['top1']), _text(entry['source'], f'{where} source', path)))
    return tuple(numbers)


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
    return {method: _flag_list(flags, f'methods.{method}', path) for method, flags in methods.items()}


def _names(value, known, where, path):
    """A list of short names, each among `known`; None (left out) means all of them."""
    if value is None:
        return set(known)
    if not isinstance(value, list) or not value or not all(name in known for name in value):
        raise UserError(f"'{path}': {where} must be a list among {', '.join(known)}; got {value!r}")
    return set(value)


def _cell_flags(table, path, teachers, students, methods):
    """The authors' flags per cell, as (method, teachers, students, flags, source) rules."""
    rules = []
    for i, rule in enumerate(table.get('cell_flags') or []):
        where = f'cell_flags[{i}]'
        if not isinstance(rule, dict) or not {'method', 'flags', 'source'} <= set(rule) or not set(rule) <= {
                'method', 'teachers', 'students', 'flags', 'source'}:
            raise UserError(f"'{path}': {where} takes method, flags, source and optionally teachers, students; "
                            f"got {rule!r}")
        if rule['method'] not in methods:
            raise UserError(f"'{path}': {where}.method '{rule['method']}' is not one of the methods")
        rules.append((rule['method'], _names(rule.get('teachers'), teachers, f'{where}.teachers', path),
                      _names(rule.get('students'), students, f'{where}.students', path),
                      _flag_list(rule['flags'], f'{where}.flags', path), _text(rule['source'], f'{where}.source', path)))
    return rules


def _variants(table, path, teachers, students, methods):
    variants = table.get('variants') or {}
    if not isinstance(variants, dict):
        raise UserError(f"'{path}': 'variants' must map variant names to {{method, flags, pairs, about}}")
    checked = {}
    for name, variant in variants.items():
        where = f'variants.{name}'
        if not isinstance(variant, dict) or set(variant) != {'method', 'flags', 'pairs', 'about'}:
            raise UserError(f"'{path}': {where} must hold method, flags, pairs and about; got {variant!r}")
        if name in methods or variant['method'] not in methods:
            raise UserError(f"'{path}': {where}: the name must not be a method's and its method must be one "
                            f"of {', '.join(methods)}")
        pairs = variant['pairs']
        known = [f'{teacher}-{student}' for teacher in teachers for student in students]
        if not isinstance(pairs, list) or not pairs or not all(pair in known for pair in pairs):
            raise UserError(f"'{path}': {where}.pairs must list TEACHER-STUDENT short names (e.g. swin_t-resnet18); "
                            f"got {pairs!r}")
        checked[name] = (variant['method'], _flag_list(variant['flags'], f'{where}.flags', path),
                         [pair.split('-', 1) for pair in pairs], _text(variant['about'], f'{where}.about', path))
    return checked


def read_table(path=TABLE):
    """The table as written, its shape checked so that a typo fails here rather than in a launched run."""
    table = load_yaml(path, 'experiment table')
    unknown = sorted(set(table) - set(TABLE_KEYS))
    missing = [key for key in TABLE_KEYS if key not in table]
    if unknown or missing:
        raise UserError(f"'{path}': unknown keys {unknown}, missing keys {missing}; expected {', '.join(TABLE_KEYS)}")
    return table


def load_experiments(path=TABLE):
    """Every cell of the table, by name: teacher x student x method, then the variants, then each student
    alone and each teacher's fine-tuning."""
    table = read_table(path)
    teachers = _section(table, 'teachers', path, ('model', 'finetune_config'))
    students = _section(table, 'students', path, ('model', 'recipe'))
    methods = _methods(table, path)
    rules = _cell_flags(table, path, teachers, students, methods)
    variants = _variants(table, path, teachers, students, methods)
    dataset, num_classes = table['dataset'], int(table['num_classes'])

    def distillation(name, teacher_key, student_key, method, variant=None, variant_flags=(), about=None):
        teacher, student = teachers[teacher_key], students[student_key]
        applying = [(flags, source) for rule_method, rule_teachers, rule_students, flags, source in rules
                    if rule_method == method and teacher_key in rule_teachers and student_key in rule_students]
        extra = merge_flags(*[flags for flags, _ in applying], variant_flags)
        sources = [source for _, source in applying] + ([about] if about else [])
        return Experiment(name=name, dataset=dataset, num_classes=num_classes, teacher=teacher['model'],
                          student=student['model'], recipe=student['recipe'], method=method,
                          method_flags=methods[method], extra_flags=extra, extra_sources=tuple(sources),
                          variant=variant, teacher_checkpoint=table['teacher_checkpoint'].format(model=teacher['model']),
                          published=())

    def alone(name, model, recipe, published):
        return Experiment(name=name, dataset=dataset, num_classes=num_classes, teacher=None, student=model,
                          recipe=recipe, method='vanilla', method_flags=(), extra_flags=(), extra_sources=(),
                          variant=None, teacher_checkpoint=None, published=published)

    experiments = {}
    for teacher_key in teachers:
        for student_key in students:
            for method in methods:
                name = f'{dataset}-{method}-{teacher_key}-{student_key}'
                experiments[name] = distillation(name, teacher_key, student_key, method)
    for variant, (method, flags, pairs, about) in variants.items():
        for teacher_key, student_key in pairs:
            name = f'{dataset}-{variant}-{teacher_key}-{student_key}'
            experiments[name] = distillation(name, teacher_key, student_key, method, variant, flags, about)
    for key, student in students.items():
        experiments[f'{dataset}-vanilla-{key}'] = alone(
            f'{dataset}-vanilla-{key}', student['model'], student['recipe'],
            _published(student.get('published'), f'students.{key}.published', path))
    for key, teacher in teachers.items():
        experiments[f'{dataset}-finetune-{key}'] = alone(
            f'{dataset}-finetune-{key}', teacher['model'], teacher['finetune_config'],
            _published(teacher.get('published'), f'teachers.{key}.published', path))

    published = table['published'] or {}
    if not isinstance(published, dict):
        raise UserError(f"'{path}': 'published' must map cell names to lists of {{top1, source}}")
    unknown = [name for name in published if name not in experiments]
    if unknown:
        raise UserError(f"'{path}': published names cells that the table does not make: {', '.join(unknown)}")
    return {name: dataclasses.replace(experiment, published=_published(published[name], f'published.{name}', path))
            if name in published else experiment for name, experiment in experiments.items()}


def get_experiment(name, experiments):
    if name in experiments:
        return experiments[name]
    close = difflib.get_close_matches(name, list(experiments), n=5, cutoff=0.6)
    if not close:
        close = [known for known in experiments if name and name in known][:5]
    hint = f"; close names: {', '.join(close)}" if close else ''
    raise UserError(f"unknown experiment '{name}'{hint} (bash train.sh --list shows all "
                    f"{len(experiments)})")


def find_cell(experiments, dataset, teacher, student, method, name=None):
    """The cell of a run with these models and method, or None.

    A run named after a cell (`--experiment CELL`, as train.sh names them) with the same models and method is
    that cell, variants included; otherwise the cell of the method at its defaults. A vanilla run is the student
    alone, or the fine-tuning of a teacher when the model is one of the table's teachers.
    """
    if name in experiments:
        cell = experiments[name]
        if (cell.dataset, cell.teacher or '-', cell.student, cell.method) == (dataset, teacher, student, method) or (
                method == 'vanilla' == cell.method and (cell.dataset, cell.student) == (dataset, student)):
            return cell
    for cell in experiments.values():
        if cell.variant is not None or (cell.dataset, cell.student, cell.method) != (dataset, student, method):
            continue
        if method == 'vanilla' or cell.teacher == teacher:
            return cell
    return None


def find_published(experiments, dataset, teacher, student, method, name=None):
    """The first published top-1 of the run's cell (see find_cell), or None."""
    cell = find_cell(experiments, dataset, teacher, student, method, name)
    return cell.published_top1 if cell else None


def format_published(published):
    """The distinct published values, in order, joined by '/' (two sources may disagree); '-' for none."""
    values = list(dict.fromkeys(f'{number.top1:.2f}' for number in published))
    return '/'.join(values) or '-'


LIST_HEADER = ('cell', 'teacher', 'student', 'method', 'published', 'source', "flags beyond the method's defaults")


def listing(experiments):
    """A header, then one line per cell, in aligned columns: name, teacher, student, method, published top-1,
    the first source (with how many more), and the flags beyond the method's defaults ('-': none)."""
    rows = [LIST_HEADER]
    for e in experiments.values():
        source = '-'
        if e.published:
            source = e.published[0].source + (f' (+{len(e.published) - 1} more)' if len(e.published) > 1 else '')
        rows.append((e.name, e.teacher or '-', e.student, e.method, format_published(e.published), source,
                     ' '.join(e.extra_flags) or '-'))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ['  '.join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]) for row in rows]


def describe(experiment):
    """Everything the table says of one cell, for --about."""
    lines = [f'{experiment.name}: {experiment.student} '
             + (f'from {experiment.teacher}' if experiment.teacher else 'alone')
             + f', {experiment.method}' + (f' (variant {experiment.variant})' if experiment.variant else '')]
    lines.append(f"  flags beyond the method's defaults: {' '.join(experiment.extra_flags) or 'none'}")
    lines += [f'    source: {source}' for source in experiment.extra_sources]
    lines.append('  published top-1:' + ('' if experiment.published else ' none'))
    lines += [f'    {number.top1:.2f}  {number.source}' for number in experiment.published]
    lines.append('  train.py ' + shlex.join(experiment.train_arguments('DATA')))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('cell', nargs='?', help='a cell name (see --list)')
    parser.add_argument('--list', action='store_true', help='print a header, then every cell, one a line')
    parser.add_argument('--about', action='store_true',
                        help="print what the table says of the cell: its flags and published numbers with sources")
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
        experiment = get_experiment(args.cell, experiments)
        if args.about:
            print('\n'.join(describe(experiment)))
            return 0
        arguments = experiment.train_arguments(args.data)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print('\n'.join(arguments) if args.one_per_line else shlex.join(arguments))
    return 0


if __name__ == '__main__':
    # `--list | head` closes the pipe early; end quietly, as other listing tools do.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
