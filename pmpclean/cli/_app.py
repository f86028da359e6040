"""The typer app, its one error translator and the entry point."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Annotated, Any

import typer

from .. import __version__
from ..errors import PmpcleanError
from ._options import EngineName, Format

app = typer.Typer(
    name="pmpclean",
    help=(
        "Audit and clean noisy image-caption datasets.\n\n"
        "Typical session:\n\n"
        "  pmpclean scan data.csv              # score every pair, write data.pmpclean/\n\n"
        "  pmpclean rematch data.csv --out cleaned.csv\n\n"
        "  pmpclean finetune data.pmpclean --out model/   # robust fine-tuning\n\n"
        "Run 'pmpclean COMMAND --help' for the options of each command."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@contextmanager
def on_engine(engine: EngineName, address: str | None) -> Iterator[None]:
    """Run the block's pipeline stages on the chosen engine (pmpclean.engine)."""
    from ..engine import make_engine, use_engine

    with use_engine(make_engine(engine.value, address=address)):
        yield


@contextmanager
def handle_errors(out: Any) -> Iterator[None]:
    """Turn library errors into one red line and exit 1; tracebacks with PMPCLEAN_DEBUG=1."""
    debug = os.environ.get("PMPCLEAN_DEBUG", "") not in ("", "0")
    try:
        yield
    except PmpcleanError as exc:
        if debug:
            raise
        out.error(str(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        if debug:
            raise
        out.error(
            "Interrupted. Embeddings computed so far are cached; run the command again to resume."
        )
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - last line of defence: no raw tracebacks
        if debug:
            raise
        out.error(
            f"Unexpected {type(exc).__name__}: {exc}. This is a bug in pmpclean; "
            "rerun with PMPCLEAN_DEBUG=1 for the traceback and report it."
        )
        raise typer.Exit(1) from None


def make_output(fmt: Format, quiet: bool) -> Any:
    from .._output import Output

    return Output(format=fmt.value, quiet=quiet)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"pmpclean {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Show the version and exit.",
        ),
    ] = False,
) -> None:
    """Audit and clean noisy image-caption datasets."""


@contextmanager
def running(
    output: Any, seed: int, engine: EngineName | None = None, address: str | None = None
) -> Iterator[Any]:
    """Around a command's one library call: seed every generator once with the resolved
    seed, route library warnings to ``output``, run on ``engine`` (none: this process)
    and show progress; yields the progress callback."""
    from .._utils import seed_everything

    seed_everything(seed)
    route_warnings(output)
    with (
        on_engine(engine, address) if engine is not None else nullcontext(),
        output.progress() as progress,
    ):
        yield progress


def route_warnings(output: Any) -> None:
    """Route library warnings (e.g. random weights, remote images) to the output sink."""
    import warnings

    def _show(
        message: Any,
        category: Any,
        filename: str,
        lineno: int,
        file: Any = None,
        line: Any = None,
    ) -> None:
        output.warning(str(message))

    warnings.showwarning = _show  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``pmpclean``); ``argv`` for tests."""
    try:
        app(args=argv, prog_name="pmpclean", standalone_mode=True)
    except SystemExit as exc:
        if argv is not None and exc.code not in (0, None):
            raise
        if argv is None:
            raise
