"""Pair scores: recovery of injected mismatches, grouping, invalid rows, ranges, errors."""

from __future__ import annotations

import numpy as np
import pytest

from pmpclean.errors import ConfigError
from pmpclean.evaluate import auroc
from pmpclean.score import SCORE_METHODS, pair_scores
from pmpclean.synthetic import clip_like_pairs


@pytest.fixture(scope="module")
def data():
    return clip_like_pairs(800, dim=64, noise_rate=0.3, hub_fraction=0.03, semantic=1.0, seed=0)


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_every_method_ranks_mismatches_low(data, method: str) -> None:
    ps = pair_scores(data.image_emb, data.text_emb, image_group=data.image_group, method=method)
    assert ps.score.shape == (800,) and ps.score.dtype == np.float64
    assert np.all(np.isfinite(ps.score))
    assert auroc(data.is_mismatched, -ps.score) > 0.98


def test_relative_score_beats_raw_cosine_under_hubs() -> None:
    d = clip_like_pairs(1500, dim=64, noise_rate=0.3, hub_fraction=0.1, hub_strength=1.0, seed=1)
    csls = pair_scores(d.image_emb, d.text_emb, method="csls")
    cos = pair_scores(d.image_emb, d.text_emb, method="cosine")
    a_csls, a_cos = auroc(d.is_mismatched, -csls.score), auroc(d.is_mismatched, -cos.score)
    assert a_csls > a_cos + 0.02
    # mismatched rows at hub images are the ones raw cosine misses
    hub_mis = d.is_hub & d.is_mismatched
    assert hub_mis.sum() > 10
    assert np.median(csls.image_rank[hub_mis]) >= 1


def test_ranges_and_diagnostics(data) -> None:
    ps = pair_scores(data.image_emb, data.text_emb, image_group=data.image_group, k=5)
    assert np.all((ps.similarity >= -1) & (ps.similarity <= 1))
    for rank in (ps.image_rank, ps.text_rank):
        assert np.all((rank >= 0) & (rank <= 5)) and np.all(rank == np.round(rank))
    # csls = 2 s - mean alternatives on both sides, exactly
    np.testing.assert_allclose(ps.score, 2 * ps.similarity - ps.image_alt - ps.text_alt, atol=1e-6)
    assert ps.info["k"] == 5 and ps.method == "csls"
    # mismatched pairs are beaten by their alternatives more often
    assert ps.image_rank[data.is_mismatched].mean() > ps.image_rank[~data.is_mismatched].mean() + 1


def test_hand_computed_alternatives() -> None:
    # 3 images, 3 captions in the plane; exact alternatives known.
    img = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    ang = np.deg2rad([10.0, 80.0, 170.0])
    txt = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
    ps = pair_scores(img, txt, k=1, method="margin")
    s = img @ txt.T
    best_alt_img = [max(s[i, j] for j in range(3) if j != i) for i in range(3)]
    best_alt_txt = [max(s[j, i] for j in range(3) if j != i) for i in range(3)]
    np.testing.assert_allclose(ps.similarity, np.diag(s), atol=1e-6)
    want = np.diag(s) - 0.5 * (np.array(best_alt_img) + np.array(best_alt_txt))
    np.testing.assert_allclose(ps.score, want, atol=1e-6)


