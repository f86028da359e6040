"""Label audit (pmpclean.labels): known flips recovered, transport invariants, bad labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pmpclean.errors import ConfigError, LabelAuditError
from pmpclean.labels import (
    LabelAudit,
    _partial_transport,
    audit_labels,
    fit_label_heads,
    flip_labels,
)

# small and fast: the heads are tiny and trained for few steps
FAST = {"steps": 100, "round_steps": 30, "rounds": 3, "dim": 32}  # accuracy tests
TINY = {"steps": 20, "round_steps": 5, "rounds": 1, "dim": 8}  # plumbing tests


def clustered(n_per_class: int = 40, k: int = 4, d_img: int = 12, d_txt: int = 5, seed: int = 0):
    """Two modalities with class-clustered features; the text view is the sharper one."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per_class)
    ci = rng.normal(0, 1, (k, d_img)) * 2.0
    ct = rng.normal(0, 1, (k, d_txt)) * 2.0
    img = ci[y] + rng.normal(0, 1.2, (len(y), d_img))
    txt = ct[y] + rng.normal(0, 0.8, (len(y), d_txt))
    return img, txt, y


@pytest.fixture(scope="module")
def flipped_audit():
    img, txt, y = clustered()
    noisy, flipped = flip_labels(y, rate=0.15, kind="symmetric", seed=3)
    names = np.array(["cat", "dog", "eel", "fox"], dtype=object)
    audit = audit_labels(img, txt, names[noisy], seed=0, **FAST)
    return audit, y, noisy, flipped, names


def test_flips_recovered(flipped_audit):
    audit, y, noisy, flipped, names = flipped_audit
    assert isinstance(audit, LabelAudit)
    assert audit.classes == ["cat", "dog", "eel", "fox"]
    tp = (audit.is_label_issue & flipped).sum()
    precision = tp / audit.is_label_issue.sum()
    recall = tp / flipped.sum()
    # 23 of 24 flips found; the flips moved the class frequencies (35/42/39/44 given vs
    # 40 each), and the transport's class marginal leans on the given frequencies
    assert recall >= 0.9 and precision >= 0.85, (precision, recall)
    # corrected labels: the suggestion is the true class on (almost) every row
    corrected_ok = (audit.suggested_label == names[y]).mean()
    assert corrected_ok >= 0.95
    # suggested == given where no issue; same value type as the given labels
    keep = ~audit.is_label_issue
    assert (audit.suggested_label[keep] == names[noisy][keep]).all()
    assert all(isinstance(v, str) for v in audit.suggested_label)


def test_prior_em_frees_the_class_marginal():
    # with the class marginal fully re-estimated (EM prior), the same small data set is
    # audited without false alarms
    img, txt, y = clustered()
    noisy, flipped = flip_labels(y, rate=0.15, kind="symmetric", seed=3)
    audit = audit_labels(img, txt, noisy, seed=0, prior_em=1.0, **FAST)
    tp = (audit.is_label_issue & flipped).sum()
    assert tp / flipped.sum() >= 0.95 and tp / audit.is_label_issue.sum() >= 0.95


def test_scores_in_range_and_ranked(flipped_audit):
    audit, y, noisy, flipped, _ = flipped_audit
    s = audit.label_score
    assert np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    assert (audit.label_confidence >= 0).all() and (audit.label_confidence <= 1).all()
    # flipped labels score lower than clean ones
    assert s[flipped].mean() < 0.3 < 0.7 < s[~flipped].mean()
    np.testing.assert_allclose(audit.proba.sum(1), 1.0, atol=1e-6)
    # the confidence is the posterior of the suggestion, at least the score of the given label
    assert (audit.label_confidence >= s - 1e-9).all()


def test_summary_contract(flipped_audit):
    audit, y, noisy, flipped, _ = flipped_audit
    sm = audit.summary
    assert sm["n_classes"] == 4 and sm["n_audited"] == len(y)
    assert sm["n_label_issues"] == int(audit.is_label_issue.sum())
    assert 0.05 < sm["estimated_label_noise"] < 0.3
    counts = np.array(sm["confusion"]["counts"])
    assert counts.shape == (4, 4) and counts.sum() == len(y)
    assert np.trace(counts) == len(y) - sm["n_label_issues"]
    assert sm["status_counts"] == {"ok": len(y)}
    assert json.loads(json.dumps(sm))["confusion"]["classes"] == ["cat", "dog", "eel", "fox"]
    assert set(audit.to_columns()) == {
        "label_status",
        "label_score",
        "is_label_issue",
        "suggested_label",
        "label_confidence",
    }


