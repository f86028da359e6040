"""pmpclean scan: score every pair, flag mismatches, propose captions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import AuditConfig, DataConfig, EmbedConfig, ScanConfig
from ._app import app, handle_errors, make_output, running
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
    PairOpt,
    PretrainedOpt,
    QuietOpt,
    RayAddressOpt,
    RootOpt,
    SeedOpt,
    TextCol,
    WorkersOpt,
    build_scan_config,
    setting,
)


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
    image_col: ImageCol = DataConfig.image_col,
    text_col: TextCol = DataConfig.text_col,
    id_col: IdCol = DataConfig.id_col,
    label_col: LabelCol = DataConfig.label_col,
    root: RootOpt = DataConfig.root,
    truth_col: Annotated[
        str | None, setting(DataConfig, "truth_col", "--truth-col")
    ] = DataConfig.truth_col,
    model: ModelOpt = EmbedConfig.model,
    pretrained: PretrainedOpt = EmbedConfig.pretrained,
    embeddings: EmbeddingsOpt = EmbedConfig.embeddings,
    embeddings_pair: PairOpt = EmbedConfig.embeddings_pair,
    device: DeviceOpt = EmbedConfig.device,
    batch_size: BatchOpt = EmbedConfig.batch_size,
    workers: WorkersOpt = EmbedConfig.workers,
    cache_dir: CacheDirOpt = EmbedConfig.cache_dir,
    no_cache: NoCacheOpt = not EmbedConfig.use_cache,
    k: Annotated[int, setting(AuditConfig, "k", "--k")] = AuditConfig.k,
    threshold: Annotated[
        float,
        setting(
            AuditConfig,
            "threshold",
            "--threshold",
            metavar="FLOAT",
            explain=(
                ": pairs with a match_score below it are flagged, so 0 flags nothing and 1 "
                "flags everything. Use {default} (the default)."
            ),
        ),
    ] = AuditConfig.threshold,
    no_rematch: Annotated[
        bool, setting(AuditConfig, "rematch", "--no-rematch", negate=True)
    ] = not AuditConfig.rematch,
    mass: Annotated[
        float | None,
        setting(
            AuditConfig,
            "mass",
            "--mass",
            metavar="FLOAT",
            explain=(
                ": it is the fraction of suspect mass the transport moves. Leave it out for "
                "the default 0.8."
            ),
        ),
    ] = AuditConfig.mass,
    cost: Annotated[Cost, setting(AuditConfig, "cost", "--cost")] = AuditConfig.cost,
    min_confidence: Annotated[
        float, setting(AuditConfig, "min_confidence", "--min-confidence")
    ] = AuditConfig.min_confidence,
    gallery_size: Annotated[
        int, setting(ScanConfig, "gallery_size", "--gallery-size")
    ] = ScanConfig.gallery_size,
    seed: SeedOpt = ScanConfig.seed,
    config_file: ConfigOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an audit already in the output folder.")
    ] = False,
    engine: EngineOpt = EngineName.local,
    ray_address: RayAddressOpt = None,
    fmt: FormatOpt = Format.human,
    quiet: QuietOpt = False,
) -> None:
    """Score every image-caption pair, flag mismatches, propose better captions.

    Writes audit.parquet, audit.csv, summary.json, config.yaml and report.html to the
    output folder. With --embeddings the scan runs without any model.
    """
    from ..pipeline import scan as run_scan

    output = make_output(fmt, quiet)
    with handle_errors(output):
        cfg = build_scan_config(ctx, config_file)
        with running(output, cfg.seed, engine, ray_address) as progress:
            result = run_scan(manifest, config=cfg, out_dir=out, force=force, progress=progress)
        output.scan_summary(result.summary, result.audit)
