"""Where the scan runs: the local engine (default) or a Ray cluster (the ``[ray]`` extra).

The pipeline (:mod:`pmpclean.pipeline`) is the same for every engine; an engine only
replaces *how* five of its stages are executed, so the statistic, the split and the
outputs stay those of the local engine:

* **embed**: the manifest's rows, one task per source shard, encoded by model actors;
  each shard's vectors written to its own file, so a rerun skips finished shards;
* **search**: the approximate neighbour search of :func:`pmpclean.neighbors.knn_search`
  (the score, the planted calibration and the rematch candidates all use it): coarse
  centroids trained on a sample and broadcast, rows routed to their lists, lists
  scanned by tasks, top-k merged;
* **split**: the mixture fitted where the pipeline runs, every row's posterior
  (``match_score`` and flag) computed by the engine from the fitted
  :class:`pmpclean.split.Posterior`;
* **rematch**: the transport of :func:`pmpclean.rematching.calibrated_rematch`,
  partitioned by coarse cell (:mod:`pmpclean.engine._partition`);
* **write**: each source shard's audit written by a worker, beside the usual files.

Engines are activated for a block of code::

    from pmpclean.engine import make_engine, use_engine

    with use_engine(make_engine("ray", address="ray://head:10001")):
        pmpclean.scan("shards/{00000..00999}.tar", out_dir="audit")

Without an active engine (or with ``make_engine("local")``) everything runs here. Ray
is imported only when a Ray engine is made, so ``import pmpclean`` never needs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

from ..errors import ConfigError

__all__ = ["ENGINES", "Engine", "current_engine", "make_engine", "use_engine"]

#: Documented engine names (``--engine``).
ENGINES = ("local", "ray")


class Engine(Protocol):
    """What an engine provides to the pipeline (see the module docstring)."""

    name: str

    def embed(self, manifest: Any, cfg: Any, progress: Any) -> tuple[Any, dict[str, Any]]:
        """Embeddings of every row (as :func:`pmpclean.embedding.embed_manifest`) and info."""
        ...

    def ivf_search(self, q: Any, b: Any, k: int, nprobe: int, seed: int) -> tuple[Any, Any]:
        """The approximate search of :func:`pmpclean.neighbors.knn_search`."""
        ...

    def split_posteriors(self, split: Any, score: Any) -> Any:
        """``split`` (fitted on the driver) with every row's posterior computed here."""
        ...

    def rematch(self, image_emb: Any, text_emb: Any, suspects: Any, **kwargs: Any) -> Any:
        """The transport of :func:`pmpclean.rematching.calibrated_rematch` (the
        signature of :func:`pmpclean.rematching.rematch`)."""
        ...

    def write_shards(self, audit: Any, target: Any) -> tuple[dict[str, str], dict[str, Any]]:
        """Write each source shard's audit; the files written and a summary entry."""
        ...


_ENGINE: ContextVar[Engine | None] = ContextVar("pmpclean_engine", default=None)


def current_engine() -> Engine | None:
    """The engine active in this context, or None for the local engine."""
    return _ENGINE.get()


@contextmanager
def use_engine(engine: Engine | None) -> Iterator[Engine | None]:
    """Run the pipeline's stages on ``engine`` inside the block (None: the local engine)."""
    if engine is None:
        yield None
        return
    from ..neighbors import ivf_backend
    from ..rematching import rematch_backend

    token = _ENGINE.set(engine)
    try:
        with ivf_backend(engine.ivf_search), rematch_backend(engine.rematch):
            yield engine
    finally:
        _ENGINE.reset(token)


def make_engine(
    name: str = "local",
    *,
    address: str | None = None,
    num_cpus: int | None = None,
) -> Engine | None:
    """The engine called ``name``: None for ``"local"``, a connected Ray engine for ``"ray"``.

    Parameters
    ----------
    name : {"local", "ray"}
    address : str, optional
        Ray: the cluster to join (``auto``, ``ray://host:10001``, ``host:6379``). Without
        it a local cluster is started on this machine.
    num_cpus : int, optional
        Ray: CPUs of the local cluster (default: all of this machine's).

    Raises
    ------
    ConfigError
        An unknown engine, ``address`` without ``"ray"``, or Ray not installed.
    """
    if name not in ENGINES:
        raise ConfigError(f"Unknown engine {name!r}: expected one of {', '.join(ENGINES)}.")
    if name == "local":
        if address is not None:
            raise ConfigError(
                "--ray-address needs --engine ray (the local engine runs on this machine)."
            )
        return None
    from ._ray import RayEngine

    return RayEngine(address=address, num_cpus=num_cpus)
