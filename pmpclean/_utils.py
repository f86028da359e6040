"""Small shared helpers: seeding, device resolution, timers and atomic writes."""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import random
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import ConfigError, DatasetError

__all__ = [
    "to_jsonable",
    "atomic_path",
    "atomic_open",
    "claim_output",
    "check_random_state",
    "finite_rows",
    "resolve_device",
    "seed_everything",
    "Timer",
    "Progress",
]

#: A progress callback, called as ``progress(stage, done, total)``.
Progress = Callable[[str, int, int], None]


def check_random_state(seed: int | np.random.Generator | None) -> np.random.Generator:
    """Return a numpy Generator from ``None``, an int or a Generator (never reseeds globals)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be None, an int or a numpy Generator, not {type(seed).__name__}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch once, at the entry point (CLI or API top level)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.manual_seed(seed)


_DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str = "auto") -> str:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a concrete torch device string.

    ``auto`` picks CUDA when available, then Apple MPS, then CPU. Asking for a device
    that is not present is a :class:`ConfigError` that names the devices that are.
    """
    import torch

    name = device.lower().strip()
    base = name.split(":", 1)[0]
    if base not in _DEVICES:
        raise ConfigError(
            f"Unknown device {device!r}: expected one of {', '.join(_DEVICES)} (or cuda:N)."
        )
    mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if base == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if mps_ok:
            return "mps"
        return "cpu"
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Device {device!r} was requested but CUDA is not available on this machine; "
            "use --device cpu (or auto)."
        )
    if base == "mps" and not mps_ok:
        raise ConfigError(
            f"Device {device!r} was requested but Apple MPS is not available; "
            "use --device cpu (or auto)."
        )
    return name


class Timer:
    """Collect wall-clock seconds per named stage: ``with timer("embed"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.spans: list[tuple[str, float, float]] = []  # (stage, start, end) in time.time()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        wall = time.time()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            self.spans.append((stage, wall, time.time()))


def _new_file_beside(target: Path) -> Path:
    """Create an empty, uniquely named file beside ``target`` and return its path.

    Created with mode 0666 filtered by the process umask, as ``open(path, "w")``
    would: the written file gets the permissions any other tool's output gets
    (0644 under umask 022). ``tempfile.mkstemp`` would force 0600.
    """
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {target}")  # pragma: no cover


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Readers never see a half-written file, and a failed write leaves any previous
    file untouched. The file gets the permissions the umask gives a new file (0644
    under umask 022, 0640 under 027), like any other tool's output.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_file_beside(target)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing and atomically move it onto ``path`` on success."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    missing: list[Path] = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for p in reversed(missing):
        p.mkdir()
    return missing


def _remove_if_empty(created: list[Path]) -> None:
    """Remove the folders a command created (deepest first) while they are empty."""
    for p in created:
        try:
            p.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def _lock(lock_file: Path, target: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file``; fail at once when another process does.

    The kernel releases the lock when its holder dies, so a crashed run leaves at most
    an unlocked file behind, which the next run takes over. The file is removed on
    release; a writer that opened it just before checks it still holds the file at
    that path (else it retries on the new one).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, no protection
        yield
        return
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DatasetError(
                f"{target} is being written by another pmpclean command (it holds the lock "
                f"file {lock_file}); wait for that command to finish, or choose another --out."
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_file))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file after we opened it: lock the new one
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_file.unlink()
        os.close(fd)


@contextlib.contextmanager
def claim_output(path: str | os.PathLike[str], *, folder: bool) -> Iterator[Path]:
    """Make ``path`` ready to be written, before any work, and hold it while writing.

    ``path`` is an output folder (``folder=True``) or an output file. Its folder is
    created when missing, a probe file checks that it is writable, and a lock file
    (``.pmpclean.lock`` in an output folder, ``.<name>.pmpclean.lock`` beside an
    output file) keeps a second pmpclean command from writing the same output at the
    same time. When the block fails, the folders created here are removed again if
    nothing was written into them.

    Raises
    ------
    DatasetError
        The folder cannot be created or written, or another command holds the lock.
    """
    target = Path(path).expanduser()
    where = target if folder else target.parent
    try:
        created = _make_folders(where)
    except OSError as exc:
        raise DatasetError(
            f"Cannot write to output folder {where}: it cannot be created "
            f"({exc.strerror or exc}); pass --out with a writable folder."
        ) from exc
    try:
        try:
            _new_file_beside(where / "pmpclean-write-test").unlink()
        except OSError as exc:
            raise DatasetError(
                f"Cannot write to output folder {where} ({exc.strerror or exc}); "
                "pass --out with a writable folder."
            ) from exc
        lock_name = ".pmpclean.lock" if folder else f".{target.name}.pmpclean.lock"
        with _lock(where / lock_name, target):
            yield target
    except BaseException:
        _remove_if_empty(created)
        raise


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded, restoring the caller's setting afterwards.

    For the small models fitted inside the audit (the label heads, the learned
    transport cost): on thousands of rows and tens of features, several intra-op
    threads synchronise for longer than they compute (the label heads 6x, the cost's
    key-point loss 10-20x slower with 2 threads on a busy 2-core machine).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types: numpy scalars/arrays, paths, dates, NaN -> null."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):  # pandas Timestamp included
        return obj.isoformat()
    return _other_to_jsonable(obj)


def _other_to_jsonable(obj: Any) -> Any:
    """:func:`to_jsonable` of pandas' missing values and containers, 0-d arrays and
    torch scalars; anything else as its ``str``."""
    pd = sys.modules.get("pandas")  # only pandas objects need pandas, and they bring it
    if pd is not None:
        if obj is pd.NA or obj is pd.NaT:
            return None
        if isinstance(obj, pd.Series):
            return to_jsonable(obj.to_list())
        if isinstance(obj, pd.DataFrame):
            return to_jsonable(obj.to_dict("records"))
    if hasattr(obj, "item") and callable(obj.item):  # 0-d arrays, torch scalars
        try:
            return to_jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def finite_rows(x: np.ndarray, *, chunk: int = 1 << 13) -> np.ndarray:
    """Mask (n,) of the rows of a 2-D array whose values are all finite.

    Read ``chunk`` rows at a time: a (10M, 512) memory-mapped array never gets a
    full-size boolean temporary (5 GB).
    """
    out = np.empty(x.shape[0], dtype=bool)
    for lo in range(0, x.shape[0], chunk):
        out[lo : lo + chunk] = np.isfinite(x[lo : lo + chunk]).all(axis=1)
    return out
