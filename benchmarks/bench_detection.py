"""Mismatch detection benchmark: pmpclean versus CLIP-score filtering baselines.

Side by side, on the same corrupted data:

* ``pmpclean``: :func:`pmpclean.score.pair_scores` (CSLS-style relative score against
  the dataset's k nearest alternatives on both sides) + :func:`pmpclean.split.split_pairs`
  (two-component mixture, default threshold 0.5), all defaults;
* ``cos>=0.28``: fixed CLIP-score threshold (LAION-400M style);
* ``drop30%``: drop the lowest 30 % of cosines (DataComp-style percentile filter);
* ``gmm(cos)``: a two-component Gaussian mixture on the raw cosine (sklearn), clean
  when the high-mean component's posterior > 0.5.

Positive class = mismatched. ``best-F1`` columns give the F1 of the same ranking at
the threshold chosen *on the truth*: an upper bound for any threshold rule on that score.

Datasets: Flickr8k captions embedded with all-MiniLM-L6-v2 (caption #0 as the image
side, caption #1 as the text side; see ``_datasets.py``), with shuffle and hard noise,
and the CLIP-like synthetic geometry (``pmpclean.synthetic``) at 10k pairs.

Run (from the project root)::

    python benchmarks/bench_detection.py --out benchmarks/results/detection.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _datasets as D  # noqa: E402

from pmpclean.evaluate import auroc, detection_metrics  # noqa: E402
from pmpclean.score import pair_scores  # noqa: E402
from pmpclean.split import split_pairs  # noqa: E402


def best_f1(y: np.ndarray, score: np.ndarray) -> float:
    """Max F1 over all thresholds "flag if score <= t" (oracle threshold)."""
    order = np.argsort(score, kind="mergesort")
    ys = y[order]
    tp = np.cumsum(ys)
    k = np.arange(1, ys.size + 1)
    f1 = 2 * tp / (k + y.sum())
    return float(f1.max()) if y.any() else float("nan")


def gmm_cosine(sim: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    from sklearn.mixture import GaussianMixture

    g = GaussianMixture(2, random_state=seed).fit(sim[:, None])
    hi = int(np.argmax(g.means_.ravel()))
    post = g.predict_proba(sim[:, None])[:, hi]
    return post < 0.5, float(1.0 - post.mean())


def run_one(d: dict, *, k: int, method: str, seed: int) -> list[dict]:
    y = d["is_mismatched"]
    t0 = time.perf_counter()
    ps = pair_scores(
        d["image_emb"],
        d["text_emb"],
        image_group=d["image_group"],
        text_group=d["text_group"],
        valid=d["valid"],
        k=k,
        method=method,
        seed=seed,
    )
    sp = split_pairs(ps.score, seed=seed)
    secs = time.perf_counter() - t0
    sim = ps.similarity
    rows = []

    def add(name: str, pred: np.ndarray, ranking: np.ndarray, est: float, extra: str = "") -> None:
        m = detection_metrics(y, np.zeros(y.size), pred)
        rows.append(
            {
                "method": name,
                "f1": m["f1"],
                "precision": m["precision"],
                "recall": m["recall"],
                "auroc": auroc(y, -ranking),
                "best_f1": best_f1(y, ranking),
                "est_rate": est,
                "flagged": float(pred.mean()),
                "extra": extra,
            }
        )

    add("pmpclean", sp.is_mismatched, ps.score, sp.noise_rate, f"{secs:.1f}s")
    add("cos>=0.28", sim < 0.28, sim, float("nan"))
    add("drop30%", sim < np.quantile(sim, 0.30), sim, float("nan"))
    pred, est = gmm_cosine(sim, seed)
    add("gmm(cos)", pred, sim, est)
    return rows


def fmt(x: float) -> str:
    return "—" if not np.isfinite(x) else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--method", default="csls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--synthetic-n", type=int, default=10_000)
    ap.add_argument("--skip-flickr", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    args = ap.parse_args(argv)

    suites: list[tuple[str, str, object]] = []
    if not args.skip_flickr:
        suites.append(
            ("flickr8k-minilm", "shuffle", lambda r, m: D.flickr8k_pairs(r, m, args.seed))
        )
        suites.append(("flickr8k-minilm", "hard", lambda r, m: D.flickr8k_pairs(r, m, args.seed)))
        suites.append(
            (
                "flickr8k-minilm, 4 captions/image",
                "shuffle",
                lambda r, m: D.flickr8k_pairs(r, m, args.seed, captions_per_image=4),
            )
        )
    if not args.skip_synthetic:
        n = args.synthetic_n
        suites.append(
            (
                f"synthetic CLIP-like {n // 1000}k",
                "shuffle",
                lambda r, m: D.synthetic_pairs(n, r, m, args.seed),
            )
        )
        suites.append(
            (
                f"synthetic CLIP-like {n // 1000}k",
                "hard",
                lambda r, m: D.synthetic_pairs(n, r, m, args.seed),
            )
        )
        suites.append(
            (
                f"synthetic CLIP-like {n // 1000}k, 5 captions/image, 5% duplicate texts",
                "shuffle",
                lambda r, m: D.synthetic_pairs(
                    n, r, m, args.seed, captions_per_image=5, duplicate_fraction=0.05
                ),
            )
        )

    lines: list[str] = []
    summary: list[tuple[str, str, float, float, float, float]] = []
    for name, mode, make in suites:
        lines.append(f"\n### {name}, {mode} noise\n")
        lines.append(
            "| noise | method | F1 | precision | recall | AUROC | best-F1 "
            "| est. rate | flagged | time |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for rate in args.rates:
            if mode == "hard" and rate == 0.0:
                continue
            d = make(rate, mode)  # type: ignore[operator]
            n_rows = len(d["is_mismatched"])
            for row in run_one(d, k=args.k, method=args.method, seed=args.seed):
                bold = "**" if row["method"] == "pmpclean" else ""
                lines.append(
                    f"| {rate:.0%} | {bold}{row['method']}{bold} | {bold}{fmt(row['f1'])}{bold} | "
                    f"{fmt(row['precision'])} | {fmt(row['recall'])} | {fmt(row['auroc'])} | "
                    f"{fmt(row['best_f1'])} | {fmt(row['est_rate'])} | {row['flagged']:.3f} | "
                    f"{row['extra']} |"
                )
                if row["method"] in ("pmpclean", "gmm(cos)"):
                    summary.append((name, mode, rate, row["f1"], row["best_f1"], row["est_rate"]))
            print(f"{name} {mode} {rate:.0%} n={n_rows} done", file=sys.stderr, flush=True)

    head = [
        "# Detection benchmark",
        "",
        "Produced by (from the project root, CPU, 2 shared cores):",
        "",
        "    " + " ".join(["python", "benchmarks/bench_detection.py", *sys.argv[1:]]),
        "",
        f"pmpclean settings: method={args.method}, k={args.k}, threshold=0.5 (defaults), "
        f"seed={args.seed}. Python {platform.python_version()}, numpy {np.__version__}.",
        "Positive class = mismatched. `best-F1` = F1 of the same ranking at the threshold picked "
        "on the truth (upper bound for that score). `est. rate` = the mixture's noise-rate "
        "estimate. `flagged` = fraction flagged. At 0 % noise every flag is a false alarm.",
    ]
    foot = [
        "",
        "## Reading the table",
        "",
        "- Shuffle noise is the paper protocol. From 20 % noise up, pmpclean's F1 at the "
        "default threshold is within 0.01 of the best F1 its ranking allows (`best-F1`) "
        "and above every baseline, on every dataset. At 5 % it is within 0.03 on the "
        "one-caption datasets, but on the synthetic 5-captions/duplicates set the "
        "mixture refuses to split and flags nothing (the raw-cosine mixture reaches 0.41 "
        "there). On clean data (0 %) pmpclean flags nothing, whereas the mixture on raw "
        "cosine flags 39-85 % of the rows and the fixed cosine threshold misfires as soon "
        "as the cosine band moves (synthetic rows).",
        "- The issue's target (F1 >= 0.97 at every rate on Flickr8k-MiniLM) is met at 80 % "
        "only. `benchmarks/results/detection_ceiling.md` shows why: even a classifier "
        "trained on the truth over every statistic reaches only about 0.92 / 0.95 / 0.97 / "
        "0.98 best-threshold F1 at 20 / 40 / 60 / 80 %, because 2-4 % of the true pairs "
        "(two captions of one photo) describe different things and sit inside the "
        "random-pair cosine band.",
        "- Hard noise (a caption of the most similar image): pmpclean ranks better than "
        "raw cosine (higher AUROC and best-F1) but its mixture usually refuses to split "
        "(the two populations overlap, `reason` in the mixture summary), so few or no rows "
        "are flagged at the default threshold and the noise rate is underestimated; the "
        "raw-cosine mixture, which always cuts, gets the higher F1 there from 20 % up. Use the "
        "`match_score` ranking for review.",
    ]
    text = "\n".join(head + lines + foot) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
