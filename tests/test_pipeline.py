"""End-to-end scan and rematch through the library API, on synthetic embeddings."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pmpclean
from pmpclean import ScanConfig
from pmpclean.errors import ConfigError, DatasetError
from pmpclean.pipeline import AUDIT_COLUMNS
from pmpclean.synthetic import clip_like_pairs

N = 400


def _easy(n: int = N, **kw):
    kw.setdefault("dim", 64)
    kw.setdefault("noise_rate", 0.2)
    kw.setdefault("n_clusters", 20)
    kw.setdefault("semantic", 1.2)
    kw.setdefault("noise", 0.6)
    return clip_like_pairs(n, seed=0, **kw)


def _write(tmp_path: Path, data, *, name: str = "data.csv") -> tuple[Path, Path]:
    frame = data.to_frame()
    frame["licence"] = "CC-BY 4.0"
    manifest = tmp_path / name
    frame.to_csv(manifest, index=False)
    emb = tmp_path / "emb.npz"
    np.savez(emb, image=data.image_emb, text=data.text_emb)
    return manifest, emb


@pytest.fixture
def dataset(tmp_path: Path):
    data = _easy()
    manifest, emb = _write(tmp_path, data)
    return data, manifest, emb


def _cfg(emb: Path, **changes) -> ScanConfig:
    return ScanConfig().replace(embed__embeddings=str(emb), data__truth_col="true_row", **changes)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_scan_recovers_injected_mismatches_and_writes_contract(dataset, tmp_path):
    data, manifest, emb = dataset
    before = _sha(manifest)
    res = pmpclean.scan(manifest, config=_cfg(emb), out_dir=tmp_path / "out")
    audit = res.audit
    assert len(audit) == N
    assert list(audit.columns[:5]) == ["image", "caption", "true_row", "cluster", "licence"]
    for col in AUDIT_COLUMNS:
        assert col in audit.columns
    assert audit["row"].tolist() == list(range(N))
    assert (audit["licence"] == "CC-BY 4.0").all()
    ms = audit["match_score"].to_numpy()
    assert np.all((ms >= 0) & (ms <= 1))
    pred = audit["is_mismatched"].to_numpy()
    truth = data.is_mismatched
    recall = (pred & truth).sum() / truth.sum()
    precision = (pred & truth).sum() / max(pred.sum(), 1)
    assert recall > 0.9 and precision > 0.9, (recall, precision)
    # proposals point at real rows, and never at the row itself
    prop = audit["proposed_row"].to_numpy()
    assert np.all((prop == -1) | ((prop >= 0) & (prop < N)))
    assert not np.any(prop == np.arange(N))
    conf = audit["rematch_confidence"].to_numpy()
    assert np.all((conf >= 0) & (conf <= 1))
    assert np.all(conf[prop == -1] == 0)
    assert set(audit["action"]) <= {"keep", "rematch", "drop", "review"}
    # files of the output contract
    out = tmp_path / "out"
    for name in ("audit.parquet", "audit.csv", "summary.json", "config.yaml", "report.html"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_rows"] == N
    assert sum(summary["action_counts"].values()) == N
    assert sum(summary["status_counts"].values()) == N
    assert 0.1 < summary["estimated_noise_rate"] < 0.3
    assert summary["evaluation"]["detection"]["f1"] > 0.9
    assert set(summary["timings"]) >= {"read", "embed", "score", "split", "rematch", "write"}
    parquet = pd.read_parquet(out / "audit.parquet")
    assert len(parquet) == N and list(parquet.columns) == list(audit.columns)
    assert _sha(manifest) == before  # input untouched


def test_rematch_proposals_are_mostly_the_true_caption(dataset, tmp_path):
    data, manifest, emb = dataset
    res = pmpclean.scan(manifest, config=_cfg(emb), out_dir=tmp_path / "out")
    audit = res.audit
    rem = audit["action"].to_numpy() == "rematch"
    assert rem.sum() > 0.3 * data.is_mismatched.sum()
    prop = audit["proposed_row"].to_numpy()[rem]
    rows = np.flatnonzero(rem)
    correct = data.image_group[data.true_row[prop]] == data.image_group[rows]
    assert correct.mean() > 0.8, correct.mean()


def test_bad_rows_are_kept_and_counted(tmp_path):
    data = _easy()
    frame = data.to_frame()
    frame.loc[3, "caption"] = ""
    image = data.image_emb.copy()
    image[7] = np.nan
    manifest = tmp_path / "data.csv"
    frame.to_csv(manifest, index=False)
    emb = tmp_path / "emb.npz"
    np.savez(emb, image=image, text=data.text_emb)
    res = pmpclean.scan(manifest, config=_cfg(emb), out_dir=tmp_path / "out")
    audit = res.audit
    assert len(audit) == N
    assert audit.loc[3, "status"] == "empty_caption"
    assert audit.loc[7, "status"] == "missing_embedding"
    for r in (3, 7):
        assert np.isnan(audit.loc[r, "match_score"])
        # nothing is known about an unscored pair: a person decides (the report's legend)
        assert audit.loc[r, "action"] == "review"
        assert not audit.loc[r, "is_mismatched"]
    assert res.summary["status_counts"]["empty_caption"] == 1
    assert res.summary["status_counts"]["missing_embedding"] == 1
    assert sum(res.summary["action_counts"].values()) == N
    # no other row proposes the caption of a row that could not be scored
    assert not np.isin(audit["proposed_row"], [3, 7]).any()
    # rematch leaves them out of the cleaned manifest, named with their status
    out = tmp_path / "clean.csv"
    rem = pmpclean.rematch(manifest, out=out, config=_cfg(emb), audit_dir=tmp_path / "out")
    assert not rem.info["scanned_now"]
    dropped = pd.read_csv(tmp_path / "clean.dropped.csv").set_index("pmpclean_row")
    assert dropped.loc[3, "pmpclean_action"] == dropped.loc[7, "pmpclean_action"] == "review"
    assert dropped.loc[3, "pmpclean_reason"] == "empty_caption"
    assert dropped.loc[7, "pmpclean_reason"] == "missing_embedding"
    assert 3 not in set(pd.read_csv(out)["pmpclean_row"])
    assert rem.info["action_counts"]["review"] == res.summary["action_counts"]["review"]


def test_scan_is_deterministic_and_config_repeats_it(dataset, tmp_path):
    _, manifest, emb = dataset
    a = pmpclean.scan(manifest, config=_cfg(emb, seed=3), out_dir=tmp_path / "a")
    cfg = pmpclean.load_config(tmp_path / "a" / "config.yaml")
    assert cfg.seed == 3 and cfg.embed.embeddings == str(emb)
    b = pmpclean.scan(manifest, config=cfg, out_dir=tmp_path / "b")
    pd.testing.assert_frame_equal(a.audit, b.audit)


def test_rematch_accounts_for_every_row(dataset, tmp_path):
    data, manifest, emb = dataset
    before = _sha(manifest)
    out = tmp_path / "clean.csv"
    res = pmpclean.rematch(manifest, out=out, config=_cfg(emb), audit_dir=tmp_path / "audit")
    cleaned = pd.read_csv(out)
    dropped = pd.read_csv(tmp_path / "clean.dropped.csv")
    rows = sorted(cleaned["pmpclean_row"].tolist() + dropped["pmpclean_row"].tolist())
    assert rows == list(range(N))
    assert res.info["n_cleaned"] + res.info["n_dropped"] == N
    assert set(dropped["pmpclean_action"]) <= {"drop", "review"}
    # rematched rows carry the proposed caption
    audit = pd.read_parquet(tmp_path / "audit" / "audit.parquet")
    rem = cleaned[cleaned["pmpclean_action"] == "rematch"]
    assert len(rem) > 0
    expected = audit.set_index("row").loc[rem["pmpclean_row"], "proposed_caption"].tolist()
    assert rem["caption"].tolist() == expected
    assert _sha(manifest) == before


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_rematched_rows_keep_the_caption_they_had(dataset, tmp_path, suffix):
    """pmpclean_original_caption / pmpclean_caption_from_row say what a rematch replaced."""
    _, manifest, emb = dataset
    given = pd.read_csv(manifest)["caption"].to_numpy(dtype=object)
    out = tmp_path / f"clean{suffix}"
    pmpclean.rematch(manifest, out=out, config=_cfg(emb), audit_dir=tmp_path / "audit")
    read = pd.read_csv if suffix == ".csv" else pd.read_parquet
    cleaned, dropped = read(out), read(pmpclean.pipeline._dropped_path(out))
    audit = pd.read_parquet(tmp_path / "audit" / "audit.parquet")
    rem = (cleaned["pmpclean_action"] == "rematch").to_numpy()
    assert rem.sum() > 10
    rows = cleaned["pmpclean_row"].to_numpy()
    from_row = cleaned["pmpclean_caption_from_row"]
    assert (
        from_row[rem].astype(int).tolist() == audit["proposed_row"].to_numpy()[rows[rem]].tolist()
    )
    # the new caption is the given caption of that row; the old one is kept beside it
    assert cleaned["caption"][rem].tolist() == given[from_row[rem].astype(int)].tolist()
    assert cleaned["pmpclean_original_caption"][rem].tolist() == given[rows[rem]].tolist()
    assert (cleaned["caption"][rem] != cleaned["pmpclean_original_caption"][rem]).all()
    # every other row: empty, and its caption unchanged
    for frame in (cleaned[~rem], dropped):
        assert frame["pmpclean_caption_from_row"].isna().all()
        assert frame["pmpclean_original_caption"].isna().all()
        assert frame["caption"].tolist() == given[frame["pmpclean_row"]].tolist()


def test_rematch_policies_and_refusals(dataset, tmp_path):
    _, manifest, emb = dataset
    cfg = _cfg(emb)
    audit_dir = tmp_path / "audit"
    out = tmp_path / "clean.parquet"
    pmpclean.rematch(manifest, out=out, policy="drop", config=cfg, audit_dir=audit_dir)
    kept = pd.read_parquet(out)
    assert set(kept["pmpclean_action"]) == {"keep"}
    with pytest.raises(DatasetError, match="already exists; pass --force"):
        pmpclean.rematch(manifest, out=out, config=cfg, audit_dir=audit_dir)
    res = pmpclean.rematch(
        manifest, out=out, policy="flag", config=cfg, audit_dir=audit_dir, force=True
    )
    assert res.info["n_cleaned"] == N and res.info["n_dropped"] == 0
    assert not res.info["scanned_now"]  # the audit was reused
    flagged = pd.read_parquet(out)
    assert "pmpclean_match_score" in flagged.columns
    with pytest.raises(ConfigError, match="never overwrites its input"):
        pmpclean.rematch(manifest, out=manifest, config=cfg, audit_dir=audit_dir, force=True)
    with pytest.raises(ConfigError, match="Unknown policy"):
        pmpclean.rematch(manifest, out=tmp_path / "x.csv", policy="fix", config=cfg)
    with pytest.raises(ConfigError, match="Cannot tell the format"):
        pmpclean.rematch(manifest, out=tmp_path / "x.xlsx", config=cfg)


def test_rematch_rescans_a_changed_manifest(dataset, tmp_path):
    _, manifest, emb = dataset
    cfg = _cfg(emb)
    audit_dir = tmp_path / "audit"
    pmpclean.rematch(manifest, out=tmp_path / "a.csv", config=cfg, audit_dir=audit_dir)
    frame = pd.read_csv(manifest)
    frame.loc[0, "caption"] = "an edited caption"
    frame.to_csv(manifest, index=False)
    res = pmpclean.rematch(manifest, out=tmp_path / "b.csv", config=cfg, audit_dir=audit_dir)
    assert res.info["scanned_now"]


def test_many_captions_per_image_and_duplicates(tmp_path):
    data = _easy(500, captions_per_image=5, duplicate_fraction=0.05)
    manifest, emb = _write(tmp_path, data)
    res = pmpclean.scan(manifest, config=_cfg(emb), out_dir=tmp_path / "out")
    audit = res.audit
    assert res.summary["n_images"] == 100
    pred = audit["is_mismatched"].to_numpy()
    # true pairs of an image with five captions are not flagged for being close to each other
    clean = ~data.is_mismatched
    assert pred[clean].mean() < 0.1
    prop = audit["proposed_row"].to_numpy()
    has = prop >= 0
    # never propose a caption that the same image already carries in another row
    same_image = data.image_group[prop[has]] == data.image_group[np.flatnonzero(has)]
    assert not same_image.any()


def test_width_mismatch_without_labels_is_a_clear_error(tmp_path):
    frame = pd.DataFrame(
        {"image": [f"i{i}" for i in range(10)], "caption": [f"c{i}" for i in range(10)]}
    )
    manifest = tmp_path / "d.csv"
    frame.to_csv(manifest, index=False)
    emb = tmp_path / "e.npz"
    rng = np.random.default_rng(0)
    np.savez(emb, image=rng.normal(size=(10, 8)), text=rng.normal(size=(10, 4)))
    with pytest.raises(DatasetError, match="differ in width"):
        pmpclean.scan(
            manifest,
            config=ScanConfig().replace(embed__embeddings=str(emb)),
            out_dir=tmp_path / "o",
        )


def test_audit_column_clash_and_bad_settings(dataset, tmp_path):
    data, manifest, emb = dataset
    frame = pd.read_csv(manifest)
    frame["status"] = "x"
    clash = tmp_path / "clash.csv"
    frame.to_csv(clash, index=False)
    with pytest.raises(DatasetError, match="already has column"):
        pmpclean.scan(clash, config=_cfg(emb), out_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match="mass must lie in"):
        pmpclean.scan(manifest, config=_cfg(emb, audit__mass=1.5), out_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match="Unknown cost"):
        pmpclean.scan(manifest, config=_cfg(emb, audit__cost="cheap"), out_dir=tmp_path / "o")


def test_truth_column_validated(dataset, tmp_path):
    _, manifest, emb = dataset
    frame = pd.read_csv(manifest)
    frame.loc[5, "true_row"] = 10_000
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(DatasetError, match="row 5"):
        pmpclean.scan(bad, config=_cfg(emb), out_dir=tmp_path / "o")


def test_unwritable_output_folder_is_a_clear_error(dataset, tmp_path):
    _, manifest, emb = dataset
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetError, match="Cannot write to output folder"):
        pmpclean.scan(manifest, config=_cfg(emb), out_dir=blocker / "out")


def test_corrupt_then_scan(tmp_path):
    data = _easy(300, noise_rate=0.0)
    frame = data.to_frame().drop(columns=["true_row"])
    manifest = tmp_path / "clean.csv"
    frame.to_csv(manifest, index=False)
    res = pmpclean.corrupt(manifest, out=tmp_path / "noisy.csv", rate=0.3, seed=1)
    noisy = pd.read_csv(tmp_path / "noisy.csv")
    assert len(noisy) == 300
    moved = noisy["true_row"].to_numpy() != np.arange(300)
    assert abs(moved.mean() - 0.3) < 0.02
    assert res.info["n_corrupted"] == int(moved.sum())
    # the captions really moved: each row's caption is the original caption of true_row
    assert noisy["caption"].tolist() == frame["caption"].to_numpy()[noisy["true_row"]].tolist()
    with pytest.raises(DatasetError, match="already exists"):
        pmpclean.corrupt(manifest, out=tmp_path / "noisy.csv", rate=0.3)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_rematch_out_elsewhere_rewrites_relative_image_paths(tmp_path, suffix):
    """A cleaned manifest written to another folder still points at the same image files."""
    from pmpclean.data import read_manifest
    from pmpclean.pipeline import _rebase_image_paths

    data = _easy(120)
    src_dir = tmp_path / "data"
    (src_dir / "images").mkdir(parents=True)
    frame = data.to_frame()
    frame["image"] = [f"images/{name}" for name in frame["image"]]
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(png, format="PNG")
    for name in frame["image"]:
        (src_dir / name).write_bytes(png.getvalue())
    absolute = str(tmp_path / "elsewhere" / "abs.png")
    frame.loc[0, "image"] = absolute
    frame.loc[1, "image"] = "https://example.org/x.png"
    frame.loc[2, "image"] = "img-id-2"  # an identifier, no such file: left alone (--embeddings)
    manifest = src_dir / "data.csv"
    frame.to_csv(manifest, index=False)
    emb = src_dir / "emb.npz"
    np.savez(emb, image=data.image_emb, text=data.text_emb)

    out = tmp_path / "out" / "deeper" / f"clean{suffix}"
    res = pmpclean.rematch(manifest, out=out, config=_cfg(emb), audit_dir=tmp_path / "audit")
    assert res.info["n_image_paths_rebased"] == 117
    written = {
        ".csv": pd.read_csv,
        ".parquet": pd.read_parquet,
        ".jsonl": lambda p: pd.read_json(p, lines=True),
    }[suffix]
    both = pd.concat([written(out), written(pmpclean.pipeline._dropped_path(out))])
    by_row = both.set_index("pmpclean_row")["image"]
    assert by_row[0] == absolute and by_row[1] == "https://example.org/x.png"
    assert by_row[2] == "img-id-2"
    for row in range(3, 120):
        new = by_row[row]
        assert not Path(new).is_absolute() and new.startswith(("..", f"..{Path('/').anchor}"))
        assert (out.parent / new).resolve() == (src_dir / frame.loc[row, "image"]).resolve()
    # read back from its own folder, the cleaned manifest finds every image
    back = read_manifest(out)
    rel_rows = back.frame["pmpclean_row"].astype(int).to_numpy() >= 3
    assert (np.asarray(back.status)[rel_rows] == "ok").all()

    # written beside the input, paths stay exactly as they were
    beside = src_dir / f"beside{suffix}"
    res = pmpclean.rematch(manifest, out=beside, config=_cfg(emb), audit_dir=tmp_path / "audit")
    assert res.info["n_image_paths_rebased"] == 0
    # a model scan (no --embeddings) rewrites missing files too: the column holds paths
    cells = pd.DataFrame({"image": ["a/missing.png", "/abs/x.png", "", None]})
    assert (
        _rebase_image_paths(
            cells, "image", base=tmp_path / "m", out_dir=tmp_path / "n" / "o", only_existing=False
        )
        == 1
    )
    assert cells["image"].tolist()[:2] == [str(Path("../../m/a/missing.png")), "/abs/x.png"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_output_files_honour_the_umask(dataset, tmp_path, umask, mode):
    """Every file scan and rematch write gets 0666 & ~umask, as any other tool's output."""
    _, manifest, emb = dataset
    old = os.umask(umask)
    try:
        pmpclean.scan(manifest, config=_cfg(emb), out_dir=tmp_path / "scan")
        pmpclean.rematch(manifest, out=tmp_path / "clean" / "c.csv", config=_cfg(emb))
        pmpclean.rematch(manifest, out=tmp_path / "clean" / "c.parquet", config=_cfg(emb))
    finally:
        os.umask(old)
    written = sorted((tmp_path / "scan").iterdir()) + sorted((tmp_path / "clean").iterdir())
    assert {p.name for p in written} >= {
        "audit.parquet",
        "audit.csv",
        "summary.json",
        "config.yaml",
        "report.html",
        "c.csv",
        "c.dropped.csv",
        "c.parquet",
        "c.dropped.parquet",
    }
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {
        p.name: mode for p in written
    }


