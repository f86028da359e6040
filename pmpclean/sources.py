"""Datasets where they lie: img2dataset shards, Hugging Face Parquet, imagefolder layouts,
and the embeddings clip-retrieval and DataComp computed.

:func:`read_source` turns any of these into a :class:`~pmpclean.data.Manifest`, as
:func:`~pmpclean.data.read_manifest` does for a manifest file (which it still reads):

``webdataset`` (img2dataset ``--output_format webdataset``)
    ``NNNNN.tar`` holding ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` for every sample
    img2dataset downloaded, and ``NNNNN.parquet`` beside it listing every input row,
    failures included (``key``, ``url``, ``caption``, ``status``, ``error_message``,
    ``width``, ``height``, ``sha256``, the user's extra columns). Images are read from
    the tar members in place (the tar is indexed with ``wids``, never unpacked).
``files`` (img2dataset ``--output_format files``)
    ``NNNNN/<key>.jpg`` (``.txt``, ``.json``) plus ``NNNNN.parquet``.
``parquet`` (img2dataset ``--output_format parquet``)
    ``NNNNN.parquet`` with the image bytes in column ``jpg`` (null for failed rows).
``hf-parquet``
    Hugging Face ``datasets`` Parquet: an image column of ``{bytes, path}`` structs and a
    caption column (``--text-col``).
``imagefolder``
    A folder with ``metadata.csv``, ``metadata.jsonl`` or ``metadata.parquet`` whose
    ``file_name`` column names images relative to that folder.

A shard source is the output folder, one shard, or shards named by a brace pattern
(``data/{00000..00123}.tar``), a glob, or several of these joined by ``::`` (as
webdataset writes them). Rows are joined to their images by ``key``, never by position.
Every row the shard parquets list is kept, in shard order, plus a row for every sample
a shard holds without listing it; each has a status (see :data:`pmpclean.data.STATUSES`):
img2dataset's failures keep theirs (``failed_to_download``, ``failed_to_resize``), a
listed key the shard lacks is ``missing_member``, a member cut short by a truncated tar
``unreadable_image``, an unlisted member ``unlisted_member``. Every column of the
parquets passes through, img2dataset's ``status`` renamed ``img2dataset_status`` (the
audit's ``status`` column is pmpclean's), and a ``shard`` column names each row's shard.
Rows showing the same image (equal ``sha256``) share it, as a manifest's rows of one
image file do.

:func:`load_source_embeddings` reads precomputed embeddings: a row-aligned ``.npz`` or
``.parquet`` (:func:`pmpclean.embedding.load_embeddings`), clip-retrieval's inference
folder (``img_emb/img_emb_{i}.npy``, ``text_emb/text_emb_{i}.npy``,
``metadata/metadata_{i}.parquet``; rows align inside one partition only) or DataComp's
per-shard ``<shard>.parquet`` + ``<shard>.npz`` (``b32_img``/``b32_txt`` or
``l14_img``/``l14_txt``), joined by key, image path or ``uid``.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data import Manifest, MemberRef, read_manifest, read_table
from .errors import DatasetError, EmbeddingError

__all__ = [
    "EMBEDDING_PAIRS",
    "SOURCE_KINDS",
    "expand_shards",
    "input_rows",
    "load_source_embeddings",
    "pattern_folder",
    "read_member",
    "read_source",
    "shard_files",
    "shard_members",
    "source_kind",
    "source_sha256",
    "truth_rows",
]

#: What :func:`source_kind` answers.
SOURCE_KINDS = ("table", "webdataset", "files", "parquet", "hf-parquet", "imagefolder")
#: DataComp's embedding pairs: ``<pair>_img`` and ``<pair>_txt`` in each shard's ``.npz``.
EMBEDDING_PAIRS = ("b32", "l14")

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
_PATTERN_CHARS = re.compile(r"[{}*?\[]|::")
# webdataset's convention: the key is the name up to the first dot of the file's base name
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_STATUS_MAP = {"failed_to_download": "failed_to_download", "failed_to_resize": "failed_to_resize"}


# --------------------------------------------------------------------------- locating


def expand_shards(pattern: str | os.PathLike[str]) -> list[Path]:
    """The files a shard pattern names, in order, each once.

    ``::`` separates patterns (webdataset's convention); each is brace-expanded
    (``{00000..00123}``, with ``braceexpand``, webdataset's dependency) and then globbed.

    Raises
    ------
    DatasetError
        A pattern names no existing file.
    """
    from braceexpand import braceexpand

    out: list[Path] = []
    for part in str(pattern).split("::"):
        for name in braceexpand(os.path.expanduser(part)):
            if glob.has_magic(name):
                found = sorted(glob.glob(name))
                if not found:
                    raise DatasetError(f"shard pattern {name!r} matches no file; check the path.")
                out.extend(Path(f) for f in found)
            elif os.path.exists(name):
                out.append(Path(name))
            else:
                raise DatasetError(
                    f"shard {name!r} (from {str(pattern)!r}) does not exist; check the pattern "
                    "(braces: data/{00000..00123}.tar)."
                )
    return list(dict.fromkeys(Path(os.path.abspath(p)) for p in out))


def pattern_folder(pattern: str | os.PathLike[str]) -> Path:
    """The folder holding every shard a pattern names (``data/{00000..00003}.tar`` →
    ``data``), read from the pattern alone: the shards need not exist."""
    from braceexpand import braceexpand

    folders = []
    for part in str(pattern).split("::"):
        for name in braceexpand(os.path.expanduser(part)):
            parts = Path(name).parent.parts
            fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p), parts))
            folders.append(os.path.abspath(os.path.join(*fixed)) if fixed else os.getcwd())
    return Path(os.path.commonpath(folders))


def _parquet_schema(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
        raise DatasetError(f"cannot read {path} as Parquet ({exc}); is it a Parquet file?") from exc


def _is_image_struct(schema: Any, column: str) -> bool:
    import pyarrow as pa

    if column not in schema.names:
        return False
    t = schema.field(column).type
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def _parquet_kind(path: Path, image_col: str) -> str:
    schema = _parquet_schema(path)
    if "jpg" in schema.names and "key" in schema.names:
        return "parquet"
    if _is_image_struct(schema, image_col):
        return "hf-parquet"
    if "key" in schema.names and (
        path.with_suffix("").is_dir() or path.with_suffix(".tar").exists()
    ):
        return "files" if path.with_suffix("").is_dir() else "webdataset"
    return "table"


def _resolve(source: str | os.PathLike[str], image_col: str) -> tuple[str, list[Path], Path | None]:
    """``(kind, shard files, imagefolder metadata file)`` of a source path or pattern."""
    text = str(source)
    p = Path(os.path.abspath(os.path.expanduser(text)))
    if not p.exists() and _PATTERN_CHARS.search(text):
        shards = expand_shards(text)
        return _kind_of_files(shards, image_col, text), shards, None
    if p.is_dir():
        tars = sorted(p.glob("*.tar"))
        if tars:
            return "webdataset", [t.absolute() for t in tars], None
        for name in _METADATA_FILES:
            if (p / name).is_file():
                return "imagefolder", [], (p / name).absolute()
        parquets = sorted(p.glob("*.parquet"))
        if parquets:
            shards = [q.absolute() for q in parquets]
            return _kind_of_files(shards, image_col, text), shards, None
        nested = sorted(q for name in _METADATA_FILES for q in p.glob(f"*/{name}"))
        if len(nested) == 1:
            return "imagefolder", [], nested[0].absolute()
        if nested:
            raise DatasetError(
                f"{p} holds several imagefolder metadata files ({', '.join(map(str, nested))}); "
                "scan one split at a time: pass its folder."
            )
        raise DatasetError(
            f"{p} is a folder, but neither an img2dataset output (NNNNN.tar or NNNNN.parquet "
            "shards), a Hugging Face Parquet folder, nor an imagefolder (metadata.csv, "
            "metadata.jsonl or metadata.parquet) was found in it; pass a manifest file or "
            "one of these."
        )
    if p.suffix.lower() == ".tar":
        return "webdataset", [p.absolute()], None
    if p.suffix.lower() in (".parquet", ".pq") and p.is_file():
        kind = _parquet_kind(p, image_col)
        if kind != "table":
            return kind, [p.absolute()], None
    return "table", [], None


def _kind_of_files(shards: list[Path], image_col: str, where: str) -> str:
    suffixes = {s.suffix.lower() for s in shards}
    if suffixes == {".tar"}:
        return "webdataset"
    if suffixes <= {".parquet", ".pq"}:
        kinds = {_parquet_kind(s, image_col) for s in shards}
        if len(kinds) == 1 and kinds != {"table"}:
            return kinds.pop()
    raise DatasetError(
        f"the shards of {where!r} are not all of one kind ({', '.join(sorted(suffixes))}); "
        "name img2dataset .tar shards, img2dataset or Hugging Face .parquet shards, or a "
        "manifest file."
    )


def source_kind(source: str | os.PathLike[str], *, image_col: str = "image") -> str:
    """Which of :data:`SOURCE_KINDS` ``source`` is (``"table"``: a manifest file)."""
    return _resolve(source, image_col)[0]


def shard_files(source: str | os.PathLike[str]) -> tuple[str, list[tuple[str, Path, Path]]]:
    """An img2dataset source's kind and its shards as ``(name, shard, parquet)``.

    ``name`` is the shard's name in the audit's ``shard`` column (relative to the
    shards' common folder), ``shard`` the ``.tar`` (``webdataset``) or the parquet
    (``files``, ``parquet``), ``parquet`` the shard's listing. Other sources give
    their kind and no shards.
    """
    kind, shards, _ = _resolve(source, "image")
    if kind not in ("webdataset", "files", "parquet"):
        return kind, []
    if kind == "files":
        shards = [s for s in shards if s.suffix.lower() in (".parquet", ".pq")]
    names = _shard_names(shards)
    return kind, [(n, s, _meta_path(s, kind)) for n, s in zip(names, shards, strict=True)]


def shard_members(
    shard: Path, kind: str
) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
    """``{key: {ext: place}}`` of a ``webdataset`` or ``files`` shard, in its order, and a
    note when the shard is damaged; ``place`` is what :func:`read_member` reads."""
    if kind == "files":
        return _files_index(shard.with_suffix("")), None
    return _tar_index(shard)


def source_sha256(source: str | os.PathLike[str]) -> str:
    """Fingerprint of a source: a file's SHA-256; for shard sources and folders, the
    SHA-256 of every file's relative name, size and modification time (the shards are
    not read: they may hold terabytes)."""
    text = str(source)
    p = Path(os.path.expanduser(text))
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    files = expand_shards(text) if not p.exists() else [p.absolute()]
    h = hashlib.sha256()
    for f in files:
        todo = sorted(f.rglob("*")) if f.is_dir() else [f]
        for item in todo:
            if not item.is_file():
                continue
            st = item.stat()
            h.update(f"{item}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        if f.suffix.lower() == ".tar":  # files layout / sidecar parquet beside a tar
            side = f.with_suffix(".parquet")
            if side.is_file():
                st = side.stat()
                h.update(f"{side}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- reading


def read_source(
    source: str | os.PathLike[str] | pd.DataFrame,
    *,
    image_col: str = "image",
    text_col: str = "caption",
    id_col: str | None = None,
    label_col: str | None = None,
    check_files: bool = True,
    root: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Read any supported dataset form into a :class:`~pmpclean.data.Manifest`.

    Parameters
    ----------
    source : str, Path or DataFrame
        A manifest file or DataFrame (read by :func:`pmpclean.data.read_manifest`), an
        img2dataset output folder, shard file or shard pattern, a Hugging Face Parquet
        file or folder, or an imagefolder (see the module docstring).
    image_col, text_col, id_col, label_col, check_files, root
        As :func:`~pmpclean.data.read_manifest`. For img2dataset shards ``image_col``
        is not used (images are found by ``key``) and ``text_col`` names the parquet's
        caption column (``caption``); when the parquets have no such column, the
        captions are the shards' ``<key>.txt`` members. For an imagefolder the image
        column defaults to ``file_name``.

    Returns
    -------
    Manifest
        One row per listed sample plus one per unlisted shard member, statuses set;
        ``manifest.notes`` names shards with problems.

    Raises
    ------
    DatasetError
        The source does not exist or is of no known form; a shard's parquet is missing,
        has no ``key`` column or repeats a key; a named column is missing; no row has a
        usable image.
    """
    if isinstance(source, pd.DataFrame):
        kind, shards, meta = "table", [], None
    else:
        kind, shards, meta = _resolve(source, image_col)
    common = {"id_col": id_col, "label_col": label_col}
    if kind == "table":
        return read_manifest(
            source,
            image_col=image_col,
            text_col=text_col,
            check_files=check_files,
            root=root,
            **common,
        )
    if kind == "imagefolder":
        assert meta is not None
        frame = read_table(meta)
        col = image_col
        if col not in frame.columns and "file_name" in frame.columns:
            col = "file_name"
        m = read_manifest(
            frame,
            image_col=col,
            text_col=text_col,
            check_files=check_files,
            root=root if root is not None else meta.parent,
            **common,
        )
        m.path = meta
        return m
    if kind == "hf-parquet":
        return _read_hf_parquet(source, shards, image_col=image_col, text_col=text_col, **common)
    return _read_img2dataset(source, kind, shards, text_col=text_col, **common)


@dataclass
class _Rows:
    """Per-row values collected shard by shard."""

    frames: list[pd.DataFrame]
    refs: list[MemberRef | str | None]
    status: list[str]
    captions: list[Any]
    notes: list[str]


def _shard_names(shards: Sequence[Path]) -> list[str]:
    """Each shard's name relative to the shards' common folder (``00000.tar``)."""
    if len(shards) == 1:
        return [shards[0].name]
    common = os.path.commonpath([str(s.parent) for s in shards])
    return [os.path.relpath(s, common) for s in shards]


def _tar_index(path: Path) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
    """``{key: {ext: (data offset, size)}}`` of a tar's members, and a note if it is damaged.

    wids' memory-mapped index reads the headers (8x faster than ``tarfile`` on
    coco-mini-wds: benchmarks/results/tar_index.md); a tar it cannot walk (a header cut
    short) is read again with ``tarfile``, which keeps the members before the damage.
    """
    size = path.stat().st_size
    entries: list[tuple[str, int, int]] = []
    note = None
    try:
        from wids.wids_mmtar import MMIndexedTar

        tar = MMIndexedTar(str(path), verbose=False)
        try:
            entries = [(name, offset + 512, n) for name, offset, n in tar.by_index]
        finally:
            tar.close()
    except Exception:  # noqa: BLE001 - damaged or empty tar: walk it with tarfile
        import tarfile

        try:
            with tarfile.open(path, "r:") as tf:
                while True:
                    try:
                        info = tf.next()
                    except tarfile.TarError:
                        note = f"{path.name}: the tar is damaged after {len(entries)} members"
                        break
                    if info is None:
                        break
                    if info.isfile():
                        entries.append((info.name, info.offset_data, info.size))
        except tarfile.TarError as exc:
            note = f"{path.name}: cannot read the tar ({exc})"
    index: dict[str, dict[str, tuple[int, int]]] = {}
    cut = 0
    for name, offset, n in entries:
        m = _KEY_EXT.match(name)
        if m is None:
            continue
        if offset + n > size:
            cut += 1
        index.setdefault(m.group(1), {})[m.group(2).lower()] = (offset, n)
    if cut:
        note = f"{path.name} is truncated: {cut} member(s) run past its end ({size} bytes)"
    return index, note


def _files_index(folder: Path) -> dict[str, dict[str, tuple[int, int]]]:
    index: dict[str, dict[str, tuple[int, int]]] = {}
    if folder.is_dir():
        for entry in os.scandir(folder):
            m = _KEY_EXT.match(entry.name)
            if m is not None and entry.is_file():
                index.setdefault(m.group(1), {})[m.group(2).lower()] = (-1, -1)
    return index


def _image_ext(members: dict[str, tuple[int, int]]) -> str | None:
    for ext in _IMAGE_EXTS:
        if ext in members:
            return ext
    return None


def read_member(path: Path, kind: str, key: str, ext: str, where: tuple[int, int]) -> bytes:
    """The bytes of member ``<key>.<ext>`` of a shard (``where`` from :func:`shard_members`)."""
    if kind == "files":
        return (path.with_suffix("") / f"{key}.{ext}").read_bytes()
    with open(path, "rb") as fh:
        fh.seek(where[0])
        return fh.read(where[1])


def _meta_path(shard: Path, kind: str) -> Path:
    return shard if kind == "parquet" else shard.with_suffix(".parquet")


def _read_img2dataset(
    source: Any,
    kind: str,
    shards: list[Path],
    *,
    text_col: str,
    id_col: str | None,
    label_col: str | None,
) -> Manifest:
    if kind == "files":  # the shards are the parquets; the images sit in NNNNN/
        shards = [s for s in shards if s.suffix.lower() in (".parquet", ".pq")]
    rows = _Rows([], [], [], [], [])
    for shard, name in zip(shards, _shard_names(shards), strict=True):
        _read_shard(shard, name, kind, text_col, rows)
    frame = pd.concat(rows.frames, ignore_index=True, sort=False)
    where = str(source)
    for col, option in ((id_col, "--id-col"), (label_col, "--label-col")):
        if col is not None and col not in frame.columns:
            raise DatasetError(
                f"column {col!r} not found in the shards of {where}; columns present: "
                f"{', '.join(map(str, frame.columns))}. Use {option} to name another column."
            )
    if id_col is not None:
        from .data import _check_ids

        _check_ids(frame, id_col, where)
    return _shard_manifest(frame, rows, where, text_col, id_col, label_col, image_col="key")


def _read_shard(shard: Path, name: str, kind: str, text_col: str, rows: _Rows) -> None:  # noqa: C901
    # C901: one check per way an img2dataset shard is damaged (another helper's module)
    meta_path = _meta_path(shard, kind)
    if not meta_path.is_file():
        raise DatasetError(
            f"shard {shard.name} has no {meta_path.name} beside it; img2dataset writes one per "
            "shard listing every input row (failures included), and pmpclean joins the shard "
            "to it by key: restore it (or rerun img2dataset on that shard)."
        )
    columns = None
    if kind == "parquet":
        columns = [c for c in _parquet_schema(meta_path).names if c != "jpg"]
    try:
        meta = pd.read_parquet(meta_path, columns=columns)
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"cannot read {meta_path} as Parquet ({exc}).") from exc
    if "key" not in meta.columns:
        raise DatasetError(
            f"{meta_path} has no 'key' column (columns: {', '.join(map(str, meta.columns))}); "
            "it is not an img2dataset shard parquet, whose rows join the shard's samples by key."
        )
    keys = meta["key"].astype(str).tolist()
    dupes = pd.Series(keys)[pd.Series(keys).duplicated()].unique().tolist()
    if dupes:
        raise DatasetError(
            f"{meta_path} lists key(s) {', '.join(map(repr, dupes[:5]))} more than once; "
            "img2dataset keys are unique per shard: the parquet was edited or concatenated."
        )
    if kind == "webdataset":
        index, note = _tar_index(shard)
        if note:
            rows.notes.append(note)
    elif kind == "files":
        index = _files_index(shard.with_suffix(""))
    else:
        index = {}
    if text_col not in meta.columns and "txt" in meta.columns:  # parquet output format
        meta = meta.rename(columns={"txt": text_col})
    has_caption = text_col in meta.columns
    i2d_status = (
        meta["status"].astype(object).tolist() if "status" in meta.columns else [None] * len(meta)
    )
    frame = meta.rename(columns={"status": "img2dataset_status"})
    if "shard" not in frame.columns:
        frame["shard"] = name
    captions = frame[text_col].tolist() if has_caption else [None] * len(frame)
    jpg_null = _parquet_nulls(meta_path, "jpg") if kind == "parquet" else None
    groups = _row_groups(meta_path) if kind == "parquet" else None
    size = shard.stat().st_size if kind == "webdataset" else 0
    for i, key in enumerate(keys):
        st = i2d_status[i]
        members = index.get(key, {})
        ext = _image_ext(members)
        ref: MemberRef | str | None = None
        if kind == "parquet":
            assert jpg_null is not None and groups is not None
            if not jpg_null[i]:
                g = int(np.searchsorted(groups, i, side="right") - 1)
                ref = MemberRef(str(shard), "jpg", row_group=g, row=i - int(groups[g]))
        elif ext is not None:
            offset, n = members[ext]
            if kind == "files":
                ref = str(shard.with_suffix("") / f"{key}.{ext}")
            else:
                ref = MemberRef(str(shard), f"{key}.{ext}", offset=offset, size=n)
        if st is not None and st != "success":
            status = _STATUS_MAP.get(str(st), "img2dataset_failed")
        elif ref is None:
            status = "missing_member"
        elif isinstance(ref, MemberRef) and ref.offset >= 0 and ref.offset + ref.size > size:
            status = "unreadable_image"
        else:
            status = "ok"
        if not has_caption and "txt" in members:
            captions[i] = read_member(shard, kind, key, "txt", members["txt"]).decode(
                "utf-8", errors="replace"
            )
        rows.refs.append(ref)
        rows.status.append(status)
    listed = set(keys)
    extra = [k for k in index if k not in listed]
    if extra:
        rows.notes.append(
            f"{name}: {len(extra)} sample(s) in the shard are not listed in {meta_path.name} "
            f"(first: {extra[0]!r}); they are kept with status unlisted_member"
        )
        frame = pd.concat([frame, _unlisted(shard, kind, name, extra, index, text_col, rows)])
        for k in extra:
            cap = None
            if "txt" in index[k]:
                cap = read_member(shard, kind, k, "txt", index[k]["txt"]).decode(
                    "utf-8", errors="replace"
                )
            captions.append(cap)
    frame = frame.reset_index(drop=True)
    frame[text_col] = pd.Series(captions, dtype=object)  # listed, then the unlisted' .txt
    rows.frames.append(frame.reset_index(drop=True))
    rows.captions.extend(captions)


def _unlisted(
    shard: Path,
    kind: str,
    name: str,
    keys: list[str],
    index: dict[str, dict[str, tuple[int, int]]],
    text_col: str,
    rows: _Rows,
) -> pd.DataFrame:
    """Rows for samples a shard holds but its parquet does not list (fields from their json)."""
    records = []
    for key in keys:
        members = index[key]
        record: dict[str, Any] = {}
        if "json" in members:
            try:
                record = json.loads(read_member(shard, kind, key, "json", members["json"]))
            except (ValueError, OSError):
                record = {}
            if not isinstance(record, dict):
                record = {}
        record.pop("status", None)
        record["key"] = key
        record["shard"] = name
        records.append(record)
        ext = _image_ext(members)
        ref: MemberRef | str | None = None
        if ext is not None:
            if kind == "files":
                ref = str(shard.with_suffix("") / f"{key}.{ext}")
            else:
                offset, n = members[ext]
                ref = MemberRef(str(shard), f"{key}.{ext}", offset=offset, size=n)
        rows.refs.append(ref)
        rows.status.append("unlisted_member")
    frame = pd.DataFrame.from_records(records)
    return frame.drop(columns=[text_col], errors="ignore")


def _parquet_nulls(path: Path, column: str) -> np.ndarray:
    """Null mask of one column, read a row group at a time."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    parts = [
        np.asarray(f.read_row_group(g, columns=[column]).column(0).is_null(), dtype=bool)
        for g in range(f.num_row_groups)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _row_groups(path: Path) -> np.ndarray:
    """First row of each row group."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _read_hf_parquet(
    source: Any,
    files: list[Path],
    *,
    image_col: str,
    text_col: str,
    id_col: str | None,
    label_col: str | None,
) -> Manifest:
    """Hugging Face Parquet: image column of ``{bytes, path}`` structs, read in place."""
    import pyarrow.dataset as ds

    dataset = ds.dataset([str(f) for f in files], format="parquet")
    keep = [c for c in dataset.schema.names if c != image_col]
    frames, refs = [], []
    for f in files:
        frames.append(pd.read_parquet(f, columns=keep))
        starts = _row_groups(f)
        paths = _struct_field(f, image_col, "path")
        nulls = _struct_field(f, image_col, "bytes", nulls_only=True)
        for i in range(len(frames[-1])):
            if nulls[i]:
                p = paths[i]
                local = p and os.path.isfile(os.path.join(f.parent, p))
                refs.append(os.path.normpath(os.path.join(f.parent, p)) if local else None)
                continue
            g = int(np.searchsorted(starts, i, side="right") - 1)
            refs.append(
                MemberRef(str(f), image_col, row_group=g, row=i - int(starts[g]), field="bytes")
            )
    frame = pd.concat(frames, ignore_index=True)
    if len(files) > 1:
        frame["shard"] = np.repeat(_shard_names(files), [len(x) for x in frames])
    status = ["ok" if r is not None else "missing_value" for r in refs]
    if text_col not in frame.columns:
        from .data import _column_error

        raise _column_error(frame, text_col, "--text-col", str(source), "caption")
    rows = _Rows([frame], refs, status, frame[text_col].tolist(), [])
    return _shard_manifest(frame, rows, str(source), text_col, id_col, label_col, image_col)


