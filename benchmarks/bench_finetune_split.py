"""Fine-tuning's loss split: scikit-learn's mixture (before) vs the scan's split (issue 14).

The self-audited ``finetune`` arm of ``bench_finetune.py`` (``method="l2rm"`` from random
initialisation on the toy drawings) trained with three versions of the per-epoch
clean/suspect split on the per-pair loss, back to back in one process on the same data:

``sklearn``
    The split fine-tuning uses (``pmpclean.train.targets._gmm_clean_probability``):
    scikit-learn's ``GaussianMixture`` (two components on the min-max scaled loss), no
    guard: it always cuts.
``split``
    :func:`pmpclean.split.split_pairs` on the negated loss with the scan's defaults:
    when the losses do not look like two populations (BIC, Ashman's D, the skewed
    single-population test) nothing is flagged.
``split-bic``
    ``split_pairs`` with ``min_separation=0, weak_separation=0``: only the BIC test.

Usage::

    python benchmarks/bench_finetune_split.py [--noise 0.2 0.4 0.6 0.8] [--n-images 500]
        [--epochs 20] [--variants sklearn split split-bic] [--threads 1]
        [--out benchmarks/results/finetune_split.md]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_finetune as bf  # noqa: E402

VARIANTS = ("sklearn", "split", "split-bic")


def split_clean_probability(
    loss: np.ndarray, *, seed: int, **split_options: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """The scan's split on the per-pair loss: ``split_pairs(-loss)``, low loss = clean."""
    from pmpclean.split import split_pairs

    if loss.size < 4 or float(np.ptp(loss)) < 1e-12:
        return np.ones_like(loss), {"weights": None, "means": None, "degenerate": True}
    sp = split_pairs(-loss, seed=seed, **split_options)
    mix = sp.mixture
    info = {
        "weights": mix["weights"],  # clean component first
        "means": [-m for m in mix["means"]],
        "stds": mix["stds"],
        "clean_component": 0,
        "separation": mix["separation"],
        "bimodal": mix["bimodal"],
        "reason": mix["reason"],
        "degenerate": False,
    }
    return np.asarray(sp.match_score, dtype=np.float64), info


def _split_fn(variant: str) -> Any:
    from pmpclean.train import targets

    if variant == "sklearn":
        return targets._gmm_clean_probability
    if variant == "split":
        return split_clean_probability
    return partial(split_clean_probability, min_separation=0.0, weak_separation=0.0)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from pmpclean.train import targets

    original = targets._gmm_clean_probability
    work = Path(tempfile.mkdtemp(prefix="pmpclean-bench-ftsplit-"))
    test = bf.make_test(work, seed=args.test_seed)
    rows = []
    try:
        for noise in args.noise:
            tag = f"noise{int(round(noise * 100))}"
            noisy = bf.make_data(work, n_images=args.n_images, noise=noise, seed=args.seed)
            for variant in args.variants:
                targets._gmm_clean_probability = _split_fn(variant)
                try:
                    ft = bf.train(noisy, work / tag / variant, method="l2rm", args=args)
                finally:
                    targets._gmm_clean_probability = original
                row = bf._l2rm_row(noise, variant, ft, test)
                hist = ft["metrics"]["history"]
                row["epochs_with_suspects"] = sum(1 for h in hist if h.get("suspect_pairs"))
                rows.append(row)
                print(f"[{tag}] {variant}: rsum {row['test']['rsum']:.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def render(rows: list[dict[str, Any]], args: argparse.Namespace, wall: float, cmd: str) -> str:
    import torch

    import pmpclean

    lines = [
        "# Fine-tuning's loss split: scikit-learn's mixture vs the scan's split",
        "",
        "Produced by `benchmarks/bench_finetune_split.py` (see its docstring).",
        "",
        "```",
        cmd,
        "```",
        "",
        f"- the self-audited `finetune` arm of `bench_finetune.py`: `pmpclean-small` from random "
        f"initialisation, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, "
        f"`make_toy_dataset(n_images={args.n_images}, captions_per_image=1, "
        f"mismatch_rate=NOISE, seed={args.seed})`, test: 288 clean drawings (seed "
        f"{args.test_seed}); the variants run back to back on the same data",
        f"- torch threads {args.threads}; total wall time {wall / 60:.1f} min (shared 2-core "
        "machine, other jobs running)",
        f"- pmpclean {pmpclean.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}",
        "",
        "| noise | split | R-sum | i2t R@5 | t2i R@5 | epochs with suspects | last split "
        "precision | recall | AUROC | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        q = (r["split"] or {}).get("quality") or {}
        t = r["test"]
        cells = [
            f"{int(round(r['noise'] * 100))}%",
            r["method"],
            f"{t['rsum']:.1f}",
            f"{t['image_to_text']['R@5']:.1f}",
            f"{t['text_to_image']['R@5']:.1f}",
            str(r["epochs_with_suspects"]),
            *(f"{q[k]:.3f}" if k in q else "-" for k in ("precision", "recall", "auroc")),
            f"{r['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--n-images", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-seed", type=int, default=10000)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/finetune_split.md"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = run(args)
    cmd = "python benchmarks/bench_finetune_split.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = render(rows, args, time.perf_counter() - t0, cmd.strip())
    Path(args.out).write_text(text, encoding="utf-8")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
