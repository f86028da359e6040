"""Self-contained HTML audit report for a ``scan`` (``DIR/report.html``).

The report is one HTML file with everything inline (CSS, SVG plots, base64
thumbnails) and a Content-Security-Policy that forbids any network access, so it
opens in any browser, offline, without pmpclean installed. It renders the audit
DataFrame and the summary dict described in the scan output contract:

- a header with the key numbers as cards (rows, flagged pairs, actions, noise rate);
- the status and action counts with their meaning, and the run time per stage;
- the score distributions as inline SVG: ``pair_score`` with the fitted mixture
  components and the threshold, ``match_score`` with the decision threshold;
- galleries (capped by ``gallery_size``) of the most suspicious pairs, the most
  confident rematches and the borderline pairs around the threshold;
- rows that could not be scored, with their reason;
- the label audit (given vs suggested labels, top label issues) when present;
- the evaluation metrics and precision-recall curve when ground truth was given;
- the model, settings, versions and written files.

Every value that comes from the dataset (captions, labels, paths) is HTML-escaped,
and arbitrary extra input columns (which may hold URLs) are never shown. Thumbnails
are only made for the rows a gallery shows, from local files; nothing remote is
ever fetched. This module never prints.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._numfmt import finite_or_none as _num
from ._numfmt import fmt_float, fmt_int, fmt_pct
from ._utils import atomic_open

__all__ = ["render_report", "write_report"]

# Text shown for each row status of the contract (``audit["status"]``).
_STATUS_REASONS: dict[str, str] = {
    "ok": "scored",
    "missing_image": "image file not found",
    "image_is_directory": "image path is a folder, not a file",
    "unreadable_image": "image file could not be decoded",
    "remote_image": "image is a remote URL (never fetched)",
    "empty_caption": "caption is empty",
    "missing_value": "missing value in the image or caption column",
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

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")

# Longest caption shown in a card (the full text lives in audit.parquet).
_CAPTION_CHARS = 280
_TITLE_CHARS = 1500
# Largest confusion table drawn; classes beyond are folded into "(other)".
_MAX_CLASSES = 12
# Points kept when drawing a precision-recall curve.
_MAX_CURVE_POINTS = 400

_PALETTE = {
    "bar": "#9fb3c8",
    "bar_flag": "#e3a3a3",
    "bar_ok": "#9cc9ae",
    "noisy": "#c73e3e",
    "clean": "#2e8b57",
    "other": "#7a5cc2",
    "total": "#334155",
    "threshold": "#1f2933",
    "curve": "#2f6fde",
    "grid": "#e6eaef",
    "axis": "#8794a3",
    "text": "#52606d",
}


# --------------------------------------------------------------------------- helpers


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return bool(np.isnan(value))
    return False


def _e(value: Any) -> str:
    """HTML-escape any value; missing values become the empty string."""
    if _missing(value):
        return ""
    return html.escape(str(value), quote=True)


def _int(value: Any) -> int | None:
    out = _num(value)
    return None if out is None else int(round(out))


# shared with the terminal output (pmpclean._numfmt); missing values show as an em dash
_fmt_int = partial(fmt_int, missing="—")
_fmt_float = partial(fmt_float, missing="—")
_fmt_pct = partial(fmt_pct, missing="—")


def _fmt_secs(value: Any) -> str:
    out = _num(value)
    if out is None:
        return "—"
    if out < 1:
        return f"{out * 1000:.0f} ms"
    if out < 120:
        return f"{out:.1f} s"
    minutes, seconds = divmod(out, 60)
    return f"{int(minutes)} min {seconds:.0f} s"


def _fmt_value(value: Any) -> str:
    """Compact text for a settings value (escaped by the caller)."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if _missing(value):
        return "—"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        text = ", ".join(_fmt_value(v) for v in items[:12])
        return f"[{text}{', …' if len(items) > 12 else ''}]"
    return str(value)


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


def _kv_table(rows: Iterable[tuple[str, Any]], *, cls: str = "data kv") -> str:
    body = "".join(
        f"<tr><th scope='row'>{_e(k)}</th><td>{_e(_fmt_value(v))}</td></tr>" for k, v in rows
    )
    return f"<table class='{cls}'><tbody>{body}</tbody></table>" if body else ""


def _is_local_path(path: str) -> bool:
    if not path:
        return False
    if _URL_SCHEME.match(path) and not _WINDOWS_DRIVE.match(path):
        return False  # http://, s3://, data:, file: ... never opened
    return True


def _thumbnail(path: str, px: int) -> tuple[str, int, int] | None:
    """Return ``(data_uri, width, height)`` of a small JPEG thumbnail, or None.

    Only local, readable image files are used, decoded as the audit saw them (the one
    decoder, :func:`pmpclean.data.open_image`: upright, 8-bit RGB); the aspect ratio
    is kept and the longest side is at most ``px`` pixels.
    """
    if not _is_local_path(path):
        return None
    try:
        if not os.path.isfile(path):
            return None
        from .data import open_image

        im = open_image(path, draft_size=px)  # JPEG: decode at reduced scale, much faster
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=78, optimize=True)
        width, height = im.size
    except Exception:  # unreadable, truncated, bomb, permission... -> placeholder
        return None
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"data:image/jpeg;base64,{data}", width, height


# --------------------------------------------------------------------------- SVG plots


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = start
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _gauss_pdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    std = max(std, 1e-12)
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def _beta_pdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    # moment-matched Beta(a, b) on [0, 1]
    var = max(std, 1e-6) ** 2
    mean = min(max(mean, 1e-6), 1 - 1e-6)
    common = mean * (1 - mean) / var - 1
    if common <= 0:
        return _gauss_pdf(x, mean, std)
    a, b = mean * common, (1 - mean) * common
    inside = (x > 0) & (x < 1)
    xs = np.clip(x, 1e-9, 1 - 1e-9)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    out = np.exp(log_norm + (a - 1) * np.log(xs) + (b - 1) * np.log1p(-xs))
    return np.where(inside, out, 0.0)