def test_actions_known_answers():
    """keep / rematch / drop / review, with every boundary of the rule (threshold 0.5,
    review margin 0.2, proposals need confidence 0.6)."""
    from pmpclean.pipeline import _actions

    #        (match_score, flagged, proposed_row, confidence, expected action)
    table = [
        (0.90, False, -1, 0.0, "keep"),
        (0.45, False, 3, 0.9, "keep"),  # not flagged: a proposal changes nothing
        (0.10, True, 5, 0.90, "rematch"),
        (0.10, True, 5, 0.60, "rematch"),  # confidence at the cut
        (0.40, True, 5, 0.95, "rematch"),  # borderline, but a confident proposal
        (0.10, True, 5, 0.59, "drop"),  # below the cut, far below the threshold
        (0.10, True, -1, 0.0, "drop"),
        (0.29, True, -1, 0.0, "drop"),
        (0.30, True, -1, 0.0, "review"),  # threshold - margin: borderline
        (0.40, True, -1, 0.0, "review"),
        (0.35, True, 5, 0.50, "review"),  # borderline, proposal not confident
    ]
    ms, flagged, prop, conf, expected = (np.array(col) for col in zip(*table, strict=True))
    status = np.full(len(table), "ok", dtype=object)
    kw = {"threshold": 0.5, "review_margin": 0.2, "min_confidence": 0.6}
    action = _actions(status, ms, flagged, prop, conf, **kw)
    assert action.tolist() == expected.tolist()
    # the settings are the ones passed: no margin, no review; a stricter cut, no rematch
    none = _actions(status, ms, flagged, prop, conf, **{**kw, "review_margin": 0.0})
    assert "review" not in none.tolist() and none[8] == "drop"
    strict = _actions(status, ms, flagged, prop, conf, **{**kw, "min_confidence": 0.95})
    assert strict[2:5].tolist() == ["drop", "drop", "rematch"]
    high = _actions(status, ms, flagged, prop, conf, **{**kw, "threshold": 0.8})
    assert high[8:11].tolist() == ["drop", "drop", "drop"]  # borderline from 0.6 up
    low = _actions(status, ms, flagged, prop, conf, **{**kw, "threshold": 0.3})
    assert low[5:8].tolist() == ["review", "review", "review"]  # borderline from 0.1 up
    # a row that could not be scored (as scan leaves it: no score, no flag) is not kept
    status[[0, 1]] = "missing_embedding"
    ms[[0, 1]], flagged[[0, 1]] = np.nan, False
    unscored = _actions(status, ms, flagged, prop, conf, **kw)
    assert unscored[0] != "keep" and unscored[1] != "keep"
    assert unscored[2:].tolist() == expected[2:].tolist()