def _struct_field(path: Path, column: str, name: str, *, nulls_only: bool = False) -> list[Any]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    out: list[Any] = []
    for g in range(f.num_row_groups):
        col = f.read_row_group(g, columns=[column]).column(0)
        field = pc.struct_field(col, name)
        out.extend(field.is_null().to_pylist() if nulls_only else field.to_pylist())
    return out


def _shard_manifest(
    frame: pd.DataFrame,
    rows: _Rows,
    where: str,
    text_col: str,
    id_col: str | None,
    label_col: str | None,
    image_col: str,
) -> Manifest:
    """The Manifest of rows whose images are shard members (rows of one sha256 share one)."""
    n = len(frame)
    status = np.asarray(rows.status, dtype=object)
    sha = frame["sha256"].tolist() if "sha256" in frame.columns else [None] * n
    image_refs = np.full(n, "", dtype=object)
    image_index = np.full(n, -1, dtype=np.int64)
    unique: list[str] = []
    sources: list[str | MemberRef] = []
    seen: dict[str, int] = {}
    for i, ref in enumerate(rows.refs):
        if ref is None:
            if status[i] == "ok":
                status[i] = "missing_value"
            continue
        group = sha[i] if isinstance(sha[i], str) and sha[i] and status[i] == "ok" else str(ref)
        idx = seen.get(group)
        if idx is None:
            idx = seen[group] = len(unique)
            unique.append(str(ref))
            sources.append(ref)
        image_refs[i] = unique[idx]
        image_index[i] = idx
    captions = np.full(n, "", dtype=object)
    for i, value in enumerate(frame[text_col].tolist()):
        if isinstance(value, str) and value.strip():
            captions[i] = value
        elif status[i] == "ok":
            status[i] = "empty_caption"
    if not (status == "ok").any():
        counts = pd.Series(status).value_counts().to_dict()
        raise DatasetError(
            f"no row of {where} has both a usable image and a caption (statuses: "
            f"{', '.join(f'{k}: {v}' for k, v in counts.items())}); check the source and "
            "--text-col."
        )
    return Manifest(
        path=None,
        frame=frame,
        image_col=image_col,
        text_col=text_col,
        id_col=id_col,
        label_col=label_col,
        image_refs=image_refs,
        image_index=image_index,
        unique_images=unique,
        captions=captions,
        status=status,
        image_sources=sources,
        notes=list(rows.notes),
    )


