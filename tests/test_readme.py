"""The README's quickstart runs, and every figure it states is what the code gives.

The figures are read from the README text itself (the paragraph after the quickstart
commands), so editing either the code or the README alone fails here. The toy dataset
and its stand-in embeddings are deterministic under the seed, so these figures are
exact; the demo model's figures (a 4-minute training) are not run here and the README
says they vary.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pmpclean.cli import app

pytestmark = pytest.mark.slow  # one toy scan with the label audit: about 30 s

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def _quickstart() -> tuple[list[list[str]], str]:
    """The quickstart's commands (first bash block) and the paragraph of figures after it."""
    text = _section("Quickstart")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "the quickstart has no bash block"
    commands = [
        shlex.split(line.split("#", 1)[0]) for line in block.group(1).splitlines() if line.strip()
    ]
    after = text[block.end() :]
    figures = after.split("\n\n", 2)[1]  # the paragraph right after the commands
    return commands, " ".join(figures.split())


def _figures(text: str) -> dict[str, float]:
    """Every figure the paragraph states, by name (a README rewording fails loudly here)."""
    patterns = {
        "verdict": r"the verdict is `(\w+)`",
        "rate": r"noise rate (\d+(?:\.\d+)?) %",
        "lo": r"90 % interval (\d+(?:\.\d+)?)-",
        "hi": r"90 % interval \d+(?:\.\d+)?-(\d+(?:\.\d+)?) %",
        "flagged": r"flags exactly the (\d+) shuffled pairs",
        "precision": r"\(precision and recall (\d(?:\.\d+)?) against",
        "rematches": r"proposes (\d+) rematches, all of them the true caption",
        "dropped": r"the other (\d+) are dropped",
        "label_noise": r"for (\d+) % of the images \((\d+) rows\)",
        "label_rows": r"of the images \((\d+) rows\)",
        "label_flagged": r"the label audit flags (\d+) rows",
        "label_right": r"flags \d+ rows, (\d+) of them flipped",
        "acc_before": r"label accuracy from (\d+(?:\.\d+)?) %",
        "acc_after": r"label accuracy from \d+(?:\.\d+)? % to (\d+(?:\.\d+)?) %",
    }
    out: dict[str, float] = {}
    for name, pattern in patterns.items():
        found = re.search(pattern, text)
        assert found, f"README quickstart no longer states {name!r} as /{pattern}/"
        value = found.group(1)
        out[name] = value if name == "verdict" else float(value)  # type: ignore[assignment]
    return out


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the README's commands (paths moved to a temporary folder) and collect results."""
    commands, text = _quickstart()
    tmp = tmp_path_factory.mktemp("readme")
    where = {"examples/toy": str(tmp / "toy")}

    def moved(args: list[str]) -> list[str]:
        out = []
        for arg in args:
            for old, new in where.items():
                arg = arg.replace(old, new)
            out.append(arg)
        return out

    runner = CliRunner()
    ran = []
    for args in commands:
        args = moved(args)
        if args[0] == "python":  # the example script, as a user runs it
            subprocess.run([sys.executable, *args[1:]], cwd=ROOT, check=True, capture_output=True)
        else:
            assert args[0] == "pmpclean", args
            res = runner.invoke(app, [*args[1:], "--quiet"])
            assert res.exit_code == 0, res.output
        ran.append(args[:2])
    assert ran[0][0] == "python" and [a[1] for a in ran[1:]] == ["scan", "rematch"]
    # the label audit the paragraph describes: the same scan with --label-col label
    labels_dir = tmp / "labels.pmpclean"
    scan = next(moved(a) for a in commands if a[:2] == ["pmpclean", "scan"])
    res = runner.invoke(
        app, [*scan[1:], "--label-col", "label", "--out", str(labels_dir), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    toy = tmp / "toy"
    return {
        "figures": _figures(text),
        "summary": json.loads((toy / "captions.pmpclean" / "summary.json").read_text()),
        "audit": pd.read_parquet(toy / "captions.pmpclean" / "audit.parquet"),
        "labels": pd.read_parquet(labels_dir / "audit.parquet"),
        "truth": pd.read_csv(toy / "truth.csv"),
        "cleaned": pd.read_csv(toy / "cleaned.csv"),
        "dropped": pd.read_csv(toy / "cleaned.dropped.csv"),
    }


def test_verdict_rate_and_interval(quickstart: dict) -> None:
    fig, summary = quickstart["figures"], quickstart["summary"]
    assert summary["verdict"] == fig["verdict"]
    # the README rounds to whole percent
    assert round(100 * summary["estimated_noise_rate"]) == fig["rate"]
    lo, hi = summary["estimated_noise_rate_interval"]
    assert (round(100 * lo), round(100 * hi)) == (fig["lo"], fig["hi"])


def test_flagged_rematched_and_dropped(quickstart: dict) -> None:
    fig, audit, truth = quickstart["figures"], quickstart["audit"], quickstart["truth"]
    flagged = audit["is_mismatched"].to_numpy()
    shuffled = truth["is_mismatched"].to_numpy()
    assert flagged.sum() == shuffled.sum() == fig["flagged"]
    precision = (flagged & shuffled).sum() / flagged.sum()
    recall = (flagged & shuffled).sum() / shuffled.sum()
    assert precision == recall == fig["precision"]
    rematch = audit["action"].to_numpy() == "rematch"
    assert rematch.sum() == fig["rematches"]
    # "all of them the true caption": the proposed caption is the image's own caption
    rows = np.flatnonzero(rematch)
    proposed = audit["proposed_row"].to_numpy()[rows]
    true_row, image = truth["true_row"].to_numpy(), audit["image_id"].to_numpy()
    assert (image[true_row[proposed]] == image[rows]).all()
    assert (audit["action"] == "drop").sum() == fig["dropped"]
    assert quickstart["summary"]["action_counts"]["drop"] == fig["dropped"]
    # the rematch command wrote the same: every row in one of the two files
    assert len(quickstart["dropped"]) == fig["dropped"]
    assert len(quickstart["cleaned"]) + len(quickstart["dropped"]) == len(audit)


def test_label_audit_figures(quickstart: dict) -> None:
    fig, labels, truth = quickstart["figures"], quickstart["labels"], quickstart["truth"]
    noisy = truth["is_label_noisy"].to_numpy()
    assert noisy.sum() == fig["label_rows"]
    n_images = labels["image"].nunique()
    noisy_images = labels.loc[noisy, "image"].nunique()
    assert round(100 * noisy_images / n_images) == fig["label_noise"]
    issue = labels["is_label_issue"].to_numpy()
    assert issue.sum() == fig["label_flagged"]
    assert (issue & noisy).sum() == fig["label_right"]
    true = truth["true_label"].to_numpy()
    before = (labels["label"].to_numpy() == true).mean()
    fixed = np.where(issue, labels["suggested_label"].to_numpy(), labels["label"].to_numpy())
    after = (fixed == true).mean()
    assert round(100 * before, 1) == fig["acc_before"]
    assert round(100 * after, 1) == fig["acc_after"]


def test_demo_section_agrees_and_says_what_is_checked(quickstart: dict) -> None:
    demo = " ".join(
        README[README.index("### Demo model") : README.index("### Label audit")].split()
    )
    assert "tests/test_readme.py" in demo and "not checked by the tests" in demo
    found = re.search(r"with the reference embeddings \(`--embeddings`\) all (\d+) proposals", demo)
    assert found and float(found.group(1)) == quickstart["figures"]["rematches"]
