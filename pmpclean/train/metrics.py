"""Retrieval metrics of a fine-tuned model (image-to-text and text-to-image R@K)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    pass

logger = logging.getLogger(__name__)


_KS = (1, 5, 10)


def retrieval_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    image_group: np.ndarray,
    *,
    ks: tuple[int, ...] = _KS,
) -> dict[str, Any]:
    """Image-to-text and text-to-image recall@k of row-aligned pairs.

    Parameters
    ----------
    image_emb : ndarray, shape (n, d)
        Image embedding of each row (rows showing the same image repeat it), L2-normalised.
    text_emb : ndarray, shape (n, d)
        Caption embedding of each row, L2-normalised.
    image_group : ndarray, shape (n,)
        Rows showing the same image share a value.
    ks : tuple of int
        Cut-offs.

    Returns
    -------
    dict
        ``{"image_to_text": {"R@1": .., ...}, "text_to_image": {...}, "rsum": ..,
        "n_images": m, "n_captions": n}``. Recalls are in [0, 100] (percent), higher is
        better. Image-to-text: an image is a hit when any of its captions ranks in the
        top k among all n captions; text-to-image: a caption is a hit when its image
        ranks in the top k among the m unique images (the COCO/Flickr protocol).
        Ties count against the query.
    """
    img = np.asarray(image_emb, dtype=np.float32)
    txt = np.asarray(text_emb, dtype=np.float32)
    groups = np.asarray(image_group)
    n = img.shape[0]
    if txt.shape[0] != n or groups.shape[0] != n or img.ndim != 2 or txt.ndim != 2:
        raise ValueError(
            f"image_emb (n, d), text_emb (n, d) and image_group (n,) must be row-aligned, got "
            f"{img.shape}, {txt.shape}, {groups.shape}."
        )
    if n == 0:
        raise ValueError("retrieval_recall needs at least one pair.")
    _, first, codes = np.unique(groups, return_index=True, return_inverse=True)
    codes = codes.ravel()
    gallery = img[first]  # (m, d) one row per unique image
    m = gallery.shape[0]
    i2t_rank = np.empty(m, dtype=np.int64)
    t2i_rank = np.empty(n, dtype=np.int64)
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, m, chunk):
        sims = gallery[start : start + chunk] @ txt.T  # (c, n)
        own = codes[None, :] == np.arange(start, start + sims.shape[0])[:, None]
        best_own = np.where(own, sims, -np.inf).max(axis=1)
        i2t_rank[start : start + sims.shape[0]] = (
            np.where(own, -np.inf, sims) >= best_own[:, None]
        ).sum(1)
    chunk = max(1, 2_000_000 // max(m, 1))
    for start in range(0, n, chunk):
        sims = txt[start : start + chunk] @ gallery.T  # (c, m)
        c = sims.shape[0]
        own_sim = sims[np.arange(c), codes[start : start + c]]
        t2i_rank[start : start + c] = (sims >= own_sim[:, None]).sum(1) - 1
    out: dict[str, Any] = {"image_to_text": {}, "text_to_image": {}}
    for k in ks:
        out["image_to_text"][f"R@{k}"] = float(100.0 * np.mean(i2t_rank < k))
        out["text_to_image"][f"R@{k}"] = float(100.0 * np.mean(t2i_rank < k))
    out["rsum"] = float(sum(out["image_to_text"].values()) + sum(out["text_to_image"].values()))
    out["n_images"] = int(m)
    out["n_captions"] = int(n)
    return out
