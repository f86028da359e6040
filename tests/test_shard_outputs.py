"""Cleaned outputs that feed the next step (pmpclean.shards_out).

A small img2dataset ``webdataset`` output is written here in img2dataset's layout (see
tests/test_sources.py), with embeddings that make a known set of swapped captions
detectable, so that ``rematch`` keeps, rematches and drops known rows. The shards it
writes are read back with ``webdataset`` and with pmpclean's own reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pmpclean.config import ScanConfig
from pmpclean.errors import ConfigError, DatasetError
from pmpclean.pipeline import rematch, scan
from pmpclean.shards_out import uid_array
from pmpclean.sources import read_source, truth_rows

# 32 rows are too few for the learned cost; the fixed cost finds the swaps
pytestmark = pytest.mark.filterwarnings("ignore:the learned cost")

N_IMAGES = 8
PER_IMAGE = 4
PER_SHARD = 12
SWAPS = [(0, 5), (9, 14), (18, 27)]  # rows whose captions are swapped (different images)
FAILED = 30  # img2dataset could not download this row


def _jpeg(i: int) -> bytes:
    from PIL import Image

    colour = ((i * 53) % 256, (i * 97 + 40) % 256, (i * 151 + 80) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_source(folder: Path, *, uid: bool = False) -> dict[str, Any]:
    """img2dataset webdataset output of 32 rows in 3 shards; returns what it holds."""
    n = N_IMAGES * PER_IMAGE
    image = np.repeat(np.arange(N_IMAGES), PER_IMAGE)
    caption_row = np.arange(n)  # the row whose image each caption describes
    for a, b in SWAPS:
        caption_row[[a, b]] = caption_row[[b, a]]
    captions = [f"photo {image[r]} caption {r}" for r in caption_row]
    # img2dataset's keys: the shard number, then the place in the shard in
    # ceil(log10(number_sample_per_shard)) digits
    width = math.ceil(math.log10(PER_SHARD))
    keys = [f"{r // PER_SHARD:05d}{r % PER_SHARD:0{width}d}" for r in range(n)]
    folder.mkdir(parents=True)
    for s in range(0, n, PER_SHARD):
        rows = range(s, min(s + PER_SHARD, n))
        name = f"{s // PER_SHARD:05d}"
        meta = pd.DataFrame(
            {
                "caption": [captions[r] for r in rows],
                "url": [f"http://127.0.0.1/{image[r]}.jpg" for r in rows],
                "key": [keys[r] for r in rows],
                "status": ["failed_to_download" if r == FAILED else "success" for r in rows],
                "error_message": ["HTTP Error 404" if r == FAILED else None for r in rows],
                "sha256": [
                    None if r == FAILED else hashlib.sha256(_jpeg(image[r])).hexdigest()
                    for r in rows
                ],
                "true_row": [-1 if r == FAILED else int(caption_row[r]) for r in rows],
            }
        )
        if uid:
            meta["uid"] = [f"{(r * 0x9E3779B97F4A7C15) % (1 << 128):032x}" for r in rows]
        meta.to_parquet(folder / f"{name}.parquet", index=False)
        with tarfile.open(folder / f"{name}.tar", "w") as tar:
            for r in rows:
                if r == FAILED:
                    continue
                record = meta[meta["key"] == keys[r]].iloc[0].to_dict()
                members = {
                    "jpg": _jpeg(image[r]),
                    "txt": captions[r].encode(),
                    "json": json.dumps(record, indent=4, default=str).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{keys[r]}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    # embeddings that tell the swapped rows: the caption's vector is its true image's
    rng = np.random.default_rng(0)
    eye = np.eye(N_IMAGES, 16)
    emb_img = eye[image] + 0.01 * rng.normal(size=(n, 16))
    emb_txt = eye[image[caption_row]] + 0.01 * rng.normal(size=(n, 16))
    np.savez(folder.parent / "emb.npz", image=emb_img, text=emb_txt)
    return {"keys": keys, "captions": captions, "image": image, "caption_row": caption_row}


def _config(folder: Path) -> ScanConfig:
    return ScanConfig().replace(embed__embeddings=str(folder.parent / "emb.npz"))


def _tar_members(folder: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                data = tf.extractfile(m)
                assert data is not None
                out[m.name] = data.read()
    return out


def _rematch(src: Path, out: Path, output_format: str, audit: Path) -> Any:
    # the swaps' proposals have confidence 0.8 on these 32 rows
    return rematch(
        src,
        out=out,
        audit_dir=audit,
        output_format=output_format,
        config=_config(src),
        min_confidence=0.5,
    )


# finetune's settings for one short epoch of the tiny random-weight model
ONE_TINY_EPOCH: dict[str, Any] = {
    "model": "pmpclean-tiny",
    "pretrained": "none",
    "epochs": 1,
    "device": "cpu",
    "seed": 0,
}


@pytest.fixture
def cleaned_wds(tmp_path: Path) -> dict[str, Any]:
    src = tmp_path / "data" / "src"
    truth = write_source(src)
    scan(src, config=_config(src), out_dir=tmp_path / "audit")
    out = tmp_path / "clean"
    res = _rematch(src, out, "webdataset", tmp_path / "audit")
    return {"src": src, "out": out, "res": res, "truth": truth, "tmp": tmp_path}


def test_webdataset_output_reads_back_with_webdataset(cleaned_wds: dict[str, Any]) -> None:
    import webdataset as wds

    src, out, res, truth = (cleaned_wds[k] for k in ("src", "out", "res", "truth"))
    cleaned, dropped = res.cleaned, res.dropped
    n = N_IMAGES * PER_IMAGE
    # every input row once: kept in the shards or listed in the dropped file
    assert len(cleaned) + len(dropped) == n
    assert sorted(cleaned["key"].tolist() + dropped["key"].tolist()) == truth["keys"]
    dropped_file = pd.read_parquet(out.with_name("clean.dropped.parquet"))
    assert dropped_file["key"].tolist() == dropped["key"].tolist()
    failed = dropped_file[dropped_file["key"] == truth["keys"][FAILED]]
    assert failed["pmpclean_reason"].tolist() == ["failed_to_download"]
    assert failed["error_message"].tolist() == ["HTTP Error 404"]
    # the swapped rows are rematched (this is what the embeddings make detectable)
    rematched = cleaned[cleaned["pmpclean_action"] == "rematch"]
    assert sorted(rematched["pmpclean_row"]) == sorted(r for pair in SWAPS for r in pair)

    names = sorted(p.name for p in out.iterdir())
    assert names == [
        f"0000{i}{ext}" for i in range(3) for ext in (".parquet", ".tar", "_stats.json")
    ]
    source_members = _tar_members(src)
    samples = list(wds.WebDataset(str(out / "{00000..00002}.tar"), shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(cleaned["key"]) and len(set(keys)) == len(keys)
    by_key = cleaned.set_index("key")
    for sample in samples:
        key = sample["__key__"]
        row = by_key.loc[key]
        original = hashlib.sha256(source_members[f"{key}.jpg"]).hexdigest()
        assert hashlib.sha256(sample["jpg"]).hexdigest() == original  # bytes, not re-encoded
        assert sample["txt"].decode() == row["caption"]
        meta = json.loads(sample["json"])
        assert meta["caption"] == row["caption"] and meta["key"] == key
        assert meta["pmpclean_action"] == row["pmpclean_action"]
        assert meta["url"] == row["url"]  # img2dataset's fields are kept
        if row["pmpclean_action"] == "rematch":
            r = int(row["pmpclean_row"])
            giver = int(meta["pmpclean_caption_from_row"])
            assert meta["pmpclean_original_caption"] == truth["captions"][r]
            assert row["caption"] == truth["captions"][giver] != truth["captions"][r]
            assert meta["pmpclean_caption_from_key"] == truth["keys"][giver]
            # the new caption describes the row's image
            assert truth["image"][truth["caption_row"][giver]] == truth["image"][r]
            assert 0 < meta["pmpclean_rematch_confidence"] <= 1
        else:
            assert sample["txt"] == source_members[f"{key}.txt"]
            assert meta["pmpclean_original_caption"] is None
        assert 0 <= meta["pmpclean_match_score"] <= 1


def test_webdataset_output_reads_back_with_read_source(cleaned_wds: dict[str, Any]) -> None:
    out, res = cleaned_wds["out"], cleaned_wds["res"]
    m = read_source(out)
    assert len(m) == len(res.cleaned) and (m.status == "ok").all()
    got = dict(zip(m.frame["key"], m.captions, strict=True))
    assert got == dict(zip(res.cleaned["key"], res.cleaned["caption"], strict=True))
    # the shard parquet: img2dataset's columns, then the audit's
    meta = pd.read_parquet(out / "00000.parquet")
    src_cols = list(pd.read_parquet(cleaned_wds["src"] / "00000.parquet").columns)
    assert list(meta.columns)[: len(src_cols)] == src_cols
    assert {"pmpclean_action", "pmpclean_match_score", "pmpclean_caption_from_key"} <= set(
        meta.columns
    )
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():  # written as any tool's output: the umask decides (not 0600)
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask
    assert json.loads((out / "00001_stats.json").read_text())["successes"] == len(
        m.frame[m.frame["shard"] == "00001.tar"]
    )


def test_files_layout_output(cleaned_wds: dict[str, Any]) -> None:
    src, tmp, res = cleaned_wds["src"], cleaned_wds["tmp"], cleaned_wds["res"]
    out = tmp / "clean-files"
    files = _rematch(src, out, "files", tmp / "audit")
    assert files.cleaned["key"].tolist() == res.cleaned["key"].tolist()
    assert (out / "00000").is_dir() and (out / "00000.parquet").is_file()
    m = read_source(out)
    assert m.frame["key"].tolist() == res.cleaned["key"].tolist()
    assert m.captions.tolist() == res.cleaned["caption"].tolist()
    key = res.cleaned["key"].iloc[0]
    assert (out / "00000" / f"{key}.jpg").read_bytes() == _tar_members(src)[f"{key}.jpg"]


def test_shard_output_refuses_a_full_folder_and_other_sources(
    cleaned_wds: dict[str, Any], tmp_path: Path
) -> None:
    src, out, tmp = cleaned_wds["src"], cleaned_wds["out"], cleaned_wds["tmp"]
    with pytest.raises(DatasetError, match="is not empty"):
        rematch(src, out=out, audit_dir=tmp / "audit", output_format="webdataset")
    with pytest.raises(ConfigError, match="never overwrites its input"):
        rematch(f"{src}/{{00000..00001}}.tar", out=src, output_format="webdataset", force=True)
    csv = tmp_path / "m.csv"
    pd.DataFrame({"image": ["a.jpg"], "caption": ["x"]}).to_csv(csv, index=False)
    with pytest.raises(ConfigError, match="webdataset or files output"):
        rematch(csv, out=tmp_path / "o", output_format="webdataset")
    with pytest.raises(ConfigError, match="Unknown output format"):
        rematch(src, out=tmp_path / "o", output_format="tfrecord")


def test_uids_as_datacomp_resharder_reads_them(tmp_path: Path) -> None:
    src = tmp_path / "data" / "src"
    write_source(src, uid=True)
    out = tmp_path / "keep.npy"
    res = rematch(
        src, out=out, audit_dir=tmp_path / "audit", config=_config(src), output_format="uids"
    )
    subset = np.load(out, mmap_mode="r")
    assert subset.dtype == np.dtype("u8,u8") and subset.shape == (len(res.cleaned),)
    assert (np.sort(subset) == subset).all()
    assert (tmp_path / "keep.dropped.parquet").is_file()
    # resharder.py: the key of a sample is divmod(int(uid, 16), 2**64), found by searchsorted
    for uid in res.cleaned["uid"]:
        key = np.array([divmod(int(uid, 16), 2**64)], np.dtype("u8,u8"))[0]
        assert np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left") == 1
    for uid in res.dropped["uid"]:
        key = np.array([divmod(int(uid, 16), 2**64)], np.dtype("u8,u8"))[0]
        assert np.searchsorted(subset, key, "right") == np.searchsorted(subset, key, "left")


def test_uids_need_a_uid_column_and_hex_values(tmp_path: Path) -> None:
    src = tmp_path / "data" / "src"
    write_source(src)
    with pytest.raises(DatasetError, match="has no 'uid' column"):
        rematch(src, out=tmp_path / "keep.npy", output_format="uids")
    assert not (tmp_path / "data" / "src.pmpclean").exists()  # refused before scanning
    with pytest.raises(ConfigError, match=r"does not end in \.npy"):
        rematch(src, out=tmp_path / "keep.parquet", output_format="uids")
    with pytest.raises(DatasetError, match="row 1 has uid 'xyz'"):
        uid_array(["00ff", "xyz"])
    got = uid_array(["1" + "0" * 16, "ff", "ff"])
    assert got.tolist() == [(0, 255), (1, 0)]


# --------------------------------------------------------------------------- truth, finetune


def test_truth_of_shards_maps_input_rows_by_key(tmp_path: Path) -> None:
    src = tmp_path / "data" / "src"
    truth = write_source(src)
    # img2dataset lists a shard's rows in the order the downloads finished: not input order
    meta = pd.read_parquet(src / "00001.parquet")
    meta.iloc[::-1].to_parquet(src / "00001.parquet", index=False)
    m = read_source(src)
    rows = m.frame["key"].map({k: i for i, k in enumerate(truth["keys"])}).to_numpy()
    assert rows[PER_SHARD] == 2 * PER_SHARD - 1  # the reversed shard
    got = truth_rows(m, "true_row")
    ok = m.status == "ok"
    # each caption's true row is the row (in the source's order) of its input row
    want = np.array([int(np.flatnonzero(rows == truth["caption_row"][r])[0]) for r in rows])
    assert (got[ok] == want[ok]).all()
    failed = int(np.flatnonzero(~ok)[0])
    assert got[failed] == failed  # -1 on a failed download is accepted
    # a scored row with -1 is not
    m.frame.loc[3, "true_row"] = -1
    with pytest.raises(DatasetError, match="row 3 holds -1"):
        truth_rows(m, "true_row")
    # some shards only: input rows cannot be told from the keys
    part = read_source(f"{src}/{{00001..00002}}.tar")
    with pytest.raises(DatasetError, match="scan every shard of the run"):
        truth_rows(part, "true_row")


def test_finetune_reads_shards(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from pmpclean.training import finetune

    src = tmp_path / "data" / "src"
    write_source(src)
    opts = {**ONE_TINY_EPOCH, "batch_size": 8, "val_fraction": 0.0}
    res = finetune(src, out_dir=tmp_path / "model", truth_col="true_row", **opts)
    data = res.metrics["dataset"]
    assert data["n_rows"] == N_IMAGES * PER_IMAGE and data["n_unusable"] == 1
    assert data["n_train_pairs"] == N_IMAGES * PER_IMAGE - 1
    assert res.checkpoint.is_file()
    # and the audit of the shards: its images are read from the shards again
    scan(src, config=_config(src), out_dir=tmp_path / "audit")
    again = finetune(tmp_path / "audit", out_dir=tmp_path / "model2", **opts)
    assert again.metrics["dataset"]["n_train_pairs"] == N_IMAGES * PER_IMAGE - 1


def test_default_out_dir_of_a_shard_pattern(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pmpclean.pipeline import default_out_dir

    data = tmp_path / "data"
    assert default_out_dir(f"{data}/{{00000..00003}}.tar") == tmp_path / "data.pmpclean"
    assert default_out_dir(f"{data}/a/0.tar::{data}/b/1.tar") == tmp_path / "data.pmpclean"
    assert default_out_dir(f"{data}/*/0000?.tar") == tmp_path / "data.pmpclean"
    monkeypatch.chdir(data.parent)
    assert default_out_dir("data/{00000..00001}.tar").resolve() == tmp_path / "data.pmpclean"
    # a folder, a single shard and a manifest keep their names
    assert default_out_dir(data) == tmp_path / "data.pmpclean"
    assert default_out_dir(data / "00000.tar") == data / "00000.pmpclean"
    # the scan of a pattern writes there
    src = tmp_path / "data" / "src"
    write_source(src)
    res = scan(f"{src}/{{00000..00002}}.tar", config=_config(src))
    assert res.out_dir == tmp_path / "data" / "src.pmpclean"


@pytest.mark.shared
@pytest.mark.slow
def test_coco_mini_wds_cleaned_shards(shared_data: Path, tmp_path: Path) -> None:
    """The real img2dataset output, rematched into shards that webdataset reads."""
    import webdataset as wds

    src = shared_data / "coco-mini-wds"
    m = read_source(src)
    truth = truth_rows(m, "true_row")
    # embeddings that know the truth: a caption's vector is the photo it describes
    photo = pd.factorize(m.frame["image_id"])[0]
    rng = np.random.default_rng(0)
    eye = np.eye(photo.max() + 1)
    emb = tmp_path / "emb.npz"
    noise = 0.01 * rng.normal(size=(2, len(m), eye.shape[1]))
    np.savez(emb, image=eye[photo] + noise[0], text=eye[photo[truth]] + noise[1])
    cfg = ScanConfig().replace(embed__embeddings=str(emb))
    out = tmp_path / "clean"
    res = rematch(
        src, out=out, audit_dir=tmp_path / "audit", config=cfg, output_format="webdataset"
    )
    cleaned, dropped = res.cleaned, res.dropped
    assert len(cleaned) + len(dropped) == 799
    failed = dropped[dropped["pmpclean_reason"].isin(["failed_to_download", "failed_to_resize"])]
    assert len(failed) == 4 and failed["error_message"].notna().all()
    assert (cleaned["pmpclean_action"] == "rematch").sum() > 100
    samples = list(wds.WebDataset(str(out / "{00000..00003}.tar"), shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(cleaned["key"])
    by_key = cleaned.set_index("key")
    photo_of_row = m.frame["image_id"].to_numpy()
    source_members = _tar_members(src)
    for sample in samples:
        row = by_key.loc[sample["__key__"]]
        original = source_members[f"{sample['__key__']}.jpg"]
        assert hashlib.sha256(sample["jpg"]).digest() == hashlib.sha256(original).digest()
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["caption"] == row["caption"]
        if meta["pmpclean_action"] == "rematch":  # the new caption describes this photo
            giver = meta["pmpclean_caption_from_row"]
            assert photo_of_row[truth[giver]] == meta["image_id"]
    back = read_source(out)
    assert len(back) == len(cleaned) and (back.status == "ok").all()


def test_cli_rematch_out_format(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pmpclean.cli import app

    src = tmp_path / "data" / "src"
    write_source(src)
    emb = str(tmp_path / "data" / "emb.npz")
    out = tmp_path / "clean"
    args = ["rematch", str(src), "--out", str(out), "--embeddings", emb, "--quiet"]
    res = CliRunner().invoke(app, [*args, "--out-format", "webdataset"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    uids = ["rematch", str(src), "--out", str(tmp_path / "k.npy"), "--out-format", "uids"]
    res = CliRunner().invoke(app, uids)
    assert res.exit_code == 1 and "has no 'uid' column" in res.output
    assert "Traceback" not in res.output
