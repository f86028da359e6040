"""The pmpclean exception family.

Every error a user can cause is a :class:`PmpcleanError`. Its message states the
problem, the constraint that was broken and the remedy, in that order, so that the
CLI can print it as a single red line (see ``pmpclean.cli``).
"""

from __future__ import annotations

__all__ = [
    "PmpcleanError",
    "DatasetError",
    "ModelLoadError",
    "EmbeddingError",
    "ConfigError",
    "RematchError",
    "LabelAuditError",
    "EngineError",
]


class PmpcleanError(Exception):
    """Base class of every error pmpclean raises on purpose."""


class DatasetError(PmpcleanError):
    """The manifest or a precomputed-embedding file cannot be used as given."""


class ModelLoadError(PmpcleanError):
    """The open_clip model or its weights cannot be loaded."""


class EmbeddingError(PmpcleanError):
    """Embedding failed or a precomputed embedding file does not fit the manifest."""


class ConfigError(PmpcleanError, ValueError):
    """A setting is out of range or inconsistent with another setting."""


class RematchError(PmpcleanError):
    """The rematching problem cannot be posed or solved with the given data."""


class LabelAuditError(PmpcleanError):
    """The label column cannot be audited (one class, empty classes, ...)."""


class EngineError(PmpcleanError):
    """A distributed engine (``--engine ray``) could not finish a stage on its cluster."""
