"""Index and read the coco-mini-wds tars with tarfile and with wids (results/tar_index.md).

python benchmarks/bench_tar_index.py [FOLDER]
"""

from __future__ import annotations

import sys
import tarfile
import time
from pathlib import Path

from wids.wids_mmtar import MMIndexedTar

FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini-wds"


def tarfile_index(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def tarfile_read(path: Path, index: dict[str, tuple[int, int]]) -> None:
    with open(path, "rb") as fh:
        for offset, size in index.values():
            fh.seek(offset)
            fh.read(size)


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER
    shards = sorted(folder.glob("*.tar"))
    for _ in range(3):
        t0 = time.perf_counter()
        indexes = [tarfile_index(p) for p in shards]
        t1 = time.perf_counter()
        for path, index in zip(shards, indexes, strict=True):
            tarfile_read(path, index)
        t2 = time.perf_counter()
        tars = [MMIndexedTar(str(p), verbose=False) for p in shards]
        t3 = time.perf_counter()
        for tar in tars:
            for _name, data in tar:
                bytes(data)
        t4 = time.perf_counter()
        members = sum(map(len, indexes))
        print(
            f"tarfile index {1e3 * (t1 - t0):.1f} ms, read {1e3 * (t2 - t1):.1f} ms | "
            f"wids index {1e3 * (t3 - t2):.1f} ms, read {1e3 * (t4 - t3):.1f} ms | "
            f"{members} members"
        )


if __name__ == "__main__":
    main()
