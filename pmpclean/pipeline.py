"""The pipeline, top to bottom: read → embed → score → split → rematch → labels → write.

Every public entry point of pmpclean (``scan``, ``rematch``, ``embed``, ``corrupt``)
lives here and returns a typed result. Nothing here prints; progress goes through
the optional ``progress(stage, done, total)`` callback.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from ._numfmt import finite_or_none
from ._utils import Timer, atomic_open, atomic_path, claim_output, finite_rows, to_jsonable
from .config import ScanConfig, check_settings, config_from_dict, config_to_dict
from .data import text_groups
from .errors import ConfigError, DatasetError

__all__ = [
    "ScanResult",
    "RematchResult",
    "EmbedResult",
    "CorruptResult",
    "scan",
    "rematch",
    "embed",
    "corrupt",
    "default_out_dir",
    "scan_fingerprint",
    "split_scores",
    "saved_scan_config",
    "AUDIT_COLUMNS",
    "ACTIONS",
    "POLICIES",
]

Progress = Callable[[str, int, int], None]

#: Columns every audit table adds after the input columns (see README, "Output files").
AUDIT_COLUMNS = (
    "row",
    "status",
    "image_path",
    "similarity",
    "pair_score",
    "match_score",
    "is_mismatched",
    "proposed_row",
    "proposed_caption",
    "rematch_confidence",
    "candidate_row",
    "candidate_confidence",
    "alt_caption_row",
    "alt_caption_similarity",
    "alt_image_row",
    "alt_image_similarity",
    "runner_up_row",
    "runner_up_similarity",
    "action",
)
ACTIONS = ("keep", "rematch", "drop", "review")
POLICIES = ("rematch", "drop", "flag")


@dataclass
class ScanResult:
    """What :func:`scan` found and where it wrote it."""

    audit: pd.DataFrame  # one row per input row: input columns + AUDIT_COLUMNS (+ label columns)
    summary: dict[str, Any]  # the content of summary.json
    out_dir: Path | None  # None when write=False
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class RematchResult:
    """The cleaned and dropped manifests written by :func:`rematch`."""

    cleaned: pd.DataFrame
    dropped: pd.DataFrame
    info: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class EmbedResult:
    image: np.ndarray
    text: np.ndarray
    status: np.ndarray
    info: dict[str, Any]
    path: Path | None


@dataclass
class CorruptResult:
    frame: pd.DataFrame
    info: dict[str, Any]
    path: Path | None


# --------------------------------------------------------------------------- helpers


def default_out_dir(manifest: str | Path) -> Path:
    """``data/captions.csv`` → ``data/captions.pmpclean/`` (beside the manifest); shards
    named by a pattern or list (``data/{00000..00003}.tar``) → ``data.pmpclean/``, beside
    their common folder, as for the folder ``data/`` itself."""
    p = Path(manifest)
    if not p.exists() and re.search(r"[{}*?\[]|::", str(manifest)):
        from .sources import pattern_folder

        folder = pattern_folder(manifest)
        return folder.with_name(folder.name + ".pmpclean")
    return p.with_name(p.stem + ".pmpclean")


def _file_sha256(path: Path) -> str:
    from .sources import source_sha256

    return source_sha256(path)  # a shard source: its files' names, sizes and times


def _versions() -> dict[str, str]:
    """Versions of the libraries that shaped the result.

    A module the run already imported reports its ``__version__``; the others are read
    from the installed package metadata instead of being imported: importing torch and
    open_clip only to read a version costs ~0.8 GB of memory and seconds on a scan from
    cached embeddings.
    """
    import sys
    from importlib import metadata

    out = {"pmpclean": __version__, "python": platform.python_version()}
    for name, mod, dists in [
        ("numpy", "numpy", ("numpy",)),
        ("pandas", "pandas", ("pandas",)),
        ("torch", "torch", ("torch",)),
        ("open_clip", "open_clip", ("open_clip_torch",)),
        ("pot", "ot", ("POT", "pot")),
        ("faiss", "faiss", ("faiss-cpu", "faiss-gpu", "faiss")),
    ]:
        module = sys.modules.get(mod)
        if module is not None:
            out[name] = str(getattr(module, "__version__", "?"))
            continue
        out[name] = "not installed"
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically, with NaN/inf as null and numpy scalars converted."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(to_jsonable(obj), fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return Path(path)


def _validate_audit_config(cfg: ScanConfig) -> None:
    """The audit settings against the ranges declared beside them (config.AuditConfig)."""
    check_settings(cfg.audit)


def _opt(**kwargs: Any) -> dict[str, Any]:
    """Drop None values so stage defaults apply."""
    return {k: v for k, v in kwargs.items() if v is not None}


# --------------------------------------------------------------------------- scan


def _read(source: str | Path | pd.DataFrame, cfg: ScanConfig) -> Any:
    from .sources import read_source

    d = cfg.data
    return read_source(
        source,
        image_col=d.image_col,
        text_col=d.text_col,
        id_col=d.id_col,
        label_col=d.label_col,
        check_files=cfg.embed.embeddings is None,
        root=d.root,
    )


def _embeddings(
    manifest: Any, cfg: ScanConfig, progress: Progress | None
) -> tuple[Any, dict[str, Any]]:
    from .embedding import embed_manifest
    from .engine import current_engine
    from .sources import load_source_embeddings

    e = cfg.embed
    if e.embeddings is not None:
        emb = load_source_embeddings(e.embeddings, manifest, pair=e.embeddings_pair)
        return emb, {"source": emb.source, "device": None, "model_work": False}
    engine = current_engine()
    if engine is not None:  # e.g. Ray: shard by shard on a cluster (pmpclean.engine)
        return engine.embed(manifest, cfg, progress)
    emb = embed_manifest(
        manifest,
        model=e.model,
        pretrained=e.pretrained,
        device=e.device,
        batch_size=e.batch_size,
        workers=e.workers,
        cache_dir=e.cache_dir,
        use_cache=e.use_cache,
        progress=progress,
    )
    info = {
        "source": emb.source,
        "model": e.model,
        "pretrained": e.pretrained,
        "device": _device_name(e.device),
        "random_weights": emb.source.endswith("/none"),
        "images_through_model": emb.n_model_images,
        "captions_through_model": emb.n_model_texts,
    }
    return emb, info


def _device_name(device: str) -> str:
    """The device the model ran on, as torch names it (``cpu``, ``cuda:0``, ``mps``)."""
    import torch

    from ._utils import resolve_device

    name = resolve_device(device)
    if name == "cuda":
        name = f"cuda:{torch.cuda.current_device()}"
    return name


def _no_evidence(n: int) -> dict[str, np.ndarray]:
    """Evidence columns of rows that were not scored: no row (-1), no similarity (NaN)."""
    rows = np.full(n, -1, dtype=np.int64)
    sims = np.full(n, np.nan)
    return {
        f"{kind}_{what}": (rows if what == "row" else sims).copy()
        for kind in ("alt_caption", "alt_image", "second_caption")
        for what in ("row", "similarity")
    }


def _evidence(ps: Any) -> dict[str, np.ndarray]:
    """The neighbours behind each pair score (:class:`pmpclean.score.PairScores`)."""
    return {
        name: np.asarray(getattr(ps, name), dtype=np.int64 if name.endswith("row") else float)
        for name in _no_evidence(0)
    }


def _runner_up(
    evidence: dict[str, np.ndarray], proposed_row: np.ndarray, text_group: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each rematch's runner-up: the best-fitting other caption that is not the proposal.

    By cosine to the image, from the scan's own neighbour search (the best alternative
    caption, or the second best when the best is the proposed text); -1 / NaN for rows
    without a proposal.
    """
    best, second = evidence["alt_caption_row"], evidence["second_caption_row"]
    has = proposed_row >= 0
    same = has & (best >= 0) & (text_group[np.maximum(best, 0)] == text_group[proposed_row])
    row = np.where(same, second, best)
    sim = np.where(same, evidence["second_caption_similarity"], evidence["alt_caption_similarity"])
    row = np.where(has, row, -1)
    return row.astype(np.int64), np.where(has & (row >= 0), sim, np.nan)


