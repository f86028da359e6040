"""Fine-tune an open_clip model on a noisy image-caption dataset (the training side of L2RM).

:func:`finetune` (also ``pmpclean.finetune``) is the only training loop in pmpclean;
this module is named ``training`` so that ``pmpclean.finetune`` stays the function.
It reads a manifest (or the
output folder of ``pmpclean scan``), holds out a validation split, and trains the
open_clip model with a loss that respects what the audit learned:

* **Clean pairs** get the symmetric contrastive loss over the batch: InfoNCE, or, when
  a model trained from random initialisation audits itself, its noise-robust form
  RINCE (``robust_q``: each direction's loss is ``(1 - p^q) / q`` for the softmax
  probability ``p`` of the true partner, so a pair the model cannot fit, usually a
  mismatched one, pulls with weight ``p^q``; Chuang et al., "Robust Contrastive
  Learning against Noisy Views", CVPR 2022). The self-audit learns faster from the
  true pairs this way (``benchmarks/results/finetune.md``).
  Other rows of the same image, and rows with the identical caption text, are not
  used as negatives: they are not wrong answers.
* **Suspect pairs** (pairs the split flags as probably mismatched) do not get their
  given caption as a target. With ``suspect_targets="global"`` (the default with a scan
  folder or pretrained weights), at every
  split refresh :func:`pmpclean.rematching.rematch` solves one *partial*
  optimal-transport problem between all suspect images and all suspect captions of the
  dataset, with the cost learned from the clean pairs and the original pairing (and the
  image's other captions, and identical caption text) forbidden; from a scan folder the
  first split uses the scan's own proposals. A suspect whose proposal reaches
  ``rematch_min_confidence`` trains as the pair (its image, the proposed caption) with
  the clean loss weighted by the confidence; the others only serve as negatives. Each
  refresh also checks that the current model can rematch at all: clean rows of images
  with no suspect row (a quarter of the clean rows, at most 256), their captions
  deranged among themselves, are planted among the suspects; unless the 90 % lower
  confidence bound of the share of planted proposals that give the image its own
  caption back reaches ``rematch_min_confidence``, no proposal is trained on until the
  next refresh (``metrics.json``: ``planted_check``; an early model on a degenerate
  plan once proposed 245 confident, all wrong, pairs). With fewer than 8 such rows the
  proposals are used unchecked. The
  research code rematches inside a random batch of 128 instead, where a mismatched
  image's true caption is rarely present; ``suspect_targets="batch"`` (the default
  when a model trained from random initialisation audits itself: it proposes nothing
  confident for a long time, and in-batch targets still teach it) keeps that scheme:
  per batch, an entropic partial plan between the batch's suspect images and
  captions (mass ``ot_mass``, cost ``1 - s`` of the detached embeddings, the cost
  L2RM's within-batch cost network starts from and at the paper's learning rate
  practically keeps); a suspect whose transported mass reaches ``min_plan_mass`` of its
  marginal and whose target looks like a true pair (its plan-weighted similarity
  reaches the ``target_quantile`` quantile of the batch's clean-pair similarities) gets
  the normalised plan row (and column) as a soft target, matched to the model's
  in-batch distribution with a symmetric KL divergence (Han et al., "Learning to
  Rematch Mismatched Pairs for Robust Cross-Modal Retrieval", CVPR 2024). On the
  development setting of ``benchmarks/bench_finetune.py`` (3,000 drawings) with a good
  audit at 80 % noise the global scheme gave R-sum 294 against 243 in-batch, and at
  20-60 % it was within 6 points either way (once +15); there most suspects abstain
  (templated captions leave several equally good partners), so much of the gain is not
  forcing the in-batch targets (``benchmarks/results/finetune_n3000.md``).
* **The split** comes from the audit when the dataset is a ``pmpclean scan`` output
  (its ``is_mismatched`` column), otherwise from a two-component Gaussian mixture on
  the per-pair contrastive loss of the current model, after ``split_warmup_epochs``
  of plain training (from random initialisation: until the model beats chance on its
  training batches). It is refreshed every ``split_every`` epochs as the model improves.
  With an audit, every refreshed split averages the scan's ``match_score`` (weight
  ``audit_weight``) with the mixture's clean probability: a model that is still
  learning must not overrule the audit of a stronger model on its own (at 80 % noise
  from random initialisation its own split is barely better than chance; see
  ``benchmarks/results/finetune.md``).

``method="contrastive"`` skips the split and trains every pair with plain InfoNCE
(the baseline; also what you want on an already-cleaned manifest).

Output folder (``out_dir``)
---------------------------
``open_clip_pytorch_model.bin``
    The weights (a plain ``state_dict``), loadable with
    ``open_clip.create_model_and_transforms(MODEL, pretrained=PATH)`` when ``MODEL``
    is a registered architecture, and by ``pmpclean scan --model MODEL --pretrained PATH``.
    With validation it holds the best epoch by validation recall, else the last one.
``open_clip_config.json``
    ``{"model_cfg": ..., "preprocess_cfg": ...}``: with it the folder itself is a model,
    ``open_clip.create_model_and_transforms("local-dir:" + out_dir)``.
``model_config.json``
    The architecture alone (an open_clip model config: ``embed_dim``, ``vision_cfg``,
    ``text_cfg``), registrable with ``open_clip.add_model_config``.
``metrics.json``
    Image-to-text and text-to-image R@1/5/10 on the held-out split before and after
    training, the per-epoch history (losses, split size, validation recall, split
    quality when ground truth was given), settings, versions and timings.
``finetune_config.yaml``
    The resolved settings of the run.
``resume.pt``
    Everything needed to continue an interrupted run (weights, optimizer, scheduler,
    step, epoch, split, RNG state); removed at the end unless ``keep_resume=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ._utils import Timer, atomic_open, atomic_path, claim_output, resolve_device, to_jsonable
from .errors import ConfigError, DatasetError, ModelLoadError
from .transport import partial_ot_plan

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .data import Manifest

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "evaluate_retrieval",
    "retrieval_recall",
    "partial_ot_plan",
    "METHODS",
    "SCHEDULES",
    "PRECISIONS",
    "CHECKPOINT_NAME",
    "OPEN_CLIP_CONFIG_NAME",
    "MODEL_CONFIG_NAME",
    "METRICS_NAME",
    "SETTINGS_NAME",
    "RESUME_NAME",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: Training methods: ``l2rm`` (clean InfoNCE + soft targets from the partial-OT plan for
#: suspects) and ``contrastive`` (plain InfoNCE on every pair).
METHODS = ("l2rm", "contrastive")
#: Learning-rate decay after the linear warmup.
SCHEDULES = ("cosine", "linear", "constant")
#: ``auto`` = ``amp`` on CUDA, ``fp32`` elsewhere; ``amp``/``amp_bf16`` need a CUDA device.
PRECISIONS = ("auto", "fp32", "amp", "amp_bf16")

CHECKPOINT_NAME = "open_clip_pytorch_model.bin"
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
MODEL_CONFIG_NAME = "model_config.json"
METRICS_NAME = "metrics.json"
SETTINGS_NAME = "finetune_config.yaml"
RESUME_NAME = "resume.pt"
_OUTPUT_NAMES = (
    CHECKPOINT_NAME,
    OPEN_CLIP_CONFIG_NAME,
    MODEL_CONFIG_NAME,
    METRICS_NAME,
    SETTINGS_NAME,
    RESUME_NAME,
)
#: Settings that may differ between an interrupted run and its resumption.
_RESUME_FREE = frozenset(
    {"device", "workers", "checkpoint_every", "keep_resume", "resume", "overwrite", "cache_images"}
)
_AUDIT_FILES = ("audit.parquet", "audit.csv")
_STATE_ARRAYS = ("clean", "partner", "partner_weight")  # saved as tensors, not in state_json
_KS = (1, 5, 10)
_EPS = 1e-8
_BELOW_CHANCE = 0.95  # adaptive split warmup: start once the loss is 5% below chance
_ROBUST_Q_RANDOM_INIT = 0.3  # robust_q=None: l2rm from random init without a scan folder
_CACHE_LIMIT_BYTES = 1 << 30  # cache_images=None caches preprocessed images up to 1 GiB
_MAX_PLANTED = 256  # global rematch: clean rows planted as known mismatches to check it
_MIN_PLANTED = 8  # fewer qualifying clean rows: the proposals are used unchecked


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of :func:`finetune`. Precedence: CLI options > config file > these defaults.

    ``None`` means "choose from context"; the resolved values are written to
    ``finetune_config.yaml`` and ``metrics.json`` in the output folder.
    """

    # -- model -------------------------------------------------------------------------
    model: str = "ViT-B-32"  # open_clip architecture name (or local-dir:PATH, hf-hub:org/name)
    pretrained: str = "laion2b_s34b_b79k"  # start weights: open_clip tag, checkpoint file, "none"
    # -- data --------------------------------------------------------------------------
    image_col: str = "image"  # manifest column with the image path (ignored for a scan output)
    text_col: str = "caption"  # manifest column with the caption
    truth_col: str | None = None  # optional column: original row of each caption (pmpclean
    #   corrupt's true_row); enables per-epoch split precision/recall in metrics.json
    # -- method ------------------------------------------------------------------------
    method: str = "l2rm"  # l2rm | contrastive (plain InfoNCE on every pair)
    # -- optimisation --------------------------------------------------------------------
    epochs: int = 10  # passes over the training pairs
    batch_size: int = 128  # pairs per micro-batch (the in-batch negatives and OT plan)
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation);
    #   negatives and plans stay per micro-batch
    lr: float | None = None  # peak learning rate (None: 1e-5 from pretrained weights,
    #   1e-3 from random init)
    weight_decay: float = 0.1  # AdamW decay, not applied to gains, biases, logit_scale
    schedule: str = "cosine"  # cosine | linear | constant: decay after the warmup
    warmup_steps: int | None = None  # linear warmup, in optimizer steps (None: 5% of all)
    grad_clip: float | None = None  # clip the gradient norm to this (None: no clipping)
    lock_image: bool = False  # freeze the image tower (train the text tower only)
    lock_text: bool = False  # freeze the text tower (train the image tower only)
    precision: str = "auto"  # auto | fp32 | amp | amp_bf16 (mixed precision needs CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    workers: int = 0  # image-decoding worker processes (0: decode in the main process)
    cache_images: bool | None = None  # keep preprocessed images in RAM (None: if < 1 GiB)
    seed: int = 0  # seeds the validation split, data order and mixture fits (random init
    #   always uses pmpclean.embedding.RANDOM_SEED)
    # -- validation ----------------------------------------------------------------------
    val_fraction: float = 0.1  # fraction of images held out for validation (0: none); at
    #   least 2 when 8 remain for training, else none, with a warning (small datasets)
    val_dataset: str | None = None  # separate manifest to validate on (val_fraction unused)
    patience: int | None = None  # stop after this many epochs without a better validation
    #   R-sum (None: train all epochs); the best epoch's weights are the output
    # -- L2RM ----------------------------------------------------------------------------
    split_warmup_epochs: int | None = None  # plain-contrastive epochs before the first split
    #   (None: 0 with an audit or pretrained weights; from random init, until an epoch's
    #   mean training loss is 5% below its chance level, log(batch_size) for InfoNCE,
    #   (1 - batch_size^-q) / q for RINCE: before that the per-pair losses say nothing
    #   about the pairs)
    split_every: int = 1  # refresh the clean/suspect split every N epochs (0: never refresh)
    split_threshold: float = 0.5  # pairs with clean probability below this are suspects
    robust_q: float | None = None  # RINCE exponent of the clean pairs' contrastive loss, in
    #   [0, 1]: each direction's loss is (1 - p^q) / q with p the softmax probability of the
    #   true partner, so a pair's gradient is weighted by p^q and pairs the model cannot fit
    #   (mostly mismatched ones) pull less (Chuang et al., "Robust Contrastive Learning
    #   against Noisy Views", CVPR 2022); also during the split warmup. 0: InfoNCE.
    #   None: 0.3 for method l2rm from random initialisation on a manifest (the model
    #   audits itself), else 0: with a scan folder's split from the first epoch, RINCE's
    #   weaker pull early on leaves the suspects' soft targets in charge and hurts
    #   (benchmarks/results/finetune.md)
    suspect_targets: str | None = None  # global | batch: where a suspect's new partner comes
    #   from. global: at every split refresh, the dataset-scale partial OT of
    #   pmpclean.rematching over all suspects (learned cost, original pairing forbidden;
    #   with a scan folder, the scan's own proposals at the first split); a suspect whose
    #   proposal reaches rematch_min_confidence trains as a pair with the proposed caption,
    #   weighted by the confidence, and the others only serve as negatives. batch: L2RM's
    #   in-batch plan as soft targets (the research code's scheme: a random batch rarely
    #   holds a suspect's true partner). None: batch for method l2rm from random
    #   initialisation on a manifest (a model that audits itself from scratch proposes
    #   nothing confident, while in-batch targets still teach it; development runs in
    #   benchmarks/results/finetune_n3000.md), else global
    rematch_min_confidence: float = 0.6  # global: proposals below this are not trained on
    ot_mass: float = 0.5  # batch: fraction of the batch's suspect mass the plan moves, (0, 1]
    ot_reg: float = 0.05  # entropic regularisation of the plan (cost = cosine distance)
    min_plan_mass: float = 0.1  # suspects receiving less than this fraction of their
    #   marginal get no target (they contribute nothing)
    noisy_weight: float = 1.0  # weight of the suspects' soft-target loss (0: drop suspects)
    target_quantile: float | None = 0.25  # a suspect gets its plan target only when the
    #   target is at least as similar (plan-weighted cosine) as this quantile of the batch's
    #   clean pairs: the clean pairs calibrate what a true pair looks like (L2RM's "key
    #   points"); None: every suspect with enough transported mass gets its target
    audit_weight: float = 0.5  # with a scan folder: weight of the scan's match_score in every
    #   refreshed split, averaged with the loss mixture's clean probability (0: the model's
    #   own losses only after the first epoch; 1: keep the scan's split throughout)
    # -- output and resumption ---------------------------------------------------------------
    checkpoint_every: int | None = None  # also save resume.pt every N optimizer steps
    #   (None: at the end of every epoch only)
    keep_resume: bool = False  # keep resume.pt after a successful run
    resume: bool = False  # continue the interrupted run in out_dir from resume.pt
    overwrite: bool = False  # replace an earlier run in out_dir

    def replace(self, **changes: Any) -> FinetuneConfig:
        """Return a copy with ``changes`` applied (unknown names raise :class:`ConfigError`)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)


def _check_names(options: dict[str, Any]) -> None:
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"Unknown finetune setting(s) {', '.join(unknown)}; "
            f"known settings: {', '.join(sorted(known))}."
        )


def _validate(cfg: FinetuneConfig) -> None:
    """Check every setting once, naming the setting, the constraint and the fix."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    if cfg.method not in METHODS:
        raise ConfigError(f"Unknown method {cfg.method!r}: expected one of {', '.join(METHODS)}.")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(
            f"Unknown schedule {cfg.schedule!r}: expected one of {', '.join(SCHEDULES)}."
        )
    if cfg.precision not in PRECISIONS:
        raise ConfigError(
            f"Unknown precision {cfg.precision!r}: expected one of {', '.join(PRECISIONS)}."
        )

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return (
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
        )

    need(
        is_int(cfg.epochs) and cfg.epochs >= 1,
        f"epochs must be an integer >= 1, got {cfg.epochs!r}.",
    )
    need(
        is_int(cfg.batch_size) and cfg.batch_size >= 2,
        f"batch_size must be an integer >= 2 (contrastive training needs negatives), "
        f"got {cfg.batch_size!r}.",
    )
    need(
        is_int(cfg.accum_steps) and cfg.accum_steps >= 1,
        f"accum_steps must be an integer >= 1, got {cfg.accum_steps!r}.",
    )
    need(
        cfg.lr is None or (is_num(cfg.lr) and cfg.lr > 0),
        f"lr must be a positive number (or None for the default), got {cfg.lr!r}.",
    )
    need(
        is_num(cfg.weight_decay) and cfg.weight_decay >= 0,
        f"weight_decay must be >= 0, got {cfg.weight_decay!r}.",
    )
    need(
        cfg.warmup_steps is None or (is_int(cfg.warmup_steps) and cfg.warmup_steps >= 0),
        f"warmup_steps must be an integer >= 0 (or None for 5% of all steps), "
        f"got {cfg.warmup_steps!r}.",
    )
    need(
        cfg.grad_clip is None or (is_num(cfg.grad_clip) and cfg.grad_clip > 0),
        f"grad_clip must be a positive number or None, got {cfg.grad_clip!r}.",
    )
    need(
        not (cfg.lock_image and cfg.lock_text),
        "lock_image and lock_text are both set, which leaves nothing to train; "
        "lock at most one tower.",
    )
    need(
        is_int(cfg.workers) and cfg.workers >= 0,
        f"workers must be an integer >= 0, got {cfg.workers!r}.",
    )
    need(is_int(cfg.seed), f"seed must be an integer, got {cfg.seed!r}.")
    need(
        is_num(cfg.val_fraction) and 0 <= cfg.val_fraction <= 0.5,
        f"val_fraction must be in [0, 0.5] (fraction of images held out), "
        f"got {cfg.val_fraction!r}.",
    )
    need(
        cfg.patience is None or (is_int(cfg.patience) and cfg.patience >= 1),
        f"patience must be an integer >= 1 or None, got {cfg.patience!r}.",
    )
    need(
        cfg.patience is None or cfg.val_fraction > 0 or cfg.val_dataset is not None,
        "patience (early stopping) needs a validation split: set val_fraction > 0 or val_dataset.",
    )
    need(
        cfg.split_warmup_epochs is None
        or (is_int(cfg.split_warmup_epochs) and cfg.split_warmup_epochs >= 0),
        f"split_warmup_epochs must be an integer >= 0 or None, got {cfg.split_warmup_epochs!r}.",
    )
    need(
        is_int(cfg.split_every) and cfg.split_every >= 0,
        f"split_every must be an integer >= 0 (0: never refresh), got {cfg.split_every!r}.",
    )
    need(
        is_num(cfg.split_threshold) and 0 < cfg.split_threshold < 1,
        f"split_threshold must be in (0, 1), got {cfg.split_threshold!r}.",
    )
    need(
        cfg.robust_q is None or (is_num(cfg.robust_q) and 0 <= cfg.robust_q <= 1),
        f"robust_q must be in [0, 1] (0: InfoNCE, 1: the most noise-robust RINCE) or None "
        f"for the default, got {cfg.robust_q!r}.",
    )
    need(
        is_num(cfg.ot_mass) and 0 < cfg.ot_mass <= 1,
        f"ot_mass must be in (0, 1] (fraction of suspect mass transported), got {cfg.ot_mass!r}.",
    )
    need(is_num(cfg.ot_reg) and cfg.ot_reg > 0, f"ot_reg must be > 0, got {cfg.ot_reg!r}.")
    need(
        is_num(cfg.min_plan_mass) and 0 <= cfg.min_plan_mass < 1,
        f"min_plan_mass must be in [0, 1), got {cfg.min_plan_mass!r}.",
    )
    need(
        cfg.suspect_targets in (None, "global", "batch"),
        f"suspect_targets must be 'global', 'batch' or None, got {cfg.suspect_targets!r}.",
    )
    need(
        is_num(cfg.rematch_min_confidence) and 0 <= cfg.rematch_min_confidence <= 1,
        f"rematch_min_confidence must be in [0, 1], got {cfg.rematch_min_confidence!r}.",
    )
    need(
        is_num(cfg.noisy_weight) and cfg.noisy_weight >= 0,
        f"noisy_weight must be >= 0, got {cfg.noisy_weight!r}.",
    )
    need(
        cfg.target_quantile is None
        or (is_num(cfg.target_quantile) and 0 <= cfg.target_quantile <= 1),
        f"target_quantile must be in [0, 1] or None, got {cfg.target_quantile!r}.",
    )
    need(
        is_num(cfg.audit_weight) and 0 <= cfg.audit_weight <= 1,
        f"audit_weight must be in [0, 1] (weight of the scan's match_score in refreshed "
        f"splits), got {cfg.audit_weight!r}.",
    )
    need(
        cfg.checkpoint_every is None
        or (is_int(cfg.checkpoint_every) and cfg.checkpoint_every >= 1),
        f"checkpoint_every must be an integer >= 1 or None, got {cfg.checkpoint_every!r}.",
    )
    need(
        not (cfg.resume and cfg.overwrite),
        "resume and overwrite are both set; pass resume to continue the run in the output "
        "folder or overwrite to start over, not both.",
    )


