"""Embedding throughput: is the model the bottleneck of ``embed_manifest``?

Measures, on the same images and the same loaded model:

(a) the bare forward pass: ``encode_image`` + L2-normalise on images that were
    decoded and preprocessed beforehand (the ceiling), images/s;
(b) the full pipeline: ``pmpclean.embedding.embed_manifest`` with the cache off
    (decode + preprocess in DataLoader workers, forward, bookkeeping), images/s,
    timed from the call until the last image batch is done (captions excluded);

and reports (b)/(a). Target: >= 0.9, i.e. decoding overlaps the forward pass.
(a) and (b) are measured alternately (a, b, b, a, a, b, ...) so that load changes from
other processes hit both; the medians are reported with the load average.

Images: the 159 coco-mini JPEGs (640 px, from ../shared/data) repeated through
symlinks to ``--images`` distinct files, or generated 640x480 JPEGs when the shared
data is absent. Random weights (``--pretrained none``): speed does not depend on them.

Run::

    python benchmarks/embed_throughput.py                       # ViT-B-32, 256 images
    python benchmarks/embed_throughput.py --images 64 --model pmpclean-tiny  # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COCO = ROOT.parent / "shared" / "data" / "coco-mini" / "images"


def make_images(folder: Path, n: int, source: Path | None) -> list[Path]:
    """``n`` distinct image files in ``folder``: symlinks cycling over ``source`` JPEGs,
    or generated 640x480 JPEGs (smooth noise, so they compress like photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    src = sorted(source.glob("*.jpg")) if source is not None and source.is_dir() else []
    if src:
        for i in range(n):
            link = folder / f"{i:05d}.jpg"
            link.symlink_to(src[i % len(src)])
            out.append(link)
        return out
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        out.append(path)
    return out


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bare_forward(lm, x, batch_size: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(images/s, images per CPU-second) of the pipeline's own forward step
    (``encode_image`` under inference_mode + L2-normalise + to numpy) on a tensor
    decoded and preprocessed beforehand."""
    from pmpclean.embedding import _encode

    n = x.shape[0]
    cpu, start = cpu_seconds(), time.perf_counter()
    for i in range(0, n, batch_size):
        _encode(lm, "encode_image", x[i : i + batch_size])
    return n / (time.perf_counter() - start), n / (cpu_seconds() - cpu)


def full_pipeline(lm, manifest_path: Path, batch_size: int, workers: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]  # noqa: E501
    """(images/s, images per CPU-second) of embed_manifest (cache off) up to the last
    image batch; CPU time includes the worker processes."""
    from pmpclean.data import read_manifest
    from pmpclean.embedding import embed_manifest

    m = read_manifest(manifest_path)
    marks: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "Embedding images" and done == total:
            marks["images_done"] = time.perf_counter()
        if stage == "Embedding captions" and "cpu" not in marks:
            marks["cpu"] = cpu_seconds()  # workers have exited and been reaped by now

    cpu, start = cpu_seconds(), time.perf_counter()
    emb = embed_manifest(
        m, loaded=lm, batch_size=batch_size, workers=workers, use_cache=False, progress=progress
    )
    n = len(m.unique_images)
    assert emb.n_model_images == n
    return n / (marks["images_done"] - start), n / (marks["cpu"] - cpu)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--images", type=int, default=256, help="distinct image files (default 256)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)"
    )
    p.add_argument("--repeats", type=int, default=2, help="(a, b) pairs to measure")
    p.add_argument(
        "--channels-last", action="store_true", help="model in channels_last memory format"
    )
    p.add_argument("--source", type=Path, default=COCO, help="folder of JPEGs to cycle over")
    args = p.parse_args(argv)

    import torch

    from pmpclean.embedding import _decode_image, load_model

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning: expected here
        lm = load_model(args.model, args.pretrained, device="cpu")
    if args.channels_last:
        lm.model.to(memory_format=torch.channels_last)

    with tempfile.TemporaryDirectory(prefix="pmpclean-bench-") as tmp:
        files = make_images(Path(tmp) / "img", args.images, args.source)
        kind = "coco-mini JPEGs (symlinked)" if files[0].is_symlink() else "generated 640x480 JPEGs"
        manifest = Path(tmp) / "manifest.csv"
        pd.DataFrame(
            {"image": [str(f) for f in files], "caption": ["a photo"] * len(files)}
        ).to_csv(manifest, index=False)

        # pre-decode and preprocess for (a), outside any timing
        x = torch.stack([lm.preprocess(_decode_image(str(f))[1]) for f in files])
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bare_forward(lm, x[: args.batch_size], args.batch_size)  # warm-up

        load_before = load_average()
        a_runs: list[float] = []
        b_runs: list[float] = []
        a_cpu: list[float] = []
        b_cpu: list[float] = []
        for i in range(args.repeats):
            # a, b, b, a, a, b, ...: a drift in background load hits both sides alike
            order = ("a", "b") if i % 2 == 0 else ("b", "a")
            for which in order:
                if which == "a":
                    speed, per_cpu = bare_forward(lm, x, args.batch_size)
                    a_runs.append(speed)
                    a_cpu.append(per_cpu)
                else:
                    speed, per_cpu = full_pipeline(lm, manifest, args.batch_size, args.workers)
                    b_runs.append(speed)
                    b_cpu.append(per_cpu)
        load_after = load_average()

    a, b = statistics.median(a_runs), statistics.median(b_runs)
    pairs = ", ".join(f"{bb / aa:.3f}" for aa, bb in zip(a_runs, b_runs, strict=True))
    cmd = "python benchmarks/embed_throughput.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print(f"command: `{cmd.strip()}`")
    print(
        f"model {args.model} (pretrained={args.pretrained}), {args.images} {kind}, "
        f"batch {args.batch_size}, workers {args.workers}, torch threads "
        f"{torch.get_num_threads()}, channels_last {args.channels_last}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(f"load average (1/5/15 min): before {load_before}, after {load_after}")
    print()
    print("| measurement | images/s (median) | runs |")
    print("|---|---|---|")
    a_list = ", ".join(f"{v:.2f}" for v in a_runs)
    print(f"| (a) bare forward, pre-decoded tensors | {a:.2f} | {a_list} |")
    b_list = ", ".join(f"{v:.2f}" for v in b_runs)
    print(f"| (b) embed_manifest, cache off | {b:.2f} | {b_list} |")
    print(f"| (b)/(a) | **{b / a:.3f}** | per pair: {pairs} |")
    ca, cb = statistics.median(a_cpu), statistics.median(b_cpu)
    print()
    print("CPU cost (load-independent): images per CPU-second, workers included")
    print()
    print("| measurement | images/CPU-s (median) | runs |")
    print("|---|---|---|")
    print(f"| (a) bare forward | {ca:.3f} | {', '.join(f'{v:.3f}' for v in a_cpu)} |")
    print(f"| (b) embed_manifest | {cb:.3f} | {', '.join(f'{v:.3f}' for v in b_cpu)} |")
    print(f"| (b)/(a) | **{cb / ca:.3f}** | 1 - this = CPU share of decoding + overhead |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