def test_evidence_names_the_better_caption_and_image() -> None:
    # Brute force over the cosine matrix: for each row, the other caption that fits its
    # image best (and the second best) and the other image that fits its caption best.
    rng = np.random.default_rng(3)
    img = rng.standard_normal((12, 8)).astype(np.float32)
    txt = (img + 0.3 * rng.standard_normal((12, 8))).astype(np.float32)
    txt[[0, 5]] = txt[[5, 0]]  # two swapped pairs: each caption fits the other image
    ps = pair_scores(img, txt, k=3)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    s = unit(img.astype(np.float64)) @ unit(txt.astype(np.float64)).T
    off = s - 10 * np.eye(12)  # a row's own pair is never an alternative
    caps = np.argsort(-off, axis=1)
    np.testing.assert_array_equal(ps.alt_caption_row, caps[:, 0])
    np.testing.assert_array_equal(ps.second_caption_row, caps[:, 1])
    np.testing.assert_array_equal(ps.alt_image_row, off.argmax(axis=0))
    np.testing.assert_allclose(ps.alt_caption_similarity, off.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(ps.alt_image_similarity, off.max(axis=0), atol=1e-5)
    assert ps.alt_caption_row[0] == 5 and ps.alt_image_row[0] == 5  # the swap partner
    assert ps.alt_caption_similarity[0] > ps.similarity[0]


def test_evidence_shows_a_group_by_its_first_row_and_skips_invalid_rows() -> None:
    rng = np.random.default_rng(4)
    img = rng.standard_normal((7, 8)).astype(np.float32)
    txt = img.copy()
    img[[2, 3]] = img[1]  # rows 1-3 show one image with three captions
    groups = np.array([0, 1, 1, 1, 4, 5, 6])
    valid = np.array([True] * 6 + [False])
    ps = pair_scores(img, txt, image_group=groups, valid=valid, k=2)
    assert ps.alt_caption_row[6] == -1 and np.isnan(ps.alt_image_similarity[6])
    assert 6 not in set(ps.alt_caption_row) | set(ps.alt_image_row)
    assert 1 in set(ps.alt_image_row) and not {2, 3} & set(ps.alt_image_row)  # group 1: row 1
    assert set(ps.alt_caption_row[1:4]).isdisjoint({1, 2, 3})  # own captions excluded


def test_captions_of_the_same_image_are_not_alternatives() -> None:
    # Image A has 5 near-identical captions; B, C, D are unrelated pairs.
    rng = np.random.default_rng(0)
    a, b, c, d = (v / np.linalg.norm(v) for v in rng.standard_normal((4, 16)))
    cap = [a + 0.05 * rng.standard_normal(16) for _ in range(5)]
    img = np.stack([a] * 5 + [b, c, d]).astype(np.float32)
    txt = np.stack(cap + [b, c, d]).astype(np.float32)
    groups = np.array([0, 0, 0, 0, 0, 1, 2, 3])
    grouped = pair_scores(img, txt, image_group=groups, k=1)
    ungrouped = pair_scores(img, txt, k=1)
    # ungrouped, the sibling captions look like strong alternatives; grouped they do not
    assert np.all(ungrouped.image_alt[:5] > 0.9)
    assert np.all(grouped.image_rank[:5] == 0) and np.all(grouped.text_rank[:5] == 0)
    assert np.all(grouped.score[:5] > ungrouped.score[:5] + 0.5)
    assert np.all(grouped.image_alt[:5] < 0.9)


def test_identical_texts_are_not_alternatives() -> None:
    rng = np.random.default_rng(1)
    v = rng.standard_normal((6, 16)).astype(np.float32)
    img, txt = v.copy(), v.copy()
    txt[1] = txt[0]  # image 1 carries the same caption text as image 0
    img[1] = img[0] + 0.01
    tg = np.array([0, 0, 1, 2, 3, 4])
    with_tg = pair_scores(img, txt, text_group=tg, k=1)
    without = pair_scores(img, txt, k=1)
    # without text groups, row 0's caption finds image 1 (same text) as a near-perfect alternative
    assert without.text_alt[0] > 0.99
    assert with_tg.text_alt[0] < 0.9
    assert with_tg.score[0] > without.score[0] + 0.5


def test_invalid_and_nan_rows(data) -> None:
    img, txt = data.image_emb.copy(), data.text_emb.copy()
    img[3] = np.nan
    txt[7] = 0.0
    valid = np.ones(800, bool)
    valid[11] = False
    ps = pair_scores(img, txt, image_group=data.image_group, valid=valid)
    bad = [3, 7, 11]
    for arr in (ps.score, ps.similarity, ps.image_alt, ps.text_rank):
        assert np.all(np.isnan(arr[bad]))
        assert np.isfinite(np.delete(arr, bad)).all()
    assert not ps.valid[bad].any() and ps.valid.sum() == 797
    # invalid rows are not alternatives: same scores as with the rows removed
    keep = np.setdiff1d(np.arange(800), bad)
    ref = pair_scores(img[keep], txt[keep], image_group=data.image_group[keep])
    np.testing.assert_allclose(ps.score[keep], ref.score, atol=1e-6)


def test_all_invalid_warns_and_returns_nan() -> None:
    x = np.full((4, 8), np.nan, dtype=np.float32)
    with pytest.warns(UserWarning, match="no valid rows"):
        ps = pair_scores(x, x)
    assert np.isnan(ps.score).all() and not ps.valid.any()


def test_single_image_falls_back_to_cosine() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.warns(UserWarning, match="no alternative image or caption"):
        ps = pair_scores(x, x + 0.1, image_group=[0, 0, 0], text_group=[0, 0, 0])
    np.testing.assert_allclose(ps.score, ps.similarity)


def test_deterministic(data) -> None:
    a = pair_scores(data.image_emb, data.text_emb, method="infonce", seed=0)
    b = pair_scores(data.image_emb, data.text_emb, method="infonce", seed=0)
    np.testing.assert_array_equal(a.score, b.score)


def test_progress_callback(data) -> None:
    calls: list[tuple[str, int, int]] = []
    pair_scores(data.image_emb, data.text_emb, progress=lambda s, d, t: calls.append((s, d, t)))
    assert calls[0][1:] == (0, 3) and calls[-1][1:] == (3, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "clip"}, "Unknown method 'clip' for pair scores: expected one of csls, margin"),
        ({"k": 0}, "k must be a positive integer"),
        ({"temperature": 0.0}, "temperature must be a positive number"),
        ({"image_group": [0, 1]}, r"image_group must have shape \(4,\)"),
        ({"valid": [True]}, r"valid must have shape \(4,\)"),
        ({"exact_max": -1}, r"exact_max must be an integer >= 0"),
        ({"nprobe": 0}, r"nprobe must be an integer >= 1"),
    ],
)
def test_raise_errors(kwargs: dict, match: str) -> None:
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ConfigError, match=match):
        pair_scores(x, x, **kwargs)


