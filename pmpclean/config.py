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
from typing import Annotated, Any

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
    "load_finetune_config",
    "config_to_dict",
    "config_from_dict",
]


@dataclass(frozen=True)
class Range:
    """The values a setting allows, declared beside its field:
    ``epochs: Annotated[int, Range("int", ge=1)] = 10``. :func:`check_settings` reads it
    and names the setting, the constraint and the value that broke it.

    ``kind`` is ``"int"``, ``"num"`` (finite, not bool) or ``"choice"`` (one of
    ``choices``); ``ge``/``gt``/``le``/``lt`` bound a number; ``none`` allows None.
    ``phrase`` replaces the generated constraint of the message ("an integer >= 1",
    "in (0, 1]", ...); ``why`` follows it in parentheses. The message reads
    ``<label> must <verb> <constraint>, got <value><after>.`` (label: the field's name).
    ``style="keyword"`` words it for a function's keyword argument instead:
    ``mass=1.5 is outside (0, 1]<after>.``, ``k=0 must be an integer >= 1 (<why>)<after>.``
    and ``Unknown method cost='magic': expected one of 'learned', ...``.
    """

    kind: str = "num"
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    none: bool = False
    phrase: str | None = None
    why: str = ""
    verb: str = "be"
    label: str | None = None
    after: str = ""
    style: str = "setting"

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.none
        if self.kind == "choice":
            return value in self.choices
        number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        if self.kind == "int" and not (number and isinstance(value, (int, np.integer))):
            return False
        if not (number and math.isfinite(value)):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def message(self, name: str, value: Any) -> str:
        if self.style == "keyword":
            return self._keyword_message(name, value)
        name = self.label or name
        if self.kind == "choice" and self.phrase is None:
            return f"Unknown {name} {value!r}: expected one of {', '.join(self.choices)}."
        text = self.phrase or self._bounds()
        if self.why:
            text += f" ({self.why})"
        if self.none and self.phrase is None:
            text += " or None"
        return f"{name} must {self.verb} {text}, got {value!r}{self.after}."

    def _keyword_message(self, name: str, value: Any) -> str:
        if self.kind == "choice":
            expected = ", ".join(map(repr, self.choices))
            return f"Unknown method {name}={value!r}: expected one of {expected}."
        interval = self.interval()
        if interval is not None and self.phrase is None:
            return f"{name}={value!r} is outside {interval}{self.after}."
        why = f" ({self.why})" if self.why else ""
        return f"{name}={value!r} must be {self.phrase or self._bounds()}{why}{self.after}."

    def interval(self) -> str | None:
        """``(0, 1]``-style text of a number bounded on both sides, else None."""
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        hi = ("]", self.le) if self.le is not None else (")", self.lt)
        if lo[1] is None or hi[1] is None:
            return None
        return f"{lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"

    def _bounds(self) -> str:
        interval = self.interval()
        if interval is not None:
            return f"in {interval}"
        lo = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        if lo[1] is not None:
            bound = f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
            return f"an integer {bound}" if self.kind == "int" else bound
        return "an integer" if self.kind == "int" else "a number"


@dataclass(frozen=True)
class Help:
    """A setting's description for people, declared beside its field (and its
    :class:`Range`): the help of the command-line option that sets it, so the option is
    declared once (``pmpclean.cli`` generates it). ``{range}`` in the text reads the
    Range's interval (``in (0, 1]``), ``{default}`` the field's default. ``off``
    describes the flag that turns a boolean setting off (``--no-cache``: ``use_cache``).
    Plain text: the command line escapes what its markup would read.
    """

    text: str
    off: str = ""


def declared(cls: type, name: str) -> tuple[Any, Range | None, Help | None]:
    """The annotation (without its metadata), :class:`Range` and :class:`Help` declared
    for the field ``name`` of the settings dataclass ``cls``."""
    hint = typing.get_type_hints(cls, include_extras=True).get(name)
    if hint is None or name not in {f.name for f in fields(cls)}:
        raise ConfigError(f"{cls.__name__} has no setting {name!r}.")
    meta = getattr(hint, "__metadata__", ())
    spec = next((m for m in meta if isinstance(m, Range)), None)
    text = next((m for m in meta if isinstance(m, Help)), None)
    return (hint.__origin__ if meta else hint), spec, text


