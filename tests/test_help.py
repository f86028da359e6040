"""Every command's --help reads at 80 columns and says what the validation enforces."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pmpclean.cli import app

runner = CliRunner()
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def _help(*args: str, width: int = 80) -> str:
    res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": str(width), "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return res.output


def _command(name: str) -> Any:
    group = typer.main.get_command(app)
    return group.commands[name]  # type: ignore[attr-defined]


def test_every_command_is_covered() -> None:
    assert {"scan", "rematch", "finetune", "embed", "corrupt"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_fits_80_columns_without_truncated_names(name: str) -> None:
    text = _help(name)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "…" not in text  # rich shortens what does not fit with an ellipsis
    for param in _command(name).params:
        for opt in param.opts:
            if opt.startswith("-"):
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), opt


def test_top_level_help_recommends_finetuning_the_scan_folder() -> None:
    text = " ".join(_help().split())
    assert "pmpclean finetune data.pmpclean --out model/" in text
    assert "finetune cleaned.csv" not in text
    assert "…" not in text


def test_ranges_in_help_match_the_validation() -> None:
    """--threshold is open at both ends, --mass at 0: the help says so, the CLI refuses the
    ends with a usage error (exit 2) that names the range, and the library agrees."""
    from pmpclean import ScanConfig
    from pmpclean.errors import ConfigError
    from pmpclean.pipeline import _validate_audit_config

    scan = " ".join(_help("scan", width=200).split())
    assert "flags a pair, in (0, 1) " in scan and "moves, in (0, 1]" in scan
    for option, bad, good in (("--threshold", ("0", "1"), "0.5"), ("--mass", ("0", "1.5"), "1")):
        for value in bad:
            res = runner.invoke(app, ["scan", "x.csv", option, value])
            rng = "(0, 1)" if option == "--threshold" else "(0, 1]"
            assert res.exit_code == 2 and f"outside {rng}" in " ".join(res.output.split())
            key = "audit__threshold" if option == "--threshold" else "audit__mass"
            with pytest.raises(ConfigError, match=re.escape(rng)):
                _validate_audit_config(ScanConfig().replace(**{key: float(value)}))
        res = runner.invoke(app, ["scan", "x.csv", option, good])
        assert res.exit_code == 1  # past the option check: the manifest x.csv is missing


def test_corrupt_mode_is_a_choice() -> None:
    from pmpclean.noise import NOISE_MODES

    text = " ".join(_help("corrupt", width=200).split())
    assert "--mode [shuffle|hard|mixed]" in text or "--mode <shuffle|hard|mixed>" in text
    assert tuple(NOISE_MODES) == ("shuffle", "hard", "mixed")
    res = runner.invoke(app, ["corrupt", "x.csv", "--out", "y.csv", "--mode", "typo"])
    assert res.exit_code == 2 and "shuffle" in res.output
