"""The product explains itself: every registered method has its page in docs/, in one layout, naming every flag
it adds; links inside docs/ resolve; and no file of the product points at a file outside the repository."""
import argparse
import os
import re
import subprocess

import pytest

import distillers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, 'docs')
METHODS = os.path.join(DOCS, 'methods')

# Each page has a `## ` heading for each of these; a heading qualifies when it contains one of the words.
REQUIRED_SECTIONS = {
    'the loss as a formula': ('loss',),
    'what is detached': ('detach',),
    'the reduction': ('reduction',),
    'the flags with defaults': ('flag',),
    'the extra modules and their parameter counts': ('extra module', 'parameter'),
    'the paper': ('paper',),
    'where ours differs from the reference code': ('reference',),
}
# What users get is the repository: nothing in it may send them to the team's shared folder.
OUTSIDE_POINTERS = ('SPEC.md', '../shared')


def page_path(name):
    return os.path.join(METHODS, f'{name}.md')


def headings(text):
    return [line[3:].strip().lower() for line in text.splitlines() if line.startswith('## ')]


def method_flags(name):
    """The long option of every flag the method's `add_arguments` declares."""
    parser = argparse.ArgumentParser()
    distillers.get_distiller(name).add_arguments(parser)
    return [action.option_strings[0] for action in parser._actions if action.option_strings
            and action.dest != 'help']


def test_every_registered_method_has_a_page():
    missing = [name for name in distillers.distiller_names() if not os.path.isfile(page_path(name))]
    assert not missing, f'registered methods without docs/methods/<name>.md: {missing}'


@pytest.mark.parametrize('name', distillers.distiller_names())
def test_method_page_has_the_layout_and_names_every_flag(name):
    with open(page_path(name)) as f:
        text = f.read()
    assert text.startswith(f'# {name}'), f'docs/methods/{name}.md must start with "# {name}"'
    found = headings(text)
    lacking = [section for section, words in REQUIRED_SECTIONS.items()
               if not any(word in heading for heading in found for word in words)]
    assert not lacking, f'docs/methods/{name}.md has no section on {", ".join(lacking)} (headings: {found})'
    unnamed = [flag for flag in method_flags(name) if f'`{flag}`' not in text]
    assert not unnamed, f'docs/methods/{name}.md does not name its flags {unnamed}'


def test_docs_index_links_every_page_and_every_link_resolves():
    pages = sorted(os.path.relpath(os.path.join(folder, file), DOCS)
                   for folder, _, files in os.walk(DOCS) for file in files if file.endswith('.md'))
    with open(os.path.join(DOCS, 'README.md')) as f:
        index = f.read()
    unlinked = [page for page in pages if page != 'README.md' and f']({page})' not in index]
    assert not unlinked, f'docs/README.md does not link {unlinked}'
    broken = []
    for page in pages:
        with open(os.path.join(DOCS, page)) as f:
            for target in re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', f.read()):
                if '://' not in target and not os.path.exists(os.path.join(DOCS, os.path.dirname(page), target)):
                    broken.append(f'{page} -> {target}')
    assert not broken, f'links to missing files: {broken}'


def tracked_files():
    """The repository's tracked files (git), or every file when this copy is not a git checkout."""
    try:
        listing = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
        return [path for path in listing.decode().split('\0') if path]
    except (OSError, subprocess.CalledProcessError):
        return [os.path.relpath(os.path.join(folder, file), ROOT) for folder, dirs, files in os.walk(ROOT)
                if not os.path.relpath(folder, ROOT).startswith(('.git', 'output'))
                for file in files]


def test_no_file_outside_tests_points_outside_the_repository():
    offending = []
    for path in tracked_files():
        if path.startswith('tests' + os.sep) or path.startswith('tests/'):
            continue
        try:
            with open(os.path.join(ROOT, path), encoding='utf-8') as f:
                lines = f.read().splitlines()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files; files deleted but not yet committed
        offending += [f'{path}:{number}' for number, line in enumerate(lines, 1)
                      if any(pointer in line for pointer in OUTSIDE_POINTERS)]
    assert not offending, f'these lines point at files users do not get (point at docs/ instead): {offending}'
