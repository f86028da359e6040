"""The ``pmpclean`` command line: a thin translator over :mod:`pmpclean.pipeline`.

Each command parses options, builds a config, makes one library call and renders
the result through :class:`pmpclean._output.Output`. Errors of the
:class:`~pmpclean.errors.PmpcleanError` family become one red line and exit code 1;
usage errors exit 2; ``PMPCLEAN_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import enum
import operator
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .config import ScanConfig, load_config, load_finetune_config
from .errors import PmpcleanError

app = typer.Typer(
    name="pmpclean",
    help=(
        "Audit and clean noisy image-caption datasets.\n\n"
        "Typical session:\n\n"
        "  pmpclean scan data.csv              # score every pair, write data.pmpclean/\n\n"
        "  pmpclean rematch data.csv --out cleaned.csv\n\n"
        "  pmpclean finetune data.pmpclean --out model/   # robust fine-tuning\n\n"
        "Run 'pmpclean COMMAND --help' for the options of each command."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


class Format(str, enum.Enum):
    human = "human"
    json = "json"


class Policy(str, enum.Enum):
    rematch = "rematch"
    drop = "drop"
    flag = "flag"


class OutFormat(str, enum.Enum):
    table = "table"
    webdataset = "webdataset"
    files = "files"
    uids = "uids"


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


def _threshold_in_range(value: float) -> float:
    """--threshold is a probability strictly inside (0, 1), as the scan validates it."""
    if not (0.0 < value < 1.0):  # also rejects NaN
        raise typer.BadParameter(
            f"{value:g} is outside (0, 1): pairs with a match_score below it are flagged, so 0 "
            "flags nothing and 1 flags everything. Use 0.5 (the default)."
        )
    return value


def _mass_in_range(value: float | None) -> float | None:
    """--mass is a fraction of mass: (0, 1], as the scan validates it."""
    if value is not None and not (0.0 < value <= 1.0):
        raise typer.BadParameter(
            f"{value:g} is outside (0, 1]: it is the fraction of suspect mass the transport "
            "moves. Leave it out for the default 0.8."
        )
    return value


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


@contextmanager
def _on_engine(engine: EngineName, address: str | None) -> Iterator[None]:
    """Run the block's pipeline stages on the chosen engine (pmpclean.engine)."""
    from .engine import make_engine, use_engine

    with use_engine(make_engine(engine.value, address=address)):
        yield


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


@contextmanager
def _run(out: Any) -> Iterator[None]:
    """Turn library errors into one red line and exit 1; tracebacks with PMPCLEAN_DEBUG=1."""
    debug = os.environ.get("PMPCLEAN_DEBUG", "") not in ("", "0")
    try:
        yield
    except PmpcleanError as exc:
        if debug:
            raise
        out.error(str(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if debug:
            raise
        out.error(
            "Interrupted. Embeddings computed so far are cached; run the command again to resume."
        )
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: no raw tracebacks
        if debug:
            raise
        out.error(
            f"Unexpected {type(exc).__name__}: {exc}. This is a bug in pmpclean; "
            "rerun with PMPCLEAN_DEBUG=1 for the traceback and report it."
        )
        raise typer.Exit(1) from None


def _output(fmt: Format, quiet: bool) -> Any:
    from ._output import Output

    return Output(format=fmt.value, quiet=quiet)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"pmpclean {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Show the version and exit.",
        ),
    ] = False,
) -> None:
    """Audit and clean noisy image-caption datasets."""


# ---------------------------------------------------------------- scan


