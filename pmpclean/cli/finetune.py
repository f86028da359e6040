"""pmpclean finetune: robust fine-tuning of the open_clip model."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import load_finetune_config
from ._app import _output, _run, _warn_remote_images, app
from ._options import (
    DeviceOpt,
    Format,
    FormatOpt,
    ImageCol,
    ModelOpt,
    QuietOpt,
    TextCol,
    _explicit,
)


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
                "A manifest (e.g. the cleaned one from 'pmpclean rematch'), or a "
                "scan folder / audit.parquet: its split then seeds the first epoch."
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
    from .._utils import seed_everything
    from ..training import FinetuneConfig
    from ..training import finetune as run_finetune

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
