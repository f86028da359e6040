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
    ``solver="dense"``) on 2-5k suspects: fraction of rows with the same candidate,
    and with the same proposal at the default cut; solver wall times.

``scaling``
    Wall time and peak memory (VmHWM of the process during the call) of
    :func:`rematch` at 10k / 100k / 1M suspects on CLIP-like synthetic embeddings
    (``pmpclean.synthetic.clip_like_pairs``, every row shuffled, generated in chunks
    of 100k), with ``uptime`` load.

``sweep``
    Grid over mass / reg / k / min_confidence used to pick the defaults.

``ablation``
    Feature sets of the learned cost (and the fixed cost), over seeds.

Usage::

    python benchmarks/bench_rematch.py curves [--datasets flickr synthetic]
        [--noise 0.2 0.4 0.6 0.8] [--suspects truth detected]
    python benchmarks/bench_rematch.py agreement
    python benchmarks/bench_rematch.py scaling [--sizes 10000 100000 1000000]
    python benchmarks/bench_rematch.py sweep [--mass ...] [--reg ...] [--k ...]
    python benchmarks/bench_rematch.py ablation [--seeds 0 1 2]
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


def run_method(name: str, d: dict, sus: np.ndarray, seed: int = 0):
    from pmpclean.rematching import rematch

    rows = np.flatnonzero(sus)
    kw = {
        "image_group": d["image_group"],
        "text_group": d["text_group"],
        "valid": d["valid"],
        "clean": d["valid"] & ~sus,
        "seed": seed,
    }
    t = time.perf_counter()
    cut = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in ("learned", "fixed"):
            r = rematch(d["image_emb"], d["text_emb"], sus, cost=name, **kw)
            cand, conf, cut = r.candidate_row, r.candidate_confidence, r.info["min_confidence"]
        elif name == "learned-pool-all":
            r = rematch(d["image_emb"], d["text_emb"], sus, cost="learned", pool="all", **kw)
            cand, conf, cut = r.candidate_row, r.candidate_confidence, r.info["min_confidence"]
        elif name == "fixed-batch":
            r = rematch(d["image_emb"], d["text_emb"], sus, cost="fixed", solver="batch", **kw)
            cand, conf, cut = r.candidate_row, r.candidate_confidence, r.info["min_confidence"]
        elif name == "paper-cost":
            r = rematch(d["image_emb"], d["text_emb"], sus, cost="paper", **kw)
            cand, conf, cut = r.candidate_row, r.candidate_confidence, r.info["min_confidence"]
        elif name == "paper":
            r = rematch(
                d["image_emb"],
                d["text_emb"],
                sus,
                cost="paper",
                mass=0.1,
                reg=0.07,
                reg_units="cost",
                **kw,
            )
            cand, conf = r.candidate_row, r.candidate_confidence
        elif name == "hungarian":
            cand, conf = baseline_hungarian(d, rows)
        elif name == "nn":
            cand, conf = baseline_nn(d, rows)
        else:
            raise SystemExit(f"unknown method {name}")
    secs = time.perf_counter() - t
    out = summarise(d, rows, cand, conf, cut)
    out["seconds"] = secs
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


def section_agreement(args) -> dict:
    from pmpclean.rematching import rematch

    out = []
    plan = [
        ("flickr", 0.3, ("learned", "fixed")),
        ("synthetic", 0.3, ("learned", "fixed")),
        ("flickr", 0.6, ("learned",)),
    ]
    for ds, noise, costs in plan:
        d = dataset(ds, noise)
        sus = d["is_mismatched"]
        kw = {
            "image_group": d["image_group"],
            "text_group": d["text_group"],
            "clean": ~sus,
            "seed": 0,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for cost in costs:
                t = time.perf_counter()
                dense = rematch(
                    d["image_emb"],
                    d["text_emb"],
                    sus,
                    cost=cost,
                    solver="dense",
                    block_size=6000,
                    max_iter=5000,
                    **kw,
                )
                t_dense = time.perf_counter() - t
                t = time.perf_counter()
                sparse = rematch(d["image_emb"], d["text_emb"], sus, cost=cost, **kw)
                t_sparse = time.perf_counter() - t
                rows = np.flatnonzero(sus)
                same_cand = float((dense.candidate_row[rows] == sparse.candidate_row[rows]).mean())
                same_prop = float((dense.proposed_row[rows] == sparse.proposed_row[rows]).mean())
                row = {
                    "dataset": ds,
                    "noise": noise,
                    "cost": cost,
                    "n_suspects": int(rows.size),
                    "same_candidate": same_cand,
                    "same_proposal": same_prop,
                    "dense_seconds": t_dense,
                    "sparse_seconds": t_sparse,
                    "dense_iterations": dense.info["iterations"],
                    "sparse_iterations": sparse.info["iterations"],
                    "sparse_edges": sparse.info["n_edges"],
                    "load": load(),
                }
                out.append(row)
                print(json.dumps(row), flush=True)
    lines = [
        "| dataset | noise | suspects | cost | same candidate | same proposal (default cut) "
        "| dense POT s | sparse s | sparse edges | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out:
        lines.append(
            f"| {r['dataset']} | {r['noise']:.0%} | {r['n_suspects']} | {r['cost']} | "
            f"{r['same_candidate']:.4f} | {r['same_proposal']:.4f} | "
            f"{r['dense_seconds']:.1f} | {r['sparse_seconds']:.1f} | {r['sparse_edges']} "
            f"| {r['load']} |"
        )
    print("\n".join(lines))
    return {"rows": out, "table": "\n".join(lines)}


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
        dim = 512 if n <= 100_000 else 256
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
                for cost in args.costs:
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
                                        seed=0,
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_scaling_child":
        n, dim, cost, k = int(argv[1]), int(argv[2]), argv[3], int(argv[4])
        print(json.dumps(_scaling_child(n, dim, cost, k)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=["curves", "agreement", "scaling", "sweep", "ablation"])
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
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    p.add_argument("--cost", default="learned")
    p.add_argument("--costs", nargs="+", default=["learned", "fixed"])
    p.add_argument("--k", nargs="+", type=int, default=[32])
    p.add_argument("--mass", nargs="+", type=float, default=[0.8])
    p.add_argument("--reg", nargs="+", type=float, default=[0.2])
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