# --------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------- metrics


def retrieval_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    image_group: np.ndarray,
    *,
    ks: tuple[int, ...] = _KS,
) -> dict[str, Any]:
    """Image-to-text and text-to-image recall@k of row-aligned pairs.

    Parameters
    ----------
    image_emb : ndarray, shape (n, d)
        Image embedding of each row (rows showing the same image repeat it), L2-normalised.
    text_emb : ndarray, shape (n, d)
        Caption embedding of each row, L2-normalised.
    image_group : ndarray, shape (n,)
        Rows showing the same image share a value.
    ks : tuple of int
        Cut-offs.

    Returns
    -------
    dict
        ``{"image_to_text": {"R@1": .., ...}, "text_to_image": {...}, "rsum": ..,
        "n_images": m, "n_captions": n}``. Recalls are in [0, 100] (percent), higher is
        better. Image-to-text: an image is a hit when any of its captions ranks in the
        top k among all n captions; text-to-image: a caption is a hit when its image
        ranks in the top k among the m unique images (the COCO/Flickr protocol).
        Ties count against the query.
    """
    img = np.asarray(image_emb, dtype=np.float32)
    txt = np.asarray(text_emb, dtype=np.float32)
    groups = np.asarray(image_group)
    n = img.shape[0]
    if txt.shape[0] != n or groups.shape[0] != n or img.ndim != 2 or txt.ndim != 2:
        raise ValueError(
            f"image_emb (n, d), text_emb (n, d) and image_group (n,) must be row-aligned, got "
            f"{img.shape}, {txt.shape}, {groups.shape}."
        )
    if n == 0:
        raise ValueError("retrieval_recall needs at least one pair.")
    _, first, codes = np.unique(groups, return_index=True, return_inverse=True)
    codes = codes.ravel()
    gallery = img[first]  # (m, d) one row per unique image
    m = gallery.shape[0]
    i2t_rank = np.empty(m, dtype=np.int64)
    t2i_rank = np.empty(n, dtype=np.int64)
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, m, chunk):
        sims = gallery[start : start + chunk] @ txt.T  # (c, n)
        own = codes[None, :] == np.arange(start, start + sims.shape[0])[:, None]
        best_own = np.where(own, sims, -np.inf).max(axis=1)
        i2t_rank[start : start + sims.shape[0]] = (
            np.where(own, -np.inf, sims) >= best_own[:, None]
        ).sum(1)
    chunk = max(1, 2_000_000 // max(m, 1))
    for start in range(0, n, chunk):
        sims = txt[start : start + chunk] @ gallery.T  # (c, m)
        c = sims.shape[0]
        own_sim = sims[np.arange(c), codes[start : start + c]]
        t2i_rank[start : start + c] = (sims >= own_sim[:, None]).sum(1) - 1
    out: dict[str, Any] = {"image_to_text": {}, "text_to_image": {}}
    for k in ks:
        out["image_to_text"][f"R@{k}"] = float(100.0 * np.mean(i2t_rank < k))
        out["text_to_image"][f"R@{k}"] = float(100.0 * np.mean(t2i_rank < k))
    out["rsum"] = float(sum(out["image_to_text"].values()) + sum(out["text_to_image"].values()))
    out["n_images"] = int(m)
    out["n_captions"] = int(n)
    return out


# --------------------------------------------------------------------------- data


@dataclass
class _Data:
    """Usable rows of the dataset, with everything the loop needs per row."""

    source: str
    paths: list[str]  # unique image paths
    image_index: np.ndarray  # (n,) int64 index into paths
    captions: list[str]  # (n,)
    text_group: np.ndarray  # (n,) int64, identical caption text shares a value
    rows: np.ndarray  # (n,) input row numbers
    audit_clean: np.ndarray | None  # (n,) bool from a scan's is_mismatched, or None
    audit_prob: np.ndarray | None  # (n,) float in [0, 1]: the scan's match_score (its flag
    #   as 0/1 where missing), or None
    true_mismatch: np.ndarray | None  # (n,) bool from truth_col, or None
    n_input: int
    n_unusable: int
    audit_partner: np.ndarray | None = None  # (n,) int64 input row whose caption the scan
    #   proposed for this row's image (-1: none), or None
    audit_confidence: np.ndarray | None = None  # (n,) float: the scan's rematch_confidence
    image_ref: np.ndarray | None = None  # (n,) manifest image id of the row (with truth_col)
    true_ref: np.ndarray | None = None  # (n,) manifest image id of the caption's true row


def _read_dataset(dataset: Any, cfg: FinetuneConfig, *, what: str = "dataset") -> _Data:
    """Read a manifest, a scan output folder or an audit table into its usable rows.

    The truth column is read for the training ``dataset`` only.
    """
    from .data import read_manifest, read_table

    with_truth = what == "dataset"

    image_col = cfg.image_col
    audit = False
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        if path.is_dir():
            found = [path / name for name in _AUDIT_FILES if (path / name).is_file()]
            if not found:
                raise DatasetError(
                    f"{what} {path} is a folder without {' or '.join(_AUDIT_FILES)}; pass a "
                    "manifest file (CSV, Parquet, ...) or the output folder of `pmpclean scan`."
                )
            path = found[0]
        if not path.exists():
            raise DatasetError(
                f"{what} {path} does not exist; pass a manifest file or a scan folder."
            )
        frame = read_table(path)
        source = str(path.resolve())
        root = path.resolve().parent
    elif isinstance(dataset, pd.DataFrame):
        frame = dataset.reset_index(drop=True)
        source = "<DataFrame>"
        root = Path.cwd()
    elif hasattr(dataset, "frame") and hasattr(dataset, "image_refs"):  # a data.Manifest
        name = str(getattr(dataset, "path", None) or "<Manifest>")
        return _from_manifest(dataset, cfg, source=name, with_truth=with_truth)
    else:
        raise TypeError(
            f"{what} must be a path, a pandas DataFrame or a pmpclean Manifest, "
            f"not {type(dataset).__name__}."
        )
    if "is_mismatched" in frame.columns and "image_path" in frame.columns:
        audit = True
        image_col = "image_path"  # a scan's resolved paths (or ids, with precomputed embeddings)
        if isinstance(dataset, (str, Path)):
            root = _scanned_manifest_folder(Path(source).parent) or root
    manifest = read_manifest(frame, image_col=image_col, text_col=cfg.text_col, root=root)
    data = _from_manifest(manifest, cfg, source=source, with_truth=with_truth)
    if audit:
        flags = frame["is_mismatched"].to_numpy()[data.rows]
        data.audit_clean = ~np.asarray(
            [str(v).strip().lower() in ("true", "1", "1.0") for v in flags], dtype=bool
        )
        prob = data.audit_clean.astype(np.float64)
        if "match_score" in frame.columns:
            score = pd.to_numeric(frame["match_score"], errors="coerce").to_numpy()[data.rows]
            ok = np.isfinite(score) & (score >= 0) & (score <= 1)
            prob[ok] = score[ok]
        data.audit_prob = prob
        if "proposed_row" in frame.columns and "rematch_confidence" in frame.columns:
            partner = pd.to_numeric(frame["proposed_row"], errors="coerce").to_numpy()[data.rows]
            conf = pd.to_numeric(frame["rematch_confidence"], errors="coerce").to_numpy()[data.rows]
            proposed = np.isfinite(partner) & (partner >= 0)
            usable = (
                proposed
                & (partner == np.floor(np.nan_to_num(partner)))
                & (partner < len(frame))
                & np.isfinite(conf)
                & (conf >= 0)
                & (conf <= 1)
            )
            given = frame["proposed_row"].notna().to_numpy()[data.rows]
            abstained = np.isfinite(partner) & (partner < 0)
            bad = np.flatnonzero(given & ~abstained & ~usable)
            if bad.size:
                first = int(data.rows[bad[0]])
                warnings.warn(
                    f"{source}: {bad.size} row(s) have a proposed_row that is not a row "
                    f"number of the table or a rematch_confidence outside [0, 1] (first: row "
                    f"{first}: proposed_row={frame['proposed_row'].iloc[first]!r}, "
                    "rematch_confidence="
                    f"{frame['rematch_confidence'].iloc[first]!r}); they are kept and train "
                    "with no proposal. Rerun `pmpclean scan` to regenerate the audit table.",
                    stacklevel=4,
                )
            data.audit_partner = np.where(usable, np.nan_to_num(partner), -1).astype(np.int64)
            data.audit_confidence = np.where(usable, np.nan_to_num(conf), 0.0)
    return data


def _scanned_manifest_folder(scan_dir: Path) -> Path | None:
    """Folder of the manifest a scan audited (from its summary.json), if recorded."""
    summary = scan_dir / "summary.json"
    if not summary.is_file():
        return None
    try:
        manifest = json.loads(summary.read_text(encoding="utf-8")).get("manifest")
    except (OSError, ValueError):
        return None
    return Path(manifest).parent if manifest else None


def _from_manifest(
    manifest: Manifest, cfg: FinetuneConfig, *, source: str, with_truth: bool = True
) -> _Data:
    ok = np.flatnonzero(manifest.ok)
    if ok.size == 0:
        raise DatasetError(
            f"{source}: no usable (image, caption) row; every row has a problem status "
            f"({manifest.status_counts()}). Fix the image paths or captions first."
        )
    img_idx = np.asarray(manifest.image_index)[ok]
    uniq, inv = np.unique(img_idx, return_inverse=True)
    paths = [str(manifest.unique_images[int(u)]) for u in uniq]
    captions = [str(c) for c in np.asarray(manifest.captions)[ok]]
    text_group = pd.factorize(pd.Series(captions))[0].astype(np.int64)
    true_mis = None
    if cfg.truth_col is not None and with_truth:
        if cfg.truth_col not in manifest.frame.columns:
            raise DatasetError(
                f"{source}: truth column {cfg.truth_col!r} not found; columns are "
                f"{', '.join(map(str, manifest.frame.columns))}. Pass the right truth_col or none."
            )
        true_row = pd.to_numeric(manifest.frame[cfg.truth_col], errors="coerce").to_numpy()
        if np.isnan(true_row[ok]).any():
            raise DatasetError(
                f"{source}: truth column {cfg.truth_col!r} has empty or non-integer values; "
                "it must hold the original row number of every caption."
            )
        all_idx = np.asarray(manifest.image_index)
        tr = true_row[ok].astype(np.int64)
        if tr.min() < 0 or tr.max() >= len(all_idx):
            raise DatasetError(
                f"{source}: truth column {cfg.truth_col!r} holds row numbers outside "
                f"0..{len(all_idx) - 1}."
            )
        true_mis = all_idx[tr] != all_idx[ok]
        image_ref, true_ref = all_idx[ok].astype(np.int64), all_idx[tr].astype(np.int64)
    else:
        image_ref = true_ref = None
    return _Data(
        source=source,
        paths=paths,
        image_index=inv.astype(np.int64).ravel(),
        captions=captions,
        text_group=text_group,
        rows=ok.astype(np.int64),
        audit_clean=None,
        audit_prob=None,
        true_mismatch=true_mis,
        n_input=len(manifest),
        n_unusable=int(len(manifest) - ok.size),
        image_ref=image_ref,
        true_ref=true_ref,
    )


def _subset(data: _Data, rows: np.ndarray) -> _Data:
    """Rows ``rows`` (positions into data) as a standalone _Data with compact image ids."""
    uniq, inv = np.unique(data.image_index[rows], return_inverse=True)
    return _Data(
        source=data.source,
        paths=[data.paths[int(u)] for u in uniq],
        image_index=inv.astype(np.int64).ravel(),
        captions=[data.captions[int(r)] for r in rows],
        text_group=pd.factorize(pd.Series(data.text_group[rows]))[0].astype(np.int64),
        rows=data.rows[rows],
        audit_clean=None if data.audit_clean is None else data.audit_clean[rows],
        audit_prob=None if data.audit_prob is None else data.audit_prob[rows],
        true_mismatch=None if data.true_mismatch is None else data.true_mismatch[rows],
        n_input=data.n_input,
        n_unusable=data.n_unusable,
        audit_partner=None if data.audit_partner is None else data.audit_partner[rows],
        audit_confidence=None if data.audit_confidence is None else data.audit_confidence[rows],
        image_ref=None if data.image_ref is None else data.image_ref[rows],
        true_ref=None if data.true_ref is None else data.true_ref[rows],
    )


#: Fewest images validation measures recall on (with one, every recall is 1).
_MIN_VAL_IMAGES = 2
#: Fewest images left for training before ``val_fraction`` is raised to hold out
#: :data:`_MIN_VAL_IMAGES`. From 8 on, the two held-out images cost at most a fifth of
#: the data (2 of 10); below, validation would take more than that from a dataset too
#: small to spare it, to rank captions among 2 images, where R@1 is right half the time
#: by chance: too noisy to pick an epoch by. Such a dataset trains without validation.
_MIN_TRAIN_IMAGES = 8


@dataclass(frozen=True)
class _Holdout:
    """The validation split: row positions, and what it held out and why."""

    train: np.ndarray  # (n_train,) row positions
    val: np.ndarray  # (n_val,) row positions, empty without validation
    source: str | None  # how the validation images were chosen (None: no validation)
    skipped: str | None  # why val_fraction > 0 gave no validation (None: it did not)


def _split_holdout(data: _Data, fraction: float, seed: int) -> _Holdout:
    """Hold out ``round(fraction * images)`` images for validation, with their rows.

    All rows of an image stay together. When that is fewer than 2 images (a small first
    sample), 2 are held out if at least 8 remain for training (see
    :data:`_MIN_TRAIN_IMAGES`); otherwise the dataset trains without validation and
    ``skipped`` says why.
    """
    n_img = len(data.paths)
    rows = np.arange(len(data.image_index))
    if fraction <= 0:
        return _Holdout(rows, rows[:0], None, None)
    n_val = int(round(fraction * n_img))
    source = f"held out {n_val} of {n_img} images (val_fraction {fraction:g}, seed {seed})"
    if n_val < _MIN_VAL_IMAGES:
        if n_img - _MIN_VAL_IMAGES < _MIN_TRAIN_IMAGES:
            return _Holdout(
                rows,
                rows[:0],
                None,
                f"val_fraction={fraction:g} holds out {n_val} of {n_img} images, and holding "
                f"out {_MIN_VAL_IMAGES} (the fewest validation can rank) would leave fewer "
                f"than {_MIN_TRAIN_IMAGES} for training: training on all {n_img} images "
                "without validation, and the last epoch is saved. Pass val_dataset to "
                "validate on other data.",
            )
        source = (
            f"held out {_MIN_VAL_IMAGES} of {n_img} images (val_fraction {fraction:g} gives "
            f"{n_val}; validation needs {_MIN_VAL_IMAGES}; seed {seed})"
        )
        n_val = _MIN_VAL_IMAGES
    if n_img - n_val < 2:
        raise ConfigError(
            f"Only {n_img - n_val} training image(s) left after holding out {n_val}; "
            "lower val_fraction or add data."
        )
    rng = np.random.default_rng([seed, 1])
    val_imgs = np.zeros(n_img, dtype=bool)
    val_imgs[rng.permutation(n_img)[:n_val]] = True
    is_val = val_imgs[data.image_index]
    return _Holdout(np.flatnonzero(~is_val), np.flatnonzero(is_val), source, None)


# --------------------------------------------------------------------------- images


class _ImageRows:
    """Map-style dataset: row position -> preprocessed image tensor (for a DataLoader)."""

    def __init__(self, paths: list[str], image_index: np.ndarray, preprocess: Any) -> None:
        self.paths = paths
        self.image_index = image_index
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, row: int) -> Any:
        from .data import open_image

        return self.preprocess(open_image(self.paths[int(self.image_index[row])]))


