"""Inline SVG plots of the report: a histogram of the split statistic and the PR curve.

Each function takes plain numbers and returns a :class:`markupsafe.Markup` SVG element
(every label escaped here), which the template inserts as is. No network, no fonts,
no scripts: the page's content-security policy allows none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from markupsafe import Markup, escape

__all__ = ["PALETTE", "Plot", "gauss_pdf", "split_histogram", "pr_curve"]

PALETTE = {
    "bar": "#9fb3c8",
    "bar_flag": "#e3a3a3",
    "noisy": "#c73e3e",
    "clean": "#2e8b57",
    "other": "#7a5cc2",
    "total": "#334155",
    "threshold": "#1f2933",
    "curve": "#2f6fde",
    "grid": "#e6eaef",
    "axis": "#8794a3",
}

# Points kept when drawing a precision-recall curve.
_MAX_CURVE_POINTS = 400


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


def gauss_pdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Normal density at ``x``."""
    std = max(std, 1e-12)
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


class Plot:
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
                f"stroke='{PALETTE['grid']}'/>"
                f"<text x='{left - 6}' y='{y + 3.5:.1f}' text-anchor='end'>{_tick_label(t)}</text>"
            )
        for t in _nice_ticks(self.x0, self.x1, 6):
            x = self.px(t)
            p.append(
                f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{bottom}' y2='{bottom + 4}' "
                f"stroke='{PALETTE['axis']}'/>"
                f"<text x='{x:.1f}' y='{bottom + 16}' text-anchor='middle'>{_tick_label(t)}</text>"
            )
        p.append(
            f"<line x1='{left}' x2='{right}' y1='{bottom}' y2='{bottom}' "
            f"stroke='{PALETTE['axis']}'/>"
            f"<text x='{(left + right) / 2:.1f}' y='{self.h - 8}' text-anchor='middle' "
            f"class='axl'>{escape(x_label)}</text>"
            f"<text transform='translate(14 {(top + bottom) / 2:.1f}) rotate(-90)' "
            f"text-anchor='middle' class='axl'>{escape(y_label)}</text>"
        )

    def bars(
        self,
        edges: np.ndarray,
        heights: np.ndarray,
        colors: Sequence[str],
        base: np.ndarray | None = None,
    ) -> None:
        """Bars from ``base`` (default 0) up by ``heights``: stacked when a base is given."""
        bottoms = np.zeros(len(heights)) if base is None else np.asarray(base, dtype=float)
        for lo, hi, h, b, color in zip(
            edges[:-1], edges[1:], heights, bottoms, colors, strict=True
        ):
            if h <= 0:
                continue
            x, x2 = self.px(lo), self.px(hi)
            y_top, y_bot = self.py(min(b + h, self.y1)), self.py(max(self.y0, b))
            self.parts.append(
                f"<rect x='{x:.1f}' y='{y_top:.1f}' width='{max(x2 - x - 0.6, 0.6):.1f}' "
                f"height='{max(y_bot - y_top, 0.5):.1f}' fill='{color}'/>"
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
            f"stroke='{PALETTE['threshold']}' stroke-width='1.5' stroke-dasharray='5 4'/>"
            f"<text x='{xp + dx:.1f}' y='{self.mt + 8}' text-anchor='{anchor}' "
            f"class='thr'>{escape(label)}</text>"
        )

    def point(self, x: float, y: float, color: str, label: str) -> None:
        self.parts.append(
            f"<circle cx='{self.px(x):.1f}' cy='{self.py(y):.1f}' r='4.5' fill='{color}' "
            f"stroke='#fff' stroke-width='1.5'/>"
        )
        self.legend.append(("dot", color, label))

    def legend_box(self, color: str, label: str) -> None:
        self.legend.append(("box", color, label))

    def svg(self) -> Markup:
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
            items.append(f"{mark}<text x='{x + 18}' y='18'>{escape(label)}</text>")
            x += 26 + int(6.2 * len(label))
        return Markup(
            f"<svg class='plot' viewBox='0 0 {self.w} {self.h}' role='img' "
            f"aria-label='{escape(self.title)}' preserveAspectRatio='xMidYMid meet'>"
            f"<title>{escape(self.title)}</title>{''.join(self.parts)}{''.join(items)}</svg>"
        )