def test_asymmetric_flips_recovered():
    img, txt, y = clustered(n_per_class=50, seed=1)
    noisy, flipped = flip_labels(y, rate=0.2, kind="asymmetric", seed=4)
    assert (noisy[flipped] == (y[flipped] + 1) % 4).all()
    audit = audit_labels(img, txt, noisy, seed=0, **FAST)
    tp = (audit.is_label_issue & flipped).sum()
    assert tp / flipped.sum() >= 0.85 and tp / audit.is_label_issue.sum() >= 0.85
    assert audit.suggested_label.dtype == object and isinstance(audit.suggested_label[0], int)


# --------------------------------------------------------------------------- transport


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 1.0])
def test_partial_transport_invariants(mass):
    rng = np.random.default_rng(0)
    n, k = 60, 5
    cost = rng.gamma(2.0, 1.0, (n, k))
    a = np.full(n, 1.0 / n)
    b = rng.dirichlet(np.ones(k) * 3)
    plan = _partial_transport(cost, a, b, mass, reg=0.5)
    assert plan.shape == (n, k)
    assert (plan >= 0).all()
    assert plan.sum() == pytest.approx(mass, rel=1e-6)
    assert (plan.sum(1) <= a + 1e-9).all()
    assert (plan.sum(0) <= b + 1e-6).all()
    if mass == 1.0:  # balanced: both marginals met
        np.testing.assert_allclose(plan.sum(1), a, atol=1e-9)
        np.testing.assert_allclose(plan.sum(0), b, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 40),
    k=st.integers(2, 8),
    frac=st.floats(0.05, 1.0),
    reg=st.sampled_from([0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
@example(n=2, k=2, frac=0.0625, reg=0.1, seed=3)  # slow Sinkhorn: needs the warm restarts
def test_partial_transport_invariants_property(n, k, frac, reg, seed):
    rng = np.random.default_rng(seed)
    cost = rng.gamma(2.0, 2.0, (n, k))
    a = rng.dirichlet(np.ones(n))
    b = rng.dirichlet(np.ones(k))
    plan = _partial_transport(cost, a, b, frac, reg=reg, max_iter=5000)
    assert (plan >= 0).all()
    assert plan.sum() == pytest.approx(frac, abs=1e-5)
    assert (plan.sum(1) <= a + 1e-5).all() and (plan.sum(0) <= b + 1e-5).all()


def test_partial_transport_moves_cheapest_rows_first():
    # rows 0..9 are cheap for class 0, the rest are expensive everywhere
    cost = np.full((40, 2), 8.0)
    cost[:10, 0] = 0.0
    plan = _partial_transport(cost, np.full(40, 1 / 40), np.array([0.5, 0.5]), 0.25, reg=0.1)
    row = plan.sum(1) * 40
    assert row[:10].min() > 0.99 and row[10:].max() < 0.01


def test_partial_transport_rejects_bad_mass():
    with pytest.raises(ConfigError, match=r"transport mass must be in \(0, 1\], got 1.5"):
        _partial_transport(np.zeros((3, 2)), np.full(3, 1 / 3), np.full(2, 0.5), 1.5)


def test_curriculum_mass_schedule(flipped_audit):
    audit = flipped_audit[0]
    hist = audit.summary["curriculum"]
    masses = [h["mass"] for h in hist]
    assert masses == pytest.approx([0.3, 0.65, 1.0])  # linear from mass_start to mass_end
    img, txt, y = clustered()
    a4 = audit_labels(img, txt, y, seed=0, **{**TINY, "rounds": 4}, mass_start=0.4, mass_end=0.7)
    assert [h["mass"] for h in a4.summary["curriculum"]] == pytest.approx([0.4, 0.5, 0.6, 0.7])
    # the selected share of rows follows the scheduled mass
    sel = [h["selected"] for h in a4.summary["curriculum"]]
    assert sel == sorted(sel)


# --------------------------------------------------------------------------- bad label columns


def test_missing_and_unknown_labels_are_statuses():
    img, txt, y = clustered()
    labels: list = [f"c{v}" for v in y]
    labels[0] = None
    labels[1] = float("nan")
    labels[2] = "  "
    labels[3] = "zebra"
    with pytest.warns(UserWarning, match=r"1 row\(s\) carry a label outside the given classes"):
        audit = audit_labels(img, txt, labels, classes=["c0", "c1", "c2", "c3"], seed=0, **TINY)
    st = audit.label_status
    assert list(st[:4]) == ["missing_label"] * 3 + ["unknown_label"]
    assert (st[4:] == "ok").all()
    assert np.isnan(audit.label_score[:4]).all()
    assert not audit.is_label_issue[:4].any()
    # a label is still suggested from the features
    assert list(audit.suggested_label[:4]) == [f"c{v}" for v in y[:4]]
    assert audit.summary["status_counts"] == {
        "ok": len(y) - 4,
        "missing_label": 3,
        "unknown_label": 1,
    }


def test_invalid_rows_not_scored():
    img, txt, y = clustered()
    valid = np.ones(len(y), dtype=bool)
    valid[5] = False
    img = img.copy()
    img[6, 0] = np.nan
    with pytest.warns(UserWarning, match=r"1 row\(s\) have non-finite features \(rows 6\)"):
        audit = audit_labels(img, txt, y, valid=valid, seed=0, **TINY)
    assert audit.label_status[5] == "not_scored" and audit.label_status[6] == "not_scored"
    assert audit.suggested_label[5] is None and np.isnan(audit.label_confidence[6])
    assert not audit.is_label_issue[[5, 6]].any()


def test_single_class_raises():
    img, txt, y = clustered()
    with pytest.raises(LabelAuditError, match=r"has the single class 'a' .* at least 2 classes"):
        audit_labels(img, txt, ["a"] * len(y), **TINY)
    with pytest.raises(LabelAuditError, match=r"has no labels at all"):
        audit_labels(img, txt, [None] * len(y), **TINY)


def test_class_with_one_member_is_set_aside():
    img, txt, y = clustered()
    labels = y.copy()
    labels[7] = 9  # a class with a single member
    with pytest.warns(UserWarning, match=r"fewer than 2 member\(s\): 9 \(row 7\)"):
        audit = audit_labels(img, txt, labels, seed=0, **TINY)
    assert audit.label_status[7] == "not_scored"
    assert (np.delete(audit.label_status, 7) == "ok").all()
    # two classes, one of them a singleton -> nothing left to compare
    with pytest.raises(LabelAuditError, match=r"fewer than 2 classes are left"):
        audit_labels(img, txt, np.r_[np.zeros(len(y) - 1, int), 1], **TINY)


def test_bad_arguments():
    img, txt, y = clustered()
    with pytest.raises(ConfigError, match=r"Unknown method 'ot' for the label audit"):
        audit_labels(img, txt, y, method="ot")
    with pytest.raises(ConfigError, match=r"text_feats has 10 rows but image_feats has 160"):
        audit_labels(img, txt[:10], y)
    with pytest.raises(ConfigError, match=r"labels has 3 entries but the features have 160"):
        audit_labels(img, txt, y[:3])
    with pytest.raises(ConfigError, match=r"Unknown label-audit option\(s\) \['epochz'\]"):
        audit_labels(img, txt, y, epochz=3)
    with pytest.raises(ConfigError, match=r"Unknown head 'cnn'"):
        audit_labels(img, txt, y, head="cnn")
    with pytest.raises(ConfigError, match=r"0 < mass_start <= mass_end <= 1"):
        audit_labels(img, txt, y, mass_start=0.8, mass_end=0.5)


# --------------------------------------------------------------------------- widths, determinism


def test_different_widths_accepted():
    img, txt, y = clustered(d_img=30, d_txt=3)
    assert img.shape[1] != txt.shape[1]
    audit = audit_labels(img, txt, y, seed=0, **TINY)
    assert audit.label_score.shape == (len(y),)
    heads = fit_label_heads(img, txt, y, steps=50, dim=8, seed=0)
    assert heads.embed_image(img).shape == (len(y), 8)
    assert heads.embed_text(txt).shape == (len(y), 8)
    np.testing.assert_allclose(np.linalg.norm(heads.embed_text(txt), axis=1), 1.0, atol=1e-5)


def test_deterministic_under_seed():
    img, txt, y = clustered()
    noisy, _ = flip_labels(y, rate=0.3, seed=2)
    a = audit_labels(img, txt, noisy, seed=7, **TINY)
    b = audit_labels(img, txt, noisy, seed=7, **TINY)
    np.testing.assert_array_equal(a.label_score, b.label_score)
    np.testing.assert_array_equal(a.suggested_label, b.suggested_label)
    c = audit_labels(img, txt, noisy, seed=8, **TINY)
    assert not np.array_equal(a.label_score, c.label_score)


def test_heads_method_runs():
    img, txt, y = clustered()
    noisy, flipped = flip_labels(y, rate=0.15, seed=3)
    audit = audit_labels(img, txt, noisy, method="heads", seed=0, **FAST)
    assert audit.summary["settings"]["method"] == "heads"
    assert (audit.is_label_issue & flipped).sum() >= 0.8 * flipped.sum()


def test_flip_labels_exact_rates():
    y = np.repeat(np.arange(5), 20)
    noisy, flipped = flip_labels(y, rate=0.4, kind="symmetric", seed=0)
    assert flipped.sum() == 40 and (noisy[flipped] != y[flipped]).all()
    noisy, flipped = flip_labels(y, rate=0.25, kind="asymmetric", seed=0)
    assert flipped.sum() == 25 and np.bincount(y[flipped]).tolist() == [5] * 5
    with pytest.raises(ConfigError, match="Unknown noise kind 'pair'"):
        flip_labels(y, rate=0.1, kind="pair")


# --------------------------------------------------------------------------- shared data

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikipedia"


@pytest.mark.shared
@pytest.mark.skipif(not WIKI.exists(), reason="shared Wikipedia data absent")
def test_wikipedia_widths_and_flips():
    from scipy.io import loadmat

    mat = loadmat(WIKI / "raw_features.mat")
    rows = (WIKI / "trainset_txt_img_cat.list").read_text().split("\n")
    y = np.array([int(r.split("\t")[2]) - 1 for r in rows if r.strip()])[:600]
    img, txt = mat["I_tr"][:600], mat["T_tr"][:600]
    assert img.shape[1] == 128 and txt.shape[1] == 10
    noisy, flipped = flip_labels(y, rate=0.2, seed=0)
    audit = audit_labels(img, txt, noisy, seed=0, **FAST)
    tp = (audit.is_label_issue & flipped).sum()
    assert tp / flipped.sum() > 0.5  # the weak real features still find most flips


def test_progress_reported_and_threads_restored():
    import torch

    img, txt, y = clustered()
    calls: list[tuple[str, int, int]] = []
    before = torch.get_num_threads()
    audit_labels(img, txt, y, seed=0, progress=lambda s, d, t: calls.append((s, d, t)), **TINY)
    assert torch.get_num_threads() == before
    # warm-up + 1 round over 3 folds, then the scoring step
    assert [d for _, d, _ in calls] == list(range(1, 8))
    assert {t for _, _, t in calls} == {7}
    assert calls[0][0] == "label audit: warm-up" and calls[-1][0] == "label audit: scoring"


def test_groups_keep_an_image_in_one_fold():
    # two captions per image share the image vector and the image's (noisy) label; with
    # features wide enough to memorise (as CLIP embeddings are), a head cross-fitted on
    # rows sees the image and its flipped label in training and repeats it. Grouping
    # folds by image recovers the flips (measured: 29/32 grouped vs 9-16/32 not)
    img, txt, y = clustered(n_per_class=20, d_img=32, d_txt=32, seed=1)
    noisy_img, flipped_img = flip_labels(y, rate=0.2, kind="symmetric", seed=5)
    rep = np.repeat(np.arange(len(y)), 2)
    rng = np.random.default_rng(2)
    img_rows = img[rep]  # identical image features within a group
    txt_rows = txt[rep] + rng.normal(0, 0.3, (len(rep), txt.shape[1]))
    flipped = flipped_img[rep]

    def found(groups):
        a = audit_labels(img_rows, txt_rows, noisy_img[rep], groups=groups, seed=0, **FAST)
        tp = (a.is_label_issue & flipped).sum()
        return tp / flipped.sum(), tp / max(a.is_label_issue.sum(), 1)

    (recall, precision), (recall_rows, _) = found(rep), found(None)
    assert recall >= 0.85 and precision >= 0.9, (recall, precision)
    assert recall > recall_rows + 0.3, (recall, recall_rows)


def test_groups_shape_checked():
    img, txt, y = clustered(n_per_class=5)
    with pytest.raises(ConfigError, match=r"groups must have shape \(20,\)"):
        audit_labels(img, txt, y, groups=np.zeros(3), **TINY)


def test_rematch_fix_labels_applies_suggestions(tmp_path):
    # scan with a label column, then `rematch --fix-labels`: flagged rows get the
    # suggested label, the given one is kept beside it, every row is accounted for
    import pandas as pd

    from pmpclean import ScanConfig, rematch

    img, txt, y = clustered()
    noisy, flipped = flip_labels(y, rate=0.15, kind="symmetric", seed=3)
    names = np.array(["cat", "dog", "eel", "fox"], dtype=object)
    n = len(y)
    frame = pd.DataFrame(
        {"image": [f"i{i}.jpg" for i in range(n)], "caption": [f"c{i}" for i in range(n)]}
    )
    frame["animal"] = names[noisy]
    src = tmp_path / "data.csv"
    frame.to_csv(src, index=False)
    # a shared space for the pair audit: the same vector on both sides, padded
    emb = np.hstack([img, txt]).astype(np.float32)
    np.savez(tmp_path / "emb.npz", image=emb, text=emb)
    cfg = ScanConfig().replace(
        data__label_col="animal", embed__embeddings=str(tmp_path / "emb.npz"), labels__epochs=100
    )
    res = rematch(src, out=tmp_path / "clean.csv", fix_labels=True, config=cfg)
    clean = pd.read_csv(tmp_path / "clean.csv")
    dropped = pd.read_csv(tmp_path / "clean.dropped.csv")
    assert sorted(clean["pmpclean_row"].tolist() + dropped["pmpclean_row"].tolist()) == list(
        range(n)
    )
    clean = clean.set_index("pmpclean_row").sort_index()
    fixed = clean["pmpclean_given_label"].notna().to_numpy()
    rows = clean.index.to_numpy()
    n_fixed = fixed.sum() + dropped["pmpclean_given_label"].notna().sum()
    assert n_fixed == res.info["n_labels_fixed"] and fixed.sum() > 0
    # the given label is kept where replaced, and the flips were what got fixed
    assert (clean["pmpclean_given_label"][fixed] == names[noisy][rows][fixed]).all()
    assert flipped[rows][fixed].mean() >= 0.8
    acc_before = (names[noisy][rows] == names[y][rows]).mean()
    assert (clean["animal"].to_numpy() == names[y][rows]).mean() > acc_before
    # the input is untouched
    assert pd.read_csv(src)["animal"].tolist() == names[noisy].tolist()
    with pytest.raises(ConfigError, match="--fix-labels needs a label audit"):
        rematch(
            src,
            out=tmp_path / "clean2.csv",
            fix_labels=True,
            config=cfg.replace(data__label_col=None),
            rescan=True,
        )


def test_relation_ot_option_runs_and_is_validated():
    img, txt, y = clustered(n_per_class=10)
    a = audit_labels(img, txt, y, relation_method="ot", seed=0, **TINY)
    assert a.label_score.shape == (40,) and np.isfinite(a.label_score).all()
    with pytest.raises(ConfigError, match="Unknown relation_method 'wasserstein'"):
        audit_labels(img, txt, y, relation_method="wasserstein", **TINY)