class _Images:
    """Preprocessed images of one _Data, cached in RAM or decoded per batch."""

    def __init__(self, data: _Data, preprocess: Any, *, cache: bool | None, workers: int) -> None:
        self.data = data
        self.preprocess = preprocess
        self.workers = workers
        self.cache: torch.Tensor | None = None
        self._want_cache = cache

    def prepare(self, progress: Progress | None) -> list[int]:
        """Decode every image once (cached) or check it (streamed); return unusable image ids."""
        import torch

        from .data import check_image

        paths = self.data.paths
        bad: list[int] = []
        kept: dict[int, torch.Tensor] = {}
        cache = self._want_cache
        for i, path in enumerate(paths):
            if cache is False:
                if check_image(path) != "ok":
                    bad.append(i)
            else:
                tensor = self._decode(path)
                if tensor is None:
                    bad.append(i)
                else:
                    if cache is None:  # decide from the first image: cache when all fit
                        need = tensor.numel() * tensor.element_size() * len(paths)
                        cache = need <= _CACHE_LIMIT_BYTES
                    if cache:
                        kept[i] = tensor
                    else:
                        kept.clear()  # images so far decoded fine; stream from now on
            if progress is not None and (i % 256 == 255 or i == len(paths) - 1):
                progress("loading images", i + 1, len(paths))
        if cache and kept:
            fill = torch.zeros_like(next(iter(kept.values())))
            self.cache = torch.stack([kept.get(i, fill) for i in range(len(paths))])
        return bad

    def _decode(self, path: str) -> torch.Tensor | None:
        from .data import decode_image

        image = decode_image(path)[1]
        if image is None:
            return None
        try:
            return self.preprocess(image)
        except Exception:  # noqa: BLE001 - e.g. degenerate sizes: the image is unusable
            return None

    def batches(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (row positions, images (b, 3, H, W)) for each batch of row positions."""
        import torch

        if self.cache is not None:
            for rows in batches:
                yield rows, self.cache[torch.as_tensor(self.data.image_index[rows])]
            return
        loader = torch.utils.data.DataLoader(
            _ImageRows(self.data.paths, self.data.image_index, self.preprocess),
            batch_sampler=[list(map(int, b)) for b in batches],
            num_workers=self.workers,
        )
        for rows, imgs in zip(batches, loader, strict=True):
            yield rows, imgs


# --------------------------------------------------------------------------- model


@dataclass
class _Model:
    model: Any
    preprocess: Any
    tokenizer: Any
    model_name: str
    model_cfg: dict[str, Any]
    random_init: bool


def _load_model(cfg: FinetuneConfig, device: str) -> _Model:
    """Load through :func:`pmpclean.embedding.load_model` (one door to open_clip), in fp32."""
    import open_clip

    from .embedding import load_model

    random_init = str(cfg.pretrained).strip().lower() in ("none", "random", "")
    with warnings.catch_warnings():
        if random_init:  # training from scratch is the point here, not a smoke test
            warnings.filterwarnings("ignore", message=".*has RANDOM weights.*")
        loaded = load_model(cfg.model, cfg.pretrained, device=device, precision="fp32")
    model_cfg = open_clip.get_model_config(loaded.model_name)
    if model_cfg is None:
        raise ModelLoadError(
            f"Cannot find the architecture config of model {loaded.model_name!r} to save next "
            "to the fine-tuned weights; use a name from open_clip.list_models() or local-dir:PATH."
        )
    return _Model(
        model=loaded.model,
        preprocess=loaded.preprocess,
        tokenizer=loaded.tokenizer,
        model_name=loaded.model_name,
        model_cfg=model_cfg,
        random_init=random_init,
    )


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as open_clip trains: no decay on gains, biases and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def _adamw(params: list[dict[str, Any]], lr: float) -> Any:
    """AdamW as open_clip trains CLIP; the fused kernel when the device supports it."""
    import torch

    try:  # fused: one kernel per step, much faster on CPU for the large token embedding
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class _Encoded:
    image: np.ndarray  # (n, d) row-aligned, L2-normalised
    text: np.ndarray  # (n, d)
    logit_scale: float


def _encode(
    model: Any,
    images: _Images,
    tokens: torch.Tensor,
    *,
    device: str,
    batch_size: int,
    autocast: Any,
    progress: Progress | None,
    stage: str,
) -> _Encoded:
    """Embed every unique image and caption of a _Data in eval mode; row-aligned output."""
    import torch

    data = images.data
    was_training = model.training
    model.eval()
    n_img = len(data.paths)
    _, first_row = np.unique(data.image_index, return_index=True)  # one row per image
    img_batches = [first_row[i : i + batch_size] for i in range(0, n_img, batch_size)]
    total = len(img_batches) + math.ceil(len(tokens) / batch_size)
    done = 0
    img_parts, txt_parts = [], []
    with torch.no_grad():
        for _, imgs in images.batches(img_batches):
            with autocast():
                feats = model.encode_image(imgs.to(device), normalize=True)
            img_parts.append(feats.float().cpu())
            done += 1
            if progress is not None:
                progress(stage, done, total)
        for start in range(0, len(tokens), batch_size):
            with autocast():
                feats = model.encode_text(
                    tokens[start : start + batch_size].to(device), normalize=True
                )
            txt_parts.append(feats.float().cpu())
            done += 1
            if progress is not None:
                progress(stage, done, total)
        scale = float(model.logit_scale.exp().item())
    model.train(was_training)
    uimg = torch.cat(img_parts).numpy()
    return _Encoded(
        image=np.ascontiguousarray(uimg[data.image_index]),
        text=np.ascontiguousarray(torch.cat(txt_parts).numpy()),
        logit_scale=scale,
    )


# --------------------------------------------------------------------------- split


def _per_pair_loss(
    enc: _Encoded,
    image_group: np.ndarray,
    text_group: np.ndarray,
    *,
    seed: int,
    n_negatives: int = 4096,
) -> np.ndarray:
    """Symmetric InfoNCE loss of every pair against up to ``n_negatives`` other rows, (n,)."""
    import torch

    n = enc.image.shape[0]
    img = torch.from_numpy(enc.image)
    txt = torch.from_numpy(enc.text)
    if n <= n_negatives:
        neg = torch.arange(n)
    else:
        neg = torch.from_numpy(
            np.sort(np.random.default_rng([seed, 2]).choice(n, n_negatives, replace=False))
        )
    ig = torch.from_numpy(image_group)
    tg = torch.from_numpy(text_group)
    s = enc.logit_scale
    pos = s * (img * txt).sum(1)
    loss = torch.empty(n, dtype=torch.float32)
    step = max(1, 4_000_000 // max(1, neg.numel()))
    for a in range(0, n, step):
        b = min(n, a + step)
        same = (ig[a:b, None] == ig[None, neg]) | (tg[a:b, None] == tg[None, neg])
        li = (s * img[a:b] @ txt[neg].T).masked_fill(same, -math.inf)
        lt = (s * txt[a:b] @ img[neg].T).masked_fill(same, -math.inf)
        p = pos[a:b, None]
        loss_i = torch.logsumexp(torch.cat([p, li], 1), 1) - pos[a:b]
        loss_t = torch.logsumexp(torch.cat([p, lt], 1), 1) - pos[a:b]
        loss[a:b] = 0.5 * (loss_i + loss_t)
    return loss.numpy().astype(np.float64)


def _gmm_clean_probability(loss: np.ndarray, *, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Posterior of the low-loss component of a 2-component GMM on the per-pair loss."""
    from sklearn.mixture import GaussianMixture

    lo, hi = float(loss.min()), float(loss.max())
    if hi - lo < 1e-12 or loss.size < 4:
        return np.ones_like(loss), {"weights": None, "means": None, "degenerate": True}
    x = ((loss - lo) / (hi - lo)).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=100, tol=1e-3, reg_covar=5e-4, random_state=seed)
    gmm.fit(x)
    clean = int(np.argmin(gmm.means_.ravel()))
    prob = gmm.predict_proba(x)[:, clean]
    info = {
        "weights": [float(w) for w in gmm.weights_],
        "means": [float(lo + m * (hi - lo)) for m in gmm.means_.ravel()],
        "stds": [float(math.sqrt(v) * (hi - lo)) for v in gmm.covariances_.ravel()],
        "clean_component": clean,
        "degenerate": False,
    }
    return prob, info


