"""Mixture split: recovery, calibration across bands, monotonicity, clean data, NaN, errors."""

from __future__ import annotations

import numpy as np
import pytest

from pmpclean.errors import ConfigError
from pmpclean.evaluate import detection_metrics
from pmpclean.score import pair_scores
from pmpclean.split import fit_two_gaussians, split_pairs
from pmpclean.synthetic import clip_like_pairs


def test_fit_two_gaussians_recovers_parameters() -> None:
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(-1.0, 0.2, 3000), rng.normal(1.0, 0.4, 1000)]
    fit = fit_two_gaussians(x, seed=0)
    np.testing.assert_allclose(fit["means"], [-1.0, 1.0], atol=0.05)
    np.testing.assert_allclose(fit["stds"], [0.2, 0.4], atol=0.03)
    np.testing.assert_allclose(fit["weights"], [0.75, 0.25], atol=0.02)


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_recovers_injected_mismatches_on_synthetic(rate: float) -> None:
    d = clip_like_pairs(1000, dim=64, noise_rate=rate, semantic=1.2, seed=1)
    ps = pair_scores(d.image_emb, d.text_emb, image_group=d.image_group)
    sp = split_pairs(ps.score, seed=0)
    m = detection_metrics(d.is_mismatched, sp.match_score, sp.is_mismatched)
    assert m["f1"] > 0.95
    assert sp.noise_rate == pytest.approx(rate, abs=0.04)
    assert np.all((sp.match_score >= 0) & (sp.match_score <= 1))
    np.testing.assert_array_equal(sp.is_mismatched, sp.match_score < 0.5)


def test_default_threshold_needs_no_tuning_when_the_band_moves() -> None:
    # Add a direction shared by both modalities: every cosine moves up by ~0.5 (the
    # band shifts and narrows, as between CLIP models), the flags do not change.
    d = clip_like_pairs(1000, dim=64, noise_rate=0.3, semantic=1.0, seed=2)
    u = np.zeros(65, dtype=np.float32)
    u[-1] = 1.0

    def lift(x: np.ndarray) -> np.ndarray:
        y = np.hstack([x, np.zeros((x.shape[0], 1), np.float32)]) + u
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    img2, txt2 = lift(d.image_emb), lift(d.text_emb)
    sim1 = np.einsum("nd,nd->n", d.image_emb, d.text_emb)
    sim2 = np.einsum("nd,nd->n", img2, txt2)
    assert np.median(sim2) - np.median(sim1) > 0.3
    sp1 = split_pairs(pair_scores(d.image_emb, d.text_emb).score, seed=0)
    sp2 = split_pairs(pair_scores(img2, txt2).score, seed=0)
    assert np.mean(sp1.is_mismatched == sp2.is_mismatched) > 0.995
    for sp in (sp1, sp2):
        assert detection_metrics(d.is_mismatched, sp.match_score, sp.is_mismatched)["f1"] > 0.95
    # whereas a cosine cut that worked on the first band flags everything on the second
    cut = 0.5 * (np.median(sim1[d.is_mismatched]) + np.median(sim1[~d.is_mismatched]))
    assert np.mean(sim2 < cut) == 0.0


def test_match_score_is_monotone_in_the_score() -> None:
    rng = np.random.default_rng(3)
    # unequal variances: a plain posterior would turn back at the extremes
    x = np.r_[rng.normal(0.0, 1.0, 700), rng.normal(-4.0, 0.3, 300), [-50.0, 50.0]]
    sp = split_pairs(x, seed=0)
    order = np.argsort(x)
    assert np.all(np.diff(sp.match_score[order]) >= -1e-12)
    assert sp.match_score[-1] > 0.99 and sp.match_score[-2] < 0.01
    assert sp.mixture["means"][0] > sp.mixture["means"][1]  # clean component first


def test_clean_data_flags_nothing() -> None:
    d = clip_like_pairs(1000, dim=64, noise_rate=0.0, semantic=1.0, seed=4)
    sp = split_pairs(pair_scores(d.image_emb, d.text_emb).score, seed=0)
    assert not sp.is_mismatched.any()
    assert sp.noise_rate == 0.0 and sp.mixture["bimodal"] is False
    assert np.all(sp.match_score >= 0.5)


