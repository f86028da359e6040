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

Embeddings are float16 unit rows in an uncompressed ``.npz`` (``scale16_<n>.npz``,
generated block by block; ``--old`` converts the blocks of an earlier float32 cache
instead of regenerating them), which pmpclean memory-maps. The child samples its
anonymous memory (``RssAnon``: what the process itself holds) and its file-backed
pages (``RssFile``: the mapped embeddings, which the kernel can drop) separately.

The same data scanned by another checkout's code (e.g. main before this change)::

    python benchmarks/bench_scale.py --sizes 1000000 --code /work/main --tag main

Clustered data (2,000 tight topics per 100k block)::

    python benchmarks/bench_scale.py --sizes 200000 --clusters 2000 --tag clustered
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BLOCK = 100_000


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _block_source(old: Path | None) -> tuple[dict, object] | None:
    """Arrays and frame of an earlier float32 cache (same blocks, same seeds), if given."""
    if old is None or not old.with_suffix(".npz").exists():
        return None
    import pandas as pd

    from pmpclean.embedding import _npz_memmap

    npz = old.with_suffix(".npz")
    arrays = {k: _npz_memmap(npz, k) for k in ("image", "text")}
    return arrays, pd.read_csv(old.with_suffix(".csv"))


def make_data(
    n: int, work: Path, *, dim: int, seed: int, n_clusters: int = 50, old: Path | None = None
) -> tuple[Path, Path]:
    """Manifest + float16 ``.npz`` of ``n`` rows, generated block by block.

    Blocks already in the float32 cache ``old`` (``scale_<m>`` of earlier runs: the
    same generator and seeds) are copied from it instead of regenerated.
    """
    from pmpclean.synthetic import clip_like_pairs

    tag = "" if n_clusters == 50 else f"_c{n_clusters}"
    manifest = work / f"scale16{tag}_{n}.csv"
    emb = work / f"scale16{tag}_{n}.npz"
    if manifest.exists() and emb.exists():
        return manifest, emb
    src = _block_source(old) if not tag else None
    tmp = {k: work / f".scale16{tag}_{n}_{k}.npy" for k in ("image", "text")}
    arrays = {
        k: np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(n, dim))
        for k, p in tmp.items()
    }
    part_csv = manifest.with_suffix(".csv.part")
    for b, start in enumerate(range(0, n, BLOCK)):
        m = min(BLOCK, n - start)
        if src is not None and start + m <= len(src[1]) and src[0]["image"].shape[1] == dim:
            for k in arrays:
                arrays[k][start : start + m] = src[0][k][start : start + m]
            f = src[1].iloc[start : start + m]
        else:
            d = clip_like_pairs(m, dim=dim, noise_rate=0.2, n_clusters=n_clusters, seed=seed + b)
            arrays["image"][start : start + m] = d.image_emb
            arrays["text"][start : start + m] = d.text_emb
            f = d.to_frame()
            f["image"] = [f"b{b}_{x}" for x in f["image"]]
            f["caption"] = [f"b{b} {x}" for x in f["caption"]]
            f["true_row"] = f["true_row"] + start
            del d
        f.to_csv(part_csv, index=False, header=b == 0, mode="w" if b == 0 else "a")
    for a in arrays.values():
        a.flush()
    del arrays
    part_csv.replace(manifest)
    part = emb.with_suffix(".part")
    with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for k, p in tmp.items():
            zf.write(p, arcname=f"{k}.npy")  # what np.savez writes, member by member
    part.replace(emb)
    for p in tmp.values():
        p.unlink()
    return manifest, emb


def _memory_mb() -> tuple[float, float]:
    """(RssAnon, RssFile) of this process in MB: anonymous memory, and file-backed
    pages (memory-mapped embeddings, which the kernel can drop and reread)."""
    got = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value = line.split()[:2]
                got[key] = int(value) / 1024
    return got.get("RssAnon:", 0.0), got.get("RssFile:", 0.0)


