"""Reading YAML files with errors that name the file and the line; no heavy imports, for the tools too."""
import os

import yaml

from .errors import UserError


def load_yaml(path, what='config'):
    """Read a YAML mapping; a parse error names the file and line."""
    if os.path.isdir(path):
        raise UserError(f"{what} file '{path}' is a folder; give a YAML file (e.g. configs/cifar/cnn.yaml)")
    if not os.path.isfile(path):
        raise UserError(f"{what} file '{path}' does not exist")
    with open(path) as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, 'problem_mark', None)
            where = f' line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
            problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
            raise UserError(f"{what} '{path}'{where}: YAML does not parse ({problem})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"{what} '{path}' must be a mapping, got {type(config).__name__}")
    return config
