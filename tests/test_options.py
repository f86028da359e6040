"""Every option of every command reaches the setting it names.

The options are read from the typer app itself, so a new option without a case in
``CASES`` fails ``test_option_reaches_its_setting``. Each case gives the option a
non-default value; the one library call the command makes (``pmpclean.pipeline.scan``,
``rematch``, ``embed``, ``corrupt``, ``pmpclean.training.finetune``) is replaced by a
recorder, as are the output sink and ``seed_everything``. Everything the library
receives is flattened into ``{"config.audit.k": 3, "out": ..., ...}`` and compared with
a run given only the required arguments: the difference must be exactly the setting
the case names. A swapped, dropped or misrouted option changes another key, or none.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pmpclean.cli import app
from pmpclean.errors import PmpcleanError

# Required arguments of each command (the recorders stop before any file is read).
REQUIRED: dict[str, list[str]] = {
    "scan": ["data.csv"],
    "rematch": ["data.csv", "--out", "cleaned.csv"],
    "embed": ["data.csv"],
    "corrupt": ["data.csv", "--out", "noisy.csv"],
    "finetune": ["data.csv", "--out", "model"],
}

# The library function each command calls: (module, attribute).
CALLS: dict[str, tuple[str, str]] = {
    "scan": ("pmpclean.pipeline", "scan"),
    "rematch": ("pmpclean.pipeline", "rematch"),
    "embed": ("pmpclean.pipeline", "embed"),
    "corrupt": ("pmpclean.pipeline", "corrupt"),
    "finetune": ("pmpclean.training", "finetune"),
}

# "--config" cases write this file and expect its one setting to arrive.
CONFIG_FILE = "audit:\n  k: 5\n"
CONFIG_FILES = {"finetune": "settings:\n  epochs: 4\n"}  # finetune_config.yaml's layout

_FMT = (["--format", "json"], {"output.format": "json"})
_QUIET = (["--quiet"], {"output.quiet": True})
_SEED = (["--seed", "11"], {"config.seed": 11, "seed_everything": 11})
_CONFIG = (["--config", "{config}"], {"config.audit.k": 5})

# (command, option) -> (arguments added to the required ones, expected difference)
CASES: dict[tuple[str, str], tuple[list[str], dict[str, Any]]] = {
    # ---------------------------------------------------------------- scan
    ("scan", "--out"): (["--out", "there"], {"out_dir": "there"}),
    ("scan", "--image-col"): (["--image-col", "img"], {"config.data.image_col": "img"}),
    ("scan", "--text-col"): (["--text-col", "txt"], {"config.data.text_col": "txt"}),
    ("scan", "--id-col"): (["--id-col", "uid"], {"config.data.id_col": "uid"}),
    ("scan", "--label-col"): (["--label-col", "lab"], {"config.data.label_col": "lab"}),
    ("scan", "--root"): (["--root", "pics"], {"config.data.root": "pics"}),
    ("scan", "--truth-col"): (["--truth-col", "tr"], {"config.data.truth_col": "tr"}),
    ("scan", "--model"): (["--model", "RN50"], {"config.embed.model": "RN50"}),
    ("scan", "--pretrained"): (["--pretrained", "openai"], {"config.embed.pretrained": "openai"}),
    ("scan", "--embeddings"): (["--embeddings", "e.npz"], {"config.embed.embeddings": "e.npz"}),
    ("scan", "--embeddings-pair"): (
        ["--embeddings-pair", "l14"],
        {"config.embed.embeddings_pair": "l14"},
    ),
    ("scan", "--device"): (["--device", "cpu"], {"config.embed.device": "cpu"}),
    ("scan", "--batch-size"): (["--batch-size", "7"], {"config.embed.batch_size": 7}),
    ("scan", "--workers"): (["--workers", "5"], {"config.embed.workers": 5}),
    ("scan", "--cache-dir"): (["--cache-dir", "cc"], {"config.embed.cache_dir": "cc"}),
    ("scan", "--no-cache"): (["--no-cache"], {"config.embed.use_cache": False}),
    ("scan", "--k"): (["--k", "6"], {"config.audit.k": 6}),
    ("scan", "--threshold"): (["--threshold", "0.3"], {"config.audit.threshold": 0.3}),
    ("scan", "--no-rematch"): (["--no-rematch"], {"config.audit.rematch": False}),
    ("scan", "--mass"): (["--mass", "0.4"], {"config.audit.mass": 0.4}),
    ("scan", "--cost"): (["--cost", "fixed"], {"config.audit.cost": "fixed"}),
    ("scan", "--min-confidence"): (
        ["--min-confidence", "0.3"],
        {"config.audit.min_confidence": 0.3},
    ),
    ("scan", "--gallery-size"): (["--gallery-size", "5"], {"config.gallery_size": 5}),
    ("scan", "--force"): (["--force"], {"force": True}),
    ("scan", "--seed"): _SEED,
    ("scan", "--config"): _CONFIG,
    ("scan", "--format"): _FMT,
    ("scan", "--quiet"): _QUIET,
    ("scan", "--engine"): (["--engine", "ray"], {"engine.name": "ray"}),
    ("scan", "--ray-address"): (
        ["--ray-address", "ray://head:10001"],
        {"engine.address": "ray://head:10001"},
    ),
    # ---------------------------------------------------------------- rematch
    ("rematch", "--out"): (["--out", "other.csv"], {"out": "other.csv"}),
    ("rematch", "--policy"): (["--policy", "drop"], {"policy": "drop"}),
    ("rematch", "--out-format"): (["--out-format", "uids"], {"output_format": "uids"}),
    ("rematch", "--min-confidence"): (["--min-confidence", "0.3"], {"min_confidence": 0.3}),
    ("rematch", "--fix-labels"): (["--fix-labels"], {"fix_labels": True}),
    ("rematch", "--audit-dir"): (["--audit-dir", "sc"], {"audit_dir": "sc"}),
    ("rematch", "--rescan"): (["--rescan"], {"rescan": True}),
    ("rematch", "--dry-run"): (["--dry-run"], {"dry_run": True}),
    ("rematch", "--force"): (["--force"], {"force": True}),
    ("rematch", "--image-col"): (["--image-col", "img"], {"config.data.image_col": "img"}),
    ("rematch", "--text-col"): (["--text-col", "txt"], {"config.data.text_col": "txt"}),
    ("rematch", "--label-col"): (["--label-col", "lab"], {"config.data.label_col": "lab"}),
    ("rematch", "--root"): (["--root", "pics"], {"config.data.root": "pics"}),
    ("rematch", "--model"): (["--model", "RN50"], {"config.embed.model": "RN50"}),
    ("rematch", "--pretrained"): (
        ["--pretrained", "openai"],
        {"config.embed.pretrained": "openai"},
    ),
    ("rematch", "--embeddings"): (
        ["--embeddings", "e.npz"],
        {"config.embed.embeddings": "e.npz"},
    ),
    ("rematch", "--embeddings-pair"): (
        ["--embeddings-pair", "l14"],
        {"config.embed.embeddings_pair": "l14"},
    ),
    ("rematch", "--device"): (["--device", "cpu"], {"config.embed.device": "cpu"}),
    ("rematch", "--seed"): _SEED,
    ("rematch", "--config"): _CONFIG,
    ("rematch", "--format"): _FMT,
    ("rematch", "--quiet"): _QUIET,
    ("rematch", "--engine"): (["--engine", "ray"], {"engine.name": "ray"}),
    ("rematch", "--ray-address"): (
        ["--ray-address", "ray://head:10001"],
        {"engine.address": "ray://head:10001"},
    ),
    # ---------------------------------------------------------------- embed
    ("embed", "--out"): (["--out", "e.npz"], {"out": "e.npz"}),
    ("embed", "--image-col"): (["--image-col", "img"], {"config.data.image_col": "img"}),
    ("embed", "--text-col"): (["--text-col", "txt"], {"config.data.text_col": "txt"}),
    ("embed", "--id-col"): (["--id-col", "uid"], {"config.data.id_col": "uid"}),
    ("embed", "--root"): (["--root", "pics"], {"config.data.root": "pics"}),
    ("embed", "--model"): (["--model", "RN50"], {"config.embed.model": "RN50"}),
    ("embed", "--pretrained"): (["--pretrained", "openai"], {"config.embed.pretrained": "openai"}),
    ("embed", "--device"): (["--device", "cpu"], {"config.embed.device": "cpu"}),
    ("embed", "--batch-size"): (["--batch-size", "7"], {"config.embed.batch_size": 7}),
    ("embed", "--workers"): (["--workers", "5"], {"config.embed.workers": 5}),
    ("embed", "--cache-dir"): (["--cache-dir", "cc"], {"config.embed.cache_dir": "cc"}),
    ("embed", "--no-cache"): (["--no-cache"], {"config.embed.use_cache": False}),
    ("embed", "--force"): (["--force"], {"force": True}),
    ("embed", "--seed"): _SEED,
    ("embed", "--format"): _FMT,
    ("embed", "--quiet"): _QUIET,
    ("embed", "--engine"): (["--engine", "ray"], {"engine.name": "ray"}),
    ("embed", "--ray-address"): (
        ["--ray-address", "ray://head:10001"],
        {"engine.address": "ray://head:10001"},
    ),
    # ---------------------------------------------------------------- corrupt
    ("corrupt", "--out"): (["--out", "other.csv"], {"out": "other.csv"}),
    ("corrupt", "--rate"): (["--rate", "0.4"], {"rate": 0.4}),
    ("corrupt", "--mode"): (["--mode", "hard"], {"mode": "hard"}),
    ("corrupt", "--embeddings"): (["--embeddings", "e.npz"], {"embeddings": "e.npz"}),
    ("corrupt", "--image-col"): (["--image-col", "img"], {"image_col": "img"}),
    ("corrupt", "--text-col"): (["--text-col", "txt"], {"text_col": "txt"}),
    ("corrupt", "--truth-col"): (["--truth-col", "tr"], {"truth_col": "tr"}),
    ("corrupt", "--seed"): (["--seed", "11"], {"seed": 11}),
    ("corrupt", "--force"): (["--force"], {"force": True}),
    ("corrupt", "--format"): _FMT,
    ("corrupt", "--quiet"): _QUIET,
    # ---------------------------------------------------------------- finetune
    ("finetune", "--out"): (["--out", "elsewhere"], {"out_dir": "elsewhere"}),
    ("finetune", "--config"): (["--config", "{config}"], {"config.epochs": 4}),
    ("finetune", "--model"): (["--model", "RN50"], {"config.model": "RN50"}),
    ("finetune", "--pretrained"): (["--pretrained", "none"], {"config.pretrained": "none"}),
    ("finetune", "--image-col"): (["--image-col", "img"], {"config.image_col": "img"}),
    ("finetune", "--text-col"): (["--text-col", "txt"], {"config.text_col": "txt"}),
    ("finetune", "--truth-col"): (["--truth-col", "tr"], {"config.truth_col": "tr"}),
    ("finetune", "--method"): (["--method", "contrastive"], {"config.method": "contrastive"}),
    ("finetune", "--epochs"): (["--epochs", "3"], {"config.epochs": 3}),
    ("finetune", "--batch-size"): (["--batch-size", "16"], {"config.batch_size": 16}),
    ("finetune", "--accum-steps"): (["--accum-steps", "4"], {"config.accum_steps": 4}),
    ("finetune", "--lr"): (["--lr", "0.002"], {"config.lr": 0.002}),
    ("finetune", "--schedule"): (["--schedule", "linear"], {"config.schedule": "linear"}),
    ("finetune", "--warmup-steps"): (["--warmup-steps", "7"], {"config.warmup_steps": 7}),
    ("finetune", "--lock-image"): (["--lock-image"], {"config.lock_image": True}),
    ("finetune", "--lock-text"): (["--lock-text"], {"config.lock_text": True}),
    ("finetune", "--precision"): (["--precision", "fp32"], {"config.precision": "fp32"}),
    ("finetune", "--device"): (["--device", "cpu"], {"config.device": "cpu"}),
    ("finetune", "--workers"): (["--workers", "3"], {"config.workers": 3}),
    ("finetune", "--val-fraction"): (["--val-fraction", "0.2"], {"config.val_fraction": 0.2}),
    ("finetune", "--val-dataset"): (["--val-dataset", "v.csv"], {"config.val_dataset": "v.csv"}),
    ("finetune", "--patience"): (["--patience", "2"], {"config.patience": 2}),
    ("finetune", "--split-warmup-epochs"): (
        ["--split-warmup-epochs", "2"],
        {"config.split_warmup_epochs": 2},
    ),
    ("finetune", "--split-every"): (["--split-every", "3"], {"config.split_every": 3}),
    ("finetune", "--suspect-targets"): (
        ["--suspect-targets", "batch"],
        {"config.suspect_targets": "batch"},
    ),
    ("finetune", "--rematch-min-confidence"): (
        ["--rematch-min-confidence", "0.8"],
        {"config.rematch_min_confidence": 0.8},
    ),
    ("finetune", "--ot-mass"): (["--ot-mass", "0.9"], {"config.ot_mass": 0.9}),
    ("finetune", "--robust-q"): (["--robust-q", "0.5"], {"config.robust_q": 0.5}),
    ("finetune", "--audit-weight"): (["--audit-weight", "0.9"], {"config.audit_weight": 0.9}),
    ("finetune", "--checkpoint-every"): (
        ["--checkpoint-every", "7"],
        {"config.checkpoint_every": 7},
    ),
    ("finetune", "--resume"): (["--resume"], {"config.resume": True}),
    ("finetune", "--overwrite"): (["--overwrite"], {"config.overwrite": True}),
    ("finetune", "--seed"): _SEED,
    ("finetune", "--format"): _FMT,
    ("finetune", "--quiet"): _QUIET,
}


def _app_options() -> list[tuple[str, str]]:
    """(command, longest option name) of every option of every command of the app."""
    group = typer.main.get_command(app)
    found = []
    for name, command in sorted(group.commands.items()):  # type: ignore[attr-defined]
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                found.append((name, max(param.opts, key=len)))
    return found


OPTIONS = _app_options()


class _Reached(PmpcleanError):
    """Raised by the recorders: the command got as far as its library call."""


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = _plain(value)


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the library, the output sink and seed_everything receive, flattened."""
    import importlib
    import warnings

    from pmpclean import _output, _utils

    seen: dict[str, Any] = {}
    # the commands route warnings to their output sink: restore the hook afterwards
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)

    def recorder(*args: Any, **kwargs: Any) -> None:
        for i, arg in enumerate(args):
            _flatten(f"arg{i}", arg, seen)
        for key, value in kwargs.items():
            if key != "progress":
                _flatten(key, value, seen)
        raise _Reached("library call reached")

    for module, attr in CALLS.values():
        monkeypatch.setattr(importlib.import_module(module), attr, recorder)

    class RecordingOutput(_output.Output):
        def __init__(self, **kwargs: Any) -> None:
            for key, value in kwargs.items():
                _flatten(f"output.{key}", value, seen)
            super().__init__(**kwargs)

    monkeypatch.setattr(_output, "Output", RecordingOutput)
    monkeypatch.setattr(_utils, "seed_everything", lambda seed: seen.update(seed_everything=seed))

    def engine_recorder(name: str = "local", **kwargs: Any) -> None:
        _flatten("engine", {"name": name, **kwargs}, seen)
        return None  # the local engine: no cluster is started

    monkeypatch.setattr(importlib.import_module("pmpclean.engine"), "make_engine", engine_recorder)
    return seen