def _image_groups(image_index: np.ndarray) -> np.ndarray:
    """Rows of the same image share a group; rows without an image get groups of their own."""
    groups = np.asarray(image_index, dtype=np.int64).copy()
    missing = groups < 0
    if missing.any():
        start = int(groups.max(initial=-1)) + 1
        groups[missing] = start + np.arange(int(missing.sum()))
    return groups


def _actions(
    status: np.ndarray,
    match_score: np.ndarray,
    is_mismatched: np.ndarray,
    proposed_row: np.ndarray,
    confidence: np.ndarray,
    *,
    threshold: float,
    review_margin: float,
    min_confidence: float,
    undecided: bool = False,
) -> np.ndarray:
    """keep / rematch / drop / review for every row.

    Rows that could not be scored (status not ``ok``) get ``review``: nothing is known
    about their pair, so a person decides. So do all rows when the audit is
    ``undecided`` (the model cannot tell pairs apart).
    """
    action = np.full(len(status), "keep", dtype=object)
    scored = status == "ok"
    action[~scored] = "review"
    if undecided:
        action[:] = "review"
        return action
    proposal = is_mismatched & (proposed_row >= 0) & (confidence >= min_confidence)
    action[proposal] = "rematch"
    no_proposal = is_mismatched & ~proposal
    borderline = no_proposal & (match_score >= threshold - review_margin)
    action[no_proposal] = "drop"
    action[borderline] = "review"
    return action


def _evaluate(
    truth: np.ndarray,
    image_group: np.ndarray,
    valid: np.ndarray,
    match_score: np.ndarray,
    is_mismatched: np.ndarray,
    proposed_row: np.ndarray,
    confidence: np.ndarray,
) -> dict[str, Any]:
    from .evaluate import detection_metrics, precision_recall_points, rematch_metrics

    true_row = truth.astype(np.int64)
    true_mis = image_group[true_row] != image_group
    v = valid
    det = detection_metrics(true_mis[v], match_score[v], is_mismatched[v])
    rem = rematch_metrics(
        true_row,
        image_group,
        np.where(v, proposed_row, -1),
        np.where(v, confidence, 0.0),
        true_mis & v,
    )
    curve = precision_recall_points(true_mis[v], match_score[v])
    return {
        "n_true_mismatched": int((true_mis & v).sum()),
        "detection": det,
        "rematch": rem,
        "pr_curve": curve,
    }


def scan(
    source: str | Path | pd.DataFrame,
    *,
    config: ScanConfig | None = None,
    out_dir: str | Path | None = None,
    write: bool = True,
    force: bool = False,
    progress: Progress | None = None,
) -> ScanResult:
    """Audit a dataset: score every pair, flag mismatches, propose rematches, audit labels.

    Parameters
    ----------
    source : path or DataFrame
        The manifest (CSV, TSV, Parquet or JSON Lines), or a DataFrame.
    config : ScanConfig, optional
        Every setting; defaults as documented in :mod:`pmpclean.config`.
    out_dir : path, optional
        Where to write the audit (default: ``<manifest stem>.pmpclean/`` beside it).
    write : bool
        Write audit.parquet, audit.csv, summary.json, config.yaml and report.html.
    force : bool
        Replace an audit already in ``out_dir`` (without it, that is an error).
    progress : callable, optional
        ``progress(stage, done, total)`` for progress bars.

    Returns
    -------
    ScanResult
        ``audit`` has one row per input row, in input order: the input columns
        unchanged, then ``row``, ``status``, ``match_score`` ([0, 1], higher = more
        likely a true pair), ``is_mismatched``, ``proposed_row`` (-1 when none),
        ``proposed_caption``, ``rematch_confidence`` ([0, 1], 0 when none),
        ``candidate_row`` and ``candidate_confidence`` (the proposal before the
        ``min_confidence`` cut, so that ``rematch`` can apply another cut) and
        ``action`` (keep / rematch / drop / review).
    """
    cfg = config or ScanConfig()
    _validate_audit_config(cfg)

    if isinstance(source, pd.DataFrame):
        manifest_path: Path | None = None
        if write and out_dir is None:
            raise ConfigError("scan() of a DataFrame needs out_dir=... (or write=False).")
    else:
        manifest_path = Path(source)
    if not write:
        return _scan(source, manifest_path, cfg, None, progress)
    target = Path(out_dir) if out_dir is not None else default_out_dir(manifest_path)  # type: ignore[arg-type]
    with claim_output(target, folder=True):  # writable and ours before any work
        _refuse_existing_scan(target, force=force)
        return _scan(source, manifest_path, cfg, target, progress)


_SCAN_FILES = ("audit.parquet", "audit.csv", "summary.json", "config.yaml", "report.html")


def _refuse_existing_scan(target: Path, *, force: bool) -> None:
    found = [name for name in _SCAN_FILES if (target / name).exists()]
    if found and not force:
        raise DatasetError(
            f"{target} already holds an audit ({', '.join(found)}); pass --force to replace "
            "it, or --out with another folder."
        )