# --------------------------------------------------------------------------- embeddings


def load_source_embeddings(
    path: str | os.PathLike[str], manifest: Manifest, *, pair: str = "b32"
) -> Any:
    """Precomputed embeddings for the rows of ``manifest``, joined by key where they must be.

    Parameters
    ----------
    path : str or Path
        A row-aligned ``.npz``/``.parquet`` file (:func:`pmpclean.embedding.load_embeddings`);
        clip-retrieval's inference output folder (``img_emb/``, ``text_emb/``,
        ``metadata/``); or a folder of DataComp shards (``<shard>.parquet`` with ``uid``
        beside ``<shard>.npz``).
    manifest : Manifest
        The rows to embed. clip-retrieval rows join by the manifest's ``key`` column
        (img2dataset) when it has one, else by image path; DataComp rows by ``uid``.
    pair : {"b32", "l14"}
        DataComp's arrays to use: ``<pair>_img`` and ``<pair>_txt``.

    Returns
    -------
    Embeddings
        ``(n_rows, d)`` float16, L2-normalised. A row whose key has no embedding is
        all-NaN (the scan gives it status ``missing_embedding``); embedded keys that no
        row has are counted in ``notes``, never shifted onto other rows.

    Raises
    ------
    EmbeddingError
        Naming the file: an unknown layout or pair, partitions whose arrays and
        metadata differ in length, a repeated key, no join column in the data.
    """
    from .embedding import Embeddings, _normalise_rows, load_embeddings

    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not p.is_dir():
        return load_embeddings(p, len(manifest))
    if pair not in EMBEDDING_PAIRS:
        raise EmbeddingError(
            f"unknown embedding pair {pair!r}: expected one of {', '.join(EMBEDDING_PAIRS)} "
            "(DataComp's b32_img/b32_txt or l14_img/l14_txt)."
        )
    if (p / "img_emb").is_dir():
        keys, img, txt, join = _clip_retrieval(p, manifest)
    elif any(p.glob("*.npz")):
        keys, img, txt, join = _datacomp(p, manifest, pair)
    else:
        raise EmbeddingError(
            f"embeddings folder {p} is neither a clip-retrieval output (img_emb/, text_emb/, "
            "metadata/) nor DataComp shards (<shard>.parquet + <shard>.npz); pass one of "
            "these or a row-aligned .npz."
        )
    data_keys = _data_keys(manifest, join)
    position = pd.Series(np.arange(len(keys)), index=pd.Index(keys))
    where = position.reindex(data_keys).to_numpy()
    have = ~np.isnan(where)
    for kind, parts in (("image", img), ("text", txt)):
        widths = sorted({int(a.shape[1]) for a in parts})
        if len(widths) > 1:
            raise EmbeddingError(
                f"{p} holds {kind} embeddings of different widths ({widths}) across its "
                "partitions; every partition must come from the same model."
            )
    at = np.where(have, np.nan_to_num(where, nan=-1.0), -1.0).astype(np.int64)
    # rows read shard by shard straight from the (memory-mapped) partitions
    image = _normalise_rows(img, at)
    text = _normalise_rows(txt, at)
    notes = []
    missing = int((~have).sum())
    if missing:
        first = data_keys[int(np.flatnonzero(~have)[0])]
        notes.append(
            f"{missing} row(s) have no embedding in {p} (no {join} {first!r} there, ...): "
            "status missing_embedding"
        )
    unused = sorted(set(keys) - set(data_keys))
    if unused:
        notes.append(
            f"{len(unused)} embedded {join}(s) in {p} match no row of the data "
            f"(first: {unused[0]!r}); they are not used"
        )
    return Embeddings(image=image, text=text, source=f"file:{p}", notes=notes)


