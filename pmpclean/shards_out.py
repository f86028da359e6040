"""Cleaned outputs that feed the next step: img2dataset shards and DataComp uid lists.

:func:`write_shards` writes the rows :func:`pmpclean.rematch` keeps in img2dataset's own
layout, shard for shard, so that the loaders that read the source read the result:

``webdataset``
    ``NNNNN.tar`` per source shard holding each kept sample's members (``<key>.jpg``,
    ``.txt``, ``.json``, and any other member) and ``NNNNN.parquet`` beside it.
``files``
    ``NNNNN/<key>.jpg`` (``.txt``, ``.json``) per kept sample plus ``NNNNN.parquet``.

Image bytes (and every member but ``.txt`` and ``.json``) are copied byte for byte from
the source member, never decoded. A rematched row's ``.txt`` holds its new caption; its
``.json`` (and the parquet) keep every field img2dataset wrote, with ``caption``
replaced, plus the audit's provenance: ``pmpclean_row``, ``pmpclean_action``,
``pmpclean_match_score``, ``pmpclean_rematch_confidence``,
``pmpclean_original_caption``, ``pmpclean_caption_from_row`` and
``pmpclean_caption_from_key``. The parquet lists the kept rows only (the tar and the
parquet agree); every other row is in the dropped file with ``pmpclean_reason``. A
``NNNNN_stats.json`` beside each shard gives ``successes`` (the kept samples), which
DataComp's resharder reads to size shards.

:func:`write_uids` writes the kept rows' DataComp ``uid`` as DataComp's resharder takes
them (``resharder.py``, ``load_subset``): a ``.npy`` of dtype ``numpy.dtype("u8,u8")``,
each 128-bit hex uid as its (high, low) 64-bit halves, sorted, each once.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._utils import atomic_path
from .errors import ConfigError, DatasetError

__all__ = [
    "OUTPUT_FORMATS",
    "SHARD_FORMATS",
    "check_output_format",
    "dropped_path_for",
    "uid_array",
    "write_shards",
    "write_uids",
]

#: What ``rematch(..., output_format=...)`` writes: a cleaned table (the default, its
#: format from the suffix of ``out``), img2dataset shards, or DataComp uids.
OUTPUT_FORMATS = ("table", "webdataset", "files", "uids")
#: The output formats that copy shards (their source must be img2dataset shards).
SHARD_FORMATS = ("webdataset", "files")
# the source kinds whose members can be copied (pmpclean.sources.SOURCE_KINDS)
_COPYABLE = ("webdataset", "files")
_PROVENANCE = (
    "pmpclean_row",
    "pmpclean_action",
    "pmpclean_match_score",
    "pmpclean_rematch_confidence",
    "pmpclean_original_caption",
    "pmpclean_caption_from_row",
    "pmpclean_caption_from_key",
)


def dropped_path_for(out: Path, output_format: str) -> Path:
    """The dropped file of a shard or uid output: ``<out>.dropped.parquet`` beside it."""
    name = out.name[: -len(".npy")] if output_format == "uids" else out.name
    return out.with_name(f"{name}.dropped.parquet")


def check_output_format(
    source: str | os.PathLike[str], output_format: str, out: Path, *, force: bool = False
) -> None:
    """Refuse, before any work, an output format the source cannot give.

    Raises
    ------
    ConfigError
        An unknown format; a shard format for a source that is not img2dataset
        ``webdataset`` or ``files`` shards; ``uids`` without a ``.npy`` name; ``out`` a
        file where a folder is needed.
    DatasetError
        ``uids`` for shards whose parquet has no ``uid`` column; a shard format's ``out``
        folder is not empty (without ``force``).
    """
    from .sources import source_kind

    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(
            f"Unknown output format {output_format!r}: expected one of {', '.join(OUTPUT_FORMATS)}."
        )
    if output_format in SHARD_FORMATS:
        kind = source_kind(source)
        if kind not in _COPYABLE:
            raise ConfigError(
                f"--out-format {output_format} copies img2dataset shards, and {source} is "
                f"{'a manifest file' if kind == 'table' else f'a {kind} source'}: it works "
                "from img2dataset's webdataset or files output; write a table (--out "
                "cleaned.parquet) or uids (--out-format uids) instead."
            )
        if out.exists() and not out.is_dir():
            raise ConfigError(
                f"--out {out} is a file; --out-format {output_format} writes a folder."
            )
        from .sources import shard_files

        folders = {Path(os.path.abspath(s.parent)) for _, s, _ in shard_files(source)[1]}
        if Path(os.path.abspath(out)) in folders:
            raise ConfigError(
                f"--out {out} holds the source shards; pmpclean never overwrites its input: "
                "write the cleaned shards to another folder."
            )
        if out.is_dir():
            _refuse_existing(out, force=force)
    elif output_format == "uids":
        if out.suffix.lower() != ".npy":
            raise ConfigError(
                f"--out-format uids writes a NumPy .npy file; --out {out} does not end in .npy."
            )
        columns = _shard_columns(source)
        if columns is not None and "uid" not in columns:
            raise DatasetError(_no_uid(source, columns))


def _shard_columns(source: str | os.PathLike[str]) -> list[str] | None:
    """The first shard parquet's columns for an img2dataset source, else None."""
    from .sources import shard_files

    try:
        kind, shards = shard_files(source)
    except DatasetError:
        return None
    if kind not in ("webdataset", "files", "parquet") or not shards:
        return None
    import pyarrow.parquet as pq

    meta = shards[0][2]
    return list(pq.read_schema(meta).names) if meta.is_file() else None


