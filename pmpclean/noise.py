"""Inject known caption mismatches into a clean dataset (the evaluation protocol).

The paper protocol (NCR, NeurIPS 2021; L2RM, CVPR 2024) shuffles the captions of a
fraction of the pairs. ``mode="shuffle"`` does exactly that, as a *group
derangement*: every chosen row really receives another image's caption, and when an
image has several captions the caption it receives comes from a different image.
``mode="hard"`` is the realistic variant: each chosen row receives the caption of a
chosen row whose image is most similar to its own (nearest neighbour among the
chosen rows, by the embeddings you pass), which is much harder to detect.
``mode="mixed"`` is what scraped data tends to hold: half of the chosen rows get the
caption of a similar image (as ``"hard"``, among themselves) and the other half a
random shuffle (as ``"shuffle"``, among themselves).

The result is a ``true_row`` permutation: ``true_row[i]`` is the input row whose
caption now sits at row ``i`` (``true_row[i] == i`` for untouched rows). Row ``i`` is
mismatched iff ``image_group[true_row[i]] != image_group[i]``. The same functions
double as test-fixture generators.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ._utils import check_random_state
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["NOISE_MODES", "corrupt_indices", "corrupt_frame", "mismatch_truth"]

#: Documented noise modes of :func:`corrupt_indices`.
NOISE_MODES = ("shuffle", "hard", "mixed")

_MAX_DRAWS = 20


def _check_rate(rate: float) -> float:
    try:
        r = float(rate)
    except (TypeError, ValueError):
        raise ConfigError(f"rate must be a number in [0, 1], got {rate!r}.") from None
    if not np.isfinite(r) or r < 0.0 or r > 1.0:
        raise ConfigError(f"rate must be in [0, 1] (fraction of rows to corrupt), got {rate!r}.")
    return r


def _group_ids(groups: np.ndarray | Sequence[object] | None, n: int) -> np.ndarray:
    if groups is None:
        return np.arange(n, dtype=np.int64)
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ConfigError(f"groups must have shape ({n},) (one image id per row), got {g.shape}.")
    _, codes = np.unique(g, return_inverse=True)
    return codes.astype(np.int64).ravel()


def _feasible(src_g: np.ndarray, tgt_g: np.ndarray) -> bool:
    """Hall's condition: a bijection avoiding equal groups exists iff no group fills > n slots."""
    n = src_g.size
    if n == 0:
        return True
    counts = np.bincount(src_g, minlength=int(max(src_g.max(), tgt_g.max())) + 1)
    counts = counts + np.bincount(tgt_g, minlength=counts.size)
    return bool(counts.max() <= n)