def _data_keys(manifest: Manifest, join: str) -> list[str]:
    frame = manifest.frame
    if join in frame.columns:
        return [str(v) for v in frame[join].tolist()]
    if join == "uid":
        raise EmbeddingError(
            "DataComp embeddings join the data by 'uid', but the data has no 'uid' column "
            f"(columns: {', '.join(map(str, frame.columns))}); download DataComp with its "
            "uid column kept (img2dataset --save_additional_columns '[\"uid\"]')."
        )
    return [str(v) for v in manifest.image_refs]


def _unique_keys(keys: list[str], where: Path, join: str) -> None:
    s = pd.Series(keys)
    dupes = s[s.duplicated()].unique().tolist()
    if dupes:
        raise EmbeddingError(
            f"{where} holds {join} {dupes[0]!r} more than once ({len(dupes)} repeated); "
            "each embedded row needs its own key to be joined to the data."
        )


def _partition(name: str) -> int:
    m = re.search(r"(\d+)$", Path(name).stem)
    return int(m.group(1)) if m else -1


def _load_2d(path: Path, rows: int) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f"cannot read {path} as a .npy array ({exc}).") from exc
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise EmbeddingError(
            f"{path} has shape {arr.shape}, but its metadata lists {rows} rows; rows align "
            "only inside one partition: keep each partition's files together."
        )
    return arr