class _Plot:
    """A minimal SVG chart: linear axes, grid, bars, lines, markers and a legend."""

    def __init__(
        self,
        *,
        width: int = 640,
        height: int = 270,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        x_label: str,
        y_label: str,
        title: str,
        margin: tuple[int, int, int, int] = (34, 18, 44, 56),  # top, right, bottom, left
        y_ticks: int = 4,
    ) -> None:
        self.y_ticks = y_ticks
        self.w, self.h = width, height
        self.mt, self.mr, self.mb, self.ml = margin
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1.0
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1.0
        self.title = title
        self.parts: list[str] = []
        self.legend: list[tuple[str, str, str]] = []  # (kind, color, label)
        self._axes(x_label, y_label)

    def px(self, x: float) -> float:
        return self.ml + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.ml - self.mr)

    def py(self, y: float) -> float:
        return self.h - self.mb - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.mt - self.mb)

    def _axes(self, x_label: str, y_label: str) -> None:
        p = self.parts
        left, right = self.ml, self.w - self.mr
        top, bottom = self.mt, self.h - self.mb
        for t in _nice_ticks(self.y0, self.y1, self.y_ticks):
            y = self.py(t)
            p.append(
                f"<line x1='{left}' x2='{right}' y1='{y:.1f}' y2='{y:.1f}' "
                f"stroke='{_PALETTE['grid']}'/>"
                f"<text x='{left - 6}' y='{y + 3.5:.1f}' text-anchor='end'>{_tick_label(t)}</text>"
            )
        for t in _nice_ticks(self.x0, self.x1, 6):
            x = self.px(t)
            p.append(
                f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{bottom}' y2='{bottom + 4}' "
                f"stroke='{_PALETTE['axis']}'/>"
                f"<text x='{x:.1f}' y='{bottom + 16}' text-anchor='middle'>{_tick_label(t)}</text>"
            )
        p.append(
            f"<line x1='{left}' x2='{right}' y1='{bottom}' y2='{bottom}' "
            f"stroke='{_PALETTE['axis']}'/>"
            f"<text x='{(left + right) / 2:.1f}' y='{self.h - 8}' text-anchor='middle' "
            f"class='axl'>{_e(x_label)}</text>"
            f"<text transform='translate(14 {(top + bottom) / 2:.1f}) rotate(-90)' "
            f"text-anchor='middle' class='axl'>{_e(y_label)}</text>"
        )

    def bars(self, edges: np.ndarray, heights: np.ndarray, colors: Sequence[str]) -> None:
        base = self.py(max(self.y0, 0.0))
        for lo, hi, h, color in zip(edges[:-1], edges[1:], heights, colors, strict=True):
            if h <= 0:
                continue
            x, x2, y = self.px(lo), self.px(hi), self.py(min(h, self.y1))
            self.parts.append(
                f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(x2 - x - 0.6, 0.6):.1f}' "
                f"height='{max(base - y, 0.5):.1f}' fill='{color}'/>"
            )

    def line(
        self,
        xs: np.ndarray,
        ys: np.ndarray,
        color: str,
        *,
        width: float = 2.0,
        dash: str | None = None,
        label: str | None = None,
    ) -> None:
        keep = np.isfinite(xs) & np.isfinite(ys)
        xs, ys = xs[keep], np.clip(ys[keep], self.y0, self.y1)
        if len(xs) < 2:
            return
        pts = " ".join(f"{self.px(x):.1f},{self.py(y):.1f}" for x, y in zip(xs, ys, strict=True))
        dash_attr = f" stroke-dasharray='{dash}'" if dash else ""
        self.parts.append(
            f"<polyline points='{pts}' fill='none' stroke='{color}' stroke-width='{width}' "
            f"stroke-linejoin='round'{dash_attr}/>"
        )
        if label:
            self.legend.append(("dash" if dash else "line", color, label))

    def vline(self, x: float, label: str) -> None:
        if not (self.x0 <= x <= self.x1):
            return
        xp = self.px(x)
        anchor, dx = ("end", -5) if xp > (self.w - self.mr) - 120 else ("start", 5)
        self.parts.append(
            f"<line x1='{xp:.1f}' x2='{xp:.1f}' y1='{self.mt - 4}' y2='{self.h - self.mb}' "
            f"stroke='{_PALETTE['threshold']}' stroke-width='1.5' stroke-dasharray='5 4'/>"
            f"<text x='{xp + dx:.1f}' y='{self.mt + 8}' text-anchor='{anchor}' "
            f"class='thr'>{_e(label)}</text>"
        )

    def point(self, x: float, y: float, color: str, label: str) -> None:
        self.parts.append(
            f"<circle cx='{self.px(x):.1f}' cy='{self.py(y):.1f}' r='4.5' fill='{color}' "
            f"stroke='#fff' stroke-width='1.5'/>"
        )
        self.legend.append(("dot", color, label))

    def legend_box(self, kind: str, color: str, label: str) -> None:
        self.legend.append((kind, color, label))

    def svg(self) -> str:
        items = []
        x = self.ml
        for kind, color, label in self.legend:
            if kind == "box":
                mark = f"<rect x='{x}' y='9' width='12' height='10' fill='{color}'/>"
            elif kind == "dot":
                mark = f"<circle cx='{x + 6}' cy='14' r='4.5' fill='{color}'/>"
            else:
                dash = " stroke-dasharray='4 3'" if kind == "dash" else ""
                mark = (
                    f"<line x1='{x}' x2='{x + 14}' y1='14' y2='14' stroke='{color}' "
                    f"stroke-width='2.5'{dash}/>"
                )
            items.append(f"{mark}<text x='{x + 18}' y='18'>{_e(label)}</text>")
            x += 26 + int(6.2 * len(label))
        return (
            f"<svg class='plot' viewBox='0 0 {self.w} {self.h}' role='img' "
            f"aria-label='{_e(self.title)}' preserveAspectRatio='xMidYMid meet'>"
            f"<title>{_e(self.title)}</title>{''.join(self.parts)}{''.join(items)}</svg>"
        )


def _figure(fid: str, svg: str, caption: str) -> str:
    return f"<figure id='{fid}'>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


def _histogram(
    values: np.ndarray, lo: float, hi: float, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return counts.astype(float), edges


# --------------------------------------------------------------------------- renderer


def _css() -> str:
    """The report stylesheet (pmpclean/templates/report.css), inlined into every page."""
    from importlib.resources import files

    return files("pmpclean").joinpath("templates/report.css").read_text(encoding="utf-8")


_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'"
)