# --------------------------------------------------------------------------- losses


def _chance_loss(b: int, q: float) -> float:
    """Clean-pair loss of a batch of ``b`` pairs at chance (every partner equally likely).

    ``log b`` for InfoNCE (``q = 0``), ``(1 - b ** -q) / q`` for RINCE.
    """
    return math.log(b) if q == 0 else (1.0 - b ** (-q)) / q


def _batch_loss(
    img_f: torch.Tensor,
    txt_f: torch.Tensor,
    scale: torch.Tensor,
    clean: torch.Tensor,
    image_group: torch.Tensor,
    text_group: torch.Tensor,
    cfg: FinetuneConfig,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean per-row loss of one micro-batch: InfoNCE for clean rows, soft targets for suspects.

    ``weight`` (b,) scales each clean row's loss (a rematched pair's confidence); with
    ``cfg.suspect_targets == "global"`` suspects get no in-batch target (their rematches
    arrive as clean rows), they only serve as negatives.
    """
    import torch
    import torch.nn.functional as F

    b = img_f.shape[0]
    logits = scale * img_f @ txt_f.T  # (b, b) image rows x caption columns
    same = (image_group[:, None] == image_group[None, :]) | (
        text_group[:, None] == text_group[None, :]
    )
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    masked = logits.masked_fill(
        same & ~eye, -math.inf
    )  # other captions of the image are no negatives
    ce_i2t = -torch.diagonal(F.log_softmax(masked, dim=1))
    ce_t2i = -torch.diagonal(F.log_softmax(masked, dim=0))
    infonce = 0.5 * (ce_i2t + ce_t2i)
    if cfg.robust_q:
        q = cfg.robust_q
        # (1 - p^q) / q per direction, p = exp(-ce); expm1 keeps small q exact
        clean_loss = -0.5 * (torch.expm1(-q * ce_i2t) + torch.expm1(-q * ce_t2i)) / q
    else:
        clean_loss = infonce
    if weight is not None:
        clean_loss = clean_loss * weight
    total = clean_loss[clean].sum()
    stats = {
        "clean_rows": float(clean.sum()),
        "clean_loss": float(clean_loss[clean].sum().detach()),
        "infonce": float(infonce.sum().detach()),
    }
    stats.update({"noisy_rows": 0.0, "noisy_targets": 0.0, "noisy_loss": 0.0})

    noisy = torch.nonzero(~clean).ravel()
    k = noisy.numel()
    stats["noisy_rows"] = float(k)
    if k >= 2 and cfg.noisy_weight > 0 and cfg.suspect_targets == "batch":
        forbid = same[noisy][:, noisy]
        with torch.no_grad():
            cost = 1.0 - img_f[noisy].detach().float() @ txt_f[noisy].detach().float().T
            plan = partial_ot_plan(cost, mass=cfg.ot_mass, reg=cfg.ot_reg, forbid=forbid)
        sub = logits[noisy][:, noisy].float()
        kl_sum = sub.new_zeros(())
        n_targets = 0
        tau = None
        if cfg.target_quantile is not None:
            # a target must look like a true pair: its plan-weighted similarity has to
            # reach this quantile of the batch's clean-pair similarities
            with torch.no_grad():
                clean_sim = (img_f[clean] * txt_f[clean]).sum(1).detach().float()
            tau = (
                float(torch.quantile(clean_sim, cfg.target_quantile))
                if clean_sim.numel()
                else math.inf
            )
        for lg, p_plan, c_dir in ((sub, plan, cost), (sub.T, plan.T, cost.T)):
            frac = p_plan.sum(dim=1) * k  # fraction of each row's marginal transported
            keep = frac >= max(cfg.min_plan_mass, 1e-6)
            if tau is not None and bool(keep.any()):
                q_all = p_plan / p_plan.sum(dim=1, keepdim=True).clamp_min(1e-30)
                keep = keep & ((q_all * (1.0 - c_dir)).sum(1) >= tau)
            if not bool(keep.any()):
                continue
            q = p_plan[keep] / p_plan[keep].sum(dim=1, keepdim=True)
            log_p = F.log_softmax(lg[keep], dim=1)
            log_q = torch.log(q.clamp_min(_EPS))
            p = log_p.exp()
            sym_kl = (q * (log_q - log_p)).sum(1) + (p * (log_p - log_q)).sum(1)
            kl_sum = kl_sum + 0.5 * sym_kl.sum()
            n_targets += int(keep.sum())
        total = total + cfg.noisy_weight * kl_sum
        stats["noisy_targets"] = n_targets / 2.0
        stats["noisy_loss"] = float(kl_sum.detach())
    return total / b, stats


# --------------------------------------------------------------------------- files


def _versions() -> dict[str, str]:
    from . import __version__

    out = {"pmpclean": __version__, "python": platform.python_version()}
    for name in ("numpy", "torch", "open_clip", "sklearn"):
        try:
            out[name] = str(getattr(__import__(name), "__version__", "?"))
        except Exception:  # noqa: BLE001 - a missing optional module is not an error here
            out[name] = "not installed"
    return out


def _write_json(path: Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=False, default=str)
        fh.write("\n")


def _save_weights(model: Any, out_dir: Path, model_cfg: dict[str, Any]) -> Path:
    import open_clip
    import torch

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    target = out_dir / CHECKPOINT_NAME
    with atomic_path(target) as tmp:
        torch.save(state, tmp)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    _write_json(
        out_dir / OPEN_CLIP_CONFIG_NAME,
        to_jsonable({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}),
    )
    _write_json(out_dir / MODEL_CONFIG_NAME, to_jsonable(model_cfg))
    return target


def _settings_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def _prepare_out_dir(out_dir: Path, cfg: FinetuneConfig) -> bool:
    """Check the output folder; return True when an interrupted run should be resumed."""
    existing = [n for n in _OUTPUT_NAMES if (out_dir / n).exists()]
    resume_file = out_dir / RESUME_NAME
    if cfg.resume:
        if resume_file.is_file():
            return True
        if (out_dir / METRICS_NAME).is_file():
            raise ConfigError(
                f"The run in {out_dir} already finished (metrics.json is written and there is no "
                f"{RESUME_NAME}); there is nothing to resume. Pass overwrite to train again."
            )
        warnings.warn(
            f"resume was requested but {resume_file} does not exist; starting a new run.",
            stacklevel=3,
        )
        return False
    if existing and not cfg.overwrite:
        raise ConfigError(
            f"{out_dir} already holds a fine-tuning run ({', '.join(existing)}); pass resume "
            "(--resume) to continue an interrupted run or overwrite (--overwrite) to start over, "
            "or choose another output folder."
        )
    for name in existing:
        (out_dir / name).unlink()
    return False


def _quality(
    clean: np.ndarray, prob: np.ndarray | None, true_mis: np.ndarray | None
) -> dict[str, float] | None:
    """Split quality against ground truth (positive = mismatched); AUROC of 1 - prob."""
    if true_mis is None:
        return None
    pred = ~clean
    tp = int((pred & true_mis).sum())
    out = {
        "precision": float(tp / max(1, int(pred.sum()))),
        "recall": float(tp / max(1, int(true_mis.sum()))),
        "accuracy": float(np.mean(pred == true_mis)),
    }
    if prob is not None and 0 < int(true_mis.sum()) < true_mis.size:
        from sklearn.metrics import roc_auc_score

        out["auroc"] = float(roc_auc_score(true_mis, 1.0 - prob))
    return out


# --------------------------------------------------------------------------- public API


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


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


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
    import torch

    timer = Timer()
    session_start = time.time()

    # ---- data
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
            warnings.warn(holdout.skipped, stacklevel=3)
        train = _subset(data, holdout.train)

    # ---- model
    with timer("load_model"):
        loaded = _load_model(cfg, device)
    model = loaded.model
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    random_init = loaded.random_init
    lr = cfg.lr if cfg.lr is not None else (1e-3 if random_init else 1e-5)
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
    loss_cfg = cfg.replace(robust_q=robust_q, suspect_targets=suspect_targets)  # resolved

    # ---- images (decoded once; unusable ones dropped with a warning)
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
    train_tokens = loaded.tokenizer(train.captions)
    val_tokens = loaded.tokenizer(val_data.captions) if val_data is not None else None
    ig_t = torch.from_numpy(train.image_index)
    tg_t = torch.from_numpy(train.text_group)

    # ---- output folder: checked only now, so a bad dataset or model leaves it untouched
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"Cannot create output folder {out} ({exc.strerror or exc}); pass a writable --out."
        ) from exc
    resuming = _prepare_out_dir(out, cfg)

    # ---- optimisation
    params = _param_groups(model, cfg.weight_decay)
    optimizer = _adamw(params, lr)
    n_batches = math.ceil(n_train / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.accum_steps)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(0.05 * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.schedule, warmup, total_steps)
    )
    amp_dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=(precision == "amp"))

    def autocast() -> Any:
        if precision == "fp32":
            return _null_context()
        return torch.autocast(device_type="cuda", dtype=amp_dtype)

    settings = _settings_dict(cfg)
    resolved = {
        "lr": lr,
        "warmup_steps": warmup,
        "split_warmup_epochs": "adaptive" if split_warmup is None else split_warmup,
        "robust_q": robust_q,
        "suspect_targets": suspect_targets,
        "precision": precision,
        "device": device,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
    }

    def validate(stage: str) -> dict[str, Any] | None:
        if val_data is None or val_images is None:
            return None
        enc = _encode(
            model,
            val_images,
            val_tokens,
            device=device,
            batch_size=max(cfg.batch_size, 64),
            autocast=autocast,
            progress=progress,
            stage=stage,
        )
        return retrieval_recall(enc.image, enc.text, val_data.image_index)

    # ---- state (fresh or resumed)
    state: dict[str, Any] = {
        "epoch": 0,  # current epoch (0-based)
        "batch": 0,  # next micro-batch within the epoch
        "step": 0,  # optimizer steps done
        "clean": None,  # (n_train,) bool: the split used in the current epoch
        "partner": None,  # (n_train,) int64: row whose caption a suspect trains with (-1: none)
        "partner_weight": None,  # (n_train,) float: that pair's weight (rematch confidence)
        "split_info": None,
        "split_start": split_warmup,  # first epoch (0-based) with a split; None: not yet
        "history": [],
        "epoch_stats": {},
        "epoch_seconds": 0.0,
        "before": None,
        "best_rsum": -math.inf,
        "best_epoch": None,
        "bad_epochs": 0,
        "stopped_early": False,
        "elapsed": 0.0,
    }
    if resuming:
        with timer("resume"):
            ckpt = torch.load(out / RESUME_NAME, map_location="cpu", weights_only=True)
            old = ckpt["settings"]
            diff = sorted(
                k for k in settings if k not in _RESUME_FREE and old.get(k) != settings[k]
            )
            if diff:
                details = ", ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in diff)
                raise ConfigError(
                    f"Cannot resume the run in {out}: settings differ from the interrupted run "
                    f"({details}). Use the same settings, or pass overwrite to start over."
                )
            if int(ckpt["n_train"]) != n_train:
                raise ConfigError(
                    f"Cannot resume the run in {out}: the dataset now has {n_train} usable "
                    f"training pairs, the interrupted run had {int(ckpt['n_train'])}. "
                    "Use the same data, or pass overwrite to start over."
                )
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            torch.set_rng_state(ckpt["torch_rng"])
            state.update(json.loads(ckpt["state_json"]))
            if state["best_rsum"] is None:
                state["best_rsum"] = -math.inf
            clean = ckpt["clean"]
            state["clean"] = None if clean is None else clean.numpy().astype(bool)
            partner = ckpt.get("partner")
            if partner is None:  # a run of an older version, or before the first split
                state["partner"], state["partner_weight"] = _no_partners(n_train)
            else:
                state["partner"] = partner.numpy().astype(np.int64)
                state["partner_weight"] = ckpt["partner_weight"].numpy().astype(np.float64)
        logger.info(
            "resuming %s at epoch %d, batch %d, step %d",
            out,
            state["epoch"] + 1,
            state["batch"],
            state["step"],
        )
    elapsed_before = float(state["elapsed"])

    def elapsed() -> float:
        return elapsed_before + time.time() - session_start

    def save_resume() -> None:
        state["elapsed"] = elapsed()
        with timer("checkpoint"):
            clean = state["clean"]
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "settings": settings,
                "n_train": n_train,
                "clean": None if clean is None else torch.from_numpy(clean.astype(np.uint8)),
                "partner": None if state["partner"] is None else torch.from_numpy(state["partner"]),
                "partner_weight": None
                if state["partner_weight"] is None
                else torch.from_numpy(state["partner_weight"]),
                "state_json": json.dumps(
                    to_jsonable({k: v for k, v in state.items() if k not in _STATE_ARRAYS})
                ),
            }
            with atomic_path(out / RESUME_NAME) as tmp:
                torch.save(payload, tmp)

    if not resuming:
        _write_settings(out, settings, resolved)
        with timer("validate"):
            state["before"] = validate("validating (before training)")
        if state["before"] is not None:
            state["best_rsum"] = state["before"]["rsum"]

    checkpoint_path = out / CHECKPOINT_NAME
    model.train()
    while state["epoch"] < cfg.epochs and not state["stopped_early"]:
        epoch = state["epoch"]
        segment_start = time.time()
        if state["batch"] == 0:  # a new epoch: reset its statistics, refresh the split
            if state["split_start"] is None and state["history"] and cfg.method == "l2rm":
                last = state["history"][-1]
                if last["loss"] <= _BELOW_CHANCE * last["chance_loss"]:
                    state["split_start"] = epoch  # the model now beats chance: trust its losses
            state["epoch_stats"] = dict.fromkeys(
                (
                    "loss",
                    "infonce",
                    "chance",
                    "clean_loss",
                    "noisy_loss",
                    "clean_rows",
                    "noisy_rows",
                    "noisy_targets",
                    "rematched_rows",
                ),
                0.0,
            )
            state["epoch_seconds"] = 0.0
            with timer("split"):
                _refresh_split(
                    state,
                    epoch,
                    state["split_start"],
                    loss_cfg,
                    train,
                    train_images,
                    train_tokens,
                    model,
                    device,
                    autocast,
                    progress,
                )
        clean_t = torch.from_numpy(state["clean"])
        partner_t = torch.from_numpy(state["partner"])
        partner_w_t = torch.from_numpy(state["partner_weight"]).float()
        any_partner = bool((partner_t >= 0).any())

        # ---- the epoch's micro-batches (order fixed by seed and epoch: resumable)
        order = np.random.default_rng([cfg.seed, 3, epoch]).permutation(n_train)
        batches = [order[i : i + cfg.batch_size] for i in range(0, n_train, cfg.batch_size)]
        if len(batches) > 1 and batches[-1].size < 2:  # a lone pair has no negatives
            batches[-2] = np.concatenate([batches[-2], batches.pop()])
        stats = state["epoch_stats"]
        stats.setdefault("infonce", 0.0)  # absent when resuming a run of an older version
        stats.setdefault("rematched_rows", 0.0)
        optimizer.zero_grad(set_to_none=True)
        with timer("train"):
            start = state["batch"]
            for b_idx, (rows, imgs) in enumerate(
                train_images.batches(batches[start:]), start=start
            ):
                rows_t = torch.from_numpy(rows)
                text_rows, clean_b, weight_b = rows_t, clean_t[rows_t], None
                if any_partner:  # rematched suspects train with their proposed caption
                    p = partner_t[rows_t]
                    has = p >= 0
                    text_rows = torch.where(has, p, rows_t)
                    clean_b = clean_b | has
                    weight_b = torch.where(has, partner_w_t[rows_t], 1.0).to(device)
                    stats["rematched_rows"] += float(has.sum())
                with autocast():
                    img_f = model.encode_image(imgs.to(device), normalize=True)
                    txt_f = model.encode_text(train_tokens[text_rows].to(device), normalize=True)
                loss, st = _batch_loss(
                    img_f.float(),
                    txt_f.float(),
                    model.logit_scale.exp().float(),
                    clean_b.to(device),
                    ig_t[rows_t].to(device),
                    tg_t[text_rows].to(device),
                    loss_cfg,
                    weight_b,
                )
                if not bool(torch.isfinite(loss)):
                    raise ConfigError(
                        f"The training loss became {float(loss)} at epoch {epoch + 1}, step "
                        f"{state['step']}; lower lr (now {lr:g}) or use precision fp32."
                    )
                scaler.scale(loss / cfg.accum_steps).backward()
                stats["loss"] += float(loss.detach()) * len(rows)
                stats["chance"] += _chance_loss(len(rows), robust_q) * len(rows)
                for key in (
                    "infonce",
                    "clean_loss",
                    "noisy_loss",
                    "clean_rows",
                    "noisy_rows",
                    "noisy_targets",
                ):
                    stats[key] += st[key]
                last = b_idx == len(batches) - 1
                if (b_idx + 1) % cfg.accum_steps != 0 and not last:
                    continue
                if cfg.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))  # as open_clip trains
                state["step"] += 1
                state["batch"] = b_idx + 1
                if progress is not None:
                    progress(
                        f"training (epoch {epoch + 1}/{cfg.epochs})", state["step"], total_steps
                    )
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and not last:
                    state["epoch_seconds"] += time.time() - segment_start
                    segment_start = time.time()
                    save_resume()

        # ---- end of epoch: validate, keep the best weights, maybe stop early
        with timer("validate"):
            val = validate(f"validating (epoch {epoch + 1})")
        state["epoch_seconds"] += time.time() - segment_start
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": state["step"],
            "lr": float(scheduler.get_last_lr()[0]),
            "loss": stats["loss"] / n_train,
            "infonce_loss": stats["infonce"] / n_train,
            "chance_loss": stats["chance"] / n_train,
            "clean_loss": stats["clean_loss"] / max(1.0, stats["clean_rows"]),
            "suspect_loss": stats["noisy_loss"] / max(1.0, stats["noisy_targets"]),
            "clean_pairs": int(stats["clean_rows"]),
            "suspect_pairs": int(stats["noisy_rows"]),
            "suspects_with_target": int(round(stats["noisy_targets"])),
            "rematched_pairs": int(stats.get("rematched_rows", 0.0)),
            "split": state["split_info"],
            "logit_scale": float(model.logit_scale.detach().exp()),
            "seconds": round(state["epoch_seconds"], 3),
            "val": val,
        }
        state["history"].append(to_jsonable(record))
        logger.info(
            "epoch %d/%d: loss %.4f, validation R-sum %s",
            epoch + 1,
            cfg.epochs,
            record["loss"],
            "n/a" if val is None else f"{val['rsum']:.1f}",
        )
        if val is None or val["rsum"] > state["best_rsum"]:
            if val is not None:
                state["best_rsum"] = val["rsum"]
            state["best_epoch"] = epoch + 1
            state["bad_epochs"] = 0
            with timer("write"):
                _save_weights(model, out, loaded.model_cfg)
        else:
            state["bad_epochs"] += 1
            if cfg.patience is not None and state["bad_epochs"] >= cfg.patience:
                state["stopped_early"] = True
                logger.info(
                    "early stop after epoch %d (best: epoch %s)", epoch + 1, state["best_epoch"]
                )
        state["epoch"] = epoch + 1
        state["batch"] = 0
        if state["epoch"] < cfg.epochs and not state["stopped_early"]:
            save_resume()

    history = state["history"]
    if state["best_epoch"] is None:
        # validation never beat the starting model: keep the last weights, say so
        warnings.warn(
            "No epoch improved validation recall over the starting model; the saved weights "
            "are the last epoch's. Check lr, epochs and the data.",
            stacklevel=3,
        )
        with timer("write"):
            _save_weights(model, out, loaded.model_cfg)
        after = history[-1]["val"] if history else state["before"]
    else:
        after = history[state["best_epoch"] - 1]["val"]
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
        "before": state["before"],
        "after": after,
        "best_epoch": state["best_epoch"],
        "split_start_epoch": None if state["split_start"] is None else state["split_start"] + 1,
        "epochs_run": state["epoch"],
        "stopped_early": state["stopped_early"],
        "history": history,
        "settings": settings,
        "resolved": resolved,
        "versions": _versions(),
        "timings": {k: round(v, 3) for k, v in timer.seconds.items()},
        "seconds": round(elapsed(), 3),
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


def _usable_images(
    data: _Data, preprocess: Any, cfg: FinetuneConfig, progress: Progress | None, role: str
) -> tuple[_Data, _Images]:
    """Decode (or check) every image; drop the rows of images that cannot be decoded."""
    images = _Images(data, preprocess, cache=cfg.cache_images, workers=cfg.workers)
    bad = images.prepare(progress)
    if not bad:
        return data, images
    warnings.warn(
        f"{len(bad)} {role} image(s) could not be decoded and are skipped "
        f"(first: {data.paths[bad[0]]}).",
        stacklevel=4,
    )
    keep = np.flatnonzero(~np.isin(data.image_index, bad))
    if keep.size == 0:
        raise DatasetError(f"{data.source}: none of the {role} images can be decoded.")
    data = _subset(data, keep)
    images = _Images(data, preprocess, cache=cfg.cache_images, workers=cfg.workers)
    images.prepare(None)
    return data, images


def _refresh_split(
    state: dict[str, Any],
    epoch: int,
    split_start: int | None,
    cfg: FinetuneConfig,
    train: _Data,
    images: _Images,
    tokens: torch.Tensor,
    model: Any,
    device: str,
    autocast: Any,
    progress: Progress | None,
) -> None:
    """Set ``state["clean"]`` and ``state["split_info"]`` for a new epoch."""
    n = len(train.captions)
    if cfg.method == "contrastive" or split_start is None or epoch < split_start:
        state["clean"] = np.ones(n, dtype=bool)
        state["split_info"] = {"source": "all pairs (plain contrastive)"}
        state["partner"], state["partner_weight"] = _no_partners(n)
        return
    due = (
        state["clean"] is None
        or epoch == split_start
        or (cfg.split_every > 0 and (epoch - split_start) % cfg.split_every == 0)
    )
    if not due:
        state["split_info"] = {**(state["split_info"] or {}), "source": "previous split"}
        return
    enc = None
    if train.audit_clean is not None and epoch == split_start:
        clean = train.audit_clean.copy()
        prob = None
        info: dict[str, Any] = {"source": "audit (is_mismatched)"}
    else:
        enc = _encode(
            model,
            images,
            tokens,
            device=device,
            batch_size=max(cfg.batch_size, 64),
            autocast=autocast,
            progress=progress,
            stage=f"split: embedding training pairs (epoch {epoch + 1})",
        )
        loss = _per_pair_loss(enc, train.image_index, train.text_group, seed=cfg.seed + epoch)
        prob, mix = _gmm_clean_probability(loss, seed=cfg.seed + epoch)
        info = {"source": "loss mixture", **mix}
        if train.audit_prob is not None and cfg.audit_weight > 0:
            # The scan's verdict stays part of the evidence: a model trained from scratch
            # on few clean pairs audits far worse than the model that made the scan.
            prob = cfg.audit_weight * train.audit_prob + (1.0 - cfg.audit_weight) * prob
            info["source"] = f"loss mixture + audit (weight {cfg.audit_weight:g})"
        clean = prob >= cfg.split_threshold
    info["n_suspects"] = int((~clean).sum())
    info["suspect_rate"] = float(np.mean(~clean))
    quality = _quality(clean, prob, train.true_mismatch)
    if quality is not None:
        info["quality"] = quality
    state["clean"] = clean
    state["partner"], state["partner_weight"], rematch_info = _rematch_partners(
        clean, enc, train, cfg, seed=cfg.seed + epoch
    )
    if rematch_info is not None:
        info["rematch"] = rematch_info
    state["split_info"] = info
    logger.info("epoch %d split: %d suspects of %d pairs", epoch + 1, info["n_suspects"], n)


def _no_partners(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float64)


def _rematch_partners(
    clean: np.ndarray, enc: _Encoded | None, train: _Data, cfg: FinetuneConfig, *, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """``suspect_targets="global"``: each suspect's proposed caption row (-1: none) and weight.

    From the dataset-scale partial OT over every suspect with the current model's
    embeddings ``enc``; without ``enc`` (the first split, taken from a scan folder) from
    the scan's own proposals. Proposals below ``rematch_min_confidence`` are left out.
    """
    n = clean.size
    partner, weight = _no_partners(n)
    suspects = ~clean
    if cfg.suspect_targets != "global" or cfg.noisy_weight <= 0 or int(suspects.sum()) < 2:
        return partner, weight, None
    if enc is None:
        if train.audit_partner is None or train.audit_confidence is None:
            return partner, weight, {"source": "none (the scan folder has no proposals)"}
        position = np.full(train.n_input, -1, dtype=np.int64)
        position[train.rows] = np.arange(n)
        cand = train.audit_partner
        inside = (cand >= 0) & (cand < train.n_input)
        j = np.where(inside, position[np.clip(cand, 0, train.n_input - 1)], -1)
        ok = suspects & (j >= 0) & (train.audit_confidence >= cfg.rematch_min_confidence)
        partner[ok] = j[ok]
        weight[ok] = train.audit_confidence[ok]
        info: dict[str, Any] = {"source": "scan proposals"}
    else:
        from .rematching import plant_among_suspects, rematch

        rng = np.random.default_rng(seed)
        planted = _plant_rows(clean, train, rng)
        m = planted.size
        # the planted rows: clean images with their captions deranged among themselves,
        # transported together with the real suspects
        img, txt, sus2, image_group, text_group, keys = plant_among_suspects(
            enc.image, enc.text, suspects, train.image_index, train.text_group, clean, planted
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rm = rematch(
                img,
                txt,
                sus2,
                image_group=image_group,
                text_group=text_group,
                clean=keys,
                min_confidence=cfg.rematch_min_confidence,
                seed=seed,
            )
        proposed = np.asarray(rm.proposed_row)
        conf = np.asarray(rm.rematch_confidence)
        info = {"source": "partial OT over all suspects", "cost_used": rm.info.get("cost_used")}
        if caught:
            info["warnings"] = sorted({str(w.message) for w in caught})
        ok = proposed[:n] >= 0
        ok &= proposed[:n] < n  # a planted caption belongs to a clean image
        if m:
            got = proposed[n:]
            answered = got >= 0
            # right: the caption text of planted image t (in row t + 1, or in a real
            # suspect row with identical text)
            right = answered & (text_group[np.maximum(got, 0)] == train.text_group[planted])
            n_answered, n_right = int(answered.sum()), int(right.sum())
            lower = _wilson_lower(n_right, n_answered)
            check = lower >= cfg.rematch_min_confidence
            info["planted_check"] = {
                "n_planted": int(m),
                "n_proposed": n_answered,
                "precision": n_right / n_answered if n_answered else None,
                "precision_lower_bound": lower,
                "passed": bool(check),
            }
            if not check:
                ok[:] = False
        else:
            info["planted_check"] = {
                "n_planted": 0,
                "passed": None,
                "reason": f"fewer than {_MIN_PLANTED} clean rows of images without a suspect "
                "row: proposals used unchecked",
            }
        partner[ok] = proposed[:n][ok]
        weight[ok] = conf[:n][ok]
    info["n_rematched"] = int(ok.sum())
    info["mean_confidence"] = float(weight[ok].mean()) if ok.any() else None
    if train.image_ref is not None and train.true_ref is not None and ok.any():
        right = train.image_ref[ok] == train.true_ref[partner[ok]]
        info["precision"] = float(right.mean())
    return partner, weight, info


def _plant_rows(clean: np.ndarray, train: _Data, rng: np.random.Generator) -> np.ndarray:
    """Clean rows to plant as known mismatches in the dataset-scale rematch: of images
    with no suspect row (their other captions must not compete), one row per image and
    per caption text, a quarter of the clean rows and at most 256; none when fewer than
    8 qualify."""
    from .rematching import plantable_rows

    rows = plantable_rows(clean, ~clean, train.image_index, train.text_group, rng=rng)
    m = min(_MAX_PLANTED, rows.size, int(clean.sum()) // 4)
    return np.sort(rows[:m]) if m >= _MIN_PLANTED else np.zeros(0, dtype=np.int64)


def _wilson_lower(k: int, n: int, z: float = 1.2816) -> float:
    """One-sided 90 % Wilson lower bound of a proportion k / n (0 when n is 0)."""
    if n == 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((centre - spread) / (1 + z * z / n))


def _write_settings(out: Path, settings: dict[str, Any], resolved: dict[str, Any]) -> None:
    import yaml

    doc = {"settings": settings, "resolved": resolved, "versions": _versions()}
    with atomic_open(out / SETTINGS_NAME, "w", encoding="utf-8") as fh:
        fh.write("# pmpclean finetune: resolved settings of this run\n")
        yaml.safe_dump(to_jsonable(doc), fh, sort_keys=False)