def _clip_retrieval(p: Path, manifest: Manifest) -> tuple[list[str], Any, Any, str]:
    metas = sorted((p / "metadata").glob("metadata_*.parquet"), key=lambda f: _partition(f.name))
    if not metas:
        raise EmbeddingError(f"{p / 'metadata'} holds no metadata_<i>.parquet partition.")
    join = "key" if "key" in manifest.frame.columns else "image_path"
    keys: list[str] = []
    imgs, txts = [], []
    for meta in metas:
        i = meta.stem[len("metadata_") :]
        frame = pd.read_parquet(meta)
        if join == "key" and "key" not in frame.columns:
            if "image_path" not in frame.columns:
                raise EmbeddingError(f"{meta} has neither a 'key' nor an 'image_path' column.")
            # without --enable_metadata, clip-retrieval records a webdataset sample's key as
            # its image_path; a files input records the image's path, whose stem is the key
            part = [Path(str(v)).stem for v in frame["image_path"].tolist()]
        elif join == "key":
            part = [str(v) for v in frame["key"].tolist()]
        else:
            part = [
                os.path.normpath(os.path.join(str(p), str(v))) for v in frame["image_path"].tolist()
            ]
        keys.extend(part)
        imgs.append(_load_2d(p / "img_emb" / f"img_emb_{i}.npy", len(frame)))
        txts.append(_load_2d(p / "text_emb" / f"text_emb_{i}.npy", len(frame)))
    _unique_keys(keys, p, join)
    return keys, imgs, txts, join