def test_nan_rows_stay_nan_and_unflagged() -> None:
    rng = np.random.default_rng(5)
    x = np.r_[rng.normal(1, 0.1, 300), rng.normal(0, 0.1, 100)]
    x[[0, 350]] = np.nan
    sp = split_pairs(x, seed=0)
    assert np.isnan(sp.match_score[[0, 350]]).all()
    assert not sp.is_mismatched[[0, 350]].any()
    assert sp.mixture["n_fitted"] == 398
    assert int(sp.is_mismatched.sum()) == 99


def test_threshold_trades_recall_for_precision() -> None:
    rng = np.random.default_rng(6)
    x = np.r_[rng.normal(1, 0.3, 800), rng.normal(0, 0.3, 200)]
    lo, mid, hi = (split_pairs(x, threshold=t, seed=0) for t in (0.1, 0.5, 0.9))
    assert lo.is_mismatched.sum() < mid.is_mismatched.sum() < hi.is_mismatched.sum()
    assert np.all(lo.is_mismatched <= mid.is_mismatched)
    s = mid.mixture["score_at_threshold"]
    assert np.all(x[mid.is_mismatched] < s) and np.all(x[~mid.is_mismatched] > s)


def test_seeded_determinism() -> None:
    x = np.random.default_rng(7).normal(size=500)
    x[:100] -= 3
    a, b = split_pairs(x, seed=1), split_pairs(x, seed=1)
    np.testing.assert_array_equal(a.match_score, b.match_score)


def test_degenerate_inputs_warn_and_flag_nothing() -> None:
    with pytest.warns(UserWarning, match="cannot fit a mixture"):
        sp = split_pairs(np.ones(10))
    assert not sp.is_mismatched.any() and np.all(sp.match_score == 1.0)
    sp = split_pairs(np.full(3, np.nan))
    assert np.isnan(sp.match_score).all() and sp.noise_rate == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": 0.0}, r"threshold must be in \(0, 1\)"),
        ({"threshold": 1.5}, r"threshold must be in \(0, 1\)"),
        ({"threshold": "high"}, "threshold must be a number"),
        ({"min_separation": -1.0}, "min_separation must be >= 0"),
        ({"weak_separation": 2.5}, r"weak_separation must be in \[0, min_separation=2\]"),
        ({"weak_separation": -0.1}, r"weak_separation must be in \[0, min_separation=2\]"),
        ({"max_fit": 10}, r"max_fit must be an integer >= 100"),
        ({"max_fit": 5000.0}, r"max_fit must be an integer >= 100"),
    ],
)
def test_raise_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        split_pairs(np.arange(10.0), **kwargs)


def test_rejects_2d_scores() -> None:
    with pytest.raises(ConfigError, match=r"score must be a 1-D array"):
        split_pairs(np.ones((3, 3)))


def test_small_noise_component_is_found() -> None:
    # 2 % mismatched: EM from a single start settles on a wide tail component instead
    rng = np.random.default_rng(8)
    x = np.r_[rng.normal(0.0, 0.1, 4900), rng.normal(-0.5, 0.1, 100)]
    sp = split_pairs(x, seed=0)
    assert sp.mixture["bimodal"] and sp.mixture["reason"] == "two populations"
    assert sp.noise_rate == pytest.approx(0.02, abs=0.005)
    assert sp.is_mismatched[4900:].mean() > 0.9 and sp.is_mismatched[:4900].mean() < 0.01


@pytest.mark.parametrize("dist", ["student", "skewed"])
def test_one_non_gaussian_population_flags_nothing(dist: str) -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_t(6, 5000) if dist == "student" else rng.gamma(8.0, 1.0, 5000)
    sp = split_pairs(x, seed=0)
    assert not sp.is_mismatched.any() and sp.noise_rate == 0.0
    order = np.argsort(x)
    assert np.all(np.diff(sp.match_score[order]) >= -1e-12)
    assert np.all((sp.match_score >= 0.5) & (sp.match_score <= 1.0))
    assert sp.mixture["bimodal"] is False
    assert sp.mixture["reason"].startswith(("one population", "components overlap"))