def _scan(  # noqa: C901 - the stages in order; the split part is the lead's (issue 18)
    source: str | Path | pd.DataFrame,
    manifest_path: Path | None,
    cfg: ScanConfig,
    target: Path | None,
    progress: Progress | None,
) -> ScanResult:
    # long: the scan's stages in order; its split part is being reworked (issue 18)
    """The work of :func:`scan`; writes the audit to ``target`` unless it is None."""
    timer = Timer()
    warn_list: list[str] = []

    with timer("read"):
        manifest = _read(source, cfg)
    n = len(manifest)
    frame: pd.DataFrame = manifest.frame
    clash = sorted(set(frame.columns) & set(AUDIT_COLUMNS))
    if clash:
        raise DatasetError(
            f"The manifest already has column(s) {', '.join(clash)}, which pmpclean's audit adds; "
            "rename them (or scan the original manifest rather than an audit table)."
        )
    if cfg.data.truth_col:
        from .sources import truth_rows

        truth = truth_rows(manifest, cfg.data.truth_col)
    else:
        truth = None

    with timer("embed"):
        emb, embed_info = _embeddings(manifest, cfg, progress)
    if embed_info.get("random_weights"):
        from .embedding import random_weights_warning

        # also on an embedding-cache hit, when the model is never loaded and so never warns
        warn_list.append(random_weights_warning(str(cfg.embed.model)))
    status = np.asarray(manifest.status, dtype=object).copy()
    # float16, memory-mapped when large: never copied whole (10M x 512 float32 = 20 GB)
    img, txt = emb.image, emb.text
    ok = status == "ok"
    finite = finite_rows(img) & finite_rows(txt)
    status[ok & ~finite] = "missing_embedding"
    valid = status == "ok"
    warn_list.extend(getattr(manifest, "notes", []) + getattr(emb, "notes", []))

    image_group = _image_groups(manifest.image_index)
    text_group = text_groups(manifest.captions)

    similarity = np.full(n, np.nan)
    evidence = _no_evidence(n)
    pair_score = np.full(n, np.nan)
    match_score = np.full(n, np.nan)
    is_mismatched = np.zeros(n, dtype=bool)
    proposed_row = np.full(n, -1, dtype=np.int64)
    confidence = np.zeros(n, dtype=np.float64)
    candidate_row = np.full(n, -1, dtype=np.int64)  # every proposal, before the cut
    candidate_confidence = np.zeros(n, dtype=np.float64)
    split_info: dict[str, Any] = {}
    rematch_info: dict[str, Any] | None = None
    pair_audit = True
    n_valid = int(valid.sum())

    if img.shape[1] != txt.shape[1]:
        pair_audit = False
        warn_list.append(
            f"Pair audit skipped: image embeddings are {img.shape[1]}-d and text embeddings "
            f"{txt.shape[1]}-d, so they share no space to compare pairs in"
            + (" (the label audit still runs)." if cfg.data.label_col else ".")
        )
        if not cfg.data.label_col:
            raise DatasetError(
                f"Image embeddings ({img.shape[1]}-d) and text embeddings ({txt.shape[1]}-d) "
                "differ in width, so pairs cannot be compared; give embeddings from one shared "
                "space, or a --label-col to audit labels only."
            )
    elif n_valid < 3:
        raise DatasetError(
            f"Only {n_valid} of {n} rows can be scored (status counts: "
            f"{_counts(status)}); at least 3 scoreable pairs are needed."
        )

    if pair_audit:
        from .neighbors import reuse_indexes
        from .rematching import calibrated_rematch
        from .score import pair_scores

        # the plants of the split are searched with the lists the real rows met
        with reuse_indexes():
            with timer("score"):
                ps = pair_scores(
                    img,
                    txt,
                    image_group=image_group,
                    text_group=text_group,
                    valid=valid,
                    progress=progress,
                    **_search_settings(cfg),
                )
            similarity = np.asarray(ps.similarity, dtype=np.float64)
            evidence = _evidence(ps)
            pair_score = np.asarray(ps.score, dtype=np.float64)
            with timer("split"):
                sp = split_scores(img, txt, pair_score, image_group, text_group, valid, cfg)
                sp = _engine_posteriors(sp, pair_score)
        match_score = np.asarray(sp.match_score, dtype=np.float64)
        is_mismatched = np.asarray(sp.is_mismatched, dtype=bool) & valid
        mix = sp.mixture or {}
        if sp.verdict == "undecided":
            warn_list.append(
                f"Undecided: {sp.verdict_reason}. No pair is dropped or rematched; every "
                "scored pair is set to review. Try a model that knows this kind of image "
                "(--model/--pretrained, a domain checkpoint), or fine-tune one first "
                "(pmpclean finetune)."
            )
        elif sp.verdict == "clean" and mix.get("method") == "planted":
            warn_list.append(f"No pair was flagged: {sp.verdict_reason}.")
        elif mix.get("bimodal") is False and mix.get("reason"):
            warn_list.append(f"No pair was flagged: {mix['reason']}")
        split_info = {
            "threshold": float(sp.threshold),
            "estimated_noise_rate": finite_or_none(sp.noise_rate),
            "estimated_noise_rate_interval": [finite_or_none(v) for v in sp.noise_interval],
            "verdict": sp.verdict,
            "verdict_reason": sp.verdict_reason,
            "mixture": sp.mixture,
        }
        if cfg.audit.rematch and sp.verdict != "undecided":
            with timer("rematch"):
                rm = calibrated_rematch(
                    img,
                    txt,
                    is_mismatched,
                    image_group=image_group,
                    text_group=text_group,
                    clean=valid & ~is_mismatched,
                    seed=cfg.seed,
                    progress=progress,
                    **_opt(
                        mass=cfg.audit.mass,
                        reg=cfg.audit.reg,
                        cost=cfg.audit.cost,
                        k=cfg.audit.candidates,
                        block_size=cfg.audit.block_size,
                        min_confidence=cfg.audit.min_confidence,
                    ),
                )
            proposed_row = np.asarray(rm.proposed_row, dtype=np.int64)
            confidence = np.asarray(rm.rematch_confidence, dtype=np.float64)
            candidate_row = np.asarray(rm.candidate_row, dtype=np.int64)
            candidate_confidence = np.asarray(rm.candidate_confidence, dtype=np.float64)
            rematch_info = dict(rm.info)
            rematch_info["n_suspects"] = int(is_mismatched.sum())
            rematch_info["n_proposed"] = int((proposed_row >= 0).sum())
            rematch_info["min_confidence"] = cfg.audit.min_confidence

    captions = np.asarray(manifest.captions, dtype=object)
    proposed_caption = np.where(proposed_row >= 0, captions[np.maximum(proposed_row, 0)], "")
    action = _actions(
        status,
        match_score,
        is_mismatched,
        proposed_row,
        confidence,
        threshold=cfg.audit.threshold,
        review_margin=cfg.audit.review_margin,
        min_confidence=cfg.audit.min_confidence,
        undecided=split_info.get("verdict") == "undecided",
    )

    audit = frame.copy()
    audit["row"] = np.arange(n, dtype=np.int64)
    audit["status"] = status
    audit["image_path"] = np.asarray(manifest.image_refs, dtype=object)
    audit["similarity"] = similarity
    audit["pair_score"] = pair_score
    audit["match_score"] = match_score
    audit["is_mismatched"] = is_mismatched
    audit["proposed_row"] = proposed_row
    audit["proposed_caption"] = proposed_caption.astype(object)
    audit["rematch_confidence"] = confidence
    audit["candidate_row"] = candidate_row
    audit["candidate_confidence"] = candidate_confidence
    for name in ("alt_caption", "alt_image"):
        audit[f"{name}_row"] = evidence[f"{name}_row"]
        audit[f"{name}_similarity"] = evidence[f"{name}_similarity"]
    audit["runner_up_row"], audit["runner_up_similarity"] = _runner_up(
        evidence, proposed_row, text_group
    )
    audit["action"] = action

    labels_summary = None
    if cfg.data.label_col:
        with timer("labels"):
            labels_summary = _label_audit(audit, manifest, img, txt, image_group, cfg, progress)

    evaluation = None
    if truth is not None and pair_audit:
        evaluation = _evaluate(
            truth, image_group, valid, match_score, is_mismatched, proposed_row, confidence
        )

    summary: dict[str, Any] = {
        "pmpclean_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest": str(manifest_path.resolve()) if manifest_path else None,
        "manifest_sha256": _file_sha256(manifest_path) if manifest_path else None,
        "fingerprint": scan_fingerprint(manifest_path, cfg) if manifest_path else None,
        "n_rows": n,
        "input_columns": [str(c) for c in frame.columns],
        "n_scored": n_valid if pair_audit else 0,
        "n_images": int(len(manifest.unique_images)),
        "status_counts": _counts(status),
        "action_counts": {a: int((action == a).sum()) for a in ACTIONS},
        "n_mismatched": int(is_mismatched.sum()),
        "verdict": split_info.get("verdict") or None,
        "verdict_reason": split_info.get("verdict_reason") or None,
        "estimated_noise_rate": split_info.get("estimated_noise_rate"),
        "estimated_noise_rate_interval": split_info.get("estimated_noise_rate_interval"),
        "threshold": cfg.audit.threshold,
        "pair_audit": pair_audit,
        "mixture": split_info.get("mixture"),
        "rematch": rematch_info,
        "model": embed_info,
        "evaluation": evaluation,
        "labels": labels_summary,
        "settings": config_to_dict(cfg),
        "versions": _versions(),
        "timings": {},
        "files": {},
        "warnings": warn_list,
    }
    result = ScanResult(audit=audit, summary=summary, out_dir=None)
    # the stages so far, for the report written below; summary.json adds the write
    summary["timings"] = {k: round(v, 4) for k, v in timer.seconds.items()}
    if target is not None:
        with timer("write"):
            _write_scan(result, target, cfg)
            _engine_write(result, target)
    summary["timings"] = {k: round(v, 4) for k, v in timer.seconds.items()}
    summary["stage_spans"] = [[name, round(a, 3), round(b, 3)] for name, a, b in timer.spans]
    if target is not None:
        write_json(target / "summary.json", summary)
    return result