def _datacomp(p: Path, manifest: Manifest, pair: str) -> tuple[list[str], Any, Any, str]:
    from .embedding import _npz_memmap

    keys: list[str] = []
    imgs, txts = [], []
    for npz in sorted(p.glob("*.npz")):
        meta = npz.with_suffix(".parquet")
        if not meta.is_file():
            raise EmbeddingError(
                f"{npz.name} has no {meta.name} beside it; DataComp's rows join by the uid "
                "that the shard's parquet lists, row for row with the .npz."
            )
        frame = pd.read_parquet(meta, columns=["uid"])
        with np.load(npz, allow_pickle=False) as data:
            names = [f"{pair}_img", f"{pair}_txt"]
            absent = [k for k in names if k not in data.files]
            if absent:
                raise EmbeddingError(
                    f"{npz} has no array {' or '.join(absent)} (it holds "
                    f"{', '.join(data.files)}); choose another --embeddings-pair."
                )
            # uncompressed members (np.savez) are memory-mapped, not read
            img, txt = (
                data[k] if (mapped := _npz_memmap(npz, k)) is None else mapped for k in names
            )
        for arr in (img, txt):
            if arr.ndim != 2 or arr.shape[0] != len(frame):
                raise EmbeddingError(
                    f"{npz} holds {arr.shape[0]} rows but {meta.name} lists {len(frame)}; "
                    "the shard's .npz and .parquet must come from the same shard."
                )
        keys.extend(str(v) for v in frame["uid"].tolist())
        imgs.append(img)
        txts.append(txt)
    _unique_keys(keys, p, "uid")
    return keys, imgs, txts, "uid"