@app.command()
def scan(
    ctx: typer.Context,
    manifest: Manifest,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Output folder \\[default: <manifest stem>.pmpclean/ beside the manifest; "
                "for shards named by a pattern or list, <their folder>.pmpclean/]."
            ),
        ),
    ] = None,
    image_col: ImageCol = "image",
    text_col: TextCol = "caption",
    id_col: IdCol = None,
    label_col: LabelCol = None,
    root: RootOpt = None,
    truth_col: Annotated[
        str | None,
        typer.Option(
            "--truth-col",
            help=(
                "Ground-truth column (original row of each caption, as 'pmpclean corrupt' "
                "writes): adds detection and rematch metrics."
            ),
        ),
    ] = None,
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    embeddings: EmbeddingsOpt = None,
    embeddings_pair: PairOpt = Pair.b32,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = 2,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    k: Annotated[
        int,
        typer.Option(
            "--k", min=1, help="Nearest alternatives per side each pair is compared against."
        ),
    ] = 3,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            metavar="FLOAT",
            callback=_threshold_in_range,
            help=(
                "match_score below this flags a pair, in (0, 1) (calibrated: 0.5 needs no tuning)."
            ),
        ),
    ] = 0.5,
    no_rematch: Annotated[
        bool, typer.Option("--no-rematch", help="Flag mismatches but propose no captions.")
    ] = False,
    mass: Annotated[
        float | None,
        typer.Option(
            "--mass",
            metavar="FLOAT",
            callback=_mass_in_range,
            help=(
                "Fraction of suspect mass the partial transport moves, in (0, 1] \\[default: 0.8]."
            ),
        ),
    ] = None,
    cost: Annotated[
        Cost,
        typer.Option(
            "--cost",
            help=(
                "Similarity-to-cost mapping: learned (from the clean pairs), "
                "fixed (1 - similarity), paper (L2RM's batch network)."
            ),
        ),
    ] = Cost.learned,
    min_confidence: Annotated[
        float,
        typer.Option(
            "--min-confidence",
            min=0.0,
            max=1.0,
            help=(
                "Proposals with lower rematch_confidence are withheld (action drop/review). "
                "The confidence is the share of planted proposals at that confidence that "
                "were right; 0.8 measured precision 0.93-0.95 on Flickr8k."
            ),
        ),
    ] = 0.8,
    gallery_size: Annotated[
        int, typer.Option("--gallery-size", min=0, help="Pairs per gallery in report.html.")
    ] = 24,
    seed: SeedOpt = 0,
    config_file: ConfigOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an audit already in the output folder.")
    ] = False,
    engine: EngineOpt = EngineName.local,
    ray_address: RayAddressOpt = None,
    fmt: FormatOpt = Format.human,
    quiet: QuietOpt = False,
) -> None:
    # long: typer options, one per scan setting; to be generated from config.py (step 7)
    """Score every image-caption pair, flag mismatches, propose better captions.

    Writes audit.parquet, audit.csv, summary.json, config.yaml and report.html to the
    output folder. With --embeddings the scan runs without any model.
    """
    from ._utils import seed_everything
    from .pipeline import scan as run_scan

    output = _output(fmt, quiet)
    with _run(output):
        cfg = _build_config(
            ctx,
            config_file,
            image_col=image_col,
            text_col=text_col,
            id_col=id_col,
            label_col=label_col,
            truth_col=truth_col,
            root=root,
            model=model,
            pretrained=pretrained,
            embeddings=embeddings,
            embeddings_pair=embeddings_pair,
            device=device,
            batch_size=batch_size,
            workers=workers,
            cache_dir=cache_dir,
            no_cache=no_cache,
            k=k,
            threshold=threshold,
            no_rematch=no_rematch,
            mass=mass,
            cost=cost,
            min_confidence=min_confidence,
            gallery_size=gallery_size,
            seed=seed,
        )
        seed_everything(cfg.seed)
        _warn_remote_images(output)
        with _on_engine(engine, ray_address), output.progress() as progress:
            result = run_scan(manifest, config=cfg, out_dir=out, force=force, progress=progress)
        output.scan_summary(result.summary, result.audit)


def _warn_remote_images(output: Any) -> None:
    """Route library warnings (e.g. random weights, remote images) to the output sink."""
    import warnings

    def _show(
        message: Any,
        category: Any,
        filename: str,
        lineno: int,
        file: Any = None,
        line: Any = None,
    ) -> None:
        output.warning(str(message))

    warnings.showwarning = _show  # type: ignore[assignment]


# ---------------------------------------------------------------- rematch


