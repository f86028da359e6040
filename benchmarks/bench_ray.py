"""Local engine vs Ray engine: the same scan of N pairs from embeddings, per stage.

Data: bench_scale's cached CLIP-like pairs (``benchmarks/.cache/scale/scale_1000000.{csv,npz}``:
512-d, 20 % shuffled captions, blocks of 100k pairs with their own topics); smaller N
takes the first N rows (whole blocks, so every caption's true row is inside). Both
engines scan with ``--embeddings`` (no model), the default settings and
``write=True``; each runs in a fresh child process that samples, every 0.5 s, the
proportional set size (PSS: shared pages split between the processes that map them,
so Ray's shared-memory object store is counted once) of itself and of every process
it started (the local Ray cluster: GCS, raylet, workers). The parent samples the load
average: the machine is shared, and wall times on a busy machine are inflated.

Then the two audits are compared row by row (statuses, flags, actions, match_score).

::

    nice -n 5 python benchmarks/bench_ray.py --rows 1000000
    python benchmarks/bench_ray.py --rows 100000         # one block (a few minutes)

Results: ``benchmarks/results/ray.json`` (one entry per N, replaced on rerun) and
``ray.md`` written from it; the projection in ``ray.md`` is written by hand from the
measured per-stage costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "scale"
STAGES = ("read", "embed", "score", "split", "rematch", "write")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds of the processes and of their reaped children."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:15])  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            continue
    return total / _TICK


def _pss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total / 1024


def subset(n: int, work: Path, cache: Path) -> tuple[Path, Path]:
    """The first ``n`` rows of the 1M cache (the cache itself for n = 1M)."""
    import pandas as pd

    manifest, emb = cache / "scale_1000000.csv", cache / "scale_1000000.npz"
    if not manifest.exists():
        raise SystemExit(f"{manifest} is missing: make it with bench_scale.py --sizes 1000000")
    if n == 1_000_000:
        return manifest, emb
    frame = pd.read_csv(manifest, nrows=n)
    assert frame["true_row"].between(0, n - 1).all(), "cut the cache at whole blocks"
    out_m, out_e = work / f"rows_{n}.csv", work / f"rows_{n}.npz"
    frame.to_csv(out_m, index=False)
    with np.load(emb, mmap_mode="r") as z:
        np.savez(out_e, image=np.asarray(z["image"][:n]), text=np.asarray(z["text"][:n]))
    return out_m, out_e


def run_child(engine: str, manifest: Path, emb: Path, out: Path, audit_out: Path) -> dict:
    """Runs in the child process: one scan, PSS sampled per stage."""
    import pmpclean
    from pmpclean.engine import make_engine, use_engine

    samples: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            pids = _descendants(os.getpid())
            samples.append((time.time(), _pss_mb(pids), _cpu_s(pids)))
            stop.wait(0.5)

    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    t_init = time.time()
    eng = make_engine(engine, num_cpus=os.cpu_count()) if engine == "ray" else None
    init_s = time.time() - t_init
    t0 = time.time()
    cfg = pmpclean.ScanConfig().replace(embed__embeddings=str(emb), data__truth_col="true_row")
    with use_engine(eng):
        res = pmpclean.scan(manifest, config=cfg, out_dir=out)
    wall = time.time() - t0
    stop.set()
    t.join()
    peak, cpu = {}, {}
    for name, a, b in res.summary.get("stage_spans", []):
        inside = [(r, c) for ts, r, c in samples if a <= ts <= b]
        peak[name] = round(max(r for r, _ in inside), 1) if inside else None
        cpu[name] = round(inside[-1][1] - inside[0][1], 1) if len(inside) > 1 else None
    cols = ["row", "status", "is_mismatched", "action", "match_score", "proposed_row"]
    res.audit[cols].to_parquet(audit_out)
    cells = getattr(eng, "last_rematch_cells", None)
    if cells is not None:  # which cell each suspect's image and caption went to
        np.savez(
            audit_out.with_suffix(".cells.npz"), rows=cells[0], image=cells[1], caption=cells[2]
        )
    rm = res.summary.get("rematch") or {}
    det = ((res.summary.get("evaluation") or {}).get("detection")) or {}
    return {
        "engine": engine,
        "cluster_start_seconds": round(init_s, 1),
        "wall_seconds": round(wall, 1),
        "stage_seconds": res.summary["timings"],
        "stage_peak_pss_mb": peak,
        "stage_cpu_seconds": cpu,
        "cpu_seconds": round(samples[-1][2] - samples[0][2], 1),
        "peak_pss_mb": round(max(r for _, r, _ in samples), 1),
        "detection_f1": det.get("f1"),
        "verdict": res.summary.get("verdict"),
        "n_mismatched": res.summary.get("n_mismatched"),
        "engine_info": res.summary.get("engine"),
        "rematch": {
            k: rm.get(k)
            for k in ("n_suspects", "n_proposed", "parts", "part_suspects", "cost_used", "eps")
        },
    }


def compare(a_path: Path, b_path: Path, manifest: Path) -> dict:
    """Agreement of the two audits, and of their rematch proposals with the truth."""
    import pandas as pd

    a, b = pd.read_parquet(a_path), pd.read_parquet(b_path)
    ms_a, ms_b = a["match_score"].to_numpy(), b["match_score"].to_numpy()
    both = np.isfinite(ms_a) & np.isfinite(ms_b)
    out = {
        "rows_equal": bool(a["row"].tolist() == b["row"].tolist()),
        "status_identical": bool((a["status"] == b["status"]).all()),
        "flags_identical_share": float((a["is_mismatched"] == b["is_mismatched"]).mean()),
        "actions_identical_share": float((a["action"] == b["action"]).mean()),
        "match_score_max_abs_diff": float(np.max(np.abs(ms_a[both] - ms_b[both]), initial=0.0)),
        "match_score_nan_equal": bool(np.array_equal(np.isnan(ms_a), np.isnan(ms_b))),
    }
    if "proposed_row" not in a.columns:
        return out
    truth = pd.read_csv(manifest, usecols=["true_row"])["true_row"].to_numpy()
    p_a, p_b = a["proposed_row"].to_numpy(), b["proposed_row"].to_numpy()
    for name, p in (("local", p_a), ("ray", p_b)):
        rows = np.flatnonzero(p >= 0)
        out[f"{name}_proposals"] = int(rows.size)
        # right: the proposed caption's true image is this row's image
        out[f"{name}_precision"] = float((truth[p[rows]] == rows).mean()) if rows.size else None
    out["proposals_identical_share"] = float((p_a == p_b).mean())
    mine = p_a >= 0
    out["local_proposals_reproduced"] = (
        float((p_b[mine] == p_a[mine]).mean()) if mine.any() else None
    )
    cells = b_path.with_suffix(".cells.npz")
    if cells.exists():
        with np.load(cells) as z:
            cell_img = dict(zip(z["rows"].tolist(), z["image"].tolist(), strict=True))
            cell_cap = dict(zip(z["rows"].tolist(), z["caption"].tolist(), strict=True))
        missed = np.flatnonzero(mine & (p_b != p_a))
        crossed = [cell_img.get(i) != cell_cap.get(int(p_a[i])) for i in missed]
        out["local_proposals_missed"] = int(missed.size)
        out["missed_with_caption_in_another_cell"] = int(np.sum(crossed))
        # every truly mismatched suspect whose true caption is on a suspect row
        sus = np.array(sorted(cell_img))
        sus = sus[sus < truth.size]
        img_of = truth[sus]  # the image each suspect row's caption belongs to
        pair = (img_of != sus) & np.isin(img_of, sus)
        same = [cell_img[i] == cell_cap[j] for i, j in zip(img_of[pair], sus[pair], strict=True)]
        out["true_caption_same_cell_share"] = float(np.mean(same)) if same else None
    return out


def _child(engine: str, manifest: Path, emb: Path, tmp: Path) -> tuple[dict, list[float]]:
    from _child import run_sampling_load

    code, out, err, loads = run_sampling_load(
        [
            sys.executable,
            __file__,
            "--child",
            engine,
            str(manifest),
            str(emb),
            str(tmp / f"out-{engine}"),
            str(tmp / f"audit-{engine}.parquet"),
        ]
    )
    if code != 0:
        raise SystemExit(f"{engine} child failed:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), loads


def _fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def write_markdown(record: dict, path: Path) -> None:
    old = path.read_text() if path.exists() else ""
    keep = old.split("<!-- projection -->", 1)[1] if "<!-- projection -->" in old else "\n"
    lines = [
        "# Local engine vs Ray engine (issue 16)",
        "",
        "`pmpclean.scan` of N CLIP-like pairs from embeddings (bench_scale's cache, 512-d, 20 %"
        " shuffled captions), default settings, on this machine (2 CPUs, shared with other jobs:"
        " see the load average); the Ray engine on a local 2-CPU cluster started by the scan's"
        " process. Memory: peak PSS of the scan's process and every process it started.",
        "",
        "Produced by:",
        "",
        "```",
        *sorted({r["command"] for r in record["results"]}),
        "```",
        "",
        "| rows | engine | wall s | cluster start s | "
        + " | ".join(f"{s} s" for s in STAGES)
        + " | peak PSS GB | det. F1 | load avg (mean / max) |",
        "|---|---|---|---|" + "---|" * len(STAGES) + "---|---|---|",
    ]
    for r in sorted(record["results"], key=lambda r: r["rows"]):
        for e in (r["local"], r["ray"]):
            st = e["stage_seconds"]
            lines.append(
                f"| {r['rows']:,} | {e['engine']} | {_fmt(e['wall_seconds'])} | "
                f"{_fmt(e.get('cluster_start_seconds'))} | "
                + " | ".join(_fmt(st.get(s)) for s in STAGES)
                + f" | {e['peak_pss_mb'] / 1024:.2f} | {e['detection_f1'] or 0:.4f} | "
                f"{e['load'][0]:.1f} / {e['load'][1]:.1f} |"
            )
    lines += [
        "",
        "CPU seconds of the scan's process tree per stage (less sensitive to the load than wall"
        " time; Ray's GCS and raylet included):",
        "",
        "| rows | engine | CPU s | " + " | ".join(f"{s} CPU s" for s in STAGES) + " |",
        "|---|---|---|" + "---|" * len(STAGES),
    ]
    for r in sorted(record["results"], key=lambda r: r["rows"]):
        for e in (r["local"], r["ray"]):
            c = e.get("stage_cpu_seconds") or {}
            lines.append(
                f"| {r['rows']:,} | {e['engine']} | {_fmt(e.get('cpu_seconds'))} | "
                + " | ".join(_fmt(c.get(s)) for s in STAGES)
                + " |"
            )
    lines += [
        "",
        "Overhead ratio Ray / local, of CPU seconds (wall seconds in brackets: the load differed)"
        " and agreement of the two audits:",
        "",
        "| rows | total | " + " | ".join(STAGES) + " | peak PSS | statuses identical |"
        " flags identical | actions identical | max abs diff match_score |",
        "|---|---|" + "---|" * len(STAGES) + "---|---|---|---|---|",
    ]
    for r in sorted(record["results"], key=lambda r: r["rows"]):
        lo, ra, c = r["local"], r["ray"], r["agreement"]

        def ratio(a: float | None, b: float | None) -> str:
            return f"{b / a:.2f}" if a and b is not None else "–"

        lc, rc = lo.get("stage_cpu_seconds") or {}, ra.get("stage_cpu_seconds") or {}

        def both(a_cpu: float | None, b_cpu: float | None, a_w: float, b_w: float) -> str:
            return f"{ratio(a_cpu, b_cpu)} ({ratio(a_w, b_w)})"

        lines.append(
            f"| {r['rows']:,} | "
            + both(
                lo.get("cpu_seconds"), ra.get("cpu_seconds"), lo["wall_seconds"], ra["wall_seconds"]
            )
            + " | "
            + " | ".join(
                both(lc.get(s), rc.get(s), lo["stage_seconds"].get(s), ra["stage_seconds"].get(s))
                for s in STAGES
            )
            + f" | {ratio(lo['peak_pss_mb'], ra['peak_pss_mb'])}"
            + f" | {c['status_identical']} | {100 * c['flags_identical_share']:.3f} % | "
            f"{100 * c['actions_identical_share']:.3f} % | {c['match_score_max_abs_diff']:.2g} |"
        )
    lines += [
        "",
        "Rematch: the local engine's one problem against the Ray engine's parts (one per coarse"
        " cell); precision against the truth, and the local proposals the parts did not make"
        " (those whose caption lay in another cell than the image):",
        "",
        "| rows | suspects | parts | local proposals | Ray proposals | local precision |"
        " Ray precision | local proposals reproduced | missed | of which caption in another"
        " cell | true captions in the image's cell |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(record["results"], key=lambda r: r["rows"]):
        c, rm = r["agreement"], r["ray"].get("rematch") or {}
        if "local_proposals" not in c:
            continue

        def pct(v: float | None) -> str:
            return "–" if v is None else f"{100 * v:.1f} %"

        lines.append(
            f"| {r['rows']:,} | {rm.get('n_suspects') or 0:,} | {rm.get('parts') or 1} | "
            f"{c['local_proposals']:,} | {c['ray_proposals']:,} | {pct(c['local_precision'])} | "
            f"{pct(c['ray_precision'])} | {pct(c['local_proposals_reproduced'])} | "
            f"{c.get('local_proposals_missed', '–')} | "
            f"{c.get('missed_with_caption_in_another_cell', '–')} | "
            f"{pct(c.get('true_caption_same_cell_share'))} |"
        )
    path.write_text("\n".join(lines) + "\n\n<!-- projection -->" + keep)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ray.json")
    ap.add_argument("--cache", type=Path, default=CACHE, help="bench_scale's --work folder")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        engine, m, e, o, a = args.child
        print(json.dumps(run_child(engine, Path(m), Path(e), Path(o), Path(a))))
        return
    command = "nice -n 5 python benchmarks/bench_ray.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    record = json.loads(args.out.read_text()) if args.out.exists() else {"results": []}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        manifest, emb = subset(args.rows, tmp, args.cache)
        entry: dict = {"rows": args.rows, "command": command}
        for engine in ("local", "ray"):
            res, loads = _child(engine, manifest, emb, tmp)
            res["load"] = [float(np.mean(loads)) if loads else 0.0, max(loads, default=0.0)]
            entry[engine] = res
            print(json.dumps(res), flush=True)
        entry["agreement"] = compare(
            tmp / "audit-local.parquet", tmp / "audit-ray.parquet", manifest
        )
        print(json.dumps(entry["agreement"]), flush=True)
    record["results"] = [r for r in record["results"] if r["rows"] != args.rows] + [entry]
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(record, args.out.with_suffix(".md"))


if __name__ == "__main__":
    main()