class _Renderer:
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
        settings = summary.get("settings") or {}
        self.settings: Mapping[str, Any] = settings if isinstance(settings, Mapping) else {}
        labels = summary.get("labels")
        self.labels: Mapping[str, Any] = labels if isinstance(labels, Mapping) else {}
        data_settings = self.settings.get("data") or {}
        self.text_col = self._column(
            text_col, data_settings.get("text_col", self.settings.get("text_col")), "caption"
        )
        self.image_col = self._column(
            image_col, data_settings.get("image_col", self.settings.get("image_col")), "image"
        )
        self.label_col = self._column(
            label_col, self.labels.get("label_col"), self.settings.get("label_col")
        )
        thr = _num(summary.get("threshold"))
        self.threshold = 0.5 if thr is None else thr
        self.thumbs: dict[str, tuple[str, int, int] | None] = {}

    def _column(self, *candidates: Any) -> str | None:
        for name in candidates:
            if isinstance(name, str) and name in self.audit.columns:
                return name
        return None

    # ----------------------------------------------------------------- data access

    def col(self, name: str) -> pd.Series | None:
        return self.audit[name] if name in self.audit.columns else None

    def numeric(self, name: str) -> np.ndarray | None:
        series = self.col(name)
        if series is None:
            return None
        return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)

    def bool_col(self, name: str) -> np.ndarray | None:
        series = self.col(name)
        if series is None:
            return None
        return series.fillna(False).astype(bool).to_numpy()

    @property
    def n_rows(self) -> int:
        n = _int(self.summary.get("n_rows"))
        return len(self.audit) if n is None else n

    def counts(self, key: str, column: str) -> dict[str, int]:
        given = self.summary.get(key)
        if isinstance(given, Mapping) and given:
            return {str(k): int(_int(v) or 0) for k, v in given.items()}
        series = self.col(column)
        if series is None:
            return {}
        return {str(k): int(v) for k, v in series.value_counts(sort=True).items()}

    # ----------------------------------------------------------------- thumbnails

    def thumb_html(self, rec: Mapping[str, Any]) -> str:
        path = rec.get("image_path")
        if _missing(path) and self.image_col:
            path = rec.get(self.image_col)
        path = "" if _missing(path) else str(path)
        result = None
        status = str(rec.get("status") or "ok")
        if path and status not in ("missing_image", "image_is_directory", "remote_image"):
            if path not in self.thumbs:
                self.thumbs[path] = _thumbnail(path, self.px)
            result = self.thumbs[path]
        box = f"width:{self.px}px;height:{self.px}px"
        if result is None:
            text = _PLACEHOLDERS.get(status, "no preview")
            return f"<div class='thumb ph' style='{box}'>{_e(text)}</div>"
        uri, w, h = result
        scale = self.px / max(w, h)  # fill the box, aspect kept
        dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
        return (
            f"<div class='thumb' style='{box}'><img src='{uri}' width='{dw}' height='{dh}' "
            f"alt='image of row {_e(rec.get('row'))}' loading='lazy'></div>"
        )

    # ----------------------------------------------------------------- cards

    def meter(self, score: Any) -> str:
        value = _num(score)
        if value is None:
            return "<div class='meter'>match <b>not scored</b></div>"
        value = min(max(value, 0.0), 1.0)
        color = "#c73e3e" if value < self.threshold else "#2e8b57"
        thr = min(max(self.threshold, 0.0), 1.0)
        return (
            "<div class='meter'>match "
            f"<span class='track'><span class='fill' style='width:{100 * value:.1f}%;"
            f"background:{color}'></span>"
            f"<span class='tick' style='left:calc({100 * thr:.1f}% - 1px)'>"
            f"</span></span><b>{'&lt;0.001' if 0 < value < 0.0005 else f'{value:.3f}'}</b></div>"
        )

    def caption_block(self, kind: str, label: str, text: Any, extra_cls: str = "") -> str:
        raw = "" if _missing(text) else str(text)
        shown = _truncate(raw, _CAPTION_CHARS) if raw.strip() else "(empty)"
        title = f" title='{_e(_truncate(raw, _TITLE_CHARS))}'" if len(raw) > _CAPTION_CHARS else ""
        return (
            f"<div class='cap {kind} {extra_cls}'><span class='k'>{_e(label)}</span>"
            f"<span class='t'{title}>{_e(shown)}</span></div>"
        )

    def card(self, rec: Mapping[str, Any], *, show_label: bool = False) -> str:
        action = str(rec.get("action") or "")
        status = str(rec.get("status") or "ok")
        flagged = (
            bool(rec.get("is_mismatched")) if not _missing(rec.get("is_mismatched")) else False
        )
        badges = [f"<span class='rowid'>row {_e(rec.get('row'))}</span>"]
        if action:
            badges.append(f"<span class='badge b-{_e(action)}'>{_e(action)}</span>")
        if flagged:
            badges.append("<span class='badge b-flag'>flagged</span>")
        if status != "ok":
            badges.append(f"<span class='badge b-status'>{_e(status)}</span>")
        if show_label and bool(rec.get("is_label_issue")):
            badges.append("<span class='badge b-flag'>label issue</span>")
        parts = [f"<div class='meta'>{''.join(badges)}</div>", self.meter(rec.get("match_score"))]

        proposed_row = _int(rec.get("proposed_row"))
        # label cards stay compact: the rematch proposal is in the other galleries
        has_proposal = proposed_row is not None and proposed_row >= 0 and not show_label
        caption = rec.get(self.text_col) if self.text_col else None
        replaced = "replaced" if has_proposal and action == "rematch" else ""
        parts.append(self.caption_block("given", "Given caption", caption, replaced))
        if has_proposal:
            conf = _fmt_float(rec.get("rematch_confidence"), 2)
            parts.append(
                self.caption_block(
                    "proposed",
                    f"Proposed caption · from row {proposed_row} · confidence {conf}",
                    rec.get("proposed_caption"),
                )
            )
        if show_label and self.label_col:
            conf = _fmt_float(rec.get("label_confidence"), 2)
            parts.append(self.caption_block("label", "Given label", rec.get(self.label_col)))
            parts.append(
                self.caption_block(
                    "proposed label",
                    f"Suggested label · confidence {conf}",
                    rec.get("suggested_label"),
                )
            )
        if self.image_col and not _missing(rec.get(self.image_col)):
            parts.append(f"<div class='path'>{_e(rec.get(self.image_col))}</div>")
        cls = f"card a-{_e(action)}" if action else "card"
        return (
            f"<article class='{cls}' data-row='{_e(rec.get('row'))}'>{self.thumb_html(rec)}"
            f"<div class='cbody'>{''.join(parts)}</div></article>"
        )

    def gallery(
        self,
        positions: Sequence[int],
        total: int,
        *,
        noun: str,
        show_label: bool = False,
        divider_at: float | None = None,
    ) -> str:
        """Cards for the rows at ``positions``; ``divider_at`` marks the threshold."""
        if not len(positions):
            return f"<p class='empty'>No {noun}.</p>"
        records = self.audit.iloc[list(positions)].to_dict("records")
        html_cards = []
        divided = divider_at is None
        for rec in records:
            score = _num(rec.get("match_score"))
            if not divided and score is not None and score >= divider_at:
                html_cards.append(
                    f"<div class='divider'><span>threshold {divider_at:.3g} · "
                    "pairs before this line are flagged, pairs after it are kept</span></div>"
                )
                divided = True
            html_cards.append(self.card(rec, show_label=show_label))
        cards = "".join(html_cards)
        index = positions
        more = ""
        if total > len(index):
            more = (
                f"<p class='more'>Showing {len(index):,} of {total:,} {noun}; "
                "every row is in audit.parquet / audit.csv.</p>"
            )
        return f"<div class='gallery'>{cards}</div>{more}"

    # ----------------------------------------------------------------- sections

    def section(self, sid: str, title: str, body: str, lead: str = "") -> str:
        lead_html = f"<p class='lead'>{lead}</p>" if lead else ""
        return (
            f"<section id='{sid}'><h2>{_e(title)}<a class='anchor' href='#{sid}' "
            f"aria-label='link to this section'>#</a></h2>{lead_html}{body}</section>"
        )

    def header(self) -> str:
        s = self.summary
        manifest = s.get("manifest")
        name = Path(str(manifest)).name if manifest else "dataset"
        model = s.get("model") if isinstance(s.get("model"), Mapping) else {}
        subs = []
        if manifest:
            subs.append(f"<span>manifest <b>{_e(manifest)}</b></span>")
        if model.get("source"):
            subs.append(f"<span>model <b>{_e(model.get('source'))}</b></span>")
        if model.get("device"):
            subs.append(f"<span>device <b>{_e(model.get('device'))}</b></span>")
        if s.get("created"):
            subs.append(f"<span>created <b>{_e(s.get('created'))}</b></span>")
        version = s.get("pmpclean_version")
        if version:
            subs.append(f"<span>pmpclean <b>{_e(version)}</b></span>")
        return (
            "<header class='top'><div class='brand'>pmpclean audit report</div>"
            f"<h1>{_e(name)}</h1><div class='sub'>{''.join(subs)}</div>"
            f"{self.verdict()}<div class='kpis'>{self.kpis()}</div></header>"
        )

    def verdict(self) -> str:
        """The audit's verdict, its reason and the noise-rate interval (every run)."""
        s = self.summary
        verdict = str(s.get("verdict") or "")
        interval = s.get("estimated_noise_rate_interval") or []
        lo, hi = (_num(v) for v in (list(interval) + [None, None])[:2])
        span = (
            f" · noise rate {_fmt_pct(s.get('estimated_noise_rate'))} "
            f"(90 % interval {_fmt_pct(lo)} to {_fmt_pct(hi)})"
            if lo is not None and hi is not None
            else ""
        )
        if not verdict:
            return ""
        cls = {"clean": "v-clean", "noisy": "v-noisy"}.get(verdict, "v-undecided warn")
        title = {
            "clean": "Verdict: clean",
            "noisy": "Verdict: noisy",
            "undecided": "Verdict: undecided — this model cannot audit this data",
        }.get(verdict, f"Verdict: {verdict}")
        return (
            f"<div class='verdict {cls}' id='verdict'><b>{_e(title)}</b>{_e(span)}"
            f"<div class='s'>{_e(s.get('verdict_reason') or '')}</div></div>"
        )

    def kpis(self) -> str:
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

        def card(kid: str, cls: str, label: str, value: str, sub: str = "") -> str:
            return (
                f"<div class='kpi {cls}' id='kpi-{kid}'><div class='l'>{_e(label)}</div>"
                f"<div class='v'>{_e(value)}</div><div class='s'>{_e(sub)}</div></div>"
            )

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
        rematch = s.get("rematch") if isinstance(s.get("rematch"), Mapping) else {}
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
        evaluation = s.get("evaluation") if isinstance(s.get("evaluation"), Mapping) else {}
        det = (
            evaluation.get("detection") if isinstance(evaluation.get("detection"), Mapping) else {}
        )
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
        timings = s.get("timings") if isinstance(s.get("timings"), Mapping) else {}
        secs = {k: v for k, v in ((k, _num(v)) for k, v in timings.items()) if v is not None}
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
        return "".join(out)

    def overview(self) -> str:
        n_rows = self.n_rows
        status = self.counts("status_counts", "status")
        status_rows = "".join(
            f"<tr><td><span class='badge {'b-ok' if k == 'ok' else 'b-status'}'>{_e(k)}</span></td>"
            f"<td class='num'>{v:,}</td><td class='num'>{_share(v, n_rows)}</td>"
            f"<td>{_e(_STATUS_REASONS.get(k, ''))}</td></tr>"
            for k, v in sorted(status.items(), key=lambda kv: (kv[0] != "ok", -kv[1]))
        )
        actions = self.counts("action_counts", "action")
        ordered = [a for a in _ACTION_ORDER if a in actions] + sorted(
            a for a in actions if a not in _ACTION_ORDER
        )
        action_rows = "".join(
            f"<tr><td><span class='badge b-{_e(a)}'>{_e(a)}</span></td>"
            f"<td class='num'>{actions[a]:,}</td><td class='num'>{_share(actions[a], n_rows)}</td>"
            f"<td>{_e(_ACTION_MEANINGS.get(a, ''))}</td></tr>"
            for a in ordered
        )
        head = (
            "<tr><th>{}</th><th class='num'>rows</th><th class='num'>share</th>"
            "<th>meaning</th></tr>"
        )
        parts = ["<div class='grid2'>"]
        parts.append(
            "<div><h3>Rows by status</h3>"
            + (
                f"<table class='data' id='status-table'><thead>{head.format('status')}</thead>"
                f"<tbody>{status_rows}</tbody></table>"
                if status_rows
                else "<p class='empty'>No status counts.</p>"
            )
            + "</div>"
        )
        parts.append(
            "<div><h3>Actions</h3>"
            + (
                f"<table class='data' id='action-table'><thead>{head.format('action')}</thead>"
                f"<tbody>{action_rows}</tbody></table>"
                if action_rows
                else "<p class='empty'>No action counts.</p>"
            )
            + "</div>"
        )
        parts.append("</div>")
        parts.append(f"<div class='grid2'><div>{self.decision_table()}</div>")
        parts.append(f"<div>{self.timings_table()}</div></div>")
        warnings = self.summary.get("warnings") or []
        if isinstance(warnings, (list, tuple)) and warnings:
            items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
            parts.append(f"<div class='warn' id='warnings'><b>Warnings</b><ul>{items}</ul></div>")
        return self.section("overview", "Overview", "".join(parts))

    def decision_table(self) -> str:
        s = self.summary
        rows: list[tuple[str, Any]] = []
        model = s.get("model") if isinstance(s.get("model"), Mapping) else {}
        for key in ("source", "device"):
            if model.get(key) is not None:
                rows.append((f"model {key}", model[key]))
        rows.append(("match-score threshold", self.threshold))
        if _num(s.get("estimated_noise_rate")) is not None:
            rows.append(("estimated noise rate", _fmt_pct(s.get("estimated_noise_rate"), 2)))
        mixture = s.get("mixture") if isinstance(s.get("mixture"), Mapping) else {}
        if mixture:
            rows.append(("mixture space", mixture.get("space", "pair_score")))
            if _num(mixture.get("score_at_threshold")) is not None:
                rows.append(("pair score at threshold", mixture["score_at_threshold"]))
        rematch = s.get("rematch") if isinstance(s.get("rematch"), Mapping) else {}
        for key, value in rematch.items():
            if not isinstance(value, (Mapping, list, tuple)):
                rows.append((f"rematch {key}", value))
        table = _kv_table(rows)
        if not table:
            return ""
        return f"<h3>Model and decision</h3><div id='decision'>{table}</div>"

    def timings_table(self) -> str:
        timings = self.summary.get("timings")
        if not isinstance(timings, Mapping) or not timings:
            return ""
        secs = [(str(k), _num(v)) for k, v in timings.items()]
        total = sum(v for _, v in secs if v is not None)
        top = max((v for _, v in secs if v is not None), default=0.0) or 1.0
        body = "".join(
            f"<tr><td>{_e(k)}</td><td class='num'>{_fmt_secs(v)}</td><td class='barcell'>"
            f"<span class='bar' style='width:{100 * (v or 0) / top:.1f}%'></span></td></tr>"
            for k, v in secs
        )
        body += f"<tr><th>total</th><th class='num'>{_fmt_secs(total)}</th><th></th></tr>"
        return (
            "<h3>Run time per stage</h3><table class='data' id='timings'>"
            "<thead><tr><th>stage</th><th class='num'>time</th><th></th></tr></thead>"
            f"<tbody>{body}</tbody></table>"
        )

    def scores(self) -> str:
        figs = []
        mixture = self.summary.get("mixture")
        mixture = mixture if isinstance(mixture, Mapping) else {}
        space = str(mixture.get("space") or "pair_score")
        if space not in self.audit.columns:
            space = "pair_score"
        pair = self.numeric(space)
        if pair is not None and np.isfinite(pair).any():
            figs.append(self.pair_score_plot(pair[np.isfinite(pair)], mixture, space))
        match = self.numeric("match_score")
        if match is not None and np.isfinite(match).any():
            figs.append(self.match_score_plot(match[np.isfinite(match)]))
        if not figs:
            body = "<p class='empty'>No scored rows to plot.</p>"
        else:
            body = f"<div class='grid2'>{''.join(figs)}</div>"
        lead = (
            "Left: the statistic the two-component mixture was fitted on, with the fitted "
            "components and the decision threshold. Right: the calibrated match score "
            "(higher = more likely a true pair); rows left of the threshold are flagged."
        )
        return self.section("scores", "Score distribution", body, lead)

    def pair_score_plot(self, values: np.ndarray, mixture: Mapping[str, Any], space: str) -> str:
        lo, hi = float(values.min()), float(values.max())
        thr_score = _num(mixture.get("score_at_threshold"))
        if thr_score is not None:
            lo, hi = min(lo, thr_score), max(hi, thr_score)
        pad = 0.02 * (hi - lo) if hi > lo else 0.5
        lo, hi = lo - pad, hi + pad
        bins = int(np.clip(np.sqrt(len(values)) * 2, 20, 70))
        counts, edges = _histogram(values, lo, hi, bins)
        width = float(edges[1] - edges[0])
        xs = np.linspace(lo, hi, 240)
        weights = [_num(w) for w in mixture.get("weights") or []]
        means = [_num(m) for m in mixture.get("means") or []]
        stds = [_num(sd) for sd in mixture.get("stds") or []]
        comps = [
            (w, m, sd)
            for w, m, sd in zip(weights, means, stds, strict=False)
            if w is not None and m is not None and sd is not None and sd > 0
        ]
        family = str(mixture.get("family") or mixture.get("kind") or "gaussian").lower()
        pdf = _beta_pdf if family.startswith("beta") else _gauss_pdf
        scale = len(values) * width
        curves = [(m, scale * w * pdf(xs, m, sd)) for w, m, sd in sorted(comps, key=lambda c: c[1])]
        y_max = max([counts.max()] + [float(c.max()) for _, c in curves]) * 1.12
        plot = _Plot(
            x_range=(lo, hi),
            y_range=(0, y_max),
            x_label=space,
            y_label="rows",
            title=f"Histogram of {space} with fitted mixture components",
        )
        if thr_score is not None:
            colors = [
                _PALETTE["bar_flag"] if (a + b) / 2 < thr_score else _PALETTE["bar"]
                for a, b in zip(edges[:-1], edges[1:], strict=True)
            ]
        else:
            colors = [_PALETTE["bar"]] * len(counts)
        plot.bars(edges, counts, colors)
        for i, (mean, curve) in enumerate(curves):
            if len(curves) == 2:
                color, name = (
                    (_PALETTE["noisy"], "mismatched") if i == 0 else (_PALETTE["clean"], "matched")
                )
            else:
                color, name = _PALETTE["other"], f"component {i + 1}"
            weight = next(w for w, m, _ in comps if m == mean)
            plot.line(xs, curve, color, label=f"{name} ({100 * weight:.0f}%)")
        if len(curves) > 1:
            plot.line(
                xs,
                sum(c for _, c in curves),
                _PALETTE["total"],
                width=1.2,
                dash="4 3",
                label="mixture",
            )
        if thr_score is not None:
            plot.vline(thr_score, f"threshold {thr_score:.3g}")
        caption = (
            f"{len(values):,} scored rows. Red bars fall on the flagged side of the threshold."
            if thr_score is not None
            else f"{len(values):,} scored rows."
        )
        return _figure("fig-pair-score", plot.svg(), caption)

    def match_score_plot(self, values: np.ndarray) -> str:
        counts, edges = _histogram(np.clip(values, 0, 1), 0.0, 1.0, 40)
        thr = self.threshold
        colors = [
            _PALETTE["bar_flag"] if (a + b) / 2 < thr else _PALETTE["bar_ok"]
            for a, b in zip(edges[:-1], edges[1:], strict=True)
        ]
        plot = _Plot(
            x_range=(0.0, 1.0),
            y_range=(0, max(counts.max(), 1) * 1.12),
            x_label="match_score (higher = more likely a true pair)",
            y_label="rows",
            title="Histogram of match_score with the decision threshold",
        )
        plot.bars(edges, counts, colors)
        plot.legend_box("box", _PALETTE["bar_flag"], "flagged")
        plot.legend_box("box", _PALETTE["bar_ok"], "kept")
        plot.vline(thr, f"threshold {thr:.3g}")
        n_below = int((values < thr).sum())
        caption = f"{n_below:,} of {len(values):,} scored rows below the threshold."
        return _figure("fig-match-score", plot.svg(), caption)

    def suspects(self) -> str:
        flags = self.bool_col("is_mismatched")
        score = self.numeric("match_score")
        if flags is None:
            return self.section(
                "suspects",
                "Most suspicious pairs",
                "<p class='empty'>The audit has no is_mismatched column.</p>",
            )
        total = int(flags.sum())
        order = self._order(flags, score if score is not None else np.zeros(len(flags)), True)
        lead = (
            "Pairs flagged as mismatched, lowest match score first. "
            "A proposed caption is shown when the rematch found one."
        )
        return self.section(
            "suspects",
            "Most suspicious pairs",
            self.gallery(order, total, noun="flagged pairs"),
            lead,
        )

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

    def rematches(self) -> str:
        prop = self.numeric("proposed_row")
        conf = self.numeric("rematch_confidence")
        actions = self.col("action")
        if prop is None:
            return self.section(
                "rematches",
                "Confident rematches",
                "<p class='empty'>The audit has no rematch proposals.</p>",
            )
        mask = np.nan_to_num(prop, nan=-1) >= 0
        if actions is not None:
            mask &= (actions == "rematch").to_numpy()
        total = int(mask.sum())
        order = self._order(mask, conf if conf is not None else np.zeros(len(mask)), False)
        lead = (
            "Rows whose image gets a caption from another row, highest rematch confidence "
            "first. The given caption is struck through; the proposal is highlighted."
        )
        return self.section(
            "rematches",
            "Confident rematches",
            self.gallery(order, total, noun="rematched rows"),
            lead,
        )

    def borderline(self) -> str:
        score = self.numeric("match_score")
        if score is None:
            return self.section(
                "borderline",
                "Borderline pairs",
                "<p class='empty'>The audit has no match scores.</p>",
            )
        mask = np.isfinite(score)
        order = self._order(mask, np.abs(score - self.threshold), True)
        if order:  # show them left to right along the score axis
            order = sorted(order, key=lambda i: (float(score[i]), i))
        total = int(mask.sum())
        lead = (
            f"The scored rows closest to the threshold ({self.threshold:.3g}), in increasing "
            "match score. If many pairs just below it look right (or just above look wrong), "
            "move the threshold."
        )
        body = self.gallery(order, len(order), noun="borderline pairs", divider_at=self.threshold)
        if total > len(order):
            body += (
                f"<p class='more'>The {len(order):,} of {total:,} scored rows nearest "
                "the threshold.</p>"
            )
        return self.section("borderline", "Borderline pairs", body, lead)

    def unscored(self) -> str:
        status = self.col("status")
        if status is None:
            return ""
        mask = (status.fillna("missing_value").astype(str) != "ok").to_numpy()
        total = int(mask.sum())
        if not total:
            body = "<p class='empty'>Every row was scored.</p>"
            return self.section("unscored", "Rows not scored", body)
        index = np.flatnonzero(mask)[: self.max_table_rows]
        sub = self.audit.iloc[index]
        detail_col = next((c for c in ("status_detail", "reason") if c in sub.columns), None)
        rows = []
        for rec in sub.to_dict("records"):
            st = str(rec.get("status") or "missing_value")
            reason = _STATUS_REASONS.get(st, st)
            if detail_col and not _missing(rec.get(detail_col)) and str(rec.get(detail_col)):
                reason = f"{reason}: {rec.get(detail_col)}"
            image = rec.get(self.image_col) if self.image_col else rec.get("image_path")
            caption = rec.get(self.text_col) if self.text_col else ""
            cap_text = "" if _missing(caption) else _truncate(str(caption), 160)
            rows.append(
                f"<tr><td class='num'>{_e(rec.get('row'))}</td>"
                f"<td><span class='badge b-status'>{_e(st)}</span></td><td>{_e(reason)}</td>"
                f"<td class='path-cell'>{_e(image)}</td><td>{_e(cap_text)}</td>"
                f"<td><span class='badge b-{_e(rec.get('action'))}'>{_e(rec.get('action'))}</span>"
                "</td></tr>"
            )
        by_status = self.counts("status_counts", "status")
        summary_line = ", ".join(f"{v:,} {k}" for k, v in by_status.items() if k != "ok")
        more = ""
        if total > len(index):
            more = (
                f"<p class='more'>Showing the first {len(index):,} of {total:,} rows not "
                "scored; every row is in audit.parquet / audit.csv.</p>"
            )
        body = (
            f"<p class='lead'>{total:,} rows could not be scored ({_e(summary_line)}). "
            "They get no match score and are not used to fit the mixture.</p>"
            "<table class='data' id='unscored-table'><thead><tr><th class='num'>row</th>"
            "<th>status</th><th>reason</th><th>image</th><th>caption</th><th>action</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>{more}"
        )
        return self.section("unscored", "Rows not scored", body)

    def labels_section(self) -> str:
        has_cols = "suggested_label" in self.audit.columns or "is_label_issue" in self.audit.columns
        if not self.labels and not has_cols:
            return ""
        info = self.labels
        n_issues = info.get("n_label_issues")
        if _num(n_issues) is None:
            issue_flags = self.bool_col("is_label_issue")
            n_issues = int(issue_flags.sum()) if issue_flags is not None else None
        n_classes = info.get("n_classes")
        if _num(n_classes) is None and self.label_col:
            n_classes = int(self.audit[self.label_col].nunique())
        parts = ["<div class='metrics'>"]
        for label, value in (
            ("label column", self.label_col or info.get("label_col") or "—"),
            ("classes", _fmt_int(n_classes)),
            ("label issues", _fmt_int(n_issues)),
            ("est. label noise", _fmt_pct(info.get("estimated_label_noise"))),
        ):
            parts.append(
                f"<div class='metric'><div class='l'>{_e(label)}</div>"
                f"<div class='v'>{_e(value)}</div></div>"
            )
        parts.append("</div>")
        label_status = info.get("status_counts")
        if isinstance(label_status, Mapping) and label_status:
            text = ", ".join(f"{_fmt_int(v)} {k}" for k, v in label_status.items())
            parts.append(f"<p class='more' id='label-status'>Label status: {_e(text)}.</p>")
        parts.append(self.confusion())
        flags = self.bool_col("is_label_issue")
        if flags is not None:
            key = self.numeric("label_score")
            if key is None:
                conf = self.numeric("label_confidence")
                key = -conf if conf is not None else np.zeros(len(flags))
            order = self._order(flags, key, True)
            parts.append("<h3>Most confident label issues</h3>")
            parts.append(
                self.gallery(order, int(flags.sum()), noun="label issues", show_label=True)
            )
        lead = (
            "Given labels against the labels the audit suggests (rows: given, columns: "
            "suggested). Off-diagonal cells are disagreements."
        )
        return self.section("labels", "Label audit", "".join(parts), lead)

    def confusion(self) -> str:
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
        if counts.ndim != 2 or counts.size == 0 or counts.shape != (len(given), len(suggested)):
            if not self.label_col or "suggested_label" not in self.audit.columns:
                return ""
            table = pd.crosstab(
                self.audit[self.label_col].astype(str), self.audit["suggested_label"].astype(str)
            )
            given, suggested = [str(x) for x in table.index], [str(x) for x in table.columns]
            counts = table.to_numpy(dtype=float)
        if counts.size == 0:
            return ""
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
            # keep the classes most involved in disagreements (then the largest), the same
            # set on both axes, and sum the rest into "(other)"
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
            rows_rest = [i for i in range(n_given) if given[i] not in chosen]
            cols_rest = [j for j in range(n_sugg) if suggested[j] not in chosen]
            new = np.zeros((len(rows_keep) + bool(rows_rest), len(cols_keep) + bool(cols_rest)))
            new[: len(rows_keep), : len(cols_keep)] = counts[np.ix_(rows_keep, cols_keep)]
            if rows_rest:
                new[-1, : len(cols_keep)] = counts[np.ix_(rows_rest, cols_keep)].sum(0)
            if cols_rest:
                new[: len(rows_keep), -1] = counts[np.ix_(rows_keep, cols_rest)].sum(1)
            if rows_rest and cols_rest:
                new[-1, -1] = counts[np.ix_(rows_rest, cols_rest)].sum()
            counts = new
            given = [given[i] for i in rows_keep] + (["(other)"] if rows_rest else [])
            suggested = [suggested[j] for j in cols_keep] + (["(other)"] if cols_rest else [])
        diag = np.array([[g == x and g != "(other)" for x in suggested] for g in given])
        other = np.array([[g == x == "(other)" for x in suggested] for g in given])
        off_mask = ~diag & ~other
        off_max = float(counts[off_mask].max()) if off_mask.any() else 0.0
        on_max = float(counts[diag].max()) if diag.any() else 0.0
        head = "".join(f"<th class='num rot'>{_e(x)}</th>" for x in suggested)
        body = []
        for i, g in enumerate(given):
            cells = []
            for j in range(len(suggested)):
                c = counts[i, j]
                top = on_max if diag[i, j] else off_max
                alpha = 0.08 + 0.6 * (c / top) if c > 0 and top > 0 and not other[i, j] else 0.0
                rgb = "46,139,87" if diag[i, j] else "199,62,62"
                style = f" style='background:rgba({rgb},{alpha:.2f})'" if alpha else ""
                cells.append(
                    f"<td class='num'{style}>{int(c):,}</td>"
                    if c
                    else "<td class='num' style='color:#c5cdd6'>·</td>"
                )
            body.append(f"<tr><th scope='row'>{_e(g)}</th>{''.join(cells)}</tr>")
        note = ""
        if folded:
            note = (
                f"<p class='more'>{n_given:,} given and {n_sugg:,} suggested classes: the "
                f"{_MAX_CLASSES - 1} classes with the most disagreements are shown, the rest "
                "are summed in (other).</p>"
            )
        pair_rows = "".join(
            f"<tr><td>{_e(g)}</td><td>{_e(s)}</td><td class='num'>{int(c):,}</td></tr>"
            for c, g, s in top_pairs[:10]
        )
        pairs_html = (
            "<div><h3>Most frequent disagreements</h3><table class='data' id='label-pairs'>"
            "<thead><tr><th>given</th><th>suggested</th><th class='num'>rows</th></tr></thead>"
            f"<tbody>{pair_rows}</tbody></table></div>"
            if pair_rows
            else ""
        )
        return (
            f"<div class='{'grid2' if len(suggested) <= 6 else 'stack'}'>"
            "<div><h3>Given vs suggested labels</h3>"
            "<div style='overflow-x:auto'><table class='data cm' id='confusion'>"
            f"<thead><tr><th class='corner'>given \\ suggested</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>{note}</div>{pairs_html}</div>"
        )

    def evaluation(self) -> str:
        ev = self.summary.get("evaluation")
        if not isinstance(ev, Mapping) or not ev:
            return ""
        parts = []
        for group, title in (("detection", "Mismatch detection"), ("rematch", "Rematch")):
            metrics = ev.get(group)
            if isinstance(metrics, Mapping) and metrics:
                cells = "".join(
                    f"<div class='metric'><div class='l'>{_e(k)}</div>"
                    f"<div class='v'>{_e(_fmt_float(v) if _num(v) is not None else _fmt_value(v))}"
                    "</div></div>"
                    for k, v in metrics.items()
                    if not isinstance(v, (Mapping, list, tuple))
                )
                parts.append(
                    f"<h3>{_e(title)}</h3><div class='metrics' id='eval-{group}'>{cells}</div>"
                )
        others = [(k, v) for k, v in ev.items() if k not in ("detection", "rematch", "pr_curve")]
        if others:
            parts.append("<h3>Other</h3>" + _kv_table(_flatten(dict(others))))
        curve = self.pr_curve(ev)
        body = (
            f"<div class='grid2'><div>{''.join(parts)}</div>{curve}</div>"
            if curve
            else "".join(parts)
        )
        lead = (
            "Measured against the ground-truth column: detection treats mismatched pairs as "
            "positives; rematch precision counts proposals that restore a true pair."
        )
        return self.section("evaluation", "Evaluation against ground truth", body, lead)

    def pr_curve(self, ev: Mapping[str, Any]) -> str:
        pr = ev.get("pr_curve")
        if not isinstance(pr, Mapping):
            return ""
        try:
            precision = np.asarray(pr.get("precision"), dtype=float).ravel()
            recall = np.asarray(pr.get("recall"), dtype=float).ravel()
        except (TypeError, ValueError):
            return ""
        if precision.size < 2 or precision.shape != recall.shape:
            return ""
        order = np.argsort(recall, kind="stable")
        recall, precision = recall[order], precision[order]
        if len(recall) > _MAX_CURVE_POINTS:
            pick = np.unique(np.linspace(0, len(recall) - 1, _MAX_CURVE_POINTS).round().astype(int))
            recall, precision = recall[pick], precision[pick]
        plot = _Plot(
            width=460,
            height=340,
            x_range=(0, 1),
            y_range=(0, 1.04),
            x_label="recall",
            y_label="precision",
            y_ticks=5,
            title="Precision-recall curve of mismatch detection",
        )
        plot.line(recall, precision, _PALETTE["curve"], width=2.2, label="detection")
        det = ev.get("detection") if isinstance(ev.get("detection"), Mapping) else {}
        p, r = _num(det.get("precision")), _num(det.get("recall"))
        if p is not None and r is not None:
            plot.point(r, p, _PALETTE["noisy"], "at threshold")
        return (
            f"<figure id='fig-pr'>{plot.svg()}<figcaption>Precision-recall curve of "
            "flagging mismatched pairs by match score.</figcaption></figure>"
        )

    def details(self) -> str:
        s = self.summary
        parts = []
        mixture = s.get("mixture") if isinstance(s.get("mixture"), Mapping) else {}
        weights = mixture.get("weights") or []
        if weights:
            means = list(mixture.get("means") or [])
            stds = list(mixture.get("stds") or [])
            means_num = [_num(m) for m in means]
            names = [f"{i + 1}" for i in range(len(weights))]
            if len(weights) == 2 and all(m is not None for m in means_num[:2]):
                low = int(np.argmin(means_num[:2]))  # the lower mean is the mismatched mode
                names = ["mismatched", "matched"] if low == 0 else ["matched", "mismatched"]
            rows = "".join(
                f"<tr><td>{_e(names[i])}</td><td class='num'>{_fmt_float(w)}</td>"
                f"<td class='num'>{_fmt_float(means[i] if i < len(means) else None, 4)}</td>"
                f"<td class='num'>{_fmt_float(stds[i] if i < len(stds) else None, 4)}</td></tr>"
                for i, w in enumerate(weights)
            )
            parts.append(
                f"<div><h3>Mixture ({_e(mixture.get('space', 'pair_score'))})</h3>"
                "<table class='data' id='mixture'><thead><tr><th>component</th>"
                "<th class='num'>weight</th><th class='num'>mean</th><th class='num'>std</th></tr>"
                f"</thead><tbody>{rows}</tbody></table></div>"
            )
        for key, title in (("settings", "Settings"), ("versions", "Versions"), ("files", "Files")):
            value = s.get(key)
            if isinstance(value, Mapping) and value:
                parts.append(
                    f"<div><h3>{title}</h3><div id='{key}'>{_kv_table(_flatten(value))}</div></div>"
                )
        if not parts:
            return ""
        return self.section("details", "Run details", f"<div class='grid3'>{''.join(parts)}</div>")

    def render(self) -> str:
        sections = [
            ("overview", "Overview", self.overview()),
            ("scores", "Scores", self.scores()),
            ("suspects", "Suspects", self.suspects()),
            ("rematches", "Rematches", self.rematches()),
            ("borderline", "Borderline", self.borderline()),
            ("unscored", "Not scored", self.unscored()),
            ("labels", "Labels", self.labels_section()),
            ("evaluation", "Evaluation", self.evaluation()),
            ("details", "Run details", self.details()),
        ]
        nav = "".join(f"<a href='#{sid}'>{_e(title)}</a>" for sid, title, body in sections if body)
        body = "".join(b for _, _, b in sections if b)
        s = self.summary
        manifest = s.get("manifest")
        title = f"pmpclean audit · {Path(str(manifest)).name}" if manifest else "pmpclean audit"
        footer = (
            f"Generated by pmpclean {_e(s.get('pmpclean_version') or '')} "
            f"{'on ' + _e(s.get('created')) if s.get('created') else ''}. "
            "Self-contained: no network access is needed or allowed. "
            "The full per-row data is in audit.parquet / audit.csv."
        )
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
            "<meta name='referrer' content='no-referrer'>"
            f"<meta name='generator' content='pmpclean {_e(s.get('pmpclean_version') or '')}'>"
            f"<title>{_e(title)}</title><style>{_css()}</style></head><body>"
            f"{self.header()}<nav class='toc' aria-label='sections'>{nav}</nav>"
            f"<main>{body}</main><footer>{footer}</footer></body></html>\n"
        )