@app.command()
def rematch(
    ctx: typer.Context,
    manifest: Manifest,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Cleaned manifest to write; its extension (.csv .tsv .parquet .jsonl) sets the "
                "format. Dropped rows go to <stem>.dropped<ext> beside it (with "
                "--out-format webdataset/files/uids: the output folder or .npy, dropped "
                "rows in <out>.dropped.parquet)."
            ),
        ),
    ],
    out_format: Annotated[
        OutFormat,
        typer.Option(
            "--out-format",
            help=(
                "table: a cleaned manifest; webdataset, files: cleaned img2dataset shards "
                "(images copied, captions rematched, provenance in each .json); uids: the "
                "kept rows' DataComp uids as the .npy its resharder takes."
            ),
        ),
    ] = OutFormat.table,
    policy: Annotated[
        Policy,
        typer.Option(
            "--policy",
            help=(
                "rematch: keep clean pairs and confident rematches; drop: keep clean pairs "
                "only; flag: keep every row, add audit columns."
            ),
        ),
    ] = Policy.rematch,
    min_confidence: Annotated[
        float | None,
        typer.Option(
            "--min-confidence",
            min=0.0,
            max=1.0,
            help="Apply only proposals at least this confident \\[default: the scan's setting].",
        ),
    ] = None,
    fix_labels: Annotated[
        bool,
        typer.Option(
            "--fix-labels",
            help="Replace labels flagged by the label audit with the suggested label.",
        ),
    ] = False,
    audit_dir: Annotated[
        Path | None,
        typer.Option(
            "--audit-dir",
            help=(
                "Folder of the scan to apply \\[default: <manifest stem>.pmpclean/; "
                "for shards named by a pattern or list, <their folder>.pmpclean/]. "
                "Scanned now when absent or stale."
            ),
        ),
    ] = None,
    rescan: Annotated[
        bool,
        typer.Option("--rescan", help="Scan again even when an up-to-date audit exists."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be written, write nothing.")
    ] = False,
    force: ForceOpt = False,
    image_col: ImageCol = "image",
    text_col: TextCol = "caption",
    label_col: LabelCol = None,
    root: RootOpt = None,
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    embeddings: EmbeddingsOpt = None,
    embeddings_pair: PairOpt = Pair.b32,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    config_file: ConfigOpt = None,
    engine: EngineOpt = EngineName.local,
    ray_address: RayAddressOpt = None,
    fmt: FormatOpt = Format.human,
    quiet: QuietOpt = False,
) -> None:
    # long: typer options, one per rematch setting; to be generated from config.py (step 7)
    """Write a cleaned manifest from the latest scan (scanning first when needed).

    Every input row lands in exactly one of the cleaned manifest and the dropped file.
    The input is never modified; existing outputs are kept unless --force. Options not
    given keep the values of the scan in --audit-dir; when the manifest, the embeddings,
    the model or a setting that changes the audit differs from that scan's, the
    manifest is scanned again and the summary says which. --min-confidence never needs
    a new scan.
    """
    from ._utils import seed_everything
    from .pipeline import default_out_dir, saved_scan_config
    from .pipeline import rematch as run_rematch

    output = _output(fmt, quiet)
    with _run(output):
        # options not given keep the values of the scan being applied
        scanned = saved_scan_config(audit_dir if audit_dir else default_out_dir(manifest))
        cfg = _build_config(
            ctx,
            config_file,
            base=scanned,
            image_col=image_col,
            text_col=text_col,
            label_col=label_col,
            root=root,
            model=model,
            pretrained=pretrained,
            embeddings=embeddings,
            embeddings_pair=embeddings_pair,
            device=device,
            seed=seed,
        )
        seed_everything(cfg.seed)
        _warn_remote_images(output)
        with _on_engine(engine, ray_address), output.progress() as progress:
            result = run_rematch(
                manifest,
                out=out,
                policy=policy.value,
                min_confidence=min_confidence,
                fix_labels=fix_labels,
                force=force,
                config=cfg,
                audit_dir=audit_dir,
                rescan=rescan,
                dry_run=dry_run,
                progress=progress,
                output_format=out_format.value,
            )
        output.rematch_summary(result.info)


# ---------------------------------------------------------------- embed


