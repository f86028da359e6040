"""Scan settings for large datasets: approximate neighbour search and the mixture subsample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import pmpclean
from pmpclean import ScanConfig
from pmpclean.config import AuditConfig
from pmpclean.errors import ConfigError
from pmpclean.synthetic import clip_like_pairs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("scaling")
    data = clip_like_pairs(300, dim=32, noise_rate=0.2, semantic=1.2, noise=0.6, seed=0)
    manifest = tmp / "data.csv"
    data.to_frame().to_csv(manifest, index=False)
    emb = tmp / "emb.npz"
    np.savez(emb, image=data.image_emb, text=data.text_emb)
    return manifest, emb


def _cfg(emb: Path, **changes) -> ScanConfig:
    return ScanConfig().replace(
        embed__embeddings=str(emb), data__truth_col="true_row", audit__rematch=False, **changes
    )


def test_defaults_are_documented_values() -> None:
    a = AuditConfig()
    assert (a.exact_search_max, a.search_nprobe, a.mixture_fit_max) == (20_000, 8, 200_000)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"audit__exact_search_max": -1}, r"audit\.exact_search_max must be an integer >= 0, got"),
        ({"audit__exact_search_max": 1.5}, r"audit\.exact_search_max must be an integer >= 0"),
        ({"audit__search_nprobe": 0}, r"audit\.search_nprobe must be an integer >= 1, got 0"),
        ({"audit__search_nprobe": True}, r"audit\.search_nprobe must be an integer >= 1"),
        ({"audit__mixture_fit_max": 50}, r"mixture_fit_max must be an integer >= 100 or null"),
        ({"audit__mixture_fit_max": "all"}, r"audit\.mixture_fit_max must be an integer >= 100"),
    ],
)
def test_bad_settings_fail_with_the_setting_named(dataset, tmp_path, changes, match) -> None:
    manifest, emb = dataset
    with pytest.raises(ConfigError, match=match):
        pmpclean.scan(manifest, config=_cfg(emb, **changes), out_dir=tmp_path / "o")


def test_settings_reach_the_stages_and_the_saved_config(dataset, tmp_path) -> None:
    manifest, emb = dataset
    # mixture_fit_max bounds the bimodality mixture, the split without plants
    exact = pmpclean.scan(manifest, config=_cfg(emb, audit__plants=0), write=False, out_dir=None)
    approx = pmpclean.scan(
        manifest,
        config=_cfg(
            emb,
            audit__exact_search_max=0,
            audit__search_nprobe=2,
            audit__mixture_fit_max=150,
            audit__plants=0,
        ),
        out_dir=tmp_path / "o",
    )
    audit = approx.summary["settings"]["audit"]
    assert (audit["exact_search_max"], audit["search_nprobe"], audit["mixture_fit_max"]) == (
        0,
        2,
        150,
    )
    assert approx.summary["mixture"]["fit_sample"] == 150
    assert exact.summary["mixture"]["fit_sample"] == 300
    # the approximate search changed the scores (it was used) but not the verdict
    a = approx.audit["pair_score"].to_numpy()
    e = exact.audit["pair_score"].to_numpy()
    assert not np.allclose(a, e)
    assert np.corrcoef(a, e)[0, 1] > 0.95
    f1_a = approx.summary["evaluation"]["detection"]["f1"]
    f1_e = exact.summary["evaluation"]["detection"]["f1"]
    assert f1_a > f1_e - 0.05
    # the saved config repeats the run's settings
    saved = pmpclean.config.load_config(tmp_path / "o" / "config.yaml")
    assert saved.audit.search_nprobe == 2 and saved.audit.mixture_fit_max == 150
