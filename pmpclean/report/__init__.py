"""Self-contained HTML audit report for a ``scan`` (``DIR/report.html``).

The report is one HTML file with everything inline (CSS, SVG plots, base64 thumbnails,
one small script) and a Content-Security-Policy that forbids any network access and
allows only that script, by its sha256, so it opens in any browser, offline, without
pmpclean installed; with scripts off it reads the same, only the table of flagged rows
cannot be re-sorted. It shows:

- a header with the verdict, banners (random weights, undecided) and the key numbers;
- the status and action counts with their meaning, the model and decision, run times;
- a histogram of the statistic the split cuts, with the cut drawn;
- galleries (capped by ``gallery_size``) of the most suspicious pairs, the most
  confident rematches and the borderline pairs, each card with its evidence (the
  caption that fits the image better, the image that fits the caption better, the
  runner-up of a rematch); a sortable, filterable table of every flagged row;
- rows that could not be scored, the label audit, the evaluation against ground truth;
- run details: the split and the rematch solver's internals, settings, versions, files.

Layout: :mod:`.context` turns the audit and the summary into plain data,
:mod:`.plots` draws the SVG, and Jinja2 templates (``templates/``, package data) lay
it out with autoescaping: every value from the dataset is text. This package never
prints.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd

from .._utils import atomic_open
from .context import build_context

__all__ = ["render_report", "write_report"]

# Everything is inline; the one script is allowed by its hash, computed at render time.
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {script}; "
    "base-uri 'none'; form-action 'none'"
)


def _resource(name: str) -> str:
    return files("pmpclean.report").joinpath("templates", name).read_text(encoding="utf-8")


@cache
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_resource),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def script_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script: ``'sha256-<base64>'``."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


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
    max_flagged_rows: int = 5000,
) -> str:
    """Render the scan audit as one self-contained HTML page.

    Parameters
    ----------
    audit : DataFrame, shape (n_rows, n_columns)
        The per-row audit of the scan output contract: input columns, then ``row``,
        ``status``, ``image_path``, ``similarity``, ``pair_score``, ``match_score``
        ([0, 1], higher = more likely a true pair), ``is_mismatched``, ``proposed_row``,
        ``proposed_caption``, ``rematch_confidence`` ([0, 1]), the evidence columns
        (``alt_caption_row`` / ``_similarity``, ``alt_image_row`` / ``_similarity``,
        ``runner_up_row`` / ``_similarity``), ``action`` and, when labels were audited,
        ``label_score``, ``is_label_issue``, ``suggested_label``, ``label_confidence``.
        Missing columns only drop the parts that need them.
    summary : dict
        The scan summary (``summary.json``): counts, verdict, threshold, mixture,
        model, settings, timings, files, warnings, and optional ``evaluation`` and
        ``labels``.
    gallery_size : int, default 24
        Most cards per gallery (suspects, rematches, borderline, label issues).
        Thumbnails are only made for shown cards, so the page size and the image
        work do not grow with the dataset.
    thumbnail_px : int, default 128
        Longest side of a thumbnail, in pixels (aspect ratio kept).
    image_col, text_col, label_col : str or None
        Input columns holding the image reference, the caption and the label. By
        default taken from ``summary["settings"]["data"]``,
        ``summary["labels"]["label_col"]``, or the columns ``image`` / ``caption``.
    max_table_rows : int, default 200
        Most rows listed in the table of rows that could not be scored.
    max_flagged_rows : int, default 5000
        Most rows in the table of flagged rows (the worst first).

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
    from markupsafe import Markup

    context = build_context(
        audit,
        summary,
        gallery_size=gallery_size,
        thumbnail_px=thumbnail_px,
        image_col=image_col,
        text_col=text_col,
        label_col=label_col,
        max_table_rows=max_table_rows,
        max_flagged_rows=max_flagged_rows,
    )
    script = _resource("table.js")  # holds no "</" (tested): it cannot end its element
    env = _environment()
    return env.get_template("report.html.j2").render(
        **context,
        css=Markup(_resource("report.css")),
        script=Markup(script),
        csp=_CSP.format(script=script_hash(script)),
    )


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
