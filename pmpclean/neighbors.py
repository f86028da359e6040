"""Nearest-neighbour search: the only module that talks to faiss.

faiss wants float32, C-contiguous input and reports ``-1`` labels when fewer than
``k`` neighbours exist; both are normalised here so callers never see them raw.

Two regimes, chosen by the size of the base set:

* **exact** (``nb <= exact_max``): brute-force inner products in BLAS blocks
  (:func:`faiss.knn`), no index copy of the base.
* **approximate** (``nb > exact_max``): an inverted-file (IVF) search executed
  *list-major*. Spherical k-means (seeded) cuts the base into ``nlist`` lists; each
  query visits its ``nprobe`` nearest lists. Instead of scanning lists query by
  query (faiss ``IndexIVFFlat``), the queries that visit one list are gathered and
  multiplied with that list in a single BLAS call (lists are dealt to one worker
  thread per core), then merged into the running top-``k``. Same candidates, same
  exact similarities, 4-5x fewer CPU-seconds than ``IndexIVFFlat`` on the same
  lists (``benchmarks/results/knn.md``). ``nlist`` balances the coarse step
  (queries x centroids) against the scan (queries x probed rows): a million x
  million 512-d search takes about 130 CPU-seconds instead of ~5 CPU-hours exact.
  That balance costs ``n^1.5``; above about 1.3M rows the lists stop growing
  (512 rows on average), and the coarse step, which then has more than 4,096
  centroids, is itself a list-major inverted-file search over the centroids
  (trained by two-level k-means), as billion-scale faiss indexes put a second
  index in front of their centroids. The scan then costs the same per query at
  any size and the coarse step grows like ``sqrt(n)``: near-linear in ``n``.

Float16 input (the embeddings pmpclean holds, possibly memory-mapped) is converted
to float32 a block or a list at a time, never as a whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["knn_search", "ivf_nlist", "EXACT_MAX", "NPROBE"]

#: Default largest base set searched exactly (:func:`knn_search`).
EXACT_MAX = 20_000
#: Default inverted lists visited per query in the approximate search.
NPROBE = 8

# Training sample per list and k-means iterations of the approximate index: a
# sample of 32 points per centroid and 10 iterations reach the recall of the
# default faiss settings (256 points, 25 iterations) at a fifth of the cost.
_TRAIN_PER_LIST = 32
_KMEANS_ITER = 10
# Most (query, probed list) pairs bookkept at once: queries are handled in chunks.
_PROBE_ENTRIES = 1 << 23
# Lists are very unequal (real topics are; a million CLIP-like rows give lists of
# median 42 and mean 447 rows), so a query whose ``nprobe`` nearest lists hold fewer
# than ``_MIN_CAND_PER_K * k`` rows visits further lists, up to ``_MAX_PROBE_FACTOR *
# nprobe`` of them; only a query still short of ``k`` rows after that is searched
# exactly.
_MIN_CAND_PER_K = 4
_MAX_PROBE_FACTOR = 4
# Longest mean list: above ~1.3M base rows the lists stop growing (ivf_nlist).
_LIST_ROWS = 512
# Most centroids searched flat in the coarse step (and trained by one k-means).
_FLAT_COARSE_MAX = 4096
# Bytes of float32 rows converted at once from float16 input (exact blocks, the
# coarse step): 16,384 rows of 512-d.
_BLOCK_BYTES = 1 << 25


def _block_rows(d: int) -> int:
    return max(1, _BLOCK_BYTES // (4 * max(d, 1)))


def _as_rows(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a 2-D float array, not copied: float16 (or memory-mapped) rows are
    converted to float32 a block at a time where faiss reads them, so a 10M x 512
    float16 base never gets a 20 GB float32 twin."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (n, d), got shape {arr.shape}.")
    if arr.dtype not in (np.float16, np.float32):
        arr = arr.astype(np.float32)
    return arr


def _f32(x: np.ndarray) -> np.ndarray:
    """What faiss takes: float32, C-contiguous (a copy only when ``x`` is not already)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_int(name: str, value: object, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum} ({meaning}), got {value!r}.")
    return int(value)


