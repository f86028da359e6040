"""Tests for pmpclean.training (pmpclean.finetune): training loop, outputs, resume, errors.

Everything runs offline on CPU with the shipped ``pmpclean-tiny`` architecture from
random weights, on 24 small drawings written into ``tmp_path``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pmpclean.errors import ConfigError, DatasetError, PmpcleanError
from pmpclean.training import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    RESUME_NAME,
    FinetuneConfig,
    finetune,
    partial_ot_plan,
    retrieval_recall,
)

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:model .pmpclean-tiny. has RANDOM weights")
F = pytest.importorskip("pmpclean.training")
TD = pytest.importorskip("pmpclean.train.data")
loop = pytest.importorskip("pmpclean.train.loop")
TL = pytest.importorskip("pmpclean.train.loss")
TM = pytest.importorskip("pmpclean.train.model")
TT = pytest.importorskip("pmpclean.train.targets")

TINY = "pmpclean-tiny"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models train faster on one thread than on two contending ones (shared CPUs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dataset(drawn_captions: Path) -> Path:
    """24 drawings, one caption each, 4 swapped (``drawn_captions`` in conftest.py)."""
    return drawn_captions


def _fast(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "model": TINY,
        "pretrained": "none",
        "epochs": 3,
        "batch_size": 8,
        "lr": 2e-3,
        "val_fraction": 0.25,
        "device": "cpu",
        "seed": 0,
    }
    base.update(kw)
    return base


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- training


def test_loss_decreases_and_outputs_are_written(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = finetune(
        dataset, out_dir=out, **_fast(epochs=4, method="contrastive", val_fraction=0.0)
    )
    losses = [h["loss"] for h in result.metrics["history"]]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.05
    for name in (CHECKPOINT_NAME, "open_clip_config.json", "model_config.json", METRICS_NAME):
        assert (out / name).is_file()
    assert not (out / RESUME_NAME).exists()  # removed after a successful run
    on_disk = json.loads((out / METRICS_NAME).read_text())
    assert on_disk["completed"] is True
    assert on_disk["validation"] is None and on_disk["before"] is None


def test_l2rm_flags_suspects_and_reports_recall(dataset: Path, tmp_path: Path) -> None:
    result = finetune(
        dataset,
        out_dir=tmp_path / "m",
        **_fast(epochs=3, split_warmup_epochs=1, truth_col="true_row", ot_mass=0.9),
    )
    m = result.metrics
    hist = m["history"]
    assert hist[0]["split"]["source"].startswith("all pairs")
    assert hist[0]["suspect_pairs"] == 0
    assert m["resolved"]["suspect_targets"] == "batch"  # random init auditing itself
    assert "rematch" not in hist[1]["split"] and hist[1]["rematched_pairs"] == 0
    assert hist[1]["split"]["source"] == "loss mixture"
    assert hist[1]["suspect_pairs"] == hist[1]["split"]["n_suspects"] > 0
    assert 0 <= hist[1]["suspects_with_target"] <= hist[1]["suspect_pairs"]
    assert set(hist[1]["split"]["quality"]) == {"precision", "recall", "accuracy", "auroc"}
    for key in ("before", "after"):
        for side in ("image_to_text", "text_to_image"):
            assert set(m[key][side]) == {"R@1", "R@5", "R@10"}
            assert all(0.0 <= v <= 100.0 for v in m[key][side].values())
    assert m["validation"]["n_images"] == 6  # 25% of 24 images
    assert m["after"]["rsum"] >= m["before"]["rsum"]  # the saved model is the best epoch


def test_adaptive_split_warmup_waits_until_the_model_beats_chance(
    dataset: Path, tmp_path: Path
) -> None:
    opts = _fast(epochs=6, batch_size=6, val_fraction=0.0)
    m = finetune(dataset, out_dir=tmp_path / "a", **opts).metrics
    assert m["resolved"]["split_warmup_epochs"] == "adaptive"
    hist, start = m["history"], m["split_start_epoch"]
    assert start is not None and start >= 2
    below = [h["loss"] <= 0.95 * h["chance_loss"] for h in hist]
    assert below.index(True) == start - 2  # the first epoch 5% below chance opens the split
    assert all(h["split"]["source"].startswith("all pairs") for h in hist[: start - 1])
    assert hist[start - 1]["split"]["source"] == "loss mixture"
    # a model that learns nothing never gets split: it is plain contrastive training
    frozen = finetune(
        dataset, out_dir=tmp_path / "b", **_fast(epochs=3, lr=1e-12, val_fraction=0.0)
    )
    assert frozen.metrics["split_start_epoch"] is None
    assert all(h["suspect_pairs"] == 0 for h in frozen.metrics["history"])


def test_audit_split_is_used_first(dataset: Path, tmp_path: Path, scan_folder_of) -> None:
    """A scan output (image_path + is_mismatched) gives the first split directly."""
    # with precomputed embeddings a scan keeps image_path as given (relative to the
    # manifest); summary.json names the manifest, so the paths still resolve
    scan_dir = scan_folder_of(dataset, tmp_path / "scan")
    result = finetune(scan_dir, out_dir=tmp_path / "m", **_fast(epochs=2, val_fraction=0.0))
    first = result.metrics["history"][0]
    assert first["split"]["source"] == "audit (is_mismatched)"
    assert first["suspect_pairs"] == 4
    assert result.metrics["dataset"]["audit_split"] is True
    assert result.metrics["resolved"]["split_warmup_epochs"] == 0
    assert result.metrics["resolved"]["suspect_targets"] == "global"  # a scan to rematch from


def test_audit_weight_keeps_the_scan_in_refreshed_splits(
    dataset: Path, tmp_path: Path, scan_folder_of
) -> None:
    """A refreshed split averages the scan's verdict with the model's own loss mixture."""
    scan_dir = scan_folder_of(dataset, tmp_path / "scan")
    opts = _fast(epochs=2, val_fraction=0.0, truth_col="true_row")
    kept = finetune(scan_dir, out_dir=tmp_path / "kept", audit_weight=1.0, **opts).metrics
    second = kept["history"][1]["split"]
    assert second["source"] == "loss mixture + audit (weight 1)"
    assert second["n_suspects"] == 4 and second["quality"]["precision"] == 1.0
    own = finetune(scan_dir, out_dir=tmp_path / "own", audit_weight=0.0, **opts).metrics
    assert own["history"][1]["split"]["source"] == "loss mixture"
    # with a match_score the scan can be overruled, but only by a confident model
    assert FinetuneConfig().audit_weight == 0.5


def _with_proposals(scan_dir: Path, confidence: list[float]) -> Path:
    """Give the truth-split scan folder's suspects their true captions as proposals."""
    audit = pd.read_csv(scan_dir / "audit.csv")
    true_row = audit["true_row"].to_numpy()
    owner = {int(t): j for j, t in enumerate(true_row)}  # image row -> row holding its caption
    suspects = np.flatnonzero(audit["is_mismatched"].to_numpy())
    audit["proposed_row"] = -1
    audit["rematch_confidence"] = 0.0
    audit.loc[suspects, "proposed_row"] = [owner[int(r)] for r in suspects]
    audit.loc[suspects, "rematch_confidence"] = confidence
    audit.to_csv(scan_dir / "audit.csv", index=False)
    return scan_dir


