"""The rematch partitioned by coarse cell (numpy only; the Ray engine runs the parts).

One large partial-transport problem over every suspect becomes one problem per coarse
cell of the embedding space:

* **cells**: spherical k-means centroids trained on a seeded sample of the suspects'
  images (one cell per :data:`PART_SUSPECTS` suspects); a suspect's *image* belongs to
  the cell of its nearest centroid, a candidate *caption* to the cell nearest to its
  text vector (the image and the text of a true pair lie close in a CLIP-like space,
  so a suspect image and its true caption, which sits on another row, usually meet in
  one cell; where they do not, the partitioned rematch cannot propose it);
* **cost**: the learned cost is fitted once, on a seeded sample of the suspects with
  their own key points (:func:`sample_problem`), and given to every part together with
  its regularisation in cost units, so that every part solves with the same cost;
* **parts**: a part's rows are its suspect images, its candidate captions and every
  row showing one of its images (so that a caption an image already has is still
  forbidden); its plan proposes only captions of its own cell, so two parts never
  propose one caption and the merge is a plain union.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PART_SUSPECTS", "FIT_SUSPECTS", "Part", "plan_parts", "sample_problem", "merge_parts"]

#: Most suspects per rematch part. The transport is O(edges) (about 2 k edges per
#: suspect), so a part this size fits any worker; fewer parts keep more suspects in the
#: cell of their true caption (at 2 parts of 21k suspects the parts reproduced half of
#: the local engine's proposals, ``benchmarks/results/ray.md``): up to this many
#: suspects the rematch is the local engine's one problem.
PART_SUSPECTS = 200_000
#: Suspects in the sample the learned cost is fitted on (its fit plants at most 500 keys).
FIT_SUSPECTS = 25_000
#: Clean rows offered as key points to the sample fit (the fit plants at most 500).
_SAMPLE_KEYS = 2_000


@dataclass
class Part:
    """One part of the rematch: ``rows`` of the whole problem and their roles."""

    rows: np.ndarray  # (r,) int64, ascending
    suspects: np.ndarray  # (r,) bool: image nodes of this part
    captions: np.ndarray  # (r,) bool: candidate captions of this part


def _rows_of_images(ig: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Every row showing an image of ``rows``."""
    mark = np.zeros(int(ig.max()) + 1, dtype=bool)
    mark[ig[rows]] = True
    return np.flatnonzero(mark[ig])


def _part(ig: np.ndarray, images: np.ndarray, captions: np.ndarray) -> Part:
    rows = np.union1d(np.union1d(images, captions), _rows_of_images(ig, images))
    return Part(rows, np.isin(rows, images), np.isin(rows, captions))


def plan_parts(
    ig: np.ndarray,
    suspect_rows: np.ndarray,
    image_cell: np.ndarray,
    caption_rows: np.ndarray,
    caption_cell: np.ndarray,
    n_cells: int,
) -> list[Part]:
    """The parts of a rematch whose suspect images and captions are routed to cells.

    ``image_cell[i]`` is the cell of ``suspect_rows[i]``'s image, ``caption_cell[j]``
    that of ``caption_rows[j]``'s caption. Cells without a suspect image are left out
    (their captions cannot be proposed to anyone).
    """
    parts = []
    for c in range(n_cells):
        images = suspect_rows[image_cell == c]
        if images.size:
            parts.append(_part(ig, images, caption_rows[caption_cell == c]))
    return parts


def sample_problem(
    ig: np.ndarray,
    suspect_rows: np.ndarray,
    key_rows: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> tuple[Part, np.ndarray]:
    """A seeded sample of ``size`` suspects (images and captions) with clean key rows.

    Returns the part and a mask of its rows that may serve as key points of the
    learned cost (the sampled ``key_rows``).
    """
    take = min(size, suspect_rows.size)
    sample = np.sort(rng.choice(suspect_rows, size=take, replace=False))
    keys = key_rows
    if keys.size > _SAMPLE_KEYS:
        keys = np.sort(rng.choice(keys, size=_SAMPLE_KEYS, replace=False))
    part = _part(ig, sample, sample)
    rows = np.union1d(part.rows, keys)
    part = Part(rows, np.isin(rows, sample), np.isin(rows, sample))
    return part, np.isin(rows, keys)


def merge_parts(
    n: int, parts: list[Part], results: list[tuple[np.ndarray, np.ndarray, dict]]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Each part's candidates (part rows) as row-aligned arrays of the whole problem."""
    cand = np.full(n, -1, dtype=np.int64)
    conf = np.zeros(n, dtype=np.float64)
    for part, (c, f, _) in zip(parts, results, strict=True):
        mine = part.suspects & (c >= 0)
        cand[part.rows[mine]] = part.rows[c[mine]]
        conf[part.rows[mine]] = f[mine]
    infos = [r[2] for r in results]
    info = {
        "parts": len(parts),
        "part_suspects": [int(p.suspects.sum()) for p in parts],
        "part_captions": [int(p.captions.sum()) for p in parts],
        "n_edges": int(sum(i.get("n_edges", 0) for i in infos)),
        "iterations": int(max((i.get("iterations", 0) for i in infos), default=0)),
        "converged": bool(all(i.get("converged", True) for i in infos)),
    }
    return cand, conf, info
