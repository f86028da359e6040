"""[4] Rematch suspected mismatched pairs with partial optimal transport.

For the suspect rows (pairs flagged as mismatched) the captions are moved between
images so that each suspect image receives the caption that fits it best, as in L2RM
(CVPR 2024), with the changes that make it usable on a whole dataset:

* **Candidate graph instead of a random batch.** Each suspect image is linked to its
  ``k`` most similar candidate captions and each candidate caption to its ``k`` most
  similar suspect images (faiss, :func:`pmpclean.neighbors.knn_search`). The true
  caption of a mismatched image is somewhere in the dataset, almost never inside a
  random batch of 128.
* **Partial transport on that graph.** Uniform mass on the suspect images and on the
  candidate captions; only a fraction ``mass`` of it is transported, the rest goes to
  dummy points (cost 0; dummy-to-dummy forbidden, which makes the transported mass
  exactly ``mass``). A suspect's original pairing, its duplicates and any caption
  its image already has in another row are forbidden (no edge). The entropic problem
  is solved by a log-domain Sinkhorn over the edges (O(E) per iteration, E <= 2 N k,
  with epsilon-scaling), globally consistent over all suspects; ``solver="dense"``
  solves the same problem on the full matrix with POT for small problems.
* **Explicit abstention.** ``rematch_confidence`` is the share of an image's mass
  that the plan sends to the proposal, among its ``k`` heaviest edges and the mass
  it leaves unmatched (see :func:`_row_shares`: the entropic slivers spread over
  every far caption are left out, which makes the share the same for a dense and a
  sparse plan). Plans are rounded to at most one caption per row by a greedy
  partial matching in decreasing share (a caption is never proposed twice; ties
  broken by node order). Below ``min_confidence`` there is no proposal; a row that
  keeps most of its mass untransported gets a low share and no proposal.
* **Many-to-many datasets.** Rows showing the same image are one image node with
  capacity = its number of suspect rows; identical caption texts are one caption
  node with capacity = its number of rows.

The cost on an edge is ``1 - similarity`` (``cost="fixed"``), a learned edge-wise
cost (``cost="learned"``, :class:`pmpclean.cost.EdgeCost`, monotone, fitted on clean
key points planted among the suspects; beyond every candidate list, i.e. only in a
dense problem, it keeps rising as ``1 - similarity`` does) or the paper's batch cost
network (``cost="paper"``, rematching inside random batches as the paper does).

Measured (``benchmarks/results/rematch.md``): on Flickr8k pairs at 20-80 % noise the
precision-coverage curve lies above a full Hungarian assignment and nearest
neighbour at every coverage, and the sparse solver's proposals agree with dense POT
on >= 99 % of the suspects with the learned cost.

References
----------
.. [1] Han, H., et al. (2024). "Learning to Rematch Mismatched Pairs for Robust
   Cross-Modal Retrieval" (L2RM). CVPR.
.. [2] Chapel, L., Alaya, M., Gasso, G. (2020). "Partial Optimal Transport with
   Applications on Positive-Unlabeled Learning". NeurIPS.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np

from ._utils import check_random_state
from .config import COSTS, POOLS, REG_UNITS, SOLVERS, RematchSettings, check_settings
from .cost import (
    DEFAULT_FEATURES,
    EdgeCost,
    PaperCost,
    average_costs,
    edge_features,
    fit_edge_cost,
    fit_paper_cost,
)
from .errors import ConfigError, RematchError
from .transport import partial_plan, partial_transport

__all__ = [
    "COSTS",
    "POOLS",
    "REG_UNITS",
    "SOLVERS",
    "Rematch",
    "propose_captions",
    "rematch",
    "calibrated_rematch",
    "plant_among_suspects",
    "partial_transport",
    "rematch_backend",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

# Key points planted to fit the learned cost: enough for its ~100 weights, and the fit
# stays a few seconds whatever the number of suspects.
_MAX_KEYS = 500
# Edge features of the learned cost (pmpclean.cost.FEATURE_NAMES); see DEFAULT_FEATURES.
_EDGE_FEATURES = DEFAULT_FEATURES
# Fits averaged into the learned cost (see average_costs).
_N_FITS = 3
# Smallest share of a row's mass that still makes a candidate (below it: no candidate).
_Q_MIN = 1e-4
# ``reg`` (units "std") is relative to the spread of each suspect's nearest candidates;
# a fixed list length keeps it independent of ``k``.
_SCALE_K = 10


@dataclass
class Rematch:
    """Rematch proposals, row-aligned with the input (n rows).

    Attributes
    ----------
    proposed_row : ndarray, shape (n,), int64
        Row whose caption is proposed for row i's image; ``-1`` when there is no
        proposal (non-suspect rows, abstentions, confidence below the cut).
    rematch_confidence : ndarray, shape (n,), float64
        In [0, 1], higher = more likely the proposal is right: the share of row i's
        mass that the transport plan sends to ``proposed_row``, among the row's ``k``
        heaviest edges and its untransported mass. 0 when none.
    candidate_row : ndarray, shape (n,), int64
        The proposal before the ``min_confidence`` cut (``-1`` when the plan gives
        the row no caption at all), so a different cut can be applied later.
    candidate_confidence : ndarray, shape (n,), float64
        Confidence of ``candidate_row``, in [0, 1]; 0 when none.
    info : dict
        Settings and diagnostics: ``n_suspects``, ``n_image_nodes``,
        ``n_caption_nodes``, ``n_edges``, ``mass``, ``reg``, ``eps`` (regularisation
        in cost units), ``cost`` (requested) and ``cost_used`` (after a fallback, see
        ``cost_fallback``), ``cost_fit`` (the learned cost's fit diagnostics),
        ``solver``, ``iterations``, ``converged``, ``marginal_error``,
        ``n_candidates``, ``n_proposals``, ``timings`` (seconds per stage) and, when
        nothing could be proposed, ``reason``.
    cost_model : EdgeCost or None
        The learned cost the plan used (None for the fixed cost), so that it can be
        given to further problems (``rematch(cost_model=...)``).
    """

    proposed_row: np.ndarray
    rematch_confidence: np.ndarray
    candidate_row: np.ndarray
    candidate_confidence: np.ndarray
    info: dict = field(default_factory=dict)
    cost_model: EdgeCost | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.proposed_row.shape[0])


def plantable_rows(
    clean: np.ndarray,
    suspects: np.ndarray,
    image_group: np.ndarray,
    text_group: np.ndarray,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Clean rows whose truth stays unique when planted among the suspects.

    The rows of ``clean`` whose image has no suspect row (its other captions must not
    compete), then the first row per image group and per caption text, so that each
    planted image has exactly one right caption. Serves the key points of the learned
    cost and the planted check of ``pmpclean finetune``.

    Parameters
    ----------
    clean, suspects : ndarray of bool, shape (n,)
        Candidate rows and suspect rows.
    image_group, text_group : ndarray of int, shape (n,)
        Rows showing the same image / carrying identical caption text share a value.
    rng : numpy Generator, optional
        Shuffle the candidates before keeping the first per group (random rows);
        without it the lowest row index of each group is kept.

    Returns
    -------
    ndarray of int
        Row indices, in ascending order without ``rng``, else in the shuffled order.
    """
    suspect_image = np.zeros(int(image_group.max()) + 1, dtype=bool)
    suspect_image[image_group[suspects]] = True
    rows = np.flatnonzero(clean & ~suspect_image[image_group])
    if rng is not None:
        rows = rows[rng.permutation(rows.size)]
    _, first = np.unique(image_group[rows], return_index=True)
    rows = rows[np.sort(first)]
    _, first = np.unique(text_group[rows], return_index=True)
    return rows[np.sort(first)]


def _as_mask(x: np.ndarray | None, n: int, name: str) -> np.ndarray | None:
    if x is None:
        return None
    arr = np.asarray(x)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise RematchError(
                f"{name} is a boolean mask of shape {arr.shape}, expected ({n},) "
                "(one entry per row); pass a mask over all rows or an array of row indices."
            )
        return arr.copy()
    if arr.size == 0:
        return np.zeros(n, dtype=bool)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise RematchError(
            f"{name} must be a boolean mask of shape ({n},) or a 1-D array of row indices, "
            f"got dtype {arr.dtype} and shape {arr.shape}."
        )
    if arr.min() < 0 or arr.max() >= n:
        raise RematchError(
            f"{name} holds row indices outside [0, {n}): min {arr.min()}, max {arr.max()}; "
            "pass indices of existing rows."
        )
    mask = np.zeros(n, dtype=bool)
    mask[arr] = True
    return mask


def _pool_mask(
    captions: np.ndarray | None, pool: str, sus: np.ndarray, val: np.ndarray, n: int
) -> np.ndarray:
    """Rows whose captions are candidates: ``captions`` if given, else by ``pool``."""
    if captions is not None:
        return _as_mask(captions, n, "captions") & val
    return sus.copy() if pool == "suspects" else val.copy()


def _as_groups(x: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if x is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(x)
    if arr.shape != (n,):
        raise RematchError(
            f"{name} has shape {arr.shape}, expected ({n},): one group id per row "
            "(rows sharing an id show the same image / identical caption text)."
        )
    _, codes = np.unique(arr, return_inverse=True)
    return codes.astype(np.int64).ravel()


# --------------------------------------------------------------------------- nodes


@dataclass
class _Nodes:
    """Rows grouped into nodes (one per image group or per caption text)."""

    rep: np.ndarray  # (N,) representative row of each node
    code: np.ndarray  # (N,) group code of the node
    cap: np.ndarray  # (N,) capacity = number of member rows
    order: np.ndarray  # member rows, grouped by node
    start: np.ndarray  # (N,) offset of each node's members in ``order``

    @property
    def size(self) -> int:
        return int(self.rep.size)


def _make_nodes(rows: np.ndarray, codes: np.ndarray) -> _Nodes:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        e = np.zeros(0, dtype=np.int64)
        return _Nodes(e, e, e, e, e)
    uniq, inv = np.unique(codes[rows], return_inverse=True)
    inv = inv.ravel()
    order = np.argsort(inv, kind="stable")
    cap = np.bincount(inv, minlength=uniq.size).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(cap)[:-1]]).astype(np.int64)
    members = rows[order]
    return _Nodes(members[start], uniq.astype(np.int64), cap, members, start)


