"""pmpclean scan: score every pair, flag mismatches, propose captions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import _on_engine, _output, _run, _warn_remote_images, app
from ._options import (
    BatchOpt,
    CacheDirOpt,
    ConfigOpt,
    Cost,
    DeviceOpt,
    EmbeddingsOpt,
    EngineName,
    EngineOpt,
    Format,
    FormatOpt,
    IdCol,
    ImageCol,
    LabelCol,
    Manifest,
    ModelOpt,
    NoCacheOpt,
    Pair,
    PairOpt,
    PretrainedOpt,
    QuietOpt,
    RayAddressOpt,
    RootOpt,
    SeedOpt,
    TextCol,
    WorkersOpt,
    _build_config,
)


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


@app.command()
def scan(
    ctx: typer.Context,
    manifest: Manifest,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output folder \\[default: <manifest stem>.pmpclean/ beside the manifest].",
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
    from .._utils import seed_everything
    from ..pipeline import scan as run_scan

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
