"""Scan wall time, CPU time and peak memory per stage at 10k / 100k / 1M pairs (cached embeddings).

CLIP-like synthetic geometry (pmpclean.synthetic.clip_like_pairs: narrow cosine band,
modality gap, topic clusters, hubs), 512-d like ViT-B/32, 20% shuffled captions.
Generating 1M x 512 in one call would need float64 temporaries of several GB, so large
sizes are built from independently generated blocks of 100k pairs (each with its own
topics and hubs), concatenated; the scan sees one dataset of N rows. Blocks are
written straight into .npy files that are stored (uncompressed) in the .npz, so
generation never holds more than one block in memory.

Each size runs ``pmpclean.scan`` (``--embeddings`` path: no model) in a fresh
subprocess that samples its own resident memory and CPU time every 50 ms; peak RSS
and CPU seconds are attributed to the pipeline stage running at the time. The parent
samples the load average every 5 s while the child runs: the machine may be shared,
and wall times on a busy machine are inflated (CPU seconds much less so).

Rerun one size, e.g. the 1M row on a quiet machine (the result replaces that size's
entry in the json and the markdown is rewritten from the json)::

    python benchmarks/bench_scale.py --sizes 1000000

All sizes::

    python benchmarks/bench_scale.py --sizes 10000 100000 1000000

Exact vs approximate neighbour search at 100k (recorded under its own tag)::

    python benchmarks/bench_scale.py --sizes 100000 --exact-search-max 1000000000 --tag exact

Embedding loading: until ``pmpclean.embedding._normalise_rows`` works in chunks
(the lead applies that patch), loading 1M x 512 rows takes ~16 GB of float64
temporaries. The child then swaps in a chunked, in-place equivalent (same float64
arithmetic per row) and records ``"embedding_load": "lean (benchmark patch)"``;
once the library function has an ``inplace`` parameter nothing is patched.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BLOCK = 100_000


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def make_data(n: int, work: Path, *, dim: int, seed: int) -> tuple[Path, Path]:
    import pandas as pd

    from pmpclean.synthetic import clip_like_pairs

    manifest = work / f"scale_{n}.csv"
    emb = work / f"scale_{n}.npz"
    if manifest.exists() and emb.exists():
        return manifest, emb
    tmp = {k: work / f".scale_{n}_{k}.npy" for k in ("image", "text")}
    arrays = {
        k: np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(n, dim))
        for k, p in tmp.items()
    }
    frames = []
    for b, start in enumerate(range(0, n, BLOCK)):
        m = min(BLOCK, n - start)
        d = clip_like_pairs(m, dim=dim, noise_rate=0.2, seed=seed + b)
        arrays["image"][start : start + m] = d.image_emb
        arrays["text"][start : start + m] = d.text_emb
        f = d.to_frame()
        f["image"] = [f"b{b}_{x}" for x in f["image"]]
        f["caption"] = [f"b{b} {x}" for x in f["caption"]]
        f["true_row"] = f["true_row"] + start
        frames.append(f)
        del d
    for a in arrays.values():
        a.flush()
    del arrays
    pd.concat(frames, ignore_index=True).to_csv(manifest, index=False)
    part = emb.with_suffix(".part")
    with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k, p in tmp.items():
            zf.write(p, arcname=f"{k}.npy")  # what np.savez writes, member by member
    part.replace(emb)
    for p in tmp.values():
        p.unlink()
    return manifest, emb


def _lean_normalise_rows(x: np.ndarray) -> np.ndarray:
    """Chunked, in-place twin of pmpclean.embedding._normalise_rows (same arithmetic)."""
    x = np.asarray(x)
    out = (
        x
        if (x.dtype == np.float32 and x.flags.writeable and x.flags.c_contiguous)
        else (np.empty(x.shape, dtype=np.float32))
    )
    for lo in range(0, x.shape[0], 1 << 16):
        blk = np.asarray(x[lo : lo + (1 << 16)], dtype=np.float64)
        finite = np.isfinite(blk).all(axis=1)
        norms = np.linalg.norm(np.where(finite[:, None], blk, 0.0), axis=1)
        good = finite & (norms > 0)
        res = np.full(blk.shape, np.nan, dtype=np.float32)
        res[good] = (blk[good] / norms[good, None]).astype(np.float32)
        out[lo : lo + (1 << 16)] = res
    return out


def run_one(manifest: Path, emb: Path, out: Path, seed: int, changes: dict) -> dict:
    """Runs in the child process."""
    import pmpclean
    import pmpclean.embedding as embedding

    lean = "inplace" not in inspect.signature(embedding._normalise_rows).parameters
    if lean:
        embedding._normalise_rows = _lean_normalise_rows

    samples: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.time(), _rss_mb(), _cpu_s()))
            stop.wait(0.05)

    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    t0, c0 = time.time(), _cpu_s()
    cfg = pmpclean.ScanConfig(seed=seed).replace(
        embed__embeddings=str(emb), data__truth_col="true_row", **changes
    )
    res = pmpclean.scan(manifest, config=cfg, out_dir=out)
    total, cpu = time.time() - t0, _cpu_s() - c0
    stop.set()
    t.join()
    peak_by_stage, cpu_by_stage = {}, {}
    for name, a, b in res.summary.get("stage_spans", []):
        inside = [(r, c) for (ts, r, c) in samples if a <= ts <= b]
        peak_by_stage[name] = round(max(r for r, _ in inside), 1) if inside else None
        cpu_by_stage[name] = round(inside[-1][1] - inside[0][1], 1) if len(inside) > 1 else None
    ev = res.summary.get("evaluation") or {}
    rem = res.summary.get("rematch") or {}
    return {
        "n_rows": res.summary["n_rows"],
        "wall_seconds": round(total, 2),
        "cpu_seconds": round(cpu, 1),
        "stage_seconds": res.summary["timings"],
        "stage_cpu_seconds": cpu_by_stage,
        "stage_peak_rss_mb": peak_by_stage,
        "peak_rss_mb": round(max(r for _, r, _ in samples), 1),
        "detection": {
            k: (ev.get("detection") or {}).get(k) for k in ("f1", "precision", "recall", "auroc")
        },
        "detection_f1": (ev.get("detection") or {}).get("f1"),
        "verdict": res.summary.get("verdict"),
        "estimated_noise_rate_interval": res.summary.get("estimated_noise_rate_interval"),
        "rematch": ev.get("rematch"),
        "n_proposed": rem.get("n_proposed"),
        "rematch_timings": rem.get("timings"),
        "settings": {
            k: res.summary["settings"]["audit"].get(k)
            for k in ("exact_search_max", "search_nprobe", "mixture_fit_max", "k")
        },
        "embedding_load": "lean (benchmark patch)" if lean else "library",
    }


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_markdown(record: dict, path: Path) -> None:
    rows = record["results"]
    stages = ["read", "embed", "score", "split", "rematch", "write"]
    lines = [
        "# Scan at scale: 10k / 100k / 1M pairs from cached embeddings",
        "",
        "Synthetic CLIP-like pairs (512-d, 20 % shuffled captions, blocks of 100k with their "
        "own topics and hubs); `pmpclean.scan` on a manifest + `.npz` embeddings, ground truth "
        "from `true_row`. Machine: "
        f"{record['machine']['cpus']} CPUs, Python {record['machine']['python']}. "
        "Wall times depend on the load of other jobs on the machine (load average "
        "columns); CPU seconds are the process's own.",
        "",
        "Produced by (each row records its own command; rows are replaced per size and tag):",
        "",
        "```",
        *sorted({r.get("command", record.get("command", "")) for r in rows}),
        "```",
        "",
        "| size | tag | wall s | CPU s | "
        + " | ".join(f"{s} s" for s in stages)
        + " | peak RSS GB | det. F1 | rematch precision | rematch coverage"
        + " | load avg (mean / max) |",
        "|" + "---|" * (9 + len(stages)),
    ]
    for r in rows:
        st = r.get("stage_seconds", {})
        rem = r.get("rematch") or {}
        load = r.get("load_during_run") or {}
        lines.append(
            f"| {r['n_rows']:,} | {r.get('tag') or ''} | {_fmt(r['wall_seconds'], 0)} | "
            f"{_fmt(r.get('cpu_seconds'), 0)} | "
            + " | ".join(_fmt(st.get(s), 1) for s in stages)
            + f" | {_fmt(r['peak_rss_mb'] / 1024, 2)} | {_fmt(r.get('detection_f1'), 4)} | "
            f"{_fmt(rem.get('precision'), 3)} | {_fmt(rem.get('coverage'), 3)} | "
            f"{_fmt(load.get('mean'), 1)} / {_fmt(load.get('max'), 1)} |"
        )
    lines += [
        "",
        "Per-stage CPU seconds and peak RSS (MB) of the scan process:",
        "",
        "| size | tag | "
        + " | ".join(f"{s} CPU s" for s in stages)
        + " | "
        + " | ".join(f"{s} RSS" for s in stages)
        + " |",
        "|" + "---|" * (2 + 2 * len(stages)),
    ]
    for r in rows:
        c = r.get("stage_cpu_seconds", {})
        m = r.get("stage_peak_rss_mb", {})
        lines.append(
            f"| {r['n_rows']:,} | {r.get('tag') or ''} | "
            + " | ".join(_fmt(c.get(s), 0) for s in stages)
            + " | "
            + " | ".join(_fmt(m.get(s), 0) for s in stages)
            + " |"
        )
    notes = record.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=HERE / ".cache" / "scale")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    ap.add_argument(
        "--md", type=Path, default=None, help="markdown summary (default: --out with .md)"
    )
    ap.add_argument("--tag", default="", help="label of this configuration in the results")
    ap.add_argument("--exact-search-max", type=int, default=None, help="audit.exact_search_max")
    ap.add_argument("--nprobe", type=int, default=None, help="audit.search_nprobe")
    ap.add_argument(
        "--plants", type=int, default=None, help="audit.plants (0: the split before calibration)"
    )
    ap.add_argument("--child", nargs=3, metavar=("MANIFEST", "EMB", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--changes", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        m, e, o = map(Path, args.child)
        print(json.dumps(run_one(m, e, o, args.seed, json.loads(args.changes))))
        return
    changes = {}
    if args.exact_search_max is not None:
        changes["audit__exact_search_max"] = args.exact_search_max
    if args.nprobe is not None:
        changes["audit__search_nprobe"] = args.nprobe
    if args.plants is not None:
        changes["audit__plants"] = args.plants
    command = "python benchmarks/bench_scale.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    args.work.mkdir(parents=True, exist_ok=True)
    record = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "results": []}
    if args.out.exists():
        old = json.loads(args.out.read_text())
        # keep other sizes / tags and any hand-added keys (notes, sweeps)
        record.update({k: v for k, v in old.items() if k not in ("results", "machine", "command")})
        record["results"] = [r for r in old.get("results", []) if "cpu_seconds" in r]
    for n in args.sizes:
        t0 = time.time()
        manifest, emb = make_data(n, args.work, dim=args.dim, seed=args.seed)
        gen = time.time() - t0
        loads: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--seed",
                    str(args.seed),
                    "--changes",
                    json.dumps(changes),
                    "--child",
                    str(manifest),
                    str(emb),
                    tmp,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            # sample the machine's load while the child runs (stderr drained by a thread)
            err: list[str] = []

            def _drain(p: subprocess.Popen = proc, sink: list[str] = err) -> None:
                sink.append(p.stderr.read())

            drain = threading.Thread(target=_drain, daemon=True)
            drain.start()
            while proc.poll() is None:
                loads.append(os.getloadavg()[0])
                time.sleep(5)
            out_text = proc.stdout.read()
            drain.join()
        if proc.returncode != 0:
            print("".join(err)[-4000:], file=sys.stderr)
            raise SystemExit(f"scan of {n} rows failed")
        row = json.loads(out_text.strip().splitlines()[-1])
        row["tag"] = args.tag
        row["command"] = command
        row["generate_seconds"] = round(gen, 1)
        row["load_during_run"] = {
            "mean": round(float(np.mean(loads)), 2) if loads else None,
            "max": round(float(np.max(loads)), 2) if loads else None,
            "samples": len(loads),
        }
        row["child_max_rss_mb_getrusage"] = round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        )
        record["results"] = [
            r for r in record["results"] if (r["n_rows"], r.get("tag", "")) != (n, args.tag)
        ] + [row]
        record["results"].sort(key=lambda r: (r["n_rows"], r.get("tag", "")))
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        write_markdown(record, args.md or args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