# --------------------------------------------------------------------------- candidates


@dataclass
class _Lists:
    """Top-k allowed neighbour lists (``-1`` / ``-inf`` padded)."""

    sims: np.ndarray  # (nq, k) float32, descending
    idx: np.ndarray  # (nq, k) int64


_CHUNK = 1 << 16  # rows per chunk when filtering neighbour lists
# Exact neighbour search costs O(n^2 d); above this many candidates the approximate
# (IVF) index is used: candidates need a high recall, not exactness.
_EXACT_MAX = 20_000


def _search_allowed(
    query: np.ndarray,
    base: np.ndarray,
    k: int,
    k_search: int,
    forbidden: Callable[[np.ndarray, np.ndarray], np.ndarray],
    seed: int,
) -> _Lists:
    """Top-``k`` neighbours of each query among ``base`` that are not ``forbidden``."""
    from .neighbors import knn_search

    sims, idx = knn_search(
        query, base, min(k_search, max(base.shape[0], 1)), seed=seed, exact_max=_EXACT_MAX
    )
    ok = idx >= 0
    for lo in range(0, idx.shape[0], _CHUNK):
        blk = ok[lo : lo + _CHUNK]
        qi = np.broadcast_to(np.arange(lo, lo + blk.shape[0])[:, None], blk.shape)
        blk[blk] = ~forbidden(qi[blk], idx[lo : lo + _CHUNK][blk])
    return _compact(sims, idx, ok, k)


def _compact(sims: np.ndarray, idx: np.ndarray, keep: np.ndarray, k: int) -> _Lists:
    """Keep the first ``k`` entries of each row where ``keep`` (order preserved)."""
    n = idx.shape[0]
    out_s = np.full((n, k), -np.inf, dtype=np.float32)
    out_i = np.full((n, k), -1, dtype=np.int64)
    kk = min(k, idx.shape[1])
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        kp = keep[lo:hi] & (np.cumsum(keep[lo:hi], axis=1) <= k)
        order = np.argsort(~kp, axis=1, kind="stable")[:, :kk]
        sel = np.take_along_axis(kp, order, axis=1)
        out_s[lo:hi, :kk] = np.where(sel, np.take_along_axis(sims[lo:hi], order, axis=1), -np.inf)
        out_i[lo:hi, :kk] = np.where(sel, np.take_along_axis(idx[lo:hi], order, axis=1), -1)
    return _Lists(out_s, out_i)


