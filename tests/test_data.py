"""Tests for pmpclean.data: reading and validating manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from pmpclean.data import (
    IMAGE_BACKGROUND,
    STATUS_HELP,
    STATUSES,
    SUPPORTED_SUFFIXES,
    Manifest,
    check_image,
    decode_image,
    image_fingerprint,
    open_image,
    read_manifest,
    read_table,
    remote_image_hint,
    text_groups,
    to_rgb,
    write_table,
)
from pmpclean.errors import DatasetError

# --------------------------------------------------------------------------- fixtures


def _png(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Three 8x8 PNGs under tmp_path/images."""
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    return [_png(tmp_path / "images" / f"img{i}.png", c) for i, c in enumerate(colors)]


def _frame() -> pd.DataFrame:
    # ids with leading zeros and "NA" must round-trip as written
    return pd.DataFrame(
        {
            "image": ["images/img0.png", "images/img1.png", "images/img2.png", "images/img0.png"],
            "caption": ["a red square", "a green square", "a blue square", "red again"],
            "id": ["007", "NA", "010", "011"],
            "label": ["red", "green", "blue", "red"],
        }
    )


# --------------------------------------------------------------------------- read_table


@pytest.mark.parametrize(
    "suffix", [".csv", ".tsv", ".parquet", ".pq", ".jsonl", ".ndjson", ".json"]
)
def test_each_reader_round_trips(tmp_path: Path, images: list[Path], suffix: str) -> None:
    frame = _frame()
    path = write_table(frame, tmp_path / f"manifest{suffix}")
    back = read_table(path)
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    assert back["id"].tolist() == ["007", "NA", "010", "011"]
    assert isinstance(back.index, pd.RangeIndex)

    m = read_manifest(path, id_col="id", label_col="label")
    assert m.status.tolist() == ["ok"] * 4
    assert m.path == path.absolute()
    assert m.image_refs[0] == str(images[0])
    assert m.unique_images == [str(p) for p in images]
    assert m.image_index.tolist() == [0, 1, 2, 0]
    assert m.captions.tolist() == frame["caption"].tolist()


def test_csv_values_are_strings_unchanged(tmp_path: Path, images: list[Path]) -> None:
    path = tmp_path / "m.csv"
    path.write_text(
        "image,caption,code,empty,nan_word\n"
        'images/img0.png,"a, quoted caption",007,,NaN\n'
        "images/img1.png,second,1e3,,null\n",
        encoding="utf-8",
    )
    frame = read_table(path)
    assert frame["code"].tolist() == ["007", "1e3"]
    assert frame["empty"].tolist() == ["", ""]
    assert frame["nan_word"].tolist() == ["NaN", "null"]
    assert frame["caption"].tolist() == ["a, quoted caption", "second"]
    # writing it back reproduces the same cells
    out = write_table(frame, tmp_path / "out.csv")
    assert read_table(out).equals(frame)


def test_csv_with_bom_and_gzip(tmp_path: Path, images: list[Path]) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffimage,caption\nimages/img0.png,hello\n".encode())
    assert list(read_table(path).columns) == ["image", "caption"]
    gz = write_table(_frame(), tmp_path / "m.csv.gz")
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    assert read_table(gz)["id"].tolist() == ["007", "NA", "010", "011"]


def test_parquet_and_jsonl_keep_types(tmp_path: Path, images: list[Path]) -> None:
    frame = pd.DataFrame(
        {"image": ["images/img0.png", "images/img1.png"], "caption": ["a", "b"], "n": [7, 8]}
    )
    for name in ("t.parquet", "t.jsonl"):
        back = read_table(write_table(frame, tmp_path / name))
        assert back["n"].tolist() == [7, 8]
        assert back["n"].dtype.kind == "i"


def test_jsonl_is_written_readably(tmp_path: Path) -> None:
    path = write_table(
        pd.DataFrame({"image": ["a/b.jpg"], "caption": ["café"], "x": [np.nan]}),
        tmp_path / "m.jsonl",
    )
    assert (
        path.read_text(encoding="utf-8") == '{"image": "a/b.jpg", "caption": "café", "x": null}\n'
    )


