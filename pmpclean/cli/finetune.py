"""pmpclean finetune: robust fine-tuning of the open_clip model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import FinetuneConfig, load_finetune_config
from ._app import app, handle_errors, make_output, running
from ._options import (
    Format,
    FormatOpt,
    QuietOpt,
    apply_settings,
    choices,
    setting,
    settings_given,
)

Method = choices(FinetuneConfig, "method")
SuspectTargets = choices(FinetuneConfig, "suspect_targets")
Schedule = choices(FinetuneConfig, "schedule")
Precision = choices(FinetuneConfig, "precision")


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
    model: Annotated[str, setting(FinetuneConfig, "model", "--model")] = FinetuneConfig.model,
    pretrained: Annotated[
        str, setting(FinetuneConfig, "pretrained", "--pretrained", rich_help_panel="Model")
    ] = FinetuneConfig.pretrained,
    image_col: Annotated[
        str, setting(FinetuneConfig, "image_col", "--image-col")
    ] = FinetuneConfig.image_col,
    text_col: Annotated[
        str, setting(FinetuneConfig, "text_col", "--text-col")
    ] = FinetuneConfig.text_col,
    truth_col: Annotated[
        str | None, setting(FinetuneConfig, "truth_col", "--truth-col", rich_help_panel="Data")
    ] = FinetuneConfig.truth_col,
    method: Annotated[
        Method, setting(FinetuneConfig, "method", "--method", rich_help_panel="Training")
    ] = FinetuneConfig.method,
    epochs: Annotated[
        int,
        setting(FinetuneConfig, "epochs", "--epochs", metavar="INT", rich_help_panel="Training"),
    ] = FinetuneConfig.epochs,
    batch_size: Annotated[
        int,
        setting(
            FinetuneConfig, "batch_size", "--batch-size", metavar="INT", rich_help_panel="Training"
        ),
    ] = FinetuneConfig.batch_size,
    accum_steps: Annotated[
        int,
        setting(
            FinetuneConfig,
            "accum_steps",
            "--accum-steps",
            metavar="INT",
            rich_help_panel="Training",
        ),
    ] = FinetuneConfig.accum_steps,
    lr: Annotated[
        float | None, setting(FinetuneConfig, "lr", "--lr", rich_help_panel="Training")
    ] = FinetuneConfig.lr,
    schedule: Annotated[
        Schedule, setting(FinetuneConfig, "schedule", "--schedule", rich_help_panel="Training")
    ] = FinetuneConfig.schedule,
    warmup_steps: Annotated[
        int | None,
        setting(
            FinetuneConfig,
            "warmup_steps",
            "--warmup-steps",
            metavar="INT",
            rich_help_panel="Training",
        ),
    ] = FinetuneConfig.warmup_steps,
    lock_image: Annotated[
        bool, setting(FinetuneConfig, "lock_image", "--lock-image", rich_help_panel="Model")
    ] = FinetuneConfig.lock_image,
    lock_text: Annotated[
        bool, setting(FinetuneConfig, "lock_text", "--lock-text", rich_help_panel="Model")
    ] = FinetuneConfig.lock_text,
    precision: Annotated[
        Precision, setting(FinetuneConfig, "precision", "--precision", rich_help_panel="Model")
    ] = FinetuneConfig.precision,
    device: Annotated[str, setting(FinetuneConfig, "device", "--device")] = FinetuneConfig.device,
    workers: Annotated[
        int, setting(FinetuneConfig, "workers", "--workers", metavar="INT", rich_help_panel="Model")
    ] = FinetuneConfig.workers,
    val_fraction: Annotated[
        float,
        setting(
            FinetuneConfig,
            "val_fraction",
            "--val-fraction",
            metavar="FLOAT",
            rich_help_panel="Data",
        ),
    ] = FinetuneConfig.val_fraction,
    val_dataset: Annotated[
        Path | None, setting(FinetuneConfig, "val_dataset", "--val-dataset", rich_help_panel="Data")
    ] = FinetuneConfig.val_dataset,
    patience: Annotated[
        int | None,
        setting(
            FinetuneConfig, "patience", "--patience", metavar="INT", rich_help_panel="Training"
        ),
    ] = FinetuneConfig.patience,
    split_warmup_epochs: Annotated[
        int | None,
        setting(
            FinetuneConfig,
            "split_warmup_epochs",
            "--split-warmup-epochs",
            metavar="INT",
            rich_help_panel="Split and rematch",
        ),
    ] = FinetuneConfig.split_warmup_epochs,
    split_every: Annotated[
        int,
        setting(
            FinetuneConfig,
            "split_every",
            "--split-every",
            metavar="INT",
            rich_help_panel="Split and rematch",
        ),
    ] = FinetuneConfig.split_every,
    suspect_targets: Annotated[
        SuspectTargets | None,
        setting(
            FinetuneConfig,
            "suspect_targets",
            "--suspect-targets",
            case_sensitive=False,
            rich_help_panel="Split and rematch",
        ),
    ] = FinetuneConfig.suspect_targets,
    rematch_min_confidence: Annotated[
        float,
        setting(
            FinetuneConfig,
            "rematch_min_confidence",
            "--rematch-min-confidence",
            metavar="FLOAT",
            rich_help_panel="Split and rematch",
        ),
    ] = FinetuneConfig.rematch_min_confidence,
    ot_mass: Annotated[
        float,
        setting(
            FinetuneConfig,
            "ot_mass",
            "--ot-mass",
            rich_help_panel="Split and rematch",
            explain=(
                ". It is the fraction of a batch's suspect pairs the transport plan "
                "re-pairs: 0 would leave every suspect without a target and more than 1 is "
                "more mass than there is. Use {default} (the default), higher when most "
                "mismatched captions have their true image in the data, lower when few do."
            ),
        ),
    ] = FinetuneConfig.ot_mass,
    robust_q: Annotated[
        float | None,
        setting(
            FinetuneConfig,
            "robust_q",
            "--robust-q",
            metavar="FLOAT",
            rich_help_panel="Split and rematch",
        ),
    ] = FinetuneConfig.robust_q,
    audit_weight: Annotated[
        float,
        setting(
            FinetuneConfig,
            "audit_weight",
            "--audit-weight",
            metavar="FLOAT",
            rich_help_panel="Split and rematch",
        ),
    ] = FinetuneConfig.audit_weight,
    checkpoint_every: Annotated[
        int | None,
        setting(
            FinetuneConfig,
            "checkpoint_every",
            "--checkpoint-every",
            metavar="INT",
            rich_help_panel="Checkpoints",
        ),
    ] = FinetuneConfig.checkpoint_every,
    resume: Annotated[
        bool, setting(FinetuneConfig, "resume", "--resume", rich_help_panel="Checkpoints")
    ] = FinetuneConfig.resume,
    overwrite: Annotated[
        bool, setting(FinetuneConfig, "overwrite", "--overwrite", rich_help_panel="Checkpoints")
    ] = FinetuneConfig.overwrite,
    seed: Annotated[int, setting(FinetuneConfig, "seed", "--seed")] = FinetuneConfig.seed,
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
    # long: one typer option per finetune setting (generated from config.py), 31 of them
    """Fine-tune the open_clip model on a noisy dataset, robustly to mismatched pairs.

    Clean pairs get the usual contrastive loss; a pair the per-epoch split calls suspect trains with the caption a partial optimal-transport plan over all suspects proposes for its image (its own caption forbidden), or only as a negative when nothing fits.

    Best from a scan folder: pmpclean finetune data.pmpclean --out model/

    Writes open_clip_pytorch_model.bin (for pmpclean scan --model ARCH --pretrained MODEL_DIR/open_clip_pytorch_model.bin, and for open_clip) and metrics.json with image-to-text and text-to-image R@1/5/10 on the held-out split before and after.
    """  # noqa: E501 (one paragraph per line: the help wraps them to the terminal)
    from ..training import finetune as run_finetune

    output = make_output(fmt, quiet)
    with handle_errors(output):
        # defaults < the file < options given on the command line
        base = FinetuneConfig() if config_file is None else load_finetune_config(config_file)
        cfg = apply_settings(base, settings_given(ctx, only_given=config_file is not None))
        with running(output, cfg.seed) as progress:
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
