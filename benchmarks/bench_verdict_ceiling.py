"""Ceiling of "flag where a mismatch is more likely than not" on hard noise.

On Flickr8k-MiniLM (one caption per image) with hard and mixed noise, the pair scores
are split with the *true* densities of the clean and the mismatched rows (Gaussian
kernel densities fitted on the truth) and the *true* noise rate: the best any
calibration can do with this ranking under the rule the scan uses (flag where the
mismatch posterior exceeds 0.5). Beside it: the F1 of the same ranking at the best
threshold picked on the truth (`best-F1`), and pmpclean's calibrated split.

Run (from the project root)::

    python benchmarks/bench_verdict_ceiling.py --out benchmarks/results/verdict_ceiling.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _datasets as D  # noqa: E402
from bench_detection import best_f1  # noqa: E402

from pmpclean.config import ScanConfig  # noqa: E402
from pmpclean.pipeline import split_scores  # noqa: E402
from pmpclean.score import pair_scores  # noqa: E402


def f1(y: np.ndarray, flag: np.ndarray) -> float:
    return float(2 * (flag & y).sum() / max(1, flag.sum() + y.sum()))


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import gaussian_kde

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = []
    for mode in ("hard", "mixed"):
        for rate in (0.2, 0.4, 0.6, 0.8):
            d = D.flickr8k_pairs(rate, mode, args.seed)
            y = d["is_mismatched"]
            kw = {"image_group": d["image_group"], "text_group": d["text_group"]}
            ps = pair_scores(d["image_emb"], d["text_emb"], valid=d["valid"], seed=0, **kw)
            x = ps.score
            f0 = gaussian_kde(x[~y])(x)
            f1_ = gaussian_kde(x[y])(x)
            pi = float(y.mean())
            post = pi * f1_ / (pi * f1_ + (1 - pi) * f0)
            oracle = post > 0.5
            sp = split_scores(
                d["image_emb"],
                d["text_emb"],
                x,
                d["image_group"],
                d["text_group"],
                d["valid"],
                ScanConfig(),
            )
            best = best_f1(y, x)
            rows.append(
                f"| {mode} | {rate:.0%} | {best:.3f} | {f1(y, oracle):.3f} "
                f"({f1(y, oracle) / best:.2f} x) | {f1(y, sp.is_mismatched):.3f} "
                f"({f1(y, sp.is_mismatched) / best:.2f} x) |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    text = "\n".join(
        [
            "# Ceiling of the posterior > 0.5 rule on hard noise",
            "",
            "Produced by (from the project root):",
            "",
            "    " + " ".join(["python", "benchmarks/bench_verdict_ceiling.py", *sys.argv[1:]]),
            "",
            "Flickr8k-MiniLM, one caption per image. `oracle` = flag where the posterior from "
            "the true class densities and the true noise rate exceeds 0.5 (no calibration can "
            "beat it under that rule on this ranking); `pmpclean` = the calibrated split.",
            "",
            "| noise | rate | best-F1 | oracle F1 | pmpclean F1 |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
