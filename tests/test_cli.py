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


# ---------------------------------------------------------------- reuse of a scan


def _rematch_info(args: list[str]) -> dict:
    res = runner.invoke(app, ["rematch", *args, "--format", "json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _harder(tmp_path: Path) -> tuple[Path, Path]:
    """Harder data than the shared fixture, where every proposal is right (so their
    calibrated confidence is 1, no cut tells them apart and nothing is dropped)."""
    data = clip_like_pairs(
        300, dim=64, noise_rate=0.3, n_clusters=20, semantic=0.8, noise=0.8, seed=0
    )
    manifest = tmp_path / "data.csv"
    data.to_frame().to_csv(manifest, index=False)
    emb = tmp_path / "emb.npz"
    np.savez(emb, image=data.image_emb, text=data.text_emb)
    return manifest, emb


def test_rematch_min_confidence_below_the_scans_cut_applies_its_candidates(tmp_path):
    """A scan at 0.6 applied at 0.3 gives what a scan at 0.3 gives, without a new scan."""
    manifest, emb = _harder(tmp_path)
    for cut in ("0.6", "0.3"):
        args = ["scan", str(manifest), "--embeddings", str(emb), "--min-confidence", cut]
        res = runner.invoke(app, [*args, "--out", str(tmp_path / f"scan{cut}")])
        assert res.exit_code == 0, res.output
    strict = _rematch_info(
        [str(manifest), "--audit-dir", str(tmp_path / "scan0.6")]
        + ["--out", str(tmp_path / "strict.csv")]
    )
    low = _rematch_info(
        [str(manifest), "--audit-dir", str(tmp_path / "scan0.6")]
        + ["--out", str(tmp_path / "low.csv"), "--min-confidence", "0.3"]
    )
    ref = _rematch_info(
        [str(manifest), "--audit-dir", str(tmp_path / "scan0.3")]
        + ["--out", str(tmp_path / "ref.csv")]
    )
    assert not low["scanned_now"] and not ref["scanned_now"]
    assert ref["min_confidence"] == 0.3  # the scan's own cut when none is given
    assert low["n_rematched"] == ref["n_rematched"] > strict["n_rematched"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "low.csv"), pd.read_csv(tmp_path / "ref.csv")
    )
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "low.dropped.csv"), pd.read_csv(tmp_path / "ref.dropped.csv")
    )
    # the flag policy shows the proposals at the cut applied, not at the scan's
    flag = tmp_path / "flag.csv"
    _rematch_info(
        [str(manifest), "--audit-dir", str(tmp_path / "scan0.6"), "--out", str(flag)]
        + ["--policy", "flag", "--min-confidence", "0.3"]
    )
    flagged = pd.read_csv(flag)
    proposed = flagged["pmpclean_rematch_confidence"].to_numpy() > 0
    assert proposed.sum() >= ref["n_rematched"]
    assert (flagged["pmpclean_rematch_confidence"][proposed] >= 0.3).all()
    assert (flagged["pmpclean_rematch_confidence"][proposed] < 0.6).any()
    # the scan folder keeps proposed_row's meaning: the proposal at the scan's cut
    audit = pd.read_parquet(tmp_path / "scan0.6" / "audit.parquet")
    has = audit["proposed_row"].to_numpy() >= 0
    assert (audit["rematch_confidence"][has] >= 0.6).all()
    np.testing.assert_array_equal(audit["proposed_row"][has], audit["candidate_row"][has])
    withheld = (audit["candidate_row"].to_numpy() >= 0) & ~has
    assert withheld.any() and (audit["candidate_confidence"][withheld] < 0.6).all()