def _search_settings(cfg: ScanConfig) -> dict[str, Any]:
    """The neighbour-search settings that make plant scores comparable to pair scores."""
    return {
        "k": cfg.audit.k,
        "exact_max": cfg.audit.exact_search_max,
        "nprobe": cfg.audit.search_nprobe,
        "seed": cfg.seed,
    }


def split_scores(
    img: np.ndarray,
    txt: np.ndarray,
    pair_score: np.ndarray,
    image_group: np.ndarray,
    text_group: np.ndarray,
    valid: np.ndarray,
    cfg: ScanConfig,
) -> Any:
    """The clean/suspect split of :func:`scan`, calibrated by planted mismatches.

    ``pair_score`` is :attr:`pmpclean.score.PairScores.score` of the same rows; the
    result is a :class:`pmpclean.split.Split` with the verdict.

    With ``audit.plants`` > 0 and at least 20 plants of each kind (about 40 scored rows),
    :func:`pmpclean.split.calibrated_split`; otherwise the bimodality mixture of
    :func:`pmpclean.split.split_pairs`.
    """
    from .score import plant_pairs, planted_scores
    from .split import Split, calibrated_split, split_pairs

    scored = valid & np.isfinite(pair_score)
    for what, groups in (("caption text", text_group), ("image", image_group)):
        if np.unique(groups[scored]).size < 2:
            # e.g. a scraper's template caption ("image") on every row: nothing to compare
            return Split(
                np.full(pair_score.size, np.nan),
                np.zeros(pair_score.size, dtype=bool),
                cfg.audit.threshold,
                float("nan"),
                {"bimodal": False, "reason": f"every scored row has the same {what}"},
                "undecided",
                f"every scored row has the same {what}, so there is nothing to tell pairs apart by",
            )
    if cfg.audit.plants > 0:
        plants = plant_pairs(
            pair_score, img, image_group=image_group, n_plants=cfg.audit.plants, seed=cfg.seed
        )
        if min(plants[kind][0].size for kind in ("random", "similar")) >= 20:
            # every kind scored in one call: the dataset's neighbour index is built once
            sizes = [src.size for src, _ in plants.values()]
            planted = planted_scores(
                img,
                txt,
                np.concatenate([src for src, _ in plants.values()]),
                np.concatenate([dst for _, dst in plants.values()]),
                image_group=image_group,
                text_group=text_group,
                valid=valid,
                **_search_settings(cfg),
            )
            by_kind = dict(zip(plants, np.split(planted, np.cumsum(sizes)[:-1]), strict=True))
            return calibrated_split(
                pair_score,
                random_plants=by_kind.pop("random"),
                hard_plants=by_kind.pop("similar"),
                band_plants=by_kind,
                threshold=cfg.audit.threshold,
                seed=cfg.seed,
            )
    return split_pairs(
        pair_score,
        threshold=cfg.audit.threshold,
        max_fit=cfg.audit.mixture_fit_max,
        seed=cfg.seed,
    )


def _counts(values: np.ndarray) -> dict[str, int]:
    uniq, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    return {str(u): int(c) for u, c in zip(uniq, counts, strict=True)}


def _label_audit(
    audit: pd.DataFrame,
    manifest: Any,
    img: np.ndarray,
    txt: np.ndarray,
    image_group: np.ndarray,
    cfg: ScanConfig,
    progress: Progress | None,
) -> dict[str, Any]:
    from .labels import audit_labels

    label_col = cfg.data.label_col
    assert label_col is not None
    valid = finite_rows(img) & finite_rows(txt)
    valid &= np.asarray(manifest.status, dtype=object) == "ok"
    la = audit_labels(
        img,
        txt,
        manifest.frame[label_col].to_numpy(),
        valid=valid,
        groups=image_group,
        seed=cfg.seed,
        progress=progress,
        **_opt(method=cfg.labels.method, steps=cfg.labels.epochs),
    )
    for column, values in la.to_columns().items():
        audit[column] = values
    out = dict(la.summary)
    out["label_col"] = label_col
    return out


