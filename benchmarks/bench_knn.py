"""k-NN engines for the score stage: CPU cost and recall, all queries vs all rows.

The score stage asks, for every image, its top-k captions among all captions (and the
reverse). This compares, on the CLIP-like data of ``bench_scale.py`` (512-d; images
query captions):

* ``exact``: brute force (:func:`faiss.knn`, BLAS); cost from a query sample.
* ``faiss-ivfflat``: faiss ``IndexIVFFlat`` on the *same* spherical k-means lists as
  pmpclean's search (so the same candidates and recall): shows the cost of scanning
  lists query by query. Search cost from a query sample, plus adding the base.
* ``pmpclean-ivf``: :func:`pmpclean.neighbors.knn_search` above ``exact_max`` (lists
  visited list-major with one BLAS call per list). Full run, every query.
* ``pca128+pmpclean-ivf+rerank``: the same search on 128-d PCA projections for the
  top 32, re-scored exactly in 512-d.
* ``faiss-hnsw`` (``--hnsw``, use at 100k only: the graph build is the cost).

Recall@k is the fraction of the exact top-k found, on ``--queries`` sampled queries;
``top3_err`` is the mean (and sd) of the error of the mean of the top-3 similarities
(the quantity the CSLS score uses), approximate minus exact. CPU seconds are the
process's user+system time (2 threads); wall times depend on machine load.

    python benchmarks/bench_knn.py --n 1000000 --out benchmarks/results/knn_1m.json
    python benchmarks/bench_knn.py --n 100000 --hnsw --out benchmarks/results/knn_100k.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _unit_rows(x: np.ndarray) -> np.ndarray:
    for lo in range(0, x.shape[0], 1 << 16):
        blk = x[lo : lo + (1 << 16)]
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
    return x


def _quality(
    sims: np.ndarray, idx: np.ndarray, ref_s: np.ndarray, ref_i: np.ndarray, k: int
) -> dict:
    recall = float(
        np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(idx, ref_i, strict=True)])
    )
    err = sims[:, :3].mean(1) - ref_s[:, :3].mean(1)
    return {
        "recall_at_k": round(recall, 4),
        "top3_err_mean": round(float(err.mean()), 5),
        "top3_err_sd": round(float(err.std()), 5),
    }


def main(argv: list[str] | None = None) -> None:
    import faiss
    from bench_scale import make_data

    from pmpclean import neighbors

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--queries", type=int, default=2000, help="queries whose recall is measured")
    ap.add_argument(
        "--sample", type=int, default=20_000, help="queries timed for per-query engines"
    )
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--hnsw", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "scale")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    n, k = args.n, args.k
    args.work.mkdir(parents=True, exist_ok=True)
    _, emb = make_data(n, args.work, dim=512, seed=args.seed)
    with np.load(emb) as f:
        base = _unit_rows(f["text"])
        query = _unit_rows(f["image"])
    rng = np.random.default_rng(args.seed)
    qs = np.sort(rng.choice(n, args.queries, replace=False))
    timed = np.sort(rng.choice(n, min(n, args.sample), replace=False))
    rows: list[dict] = []

    def record(method: str, params: dict, cpu: float, wall: float, how: str, q: dict) -> None:
        row = {
            "method": method,
            **params,
            "cpu_s_all_queries": round(cpu, 1),
            "wall_s": round(wall, 1),
            "cost": how,
            **q,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    # exact reference on the recall sample (and its cost, extrapolated)
    c, t = _cpu(), time.time()
    ref_s, ref_i = faiss.knn(
        np.ascontiguousarray(query[qs]), base, k, metric=faiss.METRIC_INNER_PRODUCT
    )
    c, t = _cpu() - c, time.time() - t
    record(
        "exact",
        {},
        c * n / len(qs),
        t * n / len(qs),
        f"extrapolated from {len(qs)} queries",
        _quality(ref_s, ref_i, ref_s, ref_i, k),
    )

    for nprobe in args.nprobe:
        nlist = neighbors.ivf_nlist(n, n, nprobe)
        # pmpclean list-major IVF: every query
        c, t = _cpu(), time.time()
        s, i = neighbors.knn_search(query, base, k, exact_max=0, nprobe=nprobe, seed=args.seed)
        c, t = _cpu() - c, time.time() - t
        record(
            "pmpclean-ivf",
            {"nlist": nlist, "nprobe": nprobe},
            c,
            t,
            "measured, all queries",
            _quality(s[qs], i[qs], ref_s, ref_i, k),
        )
        del s, i
        # faiss IndexIVFFlat on the same lists: build + per-query search cost
        c0, t0 = _cpu(), time.time()
        cent = neighbors._kmeans(base, nlist, args.seed)
        quant = faiss.IndexFlatIP(512)
        quant.add(cent)
        index = faiss.IndexIVFFlat(quant, 512, nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        index.add(base)
        index.nprobe = nprobe
        c_build, t_build = _cpu() - c0, time.time() - t0
        c0, t0 = _cpu(), time.time()
        index.search(np.ascontiguousarray(query[timed]), k)
        c_q, t_q = (_cpu() - c0) / len(timed), (time.time() - t0) / len(timed)
        s, i = index.search(np.ascontiguousarray(query[qs]), k)
        record(
            "faiss-ivfflat",
            {"nlist": nlist, "nprobe": nprobe},
            c_build + c_q * n,
            t_build + t_q * n,
            f"build measured + search extrapolated from {len(timed)} queries",
            _quality(s, i, ref_s, ref_i, k),
        )
        del index, quant

    # PCA-128 candidates + exact re-rank
    nprobe = args.nprobe[-1]
    c, t = _cpu(), time.time()
    sample = base[np.sort(rng.choice(n, min(n, 50_000), replace=False))]
    mu = sample.mean(0)
    _, _, vt = np.linalg.svd(sample - mu, full_matrices=False)
    proj = np.ascontiguousarray(vt[:128].T, dtype=np.float32)
    pb = np.empty((n, 128), np.float32)
    pq = np.empty((n, 128), np.float32)
    for lo in range(0, n, 1 << 16):
        pb[lo : lo + (1 << 16)] = (base[lo : lo + (1 << 16)] - mu) @ proj
        pq[lo : lo + (1 << 16)] = query[lo : lo + (1 << 16)] @ proj
    _, cand = neighbors.knn_search(pq, pb, 32, exact_max=0, nprobe=nprobe, seed=args.seed)
    del pb, pq
    s = np.empty((n, k), np.float32)
    i = np.empty((n, k), np.int64)
    for lo in range(0, n, 1 << 14):
        cb = cand[lo : lo + (1 << 14)]
        full = np.einsum("qd,qkd->qk", query[lo : lo + (1 << 14)], base[cb])
        top = np.argsort(-full, axis=1)[:, :k]
        s[lo : lo + (1 << 14)] = np.take_along_axis(full, top, 1)
        i[lo : lo + (1 << 14)] = np.take_along_axis(cb, top, 1)
    c, t = _cpu() - c, time.time() - t
    record(
        "pca128+pmpclean-ivf+rerank",
        {"nprobe": nprobe, "rerank": 32},
        c,
        t,
        "measured, all queries",
        _quality(s[qs], i[qs], ref_s, ref_i, k),
    )
    del s, i, cand

    if args.hnsw:
        for ef in (64, 128):
            c0, t0 = _cpu(), time.time()
            index = faiss.IndexHNSWFlat(512, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 64
            index.add(base)
            c_build, t_build = _cpu() - c0, time.time() - t0
            index.hnsw.efSearch = ef
            c0, t0 = _cpu(), time.time()
            index.search(np.ascontiguousarray(query[timed]), k)
            c_q, t_q = (_cpu() - c0) / len(timed), (time.time() - t0) / len(timed)
            s, i = index.search(np.ascontiguousarray(query[qs]), k)
            record(
                "faiss-hnsw",
                {"M": 32, "efConstruction": 64, "efSearch": ef},
                c_build + c_q * n,
                t_build + t_q * n,
                f"build measured + search extrapolated from {len(timed)} queries",
                _quality(s, i, ref_s, ref_i, k),
            )
            del index

    out = {
        "command": "python benchmarks/bench_knn.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "n_queries": n,
        "n_base": n,
        "dim": 512,
        "k": k,
        "load_average_end": os.getloadavg(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
