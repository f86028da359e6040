"""The Ray engine: embed, search and write of the scan on a Ray cluster (``pip install
'pmpclean[ray]'``).

What runs where (``pmpclean.engine`` describes the contract):

* **embed**: one Ray Data row per source shard (img2dataset's ``shard`` column, else
  blocks of :data:`PART_ROWS` rows), encoded in ``map_batches`` by actors that each hold
  the open_clip model. An actor takes one GPU where the cluster has GPUs and a *fraction*
  of a CPU otherwise: actors holding every CPU starve Ray Data's own tasks and the job
  hangs (ray-project/ray#44687). Each shard's vectors are written by its actor to
  ``<cache>/ray-shards/<shard>-<key>.npz``, the key hashing the model weights and the
  shard's images (path, size, mtime) and captions, so a rerun skips finished shards.
* **search**: the inverted-file search of :func:`pmpclean.neighbors.knn_search`,
  distributed: the spherical k-means centroids are trained on the driver on the same
  seeded sample as the local engine and broadcast through the object store, tasks route
  blocks of base rows to their lists and probe blocks of queries, the (list, query)
  pairs are dealt to tasks by cost, each task scans its lists against the queries that
  visit them, and the driver merges each query's top-k. Same lists, same candidates,
  same exact similarities as the local engine; only ties may order differently.
* **split**: the calibration and the mixture fitted on the driver (on the gathered score
  column and the planted pairs' scores); the fitted :class:`pmpclean.split.Posterior`
  broadcast and every row's ``match_score`` and flag computed in ``map_batches``.
* **rematch**: the suspects partitioned by the coarse cell of their image, their
  candidate captions by the cell of their text (:mod:`pmpclean.engine._partition`), the
  learned cost fitted once on a sample of the suspects on the driver, one partial-OT
  task per cell with that cost, the proposals merged (they never collide: a caption
  belongs to one cell).
* **write**: each shard's audit rows written by a task to ``audit_shards/<shard>.parquet``.

Failed tasks and actors are retried by Ray (a worker process killed mid-job reruns its
shard or its lists), and every result is keyed by rows, so a retry neither loses nor
duplicates a row.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, EmbeddingError, EngineError, PmpcleanError

__all__ = ["RayEngine", "PART_ROWS", "shard_keys"]

#: Rows per partition of a manifest that has no source shards (img2dataset's default
#: shard size).
PART_ROWS = 10_000
#: CPUs each model actor takes on a machine without GPUs (ray-project/ray#44687).
ACTOR_CPUS = 0.5
#: Base or query rows per routing task of the search.
ROUTE_ROWS = 1 << 17
#: Search tasks per CPU of the cluster (lists dealt by cost; more tasks balance better
#: and make a retried task cheaper).
TASKS_PER_CPU = 2
#: Rows per block of the split's posterior pass.
POSTERIOR_ROWS = 1 << 18


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "--engine ray needs Ray: pip install 'pmpclean[ray]' (or run without --engine)."
        ) from exc
    return ray


def shard_keys(frame: pd.DataFrame) -> np.ndarray:
    """The source shard of each row: the ``shard`` column of img2dataset sources (see
    :mod:`pmpclean.sources`), else ``part-NNNNN`` for blocks of :data:`PART_ROWS` rows."""
    if "shard" in frame.columns:
        return frame["shard"].fillna("").astype(str).to_numpy(dtype=object)
    part = np.arange(len(frame)) // PART_ROWS
    return np.array([f"part-{p:05d}" for p in part], dtype=object)


def _shard_groups(frame: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """(shard, its rows) in first-seen order."""
    keys = shard_keys(frame)
    codes, names = pd.factorize(pd.Series(keys, dtype=object))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    return [(str(names[i]), order[bounds[i] : bounds[i + 1]]) for i in range(len(names))]


def _file_name(shard: str) -> str:
    """A file name for a shard name (``sub/00000.tar`` → ``sub_00000``)."""
    stem = re.sub(r"\.(tar|parquet)$", "", shard)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "shard"


def _sub_manifest(manifest: Any, rows: np.ndarray) -> Any:
    """The rows of ``manifest`` as a manifest of their own (what an embedding actor needs)."""
    from ..data import Manifest

    index = np.asarray(manifest.image_index)[rows]
    used = np.unique(index[index >= 0])
    new_index = np.where(index >= 0, np.searchsorted(used, np.maximum(index, 0)), -1)
    sources = None
    if manifest.image_sources is not None:
        sources = [manifest.image_sources[i] for i in used]
    return Manifest(
        path=None,
        frame=pd.DataFrame(index=pd.RangeIndex(rows.size)),
        image_col=manifest.image_col,
        text_col=manifest.text_col,
        id_col=None,
        label_col=None,
        image_refs=np.asarray(manifest.image_refs, dtype=object)[rows],
        image_index=new_index.astype(np.int64),
        unique_images=[manifest.unique_images[i] for i in used],
        captions=np.asarray(manifest.captions, dtype=object)[rows],
        status=np.asarray(manifest.status, dtype=object)[rows].copy(),
        image_sources=sources,
    )


def _shard_key(sub: Any, weights: str) -> str:
    """Hash of what a shard's vectors depend on: the weights and every row's image and caption."""
    from ..data import image_fingerprint

    h = hashlib.sha256(weights.encode())
    for i in range(len(sub.unique_images)):
        try:
            h.update(image_fingerprint(sub.image_source(i)).encode())
        except Exception:  # noqa: BLE001 - a vanished image: the actor marks its rows
            h.update(b"missing")
    h.update(np.asarray(sub.image_index, dtype=np.int64).tobytes())
    for caption, status in zip(sub.captions, sub.status, strict=True):
        h.update(f"\0{caption}\0{status}".encode())
    return h.hexdigest()[:16]


def _maybe_fail(marker: str | None) -> None:
    """Fault injection for tests: the first worker to see ``marker`` removes it and dies."""
    if marker is None:
        return
    try:
        os.remove(marker)
    except FileNotFoundError:
        return
    os._exit(1)  # a killed worker process, not an exception: Ray must retry the work


class _ShardEmbedder:
    """A Ray Data actor holding the model; encodes whole shards and writes their files."""

    def __init__(
        self, model: str, pretrained: str, device: str, batch_size: int, fault: str | None
    ) -> None:
        import warnings

        from ..embedding import load_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights: the driver warns once
            self.loaded = load_model(model, pretrained, device=device)
        self.batch_size = batch_size
        self.fault = fault

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .._utils import atomic_path
        from ..embedding import embed_manifest

        images, texts = [], []
        for payload, file in zip(batch["payload"], batch["file"], strict=True):
            _maybe_fail(self.fault)
            rows, sub = pickle.loads(payload)
            emb = embed_manifest(
                sub, loaded=self.loaded, batch_size=self.batch_size, workers=0, use_cache=False
            )
            with atomic_path(file) as tmp, open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    rows=rows,
                    image=emb.image,
                    text=emb.text,
                    status=np.asarray(sub.status, dtype=str),
                )
            images.append(emb.n_model_images)
            texts.append(emb.n_model_texts)
        return {"shard": batch["shard"], "images": np.array(images), "texts": np.array(texts)}


def _nearest(x: np.ndarray, lo: int, hi: int, cent: np.ndarray, k: int) -> np.ndarray:
    """Routing: the ``k`` nearest centroids of rows ``lo:hi`` of ``x`` (nearest first)."""
    import faiss

    _, lab = faiss.knn(np.ascontiguousarray(x[lo:hi]), cent, k, metric=faiss.METRIC_INNER_PRODUCT)
    return lab


def _scan_task(
    q: np.ndarray,
    b: np.ndarray,
    q_rows: np.ndarray,
    q_bounds: np.ndarray,
    members: np.ndarray,
    b_bounds: np.ndarray,
    k: int,
    fault: str | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan a group of lists: list ``j``'s queries are ``q_rows[q_bounds[j]:q_bounds[j+1]]``
    and its rows ``members[b_bounds[j]:b_bounds[j+1]]``. Returns the queries touched and
    their top-k (similarities, base rows) over these lists."""
    from ..neighbors import _scan_lists

    _maybe_fail(fault)
    touched = np.unique(q_rows)
    local = np.searchsorted(touched, q_rows)
    sims = np.full((touched.size, k), -np.inf, dtype=np.float32)
    idx = np.full((touched.size, k), -1, dtype=np.int64)
    qc = np.ascontiguousarray(q[touched])
    _scan_lists(
        list(range(q_bounds.size - 1)), qc, b, local, q_bounds, members, b_bounds, sims, idx, False
    )
    return touched, sims, idx