def _rule(audit: pd.DataFrame, *, threshold: float, margin: float, cut: float) -> np.ndarray:
    """The action each scored row's audit columns call for, written out independently."""
    ms = audit["match_score"].to_numpy()
    flagged = audit["is_mismatched"].to_numpy(dtype=bool)
    proposal = (audit["proposed_row"].to_numpy() >= 0) & (
        audit["rematch_confidence"].to_numpy() >= cut
    )
    return np.select(
        [~flagged, proposal, ms >= threshold - margin],
        ["keep", "rematch", "review"],
        default="drop",
    )


def test_scan_and_rematch_assign_every_action_by_the_rule(tmp_path):
    """On data hard enough for all four actions, each row's action follows from its
    scores; rematch applies its own --min-confidence to the same audit."""
    data = _easy(semantic=0.8, noise=1.0)
    manifest, emb = _write(tmp_path, data)
    res = pmpclean.scan(manifest, config=_cfg(emb), out_dir=tmp_path / "audit")
    audit = res.audit
    assert (audit["status"] == "ok").all()
    cut = ScanConfig().audit.min_confidence
    expected = _rule(audit, threshold=0.5, margin=0.2, cut=cut)
    assert audit["action"].tolist() == expected.tolist()
    counts = res.summary["action_counts"]
    assert min(counts.values()) > 0, counts  # keep, rematch, drop and review all occur

    strict = pmpclean.rematch(
        manifest,
        out=tmp_path / "c.csv",
        config=_cfg(emb),
        audit_dir=tmp_path / "audit",
        min_confidence=0.95,
    )
    assert not strict.info["scanned_now"] and strict.info["min_confidence"] == 0.95
    both = pd.concat([strict.cleaned, strict.dropped]).set_index("pmpclean_row").sort_index()
    want = _rule(audit, threshold=0.5, margin=0.2, cut=0.95)
    assert both["pmpclean_action"].tolist() == want.tolist()
    assert strict.info["n_rematched"] == int((want == "rematch").sum())
    assert strict.info["n_rematched"] < counts["rematch"]
    review = strict.dropped["pmpclean_action"] == "review"
    assert review.any()
    assert set(strict.dropped.loc[review, "pmpclean_reason"]) == {
        "borderline match_score, no confident proposal"
    }


