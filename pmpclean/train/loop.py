"""The epoch loop: a :class:`TrainState` and three calls per epoch, as ``open_clip_train``.

``start_epoch`` (refresh the split), ``train_one_epoch`` (the micro-batches, resumable
mid-epoch), ``validate`` and ``end_epoch`` (record, keep the best weights, stop early,
``save`` the state). A :class:`Run` holds what does not change during a run: the data,
the model and its optimizer, the resolved settings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._utils import Progress, Timer, to_jsonable
from ..config import FinetuneConfig
from ..errors import ConfigError
from .checkpoint import RESUME_NAME, _save_weights, save_resume
from .data import _Data, _Images
from .loss import _batch_loss, _chance_loss
from .metrics import retrieval_recall
from .model import _encode
from .targets import _refresh_split

logger = logging.getLogger(__name__)


_BELOW_CHANCE = 0.95  # adaptive split warmup: start once the loss is 5% below chance
# the per-epoch sums of the training statistics (``TrainState.epoch_stats``)
_STAT_KEYS = (
    "loss",
    "infonce",
    "chance",
    "clean_loss",
    "noisy_loss",
    "clean_rows",
    "noisy_rows",
    "noisy_targets",
    "rematched_rows",
)
# statistics that _batch_loss returns per batch
_LOSS_STATS = ("infonce", "clean_loss", "noisy_loss", "clean_rows", "noisy_rows", "noisy_targets")


@dataclass
class TrainState:
    """Where a run stands; with the model and optimizer, all that ``resume.pt`` holds."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # next micro-batch within the epoch
    step: int = 0  # optimizer steps done
    clean: np.ndarray | None = None  # (n_train,) bool: the split used in the current epoch
    partner: np.ndarray | None = None  # (n_train,) int64: row whose caption a suspect trains
    #   with (-1: none)
    partner_weight: np.ndarray | None = None  # (n_train,) float: that pair's weight
    split_info: dict[str, Any] | None = None
    split_start: int | None = None  # first epoch (0-based) with a split; None: not yet
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_stats: dict[str, float] = field(default_factory=dict)
    epoch_seconds: float = 0.0
    before: dict[str, Any] | None = None  # validation recall of the starting model
    best_rsum: float = -math.inf
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    elapsed: float = 0.0  # seconds of the earlier sessions of this run

    _ARRAYS = ("clean", "partner", "partner_weight")  # saved as tensors, not as JSON

    def scalars(self) -> dict[str, Any]:
        """Every field but the arrays (the JSON part of ``resume.pt``)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self._ARRAYS
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        """A state from saved fields; names it does not know (other versions) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class Run:
    """What stays fixed during a run."""

    cfg: FinetuneConfig  # with robust_q and suspect_targets resolved
    out: Path
    train: _Data
    train_images: _Images
    train_tokens: Any  # (n_train, context) token tensor
    val_data: _Data | None
    val_images: _Images | None
    val_tokens: Any
    loaded: Any  # pmpclean.train.model._Model
    optimizer: Any
    scheduler: Any
    scaler: Any
    autocast: Callable[[], Any]
    device: str
    lr: float
    total_steps: int
    settings: dict[str, Any]  # as given (FinetuneConfig's fields)
    resolved: dict[str, Any]  # the settings chosen from context (finetune_config.yaml)
    split_warmup: int | None  # epochs before the first split; None: adaptive
    timer: Timer
    progress: Progress | None
    session_start: float = field(default_factory=time.time)
    segment_start: float = field(default_factory=time.time)  # of the epoch's current
    #   segment: an epoch's seconds add up its segments between resume.pt saves

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def n_train(self) -> int:
        return len(self.train.captions)


def elapsed(run: Run, state: TrainState) -> float:
    """Seconds of training so far, the earlier sessions of a resumed run included."""
    return state.elapsed + time.time() - run.session_start


def save(run: Run, state: TrainState) -> None:
    """Write ``resume.pt``: the run can continue from here."""
    with run.timer("checkpoint"):
        save_resume(
            run.out / RESUME_NAME,
            run=run,
            state=dataclasses.replace(state, elapsed=elapsed(run, state)),
        )


def validate(run: Run, stage: str) -> dict[str, Any] | None:
    """Validation R@1/5/10 of the current model; None without validation data."""
    if run.val_data is None or run.val_images is None:
        return None
    with run.timer("validate"):
        enc = _encode(
            run.model,
            run.val_images,
            run.val_tokens,
            device=run.device,
            batch_size=max(run.cfg.batch_size, 64),
            autocast=run.autocast,
            progress=run.progress,
            stage=stage,
        )
        return retrieval_recall(enc.image, enc.text, run.val_data.image_index)


def start_epoch(run: Run, state: TrainState) -> None:
    """A new epoch: maybe start the split (adaptive warmup), reset the statistics, refresh
    the split."""
    cfg = run.cfg
    if state.split_start is None and state.history and cfg.method == "l2rm":
        last = state.history[-1]
        if last["loss"] <= _BELOW_CHANCE * last["chance_loss"]:
            state.split_start = state.epoch  # the model now beats chance: trust its losses
    state.epoch_stats = dict.fromkeys(_STAT_KEYS, 0.0)
    state.epoch_seconds = 0.0
    with run.timer("split"):
        _refresh_split(
            state,
            state.epoch,
            state.split_start,
            cfg,
            run.train,
            run.train_images,
            run.train_tokens,
            run.model,
            run.device,
            run.autocast,
            run.progress,
        )