def check_settings(cfg: Any) -> None:
    """Check every field of a settings dataclass against the :class:`Range` declared
    beside it; raise :class:`ConfigError` naming the first one out of range."""
    for f in fields(cfg):
        spec = declared(type(cfg), f.name)[1]
        value = getattr(cfg, f.name)
        if spec is not None and not spec.allows(value):
            raise ConfigError(spec.message(f.name, value))


# Help texts that two settings dataclasses share (ScanConfig's sections and FinetuneConfig)
_IMAGE_COL = "Column holding image paths (relative to the manifest's folder)."
_TEXT_COL = "Column holding captions."
_MODEL = "open_clip architecture name (as open_clip lists them), or hf-hub:org/name."
_DEVICE = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."
_SEED = "Seed of every random choice; the same seed repeats the run."


@dataclass(frozen=True)
class DataConfig:
    """How to read the manifest."""

    image_col: Annotated[str, Help(_IMAGE_COL)] = "image"
    text_col: Annotated[str, Help(_TEXT_COL)] = "caption"
    id_col: Annotated[
        str | None, Help("Optional column of unique row ids (checked for duplicates).")
    ] = None
    label_col: Annotated[
        str | None, Help("Optional class-label column: also audits the labels.")
    ] = None
    # optional ground truth (original row of each caption): enables metrics
    truth_col: Annotated[
        str | None,
        Help(
            "Ground-truth column (original row of each caption, as 'pmpclean corrupt' "
            "writes): adds detection and rematch metrics."
        ),
    ] = None
    root: Annotated[
        str | None,
        Help("Folder that relative image paths resolve against [default: the manifest's folder]."),
    ] = None


@dataclass(frozen=True)
class EmbedConfig:
    """Where embeddings come from."""

    model: Annotated[str, Help(_MODEL)] = "ViT-B-32"
    pretrained: Annotated[
        str,
        Help(
            "open_clip weights tag, a local checkpoint file, or 'none' for random weights "
            "(smoke tests only: scores mean nothing)."
        ),
    ] = "laion2b_s34b_b79k"
    # precomputed embeddings: no model is loaded. A row-aligned .npz/.parquet (image, text),
    # clip-retrieval's output folder, or DataComp shards (<shard>.parquet + <shard>.npz)
    embeddings: Annotated[
        str | None,
        Help(
            "Precomputed embeddings (.npz with arrays 'image' and 'text', shape (n_rows, d), "
            "row-aligned; or .parquet), clip-retrieval's output folder, or a folder of "
            "DataComp shards (joined by key or uid). No model is loaded, no image is opened."
        ),
    ] = None
    embeddings_pair: Annotated[
        str, Help("DataComp embeddings: b32 (ViT-B/32) or l14 (ViT-L/14) arrays.")
    ] = "b32"
    device: Annotated[str, Help(_DEVICE)] = "auto"
    batch_size: Annotated[int, Range("int", ge=1), Help("Images or captions per forward pass.")] = (
        64
    )
    workers: Annotated[
        int, Range("int", ge=0), Help("Processes decoding images in parallel with the model.")
    ] = 2
    cache_dir: Annotated[
        str | None,
        Help(
            "Embedding cache folder [default: $PMPCLEAN_CACHE_DIR, else pmpclean in "
            "$XDG_CACHE_HOME, else ~/.cache/pmpclean]."
        ),
    ] = None
    use_cache: Annotated[
        bool,
        Help(
            "Reuse and extend the on-disk embedding cache.",
            off="Neither read nor write the embedding cache.",
        ),
    ] = True


#: Documented values of ``rematch(cost=...)`` and of ``AuditConfig.cost``.
COSTS = ("learned", "fixed", "paper")
#: Documented values of ``rematch(solver=...)``.
SOLVERS = ("auto", "sparse", "dense", "batch")
#: Documented values of ``rematch(pool=...)``.
POOLS = ("suspects", "all")
#: Documented values of ``rematch(reg_units=...)``.
REG_UNITS = ("std", "cost")
_THRESHOLD_NOTE = "; the default 0.5 needs no tuning"
_MASS_NOTE = ": it is the fraction of suspect mass transported"
_EXACT_NOTE = (
    ": it is the largest number of images (captions) searched exactly; 0 always searches "
    "approximately"
)
_NPROBE_NOTE = (
    ": it is the number of inverted lists each query visits in the approximate search (default 8)"
)
_FIT_MAX = {
    "label": "audit.mixture_fit_max",
    "phrase": "an integer >= 100 or null",
    "after": ": it is the most scores the mixture is fitted on (null fits on every row)",
}
_PLANTS_NOTE = (
    ": it is the number of known mismatches of each kind planted to calibrate the split "
    "(0 turns it off)"
)


