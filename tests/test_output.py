"""Tests of the CLI output sink (pmpclean._output.Output)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from pmpclean._output import Output, to_jsonable
from pmpclean.errors import ConfigError

WIDTH = 100
LONG_CAPTION = "a very long caption " * 20


def consoles() -> tuple[Console, Console]:
    out = Console(width=WIDTH, record=True, force_terminal=False, color_system=None)
    err = Console(width=WIDTH, record=True, force_terminal=False, color_system=None)
    return out, err


def make(**kwargs: Any) -> tuple[Output, Console, Console]:
    out, err = consoles()
    return Output(console=out, err_console=err, **kwargs), out, err


def lines(console: Console) -> list[str]:
    return [line.rstrip() for line in console.export_text().splitlines()]


def scan_result() -> tuple[dict[str, Any], pd.DataFrame]:
    n = 12
    match = np.array([0.9, 0.02, 0.8, np.nan, 0.3, 0.95, 0.01, 0.7, 0.45, 0.99, 0.6, 0.85])
    flagged = np.nan_to_num(match, nan=1) < 0.5
    audit = pd.DataFrame(
        {
            "text": [f"caption {i}" for i in range(n)],
            "row": np.arange(n),
            "status": ["ok"] * 3 + ["missing_image"] + ["ok"] * 8,
            "match_score": match,
            "is_mismatched": flagged,
            "proposed_row": np.where(flagged, 0, -1),
            "proposed_caption": np.where(flagged, "the proposed caption", ""),
            "rematch_confidence": np.where(flagged, 0.876, 0.0),
            "action": np.where(flagged, "rematch", "keep"),
            "label": ["cat", "dog"] * 6,
            "is_label_issue": [False] * 10 + [True, True],
            "label_score": [0.9] * 10 + [0.3, 0.1],
            "suggested_label": ["cat", "dog"] * 5 + ["dog", "cat"],
            "label_confidence": [0.9] * 10 + [0.7, 0.8],
        }
    )
    audit.loc[6, "text"] = LONG_CAPTION
    audit.loc[1, "text"] = "has [bold]markup[/bold] in it"
    summary = {
        "manifest": "/data/set.csv",
        "n_rows": n,
        "n_scored": np.int64(11),
        "status_counts": {"ok": 11, "missing_image": 1},
        "action_counts": {"keep": 8, "rematch": 4},
        "n_mismatched": 4,
        "estimated_noise_rate": np.float64(4 / 11),
        "threshold": 0.5,
        "model": {"source": "file:emb.npz", "device": "cpu"},
        "settings": {"text_col": "text"},
        "evaluation": {
            "detection": {"auroc": 0.93, "precision": float("nan"), "f1": 0.5, "n": 11},
            "rematch": {"precision": 0.75},
            "pr_curve": {"precision": [1.0, 0.5], "recall": [0.0, 1.0]},
        },
        "labels": {"label_col": "label", "n_label_issues": 2, "estimated_label_noise": 1 / 6},
        "timings": {"embed": 1.25, "score": 0.25},
        "files": {"audit_parquet": "/out/audit.parquet", "report": "/out/report.html"},
        "warnings": ["1 row has a missing image"],
    }
    return summary, audit


def test_scan_summary_human_key_lines() -> None:
    output, out, err = make()
    summary, audit = scan_result()
    output.scan_summary(summary, audit, top=3)
    text = lines(out)
    joined = "\n".join(text)
    assert all(len(line) <= WIDTH for line in text)
    assert " Rows                12 (11 scored)" in text
    assert any("Flagged mismatched  4 (estimated noise rate 36.4%)" in line for line in text)
    assert any("Model               file:emb.npz on cpu" in line for line in text)
    assert any("Run time            1.5 s" in line for line in text)
    assert any(
        line.split() == ["│", "status", "│", "missing_image", "│", "1", "│", "8.3%", "│"]
        for line in text
    )
    assert any(
        line.split() == ["│", "action", "│", "rematch", "│", "4", "│", "33.3%", "│"]
        for line in text
    )
    # top suspects: the 3 lowest match scores among flagged rows, worst first
    assert "Top suspects (3 of 4 flagged)" in joined
    suspect_rows = [
        line.split()[1]
        for line in text
        if line.startswith("│") and "rematch" in line and "the proposed" in line
    ]
    assert suspect_rows == ["6", "1", "4"]
    long_line = next(line for line in text if line.split()[1:2] == ["6"])
    assert "…" in long_line and LONG_CAPTION not in long_line
    assert "has [bold]markup[/bold] in it" in joined  # rich markup is not interpreted
    assert "the proposed caption (0.88)" in joined
    # evaluation: NaN metrics are skipped, the rest shown with 3 decimals
    assert any(line.split() == ["│", "detection", "│", "auroc", "│", "0.930", "│"] for line in text)
    assert any(line.split() == ["│", "detection", "│", "n", "│", "11", "│"] for line in text)
    assert not any("precision" in line and "detection" in line for line in text)
    assert "Label audit (label): 2 label issues, estimated label noise 16.7%" in text
    label_rows = [line.split() for line in text if line.startswith("│") and "dog" in line]
    assert label_rows[0][:6] == ["│", "11", "│", "dog", "│", "cat"]  # lowest label_score first
    assert "Warning: 1 row has a missing image" in text
    assert any(line.split() == ["Report", "/out/report.html"] for line in text)
    assert any(line.split() == ["Audit", "(parquet)", "/out/audit.parquet"] for line in text)
    assert lines(err) == []


def test_top_suspects_ranked_by_the_split_statistic() -> None:
    """Clear suspects all have match_score 0.000; the table shows and ranks by pair_score."""
    output, out, _ = make()
    summary, audit = scan_result()
    flagged = audit["is_mismatched"].to_numpy()
    audit["match_score"] = np.where(flagged, 0.0, audit["match_score"])
    audit["pair_score"] = np.linspace(1.0, -1.0, len(audit))
    audit.loc[1, "pair_score"] = -2.5  # the worst pair
    output.scan_summary(summary, audit, top=4)
    text = lines(out)
    header = next(line for line in text if line.startswith("┃") and "action" in line)
    assert "pair score" in header and "match" not in header
    shown = [line.split()[1:4:2] for line in text if line.startswith("│") and "proposed" in line]
    want = audit[flagged].sort_values("pair_score")
    assert [int(r) for r, _ in shown] == want["row"].tolist()
    assert [float(v) for _, v in shown] == pytest.approx(want["pair_score"].round(3).tolist())
    assert len({v for _, v in shown}) == len(shown)  # values that tell rows apart


def test_scan_summary_json_prints_summary() -> None:
    output, out, err = make(format="json")
    summary, audit = scan_result()
    output.scan_summary(summary, audit)
    parsed = json.loads(out.export_text())
    assert parsed["n_scored"] == 11 and isinstance(parsed["n_scored"], int)
    assert parsed["evaluation"]["detection"]["precision"] is None  # NaN -> null
    assert parsed["estimated_noise_rate"] == pytest.approx(4 / 11)
    assert parsed["files"]["report"] == "/out/report.html"
    assert lines(err) == []


@pytest.mark.parametrize("missing", ["evaluation", "labels", "rematch", "files", "model", "all"])
def test_scan_summary_robust_to_missing_keys(missing: str) -> None:
    output, out, _ = make()
    summary, audit = scan_result()
    if missing == "all":
        summary, audit = {}, pd.DataFrame({"caption": ["x"]})
    else:
        summary.pop(missing, None)
    output.scan_summary(summary, audit)
    text = out.export_text()
    assert "Rows" in text
    if missing == "evaluation":
        assert "Evaluation" not in text
    if missing == "labels":
        assert "Label audit" not in text
    if missing == "all":
        assert "1 (- scored)" in text


def test_quiet_shows_only_errors() -> None:
    output, out, err = make(quiet=True)
    summary, audit = scan_result()
    output.scan_summary(summary, audit)
    output.info("hello")
    output.warning("careful")
    output.embed_summary({"n_rows": 3})
    with output.progress() as progress:
        progress("embedding", 1, 2)
    output.error("it broke")
    assert out.export_text() == ""
    assert lines(err) == ["Error: it broke"]


def test_messages_go_to_stderr() -> None:
    output, out, err = make()
    output.error("file [x.csv] not found; fix it")
    output.warning("soft issue")
    output.info("just saying")
    assert lines(err) == [
        "Error: file [x.csv] not found; fix it",
        "Warning: soft issue",
        "just saying",
    ]
    assert out.export_text() == ""


def test_json_mode_suppresses_info_and_progress() -> None:
    output, out, err = make(format="json")
    output.info("not shown")
    with output.progress() as progress:
        progress("stage", 1, 1)
    output.warning("shown")
    assert lines(err) == ["Warning: shown"]
    assert out.export_text() == ""


def test_progress_bar_tasks_per_stage() -> None:
    output, _, err = make()
    with output.progress() as progress:
        for done in range(1, 6):
            progress("embedding images", done, 5)
        progress("scoring pairs", 3, 0)  # unknown total
    text = lines(err)
    assert len(text) == 2
    assert text[0].split()[:2] == ["embedding", "images"] and "5/5" in text[0]
    assert "it/s" in text[0]
    assert "scoring pairs" in text[1] and "3/?" in text[1]


def test_json_output_converts_types() -> None:
    output, out, _ = make(format="json")
    output.json(
        {
            "a": np.float32(0.5),
            "b": np.array([1, 2]),
            "c": float("inf"),
            "d": np.bool_(True),
            "e": pd.NA,
            3: "int key",
        }
    )
    assert json.loads(out.export_text()) == {
        "a": 0.5,
        "b": [1, 2],
        "c": None,
        "d": True,
        "e": None,
        "3": "int key",
    }
    assert to_jsonable(pd.Timestamp("2026-01-02T03:04:05")) == "2026-01-02T03:04:05"


def test_command_summaries() -> None:
    output, out, _ = make()
    output.embed_summary(
        {"n_rows": 1200, "n_images": 240, "cache_hits": 12, "seconds": 3.21, "file": "/o/e.npz"}
    )
    output.rematch_summary(
        {
            "n_kept": 10,
            "n_rematched": 3,
            "n_dropped": 1,
            "n_flagged": 2,
            "dry_run": False,
            "files": {"manifest": "/o/clean.csv"},
        }
    )
    output.corrupt_summary({"n_rows": 100, "n_corrupted": 20, "rate": 0.2, "file": "/o/c.csv"})
    text = [" ".join(line.split()) for line in lines(out)]
    for expected in (
        "Rows 1,200",
        "Images 240",
        "Cache hits 12",
        "Time 3.2 s",
        "/o/e.npz",
        "Rows kept 10",
        "Rows rematched 3",
        "Rows dropped 1",
        "Rows flagged for review 2",
        "Dry run no",
        "manifest /o/clean.csv",
        "Rows corrupted 20",
        "Corruption rate 20.0%",
        "/o/c.csv",
    ):
        assert expected in text, expected


def test_command_summaries_json() -> None:
    output, out, _ = make(format="json")
    output.corrupt_summary({"n_corrupted": np.int64(5), "rate": np.float64(0.25)})
    assert json.loads(out.export_text()) == {"n_corrupted": 5, "rate": 0.25}


def test_unknown_format() -> None:
    with pytest.raises(ConfigError, match=r"Unknown format 'yaml': expected one of human, json"):
        Output(format="yaml")


def test_a_warning_shown_live_is_not_repeated_in_the_summary_banner() -> None:
    """The random-weights warning printed while the model loaded is not printed again
    under the scan's header; on a cache hit (no live warning) the banner shows it."""
    summary, audit = scan_result()
    random = "model 'x' has RANDOM weights (--pretrained none, seed 0)"
    summary["warnings"] = [random, "1 row has a missing image"]
    output, out, err = make()
    output.warning(random)  # as the library's warning during the model load
    output.scan_summary(summary, audit, top=0)
    assert lines(err) == [f"Warning: {random}"]
    text = lines(out)
    assert f"Warning: {random}" not in text and "Warning: 1 row has a missing image" in text
    cached, out2, err2 = make()
    cached.scan_summary(summary, audit, top=0)
    assert f"Warning: {random}" in lines(out2) and lines(err2) == []
