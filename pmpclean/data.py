"""Read and validate dataset manifests: validate once, at the door.

A *manifest* is a table with one row per (image, caption) pair. It is read by
:func:`read_table` (CSV, TSV, Parquet, JSON lines, JSON) and checked by
:func:`read_manifest`, which returns a :class:`Manifest`: the table exactly as read
plus, per row, the resolved image reference, the caption text and a *status*.

Every row is kept: ``n`` rows in, ``n`` rows out, always. Rows that cannot be
scored are not dropped, they carry a non-``"ok"`` status so that the report can
name them. Problems that make the whole manifest unusable (a missing column,
duplicate ids, no usable image at all, ...) raise :class:`~pmpclean.errors.DatasetError`
with a message that names the file, the column or row, and the fix.

Row statuses
------------
Exactly one status per row, from :data:`STATUSES`. When a row has several problems
the first one in this order wins (image problems before caption problems, and
among image problems the one found earliest without touching the file):

``missing_value``
    The image cell is empty, blank or null: there is nothing to look up.
``remote_image``
    The image cell is a URL (``http://``, ``https://``, ``s3://``, any ``scheme://``
    other than ``file://``). pmpclean never downloads; see :func:`remote_image_hint`.
    Only with ``check_files=True``: with precomputed embeddings a URL is just an id.
``missing_image``
    The image cell names a local file that does not exist.
``image_is_directory``
    The image cell names a folder, not an image file.
``unreadable_image``
    The file exists but cannot be decoded. :func:`read_manifest` only detects empty
    (0-byte) files and special files (a FIFO, a device), because decoding every image
    is the embedding stage's job: it decodes with :func:`decode_image` and records
    failures with :meth:`Manifest.set_image_status`.
``empty_caption``
    The caption cell is null, blank (only whitespace) or not a string. Numbers,
    lists and other non-string values are *not* turned into text: a number in the
    caption column almost always means the wrong column was named, and ``"3"`` is
    not a caption. (CSV/TSV cells are always strings, so this only concerns
    Parquet and JSON.)
``ok``
    Usable: a local image that exists (or any identifier with ``check_files=False``)
    and a non-blank caption.

Image references
----------------
Relative image paths resolve against the manifest's folder (or ``root``); ``~`` is
expanded and ``file://`` URIs are accepted. Surrounding whitespace in the image cell
is ignored. Paths are made absolute and normalised (``..`` removed) without
following symlinks. Each unique image is looked up on disk once, however many
captions it has (COCO has five per image).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd

from ._utils import atomic_path, to_jsonable
from .errors import DatasetError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "STATUSES",
    "STATUS_HELP",
    "SUPPORTED_SUFFIXES",
    "Manifest",
    "IMAGE_BACKGROUND",
    "MemberRef",
    "check_image",
    "decode_image",
    "image_fingerprint",
    "read_manifest",
    "read_table",
    "open_image",
    "remote_image_hint",
    "is_url",
    "table_format",
    "text_groups",
    "to_rgb",
    "write_table",
]

#: Every status a row can have, in precedence order after ``"ok"`` (see module docstring).
STATUSES: tuple[str, ...] = (
    "ok",
    "missing_image",
    "image_is_directory",
    "unreadable_image",
    "remote_image",
    "empty_caption",
    "missing_value",
    "failed_to_download",
    "failed_to_resize",
    "img2dataset_failed",
    "missing_member",
    "unlisted_member",
)

#: One-line explanation of each status, for reports and the CLI.
STATUS_HELP: dict[str, str] = {
    "ok": "usable pair: the image exists (or is an identifier) and the caption is non-empty",
    "missing_image": "the image file does not exist",
    "image_is_directory": "the image path names a folder, not an image file",
    "unreadable_image": "the image file exists but cannot be decoded",
    "remote_image": "the image is a URL; download it first (pmpclean never downloads)",
    "empty_caption": "the caption is empty, blank, null or not a string",
    "missing_value": "the image cell is empty",
    "failed_to_download": "img2dataset could not download the image (see error_message)",
    "failed_to_resize": "img2dataset downloaded but could not decode or resize the image "
    "(see error_message)",
    "img2dataset_failed": "img2dataset recorded another failure for this row (see "
    "img2dataset_status and error_message)",
    "missing_member": "the shard's parquet lists the sample as downloaded, but its shard holds "
    "no image for the key (a truncated or edited shard)",
    "unlisted_member": "the shard holds this sample, but the shard's parquet does not list its "
    "key; not scored",
}

#: File suffix (lower case) -> table format. Compressed text formats are also read
#: and written when the compression suffix follows, e.g. ``captions.csv.gz``.
#: ``.json`` holds either a JSON array of records or JSON lines (one object per line);
#: :func:`write_table` writes ``.json`` as an array of records.
SUPPORTED_SUFFIXES: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
}

_COMPRESSION_SUFFIXES: dict[str, str] = {
    ".gz": "gzip",
    ".bz2": "bz2",
    ".xz": "xz",
    ".zst": "zstd",
}

_COLUMN_OPTIONS = {
    "image_col": "--image-col",
    "text_col": "--text-col",
    "id_col": "--id-col",
    "label_col": "--label-col",
}
_COLUMN_ROLES = {
    "image_col": "image",
    "text_col": "caption",
    "id_col": "id",
    "label_col": "label",
}

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_IMG2DATASET = "img2dataset (https://github.com/rom1504/img2dataset)"


def is_url(text: str) -> bool:
    """True when ``text`` starts with a URL scheme (``https://``, ``s3://``, ``file://``)."""
    return _URL_RE.match(text) is not None


# --------------------------------------------------------------------------- MemberRef


@dataclass(frozen=True)
class MemberRef:
    """An image stored inside a container file: a tar member or a Parquet cell.

    Small and picklable, so that DataLoader workers read the bytes themselves. Built by
    :mod:`pmpclean.sources`; :func:`open_image` decodes it without unpacking anything.

    Attributes
    ----------
    container : str
        Absolute path of the ``.tar`` or ``.parquet`` file.
    name : str
        The tar member's name, or the Parquet column holding the image bytes.
    offset, size : int
        Tar: byte offset and length of the member's data. ``-1`` for Parquet.
    row_group, row : int
        Parquet: the row group and the row inside it. ``-1`` for tar.
    field : str
        Parquet: the struct field holding the bytes (``"bytes"`` for Hugging Face's
        ``{bytes, path}`` image column), ``""`` for a plain binary column.
    """

    container: str
    name: str
    offset: int = -1
    size: int = -1
    row_group: int = -1
    row: int = -1
    field: str = ""

    def __str__(self) -> str:
        if self.offset >= 0:
            return f"{self.container}#{self.name}"
        return f"{self.container}#row={self.row_group}:{self.row}"

    def read(self) -> bytes:
        """The stored bytes.

        Raises
        ------
        OSError
            The container is gone, or a tar member's bytes run past its end (truncated).
        ValueError
            The Parquet cell is null.
        """
        if self.offset >= 0:
            with open(self.container, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(self.size)
            if len(data) != self.size:
                raise OSError(
                    f"{self.container}: member {self.name} is cut short ({len(data)} of "
                    f"{self.size} bytes): the tar is truncated"
                )
            return data
        column = _parquet_row_group(self.container, self.row_group, self.name)
        cell = column[self.row]
        value = cell.get(self.field) if self.field else cell
        if value is None:
            raise ValueError(f"{self}: the image cell is null")
        return bytes(value)


@functools.lru_cache(maxsize=2)
def _parquet_row_group(path: str, row_group: int, column: str) -> list[Any]:
    """One column of one row group as Python values; the last two are kept, so that a
    worker reading the rows of a group in order reads the group once."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0).to_pylist()


# --------------------------------------------------------------------------- Manifest


@dataclass(eq=False)
class Manifest:
    """A validated manifest: the table as read plus per-row image, caption and status.

    All per-row arrays have length ``n = len(frame)`` and are aligned with ``frame``
    (``frame`` has a ``RangeIndex`` ``0..n-1``).

    Attributes
    ----------
    path : Path or None
        The manifest file, or ``None`` when built from a DataFrame.
    frame : pandas.DataFrame
        The input columns exactly as read, in their original order.
    image_col, text_col : str
        Names of the image and caption columns.
    id_col, label_col : str or None
        Names of the (unique) id column and the class-label column, if any.
    image_refs : numpy.ndarray, shape (n,), object
        Absolute, normalised image path per row (URLs kept as given). With
        ``check_files=False`` the raw identifier as a string. ``""`` when the cell
        is empty.
    image_index : numpy.ndarray, shape (n,), int64
        Index into ``unique_images`` per row; rows showing the same image share it;
        ``-1`` when the image cell is empty.
    unique_images : list of str
        Unique non-empty ``image_refs`` in first-seen order.
    captions : numpy.ndarray, shape (n,), object
        Caption text per row, unchanged; ``""`` for rows with ``empty_caption``.
    status : numpy.ndarray, shape (n,), object
        One of :data:`STATUSES` per row.
    image_sources : list of (str or MemberRef), optional
        Where each of ``unique_images`` is read from, when that is not the path itself:
        a :class:`MemberRef` for an image inside a tar or a Parquet file (shard sources,
        see :mod:`pmpclean.sources`). ``None``: every unique image is its own path.
    notes : list of str
        Problems found while reading that concern a whole shard (a truncated tar, ...);
        each row they touch also has its status. The scan's summary lists them.
    """

    path: Path | None
    frame: pd.DataFrame
    image_col: str
    text_col: str
    id_col: str | None
    label_col: str | None
    image_refs: np.ndarray
    image_index: np.ndarray
    unique_images: list[str]
    captions: np.ndarray
    status: np.ndarray
    image_sources: list[str | MemberRef] | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask, shape ``(n,)``: rows whose status is ``"ok"``."""
        return np.asarray(self.status == "ok", dtype=bool)

    def status_counts(self) -> dict[str, int]:
        """Number of rows per status, with every status of :data:`STATUSES` as a key."""
        counts = dict.fromkeys(STATUSES, 0)
        values, n = np.unique(self.status.astype(str), return_counts=True)
        for value, count in zip(values, n, strict=True):
            counts[str(value)] = int(count)
        return counts

    def image_source(self, unique_idx: int) -> str | MemberRef:
        """What :func:`open_image` reads for ``unique_images[unique_idx]``: a path or a
        :class:`MemberRef`."""
        if self.image_sources is None:
            return self.unique_images[int(unique_idx)]
        return self.image_sources[int(unique_idx)]

    def set_image_status(self, unique_idx: int, status: str) -> None:
        """Give ``status`` to every row showing ``unique_images[unique_idx]``.

        Used by the embedding stage when an image fails to decode. Rows that already
        have a non-``"ok"`` status keep it (the first problem found is the one
        reported).

        Raises
        ------
        ValueError
            If ``status`` is not in :data:`STATUSES`.
        IndexError
            If ``unique_idx`` is not a valid index into ``unique_images``.
        """
        if status not in STATUSES:
            raise ValueError(f"Unknown status {status!r}: expected one of {', '.join(STATUSES)}.")
        idx = int(unique_idx)
        if not 0 <= idx < len(self.unique_images):
            raise IndexError(
                f"unique image index {unique_idx} out of range 0..{len(self.unique_images) - 1}"
            )
        rows = (self.image_index == idx) & (self.status == "ok")
        self.status[rows] = status


# --------------------------------------------------------------------------- reading


def table_format(path: Path) -> tuple[str | None, str | None]:
    """Return ``(format, compression)`` from the file name, ``(None, None)`` if unknown
    (``cleaned.csv.gz``: ``("csv", "gzip")``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if not suffixes:
        return None, None
    compression = None
    if suffixes[-1] in _COMPRESSION_SUFFIXES and len(suffixes) >= 2:
        compression = _COMPRESSION_SUFFIXES[suffixes[-1]]
        suffixes = suffixes[:-1]
    fmt = SUPPORTED_SUFFIXES.get(suffixes[-1])
    if fmt == "parquet" and compression is not None:
        return None, None  # parquet compresses internally
    return fmt, compression


def _unsupported(path: Path) -> DatasetError:
    listed = ", ".join(SUPPORTED_SUFFIXES)
    return DatasetError(
        f"unsupported manifest format for {path.name!r} "
        f"(suffix {''.join(path.suffixes) or 'none'!r}); "
        f"supported suffixes: {listed} (CSV/TSV/JSON lines may add .gz, .bz2, .xz or .zst). "
        "Rename or convert the file to one of these formats."
    )


def _open_text(path: Path, compression: str | None) -> Any:
    if compression is None:
        return open(path, encoding="utf-8-sig")
    if compression == "gzip":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8-sig")
    if compression == "bz2":
        import bz2

        return bz2.open(path, "rt", encoding="utf-8-sig")
    if compression == "xz":
        import lzma

        return lzma.open(path, "rt", encoding="utf-8-sig")
    import io

    import zstandard  # optional; pandas uses the same package

    return io.TextIOWrapper(
        zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8-sig"
    )


def _records_frame(records: list[Any], path: Path, what: str) -> pd.DataFrame:
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DatasetError(
                f"cannot parse {path.name}: {what} {i + 1} is a JSON {type(rec).__name__}, "
                "not an object; every record must be an object like "
                '{"image": "a.jpg", "caption": "..."}.'
            )
    return pd.DataFrame.from_records(records) if records else pd.DataFrame()


def _read_json_lines(path: Path, compression: str | None) -> pd.DataFrame:
    records: list[Any] = []
    with _open_text(path, compression) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"cannot parse {path.name}: line {lineno} is not valid JSON ({exc.msg} at "
                    f"column {exc.colno}); JSON lines files need one JSON object per line."
                ) from exc
            if not isinstance(records[-1], dict):
                raise DatasetError(
                    f"cannot parse {path.name}: line {lineno} is a JSON "
                    f"{type(records[-1]).__name__}, not an object; JSON lines files need one "
                    'object per line, like {"image": "a.jpg", "caption": "..."}.'
                )
    return _records_frame(records, path, "line")


def _read_json(path: Path, compression: str | None) -> pd.DataFrame:
    with _open_text(path, compression) as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return _read_json_lines(path, compression)
        raise DatasetError(
            f"cannot parse {path.name}: not valid JSON ({exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}); a .json manifest is a JSON array of records or JSON lines."
        ) from exc
    if isinstance(data, dict):
        keys = ", ".join(list(map(str, data))[:6])
        raise DatasetError(
            f"cannot use {path.name}: it holds a JSON object (keys: {keys}), not a list of "
            "records; a .json manifest is a JSON array of objects, one per image-caption pair "
            "(COCO-style annotation files must be flattened to one row per caption first)."
        )
    if not isinstance(data, list):
        raise DatasetError(
            f"cannot use {path.name}: it holds a JSON {type(data).__name__}, not a list of "
            "records; a .json manifest is a JSON array of objects."
        )
    return _records_frame(data, path, "record")


def _read_delimited(path: Path, sep: str, compression: str | None) -> pd.DataFrame:
    from pandas.errors import EmptyDataError, ParserError, ParserWarning

    with warnings.catch_warnings():
        # With index_col=False pandas only *warns* when a row has more fields than
        # the header and silently drops the extra ones: make that an error.
        warnings.simplefilter("error", ParserWarning)
        try:
            return pd.read_csv(
                path,
                sep=sep,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                index_col=False,
                encoding="utf-8-sig",
                compression=compression,
            )
        except EmptyDataError as exc:
            raise DatasetError(
                f"manifest {path.name} is empty (no header row); it needs a header line "
                "naming the columns and at least one data row."
            ) from exc
        except ParserWarning as exc:
            raise DatasetError(
                f"cannot parse {path.name}: a row has more fields than the header "
                f"({exc}); quote values that contain the separator {sep!r}."
            ) from exc
        except ParserError as exc:
            hint = "check quoting and that every row has as many fields as the header"
            if sep == ",":
                hint += " (is it tab-separated? then name it .tsv)"
            raise DatasetError(f"cannot parse {path.name}: {exc}; {hint}.") from exc
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"cannot read {path.name}: it is not UTF-8 text ({exc.reason} at byte "
                f"{exc.start}); re-save it as UTF-8."
            ) from exc


def _flatten_index(frame: pd.DataFrame) -> pd.DataFrame:
    """Give ``frame`` a RangeIndex, keeping a *named* stored index as columns."""
    index = frame.index
    if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
        return frame
    if any(name is not None for name in index.names):
        return frame.reset_index()
    return frame.reset_index(drop=True)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a manifest table, choosing the reader from the file suffix.

    CSV and TSV are read with every cell as a string, unchanged (``"007"`` stays
    ``"007"``, ``"NA"`` stays ``"NA"``, empty cells are ``""``). Parquet, JSON lines
    and JSON keep their types. See :data:`SUPPORTED_SUFFIXES`.

    Parameters
    ----------
    path : str or Path
        The manifest file.

    Returns
    -------
    pandas.DataFrame
        The table with a ``RangeIndex`` ``0..n-1`` and ``n >= 1``.

    Raises
    ------
    DatasetError
        If the file does not exist, has an unsupported suffix, cannot be parsed
        (the parser's message is included) or has no data rows.
    """
    p = Path(path).expanduser()
    fmt, compression = table_format(p)
    if not p.exists():
        raise DatasetError(
            f"manifest file not found: {str(p)!r} (looked in {str(p.absolute().parent)!r}); "
            "check the path."
        )
    if p.is_dir():
        raise DatasetError(f"manifest path {str(p)!r} is a directory; give the manifest file.")
    if fmt is None:
        raise _unsupported(p)
    try:
        if fmt == "csv":
            frame = _read_delimited(p, ",", compression)
        elif fmt == "tsv":
            frame = _read_delimited(p, "\t", compression)
        elif fmt == "jsonl":
            frame = _read_json_lines(p, compression)
        elif fmt == "json":
            frame = _read_json(p, compression)
        else:
            frame = _flatten_index(pd.read_parquet(p))
    except DatasetError:
        raise
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"cannot read {p.name}: it is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "re-save it as UTF-8."
        ) from exc
    except (OSError, ValueError, EOFError, ImportError) as exc:
        # pyarrow's ArrowInvalid is a ValueError; gzip's BadGzipFile an OSError.
        raise DatasetError(
            f"cannot parse {p.name} as {fmt}: {exc}; check that the file is a valid "
            f"{fmt} file (its suffix decides the reader)."
        ) from exc
    if len(frame) == 0:
        cols = ", ".join(map(str, frame.columns)) or "none"
        raise DatasetError(
            f"manifest {p.name} is empty: 0 data rows (columns: {cols}); it needs at least "
            "one image-caption row."
        )
    return frame


# --------------------------------------------------------------------------- validation


def remote_image_hint(n_remote: int) -> str:
    """Message for rows whose image is a URL (``remote_image``), for the CLI and errors.

    Parameters
    ----------
    n_remote : int
        How many rows have a remote image.
    """
    rows = "row has" if n_remote == 1 else "rows have"
    return (
        f"{n_remote} {rows} a remote image URL; pmpclean does not download images: "
        f"download them first, e.g. with {_IMG2DATASET}, and point the manifest at local files."
    )


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    return False


def _column_error(
    frame: pd.DataFrame, column: str, option: str, where: str, role: str
) -> DatasetError:
    present = [str(c) for c in frame.columns]
    msg = (
        f"column {column!r} not found in {where}; columns present: {', '.join(present)}. "
        f"Use {option} to name the {role} column."
    )
    close = [c for c in present if c.strip().lower() == column.strip().lower()]
    if close:
        msg += f" (Did you mean {close[0]!r}? Column names are case-sensitive.)"
    return DatasetError(msg)


def _resolve_local(value: str, base: str) -> str:
    if value.lower().startswith("file://"):
        value = unquote(urlparse(value).path)
    expanded = os.path.expanduser(value)
    return os.path.normpath(os.path.join(base, expanded))


def _stat_image(path: str) -> str:
    """Status of a local image from one ``stat`` call (no decoding)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: embedded NUL byte
        return "missing_image"
    if stat.S_ISDIR(st.st_mode):
        return "image_is_directory"
    if not stat.S_ISREG(st.st_mode):
        return "unreadable_image"  # a FIFO, socket or device: exists, but is no image file
    if st.st_size == 0:
        return "unreadable_image"
    return "ok"


def _format_rows(rows: Iterable[int], limit: int = 10) -> str:
    rows = list(rows)
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


def _check_ids(frame: pd.DataFrame, id_col: str, where: str) -> None:
    values = frame[id_col].tolist()
    missing = [
        i for i, v in enumerate(values) if _is_missing(v) or (isinstance(v, str) and not v.strip())
    ]
    if missing:
        raise DatasetError(
            f"column {id_col!r} (the id column) of {where} has no value in rows "
            f"{_format_rows(missing)} (0-based data rows); every row needs a unique id: fill "
            "them in, or use --id-col to name another column (or none to use row numbers)."
        )
    first_seen: dict[Any, int] = {}
    for i, v in enumerate(values):
        key = v if isinstance(v, (str, int, float, np.integer, np.floating)) else repr(v)
        if key in first_seen:
            rows = [j for j, w in enumerate(values) if w == v]
            raise DatasetError(
                f"duplicate id {v!r} in column {id_col!r} of {where}: rows {_format_rows(rows)} "
                "(0-based data rows); ids must be unique per row: fix the duplicates, or use "
                "--id-col to name a column that is unique (or none to use row numbers)."
            )
        first_seen[key] = i


def read_manifest(  # noqa: C901 - see the comment below
    path_or_frame: str | os.PathLike[str] | pd.DataFrame,
    *,
    image_col: str = "image",
    text_col: str = "caption",
    id_col: str | None = None,
    label_col: str | None = None,
    check_files: bool = True,
    root: str | os.PathLike[str] | None = None,
) -> Manifest:
    # long: numpydoc of 48 lines; the checks at the door, each naming its column or row
    """Read a manifest and validate it once: columns, ids, image files and captions.

    Parameters
    ----------
    path_or_frame : str, Path or pandas.DataFrame
        A manifest file (see :func:`read_table`) or an in-memory table.
    image_col, text_col : str
        Columns holding the image path (or identifier) and the caption.
    id_col : str, optional
        Column of unique row ids. Missing or duplicate ids raise.
    label_col : str, optional
        Column of class labels (for the label audit); only its presence is checked.
    check_files : bool, default True
        Look up local image files and flag URLs. Set to ``False`` when embeddings are
        precomputed: then the filesystem is never touched and the image cell is any
        identifier (used only to group rows of the same image).
    root : str or Path, optional
        Folder that relative image paths resolve against. Default: the manifest's
        folder, or the current directory for a DataFrame.

    Returns
    -------
    Manifest
        With ``len(manifest) == n`` input rows: no row is ever dropped; rows that
        cannot be used carry a non-``"ok"`` status (see the module docstring for the
        statuses and their precedence).

    Raises
    ------
    DatasetError
        The file cannot be read (see :func:`read_table`); a named column is missing
        (the message lists the columns present and the option to use); the id column
        has missing or duplicate values; with ``check_files=True`` no row has a usable
        image (every image is remote, missing or empty; the message says how paths
        were resolved or how to download); no row has a usable caption.
    TypeError
        If ``path_or_frame`` is neither a path nor a DataFrame.

    Examples
    --------
    >>> import pandas as pd
    >>> m = read_manifest(pd.DataFrame({"image": ["a", "a", ""], "caption": ["x", " ", "y"]}),
    ...                   check_files=False)
    >>> m.status.tolist()
    ['ok', 'empty_caption', 'missing_value']
    >>> m.image_index.tolist(), m.unique_images
    ([0, 0, -1], ['a'])
    """
    path: Path | None
    if isinstance(path_or_frame, pd.DataFrame):
        path = None
        frame = _flatten_index(path_or_frame).copy()
        if len(frame) == 0:
            raise DatasetError(
                "manifest DataFrame is empty: 0 rows; it needs at least one image-caption row."
            )
        where = "the manifest DataFrame"
        base = os.path.abspath(os.fspath(root)) if root is not None else os.getcwd()
    elif isinstance(path_or_frame, (str, os.PathLike)):
        path = Path(path_or_frame).expanduser().absolute()
        frame = read_table(path)
        where = path.name
        base = (
            os.path.abspath(os.path.expanduser(os.fspath(root)))
            if root is not None
            else str(path.parent)
        )
    else:
        raise TypeError(
            "read_manifest expects a path or a pandas DataFrame, not "
            f"{type(path_or_frame).__name__}"
        )

    columns = {
        "image_col": image_col,
        "text_col": text_col,
        "id_col": id_col,
        "label_col": label_col,
    }
    for key, column in columns.items():
        if column is not None and column not in frame.columns:
            raise _column_error(frame, column, _COLUMN_OPTIONS[key], where, _COLUMN_ROLES[key])
    if image_col == text_col:
        raise DatasetError(
            f"the image column and the caption column are both {image_col!r} in {where}; "
            "use --image-col and --text-col to name two different columns."
        )
    if id_col is not None:
        _check_ids(frame, id_col, where)

    n = len(frame)
    image_values = frame[image_col].tolist()
    text_values = frame[text_col].tolist()

    status = np.full(n, "ok", dtype=object)
    image_refs = np.full(n, "", dtype=object)
    image_index = np.full(n, -1, dtype=np.int64)
    unique_images: list[str] = []
    unique_status: list[str] = []
    seen: dict[str, int] = {}

    for i, value in enumerate(image_values):
        if isinstance(value, (bytes, bytearray, memoryview, dict)):
            raise DatasetError(
                f"column {image_col!r} of {where} holds embedded image data "
                f"({type(value).__name__} in row {i}), not file paths; pmpclean reads images "
                "from files: write the images to disk and put their paths in the column."
            )
        if _is_missing(value):
            status[i] = "missing_value"
            continue
        raw = value if isinstance(value, str) else str(value)
        if not raw.strip():
            status[i] = "missing_value"
            continue
        if check_files:
            text = raw.strip()
            if is_url(text) and not text.lower().startswith("file://"):
                ref, row_status = text, "remote_image"
            else:
                ref, row_status = _resolve_local(text, base), ""
        else:
            ref, row_status = raw, "ok"
        idx = seen.get(ref)
        if idx is None:
            idx = len(unique_images)
            seen[ref] = idx
            unique_images.append(ref)
            # stat each unique image once, however many captions it has
            unique_status.append(row_status or _stat_image(ref))
        image_refs[i] = ref
        image_index[i] = idx
        status[i] = unique_status[idx]

    captions = np.full(n, "", dtype=object)
    for i, value in enumerate(text_values):
        usable = isinstance(value, str) and bool(value.strip())
        if usable:
            captions[i] = value
        elif status[i] == "ok":
            status[i] = "empty_caption"

    manifest = Manifest(
        path=path,
        frame=frame,
        image_col=image_col,
        text_col=text_col,
        id_col=id_col,
        label_col=label_col,
        image_refs=image_refs,
        image_index=image_index,
        unique_images=unique_images,
        captions=captions,
        status=status,
    )
    _check_usable(manifest, text_values, where, base, check_files)
    return manifest


def _check_usable(
    manifest: Manifest, text_values: list[Any], where: str, base: str, check_files: bool
) -> None:
    """Raise when the manifest as a whole cannot be used (not one usable image/caption)."""
    status = manifest.status
    n = len(status)
    image_bad = ~np.isin(status, ("ok", "empty_caption"))  # no usable image
    if image_bad.all():
        n_remote = int((status == "remote_image").sum())
        if n_remote == n:
            raise DatasetError(
                f"every image in column {manifest.image_col!r} of {where} is remote: "
                + remote_image_hint(n_remote)
            )
        if (status == "missing_value").all():
            raise DatasetError(
                f"column {manifest.image_col!r} of {where} is empty in all {n} rows; "
                "use --image-col to name the column that holds the image paths."
            )
        missing = np.flatnonzero(status == "missing_image")
        if len(missing) and check_files:
            example = manifest.image_refs[missing[0]]
            raw = manifest.frame[manifest.image_col].iloc[int(missing[0])]
            raise DatasetError(
                f"none of the images in column {manifest.image_col!r} of {where} can be used "
                f"({_status_summary(manifest)}); e.g. row {missing[0]}: {raw!r} was looked for "
                f"at {example!r}. Relative paths resolve against {base!r}: use --root to name "
                "the folder the image paths are relative to."
            )
        raise DatasetError(
            f"none of the images in column {manifest.image_col!r} of {where} can be used "
            f"({_status_summary(manifest)}); fix the image files or paths."
        )
    if not any(isinstance(v, str) and v.strip() for v in text_values):
        first = text_values[0]
        dtype = manifest.frame[manifest.text_col].dtype
        raise DatasetError(
            f"column {manifest.text_col!r} of {where} has no caption text: all {n} values are "
            f"empty or not strings (dtype {dtype}, first value {first!r}); use --text-col to "
            "name the column that holds the captions."
        )


def _status_summary(manifest: Manifest) -> str:
    counts = manifest.status_counts()
    return ", ".join(f"{k}: {v}" for k, v in counts.items() if v)


# --------------------------------------------------------------------------- images


#: Colour that transparent pixels are composited onto when an image is flattened to
#: RGB (white, as a browser shows a transparent PNG on a page).
IMAGE_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(im: Image.Image, *, background: tuple[int, int, int] = IMAGE_BACKGROUND) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, keeping what it shows.

    ``PIL.Image.convert("RGB")`` clips wide integer and float modes at 255, so a
    16-bit PNG becomes a white image; here each mode's range is scaled instead:

    - 16-bit (``I;16``, ``I;16B``, ...): ``[0, 65535]`` to ``[0, 255]``.
    - ``I`` (32-bit integers): ``[0, 65535]`` when the values fit (how 16-bit files
      are often opened), else the image's own ``[min, max]``.
    - ``F`` (float): ``[0, 1]`` when the values fit, ``[0, 255]`` when those fit, else
      the image's own ``[min, max]``; NaN is black.
    - Transparency (``RGBA``, ``LA``, ``PA``, a palette or colour key with a
      transparent entry) is composited onto ``background`` (:data:`IMAGE_BACKGROUND`).
    - Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX``, ...) goes
      through Pillow's own conversion.

    Raises whatever Pillow raises for a mode it cannot convert.
    """
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        return _scaled_to_8bit(im).convert("RGB")
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return im.convert("RGB")


def _scaled_to_8bit(im: Image.Image) -> Image.Image:
    """A one-band 16-bit, ``I`` or ``F`` image as mode ``L``, scaled (see :func:`to_rgb`)."""
    from PIL import Image

    values = np.asarray(im).astype(np.float64)
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if im.mode in _SIXTEEN_BIT_MODES or (im.mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif im.mode == "F" and lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    scaled = (np.nan_to_num(values, nan=lo) - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def open_image(
    path: str | os.PathLike[str] | MemberRef | IO[bytes], *, draft_size: int | None = None
) -> Image.Image:
    """Decode an image file as it is meant to be seen: upright, 8-bit RGB.

    The one image decoder of pmpclean: embedding, fine-tuning and the report's
    thumbnails all read images through it. Every pixel is loaded, so truncated or
    corrupt files fail here rather than inside a batch (truncated JPEGs are caught
    as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is ``False``, Pillow's default,
    which pmpclean never changes). The EXIF orientation is applied (a phone photo
    stored sideways comes out upright), then :func:`to_rgb`.

    Parameters
    ----------
    path : str, Path, MemberRef or binary file object
        Local image file, an image inside a tar or Parquet file (read without unpacking
        anything), or an open binary stream (``io.BytesIO(data)``).
    draft_size : int, optional
        Only a small version is needed: JPEGs may then be decoded at a reduced scale
        (at least this many pixels on each side), which is much faster.

    Raises
    ------
    OSError, ValueError, ...
        Whatever opening or decoding raises; :func:`decode_image` turns it into a status.
    """
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF/palette chatter; failures raise anyway
        source = io.BytesIO(path.read()) if isinstance(path, MemberRef) else path
        with Image.open(source) as im:
            if draft_size is not None:
                im.draft(None, (draft_size, draft_size))
            im.load()
            try:
                upright = ImageOps.exif_transpose(im)  # a new image, even when upright
            except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
                upright = im.copy()
    return to_rgb(upright)


def decode_image(
    path: str | MemberRef, *, draft_size: int | None = None
) -> tuple[str, Image.Image | None]:
    """Decode with :func:`open_image` and return ``(status, RGB image or None)``. Never raises.

    Returns
    -------
    tuple
        ``("ok", image)``; ``("missing_image", None)`` if the file does not exist;
        ``("image_is_directory", None)`` if the path names a folder;
        ``("unreadable_image", None)`` for anything that cannot be decoded (for a
        :class:`MemberRef`, also a truncated member or a vanished container).
    """
    if isinstance(path, MemberRef):
        try:
            return "ok", open_image(path, draft_size=draft_size)
        except Exception:  # noqa: BLE001 - a member that cannot be read or decoded
            return "unreadable_image", None
    try:
        return "ok", open_image(path, draft_size=draft_size)
    except IsADirectoryError:
        return "image_is_directory", None
    except (FileNotFoundError, NotADirectoryError):
        return "missing_image", None
    except Exception:  # noqa: BLE001 - any decoding failure means "unreadable"
        if os.path.isdir(path):  # e.g. Windows raises PermissionError for a folder
            return "image_is_directory", None
        return "unreadable_image", None


def check_image(path: str) -> str:
    """Decode an image fully with :func:`decode_image` and return its status. Never raises.

    Parameters
    ----------
    path : str
        Local image file.

    Returns
    -------
    str
        ``"ok"``, ``"missing_image"`` if the file is gone, ``"image_is_directory"``
        for a folder, or ``"unreadable_image"`` for anything that cannot be decoded.
    """
    return decode_image(path)[0]


def image_fingerprint(path: str | MemberRef) -> str:
    """Cache key for an image file: ``"abs_path|size|mtime_ns"``.

    Changes whenever the file is replaced or rewritten, without reading its bytes. For a
    :class:`MemberRef`, the container's key followed by ``#`` and the member's place.

    Raises
    ------
    DatasetError
        If the file does not exist.
    """
    if isinstance(path, MemberRef):
        where = f"{path.name}@{path.offset}+{path.size}|{path.row_group}:{path.row}:{path.field}"
        return f"{image_fingerprint(path.container)}#{where}"
    abs_path = os.path.abspath(os.path.expanduser(path))
    try:
        st = os.stat(abs_path)
    except OSError as exc:
        raise DatasetError(
            f"cannot fingerprint image {abs_path!r}: {exc.strerror or exc}; check that the "
            "file exists."
        ) from exc
    return f"{abs_path}|{st.st_size}|{st.st_mtime_ns}"


# --------------------------------------------------------------------------- writing


def _json_records(frame: pd.DataFrame) -> Iterable[dict[str, Any]]:
    columns = [str(c) for c in frame.columns]
    for row in frame.itertuples(index=False, name=None):
        yield {c: to_jsonable(v) for c, v in zip(columns, row, strict=True)}


def write_table(frame: pd.DataFrame, path: str | Path, *, force: bool = False) -> Path:
    """Write a table atomically, choosing the format from the file suffix.

    CSV/TSV are written without the index; a table read by :func:`read_table` and
    written back is unchanged. JSON lines are written one object per line (UTF-8,
    unescaped ``/``), ``.json`` as an array of records; missing values become ``null``.

    Parameters
    ----------
    frame : pandas.DataFrame
        Table to write (its index is not written).
    path : str or Path
        Output file; the suffix picks the format (see :data:`SUPPORTED_SUFFIXES`).
    force : bool, default False
        Overwrite an existing file.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    DatasetError
        If the file exists and ``force`` is false, or the suffix is unsupported.
    """
    p = Path(path).expanduser()
    fmt, compression = table_format(p)
    if fmt is None:
        raise _unsupported(p)
    if p.is_dir():
        raise DatasetError(f"cannot write {str(p)!r}: it is a directory; give a file name.")
    if p.exists() and not force:
        raise DatasetError(
            f"output file {str(p)!r} already exists; refusing to overwrite it: pass --force "
            "(force=True) to replace it, or choose another path."
        )
    with atomic_path(p) as tmp:
        if fmt in ("csv", "tsv"):
            frame.to_csv(
                tmp,
                sep="," if fmt == "csv" else "\t",
                index=False,
                encoding="utf-8",
                compression=compression,
            )
        elif fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            import io

            buf = io.StringIO()
            if fmt == "jsonl":
                for rec in _json_records(frame):
                    buf.write(json.dumps(rec, ensure_ascii=False))
                    buf.write("\n")
            else:
                json.dump(list(_json_records(frame)), buf, ensure_ascii=False, indent=1)
                buf.write("\n")
            data = buf.getvalue().encode("utf-8")
            if compression is not None:
                data = _compress(data, compression)
            tmp.write_bytes(data)
    return p


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        import gzip

        return gzip.compress(data, mtime=0)
    if compression == "bz2":
        import bz2

        return bz2.compress(data)
    if compression == "xz":
        import lzma

        return lzma.compress(data)
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def text_groups(captions: Iterable[object]) -> np.ndarray:
    """Caption-text id per row, (n,) int64: rows whose caption text is identical after
    trimming and case folding share a value (the scan and fine-tuning both group so)."""
    keys = pd.Series(list(captions), dtype=object).fillna("").astype(str)
    codes, _ = pd.factorize(keys.str.strip().str.casefold())
    return codes.astype(np.int64)
