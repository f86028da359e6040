"""CLI smoke tests: exit codes, one-line errors, JSON output, help that teaches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pmpclean.cli import app
from pmpclean.synthetic import clip_like_pairs

runner = CliRunner()


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    data = clip_like_pairs(
        300, dim=64, noise_rate=0.2, n_clusters=20, semantic=1.2, noise=0.6, seed=0
    )
    manifest = tmp_path / "data.csv"
    data.to_frame().to_csv(manifest, index=False)
    emb = tmp_path / "emb.npz"
    np.savez(emb, image=data.image_emb, text=data.text_emb)
    return manifest, emb


def test_help_lists_commands_and_defaults():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("scan", "rematch", "embed", "corrupt", "finetune"):
        assert cmd in res.stdout
    res = runner.invoke(app, ["scan", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in (
        "--image-col",
        "--text-col",
        "--embeddings",
        "--pretrained",
        "--device",
        "--format",
        "--quiet",
    ):
        assert opt in res.stdout
    assert "laion2b_s34b_b79k" in res.stdout and "ViT-B-32" in res.stdout


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("pmpclean ")


def test_scan_json_output(dataset, tmp_path):
    manifest, emb = dataset
    out = tmp_path / "out"
    args = ["scan", str(manifest), "--embeddings", str(emb), "--out", str(out)]
    res = runner.invoke(app, [*args, "--truth-col", "true_row", "--format", "json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_rows"] == 300
    assert summary["evaluation"]["detection"]["f1"] > 0.8
    assert (out / "audit.parquet").is_file()


def test_scan_human_summary_and_quiet(dataset, tmp_path):
    manifest, emb = dataset
    res = runner.invoke(
        app, ["scan", str(manifest), "--embeddings", str(emb), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    res = runner.invoke(
        app,
        ["scan", str(manifest), "--embeddings", str(emb), "--out", str(tmp_path / "q"), "--quiet"],
    )
    assert res.exit_code == 0
    assert res.stdout == ""


def test_missing_manifest_is_one_red_line_exit_1(tmp_path):
    res = runner.invoke(
        app,
        ["scan", str(tmp_path / "nope.csv"), "--pretrained", "none", "--model", "pmpclean-tiny"],
    )
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nope.csv" in lines[0]
    assert "Traceback" not in res.output


def test_unsupported_extension_and_missing_column(tmp_path, dataset):
    manifest, emb = dataset
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    res = runner.invoke(app, ["scan", str(bad), "--embeddings", str(emb)])
    assert res.exit_code == 1 and ".csv" in res.stderr
    res = runner.invoke(
        app, ["scan", str(manifest), "--embeddings", str(emb), "--text-col", "text"]
    )
    assert res.exit_code == 1
    assert "caption" in res.stderr and "--text-col" in res.stderr


def test_usage_error_exit_2():
    res = runner.invoke(app, ["scan"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["scan", "x.csv", "--threshold", "2"])
    assert res.exit_code == 2


def test_rematch_cli_writes_both_files_and_refuses_overwrite(dataset, tmp_path):
    manifest, emb = dataset
    out = tmp_path / "clean.csv"
    args = ["rematch", str(manifest), "--embeddings", str(emb), "--out", str(out)]
    args += ["--audit-dir", str(tmp_path / "a")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    cleaned = pd.read_csv(out)
    dropped = pd.read_csv(tmp_path / "clean.dropped.csv")
    assert len(cleaned) + len(dropped) == 300
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "--force" in res.stderr
    res = runner.invoke(app, args + ["--force", "--format", "json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout)["n_rows"] == 300


def test_corrupt_cli(dataset, tmp_path):
    manifest, _ = dataset
    clean = tmp_path / "clean.csv"
    pd.read_csv(manifest).drop(columns=["true_row"]).to_csv(clean, index=False)
    args = ["corrupt", str(clean), "--rate", "0.25"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "noisy.parquet"), "--seed", "1"])
    assert res.exit_code == 0, res.output
    noisy = pd.read_parquet(tmp_path / "noisy.parquet")
    assert (noisy["true_row"].to_numpy() != np.arange(300)).mean() == pytest.approx(0.25, abs=0.01)


def test_finetune_bad_input_is_one_line(tmp_path):
    args = ["finetune", str(tmp_path / "x.csv"), "--out", str(tmp_path / "m")]
    res = runner.invoke(app, [*args, "--pretrained", "none", "--model", "pmpclean-tiny"])
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "x.csv" in lines[0], res.stderr
    res = runner.invoke(app, ["finetune", "x.csv", "--out", "m", "--epochs", "0"])
    assert res.exit_code == 2


def test_debug_env_shows_traceback(tmp_path):
    res = runner.invoke(
        app,
        ["scan", str(tmp_path / "nope.csv"), "--embeddings", "x.npz"],
        env={"PMPCLEAN_DEBUG": "1"},
    )
    assert res.exit_code == 1
    assert res.exception is not None and type(res.exception).__name__ == "DatasetError"


def test_command_line_options_win_over_config_file(dataset, tmp_path):
    manifest, emb = dataset
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("seed: 5\naudit:\n  threshold: 0.3\n  k: 4\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["scan", str(manifest), "--embeddings", str(emb), "--out", str(out)]
    res = runner.invoke(app, [*args, "--config", str(cfg), "--seed", "8", "--threshold", "0.6"])
    assert res.exit_code == 0, res.output
    import yaml

    used = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    # given on the command line: the command line wins
    assert used["seed"] == 8 and used["audit"]["threshold"] == 0.6
    # only in the file: the file's value, not the option's default (k=3)
    assert used["audit"]["k"] == 4


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("- audit\n- threshold: 0.3\n", "expected a mapping of settings"),
        ("audit:\n  k: three\n", "audit.k must be an integer"),
        ('audit:\n  threshold: "0.3"\n', "audit.threshold must be a number"),
        ("seed: [1, 2]\n", "seed must be an integer"),
        ("embed:\n  - model\n", "section 'embed' must be a mapping"),
    ],
)
def test_config_file_of_the_wrong_shape_is_one_line_naming_the_key(dataset, tmp_path, text, named):
    manifest, emb = dataset
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text, encoding="utf-8")
    args = ["scan", str(manifest), "--embeddings", str(emb), "--out", str(tmp_path / "out")]
    res = runner.invoke(app, [*args, "--config", str(cfg)])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    message = " ".join(res.stderr.split())
    assert named in message and "cfg.yaml" in message, message
    assert "Unexpected" not in message and "bug" not in message