def _write_scan(result: ScanResult, target: Path, cfg: ScanConfig) -> None:
    import yaml

    from .report import write_report

    audit = result.audit
    files = {
        "audit_parquet": target / "audit.parquet",
        "audit_csv": target / "audit.csv",
        "summary": target / "summary.json",
        "config": target / "config.yaml",
        "report": target / "report.html",
    }
    with atomic_path(files["audit_parquet"]) as tmp:
        _to_parquet(audit, tmp)
    with atomic_path(files["audit_csv"]) as tmp:
        audit.to_csv(tmp, index=False)
    with atomic_open(files["config"], "w", encoding="utf-8") as fh:
        fh.write(
            f"# pmpclean {__version__} settings; "
            "repeat with: pmpclean scan MANIFEST --config this-file\n"
        )
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
    result.out_dir = target
    result.files = {k: str(v) for k, v in files.items()}
    result.summary["out_dir"] = str(target.resolve())
    result.summary["files"] = dict(result.files)
    report_audit = audit
    if cfg.embed.embeddings is not None and cfg.data.image_col in audit.columns:
        # no file was opened during the scan, but thumbnails of local images still help
        base = (
            Path(cfg.data.root)
            if cfg.data.root
            else (
                Path(result.summary["manifest"]).parent if result.summary.get("manifest") else None
            )
        )
        if base is not None:
            report_audit = audit.copy()
            report_audit["image_path"] = [
                str(base / p)
                if isinstance(p, str) and p and "://" not in p and not Path(p).is_absolute()
                else p
                for p in audit["image_path"]
            ]
    write_report(
        files["report"],
        report_audit,
        result.summary,
        gallery_size=cfg.gallery_size,
        image_col=cfg.data.image_col,
        text_col=cfg.data.text_col,
        label_col=cfg.data.label_col,
    )


def _engine_posteriors(sp: Any, pair_score: np.ndarray) -> Any:
    """An engine other than the local one computes the split's posteriors itself."""
    from .engine import current_engine

    engine = current_engine()
    return sp if engine is None else engine.split_posteriors(sp, pair_score)


def _engine_write(result: ScanResult, target: Path) -> None:
    """An engine other than the local one also writes each source shard's audit."""
    from .engine import current_engine

    engine = current_engine()
    if engine is None:
        return
    files, info = engine.write_shards(result.audit, target)
    result.files.update(files)
    result.summary["files"].update(files)
    result.summary["engine"] = info


def _to_parquet(frame: pd.DataFrame, path: Path) -> None:
    try:
        frame.to_parquet(path, index=False)
    except (TypeError, ValueError, ImportError) as first:
        # mixed-type object columns (e.g. JSON Lines with numbers and strings) → strings
        fixed = frame.copy()
        for col in fixed.columns:
            if fixed[col].dtype == object:
                fixed[col] = fixed[col].map(
                    lambda v: v if v is None or isinstance(v, str) else str(v)
                )
        try:
            fixed.to_parquet(path, index=False)
        except Exception as exc:  # noqa: BLE001
            raise DatasetError(f"Could not write Parquet file {path}: {exc}") from first


# --------------------------------------------------------------------------- rematch

LABEL_COLUMNS = (
    "label_status",
    "label_score",
    "is_label_issue",
    "suggested_label",
    "label_confidence",
)


def _dropped_path(out: Path) -> Path:
    """``cleaned.csv`` → ``cleaned.dropped.csv``; ``a.csv.gz`` → ``a.dropped.csv.gz``."""
    name = out.name
    first = name.find(".", 1)
    if first < 0:
        return out.with_name(name + ".dropped")
    return out.with_name(f"{name[:first]}.dropped{name[first:]}")


# Settings that leave the audit table as it is, so a scan made with other values is
# still the scan to apply: how the work is done (device, batch size, workers, cache),
# what report.html shows (gallery_size), the metrics against ground truth (truth_col,
# summary.json only), and how rematch acts on the table (min_confidence, review_margin:
# the action is chosen when the scan is applied). The embeddings file and the model
# weights enter the fingerprint by what they are, not by their names.
_NOT_FINGERPRINTED = frozenset(
    {
        "embed.embeddings",
        "embed.model",
        "embed.pretrained",
        "embed.device",
        "embed.batch_size",
        "embed.workers",
        "embed.cache_dir",
        "embed.use_cache",
        "data.truth_col",
        "gallery_size",
        "audit.min_confidence",
        "audit.review_margin",
    }
)


def _flat_settings(cfg: ScanConfig) -> dict[str, Any]:
    """``{"audit.k": 3, ..., "seed": 0}``: every setting under its dotted name."""
    out: dict[str, Any] = {}
    for key, value in config_to_dict(cfg).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def scan_fingerprint(manifest: str | Path, config: ScanConfig) -> dict[str, Any]:
    """What determines a scan of ``manifest`` with ``config`` (stored in summary.json).

    The manifest's SHA-256; the embeddings file's SHA-256 (with
    ``embed.embeddings``) or else the model and its weights (an open_clip tag, or a
    checkpoint file by path, size and modification time, as the embedding cache keys
    it); every setting that changes the audit table (all but those in
    ``_NOT_FINGERPRINTED``); and pmpclean's version. :func:`rematch` applies a scan
    only when the fingerprint it would make now is the same.
    """
    e = config.embed
    fingerprint: dict[str, Any] = {
        "pmpclean_version": __version__,
        "manifest_sha256": _file_sha256(Path(manifest)),
    }
    if e.embeddings is not None:
        emb_path = Path(e.embeddings).expanduser()
        if not emb_path.is_file():
            raise DatasetError(
                f"Embeddings file {emb_path} does not exist; pass --embeddings with the .npz "
                "(or .parquet) written by 'pmpclean embed'."
            )
        fingerprint["embeddings_sha256"] = _file_sha256(emb_path)
    else:
        from .embedding import weights_fingerprint

        fingerprint["model"] = weights_fingerprint(e.model, e.pretrained)
    fingerprint["settings"] = {
        k: v for k, v in _flat_settings(config).items() if k not in _NOT_FINGERPRINTED
    }
    return fingerprint


def _fingerprint_changes(stored: Any, now: dict[str, Any]) -> list[str]:
    """What differs between the fingerprint of a scan and the one of a scan made now."""
    if not isinstance(stored, dict):
        return ["it records no fingerprint of its inputs (an older pmpclean made it)"]
    changes: list[str] = []
    if stored.get("manifest_sha256") != now["manifest_sha256"]:
        changes.append("the manifest changed since")
    then_emb, now_emb = stored.get("embeddings_sha256"), now.get("embeddings_sha256")
    if then_emb is not None and now_emb is not None:
        if then_emb != now_emb:
            changes.append("the embeddings file differs from the one it read")
    elif then_emb is not None:
        changes.append(f"it read an embeddings file, now model {now.get('model')} embeds")
    elif now_emb is not None:
        changes.append(f"model {stored.get('model')} embedded, now an embeddings file is given")
    elif stored.get("model") != now.get("model"):
        changes.append(f"model {stored.get('model')} embedded, now {now.get('model')}")
    then_set, now_set = stored.get("settings") or {}, now["settings"]
    for key in sorted(set(then_set) | set(now_set)):
        if then_set.get(key, "(unset)") != now_set.get(key, "(unset)"):
            changes.append(
                f"{key} was {then_set.get(key, '(unset)')!r}, now {now_set.get(key, '(unset)')!r}"
            )
    if stored.get("pmpclean_version") != now["pmpclean_version"]:
        changes.append(
            f"pmpclean {stored.get('pmpclean_version')} made it, this is {now['pmpclean_version']}"
        )
    return changes


