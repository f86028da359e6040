"""Per-pair match statistics: how well does each caption fit its own image?

Raw CLIP cosines of true pairs sit in a narrow band whose position moves with the
model and the data, and "hub" images or captions are close to everything, so a fixed
cosine threshold fails. pmpclean therefore scores each pair *relative to its
dataset neighbourhood*: the pair's cosine is compared with the cosines of the
image's nearest alternative captions and of the caption's nearest alternative images
(found with a k-NN search over the whole dataset, :func:`pmpclean.neighbors.knn_search`).
This is the cross-domain similarity local scaling (CSLS) correction of hubness
(Conneau et al., ICLR 2018), applied to the pair itself, and the dataset-scale
counterpart of L2RM's per-pair loss against in-batch negatives (Han et al., CVPR 2024).

Alternatives are chosen per *image group* and *caption text group*: the captions of
the same image, and identical caption texts, are never alternatives, so an image
with five captions is not penalised because its other four captions are close.

The statistic returned here is raw (higher = more likely a true pair, unbounded);
:func:`pmpclean.split.split_pairs` turns it into a calibrated ``match_score`` in [0, 1].
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ._utils import check_random_state
from .errors import ConfigError

__all__ = [
    "SCORE_METHODS",
    "PLANT_KINDS",
    "PairScores",
    "pair_scores",
    "plant_pairs",
    "planted_scores",
]

#: Documented methods of :func:`pair_scores`.
SCORE_METHODS = ("csls", "margin", "infonce", "cosine")

Progress = Callable[[str, int, int], None]


@dataclass
class PairScores:
    """Per-row pair statistics (all arrays have shape (n,); NaN for rows not scored).

    Attributes
    ----------
    score : ndarray, float64
        The statistic the mixture is fitted on; higher = more likely a true pair.
        Unbounded; its scale depends on ``method``.
    similarity : ndarray, float64
        Raw cosine of the pair, in [-1, 1].
    image_alt : ndarray, float64
        Mean cosine of the image to its ``k`` nearest alternative captions.
    text_alt : ndarray, float64
        Mean cosine of the caption to its ``k`` nearest alternative images.
    image_rank : ndarray, float64
        How many of the image's ``k`` nearest alternative captions beat its own caption
        (0 = own caption ranks first; at most ``k``).
    text_rank : ndarray, float64
        How many of the caption's ``k`` nearest alternative images beat its own image.
    alt_caption_row, alt_image_row : ndarray, int64
        The evidence behind a score: a row holding the caption that fits this row's
        image best among the alternatives (``alt_caption_row``), and a row holding the
        image that fits this row's caption best (``alt_image_row``); -1 when there is
        none or the row was not scored. From the same neighbour search as the score.
    alt_caption_similarity, alt_image_similarity : ndarray, float64
        Cosine of the image to that caption, and of the caption to that image, in
        [-1, 1] (beside ``similarity``, the pair's own cosine); NaN when there is none.
        When several rows share an image (or a caption text), the cosine is to their
        mean embedding, as the score uses it.
    second_caption_row, second_caption_similarity : ndarray
        The same for the second-best alternative caption of the image (-1 / NaN when
        ``k`` is 1 or there is none): a rematch's runner-up when its proposal is the
        best alternative.
    valid : ndarray, bool
        Rows that were scored.
    method : str
    info : dict
        ``k``, ``temperature`` (infonce), numbers of image and text groups.
    """

    score: np.ndarray
    similarity: np.ndarray
    image_alt: np.ndarray
    text_alt: np.ndarray
    image_rank: np.ndarray
    text_rank: np.ndarray
    valid: np.ndarray
    method: str = "csls"
    info: dict = field(default_factory=dict)
    alt_caption_row: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    alt_caption_similarity: np.ndarray = field(default_factory=lambda: np.empty(0))
    alt_image_row: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    alt_image_similarity: np.ndarray = field(default_factory=lambda: np.empty(0))
    second_caption_row: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    second_caption_similarity: np.ndarray = field(default_factory=lambda: np.empty(0))


def _as_emb(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a 2-D float16 or float32 array; float16 (and memory maps) stay as they are."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D array (n, d), got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number):
        raise ConfigError(f"{name} must hold numbers, got dtype {arr.dtype}.")
    if arr.dtype in (np.float16, np.float32):
        return arr  # no copy: 10M x 512 float16 rows are 10 GB, memory-mapped
    return arr.astype(np.float32)


#: How far from 1 the norms of rows of each dtype may be for the rows to count as unit
#: vectors (float16 rounding moves a unit 512-d row's norm by about 1e-4).
_UNIT_TOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float16): 2e-3}


#: Rows processed at once when normalising or averaging embeddings (bounds temporaries).
_CHUNK = 1 << 16


def _row_norms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 L2 norms of the rows and a mask of usable rows (finite, non-zero).

    Computed in chunks: a million 512-d rows never get a full-size temporary.
    """
    n = x.shape[0]
    norms = np.ones(n, dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    for lo in range(0, n, _CHUNK):
        blk = np.asarray(x[lo : lo + _CHUNK], dtype=np.float32)
        fin = np.all(np.isfinite(blk), axis=1)
        nb = np.linalg.norm(np.where(fin[:, None], blk, np.float32(0.0)), axis=1)
        good = fin & (nb > 1e-12)
        norms[lo : lo + _CHUNK] = np.where(good, nb, np.float32(1.0))
        ok[lo : lo + _CHUNK] = good
    return norms, ok


def _unit_rows(x: np.ndarray, norms: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``x[rows] / norms[rows]`` as a new float32 array."""
    out = np.array(x[rows], dtype=np.float32, copy=True)
    out /= norms[rows][:, None]
    return out


def _nodes(
    x: np.ndarray, norms: np.ndarray, rows: np.ndarray, codes: np.ndarray, n_groups: int
) -> np.ndarray:
    """L2-normalised mean of the normalised member rows of each group, (n_groups, d).

    ``codes[i]`` is the group of ``rows[i]``. When every row is its own group, in
    row order, covering all of ``x``, and ``x`` already holds unit vectors, ``x``
    itself is returned: at ten million 512-d rows each copy would be 10 GB (float16).
    Otherwise the nodes have the dtype of ``x`` (float16 or float32).
    """
    d = x.shape[1]
    dtype = np.float16 if x.dtype == np.float16 else np.float32
    if n_groups == rows.size:  # one row per group
        if (
            rows.size == x.shape[0]
            and x.dtype in _UNIT_TOL
            and x.flags.c_contiguous
            and np.array_equal(codes, np.arange(rows.size))
            and bool(np.all(np.abs(norms - 1.0) <= _UNIT_TOL[x.dtype]))  # unit vectors
        ):
            return x
        member = np.empty(n_groups, dtype=np.int64)
        member[codes] = rows
        out = np.empty((n_groups, d), dtype=dtype)
        for lo in range(0, n_groups, _CHUNK):
            out[lo : lo + _CHUNK] = _unit_rows(x, norms, member[lo : lo + _CHUNK])
        return out
    # several rows per group: sum the unit rows group by group, a chunk at a time
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(n_groups + 1))
    out = np.empty((n_groups, d), dtype=np.float32)
    per_group = max(1, -(-rows.size // max(n_groups, 1)))
    g_chunk = max(1, _CHUNK // per_group)
    for g0 in range(0, n_groups, g_chunk):
        g1 = min(n_groups, g0 + g_chunk)
        r0, r1 = int(starts[g0]), int(starts[g1])
        unit = _unit_rows(x, norms, rows[order[r0:r1]]).astype(np.float64)
        out[g0:g1] = np.add.reduceat(unit, starts[g0:g1] - r0, axis=0)
    nn = np.linalg.norm(out, axis=1)
    good = nn > 1e-12
    out /= np.where(good, nn, np.float32(1.0))[:, None]
    out[~good] = 0.0
    return out.astype(dtype, copy=False)


def _pair_cosines(
    img: np.ndarray, txt: np.ndarray, n_img: np.ndarray, n_txt: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Cosine of each listed row's own pair, (len(rows),) float64, chunk by chunk."""
    out = np.empty(rows.size, dtype=np.float64)
    for lo in range(0, rows.size, _CHUNK):
        r = rows[lo : lo + _CHUNK]
        out[lo : lo + _CHUNK] = np.einsum(
            "nd,nd->n", _unit_rows(img, n_img, r), _unit_rows(txt, n_txt, r)
        )
    return out


def _codes(groups: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if groups is None:
        return np.arange(n, dtype=np.int64)
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ConfigError(f"{name} must have shape ({n},) (one id per row), got {g.shape}.")
    _, codes = np.unique(g, return_inverse=True)
    return codes.astype(np.int64).ravel()


def _alternatives(
    query: np.ndarray,
    base: np.ndarray,
    excluded: np.ndarray,
    n_excluded: np.ndarray,
    k: int,
    seed: int | None,
    exact_max: int,
    nprobe: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k similarities of each query node to base nodes that are not excluded.

    ``excluded`` is a sorted array of codes ``q * len(base) + b`` of forbidden
    (query, base) pairs; ``n_excluded[q]`` counts them per query. Returns (nq, k)
    float64 with NaN where fewer than k alternatives exist, and (nq, k) int64: the
    base node of each of those alternatives (-1 where there is none).
    """
    from .neighbors import knn_search

    nq, nb = query.shape[0], base.shape[0]
    out = np.full((nq, k), np.nan)
    nodes = np.full((nq, k), -1, dtype=np.int64)
    # Queries needing the same number of extra neighbours are searched together.
    for extra in np.unique(n_excluded).tolist():
        rows = np.flatnonzero(n_excluded == extra)
        kk = min(nb, k + int(extra))
        if kk < 1:
            continue
        q = query if rows.size == nq else query[rows]  # no 2 GB copy in the usual case
        sims, idx = knn_search(q, base, kk, seed=seed, exact_max=exact_max, nprobe=nprobe)
        del q
        code = rows[:, None].astype(np.int64) * nb + np.where(idx < 0, 0, idx)
        pos = np.searchsorted(excluded, code)
        pos = np.minimum(pos, max(excluded.size - 1, 0))
        bad = (idx < 0) | (excluded[pos] == code if excluded.size else np.zeros_like(idx, bool))
        keep = ~bad
        # Keep the first k allowed neighbours of each query (already sorted by similarity).
        rank = np.cumsum(keep, axis=1) - 1
        take = keep & (rank < k)
        r_idx, c_idx = np.nonzero(take)
        out[rows[r_idx], rank[r_idx, c_idx]] = sims[r_idx, c_idx]
        nodes[rows[r_idx], rank[r_idx, c_idx]] = idx[r_idx, c_idx]
    return out, nodes


def _evidence(
    out: PairScores,
    rows: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    cap_nodes: np.ndarray,
    img_nodes: np.ndarray,
    cap_sims: np.ndarray,
    img_sims: np.ndarray,
) -> None:
    """Fill the ``alt_*`` evidence of ``out`` from the alternatives of the scored ``rows``.

    ``cap_nodes`` / ``img_nodes`` (m, k) are the nearest alternative caption-text groups
    (``b`` codes) of each row's image and image groups (``a`` codes) of each row's
    caption, best first, with their similarities; a group is shown as its first row.
    """
    first_a = np.full(int(a.max()) + 1, -1, dtype=np.int64)
    first_b = np.full(int(b.max()) + 1, -1, dtype=np.int64)
    first_a[a[::-1]] = rows[::-1]  # the last write wins: the first row of each group
    first_b[b[::-1]] = rows[::-1]

    def as_rows(nodes: np.ndarray, first: np.ndarray) -> np.ndarray:
        return np.where(nodes >= 0, first[np.maximum(nodes, 0)], -1)

    out.alt_caption_row[rows] = as_rows(cap_nodes[:, 0], first_b)
    out.alt_image_row[rows] = as_rows(img_nodes[:, 0], first_a)
    out.alt_caption_similarity[rows] = np.where(cap_nodes[:, 0] >= 0, cap_sims[:, 0], np.nan)
    out.alt_image_similarity[rows] = np.where(img_nodes[:, 0] >= 0, img_sims[:, 0], np.nan)
    if cap_nodes.shape[1] > 1:
        out.second_caption_row[rows] = as_rows(cap_nodes[:, 1], first_b)
        out.second_caption_similarity[rows] = np.where(cap_nodes[:, 1] >= 0, cap_sims[:, 1], np.nan)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.nanmax(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    s = np.nansum(np.exp(x - m), axis=axis, keepdims=True)
    with np.errstate(divide="ignore"):
        return np.squeeze(np.log(s) + m, axis=axis)


def _combine(
    method: str,
    sim: np.ndarray,
    alt_i: np.ndarray,
    alt_t: np.ndarray,
    ref_i: np.ndarray,
    ref_t: np.ndarray,
    temperature: float,
) -> np.ndarray:
    """The pair statistic of ``method`` from the pair cosine and its alternatives."""
    if method == "cosine":
        return sim.copy()
    if method == "csls":
        return 2.0 * sim - ref_i - ref_t
    if method == "margin":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
            best_i = np.nanmax(alt_i, axis=1)
            best_t = np.nanmax(alt_t, axis=1)
        bi = np.where(np.isfinite(best_i), best_i, best_t)
        bt = np.where(np.isfinite(best_t), best_t, best_i)
        return sim - 0.5 * (bi + bt)
    tau = float(temperature)  # infonce
    pos = sim / tau

    def nce(alt: np.ndarray) -> np.ndarray:
        logits = np.concatenate([pos[:, None], alt / tau], axis=1)
        return pos - _logsumexp(logits, axis=1)

    return nce(alt_i) + nce(alt_t)


def pair_scores(  # noqa: C901 - see the comment below
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    *,
    image_group: np.ndarray | None = None,
    text_group: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    k: int = 3,
    method: str = "csls",
    temperature: float = 0.05,
    exact_max: int | None = None,
    nprobe: int | None = None,
    seed: int | np.random.Generator | None = None,
    progress: Progress | None = None,
) -> PairScores:
    # long: numpydoc of 64 lines; body 146, not yet split
    """Score every (image, caption) row against its dataset neighbourhood.

    Parameters
    ----------
    image_emb, text_emb : ndarray, shape (n, d)
        Row-aligned embeddings (re-normalised here). Rows with NaN/inf or zero
        vectors are not scored.
    image_group : array-like, shape (n,), optional
        Image id per row; rows of one image share it (several captions per image).
        Default: every row is its own image.
    text_group : array-like, shape (n,), optional
        Caption-text id per row; identical caption texts share it. Default: every row
        is its own text.
    valid : ndarray of bool, shape (n,), optional
        Rows that may be scored (e.g. status ok). Invalid rows are neither scored
        nor used as alternatives.
    k : int
        Alternatives per side: the ``k`` nearest captions of other images, and the
        ``k`` nearest images of other captions. Small neighbourhoods work best: 3
        (default) is within 0.005 F1 of the best k in 1..10 on every benchmark in
        ``benchmarks/results/detection.md``; 10 loses about 0.01 at 20% noise.
    method : {"csls", "margin", "infonce", "cosine"}
        ``"csls"`` (default): ``2 s - image_alt - text_alt``, the pair's cosine
        against the mean cosine of the ``k`` nearest alternatives on both sides.
        ``"margin"``: ``s - (best alternative caption + best alternative image) / 2``.
        ``"infonce"``: symmetric InfoNCE log-likelihood of the pair against its ``k``
        alternatives per side at ``temperature``. ``"cosine"``: the raw cosine.
    temperature : float
        Softmax temperature of ``"infonce"``, in cosine units.
    exact_max : int, optional
        Largest number of caption (image) groups searched exactly for the
        alternatives of the images (captions); above it an approximate inverted-file
        search is used (:func:`pmpclean.neighbors.knn_search`; default
        :data:`pmpclean.neighbors.EXACT_MAX`, 20,000). On 100,000 CLIP-like pairs the
        approximate search moves detection F1 by less than 0.002
        (``benchmarks/results/scale.md``).
    nprobe : int, optional
        Inverted lists visited per query by the approximate search (default
        :data:`pmpclean.neighbors.NPROBE`, 8). Higher is closer to exact and slower.
    seed : int, Generator or None
        Seed of the approximate k-NN search (k-means sample and initialisation).
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    PairScores
        ``score`` is higher = more likely a true pair (unbounded), NaN for rows not
        scored.

    Raises
    ------
    ConfigError
        For an unknown method, non-positive ``k`` or ``temperature``, arrays of
        mismatched shapes, ``exact_max < 0`` or ``nprobe < 1``.

    Examples
    --------
    >>> from pmpclean.synthetic import clip_like_pairs
    >>> d = clip_like_pairs(300, dim=64, noise_rate=0.2, seed=0)
    >>> ps = pair_scores(d.image_emb, d.text_emb, image_group=d.image_group)
    >>> bool(ps.score[d.is_mismatched].mean() < ps.score[~d.is_mismatched].mean())
    True
    """
    if method not in SCORE_METHODS:
        raise ConfigError(
            f"Unknown method {method!r} for pair scores: "
            f"expected one of {', '.join(SCORE_METHODS)}."
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer (alternatives per side), got {k!r}.")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a positive number, got {temperature!r}.")
    from .neighbors import EXACT_MAX, NPROBE

    exact_max = EXACT_MAX if exact_max is None else exact_max
    nprobe = NPROBE if nprobe is None else nprobe
    if isinstance(exact_max, bool) or not isinstance(exact_max, (int, np.integer)) or exact_max < 0:
        raise ConfigError(
            "exact_max must be an integer >= 0 (the largest number of groups searched "
            f"exactly), got {exact_max!r}."
        )
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
        raise ConfigError(
            f"nprobe must be an integer >= 1 (inverted lists visited per query), got {nprobe!r}."
        )
    img = _as_emb(image_emb, "image_emb")
    txt = _as_emb(text_emb, "text_emb")
    if img.shape != txt.shape:
        raise ConfigError(
            "image_emb and text_emb must have the same shape (n, d), "
            f"got {img.shape} and {txt.shape}."
        )
    n = img.shape[0]
    # Norms only: rows are divided by them chunk by chunk where needed, so a million
    # 512-d rows are never copied whole (each copy would be 2 GB).
    norm_i, ok_i = _row_norms(img)
    norm_t, ok_t = _row_norms(txt)
    ok = ok_i & ok_t
    if valid is not None:
        v = np.asarray(valid)
        if v.shape != (n,):
            raise ConfigError(f"valid must have shape ({n},), got {v.shape}.")
        ok &= v.astype(bool)
    ig = _codes(image_group, n, "image_group")
    tg = _codes(text_group, n, "text_group")
    knn_seed = None if seed is None or isinstance(seed, np.random.Generator) else int(seed)

    nan = np.full(n, np.nan)
    out = PairScores(
        score=nan.copy(),
        similarity=nan.copy(),
        image_alt=nan.copy(),
        text_alt=nan.copy(),
        image_rank=nan.copy(),
        text_rank=nan.copy(),
        valid=ok.copy(),
        method=method,
        info={"k": int(k), "temperature": float(temperature) if method == "infonce" else None},
        alt_caption_row=np.full(n, -1, dtype=np.int64),
        alt_caption_similarity=nan.copy(),
        alt_image_row=np.full(n, -1, dtype=np.int64),
        alt_image_similarity=nan.copy(),
        second_caption_row=np.full(n, -1, dtype=np.int64),
        second_caption_similarity=nan.copy(),
    )
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        warnings.warn("no valid rows to score; every score is NaN.", stacklevel=2)
        return out
    sim = _pair_cosines(img, txt, norm_i, norm_t, rows)
    out.similarity[rows] = np.clip(sim, -1.0, 1.0)

    # Nodes: one per image group and one per caption-text group among valid rows.
    _, a = np.unique(ig[rows], return_inverse=True)
    _, b = np.unique(tg[rows], return_inverse=True)
    a, b = a.ravel(), b.ravel()
    n_a, n_b = int(a.max()) + 1, int(b.max()) + 1
    out.info.update(n_image_groups=n_a, n_text_groups=n_b)
    if progress:
        progress("scoring pairs", 0, 3)
    img_nodes = _nodes(img, norm_i, rows, a, n_a)
    txt_nodes = _nodes(txt, norm_t, rows, b, n_b)
    # (image group, text group) pairs that occur in some row are never alternatives.
    pairs = np.unique(a.astype(np.int64) * n_b + b)
    pa, pb = pairs // n_b, pairs % n_b
    excl_ab = pairs  # sorted codes image*n_b + text
    excl_ba = np.sort(pb * n_a + pa)  # codes text*n_a + image
    alt_i, best_i = _alternatives(
        img_nodes,
        txt_nodes,
        excl_ab,
        np.bincount(pa, minlength=n_a),
        k,
        knn_seed,
        int(exact_max),
        int(nprobe),
    )
    if progress:
        progress("scoring pairs", 1, 3)
    alt_t, best_t = _alternatives(
        txt_nodes,
        img_nodes,
        excl_ba,
        np.bincount(pb, minlength=n_b),
        k,
        knn_seed,
        int(exact_max),
        int(nprobe),
    )
    del img_nodes, txt_nodes
    if progress:
        progress("scoring pairs", 2, 3)
    alt_i, alt_t = alt_i[a], alt_t[b]  # (m, k) per valid row
    _evidence(out, rows, a, b, best_i[a], best_t[b], alt_i, alt_t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (no alternatives)
        mean_i = np.nanmean(alt_i, axis=1)
        mean_t = np.nanmean(alt_t, axis=1)
    out.image_alt[rows] = mean_i
    out.text_alt[rows] = mean_t
    out.image_rank[rows] = np.sum(alt_i > sim[:, None], axis=1)
    out.text_rank[rows] = np.sum(alt_t > sim[:, None], axis=1)
    no_alt = ~np.isfinite(mean_i) & ~np.isfinite(mean_t)
    if no_alt.any():
        warnings.warn(
            f"{int(no_alt.sum())} scored rows have no alternative image or caption "
            "(fewer than 2 distinct images or texts); their score falls back to the raw cosine.",
            stacklevel=2,
        )
    # A side without alternatives borrows the other side's reference.
    ref_i = np.where(np.isfinite(mean_i), mean_i, mean_t)
    ref_t = np.where(np.isfinite(mean_t), mean_t, mean_i)

    score = _combine(method, sim, alt_i, alt_t, ref_i, ref_t, float(temperature))
    if no_alt.any():
        score = np.where(no_alt, sim, score)
    out.score[rows] = score
    if progress:
        progress("scoring pairs", 3, 3)
    return out


def planted_scores(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    source_row: np.ndarray,
    caption_row: np.ndarray,
    *,
    image_group: np.ndarray | None = None,
    text_group: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    k: int = 3,
    method: str = "csls",
    temperature: float = 0.05,
    exact_max: int | None = None,
    nprobe: int | None = None,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    # long: the lead's (issue 18, planting); not refactored here
    """Score planted mismatches exactly as :func:`pair_scores` scores the real rows.

    Plant ``i`` is the pair (image of row ``source_row[i]``, caption of row
    ``caption_row[i]``), scored as if that caption had been moved onto that row and
    nothing else had changed: the image's own caption (now "elsewhere") becomes an
    alternative of the image, the caption's own image an alternative of the caption,
    and the planted pair is excluded from both neighbourhoods, as the dataset's
    alternatives are for its real rows. That is what a real mismatch looks like to
    :func:`pair_scores`, so plant scores are a labelled sample of the mismatched
    population of *this* dataset under *this* model.

    Parameters
    ----------
    image_emb, text_emb, image_group, text_group, valid, k, method, temperature,
    exact_max, nprobe, seed
        As in :func:`pair_scores` (the same values give comparable scores).
    source_row, caption_row : ndarray of int, shape (m,)
        Valid rows; ``image_group`` of the two must differ.

    Returns
    -------
    ndarray, shape (m,), float64
        The statistic of ``method`` for each plant (higher = more likely a true pair).
    """
    if method not in SCORE_METHODS:
        raise ConfigError(
            f"Unknown method {method!r} for pair scores: "
            f"expected one of {', '.join(SCORE_METHODS)}."
        )
    from .neighbors import EXACT_MAX, NPROBE

    img = _as_emb(image_emb, "image_emb")
    txt = _as_emb(text_emb, "text_emb")
    n = img.shape[0]
    src = np.asarray(source_row, dtype=np.int64).ravel()
    dst = np.asarray(caption_row, dtype=np.int64).ravel()
    if src.shape != dst.shape:
        raise ConfigError("source_row and caption_row must have the same length.")
    m = src.size
    if m == 0:
        return np.empty(0)
    norm_i, ok_i = _row_norms(img)
    norm_t, ok_t = _row_norms(txt)
    ok = ok_i & ok_t
    if valid is not None:
        ok &= np.asarray(valid, dtype=bool)
    if not (ok[src].all() and ok[dst].all()):
        raise ConfigError("planted pairs must come from valid (scoreable) rows.")
    ig = _codes(image_group, n, "image_group")
    tg = _codes(text_group, n, "text_group")
    if np.any(ig[src] == ig[dst]):
        raise ConfigError("a planted pair must join an image with another image's caption.")
    rows = np.flatnonzero(ok)
    _, a = np.unique(ig[rows], return_inverse=True)
    _, b = np.unique(tg[rows], return_inverse=True)
    a, b = a.ravel(), b.ravel()
    n_a, n_b = int(a.max()) + 1, int(b.max()) + 1
    pos = np.full(n, -1, dtype=np.int64)
    pos[rows] = np.arange(rows.size)
    pa, pb = a[pos[src]], b[pos[dst]]  # planted image node, planted text node
    ra, rb = a[pos[dst]], b[pos[src]]  # the caption's own image, the image's own caption
    codes, counts = np.unique(a.astype(np.int64) * n_b + b, return_counts=True)
    img_nodes = _nodes(img, norm_i, rows, a, n_a)
    txt_nodes = _nodes(txt, norm_t, rows, b, n_b)
    knn_seed = None if seed is None or isinstance(seed, np.random.Generator) else int(seed)
    exact = EXACT_MAX if exact_max is None else int(exact_max)
    probe = NPROBE if nprobe is None else int(nprobe)

    def alternatives(
        query: np.ndarray,
        base: np.ndarray,
        q_node: np.ndarray,
        planted: np.ndarray,
        own: np.ndarray,
        excluded_code: Callable[[np.ndarray, np.ndarray], np.ndarray],
        per_query: np.ndarray,
    ) -> np.ndarray:
        from .neighbors import knn_search

        kk = min(base.shape[0], k + int(per_query.max()) + 1)
        sims, idx = knn_search(query, base, kk, seed=knn_seed, exact_max=exact, nprobe=probe)
        code = excluded_code(q_node[:, None], np.where(idx < 0, 0, idx))
        at = np.minimum(np.searchsorted(codes, code), codes.size - 1)
        paired = codes[at] == code
        # the row that paired them is the planted row: that pairing is gone
        lone = paired & (counts[at] == 1) & (idx == own[:, None])
        bad = (idx < 0) | (paired & ~lone) | (idx == planted[:, None])
        keep = ~bad
        rank = np.cumsum(keep, axis=1) - 1
        out = np.full((query.shape[0], k), np.nan)
        r_idx, c_idx = np.nonzero(keep & (rank < k))
        out[r_idx, rank[r_idx, c_idx]] = sims[r_idx, c_idx]
        return out

    per_a = np.bincount(codes // n_b, minlength=n_a)
    per_b = np.bincount(codes % n_b, minlength=n_b)
    alt_i = alternatives(img_nodes[pa], txt_nodes, pa, pb, rb, lambda q, j: q * n_b + j, per_a[pa])
    alt_t = alternatives(txt_nodes[pb], img_nodes, pb, pa, ra, lambda q, j: j * n_b + q, per_b[pb])
    sim = np.einsum("nd,nd->n", _unit_rows(img, norm_i, src), _unit_rows(txt, norm_t, dst))
    sim = np.clip(sim.astype(np.float64), -1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_i = np.nanmean(alt_i, axis=1)
        mean_t = np.nanmean(alt_t, axis=1)
    ref_i = np.where(np.isfinite(mean_i), mean_i, mean_t)
    ref_t = np.where(np.isfinite(mean_t), mean_t, mean_i)
    score = _combine(method, sim, alt_i, alt_t, ref_i, ref_t, float(temperature))
    no_alt = ~np.isfinite(mean_i) & ~np.isfinite(mean_t)
    return np.where(no_alt, sim, score)


#: Kinds of planted mismatch made by :func:`plant_pairs`, from the farthest partner
#: image to the nearest.
PLANT_KINDS = ("random", "local", "near", "similar")
#: Most pool rows the similar plants' partners are searched among.
_SIMILAR_BASE = 100_000
#: Most pool rows the local and near plants' partners are ranked among.
_BAND_BASE = 20_000
#: Bands of partner-image similarity rank (fractions of the ranked pool rows) of the
#: local and near plants: a caption from the nearest 1-10 % of images (same gallery,
#: same shard, same topic) and from the nearest 0.1-1 %.
_BANDS = {"local": (0.01, 0.1), "near": (0.001, 0.01)}
#: Fewest ranks a band must span to be planted (smaller datasets go without it).
_BAND_MIN_RANKS = 10


def plant_pairs(
    score: np.ndarray,
    image_emb: np.ndarray,
    *,
    image_group: np.ndarray | None = None,
    n_plants: int = 2000,
    similar_k: int = 10,
    seed: int | np.random.Generator | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Choose known mismatches to plant: (source row, caption row) pairs of two kinds.

    Sources are drawn from the better-scoring half of the scored rows (pairs most
    likely right, so that the image's own caption, which a mismatch leaves "elsewhere",
    is its true one). Each kind gives each source the caption of another source row
    whose image lies at a given distance from its own, from far to near:

    * ``"random"``: any other image;
    * ``"local"``: an image among the nearest 1-10 % (captions from the same gallery,
      shard or topic: a scrape's local shuffles);
    * ``"near"``: an image among the nearest 0.1-1 %;
    * ``"similar"``: one of the ``similar_k`` nearest images.

    Real mismatches come from any of these distances, and their scores differ with the
    distance; the split fits the data with the scores of every kind (a ladder of
    mismatch shapes) instead of assuming that mismatches are random. The local and
    near ranks are read among at most 20,000 pool rows; a band narrower than 10 ranks
    there (a small dataset) is left out, its kind then empty.

    Parameters
    ----------
    score : ndarray, shape (n,)
        :attr:`PairScores.score` (NaN rows are never used).
    image_emb : ndarray, shape (n, d)
        Image embeddings (for the similar kind).
    image_group : array-like, optional
        Image id per row (default: every row its own image).
    n_plants : int
        Plants of each kind, at most half the scored rows.
    similar_k : int
        Neighbourhood the similar caption is drawn from.
    seed : int, Generator or None

    Returns
    -------
    dict
        ``{kind: (source_row, caption_row)}`` for every kind of :data:`PLANT_KINDS`,
        int64 arrays; empty when fewer than 4 rows are scored or all scored rows show one
        image.
    """
    from .neighbors import knn_search

    rng = check_random_state(seed)
    s = np.asarray(score, dtype=np.float64)
    n = s.size
    g = _codes(image_group, n, "image_group")
    empty = np.empty(0, dtype=np.int64)
    out = dict.fromkeys(PLANT_KINDS, (empty, empty))
    scored = np.flatnonzero(np.isfinite(s))
    if scored.size < 4:
        return out
    pool = scored[s[scored] >= np.median(s[scored])]
    if np.unique(g[pool]).size < 2:
        return out
    m = int(min(n_plants, pool.size))
    src = np.sort(rng.choice(pool, size=m, replace=False))
    # random: another pool row of another image (redraw clashes; pool has >= 2 images)
    dst = rng.choice(pool, size=m)
    for _ in range(100):
        bad = g[dst] == g[src]
        if not bad.any():
            break
        dst[bad] = rng.choice(pool, size=int(bad.sum()))
    keep = g[dst] != g[src]
    out["random"] = (src[keep], dst[keep])
    x = _as_emb(image_emb, "image_emb")  # float16 (memory-mapped) stays: never a float32 copy
    norms, ok = _row_norms(x)
    band_pool = pool
    # similar: one of the nearest pool images of another image (among at most
    # _SIMILAR_BASE pool rows, so that a large dataset is not copied whole)
    if pool.size > _SIMILAR_BASE:
        pool = np.sort(np.union1d(rng.choice(pool, _SIMILAR_BASE, replace=False), src))
    base = _unit_rows(x, norms, pool)
    per_group = int(np.bincount(g[pool]).max())
    kk = min(pool.size, similar_k + per_group)
    _, idx = knn_search(_unit_rows(x, norms, src), base, kk, seed=None)
    cand = np.where(idx >= 0, pool[np.maximum(idx, 0)], -1)
    allowed = (idx >= 0) & (g[np.maximum(cand, 0)] != g[src][:, None])
    rank = np.cumsum(allowed, axis=1)
    n_allowed = np.minimum(rank[:, -1], similar_k)
    has = n_allowed > 0
    pick = np.zeros(m, dtype=np.int64)
    pick[has] = rng.integers(0, n_allowed[has]) + 1  # the pick-th allowed neighbour
    col = np.argmax(allowed & (rank == pick[:, None]), axis=1)
    sim_dst = cand[np.arange(m), col]
    out["similar"] = (src[has], sim_dst[has])
    # drawn last, so that the random and similar plants do not depend on the bands
    bands = _band_plants(x, norms, g, band_pool, src, rng)
    return {kind: bands.get(kind, out[kind]) for kind in PLANT_KINDS}


def _band_plants(
    x: np.ndarray,
    norms: np.ndarray,
    g: np.ndarray,
    pool: np.ndarray,
    src: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Partners of ``src`` at a rank drawn uniformly within each of :data:`_BANDS`.

    Ranks are read among a random sample of at most :data:`_BAND_BASE` pool rows (other
    images only), in chunks of sources so that memory stays at a few tens of MB.
    """
    base = pool if pool.size <= _BAND_BASE else np.sort(rng.choice(pool, _BAND_BASE, False))
    b = base.size
    bands = {}
    for kind, (lo_f, hi_f) in _BANDS.items():
        lo, hi = int(np.floor(lo_f * b)), int(np.floor(hi_f * b))
        if hi - lo >= _BAND_MIN_RANKS:
            bands[kind] = (lo, hi, rng.integers(lo, hi, src.size))
    empty = np.empty(0, dtype=np.int64)
    out = dict.fromkeys(_BANDS, (empty, empty))
    if not bands:
        return out
    unit_base = _unit_rows(x, norms, base)
    top_k = min(b, max(hi for _, hi, _ in bands.values()))
    picks = {kind: np.full(src.size, -1, dtype=np.int64) for kind in bands}
    chunk = max(1, (1 << 22) // max(b, 1))
    for c0 in range(0, src.size, chunk):
        rows = src[c0 : c0 + chunk]
        sim = _unit_rows(x, norms, rows) @ unit_base.T
        sim[g[base][None, :] == g[rows][:, None]] = -np.inf  # never the image itself
        # only the nearest `top` need an order: partition, then sort those
        top = np.argpartition(-sim, top_k - 1, axis=1)[:, :top_k]
        order = np.take_along_axis(
            top, np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable"), 1
        )
        n_other = np.isfinite(sim).sum(axis=1)
        for kind, (_, _, rank) in bands.items():
            r = rank[c0 : c0 + chunk]
            fine = r < n_other
            picks[kind][c0 : c0 + chunk][fine] = base[order[np.flatnonzero(fine), r[fine]]]
    for kind, dst in picks.items():
        has = dst >= 0
        out[kind] = (src[has], dst[has])
    return out