def test_shape_errors() -> None:
    with pytest.raises(ConfigError, match=r"same shape \(n, d\)"):
        pair_scores(np.eye(4), np.eye(3))
    with pytest.raises(ConfigError, match="must be a 2-D array"):
        pair_scores(np.ones(4), np.ones(4))


def test_approximate_alternatives_keep_the_ranking(data) -> None:
    # exact_max=0 forces the inverted-file search even on 800 rows
    exact = pair_scores(data.image_emb, data.text_emb, image_group=data.image_group, seed=0)
    approx = pair_scores(
        data.image_emb, data.text_emb, image_group=data.image_group, exact_max=0, seed=0
    )
    # an approximate search can only miss neighbours: alternatives never look closer
    assert np.all(approx.image_alt <= exact.image_alt + 1e-6)
    assert np.all(approx.text_alt <= exact.text_alt + 1e-6)
    assert np.corrcoef(approx.score, exact.score)[0, 1] > 0.98
    assert auroc(data.is_mismatched, -approx.score) > 0.98
    # probing every list is exact again
    full = pair_scores(
        data.image_emb, data.text_emb, image_group=data.image_group, exact_max=0, nprobe=10**6
    )
    np.testing.assert_allclose(full.score, exact.score, atol=1e-5)


def test_unnormalised_and_float64_input_give_the_same_scores(data) -> None:
    # unit float32 rows are used without a copy; other input is normalised chunk-wise
    ref = pair_scores(data.image_emb, data.text_emb, image_group=data.image_group)
    scaled = pair_scores(
        3.0 * data.image_emb.astype(np.float64),
        0.5 * data.text_emb,
        image_group=data.image_group,
    )
    np.testing.assert_allclose(scaled.score, ref.score, atol=1e-5)
    np.testing.assert_allclose(scaled.similarity, ref.similarity, atol=1e-6)


def test_several_captions_per_image_use_group_means() -> None:
    d = clip_like_pairs(600, dim=32, captions_per_image=3, noise_rate=0.2, seed=5)
    ps = pair_scores(d.image_emb, d.text_emb, image_group=d.image_group, k=2)
    # the image node is the normalised mean of its (identical) rows: same alternatives
    # for every caption row of one image
    alt = ps.image_alt.reshape(-1, 3)
    np.testing.assert_allclose(alt, alt[:, :1].repeat(3, axis=1), atol=1e-7)
    assert ps.info["n_image_groups"] == 200


