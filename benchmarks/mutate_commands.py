"""Mutation testing of the typer commands in ``pmpclean/cli/``, which mutmut skips.

mutmut 3 never mutates decorated functions, and every command of ``cli/`` is one
(``@app.command()``): the glue where an option is handed to the library. This script
plants the faults that glue is prone to, one at a time, in a scratch copy of the
repository, and runs the CLI tests against each:

* ``drop``: a keyword argument of a call in a command body is removed (the library
  then uses its own default, or fails);
* ``swap``: two neighbouring keyword arguments of one call exchange their values
  (``lock_image=lock_text, lock_text=lock_image``);
* ``default``: an option's default changes (a flag flips, a number moves, a string or
  enum member changes).

A mutant is killed when the tests fail. Usage (from the repository root)::

    nice -n 10 python benchmarks/mutate_commands.py --sample 80 --seed 0

prints one line per mutant and the totals; ``--sample 0`` runs every mutant.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "pmpclean" / "cli"  # the command modules: cli/*.py
TESTS = ["tests/test_options.py", "tests/test_cli.py"]


def _is_command(node: ast.FunctionDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "command":
            return True
    return False


def _offsets(source: str) -> list[int]:
    starts, pos = [], 0
    for line in source.splitlines(keepends=True):
        starts.append(pos)
        pos += len(line)
    return starts


def _span(node: ast.AST, starts: list[int]) -> tuple[int, int]:
    return (
        starts[node.lineno - 1] + node.col_offset,  # type: ignore[attr-defined]
        starts[node.end_lineno - 1] + node.end_col_offset,  # type: ignore[attr-defined]
    )


def _changed_default(node: ast.expr) -> str | None:
    """Another value for a literal default (None and enum members are left alone)."""
    if not isinstance(node, ast.Constant):
        return None
    v = node.value
    if isinstance(v, bool):
        return str(not v)
    if isinstance(v, int):
        return str(v + 1)
    if isinstance(v, float):
        return repr(v / 2 if v else 0.5)
    if isinstance(v, str):
        return repr(v + "_x")
    return None


def mutants(source: str) -> list[tuple[str, int, int, str]]:
    """(description, start, end, replacement) for every planted fault."""
    tree = ast.parse(source)
    starts = _offsets(source)
    out: list[tuple[str, int, int, str]] = []
    for fn in tree.body:
        if not (isinstance(fn, ast.FunctionDef) and _is_command(fn)):
            continue
        for arg, default in zip(
            fn.args.args[len(fn.args.args) - len(fn.args.defaults) :], fn.args.defaults, strict=True
        ):
            new = _changed_default(default)
            if new is not None:
                a, b = _span(default, starts)
                out.append((f"{fn.name}: default of {arg.arg} -> {new}", a, b, new))
        for call in ast.walk(ast.Module(body=fn.body, type_ignores=[])):
            if not isinstance(call, ast.Call):
                continue
            kws = [k for k in call.keywords if k.arg is not None]
            for i, kw in enumerate(kws):
                a, _ = _span(kw, starts)
                # through the comma after it: the next keyword's start, or the call's end
                if i + 1 < len(kws):
                    b = _span(kws[i + 1], starts)[0]
                else:
                    b = _span(kw, starts)[1]
                    rest = source[b : _span(call, starts)[1]]
                    b += len(rest) - len(rest.lstrip(", \n"))
                out.append((f"{fn.name}: drop {kw.arg}= (line {kw.lineno})", a, b, ""))
            for left, right in zip(kws, kws[1:], strict=False):
                la, lb = _span(left.value, starts)
                ra, rb = _span(right.value, starts)
                lt, rt = source[la:lb], source[ra:rb]
                if lt == rt:
                    continue
                swapped = rt + source[lb:ra] + lt
                desc = f"{fn.name}: swap {left.arg}= and {right.arg}= (line {left.lineno})"
                out.append((desc, la, rb, swapped))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=0, help="mutants to run (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    sources = {p.name: p.read_text(encoding="utf-8") for p in sorted(CLI.glob("*.py"))}
    found = [
        (name, f"{name}: {desc}", a, b, new)
        for name, source in sources.items()
        for desc, a, b, new in mutants(source)
    ]
    chosen = list(enumerate(found))
    if args.sample and args.sample < len(chosen):
        chosen = sorted(random.Random(args.seed).sample(chosen, args.sample))
    print(f"{len(found)} mutants of the command bodies; running {len(chosen)}", flush=True)
    start = time.time()
    survived: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pmpclean-mutate-") as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "pmpclean", work / "pmpclean")
        shutil.copytree(ROOT / "tests", work / "tests")
        shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
        env = {**os.environ, "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1"}
        for index, (name, desc, a, b, new) in chosen:
            source = sources[name]
            target = work / "pmpclean" / "cli" / name
            mutated = source[:a] + new + source[b:]
            try:
                ast.parse(mutated)
            except SyntaxError:
                print(f"  [{index}] invalid, skipped: {desc}")
                continue
            target.write_text(mutated, encoding="utf-8")
            res = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            target.write_text(source, encoding="utf-8")
            verdict = "killed" if res.returncode != 0 else "SURVIVED"
            if res.returncode == 0:
                survived.append(desc)
            print(f"  [{index}] {verdict}: {desc}", flush=True)
    ran = len(chosen)
    print(
        f"ran {ran}, killed {ran - len(survived)}, survived {len(survived)}, "
        f"{time.time() - start:.0f} s"
    )
    for desc in survived:
        print(f"  survivor: {desc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