def _invoke(received: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    received.clear()
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 1 and "library call reached" in res.output, res.output
    return dict(received)


@pytest.mark.parametrize(("command", "option"), OPTIONS, ids=[f"{c} {o}" for c, o in OPTIONS])
def test_option_reaches_its_setting(
    command: str, option: str, received: dict[str, Any], tmp_path: Path
) -> None:
    assert (command, option) in CASES, (
        f"pmpclean {command} {option} has no case in tests/test_options.py::CASES: add one "
        "with a non-default value and the setting it must change."
    )
    extra, expected = CASES[command, option]
    config = tmp_path / "settings.yaml"
    config.write_text(CONFIG_FILES.get(command, CONFIG_FILE), encoding="utf-8")
    extra = [a.replace("{config}", str(config)) for a in extra]
    base = _invoke(received, [command, *REQUIRED[command]])
    got = _invoke(received, [command, *REQUIRED[command], *extra])
    missing = object()
    diff = {
        key: got.get(key, missing)
        for key in sorted(set(base) | set(got))
        if got.get(key, missing) != base.get(key, missing)
    }
    assert diff == expected


def test_every_case_names_an_option_of_the_app() -> None:
    assert sorted(set(CASES) - set(OPTIONS)) == []


def _library_defaults(command: str) -> dict[str, Any]:
    """What the library uses when the caller passes nothing: keyword defaults, and the
    default config (ScanConfig() / FinetuneConfig()) for ``config=None``."""
    import importlib
    import inspect

    from pmpclean.config import ScanConfig
    from pmpclean.training import FinetuneConfig

    module, attr = CALLS[command]
    function = getattr(importlib.import_module(module), attr)
    out: dict[str, Any] = {}
    for name, param in inspect.signature(function).parameters.items():
        if param.kind is not param.KEYWORD_ONLY or param.default is param.empty:
            continue
        if name == "config":
            _flatten("config", FinetuneConfig() if command == "finetune" else ScanConfig(), out)
        elif name != "progress":
            _flatten(name, param.default, out)
    return out


_DEFAULTS = {command: _library_defaults(command) for command in CALLS}


@pytest.mark.parametrize("command", sorted(CALLS))
def test_a_command_without_options_passes_the_library_defaults(
    command: str, received: dict[str, Any]
) -> None:
    """The command line's defaults are the library's: each setting the command passes
    equals what the library would use if it were not passed at all."""
    got = _invoke(received, [command, *REQUIRED[command]])
    expected = _DEFAULTS[command]
    differ = {k: (got[k], expected[k]) for k in got if k in expected and got[k] != expected[k]}
    assert differ == {}
    # every setting of the config arrives (no section or field left behind)
    assert {k for k in expected if k.startswith("config.")} <= set(got)


def test_finetune_options_given_win_over_the_config_file(
    received: dict[str, Any], tmp_path: Path
) -> None:
    """Defaults < --config file < options given on the command line (finetune)."""
    config = tmp_path / "finetune.yaml"
    config.write_text("epochs: 4\nlr: 0.01\nseed: 7\n", encoding="utf-8")
    got = _invoke(received, ["finetune", *REQUIRED["finetune"], "--config", str(config)])
    assert (got["config.epochs"], got["config.lr"], got["config.seed"]) == (4, 0.01, 7)
    assert got["seed_everything"] == 7
    args = ["finetune", *REQUIRED["finetune"], "--config", str(config), "--epochs", "3"]
    got = _invoke(received, args)
    assert (got["config.epochs"], got["config.lr"]) == (3, 0.01)
    config.write_text("epoch: 4\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["finetune", *REQUIRED["finetune"], "--config", str(config)])
    assert res.exit_code == 1 and "Unknown finetune setting(s) epoch" in res.output