def test_json_lines_in_json_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": "y"}\n')
    assert read_table(path)["image"].tolist() == ["a.png", "b.png"]


def test_parquet_named_index_becomes_column(tmp_path: Path) -> None:
    frame = pd.DataFrame({"uid": ["u1", "u2"], "image": ["a", "b"], "caption": ["x", "y"]})
    path = tmp_path / "m.parquet"
    frame.set_index("uid").to_parquet(path)
    back = read_table(path)
    assert back.columns.tolist() == ["uid", "image", "caption"]
    assert isinstance(back.index, pd.RangeIndex)


def test_read_table_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"manifest file not found: '.*nope\.csv'"):
        read_table(tmp_path / "nope.csv")

    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(
        DatasetError, match=r"unsupported manifest format for 'data.xlsx'.*\.csv, \.tsv"
    ):
        read_table(bad)

    header_only = tmp_path / "h.csv"
    header_only.write_text("image,caption\n")
    with pytest.raises(
        DatasetError, match=r"manifest h\.csv is empty: 0 data rows \(columns: image, caption\)"
    ):
        read_table(header_only)

    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match=r"manifest e\.csv is empty \(no header row\)"):
        read_table(empty)

    ragged = tmp_path / "r.csv"
    ragged.write_text("image,caption\na.png,x\nb.png,y,extra\n")
    with pytest.raises(
        DatasetError, match=r"cannot parse r\.csv: .*Expected 2 fields in line 3, saw 3"
    ):
        read_table(ragged)

    extra_first = tmp_path / "x.csv"
    extra_first.write_text("image,caption\na.png,x,oops\n")
    with pytest.raises(
        DatasetError, match=r"cannot parse x\.csv: a row has more fields than the header"
    ):
        read_table(extra_first)

    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"image": "a.png", "caption": "x"}\n{"image": oops}\n')
    with pytest.raises(DatasetError, match=r"cannot parse b\.jsonl: line 2 is not valid JSON"):
        read_table(bad_json)

    not_obj = tmp_path / "l.jsonl"
    not_obj.write_text('["a.png", "x"]\n')
    with pytest.raises(DatasetError, match=r"line 1 is a JSON list, not an object"):
        read_table(not_obj)

    coco_like = tmp_path / "c.json"
    coco_like.write_text(json.dumps({"images": [], "annotations": []}, indent=1))
    with pytest.raises(DatasetError, match=r"holds a JSON object \(keys: images, annotations\)"):
        read_table(coco_like)

    bad_parquet = tmp_path / "p.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"cannot parse p\.parquet as parquet: "):
        read_table(bad_parquet)

    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,caption\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"cannot read latin\.csv: it is not UTF-8 text"):
        read_table(latin)


# --------------------------------------------------------------------------- read_manifest


