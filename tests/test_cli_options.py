"""Options generated from the settings' declarations (pmpclean.cli._options).

A toy settings dataclass declares its fields once (type, Range, Help, default); the
typer option of each is generated from that declaration, and the values given on the
command line land in the fields the options name.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from pmpclean.cli import app
from pmpclean.cli._options import (
    Setting,
    SettingOption,
    apply_settings,
    setting,
    settings_given,
)
from pmpclean.config import Help, Range, ScanConfig, declared


@dataclass(frozen=True)
class Part:
    rate: Annotated[
        float, Range(gt=0, le=1), Help("Share moved, {range} [default: {default}].")
    ] = 0.25
    steps: Annotated[int, Range("int", ge=2), Help("Steps.")] = 3
    cache: Annotated[bool, Help("Use the cache.", off="Do not use the cache.")] = True


@dataclass(frozen=True)
class Toy:
    part: Part = field(default_factory=Part)
    name: Annotated[str, Help("A name.")] = "x"


seen: dict[str, Toy] = {}
toy = typer.Typer()


@toy.command()
def run(
    ctx: typer.Context,
    rate: Annotated[float, setting(Part, "rate", "--rate", explain=": try {default}.")] = Part.rate,
    steps: Annotated[int, setting(Part, "steps", "--steps")] = Part.steps,
    no_cache: Annotated[bool, setting(Part, "cache", "--no-cache", negate=True)] = not Part.cache,
    name: Annotated[str, setting(Toy, "name", "--name")] = Toy.name,
    verbose: bool = False,  # not a setting: left out
) -> None:
    seen["cfg"] = apply_settings(Toy(), settings_given(ctx, only_given=False))


def _run(*args: str) -> typer.testing.Result:
    return CliRunner().invoke(toy, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_values_land_in_the_fields_the_options_name() -> None:
    res = _run("--rate", "0.5", "--steps", "4", "--no-cache", "--name", "y")
    assert res.exit_code == 0, res.output
    assert seen["cfg"] == Toy(part=Part(rate=0.5, steps=4, cache=False), name="y")
    assert _run().exit_code == 0 and seen["cfg"] == Toy()


def test_help_and_bounds_come_from_the_declaration() -> None:
    text = " ".join(_run("--help").output.split())
    assert "Share moved, in (0, 1] [default: 0.25]." in text  # {range}, {default}, brackets
    assert "Do not use the cache." in text and "Use the cache." not in text
    assert "[x>=2]" in text  # a closed bound: typer's own range check
    res = _run("--steps", "1")
    assert res.exit_code == 2 and "--steps" in res.output
    res = _run("--rate", "0")  # an open bound: the interval and the explanation
    assert res.exit_code == 2 and "0 is outside (0, 1]: try 0.25." in " ".join(res.output.split())
    assert _run("--rate", "1").exit_code == 0


def test_an_undeclared_option_or_a_lost_setting_is_refused() -> None:
    @dataclass(frozen=True)
    class Bare:
        n: int = 1

    with pytest.raises(TypeError, match="declares no Help"):
        setting(Bare, "n", "--n")
    with pytest.raises(TypeError, match="no section"):
        apply_settings(Toy(), {Setting(Bare, "n"): 2})


def _setting_options(command: typer.models.CommandInfo) -> dict[str, SettingOption]:
    hints = typing.get_type_hints(command.callback, include_extras=True)
    return {
        name: meta
        for name, hint in hints.items()
        for meta in getattr(hint, "__metadata__", ())
        if isinstance(meta, SettingOption)
    }


@pytest.mark.parametrize("command", app.registered_commands, ids=lambda c: c.callback.__name__)
def test_every_setting_option_keeps_its_settings_default(command: typer.models.CommandInfo) -> None:
    """A setting's option defaults to the setting's declared default (negated for a
    --no-... flag); corrupt's options reuse scan's but set no setting."""
    import inspect

    if command.callback.__name__ == "corrupt":
        return
    params = inspect.signature(command.callback).parameters
    for name, option in _setting_options(command).items():
        s = option.setting
        assert declared(s.cls, s.name)[2] is not None
        default = getattr(s.cls, s.name)
        given = params[name].default
        given = getattr(given, "value", given)
        assert given == ((not default) if s.negate else default), (name, given, default)


def test_scan_options_reach_scan_config_sections() -> None:
    """Each scan setting option names a field of ScanConfig or of one of its sections."""
    classes = {ScanConfig} | {
        type(getattr(ScanConfig(), f.name))
        for f in dataclasses.fields(ScanConfig)
        if dataclasses.is_dataclass(getattr(ScanConfig(), f.name))
    }
    scan = next(c for c in app.registered_commands if c.callback.__name__ == "scan")
    for option in _setting_options(scan).values():
        assert option.setting.cls in classes
