"""Frozen per-stage settings, and how they are saved next to every run.

Precedence, stated once: command-line options > a ``--config`` file > the defaults
below. Every output folder gets a ``config.yaml`` holding the resolved settings, so
``pmpclean scan DATASET --config DIR/config.yaml`` repeats the run.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = [
    "DataConfig",
    "EmbedConfig",
    "AuditConfig",
    "LabelConfig",
    "ScanConfig",
    "FinetuneConfig",
    "METHODS",
    "SCHEDULES",
    "PRECISIONS",
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


# --------------------------------------------------------------------------- finetune


#: Training methods: ``l2rm`` (clean InfoNCE + soft targets from the partial-OT plan for
#: suspects) and ``contrastive`` (plain InfoNCE on every pair).
METHODS = ("l2rm", "contrastive")


#: Learning-rate decay after the linear warmup.
SCHEDULES = ("cosine", "linear", "constant")


#: ``auto`` = ``amp`` on CUDA, ``fp32`` elsewhere; ``amp``/``amp_bf16`` need a CUDA device.
PRECISIONS = ("auto", "fp32", "amp", "amp_bf16")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of :func:`finetune`. Precedence: CLI options > config file > these defaults.

    ``None`` means "choose from context"; the resolved values are written to
    ``finetune_config.yaml`` and ``metrics.json`` in the output folder.
    """

    # -- model -------------------------------------------------------------------------
    model: str = "ViT-B-32"  # open_clip architecture name (or local-dir:PATH, hf-hub:org/name)
    pretrained: str = "laion2b_s34b_b79k"  # start weights: open_clip tag, checkpoint file, "none"
    # -- data --------------------------------------------------------------------------
    image_col: str = "image"  # manifest column with the image path (ignored for a scan output)
    text_col: str = "caption"  # manifest column with the caption
    truth_col: str | None = None  # optional column: original row of each caption (pmpclean
    #   corrupt's true_row); enables per-epoch split precision/recall in metrics.json
    # -- method ------------------------------------------------------------------------
    method: str = "l2rm"  # l2rm | contrastive (plain InfoNCE on every pair)
    # -- optimisation --------------------------------------------------------------------
    epochs: int = 10  # passes over the training pairs
    batch_size: int = 128  # pairs per micro-batch (the in-batch negatives and OT plan)
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation);
    #   negatives and plans stay per micro-batch
    lr: float | None = None  # peak learning rate (None: 1e-5 from pretrained weights,
    #   1e-3 from random init)
    weight_decay: float = 0.1  # AdamW decay, not applied to gains, biases, logit_scale
    schedule: str = "cosine"  # cosine | linear | constant: decay after the warmup
    warmup_steps: int | None = None  # linear warmup, in optimizer steps (None: 5% of all)
    grad_clip: float | None = None  # clip the gradient norm to this (None: no clipping)
    lock_image: bool = False  # freeze the image tower (train the text tower only)
    lock_text: bool = False  # freeze the text tower (train the image tower only)
    precision: str = "auto"  # auto | fp32 | amp | amp_bf16 (mixed precision needs CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    workers: int = 0  # image-decoding worker processes (0: decode in the main process)
    cache_images: bool | None = None  # keep preprocessed images in RAM (None: if < 1 GiB)
    seed: int = 0  # seeds the validation split, data order and mixture fits (random init
    #   always uses pmpclean.embedding.RANDOM_SEED)
    # -- validation ----------------------------------------------------------------------
    val_fraction: float = 0.1  # fraction of images held out for validation (0: none); at
    #   least 2 when 8 remain for training, else none, with a warning (small datasets)
    val_dataset: str | None = None  # separate manifest to validate on (val_fraction unused)
    patience: int | None = None  # stop after this many epochs without a better validation
    #   R-sum (None: train all epochs); the best epoch's weights are the output
    # -- L2RM ----------------------------------------------------------------------------
    split_warmup_epochs: int | None = None  # plain-contrastive epochs before the first split
    #   (None: 0 with an audit or pretrained weights; from random init, until an epoch's
    #   mean training loss is 5% below its chance level, log(batch_size) for InfoNCE,
    #   (1 - batch_size^-q) / q for RINCE: before that the per-pair losses say nothing
    #   about the pairs)
    split_every: int = 1  # refresh the clean/suspect split every N epochs (0: never refresh)
    split_threshold: float = 0.5  # pairs with clean probability below this are suspects
    robust_q: float | None = None  # RINCE exponent of the clean pairs' contrastive loss, in
    #   [0, 1]: each direction's loss is (1 - p^q) / q with p the softmax probability of the
    #   true partner, so a pair's gradient is weighted by p^q and pairs the model cannot fit
    #   (mostly mismatched ones) pull less (Chuang et al., "Robust Contrastive Learning
    #   against Noisy Views", CVPR 2022); also during the split warmup. 0: InfoNCE.
    #   None: 0.3 for method l2rm from random initialisation on a manifest (the model
    #   audits itself), else 0: with a scan folder's split from the first epoch, RINCE's
    #   weaker pull early on leaves the suspects' soft targets in charge and hurts
    #   (benchmarks/results/finetune.md)
    suspect_targets: str | None = None  # global | batch: where a suspect's new partner comes
    #   from. global: at every split refresh, the dataset-scale partial OT of
    #   pmpclean.rematching over all suspects (learned cost, original pairing forbidden;
    #   with a scan folder, the scan's own proposals at the first split); a suspect whose
    #   proposal reaches rematch_min_confidence trains as a pair with the proposed caption,
    #   weighted by the confidence, and the others only serve as negatives. batch: L2RM's
    #   in-batch plan as soft targets (the research code's scheme: a random batch rarely
    #   holds a suspect's true partner). None: batch for method l2rm from random
    #   initialisation on a manifest (a model that audits itself from scratch proposes
    #   nothing confident, while in-batch targets still teach it; development runs in
    #   benchmarks/results/finetune_n3000.md), else global
    rematch_min_confidence: float = 0.6  # global: proposals below this are not trained on
    ot_mass: float = 0.5  # batch: fraction of the batch's suspect mass the plan moves, (0, 1]
    ot_reg: float = 0.05  # entropic regularisation of the plan (cost = cosine distance)
    min_plan_mass: float = 0.1  # suspects receiving less than this fraction of their
    #   marginal get no target (they contribute nothing)
    noisy_weight: float = 1.0  # weight of the suspects' soft-target loss (0: drop suspects)
    target_quantile: float | None = 0.25  # a suspect gets its plan target only when the
    #   target is at least as similar (plan-weighted cosine) as this quantile of the batch's
    #   clean pairs: the clean pairs calibrate what a true pair looks like (L2RM's "key
    #   points"); None: every suspect with enough transported mass gets its target
    audit_weight: float = 0.5  # with a scan folder: weight of the scan's match_score in every
    #   refreshed split, averaged with the loss mixture's clean probability (0: the model's
    #   own losses only after the first epoch; 1: keep the scan's split throughout)
    # -- output and resumption ---------------------------------------------------------------
    checkpoint_every: int | None = None  # also save resume.pt every N optimizer steps
    #   (None: at the end of every epoch only)
    keep_resume: bool = False  # keep resume.pt after a successful run
    resume: bool = False  # continue the interrupted run in out_dir from resume.pt
    overwrite: bool = False  # replace an earlier run in out_dir

    def replace(self, **changes: Any) -> FinetuneConfig:
        """Return a copy with ``changes`` applied (unknown names raise :class:`ConfigError`)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)


def _check_names(options: dict[str, Any]) -> None:
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"Unknown finetune setting(s) {', '.join(unknown)}; "
            f"known settings: {', '.join(sorted(known))}."
        )


def _validate(cfg: FinetuneConfig) -> None:
    # long: one check per finetune setting; step 5 moves each beside its field
    """Check every setting once, naming the setting, the constraint and the fix."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    if cfg.method not in METHODS:
        raise ConfigError(f"Unknown method {cfg.method!r}: expected one of {', '.join(METHODS)}.")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(
            f"Unknown schedule {cfg.schedule!r}: expected one of {', '.join(SCHEDULES)}."
        )
    if cfg.precision not in PRECISIONS:
        raise ConfigError(
            f"Unknown precision {cfg.precision!r}: expected one of {', '.join(PRECISIONS)}."
        )

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return (
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
        )

    need(
        is_int(cfg.epochs) and cfg.epochs >= 1,
        f"epochs must be an integer >= 1, got {cfg.epochs!r}.",
    )
    need(
        is_int(cfg.batch_size) and cfg.batch_size >= 2,
        f"batch_size must be an integer >= 2 (contrastive training needs negatives), "
        f"got {cfg.batch_size!r}.",
    )
    need(
        is_int(cfg.accum_steps) and cfg.accum_steps >= 1,
        f"accum_steps must be an integer >= 1, got {cfg.accum_steps!r}.",
    )
    need(
        cfg.lr is None or (is_num(cfg.lr) and cfg.lr > 0),
        f"lr must be a positive number (or None for the default), got {cfg.lr!r}.",
    )
    need(
        is_num(cfg.weight_decay) and cfg.weight_decay >= 0,
        f"weight_decay must be >= 0, got {cfg.weight_decay!r}.",
    )
    need(
        cfg.warmup_steps is None or (is_int(cfg.warmup_steps) and cfg.warmup_steps >= 0),
        f"warmup_steps must be an integer >= 0 (or None for 5% of all steps), "
        f"got {cfg.warmup_steps!r}.",
    )
    need(
        cfg.grad_clip is None or (is_num(cfg.grad_clip) and cfg.grad_clip > 0),
        f"grad_clip must be a positive number or None, got {cfg.grad_clip!r}.",
    )
    need(
        not (cfg.lock_image and cfg.lock_text),
        "lock_image and lock_text are both set, which leaves nothing to train; "
        "lock at most one tower.",
    )
    need(
        is_int(cfg.workers) and cfg.workers >= 0,
        f"workers must be an integer >= 0, got {cfg.workers!r}.",
    )
    need(is_int(cfg.seed), f"seed must be an integer, got {cfg.seed!r}.")
    need(
        is_num(cfg.val_fraction) and 0 <= cfg.val_fraction <= 0.5,
        f"val_fraction must be in [0, 0.5] (fraction of images held out), "
        f"got {cfg.val_fraction!r}.",
    )
    need(
        cfg.patience is None or (is_int(cfg.patience) and cfg.patience >= 1),
        f"patience must be an integer >= 1 or None, got {cfg.patience!r}.",
    )
    need(
        cfg.patience is None or cfg.val_fraction > 0 or cfg.val_dataset is not None,
        "patience (early stopping) needs a validation split: set val_fraction > 0 or val_dataset.",
    )
    need(
        cfg.split_warmup_epochs is None
        or (is_int(cfg.split_warmup_epochs) and cfg.split_warmup_epochs >= 0),
        f"split_warmup_epochs must be an integer >= 0 or None, got {cfg.split_warmup_epochs!r}.",
    )
    need(
        is_int(cfg.split_every) and cfg.split_every >= 0,
        f"split_every must be an integer >= 0 (0: never refresh), got {cfg.split_every!r}.",
    )
    need(
        is_num(cfg.split_threshold) and 0 < cfg.split_threshold < 1,
        f"split_threshold must be in (0, 1), got {cfg.split_threshold!r}.",
    )
    need(
        cfg.robust_q is None or (is_num(cfg.robust_q) and 0 <= cfg.robust_q <= 1),
        f"robust_q must be in [0, 1] (0: InfoNCE, 1: the most noise-robust RINCE) or None "
        f"for the default, got {cfg.robust_q!r}.",
    )
    need(
        is_num(cfg.ot_mass) and 0 < cfg.ot_mass <= 1,
        f"ot_mass must be in (0, 1] (fraction of suspect mass transported), got {cfg.ot_mass!r}.",
    )
    need(is_num(cfg.ot_reg) and cfg.ot_reg > 0, f"ot_reg must be > 0, got {cfg.ot_reg!r}.")
    need(
        is_num(cfg.min_plan_mass) and 0 <= cfg.min_plan_mass < 1,
        f"min_plan_mass must be in [0, 1), got {cfg.min_plan_mass!r}.",
    )
    need(
        cfg.suspect_targets in (None, "global", "batch"),
        f"suspect_targets must be 'global', 'batch' or None, got {cfg.suspect_targets!r}.",
    )
    need(
        is_num(cfg.rematch_min_confidence) and 0 <= cfg.rematch_min_confidence <= 1,
        f"rematch_min_confidence must be in [0, 1], got {cfg.rematch_min_confidence!r}.",
    )
    need(
        is_num(cfg.noisy_weight) and cfg.noisy_weight >= 0,
        f"noisy_weight must be >= 0, got {cfg.noisy_weight!r}.",
    )
    need(
        cfg.target_quantile is None
        or (is_num(cfg.target_quantile) and 0 <= cfg.target_quantile <= 1),
        f"target_quantile must be in [0, 1] or None, got {cfg.target_quantile!r}.",
    )
    need(
        is_num(cfg.audit_weight) and 0 <= cfg.audit_weight <= 1,
        f"audit_weight must be in [0, 1] (weight of the scan's match_score in refreshed "
        f"splits), got {cfg.audit_weight!r}.",
    )
    need(
        cfg.checkpoint_every is None
        or (is_int(cfg.checkpoint_every) and cfg.checkpoint_every >= 1),
        f"checkpoint_every must be an integer >= 1 or None, got {cfg.checkpoint_every!r}.",
    )
    need(
        not (cfg.resume and cfg.overwrite),
        "resume and overwrite are both set; pass resume to continue the run in the output "
        "folder or overwrite to start over, not both.",
    )
