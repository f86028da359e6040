"""Frozen per-stage settings, and how they are saved next to every run.

Precedence, stated once: command-line options > a ``--config`` file > the defaults
below. Every output folder gets a ``config.yaml`` holding the resolved settings, so
``pmpclean scan DATASET --config DIR/config.yaml`` repeats the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "DataConfig",
    "EmbedConfig",
    "AuditConfig",
    "LabelConfig",
    "ScanConfig",
    "load_config",
    "config_to_dict",
    "config_from_dict",
]


@dataclass(frozen=True)
class DataConfig:
    """How to read the manifest."""

    image_col: str = "image"  # column holding the image path (relative to the manifest's folder)
    text_col: str = "caption"  # column holding the caption
    id_col: str | None = None  # optional unique row id column (checked for duplicates)
    label_col: str | None = None  # optional class label column: enables the label audit
    # optional ground truth (original row of each caption): enables metrics
    truth_col: str | None = None
    root: str | None = None  # folder relative image paths resolve against (default: the manifest's)


@dataclass(frozen=True)
class EmbedConfig:
    """Where embeddings come from."""

    model: str = "ViT-B-32"  # open_clip architecture name, or hf-hub:org/name
    pretrained: str = "laion2b_s34b_b79k"  # open_clip tag, checkpoint path, or "none" (random)
    embeddings: str | None = None  # precomputed .npz/.parquet (image, text): no model is loaded
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    batch_size: int = 64  # images or captions per forward pass
    workers: int = 2  # DataLoader worker processes decoding images
    cache_dir: str | None = None  # embedding cache (default: $XDG_CACHE_HOME/pmpclean)
    use_cache: bool = True  # reuse and extend the on-disk embedding cache


@dataclass(frozen=True)
class AuditConfig:
    """Scoring, splitting and rematching of image-caption pairs."""

    k: int = 3  # dataset neighbours per side that a pair is compared against (3 measures best)
    threshold: float = 0.5  # match_score below this flags a pair as mismatched
    # flagged pairs within this of the threshold, with no proposal: review
    review_margin: float = 0.2
    rematch: bool = True  # propose captions for flagged pairs with partial optimal transport
    mass: float | None = None  # fraction s of suspect mass transported (None: rematch default 0.8)
    reg: float | None = None  # entropic regularisation, in similarity-spread units (None: 0.4)
    cost: str = "learned"  # learned | fixed | paper: similarity-to-cost mapping
    candidates: int | None = None  # caption candidates per suspect image (None: 32)
    block_size: int | None = None  # largest dense transport matrix per side (None: 4096)
    # proposals below this rematch_confidence are withheld (0.6: precision >= 0.95 measured)
    min_confidence: float = 0.6
    # Up to this many images (captions), a pair's dataset alternatives are found by exact
    # search; above it by an approximate inverted-file search (cost ~ n^1.5 instead of n^2).
    exact_search_max: int = 20_000
    # Inverted lists each query visits in the approximate search: higher = closer to exact,
    # slower (8: ~80 % of the exact top-4 at 1M CLIP-like rows, F1 within 0.002 at 100k).
    search_nprobe: int = 8
    # Most scores the two-component mixture is fitted on; above it EM runs on a seeded
    # subsample and every row still gets its posterior. None fits on every row.
    mixture_fit_max: int | None = 200_000
    # Known mismatches of each kind (random caption, caption of a similar image) planted
    # among the dataset's confident pairs to calibrate the split, check that the model
    # sees, and bound the noise rate. 0: the bimodality mixture alone (no verdict check).
    plants: int = 2000


@dataclass(frozen=True)
class LabelConfig:
    """Label audit (active when DataConfig.label_col is set)."""

    method: str = "uot"  # uot (partial OT to class prototypes)
    epochs: int | None = None  # full-batch training steps of the modality heads (None: default)


@dataclass(frozen=True)
class ScanConfig:
    """Everything a scan needs; saved as config.yaml in the output folder."""

    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    seed: int = 0  # seeds every random choice of the run
    gallery_size: int = 24  # pairs per gallery in report.html (the full data is in audit.parquet)

    def replace(self, **changes: Any) -> ScanConfig:
        """Return a copy with ``section__field=value`` or top-level ``field=value`` changes."""
        return config_from_dict(_merge(config_to_dict(self), _nest(changes)))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if "__" in key:
            section, name = key.split("__", 1)
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_SECTIONS = {"data": DataConfig, "embed": EmbedConfig, "audit": AuditConfig, "labels": LabelConfig}


def config_from_dict(raw: dict[str, Any], *, source: str = "settings") -> ScanConfig:
    """Build a :class:`ScanConfig` from a nested dict, rejecting unknown keys by name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(raw).__name__}.")
    top_names = {f.name for f in fields(ScanConfig)}
    unknown = sorted(set(raw) - top_names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(top_names))}."
        )
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            kwargs[name] = value
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping.")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(value) - known)
        if bad:
            raise ConfigError(
                f"{source}: unknown setting(s) {', '.join(f'{name}.{b}' for b in bad)}; "
                f"known in {name}: {', '.join(sorted(known))}."
            )
        kwargs[name] = cls(**value)
    return ScanConfig(**kwargs)


def load_config(path: str | Path) -> ScanConfig:
    """Read a ``config.yaml`` or ``config.json`` written by an earlier run (or by hand)."""
    import json

    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"Config file {p} does not exist; pass the config.yaml of an earlier scan."
        )
    text = p.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"Config file {p} could not be parsed: {exc}") from exc
    raw = raw or {}
    # a config.yaml written by pmpclean carries provenance keys next to the settings
    raw = {k: v for k, v in raw.items() if k not in {"pmpclean_version", "manifest"}}
    return config_from_dict(raw, source=str(p))