def _posteriors(batch: dict[str, np.ndarray], posterior: Any) -> dict[str, np.ndarray]:
    """``map_batches``: the fitted split's ``match_score`` and flag of a block of rows."""
    match, flagged = posterior(batch["score"])
    return {"row": batch["row"], "match": match, "flagged": flagged}


def _rematch_part(
    img: np.ndarray,
    txt: np.ndarray,
    part: Any,
    ig: np.ndarray,
    tg: np.ndarray,
    valid: np.ndarray,
    model: Any,
    settings: dict[str, Any],
    fault: str | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One cell's partial transport (``propose_captions`` on the part's rows); part-row results."""
    import warnings

    from ..rematching import propose_captions

    _maybe_fail(fault)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the driver's merged info says what matters
        rm = propose_captions(
            img,
            txt,
            part.suspects,
            image_group=ig,
            text_group=tg,
            valid=valid,
            captions=part.captions,
            cost_model=model,
            min_confidence=0.0,
            **settings,
        )
    keep = ("n_edges", "iterations", "converged", "reason")
    return rm.candidate_row, rm.candidate_confidence, {k: rm.info[k] for k in keep if k in rm.info}


def _write_shard(frame: pd.DataFrame, path: str) -> str:
    from .._utils import atomic_path
    from ..pipeline import _to_parquet

    with atomic_path(path) as tmp:
        _to_parquet(frame, tmp)
    return path


def _concat_slices(order: np.ndarray, bounds: np.ndarray, lists: list[int]) -> tuple[Any, Any]:
    """``order``'s entries of each list in ``lists``, concatenated, with their bounds."""
    parts = [order[bounds[c] : bounds[c + 1]] for c in lists]
    sizes = np.array([p.size for p in parts], dtype=np.int64)
    return np.concatenate(parts), np.concatenate([[0], np.cumsum(sizes)])