def test_versions_name_each_library_from_its_module_or_its_package(monkeypatch):
    """summary.json's versions: a module already imported reports __version__, the
    others are read from their installed package (under the package's own name)."""
    import sys
    from importlib import metadata

    from pmpclean import __version__
    from pmpclean.pipeline import _versions

    imported = _versions()
    assert imported["pmpclean"] == __version__ and imported["numpy"] == np.__version__
    assert imported["pandas"] == pd.__version__
    for name in ("torch", "open_clip", "ot", "faiss"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    read = _versions()
    assert read["torch"] == metadata.version("torch")
    assert read["open_clip"] == metadata.version("open_clip_torch")
    assert read["pot"] == metadata.version("pot")
    assert read["faiss"] == metadata.version("faiss-cpu")
    assert set(read) == {"pmpclean", "python", "numpy", "pandas", "torch", "open_clip", "pot"} | {
        "faiss"
    }


def test_audit_settings_at_their_bounds_are_accepted():
    from pmpclean.pipeline import _validate_audit_config

    for changes in (
        {"audit__min_confidence": 0.0},
        {"audit__min_confidence": 1.0},
        {"audit__exact_search_max": 0},
        {"audit__search_nprobe": 1},
        {"audit__mixture_fit_max": 100},
        {"audit__mixture_fit_max": None},
        {"audit__mass": 1.0},
        {"audit__k": 1},
        {"audit__review_margin": 0.0},
    ):
        _validate_audit_config(ScanConfig().replace(**changes))
    for changes, match in (
        ({"audit__exact_search_max": True}, "exact_search_max must be an integer"),
        ({"audit__exact_search_max": -1}, "exact_search_max must be an integer >= 0"),
        ({"audit__min_confidence": 1.01}, r"min_confidence must lie in \[0, 1\], got 1.01"),
        ({"audit__k": 0}, "k must be at least 1, got 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            _validate_audit_config(ScanConfig().replace(**changes))


def test_dropped_file_sits_beside_the_cleaned_one():
    from pmpclean.pipeline import _dropped_path

    assert _dropped_path(Path("d/clean.csv.gz")) == Path("d/clean.dropped.csv.gz")
    assert _dropped_path(Path("d/clean.parquet")) == Path("d/clean.dropped.parquet")
    assert _dropped_path(Path("d/.hidden.csv")) == Path("d/.hidden.dropped.csv")
    assert _dropped_path(Path("d/noext")) == Path("d/noext.dropped")


def test_rematch_defaults_and_refusals(dataset, tmp_path):
    """Without --audit-dir the scan goes beside the manifest; bad settings are named."""
    from pmpclean.pipeline import default_out_dir

    _, manifest, emb = dataset
    res = pmpclean.rematch(manifest, out=tmp_path / "c.csv", config=_cfg(emb))
    assert res.info["audit_dir"] == str(default_out_dir(manifest))
    assert (default_out_dir(manifest) / "audit.parquet").is_file()
    with pytest.raises(ConfigError, match=r"^min_confidence must lie in \[0, 1\], got 1.5\.$"):
        pmpclean.rematch(manifest, out=tmp_path / "d.csv", config=_cfg(emb), min_confidence=1.5)
    with pytest.raises(DatasetError, match=r"Use --truth-col to name it \(pmpclean corrupt"):
        cfg = ScanConfig().replace(embed__embeddings=str(emb), data__truth_col="truth")
        pmpclean.scan(manifest, config=cfg, out_dir=tmp_path / "o")


def test_corrupt_rate_bounds_and_truth_column_clash(tmp_path):
    data = _easy(60, noise_rate=0.0)
    frame = data.to_frame().drop(columns=["true_row"])
    manifest = tmp_path / "clean.csv"
    frame.to_csv(manifest, index=False)
    none = pmpclean.corrupt(manifest, out=tmp_path / "r0.csv", rate=0.0)
    assert none.info["n_corrupted"] == 0
    every = pmpclean.corrupt(manifest, out=tmp_path / "r1.csv", rate=1.0)
    assert every.info["n_corrupted"] > 50
    with pytest.raises(ConfigError, match=r"rate must lie in \[0, 1\], got 1.5"):
        pmpclean.corrupt(manifest, out=tmp_path / "x.csv", rate=1.5)
    frame.assign(true_row=0).to_csv(tmp_path / "has.csv", index=False)
    with pytest.raises(
        DatasetError, match=r"'true_row' column; pass --truth-col NAME to choose another name\.$"
    ):
        pmpclean.corrupt(tmp_path / "has.csv", out=tmp_path / "y.csv", rate=0.2)


def test_mixed_type_columns_still_write_a_parquet_audit(tmp_path):
    """A JSON Lines column of numbers and strings becomes strings in audit.parquet
    (missing values stay missing); the audit itself keeps the values as read."""
    data = _easy(120)
    frame = data.to_frame()
    frame["source"] = [7 if i % 3 == 0 else ("web" if i % 3 == 1 else None) for i in range(120)]
    manifest = tmp_path / "data.jsonl"
    frame.to_json(manifest, orient="records", lines=True)
    emb = tmp_path / "emb.npz"
    np.savez(emb, image=data.image_emb, text=data.text_emb)
    pmpclean.scan(manifest, config=_cfg(emb), out_dir=tmp_path / "out")
    back = pd.read_parquet(tmp_path / "out" / "audit.parquet")
    assert back["source"].tolist()[:2] == ["7", "web"] and pd.isna(back["source"][2])


def test_embed_writes_the_embeddings_scan_accepts(tmp_path, drawn_captions):
    """pmpclean.embed with the tiny random model: one row-aligned .npz (image, text,
    status), refused when it exists (unless force) or when embeddings are given."""
    cfg = ScanConfig().replace(
        embed__model="pmpclean-tiny",
        embed__pretrained="none",
        embed__device="cpu",
        embed__workers=0,
    )
    out = tmp_path / "emb.npz"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        res = pmpclean.embed(drawn_captions, out=out, config=cfg)
    saved = np.load(out)
    assert saved["image"].shape[0] == saved["text"].shape[0] == 24
    np.testing.assert_array_equal(saved["image"], res.image)
    np.testing.assert_array_equal(saved["text"], res.text)
    assert saved["status"].tolist() == ["ok"] * 24
    info = res.info
    assert info["n_rows"] == 24 and info["n_images"] == 24 and info["file"] == str(out)
    assert info["dim_image"] == res.image.shape[1] and info["dim_text"] == res.text.shape[1]
    assert info["status_counts"] == {"ok": 24} and "read" in info["timings"]
    with pytest.raises(DatasetError, match="already exists; pass --force"):
        pmpclean.embed(drawn_captions, out=out, config=cfg)
    with pytest.raises(
        ConfigError, match=r"^embed computes embeddings; it cannot also take --embeddings\.$"
    ):
        pmpclean.embed(drawn_captions, out=out, config=cfg.replace(embed__embeddings=str(out)))
    scanned = pmpclean.scan(
        drawn_captions, config=ScanConfig().replace(embed__embeddings=str(out)), write=False
    )
    assert len(scanned.audit) == 24


def test_summary_and_rematch_result_contracts(dataset, tmp_path):
    """Every documented key of summary.json, with its value; rematch names its files."""
    from pmpclean import __version__
    from pmpclean.config import config_to_dict

    data, manifest, emb = dataset
    cfg = _cfg(emb)
    res = pmpclean.scan(manifest, config=cfg, out_dir=tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    audit = res.audit
    assert s["pmpclean_version"] == __version__
    assert s["manifest"] == str(manifest.resolve()) and s["manifest_sha256"] == _sha(manifest)
    assert s["n_rows"] == N and s["n_scored"] == N and s["n_images"] == N
    assert s["input_columns"] == ["image", "caption", "true_row", "cluster", "licence"]
    assert s["status_counts"] == {"ok": N}
    assert s["n_mismatched"] == int(audit["is_mismatched"].sum())
    assert s["threshold"] == 0.5 and s["pair_audit"] is True
    assert s["mixture"]["bimodal"] is True
    assert s["rematch"]["n_suspects"] == s["n_mismatched"]
    assert s["rematch"]["n_proposed"] == int((audit["proposed_row"] >= 0).sum())
    assert s["rematch"]["min_confidence"] == cfg.audit.min_confidence
    assert s["model"]["model_work"] is False and s["labels"] is None
    assert s["settings"] == json.loads(json.dumps(config_to_dict(cfg)))
    assert s["out_dir"] == str((tmp_path / "out").resolve())
    assert set(s["files"]) == {"audit_parquet", "audit_csv", "summary", "config", "report"}
    assert s["warnings"] == [] and set(s["versions"]) >= {"pmpclean", "numpy", "torch"}
    names = [span[0] for span in s["stage_spans"]]
    assert names[:3] == ["read", "embed", "score"] and set(names) == set(s["timings"])
    assert all(0 <= a <= b for _, a, b in s["stage_spans"])
    # the similarity column is the cosine of the pair's embeddings (held as float16:
    # each unit vector's entries round by 2^-12 relative, the cosine by about 1e-3)
    img = data.image_emb / np.linalg.norm(data.image_emb, axis=1, keepdims=True)
    txt = data.text_emb / np.linalg.norm(data.text_emb, axis=1, keepdims=True)
    np.testing.assert_allclose(audit["similarity"], (img * txt).sum(1), atol=1e-3)

    out = tmp_path / "c.csv"
    rem = pmpclean.rematch(manifest, out=out, config=cfg, audit_dir=tmp_path / "out")
    want = {"cleaned": str(out), "dropped": str(tmp_path / "c.dropped.csv")}
    assert rem.files == rem.info["files"] == want
    dry = pmpclean.rematch(
        manifest, out=tmp_path / "d.csv", config=cfg, audit_dir=tmp_path / "out", dry_run=True
    )
    assert dry.files == dry.info["files"] == {} and not (tmp_path / "d.csv").exists()


def test_scan_without_rematch_proposes_nothing(dataset, tmp_path):
    _, manifest, emb = dataset
    res = pmpclean.scan(manifest, config=_cfg(emb, audit__rematch=False), write=False)
    audit = res.audit
    assert (audit["proposed_row"] == -1).all() and (audit["proposed_caption"] == "").all()
    assert (audit["rematch_confidence"] == 0).all() and res.summary["rematch"] is None
    assert "rematch" not in set(audit["action"]) and audit["is_mismatched"].any()


def test_scan_with_a_label_column_adds_the_label_audit(tmp_path):
    data = _easy(300)
    manifest, emb = _write(tmp_path, data)
    cfg = _cfg(emb, data__label_col="cluster")
    res = pmpclean.scan(manifest, config=cfg, out_dir=tmp_path / "out")
    audit = res.audit
    for col in ("label_status", "label_score", "is_label_issue", "suggested_label"):
        assert col in audit.columns
    assert "label_confidence" in audit.columns
    assert audit["is_label_issue"].dtype == bool
    assert res.summary["labels"]["label_col"] == "cluster"
    assert "labels" in res.summary["timings"]


def test_width_mismatch_message_names_both_widths(tmp_path):
    frame = pd.DataFrame({"image": [f"i{i}" for i in range(6)], "caption": list("abcdef")})
    manifest = tmp_path / "d.csv"
    frame.to_csv(manifest, index=False)
    emb = tmp_path / "e.npz"
    rng = np.random.default_rng(0)
    np.savez(emb, image=rng.normal(size=(6, 8)), text=rng.normal(size=(6, 4)))
    with pytest.raises(DatasetError, match=r"\(8-d\) and text embeddings \(4-d\) differ in width"):
        pmpclean.scan(
            manifest, config=ScanConfig().replace(embed__embeddings=str(emb)), write=False
        )


def test_evidence_columns_name_real_rows_and_the_runner_up(dataset, tmp_path):
    """alt_caption/alt_image name the rows whose caption/image fits better, with the
    cosine of that pair; a rematch's runner-up is another text than its proposal."""
    data, manifest, emb = dataset
    audit = pmpclean.scan(manifest, config=_cfg(emb), write=False).audit
    # the scan holds embeddings as float16 unit rows: the cosines are of those rows
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)  # noqa: E731
    img, txt = unit(data.image_emb.astype(float)), unit(data.text_emb.astype(float))
    img, txt = img.astype(float), txt.astype(float)
    rows = np.arange(N)
    cap = audit["alt_caption_row"].to_numpy()
    im = audit["alt_image_row"].to_numpy()
    assert (cap >= 0).all() and (im >= 0).all() and (cap != rows).all() and (im != rows).all()
    np.testing.assert_allclose(
        audit["alt_caption_similarity"], np.einsum("nd,nd->n", img, txt[cap]), atol=1e-5
    )
    np.testing.assert_allclose(
        audit["alt_image_similarity"], np.einsum("nd,nd->n", img[im], txt), atol=1e-5
    )
    flagged = audit["is_mismatched"].to_numpy()
    # a flagged pair is flagged because something fits better than its own partner
    better = audit["alt_caption_similarity"] > audit["similarity"]
    assert better[flagged].mean() > 0.9 > better[~flagged].mean()
    prop = audit["proposed_row"].to_numpy()
    runner = audit["runner_up_row"].to_numpy()
    has = prop >= 0
    assert has.any() and (runner[~has] == -1).all()
    assert audit["runner_up_similarity"][~has].isna().all()
    caption = audit["caption"].to_numpy()
    assert (caption[runner[has]] != caption[prop[has]]).all()
    np.testing.assert_allclose(
        audit["runner_up_similarity"][has],
        np.einsum("nd,nd->n", img[has], txt[runner[has]]),
        atol=1e-5,
    )


def test_random_weights_warned_in_summary_also_on_a_cache_hit(tmp_path, drawn_captions):
    cfg = ScanConfig().replace(
        embed__model="pmpclean-tiny",
        embed__pretrained="none",
        embed__device="cpu",
        embed__workers=0,
        embed__cache_dir=str(tmp_path / "cache"),
        audit__rematch=False,
    )
    runs = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs.append(pmpclean.scan(drawn_captions, config=cfg, write=False).summary)
    assert runs[0]["model"]["images_through_model"] > 0
    assert runs[1]["model"]["images_through_model"] == 0  # the cache hit: no model loaded
    for summary in runs:
        assert summary["model"]["device"] == "cpu" and summary["model"]["random_weights"]
        found = [w for w in summary["warnings"] if "RANDOM weights" in w]
        assert len(found) == 1 and "--pretrained none" in found[0]


def test_report_shows_the_run_time_of_each_stage(dataset, tmp_path):
    _, manifest, emb = dataset
    pmpclean.scan(manifest, config=_cfg(emb), out_dir=tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "Run time per stage" in html
    table = html.split('id="timings"', 1)[1].split("</table>", 1)[0]
    assert all(f"<td>{stage}</td>" in table for stage in ("score", "split", "rematch"))