@pytest.mark.parametrize("captions_per_image", [1, 3])
@pytest.mark.parametrize("method", ["csls", "margin", "infonce"])
def test_planted_scores_equal_the_score_of_a_real_swap(
    method: str, captions_per_image: int
) -> None:
    """A plant is scored exactly as that caption would be if it really sat on that row."""
    from pmpclean.score import planted_scores
    from pmpclean.synthetic import clip_like_pairs

    d = clip_like_pairs(300, dim=32, noise_rate=0.0, captions_per_image=captions_per_image, seed=0)
    n = d.image_emb.shape[0]
    rng = np.random.default_rng(0)
    src = rng.choice(n, 12, replace=False)
    dst = np.roll(src, 1)  # random plants, and below, the caption that fits the image best
    near = d.image_emb[src] @ d.text_emb.T
    near[d.image_group[src][:, None] == d.image_group[None, :]] = -np.inf
    src, dst = np.r_[src, src], np.r_[dst, near.argmax(axis=1)]
    keep = d.image_group[src] != d.image_group[dst]
    src, dst = src[keep], dst[keep]
    kw = {"image_group": d.image_group, "text_group": d.text_group, "method": method}
    plant = planted_scores(d.image_emb, d.text_emb, src, dst, **kw)
    for i, (r, s) in enumerate(zip(src, dst, strict=True)):
        txt = d.text_emb.copy()
        tg = d.text_group.copy()
        txt[[r, s]] = txt[[s, r]]
        tg[[r, s]] = tg[[s, r]]
        real = pair_scores(d.image_emb, txt, **{**kw, "text_group": tg})
        assert real.score[r] == pytest.approx(plant[i], abs=1e-5)  # float32 sums
    # a random plant is a mismatch: it scores below the true pairs it was made from
    rand = np.flatnonzero(keep[:12])
    true = pair_scores(d.image_emb, d.text_emb, **kw).score[src[rand]]
    assert np.median(plant[rand]) < np.median(true)


def test_plant_pairs_join_other_images_at_a_ladder_of_distances() -> None:
    from pmpclean.score import PLANT_KINDS, plant_pairs

    d = clip_like_pairs(2400, dim=32, noise_rate=0.0, captions_per_image=2, seed=0)
    ps = pair_scores(d.image_emb, d.text_emb, image_group=d.image_group)
    plants = plant_pairs(ps.score, d.image_emb, image_group=d.image_group, n_plants=200, seed=0)
    assert tuple(plants) == PLANT_KINDS
    good = ps.score >= np.median(ps.score)
    x = d.image_emb / np.linalg.norm(d.image_emb, axis=1, keepdims=True)
    near = {}
    for kind, (src, dst) in plants.items():
        assert src.size >= 150
        assert np.all(d.image_group[src] != d.image_group[dst])  # always another image
        assert good[src].all() and good[dst].all()  # from the better half
        near[kind] = float(np.mean(np.einsum("nd,nd->n", x[src], x[dst])))
    # from far to near, each kind's partner image is closer than the last
    sims = [near[kind] for kind in PLANT_KINDS]
    assert all(a < b for a, b in zip(sims, sims[1:], strict=False)), near
    assert near["random"] + 0.1 < near["local"] and near["similar"] > near["random"] + 0.2
    # the local kind's partner lies in the nearest 1-10 % of the source's other images
    src, dst = plants["local"]
    other = d.image_group[None, :] != d.image_group[src][:, None]
    pool_sims = np.where(other & good[None, :], x[src] @ x.T, np.nan)
    rank = np.nansum(pool_sims > np.einsum("nd,nd->n", x[src], x[dst])[:, None], axis=1)
    share = rank / np.sum(np.isfinite(pool_sims), axis=1)
    assert np.all((share >= 0.005) & (share <= 0.11)), np.quantile(share, [0, 1])
    again = plant_pairs(ps.score, d.image_emb, image_group=d.image_group, n_plants=200, seed=0)
    assert all(np.array_equal(again[k][1], plants[k][1]) for k in plants)


def test_float16_embeddings_score_like_float32_without_a_copy(monkeypatch) -> None:
    import pmpclean.neighbors as neighbors

    d = clip_like_pairs(3_000, dim=64, noise_rate=0.2, seed=4)
    img16, txt16 = d.image_emb.astype(np.float16), d.text_emb.astype(np.float16)
    searched: list[tuple[np.ndarray, np.ndarray]] = []
    search = neighbors.knn_search

    def spy(query, base, *args, **kwargs):
        searched.append((query, base))
        return search(query, base, *args, **kwargs)

    monkeypatch.setattr(neighbors, "knn_search", spy)
    ps16 = pair_scores(img16, txt16, seed=0)  # exact search: same neighbours
    # one row per image and per caption: the searched nodes are the float16 rows
    # themselves, not float32 twins (10M x 512 rows: 20 GB each)
    assert [(q is img16, b is txt16) for q, b in searched[:1]] == [(True, True)]
    assert [(q is txt16, b is img16) for q, b in searched[1:]] == [(True, True)]
    monkeypatch.setattr(neighbors, "knn_search", search)
    ps32 = pair_scores(img16.astype(np.float32), txt16.astype(np.float32), seed=0)
    # float16 rows are unit vectors up to rounding (norms within 1e-4 of 1)
    np.testing.assert_allclose(ps16.score, ps32.score, atol=1e-3)