@dataclass(frozen=True)
class AuditConfig:
    """Scoring, splitting and rematching of image-caption pairs."""

    # dataset neighbours per side that a pair is compared against (3 measures best)
    k: Annotated[
        int,
        Range("int", phrase="at least 1", ge=1),
        Help("Nearest alternatives per side each pair is compared against."),
    ] = 3
    # match_score below this flags a pair as mismatched
    threshold: Annotated[
        float,
        Range(gt=0, lt=1, verb="lie", after=_THRESHOLD_NOTE),
        Help(
            "match_score below this flags a pair, {range} (calibrated: {default} needs no tuning)."
        ),
    ] = 0.5
    # flagged pairs within this of the threshold, with no proposal: review
    review_margin: Annotated[float, Range(ge=0)] = 0.2
    rematch: Annotated[
        bool,
        Help(
            "Propose captions for flagged pairs with partial optimal transport.",
            off="Flag mismatches but propose no captions.",
        ),
    ] = True
    # fraction s of suspect mass transported (None: rematch default 0.8)
    mass: Annotated[
        float | None,
        Range(gt=0, le=1, none=True, verb="lie", phrase="in (0, 1]", after=_MASS_NOTE),
        Help("Fraction of suspect mass the partial transport moves, {range} [default: 0.8]."),
    ] = None
    reg: float | None = None  # entropic regularisation, in similarity-spread units (None: 0.4)
    cost: Annotated[
        str,
        Range("choice", choices=COSTS),
        Help(
            "Similarity-to-cost mapping: learned (from the clean pairs), "
            "fixed (1 - similarity), paper (L2RM's batch network)."
        ),
    ] = "learned"
    candidates: int | None = None  # caption candidates per suspect image (None: 32)
    block_size: int | None = None  # largest dense transport matrix per side (None: 4096)
    # proposals below this rematch_confidence are withheld; the confidence is the share of
    # planted proposals at that confidence that were right (0.8: precision 0.93-0.95 on
    # Flickr8k shuffle and mixed noise, benchmarks/results/rematch_calibration.md)
    min_confidence: Annotated[
        float,
        Range(ge=0, le=1, verb="lie"),
        Help(
            "Proposals with lower rematch_confidence are withheld (action drop/review). "
            "The confidence is the share of planted proposals at that confidence that "
            "were right; {default} measured precision 0.93-0.95 on Flickr8k."
        ),
    ] = 0.8
    # Up to this many images (captions), a pair's dataset alternatives are found by exact
    # search; above it by an approximate inverted-file search (cost ~ n^1.5 instead of n^2).
    exact_search_max: Annotated[
        int, Range("int", ge=0, label="audit.exact_search_max", after=_EXACT_NOTE)
    ] = 20_000
    # Inverted lists each query visits in the approximate search: higher = closer to exact,
    # slower (8: ~80 % of the exact top-4 at 1M CLIP-like rows, F1 within 0.002 at 100k).
    search_nprobe: Annotated[
        int, Range("int", ge=1, label="audit.search_nprobe", after=_NPROBE_NOTE)
    ] = 8
    # Most scores the two-component mixture is fitted on; above it EM runs on a seeded
    # subsample and every row still gets its posterior. None fits on every row.
    mixture_fit_max: Annotated[int | None, Range("int", ge=100, none=True, **_FIT_MAX)] = 200_000
    # Known mismatches of each kind (random caption, caption of a similar image) planted
    # among the dataset's confident pairs to calibrate the split, check that the model
    # sees, and bound the noise rate. 0: the bimodality mixture alone (no verdict check).
    plants: Annotated[int, Range("int", ge=0, label="audit.plants", after=_PLANTS_NOTE)] = 2000


def _kw(**spec: Any) -> Range:
    """A :class:`Range` of a keyword argument (``mass=1.5 is outside (0, 1]``)."""
    return Range(style="keyword", **spec)


