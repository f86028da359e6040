"""finetune and evaluate_retrieval: read, load, then the epoch loop of three calls."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._utils import Progress, Timer, claim_output, resolve_device, to_jsonable
from ..config import FinetuneConfig, _validate
from ..errors import ConfigError, DatasetError
from .checkpoint import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    MODEL_CONFIG_NAME,
    OPEN_CLIP_CONFIG_NAME,
    RESUME_NAME,
    SETTINGS_NAME,
    _prepare_out_dir,
    _save_weights,
    _settings_dict,
    _versions,
    _write_json,
    _write_settings,
    load_resume,
)
from .data import (
    _MIN_TRAIN_IMAGES,
    _MIN_VAL_IMAGES,
    _Data,
    _Holdout,
    _read_dataset,
    _split_holdout,
    _subset,
    _usable_images,
)
from .loop import Run, TrainState, elapsed, end_epoch, start_epoch, train_one_epoch, validate
from .metrics import retrieval_recall
from .model import _adamw, _encode, _load_model, _lr_lambda, _null_context, _param_groups

if TYPE_CHECKING:  # pragma: no cover
    pass

logger = logging.getLogger(__name__)


_BELOW_CHANCE = 0.95  # adaptive split warmup: start once the loss is 5% below chance


_ROBUST_Q_RANDOM_INIT = 0.3  # robust_q=None: l2rm from random init without a scan folder


@dataclass
class FinetuneResult:
    """What :func:`finetune` trained and where it wrote it."""

    out_dir: Path  # the model folder
    checkpoint: Path  # out_dir / open_clip_pytorch_model.bin
    metrics: dict[str, Any]  # the content of metrics.json
    files: dict[str, str] = field(default_factory=dict)  # name -> path of every output file

    @property
    def before(self) -> dict[str, Any] | None:
        """Validation recall of the starting model (``None`` without validation)."""
        return self.metrics.get("before")

    @property
    def after(self) -> dict[str, Any] | None:
        """Validation recall of the saved model (``None`` without validation)."""
        return self.metrics.get("after")


def evaluate_retrieval(
    dataset: Any,
    *,
    model: str = "ViT-B-32",
    pretrained: str = "laion2b_s34b_b79k",
    image_col: str = "image",
    text_col: str = "caption",
    device: str = "auto",
    batch_size: int = 256,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Image-to-text and text-to-image R@1/5/10 of a model on a manifest's pairs.

    Parameters
    ----------
    dataset : str, Path or pandas.DataFrame
        Manifest with image and caption columns (rows with problems are skipped).
    model, pretrained : str
        open_clip architecture and weights (``pretrained`` may be the
        ``open_clip_pytorch_model.bin`` written by :func:`finetune`).
    image_col, text_col, device, batch_size
        As in :class:`FinetuneConfig`.

    Returns
    -------
    dict
        See :func:`retrieval_recall`; recalls in percent, higher is better.
    """
    cfg = FinetuneConfig(model=model, pretrained=pretrained, image_col=image_col, text_col=text_col)
    data = _read_dataset(dataset, cfg)
    dev = resolve_device(device)
    loaded = _load_model(cfg, dev)
    data, images = _usable_images(data, loaded.preprocess, cfg, progress, "evaluation")
    tokens = loaded.tokenizer(data.captions)
    enc = _encode(
        loaded.model,
        images,
        tokens,
        device=dev,
        batch_size=batch_size,
        autocast=_null_context,
        progress=progress,
        stage="embedding",
    )
    return retrieval_recall(enc.image, enc.text, data.image_index)


