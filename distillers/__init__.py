"""Distillers, one file per method. Importing this package registers them all."""
from ._base import Distiller, hard_target
from .registry import UnknownDistillerError, distiller_names, get_distiller, register_distiller
from . import vanilla, kd  # noqa: F401  (registration)
from . import ofa, rsd, dkd, dist, hcd  # noqa: F401  (registration)
from . import fitnet, correlation, rkd, crd, bkd  # noqa: F401  (registration)
