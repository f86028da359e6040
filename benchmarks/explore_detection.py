"""Exploration: does GLOBAL assignment structure beat the per-pair detection ceiling?

Hypothesis. In a shuffled pair (a_i, b_j) the true partners of both sides are
elsewhere in the dataset, themselves in wrong pairs, so a better global matching
re-pairs them; a true pair whose two captions are unrelated has no such partner.
Per-pair statistics (cosine, CSLS, margin, InfoNCE) cannot see this. This script
measures, on the Flickr8k-MiniLM shuffle benchmark (``_datasets.flickr8k_pairs``):

* ``hungarian``: optimal assignment (scipy ``linear_sum_assignment``) over all rows
  on the dense cost 1 - cos; score = -(gain of row i's assigned caption over its own);
  unsupervised rule: flag when the given pairing is not kept.
* ``sinkhorn eps``: entropic OT over all rows (uniform marginals, cost 1 - cos),
  score = log(n P_ii) (= -reduced cost / eps); rules: 2-Gaussian mixture
  (``split_pairs``) and the natural threshold n P_ii < 0.5. (OT on the CSLS cost is
  the same plan: CSLS only adds row and column constants, absorbed by the duals.)
* ``free-pool``: a kNN-only, scalable form of "is my true partner free?". A first
  pass (pmpclean CSLS + mixture) gives a pool of suspect rows; each row is then
  re-scored with CSLS whose alternatives are taken only among the *pool's* captions
  and images (the captions that are free to be re-paired), excluding itself; a
  second round uses the pool flagged by the first round.
* ``oracle pool``: the same score with the pool = the true mismatched rows
  (leave-one-out). Upper bound for any iterative free-pool refinement.
* ``GBM``: gradient boosting trained on the truth (5-fold CV) over the per-pair
  ceiling features of ``bench_detection_ceiling.py``, then with the global features
  added: did the global features carry information the per-pair ones lack?

Metrics: AUROC, best-F1 (threshold chosen on the truth) and F1 at the
unsupervised threshold; positive class = mismatched.

Run (from the project root)::

    python benchmarks/explore_detection.py --out benchmarks/results/explore_detection.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _datasets as D  # noqa: E402
from bench_detection import best_f1  # noqa: E402

from pmpclean.evaluate import auroc, detection_metrics  # noqa: E402
from pmpclean.neighbors import knn_search  # noqa: E402
from pmpclean.score import pair_scores  # noqa: E402
from pmpclean.split import split_pairs  # noqa: E402


def sinkhorn_diag(sim: np.ndarray, eps: float, *, max_iter: int = 500, tol: float = 1e-4):
    """Balanced entropic OT on cost 1 - sim; returns n * P_ii, u, v and the iterations."""
    n = sim.shape[0]
    kern = np.exp((sim - 1.0) / eps).astype(np.float32)  # cost in [0, 2] -> >= e^(-2/eps)
    u = np.ones(n, np.float32)
    v = np.ones(n, np.float32)
    it = 0
    for it in range(1, max_iter + 1):
        u = (1.0 / n) / (kern @ v)
        v = (1.0 / n) / (kern.T @ u)
        if it % 20 == 0:
            err = float(np.abs(u * (kern @ v) * n - 1.0).max())
            if err < tol:
                break
    return n * u * np.diag(kern) * v, u, v, it


def pool_csls(
    a: np.ndarray, b: np.ndarray, sii: np.ndarray, pool: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSLS of each row with alternatives taken only among pool rows (never itself).

    kNN-only: one search of all images against the pool's captions and one of all
    captions against the pool's images, O(n |pool| d) exact or sub-linear with IVF.
    Returns the score ``2 s_ii - img_alt - txt_alt`` and the two alternative means.
    """
    idx_pool = np.flatnonzero(pool)
    out = []
    for q, base in ((a, b[idx_pool]), (b, a[idx_pool])):
        sims, idx = knn_search(q, base, k + 1)
        glob = np.where(idx >= 0, idx_pool[np.maximum(idx, 0)], -1)
        keep = (glob != np.arange(q.shape[0])[:, None]) & (idx >= 0)
        rank = np.cumsum(keep, axis=1) - 1
        take = keep & (rank < k)
        vals = np.where(take, sims, 0.0).sum(1) / np.maximum(take.sum(1), 1)
        out.append(vals.astype(np.float64))
    return 2 * sii - out[0] - out[1], out[0], out[1]


