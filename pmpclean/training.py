"""The fine-tuning API under its earlier module name; the code lives in :mod:`pmpclean.train`."""

from __future__ import annotations

from .train import *  # noqa: F403 - this module is an alias of the package's public API
from .train import __all__ as __all__
