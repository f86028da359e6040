"""The positive-unlabelled detector: neighbourhood features and the planted-trained ranking."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pmpclean.detector import FEATURE_NAMES, pair_features, pu_scores
from pmpclean.errors import ConfigError
from pmpclean.synthetic import clip_like_pairs


def _col(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, FEATURE_NAMES.index(name)]


def test_features_of_an_exchanged_pair() -> None:
    # six orthogonal images, each caption its image, except rows 0 and 1: each holds a
    # caption of the other's image (0.8 of it, 0.6 of its own image)
    img = np.eye(6, dtype=np.float32)
    txt = img.copy()
    txt[0] = 0.8 * img[1] + 0.6 * img[0]
    txt[1] = 0.8 * img[0] + 0.6 * img[1]
    x = pair_features(img, txt, k=3)
    assert x.shape == (6, len(FEATURE_NAMES))
    np.testing.assert_allclose(_col(x, "cosine"), [0.6, 0.6, 1, 1, 1, 1], atol=1e-6)
    # each exchanged caption's best other image is the other exchanged row's image ...
    np.testing.assert_allclose(_col(x, "best_image")[:2], 0.8, atol=1e-6)
    np.testing.assert_allclose(_col(x, "alt_image_own")[:2], 0.6, atol=1e-6)
    # ... which it fits better than that row's own caption does, by 0.8 - 0.6
    np.testing.assert_allclose(_col(x, "steal_image")[:2], 0.2, atol=1e-6)
    # exchanging the captions back: 0.8 + 0.8 - 0.6 - 0.6
    np.testing.assert_allclose(_col(x, "swap_image")[:2], 0.4, atol=1e-6)
    np.testing.assert_allclose(_col(x, "swap_caption")[:2], 0.4, atol=1e-6)
    np.testing.assert_allclose(_col(x, "margin")[:2], 0.6 - 0.8, atol=1e-6)
    np.testing.assert_array_equal(_col(x, "cycle")[:2], 1.0)
    np.testing.assert_array_equal(_col(x, "image_rank")[:2], 1.0)
    np.testing.assert_array_equal(_col(x, "caption_rank")[:2], 1.0)
    # the clean rows: own pair first, no exchange helps, no cycle
    assert np.all(_col(x, "swap_image")[2:] <= 0.0)
    np.testing.assert_array_equal(_col(x, "image_rank")[2:], 0.0)
    np.testing.assert_array_equal(_col(x, "caption_rank")[2:], 0.0)


def test_planted_copy_exchanges_captions_between_images() -> None:
    from pmpclean.detector import _planted_copy

    d = clip_like_pairs(600, dim=32, captions_per_image=2, seed=0)
    rng = np.random.default_rng(0)
    scored = np.ones(600, dtype=bool)
    perm = _planted_copy(d.image_emb, d.image_group, None, scored, ("similar",), 0.2, rng)
    moved = np.flatnonzero(perm != np.arange(600))
    np.testing.assert_array_equal(np.sort(perm), np.arange(600))  # a permutation
    np.testing.assert_array_equal(perm[perm], np.arange(600))  # of exchanges
    assert 40 <= moved.size <= 0.2 * 600
    assert np.all(d.image_group[perm[moved]] != d.image_group[moved])


def test_features_of_invalid_rows_are_nan() -> None:
    d = clip_like_pairs(60, dim=16, noise_rate=0.0, seed=0)
    valid = np.ones(60, dtype=bool)
    valid[[3, 7]] = False
    x = pair_features(d.image_emb, d.text_emb, valid=valid)
    assert np.isnan(x[[3, 7]]).all()
    assert np.isfinite(_col(x, "cosine")[valid]).all()


def test_detector_ranks_hard_mismatches_above_clean_pairs() -> None:
    d = clip_like_pairs(800, dim=64, noise_rate=0.2, noise_mode="hard", noise=0.5, seed=0)
    ps = pu_scores(d.image_emb, d.text_emb, image_group=d.image_group, seed=0)
    assert ps.score.shape == (800,)
    assert np.isfinite(ps.score).all()
    assert ps.info["n_planted"] >= 40
    # planted mismatches are told from the data's rows, and the real ones follow
    assert ps.planted_auroc > 0.7
    assert roc_auc_score(d.is_mismatched, -ps.score) > 0.85
    # seeded: the same call gives the same ranking
    again = pu_scores(d.image_emb, d.text_emb, image_group=d.image_group, seed=0)
    np.testing.assert_array_equal(ps.score, again.score)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "forest"}, "Unknown model 'forest'"),
        ({"kinds": ("hard",)}, "kinds must be a non-empty subset"),
        ({"kinds": ()}, "kinds must be a non-empty subset"),
        ({"plant_rate": 0.0}, "plant_rate must be in"),
        ({"plant_rate": 0.6}, "plant_rate must be in"),
        ({"n_folds": 1}, "n_folds must be an integer >= 2"),
        ({"k": 1}, "k must be an integer >= 2"),
    ],
)
def test_raise_errors(kwargs: dict, match: str) -> None:
    d = clip_like_pairs(200, dim=16, seed=0)
    with pytest.raises(ConfigError, match=match):
        pu_scores(d.image_emb, d.text_emb, **kwargs)


def test_too_small_to_plant() -> None:
    d = clip_like_pairs(40, dim=16, seed=0)
    with pytest.raises(ConfigError, match="could be planted"):
        pu_scores(d.image_emb, d.text_emb)