def _group_bijection(
    src: np.ndarray, tgt: np.ndarray, groups: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Random bijection src -> tgt with ``groups[src[i]] != groups[out[i]]`` for every i.

    Starts from a uniform random permutation and repairs each conflict by swapping it
    with a random partner whenever the swap leaves both positions valid.
    """
    t = tgt[rng.permutation(tgt.size)]
    gs = groups[src]
    for _ in range(1000):
        bad = np.flatnonzero(gs == groups[t])
        if bad.size == 0:
            return t
        partners = rng.integers(0, t.size, size=bad.size)
        for i, j in zip(bad.tolist(), partners.tolist(), strict=True):
            if groups[t[j]] != gs[i] and groups[t[i]] != gs[j]:
                t[i], t[j] = t[j], t[i]
    # Deterministic construction for the (rare) cases random repair cannot finish:
    # sort both sides by group and rotate by the largest group count.
    order_s = np.argsort(gs, kind="stable")
    order_t = np.argsort(groups[tgt], kind="stable")
    m = int(np.bincount(np.concatenate([gs, groups[tgt]])).max())
    out = np.empty_like(tgt)
    out[order_s] = tgt[order_t][(np.arange(tgt.size) + m) % tgt.size]
    if np.any(gs == groups[out]):  # pragma: no cover - excluded by _feasible
        raise ConfigError("could not build a caption shuffle that moves every chosen row.")
    return out


def _hard_targets(
    chosen: np.ndarray,
    groups: np.ndarray,
    emb: np.ndarray,
    rng: np.random.Generator,
    hard_k: int,
) -> np.ndarray:
    """Greedy nearest-neighbour assignment of captions among the chosen rows."""
    from .neighbors import knn_search

    x = np.asarray(emb[chosen], dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    g = groups[chosen]
    max_group = int(np.bincount(g).max())
    k = min(chosen.size, hard_k + max_group)
    _, nbr = knn_search(x, x, k)
    used = np.zeros(chosen.size, dtype=bool)
    target = np.full(chosen.size, -1, dtype=np.int64)
    for i in rng.permutation(chosen.size).tolist():
        taken = 0
        for j in nbr[i].tolist():
            if j < 0 or g[j] == g[i]:
                continue
            if not used[j]:
                target[i] = j
                used[j] = True
                break
            taken += 1
            if taken >= hard_k:
                break
    rest_src = np.flatnonzero(target < 0)
    if rest_src.size:
        rest_tgt = np.flatnonzero(~used)
        # Undo random greedy choices until the remainder is solvable (a lone row left
        # with only its own caption is not); everything else keeps its similar caption.
        for p in rng.permutation(np.flatnonzero(target >= 0)).tolist():
            if _feasible(g[rest_src], g[rest_tgt]):
                break
            used[target[p]] = False
            target[p] = -1
            rest_src, rest_tgt = np.flatnonzero(target < 0), np.flatnonzero(~used)
        target[rest_src] = _group_bijection(rest_src, rest_tgt, g, rng)
    return chosen[target]


def corrupt_indices(
    n: int,
    *,
    rate: float,
    mode: str = "shuffle",
    groups: np.ndarray | Sequence[object] | None = None,
    embeddings: np.ndarray | None = None,
    hard_k: int = 10,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    # long: numpydoc of 45 lines; body 60
    """Choose ``round(rate * n)`` rows and permute their captions among them.

    Parameters
    ----------
    n : int
        Number of rows.
    rate : float
        Fraction of rows whose caption is replaced, in [0, 1].
    mode : {"shuffle", "hard", "mixed"}
        ``"shuffle"``: a uniform random group derangement of the chosen rows (the paper
        protocol). ``"hard"``: each chosen row receives the caption of one of its
        ``hard_k`` nearest chosen rows by ``embeddings`` (a similar image), greedily and
        without reuse; rows left over are deranged at random. ``"mixed"``: the chosen
        rows are cut at random into two halves; the first half is corrupted as
        ``"hard"`` among itself, the second as ``"shuffle"`` among itself.
    groups : array-like, shape (n,), optional
        Image id of each row (rows showing the same image share a value). A row never
        receives a caption of its own image. Default: every row is its own image.
    embeddings : ndarray, shape (n, d), optional
        Image-side embeddings; required by ``mode="hard"`` and ``"mixed"``.
    hard_k : int
        Neighbourhood size of the hard mode.
    seed : int, Generator or None
        Randomness of the row choice and of the permutation.

    Returns
    -------
    true_row : ndarray, shape (n,), int64
        A permutation of ``range(n)``: ``true_row[i]`` is the input row whose caption
        is placed at row ``i``. Exactly the chosen rows have ``true_row[i] != i`` and
        ``groups[true_row[i]] != groups[i]``.

    Raises
    ------
    ConfigError
        On an out-of-range rate, an unknown mode, missing embeddings for ``"hard"``,
        or when the chosen rows cannot all be moved (a single chosen row, or one image
        holding more than half of the rows).

    Examples
    --------
    >>> t = corrupt_indices(10, rate=0.4, seed=0)
    >>> int((t != range(10)).sum())
    4
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}.")
    n = int(n)
    r = _check_rate(rate)
    if mode not in NOISE_MODES:
        raise ConfigError(
            f"Unknown method {mode!r} for mode: expected one of {', '.join(NOISE_MODES)}."
        )
    if hard_k < 1:
        raise ConfigError(f"hard_k must be at least 1, got {hard_k}.")
    rng = check_random_state(seed)
    g = _group_ids(groups, n)
    if mode in ("hard", "mixed"):
        if embeddings is None:
            raise ConfigError(
                f"mode={mode!r} needs embeddings of shape (n, d) to find similar images; "
                "pass embeddings= or use mode='shuffle'."
            )
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ConfigError(f"embeddings must have shape ({n}, d), got {emb.shape}.")
        if not np.all(np.isfinite(emb)):
            raise ConfigError(
                f"embeddings contain NaN or inf; mode={mode!r} needs finite embeddings."
            )
    true_row = np.arange(n, dtype=np.int64)
    m = int(round(r * n))
    if m == 0:
        return true_row
    if m == 1:
        raise ConfigError(
            f"rate={rate} selects a single row of {n}, and one row cannot swap its caption "
            "with anyone; use a rate that selects at least 2 rows (or 0)."
        )
    for _ in range(_MAX_DRAWS):
        chosen = np.sort(rng.choice(n, size=m, replace=False))
        if _feasible(g[chosen], g[chosen]):
            break
    else:
        raise ConfigError(
            f"cannot corrupt {m} of {n} rows so that each gets another image's caption: "
            "one image holds more than half of the chosen rows; lower the rate or add images."
        )
    if mode == "shuffle":
        true_row[chosen] = _group_bijection(chosen, chosen, g, rng)
    elif mode == "hard":
        true_row[chosen] = _hard_targets(chosen, g, emb, rng, hard_k)
    else:
        true_row[chosen] = _mixed_targets(chosen, g, emb, rng, hard_k)
    return true_row