def run_one(manifest: Path, emb: Path, out: Path, seed: int, changes: dict) -> dict:
    """Runs in the child process."""
    import pmpclean

    samples: list[tuple[float, float, float, float]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.time(), *_memory_mb(), _cpu_s()))
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
    peak_by_stage, file_by_stage, cpu_by_stage = {}, {}, {}
    for name, a, b in res.summary.get("stage_spans", []):
        inside = [(r, f, c) for (ts, r, f, c) in samples if a <= ts <= b]
        peak_by_stage[name] = round(max(x[0] for x in inside), 1) if inside else None
        file_by_stage[name] = round(max(x[1] for x in inside), 1) if inside else None
        cpu_by_stage[name] = round(inside[-1][2] - inside[0][2], 1) if len(inside) > 1 else None
    ev = res.summary.get("evaluation") or {}
    rem = res.summary.get("rematch") or {}
    return {
        "n_rows": res.summary["n_rows"],
        "wall_seconds": round(total, 2),
        "cpu_seconds": round(cpu, 1),
        "stage_seconds": res.summary["timings"],
        "stage_cpu_seconds": cpu_by_stage,
        "stage_peak_rss_anon_mb": peak_by_stage,
        "stage_peak_rss_file_mb": file_by_stage,
        "peak_rss_anon_mb": round(max(x[1] for x in samples), 1),
        "peak_rss_file_mb": round(max(x[2] for x in samples), 1),
        "embeddings_dtype": _npz_dtype(emb),
        "code": pmpclean.__file__,
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
    }


def _npz_dtype(path: Path) -> str:
    with zipfile.ZipFile(path) as zf, zf.open("image.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = getattr(np.lib.format, f"read_array_header_{version[0]}_{version[1]}")
        return str(read(fh)[2])


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _anon(r: dict) -> str:
    """Peak RssAnon in GB; earlier rows recorded only the total RSS (marked *)."""
    if r.get("peak_rss_anon_mb") is not None:
        return _fmt(r["peak_rss_anon_mb"] / 1024, 2)
    return _fmt(r["peak_rss_mb"] / 1024, 2) + "*"


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
        + " | peak RssAnon GB | peak RssFile GB | det. F1 | rematch precision"
        + " | rematch coverage | load avg (mean / max) |",
        "|" + "---|" * (10 + len(stages)),
    ]
    for r in rows:
        st = r.get("stage_seconds", {})
        rem = r.get("rematch") or {}
        load = r.get("load_during_run") or {}
        lines.append(
            f"| {r['n_rows']:,} | {r.get('tag') or ''} | {_fmt(r['wall_seconds'], 0)} | "
            f"{_fmt(r.get('cpu_seconds'), 0)} | "
            + " | ".join(_fmt(st.get(s), 1) for s in stages)
            + f" | {_anon(r)} | {_fmt((r.get('peak_rss_file_mb') or 0) / 1024 or None, 2)}"
            f" | {_fmt(r.get('detection_f1'), 4)} | "
            f"{_fmt(rem.get('precision'), 3)} | {_fmt(rem.get('coverage'), 3)} | "
            f"{_fmt(load.get('mean'), 1)} / {_fmt(load.get('max'), 1)} |"
        )
    lines += [
        "",
        "Per-stage CPU seconds and peak RssAnon (MB; RSS for rows marked * in the first "
        "table) of the scan process:",
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
        m = r.get("stage_peak_rss_anon_mb") or r.get("stage_peak_rss_mb", {})
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
    ap.add_argument(
        "--clusters", type=int, default=50, help="topics per 100k block (2000: clustered data)"
    )
    ap.add_argument(
        "--old",
        type=Path,
        default=None,
        help="float32 cache (path stem, e.g. .cache/scale/scale_1000000) whose blocks are "
        "converted instead of regenerated",
    )
    ap.add_argument(
        "--code",
        type=Path,
        default=None,
        help="checkout whose pmpclean the scan runs (PYTHONPATH of the child), e.g. /work/main",
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
        manifest, emb = make_data(
            n, args.work, dim=args.dim, seed=args.seed, n_clusters=args.clusters, old=args.old
        )
        gen = time.time() - t0
        from _child import run_sampling_load

        with tempfile.TemporaryDirectory() as tmp:
            code, out_text, err, loads = run_sampling_load(
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
                env={**os.environ, "PYTHONPATH": str(args.code or HERE.parent)},
            )
        if code != 0:
            print(err[-4000:], file=sys.stderr)
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
