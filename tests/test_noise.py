"""Noise injection: derangement per image group, determinism, hard mode, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmpclean.errors import ConfigError
from pmpclean.noise import corrupt_frame, corrupt_indices, mismatch_truth


def _check_permutation(t: np.ndarray, groups: np.ndarray, m: int) -> None:
    n = t.size
    assert sorted(t.tolist()) == list(range(n))  # a permutation: every caption used once
    moved = t != np.arange(n)
    assert int(moved.sum()) == m
    assert np.all(groups[t[moved]] != groups[moved])  # moved captions come from other images


def test_shuffle_is_a_derangement_of_exactly_the_chosen_rows() -> None:
    t = corrupt_indices(1000, rate=0.3, seed=0)
    _check_permutation(t, np.arange(1000), 300)


@settings(max_examples=40, deadline=None)
@given(
    n_images=st.integers(2, 40),
    per_image=st.integers(1, 5),
    rate=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_group_derangement_property(n_images: int, per_image: int, rate: float, seed: int) -> None:
    groups = np.repeat(np.arange(n_images), per_image)
    n = groups.size
    m = int(round(rate * n))
    try:
        t = corrupt_indices(n, rate=rate, groups=groups, seed=seed)
    except ConfigError as err:
        # only the documented infeasible cases may refuse
        assert m == 1 or "more than half" in str(err)
        return
    _check_permutation(t, groups, m)


def test_several_captions_per_image_get_other_images_captions() -> None:
    groups = np.repeat(np.arange(50), 5)
    t = corrupt_indices(250, rate=0.8, groups=groups, seed=3)
    _check_permutation(t, groups, 200)
    assert mismatch_truth(t, groups).sum() == 200


def test_seed_determinism() -> None:
    a = corrupt_indices(500, rate=0.4, seed=7)
    b = corrupt_indices(500, rate=0.4, seed=7)
    c = corrupt_indices(500, rate=0.4, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rate_zero_is_identity_and_rate_one_moves_everything() -> None:
    assert np.array_equal(corrupt_indices(20, rate=0.0, seed=0), np.arange(20))
    t = corrupt_indices(20, rate=1.0, seed=0)
    assert np.all(t != np.arange(20))


def _clustered() -> tuple[np.ndarray, np.ndarray]:
    """400 embeddings in 10 tight clusters of 40: (cluster id, embedding)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10, 16))
    cluster = np.repeat(np.arange(10), 40)
    return cluster, centers[cluster] + 0.05 * rng.standard_normal((400, 16))


def test_hard_mode_swaps_with_similar_images() -> None:
    cluster, emb = _clustered()
    t = corrupt_indices(400, rate=0.5, mode="hard", embeddings=emb, seed=0)
    moved = t != np.arange(400)
    _check_permutation(t, np.arange(400), 200)
    same_cluster = np.mean(cluster[t[moved]] == cluster[moved])
    t_rand = corrupt_indices(400, rate=0.5, seed=0)
    moved_r = t_rand != np.arange(400)
    assert same_cluster > 0.9
    assert np.mean(cluster[t_rand[moved_r]] == cluster[moved_r]) < 0.3
    # A greedy pass that leaves one row with only its own caption is repaired locally,
    # not by reshuffling every chosen row at random (which made "hard" noise random).
    for seed in range(8):
        t = corrupt_indices(400, rate=0.25, mode="hard", embeddings=emb, seed=seed)
        moved = t != np.arange(400)
        assert np.mean(cluster[t[moved]] == cluster[moved]) > 0.9, seed


def test_mixed_mode_is_half_hard_half_shuffle() -> None:
    cluster, emb = _clustered()
    t = corrupt_indices(400, rate=0.5, mode="mixed", embeddings=emb, seed=0)
    moved = np.flatnonzero(t != np.arange(400))
    _check_permutation(t, np.arange(400), 200)
    # The two halves are closed under the permutation: hard rows trade captions among
    # themselves, shuffled rows among themselves.
    same = cluster[t[moved]] == cluster[moved]
    # hard half: nearly all within the cluster; shuffled half: about 1 in 10
    assert 0.5 + 0.0 < same.mean() < 0.5 + 0.2
    assert corrupt_indices(400, rate=0.5, mode="mixed", embeddings=emb, seed=0).tolist() == (
        t.tolist()
    )
    with pytest.raises(ConfigError, match="mode='mixed' needs embeddings"):
        corrupt_indices(10, rate=0.5, mode="mixed")


def test_corrupt_frame_moves_captions_and_records_truth() -> None:
    frame = pd.DataFrame(
        {
            "image": np.repeat([f"im{i}.jpg" for i in range(10)], 2),
            "caption": [f"cap {i}" for i in range(20)],
            "caption_id": np.arange(20),
            "other": np.arange(20) * 10,
        }
    )
    out = corrupt_frame(frame, rate=0.5, move_cols=["caption_id"], seed=1)
    t = out["true_row"].to_numpy()
    assert list(out["caption"]) == [f"cap {i}" for i in t]
    assert np.array_equal(out["caption_id"].to_numpy(), t)
    assert np.array_equal(out["other"].to_numpy(), frame["other"].to_numpy())  # images stay
    assert list(frame["caption"]) == [f"cap {i}" for i in range(20)]  # input untouched
    groups = frame["image"].to_numpy()
    assert int((groups[t] != groups).sum()) == 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 1.5}, r"rate must be in \[0, 1\]"),
        ({"rate": -0.1}, r"rate must be in \[0, 1\]"),
        (
            {"rate": 0.2, "mode": "swap"},
            "Unknown method 'swap' for mode: expected one of shuffle, hard, mixed",
        ),
        ({"rate": 0.2, "mode": "hard"}, "mode='hard' needs embeddings"),
        ({"rate": 0.1}, "selects a single row of 10"),
        ({"rate": 0.5, "groups": [0] * 9 + [1]}, "more than half of the chosen rows"),
        ({"rate": 0.5, "groups": [0, 1]}, r"groups must have shape \(10,\)"),
    ],
)
def test_raise_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        corrupt_indices(10, **kwargs)


def test_corrupt_frame_errors() -> None:
    frame = pd.DataFrame({"image": ["a", "b"], "caption": ["x", "y"], "true_row": [0, 1]})
    with pytest.raises(ConfigError, match="column 'text' not found"):
        corrupt_frame(frame, rate=1.0, text_col="text")
    with pytest.raises(ConfigError, match="column 'true_row' already exists"):
        corrupt_frame(frame, rate=1.0)
