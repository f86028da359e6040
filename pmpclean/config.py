"""Frozen per-stage settings, and how they are saved next to every run.

Precedence, stated once: command-line options > a ``--config`` file > the defaults
below. Every output folder gets a ``config.yaml`` holding the resolved settings, so
``pmpclean scan DATASET --config DIR/config.yaml`` repeats the run.
"""

from __future__ import annotations

import dataclasses
import typing
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
    # precomputed embeddings: no model is loaded. A row-aligned .npz/.parquet (image, text),
    # clip-retrieval's output folder, or DataComp shards (<shard>.parquet + <shard>.npz)
    embeddings: str | None = None
    embeddings_pair: str = "b32"  # DataComp arrays to read: b32 (ViT-B/32) or l14 (ViT-L/14)
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
    # proposals below this rematch_confidence are withheld; the confidence is the share of
    # planted proposals at that confidence that were right (0.8: precision 0.93-0.95 on
    # Flickr8k shuffle and mixed noise, benchmarks/results/rematch_calibration.md)
    min_confidence: float = 0.8
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


_KINDS: dict[type, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}


def _field_kinds(cls: type) -> dict[str, tuple[tuple[type, ...], bool]]:
    """Each field's accepted plain types (from its annotation) and whether null is allowed."""
    out: dict[str, tuple[tuple[type, ...], bool]] = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) or (hint,)
        kinds = tuple(a for a in args if a in _KINDS)
        if kinds:  # nested sections (dataclasses) are checked by config_from_dict itself
            out[name] = (kinds, type(None) in args)
    return out


def _checked(value: Any, kinds: tuple[tuple[type, ...], bool], key: str, source: str) -> Any:
    """``value`` if it has one of the field's types (an integer counts as a number)."""
    types, nullable = kinds
    if value is None and nullable:
        return value
    if isinstance(value, bool):
        ok = bool in types
    elif isinstance(value, int):
        ok = int in types or float in types
        if ok and int not in types:
            value = float(value)
    else:
        ok = isinstance(value, tuple(t for t in types if t is not bool and t is not int))
    if not ok:
        expected = " or ".join(_KINDS[t] for t in types) + (" or null" if nullable else "")
        raise ConfigError(
            f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__}); "
            "fix or remove that line (a setting left out takes its default)."
        )
    return value


def config_from_dict(
    raw: dict[str, Any], *, source: str = "settings", check_types: bool = False
) -> ScanConfig:
    """Build a :class:`ScanConfig` from a nested dict, rejecting unknown keys by name.

    With ``check_types`` (a settings file) every value must have its field's type
    (``k: three`` is refused naming ``audit.k`` and ``source``); values given from
    Python are range-checked where they are used.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of settings (e.g. 'audit:' then '  threshold: 0.5'), "
            f"got {_kind_of(raw)}; pass the config.yaml of an earlier scan."
        )
    top_names = {f.name for f in fields(ScanConfig)}
    unknown = sorted(set(raw) - top_names, key=str)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(map(str, unknown))}; "
            f"known: {', '.join(sorted(top_names))}."
        )
    top_kinds = _field_kinds(ScanConfig) if check_types else {}
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            kinds = top_kinds.get(name)
            kwargs[name] = value if kinds is None else _checked(value, kinds, name, source)
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(
                f"{source}: section {name!r} must be a mapping of settings "
                f"(e.g. '{name}:' then indented 'key: value' lines), got {_kind_of(value)}."
            )
        known = {f.name for f in fields(cls)}
        bad = sorted(set(value) - known, key=str)
        if bad:
            raise ConfigError(
                f"{source}: unknown setting(s) {', '.join(f'{name}.{b}' for b in bad)}; "
                f"known in {name}: {', '.join(sorted(known))}."
            )
        if check_types:
            kinds_of = _field_kinds(cls)
            value = {
                k: _checked(v, kinds_of[k], f"{name}.{k}", source) if k in kinds_of else v
                for k, v in value.items()
            }
        kwargs[name] = cls(**value)
    return ScanConfig(**kwargs)


def _kind_of(value: Any) -> str:
    """'a list', 'a string', ... for messages about YAML content."""
    names = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)


def load_config(path: str | Path, *, base: ScanConfig | None = None) -> ScanConfig:
    """Read a ``config.yaml`` or ``config.json`` written by an earlier run (or by hand).

    Settings the file leaves out take their value in ``base`` (default: the defaults).
    """
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
    if raw is None:  # an empty file: every default
        raw = {}
    if isinstance(raw, dict):
        # a config.yaml written by pmpclean carries provenance keys next to the settings
        raw = {k: v for k, v in raw.items() if k not in {"pmpclean_version", "manifest"}}
        if base is not None:
            raw = _merge(config_to_dict(base), raw)
    return config_from_dict(raw, source=f"Config file {p}", check_types=True)