def _no_uid(source: Any, columns: Sequence[str]) -> str:
    return (
        f"{source} has no 'uid' column (columns: {', '.join(map(str, columns))}), and "
        "--out-format uids writes DataComp uids; keep the uid column when downloading "
        "(img2dataset --save_additional_columns '[\"uid\"]'), or write a table or shards."
    )


# --------------------------------------------------------------------------- uids


def uid_array(uids: Sequence[Any], *, where: str = "data") -> np.ndarray:
    """DataComp uids as the sorted ``numpy.dtype("u8,u8")`` array its resharder takes.

    Each uid is a hexadecimal string of up to 32 digits (a 128-bit hash); it becomes the
    pair ``divmod(int(uid, 16), 2**64)``, as ``resharder.py`` turns the ``uid`` of each
    sample's json into the key it looks up with ``numpy.searchsorted``. Repeated uids
    are kept once (the resharder writes a sample once per occurrence in the list).

    Raises
    ------
    DatasetError
        A uid that is missing or not a hex string of at most 32 digits, naming its row.
    """
    pairs = []
    for i, uid in enumerate(uids):
        text = uid.strip() if isinstance(uid, str) else None
        try:
            value = int(text, 16) if text and len(text) <= 32 else -1
        except ValueError:
            value = -1
        if value < 0:
            raise DatasetError(
                f"{where}: row {i} has uid {uid!r}, not a hexadecimal string of at most 32 "
                "digits (DataComp's 128-bit uid); fix or drop that row."
            )
        pairs.append(divmod(value, 1 << 64))
    arr = np.array(pairs, dtype=np.dtype("u8,u8")) if pairs else np.zeros(0, np.dtype("u8,u8"))
    return np.unique(arr)


def write_uids(cleaned: pd.DataFrame, out: Path, *, where: str) -> int:
    """Write the uids of ``cleaned`` to ``out`` (:func:`uid_array`); return how many."""
    if "uid" not in cleaned.columns:
        raise DatasetError(_no_uid(where, list(cleaned.columns)))
    arr = uid_array(cleaned["uid"].tolist(), where=where)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    return len(arr)


# --------------------------------------------------------------------------- shards


