"""Scan wall time and peak memory per stage at 10k / 100k / 1M pairs, from cached embeddings.

CLIP-like synthetic geometry (pmpclean.synthetic.clip_like_pairs: narrow cosine band,
modality gap, topic clusters, hubs), 512-d like ViT-B/32, 20% shuffled captions.
Generating 1M x 512 in one call would need float64 temporaries of several GB, so large
sizes are built from independently generated blocks of 100k pairs (each with its own
topics and hubs), concatenated; the scan sees one dataset of N rows.

Each size runs ``pmpclean.scan`` (``--embeddings`` path: no model) in a fresh
subprocess that samples its own resident memory every 50 ms; peak RSS is attributed
to the pipeline stage running at the time.

    python benchmarks/bench_scale.py --sizes 10000 100000 1000000 \
        --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BLOCK = 100_000


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_data(n: int, work: Path, *, dim: int, seed: int) -> tuple[Path, Path]:
    import pandas as pd

    from pmpclean.synthetic import clip_like_pairs

    manifest = work / f"scale_{n}.csv"
    emb = work / f"scale_{n}.npz"
    if manifest.exists() and emb.exists():
        return manifest, emb
    img = np.empty((n, dim), dtype=np.float32)
    txt = np.empty((n, dim), dtype=np.float32)
    frames = []
    for b, start in enumerate(range(0, n, BLOCK)):
        m = min(BLOCK, n - start)
        d = clip_like_pairs(m, dim=dim, noise_rate=0.2, seed=seed + b)
        img[start : start + m] = d.image_emb
        txt[start : start + m] = d.text_emb
        f = d.to_frame()
        f["image"] = [f"b{b}_{x}" for x in f["image"]]
        f["caption"] = [f"b{b} {x}" for x in f["caption"]]
        f["true_row"] = f["true_row"] + start
        frames.append(f)
    pd.concat(frames, ignore_index=True).to_csv(manifest, index=False)
    np.savez(emb, image=img, text=txt)
    return manifest, emb


def run_one(manifest: Path, emb: Path, out: Path, seed: int) -> dict:
    """Runs in the child process."""
    import pmpclean

    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.time(), _rss_mb()))
            stop.wait(0.05)

    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    t0 = time.time()
    cfg = pmpclean.ScanConfig(seed=seed).replace(
        embed__embeddings=str(emb), data__truth_col="true_row"
    )
    res = pmpclean.scan(manifest, config=cfg, out_dir=out)
    total = time.time() - t0
    stop.set()
    t.join()
    peak_by_stage = {}
    for name, a, b in res.summary.get("stage_spans", []):
        inside = [r for (ts, r) in samples if a <= ts <= b]
        peak_by_stage[name] = round(max(inside), 1) if inside else None
    ev = res.summary.get("evaluation") or {}
    return {
        "n_rows": res.summary["n_rows"],
        "wall_seconds": round(total, 2),
        "stage_seconds": res.summary["timings"],
        "stage_peak_rss_mb": peak_by_stage,
        "peak_rss_mb": round(max(r for _, r in samples), 1),
        "detection_f1": (ev.get("detection") or {}).get("f1"),
        "rematch": ev.get("rematch"),
        "n_proposed": (res.summary.get("rematch") or {}).get("n_proposed"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "scale")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    ap.add_argument("--child", nargs=3, metavar=("MANIFEST", "EMB", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        m, e, o = map(Path, args.child)
        print(json.dumps(run_one(m, e, o, args.seed)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        t0 = time.time()
        manifest, emb = make_data(n, args.work, dim=args.dim, seed=args.seed)
        gen = time.time() - t0
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [sys.executable, __file__, "--seed", str(args.seed), "--child", str(manifest), str(emb), tmp],
                capture_output=True,
                text=True,
            )
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"scan of {n} rows failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["generate_seconds"] = round(gen, 1)
        row["load_average"] = os.getloadavg()
        results.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "command": "python benchmarks/bench_scale.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