def finetune(
    dataset: Any,
    *,
    out_dir: str | Path,
    config: FinetuneConfig | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune an open_clip model on an image-caption dataset, robustly to mismatched pairs.

    Parameters
    ----------
    dataset : str, Path, pandas.DataFrame or Manifest
        A manifest (CSV, Parquet, ...; one row per image-caption pair), or the output
        folder (or ``audit.parquet``/``audit.csv``) of ``pmpclean scan``, whose
        ``is_mismatched`` column then gives the first clean/suspect split. Rows whose
        image or caption is unusable are skipped.
    out_dir : str or Path
        Model folder to write (see the module docstring for its files).
    config : FinetuneConfig, optional
        All settings; defaults to ``FinetuneConfig()``.
    progress : callable, optional
        Called as ``progress(stage, done, total)``.
    **options
        Individual :class:`FinetuneConfig` fields, applied on top of ``config``.

    Returns
    -------
    FinetuneResult
        Output paths and the metrics (also in ``out_dir/metrics.json``): validation
        R@1/5/10 in both directions before and after, in percent, higher is better.

    Raises
    ------
    ConfigError
        A setting is out of range, or ``out_dir`` holds another run (see ``resume``,
        ``overwrite``), or a resumed run's settings differ.
    DatasetError
        The dataset (or ``val_dataset``) cannot be used.
    ModelLoadError
        The model or its weights cannot be loaded.

    Notes
    -----
    Randomness comes from ``seed`` only (validation split, data order, mixture fits);
    the global torch RNG is forked, so calling this leaves it unchanged. Random
    initialisation (``pretrained="none"``) uses :data:`pmpclean.embedding.RANDOM_SEED`.
    """
    import torch

    cfg = config if config is not None else FinetuneConfig()
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"config must be a FinetuneConfig, not {type(cfg).__name__}.")
    if options:
        cfg = cfg.replace(**options)
    _validate(cfg)
    device = resolve_device(cfg.device)
    precision = cfg.precision
    if precision == "auto":
        precision = "amp" if device.startswith("cuda") else "fp32"
    if precision != "fp32" and not device.startswith("cuda"):
        raise ConfigError(
            f"precision={cfg.precision!r} (mixed precision) needs a CUDA device, but the device "
            f"is {device!r}; use precision fp32 (or auto), or a CUDA device."
        )
    fork_devices: list[int] = []
    if device.startswith("cuda"):
        fork_devices = [torch.device(device).index or 0]
    # out_dir is writable and ours (locked) before any work; removed again if created
    # here and the run fails before writing into it
    with torch.random.fork_rng(devices=fork_devices), claim_output(out_dir, folder=True):
        torch.manual_seed(cfg.seed)
        return _run(dataset, Path(out_dir), cfg, device, precision, progress)


def _run(
    dataset: Any,
    out: Path,
    cfg: FinetuneConfig,
    device: str,
    precision: str,
    progress: Progress | None,
) -> FinetuneResult:
    """Read, load, then per epoch: start (split), train, validate, end (record, save)."""
    timer = Timer()
    session_start = time.time()
    data, holdout, train, val_data = _read_data(dataset, cfg, timer)
    run = _prepare(data, train, val_data, out, cfg, device, precision, progress, timer)
    run.session_start = session_start
    state = _initial_state(run, _prepare_out_dir(out, cfg))
    while state.epoch < cfg.epochs and not state.stopped_early:
        run.segment_start = time.time()
        if state.batch == 0:
            start_epoch(run, state)
        train_one_epoch(run, state)
        val = validate(run, f"validating (epoch {state.epoch + 1})")
        end_epoch(run, state, val)
    return _finish(run, state, data, holdout)


def _read_data(
    dataset: Any, cfg: FinetuneConfig, timer: Timer
) -> tuple[_Data, _Holdout, _Data, _Data | None]:
    """The dataset, its hold-out, and the training and validation rows."""
    with timer("read"):
        data = _read_dataset(dataset, cfg)
        if cfg.val_dataset is not None:
            holdout = _Holdout(np.arange(len(data.captions)), np.arange(0), cfg.val_dataset, None)
            val_data: _Data | None = _read_dataset(cfg.val_dataset, cfg, what="val_dataset")
        else:
            holdout = _split_holdout(data, cfg.val_fraction, cfg.seed)
            val_data = _subset(data, holdout.val) if holdout.val.size else None
        if holdout.skipped is not None:
            if cfg.patience is not None:
                raise ConfigError(
                    f"patience={cfg.patience} (early stopping) needs validation, but "
                    f"{data.source} has only {len(data.paths)} images: too few to hold out "
                    f"{_MIN_VAL_IMAGES} and keep {_MIN_TRAIN_IMAGES} for training. Pass "
                    "val_dataset, or leave patience unset."
                )
            warnings.warn(holdout.skipped, stacklevel=4)
        train = _subset(data, holdout.train)
    return data, holdout, train, val_data


def _resolve(cfg: FinetuneConfig, train: _Data, random_init: bool) -> dict[str, Any]:
    """The settings left to context (``None``): learning rate, split warmup, loss."""
    split_warmup: int | None  # None: adaptive, see FinetuneConfig.split_warmup_epochs
    if cfg.split_warmup_epochs is not None:
        split_warmup = cfg.split_warmup_epochs
    elif train.audit_clean is not None or not random_init:
        split_warmup = 0
    else:
        split_warmup = None
    # RINCE and in-batch targets where they help: l2rm from random init, auditing itself
    scratch_audit = random_init and cfg.method == "l2rm" and train.audit_clean is None
    robust_q = cfg.robust_q
    if robust_q is None:
        robust_q = _ROBUST_Q_RANDOM_INIT if scratch_audit else 0.0
    suspect_targets = cfg.suspect_targets
    if suspect_targets is None:
        suspect_targets = "batch" if scratch_audit else "global"
    return {
        "lr": cfg.lr if cfg.lr is not None else (1e-3 if random_init else 1e-5),
        "split_warmup": split_warmup,
        "robust_q": robust_q,
        "suspect_targets": suspect_targets,
    }


def get_autocast(precision: str) -> Callable[[], Any]:
    """A context factory for the forward passes: mixed precision on CUDA, else nothing."""
    import torch

    if precision == "fp32":
        return _null_context
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


def _prepare(
    data: _Data,
    train: _Data,
    val_data: _Data | None,
    out: Path,
    cfg: FinetuneConfig,
    device: str,
    precision: str,
    progress: Progress | None,
    timer: Timer,
) -> Run:
    """Load the model and the images, make the output folder, the optimizer and schedule."""
    import torch

    with timer("load_model"):
        loaded = _load_model(cfg, device)
    if cfg.lock_image:
        loaded.model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if cfg.lock_text:
        loaded.model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    resolved = _resolve(cfg, train, loaded.random_init)

    # images decoded once; unusable ones dropped with a warning
    with timer("load_images"):
        train, train_images = _usable_images(train, loaded.preprocess, cfg, progress, "training")
        val_images = None
        if val_data is not None:
            val_data, val_images = _usable_images(
                val_data, loaded.preprocess, cfg, progress, "validation"
            )
    n_train = len(train.captions)
    if n_train < 2:
        raise DatasetError(
            f"{data.source}: only {n_train} usable training pair(s) left; need at least 2."
        )

    # the output folder is checked only now, so a bad dataset or model leaves it untouched
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"Cannot create output folder {out} ({exc.strerror or exc}); pass a writable --out."
        ) from exc

    optimizer = _adamw(_param_groups(loaded.model, cfg.weight_decay), resolved["lr"])
    steps_per_epoch = math.ceil(math.ceil(n_train / cfg.batch_size) / cfg.accum_steps)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(0.05 * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.schedule, warmup, total_steps)
    )
    split_warmup = resolved["split_warmup"]
    return Run(
        cfg=cfg.replace(robust_q=resolved["robust_q"], suspect_targets=resolved["suspect_targets"]),
        out=out,
        train=train,
        train_images=train_images,
        train_tokens=loaded.tokenizer(train.captions),
        val_data=val_data,
        val_images=val_images,
        val_tokens=loaded.tokenizer(val_data.captions) if val_data is not None else None,
        loaded=loaded,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=(precision == "amp")),
        autocast=get_autocast(precision),
        device=device,
        lr=resolved["lr"],
        total_steps=total_steps,
        settings=_settings_dict(cfg),
        resolved={
            "lr": resolved["lr"],
            "warmup_steps": warmup,
            "split_warmup_epochs": "adaptive" if split_warmup is None else split_warmup,
            "robust_q": resolved["robust_q"],
            "suspect_targets": resolved["suspect_targets"],
            "precision": precision,
            "device": device,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
        },
        split_warmup=split_warmup,
        timer=timer,
        progress=progress,
    )


def _initial_state(run: Run, resuming: bool) -> TrainState:
    """A fresh state (settings written, the starting model validated) or the resumed one."""
    import torch

    if not resuming:
        state = TrainState(split_start=run.split_warmup)
        _write_settings(run.out, run.settings, run.resolved)
        state.before = validate(run, "validating (before training)")
        if state.before is not None:
            state.best_rsum = state.before["rsum"]
        return state
    with run.timer("resume"):
        ckpt = load_resume(run.out / RESUME_NAME, settings=run.settings, n_train=run.n_train)
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        run.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = TrainState.from_dict(ckpt["state"])
    logger.info(
        "resuming %s at epoch %d, batch %d, step %d",
        run.out,
        state.epoch + 1,
        state.batch,
        state.step,
    )
    return state


def _finish(run: Run, state: TrainState, data: _Data, holdout: _Holdout) -> FinetuneResult:
    """The best (or last) weights, metrics.json, and the result."""
    cfg, out, timer, loaded, train, val_data = (
        run.cfg,
        run.out,
        run.timer,
        run.loaded,
        run.train,
        run.val_data,
    )
    n_train, settings, resolved, random_init = (
        run.n_train,
        run.settings,
        run.resolved,
        loaded.random_init,
    )
    checkpoint_path = out / CHECKPOINT_NAME
    history = state.history
    if state.best_epoch is None:
        # validation never beat the starting model: keep the last weights, say so
        warnings.warn(
            "No epoch improved validation recall over the starting model; the saved weights "
            "are the last epoch's. Check lr, epochs and the data.",
            stacklevel=4,
        )
        with timer("write"):
            _save_weights(run.model, out, loaded.model_cfg)
        after = history[-1]["val"] if history else state.before
    else:
        after = history[state.best_epoch - 1]["val"]
    metrics = {
        "completed": True,
        "model": {
            "name": loaded.model_name,
            "pretrained": cfg.pretrained,
            "random_init": random_init,
            "checkpoint": str(checkpoint_path.resolve()),
            "local_dir": "local-dir:" + str(out.resolve()),
        },
        "dataset": {
            "source": data.source,
            "n_rows": data.n_input,
            "n_unusable": data.n_unusable,
            "n_train_pairs": n_train,
            "n_train_images": len(train.paths),
            "audit_split": train.audit_clean is not None,
        },
        "validation": None
        if val_data is None
        else {
            "source": holdout.source,
            "n_pairs": len(val_data.captions),
            "n_images": len(val_data.paths),
        },
        "validation_skipped": holdout.skipped,  # why val_fraction > 0 gave no validation
        "before": state.before,
        "after": after,
        "best_epoch": state.best_epoch,
        "split_start_epoch": None if state.split_start is None else state.split_start + 1,
        "epochs_run": state.epoch,
        "stopped_early": state.stopped_early,
        "history": history,
        "settings": settings,
        "resolved": resolved,
        "versions": _versions(),
        "timings": {k: round(v, 3) for k, v in timer.seconds.items()},
        "seconds": round(elapsed(run, state), 3),
    }
    metrics = to_jsonable(metrics)
    _write_json(out / METRICS_NAME, metrics)
    if not cfg.keep_resume and (out / RESUME_NAME).exists():
        (out / RESUME_NAME).unlink()
    files = {
        "checkpoint": str(checkpoint_path),
        "open_clip_config": str(out / OPEN_CLIP_CONFIG_NAME),
        "model_config": str(out / MODEL_CONFIG_NAME),
        "metrics": str(out / METRICS_NAME),
        "settings": str(out / SETTINGS_NAME),
    }
    if (out / RESUME_NAME).exists():
        files["resume"] = str(out / RESUME_NAME)
    return FinetuneResult(out_dir=out, checkpoint=checkpoint_path, metrics=metrics, files=files)
