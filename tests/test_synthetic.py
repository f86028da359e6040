"""The CLIP-like generator: shapes, geometry, groups, duplicates, noise bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from pmpclean.errors import ConfigError
from pmpclean.synthetic import clip_like_pairs


def test_shapes_normalisation_and_noise_bookkeeping() -> None:
    d = clip_like_pairs(400, dim=64, noise_rate=0.25, seed=0)
    assert d.image_emb.shape == d.text_emb.shape == (400, 64)
    assert d.image_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d.image_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(d.text_emb, axis=1), 1.0, atol=1e-5)
    assert int(d.is_mismatched.sum()) == 100
    assert d.noise_rate == pytest.approx(0.25)
    # observed captions are the clean captions moved by true_row
    np.testing.assert_array_equal(d.text_emb, d.clean_text_emb[d.true_row])
    np.testing.assert_array_equal(d.is_mismatched, d.image_group[d.true_row] != d.image_group)


def test_clip_like_narrow_band_and_separation() -> None:
    d = clip_like_pairs(2000, noise_rate=0.3, hub_fraction=0.0, seed=1)
    s = np.einsum("nd,nd->n", d.image_emb, d.text_emb)
    clean, noisy = s[~d.is_mismatched], s[d.is_mismatched]
    # true pairs in a narrow band well below 1; mismatched lower but overlapping
    assert 0.18 < clean.mean() < 0.35 and clean.std() < 0.07
    assert 0.05 < noisy.mean() < clean.mean() - 0.07
    assert clean.min() < noisy.max()


def test_hubs_are_close_to_many_captions() -> None:
    d = clip_like_pairs(2000, noise_rate=0.0, hub_fraction=0.05, seed=2)
    mean_sim = (d.image_emb @ d.text_emb.T).mean(axis=1)
    assert mean_sim[d.is_hub].mean() > mean_sim[~d.is_hub].mean() + 0.05


def test_captions_per_image_and_duplicates() -> None:
    d = clip_like_pairs(
        500, dim=32, captions_per_image=5, duplicate_fraction=0.1, noise_rate=0.2, seed=3
    )
    assert np.array_equal(np.bincount(d.image_group), np.full(100, 5))
    # rows of one image share the image embedding
    assert np.allclose(d.image_emb[0], d.image_emb[4])
    # duplicated texts: same text_group <=> identical embedding, across different images
    clean_tg = np.empty_like(d.text_group)
    clean_tg[d.true_row] = d.text_group
    counts = np.bincount(clean_tg)
    dup = np.flatnonzero(counts > 1)
    assert dup.size > 20
    rows = np.flatnonzero(clean_tg == dup[0])
    assert np.allclose(d.clean_text_emb[rows[0]], d.clean_text_emb[rows[1]])
    assert d.image_group[rows[0]] != d.image_group[rows[1]]
    # noise never gives a row a caption of its own image
    moved = d.true_row != np.arange(500)
    assert np.all(d.image_group[d.true_row[moved]] != d.image_group[moved])


def test_hard_noise_swaps_within_topics() -> None:
    d = clip_like_pairs(2000, dim=64, noise_rate=0.4, noise_mode="hard", seed=4)
    m = d.is_mismatched
    same_topic_hard = np.mean(d.cluster[d.true_row[m]] == d.cluster[m])
    r = clip_like_pairs(2000, dim=64, noise_rate=0.4, noise_mode="shuffle", seed=4)
    same_topic_rand = np.mean(r.cluster[r.true_row[r.is_mismatched]] == r.cluster[r.is_mismatched])
    assert same_topic_hard > 0.7 > 0.2 > same_topic_rand


def test_seeded_and_frame() -> None:
    a = clip_like_pairs(100, dim=16, seed=5)
    b = clip_like_pairs(100, dim=16, seed=5)
    np.testing.assert_array_equal(a.text_emb, b.text_emb)
    np.testing.assert_array_equal(a.true_row, b.true_row)
    frame = a.to_frame()
    assert list(frame.columns) == ["image", "caption", "true_row", "cluster"]
    assert len(frame) == 100 and frame["image"].iloc[0] == "img_00000.png"
    # a moved caption's text names the topic of the image it was written for
    i = int(np.flatnonzero(a.is_mismatched)[0])
    assert frame["caption"].iloc[i].endswith(f"topic {a.cluster[a.true_row[i]]}")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_pairs": 1}, "n_pairs must be an integer >= 2"),
        ({"n_pairs": 10, "captions_per_image": 0}, "captions_per_image must be at least 1"),
        ({"n_pairs": 10, "duplicate_fraction": 2.0}, r"duplicate_fraction must be in \[0, 1\]"),
        ({"n_pairs": 10, "noise_rate": 3.0}, r"rate must be in \[0, 1\]"),
    ],
)
def test_raise_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        clip_like_pairs(**kwargs)
