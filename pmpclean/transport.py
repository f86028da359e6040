"""Partial optimal transport: the only module that imports POT.

One problem, the entropic partial transport of a given mass between two weighted
point sets (Chapel et al., NeurIPS 2020), posed as a balanced problem with one dummy
row and one dummy column (:func:`with_dummies`) and solved two ways:

* :func:`partial_plan` on a full cost matrix, numpy or torch (POT's backends), by
  POT's Sinkhorn: the label audit (``method="sinkhorn"``, fast at its n x K shape),
  the dense rematch solver and the fine-tuning batch plans (:func:`partial_ot_plan`)
  (``method="sinkhorn_log"``).
* :func:`partial_transport` on a sparse bipartite graph, by log-domain Sinkhorn
  iterations over the edges (O(E) each) with epsilon-scaling: the dataset-scale
  rematch. Its tests compare it with POT on the dummy-extended problem.

References
----------
.. [1] Chapel, L., Alaya, M., Gasso, G. (2020). "Partial Optimal Transport with
   Applications on Positive-Unlabeled Learning". NeurIPS.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["METHODS", "partial_ot_plan", "partial_plan", "partial_transport", "with_dummies"]

logger = logging.getLogger(__name__)

#: Documented values of ``partial_plan(method=...)``: POT's Sinkhorn-Knopp
#: (multiplicative and fast; the costs are shifted and capped so that its kernel never
#: underflows) and its log-domain variant (slower, exact at any ``reg``).
METHODS = ("sinkhorn", "sinkhorn_log")

# A dummy holding at most this share of its side's total mass is left out.
_EMPTY = 1e-12
# Sinkhorn-Knopp's costs are capped at this many ``reg``: exp(-300) > 0 in float64.
_CAP = 300.0


# --------------------------------------------------------------------------- dense


def with_dummies(
    cost: Any, a: Any, b: Any, mass: float, *, allowed: Any | None = None
) -> tuple[Any, Any, Any]:
    """The balanced problem equivalent to the partial transport of ``mass``.

    A dummy row of mass ``sum(b) - mass`` and a dummy column of mass
    ``sum(a) - mass`` join every real point at cost 0; the dummy-to-dummy cell and the
    cells outside ``allowed`` get a cost no plan pays (1000 x the largest allowed
    cost, + 1000), so exactly ``mass`` moves between real points. A dummy that would
    hold (numerically) no mass is left out.

    Parameters
    ----------
    cost : ndarray or torch.Tensor, shape (n, m)
        Transport cost between the real points.
    a, b : same type as ``cost``, shapes (n,), (m,)
        Masses of the real points.
    mass : float
        Mass to transport, in (0, min(sum a, sum b)].
    allowed : bool array of the same type, shape (n, m), optional
        Cells that may carry mass; default: every cell.

    Returns
    -------
    M : shape (n + r, m + c)
        The extended cost; ``r`` (``c``) is 1 when the dummy row (column) is kept.
    a_ext, b_ext : shapes (n + r,), (m + c,)
        The extended masses.
    """
    import ot

    nx = ot.backend.get_backend(cost, a, b)
    n, m = cost.shape
    sa, sb = float(a.sum()), float(b.sum())
    keep_r, keep_c = _kept_dummies(sa, sb, mass)
    vals = abs(cost if allowed is None else cost[allowed])
    big = 1e3 * ((float(vals.max()) if vals.shape[0] else 1.0) + 1.0)
    M = nx.zeros((n + int(keep_r), m + int(keep_c)), type_as=cost)
    M[:n, :m] = cost
    if allowed is not None:
        M[:n, :m][~allowed] = big
    if keep_r and keep_c:
        M[n, m] = big
    if keep_r:
        a = nx.concatenate([a, nx.full((1,), sb - mass, type_as=a)])
    if keep_c:
        b = nx.concatenate([b, nx.full((1,), sa - mass, type_as=b)])
    return M, a, b


def _kept_dummies(sa: float, sb: float, mass: float) -> tuple[bool, bool]:
    """Whether the dummy row (unused column capacity) and column (untransported row
    mass) hold any mass."""
    return sb - mass > _EMPTY * sb, sa - mass > _EMPTY * sa


def partial_plan(
    cost: Any,
    a: Any,
    b: Any,
    mass: float,
    *,
    reg: float,
    forbid: Any | None = None,
    method: str = "sinkhorn_log",
    max_iter: int = 1000,
    tol: float = 1e-9,
    relative_tol: bool = False,
    max_rounds: int = 1,
    log: bool = False,
) -> Any:
    """Entropic partial transport plan of ``mass`` between ``a`` and ``b``.

    Solves ``min <P, C> - reg * H(P)`` over ``P >= 0`` with ``P 1 <= a``,
    ``P^T 1 <= b``, ``sum P = mass`` and ``P = 0`` on ``forbid``, as the balanced
    problem of :func:`with_dummies`; ``mass = sum a = sum b`` is the balanced problem
    itself. numpy in, numpy out; torch in, torch out (on the input's device).

    Parameters
    ----------
    cost : ndarray or torch.Tensor, shape (n, m)
        Transport cost; non-finite entries are forbidden.
    a, b : same type as ``cost``, shapes (n,), (m,)
        Masses (>= 0).
    mass : float
        Mass to transport, in (0, min(sum a, sum b)].
    reg : float
        Entropic regularisation, in cost units (> 0).
    forbid : bool array of the same type, shape (n, m), optional
        Cells that must carry no mass. A row (column) with every cell forbidden needs
        a dummy to send its mass to, i.e. ``mass < sum b`` (``mass < sum a``).
    method : {"sinkhorn", "sinkhorn_log"}
        POT's Sinkhorn-Knopp or its log-domain variant (see :data:`METHODS`).
    max_iter : int
        Sinkhorn iterations per round.
    tol : float
        POT's ``stopThr``, the L2 norm of the column-marginal error; with
        ``relative_tol`` it is scaled by the smallest extended column mass, so that
        every column is converged.
    max_rounds : int
        A round that ends unconverged goes on from its scalings (warm start), up to
        ``max_rounds`` rounds: with a small ``reg`` and a point whose only cheap
        partner is full, Sinkhorn converges slowly.
    log : bool
        Also return ``info``: ``iterations`` and ``converged``.

    Returns
    -------
    plan : same type as ``cost``, shape (n, m)
        Non-negative, zero on ``forbid``.
    info : dict
        Only with ``log=True``.
    """
    import ot

    if method not in METHODS:
        raise ConfigError(f"Unknown transport method {method!r}: expected one of {METHODS}.")
    total = min(float(a.sum()), float(b.sum()))
    if not 0.0 < mass <= total + 1e-12:
        raise ConfigError(f"transport mass must be in (0, {total:.3g}], got {mass}.")
    mass = min(mass, total)
    nx = ot.backend.get_backend(cost, a, b)
    n, m = cost.shape
    allowed = nx.isfinite(cost)
    if forbid is not None:
        allowed = allowed & ~forbid
    c = nx.where(allowed, cost, nx.zeros((), type_as=cost))
    if method == "sinkhorn":
        balanced = not any(_kept_dummies(float(a.sum()), float(b.sum()), mass))
        c = _shift_and_cap(c, allowed, reg, balanced=balanced)
    M, a_ext, b_ext = with_dummies(c, a, b, mass, allowed=allowed)
    stop = tol * float(b_ext.min()) if relative_tol else tol
    plan, info = _sinkhorn(a_ext, b_ext, M, reg, method, max_iter, stop, max_rounds)
    plan = nx.where(allowed, plan[:n, :m], nx.zeros((), type_as=plan))
    plan = nx.maximum(plan, nx.zeros((), type_as=plan))
    return (plan, info) if log else plan


def _shift_and_cap(c: Any, allowed: Any, reg: float, *, balanced: bool) -> Any:
    """Costs from 0 to ``_CAP * reg``, so that Sinkhorn-Knopp's kernel never underflows.

    A shift of every cost by one constant changes no plan of fixed mass; in the balanced
    problem (no dummies) each row's shift is absorbed by its scaling too.
    """
    import ot

    nx = ot.backend.get_backend(c)
    inf = nx.full(c.shape, float("inf"), type_as=c)
    masked = nx.where(allowed, c, inf)
    lo = nx.min(masked, axis=1, keepdims=True) if balanced else nx.min(masked)
    return nx.clip(c - lo, None, _CAP * reg)


def _sinkhorn(
    a: Any, b: Any, M: Any, reg: float, method: str, max_iter: int, stop: float, rounds: int
) -> tuple[Any, dict]:
    """POT's balanced Sinkhorn, warm-restarted while it has not converged."""
    import ot

    nx = ot.backend.get_backend(M)
    warm, iterations = None, 0
    for _ in range(max(rounds, 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan, out = ot.sinkhorn(
                a,
                b,
                M,
                reg,
                method=method,
                numItermax=max_iter,
                stopThr=stop,
                warmstart=warm,
                log=True,
            )
        iterations += int(out.get("niter", max_iter))
        if not caught:
            break
        if method == "sinkhorn_log":
            u, v = out["log_u"], out["log_v"]
        else:  # Sinkhorn-Knopp's warm start is given in log scalings
            if not (bool((out["u"] > 0).all()) and bool((out["v"] > 0).all())):
                break
            u, v = nx.log(out["u"]), nx.log(out["v"])
        if not (bool(nx.isfinite(u).all()) and bool(nx.isfinite(v).all())):
            break
        warm = (u, v)
    if caught:
        logger.debug("partial transport: %s", caught[0].message)
    return plan, {"iterations": iterations, "converged": not caught}


def partial_ot_plan(
    cost: torch.Tensor,
    *,
    mass: float,
    reg: float,
    forbid: torch.Tensor | None = None,
    n_iter: int = 200,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Entropic partial transport plan between two uniform point sets (torch, log domain).

    Solves ``min <P, C> - reg * H(P)`` over ``P >= 0`` with row sums ``<= 1/n``, column
    sums ``<= 1/m`` and total mass ``mass * min(valid rows / n, valid cols / m)``
    (:func:`partial_plan`, ``method="sinkhorn_log"``). Forbidden entries get no mass;
    rows or columns with every entry forbidden are left out. Batch-sized problems
    only: the solver is dense, ``O(n m)`` per iteration.

    Parameters
    ----------
    cost : torch.Tensor, shape (n, m)
        Transport cost, lower = better match (e.g. cosine distance in [0, 2]).
    mass : float
        Fraction of the transportable mass to move, in (0, 1].
    reg : float
        Entropic regularisation, in cost units (> 0); smaller = sharper plan.
    forbid : torch.Tensor of bool, shape (n, m), optional
        Entries that must not carry mass (e.g. the original pairing).
    n_iter, tol : int, float
        Sinkhorn iterations and marginal tolerance.

    Returns
    -------
    torch.Tensor, shape (n, m)
        The plan, float32 on ``cost``'s device, non-negative; row ``i`` sums to at most
        ``1/n`` and column ``j`` to at most ``1/m``.
    """
    import torch

    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-d (n, m) tensor, got shape {tuple(cost.shape)}.")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}.")
    if reg <= 0:
        raise ValueError(f"reg must be > 0, got {reg}.")
    n, m = cost.shape
    out = torch.zeros(n, m, dtype=torch.float32, device=cost.device)
    c = cost.detach().to(torch.float64)
    bad = torch.zeros_like(c, dtype=torch.bool) if forbid is None else forbid.to(c.device).bool()
    bad = bad | ~torch.isfinite(c)
    rows = torch.nonzero(~bad.all(dim=1)).ravel()
    cols = torch.nonzero(~bad.all(dim=0)).ravel()
    if rows.numel() == 0 or cols.numel() == 0:
        return out
    a = torch.full((rows.numel(),), 1.0 / n, dtype=torch.float64, device=c.device)
    b = torch.full((cols.numel(),), 1.0 / m, dtype=torch.float64, device=c.device)
    s = mass * min(float(a.sum()), float(b.sum()))
    plan = partial_plan(
        c[rows][:, cols],
        a,
        b,
        s,
        reg=reg,
        forbid=bad[rows][:, cols],
        method="sinkhorn_log",
        max_iter=n_iter,
        tol=tol,
    )
    out[rows[:, None], cols[None, :]] = plan.to(torch.float32)
    return out


# --------------------------------------------------------------------------- sparse


def _seg_lse(
    v: np.ndarray, starts: np.ndarray, counts: np.ndarray, seg: np.ndarray, n_seg: int
) -> np.ndarray:
    """log-sum-exp of ``v`` over contiguous segments; ``-inf`` for empty segments.

    ``starts``/``counts`` describe the non-empty segments (ids ``seg``) in order.
    ``v`` is overwritten.
    """
    out = np.full(n_seg, -np.inf, dtype=np.float64)
    if starts.size == 0:
        return out
    mx = np.maximum.reduceat(v, starts)
    mx = np.where(np.isfinite(mx), mx, 0.0).astype(v.dtype)
    v -= np.repeat(mx, counts)
    np.exp(v, out=v)
    s = np.add.reduceat(v, starts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        out[seg] = np.log(s) + mx
    return out


def _segments(sorted_ids: np.ndarray, n_seg: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts_all = np.bincount(sorted_ids, minlength=n_seg)
    seg = np.flatnonzero(counts_all)
    counts = counts_all[seg]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return starts, counts, seg


def _lse_by_block(x: np.ndarray, block: np.ndarray, n_blocks: int) -> np.ndarray:
    if n_blocks == 1:
        out = np.full(1, -np.inf)
        if x.size:
            m = np.max(x)
            if np.isfinite(m):
                out[0] = m + np.log(np.sum(np.exp(x - m)))
        return out
    order = np.argsort(block, kind="stable")
    starts, counts, seg = _segments(block[order], n_blocks)
    return _seg_lse(x[order].astype(np.float64), starts, counts, seg, n_blocks)


def partial_transport(
    rows: np.ndarray,
    cols: np.ndarray,
    cost: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    *,
    mass: float,
    eps: float,
    row_block: np.ndarray | None = None,
    col_block: np.ndarray | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
    eps_start: float | None = None,
) -> tuple[np.ndarray, dict]:
    # long: numpydoc of 48 lines; body 109
    """Entropic partial optimal transport on a sparse bipartite graph.

    Solves, for each block (default: one block),

    ``min <P, C> + eps * sum P (log P - 1)`` over plans supported on the edges,
    with ``P 1 <= a``, ``P^T 1 <= b`` and total mass ``mass * min(sum a, sum b)``,

    as a balanced problem with one dummy row and one dummy column per block (edges
    of cost 0 to every real node; dummy-to-dummy forbidden, so the transported mass
    is exact), by log-domain Sinkhorn iterations over the edges with
    epsilon-scaling. Each iteration costs O(E). On a complete graph this is the
    problem POT solves with ``ot.sinkhorn(..., method="sinkhorn_log")`` on the
    dummy-extended matrix; as ``eps -> 0`` it tends to
    ``ot.partial.partial_wasserstein``.

    Parameters
    ----------
    rows, cols : ndarray, shape (E,), int
        Edge endpoints (row node, column node); sorted by ``rows``.
    cost : ndarray, shape (E,)
        Edge costs.
    a : ndarray, shape (R,)
        Row masses (> 0).
    b : ndarray, shape (C,)
        Column masses (> 0).
    mass : float
        Fraction in (0, 1] of ``min(sum a, sum b)`` (per block) to transport.
    eps : float
        Entropic regularisation, in cost units (> 0).
    row_block, col_block : ndarray of int, optional
        Block of each row / column node; edges must stay inside a block. Each block
        transports its own ``mass`` fraction.
    max_iter : int
        Maximal number of Sinkhorn iterations at the final ``eps``.
    tol : float
        Stop when the L1 marginal error, relative to the total mass, is below it.
    eps_start : float, optional
        First ``eps`` of the scaling schedule (halved down to ``eps``); default: the
        spread of the costs.

    Returns
    -------
    log_plan : ndarray, shape (E,)
        ``log P`` on each edge.
    info : dict
        ``iterations``, ``converged``, ``marginal_error`` (relative L1 violation of
        the marginals at the last iteration), ``eps_schedule``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n_r, n_c = a.size, b.size
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    n_e = rows.size
    if row_block is None:
        row_block = np.zeros(n_r, dtype=np.int64)
    if col_block is None:
        col_block = np.zeros(n_c, dtype=np.int64)
    n_blocks = int(max(row_block.max(initial=-1), col_block.max(initial=-1))) + 1
    # edge arrays in float32 above ~8M edges: half the memory traffic, and the plan's
    # mass per edge needs no more than 7 digits
    dtype = np.float64 if n_e <= (1 << 23) else np.float32
    itype = np.int32 if max(n_r, n_c, n_e) < 2**31 else np.int64

    a_blk = np.bincount(row_block, weights=a, minlength=n_blocks)
    b_blk = np.bincount(col_block, weights=b, minlength=n_blocks)
    m_blk = float(mass) * np.minimum(a_blk, b_blk)
    total = float(a.sum() + b_blk.sum() - m_blk.sum())
    dc = a_blk - m_blk  # mass of each block's dummy column (untransported image mass)
    dr = b_blk - m_blk  # mass of each block's dummy row (unused caption mass)
    with np.errstate(divide="ignore"):
        # a dummy holding (numerically) no mass is removed: log mass = -inf
        log_dc = np.where(dc > 1e-12 * a_blk, np.log(np.maximum(dc, 1e-300)), -np.inf)
        log_dr = np.where(dr > 1e-12 * b_blk, np.log(np.maximum(dr, 1e-300)), -np.inf)
    log_a, log_b = np.log(a), np.log(b)

    rows_e = rows.astype(itype, copy=False)
    cols_e = cols.astype(itype, copy=False)
    r_starts, r_counts, r_seg = _segments(rows_e, n_r)
    c_perm = np.argsort(cols_e, kind="stable").astype(itype)
    c_starts, c_counts, c_seg = _segments(cols_e[c_perm], n_c)
    rows_c = rows_e[c_perm]
    cost = np.asarray(cost).astype(dtype, copy=False)
    cost_c = cost[c_perm]
    del c_perm

    f = np.zeros(n_r)
    g = np.zeros(n_c)
    fd = np.zeros(n_blocks)
    gd = np.zeros(n_blocks)
    spread = float(np.std(cost)) if n_e > 1 else 1.0
    e0 = float(eps_start) if eps_start is not None else max(spread, float(eps))
    schedule = [float(eps)]
    while schedule[-1] * 2 < e0:
        schedule.append(schedule[-1] * 2)
    schedule.reverse()

    it_total, err, converged = 0, np.inf, False
    for level, e in enumerate(schedule):
        final = level == len(schedule) - 1
        k_r = cost * dtype(-1.0 / e)
        k_c = cost_c * dtype(-1.0 / e)
        n_it = max_iter if final else 50
        thr = tol if final else 10 * tol
        for _ in range(n_it):
            # rows (and dummy rows): their marginals become exact
            v = (g / e).astype(dtype)[cols_e]
            v += k_r
            lse_r = np.logaddexp(_seg_lse(v, r_starts, r_counts, r_seg, n_r), gd[row_block] / e)
            lse_dr = _lse_by_block(g / e, col_block, n_blocks)
            # marginal error of the current plan (before this update)
            err = float(np.abs(np.exp(f / e + lse_r) - a).sum())
            err += float(np.abs(np.exp(fd / e + lse_dr) - np.exp(log_dr)).sum())
            f = e * (log_a - lse_r)
            fd = e * (log_dr - lse_dr)
            # columns (and dummy columns)
            v = (f / e).astype(dtype)[rows_c]
            v += k_c
            lse_c = np.logaddexp(_seg_lse(v, c_starts, c_counts, c_seg, n_c), fd[col_block] / e)
            g = e * (log_b - lse_c)
            gd = e * (log_dc - _lse_by_block(f / e, row_block, n_blocks))
            it_total += 1
            if not np.isfinite(err):
                break
            if err / total < thr:
                converged = final
                break
        del k_r, k_c, v
    e = schedule[-1]
    log_plan = np.empty(n_e, dtype=dtype)
    fe, ge = (f / e).astype(dtype), (g / e).astype(dtype)
    step = 1 << 22
    for lo in range(0, n_e, step):
        sl = slice(lo, lo + step)
        log_plan[sl] = fe[rows_e[sl]] + ge[cols_e[sl]] - cost[sl] / dtype(e)
    info = {
        "iterations": it_total,
        "converged": bool(converged),
        "marginal_error": float(err / total) if total > 0 else 0.0,
        "eps_schedule": schedule,
    }
    return log_plan, info