def run_rate(rate: float, *, seed: int, supervised: bool, eps_list: list[float]) -> dict:
    d = D.flickr8k_pairs(rate, "shuffle", seed)
    y = d["is_mismatched"]
    a, b = d["image_emb"], d["text_emb"]
    n = y.size
    rows: list[dict] = []
    feats: dict[str, np.ndarray] = {}

    def add(name: str, score: np.ndarray, pred: np.ndarray | None, secs: float, note: str = ""):
        f1 = float("nan")
        if pred is not None:
            f1 = detection_metrics(y, np.zeros(n), pred)["f1"]
        rows.append(
            {
                "method": name,
                "auroc": auroc(y, -score),
                "best_f1": best_f1(y, score),
                "f1": f1,
                "secs": secs,
                "note": note,
            }
        )
        print(
            f"  {rate:.0%} {name}: best-F1 {rows[-1]['best_f1']:.4f}", file=sys.stderr, flush=True
        )

    t = time.perf_counter()
    ps = pair_scores(a, b, image_group=d["image_group"], text_group=d["text_group"], k=3)
    sp = split_pairs(ps.score, seed=seed)
    secs = time.perf_counter() - t
    sii = ps.similarity
    add("cosine", sii, None, 0.0)
    add("pmpclean csls k=3 + mixture", ps.score, sp.is_mismatched, secs)

    sim = a @ b.T
    # Optimal assignment over all rows.
    from scipy.optimize import linear_sum_assignment

    t = time.perf_counter()
    _, col = linear_sum_assignment(-sim)
    secs = time.perf_counter() - t
    kept = col == np.arange(n)
    gain = sim[np.arange(n), col] - sii
    feats["hungarian_gain"] = gain
    add("hungarian (all rows), -gain", -gain, ~kept, secs, f"kept {kept.mean():.1%} of rows")

    for eps in eps_list:
        t = time.perf_counter()
        p, u, v, it = sinkhorn_diag(sim, eps)
        secs = time.perf_counter() - t
        logp = np.log(np.maximum(p, 1e-30)).astype(np.float64)
        feats[f"sk{eps}_logp"] = logp
        feats[f"sk{eps}_logu"] = np.log(u).astype(np.float64)
        feats[f"sk{eps}_logv"] = np.log(v).astype(np.float64)
        sps = split_pairs(logp, seed=seed)
        add(f"sinkhorn eps={eps} log(nP_ii) + mixture", logp, sps.is_mismatched, secs, f"{it} it")
        add(f"sinkhorn eps={eps}, rule nP_ii<0.5", logp, p < 0.5, secs)
    del sim

    # Free-pool CSLS (kNN-only), two rounds, seeded by pmpclean's own flags.
    pool = sp.is_mismatched.copy()
    for rnd in (1, 2):
        t = time.perf_counter()
        sc, alt_i, alt_t = pool_csls(a, b, sii, pool, 3)
        spf = split_pairs(sc, seed=seed)
        secs = time.perf_counter() - t
        feats[f"free{rnd}"] = sc
        feats[f"free{rnd}_img"] = sii - alt_i
        feats[f"free{rnd}_txt"] = sii - alt_t
        add(
            f"free-pool csls k=3, round {rnd} + mixture",
            sc,
            spf.is_mismatched,
            secs,
            f"pool {pool.sum()} rows ({(pool & y).sum()} mismatched)",
        )
        t = time.perf_counter()
        sc1, _, _ = pool_csls(a, b, sii, pool, 1)
        pred1 = split_pairs(sc1, seed=seed).is_mismatched
        feats[f"free{rnd}_k1"] = sc1
        add(f"free-pool csls k=1, round {rnd} + mixture", sc1, pred1, time.perf_counter() - t)
        pool = spf.is_mismatched.copy()

    sco, _, _ = pool_csls(a, b, sii, y.copy(), 1)
    add("oracle pool (truth, leave-one-out) csls k=1", sco, None, 0.0, "bound, uses the truth")

    if supervised:
        from bench_detection_ceiling import features
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.model_selection import cross_val_predict

        base = features(d)
        x0 = np.column_stack(list(base.values()))
        x1 = np.column_stack([x0, *feats.values()])
        for name, x in (("per-pair features", x0), ("per-pair + global features", x1)):
            t = time.perf_counter()
            clf = HistGradientBoostingClassifier(max_iter=300, random_state=seed)
            pr = cross_val_predict(clf, x, y, cv=5, method="predict_proba")[:, 1]
            add(f"GBM on truth, {name}", -pr, pr > 0.5, time.perf_counter() - t, "supervised")
    return {"rate": rate, "n": n, "rows": rows}


def fmt(x: float) -> str:
    return "—" if not np.isfinite(x) else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.05])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-supervised", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    results = [
        run_rate(r, seed=args.seed, supervised=not args.no_supervised, eps_list=args.eps)
        for r in args.rates
    ]
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]

    lines = [
        "# Exploration: global assignment features for mismatch detection",
        "",
        "Produced by (from the project root, CPU, 2 cores shared with other jobs):",
        "",
        "    " + " ".join(["python", "benchmarks/explore_detection.py", *sys.argv[1:]]),
        "",
        f"Flickr8k-MiniLM pairs (caption #0 vs #1, n = {results[0]['n']}), shuffle noise, "
        f"seed {args.seed}. Python {platform.python_version()}, numpy {np.__version__}. "
        f"Wall time {wall / 60:.1f} min; 1-min load average {load0:.1f} at start, "
        f"{load1:.1f} at end (timings are inflated by other helpers' jobs).",
        "",
        "Positive class = mismatched. `AUROC`, `best-F1` (threshold chosen on the truth) "
        "and `F1` at the method's unsupervised rule (— = no rule). Rows marked "
        "*supervised* or *bound* use the truth and are not detectors.",
    ]
    for res in results:
        lines += [
            "",
            f"## {res['rate']:.0%} noise",
            "",
            "| method | AUROC | best-F1 | F1 (unsupervised rule) | time | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['method']} | {fmt(r['auroc'])} | {fmt(r['best_f1'])} | {fmt(r['f1'])} | "
                f"{r['secs']:.1f}s | {r['note']} |"
            )
    # Summary: best-F1 per rate for the main candidates.
    names = [r["method"] for r in results[0]["rows"]]
    lines += [
        "",
        "## Summary: best-F1 (oracle threshold) per noise rate",
        "",
        "| method | " + " | ".join(f"{res['rate']:.0%}" for res in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for name in names:
        vals = []
        for res in results:
            m = {r["method"]: r for r in res["rows"]}
            vals.append(fmt(m[name]["best_f1"]) if name in m else "—")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
