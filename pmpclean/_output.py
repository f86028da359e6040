"""The CLI's output sink: the only module (with ``cli/``) that prints.

:class:`Output` renders results for people (rich tables on stdout, progress bars and
messages on stderr) or for scripts (``format="json"``: one JSON document on stdout,
nothing else but errors). ``quiet`` silences everything except errors. Library code
never prints; it reports progress through the ``progress(stage, done, total)``
callback that :meth:`Output.progress` hands out.
"""

from __future__ import annotations

import contextlib
import json as _json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ._numfmt import finite_or_none as _num
from ._numfmt import fmt_float, fmt_int, fmt_metric, fmt_pct, fmt_secs
from ._utils import to_jsonable
from .errors import ConfigError

__all__ = ["Output", "FORMATS", "to_jsonable"]

FORMATS = ("human", "json")

ProgressCallback = Callable[[str, int, int], None]


class _RateColumn(ProgressColumn):
    """Items per second of a task."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("", style="progress.data.speed")
        unit = f"{speed:,.0f}" if speed >= 100 else f"{speed:.1f}"
        return Text(f"{unit} it/s", style="progress.data.speed")


def _add_row(table: Table, *cells: Any) -> None:
    """Add a row of plain text: dataset values never go through rich markup."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def _noop(stage: str, done: int, total: int) -> None:
    return None


# shared with the HTML report (pmpclean._numfmt); missing values show as "-"
_fmt_int = partial(fmt_int, missing="-")
_fmt_float = partial(fmt_float, missing="-")
_fmt_pct = partial(fmt_pct, missing="-")

_fmt_secs = partial(fmt_secs, missing="-")