# --------------------------------------------------------------------------- public API


def render_report(
    audit: pd.DataFrame,
    summary: Mapping[str, Any],
    *,
    gallery_size: int = 24,
    thumbnail_px: int = 128,
    image_col: str | None = None,
    text_col: str | None = None,
    label_col: str | None = None,
    max_table_rows: int = 200,
) -> str:
    """Render the scan audit as one self-contained HTML page.

    Parameters
    ----------
    audit : DataFrame, shape (n_rows, n_columns)
        The per-row audit of the scan output contract: input columns, then ``row``,
        ``status``, ``image_path``, ``pair_score``, ``match_score`` ([0, 1], higher =
        more likely a true pair), ``is_mismatched``, ``proposed_row``,
        ``proposed_caption``, ``rematch_confidence`` ([0, 1]), ``action`` and, when
        labels were audited, ``label_score``, ``is_label_issue``, ``suggested_label``,
        ``label_confidence``. Missing columns only drop the parts that need them.
    summary : dict
        The scan summary (``summary.json``): counts, threshold, mixture, model,
        settings, timings, files, and optional ``evaluation`` and ``labels``.
    gallery_size : int, default 24
        Most cards per gallery (suspects, rematches, borderline, label issues).
        Thumbnails are only made for shown cards, so the page size and the image
        work do not grow with the dataset.
    thumbnail_px : int, default 128
        Longest side of a thumbnail, in pixels (aspect ratio kept).
    image_col, text_col, label_col : str or None
        Input columns holding the image reference, the caption and the label. By
        default taken from ``summary["settings"]`` (``image_col``, ``text_col``),
        ``summary["labels"]["label_col"]``, or the columns ``image`` / ``caption``.
    max_table_rows : int, default 200
        Most rows listed in the table of rows that could not be scored.

    Returns
    -------
    str
        The HTML document. It loads nothing from the network (a
        Content-Security-Policy forbids it); thumbnails are base64 ``data:`` URIs
        made only from local files, and every dataset value is HTML-escaped.

    See Also
    --------
    write_report : render and write atomically to a file.
    """
    renderer = _Renderer(
        audit,
        summary,
        gallery_size=gallery_size,
        thumbnail_px=thumbnail_px,
        image_col=image_col,
        text_col=text_col,
        label_col=label_col,
        max_table_rows=max_table_rows,
    )
    return renderer.render()


def write_report(
    path: str | os.PathLike[str], audit: pd.DataFrame, summary: Mapping[str, Any], **kwargs: Any
) -> Path:
    """Render the report (see :func:`render_report`) and write it atomically to ``path``.

    Returns the path written. Keyword arguments go to :func:`render_report`.
    """
    text = render_report(audit, summary, **kwargs)
    target = Path(path)
    with atomic_open(target, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    return target
