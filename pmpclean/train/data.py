"""Training data: the usable rows of a manifest or scan folder, the validation
hold-out, and the decoded (optionally cached) images."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._utils import Progress
from ..config import FinetuneConfig
from ..data import text_groups
from ..errors import ConfigError, DatasetError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..data import Manifest, MemberRef

logger = logging.getLogger(__name__)


_AUDIT_FILES = ("audit.parquet", "audit.csv")


_CACHE_LIMIT_BYTES = 1 << 30  # cache_images=None caches preprocessed images up to 1 GiB


@dataclass
class _Data:
    """Usable rows of the dataset, with everything the loop needs per row."""

    source: str
    paths: list[str | MemberRef]  # unique images: paths, or members of shards
    image_index: np.ndarray  # (n,) int64 index into paths
    captions: list[str]  # (n,)
    text_group: np.ndarray  # (n,) int64, identical caption text shares a value
    rows: np.ndarray  # (n,) input row numbers
    audit_clean: np.ndarray | None  # (n,) bool from a scan's is_mismatched, or None
    audit_prob: np.ndarray | None  # (n,) float in [0, 1]: the scan's match_score (its flag
    #   as 0/1 where missing), or None
    true_mismatch: np.ndarray | None  # (n,) bool from truth_col, or None
    n_input: int
    n_unusable: int
    audit_partner: np.ndarray | None = None  # (n,) int64 input row whose caption the scan
    #   proposed for this row's image (-1: none), or None
    audit_confidence: np.ndarray | None = None  # (n,) float: the scan's rematch_confidence
    image_ref: np.ndarray | None = None  # (n,) manifest image id of the row (with truth_col)
    true_ref: np.ndarray | None = None  # (n,) manifest image id of the caption's true row


def _read_dataset(dataset: Any, cfg: FinetuneConfig, *, what: str = "dataset") -> _Data:
    """Read a manifest, a scan output folder or an audit table into its usable rows.

    The truth column is read for the training ``dataset`` only.
    """
    from ..data import read_manifest, read_table
    from ..sources import read_source

    with_truth = what == "dataset"

    image_col = cfg.image_col
    audit = False
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        shards = _shard_source(path, what)
        if shards is not None:  # img2dataset shards, Hugging Face Parquet, an imagefolder
            manifest = read_source(shards, text_col=cfg.text_col)
            return _from_manifest(manifest, cfg, source=shards, with_truth=with_truth)
        if path.is_dir():
            path = next(path / name for name in _AUDIT_FILES if (path / name).is_file())
        if not path.exists():
            raise DatasetError(
                f"{what} {path} does not exist; pass a manifest file or a scan folder."
            )
        frame = read_table(path)
        source = str(path.resolve())
        root = path.resolve().parent
    elif isinstance(dataset, pd.DataFrame):
        frame = dataset.reset_index(drop=True)
        source = "<DataFrame>"
        root = Path.cwd()
    elif hasattr(dataset, "frame") and hasattr(dataset, "image_refs"):  # a data.Manifest
        name = str(getattr(dataset, "path", None) or "<Manifest>")
        return _from_manifest(dataset, cfg, source=name, with_truth=with_truth)
    else:
        raise TypeError(
            f"{what} must be a path, a pandas DataFrame or a pmpclean Manifest, "
            f"not {type(dataset).__name__}."
        )
    scanned = None
    if "is_mismatched" in frame.columns and "image_path" in frame.columns:
        audit = True
        image_col = "image_path"  # a scan's resolved paths (or ids, with precomputed embeddings)
        if isinstance(dataset, (str, Path)):
            root = _scanned_manifest_folder(Path(source).parent) or root
            scanned = _scanned_shards(Path(source).parent)
    if scanned is not None:  # the audit of shards: their images are read from the shards
        manifest = _audited_shards(scanned, frame, cfg, source)
    else:
        manifest = read_manifest(frame, image_col=image_col, text_col=cfg.text_col, root=root)
    data = _from_manifest(manifest, cfg, source=source, with_truth=with_truth)
    if audit:
        flags = frame["is_mismatched"].to_numpy()[data.rows]
        data.audit_clean = ~np.asarray(
            [str(v).strip().lower() in ("true", "1", "1.0") for v in flags], dtype=bool
        )
        prob = data.audit_clean.astype(np.float64)
        if "match_score" in frame.columns:
            score = pd.to_numeric(frame["match_score"], errors="coerce").to_numpy()[data.rows]
            ok = np.isfinite(score) & (score >= 0) & (score <= 1)
            prob[ok] = score[ok]
        data.audit_prob = prob
        if "proposed_row" in frame.columns and "rematch_confidence" in frame.columns:
            partner = pd.to_numeric(frame["proposed_row"], errors="coerce").to_numpy()[data.rows]
            conf = pd.to_numeric(frame["rematch_confidence"], errors="coerce").to_numpy()[data.rows]
            proposed = np.isfinite(partner) & (partner >= 0)
            usable = (
                proposed
                & (partner == np.floor(np.nan_to_num(partner)))
                & (partner < len(frame))
                & np.isfinite(conf)
                & (conf >= 0)
                & (conf <= 1)
            )
            given = frame["proposed_row"].notna().to_numpy()[data.rows]
            abstained = np.isfinite(partner) & (partner < 0)
            bad = np.flatnonzero(given & ~abstained & ~usable)
            if bad.size:
                first = int(data.rows[bad[0]])
                warnings.warn(
                    f"{source}: {bad.size} row(s) have a proposed_row that is not a row "
                    f"number of the table or a rematch_confidence outside [0, 1] (first: row "
                    f"{first}: proposed_row={frame['proposed_row'].iloc[first]!r}, "
                    "rematch_confidence="
                    f"{frame['rematch_confidence'].iloc[first]!r}); they are kept and train "
                    "with no proposal. Rerun `pmpclean scan` to regenerate the audit table.",
                    stacklevel=5,
                )
            data.audit_partner = np.where(usable, np.nan_to_num(partner), -1).astype(np.int64)
            data.audit_confidence = np.where(usable, np.nan_to_num(conf), 0.0)
    return data


def _shard_source(path: Path, what: str) -> str | None:
    """``path`` when it is a dataset :func:`pmpclean.sources.read_source` reads beyond a
    manifest file (a folder or pattern of shards, ...), None for a manifest or scan folder."""
    from ..sources import source_kind

    if path.is_dir():
        if any((path / name).is_file() for name in _AUDIT_FILES):
            return None
        try:
            source_kind(path)
        except DatasetError:
            raise DatasetError(
                f"{what} {path} is a folder without {' or '.join(_AUDIT_FILES)}, and not a "
                "dataset folder either (img2dataset shards, Hugging Face Parquet, an "
                "imagefolder); pass a manifest file (CSV, Parquet, ...), such a folder, or "
                "the output folder of `pmpclean scan`."
            ) from None
        return str(path)
    if not path.exists() and not any(c in str(path) for c in "{*?["):
        return None
    return str(path) if source_kind(path) != "table" else None


def _audited_shards(shards: str, audit: pd.DataFrame, cfg: FinetuneConfig, source: str) -> Manifest:
    """The shards an audit table audited, read again (their rows as the audit's)."""
    from ..sources import read_source

    manifest = read_source(shards, text_col=cfg.text_col)
    same = len(manifest) == len(audit) and (
        "key" not in audit.columns
        or manifest.frame["key"].astype(str).tolist() == audit["key"].astype(str).tolist()
    )
    if not same:
        raise DatasetError(
            f"{source} audits the shards {shards}, which have changed since the scan "
            f"({len(audit)} rows then, {len(manifest)} now, or other keys); scan them "
            "again (pmpclean scan) before fine-tuning on the audit."
        )
    return manifest


def _scanned_shards(scan_dir: Path) -> str | None:
    """The shard source a scan audited (from its summary.json), when it was one."""
    from ..sources import source_kind

    summary = scan_dir / "summary.json"
    try:
        source = json.loads(summary.read_text(encoding="utf-8")).get("manifest")
    except (OSError, ValueError):
        return None
    if not source:
        return None
    try:
        kind = source_kind(source)
    except DatasetError:
        return None
    return str(source) if kind not in ("table", "imagefolder") else None


def _scanned_manifest_folder(scan_dir: Path) -> Path | None:
    """Folder of the manifest a scan audited (from its summary.json), if recorded."""
    summary = scan_dir / "summary.json"
    if not summary.is_file():
        return None
    try:
        manifest = json.loads(summary.read_text(encoding="utf-8")).get("manifest")
    except (OSError, ValueError):
        return None
    return Path(manifest).parent if manifest else None


def _from_manifest(
    manifest: Manifest, cfg: FinetuneConfig, *, source: str, with_truth: bool = True
) -> _Data:
    ok = np.flatnonzero(manifest.ok)
    if ok.size == 0:
        raise DatasetError(
            f"{source}: no usable (image, caption) row; every row has a problem status "
            f"({manifest.status_counts()}). Fix the image paths or captions first."
        )
    img_idx = np.asarray(manifest.image_index)[ok]
    uniq, inv = np.unique(img_idx, return_inverse=True)
    paths = [manifest.image_source(int(u)) for u in uniq]
    captions = [str(c) for c in np.asarray(manifest.captions)[ok]]
    text_group = text_groups(captions)
    true_mis = None
    if cfg.truth_col is not None and with_truth:
        if cfg.truth_col not in manifest.frame.columns:
            raise DatasetError(
                f"{source}: truth column {cfg.truth_col!r} not found; columns are "
                f"{', '.join(map(str, manifest.frame.columns))}. Pass the right truth_col or none."
            )
        from ..sources import truth_rows

        all_idx = np.asarray(manifest.image_index)
        tr = truth_rows(manifest, cfg.truth_col)[ok]
        true_mis = all_idx[tr] != all_idx[ok]
        image_ref, true_ref = all_idx[ok].astype(np.int64), all_idx[tr].astype(np.int64)
    else:
        image_ref = true_ref = None
    return _Data(
        source=source,
        paths=paths,
        image_index=inv.astype(np.int64).ravel(),
        captions=captions,
        text_group=text_group,
        rows=ok.astype(np.int64),
        audit_clean=None,
        audit_prob=None,
        true_mismatch=true_mis,
        n_input=len(manifest),
        n_unusable=int(len(manifest) - ok.size),
        image_ref=image_ref,
        true_ref=true_ref,
    )


def _subset(data: _Data, rows: np.ndarray) -> _Data:
    """Rows ``rows`` (positions into data) as a standalone _Data with compact image ids."""
    uniq, inv = np.unique(data.image_index[rows], return_inverse=True)
    return _Data(
        source=data.source,
        paths=[data.paths[int(u)] for u in uniq],
        image_index=inv.astype(np.int64).ravel(),
        captions=[data.captions[int(r)] for r in rows],
        text_group=pd.factorize(pd.Series(data.text_group[rows]))[0].astype(np.int64),
        rows=data.rows[rows],
        audit_clean=None if data.audit_clean is None else data.audit_clean[rows],
        audit_prob=None if data.audit_prob is None else data.audit_prob[rows],
        true_mismatch=None if data.true_mismatch is None else data.true_mismatch[rows],
        n_input=data.n_input,
        n_unusable=data.n_unusable,
        audit_partner=None if data.audit_partner is None else data.audit_partner[rows],
        audit_confidence=None if data.audit_confidence is None else data.audit_confidence[rows],
        image_ref=None if data.image_ref is None else data.image_ref[rows],
        true_ref=None if data.true_ref is None else data.true_ref[rows],
    )


#: Fewest images validation measures recall on (with one, every recall is 1).
_MIN_VAL_IMAGES = 2


#: Fewest images left for training before ``val_fraction`` is raised to hold out
#: :data:`_MIN_VAL_IMAGES`. From 8 on, the two held-out images cost at most a fifth of
#: the data (2 of 10); below, validation would take more than that from a dataset too
#: small to spare it, to rank captions among 2 images, where R@1 is right half the time
#: by chance: too noisy to pick an epoch by. Such a dataset trains without validation.
_MIN_TRAIN_IMAGES = 8


@dataclass(frozen=True)
class _Holdout:
    """The validation split: row positions, and what it held out and why."""

    train: np.ndarray  # (n_train,) row positions
    val: np.ndarray  # (n_val,) row positions, empty without validation
    source: str | None  # how the validation images were chosen (None: no validation)
    skipped: str | None  # why val_fraction > 0 gave no validation (None: it did not)


def _split_holdout(data: _Data, fraction: float, seed: int) -> _Holdout:
    """Hold out ``round(fraction * images)`` images for validation, with their rows.

    All rows of an image stay together. When that is fewer than 2 images (a small first
    sample), 2 are held out if at least 8 remain for training (see
    :data:`_MIN_TRAIN_IMAGES`); otherwise the dataset trains without validation and
    ``skipped`` says why.
    """
    n_img = len(data.paths)
    rows = np.arange(len(data.image_index))
    if fraction <= 0:
        return _Holdout(rows, rows[:0], None, None)
    n_val = int(round(fraction * n_img))
    source = f"held out {n_val} of {n_img} images (val_fraction {fraction:g}, seed {seed})"
    if n_val < _MIN_VAL_IMAGES:
        if n_img - _MIN_VAL_IMAGES < _MIN_TRAIN_IMAGES:
            return _Holdout(
                rows,
                rows[:0],
                None,
                f"val_fraction={fraction:g} holds out {n_val} of {n_img} images, and holding "
                f"out {_MIN_VAL_IMAGES} (the fewest validation can rank) would leave fewer "
                f"than {_MIN_TRAIN_IMAGES} for training: training on all {n_img} images "
                "without validation, and the last epoch is saved. Pass val_dataset to "
                "validate on other data.",
            )
        source = (
            f"held out {_MIN_VAL_IMAGES} of {n_img} images (val_fraction {fraction:g} gives "
            f"{n_val}; validation needs {_MIN_VAL_IMAGES}; seed {seed})"
        )
        n_val = _MIN_VAL_IMAGES
    if n_img - n_val < 2:
        raise ConfigError(
            f"Only {n_img - n_val} training image(s) left after holding out {n_val}; "
            "lower val_fraction or add data."
        )
    rng = np.random.default_rng([seed, 1])
    val_imgs = np.zeros(n_img, dtype=bool)
    val_imgs[rng.permutation(n_img)[:n_val]] = True
    is_val = val_imgs[data.image_index]
    return _Holdout(np.flatnonzero(~is_val), np.flatnonzero(is_val), source, None)


class _ImageRows:
    """Map-style dataset: row position -> preprocessed image tensor (for a DataLoader)."""

    def __init__(self, paths: list[str], image_index: np.ndarray, preprocess: Any) -> None:
        self.paths = paths
        self.image_index = image_index
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, row: int) -> Any:
        from ..data import open_image

        return self.preprocess(open_image(self.paths[int(self.image_index[row])]))


