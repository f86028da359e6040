"""Tests for examples/make_toy_dataset.py (loaded from its file: examples/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pmpclean.data import check_image, read_manifest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "make_toy_dataset.py"


@pytest.fixture(scope="module")
def toy_mod() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_toy_dataset", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_toy_dataset", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(toy_mod: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("toy")
    return toy_mod.make_toy_dataset(
        out, n_images=40, captions_per_image=2, mismatch_rate=0.2, seed=0
    )


def test_output_files_and_shapes(toy: dict) -> None:
    assert toy["n_images"] == 40 and toy["n_rows"] == 80 and toy["n_mismatched"] == 16
    frame = pd.read_csv(toy["captions"], dtype=str, keep_default_na=False)
    assert frame.columns.tolist()[:4] == ["image", "caption", "image_id", "caption_id"]
    assert {"shape", "color", "background", "size"} <= set(frame.columns)
    assert len(frame) == 80 and frame["caption_id"].is_unique
    assert (frame.groupby("image_id").size() == 2).all()

    pngs = sorted(Path(toy["images_dir"]).glob("*.png"))
    assert len(pngs) == 40
    with Image.open(pngs[0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"

    with np.load(toy["embeddings"]) as z:
        assert sorted(z.files) == ["image", "text"]
        for key in ("image", "text"):
            assert z[key].shape == (80, toy["dim"]) and z[key].dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(z[key], axis=1), 1.0, atol=1e-5)
        # rows showing the same image share the image vector
        np.testing.assert_array_equal(z["image"][0], z["image"][1])


def test_manifest_reads_clean(toy: dict) -> None:
    m = read_manifest(toy["captions"], id_col="caption_id", label_col="shape")
    assert m.ok.all() and len(m) == 80 and len(m.unique_images) == 40
    assert check_image(m.unique_images[0]) == "ok"


def test_truth_consistent_with_csv(toy_mod: ModuleType, toy: dict) -> None:
    frame = pd.read_csv(toy["captions"], dtype=str, keep_default_na=False)
    truth = pd.read_csv(toy["truth"])
    assert truth.columns.tolist() == [
        "row",
        "true_row",
        "is_mismatched",
        "true_label",
        "is_label_noisy",
    ]
    assert truth["row"].tolist() == list(range(80))
    assert sorted(truth["true_row"]) == list(range(80))  # a permutation of the captions
    assert (truth["is_mismatched"] == (truth["true_row"] != truth["row"])).all()
    assert int(truth["is_mismatched"].sum()) == toy["n_mismatched"]

    attrs = ["shape", "color", "background", "size"]
    assert (truth["true_label"] == frame["shape"]).all()
    assert (truth["is_label_noisy"] == (frame["label"] != frame["shape"])).all()
    for r, t, bad, _, _ in truth.itertuples(index=False):
        said = toy_mod.parse_caption(frame.loc[r, "caption"])
        assert said, frame.loc[r, "caption"]
        own = frame.loc[r, attrs].to_dict()
        source = frame.loc[t, attrs].to_dict()  # the image the caption was written for
        assert all(source[k] == v for k, v in said.items())
        if bad:
            assert frame.loc[t, "image_id"] != frame.loc[r, "image_id"]
            assert any(own[k] != v for k, v in said.items())  # it really contradicts the image
        else:
            assert all(own[k] == v for k, v in said.items())


def test_deterministic_under_seed(toy_mod: ModuleType, tmp_path: Path) -> None:
    a = toy_mod.make_toy_dataset(tmp_path / "a", n_images=12, seed=3)
    b = toy_mod.make_toy_dataset(tmp_path / "b", n_images=12, seed=3)
    c = toy_mod.make_toy_dataset(tmp_path / "c", n_images=12, seed=4)
    for name in ("captions.csv", "truth.csv", "images/toy_0005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with np.load(a["embeddings"]) as za, np.load(b["embeddings"]) as zb:
        np.testing.assert_array_equal(za["image"], zb["image"])
        np.testing.assert_array_equal(za["text"], zb["text"])
    assert (tmp_path / "a" / "captions.csv").read_bytes() != (
        tmp_path / "c" / "captions.csv"
    ).read_bytes()
    assert c["n_rows"] == 24


def test_embeddings_separate_true_from_mismatched(toy: dict) -> None:
    truth = pd.read_csv(toy["truth"])
    bad = truth["is_mismatched"].to_numpy()
    with np.load(toy["embeddings"]) as z:
        image, text = z["image"], z["text"]
    cos = (image * text).sum(axis=1)
    assert cos[~bad].mean() - cos[bad].mean() > 0.2
    # CLIP-like modality gap: the image and text centroids point apart
    ci, ct = image.mean(0), text.mean(0)
    assert ci @ ct / (np.linalg.norm(ci) * np.linalg.norm(ct)) < 0.5
    # the text side encodes the caption text: a moved caption is closer to the image it was
    # written for than to the image it now sits next to
    rows = np.flatnonzero(bad)
    src = truth["true_row"].to_numpy()[rows]
    assert ((text[rows] * image[src]).sum(1) > cos[rows]).all()


def test_parse_caption_and_encoder(toy_mod: ModuleType) -> None:
    assert toy_mod.parse_caption("a small red round shape over grey") == {
        "size": "small",
        "color": "red",
        "shape": "circle",
        "background": "gray",
    }
    assert toy_mod.parse_caption("a big five-pointed star")["shape"] == "star"
    same = [{"shape": "star", "color": "red"}] * 2
    e = toy_mod.encode(same, modality="text", noise=0.0)
    np.testing.assert_allclose(e[0], e[1])
    with pytest.raises(ValueError, match="Unknown modality 'audio'"):
        toy_mod.encode(same, modality="audio")


def test_no_mismatch_and_bad_arguments(toy_mod: ModuleType, tmp_path: Path) -> None:
    info = toy_mod.make_toy_dataset(tmp_path, n_images=5, mismatch_rate=0.0, seed=0)
    assert info["n_mismatched"] == 0
    assert not pd.read_csv(info["truth"])["is_mismatched"].any()
    with pytest.raises(ValueError, match=r"mismatch_rate must be in \[0, 1\), got 1.5"):
        toy_mod.make_toy_dataset(tmp_path, n_images=5, mismatch_rate=1.5)
    with pytest.raises(ValueError, match=r"n_images must be at least 2"):
        toy_mod.make_toy_dataset(tmp_path, n_images=1)


def test_main_cli(toy_mod: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = toy_mod.main(
        ["--out", str(tmp_path / "t"), "--n-images", "6", "--seed", "1", "--mismatch-rate", "0.5"]
    )
    assert info["n_rows"] == 12 and info["n_mismatched"] == 6
    assert (
        "wrote 12 rows (6 images, 6 mismatched captions, 2 rows with a flipped label)"
        in capsys.readouterr().out
    )


def test_toy_label_noise_found_by_scan(toy_mod: ModuleType, tmp_path: Path) -> None:
    # the toy's `label` column is the shape with 15 % of the images' labels flipped (both
    # rows of the image); the scan's label audit, which keeps an image's rows in one
    # cross-fitting fold, finds them (measured: 30 of 36, 2 false alarms)
    from pmpclean import ScanConfig, scan

    toy = toy_mod.make_toy_dataset(tmp_path / "toy", seed=0)
    truth = pd.read_csv(toy["truth"])
    flipped = truth["is_label_noisy"].to_numpy()
    frame = pd.read_csv(toy["captions"])
    assert toy["n_label_noisy"] == int(flipped.sum()) == 36
    assert (frame["label"] != truth["true_label"]).to_numpy().tolist() == flipped.tolist()
    cfg = ScanConfig().replace(data__label_col="label", embed__embeddings=str(toy["embeddings"]))
    audit = scan(toy["captions"], config=cfg, out_dir=tmp_path / "audit").audit
    issue = audit["is_label_issue"].to_numpy(dtype=bool)
    tp = int((issue & flipped).sum())
    assert tp >= 27 and tp / issue.sum() >= 0.85, (tp, int(issue.sum()))
    fixed = audit["label"].where(~issue, audit["suggested_label"])
    assert (fixed == truth["true_label"]).mean() > (audit["label"] == truth["true_label"]).mean()