@app.command()
def embed(
    ctx: typer.Context,
    manifest: Manifest,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Embeddings file (.npz) \\[default: <manifest stem>.pmpclean/embeddings.npz].",
        ),
    ] = None,
    image_col: ImageCol = "image",
    text_col: TextCol = "caption",
    id_col: IdCol = None,
    root: RootOpt = None,
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = 2,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    engine: EngineOpt = EngineName.local,
    ray_address: RayAddressOpt = None,
    fmt: FormatOpt = Format.human,
    quiet: QuietOpt = False,
) -> None:
    """Embed every image and caption and write a row-aligned .npz for --embeddings.

    Each unique image is embedded once; results are cached, so an interrupted run
    resumes and a later scan of the same data does no model work.
    """
    from ._utils import seed_everything
    from .pipeline import embed as run_embed

    output = _output(fmt, quiet)
    with _run(output):
        cfg = _build_config(  # embed takes no --config: every option applies
            ctx,
            None,
            image_col=image_col,
            text_col=text_col,
            id_col=id_col,
            root=root,
            model=model,
            pretrained=pretrained,
            device=device,
            batch_size=batch_size,
            workers=workers,
            cache_dir=cache_dir,
            no_cache=no_cache,
            seed=seed,
        )
        seed_everything(cfg.seed)
        _warn_remote_images(output)
        with _on_engine(engine, ray_address), output.progress() as progress:
            result = run_embed(manifest, out=out, config=cfg, force=force, progress=progress)
        output.embed_summary(result.info)


# ---------------------------------------------------------------- corrupt


@app.command()
def corrupt(
    manifest: Manifest,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Noisy manifest to write (format from the extension)."),
    ],
    rate: Annotated[
        float,
        typer.Option(
            "--rate",
            min=0.0,
            max=1.0,
            help="Fraction of rows whose caption is replaced by another image's caption.",
        ),
    ] = 0.2,
    mode: Annotated[
        NoiseMode,
        typer.Option(
            "--mode",
            help=(
                "shuffle: captions of random other images (the L2RM protocol); "
                "hard: captions of similar images (needs --embeddings); "
                "mixed: half hard, half shuffle (needs --embeddings)."
            ),
        ),
    ] = NoiseMode.shuffle,
    embeddings: EmbeddingsOpt = None,
    image_col: ImageCol = "image",
    text_col: TextCol = "caption",
    truth_col: Annotated[
        str,
        typer.Option(
            "--truth-col",
            help="Name of the ground-truth column written (original row of each caption).",
        ),
    ] = "true_row",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    fmt: FormatOpt = Format.human,
    quiet: QuietOpt = False,
) -> None:
    """Inject known caption mismatches, for evaluating an audit (scan --truth-col true_row)."""
    from .pipeline import corrupt as run_corrupt

    output = _output(fmt, quiet)
    with _run(output):
        result = run_corrupt(
            manifest,
            out=out,
            rate=rate,
            mode=mode.value,
            seed=seed,
            image_col=image_col,
            text_col=text_col,
            truth_col=truth_col,
            force=force,
            embeddings=embeddings,
        )
        output.corrupt_summary(result.info)


# ---------------------------------------------------------------- finetune


class Method(str, enum.Enum):
    l2rm = "l2rm"
    contrastive = "contrastive"


class SuspectTargets(str, enum.Enum):
    global_ = "global"
    batch = "batch"


