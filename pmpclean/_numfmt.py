"""Number formatting shared by the terminal output (``_output``) and the HTML report.

Values that are missing (None, NaN, ``pd.NA``, ``pd.NaT``), boolean, non-numeric or
not finite are shown as a placeholder that each caller picks: ``"-"`` in a terminal,
``"—"`` in HTML. Never prints.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["finite_or_none", "fmt_int", "fmt_float", "fmt_metric", "fmt_pct", "fmt_secs"]


def finite_or_none(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is missing, boolean or not a number."""
    # booleans are flags, not counts: True must not print as 1
    if value is None or isinstance(value, (bool, np.bool_)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):  # also pd.NA and pd.NaT
        return None
    return out if math.isfinite(out) else None


def fmt_int(value: Any, *, missing: str) -> str:
    """Rounded to a whole number with thousands separators: ``1,235``."""
    out = finite_or_none(value)
    return missing if out is None else f"{int(round(out)):,}"


def fmt_float(value: Any, digits: int = 3, *, missing: str) -> str:
    """Fixed-point with ``digits`` decimals: ``0.123``."""
    out = finite_or_none(value)
    return missing if out is None else f"{out:.{digits}f}"


def fmt_pct(value: Any, digits: int = 1, *, missing: str) -> str:
    """A fraction as a percentage with ``digits`` decimals: ``0.2`` -> ``20.0%``."""
    out = finite_or_none(value)
    return missing if out is None else f"{100 * out:.{digits}f}%"


def fmt_metric(value: Any, digits: int = 3, *, missing: str) -> str:
    """A metric: a count (an integer value) as ``8,092``, a rate or score as ``0.123``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return f"{int(value):,}"
    return fmt_float(value, digits, missing=missing)


def fmt_secs(value: Any, *, missing: str) -> str:
    """A duration in seconds: ``250 ms``, ``12.5 s``, ``3 min 5 s``."""
    out = finite_or_none(value)
    if out is None:
        return missing
    if out < 1:
        return f"{out * 1000:.0f} ms"
    if out < 120:
        return f"{out:.1f} s"
    minutes, seconds = divmod(out, 60)
    return f"{int(minutes)} min {seconds:.0f} s"
