"""k-NN search: exact answers, approximate recall on seeded data, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

import pmpclean.neighbors as N
from pmpclean.errors import ConfigError
from pmpclean.neighbors import ivf_nlist, knn_search


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def blobs():
    """Seeded clustered data (60 topics in 32-d), queries from the same topics."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((60, 32))
    base = _unit(centers[rng.integers(0, 60, 4000)] + 0.6 * rng.standard_normal((4000, 32)))
    query = _unit(centers[rng.integers(0, 60, 800)] + 0.6 * rng.standard_normal((800, 32)))
    return query, base


def _brute(query: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = query @ base.T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, 1), idx


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    pairs = zip(found, truth, strict=True)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in pairs]))


def test_exact_matches_brute_force(blobs) -> None:
    query, base = blobs
    sims, idx = knn_search(query[:200], base, 7)
    ref_s, ref_i = _brute(query[:200], base, 7)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)
    assert _recall(idx, ref_i) > 0.999  # ties aside, the same neighbours


def test_missing_neighbours_are_minus_one() -> None:
    x = np.eye(3, dtype=np.float32)
    for exact_max in (10, 0):  # exact and approximate paths
        sims, idx = knn_search(x, x, 5, exact_max=exact_max)
        assert idx.shape == (3, 5) and np.all(idx[:, 3:] == -1)
        assert np.all(np.isneginf(sims[:, 3:])) and idx[:, 0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("k", [1, 4, 10])
def test_approximate_recall_on_seeded_clusters(blobs, k: int) -> None:
    query, base = blobs
    _, ref_i = _brute(query, base, k)
    sims, idx = knn_search(query, base, k, exact_max=0, nprobe=8, seed=0)
    assert _recall(idx, ref_i) > 0.9
    # similarities are the exact inner products of the returned rows, sorted, no holes
    assert np.all(idx >= 0)
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", query, base[idx]), atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-7)


def test_recall_grows_with_nprobe_and_is_exact_when_every_list_is_probed(blobs) -> None:
    query, base = blobs
    _, ref_i = _brute(query, base, 10)
    recalls = [
        _recall(knn_search(query, base, 10, exact_max=0, nprobe=p)[1], ref_i) for p in (1, 4, 16)
    ]
    assert recalls[0] < recalls[1] <= recalls[2]
    nlist = ivf_nlist(len(query), len(base), 8)
    _, idx = knn_search(query, base, 10, exact_max=0, nprobe=nlist)
    assert _recall(idx, ref_i) > 0.999


def test_approximate_is_deterministic_for_a_seed(blobs) -> None:
    query, base = blobs
    a = knn_search(query, base, 5, exact_max=0, seed=3)
    b = knn_search(query, base, 5, exact_max=0, seed=3)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_reuse_indexes_trains_the_lists_of_a_base_once(blobs, monkeypatch) -> None:
    """Inside reuse_indexes, a base with the same rows (a copy: same bytes) and seed is
    searched with the lists built the first time; other rows or another seed get their
    own; the lists hold no reference to the rows between searches; outside the block
    nothing is kept."""
    query, base = blobs
    built: list[int] = []
    real = N._InvertedLists.__init__

    def counting(self, b, *args, **kwargs):
        built.append(b.shape[0])
        real(self, b, *args, **kwargs)

    monkeypatch.setattr(N._InvertedLists, "__init__", counting)
    with N.reuse_indexes():
        first = knn_search(query, base, 5, exact_max=0, seed=3)
        n_first = len(built)
        again = knn_search(query[:100], base.copy(), 5, exact_max=0, seed=3)
        assert len(built) == n_first  # same rows, same seed: no training
        cached = list(N._INDEX_CACHE.get().values())
        assert all(lists.base is None for lists in cached)
        knn_search(query, base[::-1].copy(), 5, exact_max=0, seed=3)  # other order
        knn_search(query, base, 5, exact_max=0, seed=4)  # other seed
        assert len(built) == 3 * n_first
    np.testing.assert_array_equal(again[1], first[1][:100])
    np.testing.assert_array_equal(again[0], first[0][:100])
    knn_search(query, base, 5, exact_max=0, seed=3)
    knn_search(query, base, 5, exact_max=0, seed=3)
    assert len(built) == 5 * n_first  # no cache outside the block


def test_nlist_balances_coarse_and_scan_cost() -> None:
    assert ivf_nlist(1_000_000, 1_000_000, 8) == 2236
    assert ivf_nlist(100_000, 100_000, 8) == 707
    assert ivf_nlist(10, 10, 8) == 1  # never more lists than rows / 8
    assert ivf_nlist(1_000_000, 1_000_000, 4) < ivf_nlist(1_000_000, 1_000_000, 16)


def test_lists_stop_growing_above_a_million_rows() -> None:
    # the sqrt(n) optimum of a flat coarse step until lists would pass 512 rows on
    # average; then nlist grows with n, so the scan per query stays constant
    assert ivf_nlist(10_000_000, 10_000_000, 8) == 19_531  # 10M / 512
    assert ivf_nlist(100_000_000, 100_000_000, 8) == 195_312
    assert ivf_nlist(10_000_000, 10_000_000, 4) == ivf_nlist(10_000_000, 10_000_000, 16)


def test_float16_rows_are_searched_as_float32_without_a_full_copy(blobs) -> None:
    query, base = blobs
    q16, b16 = query.astype(np.float16), base.astype(np.float16)
    for exact_max in (10**6, 0):  # exact and approximate paths
        s16, i16 = knn_search(q16, b16, 5, exact_max=exact_max, seed=0)
        s32, _ = knn_search(q16.astype(np.float32), b16.astype(np.float32), 5, exact_max=exact_max)
        assert s16.dtype == np.float32 and i16.dtype == np.int64
        np.testing.assert_allclose(s16, s32, atol=1e-6)  # the same float32 arithmetic
        # exact inner products of the float16 rows
        ref = np.einsum("qd,qkd->qk", q16.astype(np.float64), b16.astype(np.float64)[i16])
        np.testing.assert_allclose(s16, ref, atol=1e-5)


def test_a_float16_base_is_never_copied_whole() -> None:
    import tracemalloc

    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal((300_000, 64))).astype(np.float16)  # 38 MB
    query = base[:1000]
    tracemalloc.start()
    try:
        knn_search(query, base, 4, exact_max=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < base.nbytes  # a float32 copy of the base alone would be 2x base.nbytes


def test_a_coarse_inverted_file_over_many_lists_keeps_recall(blobs, monkeypatch) -> None:
    # shrink the limits so that 4,000 rows make 250 lists of 16, found through an
    # inverted file over the centroids (two-level k-means, two-level coarse step)
    query, base = blobs
    monkeypatch.setattr(N, "_LIST_ROWS", 16)
    monkeypatch.setattr(N, "_FLAT_COARSE_MAX", 64)
    built: list[N._InvertedLists] = []
    init = N._InvertedLists.__init__

    def spy(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(N._InvertedLists, "__init__", spy)
    _, ref_i = _brute(query, base, 4)
    sims, idx = knn_search(query, base, 4, exact_max=0, nprobe=8, seed=0)
    outer = built[-1]
    assert abs(outer.nlist - 250) <= 10 and outer.coarse is not None and outer.coarse.coarse is None
    assert outer.sizes.sum() == len(base) and np.all(idx >= 0)
    assert _recall(idx, ref_i) > 0.85
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", query, base[idx]), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": 2, "exact_max": -1}, "exact_max must be an integer >= 0"),
        ({"k": 2, "nprobe": 0}, "nprobe must be an integer >= 1"),
        ({"k": 2, "nprobe": 2.5}, "nprobe must be an integer >= 1"),
    ],
)
def test_raise_errors(kwargs: dict, match: str) -> None:
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ConfigError, match=match):
        knn_search(x, x, **kwargs)


def test_shape_errors() -> None:
    with pytest.raises(ConfigError, match="query must be a 2-D array"):
        knn_search(np.zeros(3, np.float32), np.eye(3, dtype=np.float32), 1)
    with pytest.raises(ConfigError, match="same width"):
        knn_search(np.eye(3, dtype=np.float32), np.eye(4, dtype=np.float32), 1)