def test_rematch_rescans_a_stale_scan_and_says_what_changed(tmp_path):
    manifest, emb = _harder(tmp_path)
    a_dir = tmp_path / "scan"
    res = runner.invoke(app, ["scan", str(manifest), "--embeddings", str(emb), "--out", str(a_dir)])
    assert res.exit_code == 0, res.output

    def apply(name: str, *extra: str) -> dict:
        out = ["--out", str(tmp_path / f"{name}.csv"), "--audit-dir", str(a_dir)]
        return _rematch_info([str(manifest), *out, *extra])

    # nothing differs: the options the scan was made with need not be repeated
    same = apply("same")
    assert not same["scanned_now"] and same["scanned_because"] is None
    # a setting that only chooses the action does not need a new scan
    assert not apply("cut", "--min-confidence", "0.9")["scanned_now"]
    action_only = tmp_path / "action.yaml"
    action_only.write_text("audit:\n  min_confidence: 0.9\n  review_margin: 0.5\n")
    by_file = apply("cut2", "--config", str(action_only))
    assert not by_file["scanned_now"] and by_file["min_confidence"] == 0.9
    # margin 0.5 below the threshold 0.5: every flagged pair without a proposal is review
    assert same["action_counts"]["drop"] > 0
    counts = by_file["action_counts"]
    was = same["action_counts"]
    assert counts["drop"] == 0 and counts["review"] >= was["review"] + was["drop"]
    # the same embeddings under another name are the same input
    copy = tmp_path / "copy.npz"
    copy.write_bytes(emb.read_bytes())
    assert not apply("copy", "--embeddings", str(copy))["scanned_now"]

    other = tmp_path / "other.npz"
    with np.load(emb) as z:
        np.savez(other, image=z["image"][::-1], text=z["text"][::-1])
    changed = apply("emb", "--embeddings", str(other))
    assert changed["scanned_now"] and "embeddings file differs" in changed["scanned_because"]
    assert str(a_dir) in changed["scanned_because"]
    summary = json.loads((a_dir / "summary.json").read_text())
    assert summary["settings"]["embed"]["embeddings"] == str(other)  # the new scan is there
    # ... and is reused by the next run that asks for those embeddings
    assert not apply("emb2", "--embeddings", str(other))["scanned_now"]

    assert "seed was 0, now 4" in apply("seed", "--seed", "4")["scanned_because"]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("audit:\n  threshold: 0.3\n", encoding="utf-8")
    by_file = apply("thr", "--config", str(cfg))
    assert by_file["scanned_now"]
    assert "audit.threshold was 0.5, now 0.3" in by_file["scanned_because"]
    # settings the file leaves out keep the scan's values (seed 4, the other embeddings)
    assert (
        "seed" not in by_file["scanned_because"] and "embeddings" not in by_file["scanned_because"]
    )

    # a scan folder from before fingerprints is stale, with the reason, not an error
    summary = json.loads((a_dir / "summary.json").read_text())
    del summary["fingerprint"]
    (a_dir / "summary.json").write_text(json.dumps(summary))
    old = apply("old")
    assert old["scanned_now"] and "no fingerprint" in old["scanned_because"]
    res = runner.invoke(
        app,
        ["rematch", str(manifest), "--audit-dir", str(a_dir), "--out", str(tmp_path / "h.csv")],
    )
    assert res.exit_code == 0 and "scanned because" in res.stdout  # the terminal says why


def test_fingerprint_names_a_change_of_model(dataset):
    from pmpclean import ScanConfig
    from pmpclean.pipeline import _fingerprint_changes, scan_fingerprint

    manifest, emb = dataset
    tiny = ScanConfig().replace(embed__model="pmpclean-tiny", embed__pretrained="none")
    small = tiny.replace(embed__model="pmpclean-small")
    given = tiny.replace(embed__embeddings=str(emb))
    fp = scan_fingerprint(manifest, tiny)
    assert _fingerprint_changes(fp, scan_fingerprint(manifest, tiny)) == []
    assert _fingerprint_changes(
        fp, scan_fingerprint(manifest, small.replace(embed__device="cpu"))
    ) == ["model pmpclean-tiny/random:seed=0 embedded, now pmpclean-small/random:seed=0"]
    assert _fingerprint_changes(fp, scan_fingerprint(manifest, given)) == [
        "model pmpclean-tiny/random:seed=0 embedded, now an embeddings file is given"
    ]
    # the embeddings file replaces the model: its content, not its name, is compared
    assert "model" not in scan_fingerprint(manifest, given)


def test_fingerprint_follows_a_checkpoint_file(dataset, tmp_path):
    from pmpclean import ScanConfig
    from pmpclean.pipeline import _fingerprint_changes, scan_fingerprint

    manifest, _ = dataset
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"0" * 10)
    cfg = ScanConfig().replace(embed__model="pmpclean-tiny", embed__pretrained=str(ckpt))
    before = scan_fingerprint(manifest, cfg)
    assert _fingerprint_changes(before, scan_fingerprint(manifest, cfg)) == []
    ckpt.write_bytes(b"1" * 20)  # retrained weights at the same path
    (change,) = _fingerprint_changes(before, scan_fingerprint(manifest, cfg))
    assert change.startswith("model file:") and str(ckpt) in change


# ---------------------------------------------------------------- output folders


