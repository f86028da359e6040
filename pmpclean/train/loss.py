"""The per-batch loss: (robust) InfoNCE on clean pairs and soft partial-OT targets
for suspects (L2RM), with the statistics the epoch record reports."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from ..config import FinetuneConfig
from ..transport import partial_ot_plan

if TYPE_CHECKING:  # pragma: no cover
    import torch


logger = logging.getLogger(__name__)


_EPS = 1e-8


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
