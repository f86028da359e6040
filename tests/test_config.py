"""Settings declared once: each range beside its field (config.Range), one checker."""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from typing import Annotated

import numpy as np
import pytest

from pmpclean.config import FinetuneConfig, Range, check_settings
from pmpclean.errors import ConfigError


@dataclass(frozen=True)
class _Settings:
    n: Annotated[int, Range("int", ge=1)] = 1
    share: Annotated[float, Range(gt=0, le=1, why="a fraction")] = 0.5
    cut: Annotated[float | None, Range(ge=0, lt=1, none=True)] = None
    kind: Annotated[str, Range("choice", choices=("a", "b"))] = "a"
    free: str = "anything"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n": 0}, "n must be an integer >= 1, got 0."),
        ({"n": 1.0}, "n must be an integer >= 1, got 1.0."),
        ({"n": True}, "n must be an integer >= 1, got True."),
        ({"share": 0}, "share must be in (0, 1] (a fraction), got 0."),
        ({"share": float("nan")}, "share must be in (0, 1] (a fraction), got nan."),
        ({"cut": 1.0}, "cut must be in [0, 1) or None, got 1.0."),
        ({"kind": "c"}, "Unknown kind 'c': expected one of a, b."),
    ],
)
def test_check_settings_names_the_setting_its_range_and_the_value(changes, message) -> None:
    with pytest.raises(ConfigError) as err:
        check_settings(_Settings(**changes))
    assert str(err.value) == message


def test_values_at_the_edges_of_a_range_pass() -> None:
    check_settings(_Settings(n=np.int64(1), share=1.0, cut=0.0, kind="b"))
    check_settings(_Settings(cut=None, free=None))  # type: ignore[arg-type]


def test_every_finetune_default_lies_in_its_declared_range() -> None:
    check_settings(FinetuneConfig())
    hints = typing.get_type_hints(FinetuneConfig, include_extras=True)
    declared = {
        f.name for f in fields(FinetuneConfig) if getattr(hints[f.name], "__metadata__", ())
    }
    assert {"epochs", "batch_size", "lr", "ot_mass", "audit_weight", "method"} <= declared
