"""The report's context: plain data (text, numbers, lists, dicts) the templates lay out.

Nothing here writes HTML: every value that comes from the dataset stays text, and the
Jinja2 templates escape it (autoescaping). The only markup in the context is the SVG of
the plots (:mod:`pmpclean.report.plots`, escaped there) and the thumbnails, which are
``data:`` URIs made from local files only; nothing remote is ever fetched.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._numfmt import finite_or_none as _num
from .._numfmt import fmt_float, fmt_int, fmt_metric, fmt_pct, fmt_secs
from . import plots

__all__ = ["build_context"]

# Text shown for each row status of the contract (``audit["status"]``).
_STATUS_REASONS: dict[str, str] = {
    "ok": "scored",
    "missing_image": "image file not found",
    "image_is_directory": "image path is a folder, not a file",
    "unreadable_image": "image file could not be decoded",
    "remote_image": "image is a remote URL (never fetched)",
    "empty_caption": "caption is empty",
    "missing_value": "missing value in the image or caption column",
    "missing_embedding": "no usable embedding for this row",
}

# Meaning of each action of the contract (``audit["action"]``).
_ACTION_MEANINGS: dict[str, str] = {
    "keep": "pair looks right; kept as is",
    "rematch": "image gets the proposed caption from another row",
    "drop": "pair is mismatched and no confident caption was found",
    "review": "uncertain or not scored; needs a human decision",
}
_ACTION_ORDER = ("keep", "rematch", "drop", "review")

# Placeholder text for a thumbnail that cannot be shown, by row status.
_PLACEHOLDERS: dict[str, str] = {
    "missing_image": "image missing",
    "image_is_directory": "folder, not an image",
    "unreadable_image": "unreadable image",
    "remote_image": "remote image (not fetched)",
}

# Words for the settings and solver keys shown in "Run details".
_WORDS: dict[str, str] = {
    "k": "neighbours per side (k)",
    "eps": "entropic regularisation (cost units)",
    "reg": "regularisation",
    "n_edges": "candidate edges",
    "n_rows": "rows in the problem",
    "n_suspects": "suspects",
    "n_proposed": "proposals",
    "n_proposals": "proposals",
    "min_confidence": "min confidence",
    "marginal_error": "marginal error",
    "n_image_nodes": "image nodes",
    "n_caption_nodes": "caption nodes",
    "n_invalid_suspects": "suspects without embeddings",
}

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")

# Longest caption shown in a card (the full text lives in audit.parquet).
_CAPTION_CHARS = 280
_TITLE_CHARS = 1500
# Longest caption in the table of flagged rows.
_TABLE_CHARS = 160
# Largest confusion table drawn; classes beyond are folded into "(other)".
_MAX_CLASSES = 12
# Rematch keys shown in "Model and decision" (and so not again in "Run details").
_DECIDED = ("n_suspects", "n_proposed", "min_confidence", "cost", "cost_used", "mass", "reason")
# Embedding settings that mean nothing when the embeddings came from a file.
_MODEL_SETTINGS = (
    "model",
    "pretrained",
    "device",
    "batch_size",
    "workers",
    "cache_dir",
    "use_cache",
)


# --------------------------------------------------------------------------- helpers


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return bool(np.isnan(value))
    return False


def _text(value: Any) -> str:
    return "" if _missing(value) else str(value)


def _int(value: Any) -> int | None:
    out = _num(value)
    return None if out is None else int(round(out))


# shared with the terminal output (pmpclean._numfmt); missing values show as an em dash
_fmt_int = partial(fmt_int, missing="—")
_fmt_float = partial(fmt_float, missing="—")
_fmt_pct = partial(fmt_pct, missing="—")

_fmt_secs = partial(fmt_secs, missing="—")


def _fmt_value(value: Any) -> str:
    """Compact text for a settings value: integers as integers, booleans as words."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if _missing(value):
        return "—"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{int(value):,}" if float(value).is_integer() else f"{float(value):.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_fmt_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        text = ", ".join(_fmt_value(v) for v in items[:12])
        return f"[{text}{', …' if len(items) > 12 else ''}]"
    return str(value)


def _word(key: str) -> str:
    return _WORDS.get(key, key.replace("_", " "))


def _truncate(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _share(count: int, total: int) -> str:
    return _fmt_pct(count / total) if total else "—"


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _kv(rows: Iterable[tuple[str, Any]]) -> list[dict[str, str]]:
    return [{"key": str(k), "value": _fmt_value(v)} for k, v in rows]


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _is_local_path(path: str) -> bool:
    if not path:
        return False
    if _URL_SCHEME.match(path) and not _WINDOWS_DRIVE.match(path):
        return False  # http://, s3://, data:, file: ... never opened
    return True


def _tar_member(path: str) -> io.BytesIO | None:
    """The bytes of ``"<shard>.tar#<member>"`` (how the audit names an image read from an
    img2dataset shard, :class:`pmpclean.data.MemberRef`), or None."""
    container, sep, name = path.rpartition("#")
    if not sep or not container.endswith(".tar") or not os.path.isfile(container):
        return None
    import tarfile

    with tarfile.open(container) as tar:
        fh = tar.extractfile(name)
        return None if fh is None else io.BytesIO(fh.read())


def _thumbnail(path: str, px: int) -> tuple[str, int, int] | None:
    """Return ``(data_uri, width, height)`` of a small JPEG thumbnail, or None.

    Only local, readable image files are used, decoded as the audit saw them (the one
    decoder, :func:`pmpclean.data.open_image`: upright, 8-bit RGB); the aspect ratio
    is kept and the longest side is at most ``px`` pixels.
    """
    if not _is_local_path(path):
        return None
    try:
        from ..data import open_image

        source: str | io.BytesIO = path
        if not os.path.isfile(path):
            member = _tar_member(path)
            if member is None:
                return None
            source = member
        im = open_image(source, draft_size=px)  # JPEG: decode at reduced scale, much faster
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=78, optimize=True)
        width, height = im.size
    except Exception:  # unreadable, truncated, bomb, permission... -> placeholder
        return None
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/jpeg;base64,{data}", width, height


# --------------------------------------------------------------------------- context


class _Context:
    """Reads the audit and the summary once; each method returns one part of the page."""

    def __init__(
        self,
        audit: pd.DataFrame,
        summary: Mapping[str, Any],
        *,
        gallery_size: int,
        thumbnail_px: int,
        image_col: str | None,
        text_col: str | None,
        label_col: str | None,
        max_table_rows: int,
        max_flagged_rows: int,
    ) -> None:
        if not isinstance(audit, pd.DataFrame):
            raise TypeError(f"audit must be a pandas DataFrame, not {type(audit).__name__}")
        if not isinstance(summary, Mapping):
            raise TypeError(f"summary must be a dict, not {type(summary).__name__}")
        if int(gallery_size) < 0:
            raise ValueError(f"gallery_size must be >= 0, got {gallery_size}")
        if int(thumbnail_px) < 16:
            raise ValueError(f"thumbnail_px must be >= 16 pixels, got {thumbnail_px}")
        self.audit = audit
        self.summary = summary
        self.gallery_size = int(gallery_size)
        self.px = int(thumbnail_px)
        self.max_table_rows = int(max_table_rows)
        self.max_flagged_rows = int(max_flagged_rows)
        self.settings = _mapping(summary.get("settings"))
        self.labels = _mapping(summary.get("labels"))
        data_settings = _mapping(self.settings.get("data"))
        self.text_col = self._column(
            text_col, data_settings.get("text_col", self.settings.get("text_col")), "caption"
        )
        self.image_col = self._column(
            image_col, data_settings.get("image_col", self.settings.get("image_col")), "image"
        )
        self.label_col = self._column(
            label_col, self.labels.get("label_col"), data_settings.get("label_col")
        )
        thr = _num(summary.get("threshold"))
        self.threshold = 0.5 if thr is None else thr
        self.thumbs: dict[str, tuple[str, int, int] | None] = {}
        # captions by row number, for the evidence (another row's caption)
        self.captions = (
            audit[self.text_col].to_numpy(dtype=object) if self.text_col else np.array([])
        )

    def _column(self, *candidates: Any) -> str | None:
        for name in candidates:
            if isinstance(name, str) and name in self.audit.columns:
                return name
        return None

    # ----------------------------------------------------------------- data access

    def numeric(self, name: str) -> np.ndarray | None:
        if name not in self.audit.columns:
            return None
        return pd.to_numeric(self.audit[name], errors="coerce").to_numpy(
            dtype=float, na_value=np.nan
        )

    def bool_col(self, name: str) -> np.ndarray | None:
        if name not in self.audit.columns:
            return None
        return self.audit[name].fillna(False).astype(bool).to_numpy()

    @property
    def n_rows(self) -> int:
        n = _int(self.summary.get("n_rows"))
        return len(self.audit) if n is None else n

    def counts(self, key: str, column: str) -> dict[str, int]:
        given = self.summary.get(key)
        if isinstance(given, Mapping) and given:
            return {str(k): int(_int(v) or 0) for k, v in given.items()}
        if column not in self.audit.columns:
            return {}
        return {str(k): int(v) for k, v in self.audit[column].value_counts(sort=True).items()}

    def caption_of(self, row: int) -> str:
        if 0 <= row < len(self.captions):
            return _text(self.captions[row])
        return ""

    # ----------------------------------------------------------------- header

    def header(self) -> dict[str, Any]:
        s = self.summary
        manifest = s.get("manifest")
        model = _mapping(s.get("model"))
        subs = []
        if manifest:
            subs.append(("manifest", str(manifest)))
        if model.get("source"):
            subs.append(("embeddings" if self.from_file else "model", str(model["source"])))
        if model.get("device"):
            subs.append(("device", str(model["device"])))
        if s.get("created"):
            subs.append(("created", str(s["created"])))
        if s.get("pmpclean_version"):
            subs.append(("pmpclean", str(s["pmpclean_version"])))
        return {
            "name": Path(str(manifest)).name if manifest else "dataset",
            "subs": subs,
            "verdict": self.verdict(),
            "banners": self.banners(),
            "kpis": self.kpis(),
        }

    @property
    def from_file(self) -> bool:
        model = _mapping(self.summary.get("model"))
        source = str(model.get("source") or "")
        return source.startswith("file:") or bool(
            _mapping(self.settings.get("embed")).get("embeddings")
        )

    def verdict(self) -> dict[str, str] | None:
        """The audit's verdict, its reason and the noise-rate interval."""
        s = self.summary
        verdict = str(s.get("verdict") or "")
        if not verdict:
            return None
        interval = s.get("estimated_noise_rate_interval") or []
        lo, hi = (_num(v) for v in (list(interval) + [None, None])[:2])
        span = (
            f" · noise rate {_fmt_pct(s.get('estimated_noise_rate'))} "
            f"(90 % interval {_fmt_pct(lo)} to {_fmt_pct(hi)})"
            if lo is not None and hi is not None
            else ""
        )
        cls = {"clean": "v-clean", "noisy": "v-noisy"}.get(verdict, "v-undecided warn")
        title = {
            "clean": "Verdict: clean",
            "noisy": "Verdict: noisy",
            "undecided": "Verdict: undecided — this model cannot audit this data",
        }.get(verdict, f"Verdict: {verdict}")
        note = (
            "Nothing was dropped or rematched: every scored pair is left for review. Try a "
            "model that knows this kind of image, or fine-tune one first (pmpclean finetune)."
            if verdict == "undecided"
            else ""
        )
        return {
            "cls": cls,
            "title": title,
            "span": span,
            "reason": _text(s.get("verdict_reason")),
            "note": note,
        }

    def banners(self) -> list[dict[str, str]]:
        """Loud notices above everything: random weights, an undecided verdict."""
        out = []
        model = _mapping(self.summary.get("model"))
        warnings = [str(w) for w in self.summary.get("warnings") or []]
        random = bool(model.get("random_weights")) or any("RANDOM weights" in w for w in warnings)
        if random:
            out.append(
                {
                    "id": "banner-random",
                    "title": "The model has random weights",
                    "text": "Its embeddings and every score on this page mean nothing: use this "
                    "run only to check the pipeline, and scan again with pretrained weights.",
                }
            )
        return out  # an undecided verdict has its own banner: the verdict box

    def kpis(self) -> list[dict[str, str]]:
        s = self.summary
        n_rows = self.n_rows
        n_scored = _int(s.get("n_scored"))
        if n_scored is None:
            status = self.counts("status_counts", "status")
            n_scored = status.get("ok", n_rows if not status else 0)
        actions = self.counts("action_counts", "action")
        n_flag = _int(s.get("n_mismatched"))
        if n_flag is None:
            flags = self.bool_col("is_mismatched")
            n_flag = int(flags.sum()) if flags is not None else None
        noise = s.get("estimated_noise_rate")
        if _num(noise) is None and n_flag is not None and n_scored:
            noise = n_flag / n_scored

        def card(kid: str, cls: str, label: str, value: str, sub: str = "") -> dict[str, str]:
            return {"id": kid, "cls": cls, "label": label, "value": value, "sub": sub}

        out = [
            card(
                "rows",
                "",
                "Rows scanned",
                _fmt_int(n_rows),
                f"{n_scored:,} scored · {max(n_rows - n_scored, 0):,} not scored",
            ),
            card(
                "flagged",
                "k-flag",
                "Flagged mismatched",
                _fmt_int(n_flag),
                f"est. noise rate {_fmt_pct(noise)}",
            ),
        ]
        rematch = _mapping(s.get("rematch"))
        for action, cls, label in (
            ("rematch", "k-rematch", "Rematch proposed"),
            ("drop", "k-drop", "Dropped"),
            ("review", "k-review", "Left for review"),
            ("keep", "k-keep", "Kept"),
        ):
            sub = f"{_share(actions.get(action, 0), n_rows)} of rows"
            if action == "rematch" and _num(rematch.get("min_confidence")) is not None:
                sub += f" · conf ≥ {_fmt_float(rematch.get('min_confidence'), 2)}"
            out.append(card(action, cls, label, f"{actions.get(action, 0):,}", sub))
        if self.labels:
            out.append(
                card(
                    "labels",
                    "k-label",
                    "Label issues",
                    _fmt_int(self.labels.get("n_label_issues")),
                    f"est. label noise {_fmt_pct(self.labels.get('estimated_label_noise'))}",
                )
            )
        det = _mapping(_mapping(s.get("evaluation")).get("detection"))
        if det:
            out.append(
                card(
                    "auroc",
                    "k-eval",
                    "Detection AUROC",
                    _fmt_float(det.get("auroc")),
                    f"F1 {_fmt_float(det.get('f1'))} vs ground truth",
                )
            )
        secs = self.seconds()
        if secs:
            slowest = max(secs, key=lambda k: secs[k])
            out.append(
                card(
                    "time",
                    "",
                    "Run time",
                    _fmt_secs(sum(secs.values())),
                    f"slowest: {slowest} {_fmt_secs(secs[slowest])}",
                )
            )
        return out

    def seconds(self) -> dict[str, float]:
        timings = _mapping(self.summary.get("timings"))
        return {str(k): v for k, v in ((k, _num(v)) for k, v in timings.items()) if v is not None}

    # ----------------------------------------------------------------- overview

    def overview(self) -> dict[str, Any]:
        n_rows = self.n_rows
        status = self.counts("status_counts", "status")
        actions = self.counts("action_counts", "action")
        ordered = [a for a in _ACTION_ORDER if a in actions] + sorted(
            a for a in actions if a not in _ACTION_ORDER
        )
        secs = self.seconds()
        top = max(secs.values(), default=0.0) or 1.0
        return {
            "status": [
                {
                    "key": k,
                    "cls": "b-ok" if k == "ok" else "b-status",
                    "count": f"{v:,}",
                    "share": _share(v, n_rows),
                    "meaning": _STATUS_REASONS.get(k, ""),
                }
                for k, v in sorted(status.items(), key=lambda kv: (kv[0] != "ok", -kv[1]))
            ],
            "actions": [
                {
                    "key": a,
                    "cls": f"b-{a}",
                    "count": f"{actions[a]:,}",
                    "share": _share(actions[a], n_rows),
                    "meaning": _ACTION_MEANINGS.get(a, ""),
                }
                for a in ordered
            ],
            "decision": self.decision(),
            "timings": [
                {"stage": k, "time": _fmt_secs(v), "pct": f"{100 * v / top:.1f}"}
                for k, v in secs.items()
            ],
            "total_time": _fmt_secs(sum(secs.values())) if secs else "",
            "warnings": self.other_warnings(),
        }

    def other_warnings(self) -> list[str]:
        """The summary's warnings that the header's banners do not already show."""
        warnings = self.summary.get("warnings") or []
        if not isinstance(warnings, (list, tuple)):
            return []
        shown = []
        if self.banners():
            shown.append("RANDOM weights")
        if str(self.summary.get("verdict") or "") == "undecided":
            shown.append("Undecided:")
        return [str(w) for w in warnings if not any(m in str(w) for m in shown)]

    def decision(self) -> list[dict[str, str]]:
        """What a user decides with: the model, the verdict, the cut and the rematch bar."""
        s = self.summary
        rows: list[tuple[str, Any]] = []
        model = _mapping(s.get("model"))
        if model.get("source"):
            rows.append(("Embeddings" if self.from_file else "Model", model["source"]))
        if model.get("device"):
            rows.append(("Device", model["device"]))
        if model.get("random_weights"):
            rows.append(("Weights", "random (--pretrained none)"))
        if s.get("verdict"):
            rows.append(("Verdict", s["verdict"]))
        rows.append(("Flag when match score is below", _fmt_float(self.threshold, 3)))
        mixture = _mapping(s.get("mixture"))
        cut = _num(mixture.get("score_at_threshold"))
        if cut is not None:
            space = str(mixture.get("space") or "pair_score").replace("_", " ")
            rows.append((f"Same cut on the {space}", _fmt_float(cut, 3)))
        if _num(s.get("estimated_noise_rate")) is not None:
            rate = _fmt_pct(s.get("estimated_noise_rate"))
            interval = [_num(v) for v in s.get("estimated_noise_rate_interval") or []]
            if len(interval) == 2 and None not in interval:
                rate += f" (90 % interval {_fmt_pct(interval[0])} to {_fmt_pct(interval[1])})"
            rows.append(("Estimated noise rate", rate))
        rematch = _mapping(s.get("rematch"))
        if rematch:
            if _num(rematch.get("min_confidence")) is not None:
                rows.append(("Rematch when confidence is at least", rematch["min_confidence"]))
            for key, label in (("n_suspects", "Suspects"), ("n_proposed", "Rematches proposed")):
                if _num(rematch.get(key)) is not None:
                    rows.append((label, _int(rematch[key])))
            if rematch.get("cost"):
                rows.append(("Rematch cost", rematch.get("cost_used") or rematch["cost"]))
            if _num(rematch.get("mass")) is not None:
                rows.append(("Transported mass", rematch["mass"]))
            if rematch.get("reason"):
                rows.append(("Rematch note", rematch["reason"]))
        return _kv(rows)

    # ----------------------------------------------------------------- scores

    def scores(self) -> dict[str, Any]:
        mixture = _mapping(self.summary.get("mixture"))
        space = str(mixture.get("space") or "pair_score")
        if space not in self.audit.columns:
            space = "pair_score"
        values = self.numeric(space)
        if values is None or not np.isfinite(values).any():
            return {"figure": None}
        flags = self.bool_col("is_mismatched")
        finite = np.isfinite(values)
        flagged = (flags if flags is not None else np.zeros(len(values), bool))[finite]
        cut = _num(mixture.get("score_at_threshold"))
        figure = plots.split_histogram(
            values[finite],
            flagged,
            statistic=space,
            cut=cut,
            components=self.components(mixture),
        )
        caption = (
            f"{int(finite.sum()):,} scored rows, {int(flagged.sum()):,} flagged (red): the "
            f"split flags the rows left of the cut on {space}."
            if cut is not None
            else f"{int(finite.sum()):,} scored rows; no cut: nothing is flagged."
        )
        return {"figure": figure, "caption": caption, "statistic": space}

    @staticmethod
    def components(mixture: Mapping[str, Any]) -> list[tuple[str, float, float, float]]:
        """Gaussian components to draw: the fitted clean component, or both of a 2-mixture."""
        weights = [_num(w) for w in mixture.get("weights") or []]
        means = [_num(m) for m in mixture.get("means") or []]
        stds = [_num(sd) for sd in mixture.get("stds") or []]
        comps = [
            (w, m, sd)
            for w, m, sd in zip(weights, means, stds, strict=False)
            if w is not None and m is not None and sd is not None and sd > 0
        ]
        if len(means) == 1 and comps:  # planted split: a Gaussian clean part
            return [("clean component", *comps[0])]
        if len(comps) == 2:
            low, high = sorted(comps, key=lambda c: c[1])
            return [("matched", *high), ("mismatched", *low)]
        return []

    # ----------------------------------------------------------------- cards

    def thumb(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        path = rec.get("image_path")
        if _missing(path) and self.image_col:
            path = rec.get(self.image_col)
        path = _text(path)
        result = None
        status = str(rec.get("status") or "ok")
        if path and status not in ("missing_image", "image_is_directory", "remote_image"):
            if path not in self.thumbs:
                self.thumbs[path] = _thumbnail(path, self.px)
            result = self.thumbs[path]
        if result is None:
            text = _PLACEHOLDERS.get(status, "no preview")
            return {"uri": None, "placeholder": text, "px": self.px}
        uri, w, h = result
        scale = self.px / max(w, h)  # fill the box, aspect kept
        return {
            "uri": uri,
            "w": max(1, round(w * scale)),
            "h": max(1, round(h * scale)),
            "px": self.px,
            "placeholder": "",
        }

    def meter(self, score: Any) -> dict[str, str] | None:
        value = _num(score)
        if value is None:
            return None
        value = min(max(value, 0.0), 1.0)
        thr = min(max(self.threshold, 0.0), 1.0)
        return {
            "pct": f"{100 * value:.1f}",
            "thr": f"{100 * thr:.1f}",
            "color": "#c73e3e" if value < self.threshold else "#2e8b57",
            "text": "<0.001" if 0 < value < 0.0005 else f"{value:.3f}",
            "thr_text": f"{self.threshold:.3g}",
        }

    @staticmethod
    def caption(label: str, text: Any, cls: str = "") -> dict[str, str]:
        raw = _text(text)
        return {
            "cls": cls,
            "label": label,
            "text": _truncate(raw, _CAPTION_CHARS) if raw.strip() else "(empty)",
            "title": _truncate(raw, _TITLE_CHARS) if len(raw) > _CAPTION_CHARS else "",
        }

    def evidence(self, rec: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Why a pair was flagged: what fits its image and its caption better, and the runner-up."""
        own = _num(rec.get("similarity"))
        out: list[dict[str, Any]] = []
        if own is None:
            return out
        out.append(
            {"kind": "own", "label": "This pair", "sim": f"{own:.3f}", "better": False, "text": ""}
        )
        for kind, row_key, sim_key, what in (
            ("caption", "alt_caption_row", "alt_caption_similarity", "Caption of row {} fits "),
            ("image", "alt_image_row", "alt_image_similarity", "Image of row {} fits "),
        ):
            row, sim = _int(rec.get(row_key)), _num(rec.get(sim_key))
            if row is None or row < 0 or sim is None:
                continue
            target = "this image" if kind == "caption" else "this caption"
            better = sim > own
            label = what.format(row) + (f"{target} better" if better else f"{target} less well")
            out.append(
                {
                    "kind": kind,
                    "label": label,
                    "row": row,
                    "sim": f"{sim:.3f}",
                    "better": better,
                    "text": _truncate(self.caption_of(row), 160) if kind == "caption" else "",
                }
            )
        row, sim = _int(rec.get("runner_up_row")), _num(rec.get("runner_up_similarity"))
        same = [e for e in out if e["kind"] == "caption" and e["row"] == row]
        if same:  # the better caption is also the runner-up: said once
            same[0]["label"] += " (the runner-up)"
        elif row is not None and row >= 0 and sim is not None:
            out.append(
                {
                    "kind": "runner",
                    "label": f"Runner-up caption: row {row}",
                    "row": row,
                    "sim": f"{sim:.3f}",
                    "better": sim > own,
                    "text": _truncate(self.caption_of(row), 160),
                }
            )
        return out

    def card(self, rec: Mapping[str, Any], *, show_label: bool = False) -> dict[str, Any]:
        action = _text(rec.get("action"))
        status = str(rec.get("status") or "ok")
        proposed_row = _int(rec.get("proposed_row"))
        # label cards stay compact: the rematch proposal and evidence are in the other galleries
        has_proposal = proposed_row is not None and proposed_row >= 0 and not show_label
        captions = [
            self.caption(
                "Given caption",
                rec.get(self.text_col) if self.text_col else None,
                "given replaced" if has_proposal and action == "rematch" else "given",
            )
        ]
        if has_proposal:
            conf = _fmt_float(rec.get("rematch_confidence"), 2)
            captions.append(
                self.caption(
                    f"Proposed caption · from row {proposed_row} · confidence {conf}",
                    rec.get("proposed_caption"),
                    "proposed",
                )
            )
        if show_label and self.label_col:
            conf = _fmt_float(rec.get("label_confidence"), 2)
            captions.append(self.caption("Given label", rec.get(self.label_col), "label"))
            captions.append(
                self.caption(
                    f"Suggested label · confidence {conf}",
                    rec.get("suggested_label"),
                    "proposed label",
                )
            )
        flagged = rec.get("is_mismatched")
        return {
            "row": _text(rec.get("row")),
            "action": action,
            "status": status,
            "flagged": bool(flagged) if not _missing(flagged) else False,
            "label_issue": show_label and bool(rec.get("is_label_issue")),
            "thumb": self.thumb(rec),
            "meter": self.meter(rec.get("match_score")),
            "captions": captions,
            "evidence": [] if show_label else self.evidence(rec),
            "path": _text(rec.get(self.image_col)) if self.image_col else "",
        }

    def gallery(
        self,
        positions: Sequence[int],
        total: int,
        *,
        noun: str,
        show_label: bool = False,
        divider_at: float | None = None,
    ) -> dict[str, Any]:
        """Cards for the rows at ``positions``; ``divider_at`` marks the threshold."""
        records = self.audit.iloc[list(positions)].to_dict("records") if len(positions) else []
        items: list[dict[str, Any]] = []
        divided = divider_at is None
        for rec in records:
            score = _num(rec.get("match_score"))
            if not divided and score is not None and score >= divider_at:
                items.append({"divider": f"{divider_at:.3g}", "card": None})
                divided = True
            items.append({"divider": None, "card": self.card(rec, show_label=show_label)})
        return {"entries": items, "shown": len(records), "total": total, "noun": noun}

    def _order(self, mask: np.ndarray, key: np.ndarray, ascending: bool) -> list[int]:
        """Positions of the ``gallery_size`` masked rows with the smallest/largest key."""
        positions = np.flatnonzero(mask)
        if not len(positions) or not self.gallery_size:
            return []
        vals = key[positions].astype(float)
        vals = np.where(np.isnan(vals), np.inf if ascending else -np.inf, vals)
        vals = vals if ascending else -vals
        k = min(self.gallery_size, len(positions))
        if k < len(positions):
            part = np.argpartition(vals, k - 1)[:k]
        else:
            part = np.arange(len(positions))
        part = part[np.lexsort((positions[part], vals[part]))]  # stable: ties by row order
        return [int(p) for p in positions[part]]

    def _suspect_key(self) -> np.ndarray:
        """Worst first: the split statistic, then the match score."""
        for name in ("pair_score", "match_score"):
            values = self.numeric(name)
            if values is not None:
                return values
        return np.zeros(len(self.audit))

    def suspects(self) -> dict[str, Any] | None:
        flags = self.bool_col("is_mismatched")
        if flags is None:
            return None
        order = self._order(flags, self._suspect_key(), True)
        return self.gallery(order, int(flags.sum()), noun="flagged pairs")

    def rematches(self) -> dict[str, Any] | None:
        prop = self.numeric("proposed_row")
        if prop is None:
            return None
        conf = self.numeric("rematch_confidence")
        mask = np.nan_to_num(prop, nan=-1) >= 0
        if "action" in self.audit.columns:
            mask &= (self.audit["action"] == "rematch").to_numpy()
        order = self._order(mask, conf if conf is not None else np.zeros(len(mask)), False)
        return self.gallery(order, int(mask.sum()), noun="rematched rows")

    def borderline(self) -> dict[str, Any] | None:
        score = self.numeric("match_score")
        if score is None:
            return None
        mask = np.isfinite(score)
        order = self._order(mask, np.abs(score - self.threshold), True)
        order = sorted(order, key=lambda i: (float(score[i]), i))  # along the score axis
        out = self.gallery(order, len(order), noun="borderline pairs", divider_at=self.threshold)
        out["scored"] = int(mask.sum())
        out["threshold"] = f"{self.threshold:.3g}"
        return out

    # ----------------------------------------------------------------- flagged table

    def flagged_table(self) -> dict[str, Any] | None:
        """Every flagged row (up to ``max_flagged_rows``) with its evidence, for the table."""
        flags = self.bool_col("is_mismatched")
        if flags is None:
            return None
        order = np.flatnonzero(flags)
        total = len(order)
        key = self._suspect_key()[order]
        order = order[np.lexsort((order, np.where(np.isnan(key), np.inf, key)))]
        order = order[: self.max_flagged_rows]
        columns = [
            ("row", "row", "num"),
            ("action", "action", "text"),
            ("pair_score", "pair score", "num"),
            ("similarity", "own sim.", "num"),
            ("alt_caption_similarity", "better caption sim. (row)", "num"),
            ("alt_image_similarity", "better image sim. (row)", "num"),
        ]
        if self.label_col:
            columns.append((self.label_col, "label", "text"))
        columns.append(("caption", "caption", "text"))
        columns.append(("proposed", "proposed caption (row, confidence)", "text"))
        present = [
            c for c in columns if c[0] in self.audit.columns or c[0] in ("caption", "proposed")
        ]
        rows = []
        for rec in self.audit.iloc[order].to_dict("records"):
            cells = []
            for name, _, kind in present:
                cells.append(self._table_cell(rec, name, kind))
            rows.append({"action": _text(rec.get("action")), "cells": cells})
        actions = sorted({r["action"] for r in rows if r["action"]})
        return {
            "columns": [{"label": label, "kind": kind} for _, label, kind in present],
            "rows": rows,
            "shown": len(rows),
            "total": total,
            "actions": actions,
        }

    def _table_cell(self, rec: Mapping[str, Any], name: str, kind: str) -> dict[str, str]:
        if name == "caption":
            text = _truncate(_text(rec.get(self.text_col)), _TABLE_CHARS) if self.text_col else ""
            return {"text": text, "sort": text.lower()}
        if name == "proposed":
            row = _int(rec.get("proposed_row"))
            if row is None or row < 0:
                return {"text": "", "sort": ""}
            text = _truncate(_text(rec.get("proposed_caption")), _TABLE_CHARS)
            conf = _fmt_float(rec.get("rematch_confidence"), 2)
            return {"text": f"{text} (row {row}, {conf})", "sort": text.lower()}
        if name in ("alt_caption_similarity", "alt_image_similarity"):
            sim = _num(rec.get(name))
            row = _int(rec.get(name.replace("similarity", "row")))
            if sim is None or row is None or row < 0:
                return {"text": "", "sort": ""}
            return {"text": f"{sim:.3f} ({row})", "sort": f"{sim:.6f}"}
        value = rec.get(name)
        if kind == "num":
            number = _num(value)
            if number is None:
                return {"text": "", "sort": ""}
            text = str(int(number)) if name == "row" else f"{number:.3f}"
            return {"text": text, "sort": repr(float(number))}
        text = _text(value)
        return {"text": text, "sort": text.lower()}

    # ----------------------------------------------------------------- unscored

    def unscored(self) -> dict[str, Any] | None:
        if "status" not in self.audit.columns:
            return None
        mask = (self.audit["status"].fillna("missing_value").astype(str) != "ok").to_numpy()
        total = int(mask.sum())
        index = np.flatnonzero(mask)[: self.max_table_rows]
        sub = self.audit.iloc[index]
        detail_col = next((c for c in ("status_detail", "reason") if c in sub.columns), None)
        rows = []
        for rec in sub.to_dict("records"):
            st = str(rec.get("status") or "missing_value")
            reason = _STATUS_REASONS.get(st, st)
            if detail_col and _text(rec.get(detail_col)):
                reason = f"{reason}: {rec.get(detail_col)}"
            image = rec.get(self.image_col) if self.image_col else rec.get("image_path")
            caption = _text(rec.get(self.text_col)) if self.text_col else ""
            rows.append(
                {
                    "row": _text(rec.get("row")),
                    "status": st,
                    "reason": reason,
                    "image": _text(image),
                    "caption": _truncate(caption, 160),
                    "action": _text(rec.get("action")),
                }
            )
        by_status = self.counts("status_counts", "status")
        return {
            "total": total,
            "rows": rows,
            "by_status": ", ".join(f"{v:,} {k}" for k, v in by_status.items() if k != "ok"),
        }

    # ----------------------------------------------------------------- labels

    def labels_section(self) -> dict[str, Any] | None:
        has_cols = "suggested_label" in self.audit.columns or "is_label_issue" in self.audit.columns
        if not self.labels and not has_cols:
            return None
        info = self.labels
        n_issues = info.get("n_label_issues")
        if _num(n_issues) is None:
            issue_flags = self.bool_col("is_label_issue")
            n_issues = int(issue_flags.sum()) if issue_flags is not None else None
        n_classes = info.get("n_classes")
        if _num(n_classes) is None and self.label_col:
            n_classes = int(self.audit[self.label_col].nunique())
        metrics = [
            ("label column", self.label_col or info.get("label_col") or "—"),
            ("classes", _fmt_int(n_classes)),
            ("label issues", _fmt_int(n_issues)),
            ("est. label noise", _fmt_pct(info.get("estimated_label_noise"))),
        ]
        label_status = _mapping(info.get("status_counts"))
        status = ", ".join(f"{_fmt_int(v)} {k}" for k, v in label_status.items())
        gallery = None
        flags = self.bool_col("is_label_issue")
        if flags is not None:
            key = self.numeric("label_score")
            if key is None:
                conf = self.numeric("label_confidence")
                key = -conf if conf is not None else np.zeros(len(flags))
            order = self._order(flags, key, True)
            gallery = self.gallery(order, int(flags.sum()), noun="label issues", show_label=True)
        return {
            "metrics": metrics,
            "status": status,
            "confusion": self.confusion(),
            "gallery": gallery,
        }

    def confusion(self) -> dict[str, Any] | None:
        given, suggested, counts = self._confusion_counts()
        if counts.size == 0:
            return None
        n_given, n_sugg = len(given), len(suggested)
        is_diag = np.array([[g == x for x in suggested] for g in given], dtype=bool)
        # the most frequent disagreements, from the full (unfolded) table
        top_pairs = [
            (counts[i, j], given[i], suggested[j])
            for i, j in zip(*np.nonzero(~is_diag & (counts > 0)), strict=True)
        ]
        top_pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
        folded = n_given > _MAX_CLASSES or n_sugg > _MAX_CLASSES
        if folded:
            given, suggested, counts = _fold(given, suggested, counts, is_diag)
        diag = np.array([[g == x and g != "(other)" for x in suggested] for g in given])
        other = np.array([[g == x == "(other)" for x in suggested] for g in given])
        off_mask = ~diag & ~other
        off_max = float(counts[off_mask].max()) if off_mask.any() else 0.0
        on_max = float(counts[diag].max()) if diag.any() else 0.0
        rows = []
        for i, g in enumerate(given):
            cells = []
            for j in range(len(suggested)):
                c = counts[i, j]
                top = on_max if diag[i, j] else off_max
                alpha = 0.08 + 0.6 * (c / top) if c > 0 and top > 0 and not other[i, j] else 0.0
                rgb = "46,139,87" if diag[i, j] else "199,62,62"
                cells.append({"text": f"{int(c):,}" if c else "", "bg": f"rgba({rgb},{alpha:.2f})"})
            rows.append({"given": g, "cells": cells})
        return {
            "suggested": suggested,
            "rows": rows,
            "wide": len(suggested) > 6,
            "folded": folded,
            "n_given": f"{n_given:,}",
            "n_sugg": f"{n_sugg:,}",
            "n_kept": _MAX_CLASSES - 1,
            "pairs": [
                {"given": g, "suggested": x, "count": f"{int(c):,}"} for c, g, x in top_pairs[:10]
            ],
        }

    def _confusion_counts(self) -> tuple[list[str], list[str], np.ndarray]:
        conf = self.labels.get("confusion")
        given: list[str] = []
        suggested: list[str] = []
        counts = np.zeros((0, 0))
        if isinstance(conf, Mapping) and conf.get("counts") is not None:
            try:
                counts = np.asarray(conf["counts"], dtype=float)
                given = [str(g) for g in conf.get("given") or range(counts.shape[0])]
                suggested = [str(g) for g in conf.get("suggested") or range(counts.shape[1])]
            except (TypeError, ValueError):
                counts = np.zeros((0, 0))
        if counts.ndim == 2 and counts.size and counts.shape == (len(given), len(suggested)):
            return given, suggested, counts
        if not self.label_col or "suggested_label" not in self.audit.columns:
            return [], [], np.zeros((0, 0))
        table = pd.crosstab(
            self.audit[self.label_col].astype(str), self.audit["suggested_label"].astype(str)
        )
        return (
            [str(x) for x in table.index],
            [str(x) for x in table.columns],
            table.to_numpy(dtype=float),
        )

    # ----------------------------------------------------------------- evaluation

    def evaluation(self) -> dict[str, Any] | None:
        ev = _mapping(self.summary.get("evaluation"))
        if not ev:
            return None
        groups = []
        for group, title in (("detection", "Mismatch detection"), ("rematch", "Rematch")):
            metrics = _mapping(ev.get(group))
            cells = [
                {
                    "key": _word(str(k)),
                    "value": fmt_metric(v, missing="—") if _num(v) is not None else _fmt_value(v),
                }
                for k, v in metrics.items()
                if not isinstance(v, (Mapping, list, tuple))
            ]
            if cells:
                groups.append({"id": f"eval-{group}", "title": title, "cells": cells})
        others = {k: v for k, v in ev.items() if k not in ("detection", "rematch", "pr_curve")}
        return {
            "groups": groups,
            "others": _kv(_flatten(others)),
            "curve": self.pr_curve(ev),
        }

    def pr_curve(self, ev: Mapping[str, Any]) -> Any:
        pr = _mapping(ev.get("pr_curve"))
        try:
            precision = np.asarray(pr.get("precision"), dtype=float).ravel()
            recall = np.asarray(pr.get("recall"), dtype=float).ravel()
        except (TypeError, ValueError):
            return None
        if precision.size < 2 or precision.shape != recall.shape:
            return None
        det = _mapping(ev.get("detection"))
        p, r = _num(det.get("precision")), _num(det.get("recall"))
        return plots.pr_curve(
            recall, precision, (r, p) if p is not None and r is not None else None
        )

    # ----------------------------------------------------------------- details

    def details(self) -> dict[str, Any] | None:
        s = self.summary
        groups: list[dict[str, Any]] = []
        mixture = _mapping(s.get("mixture"))
        if mixture:
            groups.append(
                {"id": "mixture", "title": "Split", "rows": _kv(self._words(_flatten(mixture)))}
            )
        # what "Model and decision" shows is not listed again
        rematch = {k: v for k, v in _mapping(s.get("rematch")).items() if k not in _DECIDED}
        if rematch:
            rows = _kv(self._words(_flatten(rematch)))
            groups.append({"id": "solver", "title": "Rematch solver", "rows": rows})
        settings = dict(self.settings)
        if self.from_file and isinstance(settings.get("embed"), Mapping):
            embed = {k: v for k, v in settings["embed"].items() if k not in _MODEL_SETTINGS}
            settings["embed"] = embed
        for key, title, value in (
            ("settings", "Settings", settings),
            ("versions", "Versions", _mapping(s.get("versions"))),
            ("files", "Files", _mapping(s.get("files"))),
        ):
            if value:
                groups.append({"id": key, "title": title, "rows": _kv(_flatten(value))})
        return {"groups": groups} if groups else None

    @staticmethod
    def _words(rows: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return [(".".join(_word(p) for p in k.split(".")), v) for k, v in rows]

    # ----------------------------------------------------------------- page

    def build(self) -> dict[str, Any]:
        s = self.summary
        manifest = s.get("manifest")
        sections = {
            "overview": self.overview(),
            "scores": self.scores(),
            "suspects": self.suspects(),
            "flagged": self.flagged_table(),
            "rematches": self.rematches(),
            "borderline": self.borderline(),
            "unscored": self.unscored(),
            "labels": self.labels_section(),
            "evaluation": self.evaluation(),
            "details": self.details(),
        }
        titles = {
            "overview": "Overview",
            "scores": "Scores",
            "suspects": "Suspects",
            "flagged": "All flagged",
            "rematches": "Rematches",
            "borderline": "Borderline",
            "unscored": "Not scored",
            "labels": "Labels",
            "evaluation": "Evaluation",
            "details": "Run details",
        }
        always = ("overview", "scores", "suspects", "rematches", "borderline")
        nav = [(k, t) for k, t in titles.items() if sections[k] is not None or k in always]
        return {
            "title": f"pmpclean audit · {Path(str(manifest)).name}"
            if manifest
            else "pmpclean audit",
            "version": _text(s.get("pmpclean_version")),
            "created": _text(s.get("created")),
            "header": self.header(),
            "nav": nav,
            **sections,
        }


def _fold(
    given: list[str], suggested: list[str], counts: np.ndarray, is_diag: np.ndarray
) -> tuple[list[str], list[str], np.ndarray]:
    """Keep the classes most involved in disagreements (then the largest), the same set on
    both axes, and sum the rest into "(other)"."""
    off = np.where(is_diag, 0.0, counts)
    involvement: dict[str, tuple[float, float]] = {}
    for i, g in enumerate(given):
        a, b = involvement.get(g, (0.0, 0.0))
        involvement[g] = (a + off[i].sum(), b + counts[i].sum())
    for j, x in enumerate(suggested):
        a, b = involvement.get(x, (0.0, 0.0))
        involvement[x] = (a + off[:, j].sum(), b + counts[:, j].sum())
    ranked = sorted(involvement, key=lambda c: (-involvement[c][0], -involvement[c][1], c))
    chosen = set(ranked[: _MAX_CLASSES - 1])
    rows_keep = [i for i, g in enumerate(given) if g in chosen]
    cols_keep = [j for j, x in enumerate(suggested) if x in chosen]
    rows_rest = [i for i in range(len(given)) if given[i] not in chosen]
    cols_rest = [j for j in range(len(suggested)) if suggested[j] not in chosen]
    new = np.zeros((len(rows_keep) + bool(rows_rest), len(cols_keep) + bool(cols_rest)))
    new[: len(rows_keep), : len(cols_keep)] = counts[np.ix_(rows_keep, cols_keep)]
    if rows_rest:
        new[-1, : len(cols_keep)] = counts[np.ix_(rows_rest, cols_keep)].sum(0)
    if cols_rest:
        new[: len(rows_keep), -1] = counts[np.ix_(rows_keep, cols_rest)].sum(1)
    if rows_rest and cols_rest:
        new[-1, -1] = counts[np.ix_(rows_rest, cols_rest)].sum()
    given = [given[i] for i in rows_keep] + (["(other)"] if rows_rest else [])
    suggested = [suggested[j] for j in cols_keep] + (["(other)"] if cols_rest else [])
    return given, suggested, new


def build_context(
    audit: pd.DataFrame, summary: Mapping[str, Any], **options: Any
) -> dict[str, Any]:
    """The data the report templates lay out; ``options`` as :func:`pmpclean.report.render_report`
    takes them (``gallery_size``, ``thumbnail_px``, ``image_col``, ``text_col``, ``label_col``,
    ``max_table_rows``, ``max_flagged_rows``)."""
    return _Context(audit, summary, **options).build()