def test_relative_paths_resolve_against_manifest_folder(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "meta"
    sub.mkdir()
    path = sub / "m.csv"
    path.write_text("image,caption\n../images/img1.png,green\n")
    monkeypatch.chdir(tmp_path / "images")  # the working directory must not matter
    m = read_manifest(path)
    assert m.image_refs[0] == str(images[1])
    assert m.status[0] == "ok"

    # root overrides the manifest folder; an absolute path ignores both
    other = tmp_path / "m2.csv"
    other.write_text(f"image,caption\nimg2.png,blue\n{images[0]},red\n")
    m2 = read_manifest(other, root=tmp_path / "images")
    assert m2.image_refs.tolist() == [str(images[2]), str(images[0])]
    assert m2.ok.all()


def test_dataframe_input_resolves_against_root_or_cwd(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = pd.DataFrame({"image": ["img0.png"], "caption": ["x"]}, index=[42])
    m = read_manifest(frame, root=tmp_path / "images")
    assert m.path is None
    assert m.image_refs[0] == str(images[0])
    assert m.frame.index.tolist() == [0]
    assert frame.index.tolist() == [42]  # the caller's frame is not modified
    monkeypatch.chdir(tmp_path)
    assert read_manifest(pd.DataFrame({"image": ["images/img0.png"], "caption": ["x"]})).ok.all()


def test_grouping_five_captions_per_image(tmp_path: Path, images: list[Path]) -> None:
    rows = [(f"images/img{i}.png", f"caption {i}.{k}") for i in range(3) for k in range(5)]
    frame = pd.DataFrame(rows, columns=["image", "caption"])
    m = read_manifest(frame, root=tmp_path)
    assert len(m) == 15
    assert m.unique_images == [str(p) for p in images]
    assert m.image_index.tolist() == [i for i in range(3) for _ in range(5)]
    # the same image written two ways ("./x", "a/../x") is one unique image
    frame2 = pd.DataFrame(
        {
            "image": ["images/img0.png", "./images/img0.png", "images/../images/img0.png"],
            "caption": ["a", "b", "c"],
        }
    )
    assert read_manifest(frame2, root=tmp_path).image_index.tolist() == [0, 0, 0]


def test_each_unique_image_is_statted_once(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pmpclean.data as data_mod

    calls: list[str] = []
    real = data_mod._stat_image

    def spy(path: str) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(data_mod, "_stat_image", spy)
    frame = pd.DataFrame(
        {"image": ["images/img0.png"] * 5 + ["images/img1.png"] * 5, "caption": list("abcdefghij")}
    )
    read_manifest(frame, root=tmp_path)
    assert calls == [str(images[0]), str(images[1])]


def test_statuses_and_precedence(tmp_path: Path, images: list[Path]) -> None:
    (tmp_path / "images" / "zero.png").write_bytes(b"")
    (tmp_path / "images" / "adir.png").mkdir()
    frame = pd.DataFrame(
        {
            "image": [
                "images/img0.png",  # ok
                "images/gone.png",  # missing_image
                "https://example.com/a.jpg",  # remote_image
                "",  # missing_value
                "   ",  # missing_value
                "images/img1.png",  # empty caption (blank)
                "images/gone.png",  # missing image wins over empty caption
                "",  # missing value wins over empty caption
                "images/zero.png",  # 0-byte file -> unreadable
                "images/adir.png",  # a directory: said so, not "not found"
                "HTTP://EXAMPLE.COM/B.JPG",  # scheme is case-insensitive
                "s3://bucket/c.jpg",  # any scheme:// is remote
                f"file://{images[2]}",  # file:// is local
                " images/img0.png ",  # surrounding whitespace is ignored
            ],
            "caption": ["x", "x", "x", "x", "x", "  \t", "", None, "x", "x", "x", "x", "x", "x"],
        }
    )
    m = read_manifest(frame, root=tmp_path)
    assert m.status.tolist() == [
        "ok",
        "missing_image",
        "remote_image",
        "missing_value",
        "missing_value",
        "empty_caption",
        "missing_image",
        "missing_value",
        "unreadable_image",
        "image_is_directory",
        "remote_image",
        "remote_image",
        "ok",
        "ok",
    ]
    assert m.image_index[3] == -1 and m.image_refs[3] == ""
    assert m.image_refs[2] == "https://example.com/a.jpg"
    assert m.image_refs[12] == str(images[2])
    assert m.image_index[13] == m.image_index[0]
    assert m.captions[5] == "" and m.captions[7] == ""
    counts = m.status_counts()
    assert list(counts) == list(STATUSES)
    assert counts == {
        "ok": 3,
        "missing_image": 2,
        "image_is_directory": 1,
        "unreadable_image": 1,
        "remote_image": 3,
        "empty_caption": 1,
        "missing_value": 3,
        # shard statuses (pmpclean.sources): no manifest file row has them
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "img2dataset_failed": 0,
        "missing_member": 0,
        "unlisted_member": 0,
    }
    assert sum(counts.values()) == len(frame)
    assert m.ok.dtype == bool and m.ok.tolist() == [s == "ok" for s in m.status]
    assert set(STATUS_HELP) == set(STATUSES)


def test_nan_and_non_string_captions_are_empty(tmp_path: Path, images: list[Path]) -> None:
    path = tmp_path / "m.jsonl"
    recs = [
        {"image": "images/img0.png", "caption": "fine"},
        {"image": "images/img0.png", "caption": None},
        {"image": "images/img1.png", "caption": 42},
        {"image": "images/img1.png", "caption": ["a", "list"]},
        {"image": "images/img2.png"},  # key absent -> NaN
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = read_manifest(path)
    assert m.status.tolist() == ["ok"] + ["empty_caption"] * 4
    assert m.captions.tolist() == ["fine", "", "", "", ""]
    # NaN from a DataFrame too
    m2 = read_manifest(
        pd.DataFrame({"image": ["images/img0.png"] * 2, "caption": ["y", np.nan]}), root=tmp_path
    )
    assert m2.status.tolist() == ["ok", "empty_caption"]


def test_no_row_ever_disappears(tmp_path: Path, images: list[Path]) -> None:
    rng = np.random.default_rng(0)
    choices = [
        "images/img0.png",
        "images/img1.png",
        "images/gone.png",
        "",
        None,
        "http://x.org/a.png",
        np.nan,
    ]
    caps = ["ok caption", "", "  ", None, np.nan, 3.5]
    n = 200
    frame = pd.DataFrame(
        {
            "image": [choices[i] for i in rng.integers(0, len(choices), n)],
            "caption": [caps[i] for i in rng.integers(0, len(caps), n)],
        }
    )
    frame.loc[0, ["image", "caption"]] = ["images/img0.png", "ok caption"]
    m = read_manifest(frame, root=tmp_path)
    for arr in (m.image_refs, m.image_index, m.captions, m.status):
        assert arr.shape == (n,)
    assert len(m) == n == len(m.frame)
    assert m.image_index.dtype == np.int64
    assert set(m.status) <= set(STATUSES)
    assert (m.image_index == -1).sum() == (m.status == "missing_value").sum()
    assert m.frame.equals(frame)


def test_check_files_false_never_touches_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("filesystem touched")

    monkeypatch.setattr(os, "stat", boom)
    frame = pd.DataFrame(
        {"image": ["id-1", "id-1", "https://x/y.jpg", 7, ""], "caption": ["a", "b", "c", "d", "e"]}
    )
    m = read_manifest(frame, check_files=False)
    assert m.status.tolist() == ["ok", "ok", "ok", "ok", "missing_value"]
    assert m.image_refs.tolist() == ["id-1", "id-1", "https://x/y.jpg", "7", ""]
    assert m.unique_images == ["id-1", "https://x/y.jpg", "7"]
    assert m.image_index.tolist() == [0, 0, 1, 2, -1]


def test_missing_column_lists_columns_and_option(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(
        DatasetError,
        match=r"^column 'image' not found in data\.csv; columns present: a, b, c\. "
        r"Use --image-col to name the image column\.$",
    ):
        read_manifest(path)
    with pytest.raises(DatasetError, match=r"column 'caption' not found .* Use --text-col"):
        read_manifest(path, image_col="a")
    with pytest.raises(DatasetError, match=r"column 'uid' not found .* Use --id-col"):
        read_manifest(path, image_col="a", text_col="b", id_col="uid", check_files=False)
    with pytest.raises(DatasetError, match=r"column 'y' not found .* Use --label-col"):
        read_manifest(path, image_col="a", text_col="b", label_col="y", check_files=False)
    with pytest.raises(DatasetError, match=r"Did you mean 'A'\?"):
        read_manifest(pd.DataFrame({"A": ["x"], "caption": ["y"]}), image_col="a")
    with pytest.raises(DatasetError, match=r"image column and the caption column are both 'a'"):
        read_manifest(path, image_col="a", text_col="a")


def test_duplicate_and_missing_ids(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"image": list("abcde"), "caption": list("vwxyz"), "id": ["1", "2", "007", "2", "007"]}
    )
    with pytest.raises(
        DatasetError, match=r"duplicate id '2' in column 'id' of the manifest DataFrame: rows 1, 3 "
    ):
        read_manifest(frame, id_col="id", check_files=False)
    frame["id"] = ["1", "", "3", "4", "5"]
    with pytest.raises(DatasetError, match=r"column 'id' \(the id column\) .* no value in rows 1 "):
        read_manifest(frame, id_col="id", check_files=False)
    frame["id"] = [1, 2, 3, 4, 5]
    assert read_manifest(frame, id_col="id", check_files=False).ok.all()


def test_remote_images(tmp_path: Path, images: list[Path]) -> None:
    all_remote = pd.DataFrame(
        {"image": ["http://a/1.jpg", "https://a/2.jpg"], "caption": ["x", "y"]}
    )
    with pytest.raises(
        DatasetError,
        match=r"every image .* is remote: 2 rows have a remote image "
        r"URL; .*download them first, e\.g\. with img2dataset \(https://github\.com/"
        r"rom1504/img2dataset\), and point the manifest at local files\.",
    ):
        read_manifest(all_remote)
    # some remote: kept, with a status; the CLI shows the hint
    some = pd.DataFrame({"image": ["http://a/1.jpg", "images/img0.png"], "caption": ["x", "y"]})
    m = read_manifest(some, root=tmp_path)
    assert m.status.tolist() == ["remote_image", "ok"]
    assert remote_image_hint(1).startswith("1 row has a remote image URL;")
    # precomputed embeddings: URLs are only identifiers
    assert read_manifest(all_remote, check_files=False).ok.all()


def test_unusable_manifests_raise(tmp_path: Path, images: list[Path]) -> None:
    all_missing = pd.DataFrame({"image": ["images/a.png", "images/b.png"], "caption": ["x", "y"]})
    with pytest.raises(
        DatasetError,
        match=r"none of the images .* \(missing_image: 2\); e\.g\. row "
        r"0: 'images/a\.png' was looked for at .*use --root",
    ):
        read_manifest(all_missing, root=tmp_path)
    with pytest.raises(
        DatasetError, match=r"column 'image' of the manifest DataFrame is empty in all 2"
    ):
        read_manifest(pd.DataFrame({"image": ["", None], "caption": ["x", "y"]}))
    with pytest.raises(
        DatasetError,
        match=r"column 'caption' of .* has no caption text: all 2 values "
        r"are empty or not strings \(dtype int64, first value 1\); use --text-col",
    ):
        read_manifest(
            pd.DataFrame({"image": ["images/img0.png"] * 2, "caption": [1, 2]}), root=tmp_path
        )
    with pytest.raises(DatasetError, match=r"holds embedded image data \(dict in row 0\)"):
        read_manifest(pd.DataFrame({"image": [{"bytes": b"x", "path": None}], "caption": ["x"]}))
    with pytest.raises(DatasetError, match=r"manifest DataFrame is empty"):
        read_manifest(pd.DataFrame({"image": [], "caption": []}))
    with pytest.raises(TypeError, match=r"expects a path or a pandas DataFrame, not int"):
        read_manifest(3)  # type: ignore[arg-type]


def test_set_image_status_marks_every_row_but_keeps_problems(
    tmp_path: Path, images: list[Path]
) -> None:
    frame = pd.DataFrame(
        {"image": ["images/img0.png"] * 3 + ["images/img1.png"], "caption": ["a", "", "c", "d"]}
    )
    m = read_manifest(frame, root=tmp_path)
    assert m.status.tolist() == ["ok", "empty_caption", "ok", "ok"]
    m.set_image_status(0, "unreadable_image")
    assert m.status.tolist() == ["unreadable_image", "empty_caption", "unreadable_image", "ok"]
    m.set_image_status(0, "missing_image")  # never overwrites a non-ok status
    assert m.status.tolist() == ["unreadable_image", "empty_caption", "unreadable_image", "ok"]
    with pytest.raises(ValueError, match=r"Unknown status 'broken'"):
        m.set_image_status(1, "broken")
    with pytest.raises(IndexError, match=r"unique image index 2 out of range 0\.\.1"):
        m.set_image_status(2, "unreadable_image")
    assert isinstance(m, Manifest)


# --------------------------------------------------------------------------- images


def test_check_image(tmp_path: Path, images: list[Path]) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    assert check_image(str(images[0])) == "ok"

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # noise: a JPEG with many bytes
    jpg = tmp_path / "full.jpg"
    Image.fromarray(pixels).save(jpg, quality=95)
    assert check_image(str(jpg)) == "ok"
    data = jpg.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with Image.open(cut) as im:  # the header alone looks fine ...
        assert im.size == (64, 64)
    assert check_image(str(cut)) == "unreadable_image"  # ... decoding does not

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert check_image(str(garbage)) == "unreadable_image"
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    assert check_image(str(text)) == "unreadable_image"
    assert check_image(str(tmp_path / "gone.png")) == "missing_image"
    assert check_image(str(tmp_path)) == "image_is_directory"
    palette = tmp_path / "p.gif"
    Image.new("P", (8, 8)).save(palette)
    assert check_image(str(palette)) == "ok"


def test_image_fingerprint(tmp_path: Path, images: list[Path]) -> None:
    p = images[0]
    st = p.stat()
    assert image_fingerprint(str(p)) == f"{p}|{st.st_size}|{st.st_mtime_ns}"
    before = image_fingerprint(str(p))
    Image.new("RGB", (16, 16)).save(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert image_fingerprint(str(p)) != before
    with pytest.raises(DatasetError, match=r"cannot fingerprint image .*gone\.png"):
        image_fingerprint(str(tmp_path / "gone.png"))


# --------------------------------------------------------------------------- write_table


def test_write_table_refuses_existing_and_unsupported(tmp_path: Path) -> None:
    frame = _frame()
    path = write_table(frame, tmp_path / "out" / "m.csv")  # creates the folder
    before = path.read_bytes()
    with pytest.raises(
        DatasetError, match=r"output file '.*m\.csv' already exists; .*pass --force"
    ):
        write_table(frame.head(1), path)
    assert path.read_bytes() == before
    write_table(frame.head(1), path, force=True)
    assert len(read_table(path)) == 1
    with pytest.raises(DatasetError, match=r"unsupported manifest format for 'm\.xlsx'"):
        write_table(frame, tmp_path / "m.xlsx")
    assert set(SUPPORTED_SUFFIXES.values()) == {"csv", "tsv", "parquet", "jsonl", "json"}


def test_write_table_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_table(_frame(), tmp_path / "m.parquet")
    before = path.read_bytes()

    def fail(self: pd.DataFrame, target: object, **kwargs: object) -> None:
        Path(str(target)).write_bytes(b"half-written")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fail)
    with pytest.raises(OSError, match="disk full"):
        write_table(_frame(), path, force=True)
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]  # no temp file left


# --------------------------------------------------------------------------- decoding

TWINS = [
    "I;16 png",
    "I;16B tiff",
    "I tiff",
    "F [0,1] tiff",
    "F [0,255] tiff",
    "1 png",
    "L png",
    "LA png",
    "RGBA png",
    "CMYK tiff",
    "P png",
    "P transparent png",
    "PA tiff",
    *(f"EXIF orientation {o} png" for o in range(2, 9)),
]


def test_every_twin_is_tested(image_twins: dict[str, tuple[Path, Path]]) -> None:
    assert sorted(image_twins) == sorted(TWINS)


@pytest.mark.parametrize("name", TWINS)
def test_open_image_matches_the_8bit_rgb_twin(
    name: str, image_twins: dict[str, tuple[Path, Path]]
) -> None:
    """Each mode Pillow opens decodes to what it shows: its 8-bit RGB twin, +-1 level."""
    path, twin = image_twins[name]
    mode = name.rsplit(" ", 1)[0].split(" ")[0]
    if not name.startswith("EXIF"):
        with Image.open(path) as raw:  # the file really is in that mode
            assert raw.mode == mode
    got = open_image(str(path))
    assert got.mode == "RGB"
    expected = np.asarray(Image.open(twin))
    assert np.asarray(got).shape == expected.shape
    diff = np.abs(np.asarray(got).astype(int) - expected.astype(int))
    assert diff.max() <= 1, (name, diff.max())
    assert decode_image(str(path))[0] == "ok"


def test_to_rgb_scales_the_full_range_of_wide_modes() -> None:
    # a 16-bit ramp uses the whole 8-bit range instead of clipping to white
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None, :]
    got = np.asarray(to_rgb(Image.fromarray(ramp)))[0, :, 0]
    assert got[0] == 0 and got[-1] == 255 and (np.diff(got.astype(int)) >= 0).all()
    assert len(np.unique(got)) > 250
    # int32 and float beyond 16-bit / [0, 255]: the image's own range; NaN is black
    big = Image.fromarray(np.array([[-5, 0, 100_000]], dtype=np.int32))
    assert np.asarray(to_rgb(big))[0, :, 0].tolist() == [0, 0, 255]
    floats = Image.fromarray(np.array([[np.nan, -1.0, 0.0, 1000.0]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 0, 0, 255]
    # transparency goes onto the documented background
    clear = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(to_rgb(clear))[0, 0].tolist() == list(IMAGE_BACKGROUND)
    assert np.asarray(to_rgb(clear, background=(0, 0, 0)))[0, 0].tolist() == [0, 0, 0]


def test_open_image_keeps_pixels_when_exif_is_malformed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import ImageOps

    path = _png(tmp_path / "a.png", (1, 2, 3))

    def broken(image: Image.Image) -> Image.Image:
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    assert np.asarray(open_image(str(path)))[0, 0].tolist() == [1, 2, 3]


def test_a_directory_is_named_as_such(tmp_path: Path, images: list[Path]) -> None:
    folder = tmp_path / "images" / "holiday.jpg"
    folder.mkdir()
    assert decode_image(str(folder)) == ("image_is_directory", None)
    frame = pd.DataFrame(
        {"image": ["images/img0.png", "images/holiday.jpg"], "caption": ["red", "a beach"]}
    )
    m = read_manifest(frame, root=tmp_path)
    assert m.status.tolist() == ["ok", "image_is_directory"]
    assert "folder" in STATUS_HELP["image_is_directory"]
    with pytest.raises(DatasetError, match=r"image_is_directory: 1"):
        read_manifest(frame.tail(1), root=tmp_path)


# --------------------------------------------------------------------------- real data


@pytest.mark.shared
def test_coco_mini_real_jpegs(shared_data: Path) -> None:
    coco_mini = shared_data / "coco-mini"
    manifest_path = coco_mini / "captions.csv"
    if not manifest_path.exists():
        pytest.skip(f"coco-mini not found at {coco_mini}")
    raw = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    m = read_manifest(manifest_path, id_col="caption_id", label_col="category")
    assert len(m) == 795
    assert len(m.unique_images) == 159
    assert np.bincount(m.image_index).tolist() == [5] * 159
    assert m.status_counts()["ok"] == 795
    assert all(
        Path(p).is_absolute() and Path(p).parent == coco_mini / "images" for p in m.unique_images
    )
    # licence columns pass through unchanged
    for col in ("license", "license_url", "flickr_url"):
        assert m.frame[col].tolist() == raw[col].tolist()
    assert m.frame.columns.tolist() == raw.columns.tolist()
    assert [check_image(p) for p in m.unique_images] == ["ok"] * 159


def test_text_groups_ignore_case_and_surrounding_space() -> None:
    groups = text_groups(["A cat", " a CAT ", "a dog", None, "", "a  cat"])
    assert groups.dtype == np.int64
    assert groups.tolist() == [0, 0, 1, 2, 2, 3]  # inner spaces count; empty is one text
