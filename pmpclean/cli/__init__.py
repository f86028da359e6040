"""The ``pmpclean`` command line: a thin translator over :mod:`pmpclean.pipeline`.

Each command parses options, builds a config, makes one library call and renders
the result through :class:`pmpclean._output.Output`. Errors of the
:class:`~pmpclean.errors.PmpcleanError` family become one red line and exit code 1
(``_app.handle_errors``, the one translator); usage errors exit 2; ``PMPCLEAN_DEBUG=1`` shows
tracebacks.

Where things live: ``_app`` (the typer app, the error translator, :func:`main`),
``_options`` (options several commands share, and how options become settings), and
one module per command: ``scan``, ``rematch``, ``finetune``, and ``tools`` (``embed``,
``corrupt``). The command modules register themselves on the app when imported, in
the order ``--help`` lists them.
"""

from __future__ import annotations

import sys

from ._app import app, main

# The commands register in import order, the order --help lists them.
# isort: off
from . import scan, rematch, tools, finetune  # noqa: F401
# isort: on

__all__ = ["app", "main"]


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