class Schedule(str, enum.Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class Precision(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    amp = "amp"
    amp_bf16 = "amp_bf16"


def _ot_mass_in_range(value: float) -> float:
    """--ot-mass is a fraction of mass: (0, 1], with a message that says why."""
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise typer.BadParameter(
            f"{value:g} is outside (0, 1]. It is the fraction of a batch's suspect pairs the "
            "transport plan re-pairs: 0 would leave every suspect without a target and more "
            "than 1 is more mass than there is. Use 0.5 (the default), higher when most "
            "mismatched captions have their true image in the data, lower when few do."
        )
    return value


@app.command(
    epilog=(
        "Examples:\n\n"
        "  pmpclean finetune data.pmpclean --out model/      # start from the scan's split\n\n"
        "  pmpclean finetune cleaned.csv --out model/ --method contrastive --epochs 5\n\n"
        "  pmpclean finetune data.csv --out model/ --resume   # continue after an interruption\n\n"
        "Use the result: pmpclean scan data.csv --model ARCH "
        "--pretrained model/open_clip_pytorch_model.bin"
    )
)
def finetune(
    ctx: typer.Context,
    dataset: Annotated[
        Path,
        typer.Argument(
            help=(
                "A manifest (e.g. the cleaned one from 'pmpclean rematch'), a dataset as "
                "'pmpclean scan' reads it (img2dataset shards, ...), or a scan folder / "
                "audit.parquet: its split then seeds the first epoch."
            ),
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            rich_help_panel="Data",
            help=(
                "Model folder to write: the weights, their open_clip config, metrics.json "
                "and finetune_config.yaml."
            ),
        ),
    ],
    model: ModelOpt = "ViT-B-32",
    pretrained: Annotated[
        str,
        typer.Option(
            "--pretrained",
            rich_help_panel="Model",
            help=(
                "Start weights: an open_clip tag, a checkpoint file, or 'none' to "
                "train from random initialisation (then the default --lr is 1e-3)."
            ),
        ),
    ] = "laion2b_s34b_b79k",
    image_col: ImageCol = "image",
    text_col: TextCol = "caption",
    truth_col: Annotated[
        str | None,
        typer.Option(
            "--truth-col",
            rich_help_panel="Data",
            help=(
                "Ground-truth column (original row of each caption): "
                "adds per-epoch split precision/recall to metrics.json."
            ),
        ),
    ] = None,
    method: Annotated[
        Method,
        typer.Option(
            "--method",
            rich_help_panel="Training",
            help=(
                "l2rm: contrastive loss on clean pairs, partial-OT soft targets for suspects; "
                "contrastive: plain InfoNCE on every pair (for an already-cleaned manifest)."
            ),
        ),
    ] = Method.l2rm,
    epochs: Annotated[
        int,
        typer.Option(
            "--epochs",
            min=1,
            metavar="INT",
            rich_help_panel="Training",
            help="Passes over the training pairs.",
        ),
    ] = 10,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=2,
            metavar="INT",
            rich_help_panel="Training",
            help=(
                "Pairs per micro-batch: the in-batch negatives "
                "and the pairs one transport plan re-pairs."
            ),
        ),
    ] = 128,
    accum_steps: Annotated[
        int,
        typer.Option(
            "--accum-steps",
            min=1,
            metavar="INT",
            rich_help_panel="Training",
            help=(
                "Micro-batches per optimizer step (gradient accumulation: a larger "
                "effective batch in the same memory; negatives stay per micro-batch)."
            ),
        ),
    ] = 1,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            rich_help_panel="Training",
            help=(
                "Peak learning rate \\[default: 1e-5 from "
                "pretrained weights, 1e-3 from random init]."
            ),
        ),
    ] = None,
    schedule: Annotated[
        Schedule,
        typer.Option(
            "--schedule", rich_help_panel="Training", help="Learning-rate decay after the warmup."
        ),
    ] = Schedule.cosine,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            "--warmup-steps",
            min=0,
            metavar="INT",
            rich_help_panel="Training",
            help="Linear learning-rate warmup, in optimizer steps \\[default: 5% of all steps].",
        ),
    ] = None,
    lock_image: Annotated[
        bool,
        typer.Option(
            "--lock-image",
            rich_help_panel="Model",
            help="Freeze the image tower (train the text tower only).",
        ),
    ] = False,
    lock_text: Annotated[
        bool,
        typer.Option(
            "--lock-text",
            rich_help_panel="Model",
            help="Freeze the text tower (train the image tower only).",
        ),
    ] = False,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            rich_help_panel="Model",
            help=(
                "auto: amp on CUDA, fp32 elsewhere. amp/amp_bf16 "
                "(mixed precision) need a CUDA device."
            ),
        ),
    ] = Precision.auto,
    device: DeviceOpt = "auto",
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=0,
            metavar="INT",
            rich_help_panel="Model",
            help=(
                "Image-decoding worker processes (0: decode in the main "
                "process; images that fit in 1 GiB are decoded once and kept)."
            ),
        ),
    ] = 0,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            min=0.0,
            max=0.5,
            metavar="FLOAT",
            rich_help_panel="Data",
            help=(
                "Fraction of images held out to measure recall before/after and "
                "pick the best epoch (0: no validation, the last epoch is saved). At least "
                "2 images are held out; a dataset under 10 images trains without validation."
            ),
        ),
    ] = 0.1,
    val_dataset: Annotated[
        Path | None,
        typer.Option(
            "--val-dataset",
            rich_help_panel="Data",
            help="Separate (ideally clean) manifest to validate on, instead of --val-fraction.",
        ),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            "--patience",
            min=1,
            metavar="INT",
            rich_help_panel="Training",
            help=(
                "Early stopping: stop after this many epochs without "
                "a better validation R-sum; the best epoch is saved."
            ),
        ),
    ] = None,
    split_warmup_epochs: Annotated[
        int | None,
        typer.Option(
            "--split-warmup-epochs",
            min=0,
            metavar="INT",
            rich_help_panel="Split and rematch",
            help=(
                "Epochs of plain contrastive training before the first clean/suspect "
                "split \\[default: 0 from pretrained weights or a scan folder; from "
                "random init, wait until the training loss is 5% below chance, "
                "because an untrained model's losses say nothing about the pairs]."
            ),
        ),
    ] = None,
    split_every: Annotated[
        int,
        typer.Option(
            "--split-every",
            min=0,
            metavar="INT",
            rich_help_panel="Split and rematch",
            help=(
                "Refresh the clean/suspect split every N epochs "
                "as the model improves (0: keep the first split)."
            ),
        ),
    ] = 1,
    suspect_targets: Annotated[
        SuspectTargets | None,
        typer.Option(
            "--suspect-targets",
            case_sensitive=False,
            rich_help_panel="Split and rematch",
            help=(
                "Where a suspect pair's new caption comes from. global: at every split "
                "refresh, partial optimal transport over all suspects of the dataset "
                "(original pairing forbidden; from a scan folder, the scan's proposals "
                "first); a confident proposal trains as a pair, weighted by its confidence, "
                "and unmatched suspects only serve as negatives. batch: the L2RM paper's "
                "soft targets from a plan inside each random batch "
                "\\[default: batch when a model trained from random init audits itself "
                "from a manifest, else global]."
            ),
        ),
    ] = None,
    rematch_min_confidence: Annotated[
        float,
        typer.Option(
            "--rematch-min-confidence",
            min=0.0,
            max=1.0,
            metavar="FLOAT",
            rich_help_panel="Split and rematch",
            help=(
                "With --suspect-targets global: proposals whose confidence (share of the "
                "suspect's transported mass on that caption) is below this are not trained on; "
                "nor is any proposal of an epoch where the proposals for planted known "
                "mismatches (clean pairs, captions deranged) are right less often than "
                "this (90 % lower bound)."
            ),
        ),
    ] = 0.6,
    ot_mass: Annotated[
        float,
        typer.Option(
            "--ot-mass",
            callback=_ot_mass_in_range,
            rich_help_panel="Split and rematch",
            help=(
                "With --suspect-targets batch: fraction of a batch's suspect pairs the "
                "partial-OT plan re-pairs, "
                "in (0, 1]; suspects left without mass get no target. Lower it "
                "when many mismatched captions have no true image in the data."
            ),
        ),
    ] = 0.5,
    robust_q: Annotated[
        float | None,
        typer.Option(
            "--robust-q",
            min=0.0,
            max=1.0,
            metavar="FLOAT",
            rich_help_panel="Split and rematch",
            help=(
                "Exponent q of the noise-robust contrastive loss RINCE on the clean pairs, "
                "in [0, 1]: each pair pulls with weight p^q, p the probability the model "
                "gives its partner, so pairs it cannot fit pull less (0: plain InfoNCE) "
                "\\[default: 0.3 when a model trained from random init audits itself "
                "from a manifest, else 0]."
            ),
        ),
    ] = None,
    audit_weight: Annotated[
        float,
        typer.Option(
            "--audit-weight",
            min=0.0,
            max=1.0,
            metavar="FLOAT",
            rich_help_panel="Split and rematch",
            help=(
                "With a scan folder as DATASET: weight of the scan's match_score in every "
                "refreshed split, averaged with the model's own loss mixture. Keep it high "
                "when the scan came from a stronger model than the one being trained (1: keep "
                "the scan's split; 0: trust the model's own losses after the first epoch)."
            ),
        ),
    ] = 0.5,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(
            "--checkpoint-every",
            min=1,
            metavar="INT",
            rich_help_panel="Checkpoints",
            help=(
                "Also save resume.pt every N optimizer steps, so --resume loses "
                "at most N steps \\[default: at the end of every epoch only]."
            ),
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            rich_help_panel="Checkpoints",
            help=(
                "Continue the interrupted run in --out from its resume.pt (same settings required)."
            ),
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", rich_help_panel="Checkpoints", help="Replace an earlier run in --out."
        ),
    ] = False,
    seed: Annotated[
        int,
        typer.Option(
            "--seed",
            help=(
                "Seeds the validation split, data order and "
                "split mixtures; the same seed repeats the run."
            ),
        ),
    ] = 0,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help=(
                "Settings file: an earlier run's finetune_config.yaml, or setting: value "
                "lines. Options given on the command line win."
            ),
        ),
    ] = None,
    fmt: FormatOpt = Format.human,
    quiet: QuietOpt = False,
) -> None:
    # long: typer options, one per finetune setting; to be generated from config.py (step 7)
    """Fine-tune the open_clip model on a noisy dataset, robustly to mismatched pairs.

    Clean pairs get the usual contrastive loss; a pair the per-epoch split calls suspect trains with the caption a partial optimal-transport plan over all suspects proposes for its image (its own caption forbidden), or only as a negative when nothing fits.

    Best from a scan folder: pmpclean finetune data.pmpclean --out model/

    Writes open_clip_pytorch_model.bin (for pmpclean scan --model ARCH --pretrained MODEL_DIR/open_clip_pytorch_model.bin, and for open_clip) and metrics.json with image-to-text and text-to-image R@1/5/10 on the held-out split before and after.
    """  # noqa: E501 (one paragraph per line: the help wraps them to the terminal)
    from ._utils import seed_everything
    from .training import FinetuneConfig
    from .training import finetune as run_finetune

    output = _output(fmt, quiet)
    with _run(output):
        options = {
            "model": model,
            "pretrained": pretrained,
            "image_col": image_col,
            "text_col": text_col,
            "truth_col": truth_col,
            "method": method.value,
            "epochs": epochs,
            "batch_size": batch_size,
            "accum_steps": accum_steps,
            "lr": lr,
            "schedule": schedule.value,
            "warmup_steps": warmup_steps,
            "lock_image": lock_image,
            "lock_text": lock_text,
            "precision": precision.value,
            "device": device,
            "workers": workers,
            "seed": seed,
            "val_fraction": val_fraction,
            "val_dataset": str(val_dataset) if val_dataset else None,
            "patience": patience,
            "split_warmup_epochs": split_warmup_epochs,
            "split_every": split_every,
            "suspect_targets": None if suspect_targets is None else suspect_targets.value,
            "rematch_min_confidence": rematch_min_confidence,
            "ot_mass": ot_mass,
            "robust_q": robust_q,
            "audit_weight": audit_weight,
            "checkpoint_every": checkpoint_every,
            "resume": resume,
            "overwrite": overwrite,
        }
        if config_file is None:
            cfg = FinetuneConfig(**options)
        else:  # defaults < the file < options given on the command line
            given = {k: v for k, v in options.items() if _explicit(ctx, k)}
            cfg = load_finetune_config(config_file).replace(**given)
        seed_everything(cfg.seed)
        _warn_remote_images(output)
        with output.progress() as progress:
            result = run_finetune(dataset, out_dir=out, config=cfg, progress=progress)
        info: dict[str, Any] = {
            "model_dir": str(result.out_dir),
            "checkpoint": str(result.checkpoint),
        }
        for when in ("before", "after"):
            rec = result.metrics.get(when)
            if isinstance(rec, dict):
                info[f"recall_{when}"] = {
                    k: v for k, v in rec.items() if isinstance(v, (int, float))
                }
        info["files"] = result.files
        output.finetune_summary(info)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``pmpclean``); ``argv`` for tests."""
    try:
        app(args=argv, prog_name="pmpclean", standalone_mode=True)
    except SystemExit as exc:
        if argv is not None and exc.code not in (0, None):
            raise
        if argv is None:
            raise


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
