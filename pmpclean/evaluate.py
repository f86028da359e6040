"""Score an audit against known ground truth (``pmpclean corrupt`` writes it).

Conventions: the *positive* class of detection is "mismatched". ``true_row[i]`` is
the input row the caption at row ``i`` originally belonged to, so row ``i`` is
mismatched iff ``image_group[true_row[i]] != image_group[i]``, and a rematch proposal
``j`` for row ``i`` is correct iff ``image_group[true_row[j]] == image_group[i]`` (the
proposed caption was written for this row's image). numpy only.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

__all__ = [
    "auroc",
    "detection_metrics",
    "rematch_metrics",
    "precision_coverage_curve",
    "precision_recall_points",
]


def _bool(x: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        want = f"({n},)" if n is not None else "(n,)"
        raise ConfigError(f"{name} must have shape {want}, got {a.shape}.")
    if a.dtype != bool:
        if a.size and not np.all(np.isin(a, (0, 1))):
            raise ConfigError(f"{name} must be boolean (or 0/1).")
        a = a.astype(bool)
    return a


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    avg = 0.5 * (starts + ends - 1) + 1.0
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney), ties counted half.

    Parameters
    ----------
    y_true : ndarray of bool, shape (n,)
        Positive labels.
    y_score : ndarray, shape (n,)
        Higher = more likely positive. NaN rows are dropped.

    Returns
    -------
    float
        In [0, 1]; NaN when only one class is present.

    Examples
    --------
    >>> auroc(np.array([True, False, True]), np.array([0.9, 0.1, 0.4]))
    1.0
    """
    y = _bool(y_true, "y_true")
    s = np.asarray(y_score, dtype=np.float64)
    if s.shape != y.shape:
        raise ConfigError(f"y_score must have shape {y.shape}, got {s.shape}.")
    keep = np.isfinite(s)
    y, s = y[keep], s[keep]
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def detection_metrics(
    is_mismatched_true: np.ndarray,
    match_score: np.ndarray,
    is_mismatched_pred: np.ndarray,
) -> dict:
    """Detection quality, positive class = mismatched.

    Parameters
    ----------
    is_mismatched_true : ndarray of bool, shape (n,)
        Ground truth.
    match_score : ndarray, shape (n,)
        [0, 1], higher = more likely a true pair (NaN rows are left out of the AUROC).
    is_mismatched_pred : ndarray of bool, shape (n,)
        Flags.

    Returns
    -------
    dict
        ``auroc`` (of ``-match_score`` for the mismatched class; NaN with one class),
        ``average_precision``, ``precision``, ``recall``, ``f1``, ``accuracy``, and
        counts ``n``, ``n_true``, ``n_pred``, ``tp``, ``fp``, ``fn``. Precision is 1 and
        F1 is 0 when nothing is flagged (recall 1 when nothing is mismatched).

    Examples
    --------
    >>> m = detection_metrics(np.array([1, 0, 0, 1], bool), np.array([0.1, 0.9, 0.8, 0.6]),
    ...                       np.array([1, 0, 0, 0], bool))
    >>> m["precision"], m["recall"], round(m["f1"], 3), m["auroc"]
    (1.0, 0.5, 0.667, 1.0)
    """
    y = _bool(is_mismatched_true, "is_mismatched_true")
    n = y.size
    pred = _bool(is_mismatched_pred, "is_mismatched_pred", n)
    s = np.asarray(match_score, dtype=np.float64)
    if s.shape != (n,):
        raise ConfigError(f"match_score must have shape ({n},), got {s.shape}.")
    tp = int(np.sum(y & pred))
    fp = int(np.sum(~y & pred))
    fn = int(np.sum(y & ~pred))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {
        "auroc": auroc(y, -s),
        "average_precision": _average_precision(y, -s),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "accuracy": float(np.mean(y == pred)) if n else float("nan"),
        "n": int(n),
        "n_true": int(y.sum()),
        "n_pred": int(pred.sum()),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _pr_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of "flag when s >= t" at each distinct t (descending)."""
    keep = np.isfinite(s)
    y, s = y[keep], s[keep]
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    last = np.r_[np.flatnonzero(ss[1:] != ss[:-1]), ss.size - 1] if ss.size else np.array([], int)
    tp = np.cumsum(ys)[last]
    flagged = last + 1
    n_pos = max(int(y.sum()), 1)
    return tp / flagged, tp / n_pos, ss[last]


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    keep = np.isfinite(s)
    if not y[keep].any():
        return float("nan")
    precision, recall, _ = _pr_curve(y, s)
    prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev) * precision))


def precision_recall_points(
    is_mismatched_true: np.ndarray, match_score: np.ndarray, *, n_points: int = 101
) -> dict:
    """Detection precision-recall curve, subsampled for a summary or a plot.

    Parameters
    ----------
    is_mismatched_true : ndarray of bool, shape (n,)
    match_score : ndarray, shape (n,)
        [0, 1], higher = more likely a true pair; a pair is flagged when
        ``match_score <= threshold``.
    n_points : int
        At most this many points, evenly spaced along the curve.

    Returns
    -------
    dict
        ``threshold``, ``precision``, ``recall``: lists of floats (JSON-ready),
        recall ascending.
    """
    y = _bool(is_mismatched_true, "is_mismatched_true")
    s = np.asarray(match_score, dtype=np.float64)
    if s.shape != y.shape:
        raise ConfigError(f"match_score must have shape {y.shape}, got {s.shape}.")
    if n_points < 2:
        raise ConfigError(f"n_points must be at least 2, got {n_points}.")
    precision, recall, thr = _pr_curve(y, -s)
    if precision.size > n_points:
        pick = np.unique(np.linspace(0, precision.size - 1, n_points).round().astype(int))
        precision, recall, thr = precision[pick], recall[pick], thr[pick]
    return {
        "threshold": [float(-t) for t in thr],
        "precision": [float(p) for p in precision],
        "recall": [float(r) for r in recall],
    }


def _rematch_inputs(
    true_row: np.ndarray,
    image_group: np.ndarray | None,
    proposed_row: np.ndarray,
    confidence: np.ndarray | None,
    is_mismatched_true: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(true_row)
    n = t.shape[0] if t.ndim == 1 else -1
    if t.ndim != 1 or (
        n and (not np.issubdtype(t.dtype, np.integer) or t.min() < 0 or t.max() >= n)
    ):
        raise ConfigError(
            f"true_row must be integer row numbers in [0, n - 1], shape (n,), got {t.shape}."
        )
    if image_group is None:
        g = np.arange(n)
    else:
        g = np.asarray(image_group)
        if g.shape != (n,):
            raise ConfigError(f"image_group must have shape ({n},), got {g.shape}.")
        _, g = np.unique(g, return_inverse=True)
        g = g.ravel()
    p = np.asarray(proposed_row)
    if p.shape != (n,) or (n and not np.issubdtype(p.dtype, np.integer)):
        raise ConfigError(
            f"proposed_row must be integers of shape ({n},) (-1 = none), got {p.shape}."
        )
    if n and (p.min() < -1 or p.max() >= n):
        raise ConfigError(f"proposed_row must hold row numbers in [0, {n - 1}] or -1 for none.")
    c = np.ones(n) if confidence is None else np.asarray(confidence, dtype=np.float64)
    if c.shape != (n,):
        raise ConfigError(f"confidence must have shape ({n},), got {c.shape}.")
    mis = (
        g[t] != g
        if is_mismatched_true is None
        else _bool(is_mismatched_true, "is_mismatched_true", n)
    )
    has = p >= 0
    correct = np.zeros(n, dtype=bool)
    correct[has] = g[t[p[has]]] == g[has]
    return t, g, p, c, mis, correct


def rematch_metrics(
    true_row: np.ndarray,
    image_group: np.ndarray | None,
    proposed_row: np.ndarray,
    confidence: np.ndarray | None = None,
    is_mismatched_true: np.ndarray | None = None,
) -> dict:
    """Quality of rematch proposals.

    Parameters
    ----------
    true_row : ndarray of int, shape (n,)
        Original row of each caption.
    image_group : array-like, shape (n,) or None
        Image id per row (None: every row its own image).
    proposed_row : ndarray of int, shape (n,)
        Row whose caption is proposed for row i's image; -1 for none.
    confidence : ndarray, shape (n,), optional
        Proposal confidence in [0, 1] (only used for ``mean_confidence``).
    is_mismatched_true : ndarray of bool, shape (n,), optional
        Rows that are truly mismatched (default derived from ``true_row``); rows
        outside it (e.g. rows not scored) do not count toward coverage.

    Returns
    -------
    dict
        ``precision``: correct proposals / proposals (NaN when none);
        ``coverage``: truly mismatched rows that got a proposal / truly mismatched;
        ``exact_accuracy``: truly mismatched rows whose proposal is correct / truly
        mismatched (the end-to-end repair rate); counts ``n_mismatched``,
        ``n_proposed``, ``n_correct``, ``n_proposed_on_clean``; ``mean_confidence``
        of the proposals.
    """
    _, _, p, c, mis, correct = _rematch_inputs(
        true_row, image_group, proposed_row, confidence, is_mismatched_true
    )
    has = p >= 0
    n_prop = int(has.sum())
    n_mis = int(mis.sum())
    return {
        "precision": float(correct[has].mean()) if n_prop else float("nan"),
        "coverage": float((has & mis).sum() / n_mis) if n_mis else float("nan"),
        "exact_accuracy": float((correct & mis).sum() / n_mis) if n_mis else float("nan"),
        "n_mismatched": n_mis,
        "n_proposed": n_prop,
        "n_correct": int(correct[has].sum()),
        "n_proposed_on_clean": int((has & ~mis).sum()),
        "mean_confidence": float(c[has].mean()) if n_prop else float("nan"),
    }


def precision_coverage_curve(
    true_row: np.ndarray,
    image_group: np.ndarray | None,
    proposed_row: np.ndarray,
    confidence: np.ndarray,
    is_mismatched_true: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rematch precision versus coverage as the minimum confidence rises.

    Keeping only proposals with ``confidence >= t`` for each distinct confidence t
    (descending), coverage is the fraction of truly mismatched rows still holding a
    proposal and precision the fraction of kept proposals that are correct.

    Returns
    -------
    coverage, precision, thresholds : ndarray, shape (m,)
        Coverage ascending as the threshold ``thresholds`` descends.
    """
    _, _, p, c, mis, correct = _rematch_inputs(
        true_row, image_group, proposed_row, confidence, is_mismatched_true
    )
    has = np.flatnonzero(p >= 0)
    if has.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = has[np.argsort(-c[has], kind="mergesort")]
    cs = c[order]
    last = np.r_[np.flatnonzero(cs[1:] != cs[:-1]), cs.size - 1]
    kept = last + 1
    n_mis = max(int(mis.sum()), 1)
    precision = np.cumsum(correct[order])[last] / kept
    coverage = np.cumsum(mis[order])[last] / n_mis
    return coverage, precision, cs[last]
