"""Datasets as they come off the web (pmpclean.sources).

Small shards are written here exactly as img2dataset's writers lay them out
(img2dataset/writer.py: ``<key>.jpg``/``.txt``/``.json`` tar members or files, a parquet
per shard listing every input row, ``jpg`` bytes in the parquet output format), so the
readers are covered without ../shared; the real img2dataset output coco-mini-wds is
scanned end to end, and converted by the tests into the ``files`` and ``parquet``
layouts.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pmpclean.data import MemberRef, decode_image, image_fingerprint
from pmpclean.errors import DatasetError, EmbeddingError
from pmpclean.sources import (
    expand_shards,
    load_source_embeddings,
    read_source,
    source_kind,
    source_sha256,
)

COLOURS = {
    "00000000": (255, 0, 0),
    "00000001": (0, 255, 0),
    "00000002": (0, 0, 255),
    "00000003": (255, 255, 0),
}


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _meta(keys: list[str], failed: dict[str, str] | None = None) -> pd.DataFrame:
    failed = failed or {}
    return pd.DataFrame(
        {
            "caption": [f"a {k} photo" for k in keys],
            "url": [f"http://127.0.0.1/{k}.jpg" for k in keys],
            "key": keys,
            "status": [failed.get(k, "success") for k in keys],
            "error_message": [("HTTP Error 404" if k in failed else None) for k in keys],
            "width": [16 if k not in failed else None for k in keys],
            "sha256": [
                hashlib.sha256(_jpeg(COLOURS[k])).hexdigest() if k not in failed else None
                for k in keys
            ],
            "true_row": list(range(len(keys))),
        }
    )


def write_wds_shard(
    folder: Path,
    name: str,
    *,
    listed: list[str],
    members: list[str],
    failed: dict[str, str] | None = None,
    txt: bool = True,
) -> Path:
    """``name.tar`` with members for ``members`` and ``name.parquet`` listing ``listed``."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = _meta(listed, failed)
    tar_path = folder / f"{name}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key in members:
            record = {"key": key, "caption": f"a {key} photo", "status": "success"}
            files = {"jpg": _jpeg(COLOURS[key]), "json": json.dumps(record, indent=4).encode()}
            if txt:
                files["txt"] = f"a {key} photo".encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    meta.to_parquet(folder / f"{name}.parquet", index=False)
    return tar_path


def _mean_colour(ref: object) -> tuple[int, ...]:
    status, image = decode_image(ref)  # type: ignore[arg-type]
    assert status == "ok" and image is not None
    return tuple(int(round(v)) for v in np.asarray(image, dtype=float).mean(axis=(0, 1)))


