"""The audit verdict calibrated by planted mismatches: known answers end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pmpclean
from pmpclean import ScanConfig
from pmpclean.split import calibrated_split
from pmpclean.synthetic import clip_like_pairs


def _data(n: int, rate: float, mode: str = "shuffle"):
    return clip_like_pairs(
        n, dim=64, noise_rate=rate, noise_mode=mode, n_clusters=20, semantic=1.2, noise=0.6, seed=0
    )


def _scan(tmp_path: Path, data, *, text: np.ndarray | None = None, **changes):
    frame = data.to_frame()
    manifest = tmp_path / "data.csv"
    frame.to_csv(manifest, index=False)
    emb = tmp_path / "emb.npz"
    np.savez(emb, image=data.image_emb, text=data.text_emb if text is None else text)
    cfg = ScanConfig().replace(embed__embeddings=str(emb), **changes)
    res = pmpclean.scan(manifest, config=cfg, out_dir=tmp_path / "out")
    return res, json.loads((tmp_path / "out" / "summary.json").read_text())


# -- calibrated_split on known distributions ------------------------------------------


def _known(rate: float, n: int = 20_000, seed: int = 0):
    """True pairs N(1, 0.15); random pairings N(0, 0.15); similar captions N(0.6, 0.2)."""
    rng = np.random.default_rng(seed)
    n_bad = int(rate * n)
    score = np.r_[rng.normal(1.0, 0.15, n - n_bad), rng.normal(0.0, 0.15, n_bad)]
    truth = np.r_[np.zeros(n - n_bad, bool), np.ones(n_bad, bool)]
    return score, truth, rng.normal(0.0, 0.15, 2000), rng.normal(0.6, 0.2, 2000)


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_calibrated_split_finds_a_known_rate(rate: float) -> None:
    score, truth, rand, similar = _known(rate)
    sp = calibrated_split(score, random_plants=rand, hard_plants=similar, seed=0)
    assert sp.verdict == "noisy"
    assert abs(sp.noise_rate - rate) < 0.02
    lo, hi = sp.noise_interval
    assert lo <= rate <= hi
    assert (sp.is_mismatched == truth).mean() > 0.99


def test_calibrated_split_takes_local_shuffles_for_what_they_are() -> None:
    """Mismatches between random pairings and similar captions (a scrape's local shuffles).

    Without a planted kind that looks like them, the fit can only spend them on the
    similar component, which sits on the true pairs, and flags far too much; with the
    local kind planted it finds them at their rate.
    """
    rng = np.random.default_rng(0)
    n, rate = 20_000, 0.2
    n_bad = int(rate * n)
    score = np.r_[rng.normal(1.0, 0.15, n - n_bad), rng.normal(0.35, 0.12, n_bad)]
    truth = np.r_[np.zeros(n - n_bad, bool), np.ones(n_bad, bool)]
    rand, local = rng.normal(-0.2, 0.15, 2000), rng.normal(0.35, 0.12, 2000)
    similar = rng.normal(0.75, 0.2, 2000)
    bare = calibrated_split(score, random_plants=rand, hard_plants=similar, seed=0)
    sp = calibrated_split(
        score, random_plants=rand, hard_plants=similar, band_plants={"local": local}, seed=0
    )
    assert sp.mixture["components"] == ["clean", "random", "local", "similar"]
    assert (sp.is_mismatched == truth).mean() > 0.97
    assert abs(sp.noise_rate - rate) < 0.02
    lo, hi = sp.noise_interval
    assert lo <= rate <= hi and lo > 0.1
    assert bare.noise_rate > rate + 0.05  # the bare fit mistakes them (why the kind exists)


def test_calibrated_split_drops_planted_kinds_the_data_do_not_need() -> None:
    """Random mismatches only: a local kind planted anyway is left out of the fit."""
    score, truth, rand, similar = _known(0.2)
    local = np.random.default_rng(1).normal(0.35, 0.12, 2000)
    bare = calibrated_split(score, random_plants=rand, hard_plants=similar, seed=0)
    sp = calibrated_split(
        score, random_plants=rand, hard_plants=similar, band_plants={"local": local}, seed=0
    )
    assert sp.mixture["components"] == ["clean", "random", "similar"]
    assert sp.mixture["band_evidence"] < 100
    np.testing.assert_array_equal(sp.match_score, bare.match_score)
    assert sp.noise_interval == bare.noise_interval


def test_calibrated_split_of_clean_scores_is_clean() -> None:
    score, _, rand, similar = _known(0.0)
    sp = calibrated_split(score, random_plants=rand, hard_plants=similar, seed=0)
    assert sp.verdict == "clean"
    assert sp.is_mismatched.sum() == 0
    assert sp.noise_interval[0] <= 0.0 + 1e-3
    assert sp.noise_rate < 0.01


def test_calibrated_split_of_a_blind_model_is_undecided() -> None:
    """Data that score like random pairings: nothing flagged, no noise rate."""
    rng = np.random.default_rng(0)
    score = rng.normal(0.0, 0.15, 5000)
    sp = calibrated_split(
        score, random_plants=rng.normal(0, 0.15, 2000), hard_plants=rng.normal(0, 0.15, 2000)
    )
    assert sp.verdict == "undecided"
    assert not sp.is_mismatched.any()
    assert np.isnan(sp.noise_rate)
    assert "cannot audit" in sp.verdict_reason
    # a weak model: true pairs only slightly above random pairings is undecided too
    weak = np.r_[rng.normal(0.2, 0.15, 4000), rng.normal(0.0, 0.15, 1000)]
    sp = calibrated_split(
        weak, random_plants=rng.normal(0, 0.15, 2000), hard_plants=rng.normal(0.1, 0.15, 2000)
    )
    assert sp.verdict == "undecided"


def test_calibrated_split_is_deterministic() -> None:
    score, _, rand, similar = _known(0.2)
    a = calibrated_split(score, random_plants=rand, hard_plants=similar, seed=3)
    b = calibrated_split(score, random_plants=rand, hard_plants=similar, seed=3)
    assert a.noise_interval == b.noise_interval
    assert np.array_equal(a.match_score, b.match_score)


# -- end to end --------------------------------------------------------------------------


def test_scan_of_noisy_data_is_noisy_with_the_rate_in_its_interval(tmp_path: Path) -> None:
    data = _data(1500, 0.2)
    res, summary = _scan(tmp_path, data)
    assert summary["verdict"] == "noisy"
    lo, hi = summary["estimated_noise_rate_interval"]
    assert lo <= data.is_mismatched.mean() <= hi
    assert summary["verdict_reason"]
    assert "Verdict: noisy" in (tmp_path / "out" / "report.html").read_text()


def test_scan_of_clean_data_is_clean(tmp_path: Path) -> None:
    data = _data(1500, 0.0)
    res, summary = _scan(tmp_path, data)
    assert summary["verdict"] == "clean"
    assert res.audit["is_mismatched"].mean() <= 0.01
    assert summary["estimated_noise_rate_interval"][0] < 0.01


def test_scan_with_a_model_that_sees_nothing_is_undecided(tmp_path: Path) -> None:
    """Random text vectors: no drop, no rematch, every scored row to review, said plainly."""
    data = _data(1500, 0.0)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(data.text_emb.shape).astype(np.float32)
    res, summary = _scan(tmp_path, data, text=noise)
    assert summary["verdict"] == "undecided"
    audit = res.audit
    assert set(audit["action"]) == {"review"}
    assert (audit["proposed_row"] == -1).all()
    assert summary["action_counts"]["drop"] == summary["action_counts"]["rematch"] == 0
    assert any("cannot audit" in w for w in summary["warnings"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "this model cannot audit this data" in html
    # the rematch command reuses the scan and keeps every row for review too
    out = tmp_path / "cleaned.csv"
    pmpclean.rematch(tmp_path / "data.csv", out=out, audit_dir=tmp_path / "out", min_confidence=0.0)
    cleaned = pd.read_csv(out)
    assert len(cleaned) == len(audit)  # nothing removed on a blind model's word
    assert set(cleaned["pmpclean_action"]) == {"review"}
    assert cleaned["caption"].tolist() == audit["caption"].tolist()


def test_identical_captions_are_undecided(tmp_path: Path) -> None:
    """A scraper's template caption on every row carries no information: no split."""
    data = _data(600, 0.0)
    frame = data.to_frame()
    frame["caption"] = "image"
    manifest = tmp_path / "data.csv"
    frame.to_csv(manifest, index=False)
    emb = tmp_path / "emb.npz"
    same = np.repeat(data.text_emb[:1], len(frame), axis=0)
    np.savez(emb, image=data.image_emb, text=same)
    cfg = ScanConfig().replace(embed__embeddings=str(emb))
    res = pmpclean.scan(manifest, config=cfg, out_dir=tmp_path / "out")
    assert res.summary["verdict"] == "undecided"
    assert "same caption text" in res.summary["verdict_reason"]
    assert not res.audit["is_mismatched"].any()
    assert set(res.audit["action"]) == {"review"}


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:model 'pmpclean-tiny' has RANDOM weights")
def test_coco_mini_with_random_weights_is_undecided(shared_data: Path, tmp_path: Path) -> None:
    """Real photos and captions, a model that sees nothing: no verdict, nothing removed."""
    manifest = shared_data / "coco-mini" / "captions.csv"
    if not manifest.is_file():
        pytest.skip(f"coco-mini not found at {manifest}")
    cfg = ScanConfig().replace(
        embed__model="pmpclean-tiny", embed__pretrained="none", embed__device="cpu"
    )
    res = pmpclean.scan(manifest, config=cfg, out_dir=tmp_path / "out")
    assert res.summary["verdict"] == "undecided"
    assert res.summary["action_counts"]["drop"] == res.summary["action_counts"]["rematch"] == 0
    scored = res.audit["status"] == "ok"
    assert scored.sum() == 795
    assert (res.audit.loc[scored, "action"] == "review").all()