@pytest.mark.parametrize(
    "draw",
    [
        lambda r: -r.gamma(2.0, 1.0, 5000),
        lambda r: -r.lognormal(0.0, 0.5, 5000),
        lambda r: -r.weibull(0.8, 5000),
        lambda r: -r.gamma(1.0, 1.0, 5000),
    ],
    ids=["gamma2", "lognormal", "weibull", "exponential"],
)
def test_one_population_with_a_long_tail_flags_nothing(draw) -> None:
    # a clean distribution with a long tail of poorer pairs: two Gaussians fit it better
    # than one (BIC) and sit 1.5-1.7 apart (Ashman's D), but one skewed population fits
    # as well, so the guard must still refuse
    x = draw(np.random.default_rng(12))
    sp = split_pairs(x, seed=0)
    assert sp.mixture["delta_bic"] > 0  # the plain BIC test alone would split it
    assert not sp.is_mismatched.any() and sp.mixture["bimodal"] is False
    if sp.mixture["separation"] >= 1.5:
        assert sp.mixture["delta_bic_skewed"] < 0
        assert sp.mixture["reason"].startswith("one skewed population")


def test_narrow_true_peak_with_wide_mismatch_spread_is_split() -> None:
    # true pairs in a narrow peak, mismatches spread widely below it: Ashman's D < 2
    # (the demo model on the quickstart), yet clearly two groups
    rng = np.random.default_rng(13)
    x = np.r_[rng.normal(0.0, 0.5, 8000), rng.normal(-2.0, 1.5, 2000)]
    sp = split_pairs(x, seed=0)
    assert 1.5 <= sp.mixture["separation"] < 2.0
    assert sp.mixture["delta_bic_skewed"] > 0 and sp.mixture["bimodal"] is True
    assert sp.is_mismatched[8000:].mean() > 0.6 and sp.is_mismatched[:8000].mean() < 0.08
    assert sp.noise_rate == pytest.approx(0.2, abs=0.03)
    # the route can be turned off: then D must reach min_separation
    strict = split_pairs(x, seed=0, weak_separation=2.0)
    assert strict.mixture["bimodal"] is False and not strict.is_mismatched.any()
    assert np.isnan(strict.mixture["delta_bic_skewed"])


def test_subsample_fit_equals_full_fit_within_tolerance() -> None:
    # 40k scores, EM on a 10k subsample vs on every score: same mixture, same flags
    rng = np.random.default_rng(10)
    x = rng.permutation(np.r_[rng.normal(0.30, 0.05, 32_000), rng.normal(0.05, 0.06, 8_000)])
    full = split_pairs(x, seed=0, max_fit=None)
    sub = split_pairs(x, seed=0, max_fit=10_000)
    assert full.mixture["fit_sample"] == 40_000 and sub.mixture["fit_sample"] == 10_000
    assert sub.mixture["n_fitted"] == 40_000
    for key, tol in (("means", 0.003), ("stds", 0.003), ("weights", 0.01)):
        np.testing.assert_allclose(sub.mixture[key], full.mixture[key], atol=tol)
    diff = np.abs(sub.match_score - full.match_score)
    assert diff.max() < 0.03 and diff.mean() < 0.002
    assert np.mean(sub.is_mismatched == full.is_mismatched) > 0.999
    assert sub.noise_rate == pytest.approx(full.noise_rate, abs=0.005)
    assert sub.mixture["delta_bic"] == pytest.approx(full.mixture["delta_bic"], rel=0.01)
    # every row gets a posterior, and the subsample is seeded
    assert np.isfinite(sub.match_score).all()
    again = split_pairs(x, seed=0, max_fit=10_000)
    np.testing.assert_array_equal(sub.match_score, again.match_score)


def test_subsample_keeps_the_clean_data_guard() -> None:
    x = np.random.default_rng(11).normal(size=20_000)
    sp = split_pairs(x, seed=0, max_fit=2_000)
    assert not sp.is_mismatched.any() and sp.mixture["bimodal"] is False
    assert sp.mixture["fit_sample"] == 2_000
