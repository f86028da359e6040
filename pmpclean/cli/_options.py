"""The options several commands share, and how options become settings.

An option that sets a setting is declared once, beside the setting's field in
:mod:`pmpclean.config`: its help (:class:`~pmpclean.config.Help`), its bounds
(:class:`~pmpclean.config.Range`) and its default. :func:`setting` turns that
declaration into the typer option; a command writes
``k: Annotated[int, setting(AuditConfig, "k", "--k")] = AuditConfig.k`` and
:func:`settings_given` reads back which setting each option sets.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing
from pathlib import Path, PurePath
from typing import Annotated, Any

import typer
from typer.models import OptionInfo

from ..config import (
    AuditConfig,
    DataConfig,
    EmbedConfig,
    Range,
    ScanConfig,
    declared,
    load_config,
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """The field ``cls.name`` of a settings dataclass that an option sets; ``negate``
    for a flag that turns it off (``--no-cache`` sets ``use_cache`` to False)."""

    cls: type
    name: str
    negate: bool = False


class SettingOption(OptionInfo):
    """A typer option that knows the :class:`Setting` it sets."""

    def __init__(self, info: OptionInfo, setting: Setting) -> None:
        self.__dict__.update(vars(info))
        self.setting = setting


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting(
    cls: type, name: str, *decls: str, negate: bool = False, explain: str = "", **shown: Any
) -> Any:
    """The typer option of the setting ``cls.name``, generated from its declaration.

    Its help is the field's :class:`~pmpclean.config.Help` (``off`` with ``negate``),
    with ``{range}`` and ``{default}`` filled in. Closed bounds become typer's
    ``min``/``max`` (shown in the help); an open bound (``(0, 1]``) becomes a check
    whose usage error reads ``<value> is outside <interval><explain>`` (``{default}``
    filled in). ``shown``: how the option looks (metavar, rich_help_panel, ...).
    """
    _, spec, text = declared(cls, name)
    if text is None:
        raise TypeError(f"{cls.__name__}.{name} declares no Help for its option")
    default = getattr(cls, name)
    words = text.off if negate else text.text
    interval = spec.interval() if spec is not None else None
    words = words.replace("{range}", f"in {interval}").replace("{default}", _shown(default))
    checks: dict[str, Any] = {}
    if spec is not None and spec.kind in ("int", "num"):
        if spec.gt is not None or spec.lt is not None:
            checks["callback"] = _range_check(
                spec, name, explain.replace("{default}", _shown(default))
            )
        else:
            cast = int if spec.kind == "int" else float
            if spec.ge is not None:
                checks["min"] = cast(spec.ge)
            if spec.le is not None:
                checks["max"] = cast(spec.le)
    # rich markup reads [...] as a style: the declaration's brackets are text
    info = typer.Option(*decls, help=words.replace("[", "\\["), **checks, **shown)
    return SettingOption(info, Setting(cls, name, negate))


def _range_check(spec: Range, name: str, explain: str) -> Any:
    def check(value: Any) -> Any:
        if spec.allows(value):  # refuses NaN too
            return value
        interval = spec.interval()
        if interval is None:  # bounded on one side: the library's words
            raise typer.BadParameter(spec.message(name, value))
        raise typer.BadParameter(f"{value:g} is outside {interval}{explain}")

    return check


def choices(cls: type, name: str) -> Any:
    """The str Enum of the choices declared for ``cls.name`` (typer shows and checks them)."""
    spec = declared(cls, name)[1]
    if spec is None or not spec.choices:
        raise TypeError(f"{cls.__name__}.{name} declares no choices")
    title = "".join(part.title() for part in name.split("_"))
    return enum.Enum(title, [(c, c) for c in spec.choices], type=str)  # type: ignore[misc]


def bounds(cls: type, name: str) -> dict[str, Any]:
    """typer's ``min``/``max`` of the closed bounds declared for ``cls.name``, for an
    option that is not itself the setting (rematch's --min-confidence)."""
    spec = declared(cls, name)[1]
    if spec is None or spec.ge is None or spec.le is None:
        raise TypeError(f"{cls.__name__}.{name} declares no closed interval")
    return {"min": float(spec.ge), "max": float(spec.le)}


class Format(str, enum.Enum):
    human = "human"
    json = "json"


class Policy(str, enum.Enum):
    rematch = "rematch"
    drop = "drop"
    flag = "flag"


class OutFormat(str, enum.Enum):
    table = "table"
    webdataset = "webdataset"
    files = "files"
    uids = "uids"


class Pair(str, enum.Enum):
    b32 = "b32"
    l14 = "l14"


class EngineName(str, enum.Enum):
    local = "local"
    ray = "ray"


Cost = choices(AuditConfig, "cost")


class NoiseMode(str, enum.Enum):
    """The modes of :data:`pmpclean.noise.NOISE_MODES` (tested to match)."""

    shuffle = "shuffle"
    hard = "hard"
    mixed = "mixed"


# ---------------------------------------------------------------- shared options

Manifest = Annotated[
    Path,
    typer.Argument(
        help=(
            "Dataset: a manifest (.csv .tsv .parquet .jsonl, one image-caption pair per row), "
            "an img2dataset output folder or shards ('data/{00000..00123}.tar'), Hugging Face "
            "Parquet with image bytes, or an imagefolder with metadata.csv."
        ),
        show_default=False,
    ),
]
FormatOpt = Annotated[
    Format,
    typer.Option("--format", help="human: tables for people; json: one JSON document on stdout."),
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="Print nothing but errors (and JSON with --format json)."),
]
ImageCol = Annotated[str, setting(DataConfig, "image_col", "--image-col")]
TextCol = Annotated[str, setting(DataConfig, "text_col", "--text-col")]
IdCol = Annotated[str | None, setting(DataConfig, "id_col", "--id-col")]
RootOpt = Annotated[Path | None, setting(DataConfig, "root", "--root")]
LabelCol = Annotated[str | None, setting(DataConfig, "label_col", "--label-col")]
ModelOpt = Annotated[str, setting(EmbedConfig, "model", "--model")]
PretrainedOpt = Annotated[str, setting(EmbedConfig, "pretrained", "--pretrained")]
EmbeddingsOpt = Annotated[Path | None, setting(EmbedConfig, "embeddings", "--embeddings")]
PairOpt = Annotated[Pair, setting(EmbedConfig, "embeddings_pair", "--embeddings-pair")]
DeviceOpt = Annotated[str, setting(EmbedConfig, "device", "--device")]
BatchOpt = Annotated[int, setting(EmbedConfig, "batch_size", "--batch-size")]
WorkersOpt = Annotated[int, setting(EmbedConfig, "workers", "--workers")]
CacheDirOpt = Annotated[Path | None, setting(EmbedConfig, "cache_dir", "--cache-dir")]
NoCacheOpt = Annotated[bool, setting(EmbedConfig, "use_cache", "--no-cache", negate=True)]
SeedOpt = Annotated[int, setting(ScanConfig, "seed", "--seed")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace output files that already exist.")]
EngineOpt = Annotated[
    EngineName,
    typer.Option(
        "--engine",
        help=(
            "Where the work runs: local (this machine), or ray (a Ray cluster: pip install "
            "'pmpclean\\[ray]'). Same results."
        ),
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help=(
            "With --engine ray: the cluster to join (ray://head:10001, or auto on a cluster "
            "node) \\[default: start a local cluster]."
        ),
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help=(
            "Settings file (config.yaml of an earlier scan). Options given on the command line win."
        ),
    ),
]


def _explicit(ctx: typer.Context, name: str) -> bool:
    """True when the option was given on the command line (not a default).

    Compared by name: typer may bundle its own click, whose ``ParameterSource`` enum is
    not the one of an installed ``click`` package.
    """
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def settings_given(ctx: typer.Context, *, only_given: bool) -> dict[Setting, Any]:
    """The value of each setting the running command's options set (all of them, or
    with ``only_given`` those given on the command line), read from the
    :class:`SettingOption` of each parameter: no table of names to keep in step."""
    command = inspect.unwrap(ctx.command.callback)  # type: ignore[arg-type]
    hints = typing.get_type_hints(command, include_extras=True)
    out: dict[Setting, Any] = {}
    for param, value in ctx.params.items():
        option = next(
            (
                m
                for m in getattr(hints.get(param), "__metadata__", ())
                if isinstance(m, SettingOption)
            ),
            None,
        )
        if option is None or (only_given and not _explicit(ctx, param)):
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, PurePath):
            value = str(value)
        out[option.setting] = (not value) if option.setting.negate else value
    return out


