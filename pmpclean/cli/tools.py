"""pmpclean embed and corrupt: the tools around a scan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import DataConfig, EmbedConfig, ScanConfig
from ._app import app, handle_errors, make_output, running
from ._options import (
    BatchOpt,
    CacheDirOpt,
    DeviceOpt,
    EmbeddingsOpt,
    EngineName,
    EngineOpt,
    ForceOpt,
    Format,
    FormatOpt,
    IdCol,
    ImageCol,
    Manifest,
    ModelOpt,
    NoCacheOpt,
    NoiseMode,
    PretrainedOpt,
    QuietOpt,
    RayAddressOpt,
    RootOpt,
    SeedOpt,
    TextCol,
    WorkersOpt,
    build_scan_config,
)


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
    image_col: ImageCol = DataConfig.image_col,
    text_col: TextCol = DataConfig.text_col,
    id_col: IdCol = DataConfig.id_col,
    root: RootOpt = DataConfig.root,
    model: ModelOpt = EmbedConfig.model,
    pretrained: PretrainedOpt = EmbedConfig.pretrained,
    device: DeviceOpt = EmbedConfig.device,
    batch_size: BatchOpt = EmbedConfig.batch_size,
    workers: WorkersOpt = EmbedConfig.workers,
    cache_dir: CacheDirOpt = EmbedConfig.cache_dir,
    no_cache: NoCacheOpt = not EmbedConfig.use_cache,
    force: ForceOpt = False,
    seed: SeedOpt = ScanConfig.seed,
    engine: EngineOpt = EngineName.local,
    ray_address: RayAddressOpt = None,
    fmt: FormatOpt = Format.human,
    quiet: QuietOpt = False,
) -> None:
    """Embed every image and caption and write a row-aligned .npz for --embeddings.

    Each unique image is embedded once; results are cached, so an interrupted run
    resumes and a later scan of the same data does no model work.
    """
    from ..pipeline import embed as run_embed

    output = make_output(fmt, quiet)
    with handle_errors(output):
        cfg = build_scan_config(ctx, None)  # embed takes no --config: every option applies
        with running(output, cfg.seed, engine, ray_address) as progress:
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
    embeddings: EmbeddingsOpt = EmbedConfig.embeddings,
    image_col: ImageCol = DataConfig.image_col,
    text_col: TextCol = DataConfig.text_col,
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
    from ..pipeline import corrupt as run_corrupt

    output = make_output(fmt, quiet)
    with handle_errors(output):
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