@dataclass(frozen=True)
class RematchSettings:
    """The settings of :func:`pmpclean.rematching.propose_captions`, which takes them as keyword
    arguments with its own defaults; declared here so that :func:`check_settings`
    checks them like every other setting, in the words of a keyword argument."""

    cost: Annotated[str, _kw(kind="choice", choices=COSTS)]
    solver: Annotated[str, _kw(kind="choice", choices=SOLVERS)]
    pool: Annotated[str, _kw(kind="choice", choices=POOLS)]
    reg_units: Annotated[str, _kw(kind="choice", choices=REG_UNITS)]
    mass: Annotated[
        float,
        _kw(
            gt=0,
            le=1,
            after=": it is the fraction of the suspects' mass that is transported (the rest "
            "is left unmatched); use e.g. mass=0.8",
        ),
    ]
    reg: Annotated[
        float,
        _kw(
            gt=0,
            phrase="a positive number",
            why="entropic regularisation",
            after="; use e.g. reg=0.4",
        ),
    ]
    k: Annotated[int, _kw(kind="int", ge=1, why="candidates per suspect", after="; use k=32")]
    block_size: Annotated[int, _kw(kind="int", ge=2, why="largest dense problem")]
    batch_size: Annotated[int, _kw(kind="int", ge=2, why="paper's batch, default 128")]
    min_confidence: Annotated[
        float,
        _kw(ge=0, le=1, after=": it is a fraction of a row's mass; use e.g. min_confidence=0.6"),
    ]
    key_fraction: Annotated[
        float,
        _kw(
            gt=0,
            le=1,
            after=": it is the number of planted key points per suspect; use e.g. key_fraction=0.1",
        ),
    ]
    max_iter: Annotated[int, _kw(kind="int", ge=1)]
    tol: Annotated[float, _kw(gt=0, phrase="a positive number", why="marginal error")]


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
    seed: Annotated[int, Help(_SEED)] = 0
    # (the full data is in audit.parquet)
    gallery_size: Annotated[int, Range("int", ge=0), Help("Pairs per gallery in report.html.")] = 24

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


