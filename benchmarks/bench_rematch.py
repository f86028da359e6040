"""Rematch benchmark (issue 3): precision-coverage, sparse-vs-dense agreement, scaling.

Sections (run one or several; each prints markdown and writes JSON next to the
results file):

``curves``
    Rematch precision-coverage on Flickr8k caption pairs (MiniLM, caption #0 as
    "image", #1 as "text", 8,092 pairs; ``benchmarks/_datasets.py``) and on CLIP-like
    synthetic pairs, at shuffle noise 20/40/60/80 %. Suspects = the truly mismatched
    rows (isolates rematching from detection) or the rows flagged by
    ``pmpclean.score`` + ``pmpclean.split`` (``--suspects detected``). Methods:

    - ``learned`` / ``fixed``: :func:`pmpclean.rematching.rematch` with its defaults and
      ``cost="learned"`` / ``"fixed"`` (sparse kNN graph, global partial OT);
    - ``learned-pool-all``: ``cost="learned", pool="all"`` (clean rows' captions are
      candidates too);
    - ``fixed-batch``: ``cost="fixed", solver="batch"``: the fixed cost inside random
      batches of 128 suspects (separates the batch effect from the cost network);
    - ``paper-cost``: ``cost="paper"`` (the L2RM cost network, width 128, inside random
      batches of 128 suspects), with pmpclean's mass/reg;
    - ``paper``: the paper's own rematching, batches of 128, mass 0.1, reg 0.07 in cost
      units (its ``rho`` and ``reg`` defaults), lr_cost 2e-6;
    - ``hungarian``: a full assignment over the suspects
      (``scipy.optimize.linear_sum_assignment`` on ``1 - similarity``, the original
      pairing and existing pairs forbidden), ranked by the pair's similarity;
    - ``nn``: each suspect image's most similar allowed caption, ranked by similarity.

    Metrics: precision (a proposal j for row i is correct iff
    ``image_group[true_row[j]] == image_group[i]``) at coverage 10..90 % (coverage =
    proposals / suspects, proposals ranked by confidence), the largest coverage at
    which precision >= 0.9, and precision / coverage at the default cut.

``agreement``
    Proposals of the sparse solver (kNN graph) against dense OT on every pair (POT,
    ``solver="dense"``) on 2-5k suspects: fraction of rows with the same candidate
    (all, and those the dense plan commits >= 0.3 of), with the same proposal at each
    cut, the share bias, the dense plan's mass outside the candidate graph, and the
    wall times of POT, of pmpclean's solver on the same full matrix and of the sparse
    solver.

``scaling``
    Wall time and peak memory (VmHWM of the process during the call) of
    :func:`rematch` (learned cost, defaults) at 20k / 50k / 200k suspects on
    CLIP-like synthetic embeddings (``pmpclean.synthetic.clip_like_pairs``, d=512,
    80 % of the rows shuffled, generated in chunks of 100k rows), each in a fresh
    process, with ``uptime`` load.

``manytomany``
    Flickr8k with 4 captions per photo (image groups, duplicated captions): the
    precision-coverage of each method and the count of proposals that can never be
    right (own caption, a text the photo already has, a text twice to one photo).

``sweep``
    Grid over mass / reg / k / min_confidence used to pick the defaults.

``ablation``
    Feature sets of the learned cost (and the fixed cost), over seeds.

``papercost``
    The paper's cost network against the fixed cost with all suspects in one batch.

Usage::

    python benchmarks/bench_rematch.py curves [--datasets flickr synthetic]
        [--noise 0.2 0.4 0.6 0.8] [--suspects truth detected]
    python benchmarks/bench_rematch.py agreement [--datasets flickr synthetic] [--k 32]
    python benchmarks/bench_rematch.py scaling [--sizes 20000 50000 200000]
    python benchmarks/bench_rematch.py sweep [--mass ...] [--reg ...] [--k ...] [--seeds ...]
    python benchmarks/bench_rematch.py ablation [--seeds 0 1 2]
    python benchmarks/bench_rematch.py papercost --datasets flickr
    python benchmarks/bench_rematch.py manytomany --noise 0.2 0.4

The default confidence cut is read from ``pmpclean.config.AuditConfig().min_confidence``
(the cut a scan applies).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def load() -> str:
    try:
        out = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout
        return out.split("load average:")[-1].strip()
    except (OSError, subprocess.CalledProcessError):  # pragma: no cover
        return "n/a"


# --------------------------------------------------------------------------- data


def dataset(name: str, noise: float, seed: int = 0) -> dict:
    import _datasets as D

    if name == "flickr":
        return D.flickr8k_pairs(noise, "shuffle", seed)
    if name == "synthetic":
        return D.synthetic_pairs(8000, noise, "shuffle", seed)
    raise SystemExit(f"unknown dataset {name}")


def detected_suspects(d: dict, seed: int = 0) -> np.ndarray:
    from pmpclean.score import pair_scores
    from pmpclean.split import split_pairs

    ps = pair_scores(
        d["image_emb"],
        d["text_emb"],
        image_group=d["image_group"],
        text_group=d["text_group"],
        valid=d["valid"],
        seed=seed,
    )
    return np.asarray(split_pairs(ps.score, seed=seed).is_mismatched, dtype=bool)


# --------------------------------------------------------------------------- metrics


def curve(d: dict, rows: np.ndarray, cand: np.ndarray, conf: np.ndarray):
    """Coverage, precision and confidence after each proposal, best first."""
    ig, tr = d["image_group"], d["true_row"]
    c, f = cand[rows], conf[rows]
    has = c >= 0
    order = np.argsort(-f[has], kind="stable")
    r, c, f = rows[has][order], c[has][order], f[has][order]
    correct = ig[tr[c]] == ig[r]
    n = np.arange(1, correct.size + 1)
    return n / max(rows.size, 1), np.cumsum(correct) / n, f


CUTS = (0.5, 0.6, 0.7, 0.8, 0.9)


def default_cut() -> float:
    """The confidence cut a scan applies (``AuditConfig.min_confidence``)."""
    from pmpclean.config import AuditConfig

    return float(AuditConfig().min_confidence)


def summarise(d, rows, cand, conf, cut: float | None) -> dict:
    cov, prec, f = curve(d, rows, cand, conf)
    at = {}
    for g in GRID:
        i = np.searchsorted(cov, g - 1e-12)
        at[f"{g:.1f}"] = float(prec[i]) if i < cov.size else None
    good = np.flatnonzero(prec >= 0.9)
    out = {
        "precision_at_coverage": at,
        "max_coverage": float(cov[-1]) if cov.size else 0.0,
        "coverage_at_p90": float(cov[good[-1]]) if good.size else 0.0,
        "conf_at_p90": float(f[good[-1]]) if good.size else None,
    }
    if cut is not None:
        m = int((f >= cut).sum())
        out["cut"] = cut
        out["coverage_at_cut"] = m / max(rows.size, 1)
        out["precision_at_cut"] = float(prec[m - 1]) if m else None
        out["cuts"] = {}
        for c in CUTS:
            m = int((f >= c).sum())
            out["cuts"][f"{c:.1f}"] = {
                "precision": float(prec[m - 1]) if m else None,
                "coverage": m / max(rows.size, 1),
            }
    return out


# --------------------------------------------------------------------------- baselines


def baseline_nn(d: dict, rows: np.ndarray):
    n = len(d["image_group"])
    cand, conf = np.full(n, -1), np.zeros(n)
    for lo in range(0, rows.size, 2048):
        blk = rows[lo : lo + 2048]
        s = d["image_emb"][blk] @ d["text_emb"][rows].T
        s[~_allowed_rows(d, blk, rows)] = -np.inf
        j = s.argmax(1)
        cand[blk] = rows[j]
        conf[blk] = s[np.arange(blk.size), j]
    return cand, conf


def _allowed_rows(d: dict, q: np.ndarray, pool: np.ndarray) -> np.ndarray:
    ig, tg = d["image_group"], d["text_group"]
    n_tg = int(tg.max()) + 1
    existing = np.unique(ig * n_tg + tg)
    key = ig[q][:, None] * n_tg + tg[pool][None, :]
    return ~np.isin(key, existing)


def baseline_hungarian(d: dict, rows: np.ndarray):
    from scipy.optimize import linear_sum_assignment

    n = len(d["image_group"])
    s = d["image_emb"][rows] @ d["text_emb"][rows].T
    allowed = _allowed_rows(d, rows, rows)
    cost = np.where(allowed, 1.0 - s, 1e6)
    r, c = linear_sum_assignment(cost)
    ok = allowed[r, c]
    cand, conf = np.full(n, -1), np.zeros(n)
    cand[rows[r[ok]]] = rows[c[ok]]
    conf[rows[r[ok]]] = s[r[ok], c[ok]]
    return cand, conf


# --------------------------------------------------------------------------- sections


def run_method(name: str, d: dict, sus: np.ndarray, seed: int = 0, raw: bool = False):
    from pmpclean.rematching import rematch

    rows = np.flatnonzero(sus)
    cut = default_cut()
    kw = {
        "image_group": d["image_group"],
        "text_group": d["text_group"],
        "valid": d["valid"],
        "clean": d["valid"] & ~sus,
        "seed": seed,
        "min_confidence": cut,
    }
    variants = {
        "learned": {"cost": "learned"},
        "fixed": {"cost": "fixed"},
        "learned-pool-all": {"cost": "learned", "pool": "all"},
        "fixed-batch": {"cost": "fixed", "solver": "batch"},
        "paper-cost": {"cost": "paper"},
        # the paper's own rematching: batches of 128, its rho (mass 0.1) and reg (0.07
        # in cost units); lr_cost 2e-6 is fit_paper_cost's default
        "paper": {"cost": "paper", "mass": 0.1, "reg": 0.07, "reg_units": "cost"},
    }
    t = time.perf_counter()
    info = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in variants:
            r = rematch(d["image_emb"], d["text_emb"], sus, **variants[name], **kw)
            cand, conf = r.candidate_row, r.candidate_confidence
            info = {k: r.info.get(k) for k in ("cost_used", "iterations", "n_edges", "timings")}
        elif name == "hungarian":
            cand, conf = baseline_hungarian(d, rows)
        elif name == "nn":
            cand, conf = baseline_nn(d, rows)
        else:
            raise SystemExit(f"unknown method {name}")
    secs = time.perf_counter() - t
    out = summarise(d, rows, cand, conf, cut if name in variants else None)
    out["seconds"] = secs
    out["info"] = info
    if raw:
        return out, cand, conf
    return out


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def section_curves(args) -> dict:
    results = []
    for ds in args.datasets:
        for noise in args.noise:
            d = dataset(ds, noise)
            for mode in args.suspects:
                sus = d["is_mismatched"].copy() if mode == "truth" else detected_suspects(d)
                det = {}
                if mode == "detected":
                    tp = int((sus & d["is_mismatched"]).sum())
                    det = {
                        "flagged": int(sus.sum()),
                        "precision": tp / max(sus.sum(), 1),
                        "recall": tp / max(d["is_mismatched"].sum(), 1),
                    }
                for method in args.methods:
                    res = run_method(method, d, sus)
                    res.update(
                        dataset=ds,
                        noise=noise,
                        suspects=mode,
                        method=method,
                        n_suspects=int(sus.sum()),
                        detection=det,
                        load=load(),
                    )
                    results.append(res)
                    print(
                        json.dumps(
                            {
                                k: res[k]
                                for k in (
                                    "dataset",
                                    "noise",
                                    "suspects",
                                    "method",
                                    "coverage_at_p90",
                                    "seconds",
                                )
                            }
                        ),
                        flush=True,
                    )
    lines = [
        "| dataset | noise | suspects | method | "
        + " | ".join(f"p@{g}" for g in GRID)
        + " | cov@p>=.9 | max cov | cut | p@cut | cov@cut | s |",
        "|" + "---|" * (len(GRID) + 11),
    ]
    for r in results:
        p = r["precision_at_coverage"]
        lines.append(
            f"| {r['dataset']} | {r['noise']:.0%} | {r['suspects']} ({r['n_suspects']}) | "
            f"{r['method']} | "
            + " | ".join(fmt(p[f"{g:.1f}"]) for g in GRID)
            + f" | {r['coverage_at_p90']:.3f} | {r['max_coverage']:.3f} | "
            f"{fmt(r.get('cut'))} | {fmt(r.get('precision_at_cut'))} | "
            f"{fmt(r.get('coverage_at_cut'))} | {r['seconds']:.1f} |"
        )
    print("\n".join(lines))
    return {"rows": results, "table": "\n".join(lines)}


def nonsense(d: dict, rows: np.ndarray, cand: np.ndarray, conf: np.ndarray, cut: float) -> dict:
    """Proposals that can never be right, at the cut: counts that must all be 0."""
    ig, tg = d["image_group"], d["text_group"]
    has = rows[(cand[rows] >= 0) & (conf[rows] >= cut)]
    prop = cand[has]
    n_tg = int(tg.max()) + 1
    existing = np.unique(ig * n_tg + tg)
    pairs = ig[has] * n_tg + tg[prop]
    return {
        "n_proposals": int(has.size),
        "own_caption": int((prop == has).sum()),
        "existing_pair": int(np.isin(pairs, existing).sum()),
        "same_text_twice_to_one_image": int(pairs.size - np.unique(pairs).size),
        "caption_row_proposed_twice": int(prop.size - np.unique(prop).size),
        "proposal_for_non_suspect": int((cand[~np.isin(np.arange(cand.size), rows)] >= 0).sum()),
    }


def section_manytomany(args) -> dict:
    """Flickr8k with 4 captions per photo (image groups) and its duplicated captions.

    Rows: caption #0 of a photo as the image side of 4 rows holding captions #1-#4.
    A proposal is correct when it is any caption of the right photo. Also counted:
    proposals that can never be right (the row's own caption, a caption text its
    photo already has, the same text twice to one photo, one caption row twice).
    """
    out = []
    cut = default_cut()
    for noise in args.noise:
        d = _flickr_many(4, noise)
        sus = d["is_mismatched"].copy()
        rows = np.flatnonzero(sus)
        n_dup = int(d["text_group"].size - np.unique(d["text_group"]).size)
        for method in args.methods:
            if method == "hungarian" and rows.size > 8000:
                continue  # a dense assignment over more suspects does not fit the budget
            res, cand, conf = run_method(method, d, sus, raw=True)
            res.update(
                dataset="flickr-4-captions",
                noise=noise,
                method=method,
                n_rows=int(sus.size),
                n_suspects=int(rows.size),
                n_duplicate_caption_rows=n_dup,
                nonsense=nonsense(
                    d, rows, cand, conf, cut if method not in ("hungarian", "nn") else -1.0
                ),
                load=load(),
            )
            out.append(res)
            print(
                json.dumps(
                    {
                        k: res[k]
                        for k in ("noise", "method", "coverage_at_p90", "nonsense", "seconds")
                    }
                ),
                flush=True,
            )
    lines = [
        "| noise | rows / suspects | method | "
        + " | ".join(f"p@{g}" for g in GRID)
        + f" | p / cov at cut {cut:.1f} | never-right proposals | s |",
        "|" + "---|" * (len(GRID) + 6),
    ]
    for r in out:
        p = r["precision_at_coverage"]
        bad = sum(v for k, v in r["nonsense"].items() if k != "n_proposals")
        lines.append(
            f"| {r['noise']:.0%} | {r['n_rows']:,} / {r['n_suspects']:,} | {r['method']} | "
            + " | ".join(fmt(p[f"{g:.1f}"]) for g in GRID)
            + f" | {fmt(r.get('precision_at_cut'))} / {fmt(r.get('coverage_at_cut'))}"
            + f" | {bad} | {r['seconds']:.1f} |"
        )
    print("\n".join(lines))
    return {"rows": out, "table": "\n".join(lines)}


def _flickr_many(c: int, noise: float, seed: int = 0) -> dict:
    import _datasets as D

    return D.flickr8k_pairs(noise, "shuffle", seed, captions_per_image=c)


def _dense_plan_spy():
    """Wrap pmpclean.rematching._pot_dense to keep the last dense plan (for diagnostics)."""
    import pmpclean.rematching as R

    kept: dict = {}
    original = R._pot_dense

    def spy(cost, allowed, a, b, **kw):
        t = time.perf_counter()
        plan, info = original(cost, allowed, a, b, **kw)
        kept.update(plan=plan, a=a, seconds=time.perf_counter() - t)
        return plan, info

    return R, original, spy, kept


def section_agreement(args) -> dict:
    """Sparse (candidate graph) against dense POT on every pair, same problem and settings.

    Dense: ``rematch(solver="dense")``, which solves the dummy-extended partial problem
    on the full (suspect x suspect) matrix with ``ot.sinkhorn(method="sinkhorn_log")``.
    Also timed: pmpclean's own edge solver on the full matrix (the same problem).
    Agreement is measured on the raw candidates (every suspect, and the suspects whose
    dense share is at least 0.3) and on the proposals after each confidence cut.
    ``off_graph_mass`` is the mean fraction of a suspect's mass that the dense plan
    sends to captions outside its candidate graph (what a sparse solver cannot hold).
    """
    from pmpclean.rematching import rematch

    R, original, spy, kept = _dense_plan_spy()
    cut0 = default_cut()
    out = []
    plan = [
        ("flickr", 0.3, ("learned", "fixed")),
        ("synthetic", 0.3, ("learned", "fixed")),
        ("flickr", 0.6, ("learned", "fixed")),
    ]
    for ds, noise, costs in plan:
        if ds not in args.datasets:
            continue
        d = dataset(ds, noise)
        sus = d["is_mismatched"]
        rows = np.flatnonzero(sus)
        kw = {
            "image_group": d["image_group"],
            "text_group": d["text_group"],
            "clean": ~sus,
            "seed": 0,
            "min_confidence": cut0,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for cost in costs:
                for k in args.k:
                    R._pot_dense = spy
                    try:
                        t = time.perf_counter()
                        dense = rematch(
                            d["image_emb"],
                            d["text_emb"],
                            sus,
                            cost=cost,
                            k=k,
                            solver="dense",
                            block_size=8192,
                            max_iter=20000,
                            **kw,
                        )
                        t_dense = time.perf_counter() - t
                    finally:
                        R._pot_dense = original
                    t_pot = kept["seconds"]
                    graph: dict = {}
                    solver = R.partial_transport

                    def graph_spy(rows_, cols_, *a, _solver=solver, _graph=graph, **kw_):
                        _graph.update(rows=np.asarray(rows_), cols=np.asarray(cols_))
                        return _solver(rows_, cols_, *a, **kw_)

                    R.partial_transport = graph_spy
                    try:
                        t = time.perf_counter()
                        sparse = rematch(d["image_emb"], d["text_emb"], sus, cost=cost, k=k, **kw)
                        t_sparse = time.perf_counter() - t
                    finally:
                        R.partial_transport = solver
                    # the same problem on the full matrix with pmpclean's own solver
                    own_s, own_it = _own_dense_seconds(R, d, sus, cost, k, kw)
                    # dense mass outside the candidate graph, per suspect
                    P = kept["plan"] / kept["a"][:, None]
                    on_graph = np.zeros_like(P, dtype=bool)
                    on_graph[graph["rows"], graph["cols"]] = True
                    off = (P * ~on_graph).sum(1)
                    dc, sc = dense.candidate_row[rows], sparse.candidate_row[rows]
                    dconf, sconf = (
                        dense.candidate_confidence[rows],
                        sparse.candidate_confidence[rows],
                    )
                    sure = dconf >= 0.3
                    cuts = {}
                    for c in CUTS:
                        pd_ = np.where(dconf >= c, dc, -1)
                        ps_ = np.where(sconf >= c, sc, -1)
                        cuts[f"{c:.1f}"] = float((pd_ == ps_).mean())
                    dis = dc != sc
                    row = {
                        "dataset": ds,
                        "noise": noise,
                        "cost": cost,
                        "k": k,
                        "n_suspects": int(rows.size),
                        "same_candidate": float((~dis).mean()),
                        "same_candidate_dense_share_ge_0.3": float((~dis[sure]).mean()),
                        "n_dense_share_ge_0.3": int(sure.sum()),
                        "same_proposal_at_cut": cuts,
                        "default_cut": cut0,
                        "share_bias_sparse_minus_dense": float(np.mean(sconf - dconf)),
                        "share_abs_diff_median": float(np.median(np.abs(sconf - dconf))),
                        "disagreeing_median_dense_share": float(np.median(dconf[dis]))
                        if dis.any()
                        else None,
                        "off_graph_mass_mean": float(off.mean()),
                        "off_graph_mass_q90": float(np.quantile(off, 0.9)),
                        "dense_coverage_at_p90": summarise(
                            d, rows, dense.candidate_row, dense.candidate_confidence, None
                        )["coverage_at_p90"],
                        "sparse_coverage_at_p90": summarise(
                            d, rows, sparse.candidate_row, sparse.candidate_confidence, None
                        )["coverage_at_p90"],
                        "dense_total_seconds": t_dense,
                        "dense_pot_seconds": t_pot,
                        "dense_own_solver_seconds": own_s,
                        "dense_own_solver_iterations": own_it,
                        "sparse_seconds": t_sparse,
                        "sparse_transport_seconds": sparse.info["timings"].get("transport"),
                        "dense_iterations": dense.info["iterations"],
                        "sparse_iterations": sparse.info["iterations"],
                        "sparse_edges": sparse.info["n_edges"],
                        "load": load(),
                    }
                    out.append(row)
                    print(json.dumps(row), flush=True)
    lines = [
        "| dataset | noise | suspects | cost | k | same candidate (all / dense share >= 0.3) "
        f"| same proposal at cut {cut0:.1f} | at 0.5 / 0.7 | share bias (sparse - dense) "
        "| dense mass off the graph (mean / q90) | dense POT s | own solver, full matrix s "
        "| sparse s (transport s) | sparse edges | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out:
        c = r["same_proposal_at_cut"]
        lines.append(
            f"| {r['dataset']} | {r['noise']:.0%} | {r['n_suspects']} | {r['cost']} | {r['k']} | "
            f"{r['same_candidate']:.4f} / {r['same_candidate_dense_share_ge_0.3']:.4f} | "
            f"**{c[f'{cut0:.1f}']:.4f}** | {c['0.5']:.4f} / {c['0.7']:.4f} | "
            f"{r['share_bias_sparse_minus_dense']:+.4f} | "
            f"{r['off_graph_mass_mean']:.3f} / {r['off_graph_mass_q90']:.3f} | "
            f"{r['dense_pot_seconds']:.1f} | {r['dense_own_solver_seconds']:.1f} | "
            f"{r['sparse_seconds']:.1f} ({r['sparse_transport_seconds']:.2f}) | "
            f"{r['sparse_edges']:,} | {r['load']} |"
        )
    print("\n".join(lines))
    return {"rows": out, "table": "\n".join(lines)}


def _own_dense_seconds(R, d, sus, cost, k, kw) -> tuple[float, int]:
    """Time pmpclean's edge solver on the full matrix (the dense problem POT solves)."""
    original = R._pot_dense
    timing: dict = {}

    def own(full, allowed, a, b, *, mass, eps, max_iter, tol):
        r, c = np.nonzero(allowed)
        t = time.perf_counter()
        lp, info = R.partial_transport(
            r, c, full[r, c], a, b, mass=mass, eps=eps, max_iter=max_iter, tol=tol
        )
        timing.update(seconds=time.perf_counter() - t, iterations=info["iterations"])
        plan = np.zeros(full.shape)
        plan[r, c] = np.exp(lp)
        return plan, info

    R._pot_dense = own
    try:
        R.rematch(
            d["image_emb"],
            d["text_emb"],
            sus,
            cost=cost,
            k=k,
            solver="dense",
            block_size=8192,
            max_iter=20000,
            **kw,
        )
    finally:
        R._pot_dense = original
    return timing["seconds"], timing["iterations"]