def apply_settings(cfg: Any, changes: dict[Setting, Any]) -> Any:
    """``cfg`` (a settings dataclass) with ``changes``: each to the field it names, in
    ``cfg`` itself or in the section of ``cfg`` of that class."""
    top: dict[str, Any] = {s.name: v for s, v in changes.items() if s.cls is type(cfg)}
    placed = set(top)
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        mine = {s.name: v for s, v in changes.items() if s.cls is type(part)}
        if mine:
            top[section.name] = dataclasses.replace(part, **mine)
            placed |= {f"{section.name}.{n}" for n in mine}
    if len(placed) != len(changes):
        lost = [f"{s.cls.__name__}.{s.name}" for s in changes]
        raise TypeError(f"{type(cfg).__name__} has no section for {lost}")
    return dataclasses.replace(cfg, **top) if top else cfg


def build_scan_config(
    ctx: typer.Context, config_file: Path | None, *, base: ScanConfig | None = None
) -> ScanConfig:
    """The ScanConfig of the running command's options.

    Defaults < ``base`` (rematch: the settings of the scan it applies) < --config
    file < options given on the command line. Without a base or a config file every
    option is applied, given or defaulted.
    """
    if config_file is not None:
        cfg = load_config(config_file, base=base)
    else:
        cfg = base or ScanConfig()
    only_given = config_file is not None or base is not None
    return apply_settings(cfg, settings_given(ctx, only_given=only_given))  # type: ignore[no-any-return]