_ROBUST_Q = "in [0, 1] (0: InfoNCE, 1: the most noise-robust RINCE) or None for the default"
_TARGETS = "'global', 'batch' or None"
_AUDIT_WEIGHT = "weight of the scan's match_score in refreshed splits"


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of :func:`finetune`. Precedence: CLI options > config file > these defaults.

    ``None`` means "choose from context"; the resolved values are written to
    ``finetune_config.yaml`` and ``metrics.json`` in the output folder.

    Nine settings have no option of ``pmpclean finetune`` (weight_decay, grad_clip,
    cache_images, split_threshold, ot_reg, min_plan_mass, noisy_weight, target_quantile,
    keep_resume): they are tuning knobs of the method that the command line does not
    need to show; set them with ``--config FILE`` (:func:`load_finetune_config`).
    """

    # -- model -------------------------------------------------------------------------
    # open_clip architecture name (or local-dir:PATH, hf-hub:org/name)
    model: Annotated[str, Help(_MODEL)] = "ViT-B-32"
    pretrained: Annotated[
        str,
        Help(
            "Start weights: an open_clip tag, a checkpoint file, or 'none' to train from random "
            "initialisation (then the default --lr is 1e-3)."
        ),
    ] = "laion2b_s34b_b79k"
    # -- data --------------------------------------------------------------------------
    # manifest columns of the image path (ignored for a scan output) and of the caption
    image_col: Annotated[str, Help(_IMAGE_COL)] = "image"
    text_col: Annotated[str, Help(_TEXT_COL)] = "caption"
    truth_col: Annotated[
        str | None,
        Help(
            "Ground-truth column (original row of each caption): adds per-epoch split "
            "precision/recall to metrics.json."
        ),
    ] = None  # e.g. pmpclean corrupt's true_row
    # -- method ------------------------------------------------------------------------
    # l2rm | contrastive (plain InfoNCE on every pair)
    method: Annotated[
        str,
        Range("choice", choices=METHODS),
        Help(
            "l2rm: contrastive loss on clean pairs, partial-OT soft targets for suspects; "
            "contrastive: plain InfoNCE on every pair (for an already-cleaned manifest)."
        ),
    ] = "l2rm"
    # -- optimisation --------------------------------------------------------------------
    epochs: Annotated[int, Range("int", ge=1), Help("Passes over the training pairs.")] = 10
    # pairs per micro-batch (the in-batch negatives and OT plan)
    batch_size: Annotated[
        int,
        Range("int", ge=2, why="contrastive training needs negatives"),
        Help(
            "Pairs per micro-batch: the in-batch negatives and the pairs one transport plan "
            "re-pairs."
        ),
    ] = 128
    # micro-batches per optimizer step (gradient accumulation);
    # negatives and plans stay per micro-batch
    accum_steps: Annotated[
        int,
        Range("int", ge=1),
        Help(
            "Micro-batches per optimizer step (gradient accumulation: a larger effective batch in "
            "the same memory; negatives stay per micro-batch)."
        ),
    ] = 1
    # peak learning rate (None: 1e-5 from pretrained weights,
    # 1e-3 from random init)
    lr: Annotated[
        float | None,
        Range(gt=0, none=True, phrase="a positive number (or None for the default)"),
        Help("Peak learning rate [default: 1e-5 from pretrained weights, 1e-3 from random init]."),
    ] = None
    # AdamW decay, not applied to gains, biases, logit_scale
    weight_decay: Annotated[float, Range(ge=0)] = 0.1
    # cosine | linear | constant: decay after the warmup
    schedule: Annotated[
        str, Range("choice", choices=SCHEDULES), Help("Learning-rate decay after the warmup.")
    ] = "cosine"
    # linear warmup, in optimizer steps (None: 5% of all)
    warmup_steps: Annotated[
        int | None,
        Range("int", ge=0, none=True, phrase="an integer >= 0 (or None for 5% of all steps)"),
        Help("Linear learning-rate warmup, in optimizer steps [default: 5% of all steps]."),
    ] = None
    # clip the gradient norm to this (None: no clipping)
    grad_clip: Annotated[
        float | None, Range(gt=0, none=True, phrase="a positive number or None")
    ] = None
    lock_image: Annotated[bool, Help("Freeze the image tower (train the text tower only).")] = (
        False  # freeze the image tower (train the text tower only)
    )
    lock_text: Annotated[bool, Help("Freeze the text tower (train the image tower only).")] = (
        False  # freeze the text tower (train the image tower only)
    )
    # auto | fp32 | amp | amp_bf16 (mixed precision needs CUDA)
    precision: Annotated[
        str,
        Range("choice", choices=PRECISIONS),
        Help(
            "auto: amp on CUDA, fp32 elsewhere. amp/amp_bf16 (mixed precision) need a CUDA device."
        ),
    ] = "auto"
    device: Annotated[str, Help(_DEVICE)] = "auto"  # auto | cpu | cuda | cuda:N | mps
    # image-decoding worker processes (0: decode in the main process)
    workers: Annotated[
        int,
        Range("int", ge=0),
        Help(
            "Image-decoding worker processes (0: decode in the main process; images that fit in 1 "
            "GiB are decoded once and kept)."
        ),
    ] = 0
    cache_images: bool | None = None  # keep preprocessed images in RAM (None: if < 1 GiB)
    # seeds the validation split, data order and mixture fits (random init
    # always uses pmpclean.embedding.RANDOM_SEED)
    seed: Annotated[
        int,
        Range("int"),
        Help(
            "Seeds the validation split, data order and split mixtures; the same seed repeats the "
            "run."
        ),
    ] = 0
    # -- validation ----------------------------------------------------------------------
    # fraction of images held out for validation (0: none); at
    # least 2 when 8 remain for training, else none, with a warning (small datasets)
    val_fraction: Annotated[
        float,
        Range(ge=0, le=0.5, why="fraction of images held out"),
        Help(
            "Fraction of images held out to measure recall before/after and pick the best epoch "
            "(0: no validation, the last epoch is saved). At least 2 images are held out; a "
            "dataset under 10 images trains without validation."
        ),
    ] = 0.1
    val_dataset: Annotated[
        str | None,
        Help("Separate (ideally clean) manifest to validate on, instead of --val-fraction."),
    ] = None  # separate manifest to validate on (val_fraction unused)
    # stop after this many epochs without a better validation
    # R-sum (None: train all epochs); the best epoch's weights are the output
    patience: Annotated[
        int | None,
        Range("int", ge=1, none=True),
        Help(
            "Early stopping: stop after this many epochs without a better validation R-sum; the "
            "best epoch is saved."
        ),
    ] = None
    # -- L2RM ----------------------------------------------------------------------------
    # plain-contrastive epochs before the first split
    # (None: 0 with an audit or pretrained weights; from random init, until an epoch's
    # mean training loss is 5% below its chance level, log(batch_size) for InfoNCE,
    # (1 - batch_size^-q) / q for RINCE: before that the per-pair losses say nothing
    # about the pairs)
    split_warmup_epochs: Annotated[
        int | None,
        Range("int", ge=0, none=True),
        Help(
            "Epochs of plain contrastive training before the first clean/suspect split [default: "
            "0 from pretrained weights or a scan folder; from random init, wait until the "
            "training loss is 5% below chance, because an untrained model's losses say nothing "
            "about the pairs]."
        ),
    ] = None
    # refresh the clean/suspect split every N epochs (0: never refresh)
    split_every: Annotated[
        int,
        Range("int", ge=0, why="0: never refresh"),
        Help(
            "Refresh the clean/suspect split every N epochs as the model improves (0: keep the "
            "first split)."
        ),
    ] = 1
    # pairs with clean probability below this are suspects
    split_threshold: Annotated[float, Range(gt=0, lt=1)] = 0.5
    # RINCE exponent of the clean pairs' contrastive loss, in
    # [0, 1]: each direction's loss is (1 - p^q) / q with p the softmax probability of the
    # true partner, so a pair's gradient is weighted by p^q and pairs the model cannot fit
    # (mostly mismatched ones) pull less (Chuang et al., "Robust Contrastive Learning
    # against Noisy Views", CVPR 2022); also during the split warmup. 0: InfoNCE.
    # None: 0.3 for method l2rm from random initialisation on a manifest (the model
    # audits itself), else 0: with a scan folder's split from the first epoch, RINCE's
    # weaker pull early on leaves the suspects' soft targets in charge and hurts
    # (benchmarks/results/finetune.md)
    robust_q: Annotated[
        float | None,
        Range(ge=0, le=1, none=True, phrase=_ROBUST_Q),
        Help(
            "Exponent q of the noise-robust contrastive loss RINCE on the clean pairs, {range}: "
            "each pair pulls with weight p^q, p the probability the model gives its partner, so "
            "pairs it cannot fit pull less (0: plain InfoNCE) [default: 0.3 when a model trained "
            "from random init audits itself from a manifest, else 0]."
        ),
    ] = None
    # global | batch: where a suspect's new partner comes
    # from. global: at every split refresh, the dataset-scale partial OT of
    # pmpclean.rematching over all suspects (learned cost, original pairing forbidden;
    # with a scan folder, the scan's own proposals at the first split); a suspect whose
    # proposal reaches rematch_min_confidence trains as a pair with the proposed caption,
    # weighted by the confidence, and the others only serve as negatives. batch: L2RM's
    # in-batch plan as soft targets (the research code's scheme: a random batch rarely
    # holds a suspect's true partner). None: batch for method l2rm from random
    # initialisation on a manifest (a model that audits itself from scratch proposes
    # nothing confident, while in-batch targets still teach it; development runs in
    # benchmarks/results/finetune_n3000.md), else global
    suspect_targets: Annotated[
        str | None,
        Range("choice", choices=("global", "batch"), none=True, phrase=_TARGETS),
        Help(
            "Where a suspect pair's new caption comes from. global: at every split refresh, "
            "partial optimal transport over all suspects of the dataset (original pairing "
            "forbidden; from a scan folder, the scan's proposals first); a confident proposal "
            "trains as a pair, weighted by its confidence, and unmatched suspects only serve as "
            "negatives. batch: the L2RM paper's soft targets from a plan inside each random batch "
            "[default: batch when a model trained from random init audits itself from a "
            "manifest, else global]."
        ),
    ] = None
    # global: proposals below this are not trained on
    rematch_min_confidence: Annotated[
        float,
        Range(ge=0, le=1),
        Help(
            "With --suspect-targets global: proposals whose confidence (share of the suspect's "
            "transported mass on that caption) is below this are not trained on; nor is any "
            "proposal of an epoch where the proposals for planted known mismatches (clean pairs, "
            "captions deranged) are right less often than this (90 % lower bound)."
        ),
    ] = 0.6
    # batch: fraction of the batch's suspect mass the plan moves, (0, 1]
    ot_mass: Annotated[
        float,
        Range(gt=0, le=1, why="fraction of suspect mass transported"),
        Help(
            "With --suspect-targets batch: fraction of a batch's suspect pairs the partial-OT "
            "plan re-pairs, {range}; suspects left without mass get no target. Lower it when "
            "many mismatched captions have no true image in the data."
        ),
    ] = 0.5
    # entropic regularisation of the plan (cost = cosine distance)
    ot_reg: Annotated[float, Range(gt=0)] = 0.05
    # suspects receiving less than this fraction of their
    # marginal get no target (they contribute nothing)
    min_plan_mass: Annotated[float, Range(ge=0, lt=1)] = 0.1
    # weight of the suspects' soft-target loss (0: drop suspects)
    noisy_weight: Annotated[float, Range(ge=0)] = 1.0
    # a suspect gets its plan target only when the
    # target is at least as similar (plan-weighted cosine) as this quantile of the batch's
    # clean pairs: the clean pairs calibrate what a true pair looks like (L2RM's "key
    # points"); None: every suspect with enough transported mass gets its target
    target_quantile: Annotated[float | None, Range(ge=0, le=1, none=True)] = 0.25
    # with a scan folder: weight of the scan's match_score in every
    # refreshed split, averaged with the loss mixture's clean probability (0: the model's
    # own losses only after the first epoch; 1: keep the scan's split throughout)
    audit_weight: Annotated[
        float,
        Range(ge=0, le=1, why=_AUDIT_WEIGHT),
        Help(
            "With a scan folder as DATASET: weight of the scan's match_score in every refreshed "
            "split, averaged with the model's own loss mixture. Keep it high when the scan came "
            "from a stronger model than the one being trained (1: keep the scan's split; 0: trust "
            "the model's own losses after the first epoch)."
        ),
    ] = 0.5
    # -- output and resumption ---------------------------------------------------------------
    # also save resume.pt every N optimizer steps
    # (None: at the end of every epoch only)
    checkpoint_every: Annotated[
        int | None,
        Range("int", ge=1, none=True),
        Help(
            "Also save resume.pt every N optimizer steps, so --resume loses at most N steps "
            "[default: at the end of every epoch only]."
        ),
    ] = None
    keep_resume: bool = False  # keep resume.pt after a successful run
    resume: Annotated[
        bool,
        Help("Continue the interrupted run in --out from its resume.pt (same settings required)."),
    ] = False  # continue the interrupted run in out_dir from resume.pt
    overwrite: Annotated[bool, Help("Replace an earlier run in --out.")] = (
        False  # replace an earlier run in out_dir
    )

    def replace(self, **changes: Any) -> FinetuneConfig:
        """Return a copy with ``changes`` applied (unknown names raise :class:`ConfigError`)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of a YAML file: the ``finetune_config.yaml`` of an
    earlier run (its ``settings``) or a mapping of setting names to values; settings it
    leaves out keep their defaults. Unknown names raise :class:`ConfigError`."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Settings file {path} does not exist.") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read settings file {path}: {exc}") from None
    doc = {} if doc is None else doc
    if isinstance(doc, dict) and isinstance(doc.get("settings"), dict):
        doc = doc["settings"]  # finetune_config.yaml of an earlier run
    if not isinstance(doc, dict):
        raise ConfigError(
            f"Settings file {path} must hold a mapping of finetune setting names to values "
            f"(or an earlier run's finetune_config.yaml), not a {type(doc).__name__}."
        )
    try:
        return FinetuneConfig().replace(**{str(k): v for k, v in doc.items()})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _check_names(options: dict[str, Any]) -> None:
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"Unknown finetune setting(s) {', '.join(unknown)}; "
            f"known settings: {', '.join(sorted(known))}."
        )


def _validate(cfg: FinetuneConfig) -> None:
    """Check every setting once, naming the setting, the constraint and the fix: each
    field against the :class:`Range` beside it, then the rules between fields."""
    check_settings(cfg)
    rules = (
        (
            cfg.lock_image and cfg.lock_text,
            "lock_image and lock_text are both set, which leaves nothing to train; "
            "lock at most one tower.",
        ),
        (
            cfg.patience is not None and cfg.val_fraction <= 0 and cfg.val_dataset is None,
            "patience (early stopping) needs a validation split: set val_fraction > 0 or "
            "val_dataset.",
        ),
        (
            cfg.resume and cfg.overwrite,
            "resume and overwrite are both set; pass resume to continue the run in the output "
            "folder or overwrite to start over, not both.",
        ),
    )
    for broken, message in rules:
        if broken:
            raise ConfigError(message)
