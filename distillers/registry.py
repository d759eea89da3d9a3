"""Distiller registry: `@register_distiller` stores a class under its lower-case name."""

_DISTILLERS = {}


class UnknownDistillerError(ValueError):
    pass


def register_distiller(cls):
    name = cls.__name__.lower()
    if name in _DISTILLERS:
        raise ValueError(f"distiller '{name}' is registered twice")
    _DISTILLERS[name] = cls
    return cls


def distiller_names():
    return sorted(_DISTILLERS)


def get_distiller(name):
    key = str(name).lower()
    if key not in _DISTILLERS:
        raise UnknownDistillerError(f"unknown distiller '{name}'; known: {', '.join(distiller_names())}")
    return _DISTILLERS[key]
