"""pmpclean: audit and clean noisy image-caption datasets.

Public API::

    pmpclean.scan(manifest, config=ScanConfig(...))        -> ScanResult
    pmpclean.rematch(manifest, out="cleaned.csv", ...)     -> RematchResult
    pmpclean.embed(manifest, out="emb.npz", ...)           -> EmbedResult
    pmpclean.corrupt(manifest, out="noisy.csv", rate=0.2)  -> CorruptResult

Submodules not imported here because they pull heavy dependencies on first use:
``pmpclean.embedding`` (torch, open_clip), ``pmpclean.rematching`` (POT),
``pmpclean.neighbors`` (faiss), ``pmpclean.labels`` (torch), ``pmpclean.finetune``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import AuditConfig, DataConfig, EmbedConfig, LabelConfig, ScanConfig, load_config
from .errors import (
    ConfigError,
    DatasetError,
    EmbeddingError,
    LabelAuditError,
    ModelLoadError,
    PmpcleanError,
    RematchError,
)
from .pipeline import (
    CorruptResult,
    EmbedResult,
    RematchResult,
    ScanResult,
    corrupt,
    embed,
    rematch,
    scan,
)

__all__ = [
    "__version__",
    "scan",
    "rematch",
    "embed",
    "corrupt",
    "ScanConfig",
    "DataConfig",
    "EmbedConfig",
    "AuditConfig",
    "LabelConfig",
    "load_config",
    "ScanResult",
    "RematchResult",
    "EmbedResult",
    "CorruptResult",
    "PmpcleanError",
    "DatasetError",
    "ModelLoadError",
    "EmbeddingError",
    "ConfigError",
    "RematchError",
    "LabelAuditError",
]