def _batches(run: Run, epoch: int) -> list[np.ndarray]:
    """The epoch's micro-batches (order fixed by seed and epoch: resumable)."""
    n, size = run.n_train, run.cfg.batch_size
    order = np.random.default_rng([run.cfg.seed, 3, epoch]).permutation(n)
    batches = [order[i : i + size] for i in range(0, n, size)]
    if len(batches) > 1 and batches[-1].size < 2:  # a lone pair has no negatives
        batches[-2] = np.concatenate([batches[-2], batches.pop()])
    return batches


def _step(run: Run, state: TrainState) -> None:
    """One optimizer step of the accumulated gradients."""
    import torch

    model, cfg = run.model, run.cfg
    if cfg.grad_clip is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))  # as open_clip trains
    state.step += 1


def _batch_loss_of(run: Run, state: TrainState, rows: np.ndarray, imgs: Any) -> Any:
    """The loss of one micro-batch; rematched suspects train with their proposed caption."""
    import torch

    model, device = run.model, run.device
    rows_t = torch.from_numpy(rows)
    clean_b = torch.from_numpy(state.clean)[rows_t]
    text_rows, weight_b = rows_t, None
    partner = torch.from_numpy(state.partner)
    if bool((partner >= 0).any()):
        p = partner[rows_t]
        has = p >= 0
        text_rows = torch.where(has, p, rows_t)
        clean_b = clean_b | has
        weights = torch.from_numpy(state.partner_weight).float()
        weight_b = torch.where(has, weights[rows_t], 1.0).to(device)
        state.epoch_stats["rematched_rows"] += float(has.sum())
    with run.autocast():
        img_f = model.encode_image(imgs.to(device), normalize=True)
        txt_f = model.encode_text(run.train_tokens[text_rows].to(device), normalize=True)
    image_index = torch.from_numpy(run.train.image_index)
    text_group = torch.from_numpy(run.train.text_group)
    loss, st = _batch_loss(
        img_f.float(),
        txt_f.float(),
        model.logit_scale.exp().float(),
        clean_b.to(device),
        image_index[rows_t].to(device),
        text_group[text_rows].to(device),
        run.cfg,
        weight_b,
    )
    if not bool(torch.isfinite(loss)):
        raise ConfigError(
            f"The training loss became {float(loss)} at epoch {state.epoch + 1}, step "
            f"{state.step}; lower lr (now {run.lr:g}) or use precision fp32."
        )
    stats = state.epoch_stats
    stats["loss"] += float(loss.detach()) * len(rows)
    stats["chance"] += _chance_loss(len(rows), run.cfg.robust_q) * len(rows)
    for key in _LOSS_STATS:
        stats[key] += st[key]
    return loss


def train_one_epoch(run: Run, state: TrainState) -> None:
    """The epoch's remaining micro-batches, from ``state.batch`` on."""
    cfg, epoch = run.cfg, state.epoch
    batches = _batches(run, epoch)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    with run.timer("train"):
        start = state.batch
        for b_idx, (rows, imgs) in enumerate(
            run.train_images.batches(batches[start:]), start=start
        ):
            loss = _batch_loss_of(run, state, rows, imgs)
            run.scaler.scale(loss / cfg.accum_steps).backward()
            last = b_idx == len(batches) - 1
            if (b_idx + 1) % cfg.accum_steps != 0 and not last:
                continue
            _step(run, state)
            state.batch = b_idx + 1
            if run.progress is not None:
                stage = f"training (epoch {epoch + 1}/{cfg.epochs})"
                run.progress(stage, state.step, run.total_steps)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and not last:
                state.epoch_seconds += time.time() - run.segment_start
                run.segment_start = time.time()
                save(run, state)


def end_epoch(run: Run, state: TrainState, val: dict[str, Any] | None) -> None:
    """Record the epoch, keep the best weights, maybe stop early, save the state."""
    cfg, epoch, stats, n = run.cfg, state.epoch, state.epoch_stats, run.n_train
    state.epoch_seconds += time.time() - run.segment_start
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": state.step,
        "lr": float(run.scheduler.get_last_lr()[0]),
        "loss": stats["loss"] / n,
        "infonce_loss": stats["infonce"] / n,
        "chance_loss": stats["chance"] / n,
        "clean_loss": stats["clean_loss"] / max(1.0, stats["clean_rows"]),
        "suspect_loss": stats["noisy_loss"] / max(1.0, stats["noisy_targets"]),
        "clean_pairs": int(stats["clean_rows"]),
        "suspect_pairs": int(stats["noisy_rows"]),
        "suspects_with_target": int(round(stats["noisy_targets"])),
        "rematched_pairs": int(stats.get("rematched_rows", 0.0)),
        "split": state.split_info,
        "logit_scale": float(run.model.logit_scale.detach().exp()),
        "seconds": round(state.epoch_seconds, 3),
        "val": val,
    }
    state.history.append(to_jsonable(record))
    logger.info(
        "epoch %d/%d: loss %.4f, validation R-sum %s",
        epoch + 1,
        cfg.epochs,
        record["loss"],
        "n/a" if val is None else f"{val['rsum']:.1f}",
    )
    if val is None or val["rsum"] > state.best_rsum:
        if val is not None:
            state.best_rsum = val["rsum"]
        state.best_epoch = epoch + 1
        state.bad_epochs = 0
        with run.timer("write"):
            _save_weights(run.model, run.out, run.loaded.model_cfg)
    else:
        state.bad_epochs += 1
        if cfg.patience is not None and state.bad_epochs >= cfg.patience:
            state.stopped_early = True
            logger.info("early stop after epoch %d (best: epoch %s)", epoch + 1, state.best_epoch)
    state.epoch = epoch + 1
    state.batch = 0
    if state.epoch < cfg.epochs and not state.stopped_early:
        save(run, state)