def _mixed_targets(
    chosen: np.ndarray,
    groups: np.ndarray,
    emb: np.ndarray,
    rng: np.random.Generator,
    hard_k: int,
) -> np.ndarray:
    """Half of ``chosen`` corrupted as "hard" among itself, the rest as "shuffle".

    Falls back to one random derangement of all chosen rows when a half cannot be
    corrupted on its own (fewer than 2 rows, or one image holding most of it).
    """
    order = rng.permutation(chosen.size)
    half = chosen.size // 2
    hard, rand = np.sort(chosen[order[:half]]), np.sort(chosen[order[half:]])
    if (
        hard.size < 2
        or not _feasible(groups[hard], groups[hard])
        or not _feasible(groups[rand], groups[rand])
    ):
        return _group_bijection(chosen, chosen, groups, rng)
    target = np.empty(chosen.size, dtype=np.int64)
    pos = np.searchsorted(chosen, hard)
    target[pos] = _hard_targets(hard, groups, emb, rng, hard_k)
    pos = np.searchsorted(chosen, rand)
    target[pos] = _group_bijection(rand, rand, groups, rng)
    return target


def mismatch_truth(
    true_row: np.ndarray, image_group: np.ndarray | Sequence[object] | None = None
) -> np.ndarray:
    """Ground-truth mismatch mask from a ``true_row`` column.

    Parameters
    ----------
    true_row : ndarray, shape (n,)
        Original row of each caption (``pmpclean corrupt`` writes it).
    image_group : array-like, shape (n,), optional
        Image id of each row; default every row is its own image.

    Returns
    -------
    ndarray, shape (n,), bool
        ``image_group[true_row[i]] != image_group[i]``.
    """
    t = np.asarray(true_row, dtype=np.int64)
    n = t.shape[0]
    if t.ndim != 1 or (n and (t.min() < 0 or t.max() >= n)):
        raise ConfigError(f"true_row must hold row numbers in [0, {n - 1}], one per row.")
    g = _group_ids(image_group, n)
    return g[t] != g


def corrupt_frame(
    frame: pd.DataFrame,
    *,
    rate: float,
    mode: str = "shuffle",
    text_col: str = "caption",
    image_col: str = "image",
    truth_col: str = "true_row",
    move_cols: Sequence[str] = (),
    embeddings: np.ndarray | None = None,
    hard_k: int = 10,
    seed: int | np.random.Generator | None = None,
) -> pd.DataFrame:
    """Return a copy of ``frame`` whose captions are shuffled per :func:`corrupt_indices`.

    Parameters
    ----------
    frame : DataFrame
        One row per (image, caption) pair. Rows with the same ``image_col`` value are
        captions of the same image.
    rate, mode, hard_k, seed
        See :func:`corrupt_indices`.
    text_col, image_col : str
        Caption and image columns.
    truth_col : str
        Name of the added ground-truth column: the 0-based input row each caption
        came from.
    move_cols : sequence of str
        Further columns that travel with the caption (e.g. a caption id).
    embeddings : ndarray, shape (n, d), optional
        Image-side embeddings for ``mode="hard"``.

    Returns
    -------
    DataFrame
        Same index and columns plus ``truth_col``; the input is not modified.
    """
    for col in (text_col, image_col, *move_cols):
        if col not in frame.columns:
            raise ConfigError(
                f"column {col!r} not found; the frame has {', '.join(map(str, frame.columns))}."
            )
    if truth_col in frame.columns:
        raise ConfigError(
            f"column {truth_col!r} already exists; the data looks corrupted already, "
            "or pick another truth_col."
        )
    n = len(frame)
    true_row = corrupt_indices(
        n,
        rate=rate,
        mode=mode,
        groups=frame[image_col].astype(str).to_numpy(),
        embeddings=embeddings,
        hard_k=hard_k,
        seed=seed,
    )
    out = frame.copy()
    for col in (text_col, *move_cols):
        out[col] = frame[col].to_numpy()[true_row]
    out[truth_col] = true_row
    return out