def ivf_nlist(nq: int, nb: int, nprobe: int) -> int:
    """Number of inverted lists of an approximate search.

    With a flat coarse step, the coarse step costs about ``(nq + nb) * nlist`` inner
    products (assigning the base, probing the queries) and the scan ``nq * nprobe *
    1.25 * nb / nlist`` (1.25: lists are unequal and big lists are probed more
    often), so the optimum is ``sqrt(1.25 * nprobe * nq * nb / (nq + nb))``: 2,236
    lists for a million queries against a million rows at ``nprobe=8``. That
    optimum grows like ``sqrt(n)`` and so does each query's cost, so a search costs
    ``n^1.5``. Lists are therefore never longer than ``_LIST_ROWS`` (512) on average:
    above about 1.3M rows ``nlist`` grows linearly with ``nb``, the scan per query
    stays constant and the coarse step itself becomes an inverted-file search over
    the centroids (:class:`_InvertedLists`), whose cost grows like ``sqrt(nlist)``.
    Kept between 1 and ``nb / 8`` (lists of at least 8 rows).

    Examples
    --------
    >>> ivf_nlist(1_000_000, 1_000_000, 8)
    2236
    >>> ivf_nlist(10_000_000, 10_000_000, 8)
    19531
    """
    opt = math.sqrt(1.25 * nprobe * nq * nb / max(nq + nb, 1))
    opt = max(opt, nb / _LIST_ROWS)
    return int(max(1, min(round(opt), nb // 8)))


def _sample_rows(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` seeded rows of ``base`` (all of it when smaller) as float32."""
    nb = base.shape[0]
    if n >= nb:
        return _f32(base)
    return _f32(base[np.sort(rng.choice(nb, size=n, replace=False))])


def _kmeans_flat(train: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(
        train.shape[1],
        nlist,
        niter=_KMEANS_ITER,
        seed=seed,
        spherical=True,  # inner-product search: compare directions, not norms
        max_points_per_centroid=1 << 30,  # the sample is drawn here (seeded), not by faiss
        min_points_per_centroid=1,  # (also silences faiss' stderr warning)
        verbose=False,
    )
    km.train(train)
    return _f32(km.centroids)


def _kmeans(base: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (nlist, d) trained on a seeded sample of ``base``.

    Up to ``_FLAT_COARSE_MAX`` lists, one k-means over ``_TRAIN_PER_LIST * nlist``
    sample rows. Above, its cost (sample x nlist per iteration: ~10^14 inner products
    at 20,000 lists) is cut by two-level clustering (as faiss'
    ``two_level_clustering``): ``sqrt(nlist)`` coarse clusters, then each split into
    centroids in proportion to its share of the sample.
    """
    rng = np.random.default_rng(seed)
    train = _sample_rows(base, _TRAIN_PER_LIST * nlist, rng)
    if nlist <= _FLAT_COARSE_MAX:
        return _kmeans_flat(train, nlist, seed)
    import faiss

    n1 = max(2, round(math.sqrt(nlist)))
    top = _kmeans_flat(train, n1, seed)
    _, lab = faiss.knn(train, top, 1, metric=faiss.METRIC_INNER_PRODUCT)
    lab = lab.ravel()
    sizes = np.bincount(lab, minlength=n1)
    share = np.maximum(1, np.round(sizes * nlist / max(train.shape[0], 1)).astype(np.int64))
    share = np.minimum(share, sizes)
    parts = []
    for c in np.flatnonzero(sizes).tolist():
        sub = train[lab == c]
        parts.append(sub if share[c] >= sub.shape[0] else _kmeans_flat(sub, int(share[c]), seed))
    return _f32(np.concatenate(parts))


def _exact(q: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products (k <= nb), float16 input converted block by block."""
    import faiss

    nq, nb = q.shape[0], b.shape[0]
    ip = faiss.METRIC_INNER_PRODUCT
    step = _block_rows(q.shape[1])
    whole = _f32(b) if nb <= step else None
    sims = np.full((nq, k), -np.inf, dtype=np.float32)
    idx = np.full((nq, k), -1, dtype=np.int64)
    for lo in range(0, nq, step):
        qq = _f32(q[lo : lo + step])
        if whole is not None:
            sims[lo : lo + step], idx[lo : lo + step] = faiss.knn(qq, whole, k, metric=ip)
            continue
        # a large base: base blocks merged into a running top-k
        rows = np.arange(lo, lo + qq.shape[0])
        for b0 in range(0, nb, step):
            blk = _f32(b[b0 : b0 + step])
            s, i = faiss.knn(qq, blk, min(k, blk.shape[0]), metric=ip)
            _merge(sims, idx, rows, s, np.where(i >= 0, i + b0, -1))
    return sims, idx


class _InvertedLists:
    """Base rows grouped by nearest centroid, searched list-major.

    The coarse step (which lists a query visits) is flat (every centroid) up to
    ``_FLAT_COARSE_MAX`` lists, and above that itself an inverted-file search over
    the centroids, so that its cost grows like ``sqrt(nlist)`` rather than ``nlist``.
    """

    def __init__(self, base: np.ndarray, nlist: int, seed: int, n_queries: int) -> None:
        self.base: np.ndarray | None = base  # None between searches in reuse_indexes
        self.cent = _kmeans(base, nlist, seed)
        self.nlist = self.cent.shape[0]
        self.coarse: _InvertedLists | None = None
        if self.nlist > _FLAT_COARSE_MAX:
            n_c = ivf_nlist(n_queries + base.shape[0], self.nlist, NPROBE)
            self.coarse = _InvertedLists(self.cent, n_c, seed + 1, n_queries + base.shape[0])
        lab = self.nearest_lists(base, 1)[:, 0]
        self.order = np.argsort(lab, kind="stable")
        self.bounds = np.searchsorted(lab[self.order], np.arange(self.nlist + 1))
        self.sizes = np.diff(self.bounds)

    def nearest_lists(self, q: np.ndarray, m: int) -> np.ndarray:
        """The ``m`` lists whose centroids are nearest each query row, (nq, m)."""
        import faiss

        if self.coarse is not None:
            _, probe = self.coarse.search(q, m, NPROBE)
        else:
            probe = np.empty((q.shape[0], m), dtype=np.int64)
            step = _block_rows(q.shape[1])
            for lo in range(0, q.shape[0], step):
                _, probe[lo : lo + step] = faiss.knn(
                    _f32(q[lo : lo + step]), self.cent, m, metric=faiss.METRIC_INNER_PRODUCT
                )
        # (-1 only when fewer than m centroids: never, m <= nlist; guard anyway)
        return np.where(probe >= 0, probe, 0)

    def search(self, q: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k`` (k <= nb) of each query row, descending."""
        from concurrent.futures import ThreadPoolExecutor

        import faiss

        base = self.base
        if base is None:
            raise RuntimeError("inverted lists searched without their rows")
        nq, nb = q.shape[0], base.shape[0]
        nlist, sizes = self.nlist, self.sizes
        nprobe = min(nprobe, nlist)
        n_workers = max(1, int(faiss.omp_get_max_threads()))
        max_probe = min(nlist, _MAX_PROBE_FACTOR * nprobe)
        min_cand = min(nb, _MIN_CAND_PER_K * k)
        sims = np.full((nq, k), -np.inf, dtype=np.float32)
        idx = np.full((nq, k), -1, dtype=np.int64)
        # queries in chunks bound the (query, probe) bookkeeping
        chunk = max(1024, _PROBE_ENTRIES // max_probe)
        for lo in range(0, nq, chunk):
            qc = q[lo : lo + chunk]  # a view: rows become float32 a list at a time
            m = qc.shape[0]
            probe = self.nearest_lists(qc, max_probe)
            q_order, q_bounds = _visits(probe, sizes, nprobe, min_cand)
            del probe
            cost = np.diff(q_bounds).astype(np.float64) * sizes
            groups = _balance(cost, np.flatnonzero(cost > 0), n_workers)
            # each worker keeps its own running top-k (lists share queries); merged below
            bufs = [(sims[lo : lo + m], idx[lo : lo + m])] + [
                (np.full((m, k), -np.inf, np.float32), np.full((m, k), -1, np.int64))
                for _ in groups[1:]
            ]
            args = (qc, base, q_order, q_bounds, self.order, self.bounds)
            if len(groups) <= 1:
                for g in groups:
                    _scan_lists(g, *args, *bufs[0], False)
            else:
                with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                    futures = [
                        pool.submit(_scan_lists, g, *args, *buf, True)
                        for g, buf in zip(groups, bufs, strict=False)
                    ]
                    for f in futures:
                        f.result()
                all_rows = np.arange(m)
                for s_w, i_w in bufs[1:]:
                    _merge(bufs[0][0], bufs[0][1], all_rows, s_w, i_w)
        return _finish(q, base, sims, idx)


def _visits(
    probe: np.ndarray, sizes: np.ndarray, nprobe: int, min_cand: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (list, query) pairs to scan, grouped by list: ``q_order[q_bounds[c]:q_bounds[c+1]]``
    are the queries (rows of ``probe``) that visit list ``c``.

    A query visits its ``nprobe`` nearest lists, and further ones (in ``probe``'s order)
    while the lists seen so far hold fewer than ``min_cand`` rows.
    """
    nlist = sizes.size
    seen_before = np.cumsum(sizes[probe], axis=1) - sizes[probe]
    visit = (np.arange(probe.shape[1]) < nprobe)[None, :] | (seen_before < min_cand)
    q_rows = np.broadcast_to(np.arange(probe.shape[0])[:, None], probe.shape)[visit]
    flat = probe[visit]
    del seen_before, visit
    q_order = np.argsort(flat, kind="stable")
    q_bounds = np.searchsorted(flat[q_order], np.arange(nlist + 1))
    return q_rows[q_order], q_bounds  # query row of each (list, query) pair, grouped by list


def _finish(
    q: np.ndarray, b: np.ndarray, sims: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact search for queries still short of ``k`` neighbours; sort each row descending."""
    # A query whose probed lists held fewer than k rows (tiny lists, nprobe=1) is
    # searched exactly, so -1 only ever means "the base has fewer than k rows".
    short = np.flatnonzero((idx < 0).any(axis=1))
    if short.size:
        sims[short], idx[short] = _exact(q[short], b, sims.shape[1])
    order = np.argsort(-sims, axis=1, kind="stable")
    sims = np.take_along_axis(sims, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    idx[~np.isfinite(sims)] = -1
    return sims, idx


def _ivf_search(
    q: np.ndarray, b: np.ndarray, k: int, nprobe: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The built-in approximate search: inverted lists trained on ``b``, searched by ``q``.

    Inside :func:`reuse_indexes`, the lists of a base already searched (same rows, same
    seed) are reused rather than trained again.
    """
    lists = reused(
        "local",
        b,
        seed,
        lambda: _InvertedLists(b, ivf_nlist(q.shape[0], b.shape[0], nprobe), seed, q.shape[0]),
    )
    lists.base = b  # (when reused: the same rows by digest, the caller's array)
    try:
        return lists.search(q, k, nprobe)
    finally:
        lists.base = None  # a cache keeps the lists, never a copy of the rows


def reused(tag: str, base: np.ndarray, seed: int, build: Callable[[], Any]) -> Any:
    """``build()``, the index of ``base``; inside :func:`reuse_indexes` built once per
    ``tag`` (the engine whose index it is), rows (by SHA-1 of their bytes) and seed."""
    cache = _INDEX_CACHE.get()
    if cache is None:
        return build()
    key = (tag, base.shape, base.dtype.str, seed, _digest(base))
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _digest(x: np.ndarray) -> str:
    """SHA-1 of the rows' bytes, read a block at a time (about 0.6 GB/s)."""
    import hashlib

    h = hashlib.sha1(usedforsecurity=False)
    step = max(1, (64 << 20) // max(x.shape[1] * x.itemsize, 1))
    for lo in range(0, x.shape[0], step):
        h.update(np.ascontiguousarray(x[lo : lo + step]).data)
    return h.hexdigest()


#: Indexes built inside :func:`reuse_indexes`, by (engine, shape, dtype, seed, digest).
_INDEX_CACHE: ContextVar[dict[tuple[Any, ...], Any] | None] = ContextVar(
    "pmpclean_index_cache", default=None
)


@contextmanager
def reuse_indexes() -> Iterator[None]:
    """Build the inverted lists of each base once inside the block.

    A scan searches the same image and caption nodes twice: for the dataset's own
    pairs (:func:`pmpclean.score.pair_scores`) and for the planted mismatches
    (:func:`pmpclean.score.planted_scores`). Training the lists (k-means and
    assigning every base row) costs about a third of a search at a million rows; in
    the block, a base whose rows (by SHA-1 of their bytes) and seed were indexed
    before is searched with those lists, so the plants also meet exactly the lists
    the real rows met. The lists keep no reference to the rows between searches.
    """
    token = _INDEX_CACHE.set({})
    try:
        yield
    finally:
        _INDEX_CACHE.reset(token)


#: The approximate search :func:`knn_search` runs; another engine (``pmpclean.engine``)
#: installs its own with :func:`ivf_backend`, of the signature of ``_ivf_search``.
_IVF_BACKEND: ContextVar[Callable[..., tuple[np.ndarray, np.ndarray]] | None] = ContextVar(
    "pmpclean_ivf_backend", default=None
)


@contextmanager
def ivf_backend(
    search: Callable[[np.ndarray, np.ndarray, int, int, int], tuple[np.ndarray, np.ndarray]],
) -> Iterator[None]:
    """Run the approximate searches of :func:`knn_search` with ``search`` inside the block.

    ``search(query, base, k, nprobe, seed)`` gets float32 C-contiguous arrays and returns
    ``(sims, idx)`` as the built-in inverted-file search does (same lists, same statistic);
    the Ray engine's distributed search is one (:mod:`pmpclean.engine`).
    """
    token = _IVF_BACKEND.set(search)
    try:
        yield
    finally:
        _IVF_BACKEND.reset(token)


def _merge(
    sims: np.ndarray, idx: np.ndarray, rows: np.ndarray, new_s: np.ndarray, new_i: np.ndarray
) -> None:
    """Merge candidates ``new_*`` (m, kk) into the running top-k of ``rows`` in place."""
    k = sims.shape[1]
    cat_s = np.concatenate([sims[rows], new_s], axis=1)
    cat_i = np.concatenate([idx[rows], new_i], axis=1)
    if cat_s.shape[1] > k:
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
        cat_s = np.take_along_axis(cat_s, top, axis=1)
        cat_i = np.take_along_axis(cat_i, top, axis=1)
    sims[rows] = cat_s
    idx[rows] = cat_i


def _scan_lists(
    lists: list[int],
    qc: np.ndarray,
    b: np.ndarray,
    q_order: np.ndarray,
    q_bounds: np.ndarray,
    b_order: np.ndarray,
    b_bounds: np.ndarray,
    sims: np.ndarray,
    idx: np.ndarray,
    threaded: bool,
) -> None:
    """Score the queries that visit each list against the list's rows; merge top-k."""
    import faiss

    if threaded:
        # One OpenMP thread per worker (the setting is per calling thread): lists are
        # small, and an OpenMP team per call spins for its threads, which is 5-20x
        # slower than the work itself on a busy machine.
        faiss.omp_set_num_threads(1)
    k = sims.shape[1]
    for c in lists:
        a0, a1 = int(q_bounds[c]), int(q_bounds[c + 1])
        b0, b1 = int(b_bounds[c]), int(b_bounds[c + 1])
        rows = q_order[a0:a1]  # distinct: a query visits a list once
        members = b_order[b0:b1]
        kk = min(k, b1 - b0)
        s, i = faiss.knn(
            _f32(qc[rows]),  # the list's queries and rows, float16 -> float32 here
            _f32(b[members]),
            kk,
            metric=faiss.METRIC_INNER_PRODUCT,
        )
        _merge(sims, idx, rows, s, np.where(i >= 0, members[np.maximum(i, 0)], -1))


def _balance(cost: np.ndarray, lists: np.ndarray, n_workers: int) -> list[list[int]]:
    """Deal lists to workers, most expensive first, each to the least loaded worker."""
    load = np.zeros(n_workers)
    out: list[list[int]] = [[] for _ in range(n_workers)]
    for c in lists[np.argsort(-cost[lists], kind="stable")].tolist():
        w = int(np.argmin(load))
        out[w].append(c)
        load[w] += cost[c]
    return [sorted(x) for x in out if x]


def knn_search(
    query: np.ndarray,
    base: np.ndarray,
    k: int,
    *,
    exact_max: int = EXACT_MAX,
    nprobe: int = NPROBE,
    seed: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product neighbours of each query row among the base rows.

    For L2-normalised input the inner product is the cosine similarity.

    Parameters
    ----------
    query : ndarray, shape (nq, d)
        float16 or float32 (other dtypes are converted); float16 rows, e.g.
        memory-mapped, are converted to float32 a block at a time, never whole.
    base : ndarray, shape (nb, d)
        As ``query``.
    k : int
        Neighbours per query. Asking for more than ``nb`` is allowed: the missing
        slots come back as index ``-1`` with similarity ``-inf``.
    exact_max : int
        Up to this many base rows the search is exact. Above it an inverted-file
        index answers approximately: ``nlist`` lists from seeded spherical k-means
        (:func:`ivf_nlist`), ``nprobe`` of them visited per query, candidates scored
        exactly in full dimension. Exact search costs ``nq * nb`` inner products
        (about 5 CPU-seconds at 20,000 x 20,000 x 512-d, the default threshold),
        the approximate one about ``nq * sqrt(nb)`` up to ~1.3M base rows and
        close to ``nq`` above (:func:`ivf_nlist`); a million x million search
        takes about 2 CPU-minutes.
    nprobe : int
        Lists visited per query in the approximate search: recall rises and speed
        falls with it. A query whose nearest lists hold fewer than ``4 * k`` rows
        visits further lists (up to ``4 * nprobe``), so unequal lists never starve
        it. At the default 8, a million-row CLIP-like search finds about 80 % of
        the exact top-4, and the mean of its top-3 similarities is 0.002 below the
        exact one on average (``benchmarks/results/knn.md``).
    seed : int or None
        Seed of the k-means training sample and initialisation (None: 0). The
        result is deterministic for a given seed and thread count.

    Returns
    -------
    sims : ndarray, shape (nq, k), float32
        Similarities, descending along each row.
    idx : ndarray, shape (nq, k), int64
        Base row of each neighbour, ``-1`` where none exists.

    Raises
    ------
    ConfigError
        For arrays that are not 2-D or of different widths, ``k < 1``,
        ``exact_max < 0`` or ``nprobe < 1``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.eye(3, dtype=np.float32)
    >>> sims, idx = knn_search(x, x, 1)
    >>> idx.ravel().tolist()
    [0, 1, 2]
    """

    q = _as_rows(query, "query")
    b = _as_rows(base, "base")
    if q.shape[1] != b.shape[1]:
        raise ConfigError(
            f"query and base must have the same width, got {q.shape[1]} and {b.shape[1]}."
        )
    k = _check_int("k", k, 1, "neighbours per query")
    exact_max = _check_int("exact_max", exact_max, 0, "largest base searched exactly")
    nprobe = _check_int("nprobe", nprobe, 1, "inverted lists visited per query")
    nq, nb = q.shape[0], b.shape[0]
    sims = np.full((nq, k), -np.inf, dtype=np.float32)
    idx = np.full((nq, k), -1, dtype=np.int64)
    if nq == 0 or nb == 0:
        return sims, idx
    kk = min(k, nb)
    if nb <= exact_max:
        d_out, i_out = _exact(q, b, kk)
    else:
        search = _IVF_BACKEND.get()
        seed = 0 if seed is None else int(seed)
        if search is None:
            d_out, i_out = _ivf_search(q, b, kk, nprobe, seed)
        else:  # another engine's search takes float32 rows (its contract)
            d_out, i_out = search(_f32(q), _f32(b), kk, nprobe, seed)
    missing = i_out < 0
    d_out[missing] = -np.inf
    sims[:, :kk] = d_out
    idx[:, :kk] = i_out
    return sims, idx