def _near(a: tuple[int, ...], b: tuple[int, int, int]) -> bool:
    return all(abs(x - y) <= 8 for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- webdataset


def test_webdataset_rows_join_by_key_with_every_status(tmp_path: Path) -> None:
    # parquet order differs from tar order; 00000002 failed; 00000003 listed but absent
    write_wds_shard(
        tmp_path / "out",
        "00000",
        listed=["00000003", "00000002", "00000001", "00000000"],
        members=["00000000", "00000001"],
        failed={"00000002": "failed_to_download"},
    )
    m = read_source(tmp_path / "out")
    assert source_kind(tmp_path / "out") == "webdataset"
    assert m.frame["key"].tolist() == ["00000003", "00000002", "00000001", "00000000"]
    assert m.status.tolist() == ["missing_member", "failed_to_download", "ok", "ok"]
    # img2dataset's own columns pass through; its status is kept under another name
    assert m.frame["img2dataset_status"].tolist()[1] == "failed_to_download"
    assert m.frame["error_message"].tolist()[1] == "HTTP Error 404"
    assert m.frame["shard"].tolist() == ["00000.tar"] * 4
    assert "status" not in m.frame.columns and "true_row" in m.frame.columns
    # each row's image is the member of its key, not of its position
    for row, key in ((2, "00000001"), (3, "00000000")):
        ref = m.image_source(int(m.image_index[row]))
        assert isinstance(ref, MemberRef) and ref.name == f"{key}.jpg"
        assert _near(_mean_colour(ref), COLOURS[key])
    assert m.captions.tolist()[2:] == ["a 00000001 photo", "a 00000000 photo"]


def test_unlisted_member_gets_a_row_and_a_note(tmp_path: Path) -> None:
    write_wds_shard(tmp_path, "00000", listed=["00000000", "00000001"], members=list(COLOURS)[:3])
    m = read_source(tmp_path / "00000.tar")
    assert len(m) == 3
    assert m.frame["key"].tolist() == ["00000000", "00000001", "00000002"]
    assert m.status.tolist() == ["ok", "ok", "unlisted_member"]
    assert m.captions[2] == "a 00000002 photo"  # from its .txt member
    assert any("not listed" in note and "00000002" in note for note in m.notes)


def test_truncated_tar_loses_no_row(tmp_path: Path) -> None:
    keys = list(COLOURS)
    tar = write_wds_shard(tmp_path, "00000", listed=keys, members=keys)
    data = tar.read_bytes()
    with tarfile.open(tar) as tf:
        last_jpg = tf.getmember("00000003.jpg")
    # cut in the middle of the last image's bytes
    tar.write_bytes(data[: last_jpg.offset_data + last_jpg.size // 2])
    m = read_source(tmp_path)
    assert len(m) == 4
    assert m.status.tolist() == ["ok", "ok", "ok", "unreadable_image"]
    assert any("truncated" in note and "00000.tar" in note for note in m.notes)
    # cut inside a header: the members before it are kept, the others are missing
    tar.write_bytes(data[: last_jpg.offset_data - 300])
    m = read_source(tmp_path)
    assert len(m) == 4 and m.status.tolist() == ["ok", "ok", "ok", "missing_member"]


def test_member_without_caption_is_empty_caption(tmp_path: Path) -> None:
    # img2dataset run without --caption_col: no caption column; captions are .txt members
    keys = ["00000000", "00000001"]
    write_wds_shard(tmp_path, "00000", listed=keys, members=keys)
    write_wds_shard(tmp_path / "b", "00001", listed=["00000002"], members=["00000002"], txt=False)
    for folder in (tmp_path, tmp_path / "b"):
        meta = pd.read_parquet(folder / f"{'00000' if folder == tmp_path else '00001'}.parquet")
        meta.drop(columns=["caption"]).to_parquet(next(folder.glob("*.parquet")), index=False)
    m = read_source(f"{tmp_path}/00000.tar::{tmp_path}/b/00001.tar")
    assert m.frame["shard"].tolist() == ["00000.tar", "00000.tar", "b/00001.tar"]
    assert m.status.tolist() == ["ok", "ok", "empty_caption"]
    assert m.frame["caption"].tolist()[:2] == ["a 00000000 photo", "a 00000001 photo"]


def test_bad_shard_parquets_raise_naming_the_shard(tmp_path: Path) -> None:
    write_wds_shard(tmp_path, "00000", listed=["00000000"], members=["00000000"])
    (tmp_path / "00000.parquet").unlink()
    with pytest.raises(DatasetError, match=r"00000\.tar has no 00000\.parquet"):
        read_source(tmp_path)
    _meta(["00000000", "00000000"]).to_parquet(tmp_path / "00000.parquet")
    with pytest.raises(DatasetError, match=r"00000\.parquet lists key\(s\) '00000000' more"):
        read_source(tmp_path)


def test_brace_patterns_expand_in_order(tmp_path: Path) -> None:
    for i in range(3):
        write_wds_shard(tmp_path, f"{i:05d}", listed=["00000000"], members=["00000000"])
    got = expand_shards(f"{tmp_path}/{{00000..00002}}.tar")
    assert [p.name for p in got] == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(read_source(f"{tmp_path}/{{00001..00002}}.tar")) == 2
    with pytest.raises(DatasetError, match=r"shard '.*/00003\.tar' \(from"):
        expand_shards(f"{tmp_path}/{{00002..00009}}.tar")
    # the fingerprint changes when a shard is rewritten
    before = source_sha256(tmp_path)
    write_wds_shard(tmp_path, "00002", listed=["00000001"], members=["00000001"])
    assert source_sha256(tmp_path) != before


def test_member_ref_fingerprint_and_truncation(tmp_path: Path) -> None:
    tar = write_wds_shard(tmp_path, "00000", listed=["00000000"], members=["00000000"])
    m = read_source(tar)
    ref = m.image_source(0)
    assert isinstance(ref, MemberRef)
    assert image_fingerprint(ref).startswith(image_fingerprint(str(tar)) + "#00000000.jpg@")
    short = MemberRef(ref.container, ref.name, offset=ref.offset, size=10**7)
    assert decode_image(short) == ("unreadable_image", None)


# --------------------------------------------------------------------------- other layouts


def to_files_layout(src: Path, dst: Path) -> None:
    """img2dataset ``files`` layout from a ``webdataset`` one: NNNNN/<key>.* + NNNNN.parquet."""
    dst.mkdir(parents=True)
    for tar in sorted(src.glob("*.tar")):
        (dst / tar.stem).mkdir()
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                data = tf.extractfile(member)
                assert data is not None
                (dst / tar.stem / member.name).write_bytes(data.read())
        shutil.copy(tar.with_suffix(".parquet"), dst / f"{tar.stem}.parquet")


def to_parquet_layout(src: Path, dst: Path) -> None:
    """img2dataset ``parquet`` layout: the shard parquet plus a ``jpg`` bytes column."""
    dst.mkdir(parents=True)
    for tar in sorted(src.glob("*.tar")):
        with tarfile.open(tar) as tf:
            images = {
                m.name.split(".")[0]: tf.extractfile(m).read()  # type: ignore[union-attr]
                for m in tf.getmembers()
                if m.name.endswith(".jpg")
            }
        meta = pd.read_parquet(tar.with_suffix(".parquet"))
        meta["jpg"] = [images.get(k) for k in meta["key"]]
        meta.to_parquet(dst / f"{tar.stem}.parquet", index=False, row_group_size=3)


def test_files_and_parquet_layouts_read_like_webdataset(tmp_path: Path) -> None:
    keys = list(COLOURS)
    write_wds_shard(tmp_path / "wds", "00000", listed=keys, members=keys[:3])
    to_files_layout(tmp_path / "wds", tmp_path / "files")
    to_parquet_layout(tmp_path / "wds", tmp_path / "pq")
    assert source_kind(tmp_path / "files") == "files"
    assert source_kind(tmp_path / "pq") == "parquet"
    wds = read_source(tmp_path / "wds")
    for layout in ("files", "pq"):
        m = read_source(tmp_path / layout)
        assert m.status.tolist() == wds.status.tolist() == ["ok"] * 3 + ["missing_member"]
        assert m.captions.tolist() == wds.captions.tolist()
        assert "jpg" not in m.frame.columns  # image bytes never reach the audit
        for row, key in enumerate(keys[:3]):
            assert _near(_mean_colour(m.image_source(int(m.image_index[row]))), COLOURS[key])


def test_hugging_face_parquet_and_imagefolder(tmp_path: Path) -> None:
    keys = list(COLOURS)
    frame = pd.DataFrame(
        {
            "image": [{"bytes": _jpeg(COLOURS[k]), "path": f"{k}.jpg"} for k in keys[:3]]
            + [{"bytes": None, "path": None}],
            "text": [f"a {k} photo" for k in keys],
        }
    )
    frame.to_parquet(tmp_path / "train.parquet", row_group_size=2)
    assert source_kind(tmp_path / "train.parquet") == "hf-parquet"
    m = read_source(tmp_path / "train.parquet", text_col="text")
    assert m.status.tolist() == ["ok", "ok", "ok", "missing_value"]
    assert list(m.frame.columns) == ["text"]
    assert _near(_mean_colour(m.image_source(int(m.image_index[2]))), COLOURS[keys[2]])

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for k in keys[:2]:
        (folder / "sub" / f"{k}.jpg").write_bytes(_jpeg(COLOURS[k]))
    pd.DataFrame(
        {"file_name": ["sub/00000000.jpg", "sub/00000001.jpg"], "caption": ["red", "green"]}
    ).to_json(folder / "metadata.jsonl", orient="records", lines=True)
    assert source_kind(folder) == "imagefolder"
    m = read_source(folder)
    assert m.status.tolist() == ["ok", "ok"]
    assert m.image_refs[1] == str(folder / "sub" / "00000001.jpg")


def test_unknown_folder_names_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DatasetError, match="neither an img2dataset output"):
        read_source(tmp_path)


# --------------------------------------------------------------------------- embeddings


def _manifest(tmp_path: Path):  # noqa: ANN202 - a Manifest
    keys = list(COLOURS)
    write_wds_shard(tmp_path / "d", "00000", listed=keys, members=keys)
    return read_source(tmp_path / "d")


def test_clip_retrieval_embeddings_join_by_key_across_partitions(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    out = tmp_path / "emb"
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True)
    # two partitions, keys in another order than the data, one data key absent, one extra
    parts = [["00000002", "00000000"], ["zzz", "00000001"]]
    vec = {k: np.eye(4)[i] for i, k in enumerate(["00000000", "00000001", "00000002", "zzz"])}
    for i, part in enumerate(parts):
        arr = np.stack([vec[k] for k in part]).astype(np.float16)
        np.save(out / "img_emb" / f"img_emb_{i}.npy", arr)
        np.save(out / "text_emb" / f"text_emb_{i}.npy", arr * 2)
        pd.DataFrame({"image_path": part, "caption": ["c"] * 2}).to_parquet(
            out / "metadata" / f"metadata_{i}.parquet"
        )
    emb = load_source_embeddings(out, m)
    for row, key in enumerate(["00000000", "00000001", "00000002"]):
        assert np.allclose(emb.image[row], vec[key]) and np.allclose(emb.text[row], vec[key])
    assert np.isnan(emb.image[3]).all() and emb.image.dtype == np.float16
    assert any("1 row(s) have no embedding" in n and "00000003" in n for n in emb.notes)
    assert any("match no row" in n and "zzz" in n for n in emb.notes)
    # arrays and metadata of one partition that disagree in length are refused
    np.save(out / "img_emb" / "img_emb_1.npy", np.zeros((3, 4), np.float16))
    with pytest.raises(EmbeddingError, match="rows align only inside one partition"):
        load_source_embeddings(out, m)


def test_datacomp_embeddings_pick_a_pair_and_join_by_uid(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    m.frame["uid"] = [f"{i:032x}" for i in range(4)]
    out = tmp_path / "dc"
    out.mkdir()
    uids = [f"{i:032x}" for i in (3, 1, 0)]
    pd.DataFrame({"uid": uids, "text": ["x"] * 3}).to_parquet(out / "00000000.parquet")
    b32 = np.eye(3, 5, dtype=np.float16)
    l14 = np.eye(3, 7, dtype=np.float16)
    np.savez(out / "00000000.npz", b32_img=b32, b32_txt=b32, l14_img=l14, l14_txt=l14)
    emb = load_source_embeddings(out, m, pair="l14")
    assert emb.image.shape == (4, 7)
    assert np.allclose(emb.image[3], l14[0]) and np.allclose(emb.image[0], l14[2])
    assert np.isnan(emb.image[2]).all()
    assert load_source_embeddings(out, m).image.shape == (4, 5)
    with pytest.raises(EmbeddingError, match="unknown embedding pair"):
        load_source_embeddings(out, m, pair="h14")
    del m.frame["uid"]
    with pytest.raises(EmbeddingError, match="no 'uid' column"):
        load_source_embeddings(out, m)


# --------------------------------------------------------------------------- end to end


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["webdataset", "files", "parquet"])
def test_coco_mini_wds_scanned_end_to_end(layout: str, shared_data: Path, tmp_path: Path) -> None:
    from pmpclean.config import ScanConfig
    from pmpclean.pipeline import rematch, scan

    src = shared_data / "coco-mini-wds"
    if layout == "files":
        to_files_layout(src, tmp_path / "files")
        src = tmp_path / "files"
    elif layout == "parquet":
        to_parquet_layout(src, tmp_path / "pq")
        src = tmp_path / "pq"
    cfg = ScanConfig().replace(
        embed__model="pmpclean-tiny",
        embed__pretrained="none",
        embed__workers=0,
        data__truth_col="true_row",  # rows of urls.csv; -1 on the four broken rows
    )
    res = scan(src, config=cfg, out_dir=tmp_path / "audit")
    audit = res.audit
    # 159 captions shuffled, one of them onto another caption of its own photo
    assert res.summary["evaluation"]["n_true_mismatched"] == 158
    assert len(audit) == 799 and audit["row"].tolist() == list(range(799))
    counts = audit["status"].value_counts().to_dict()
    assert counts == {"ok": 795, "failed_to_download": 2, "failed_to_resize": 2}
    failed = audit[audit["status"] != "ok"]
    assert failed["error_message"].notna().all()
    assert set(failed["img2dataset_status"]) == {"failed_to_download", "failed_to_resize"}
    assert audit["key"].is_unique
    assert set(audit["shard"].str[:5]) == {"00000", "00001", "00002", "00003"}
    assert res.summary["n_images"] == 159  # 5 captions per photo share one image (sha256)
    out = rematch(src, out=tmp_path / "cleaned.parquet", audit_dir=tmp_path / "audit")
    assert len(out.cleaned) + len(out.dropped) == 799
    assert {"key", "shard", "caption", "url"} <= set(out.cleaned.columns)
    assert not out.info["scanned_now"]


def test_rows_of_one_sha256_share_one_image(tmp_path: Path) -> None:
    keys = list(COLOURS)[:3]
    write_wds_shard(tmp_path, "00000", listed=keys, members=keys)
    meta = pd.read_parquet(tmp_path / "00000.parquet")
    meta.loc[1, "sha256"] = meta.loc[0, "sha256"]  # img2dataset: the same photo twice
    meta.to_parquet(tmp_path / "00000.parquet", index=False)
    m = read_source(tmp_path)
    assert m.image_index.tolist() == [0, 0, 1] and len(m.unique_images) == 2


@pytest.mark.shared
def test_coco_mini_wds_truth_is_mapped_by_key(shared_data: Path) -> None:
    from pmpclean.sources import truth_rows

    src = shared_data / "coco-mini-wds"
    urls = pd.read_csv(src / "urls.csv")
    m = read_source(src)
    truth = truth_rows(m, "true_row")
    ok = m.status == "ok"
    given = m.frame["true_row"].to_numpy()
    # the photo of the row the truth points at is the photo of urls.csv's row true_row
    photo = m.frame["image_id"].to_numpy()
    assert (photo[truth[ok]] == urls["image_id"].to_numpy()[given[ok]]).all()
    # the parquets list rows in download order: the input row is not the audit's row
    assert (photo[given[ok]] != urls["image_id"].to_numpy()[given[ok]]).any()


@pytest.mark.shared
@pytest.mark.slow
def test_coco_mini_wds_finetunes_from_the_shards(shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from pmpclean.training import finetune

    src = shared_data / "coco-mini-wds"
    opts = {"model": "pmpclean-tiny", "pretrained": "none", "epochs": 1, "batch_size": 32}
    res = finetune(src, out_dir=tmp_path / "model", truth_col="true_row", **opts)
    data = res.metrics["dataset"]
    assert data["n_rows"] == 799 and data["n_unusable"] == 4
    assert data["n_train_pairs"] + res.metrics["validation"]["n_pairs"] == 795
    assert res.metrics["epochs_run"] == 1 and res.checkpoint.is_file()
