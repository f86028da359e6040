"""pmpclean: audit and clean noisy image-caption datasets.

Public API::

    pmpclean.scan(manifest, config=ScanConfig(...))        -> ScanResult
    pmpclean.rematch(manifest, out="cleaned.csv", ...)     -> RematchResult
    pmpclean.embed(manifest, out="emb.npz", ...)           -> EmbedResult
    pmpclean.corrupt(manifest, out="noisy.csv", rate=0.2)  -> CorruptResult
    pmpclean.finetune(manifest, out_dir="model/", ...)     -> FinetuneResult

Submodules not imported here because they pull heavy dependencies on first use:
``pmpclean.embedding`` (torch, open_clip), ``pmpclean.transport`` (POT),
``pmpclean.neighbors`` (faiss), ``pmpclean.labels`` (torch). ``pmpclean.train`` (the
fine-tuning loop; ``pmpclean.training`` is its earlier name) is imported, but it loads
torch and open_clip only when called; ``pmpclean.finetune`` is its public function.
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
from .train import FinetuneConfig, FinetuneResult, finetune

__all__ = [
    "__version__",
    "scan",
    "rematch",
    "embed",
    "corrupt",
    "finetune",
    "ScanConfig",
    "DataConfig",
    "EmbedConfig",
    "AuditConfig",
    "LabelConfig",
    "FinetuneConfig",
    "load_config",
    "ScanResult",
    "RematchResult",
    "EmbedResult",
    "CorruptResult",
    "FinetuneResult",
    "PmpcleanError",
    "DatasetError",
    "ModelLoadError",
    "EmbeddingError",
    "ConfigError",
    "RematchError",
    "LabelAuditError",
]
