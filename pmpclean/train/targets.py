"""What each training row trains towards: the clean/suspect split of every
refresh and the suspects' rematched partners (global partial OT, planted check)."""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .._utils import Progress
from ..config import FinetuneConfig
from .data import _Data, _Images
from .model import _encode, _Encoded

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .loop import TrainState


logger = logging.getLogger(__name__)


_MAX_PLANTED = 256  # global rematch: clean rows planted as known mismatches to check it


_MIN_PLANTED = 8  # fewer qualifying clean rows: the proposals are used unchecked


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
    """Posterior of the low-loss component of a 2-component GMM on the per-pair loss.

    Not the scan's guarded split (:func:`pmpclean.split.split_pairs`) on purpose: its
    guard refuses the losses of a model training on 60 % noise as one population and
    turns the run into plain InfoNCE; measured worse over 20-80 % noise
    (``benchmarks/results/finetune_split.md``).
    """
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


def _refresh_split(
    state: TrainState,
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
    """Set ``state.clean``, ``state.partner(_weight)`` and ``state.split_info`` for a new epoch."""
    n = len(train.captions)
    if cfg.method == "contrastive" or split_start is None or epoch < split_start:
        state.clean = np.ones(n, dtype=bool)
        state.split_info = {"source": "all pairs (plain contrastive)"}
        state.partner, state.partner_weight = _no_partners(n)
        return
    due = (
        state.clean is None
        or epoch == split_start
        or (cfg.split_every > 0 and (epoch - split_start) % cfg.split_every == 0)
    )
    if not due:
        state.split_info = {**(state.split_info or {}), "source": "previous split"}
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
    state.clean = clean
    state.partner, state.partner_weight, rematch_info = _rematch_partners(
        clean, enc, train, cfg, seed=cfg.seed + epoch
    )
    if rematch_info is not None:
        info["rematch"] = rematch_info
    state.split_info = info
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
        from ..rematching import plant_among_suspects, rematch

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
    from ..rematching import plantable_rows

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
