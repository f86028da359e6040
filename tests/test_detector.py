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
    # six orthogonal images, each caption its image, except rows 0 and 1 exchanged
    img = np.eye(6, dtype=np.float32)
    txt = img[[1, 0, 2, 3, 4, 5]].copy()
    x = pair_features(img, txt, k=3)
    assert x.shape == (6, len(FEATURE_NAMES))
    np.testing.assert_allclose(_col(x, "cosine"), [0, 0, 1, 1, 1, 1], atol=1e-6)
    # each exchanged caption's best other image is the other exchanged row's image ...
    np.testing.assert_allclose(_col(x, "best_image")[:2], 1.0, atol=1e-6)
    # ... whose own caption fits it not at all, and exchanging the captions back gains 2
    np.testing.assert_allclose(_col(x, "steal_image")[:2], 1.0, atol=1e-6)
    np.testing.assert_allclose(_col(x, "swap_image")[:2], 2.0, atol=1e-6)
    np.testing.assert_allclose(_col(x, "swap_caption")[:2], 2.0, atol=1e-6)
    np.testing.assert_array_equal(_col(x, "cycle")[:2], 1.0)
    np.testing.assert_array_equal(_col(x, "image_rank")[:2], 1.0)
    # the clean rows: own pair first, no exchange helps
    assert np.all(_col(x, "swap_image")[2:] <= 0.0)
    np.testing.assert_array_equal(_col(x, "image_rank")[2:], 0.0)
    np.testing.assert_array_equal(_col(x, "caption_rank")[2:], 0.0)


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