def _read_summary(audit_dir: Path) -> dict[str, Any] | None:
    """summary.json of a scan folder, or None when absent or unreadable."""
    try:
        summary = json.loads((audit_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def saved_scan_config(audit_dir: str | Path) -> ScanConfig | None:
    """The settings of the scan in ``audit_dir``, or None when there is no readable scan.

    ``pmpclean rematch`` starts from them: an option it is not given keeps the scan's
    value, so applying a scan needs none of the options that made it.
    """
    summary = _read_summary(Path(audit_dir))
    settings = summary.get("settings") if summary else None
    if not isinstance(settings, dict):
        return None
    try:
        return config_from_dict(settings)
    except (ConfigError, TypeError):  # settings of another pmpclean version
        return None


def _reusable_scan(
    source: Path, audit_dir: Path, cfg: ScanConfig
) -> tuple[tuple[pd.DataFrame, dict[str, Any]] | None, str]:
    """The scan in ``audit_dir`` when a scan of ``source`` with ``cfg`` would repeat it.

    Returns ``((audit, summary), "")``, or ``(None, why)`` when it is absent or stale.
    """
    audit_path = audit_dir / "audit.parquet"
    if not (audit_dir / "summary.json").is_file() or not audit_path.is_file():
        return None, f"there was no scan in {audit_dir}"
    summary = _read_summary(audit_dir)
    if summary is None:
        return None, f"{audit_dir / 'summary.json'} could not be read"
    changes = _fingerprint_changes(summary.get("fingerprint"), scan_fingerprint(source, cfg))
    if changes:
        return None, f"the scan in {audit_dir} is stale: " + "; ".join(changes)
    return (pd.read_parquet(audit_path), summary), ""


def _rebase_image_paths(
    frame: pd.DataFrame,
    image_col: str,
    *,
    base: Path,
    out_dir: Path,
    only_existing: bool,
) -> int:
    """Rewrite relative image paths of ``frame`` (in place) to resolve from ``out_dir``.

    A relative path in a manifest resolves against the manifest's folder (or ``--root``,
    here ``base``); a cleaned manifest written elsewhere must point at the same files.
    Each relative path becomes relative to ``out_dir`` (absolute when no relative path
    exists, e.g. another drive). URLs, ``file://`` URIs, absolute and ``~`` paths, and
    empty cells are left alone; with ``only_existing`` (the scan read precomputed
    embeddings, so the column may hold plain identifiers) only cells naming an
    existing file are rewritten. Returns the number of cells changed.
    """
    import os

    from .data import is_url

    if image_col not in frame.columns or len(frame) == 0:
        return 0
    base_abs = os.path.abspath(base)
    out_abs = os.path.abspath(out_dir)
    if os.path.normcase(base_abs) == os.path.normcase(out_abs):
        return 0
    values = frame[image_col].tolist()
    changed = 0
    for i, value in enumerate(values):
        if not isinstance(value, str):
            continue
        text = value.strip()
        if not text or is_url(text) or text.startswith("~") or os.path.isabs(text):
            continue
        target = os.path.normpath(os.path.join(base_abs, text))
        if only_existing and not os.path.exists(target):
            continue
        try:
            new = os.path.relpath(target, out_abs)
        except ValueError:  # no relative path between them (another drive)
            new = target
        if new != value:
            values[i] = new
            changed += 1
    if changed:
        frame[image_col] = pd.Series(values, index=frame.index, dtype=object)
    return changed


def _output_paths(src: Path, out_path: Path, output_format: str, *, force: bool) -> Path:
    """Check ``--out`` for ``output_format`` before any work; return the dropped file."""
    from .data import SUPPORTED_SUFFIXES, table_format
    from .shards_out import SHARD_FORMATS, check_output_format, dropped_path_for

    check_output_format(src, output_format, out_path, force=force)
    if output_format != "table":
        dropped_path = dropped_path_for(out_path, output_format)
    elif table_format(out_path)[0] is None:
        raise ConfigError(
            f"Cannot tell the format of --out {out_path}: use one of "
            f"{', '.join(sorted(SUPPORTED_SUFFIXES))} (CSV/TSV/JSON lines may add .gz)."
        )
    else:
        dropped_path = _dropped_path(out_path)
    for p in (out_path, dropped_path):
        if p.resolve() == src.resolve():
            raise ConfigError(
                f"--out {p} is the input manifest; pmpclean never overwrites its input."
            )
        if p.exists() and not force and not (p == out_path and output_format in SHARD_FORMATS):
            raise DatasetError(f"{p} already exists; pass --force to replace it.")
    return dropped_path


def rematch(
    source: str | Path,
    *,
    out: str | Path,
    policy: str = "rematch",
    min_confidence: float | None = None,
    fix_labels: bool = False,
    force: bool = False,
    config: ScanConfig | None = None,
    audit_dir: str | Path | None = None,
    rescan: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    output_format: str = "table",
) -> RematchResult:
    """Apply the latest scan of ``source`` and write a cleaned manifest.

    The library side of ``pmpclean rematch``; the captions it applies were proposed by
    the scan's rematch stage (:func:`pmpclean.rematching.propose_captions`).

    Every input row lands in exactly one of two files: the cleaned manifest ``out``
    and ``<out stem>.dropped<ext>`` beside it. Both keep the input columns and add
    ``pmpclean_row`` (0-based input row) and ``pmpclean_action``.

    The scan in ``audit_dir`` is applied when a scan made now would repeat it (same
    :func:`scan_fingerprint`: manifest, embeddings or model weights, every setting
    that changes the audit, pmpclean version); otherwise ``source`` is scanned again
    into ``audit_dir`` and ``info["scanned_because"]`` says why. ``config=None``
    takes the settings of the scan in ``audit_dir`` (the defaults when there is none).
    The confidence cut and ``review_margin`` only choose the action, so a scan made at
    another cut is applied as it is: the audit keeps every candidate proposal.

    Relative image paths are rewritten to resolve from the folder of ``out`` (they
    resolved from the manifest's folder, or ``root``), so the cleaned manifest can be
    read from where it is written; absolute paths and URLs are kept as they are.

    ``output_format`` (see :mod:`pmpclean.shards_out`): ``"table"`` writes ``out`` as a
    table (its suffix picks CSV, Parquet, ...); ``"webdataset"`` and ``"files"`` write
    the kept rows of img2dataset shards into the folder ``out`` in that layout, image
    bytes copied, captions rematched, provenance in each ``.json`` and shard parquet;
    ``"uids"`` writes the kept rows' DataComp ``uid`` to the ``.npy`` file ``out``.
    Shards and uids list the dropped rows in ``<out>.dropped.parquet`` beside ``out``.

    Policies
    --------
    ``rematch``
        keep clean pairs, replace the caption of each confident rematch, drop the
        rest of the flagged pairs (``drop`` and ``review`` actions). Adds
        ``pmpclean_original_caption`` (the caption a rematched row had) and
        ``pmpclean_caption_from_row`` (the input row whose caption it got), empty on
        the other rows.
    ``drop``
        keep clean pairs only.
    ``flag``
        keep every row and add ``match_score``, ``is_mismatched``,
        ``proposed_caption``, ``rematch_confidence`` columns; nothing is dropped.
    """
    if policy not in POLICIES:
        raise ConfigError(f"Unknown policy {policy!r}: expected one of {', '.join(POLICIES)}.")
    src = Path(source)
    if not src.is_file():
        from .sources import source_kind

        source_kind(src)  # a shard source or folder, else a DatasetError naming it
        if not src.exists() and "{" not in str(src) and "*" not in str(src):
            raise DatasetError(f"Manifest {src} does not exist.")
    out_path = Path(out)
    dropped_path = _output_paths(src, out_path, output_format, force=force)
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"min_confidence must lie in [0, 1], got {min_confidence}.")
    a_dir = Path(audit_dir) if audit_dir is not None else default_out_dir(src)
    # --out is writable and ours before any work (a dry run writes no --out)
    folder = output_format in ("webdataset", "files")
    with contextlib.nullcontext() if dry_run else claim_output(out_path, folder=folder):
        return _apply_scan(
            src,
            out_path,
            dropped_path,
            output_format=output_format,
            policy=policy,
            min_confidence=min_confidence,
            fix_labels=fix_labels,
            force=force,
            config=config,
            audit_dir=a_dir,
            rescan=rescan,
            dry_run=dry_run,
            progress=progress,
        )


def _apply_scan(
    src: Path,
    out_path: Path,
    dropped_path: Path,
    *,
    output_format: str = "table",
    policy: str,
    min_confidence: float | None,
    fix_labels: bool,
    force: bool,
    config: ScanConfig | None,
    audit_dir: Path,
    rescan: bool,
    dry_run: bool,
    progress: Progress | None,
) -> RematchResult:
    # long: the rematch command's policies end to end, not yet split
    """The work of :func:`rematch` once its arguments are checked and ``out`` is claimed."""
    import os

    a_dir = audit_dir
    cfg = config or saved_scan_config(a_dir) or ScanConfig()
    if rescan:
        loaded, why = None, "--rescan was given"
    else:
        loaded, why = _reusable_scan(src, a_dir, cfg)
    scanned = loaded is None
    if loaded is None:
        res = scan(src, config=cfg, out_dir=a_dir, force=True, progress=progress)
        audit, summary = res.audit, res.summary
    else:
        audit, summary = loaded
    input_cols = summary.get("input_columns") or [
        c for c in audit.columns if c not in AUDIT_COLUMNS and c not in LABEL_COLUMNS
    ]
    settings = summary.get("settings", {})
    text_col = settings.get("data", {}).get("text_col", cfg.data.text_col)
    label_col = settings.get("data", {}).get("label_col", cfg.data.label_col)
    threshold = float(settings.get("audit", {}).get("threshold", cfg.audit.threshold))
    # the cut and the margin choose the action only: this call's values, not the scan's
    margin = float(cfg.audit.review_margin)
    cut = float(min_confidence) if min_confidence is not None else cfg.audit.min_confidence

    # every candidate proposal is in the audit; the cut picks those applied
    has_candidates = "candidate_row" in audit.columns
    cand_row = audit["candidate_row" if has_candidates else "proposed_row"].to_numpy(np.int64)
    cand_conf = audit["candidate_confidence" if has_candidates else "rematch_confidence"].to_numpy(
        np.float64
    )
    take = (cand_row >= 0) & (cand_conf >= cut)
    proposed_row = np.where(take, cand_row, -1)
    confidence = np.where(take, cand_conf, 0.0)
    captions = audit[text_col].to_numpy(dtype=object)
    proposed_caption = np.where(take, captions[np.maximum(cand_row, 0)], "")

    action = _actions(
        audit["status"].to_numpy(dtype=object),
        audit["match_score"].to_numpy(dtype=np.float64),
        audit["is_mismatched"].to_numpy(dtype=bool),
        proposed_row,
        confidence,
        threshold=threshold,
        review_margin=margin,
        min_confidence=cut,
        undecided=summary.get("verdict") == "undecided",
    )
    base = audit[input_cols].copy()
    base["pmpclean_row"] = audit["row"].to_numpy()
    base["pmpclean_action"] = action
    if policy == "rematch":
        keep = np.isin(action, ["keep", "rematch"])
        rem = action == "rematch"
        old_caps = base[text_col].astype(object).to_numpy()
        new_caps = old_caps.copy()
        new_caps[rem] = proposed_caption[rem]
        base[text_col] = new_caps
        # what a rematch replaced, so that it can be reviewed or undone; other columns
        # that describe the caption (a caption_id, ...) still describe the old one
        base["pmpclean_original_caption"] = np.where(rem, old_caps, None)
        from_row = pd.array(proposed_row, dtype="Int64")  # the proposal at this cut
        from_row[~rem] = pd.NA
        base["pmpclean_caption_from_row"] = from_row
    elif policy == "drop":
        keep = action == "keep"
    if policy != "flag" and summary.get("verdict") == "undecided":
        # the model cannot tell pairs apart: nothing is removed on its word
        keep = audit["status"].to_numpy(dtype=object) == "ok"
    if policy not in ("rematch", "drop"):
        keep = np.ones(len(base), dtype=bool)
        base["pmpclean_match_score"] = audit["match_score"].to_numpy()
        base["pmpclean_is_mismatched"] = audit["is_mismatched"].to_numpy()
        base["pmpclean_proposed_caption"] = proposed_caption
        base["pmpclean_rematch_confidence"] = confidence
    n_labels_fixed = 0
    if fix_labels:
        if not label_col or "is_label_issue" not in audit.columns:
            raise ConfigError(
                "--fix-labels needs a label audit: scan with --label-col COLUMN first."
            )
        issue = audit["is_label_issue"].to_numpy(dtype=bool)
        given = base[label_col].astype(object).to_numpy()
        labels_out = given.copy()
        labels_out[issue] = audit["suggested_label"].astype(object).to_numpy()[issue]
        base[label_col] = labels_out
        # the replaced value stays in the output, so that the fix can be reviewed or undone
        base["pmpclean_given_label"] = np.where(issue, given, None)
        n_labels_fixed = int(issue.sum())
    reason = np.where(
        audit["status"].to_numpy(dtype=object) != "ok",
        audit["status"].to_numpy(dtype=object),
        np.where(action == "review", "borderline match_score, no confident proposal", "mismatched"),
    )
    # Relative image paths resolved from the manifest's folder (or --root): make them
    # resolve from the folder the cleaned manifest is written to.
    data_settings = settings.get("data", {})
    image_col = data_settings.get("image_col", cfg.data.image_col)
    root = data_settings.get("root", cfg.data.root)
    path_base = (
        Path(os.path.abspath(os.path.expanduser(str(root)))) if root else src.resolve().parent
    )
    n_rebased = _rebase_image_paths(
        base,
        image_col,
        base=path_base,
        out_dir=out_path.expanduser().absolute().parent,
        only_existing=bool(settings.get("embed", {}).get("embeddings", cfg.embed.embeddings)),
    )
    if output_format in ("webdataset", "files"):  # provenance for the shards' json
        _add_provenance(base, audit, action, confidence)
    cleaned = base[keep].reset_index(drop=True)
    dropped = base[~keep].copy()
    dropped["pmpclean_reason"] = reason[~keep]
    dropped = dropped.reset_index(drop=True)
    assert len(cleaned) + len(dropped) == len(audit)
    info = {
        "manifest": str(src),
        "policy": policy,
        "min_confidence": cut,
        "n_rows": int(len(audit)),
        "n_cleaned": int(len(cleaned)),
        "n_dropped": int(len(dropped)),
        "n_rematched": int(((action == "rematch") & keep).sum()) if policy == "rematch" else 0,
        "n_labels_fixed": n_labels_fixed,
        "n_image_paths_rebased": n_rebased,
        "action_counts": {a: int((action == a).sum()) for a in ACTIONS},
        "scanned_now": scanned,
        "scanned_because": why if scanned else None,
        "audit_dir": str(a_dir),
        "dry_run": dry_run,
    }
    files: dict[str, str] = {}
    if not dry_run:
        cleaned, dropped, files = _write_rematch(
            src, cleaned, dropped, out_path, dropped_path, output_format, info, text_col, force
        )
    info["output_format"] = output_format
    info["files"] = files
    return RematchResult(cleaned=cleaned, dropped=dropped, info=info, files=files)


def _add_provenance(
    base: pd.DataFrame, audit: pd.DataFrame, action: np.ndarray, confidence: np.ndarray
) -> None:
    """The columns a shard output's json and parquet carry (pmpclean.shards_out)."""
    base["pmpclean_status"] = audit["status"].to_numpy(dtype=object)
    if "pmpclean_match_score" not in base.columns:
        base["pmpclean_match_score"] = audit["match_score"].to_numpy(np.float64)
        base["pmpclean_rematch_confidence"] = np.where(action == "rematch", confidence, np.nan)
    for col in ("pmpclean_original_caption", "pmpclean_caption_from_row"):
        if col not in base.columns:
            base[col] = pd.array([pd.NA] * len(base), dtype="Int64" if "row" in col else object)


def _write_rematch(
    src: Path,
    cleaned: pd.DataFrame,
    dropped: pd.DataFrame,
    out_path: Path,
    dropped_path: Path,
    output_format: str,
    info: dict[str, Any],
    text_col: str,
    force: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """Write the cleaned rows as ``output_format`` and the dropped rows beside them."""
    from .data import write_table
    from .shards_out import write_shards, write_uids

    if output_format == "table":
        write_table(cleaned, out_path, force=force)
    elif output_format == "uids":
        info["n_uids"] = write_uids(cleaned, out_path, where=str(src))
    else:
        cleaned, dropped, _ = write_shards(
            src,
            cleaned,
            dropped,
            out_path,
            output_format=output_format,
            text_col=text_col,
            force=force,
        )
        info.update(n_cleaned=int(len(cleaned)), n_dropped=int(len(dropped)))
    write_table(dropped, dropped_path, force=force)
    return cleaned, dropped, {"cleaned": str(out_path), "dropped": str(dropped_path)}


# --------------------------------------------------------------------------- embed / corrupt


def embed(
    source: str | Path,
    *,
    out: str | Path | None = None,
    config: ScanConfig | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> EmbedResult:
    """Embed every row of a manifest and write ``out`` (.npz: ``image``, ``text``, ``status``).

    The file is row-aligned with the manifest and is exactly what ``--embeddings``
    accepts, so a later ``scan`` needs no model.
    """
    cfg = config or ScanConfig()
    if cfg.embed.embeddings is not None:
        raise ConfigError("embed computes embeddings; it cannot also take --embeddings.")
    src = Path(source)
    out_path = Path(out) if out is not None else default_out_dir(src) / "embeddings.npz"
    if out_path.suffix.lower() != ".npz":
        raise ConfigError(f"--out {out_path}: embeddings are written as .npz.")
    if out_path.exists() and not force:
        raise DatasetError(f"{out_path} already exists; pass --force to replace it.")
    timer = Timer()
    with claim_output(out_path, folder=False):  # writable and ours before the model work
        with timer("read"):
            manifest = _read(src, cfg)
        with timer("embed"):
            emb, info = _embeddings(manifest, cfg, progress)
        status = np.asarray(manifest.status, dtype=object)
        with atomic_path(out_path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, image=emb.image, text=emb.text, status=status.astype(str))
    info.update(
        {
            "manifest": str(src),
            "n_rows": len(manifest),
            "n_images": len(manifest.unique_images),
            "status_counts": _counts(status),
            "dim_image": int(emb.image.shape[1]),
            "dim_text": int(emb.text.shape[1]),
            "timings": {k: round(v, 4) for k, v in timer.seconds.items()},
            "file": str(out_path),
        }
    )
    return EmbedResult(image=emb.image, text=emb.text, status=status, info=info, path=out_path)


def corrupt(
    source: str | Path,
    *,
    out: str | Path,
    rate: float,
    mode: str = "shuffle",
    seed: int | None = 0,
    image_col: str = "image",
    text_col: str = "caption",
    truth_col: str = "true_row",
    force: bool = False,
    embeddings: str | Path | None = None,
) -> CorruptResult:
    """Inject known caption mismatches (the L2RM protocol) and record the truth.

    A fraction ``rate`` of rows get the caption of another image; ``truth_col`` holds
    the original row of the caption now at each row, so ``scan --truth-col`` can score
    the audit.
    """
    from .data import read_table, write_table
    from .noise import corrupt_frame

    src = Path(source)
    out_path = Path(out)
    if out_path.resolve() == src.resolve():
        raise ConfigError(
            f"--out {out_path} is the input manifest; pmpclean never overwrites its input."
        )
    if out_path.exists() and not force:
        raise DatasetError(f"{out_path} already exists; pass --force to replace it.")
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"rate must lie in [0, 1], got {rate}.")
    with claim_output(out_path, folder=False):  # writable and ours before any work
        frame = read_table(src)
        for col in (image_col, text_col):
            if col not in frame.columns:
                raise DatasetError(
                    f"Column {col!r} not found in {src}; columns present: "
                    f"{', '.join(map(str, frame.columns))}."
                )
        if truth_col in frame.columns:
            raise DatasetError(
                f"{src} already has a {truth_col!r} column; "
                "pass --truth-col NAME to choose another name."
            )
        kwargs: dict[str, Any] = {}
        if embeddings is not None:
            from .embedding import load_embeddings

            kwargs["embeddings"] = load_embeddings(embeddings, len(frame))
        noisy = corrupt_frame(
            frame,
            rate=rate,
            mode=mode,
            text_col=text_col,
            image_col=image_col,
            truth_col=truth_col,
            seed=seed,
            **kwargs,
        )
        write_table(noisy, out_path, force=force)
        truth = noisy[truth_col].to_numpy()
        info = {
            "manifest": str(src),
            "file": str(out_path),
            "n_rows": int(len(noisy)),
            "n_corrupted": int((truth != np.arange(len(noisy))).sum()),
            "rate": rate,
            "mode": mode,
            "seed": seed,
            "truth_col": truth_col,
        }
        return CorruptResult(frame=noisy, info=info, path=out_path)