def _scaling_child(n: int, dim: int, cost: str, k: int) -> dict:
    """Runs in a fresh process: generate n suspects, reset the peak RSS, rematch."""
    from pmpclean.rematching import rematch
    from pmpclean.synthetic import clip_like_pairs

    # noise 0.8: n suspects among n / 0.8 rows, the clean rest supplies the learned
    # cost's key points; generated in chunks of 100k rows (independent seeds)
    chunk = 100_000
    n_rows = int(np.ceil(n / 0.8))
    img = np.empty((n_rows, dim), dtype=np.float32)
    txt = np.empty((n_rows, dim), dtype=np.float32)
    groups = np.empty(n_rows, dtype=np.int64)
    sus = np.empty(n_rows, dtype=bool)
    for lo in range(0, n_rows, chunk):
        m = min(chunk, n_rows - lo)
        s = clip_like_pairs(m, dim=dim, noise_rate=0.8, seed=lo // chunk)
        img[lo : lo + m] = s.image_emb
        txt[lo : lo + m] = s.text_emb
        groups[lo : lo + m] = s.image_group + lo
        sus[lo : lo + m] = s.is_mismatched
        del s
    n = int(sus.sum())

    def vm(field: str) -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024**2  # GiB
        return float("nan")

    base = vm("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = rematch(img, txt, sus, image_group=groups, cost=cost, k=k, seed=0)
    secs = time.perf_counter() - t
    return {
        "n_suspects": n,
        "dim": dim,
        "cost": r.info["cost_used"],
        "k": k,
        "seconds": secs,
        "timings": r.info["timings"],
        "iterations": r.info["iterations"],
        "n_edges": r.info["n_edges"],
        "rss_before_gib": base,
        "peak_rss_gib": vm("VmHWM"),
        "peak_extra_gib": vm("VmHWM") - base,
        "n_proposals": r.info["n_proposals"],
    }


def section_scaling(args) -> dict:
    out = []
    for n in args.sizes:
        dim = args.dim
        before = load()
        cmd = [sys.executable, __file__, "_scaling_child", str(n), str(dim), args.cost, str(args.k)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:])
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["load_before"] = before
        row["load_after"] = load()
        out.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        "| suspects | dim | cost | edges | total s | neighbours s | cost s | transport s | "
        "proposals s | iterations | peak extra GiB | load (1/5/15 min) before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out:
        t = r["timings"]
        lines.append(
            f"| {r['n_suspects']:,} | {r['dim']} | {r['cost']} | {r['n_edges']:,} | "
            f"{r['seconds']:.1f} | {t.get('neighbours', 0):.1f} | {t.get('cost', 0):.1f} | "
            f"{t.get('transport', 0):.1f} | {t.get('proposals', 0):.1f} | {r['iterations']} | "
            f"{r['peak_extra_gib']:.2f} | {r['load_before']} -> {r['load_after']} |"
        )
    print("\n".join(lines))
    return {"rows": out, "table": "\n".join(lines)}


def section_sweep(args) -> dict:
    from pmpclean.rematching import rematch

    out = []
    for ds in args.datasets:
        for noise in args.noise:
            d = dataset(ds, noise)
            for mode in args.suspects:
                sus = d["is_mismatched"].copy() if mode == "truth" else detected_suspects(d)
                rows = np.flatnonzero(sus)
                for cost, seed in [(c, sd) for c in args.costs for sd in args.seeds]:
                    for mass in args.mass:
                        for reg in args.reg:
                            for k in args.k:
                                with warnings.catch_warnings():
                                    warnings.simplefilter("ignore")
                                    t = time.perf_counter()
                                    r = rematch(
                                        d["image_emb"],
                                        d["text_emb"],
                                        sus,
                                        cost=cost,
                                        mass=mass,
                                        reg=reg,
                                        k=k,
                                        image_group=d["image_group"],
                                        text_group=d["text_group"],
                                        clean=~sus,
                                        seed=seed,
                                    )
                                    secs = time.perf_counter() - t
                                s = summarise(
                                    d, rows, r.candidate_row, r.candidate_confidence, None
                                )
                                cov, prec, f = curve(
                                    d, rows, r.candidate_row, r.candidate_confidence
                                )
                                cuts = {}
                                for c in args.cuts:
                                    m = int((f >= c).sum())
                                    cuts[f"{c:.2f}"] = (
                                        float(prec[m - 1]) if m else None,
                                        m / max(rows.size, 1),
                                    )
                                row = dict(
                                    dataset=ds,
                                    noise=noise,
                                    suspects=mode,
                                    cost=cost,
                                    seed=seed,
                                    mass=mass,
                                    reg=reg,
                                    k=k,
                                    seconds=secs,
                                    cuts=cuts,
                                    cost_used=r.info["cost_used"],
                                    **s,
                                )
                                out.append(row)
                                print(
                                    json.dumps(
                                        {
                                            x: row[x]
                                            for x in (
                                                "dataset",
                                                "noise",
                                                "suspects",
                                                "cost",
                                                "seed",
                                                "mass",
                                                "reg",
                                                "k",
                                                "coverage_at_p90",
                                                "cuts",
                                                "seconds",
                                            )
                                        }
                                    ),
                                    flush=True,
                                )
    return {"rows": out}


def section_ablation(args) -> dict:
    """Learned-cost feature sets (and the fixed cost) over seeds: coverage at p >= 0.9."""
    import pmpclean.rematching as R
    from pmpclean.cost import FEATURE_NAMES

    sets = {
        "sim": ("sim",),
        "sim+margins": ("sim", "row_margin", "col_margin"),
        "sim+csls (default)": ("sim", "row_csls", "col_csls"),
        "all five": FEATURE_NAMES,
    }
    out = []
    default = R._EDGE_FEATURES
    try:
        for ds in args.datasets:
            for noise in args.noise:
                d = dataset(ds, noise)
                for mode in args.suspects:
                    sus = d["is_mismatched"].copy() if mode == "truth" else detected_suspects(d)
                    rows = np.flatnonzero(sus)
                    for name, use in [("fixed", None), *sets.items()]:
                        covs = []
                        for seed in args.seeds:
                            R._EDGE_FEATURES = use if use else default
                            with warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                r = R.rematch(
                                    d["image_emb"],
                                    d["text_emb"],
                                    sus,
                                    cost="fixed" if use is None else "learned",
                                    image_group=d["image_group"],
                                    text_group=d["text_group"],
                                    clean=~sus,
                                    seed=seed,
                                )
                            covs.append(
                                summarise(d, rows, r.candidate_row, r.candidate_confidence, None)[
                                    "coverage_at_p90"
                                ]
                            )
                        row = {
                            "dataset": ds,
                            "noise": noise,
                            "suspects": mode,
                            "cost": name,
                            "coverage_at_p90": covs,
                        }
                        out.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        R._EDGE_FEATURES = default
    lines = [
        "| dataset | noise | suspects | " + " | ".join(["fixed", *sets]) + " |",
        "|---|---|---|" + "---|" * (len(sets) + 1),
    ]
    keyed = {(r["dataset"], r["noise"], r["suspects"], r["cost"]): r for r in out}
    for ds in args.datasets:
        for noise in args.noise:
            for mode in args.suspects:
                cells = []
                for name in ["fixed", *sets]:
                    c = keyed[(ds, noise, mode, name)]["coverage_at_p90"]
                    cells.append(f"{np.mean(c):.3f} ({min(c):.3f}-{max(c):.3f})")
                lines.append(f"| {ds} | {noise:.0%} | {mode} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return {"rows": out, "table": "\n".join(lines)}


def section_papercost(args) -> dict:
    """The paper's cost network against the fixed cost with every suspect in one batch.

    One batch of all suspects makes every true caption reachable, which isolates the
    cost network from the batch effect (its width is then the number of suspects).
    ``lr`` is the network's Adam learning rate (the authors use 2e-6); training is one
    step per batch, as in their code.
    """
    import pmpclean.cost as C
    import pmpclean.rematching as R

    out = []
    original = R.fit_paper_cost
    try:
        for ds in args.datasets:
            d = dataset(ds, 0.2)
            sus = d["is_mismatched"]
            rows = np.flatnonzero(sus)
            kw = {
                "image_group": d["image_group"],
                "text_group": d["text_group"],
                "clean": ~sus,
                "seed": 0,
                "batch_size": int(sus.sum()),
                "solver": "batch",
            }
            for name, cost, lr in (
                ("fixed", "fixed", None),
                ("paper lr=2e-6", "paper", 2e-6),
                ("paper lr=1e-3", "paper", 1e-3),
                ("paper lr=1e-2", "paper", 1e-2),
            ):
                if lr is not None:
                    R.fit_paper_cost = lambda s, sup, lr=lr: C.fit_paper_cost(s, sup, lr=lr)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = R.rematch(d["image_emb"], d["text_emb"], sus, cost=cost, **kw)
                res = summarise(d, rows, r.candidate_row, r.candidate_confidence, None)
                row = {
                    "dataset": ds,
                    "noise": 0.2,
                    "cost": name,
                    "coverage_at_p90": res["coverage_at_p90"],
                    "precision_at_coverage": res["precision_at_coverage"],
                }
                out.append(row)
                print(json.dumps(row), flush=True)
    finally:
        R.fit_paper_cost = original
    lines = [
        "| dataset | cost (one batch of all suspects) | cov@p>=.9 | "
        + " | ".join(f"p@{g}" for g in GRID)
        + " |",
        "|---|---|---|" + "---|" * len(GRID),
    ]
    for r in out:
        p = r["precision_at_coverage"]
        lines.append(
            f"| {r['dataset']} | {r['cost']} | {r['coverage_at_p90']:.3f} | "
            + " | ".join(fmt(p[f"{g:.1f}"]) for g in GRID)
            + " |"
        )
    print("\n".join(lines))
    return {"rows": out, "table": "\n".join(lines)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_scaling_child":
        n, dim, cost, k = int(argv[1]), int(argv[2]), argv[3], int(argv[4])
        print(json.dumps(_scaling_child(n, dim, cost, k)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "section",
        choices=["curves", "agreement", "scaling", "sweep", "ablation", "papercost", "manytomany"],
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", default=["flickr", "synthetic"])
    p.add_argument("--noise", nargs="+", type=float, default=[0.2, 0.4, 0.6, 0.8])
    p.add_argument("--suspects", nargs="+", default=["truth", "detected"])
    p.add_argument(
        "--methods",
        nargs="+",
        default=[
            "learned",
            "fixed",
            "learned-pool-all",
            "fixed-batch",
            "paper-cost",
            "paper",
            "hungarian",
            "nn",
        ],
    )
    p.add_argument("--sizes", nargs="+", type=int, default=[20_000, 50_000, 200_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--cost", default="learned")
    p.add_argument("--costs", nargs="+", default=["learned", "fixed"])
    p.add_argument("--k", nargs="+", type=int, default=[32])
    p.add_argument("--mass", nargs="+", type=float, default=[0.8])
    p.add_argument("--reg", nargs="+", type=float, default=[0.4])
    p.add_argument("--cuts", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.section == "scaling":
        args.k = args.k[0]
    fn = {
        "curves": section_curves,
        "agreement": section_agreement,
        "scaling": section_scaling,
        "sweep": section_sweep,
        "ablation": section_ablation,
        "papercost": section_papercost,
        "manytomany": section_manytomany,
    }[args.section]
    t = time.perf_counter()
    res = fn(args)
    res.update(
        command="python benchmarks/bench_rematch.py " + " ".join(argv),
        seconds=time.perf_counter() - t,
        machine={
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"rematch_{args.section}{'_' + args.tag if args.tag else ''}.json"
    from pmpclean._utils import atomic_open

    with atomic_open(RESULTS / name, "w") as fh:
        json.dump(res, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