def test_scan_refuses_an_existing_audit_without_force(dataset, tmp_path):
    manifest, emb = dataset
    out = tmp_path / "out"
    args = ["scan", str(manifest), "--embeddings", str(emb), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = (out / "summary.json").read_bytes()
    res = runner.invoke(app, [*args, "--seed", "3"])
    assert res.exit_code == 1
    message = " ".join(res.stderr.split())
    assert str(out) in message and "--force" in message, message
    assert (out / "summary.json").read_bytes() == before  # the audit is untouched
    res = runner.invoke(app, [*args, "--seed", "3", "--force"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["settings"]["seed"] == 3


def test_a_second_writer_of_an_output_fails_at_once_until_the_first_ends(dataset, tmp_path):
    import subprocess
    import sys

    manifest, emb = dataset
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".pmpclean.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["scan", str(manifest), "--embeddings", str(emb), "--out", str(out)]
        res = runner.invoke(app, args)
        assert res.exit_code == 1
        message = " ".join(res.stderr.split())
        assert str(out) in message and str(lock) in message, message
        assert not (out / "audit.parquet").exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock of a process that died is free: the lock file left behind blocks nothing
    assert lock.exists()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert not lock.exists()  # released and removed when the command ends


def test_a_failed_command_removes_the_output_folder_it_created(dataset, tmp_path):
    manifest, emb = dataset
    out = tmp_path / "new" / "audit"
    args = ["scan", str(manifest), "--embeddings", str(emb), "--out", str(out)]
    res = runner.invoke(app, [*args, "--text-col", "text"])
    assert res.exit_code == 1 and "--text-col" in res.stderr
    assert not (tmp_path / "new").exists()
    # a folder that was there before stays, with what it held
    keep = tmp_path / "mine"
    keep.mkdir()
    res = runner.invoke(app, [*args[:-1], str(keep), "--text-col", "text"])
    assert res.exit_code == 1 and keep.is_dir() and list(keep.iterdir()) == []
    res = runner.invoke(
        app,
        ["corrupt", str(manifest), "--out", str(tmp_path / "n" / "noisy.csv")]
        + ["--image-col", "picture"],
    )
    assert res.exit_code == 1 and "picture" in res.stderr
    assert not (tmp_path / "n").exists()
    args = ["finetune", str(tmp_path / "none.csv"), "--out", str(tmp_path / "f" / "model")]
    res = runner.invoke(app, [*args, "--model", "pmpclean-tiny", "--pretrained", "none"])
    assert res.exit_code == 1 and "none.csv" in res.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("command", ["rematch", "corrupt", "embed", "finetune"])
def test_an_unwritable_out_is_one_line_before_any_work(dataset, tmp_path, monkeypatch, command):
    import pmpclean.pipeline as pipeline

    manifest, emb = dataset

    def no_work(*args, **kwargs):
        raise AssertionError("the command started its work before checking --out")

    monkeypatch.setattr(pipeline, "_embeddings", no_work)
    monkeypatch.setattr(pipeline, "_read", no_work)
    monkeypatch.setattr("pmpclean.data.read_table", no_work)
    monkeypatch.setattr("pmpclean.train.main._run", no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / {"embed": "out.npz", "finetune": "model"}.get(command, "out.csv")
    args = [command, str(manifest), "--out", str(out)]
    if command == "rematch":
        args += ["--embeddings", str(emb), "--audit-dir", str(tmp_path / "audit")]
    if command in ("embed", "finetune"):
        args += ["--model", "pmpclean-tiny", "--pretrained", "none"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    message = " ".join(res.stderr.split())
    assert len(lines) == 1, res.stderr
    assert "Cannot write to output folder" in message and str(blocker) in message, message
    assert "Unexpected" not in message
    assert not (tmp_path / "audit").exists()  # rematch did not scan first


def test_main_exit_codes(monkeypatch, capsys):
    """main(argv) returns on success and raises SystemExit with the code otherwise;
    main() (the console script) always ends in SystemExit, as a console script should."""
    import sys

    from pmpclean import __version__
    from pmpclean.cli import main

    assert main(["--version"]) is None
    assert capsys.readouterr().out == f"pmpclean {__version__}\n"
    with pytest.raises(SystemExit) as exc:
        main(["scan"])  # usage error
    assert exc.value.code == 2
    assert "Try 'pmpclean scan --help' for help." in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["pmpclean", "--version"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0


def test_library_warnings_reach_the_output_sink(monkeypatch):
    """A warning raised inside the library is shown as one 'Warning:' line on stderr."""
    import warnings

    from pmpclean import pipeline

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def warns(*args, **kwargs):
        warnings.warn("model 'x' has RANDOM weights", UserWarning, stacklevel=1)
        raise pipeline.DatasetError("stopped after the warning")

    monkeypatch.setattr(pipeline, "scan", warns)
    res = runner.invoke(app, ["scan", "x.csv"])
    assert res.exit_code == 1
    assert "Warning: model 'x' has RANDOM weights" in res.stderr
    assert "Error: stopped after the warning" in res.stderr


def test_ot_mass_out_of_range_explains_itself():
    res = runner.invoke(
        app, ["finetune", "x.csv", "--out", "m", "--ot-mass", "0"], env={"COLUMNS": "400"}
    )
    assert res.exit_code == 2
    text = " ".join(res.output.replace("│", " ").split())
    assert (
        "0 is outside (0, 1]. It is the fraction of a batch's suspect pairs the transport plan "
        "re-pairs: 0 would leave every suspect without a target and more than 1 is more mass "
        "than there is. Use 0.5 (the default), higher when most mismatched captions have their "
        "true image in the data, lower when few do."
    ) in text
