"""Does ``pmpclean finetune`` help? Retrieval after training on noisy captions (issue 5).

No pretrained CLIP weights can be downloaded here, so the evidence is built from what
runs offline: the same small open_clip architecture (``pmpclean-small``: 32 px images,
patch 8, width 64, two layers per tower, 64-d embeddings) is trained **from random
initialisation** on a generated image-caption dataset (``examples/make_toy_dataset.py``:
drawn shapes with templated captions) in which 20/40/60/80 % of the captions were
shuffled onto other images, three ways:

``plain``
    :func:`pmpclean.finetune.finetune` with ``method="contrastive"``: the usual
    symmetric InfoNCE on every pair of the noisy manifest.
``cleaned``
    ``pmpclean scan`` of the noisy manifest with the ``plain`` model (the only trained
    model there is to audit with), ``pmpclean rematch`` (policy ``rematch``: keep the
    clean pairs, take confident rematches, drop the rest), then plain InfoNCE on the
    cleaned manifest from random initialisation. Costs two trainings.
``cleaned-ref``
    The same, but the scan uses the dataset's reference embeddings
    (``embeddings.npz``, the toy generator's attribute encoder that the quickstart uses
    as its stand-in for a pretrained CLIP). This is the workflow with a good
    pretrained model at hand, and it sees information the other three methods do not
    have: a reference point, not a competitor.
``finetune``
    :func:`pmpclean.finetune.finetune` with its defaults (``method="l2rm"``): InfoNCE on
    the pairs the per-epoch loss mixture calls clean, soft targets from the in-batch
    partial-OT plan for the suspects. One training, no outside audit.

Every run uses the same data, order seed, epochs, batch size and learning-rate schedule,
trains for a fixed number of epochs with no model selection (the last epoch is
evaluated), and is scored by image-to-text and text-to-image R@1/5/10 on a **clean**
held-out set of 288 new drawings (every attribute combination once, one caption each,
never trained on). Captions often leave out the size or the background, so several
drawings fit a caption: R@1 is capped well below 100 even for a perfect model, and
R@5/R@10 are the informative numbers.

Usage::

    python benchmarks/bench_finetune.py [--noise 0.2 0.4 0.6 0.8] [--epochs 20]
        [--n-images 1000] [--seed 0] [--threads 1] [--work DIR]
        [--out benchmarks/results/finetune.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARCH = "pmpclean-small"
METHODS = ("plain", "cleaned", "cleaned-ref", "finetune")
NAMES = {
    "plain": "plain InfoNCE",
    "cleaned": "InfoNCE on cleaned manifest (scan with the plain model)",
    "cleaned-ref": "InfoNCE on cleaned manifest (scan with reference embeddings)",
    "finetune": "**pmpclean finetune**",
}


def _toy() -> Any:
    spec = importlib.util.spec_from_file_location(
        "make_toy_dataset", ROOT / "examples" / "make_toy_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def make_data(work: Path, *, n_images: int, noise: float, seed: int) -> Path:
    """Noisy training manifest with a ``true_row`` column (ground truth, for diagnostics)."""
    import pandas as pd

    out = work / f"train_noise{int(round(noise * 100))}"
    info = _toy().make_toy_dataset(
        out, n_images=n_images, captions_per_image=1, mismatch_rate=noise, seed=seed
    )
    frame = pd.read_csv(info["captions"], dtype=str, keep_default_na=False)
    truth = pd.read_csv(info["truth"])
    frame["true_row"] = truth["true_row"].astype(int)
    path = out / "manifest.csv"
    frame.to_csv(path, index=False)
    return path


def make_test(work: Path, *, seed: int) -> Path:
    """Clean held-out set: 288 drawings (every attribute combination once), one caption each."""
    info = _toy().make_toy_dataset(
        work / "test", n_images=288, captions_per_image=1, mismatch_rate=0.0, seed=seed + 10_000
    )
    return Path(info["captions"])


def train(
    manifest: Path | str, out: Path, *, method: str, args: argparse.Namespace
) -> dict[str, Any]:
    from pmpclean.finetune import finetune

    t0 = time.perf_counter()
    result = finetune(
        manifest,
        out_dir=out,
        model=ARCH,
        pretrained="none",
        method=method,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=0.0,  # no model selection: the last epoch is evaluated on the test set
        truth_col="true_row" if method == "l2rm" else None,
        device="cpu",
        seed=args.seed,
        overwrite=True,
    )
    return {
        "checkpoint": str(result.checkpoint),
        "seconds": time.perf_counter() - t0,
        "metrics": result.metrics,
    }


def clean_manifest(
    noisy: Path, work: Path, *, name: str, seed: int, checkpoint: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """``pmpclean scan`` (with a model checkpoint, or the reference embeddings.npz), then
    ``pmpclean rematch`` -> a cleaned manifest beside the noisy one."""
    from pmpclean.config import EmbedConfig, ScanConfig
    from pmpclean.pipeline import rematch, scan

    if checkpoint is not None:
        embed = EmbedConfig(
            model=ARCH, pretrained=checkpoint, device="cpu", use_cache=False, workers=0
        )
    else:
        embed = EmbedConfig(embeddings=str(noisy.parent / "embeddings.npz"))
    cfg = ScanConfig(embed=embed, seed=seed)
    t0 = time.perf_counter()
    scan_dir = work / f"scan-{name}"
    res = scan(noisy, config=cfg, out_dir=scan_dir)
    cleaned = noisy.parent / f"{name}.csv"  # beside the manifest: image paths are relative
    rm = rematch(noisy, out=cleaned, policy="rematch", audit_dir=scan_dir, config=cfg, force=True)
    return cleaned, {
        "seconds": time.perf_counter() - t0,
        "detection": _detection(res.audit),
        "action_counts": res.summary.get("action_counts"),
        "n_cleaned": int(len(rm.cleaned)),
        "n_dropped": int(len(rm.dropped)),
    }


def _detection(audit: Any) -> dict[str, float]:
    """AUROC of 1 - match_score and F1 of is_mismatched against the injected truth."""
    import numpy as np
    from sklearn.metrics import f1_score, roc_auc_score

    truth = audit["true_row"].astype(int).to_numpy() != np.arange(len(audit))
    score = 1.0 - audit["match_score"].astype(float).fillna(0.5).to_numpy()
    pred = audit["is_mismatched"].astype(bool).to_numpy()
    tp = int((pred & truth).sum())
    return {
        "auroc": float(roc_auc_score(truth, score)),
        "f1": float(f1_score(truth, pred)),
        "precision": tp / max(1, int(pred.sum())),
        "recall": tp / max(1, int(truth.sum())),
    }


def residual_noise(cleaned: Path) -> float:
    """Fraction of cleaned rows whose caption belongs to another drawing (by attributes)."""
    import pandas as pd

    toy = _toy()
    frame = pd.read_csv(cleaned, dtype=str, keep_default_na=False)
    bad = 0
    for _, row in frame.iterrows():
        attrs = {k: row[k] for k in ("shape", "color", "background", "size")}
        said = toy.parse_caption(row["caption"])
        bad += any(attrs[k] != v for k, v in said.items())
    return bad / max(1, len(frame))


def evaluate(ckpt: str, test: Path) -> dict[str, Any]:
    from pmpclean.finetune import evaluate_retrieval

    return evaluate_retrieval(test, model=ARCH, pretrained=ckpt, device="cpu")


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pmpclean-bench-ft-"))
    work.mkdir(parents=True, exist_ok=True)
    test = make_test(work, seed=args.seed)
    rows: list[dict[str, Any]] = []
    for noise in args.noise:
        tag = f"noise{int(round(noise * 100))}"
        noisy = make_data(work, n_images=args.n_images, noise=noise, seed=args.seed)
        print(f"[{tag}] training plain", flush=True)
        plain = train(noisy, work / tag / "plain", method="contrastive", args=args)
        plain_eval = evaluate(plain["checkpoint"], test)
        rows.append(
            {"noise": noise, "method": "plain", "seconds": plain["seconds"], "test": plain_eval}
        )
        print(f"[{tag}] plain rsum {plain_eval['rsum']:.1f} ({plain['seconds']:.0f}s)", flush=True)

        for name, ckpt in (("cleaned", plain["checkpoint"]), ("cleaned-ref", None)):
            print(f"[{tag}] {name}: scan + rematch, then plain InfoNCE", flush=True)
            cleaned, audit = clean_manifest(
                noisy, work / tag, name=name, seed=args.seed, checkpoint=ckpt
            )
            audit["residual_noise"] = residual_noise(cleaned)
            cl = train(cleaned, work / tag / name, method="contrastive", args=args)
            cl_eval = evaluate(cl["checkpoint"], test)
            extra = plain["seconds"] if ckpt is not None else 0.0
            rows.append(
                {
                    "noise": noise,
                    "method": name,
                    "seconds": cl["seconds"] + audit["seconds"] + extra,
                    "test": cl_eval,
                    "audit": audit,
                }
            )
            print(f"[{tag}] {name} rsum {cl_eval['rsum']:.1f}", flush=True)

        print(f"[{tag}] training finetune (l2rm)", flush=True)
        ft = train(noisy, work / tag / "finetune", method="l2rm", args=args)
        ft_eval = evaluate(ft["checkpoint"], test)
        splits = [h["split"] for h in ft["metrics"]["history"] if h["split"].get("quality")]
        rows.append(
            {
                "noise": noise,
                "method": "finetune",
                "seconds": ft["seconds"],
                "test": ft_eval,
                "split": splits[-1] if splits else None,
                "split_warmup_epochs": ft["metrics"]["resolved"]["split_warmup_epochs"],
                "split_start_epoch": ft["metrics"]["split_start_epoch"],
                "split_history": [
                    {"epoch": h["epoch"], **(h["split"].get("quality") or {})}
                    for h in ft["metrics"]["history"]
                ],
            }
        )
        print(f"[{tag}] finetune rsum {ft_eval['rsum']:.1f} ({ft['seconds']:.0f}s)", flush=True)
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "work": str(work)}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def render(result: dict[str, Any], args: argparse.Namespace, seconds: float, command: str) -> str:
    import numpy as np
    import open_clip
    import torch

    from pmpclean import __version__

    rows = result["rows"]
    lines = [
        "# Fine-tuning on noisy captions: plain vs cleaned manifest vs `pmpclean finetune`",
        "",
        "Produced by `benchmarks/bench_finetune.py` (see its docstring for the protocol).",
        "",
        "```",
        command,
        "```",
        "",
        f"- model `{ARCH}` from random initialisation (pmpclean/model_configs/{ARCH}.json); "
        f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g}, 5% warmup + cosine, "
        "identical for every method; no model selection (last epoch evaluated)",
        f"- training data: `make_toy_dataset(n_images={args.n_images}, captions_per_image=1, "
        f"mismatch_rate=NOISE, seed={args.seed})` (same drawings and captions at every noise rate)",
        f"- test data: 288 clean drawings, `make_toy_dataset(n_images=288, mismatch_rate=0, "
        f"seed={args.seed + 10_000})`, one caption each",
        f"- seed {args.seed} (data order, split mixtures); "
        "random init seed = pmpclean.embedding.RANDOM_SEED",
        f"- torch threads {args.threads}; total wall time {seconds / 60:.1f} min "
        f"(shared machine: other jobs were running)",
        f"- pmpclean {__version__}, torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"numpy {np.__version__}, python {platform.python_version()}",
        "",
        "## Test retrieval (clean held-out set; recall in %, higher is better)",
        "",
        _row(
            ["noise", "method"]
            + [f"{d} R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
            + ["R-sum", "train s"]
        ),
        _row(["---"] * 10),
    ]
    for r in rows:
        t = r["test"]
        i, x = t["image_to_text"], t["text_to_image"]
        name = NAMES[r["method"]]
        cells = [f"{int(r['noise'] * 100)}%", name]
        cells += [_fmt(d[f"R@{k}"]) for d in (i, x) for k in (1, 5, 10)]
        lines.append(_row(cells + [_fmt(t["rsum"]), f"{r['seconds']:.0f}"]))
    lines += ["", "## Margin of `pmpclean finetune` over plain training (R-sum points)", ""]
    lines += [
        _row(["noise", "finetune - plain", "finetune - cleaned", "finetune - cleaned-ref"]),
        _row(["---"] * 4),
    ]
    by = {(r["noise"], r["method"]): r for r in rows}
    noises = sorted({r["noise"] for r in rows})
    for noise in noises:
        f = by[(noise, "finetune")]["test"]["rsum"]
        cells = [f"{int(noise * 100)}%"]
        cells += [f"{f - by[(noise, m)]['test']['rsum']:+.1f}" for m in METHODS[:3]]
        lines.append(_row(cells))
    margins = [
        by[(n, "finetune")]["test"]["rsum"] - by[(n, "plain")]["test"]["rsum"] for n in noises
    ]
    beats = all(m > 0 for m in margins)
    grows = all(b >= a for a, b in zip(margins, margins[1:], strict=False))
    lines += [
        "",
        f"- `pmpclean finetune` beats plain training at every noise rate: "
        f"**{'yes' if beats else 'no'}** (R-sum margins "
        + ", ".join(f"{m:+.1f}" for m in margins)
        + ")",
        f"- the margin grows with every step up in noise: **{'yes' if grows else 'no'}**",
        "",
        "Notes",
        "",
        "- `cleaned` equals `plain` whenever the scan with the plain model flags nothing "
        "(the rematch then keeps every row, and training is deterministic): see the "
        "diagnostics below.",
        "- `cleaned-ref` audits with the toy generator's reference embeddings, which read the "
        "drawing attributes and parse the captions: the stand-in for a strong pretrained CLIP, "
        "information the other methods do not have. It bounds what a cleaned manifest can do.",
        "- One seed; differences of a few R-sum points are within seed noise.",
        "- `pmpclean finetune` runs with its defaults. One of them was revised after an "
        "earlier run of this benchmark: with a fixed 3-epoch warm-up the first split came "
        "before the model had learned anything at 60-80% noise (it then lost to plain "
        "training at 80%: R-sum 34.4 vs 39.9). The adaptive start that replaced it (split "
        "once the training loss is 5% below chance) was compared with the fixed warm-up on "
        "a separate development setting (training data seed 1, test seed 99: 121 vs 115 "
        "R-sum at 60%, 37 vs 16 at 80%) before this run.",
        "- The margin shrinks at 80%: from scratch the model hardly learns there (plain R-sum "
        "about 40), so its per-pair losses separate the mismatches only weakly (split AUROC "
        "below) and the split finds few of them; with 20% clean pairs, a good audit "
        "(`cleaned-ref`) is what makes the difference.",
    ]
    same = all(
        by[(n, "cleaned")]["test"]["rsum"] == by[(n, "plain")]["test"]["rsum"] for n in noises
    )
    if same:
        lines.append(
            "- Here the scan with the plain model flagged no pair at any noise rate (its split "
            "judged the two mixture components to overlap, although `match_score` ranks the "
            "mismatches with the AUROC shown below), so `cleaned` trained on the full noisy "
            "manifest."
        )
    lines += [
        "",
        "## Diagnostics",
        "",
        "`finetune`: its clean/suspect split of the last epoch against the injected truth "
        "(positive = mismatched; AUROC of the clean probability). `cleaned` and "
        "`cleaned-ref`: the scan's detection (AUROC of `match_score`, F1 of "
        "`is_mismatched`), the rows kept by `pmpclean rematch`, and the share of kept rows "
        "whose caption names an attribute the drawing does not have.",
        "",
        _row(
            ["noise", "what", "first split", "precision", "recall", "F1", "AUROC", "rows kept"]
            + ["wrong captions"]
        ),
        _row(["---"] * 9),
    ]

    def g(d: dict[str, Any], k: str) -> str:
        v = d.get(k)
        return "n/a" if v is None else f"{v:.2f}"

    for noise in noises:
        f = by[(noise, "finetune")]
        q = (f.get("split") or {}).get("quality") or {}
        prec, rec = q.get("precision"), q.get("recall")
        f1 = None if not prec or not rec else 2 * prec * rec / (prec + rec)
        start = f.get("split_start_epoch")
        cells = [
            f"{int(noise * 100)}%",
            "finetune split",
            "none" if start is None else f"epoch {start}",
        ]
        cells += [g(q, "precision"), g(q, "recall"), g({"f1": f1}, "f1"), g(q, "auroc")]
        lines.append(_row(cells + ["all (suspects: soft targets)", "n/a"]))
        for m in ("cleaned", "cleaned-ref"):
            a = by[(noise, m)].get("audit") or {}
            ev = a.get("detection") or {}
            cells = [f"{int(noise * 100)}%", f"{m} scan", ""]
            cells += [g(ev, "precision"), g(ev, "recall"), g(ev, "f1"), g(ev, "auroc")]
            cells += [f"{a.get('n_cleaned')} / {args.n_images}"]
            cells += [f"{100 * a.get('residual_noise', float('nan')):.0f}%"]
            lines.append(_row(cells))
    lines += ["", "Raw numbers:", "", "```json", json.dumps(rows, indent=1, default=str), "```", ""]
    return "\n".join(lines)


def _rerender(src: Path, out: Path, parser: argparse.ArgumentParser) -> None:
    """Rebuild the markdown from the command, wall time and raw numbers stored in ``src``."""
    import re

    text = src.read_text(encoding="utf-8")
    command = text.split("```\n", 2)[1].strip()
    minutes = float(re.search(r"total wall time ([0-9.]+) min", text).group(1))  # type: ignore[union-attr]
    rows = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
    old_args = parser.parse_args(command.split()[2:])
    out.write_text(render({"rows": rows}, old_args, minutes * 60, command), encoding="utf-8")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--work", default=None, help="working folder (default: a temp dir, removed)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary working folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune.md"))
    parser.add_argument(
        "--render-from",
        default=None,
        help="re-render an earlier results file from its raw numbers (no training)",
    )
    args = parser.parse_args(argv)
    if args.render_from:
        _rerender(Path(args.render_from), Path(args.out), parser)
        return

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("PMPCLEAN_CACHE_DIR", tempfile.mkdtemp(prefix="pmpclean-cache-"))
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    result = run(args)
    seconds = time.perf_counter() - t0
    command = "python benchmarks/bench_finetune.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = render(result, args, seconds, command.strip())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