def test_global_targets_train_suspects_with_the_scans_confident_proposals(
    dataset: Path, tmp_path: Path, scan_folder_of
) -> None:
    """First split from a scan folder: its proposals (confidence >= the cut) become the
    suspects' pairs; a proposal below the cut is left out; ``batch`` ignores them."""
    scan_dir = _with_proposals(scan_folder_of(dataset, tmp_path / "scan"), [0.9, 0.9, 0.9, 0.3])
    opts = _fast(epochs=1, val_fraction=0.0, truth_col="true_row")
    first = finetune(scan_dir, out_dir=tmp_path / "g", **opts).metrics["history"][0]
    assert first["split"]["rematch"]["source"] == "scan proposals"
    assert first["split"]["rematch"]["n_rematched"] == 3
    assert first["split"]["rematch"]["precision"] == 1.0
    assert first["rematched_pairs"] == 3
    assert first["clean_pairs"] == 20 + 3 and first["suspect_pairs"] == 1
    assert first["suspects_with_target"] == 0  # no in-batch plan targets in global mode
    batch = finetune(scan_dir, out_dir=tmp_path / "b", suspect_targets="batch", **opts)
    first_b = batch.metrics["history"][0]
    assert "rematch" not in first_b["split"] and first_b["rematched_pairs"] == 0


def test_bad_scan_proposals_warn_and_train_with_no_proposal(
    dataset: Path, tmp_path: Path, scan_folder_of
) -> None:
    """Proposals that are not row numbers of the table, or whose confidence is outside
    [0, 1], are named in a warning; those suspects stay in training with no proposal."""
    scan_dir = _with_proposals(scan_folder_of(dataset, tmp_path / "scan"), [0.9] * 4)
    audit = pd.read_csv(scan_dir / "audit.csv")
    suspects = np.flatnonzero(audit["is_mismatched"].to_numpy())
    audit["proposed_row"] = audit["proposed_row"].astype(object)
    audit.loc[suspects[0], "proposed_row"] = "row seven"
    audit.loc[suspects[1], "rematch_confidence"] = 3.5
    audit.loc[suspects[2], "proposed_row"] = len(audit)  # past the end of the table
    audit.to_csv(scan_dir / "audit.csv", index=False)
    opts = _fast(epochs=1, val_fraction=0.0, truth_col="true_row")
    with pytest.warns(
        UserWarning,
        match=rf"3 row\(s\) .*first: row {suspects[0]}: "
        r"proposed_row='row seven'",
    ):
        result = finetune(scan_dir, out_dir=tmp_path / "m", **opts)
    first = result.metrics["history"][0]
    assert first["rematched_pairs"] == 1 and first["split"]["rematch"]["precision"] == 1.0
    assert first["clean_pairs"] + first["suspect_pairs"] == len(audit)