def _one_line(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(str(value).split())


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# Friendly labels for the keys of the embed / rematch / corrupt info dicts.
_LABELS: dict[str, str] = {
    "manifest": "Manifest",
    "n_rows": "Rows",
    "rows": "Rows",
    "n_scored": "Rows scored",
    "n_images": "Images",
    "images": "Images",
    "n_embedded": "Images embedded",
    "images_embedded": "Images embedded",
    "n_texts": "Captions",
    "texts_embedded": "Captions embedded",
    "cache_hits": "Cache hits",
    "n_cached": "Cache hits",
    "model": "Model",
    "device": "Device",
    "dim": "Embedding dim",
    "policy": "Policy",
    "n_kept": "Rows kept",
    "kept": "Rows kept",
    "n_rematched": "Rows rematched",
    "rematched": "Rows rematched",
    "n_dropped": "Rows dropped",
    "dropped": "Rows dropped",
    "n_flagged": "Rows flagged for review",
    "flagged": "Rows flagged for review",
    "n_review": "Rows left for review",
    "review": "Rows left for review",
    "n_out": "Rows written",
    "n_corrupted": "Rows corrupted",
    "corrupted": "Rows corrupted",
    "rate": "Corruption rate",
    "mode": "Corruption mode",
    "seed": "Seed",
    "dry_run": "Dry run",
    "seconds": "Time",
    "action_counts": "Actions",
    "status_counts": "Status",
    "elapsed": "Time",
}
_FILE_LABELS = {
    "audit_parquet": "Audit (parquet)",
    "audit_csv": "Audit (csv)",
    "summary": "Summary",
    "config": "Settings",
    "report": "Report",
}
_FILE_KEYS = ("file", "files", "out", "output", "path", "written")


class Output:
    """One sink for everything the CLI shows.

    Parameters
    ----------
    format : {"human", "json"}, default "human"
        ``human``: rich tables on stdout, progress and messages on stderr.
        ``json``: the result as one JSON document on stdout; no progress, no info.
    quiet : bool, default False
        Show nothing but errors.
    console, err_console : rich Console or None
        Where stdout / stderr output goes (tests pass recording consoles with a
        fixed width).
    """

    def __init__(
        self,
        *,
        format: str = "human",
        quiet: bool = False,
        console: Console | None = None,
        err_console: Console | None = None,
    ) -> None:
        if format not in FORMATS:
            raise ConfigError(
                f"Unknown format {format!r}: expected one of {', '.join(FORMATS)} (--format)."
            )
        self.format = format
        self.quiet = bool(quiet)
        self.console = console if console is not None else Console()
        self.err_console = err_console if err_console is not None else Console(stderr=True)
        self._warned: set[str] = set()  # shown live: not repeated in a summary's banner

    @property
    def human(self) -> bool:
        """True when human-readable output should be shown."""
        return self.format == "human" and not self.quiet

    # ----------------------------------------------------------------- messages

    def error(self, message: str) -> None:
        """One red ``Error: ...`` line on stderr (shown even when quiet)."""
        self.err_console.print(
            Text.assemble(("Error: ", "bold red"), (str(message), "red")),
            soft_wrap=True,
            highlight=False,
        )

    def warning(self, message: str) -> None:
        """A yellow ``Warning: ...`` line on stderr (suppressed by quiet)."""
        if self.quiet:
            return
        self._warned.add(str(message))
        self.err_console.print(
            Text.assemble(("Warning: ", "bold yellow"), (str(message), "yellow")),
            soft_wrap=True,
            highlight=False,
        )

    def info(self, message: str) -> None:
        """A plain line on stderr (suppressed by quiet and by json format)."""
        if not self.human:
            return
        self.err_console.print(Text(str(message)), soft_wrap=True, highlight=False)

    def json(self, obj: Any) -> None:
        """Print ``obj`` as JSON on stdout (NaN -> null, numpy types converted)."""
        text = _json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False)
        self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    # ----------------------------------------------------------------- progress

    @contextlib.contextmanager
    def progress(self) -> Iterator[ProgressCallback]:
        """Yield a ``progress(stage, done, total)`` callback backed by a rich progress bar.

        A new stage description starts a new bar. Quiet and json modes get a no-op.
        """
        if not self.human:
            yield _noop
            return
        bar = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.err_console,
            transient=False,
        )
        tasks: dict[str, Any] = {}

        def callback(stage: str, done: int, total: int) -> None:
            total_or_none = int(total) if total and total > 0 else None
            if stage not in tasks:
                tasks[stage] = bar.add_task(str(stage), total=total_or_none)
            bar.update(tasks[stage], completed=int(done), total=total_or_none)

        with bar:
            yield callback

    # ----------------------------------------------------------------- summaries

    def scan_summary(  # noqa: C901 - one branch per summary section (_output.py: another helper's)
        self, summary: Mapping[str, Any], audit: pd.DataFrame, *, top: int = 10
    ) -> None:
        """Render the end of ``scan``: counts, top suspects, metrics and written files.

        ``format="json"`` prints ``summary`` instead; quiet prints nothing.
        """
        if self.quiet:
            return
        if self.format == "json":
            self.json(summary)
            return
        console = self.console
        n_rows = _num(summary.get("n_rows"))
        if n_rows is None and isinstance(audit, pd.DataFrame):
            n_rows = float(len(audit))
        n_scored = summary.get("n_scored")

        head = Table(title="pmpclean scan", title_justify="left", show_header=False, box=None)
        head.add_column(style="bold")
        head.add_column()
        if summary.get("manifest"):
            _add_row(head, "Manifest", str(summary["manifest"]))
        _add_row(head, "Rows", f"{_fmt_int(n_rows)} ({_fmt_int(n_scored)} scored)")
        n_flag = summary.get("n_mismatched")
        _add_row(
            head,
            "Flagged mismatched",
            f"{_fmt_int(n_flag)} (estimated noise rate "
            f"{_fmt_pct(summary.get('estimated_noise_rate'))})",
        )
        verdict = summary.get("verdict")
        if verdict:
            interval = summary.get("estimated_noise_rate_interval") or []
            lo, hi = (_num(v) for v in (list(interval) + [None, None])[:2])
            span = (
                f" (noise rate 90 % interval {_fmt_pct(lo)} to {_fmt_pct(hi)})"
                if lo is not None and hi is not None
                else ""
            )
            style = {"clean": "green", "noisy": "red"}.get(str(verdict), "yellow")
            _add_row(head, "Verdict", Text.assemble((str(verdict), f"bold {style}"), span))
            if summary.get("verdict_reason"):
                _add_row(head, "", str(summary["verdict_reason"]))
        if _num(summary.get("threshold")) is not None:
            _add_row(head, "Threshold", f"match_score < {_fmt_float(summary['threshold'], 3)}")
        model = _mapping(summary.get("model"))
        if model.get("source"):
            device = f" on {model['device']}" if model.get("device") else ""
            _add_row(head, "Model", f"{model['source']}{device}")
        timings = _mapping(summary.get("timings"))
        secs = [v for v in (_num(t) for t in timings.values()) if v is not None]
        if secs:
            _add_row(head, "Run time", _fmt_secs(sum(secs)))
        console.print(head)
        # the banner: random weights, an undecided verdict, skipped stages... (each once: a
        # warning already shown while the scan ran is not repeated)
        warnings = summary.get("warnings") or []
        if isinstance(warnings, (list, tuple)):
            warnings = [w for w in warnings if str(w) not in self._warned]
        if isinstance(warnings, (list, tuple)) and warnings:
            console.print()
            for message in warnings:
                console.print(
                    Text.assemble(("Warning: ", "bold yellow"), (str(message), "yellow")),
                    soft_wrap=False,
                )

        total = int(n_rows) if n_rows else 0
        status = self._counts(summary.get("status_counts"), audit, "status")
        actions = self._counts(summary.get("action_counts"), audit, "action")
        if status or actions:
            counts = Table(title="Counts", title_justify="left")
            counts.add_column("kind")
            counts.add_column("value")
            counts.add_column("rows", justify="right")
            counts.add_column("share", justify="right")
            for kind, mapping in (("status", status), ("action", actions)):
                for key, value in mapping.items():
                    share = _fmt_pct(value / total) if total else "-"
                    _add_row(counts, kind, key, f"{value:,}", share)
            console.print()
            console.print(counts)

        settings = _mapping(summary.get("settings"))
        self._top_suspects(
            audit, top, (settings.get("data") or {}).get("text_col", settings.get("text_col"))
        )
        self._evaluation(_mapping(summary.get("evaluation")))
        self._labels(_mapping(summary.get("labels")), audit, top)
        self._files(summary.get("files"))

    def embed_summary(self, info: Mapping[str, Any]) -> None:
        """Render the result of ``embed``: rows, images embedded, cache hits, file written."""
        self._info_summary("pmpclean embed", info)

    def rematch_summary(self, info: Mapping[str, Any]) -> None:
        """Render the result of ``rematch``: rows kept/rematched/dropped/flagged and files."""
        self._info_summary("pmpclean rematch", info)

    def corrupt_summary(self, info: Mapping[str, Any]) -> None:
        """Render the result of ``corrupt``: rows corrupted and the file written."""
        self._info_summary("pmpclean corrupt", info)

    def finetune_summary(self, info: Mapping[str, Any]) -> None:
        """Render the result of ``finetune``: recall before/after and the files written."""
        self._info_summary("pmpclean finetune", info)

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _counts(given: Any, audit: Any, column: str) -> dict[str, int]:
        if isinstance(given, Mapping) and given:
            return {str(k): int(_num(v) or 0) for k, v in given.items()}
        if isinstance(audit, pd.DataFrame) and column in audit.columns:
            return {str(k): int(v) for k, v in audit[column].value_counts().items()}
        return {}

    def _top_suspects(self, audit: Any, top: int, text_col: Any = None) -> None:
        if not isinstance(audit, pd.DataFrame) or top <= 0:
            return
        # ranked by the statistic the split cuts (pair_score), which tells the flagged
        # rows apart; match_score is a posterior, near 0 for every clear suspect
        key = next((c for c in ("pair_score", "match_score") if c in audit.columns), None)
        if "is_mismatched" not in audit.columns or key is None:
            return
        flags = audit["is_mismatched"].fillna(False).astype(bool).to_numpy()
        if not flags.any():
            self.console.print(Text("No pair was flagged as mismatched.", style="green"))
            return
        scores = pd.to_numeric(audit[key], errors="coerce")
        order = scores[flags].sort_values(kind="stable").index[:top]
        rows = audit.loc[order]
        if not (isinstance(text_col, str) and text_col in audit.columns):
            text_col = next((c for c in ("caption", "text") if c in audit.columns), None)
        table = Table(
            title=f"Top suspects ({min(top, int(flags.sum()))} of {int(flags.sum()):,} flagged)",
            title_justify="left",
            expand=True,
        )
        table.add_column("row", justify="right", no_wrap=True)
        table.add_column(key.replace("_", " "), justify="right", no_wrap=True)
        table.add_column("action", no_wrap=True)
        table.add_column("caption", ratio=3, no_wrap=True, overflow="ellipsis")
        table.add_column("proposed (confidence)", ratio=3, no_wrap=True, overflow="ellipsis")
        for rec in rows.to_dict("records"):
            proposed = _one_line(rec.get("proposed_caption"))
            if proposed:
                proposed += f" ({_fmt_float(rec.get('rematch_confidence'), 2)})"
            _add_row(
                table,
                str(rec.get("row", "")),
                _fmt_float(rec.get(key), 3),
                _one_line(rec.get("action")),
                _one_line(rec.get(text_col)) if text_col else "",
                proposed or "-",
            )
        self.console.print()
        self.console.print(table)

    def _evaluation(self, evaluation: Mapping[str, Any]) -> None:
        if not evaluation:
            return
        table = Table(title="Evaluation against ground truth", title_justify="left")
        table.add_column("task")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for group in ("detection", "rematch"):
            for key, value in _mapping(evaluation.get(group)).items():
                if _num(value) is not None:
                    _add_row(table, group, str(key), fmt_metric(value, missing="-"))
        if table.row_count:
            self.console.print()
            self.console.print(table)

    def _labels(self, labels: Mapping[str, Any], audit: Any, top: int) -> None:
        if not labels:
            return
        label_col = labels.get("label_col")
        self.console.print()
        self.console.print(
            Text.assemble(
                ("Label audit", "bold"),
                f" ({label_col}): " if label_col else ": ",
                f"{_fmt_int(labels.get('n_label_issues'))} label issues, estimated label noise "
                f"{_fmt_pct(labels.get('estimated_label_noise'))}",
            )
        )
        if not isinstance(audit, pd.DataFrame) or "is_label_issue" not in audit.columns or top <= 0:
            return
        flags = audit["is_label_issue"].fillna(False).astype(bool).to_numpy()
        if not flags.any():
            return
        key = "label_score" if "label_score" in audit.columns else None
        sub = audit[flags]
        if key:
            sub = sub.assign(_k=pd.to_numeric(sub[key], errors="coerce")).sort_values(
                "_k", kind="stable"
            )
        table = Table(title="Top label issues", title_justify="left")
        table.add_column("row", justify="right")
        table.add_column("given", overflow="ellipsis", no_wrap=True)
        table.add_column("suggested", overflow="ellipsis", no_wrap=True)
        table.add_column("confidence", justify="right")
        for rec in sub.head(top).to_dict("records"):
            _add_row(
                table,
                str(rec.get("row", "")),
                _one_line(rec.get(label_col)) if label_col else "",
                _one_line(rec.get("suggested_label")),
                _fmt_float(rec.get("label_confidence"), 2),
            )
        self.console.print()
        self.console.print(table)

    @staticmethod
    def _file_items(files: Any) -> list[tuple[str, str]]:
        if isinstance(files, Mapping):
            pairs = [(str(k), v) for k, v in files.items()]
        elif isinstance(files, (list, tuple)):
            pairs = [("", v) for v in files]
        else:
            pairs = [("", files)]
        return [(k, os.fspath(v) if isinstance(v, os.PathLike) else str(v)) for k, v in pairs if v]

    def _files(self, files: Any) -> None:
        items = self._file_items(files)
        if not items:
            return
        table = Table(title="Files written", title_justify="left", show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in items:
            _add_row(table, _FILE_LABELS.get(key, key.replace("_", " ")), value)
        self.console.print()
        self.console.print(table)

    def _info_summary(self, title: str, info: Mapping[str, Any]) -> None:
        if self.quiet:
            return
        if self.format == "json":
            self.json(info)
            return
        info = _mapping(info)
        table = Table(title=title, title_justify="left", show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        files: list[Any] = []
        for key, value in info.items():
            if key in _FILE_KEYS:
                files.append(value)
                continue
            label = _LABELS.get(key, key.replace("_", " "))
            if isinstance(value, Mapping):
                inner = ", ".join(f"{k} {self._scalar(v, str(k))}" for k, v in value.items())
                _add_row(table, label, inner)
            elif isinstance(value, (list, tuple)) and key == "warnings":
                continue
            else:
                _add_row(table, label, self._scalar(value, key))
        if table.row_count:
            self.console.print(table)
        for message in info.get("warnings") or []:
            self.console.print(
                Text.assemble(("Warning: ", "bold yellow"), (str(message), "yellow")),
            )
        items = [item for entry in files for item in self._file_items(entry)]
        if items:
            self._files(dict(items) if all(k for k, _ in items) else [v for _, v in items])

    @staticmethod
    def _scalar(value: Any, key: str = "") -> str:
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if key in ("seconds", "elapsed") or key.endswith("_seconds"):
            return _fmt_secs(value)
        if key in ("rate",) or key.endswith("_rate"):
            return _fmt_pct(value)
        number = _num(value)
        if number is not None:
            if float(number).is_integer() and not isinstance(value, (float, np.floating)):
                return f"{int(number):,}"
            return f"{number:.4g}"
        if value is None:
            return "-"
        if isinstance(value, (list, tuple)):
            return ", ".join(str(v) for v in value)
        return str(value)
