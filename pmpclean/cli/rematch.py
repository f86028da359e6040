"""pmpclean rematch: write a cleaned manifest from the latest scan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import AuditConfig, DataConfig, EmbedConfig, ScanConfig
from ._app import app, handle_errors, make_output, running
from ._options import (
    ConfigOpt,
    DeviceOpt,
    EmbeddingsOpt,
    EngineName,
    EngineOpt,
    ForceOpt,
    Format,
    FormatOpt,
    ImageCol,
    LabelCol,
    Manifest,
    ModelOpt,
    OutFormat,
    PairOpt,
    Policy,
    PretrainedOpt,
    QuietOpt,
    RayAddressOpt,
    RootOpt,
    SeedOpt,
    TextCol,
    bounds,
    build_scan_config,
)


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
            **bounds(AuditConfig, "min_confidence"),
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
    image_col: ImageCol = DataConfig.image_col,
    text_col: TextCol = DataConfig.text_col,
    label_col: LabelCol = DataConfig.label_col,
    root: RootOpt = DataConfig.root,
    model: ModelOpt = EmbedConfig.model,
    pretrained: PretrainedOpt = EmbedConfig.pretrained,
    embeddings: EmbeddingsOpt = EmbedConfig.embeddings,
    embeddings_pair: PairOpt = EmbedConfig.embeddings_pair,
    device: DeviceOpt = EmbedConfig.device,
    seed: SeedOpt = ScanConfig.seed,
    config_file: ConfigOpt = None,
    engine: EngineOpt = EngineName.local,
    ray_address: RayAddressOpt = None,
    fmt: FormatOpt = Format.human,
    quiet: QuietOpt = False,
) -> None:
    # long: one typer option per rematch argument and setting (settings generated from config)
    """Write a cleaned manifest from the latest scan (scanning first when needed).

    Every input row lands in exactly one of the cleaned manifest and the dropped file.
    The input is never modified; existing outputs are kept unless --force. Options not
    given keep the values of the scan in --audit-dir; when the manifest, the embeddings,
    the model or a setting that changes the audit differs from that scan's, the
    manifest is scanned again and the summary says which. --min-confidence never needs
    a new scan.
    """
    from ..pipeline import default_out_dir, saved_scan_config
    from ..pipeline import rematch as run_rematch

    output = make_output(fmt, quiet)
    with handle_errors(output):
        # options not given keep the values of the scan being applied
        scanned = saved_scan_config(audit_dir if audit_dir else default_out_dir(manifest))
        cfg = build_scan_config(ctx, config_file, base=scanned)
        with running(output, cfg.seed, engine, ray_address) as progress:
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