def write_shards(
    source: str | os.PathLike[str],
    cleaned: pd.DataFrame,
    dropped: pd.DataFrame,
    out: Path,
    *,
    output_format: str,
    text_col: str,
    force: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Write the kept rows as img2dataset shards in ``out``; see the module docstring.

    Parameters
    ----------
    source : str or Path
        The img2dataset source that was audited (folder, shard or shard pattern).
    cleaned, dropped : DataFrame
        :func:`pmpclean.rematch`'s kept and dropped rows: the input columns (``key``,
        ``shard``, the caption as rematched) and the ``pmpclean_*`` columns.
    out : Path
        The output folder (created by the caller).
    output_format : {"webdataset", "files"}
    text_col : str
        The caption column.
    force : bool
        Replace shard files already in ``out``.

    Returns
    -------
    (cleaned, dropped, files)
        The rows as written: a kept row whose image cannot be copied (its status is not
        ``ok``, as with ``--policy flag``) moves to ``dropped``. ``files`` lists the
        written files.
    """
    from .sources import shard_files

    if output_format not in SHARD_FORMATS:
        raise ConfigError(
            f"write_shards writes {' or '.join(SHARD_FORMATS)}, not {output_format!r}."
        )
    kind, shards = shard_files(source)
    if kind not in _COPYABLE:
        raise ConfigError(
            f"--out-format {output_format} needs img2dataset webdataset or files shards."
        )
    _refuse_existing(out, force=force)
    cleaned, dropped = _copyable_rows(cleaned, dropped)
    keys = pd.concat([cleaned, dropped])[["pmpclean_row", "key"]].astype({"key": str})
    key_of_row = dict(zip(keys["pmpclean_row"].tolist(), keys["key"].tolist(), strict=True))
    by_shard = dict(list(cleaned.groupby("shard", sort=False)))
    files: list[str] = []
    for name, shard, meta in shards:
        kept = by_shard.get(name, cleaned.iloc[:0])
        rows = {str(k): r for k, r in zip(kept["key"].tolist(), _records(kept), strict=True)}
        stem = Path(name).with_suffix("")
        files += _write_one(
            shard,
            meta,
            kind,
            rows,
            out,
            stem,
            output_format=output_format,
            text_col=text_col,
            key_of_row=key_of_row,
        )
    return cleaned, dropped, files


def _refuse_existing(out: Path, *, force: bool) -> None:
    found = sorted(
        p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != "pmpclean"
    )
    if found and not force:
        raise DatasetError(
            f"output folder {out} is not empty (holds {', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}); pass --force to write the shards into it, "
            "or choose an empty --out folder."
        )


def _copyable_rows(
    cleaned: pd.DataFrame, dropped: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Move kept rows without a copyable image (status not ok, ``--policy flag``) to dropped."""
    if "pmpclean_status" not in cleaned.columns:
        return cleaned, dropped
    bad = cleaned["pmpclean_status"].to_numpy(dtype=object) != "ok"
    if not bad.any():
        return cleaned.drop(columns="pmpclean_status"), dropped.drop(
            columns="pmpclean_status", errors="ignore"
        )
    moved = cleaned[bad].copy()
    moved["pmpclean_reason"] = moved["pmpclean_status"]
    dropped = pd.concat([dropped, moved]).sort_values("pmpclean_row", kind="stable")
    return (
        cleaned[~bad].drop(columns="pmpclean_status").reset_index(drop=True),
        dropped.drop(columns="pmpclean_status", errors="ignore").reset_index(drop=True),
    )


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return frame.to_dict(orient="records") if len(frame) else []