# --------------------------------------------------------------------------- truth


def input_rows(manifest: Manifest) -> np.ndarray | None:
    """Each row's place in img2dataset's input (its url list), or None for other sources.

    A manifest's rows are its input rows. The rows of img2dataset shards come in shard
    order, each shard's in the order its downloads finished; their input row is told by
    the ``key``: img2dataset names each sample by its shard number and its place in the
    shard (``f"{shard:0{a}d}{place:0{b}d}"``, ``b = ceil(log10(number_sample_per_shard))``),
    and lists every input row, failures included, so the keys in sorted order are the
    input rows in order.

    Raises
    ------
    DatasetError
        The keys do not count the input rows from 0 without a gap (some shards of the run
        are not in the source, or the keys are not img2dataset's).
    """
    if manifest.image_col != "key" or "key" not in manifest.frame.columns:
        return None
    keys = manifest.frame["key"].astype(str)
    n = len(keys)
    order = np.argsort(keys.to_numpy(dtype=str), kind="stable")
    rows = np.empty(n, dtype=np.int64)
    rows[order] = np.arange(n)
    # check against img2dataset's naming: the samples per shard is the fullest shard's count
    per_shard = int(manifest.frame.groupby("shard", sort=False).size().max()) if n else 0
    width = max(1, math.ceil(math.log10(per_shard))) if per_shard > 1 else 1
    expected = None
    if keys.str.fullmatch(r"\d+").all() and (keys.str.len() > width).all():
        expected = keys.str[:-width].astype(np.int64) * per_shard + keys.str[-width:].astype(
            np.int64
        )
    if expected is None or not np.array_equal(expected.to_numpy(), rows):
        first = keys.iloc[int(order[0])] if n else ""
        raise DatasetError(
            "the truth column holds rows of img2dataset's input (its url list), which pmpclean "
            "finds by each row's key; the keys of this source do not count the input rows "
            f"from 0 without a gap (first key {first!r}, {per_shard} samples per shard): "
            "scan every shard of the run, or give a truth column of this source's rows."
        )
    return rows