@contextmanager
def _on_cluster(stage: str) -> Iterator[None]:
    """A stage's failure on the cluster (after Ray's retries) as one pmpclean error.

    A pmpclean error raised by a worker (an image it cannot read as configured, ...) is
    re-raised with its own message; anything else becomes an :class:`EngineError`.
    """
    try:
        yield
    except PmpcleanError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in its own types
        seen: set[int] = set()
        cause: BaseException | None = exc
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, PmpcleanError):
                raise type(cause)(str(cause).splitlines()[-1]) from None
            cause = getattr(cause, "cause", None) or cause.__cause__
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise EngineError(
            f"The {stage} stage failed on the Ray cluster after Ray's retries: "
            f"{type(exc).__name__}: {first}. The workers' logs are under the cluster's "
            "session folder (/tmp/ray/session_latest/logs); rerun to resume (finished shards "
            "are kept), or run with --engine local."
        ) from exc


class RayEngine:
    """Runs the scan's embed, search and write stages on a Ray cluster.

    Parameters
    ----------
    address : str, optional
        The cluster to join (``ray.init(address=...)``); None starts a local cluster
        without the dashboard (or uses the one already running in this process).
    num_cpus : int, optional
        CPUs of a local cluster (default: the machine's).
    fault : str, optional
        Tests only: a marker file; the first embedding actor, search task or rematch
        task that finds it deletes it and kills its own process, so that Ray's retries
        are exercised.
    part_suspects : int, optional
        Suspects per rematch part (default :data:`~pmpclean.engine._partition.PART_SUSPECTS`);
        with fewer suspects the rematch is one problem, as on the local engine.
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        fault: str | None = None,
        part_suspects: int | None = None,
    ) -> None:
        from ._partition import PART_SUSPECTS

        ray = _import_ray()
        self.address = address
        self.fault = fault
        self.part_suspects = int(part_suspects or PART_SUSPECTS)
        #: The last partitioned rematch's suspect rows and the cells of their images
        #: and captions (diagnostics: which true captions lay in another cell).
        self.last_rematch_cells: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if not ray.is_initialized():
            try:
                if address is None:
                    ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
                else:
                    ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                raise ConfigError(
                    f"Cannot start or join {where}: {exc}. Check --ray-address (e.g. "
                    "ray://head:10001, or 'auto' on a cluster node), or leave it out to "
                    "start a local cluster."
                ) from exc
        # pmpclean's own progress callback reports; Ray Data's bars and logs would
        # interleave with it (and with --format json on stdout)
        data_ctx = ray.data.DataContext.get_current()
        data_ctx.enable_progress_bars = False
        data_ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        res = ray.cluster_resources()
        self.cpus = max(1, int(res.get("CPU", 1)))
        self.gpus = int(res.get("GPU", 0))
        self._ray = ray

    def info(self) -> dict[str, Any]:
        return {"name": "ray", "address": self.address, "cpus": self.cpus, "gpus": self.gpus}

    # ----------------------------------------------------------------- embed

    def embed(self, manifest: Any, cfg: Any, progress: Any) -> tuple[Any, dict[str, Any]]:
        """Embed every row, one Ray Data row per source shard; returns what the local
        engine's embedding stage returns (row-aligned embeddings and their info)."""
        from ..embedding import (
            Embeddings,
            _resolve_precision,
            _resolve_spec,
            default_cache_dir,
        )

        e = cfg.embed
        if int(e.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {e.batch_size}.")
        spec = _resolve_spec(e.model, e.pretrained)  # validate before any work
        if e.device == "auto":
            device = "cuda" if self.gpus else "cpu"
        else:
            device = e.device
        precision = _resolve_precision(device, None)
        weights = f"{spec.model_name}|{spec.fingerprint}|{precision}"
        if e.use_cache:
            base = Path(e.cache_dir).expanduser() if e.cache_dir else default_cache_dir()
            folder = base / "ray-shards"
            scratch = None
        else:
            scratch = tempfile.TemporaryDirectory(prefix="pmpclean-ray-")
            folder = Path(scratch.name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddingError(
                f"Cannot create the shard embedding folder {folder}: {exc.strerror or exc}; "
                "give a writable --cache-dir."
            ) from exc
        try:
            return self._embed(manifest, folder, weights, device, e, Embeddings, progress)
        finally:
            if scratch is not None:
                scratch.cleanup()

    def _embed(
        self,
        manifest: Any,
        folder: Path,
        weights: str,
        device: str,
        e: Any,
        embeddings_cls: Any,
        progress: Any,
    ) -> tuple[Any, dict[str, Any]]:
        shards = []
        for name, rows in _shard_groups(manifest.frame):
            sub = _sub_manifest(manifest, rows)
            path = folder / f"{_file_name(name)}-{_shard_key(sub, weights)}.npz"
            shards.append((name, rows, sub, path))
        todo = [s for s in shards if not s[3].exists()]
        n_images = n_texts = 0
        if todo:
            n_images, n_texts = self._embed_shards(todo, device, e, progress, len(shards))
        n = len(manifest)
        status = np.asarray(manifest.status, dtype=object)
        image = text = None
        for _name, rows, _sub, path in shards:
            with np.load(path) as z:
                if not np.array_equal(z["rows"], rows):
                    raise EmbeddingError(f"{path} holds other rows; delete it and run again.")
                if image is None:
                    image = np.full((n, z["image"].shape[1]), np.nan, dtype=np.float32)
                    text = np.full((n, z["text"].shape[1]), np.nan, dtype=np.float32)
                image[rows] = z["image"]
                text[rows] = z["text"]
                status[rows] = z["status"].astype(object)
        manifest.status = status  # as the local engine, unreadable images mark their rows
        assert image is not None and text is not None
        emb = embeddings_cls(
            image=image,
            text=text,
            source=f"model:{e.model}/{e.pretrained}",
            n_model_images=n_images,
            n_model_texts=n_texts,
        )
        info = {
            "source": emb.source,
            "model": e.model,
            "pretrained": e.pretrained,
            "device": device,
            "images_through_model": n_images,
            "captions_through_model": n_texts,
            "engine": "ray",
            "shards": len(shards),
            "shards_embedded": len(todo),
            "shard_folder": str(folder),
        }
        return emb, info

    def _embed_shards(
        self, todo: list[Any], device: str, e: Any, progress: Any, total: int
    ) -> tuple[int, int]:
        ray = self._ray
        items = [
            {"shard": name, "file": str(path), "payload": pickle.dumps((rows, sub))}
            for name, rows, sub, path in todo
        ]
        if device.startswith("cuda"):
            actors, resources = max(1, min(self.gpus, len(todo))), {"num_gpus": 1}
        else:
            # fractional CPUs: Ray Data's read and bookkeeping tasks keep the rest
            n_act = max(1, min(len(todo), int(self.cpus // 2) or 1))
            actors, resources = n_act, {"num_cpus": ACTOR_CPUS}
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ShardEmbedder,
            fn_constructor_kwargs={
                "model": e.model,
                "pretrained": e.pretrained,
                "device": device,
                "batch_size": int(e.batch_size),
                "fault": self.fault,
            },
            batch_size=1,
            concurrency=actors,
            **resources,
        )
        n_images = n_texts = 0
        done = total - len(todo)
        if progress:
            progress("Embedding shards", done, total)
        with _on_cluster("embed"):
            for row in ds.iter_rows():
                n_images += int(row["images"])
                n_texts += int(row["texts"])
                done += 1
                if progress:
                    progress("Embedding shards", done, total)
        return n_images, n_texts

    # ----------------------------------------------------------------- search

    def ivf_search(
        self, q: np.ndarray, b: np.ndarray, k: int, nprobe: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The inverted-file search of :func:`pmpclean.neighbors.knn_search` on the cluster."""
        with _on_cluster("neighbour search"):
            return self._ivf_search(q, b, k, nprobe, seed)

    def _ivf_search(
        self, q: np.ndarray, b: np.ndarray, k: int, nprobe: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        from .. import neighbors as nbr

        ray = self._ray
        nq, nb = q.shape[0], b.shape[0]
        q_ref, b_ref = ray.put(q), ray.put(b)
        nearest = ray.remote(_nearest)

        def route(ref: Any, n: int, kk: int, c_ref: Any) -> np.ndarray:
            futures = [
                nearest.remote(ref, lo, min(n, lo + ROUTE_ROWS), c_ref, kk)
                for lo in range(0, n, ROUTE_ROWS)
            ]
            return np.concatenate(ray.get(futures))

        # as the local engine inside neighbors.reuse_indexes: a base searched before in
        # the block (same rows, same seed) keeps its lists, so plants meet the lists the
        # real rows met
        def build() -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
            nlist = nbr.ivf_nlist(nq, nb, nprobe)
            cent = nbr._kmeans(b, nlist, seed)  # the local engine's sample and seed
            lab = route(b_ref, nb, 1, ray.put(cent)).ravel()
            b_order = np.argsort(lab, kind="stable")
            return nlist, cent, b_order, np.searchsorted(lab[b_order], np.arange(nlist + 1))

        nlist, cent, b_order, b_bounds = nbr.reused("ray", b, seed, build)
        c_ref = ray.put(cent)
        nprobe = min(nprobe, nlist)
        sizes = np.diff(b_bounds)
        max_probe = min(nlist, nbr._MAX_PROBE_FACTOR * nprobe)
        min_cand = min(nb, nbr._MIN_CAND_PER_K * k)
        probe = route(q_ref, nq, max_probe, c_ref)
        q_order, q_bounds = nbr._visits(probe, sizes, nprobe, min_cand)
        del probe
        cost = np.diff(q_bounds).astype(np.float64) * sizes
        groups = nbr._balance(cost, np.flatnonzero(cost > 0), TASKS_PER_CPU * self.cpus)
        scan = ray.remote(_scan_task)
        futures = []
        for g in groups:
            q_rows, qb = _concat_slices(q_order, q_bounds, g)
            members, bb = _concat_slices(b_order, b_bounds, g)
            futures.append(scan.remote(q_ref, b_ref, q_rows, qb, members, bb, k, self.fault))
        sims = np.full((nq, k), -np.inf, dtype=np.float32)
        idx = np.full((nq, k), -1, dtype=np.int64)
        while futures:
            ready, futures = ray.wait(futures, num_returns=1)
            touched, s, i = ray.get(ready[0])
            nbr._merge(sims, idx, touched, s, i)
        return nbr._finish(q, b, sims, idx)

    # ----------------------------------------------------------------- split

    def split_posteriors(self, split: Any, score: np.ndarray) -> Any:
        """``split`` with every row's ``match_score`` and flag computed on the cluster,
        block by block in ``map_batches``, from its fitted posterior."""
        from dataclasses import replace

        if split.posterior is None:  # no fit (too few rows): the driver's values stand
            return split
        ray = self._ray
        score = np.asarray(score, dtype=np.float64)
        n = score.size
        blocks = [
            pd.DataFrame(
                {
                    "row": np.arange(lo, min(n, lo + POSTERIOR_ROWS)),
                    "score": score[lo : lo + POSTERIOR_ROWS],
                }
            )
            for lo in range(0, n, POSTERIOR_ROWS)
        ]
        ds = ray.data.from_pandas(blocks).map_batches(
            _posteriors,
            fn_kwargs={"posterior": split.posterior},
            batch_size=None,
            batch_format="numpy",
        )
        match = np.full(n, np.nan)
        flagged = np.zeros(n, dtype=bool)
        with _on_cluster("split"):
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                match[batch["row"]] = batch["match"]
                flagged[batch["row"]] = batch["flagged"]
        return replace(split, match_score=match, is_mismatched=flagged)

    # ----------------------------------------------------------------- rematch

    def rematch(
        self,
        image_emb: Any,
        text_emb: Any,
        suspects: np.ndarray,
        *,
        image_group: np.ndarray | None = None,
        text_group: np.ndarray | None = None,
        valid: np.ndarray | None = None,
        clean: np.ndarray | None = None,
        min_confidence: float = 0.6,
        seed: int | None = None,
        progress: Any = None,
        **settings: Any,
    ) -> Any:
        """:func:`pmpclean.rematching.propose_captions` partitioned by coarse cell on the cluster
        (:mod:`pmpclean.engine._partition`); one part (few suspects), the paper's batch
        cost or the dense solver run :func:`~pmpclean.rematching.propose_captions` as it is."""
        from ..rematching import Rematch, propose_captions

        n = int(np.asarray(suspects).shape[0])
        sus = np.asarray(suspects, dtype=bool)
        ok = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        ig = np.arange(n) if image_group is None else np.asarray(image_group)
        tg = np.arange(n) if text_group is None else np.asarray(text_group)
        cost = settings.get("cost", "learned")
        n_sus = int((sus & ok).sum())
        n_parts = -(-n_sus // self.part_suspects)
        plain = settings.get("solver", "auto") not in ("auto", "sparse") or cost == "paper"
        if n_parts <= 1 or plain or settings.get("pool", "suspects") != "suspects":
            return propose_captions(
                image_emb,
                text_emb,
                sus,
                image_group=ig,
                text_group=tg,
                valid=ok,
                clean=clean,
                min_confidence=min_confidence,
                seed=seed,
                progress=progress,
                **settings,
            )
        with _on_cluster("rematch"):
            cand, conf, info = self._rematch_parts(
                image_emb, text_emb, sus & ok, ig, tg, ok, clean, n_parts, seed, progress, settings
            )
        take = (cand >= 0) & (conf >= min_confidence)
        info["n_candidates"] = int((cand >= 0).sum())
        info["n_proposals"] = int(take.sum())
        return Rematch(np.where(take, cand, -1), np.where(take, conf, 0.0), cand, conf, info)

    def _rematch_parts(
        self,
        img: Any,
        txt: Any,
        sus: np.ndarray,
        ig: np.ndarray,
        tg: np.ndarray,
        ok: np.ndarray,
        clean: np.ndarray | None,
        n_parts: int,
        seed: int | None,
        progress: Any,
        settings: dict[str, Any],
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        from ..rematching import plantable_rows, propose_captions
        from ._partition import FIT_SUSPECTS, merge_parts, plan_parts, sample_problem

        ray = self._ray
        n = sus.size
        rng = np.random.default_rng(seed)
        sus_rows = np.flatnonzero(sus)
        # the cost: fitted once, on a sample of the suspects with its own key points
        cl = (ok & ~sus) if clean is None else (np.asarray(clean, dtype=bool) & ok & ~sus)
        keys = np.sort(plantable_rows(cl, sus, ig, tg))
        size = min(FIT_SUSPECTS, self.part_suspects)
        fit_part, fit_keys = sample_problem(ig, sus_rows, keys, size, rng)
        r = fit_part.rows
        fit = propose_captions(
            np.asarray(img[r]),
            np.asarray(txt[r]),
            fit_part.suspects,
            image_group=ig[r],
            text_group=tg[r],
            valid=ok[r],
            clean=fit_keys,
            min_confidence=0.0,
            seed=seed,
            **settings,
        )
        given = dict(settings, cost=fit.info.get("cost_used", settings.get("cost", "learned")))
        given.update(reg=float(fit.info["eps"]), reg_units="cost", seed=seed)
        model = fit.cost_model
        # the cells: centroids of the suspects' images; a caption goes to the cell of
        # its nearest suspect image (the modality gap keeps text vectors away from
        # image centroids), other than its own row's
        image_cell, caption_cell = self._cells(
            img, txt, sus_rows, n_parts, int(rng.integers(2**31))
        )
        self.last_rematch_cells = (sus_rows, image_cell, caption_cell)
        parts = plan_parts(ig, sus_rows, image_cell, sus_rows, caption_cell, n_parts)
        task = ray.remote(_rematch_part)
        model_ref = ray.put(model)
        futures = []
        for part in parts:
            pr = part.rows
            futures.append(
                task.remote(
                    np.asarray(img[pr]),
                    np.asarray(txt[pr]),
                    part,
                    ig[pr],
                    tg[pr],
                    ok[pr],
                    model_ref,
                    given,
                    self.fault,
                )
            )
        results = []
        for i, f in enumerate(futures):
            results.append(ray.get(f))
            if progress:
                progress("rematch: parts", i + 1, len(futures))
        cand, conf, info = merge_parts(n, parts, results)
        info.update(
            engine="ray",
            n_rows=n,
            n_suspects=int(sus_rows.size),
            cost=settings.get("cost", "learned"),
            cost_used=given["cost"],
            cost_fit=fit.info.get("cost_fit"),
            cost_fit_sample=int(fit_part.suspects.sum()),
            eps=float(fit.info["eps"]),
            scale=float(fit.info.get("scale", float("nan"))),
        )
        if "cost_fallback" in fit.info:
            info["cost_fallback"] = fit.info["cost_fallback"]
        return cand, conf, info

    def _cells(
        self, img: Any, txt: Any, sus_rows: np.ndarray, n_cells: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The coarse cell of each suspect's image and of each suspect's caption."""
        from .. import neighbors as nbr

        sus_img = np.asarray(img[sus_rows], dtype=np.float32)
        cent = nbr._kmeans(sus_img, n_cells, seed)
        image_cell = _nearest(sus_img, 0, sus_rows.size, cent, 1).ravel()
        sus_txt = np.asarray(txt[sus_rows], dtype=np.float32)
        _, idx = nbr.knn_search(sus_txt, sus_img, 2, seed=seed)
        own = idx[:, 0] == np.arange(sus_rows.size)
        near = np.where(own & (idx[:, 1] >= 0), idx[:, 1], idx[:, 0])
        return image_cell, image_cell[np.maximum(near, 0)]

    # ----------------------------------------------------------------- write

    def write_shards(
        self, audit: pd.DataFrame, target: Path
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """Each source shard's audit rows to ``target/audit_shards/<shard>.parquet``, by tasks."""
        ray = self._ray
        folder = Path(target) / "audit_shards"
        folder.mkdir(parents=True, exist_ok=True)
        groups = _shard_groups(audit)
        names = [_file_name(name) for name, _ in groups]
        if len(set(names)) != len(names):
            names = [f"{i:05d}-{n}" for i, n in enumerate(names)]
        write = ray.remote(_write_shard)
        futures = [
            write.remote(audit.iloc[rows].reset_index(drop=True), str(folder / f"{name}.parquet"))
            for (_, rows), name in zip(groups, names, strict=True)
        ]
        with _on_cluster("write"):
            written = ray.get(futures)
        expected = {str(folder / f"{name}.parquet") for name in names}
        for stale in folder.glob("*.parquet"):  # a previous scan's shards that are gone now
            if str(stale) not in expected:
                stale.unlink()
        info = dict(self.info(), audit_shards=len(written))
        return {"audit_shards": str(folder)}, info
