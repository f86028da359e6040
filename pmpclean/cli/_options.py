"""The options several commands share, their choices, and how options become settings."""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import ScanConfig, load_config


class Format(str, enum.Enum):
    human = "human"
    json = "json"


class Policy(str, enum.Enum):
    rematch = "rematch"
    drop = "drop"
    flag = "flag"


class Pair(str, enum.Enum):
    b32 = "b32"
    l14 = "l14"


class EngineName(str, enum.Enum):
    local = "local"
    ray = "ray"


class Cost(str, enum.Enum):
    learned = "learned"
    fixed = "fixed"
    paper = "paper"


class NoiseMode(str, enum.Enum):
    """The modes of :data:`pmpclean.noise.NOISE_MODES` (tested to match)."""

    shuffle = "shuffle"
    hard = "hard"
    mixed = "mixed"


# ---------------------------------------------------------------- shared options

Manifest = Annotated[
    Path,
    typer.Argument(
        help=(
            "Dataset: a manifest (.csv .tsv .parquet .jsonl, one image-caption pair per row), "
            "an img2dataset output folder or shards ('data/{00000..00123}.tar'), Hugging Face "
            "Parquet with image bytes, or an imagefolder with metadata.csv."
        ),
        show_default=False,
    ),
]
FormatOpt = Annotated[
    Format,
    typer.Option("--format", help="human: tables for people; json: one JSON document on stdout."),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print nothing but errors (and JSON with --format json)."),
]
ImageCol = Annotated[
    str,
    typer.Option(
        "--image-col", help="Column holding image paths (relative to the manifest's folder)."
    ),
]
TextCol = Annotated[str, typer.Option("--text-col", help="Column holding captions.")]
IdCol = Annotated[
    str | None,
    typer.Option("--id-col", help="Optional column of unique row ids (checked for duplicates)."),
]
RootOpt = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="Folder that relative image paths resolve against \\[default: the manifest's folder].",
    ),
]
LabelCol = Annotated[
    str | None,
    typer.Option("--label-col", help="Optional class-label column: also audits the labels."),
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        help="open_clip architecture name (as open_clip lists them), or hf-hub:org/name.",
    ),
]
PretrainedOpt = Annotated[
    str,
    typer.Option(
        "--pretrained",
        help=(
            "open_clip weights tag, a local checkpoint file, or 'none' for random weights "
            "(smoke tests only: scores mean nothing)."
        ),
    ),
]
EmbeddingsOpt = Annotated[
    Path | None,
    typer.Option(
        "--embeddings",
        help=(
            "Precomputed embeddings (.npz with arrays 'image' and 'text', shape (n_rows, d), "
            "row-aligned; or .parquet), clip-retrieval's output folder, or a folder of "
            "DataComp shards (joined by key or uid). No model is loaded, no image is opened."
        ),
    ),
]
PairOpt = Annotated[
    Pair,
    typer.Option(
        "--embeddings-pair", help="DataComp embeddings: b32 (ViT-B/32) or l14 (ViT-L/14) arrays."
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Images or captions per forward pass.")
]
WorkersOpt = Annotated[
    int,
    typer.Option("--workers", min=0, help="Processes decoding images in parallel with the model."),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help=(
            "Embedding cache folder \\[default: $PMPCLEAN_CACHE_DIR, else pmpclean in "
            "$XDG_CACHE_HOME, else ~/.cache/pmpclean]."
        ),
    ),
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Neither read nor write the embedding cache.")
]
SeedOpt = Annotated[
    int,
    typer.Option("--seed", help="Seed of every random choice; the same seed repeats the run."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace output files that already exist.")]
EngineOpt = Annotated[
    EngineName,
    typer.Option(
        "--engine",
        help=(
            "Where the work runs: local (this machine), or ray (a Ray cluster: pip install "
            "'pmpclean\\[ray]'). Same results."
        ),
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help=(
            "With --engine ray: the cluster to join (ray://head:10001, or auto on a cluster "
            "node) \\[default: start a local cluster]."
        ),
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help=(
            "Settings file (config.yaml of an earlier scan). Options given on the command line win."
        ),
    ),
]


def _explicit(ctx: typer.Context, name: str) -> bool:
    """True when the option was given on the command line (not a default).

    Compared by name: typer may bundle its own click, whose ``ParameterSource`` enum is
    not the one of an installed ``click`` package.
    """
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _path_str(value: Path | None) -> str | None:
    return str(value) if value else None


# The ScanConfig setting behind each option of scan / rematch / embed, and how the
# option's value is stored there (None: as given).
_SETTINGS: dict[str, tuple[str, Callable[[Any], Any] | None]] = {
    "image_col": ("data__image_col", None),
    "text_col": ("data__text_col", None),
    "id_col": ("data__id_col", None),
    "label_col": ("data__label_col", None),
    "truth_col": ("data__truth_col", None),
    "root": ("data__root", _path_str),
    "model": ("embed__model", None),
    "pretrained": ("embed__pretrained", None),
    "embeddings": ("embed__embeddings", _path_str),
    "embeddings_pair": ("embed__embeddings_pair", operator.attrgetter("value")),
    "device": ("embed__device", None),
    "batch_size": ("embed__batch_size", None),
    "workers": ("embed__workers", None),
    "cache_dir": ("embed__cache_dir", _path_str),
    "no_cache": ("embed__use_cache", operator.not_),
    "k": ("audit__k", None),
    "threshold": ("audit__threshold", None),
    "no_rematch": ("audit__rematch", operator.not_),
    "mass": ("audit__mass", None),
    "cost": ("audit__cost", operator.attrgetter("value")),
    "min_confidence": ("audit__min_confidence", None),
    "gallery_size": ("gallery_size", None),
    "seed": ("seed", None),
}


def _build_config(
    ctx: typer.Context,
    config_file: Path | None,
    *,
    base: ScanConfig | None = None,
    **options: Any,
) -> ScanConfig:
    """The ScanConfig of a command's options, passed by parameter name (see _SETTINGS).

    Defaults < ``base`` (rematch: the settings of the scan it applies) < --config
    file < options given on the command line. Without a base or a config file every
    option passed is applied, given or defaulted.
    """
    if config_file is not None:
        cfg = load_config(config_file, base=base)
    else:
        cfg = base or ScanConfig()
    only_given = config_file is not None or base is not None
    changes: dict[str, Any] = {}
    for param, value in options.items():
        if not only_given or _explicit(ctx, param):
            key, convert = _SETTINGS[param]
            changes[key] = value if convert is None else convert(value)
    return cfg.replace(**changes) if changes else cfg