def split_histogram(
    values: np.ndarray,
    flagged: np.ndarray,
    *,
    statistic: str,
    cut: float | None,
    components: Sequence[tuple[str, float, float, float]] = (),
) -> Markup:
    """Histogram of the statistic the split cuts, flagged rows stacked in red, the cut drawn.

    Parameters
    ----------
    values : ndarray, shape (m,)
        The statistic of the scored rows (finite).
    flagged : ndarray of bool, shape (m,)
        Which of them the split flagged.
    statistic : str
        Its name (the x-axis label).
    cut : float or None
        Where the split cuts the statistic (``summary["mixture"]["score_at_threshold"]``).
    components : sequence of (name, weight, mean, std)
        Fitted Gaussian components to draw over the bars, scaled to row counts.
    """
    lo, hi = float(values.min()), float(values.max())
    if cut is not None:
        lo, hi = min(lo, cut), max(hi, cut)
    pad = 0.02 * (hi - lo) if hi > lo else 0.5
    lo, hi = lo - pad, hi + pad
    bins = int(np.clip(np.sqrt(len(values)) * 2, 20, 70))
    edges = np.linspace(lo, hi, bins + 1)
    kept, _ = np.histogram(values[~flagged], bins=edges)
    flag, _ = np.histogram(values[flagged], bins=edges)
    width = float(edges[1] - edges[0])
    xs = np.linspace(lo, hi, 240)
    scale = len(values) * width
    curves = [(name, w, scale * w * gauss_pdf(xs, m, sd)) for name, w, m, sd in components]
    y_max = max([float((kept + flag).max())] + [float(c.max()) for _, _, c in curves]) * 1.12
    plot = Plot(
        x_range=(lo, hi),
        y_range=(0, max(y_max, 1.0)),
        x_label=f"{statistic} (lower = more likely mismatched)",
        y_label="rows",
        title=f"Histogram of {statistic}, the statistic the split cuts",
    )
    plot.bars(edges, kept.astype(float), [PALETTE["bar"]] * bins)
    plot.bars(edges, flag.astype(float), [PALETTE["bar_flag"]] * bins, base=kept)
    plot.legend_box(PALETTE["bar_flag"], "flagged")
    plot.legend_box(PALETTE["bar"], "kept")
    colors = (PALETTE["clean"], PALETTE["noisy"], PALETTE["other"])
    for i, (name, weight, curve) in enumerate(curves):
        plot.line(xs, curve, colors[i % 3], label=f"{name} ({100 * weight:.0f}%)")
    if cut is not None:
        plot.vline(cut, f"cut {cut:.3g}")
    return plot.svg()


def pr_curve(recall: np.ndarray, precision: np.ndarray, at: tuple[float, float] | None) -> Markup:
    """Precision-recall curve, with the point of the chosen threshold (recall, precision)."""
    order = np.argsort(recall, kind="stable")
    recall, precision = recall[order], precision[order]
    if len(recall) > _MAX_CURVE_POINTS:
        pick = np.unique(np.linspace(0, len(recall) - 1, _MAX_CURVE_POINTS).round().astype(int))
        recall, precision = recall[pick], precision[pick]
    plot = Plot(
        width=460,
        height=340,
        x_range=(0, 1),
        y_range=(0, 1.04),
        x_label="recall",
        y_label="precision",
        y_ticks=5,
        title="Precision-recall curve of mismatch detection",
    )
    plot.line(recall, precision, PALETTE["curve"], width=2.2, label="detection")
    if at is not None:
        plot.point(at[0], at[1], PALETTE["noisy"], "at threshold")
    return plot.svg()