def test_rematched_pairs_train_weighted_by_their_confidence(
    dataset: Path, tmp_path: Path, scan_folder_of, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each accepted proposal's pair enters the loss with its confidence as weight, every
    other training row with weight 1; a proposal below the cut is not trained on."""
    confidence = [0.95, 0.8, 0.7, 0.3]
    scan_dir = _with_proposals(scan_folder_of(dataset, tmp_path / "scan"), confidence)
    seen: list[float] = []
    real = TL._batch_loss

    def recording(*args: object, **kwargs: object) -> object:
        weight = args[7] if len(args) > 7 else kwargs.get("weight")
        clean = args[3]
        assert weight is not None  # the epoch has rematched pairs
        seen.extend(float(w) for w in weight[clean])  # type: ignore[index]
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_batch_loss", recording)
    opts = _fast(epochs=1, val_fraction=0.0, truth_col="true_row", batch_size=24)
    finetune(scan_dir, out_dir=tmp_path / "m", **opts)
    weighted = sorted(w for w in seen if w != 1.0)
    assert weighted == pytest.approx([0.7, 0.8, 0.95])
    assert len(seen) == 20 + 3  # clean rows at weight 1, the three rematched pairs


def test_scan_proposals_become_partners_weighted_by_their_confidence() -> None:
    """First split from a scan folder: a suspect's proposal is its partner, with the scan's
    confidence as weight, when the confidence reaches the cut; clean rows get none."""
    n = 10
    true_row = np.arange(n)
    train = _fake_train(true_row)
    train.audit_partner = np.array([-1, -1, -1, -1, -1, -1, 7, 6, 9, 8])
    train.audit_confidence = np.array([0, 0, 0, 0, 0, 0, 0.65, 0.9, 0.59, 1.0])
    clean = np.arange(n) < 6
    cfg = FinetuneConfig(suspect_targets="global", rematch_min_confidence=0.6)
    partner, weight, info = TT._rematch_partners(clean, None, train, cfg, seed=0)
    assert partner.tolist() == [-1] * 6 + [7, 6, -1, 8]
    np.testing.assert_array_equal(weight, [0] * 6 + [0.65, 0.9, 0, 1.0])
    assert info["source"] == "scan proposals" and info["n_rematched"] == 3
    assert info["mean_confidence"] == pytest.approx((0.65 + 0.9 + 1.0) / 3)


def test_scan_proposals_at_the_table_edges() -> None:
    """A proposal of input row 0 is a partner; one past the last row is none; a
    training set with fewer than two suspects gets no partners at all."""
    n = 6
    train = _fake_train(np.arange(n))
    train.audit_partner = np.array([-1, -1, -1, -1, 0, n])
    train.audit_confidence = np.array([0, 0, 0, 0, 0.9, 0.9])
    clean = np.arange(n) < 4
    cfg = FinetuneConfig(suspect_targets="global")
    partner, weight, _ = TT._rematch_partners(clean, None, train, cfg, seed=0)
    assert partner.tolist() == [-1, -1, -1, -1, 0, -1]
    lone = np.arange(n) != 4  # one suspect: nothing to rematch among
    partner, weight, info = TT._rematch_partners(lone, None, train, cfg, seed=0)
    assert (partner == -1).all() and (weight == 0).all() and info is None


def test_global_partners_are_weighted_by_the_rematch_confidence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dataset-scale proposal's weight is the confidence the rematch gave it; the
    rematch's cost and warnings are reported."""
    import warnings
    from types import SimpleNamespace

    import pmpclean.rematching

    n, n_sus = 120, 20
    sus = np.arange(n - n_sus, n)
    true_row = np.arange(n)
    true_row[sus] = np.roll(sus, 1)  # row i shows the caption of row i-1
    conf_of_suspect = np.linspace(0.62, 0.99, n_sus)

    def fake_rematch(img: np.ndarray, txt: np.ndarray, suspects: np.ndarray, **kw: object):
        m = len(img) - n
        proposed = np.full(len(img), -1)
        proposed[sus] = np.roll(sus, -1)  # the true captions
        proposed[n:] = n + (np.arange(m) + 1) % m  # the planted rows: right
        conf = np.where(proposed >= 0, 0.9, 0.0)
        conf[sus] = conf_of_suspect
        warnings.warn("few key points", UserWarning, stacklevel=1)
        info = {"cost_used": "learned"}
        return SimpleNamespace(proposed_row=proposed, rematch_confidence=conf, info=info)

    monkeypatch.setattr(pmpclean.rematching, "rematch", fake_rematch)
    emb = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    clean = np.ones(n, dtype=bool)
    clean[sus] = False
    enc = TM._Encoded(image=emb, text=emb, logit_scale=10.0)
    partner, weight, info = TT._rematch_partners(
        clean, enc, _fake_train(true_row), FinetuneConfig(suspect_targets="global"), seed=0
    )
    assert info["planted_check"]["passed"]
    assert info["source"] == "partial OT over all suspects" and info["cost_used"] == "learned"
    assert info["warnings"] == ["few key points"]
    assert partner[sus].tolist() == np.roll(sus, -1).tolist()
    np.testing.assert_array_equal(weight[sus], conf_of_suspect)
    assert (weight[: n - n_sus] == 0).all()


def _fake_train(true_row: np.ndarray, image_index: np.ndarray | None = None) -> object:
    """The fields of a training set that ``_rematch_partners`` reads: row i shows image
    ``image_index[i]`` (default: its own) and the caption of row ``true_row[i]``."""
    from types import SimpleNamespace

    n = true_row.size
    image = np.arange(n) if image_index is None else image_index
    return SimpleNamespace(
        image_index=image,
        text_group=np.arange(n),
        rows=np.arange(n),
        n_input=n,
        audit_partner=None,
        audit_confidence=None,
        image_ref=image,
        true_ref=image[true_row],
    )


def test_global_partners_recover_a_known_shuffle() -> None:
    """Dataset-scale rematch of the current embeddings: 10 rotated captions among 60
    pairs are each given back to their own image, and clean rows get no partner."""

    rng = np.random.default_rng(0)
    n, d = 60, 16
    img = rng.normal(size=(n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = img + 0.05 * rng.normal(size=(n, d))
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    sus = np.arange(50, 60)
    true_row = np.arange(n)
    true_row[sus] = np.roll(sus, 1)  # row i shows the caption of row i-1
    txt = txt[true_row]
    train = _fake_train(true_row)
    clean = np.ones(n, dtype=bool)
    clean[sus] = False
    enc = TM._Encoded(image=img.astype(np.float32), text=txt.astype(np.float32), logit_scale=10.0)
    glob = FinetuneConfig(suspect_targets="global")  # as resolved by finetune
    partner, weight, info = TT._rematch_partners(clean, enc, train, glob, seed=0)
    assert (partner[:50] == -1).all() and (weight[:50] == 0).all()
    assert partner[sus].tolist() == np.roll(sus, -1).tolist()  # image i's caption is in row i+1
    assert (weight[sus] >= 0.6).all() and (weight[sus] <= 1).all()
    assert info["n_rematched"] == 10 and info["precision"] == 1.0
    assert info["planted_check"]["passed"] and info["planted_check"]["precision"] == 1.0
    off = TT._rematch_partners(clean, enc, train, FinetuneConfig(suspect_targets="batch"), seed=0)
    assert (off[0] == -1).all() and off[2] is None


@pytest.mark.parametrize("planted_right", [True, False])
def test_global_partners_are_kept_only_when_planted_mismatches_are_recovered(
    monkeypatch: pytest.MonkeyPatch, planted_right: bool
) -> None:
    """Clean pairs deranged among themselves are planted among the suspects: a rematch
    that gets them wrong (an early model on a degenerate plan proposed 245 wrong pairs
    with confidence 0.84 in a benchmark run) has its proposals for the real suspects
    dropped; one that gets them right has its proposals trained on."""
    from types import SimpleNamespace

    import pmpclean.rematching

    n, n_sus = 200, 40
    sus = np.arange(n - n_sus, n)
    true_row = np.arange(n)
    true_row[sus] = np.roll(sus, 1)  # row i shows the caption of row i-1
    seen = {}

    def fake_rematch(
        img: np.ndarray, txt: np.ndarray, suspects: np.ndarray, **kw: object
    ) -> SimpleNamespace:
        total = len(img)
        m = total - n
        proposed = np.full(total, -1)
        proposed[sus] = np.roll(sus, -1)  # the real suspects: their true captions ...
        proposed[sus[0]] = n  # ... but one is offered a planted (clean image's) caption
        shift = 1 if planted_right else 2  # planted image t's caption is in row t + 1
        proposed[n:] = n + (np.arange(m) + shift) % m
        seen.update(m=m, suspects=np.asarray(suspects), clean=np.asarray(kw["clean"]))
        return SimpleNamespace(
            proposed_row=proposed, rematch_confidence=np.where(proposed >= 0, 0.9, 0.0), info={}
        )

    monkeypatch.setattr(pmpclean.rematching, "rematch", fake_rematch)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    train = _fake_train(true_row)
    clean = np.ones(n, dtype=bool)
    clean[sus] = False
    enc = TM._Encoded(image=emb, text=emb, logit_scale=10.0)
    cfg = FinetuneConfig(suspect_targets="global")
    partner, weight, info = TT._rematch_partners(clean, enc, train, cfg, seed=0)
    assert seen["m"] == 40  # a quarter of the 160 clean rows
    assert seen["suspects"][n:].all() and not seen["clean"][n:].any()
    assert seen["clean"][:n].sum() == 160 - 40  # planted rows are not key points
    check = info["planted_check"]
    assert check["n_planted"] == 40 and check["n_proposed"] == 40
    assert check["passed"] is planted_right
    assert check["precision"] == (1.0 if planted_right else 0.0)
    if planted_right:
        assert partner[sus[0]] == -1 and weight[sus[0]] == 0
        assert partner[sus[1:]].tolist() == np.roll(sus, -1)[1:].tolist()
        assert info["precision"] == 1.0 and check["precision_lower_bound"] > 0.9
    else:
        assert (partner == -1).all() and (weight == 0).all() and info["n_rematched"] == 0


def test_planted_check_with_several_captions_per_image() -> None:
    """120 images x 5 captions, 30 % of the rows shuffled among themselves: planted rows
    come only from images with no suspect row (their other captions would also be right
    answers), planted captions never reach a real suspect, and the check passes."""

    rng = np.random.default_rng(0)
    groups, per, d = 120, 5, 32
    n = groups * per
    image_index = np.repeat(np.arange(groups), per)
    centre = rng.normal(size=(groups, d))
    img = centre[image_index]
    cap = centre[image_index] + 0.6 * rng.normal(size=(n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    sus = np.sort(rng.choice(n, size=n * 3 // 10, replace=False))
    true_row = np.arange(n)
    true_row[sus] = np.roll(sus, 1)  # row i shows the caption of the previous suspect
    clean = np.ones(n, dtype=bool)
    clean[sus] = False
    train = _fake_train(true_row, image_index)  # right: any caption of the same image
    enc = TM._Encoded(
        image=img.astype(np.float32), text=cap[true_row].astype(np.float32), logit_scale=10.0
    )
    cfg = FinetuneConfig(suspect_targets="global")
    planted = TT._plant_rows(clean, train, np.random.default_rng(0))
    assert planted.size >= 8 and not np.isin(image_index[planted], image_index[sus]).any()
    assert np.unique(image_index[planted]).size == planted.size
    partner, weight, info = TT._rematch_partners(clean, enc, train, cfg, seed=0)
    check = info["planted_check"]
    assert check["passed"] and check["precision"] == 1.0
    assert (partner < n).all() and info["n_rematched"] >= 100 and info["precision"] >= 0.7


def test_early_stopping_on_validation_recall(dataset: Path, tmp_path: Path) -> None:
    """A learning rate too small to change the ranking: no epoch beats the start."""
    with pytest.warns(UserWarning, match="No epoch improved validation recall"):
        result = finetune(dataset, out_dir=tmp_path / "m", **_fast(epochs=5, patience=2, lr=1e-12))
    m = result.metrics
    assert m["stopped_early"] is True
    assert m["epochs_run"] == 2 and len(m["history"]) == 2
    assert m["best_epoch"] is None
    assert m["after"]["rsum"] == m["before"]["rsum"]


def test_lock_text_trains_the_image_tower_only(dataset: Path, tmp_path: Path) -> None:
    from pmpclean.embedding import load_model

    result = finetune(
        dataset, out_dir=tmp_path / "m", **_fast(epochs=1, val_fraction=0.0, lock_text=True)
    )
    start = load_model(TINY, "none", device="cpu").model.state_dict()
    saved = _state(result.checkpoint)
    text_keys = [k for k in saved if k.startswith(("transformer.", "token_embedding", "ln_final"))]
    text_keys += ["positional_embedding", "text_projection"]
    image_keys = [k for k in saved if k.startswith("visual.")]
    assert text_keys and image_keys
    assert all(torch.equal(start[k], saved[k]) for k in text_keys)
    assert any(not torch.equal(start[k], saved[k]) for k in image_keys)


@pytest.mark.parametrize("cache", [True, False])
def test_unreadable_images_are_skipped_and_streaming_matches_the_cache(
    dataset: Path, tmp_path: Path, cache: bool
) -> None:
    frame = pd.read_csv(dataset)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    frame.loc[len(frame)] = {
        "image": str(broken),
        "caption": "a broken file",
        "true_row": len(frame),
    }
    frame["image"] = [
        p if Path(p).is_absolute() else str(dataset.parent / p) for p in frame["image"]
    ]
    manifest = tmp_path / "with_broken.csv"
    frame.to_csv(manifest, index=False)
    opts = _fast(epochs=1, val_fraction=0.0, method="contrastive", cache_images=cache)
    with pytest.warns(UserWarning, match=r"1 training image\(s\) could not be decoded"):
        result = finetune(manifest, out_dir=tmp_path / "m", **opts)
    assert result.metrics["dataset"]["n_train_pairs"] == 24
    reference = finetune(dataset, out_dir=tmp_path / "ref", **{**opts, "cache_images": True})
    a, b = _state(result.checkpoint), _state(reference.checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("name", ["I;16 png", "EXIF orientation 6 png", "P transparent png"])
def test_training_decodes_images_like_the_scan(
    name: str, image_twins: dict[str, tuple[Path, Path]]
) -> None:
    """Cached and streamed training images go through the one decoder (data.open_image)."""
    path, twin = (str(p) for p in image_twins[name])

    def pixels(im: object) -> torch.Tensor:
        return torch.as_tensor(np.asarray(im).astype(np.int16))

    cached = TD._Images(None, pixels, cache=True, workers=0)  # type: ignore[arg-type]
    streamed = TD._ImageRows([path, twin], np.array([0, 1]), pixels)
    for a, b in ((cached._decode(path), cached._decode(twin)), (streamed[0], streamed[1])):
        assert a is not None and b is not None
        assert a.shape == b.shape and int((a - b).abs().max()) <= 1


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trips_through_open_clip(dataset: Path, tmp_path: Path) -> None:
    import open_clip

    from pmpclean.embedding import load_model

    out = tmp_path / "model"
    result = finetune(dataset, out_dir=out, **_fast(epochs=1, val_fraction=0.0))
    saved = _state(result.checkpoint)

    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY, pretrained=str(result.checkpoint)
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    as_dir, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    for key, value in as_dir.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert json.loads((out / "model_config.json").read_text()) == open_clip.get_model_config(TINY)

    loaded = load_model(TINY, str(result.checkpoint), device="cpu")  # what `scan --pretrained` does
    tokens = loaded.tokenizer(["a red circle on white"])
    with torch.no_grad():
        a = loaded.model.encode_text(tokens)
        b = model.eval().encode_text(tokens)
    assert torch.allclose(a, b)
    # the saved weights differ from the random start
    start = load_model(TINY, "none", device="cpu").model.state_dict()
    assert any(not torch.equal(start[k], saved[k]) for k in saved)


@pytest.mark.filterwarnings("ignore:No epoch improved validation recall")
def _interrupt_at_step(step: int, data: Path, out: Path, opts: dict[str, object]) -> None:
    """Run finetune into ``out`` and stop it (an exception) as training reaches ``step``."""

    class Interrupt(Exception):
        pass

    def stop(stage: str, done: int, total: int) -> None:
        if stage.startswith("training") and done == step:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(data, out_dir=out, progress=stop, **opts)


def test_resume_continues_from_the_saved_step(dataset: Path, tmp_path: Path) -> None:
    opts = _fast(epochs=3, batch_size=6, checkpoint_every=2, split_warmup_epochs=1)
    full = finetune(dataset, out_dir=tmp_path / "full", **opts)

    out = tmp_path / "cut"
    _interrupt_at_step(5, dataset, out, opts)
    assert (out / RESUME_NAME).is_file()
    assert not (out / METRICS_NAME).exists()
    with pytest.raises(ConfigError, match="already holds a fine-tuning run"):
        finetune(dataset, out_dir=out, **opts)

    steps: list[int] = []

    def record(stage: str, done: int, total: int) -> None:
        if stage.startswith("training"):
            steps.append(done)

    resumed = finetune(dataset, out_dir=out, progress=record, resume=True, **opts)
    assert steps[0] == 5  # step 4 was saved; the resumed run does step 5 next
    assert steps[-1] == full.metrics["resolved"]["total_steps"]
    a, b = _state(full.checkpoint), _state(resumed.checkpoint)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    la = [h["loss"] for h in full.metrics["history"]]
    lb = [h["loss"] for h in resumed.metrics["history"]]
    assert np.allclose(la, lb, atol=1e-5)
    assert resumed.metrics["before"] == full.metrics["before"]
    with pytest.raises(ConfigError, match="already finished"):
        finetune(dataset, out_dir=out, resume=True, **opts)


def test_resume_keeps_the_rematched_pairs(dataset: Path, tmp_path: Path, scan_folder_of) -> None:
    """An interruption in an epoch whose suspects train with rematched captions."""
    scan_dir = _with_proposals(scan_folder_of(dataset, tmp_path / "scan"), [0.9] * 4)
    opts = _fast(epochs=2, batch_size=6, val_fraction=0.0, checkpoint_every=1)
    full = finetune(scan_dir, out_dir=tmp_path / "full", **opts)
    assert full.metrics["history"][0]["rematched_pairs"] == 4

    out = tmp_path / "cut"
    _interrupt_at_step(3, scan_dir, out, opts)
    resumed = finetune(scan_dir, out_dir=out, resume=True, **opts)
    assert resumed.metrics["history"][0]["rematched_pairs"] == 4
    a, b = _state(full.checkpoint), _state(resumed.checkpoint)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_resume_refuses_changed_settings(dataset: Path, tmp_path: Path) -> None:
    opts = _fast(epochs=2, val_fraction=0.0)
    out = tmp_path / "m"
    finetune(dataset, out_dir=out, keep_resume=True, **opts)
    # keep_resume keeps the last state; it records the settings of that run
    assert (out / RESUME_NAME).is_file()
    (out / METRICS_NAME).unlink()
    with pytest.raises(ConfigError, match=r"settings differ .*lr: 0\.002 -> 0\.01"):
        finetune(dataset, out_dir=out, resume=True, **{**opts, "lr": 1e-2})


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"method": "coteach"}, "Unknown method 'coteach': expected one of l2rm, contrastive"),
        ({"schedule": "step"}, "Unknown schedule 'step'"),
        ({"precision": "fp8"}, "Unknown precision 'fp8'"),
        ({"batch_size": 1}, "batch_size must be an integer >= 2"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"accum_steps": 0}, "accum_steps must be an integer >= 1"),
        ({"lock_image": True, "lock_text": True}, "lock_image and lock_text are both set"),
        ({"val_fraction": 0.9}, r"val_fraction must be in \[0, 0.5\]"),
        ({"val_fraction": 0.0, "patience": 2}, "patience .* needs a validation split"),
        ({"ot_mass": 0.0}, r"ot_mass must be in \(0, 1\]"),
        ({"ot_mass": 1.5}, r"ot_mass must be in \(0, 1\] .*got 1\.5"),
        ({"audit_weight": 1.5}, r"audit_weight must be in \[0, 1\]"),
        ({"target_quantile": 2.0}, r"target_quantile must be in \[0, 1\] or None"),
        ({"split_warmup_epochs": -1}, "split_warmup_epochs must be an integer >= 0"),
        ({"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1"),
        ({"split_threshold": 1.0}, r"split_threshold must be in \(0, 1\)"),
        ({"resume": True, "overwrite": True}, "resume and overwrite are both set"),
        ({"precision": "amp"}, "needs a CUDA device"),
        ({"device": "tpu"}, "Unknown device 'tpu'"),
        ({"warmup": 10}, "Unknown finetune setting.* warmup; known settings: .*warmup_steps"),
    ],
)
def test_bad_options_fail_clearly(
    dataset: Path, tmp_path: Path, options: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        finetune(dataset, out_dir=tmp_path / "m", **{**_fast(), **options})
    assert not (tmp_path / "m").exists()  # nothing written before the checks pass


def test_bad_inputs_fail_clearly(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        finetune(tmp_path / "nope.csv", out_dir=tmp_path / "m", **_fast())
    with pytest.raises(DatasetError, match="folder without audit.parquet or audit.csv"):
        finetune(tmp_path, out_dir=tmp_path / "m", **_fast())
    with pytest.raises(DatasetError, match="truth column 'truth' not found"):
        finetune(dataset, out_dir=tmp_path / "m", **_fast(truth_col="truth"))
    with pytest.raises(PmpcleanError, match="unknown model 'ViT-Q-99'"):
        finetune(dataset, out_dir=tmp_path / "m", **_fast(model="ViT-Q-99"))
    with pytest.raises(TypeError, match="config must be a FinetuneConfig"):
        finetune(dataset, out_dir=tmp_path / "m", config={"epochs": 1})  # type: ignore[arg-type]


def _sample(dataset: Path, folder: Path, n_images: int, n_rows: int) -> Path:
    """A user's first try: ``n_rows`` rows over the first ``n_images`` drawings."""
    frame = pd.read_csv(dataset).head(n_images)
    frame["image"] = [str(dataset.parent / p) for p in frame["image"]]
    rows = [
        {"image": r.image, "caption": f"{r.caption}, take {k}"}
        for k in range(math.ceil(n_rows / n_images))
        for r in frame.itertuples()
    ]
    folder.mkdir()
    pd.DataFrame(rows[:n_rows]).to_csv(folder / "sample.csv", index=False)
    return folder / "sample.csv"


@pytest.mark.filterwarnings("ignore:No epoch improved validation recall")
def test_small_sample_holds_out_two_images(dataset: Path, tmp_path: Path) -> None:
    """63 rows of 13 images: 10 % of 13 is 1 image; 2 are held out, 11 train."""
    sample = _sample(dataset, tmp_path / "s", 13, 63)
    opts = _fast(epochs=1, val_fraction=0.1)
    result = finetune(sample, out_dir=tmp_path / "m", **opts)
    val = result.metrics["validation"]
    assert val["n_images"] == 2 and result.metrics["dataset"]["n_train_images"] == 11
    assert val["n_pairs"] + result.metrics["dataset"]["n_train_pairs"] == 63
    assert "held out 2 of 13 images (val_fraction 0.1 gives 1" in val["source"]
    assert result.metrics["validation_skipped"] is None
    assert result.metrics["before"] is not None


@pytest.mark.filterwarnings("ignore:No epoch improved validation recall")
def test_too_small_sample_trains_without_validation_and_says_so(
    dataset: Path, tmp_path: Path
) -> None:
    """9 images: holding out 2 would leave 7 (< 8) to train on, so none are held out."""
    sample = _sample(dataset, tmp_path / "s", 9, 30)
    opts = _fast(epochs=1, val_fraction=0.1)
    with pytest.warns(UserWarning, match="training on all 9 images without validation"):
        result = finetune(sample, out_dir=tmp_path / "m", **opts)
    on_disk = json.loads((tmp_path / "m" / METRICS_NAME).read_text())
    assert on_disk["validation"] is None and on_disk["before"] is None
    assert "holds out 1 of 9 images" in on_disk["validation_skipped"]
    assert result.metrics["dataset"]["n_train_pairs"] == 30
    with pytest.raises(ConfigError, match="patience=2 .* has only 9 images"):
        finetune(sample, out_dir=tmp_path / "p", **{**opts, "patience": 2})
    # ten images leave 8 to train on: validation again
    ten = finetune(_sample(dataset, tmp_path / "t", 10, 10), out_dir=tmp_path / "n", **opts)
    assert ten.metrics["validation"]["n_images"] == 2


def test_config_replace_rejects_unknown_names() -> None:
    cfg = FinetuneConfig().replace(epochs=3)
    assert cfg.epochs == 3
    with pytest.raises(ConfigError, match="Unknown finetune setting.* epoch;"):
        cfg.replace(epoch=3)


# --------------------------------------------------------------------------- pieces


def test_partial_ot_plan_invariants() -> None:
    gen = torch.Generator().manual_seed(0)
    n, m = 7, 5
    cost = torch.rand(n, m, generator=gen) * 2
    forbid = torch.zeros(n, m, dtype=torch.bool)
    forbid[0] = True  # a row with nothing allowed
    forbid[1, 2] = True
    for mass in (0.3, 0.7, 1.0):
        plan = partial_ot_plan(cost, mass=mass, reg=0.05, forbid=forbid)
        assert plan.shape == (n, m) and plan.dtype == torch.float32
        assert bool((plan >= 0).all())
        assert float(plan[0].sum()) == 0.0 and float(plan[1, 2]) == 0.0
        assert bool((plan.sum(1) <= 1 / n + 1e-5).all())
        assert bool((plan.sum(0) <= 1 / m + 1e-5).all())
        expected = mass * min((n - 1) / n, 1.0)
        assert math.isclose(float(plan.sum()), expected, rel_tol=1e-3, abs_tol=1e-4)


def test_partial_ot_plan_recovers_a_known_matching() -> None:
    perm = torch.tensor([3, 0, 4, 1, 2])
    cost = torch.ones(5, 5)
    cost[torch.arange(5), perm] = 0.0
    cost[4, perm[4]] = 1.0  # row 4 has no good partner: it should be left out
    plan = partial_ot_plan(cost, mass=0.8, reg=0.02)
    assert torch.equal(plan[:4].argmax(1), perm[:4])
    assert float(plan[4].sum()) < 0.01 * (1 / 5)
    with pytest.raises(ValueError, match="mass must be in"):
        partial_ot_plan(cost, mass=1.5, reg=0.1)


def test_retrieval_recall_known_answers() -> None:
    base = np.eye(8)[:5]  # 5 orthonormal images: a caption matches its own image only
    groups = np.array([0, 0, 1, 2, 3, 4])  # image 0 has two captions
    img = base[groups]
    perfect = retrieval_recall(img, img, groups)
    assert perfect["image_to_text"]["R@1"] == 100.0 and perfect["text_to_image"]["R@1"] == 100.0
    assert perfect["n_images"] == 5 and perfect["n_captions"] == 6
    assert perfect["rsum"] == 600.0
    # swap the captions of images 3 and 4 (rows 4 and 5). Image 3's own caption now has
    # similarity 0, tied with the captions of images 0-2 (ties count against the query)
    # and beaten by row 5: rank 5, so a hit at R@10 only. Caption row 4 ranks its image
    # behind image 4 and tied with images 0-2: rank 4, a hit at R@5.
    txt = img.copy()
    txt[[4, 5]] = txt[[5, 4]]
    r = retrieval_recall(img, txt, groups)
    assert r["image_to_text"] == pytest.approx({"R@1": 60.0, "R@5": 60.0, "R@10": 100.0})
    assert r["text_to_image"] == pytest.approx({"R@1": 100 * 4 / 6, "R@5": 100.0, "R@10": 100.0})
    with pytest.raises(ValueError, match="row-aligned"):
        retrieval_recall(img, txt[:3], groups)


def test_loss_mixture_finds_injected_mismatches() -> None:
    rng = np.random.default_rng(1)
    n, d = 200, 32
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x + 0.1 * rng.standard_normal((n, d))
    bad = rng.choice(n, 40, replace=False)
    y[bad] = y[np.roll(bad, 1)]  # 40 swapped captions
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    enc = TM._Encoded(image=x.astype(np.float32), text=y.astype(np.float32), logit_scale=20.0)
    loss = TT._per_pair_loss(enc, np.arange(n), np.arange(n), seed=0)
    prob, info = TT._gmm_clean_probability(loss, seed=0)
    flagged = np.flatnonzero(prob < 0.5)
    assert set(flagged) == set(bad)
    assert info["means"][info["clean_component"]] == min(info["means"])


def test_batch_loss_clean_rows_are_symmetric_infonce_and_empty_plans_add_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    b, d = 6, 8
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    scale = torch.tensor(10.0)
    groups = torch.arange(b)
    cfg = FinetuneConfig(suspect_targets="batch")  # the in-batch soft targets of L2RM
    loss, stats = TL._batch_loss(
        img, txt, scale, torch.ones(b, dtype=torch.bool), groups, groups, cfg
    )
    logits = scale * img @ txt.T
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * (ce(logits, torch.arange(b)) + ce(logits.T, torch.arange(b)))
    assert torch.allclose(loss, expected)
    assert stats["noisy_rows"] == 0

    # two suspects showing the same image: every transport is forbidden -> no target, no loss
    clean = torch.tensor([True, True, True, True, False, False])
    same_img = torch.tensor([0, 1, 2, 3, 4, 4])
    loss2, stats2 = TL._batch_loss(img, txt, scale, clean, same_img, groups, cfg)
    assert stats2["noisy_rows"] == 2 and stats2["noisy_targets"] == 0 and stats2["noisy_loss"] == 0
    # with distinct images the suspects do get soft targets (without the similarity check)
    loose = cfg.replace(ot_mass=1.0, target_quantile=None)
    loss3, stats3 = TL._batch_loss(img, txt, scale, clean, groups, groups, loose)
    assert stats3["noisy_targets"] == 2 and stats3["noisy_loss"] > 0
    assert float(loss3) > float(loss2)
    # suspect_targets="global": suspects get no in-batch target (rematches arrive as clean rows)
    glob = loose.replace(suspect_targets="global")
    loss4, stats4 = TL._batch_loss(img, txt, scale, clean, groups, groups, glob)
    assert stats4["noisy_rows"] == 2 and stats4["noisy_targets"] == 0 and stats4["noisy_loss"] == 0
    assert torch.allclose(loss4, loss2)
    # a clean row's weight scales its loss: weight 0 removes it from the sum
    w = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    loss5, _ = TL._batch_loss(img, txt, scale, clean, groups, groups, glob, w)
    loss6, _ = TL._batch_loss(img, txt, scale, clean & (w > 0), groups, groups, glob)
    assert torch.allclose(loss5, loss6) and float(loss5) < float(loss4)


def test_suspects_get_targets_only_when_the_target_looks_like_a_true_pair() -> None:
    """Known answer: two swapped captions whose true images are in the batch are rematched;
    two suspects whose only candidates are unrelated get no target at all."""
    d = 8
    eye = torch.eye(d)
    img = eye[:6].clone()
    txt = eye[:6].clone()
    txt[[4, 5]] = txt[[5, 4]]  # rows 4 and 5 swapped: each true partner is in the batch
    groups = torch.arange(6)
    clean = torch.tensor([True, True, True, True, False, False])
    scale = torch.tensor(10.0)
    cfg = FinetuneConfig(ot_mass=1.0, suspect_targets="batch")
    assert cfg.target_quantile == 0.25
    _, found = TL._batch_loss(img, txt, scale, clean, groups, groups, cfg)
    assert found["noisy_targets"] == 2  # similarity 1.0: as good as the clean pairs
    # unrelated suspects: their captions point nowhere near either suspect image
    txt2 = eye[:6].clone()
    txt2[4], txt2[5] = eye[6], eye[7]
    _, none = TL._batch_loss(img, txt2, scale, clean, groups, groups, cfg)
    assert none["noisy_rows"] == 2 and none["noisy_targets"] == 0 and none["noisy_loss"] == 0
    _, forced = TL._batch_loss(
        img, txt2, scale, clean, groups, groups, cfg.replace(target_quantile=None)
    )
    assert forced["noisy_targets"] == 2  # without the check the plan forces a wrong target


@pytest.mark.filterwarnings("ignore:No epoch improved validation recall")
def test_demo_model_script_runs_end_to_end_on_a_small_setting(tmp_path: Path) -> None:
    import importlib.util

    import open_clip

    from pmpclean.embedding import register_model_configs

    path = Path(__file__).resolve().parents[1] / "examples" / "train_demo_model.py"
    spec = importlib.util.spec_from_file_location("train_demo_model", path)
    demo = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(demo)  # type: ignore[union-attr]
    out = tmp_path / "demo_model"
    argv = ["--out", str(out), "--data", str(tmp_path / "train"), "--n-images", "30"]
    metrics = demo.main([*argv, "--epochs", "1", "--no-check"])
    assert metrics["completed"] is True and metrics["validation"]["n_images"] == 3
    register_model_configs()
    model, _, _ = open_clip.create_model_and_transforms(
        "pmpclean-small", pretrained=str(out / CHECKPOINT_NAME)
    )
    assert model.visual.image_size == (32, 32)


def test_demo_truth_manifest_matches_truth_csv(tmp_path: Path) -> None:
    """The quickstart manifest for --truth-col: captions.csv plus truth.csv's true_row."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "train_demo_model.py"
    spec = importlib.util.spec_from_file_location("train_demo_model", path)
    demo = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(demo)  # type: ignore[union-attr]
    toy = tmp_path / "toy"
    demo._toy().make_toy_dataset(toy, n_images=10, captions_per_image=2, mismatch_rate=0.2)
    out = demo.write_truth_manifest(toy)
    assert out == toy / "captions_with_truth.csv"
    frame, base = pd.read_csv(out), pd.read_csv(toy / "captions.csv")
    truth = pd.read_csv(toy / "truth.csv")
    assert frame.drop(columns="true_row").equals(base)
    assert frame["true_row"].tolist() == truth["true_row"].tolist()
    assert int((frame["true_row"] != np.arange(len(frame))).sum()) == 4


# --------------------------------------------------------------------------- CLI and API


def test_public_api_exports_finetune() -> None:
    import pmpclean

    assert pmpclean.finetune is finetune and pmpclean.FinetuneConfig is FinetuneConfig
    assert {"finetune", "FinetuneConfig", "FinetuneResult"} <= set(pmpclean.__all__)


def test_cli_finetune_passes_every_option_to_the_library(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from pmpclean.cli import app

    seen: dict[str, object] = {}

    def fake(data: object, *, out_dir: object, config: FinetuneConfig, progress: object) -> object:
        seen.update(data=data, out_dir=out_dir, config=config)
        return F.FinetuneResult(
            out_dir=Path(str(out_dir)),
            checkpoint=Path(str(out_dir)) / CHECKPOINT_NAME,
            metrics={"before": {"rsum": 10.0}, "after": {"rsum": 20.0}},
        )

    monkeypatch.setattr(F, "finetune", fake)
    argv = ["finetune", str(dataset), "--out", str(tmp_path / "m"), "--model", TINY]
    argv += ["--split-warmup-epochs", "2", "--checkpoint-every", "7", "--ot-mass", "1"]
    argv += ["--schedule", "linear", "--precision", "fp32", "--audit-weight", "1"]
    argv += ["--robust-q", "0.5", "--suspect-targets", "batch"]
    argv += ["--rematch-min-confidence", "0.8", "--format", "json"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    cfg = seen["config"]
    assert isinstance(cfg, FinetuneConfig)
    assert (cfg.split_warmup_epochs, cfg.checkpoint_every, cfg.ot_mass) == (2, 7, 1.0)
    assert (cfg.schedule, cfg.precision, cfg.model) == ("linear", "fp32", TINY)
    assert cfg.audit_weight == 1.0 and cfg.robust_q == 0.5
    assert (cfg.suspect_targets, cfg.rematch_min_confidence) == ("batch", 0.8)
    assert json.loads(res.stdout)["recall_after"] == {"rsum": 20.0}
    # defaults: adaptive split start, checkpoints at epoch ends only
    CliRunner().invoke(app, argv[:6])
    cfg = seen["config"]
    assert isinstance(cfg, FinetuneConfig)
    assert (cfg.split_warmup_epochs, cfg.checkpoint_every, cfg.ot_mass) == (None, None, 0.5)
    assert cfg.robust_q is None  # resolved by the library (0.3 only for a self-audit)
    assert (cfg.suspect_targets, cfg.rematch_min_confidence) == (None, 0.6)  # resolved later


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--ot-mass", "0"], r"Invalid value for '--ot-mass': 0 is outside \(0, 1\]"),
        (["--ot-mass", "1.5"], r"1\.5 is outside \(0, 1\]"),
        (["--ot-mass", "-0.2"], r"-0\.2 is outside \(0, 1\]"),
        (["--split-warmup-epochs", "-1"], "--split-warmup-epochs"),
        (["--checkpoint-every", "0"], "--checkpoint-every"),
        (["--schedule", "step"], "--schedule"),
        (["--audit-weight", "2"], "--audit-weight"),
        (["--robust-q", "1.5"], "--robust-q"),
        (["--robust-q", "-0.1"], "--robust-q"),
        (["--suspect-targets", "nearest"], "--suspect-targets"),
        (["--rematch-min-confidence", "1.2"], "--rematch-min-confidence"),
    ],
)
def test_cli_finetune_rejects_bad_options_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], match: str
) -> None:
    import re

    from typer.testing import CliRunner

    from pmpclean.cli import app

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the library must not be called with a bad option")

    monkeypatch.setattr(F, "finetune", never)
    res = CliRunner().invoke(
        app, ["finetune", "x.csv", "--out", str(tmp_path / "m"), *argv], env={"COLUMNS": "300"}
    )
    assert res.exit_code == 2
    text = re.sub(r"[\s│╭╮╰╯─]+", " ", res.output)
    assert re.search(match, text), text


def test_identical_captions_group_as_in_the_scan_ignoring_case_and_spaces(
    dataset: Path, tmp_path: Path
) -> None:
    """Fine-tuning groups caption texts as the scan does (pmpclean.data.text_groups):
    texts equal after trimming and case folding share a group, so neither is used as a
    negative of the other."""
    frame = pd.read_csv(dataset)
    frame.loc[1, "caption"] = "  " + frame.loc[0, "caption"].upper()
    frame.loc[2, "caption"] = frame.loc[0, "caption"].lower() + " "
    path = tmp_path / "captions.csv"
    frame["image"] = [str(dataset.parent / p) for p in frame["image"]]
    frame.to_csv(path, index=False)
    data = TD._read_dataset(path, FinetuneConfig())
    assert data.text_group[0] == data.text_group[1] == data.text_group[2]
    assert len(set(data.text_group.tolist())) == len(frame) - 2