def truth_rows(manifest: Manifest, col: str) -> np.ndarray:
    """The ground truth of ``col`` as rows of ``manifest``: the row whose image each
    row's caption describes.

    ``col`` holds the 0-based input row of each caption's true image (``pmpclean
    corrupt`` writes it as ``true_row``): for img2dataset shards the row of its input
    url list (mapped to the source's rows by key, :func:`input_rows`), else the
    manifest's row. Rows that are not scored (a status other than ``ok``, e.g. a failed
    download) may hold -1 or nothing; they get their own row.

    Raises
    ------
    DatasetError
        ``col`` is missing, or a scored row holds no valid input row.
    """
    frame = manifest.frame
    n = len(frame)
    if col not in frame.columns:
        raise DatasetError(
            f"Ground-truth column {col!r} not found; "
            f"columns present: {', '.join(map(str, frame.columns))}. "
            "Use --truth-col to name it (pmpclean corrupt writes 'true_row')."
        )
    rows = input_rows(manifest)  # first: it says when the values cannot be mapped at all
    values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = np.isnan(values) | (values < 0) | (values >= n) | (values != np.round(values))
    scored = np.asarray(manifest.status, dtype=object) == "ok"
    if (bad & scored).any():
        first = int(np.flatnonzero(bad & scored)[0])
        value = frame[col].iloc[first]
        value = value.item() if isinstance(value, np.generic) else value
        raise DatasetError(
            f"Ground-truth column {col!r} must hold the 0-based input row of each caption "
            f"(0..{n - 1}); row {first} holds {value!r} (only rows that are "
            "not scored, such as failed downloads, may hold -1 or nothing)."
        )
    truth = np.where(bad, 0, values).astype(np.int64)
    if rows is not None:
        row_of_input = np.empty(n, dtype=np.int64)
        row_of_input[rows] = np.arange(n)
        truth = row_of_input[truth]
    truth[bad] = np.flatnonzero(bad)
    return truth