def _plain(value: Any) -> Any:
    """A JSON- and Parquet-friendly scalar: NaN/NA → None, numpy scalars → Python."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _provenance(row: dict[str, Any], key_of_row: dict[int, str]) -> dict[str, Any]:
    info = {c: _plain(row.get(c)) for c in _PROVENANCE if c != "pmpclean_caption_from_key"}
    src = info.get("pmpclean_caption_from_row")
    info["pmpclean_caption_from_key"] = key_of_row.get(int(src)) if src is not None else None
    return info


def _write_one(
    shard: Path,
    meta: Path,
    kind: str,
    rows: dict[str, dict[str, Any]],
    out: Path,
    stem: Path,
    *,
    output_format: str,
    text_col: str,
    key_of_row: dict[int, str],
) -> list[str]:
    """One source shard → its cleaned shard, parquet and stats (each written atomically)."""
    from .sources import read_member, shard_members

    index, _ = shard_members(shard, kind)
    samples = []
    for key, members in index.items():  # the source shard's order
        row = rows.get(key)
        if row is None:
            continue
        info = _provenance(row, key_of_row)
        rematched = info["pmpclean_original_caption"] is not None
        sample: dict[str, bytes] = {}
        for ext, where in members.items():
            data = read_member(shard, kind, key, ext, where)
            if kind == "webdataset" and len(data) != where[1]:
                continue  # cut short by a truncated tar (the row's image is whole)
            if ext == "json":
                data = _json_member(data, row, info, text_col, rematched)
            elif ext == "txt" and rematched:
                data = str(row[text_col]).encode("utf-8")
            sample[ext] = data
        if "txt" not in sample and (rematched or "txt" in members):
            sample["txt"] = str(row[text_col]).encode("utf-8")
        if "json" not in sample:
            sample["json"] = _json_member(b"{}", row, info, text_col, rematched, key=key)
        samples.append((key, sample))
    target = out / stem
    target.parent.mkdir(parents=True, exist_ok=True)
    if output_format == "webdataset":
        tar_path = target.with_name(target.name + ".tar")
        _write_tar(tar_path, samples)
        written = [str(tar_path)]
    else:
        _write_folder(target, samples)
        written = [str(target)]
    parquet = target.with_name(target.name + ".parquet")
    _write_parquet(meta, kind, rows, parquet, text_col=text_col, key_of_row=key_of_row)
    stats = target.with_name(target.name + "_stats.json")
    with atomic_path(stats) as tmp:
        tmp.write_text(
            json.dumps(
                {"count": len(samples), "successes": len(samples), "source_shard": str(shard)},
                indent=4,
            )
        )
    return [*written, str(parquet), str(stats)]


def _json_member(
    data: bytes,
    row: dict[str, Any],
    info: dict[str, Any],
    text_col: str,
    rematched: bool,
    *,
    key: str | None = None,
) -> bytes:
    try:
        record = json.loads(data)
    except ValueError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    if key is not None:
        record.setdefault("key", key)
    if rematched:
        record[text_col] = _plain(row[text_col])
    record.update(info)
    return json.dumps(record, indent=4).encode("utf-8")  # img2dataset's own layout


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    from webdataset import TarWriter

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh, TarWriter(fh, encoder=False) as sink:
            for key, sample in samples:
                sink.write({"__key__": key, **sample})


def _write_folder(folder: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """The ``files`` layout: a temporary folder renamed onto ``folder`` when complete."""
    tmp = folder.with_name(f".{folder.name}.pmpclean-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for key, sample in samples:
            for ext, data in sample.items():
                (tmp / f"{key}.{ext}").write_bytes(data)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write_parquet(
    meta: Path,
    kind: str,
    rows: dict[str, dict[str, Any]],
    path: Path,
    *,
    text_col: str,
    key_of_row: dict[int, str],
) -> None:
    """The source shard's parquet, its kept rows in its order, with the audit's columns."""
    frame = pd.read_parquet(meta)
    keys = frame["key"].astype(str)
    frame = frame[keys.isin(rows.keys()).to_numpy()].reset_index(drop=True)
    keys = frame["key"].astype(str).tolist()
    if text_col in frame.columns:
        frame[text_col] = pd.Series([rows[k][text_col] for k in keys], dtype=object)
    infos = [_provenance(rows[k], key_of_row) for k in keys]
    for col in _PROVENANCE:
        values = [info[col] for info in infos]
        if col in ("pmpclean_row", "pmpclean_caption_from_row"):
            frame[col] = pd.array(values, dtype="Int64")
        elif col in ("pmpclean_match_score", "pmpclean_rematch_confidence"):
            frame[col] = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
        else:
            frame[col] = pd.Series(values, dtype=object)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
