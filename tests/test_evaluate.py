"""Evaluation metrics against hand-computed answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pmpclean.errors import ConfigError
from pmpclean.evaluate import (
    auroc,
    detection_metrics,
    precision_coverage_curve,
    precision_recall_points,
    rematch_metrics,
)


def test_auroc_matches_pair_counting() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.normal(size=200) + y, 1)  # rounded: many ties
    pos, neg = s[y], s[~y]
    want = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert auroc(y, s) == pytest.approx(want)
    assert np.isnan(auroc(np.ones(5, bool), np.arange(5.0)))


def test_detection_metrics_hand_example() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    score = np.array([0.1, 0.2, 0.7, 0.3, 0.8, 0.9, 0.95, np.nan])
    pred = np.array([1, 1, 0, 1, 0, 0, 0, 0], bool)
    m = detection_metrics(y, score, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # AUROC over the 7 finite rows: positives {0.1,0.2,0.7} vs negatives {0.3,0.8,0.9,0.95}
    assert m["auroc"] == pytest.approx(11 / 12)
    assert m["accuracy"] == pytest.approx(6 / 8)
    json.dumps(m)  # JSON-ready


def test_detection_metrics_edge_cases() -> None:
    y = np.array([0, 0, 1], bool)
    m = detection_metrics(y, np.array([0.9, 0.8, 0.7]), np.zeros(3, bool))
    assert m["precision"] == 1.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    m = detection_metrics(np.zeros(3, bool), np.array([0.9, 0.8, 0.7]), np.zeros(3, bool))
    assert m["recall"] == 1.0 and np.isnan(m["auroc"])


def test_precision_recall_points() -> None:
    y = np.array([1, 1, 0, 1, 0], bool)
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
    c = precision_recall_points(y, s)
    assert c["threshold"] == [0.1, 0.2, 0.3, 0.4, 0.9]
    assert c["recall"] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0, 1.0])
    assert c["precision"] == pytest.approx([1.0, 1.0, 2 / 3, 3 / 4, 3 / 5])
    big = precision_recall_points(np.arange(1000) % 3 == 0, np.linspace(0, 1, 1000), n_points=11)
    assert len(big["precision"]) == 11 and big["recall"][-1] == 1.0


def test_rematch_metrics_hand_example() -> None:
    # 6 rows, images 0..5; rows 0,1,2 are a 3-cycle of shuffled captions
    true_row = np.array([1, 2, 0, 3, 4, 5])
    proposed = np.array([2, -1, 0, 3, -1, -1])  # row 0 gets caption at row 2 (=caption 0): correct
    conf = np.array([0.9, 0.0, 0.4, 0.8, 0.0, 0.0])
    m = rematch_metrics(true_row, None, proposed, conf)
    assert m["n_mismatched"] == 3 and m["n_proposed"] == 3
    # row 0 correct; row 2 gets caption 1 (wrong); row 3 keeps its own (correct)
    assert m["n_correct"] == 2
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["coverage"] == pytest.approx(2 / 3)
    assert m["exact_accuracy"] == pytest.approx(1 / 3)
    assert m["n_proposed_on_clean"] == 1
    assert m["mean_confidence"] == pytest.approx(0.7)


def test_rematch_groups_make_any_caption_of_the_image_correct() -> None:
    groups = np.array([0, 0, 1, 1])
    true_row = np.array([2, 1, 0, 3])  # rows 0 and 2 swapped captions across images
    proposed = np.array([1, -1, 3, -1])  # each gets a sibling's caption of its own image
    m = rematch_metrics(true_row, groups, proposed)
    assert m["precision"] == 1.0 and m["exact_accuracy"] == 1.0


def test_precision_coverage_curve() -> None:
    true_row = np.array([1, 2, 0, 4, 3])
    proposed = np.array([2, 0, -1, 3, 4])
    conf = np.array([0.9, 0.5, 0.0, 0.7, 0.7])
    cov, prec, thr = precision_coverage_curve(true_row, None, proposed, conf)
    # proposals: row0 correct (0.9), rows 3,4 (0.7): row3 gets caption 3's... true_row[3]=4: wrong;
    # row4 gets true_row[4]=3: wrong; row1 gets true_row[0]=1: correct (0.5)
    np.testing.assert_allclose(thr, [0.9, 0.7, 0.5])
    np.testing.assert_allclose(prec, [1.0, 1 / 3, 2 / 4])
    np.testing.assert_allclose(cov, [1 / 5, 3 / 5, 4 / 5])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.array([0, 5]), None, np.array([-1, -1])), r"true_row must be integer row numbers"),
        (
            (np.array([1, 0]), None, np.array([-1])),
            r"proposed_row must be integers of shape \(2,\)",
        ),
        ((np.array([1, 0]), None, np.array([-2, 0])), r"proposed_row must hold row numbers"),
        (
            (np.array([1, 0]), np.array([0]), np.array([0, 1])),
            r"image_group must have shape \(2,\)",
        ),
    ],
)
def test_raise_errors(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        rematch_metrics(*args)


def test_detection_shape_errors() -> None:
    with pytest.raises(ConfigError, match=r"is_mismatched_pred must have shape \(3,\)"):
        detection_metrics(np.zeros(3, bool), np.zeros(3), np.zeros(2, bool))
    with pytest.raises(ConfigError, match="must be boolean"):
        detection_metrics(np.array([0, 2, 1]), np.zeros(3), np.zeros(3, bool))
