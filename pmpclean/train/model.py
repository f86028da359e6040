"""The open_clip model of a run: loading, optimizer and schedule, autocast, and
the batched encoding of a whole split."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._utils import Progress
from ..config import FinetuneConfig
from ..errors import ModelLoadError
from .data import _Images

if TYPE_CHECKING:  # pragma: no cover
    import torch


logger = logging.getLogger(__name__)


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

    from ..embedding import load_model

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


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
