"""CLIP-like synthetic image-caption embeddings with known injected mismatches.

The generator reproduces the geometry that makes mismatch detection hard on real CLIP
embeddings, so that scores and splits can be tested offline without weights:

* a **narrow cosine band**: true pairs sit around 0.26 +- 0.04 and unrelated pairs
  around 0.14 +- 0.04 (CLIP ViT-B/32 on COCO looks alike; the band's position moves
  with ``gap`` and ``semantic``);
* a **modality gap**: images and captions live in two cones offset by
  modality-specific directions (``gap``) around a shared direction;
* **clusters** of unequal size (topics): captions of the same topic are closer to an
  image than unrelated ones, so random shuffles are easier than swaps within a topic;
* **hubs**: a few images are pulled toward the caption centroid and are close to
  many captions (the hubness that defeats raw-cosine thresholds);
* per-pair **alignment quality** (some true captions describe their image weakly);
* optionally several **captions per image** and **duplicated caption texts** shared
  by images of the same topic (true pairs with identical text).

Everything is seeded; the module only needs numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._utils import check_random_state
from .errors import ConfigError
from .noise import corrupt_indices

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["SyntheticPairs", "clip_like_pairs"]


@dataclass
class SyntheticPairs:
    """Row-aligned synthetic dataset (n rows), already corrupted.

    Attributes
    ----------
    image_emb : ndarray, shape (n, d), float32
        L2-normalised image embedding of each row.
    text_emb : ndarray, shape (n, d), float32
        L2-normalised embedding of the caption *observed* at each row (after the
        injected noise), i.e. ``clean_text_emb[true_row]``.
    clean_text_emb : ndarray, shape (n, d), float32
        Embedding of the caption that originally belonged to each row.
    image_group : ndarray, shape (n,), int64
        Image id; rows with several captions of one image share it.
    text_group : ndarray, shape (n,), int64
        Caption-text id of the observed caption; identical texts share it.
    true_row : ndarray, shape (n,), int64
        Input row whose caption now sits at each row (``pmpclean corrupt`` convention).
    is_mismatched : ndarray, shape (n,), bool
        ``image_group[true_row] != image_group``.
    cluster : ndarray, shape (n,), int64
        Topic of each row's image.
    is_hub : ndarray, shape (n,), bool
        Rows whose image is a hub.
    """

    image_emb: np.ndarray
    text_emb: np.ndarray
    clean_text_emb: np.ndarray
    image_group: np.ndarray
    text_group: np.ndarray
    true_row: np.ndarray
    is_mismatched: np.ndarray
    cluster: np.ndarray
    is_hub: np.ndarray

    def __len__(self) -> int:
        return int(self.image_emb.shape[0])

    @property
    def noise_rate(self) -> float:
        """Fraction of mismatched rows."""
        return float(self.is_mismatched.mean()) if len(self) else 0.0

    def to_frame(self) -> pd.DataFrame:
        """Manifest-like DataFrame: ``image``, ``caption``, ``true_row``, ``cluster``.

        Image names are ``img_<group>.png`` and captions ``"caption <text_group> of
        topic <cluster>"``, so rows of one image and identical texts stay recognisable.
        """
        import pandas as pd

        clean_text_group = np.empty_like(self.text_group)
        clean_text_group[self.true_row] = self.text_group
        topic_of_caption = self.cluster[self.true_row]
        return pd.DataFrame(
            {
                "image": [f"img_{g:05d}.png" for g in self.image_group.tolist()],
                "caption": [
                    f"caption {t} of topic {c}"
                    for t, c in zip(
                        self.text_group.tolist(), topic_of_caption.tolist(), strict=True
                    )
                ],
                "true_row": self.true_row,
                "cluster": self.cluster,
            }
        )


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def clip_like_pairs(
    n_pairs: int,
    *,
    dim: int = 512,
    noise_rate: float = 0.2,
    noise_mode: str = "shuffle",
    captions_per_image: int = 1,
    n_clusters: int = 50,
    duplicate_fraction: float = 0.0,
    hub_fraction: float = 0.02,
    hub_strength: float = 0.6,
    semantic: float = 0.5,
    cluster_weight: float = 0.8,
    gap: float = 0.7,
    noise: float = 1.0,
    seed: int | np.random.Generator | None = 0,
) -> SyntheticPairs:
    # long: numpydoc of 39 lines; body 94
    """Generate ``n_pairs`` CLIP-like (image, caption) rows with injected mismatches.

    Parameters
    ----------
    n_pairs : int
        Number of rows (pairs). With ``captions_per_image = c`` there are
        ``ceil(n_pairs / c)`` images, each with up to ``c`` caption rows.
    dim : int
        Embedding width d.
    noise_rate : float
        Fraction of rows whose caption is replaced (see :func:`pmpclean.noise.corrupt_indices`).
    noise_mode : {"shuffle", "hard", "mixed"}
        Random shuffle or swaps with the most similar images.
    captions_per_image : int
        Caption rows per image (COCO has 5).
    n_clusters : int
        Number of topics (unequal sizes, Zipf-like).
    duplicate_fraction : float
        Fraction of rows whose caption text is copied from another image of the same
        topic (identical texts, shared ``text_group``, still true pairs).
    hub_fraction, hub_strength : float
        Fraction of images pulled toward the caption centroid, and how far.
    semantic, cluster_weight, gap, noise : float
        Geometry: weight of the shared semantic content, of the topic inside it, of
        the modality-specific offsets, and of the per-modality noise. Larger
        ``semantic`` / smaller ``noise`` give an easier, wider-band dataset.
    seed : int, Generator or None
        Everything is drawn from this seed.

    Returns
    -------
    SyntheticPairs

    Examples
    --------
    >>> data = clip_like_pairs(200, dim=32, noise_rate=0.25, seed=0)
    >>> data.image_emb.shape, int(data.is_mismatched.sum())
    ((200, 32), 50)
    """
    if not isinstance(n_pairs, (int, np.integer)) or n_pairs < 2:
        raise ConfigError(f"n_pairs must be an integer >= 2, got {n_pairs!r}.")
    if dim < 2:
        raise ConfigError(f"dim must be at least 2, got {dim}.")
    if captions_per_image < 1:
        raise ConfigError(f"captions_per_image must be at least 1, got {captions_per_image}.")
    if n_clusters < 1:
        raise ConfigError(f"n_clusters must be at least 1, got {n_clusters}.")
    for name, val in (("duplicate_fraction", duplicate_fraction), ("hub_fraction", hub_fraction)):
        if not 0.0 <= val <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {val}.")
    rng = check_random_state(seed)
    n = int(n_pairs)
    n_images = -(-n // captions_per_image)
    image_group = (np.arange(n) // captions_per_image).astype(np.int64)

    # Topics of unequal size.
    centers = _unit(rng.standard_normal((n_clusters, dim)))
    p = 1.0 / np.sqrt(np.arange(1, n_clusters + 1))
    image_cluster = rng.choice(n_clusters, size=n_images, p=p / p.sum())
    content = _unit(
        cluster_weight * centers[image_cluster] + _unit(rng.standard_normal((n_images, dim)))
    )

    shared_dir = _unit(rng.standard_normal(dim))
    img_gap = _unit(rng.standard_normal(dim))
    txt_gap = _unit(rng.standard_normal(dim))

    img_raw = semantic * content + gap * img_gap + 0.5 * shared_dir
    img_raw = img_raw + noise * _unit(rng.standard_normal((n_images, dim)))
    is_hub_img = rng.random(n_images) < hub_fraction
    img_raw[is_hub_img] += hub_strength * _unit(
        txt_gap + shared_dir + 0.5 * semantic * centers.mean(0)
    )
    img = _unit(img_raw)[image_group]

    quality = rng.uniform(0.7, 1.3, size=n)
    txt_raw = (
        (quality * semantic)[:, None] * content[image_group] + gap * txt_gap + 0.5 * shared_dir
    )
    txt_raw = txt_raw + noise * _unit(rng.standard_normal((n, dim)))
    txt = _unit(txt_raw)
    text_group = np.arange(n, dtype=np.int64)
    cluster = image_cluster[image_group].astype(np.int64)

    n_dup = int(round(duplicate_fraction * n))
    if n_dup:
        # Copy captions between images of the same topic (never of the same image).
        for row in rng.choice(n, size=n_dup, replace=False).tolist():
            donors = np.flatnonzero((cluster == cluster[row]) & (image_group != image_group[row]))
            if donors.size:
                src = int(rng.choice(donors))
                txt[row] = txt[src]
                text_group[row] = text_group[src]
        _, text_group = np.unique(text_group, return_inverse=True)
        text_group = text_group.astype(np.int64)

    true_row = corrupt_indices(
        n,
        rate=noise_rate,
        mode=noise_mode,
        groups=image_group,
        # similar images = similar semantic content (image noise is not topical)
        embeddings=content[image_group] if noise_mode != "shuffle" else None,
        seed=rng,
    )
    return SyntheticPairs(
        image_emb=img.astype(np.float32),
        text_emb=txt[true_row].astype(np.float32),
        clean_text_emb=txt.astype(np.float32),
        image_group=image_group,
        text_group=text_group[true_row],
        true_row=true_row,
        is_mismatched=image_group[true_row] != image_group,
        cluster=cluster,
        is_hub=is_hub_img[image_group],
    )