class _Images:
    """Preprocessed images of one _Data, cached in RAM or decoded per batch."""

    def __init__(self, data: _Data, preprocess: Any, *, cache: bool | None, workers: int) -> None:
        self.data = data
        self.preprocess = preprocess
        self.workers = workers
        self.cache: torch.Tensor | None = None
        self._want_cache = cache

    def prepare(self, progress: Progress | None) -> list[int]:
        """Decode every image once (cached) or check it (streamed); return unusable image ids."""
        import torch

        from ..data import check_image

        paths = self.data.paths
        bad: list[int] = []
        kept: dict[int, torch.Tensor] = {}
        cache = self._want_cache
        for i, path in enumerate(paths):
            if cache is False:
                if check_image(path) != "ok":
                    bad.append(i)
            else:
                tensor = self._decode(path)
                if tensor is None:
                    bad.append(i)
                else:
                    if cache is None:  # decide from the first image: cache when all fit
                        need = tensor.numel() * tensor.element_size() * len(paths)
                        cache = need <= _CACHE_LIMIT_BYTES
                    if cache:
                        kept[i] = tensor
                    else:
                        kept.clear()  # images so far decoded fine; stream from now on
            if progress is not None and (i % 256 == 255 or i == len(paths) - 1):
                progress("loading images", i + 1, len(paths))
        if cache and kept:
            fill = torch.zeros_like(next(iter(kept.values())))
            self.cache = torch.stack([kept.get(i, fill) for i in range(len(paths))])
        return bad

    def _decode(self, path: str) -> torch.Tensor | None:
        from ..data import decode_image

        image = decode_image(path)[1]
        if image is None:
            return None
        try:
            return self.preprocess(image)
        except Exception:  # noqa: BLE001 - e.g. degenerate sizes: the image is unusable
            return None

    def batches(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (row positions, images (b, 3, H, W)) for each batch of row positions."""
        import torch

        if self.cache is not None:
            for rows in batches:
                yield rows, self.cache[torch.as_tensor(self.data.image_index[rows])]
            return
        loader = torch.utils.data.DataLoader(
            _ImageRows(self.data.paths, self.data.image_index, self.preprocess),
            batch_sampler=[list(map(int, b)) for b in batches],
            num_workers=self.workers,
        )
        for rows, imgs in zip(batches, loader, strict=True):
            yield rows, imgs


def _usable_images(
    data: _Data, preprocess: Any, cfg: FinetuneConfig, progress: Progress | None, role: str
) -> tuple[_Data, _Images]:
    """Decode (or check) every image; drop the rows of images that cannot be decoded."""
    images = _Images(data, preprocess, cache=cfg.cache_images, workers=cfg.workers)
    bad = images.prepare(progress)
    if not bad:
        return data, images
    warnings.warn(
        f"{len(bad)} {role} image(s) could not be decoded and are skipped "
        f"(first: {data.paths[bad[0]]}).",
        stacklevel=5,
    )
    keep = np.flatnonzero(~np.isin(data.image_index, bad))
    if keep.size == 0:
        raise DatasetError(f"{data.source}: none of the {role} images can be decoded.")
    data = _subset(data, keep)
    images = _Images(data, preprocess, cache=cfg.cache_images, workers=cfg.workers)
    images.prepare(None)
    return data, images