def _list_stats(lst: _Lists) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best, second-best, mean and last (k-th) similarity of each list (``-inf`` if none)."""
    s = lst.sims.astype(np.float64)
    best = s[:, 0] if s.shape[1] else np.full(s.shape[0], -np.inf)
    second = s[:, 1] if s.shape[1] > 1 else np.full(s.shape[0], -np.inf)
    fin = np.isfinite(s)
    cnt = fin.sum(axis=1)
    mean = np.where(cnt > 0, np.where(fin, s, 0.0).sum(axis=1) / np.maximum(cnt, 1), -np.inf)
    full = cnt == s.shape[1]  # a short list holds every allowed candidate: no boundary
    last = np.where(full & (cnt > 0), s[:, -1] if s.shape[1] else -np.inf, -np.inf)
    return best, second, mean, last


@dataclass
class _Graph:
    """Candidate edges (sorted by row, then column) with per-node statistics."""

    rows: np.ndarray  # (E,) image node
    cols: np.ndarray  # (E,) caption node
    sim: np.ndarray  # (E,) float32
    row_stats: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    col_stats: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    @property
    def n_edges(self) -> int:
        return int(self.rows.size)

    def features(self, scale: float, sl: slice = slice(None)) -> np.ndarray:
        rb, rs, rm, _ = self.row_stats
        cb, cs, cm, _ = self.col_stats
        r, c = self.rows[sl], self.cols[sl]
        return edge_features(self.sim[sl], rb[r], rs[r], rm[r], cb[c], cs[c], cm[c], scale=scale)

    def beyond_lists(self, sl: slice = slice(None)) -> np.ndarray:
        """How far below both candidate lists an edge lies (0 for every edge in a list).

        ``max(0, min(row's k-th similarity, column's k-th similarity) - sim)``: positive
        only for a pair that is in neither the image's nor the caption's top-k list,
        which a candidate graph never holds (only a dense problem does).
        """
        r, c = self.rows[sl], self.cols[sl]
        bound = np.minimum(self.row_stats[3][r], self.col_stats[3][c])
        with np.errstate(invalid="ignore"):
            return np.maximum(bound - self.sim[sl], 0.0).astype(np.float32)

    def cost(self, model: EdgeCost | None, scale: float, chunk: int = 1 << 22) -> np.ndarray:
        """Edge costs (float32): ``1 - sim``, or the learned ``model``'s, chunk by chunk.

        The learned cost is fitted on candidate-list edges only; beyond every list (a
        dense problem) it is extended by :meth:`beyond_lists` in fixed-cost units, so
        that the cost keeps rising as the similarity falls where no key point
        constrains the fit (a saturated MLP would otherwise give every far pair about
        the same cost, and an entropic plan would spread mass over all of them).
        """
        if model is None:
            return (1.0 - self.sim).astype(np.float32)
        out = np.empty(self.n_edges, dtype=np.float32)
        for lo in range(0, self.n_edges, chunk):
            sl = slice(lo, lo + chunk)
            out[sl] = model(self.sim[sl], self.features(scale, sl)) + self.beyond_lists(sl)
        return out


def _graph_from_lists(
    fwd: _Lists,
    rev: _Lists,
    n_rows: int,
    n_cols: int,
    *,
    row_mask: np.ndarray | None = None,
    col_mask: np.ndarray | None = None,
) -> _Graph:
    """Union of the forward (image -> captions) and reverse (caption -> images) lists.

    With ``row_mask`` / ``col_mask`` only edges touching a masked row or column are
    kept (the key points' edges when fitting the learned cost).
    """
    itype = np.int32 if max(n_rows, n_cols) < 2**31 else np.int64
    fr = np.repeat(np.arange(fwd.idx.shape[0], dtype=itype), fwd.idx.shape[1])
    fc = fwd.idx.ravel().astype(itype)
    rc = np.repeat(np.arange(rev.idx.shape[0], dtype=itype), rev.idx.shape[1])
    rr = rev.idx.ravel().astype(itype)
    keep_f = fc >= 0
    keep_r = rr >= 0
    if row_mask is not None or col_mask is not None:
        rm = np.zeros(n_rows, dtype=bool) if row_mask is None else row_mask
        cm = np.zeros(n_cols, dtype=bool) if col_mask is None else col_mask
        keep_f &= rm[fr] | cm[np.maximum(fc, 0)]
        keep_r &= cm[rc] | rm[np.maximum(rr, 0)]
    rows = np.concatenate([fr[keep_f], rr[keep_r]])
    del fr, rr
    cols = np.concatenate([fc[keep_f], rc[keep_r]])
    del fc, rc
    sims = np.concatenate([fwd.sims.ravel()[keep_f], rev.sims.ravel()[keep_r]])
    key = rows.astype(np.int64) * max(n_cols, 1) + cols
    order = np.argsort(key)
    key = key[order]
    first = np.ones(key.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]  # an edge found from both sides appears twice
    del key
    order = order[first]
    return _Graph(
        rows[order],
        cols[order],
        sims[order].astype(np.float32),
        _list_stats(fwd),
        _list_stats(rev),
    )


# --------------------------------------------------------------------------- solvers


def _pot_dense(
    cost: np.ndarray,
    allowed: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    *,
    mass: float,
    eps: float,
    max_iter: int,
    tol: float,
) -> tuple[np.ndarray, dict]:
    """The sparse problem on a full matrix, solved by POT (reference / small problems).

    ``mass`` is the fraction of ``min(sum a, sum b)`` to move, as in
    :func:`partial_transport`. POT stops on the L2 norm of the column-marginal error:
    the relative tolerance is scaled by the smallest marginal so that every row is
    converged.
    """
    m = float(mass) * min(a.sum(), b.sum())
    return partial_plan(
        cost,
        a,
        b,
        m,
        reg=eps,
        forbid=~allowed,
        method="sinkhorn_log",
        max_iter=max_iter,
        tol=tol,
        relative_tol=True,
        log=True,
    )


# --------------------------------------------------------------------------- rounding


def _row_shares(rows: np.ndarray, q: np.ndarray, cap: np.ndarray, top: int) -> np.ndarray:
    """Each edge's share of its image's mass among its ``top`` heaviest edges and abstention.

    ``q`` is the mass on each edge in row units (1 = one row's whole mass) and ``cap``
    the number of rows of each image node. The share of edge (i, j) is
    ``q_ij / D_i`` with ``D_i = (sum of the top * cap_i heaviest q_i. + abstained
    mass of i) / cap_i``, where the abstained mass is ``cap_i - sum_j q_ij``.

    Mass beyond an image's ``top`` heaviest edges is left out of ``D_i``: entropic
    transport spreads a little mass over every allowed caption, and on a complete
    problem the sum of those slivers grows with the number of suspects (about 8 % of
    a row's mass lies outside its 32 nearest candidates on 2,400 Flickr8k suspects
    at the default ``reg``). A candidate graph drops that spread and gives its mass
    to the kept edges and to abstention in the same proportion; leaving it out of
    ``D_i`` makes the share the same quantity for a dense and a sparse plan, and
    independent of how many suspects there are.
    """
    n_r = cap.size
    q = np.asarray(q, dtype=np.float64)
    total = np.bincount(rows, weights=q, minlength=n_r)
    abstained = np.maximum(cap - total, 0.0)
    # slivers far below a proposal do not change a top sum: leave them out
    sel = np.flatnonzero(q > 1e-6)
    r, qq = rows[sel], q[sel]
    # rows whose edges all fit in their top sum need no sorting
    big = (np.bincount(r, minlength=n_r) > top * cap)[r]
    top_sum = np.bincount(r[~big], weights=qq[~big], minlength=n_r).astype(np.float64)
    if big.any():
        r, qq = r[big], qq[big]
        # one float sort: row-major, decreasing mass inside a row (key in (r, r + 1])
        key = r.astype(np.float64) + (1.0 - qq / (float(qq.max()) * (1.0 + 1e-9)))
        order = np.argsort(key, kind="stable")
        r, qq = r[order], qq[order]
        first = np.searchsorted(r, np.arange(n_r))
        rank = np.arange(r.size) - first[r]
        keep = rank < top * cap[r]
        top_sum += np.bincount(r[keep], weights=qq[keep], minlength=n_r)
    denom = (top_sum + abstained) / cap
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom[rows] > 0, q / denom[rows], 0.0)


def _round_plan(
    rows: np.ndarray,
    cols: np.ndarray,
    share: np.ndarray,
    img: _Nodes,
    cap: _Nodes,
    n: int,
    q_min: float,
    loop_below: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy partial matching of rows to caption rows in decreasing share.

    ``share`` is each edge's confidence before clipping to 1 (see
    :func:`_row_shares`). Edges are taken in decreasing share while the image node has
    a free row and the caption node a free member (a text held by several rows can go
    to several images, one copy each). An edge is used at most once: an image never
    receives the same caption text twice. Ties are broken by image node, then
    caption node, so a dense and a sparse plan round the same way.

    The greedy is run in rounds: every edge that is the heaviest remaining edge of
    both its image and its caption is taken at once (the greedy takes it whatever
    the order of the others), capacities are updated, and the next round looks at
    the edges left; once fewer than ``loop_below`` edges are left they go through a
    plain loop.
    """
    cand = np.full(n, -1, dtype=np.int64)
    conf = np.zeros(n, dtype=np.float64)
    sel = np.flatnonzero(share > q_min)
    if sel.size == 0:
        return cand, conf
    r, c = rows[sel].astype(np.int64), cols[sel].astype(np.int64)
    qq = np.minimum(share[sel].astype(np.float64), 1.0)
    # a strict total order: share, then image node, then caption node (the edges come
    # sorted by image, then caption, from every solver: a stable sort on share suffices)
    key_rc = r * (int(c.max()) + 1) + c
    if key_rc.size < 2 or bool(np.all(key_rc[1:] > key_rc[:-1])):
        order = np.argsort(-share[sel], kind="stable")
    else:
        order = np.lexsort((c, r, -share[sel]))
    del key_rc
    r, c, qq = r[order], c[order], qq[order]
    weight = np.arange(r.size, 0, -1, dtype=np.int64)  # distinct, decreasing
    used_r = np.zeros(img.size, dtype=np.int64)
    used_c = np.zeros(cap.size, dtype=np.int64)

    def take(e: np.ndarray) -> None:
        ri, ci = r[e], c[e]
        # several edges of one node in a round only when its capacity allows: rank them
        row_slot = used_r[ri] + _rank_within(ri)
        col_slot = used_c[ci] + _rank_within(ci)
        row = img.order[img.start[ri] + row_slot]
        cand[row] = cap.order[cap.start[ci] + col_slot]
        conf[row] = qq[e]
        np.add.at(used_r, ri, 1)
        np.add.at(used_c, ci, 1)

    live = np.arange(r.size)
    while live.size > loop_below:
        lr_, lc_ = r[live], c[live]
        best_r = np.zeros(img.size, dtype=np.int64)
        best_c = np.zeros(cap.size, dtype=np.int64)
        np.maximum.at(best_r, lr_, weight[live])
        np.maximum.at(best_c, lc_, weight[live])
        dom = live[(weight[live] == best_r[lr_]) & (weight[live] == best_c[lc_])]
        take(dom)
        done = np.zeros(r.size, dtype=bool)
        done[dom] = True
        live = live[~done[live]]
        live = live[(used_r[r[live]] < img.cap[r[live]]) & (used_c[c[live]] < cap.cap[c[live]])]
    # the rest in order (live is sorted by decreasing weight)
    cap_r, cap_c = img.cap, cap.cap
    for e in live.tolist():
        ri, ci = r[e], c[e]
        ur, uc = used_r[ri], used_c[ci]
        if ur >= cap_r[ri] or uc >= cap_c[ci]:
            continue
        row = img.order[img.start[ri] + ur]
        cand[row] = cap.order[cap.start[ci] + uc]
        conf[row] = qq[e]
        used_r[ri] = ur + 1
        used_c[ci] = uc + 1
    return cand, conf


def _rank_within(ids: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... for repeated values of ``ids`` (in order of appearance)."""
    if ids.size == 0:
        return ids
    order = np.argsort(ids, kind="stable")
    srt = ids[order]
    first = np.r_[True, srt[1:] != srt[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(srt.size), 0))
    out = np.empty(ids.size, dtype=np.int64)
    out[order] = np.arange(srt.size) - start
    return out


# --------------------------------------------------------------------------- main entry


def _empty_result(n: int, info: dict) -> Rematch:
    return Rematch(
        np.full(n, -1, dtype=np.int64),
        np.zeros(n, dtype=np.float64),
        np.full(n, -1, dtype=np.int64),
        np.zeros(n, dtype=np.float64),
        info,
    )


def propose_captions(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    suspects: np.ndarray,
    *,
    image_group: np.ndarray | None = None,
    text_group: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    clean: np.ndarray | None = None,
    mass: float = 0.8,
    reg: float = 0.4,
    reg_units: str = "std",
    cost: str = "learned",
    solver: str = "auto",
    pool: str = "suspects",
    k: int = 32,
    block_size: int = 4096,
    batch_size: int = 128,
    min_confidence: float = 0.6,
    key_fraction: float = 0.1,
    max_iter: int = 1000,
    tol: float = 1e-4,
    seed: int | np.random.Generator | None = None,
    progress: Progress | None = None,
    captions: np.ndarray | None = None,
    cost_model: EdgeCost | None = None,
) -> Rematch:
    # long: numpydoc of 90 lines; settings checks and solver dispatch, not yet split
    """Propose, for each suspect row, the row whose caption fits its image.

    Parameters
    ----------
    image_emb, text_emb : ndarray, shape (n, d)
        Row-aligned L2-normalised embeddings (cosine = inner product). Rows with a
        non-finite value are treated as invalid.
    suspects : ndarray
        Boolean mask (n,) or row indices of the suspected mismatched rows. Empty:
        nothing to rematch, every row gets ``-1`` (``info["reason"]`` says so).
    image_group : ndarray, shape (n,), optional
        Rows showing the same image share a value (several captions per image).
        Default: every row is its own image.
    text_group : ndarray, shape (n,), optional
        Rows whose caption texts are identical share a value. Default: all distinct.
    valid : ndarray, shape (n,) bool, optional
        Rows that can be used; default: rows with finite embeddings.
    clean : ndarray, optional
        Mask or indices of confidently clean rows, the source of the key points that
        fit the learned cost (``cost="learned"`` or ``"paper"``). Default: every
        valid non-suspect row. Suspect rows are never used as keys.
    mass : float
        Fraction in (0, 1] of the suspects' mass transported to real captions; the
        rest is left unmatched (partial transport).
    reg : float
        Entropic regularisation. With ``reg_units="std"`` (default) it is in units of
        the standard deviation of the similarities between each suspect image and its
        10 nearest candidate captions, so one value suits embedding models with narrow
        (CLIP) or wide similarity bands; with ``"cost"`` it is in cost units, as in
        POT. ``info["eps"]`` records the value in cost units.
    reg_units : {"std", "cost"}
        Units of ``reg`` (see above).
    cost : {"learned", "fixed", "paper"}
        ``"fixed"``: ``1 - similarity``. ``"learned"``: edge-wise MLP correction of
        it (:class:`pmpclean.cost.EdgeCost`, the mean of 3 fits) fitted on clean key
        points planted among the suspects (``key_fraction`` of them, at most 500);
        falls back to ``"fixed"`` when fewer than 16 clean rows can be planted (with a
        warning) or when no fit beats the fixed cost on held-out keys
        (``info["cost_fallback"]`` says why; ``info["cost_used"]``).
        ``"paper"``: the L2RM cost network of width ``batch_size``, which only works
        inside batches (implies ``solver="batch"``).
    solver : {"auto", "sparse", "dense", "batch"}
        ``"sparse"``: transport on the k-nearest-neighbour candidate graph (memory
        O(n k)). ``"dense"``: on every (suspect, candidate) pair with POT; refused
        above ``block_size`` image or caption nodes. ``"batch"``: the paper's
        scheme, independent transport inside random batches of ``batch_size``
        suspects. ``"auto"``: ``"batch"`` for ``cost="paper"``, else ``"sparse"``.
    pool : {"suspects", "all"}
        Candidate captions: those of the suspect rows (the shuffle protocol moves a
        mismatched image's true caption to another suspect row), or every valid row.
    k : int
        Candidates per suspect image and suspect images per candidate caption; also
        the number of heaviest edges a row's confidence is measured against.
    block_size : int
        Largest number of nodes per side for which a dense matrix is allowed.
    batch_size : int
        Batch size of ``solver="batch"`` (the paper uses 128).
    min_confidence : float
        In [0, 1]: proposals whose confidence is below it are withheld (abstention).
        The default 0.6 gave precision >= 0.95 on Flickr8k pairs at 20-80 % noise,
        with detected as well as true suspects, over three seeds (0.5: 0.87-0.96).
    key_fraction : float
        Key points planted per suspect image node when fitting a learned cost.
    max_iter, tol : int, float
        Sinkhorn iteration cap and relative L1 marginal error at which it stops.
    seed : int, Generator or None
        Key sampling, batch assignment, cost initialisation and faiss training.
    progress : callable, optional
        Called as ``progress(stage, done, total)``.
    captions : ndarray, optional
        Mask or indices of the rows whose captions are the candidates (valid rows
        only); overrides ``pool``. A partition of a larger problem (the Ray engine's
        rematch by coarse cell) offers its own captions, not those of its suspects.
    cost_model : EdgeCost, optional
        A learned cost fitted before (:attr:`Rematch.cost_model` of another problem):
        used as it is, with its ``scale``, instead of fitting one here (no key points
        are planted). Only with ``cost="learned"`` and the graph solvers.

    Returns
    -------
    Rematch

    Raises
    ------
    ConfigError
        A setting is out of range or unknown.
    RematchError
        The inputs cannot pose a rematch problem (shapes, masks, indices).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.eye(4, dtype=np.float32)
    >>> txt = img[[1, 0, 2, 3]]          # rows 0 and 1 have swapped captions
    >>> r = propose_captions(img, txt, np.array([0, 1]), cost="fixed", k=2)
    >>> r.proposed_row.tolist()
    [1, 0, -1, -1]
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    check_settings(
        RematchSettings(
            cost=cost,
            solver=solver,
            pool=pool,
            reg_units=reg_units,
            mass=mass,
            reg=reg,
            k=k,
            block_size=block_size,
            batch_size=batch_size,
            min_confidence=min_confidence,
            key_fraction=key_fraction,
            max_iter=max_iter,
            tol=tol,
        )
    )
    if solver == "auto":
        solver = "batch" if cost == "paper" else "sparse"
    if cost == "paper" and solver != "batch":
        raise ConfigError(
            f"cost='paper' needs solver='batch' (its network input width is the batch size), "
            f"got solver={solver!r}; use solver='batch' or cost='learned'."
        )
    if cost == "learned" and solver == "batch":
        raise ConfigError(
            "cost='learned' works on the candidate graph; solver='batch' supports "
            "cost='fixed' or 'paper'. Use solver='sparse' (default) or 'dense'."
        )
    if cost == "paper" and pool != "suspects":
        raise ConfigError(
            "cost='paper' rematches inside batches of suspects and needs pool='suspects'."
        )

    img_e = _as_rows(image_emb)
    txt_e = _as_rows(text_emb)
    if img_e.ndim != 2 or txt_e.ndim != 2 or img_e.shape != txt_e.shape:
        raise RematchError(
            f"image_emb and text_emb must be row-aligned (n, d) arrays of one shape, got "
            f"{img_e.shape} and {txt_e.shape}."
        )
    n = img_e.shape[0]
    sus = _as_mask(suspects, n, "suspects")
    assert sus is not None
    finite = np.ones(n, dtype=bool)
    for lo in range(0, n, _CHUNK):  # chunks: no (n, d) boolean temporary
        sl = slice(lo, lo + _CHUNK)
        finite[sl] = np.isfinite(img_e[sl]).all(axis=1) & np.isfinite(txt_e[sl]).all(axis=1)
    val = _as_mask(valid, n, "valid")
    val = finite if val is None else (val & finite)
    ig = _as_groups(image_group, n, "image_group")
    tg = _as_groups(text_group, n, "text_group")
    rng = check_random_state(seed)
    faiss_seed = int(rng.integers(0, 2**31 - 1))

    n_invalid_sus = int((sus & ~val).sum())
    sus &= val
    info: dict = {
        "n_rows": n,
        "n_suspects": int(sus.sum()),
        "n_invalid_suspects": n_invalid_sus,
        "mass": float(mass),
        "reg": float(reg),
        "reg_units": reg_units,
        "cost": cost,
        "solver": solver,
        "pool": pool,
        "k": int(k),
        "min_confidence": float(min_confidence),
        "timings": timings,
    }
    if n_invalid_sus:
        warnings.warn(
            f"{n_invalid_sus} suspect rows have invalid embeddings and get no proposal.",
            stacklevel=2,
        )
    if not sus.any():
        info["reason"] = "no suspects: nothing to rematch"
        return _empty_result(n, info)

    info.update({"cost_fit": {"given": True}} if cost_model is not None else {})
    pool_mask = _pool_mask(captions, pool, sus, val, n)
    img = _make_nodes(np.flatnonzero(sus), ig)
    cap = _make_nodes(np.flatnonzero(pool_mask), tg)
    info.update(n_image_nodes=img.size, n_caption_nodes=cap.size)

    # Existing (image, caption text) pairs: forbidden as proposals (original pairing,
    # its duplicates, and any caption the image already has in another row).
    n_tg = int(tg.max()) + 1
    existing = np.unique(ig * n_tg + tg)

    def is_existing(img_code: np.ndarray, txt_code: np.ndarray) -> np.ndarray:
        key = img_code * n_tg + txt_code
        pos = np.minimum(np.searchsorted(existing, key), existing.size - 1)
        return existing[pos] == key

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    if cost == "paper" or solver == "batch":
        res = _rematch_batches(
            img_e,
            txt_e,
            img,
            cap,
            ig,
            tg,
            val,
            sus,
            clean,
            is_existing,
            n,
            info,
            cost=cost,
            mass=mass,
            reg=reg,
            reg_units=reg_units,
            batch_size=batch_size,
            max_iter=max_iter,
            tol=tol,
            rng=rng,
            report=report,
            timings=timings,
        )
    else:
        res = _rematch_graph(
            img_e,
            txt_e,
            img,
            cap,
            ig,
            tg,
            val,
            sus,
            clean,
            is_existing,
            n,
            info,
            cost=cost,
            mass=mass,
            reg=reg,
            reg_units=reg_units,
            solver=solver,
            k=k,
            block_size=block_size,
            key_fraction=key_fraction,
            max_iter=max_iter,
            tol=tol,
            rng=rng,
            faiss_seed=faiss_seed,
            report=report,
            timings=timings,
            cost_model=cost_model,
        )
    if res is None:  # no edge: nothing can be proposed; reason already in info
        return _empty_result(n, info)
    rows, cols, q, model = res
    t = time.perf_counter()
    report("rematch: proposals", 0, 1)
    share = _row_shares(rows, q, img.cap.astype(np.float64), int(k))
    cand, conf = _round_plan(rows, cols, share, img, cap, n, q_min=_Q_MIN)
    conf = np.clip(conf, 0.0, 1.0)
    take = (cand >= 0) & (conf >= min_confidence)
    proposed = np.where(take, cand, -1)
    confidence = np.where(take, conf, 0.0)
    timings["proposals"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    info["n_candidates"] = int((cand >= 0).sum())
    info["n_proposals"] = int(take.sum())
    report("rematch: proposals", 1, 1)
    return Rematch(proposed, confidence, cand, conf, info, model)


#: The earlier name of :func:`propose_captions`, kept: public (README's stage list) and
#: called by that name in :mod:`pmpclean.train.targets`. "rematch" is also the command
#: that writes a cleaned manifest (:func:`pmpclean.pipeline.rematch`); this stage only
#: proposes captions for suspect rows.
rematch = propose_captions


def _unit_masses(img: _Nodes, cap: _Nodes) -> tuple[np.ndarray, np.ndarray, float]:
    """Node masses in row units scaled so that the suspect side sums to 1."""
    unit = float(img.cap.sum())
    return img.cap / unit, cap.cap / unit, unit


def _key_rows(clean, val, sus, ig, tg, n, n_images, key_fraction, rng) -> np.ndarray | None:
    """The key points of the learned cost (clean rows to plant), or None (too few)."""
    clean_mask = _as_mask(clean, n, "clean")
    clean_mask = (val & ~sus) if clean_mask is None else (clean_mask & val & ~sus)
    cand_keys = plantable_rows(clean_mask, sus, ig, tg)
    n_keys = min(cand_keys.size, max(16, int(round(key_fraction * n_images))), _MAX_KEYS)
    if n_keys < 16:
        warnings.warn(
            "the learned cost (--cost learned) needs at least 16 clean rows to plant as "
            f"key points, found {cand_keys.size}; using the fixed cost (--cost fixed). "
            "Audit more rows, so that more pairs are kept as clean.",
            stacklevel=4,
        )
        return None
    return np.sort(rng.choice(cand_keys, size=n_keys, replace=False))


def _rematch_graph(
    img_e,
    txt_e,
    img,
    cap,
    ig,
    tg,
    val,
    sus,
    clean,
    is_existing,
    n,
    info,
    *,
    cost,
    mass,
    reg,
    reg_units,
    solver,
    k,
    block_size,
    key_fraction,
    max_iter,
    tol,
    rng,
    faiss_seed,
    report,
    timings,
    cost_model=None,
):
    # long: the sparse global rematch end to end (graph, cost, transport, proposals)
    t = time.perf_counter()
    if solver == "dense" and max(img.size, cap.size) > block_size:
        raise ConfigError(
            f"solver='dense' builds a {img.size} x {cap.size} matrix, above "
            f"block_size={block_size}; use solver='sparse' (default) or raise block_size."
        )
    # ---- key points (learned cost): clean pairs planted among the suspects
    keys = np.zeros(0, dtype=np.int64)
    if cost == "learned" and cost_model is None:
        keys = _key_rows(clean, val, sus, ig, tg, n, img.size, key_fraction, rng)
        if keys is None:
            cost = "fixed"
            info["cost_fallback"] = "too few clean key points"
            keys = np.zeros(0, dtype=np.int64)
    n_key = keys.size
    # key caption nodes: the pool node holding the key's text, else a new node
    key_cap = np.minimum(np.searchsorted(cap.code, tg[keys]), max(cap.size - 1, 0))
    key_cap = np.where(cap.code[key_cap] == tg[keys], key_cap, -1) if cap.size else key_cap - 1
    new_key = np.flatnonzero(key_cap < 0)
    key_cap[new_key] = cap.size + np.arange(new_key.size)
    n_r, n_c = img.size, cap.size
    n_rk, n_ck = n_r + n_key, n_c + new_key.size
    img_rows = np.concatenate([img.rep, keys])
    cap_rows = np.concatenate([cap.rep, keys[new_key]])
    # in the embeddings' own dtype (float16 as pmpclean holds them: knn_search turns
    # them into float32 a block at a time; the same similarities at half the memory)
    q_img = np.ascontiguousarray(img_e[img_rows])
    b_txt = np.ascontiguousarray(txt_e[cap_rows])
    r_code = ig[img_rows]
    c_code = tg[cap_rows]
    key_of_row = np.full(n_rk, -1, dtype=np.int64)
    key_of_row[n_r:] = key_cap

    def forbidden_fwd(qi: np.ndarray, bi: np.ndarray) -> np.ndarray:
        return is_existing(r_code[qi], c_code[bi]) & (key_of_row[qi] != bi)

    def forbidden_rev(qi: np.ndarray, bi: np.ndarray) -> np.ndarray:
        return is_existing(r_code[bi], c_code[qi]) & (key_of_row[bi] != qi)

    # how many forbidden entries a list can hold: search that many more
    row_forb = np.bincount(ig, minlength=int(ig.max()) + 1)  # rows per image group
    txt_forb = np.bincount(tg, minlength=int(tg.max()) + 1)  # rows per caption text
    extra_f = int(min(row_forb[r_code].max(initial=0), 4 * k + 64))
    extra_r = int(min(txt_forb[c_code].max(initial=0), 4 * k + 64))
    extra_key = (k // 4 + 1) if n_key else 0  # room for planted entries dropped later
    report("rematch: neighbours", 0, 2)
    fwd = _search_allowed(
        q_img, b_txt, k + extra_key, k + extra_key + extra_f, forbidden_fwd, faiss_seed
    )
    report("rematch: neighbours", 1, 2)
    rev = _search_allowed(
        b_txt, q_img, k + extra_key, k + extra_key + extra_r, forbidden_rev, faiss_seed
    )
    report("rematch: neighbours", 2, 2)
    del q_img, b_txt
    timings["neighbours"] = time.perf_counter() - t

    # inference lists: without key nodes
    fwd_inf = _compact(
        fwd.sims[:n_r], fwd.idx[:n_r], (fwd.idx[:n_r] >= 0) & (fwd.idx[:n_r] < n_c), k
    )
    rev_inf = _compact(
        rev.sims[:n_c], rev.idx[:n_c], (rev.idx[:n_c] >= 0) & (rev.idx[:n_c] < n_r), k
    )
    top = fwd_inf.sims[:, :_SCALE_K]
    fin = top[np.isfinite(top)].astype(np.float64)
    scale = float(np.std(fin)) if fin.size > 1 else 0.0
    if not np.isfinite(scale) or scale <= 1e-6:
        scale = 1e-3
    # a given cost reads its features in its own units
    scale = scale if cost_model is None else float(cost_model.scale)
    eps = float(reg) * scale if reg_units == "std" else float(reg)
    info.update(scale=scale, eps=eps)

    if solver == "dense":
        rr, cc = np.meshgrid(np.arange(n_r), np.arange(n_c), indexing="ij")
        rr, cc = rr.ravel(), cc.ravel()
        ok = ~is_existing(ig[img.rep][rr], tg[cap.rep][cc])
        rr, cc = rr[ok], cc[ok]
        full_sim = img_e[img.rep].astype(np.float32) @ txt_e[cap.rep].astype(np.float32).T
        graph = _Graph(rr, cc, full_sim[rr, cc], _list_stats(fwd_inf), _list_stats(rev_inf))
        del full_sim
    else:
        graph = _graph_from_lists(fwd_inf, rev_inf, n_r, n_c)
    info["n_edges"] = graph.n_edges
    if graph.n_edges == 0:
        info["reason"] = (
            "no allowed candidate: every candidate caption is the suspect's own caption, a "
            "duplicate of it, or one its image already has (e.g. a single suspect); "
            "pool='all' also offers the captions of clean rows"
        )
        return None

    # ---- cost
    t = time.perf_counter()
    report("rematch: cost", 0, 1)
    model = cost_model if cost == "learned" else None
    if cost == "learned" and model is None:
        # the key points' edges, in the graph that includes them
        col_seg = np.full(n_ck, -1, dtype=np.int64)
        col_seg[key_cap] = np.arange(n_key)
        train = _graph_from_lists(
            fwd, rev, n_rk, n_ck, row_mask=np.arange(n_rk) >= n_r, col_mask=col_seg >= 0
        )
        tr_row = np.where(train.rows >= n_r, train.rows.astype(np.int64) - n_r, -1)
        tr_col = col_seg[train.cols]
        is_true = (train.rows >= n_r) & (key_of_row[train.rows] == train.cols)
        feats = train.features(scale)
        # an ensemble of fits (held-out split and initialisation differ) averages out
        # the variance of a single fit on a few hundred keys
        fits = [
            fit_edge_cost(
                feats,
                train.sim,
                tr_row,
                tr_col,
                is_true,
                scale=scale,
                temperature=eps,
                use=_EDGE_FEATURES,
                seed=child,
            )
            for child in rng.spawn(_N_FITS)
        ]
        del train, feats
        kept = [m for m in fits if m.info.get("kept")]
        info["cost_fit"] = {
            "n_keys": int(n_key),
            "features": list(_EDGE_FEATURES),
            "n_fits": len(fits),
            "n_kept": len(kept),
            "holdout_loss_fixed": [m.info.get("holdout_loss_fixed") for m in fits],
            "holdout_loss_learned": [m.info.get("holdout_loss_learned") for m in fits],
        }
        if kept:
            model = average_costs(kept)
        else:  # the fixed cost is already as good on the keys: nothing to warn about
            reason = fits[0].info.get("reason", "fit not kept")
            logger.info("cost='learned' kept the fixed cost: %s", reason)
            info["cost_fallback"] = reason
            cost = "fixed"
    del fwd, rev, fwd_inf, rev_inf
    edge_cost = graph.cost(model, scale)
    info["cost_used"] = cost
    timings["cost"] = time.perf_counter() - t
    report("rematch: cost", 1, 1)

    # ---- transport
    t = time.perf_counter()
    report("rematch: transport", 0, 1)
    a, b, unit = _unit_masses(img, cap)
    if solver == "dense":
        full = np.zeros((n_r, n_c))
        allowed = np.zeros((n_r, n_c), dtype=bool)
        full[graph.rows, graph.cols] = edge_cost
        allowed[graph.rows, graph.cols] = True
        plan, sinfo = _pot_dense(
            full, allowed, a, b, mass=mass, eps=eps, max_iter=max_iter, tol=tol
        )
        q = plan[graph.rows, graph.cols] * unit
    else:
        log_plan, sinfo = partial_transport(
            graph.rows,
            graph.cols,
            edge_cost,
            a,
            b,
            mass=mass,
            eps=eps,
            max_iter=max_iter,
            tol=tol,
        )
        q = np.exp(log_plan) * np.float32(unit)
        del log_plan
    info.update(iterations=sinfo["iterations"], converged=sinfo["converged"])
    if "marginal_error" in sinfo:
        info["marginal_error"] = sinfo["marginal_error"]
    if not sinfo["converged"]:
        warnings.warn(
            f"rematch transport did not converge in {max_iter} iterations "
            f"(marginal error {sinfo.get('marginal_error', float('nan')):.2g}); proposals are "
            "approximate. Lower --mass, or raise audit.reg in a --config file.",
            stacklevel=3,
        )
    timings["transport"] = time.perf_counter() - t
    report("rematch: transport", 1, 1)
    return graph.rows, graph.cols, q, model


def _rematch_batches(
    img_e,
    txt_e,
    img,
    cap,
    ig,
    tg,
    val,
    sus,
    clean,
    is_existing,
    n,
    info,
    *,
    cost,
    mass,
    reg,
    reg_units,
    batch_size,
    max_iter,
    tol,
    rng,
    report,
    timings,
):
    # long: the batch solver end to end (random batches, cost, plans, proposals), not yet split
    """The paper's scheme: independent partial transport inside random batches."""
    t = time.perf_counter()
    n_r, n_c = img.size, cap.size
    bsz = int(batch_size)
    n_blocks = -(-n_r // bsz)
    perm = rng.permutation(n_r)
    row_block = np.empty(n_r, dtype=np.int64)
    row_block[perm] = np.arange(n_r) // bsz
    # a caption joins the batch of its first row's image, as the pair sits in one batch
    # of the paper's loader; a caption of a non-suspect row (pool="all") a random batch
    node_of_row = np.full(n, -1, dtype=np.int64)
    node_of_row[img.order] = np.repeat(np.arange(n_r), img.cap)
    owner = node_of_row[cap.rep]
    col_block = np.where(
        owner >= 0, row_block[np.maximum(owner, 0)], rng.integers(0, n_blocks, size=n_c)
    )
    rows_l, cols_l, sims_l, pos_l = [], [], [], []
    for blk in range(n_blocks):
        r = np.flatnonzero(row_block == blk)
        c = np.flatnonzero(col_block == blk)
        if r.size == 0 or c.size == 0:
            continue
        s = img_e[img.rep[r]].astype(np.float32) @ txt_e[cap.rep[c]].astype(np.float32).T
        rr, cc = np.meshgrid(np.arange(r.size), np.arange(c.size), indexing="ij")
        rows_l.append(r[rr.ravel()])
        cols_l.append(c[cc.ravel()])
        sims_l.append(s.ravel())
        pos_l.append((blk, r, c, s))
    rows = np.concatenate(rows_l) if rows_l else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(cols_l) if cols_l else np.zeros(0, dtype=np.int64)
    sim = np.concatenate(sims_l) if sims_l else np.zeros(0, dtype=np.float32)
    edge_cost = 1.0 - sim.astype(np.float64)
    if cost == "paper":
        net = _fit_paper(img_e, txt_e, sus, val, clean, n, pos_l, bsz, rng, info)
        parts = []
        for _blk, r, c, s in pos_l:
            if c.size > bsz:
                raise RematchError(
                    f"a batch holds {c.size} captions, more than batch_size={bsz}: the paper's "
                    "network cannot take it; use cost='fixed' or a larger batch_size."
                )
            padded = np.zeros((r.size, bsz), dtype=np.float32)
            padded[:, : c.size] = s
            parts.append(net(padded)[:, : c.size].ravel())
        if parts:
            edge_cost = np.concatenate(parts).astype(np.float64)
    info["cost_used"] = cost
    ok = ~is_existing(ig[img.rep][rows], tg[cap.rep][cols])
    rows, cols, sim, edge_cost = rows[ok], cols[ok], sim[ok], edge_cost[ok]
    order = np.lexsort((cols, rows))
    rows, cols, sim, edge_cost = rows[order], cols[order], sim[order], edge_cost[order]
    info.update(n_blocks=int(n_blocks), n_edges=int(rows.size))
    tops = [np.sort(s_, axis=1)[:, ::-1][:, :_SCALE_K].ravel() for _, _, _, s_ in pos_l]
    top = np.concatenate(tops) if tops else np.zeros(0)
    scale = float(np.std(top)) if top.size > 1 else 1e-3
    scale = scale if scale > 1e-6 else 1e-3
    eps = float(reg) * scale if reg_units == "std" else float(reg)
    info.update(scale=scale, eps=eps)
    timings["cost"] = time.perf_counter() - t
    if rows.size == 0:
        info["reason"] = (
            "no allowed candidate inside any batch: every caption in a suspect's batch is its "
            "own caption, a duplicate of it, or one its image already has"
        )
        return None
    t = time.perf_counter()
    report("rematch: transport", 0, 1)
    a, b, unit = _unit_masses(img, cap)
    log_plan, sinfo = partial_transport(
        rows,
        cols,
        edge_cost,
        a,
        b,
        mass=mass,
        eps=eps,
        row_block=row_block,
        col_block=col_block,
        max_iter=max_iter,
        tol=tol,
    )
    # per-batch mass: confidences are relative to a row's own mass
    q = np.exp(log_plan) * unit
    info.update(
        iterations=sinfo["iterations"],
        converged=sinfo["converged"],
        marginal_error=sinfo["marginal_error"],
    )
    timings["transport"] = time.perf_counter() - t
    report("rematch: transport", 1, 1)
    return rows, cols, q, None  # the paper's cost is not an EdgeCost


def _fit_paper(img_e, txt_e, sus, val, clean, n, blocks, bsz, rng, info) -> PaperCost:
    """Train the paper's network as its code does: one step per batch.

    Each step takes a clean batch of ``bsz`` captions, a queue of ``bsz`` suspect
    images in which 1..bsz/10 slots are replaced by clean images of that batch (the
    key points), and lowers the cost of the keys' true pairings.
    """
    clean_mask = _as_mask(clean, n, "clean")
    clean_mask = (val & ~sus) if clean_mask is None else (clean_mask & val & ~sus)
    clean_rows = np.flatnonzero(clean_mask)
    sus_rows = np.flatnonzero(sus)
    if clean_rows.size < bsz:
        net = PaperCost(
            -np.eye(bsz, dtype=np.float32),
            np.ones(bsz, dtype=np.float32),
            {"steps": 0, "reason": f"fewer than batch_size={bsz} clean rows"},
        )
        info["cost_fit"] = dict(net.info)
        return net
    sims_t, sup_t = [], []
    for _ in blocks:
        batch = rng.choice(clean_rows, size=bsz, replace=False)
        n_key = int(rng.integers(1, max(1, bsz // 10) + 1))
        sel = rng.choice(bsz, size=n_key, replace=False)
        queue = rng.choice(sus_rows, size=bsz, replace=sus_rows.size < bsz)
        imgs = img_e[queue].astype(np.float32)
        slots = rng.choice(bsz, size=n_key, replace=False)
        imgs[slots] = img_e[batch[sel]]
        sims_t.append(imgs @ txt_e[batch].astype(np.float32).T)
        sup = np.zeros((bsz, bsz), dtype=bool)
        sup[slots, sel] = True
        sup_t.append(sup)
    net = fit_paper_cost(np.stack(sims_t), np.stack(sup_t))
    info["cost_fit"] = dict(net.info)
    return net


class RowStack:
    """Rows of ``base`` followed by ``extra`` rows, without copying ``base``.

    What :func:`plant_among_suspects` returns for the embeddings: :func:`propose_captions` reads
    its embeddings only by rows (slices and index arrays), so a million-row array (or a
    memory-mapped one) gets its planted rows appended at the cost of the planted rows.
    """

    def __init__(self, base: np.ndarray, extra: np.ndarray) -> None:
        if base.ndim != 2 or extra.ndim != 2 or base.shape[1] != extra.shape[1]:
            raise ValueError("RowStack needs two 2-d arrays of one width.")
        self.base, self.extra = base, extra
        self.n_base = base.shape[0]
        self.shape = (self.n_base + extra.shape[0], base.shape[1])
        self.ndim = 2
        self.dtype = np.result_type(base.dtype, extra.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = np.where(rows < 0, rows + self.shape[0], rows).astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        out = np.empty(rows.shape + (self.shape[1],), dtype=self.dtype)
        low = rows < self.n_base
        out[low] = self.base[rows[low]]
        out[~low] = self.extra[rows[~low] - self.n_base]
        return out

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        whole = np.concatenate([np.asarray(self.base), np.asarray(self.extra)])
        return whole if dtype is None else whole.astype(dtype)


def _as_rows(x: object) -> np.ndarray | RowStack:
    """``x`` as an array, a :class:`RowStack` as it is (read by rows, never copied)."""
    return x if isinstance(x, RowStack) else np.asarray(x)


def plant_among_suspects(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    suspects: np.ndarray,
    image_group: np.ndarray,
    text_group: np.ndarray,
    clean: np.ndarray,
    planted: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """The rematch problem with the ``planted`` clean rows added as known mismatches.

    The planted rows (from :func:`plantable_rows`) are appended with their captions
    deranged among themselves (planted image t shows the caption of planted row t-1).
    A planted image gets a fresh image id, so its own caption stays allowed; a planted
    caption keeps its text id, so a real suspect is still never offered a caption its
    image already has. The planted rows are no key points of the learned cost.

    Returns
    -------
    tuple
        ``image_emb, text_emb, suspects, image_group, text_group, clean`` of n + m rows
        (the embeddings as :class:`RowStack` views: the input arrays are not copied);
        right answer of planted row ``n + t``: the text id ``text_group[planted[t]]``.
    """
    m = planted.size
    shift = np.roll(np.arange(m), 1)
    keys = np.asarray(clean, dtype=bool).copy()
    keys[planted] = False
    return (
        RowStack(image_emb, np.asarray(image_emb[planted])),
        RowStack(text_emb, np.asarray(text_emb[planted[shift]])),
        np.concatenate([np.asarray(suspects, dtype=bool), np.ones(m, dtype=bool)]),
        np.concatenate([image_group, image_group.max() + 1 + np.arange(m)]),
        np.concatenate([text_group, text_group[planted[shift]]]),
        np.concatenate([keys, np.zeros(m, dtype=bool)]),
    )


#: The solver :func:`calibrated_rematch` runs (None: :func:`rematch`); an engine
#: installs its own with :func:`rematch_backend`, of the signature of :func:`rematch`.
_REMATCH_BACKEND: ContextVar[Callable[..., Rematch] | None] = ContextVar(
    "pmpclean_rematch_backend", default=None
)


@contextmanager
def rematch_backend(solve: Callable[..., Rematch] | None) -> Iterator[None]:
    """Run :func:`calibrated_rematch`'s transport with ``solve`` inside the block (e.g.
    the Ray engine's rematch partitioned by coarse cell); None keeps :func:`rematch`."""
    token = _REMATCH_BACKEND.set(solve)
    try:
        yield
    finally:
        _REMATCH_BACKEND.reset(token)


#: Clean pairs planted among the suspects by :func:`calibrated_rematch`.
N_PLANTED = 1000
#: Fewest planted proposals a calibration is fitted on.
_MIN_CALIBRATION = 20


def calibrated_rematch(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    suspects: np.ndarray,
    *,
    image_group: np.ndarray | None = None,
    text_group: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    clean: np.ndarray | None = None,
    n_planted: int = N_PLANTED,
    min_confidence: float = 0.6,
    seed: int | np.random.Generator | None = None,
    progress: Progress | None = None,
    **kwargs: object,
) -> Rematch:
    # long: the lead's (issue 18, the calibrated verdict); not refactored here
    """:func:`propose_captions` whose confidence is a probability, measured on planted pairs.

    Clean pairs of images without a suspect row (:func:`plantable_rows`, at most
    ``n_planted``) are planted among the suspects with their captions deranged among
    themselves, and transported with them: each planted image has one right caption,
    so the proposals the plan makes for them are labelled. An isotonic regression of
    "right" on the plan's confidence over those proposals maps every confidence to the
    share of proposals that are right at that confidence; ``rematch_confidence`` is that
    share, and a proposal is offered when it reaches ``min_confidence``. When the planted
    pairs do not come back (a model that cannot tell captions apart), no confidence
    reaches the cut and nothing is proposed. Proposals of planted captions to real
    suspects are dropped.

    With fewer than 20 planted proposals the plan's own confidence is kept and
    ``info["calibration"]["reason"]`` says why.

    Parameters
    ----------
    image_emb, text_emb, suspects, image_group, text_group, valid, clean, seed, progress
        As in :func:`propose_captions`.
    n_planted : int
        Most clean pairs planted.
    min_confidence : float
        Cut on the calibrated confidence.
    **kwargs
        Further :func:`propose_captions` settings (``mass``, ``reg``, ``cost``, ``k``, ...).

    Returns
    -------
    Rematch
        ``info["calibration"]``: ``n_planted``, ``n_answered``, ``precision`` (of the
        planted proposals at any confidence), ``reliability`` (bins of 0.1 of the
        calibrated confidence: proposals and share right, on the planted pairs).
    """
    from sklearn.isotonic import IsotonicRegression

    img = np.asarray(image_emb)
    txt = np.asarray(text_emb)
    n = img.shape[0]
    sus = _as_mask(suspects, n, "suspects")
    ig = np.unique(
        np.arange(n) if image_group is None else np.asarray(image_group), return_inverse=True
    )[1].ravel()
    tg = np.unique(
        np.arange(n) if text_group is None else np.asarray(text_group), return_inverse=True
    )[1].ravel()
    ok = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    cl = _as_mask(clean, n, "clean") if clean is not None else ok & ~sus
    rng = check_random_state(seed)
    planted = plantable_rows(cl & ok, sus, ig, tg, rng)[: max(int(n_planted), 0)]
    m = planted.size if planted.size >= 2 else 0
    planted = planted[:m]
    img2, txt2, sus2, ig2, tg2, clean2 = plant_among_suspects(img, txt, sus, ig, tg, cl, planted)
    rm = (_REMATCH_BACKEND.get() or propose_captions)(
        img2,
        txt2,
        sus2,
        image_group=ig2,
        text_group=tg2,
        valid=np.concatenate([ok, np.ones(m, dtype=bool)]),
        clean=clean2,
        min_confidence=0.0,
        seed=seed,
        progress=progress,
        **kwargs,  # type: ignore[arg-type]
    )
    cand = np.asarray(rm.candidate_row, dtype=np.int64)
    conf = np.asarray(rm.candidate_confidence, dtype=np.float64)
    got, got_conf = cand[n:], conf[n:]
    answered = got >= 0
    right = answered & (tg2[np.maximum(got, 0)] == tg[planted])
    real_cand = np.where(cand[:n] < n, cand[:n], -1)  # planted captions are not real
    real_conf = np.where(real_cand >= 0, conf[:n], 0.0)
    info = dict(rm.info)
    calib: dict = {"n_planted": int(m), "n_answered": int(answered.sum())}
    if answered.sum() >= _MIN_CALIBRATION:
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(got_conf[answered], right[answered].astype(np.float64))
        real_conf = np.where(real_cand >= 0, iso.predict(real_conf), 0.0)
        planted_cal = iso.predict(got_conf[answered])
        edges = np.linspace(0.0, 1.0, 11)
        which = np.clip(np.digitize(planted_cal, edges) - 1, 0, 9)
        calib.update(
            precision=float(right[answered].mean()),
            reliability=[
                {
                    "bin": [round(float(edges[b]), 1), round(float(edges[b + 1]), 1)],
                    "n": int((which == b).sum()),
                    "right": float(right[answered][which == b].mean())
                    if (which == b).any()
                    else None,
                }
                for b in range(10)
            ],
        )
    else:
        calib["reason"] = (
            f"only {int(answered.sum())} planted proposals (fewer than {_MIN_CALIBRATION}): "
            "the transport plan's own confidence is kept"
        )
    info["calibration"] = calib
    take = (real_cand >= 0) & (real_conf >= min_confidence)
    info["n_proposals"] = int(take.sum())
    return Rematch(
        proposed_row=np.where(take, real_cand, -1),
        rematch_confidence=np.where(take, real_conf, 0.0),
        candidate_row=real_cand,
        candidate_confidence=real_conf,
        info=info,
    )
