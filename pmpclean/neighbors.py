"""Nearest-neighbour search: the only module that talks to faiss.

faiss wants float32, C-contiguous input and reports ``-1`` labels when fewer than
``k`` neighbours exist; both are normalised here so callers never see them raw.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ConfigError

__all__ = ["knn_search"]


def _as_faiss(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (n, d), got shape {arr.shape}.")
    return np.ascontiguousarray(arr, dtype=np.float32)


def knn_search(
    query: np.ndarray,
    base: np.ndarray,
    k: int,
    *,
    exact_max: int = 200_000,
    nprobe: int = 16,
    seed: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product neighbours of each query row among the base rows.

    For L2-normalised input the inner product is the cosine similarity.

    Parameters
    ----------
    query : ndarray, shape (nq, d)
    base : ndarray, shape (nb, d)
    k : int
        Neighbours per query. Asking for more than ``nb`` is allowed: the missing
        slots come back as index ``-1`` with similarity ``-inf``.
    exact_max : int
        Up to this many base rows the search is exact (``IndexFlatIP``); above it an
        inverted-file index (IVF, ``sqrt(nb)``-ish lists, trained on a seeded sample)
        answers approximately, which keeps a million-row search to minutes on a CPU.
    nprobe : int
        Inverted lists visited per query in the approximate search.
    seed : int or None
        Seed of the training sample and of k-means in the approximate index.

    Returns
    -------
    sims : ndarray, shape (nq, k), float32
        Similarities, descending along each row.
    idx : ndarray, shape (nq, k), int64
        Base row of each neighbour, ``-1`` where none exists.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.eye(3, dtype=np.float32)
    >>> sims, idx = knn_search(x, x, 1)
    >>> idx.ravel().tolist()
    [0, 1, 2]
    """
    import faiss

    q = _as_faiss(query, "query")
    b = _as_faiss(base, "base")
    if q.shape[1] != b.shape[1]:
        raise ConfigError(
            f"query and base must have the same width, got {q.shape[1]} and {b.shape[1]}."
        )
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}.")
    nq, nb, d = q.shape[0], b.shape[0], q.shape[1]
    sims = np.full((nq, k), -np.inf, dtype=np.float32)
    idx = np.full((nq, k), -1, dtype=np.int64)
    if nq == 0 or nb == 0:
        return sims, idx
    kk = min(k, nb)
    if nb <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(min(65536, max(64, 4 * math.sqrt(nb))))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        n_train = min(nb, 64 * nlist)
        train = b[np.sort(rng.choice(nb, size=n_train, replace=False))]
        index.cp.seed = 0 if seed is None else int(seed)
        index.train(train)
        index.nprobe = nprobe
    index.add(b)
    d_out, i_out = index.search(q, kk)
    missing = i_out < 0
    d_out[missing] = -np.inf
    sims[:, :kk] = d_out
    idx[:, :kk] = i_out
    return sims, idx
