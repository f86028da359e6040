r"""Make a tiny image-caption dataset with known injected mismatches.

    python examples/make_toy_dataset.py --out examples/toy \
        --n-images 120 --mismatch-rate 0.2 --seed 0

Each image is a 64x64 PNG drawn with PIL: one coloured shape (circle, square,
triangle, star, diamond or cross; red, green, blue, yellow, purple or orange; small
or large) on a plain background (white, black, gray or beige). Every image gets
``captions_per_image`` captions from varied templates and synonyms, e.g. "a small
red circle on a white background" or "little red round shape over white". Then a
fraction ``mismatch_rate`` of the rows have their caption swapped with another row's
caption (always a caption of a *different* image that contradicts this image), and
the answer is kept aside.

Files written to ``--out``:

``images/toy_0000.png ...``
    The drawings.
``captions.csv``
    The noisy manifest, one row per (image, caption): ``image`` (relative path),
    ``caption``, ``image_id``, ``caption_id`` (unique per row, usable as
    ``--id-col``), and the image's own attributes ``shape``, ``color``,
    ``background``, ``size``, and ``label``: the shape as a coarse class label in
    which a fraction ``label_noise`` of the images carry another shape (both rows of
    the image), for the label audit (``--label-col label``).
``truth.csv``
    ``row``, ``true_row`` (the row the caption now at ``row`` originally belonged
    to), ``is_mismatched`` (``true_row != row``), ``true_label`` (the image's shape)
    and ``is_label_noisy``.
``embeddings.npz``
    Arrays ``image`` and ``text``, both ``(n_rows, d)`` float32, L2-normalised and
    row-aligned with ``captions.csv`` (rows of the same image share the image vector).

**These embeddings are not CLIP.** They come from a tiny deterministic *attribute
encoder* that stands in for a real CLIP model so that the quickstart runs offline and
in a second: the image side encodes the attributes the image was drawn with, the
text side encodes the attributes *parsed from the caption text* (so a swapped
caption carries the description of another image). Both go through the same fixed
random orthonormal projection, plus small gaussian noise and a constant
per-modality offset, which gives them a CLIP-like "modality gap" (image and text
vectors live in two separate cones; true pairs have cosine ~0.4, unrelated pairs ~0).
With real photos, compute embeddings with ``pmpclean`` and an open_clip model instead.

The core is :func:`make_toy_dataset`; ``examples/`` is not a package, so tests load
this file with ``importlib``. Everything is deterministic under ``seed``.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pmpclean._utils import atomic_open, check_random_state
from pmpclean.data import write_table

# --------------------------------------------------------------------------- vocabulary

SHAPES: dict[str, list[str]] = {  # attribute -> phrases that name it (first = canonical)
    "circle": ["circle", "round shape", "disc", "dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "three-sided shape"],
    "star": ["star", "five-pointed star"],
    "diamond": ["diamond", "rhombus"],
    "cross": ["cross", "plus sign"],
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
}
BACKGROUND_WORDS: dict[str, list[str]] = {
    "white": ["white"],
    "black": ["black", "dark"],
    "gray": ["gray", "grey"],
    "beige": ["beige", "cream"],
}
SIZES: dict[str, list[str]] = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
SIZE_RADIUS = {"small": 11, "large": 22}

TEMPLATES: list[str] = [
    "a {size} {color} {shape} on a {bg} background",
    "a {color} {shape} on {bg}",
    "{size} {color} {shape} over {bg}",
    "picture of a {color} {shape} against a {bg} background",
    "there is a {size} {shape} in {color} on a plain {bg} backdrop",
    "a {bg} canvas with a {size} {color} {shape}",
    "clipart: {color} {shape}, {size}, {bg} background",
    "a {size} {color} {shape}",
]

IMAGE_SIZE = 64
DEFAULT_DIM = 32
# The stand-in "model weights": fixed, whatever the dataset seed.
_ENCODER_SEED = 20240617
_BLOCK_WEIGHTS = {"shape": 1.0, "color": 1.0, "background": 0.7, "size": 0.5}
_MODALITY_OFFSET = 2.0
_NOISE = 0.08


# --------------------------------------------------------------------------- the "encoder"


def _phrase_table() -> list[tuple[str, str, str]]:
    """(phrase, attribute, value), longest phrases first so 'five-pointed star' beats 'star'."""
    table: list[tuple[str, str, str]] = []
    for attr, vocab in (("shape", SHAPES), ("background", BACKGROUND_WORDS), ("size", SIZES)):
        for value, phrases in vocab.items():
            table += [(p, attr, value) for p in phrases]
    table += [(c, "color", c) for c in COLORS]
    return sorted(table, key=lambda t: -len(t[0]))


_PHRASES = _phrase_table()


def parse_caption(text: str) -> dict[str, str]:
    """Attributes named in a caption, e.g. ``{"shape": "circle", "color": "red", ...}``.

    Attributes the caption does not mention are absent from the result.
    """
    rest = " " + re.sub(r"[^a-z\- ]+", " ", text.lower()) + " "
    found: dict[str, str] = {}
    for phrase, attr, value in _PHRASES:
        pattern = r"(?<![a-z\-])" + re.escape(phrase) + r"(?![a-z\-])"
        if attr not in found and re.search(pattern, rest):
            found[attr] = value
            rest = re.sub(pattern, " ", rest)
    return found


def attribute_vector(attrs: dict[str, str]) -> np.ndarray:
    """Weighted one-hot blocks (shape, color, background, size); zeros for absent ones."""
    blocks = []
    for attr, values in (
        ("shape", list(SHAPES)),
        ("color", list(COLORS)),
        ("background", list(BACKGROUNDS)),
        ("size", list(SIZES)),
    ):
        block = np.zeros(len(values))
        if attr in attrs:
            block[values.index(attrs[attr])] = _BLOCK_WEIGHTS[attr]
        blocks.append(block)
    return np.concatenate(blocks)


def _encoder(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed projection (n_attr, dim) with orthonormal rows, and two modality offsets."""
    n_attr = len(attribute_vector({}))
    if dim < n_attr + 2:
        raise ValueError(f"dim must be at least {n_attr + 2} for the toy encoder, got {dim}")
    rng = np.random.default_rng(_ENCODER_SEED)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    projection = q[:, :n_attr].T  # rows orthonormal: keeps attribute inner products
    return projection, q[:, n_attr], q[:, n_attr + 1]  # offsets orthogonal to the attributes


def encode(
    attrs: Sequence[dict[str, str]],
    *,
    modality: str,
    dim: int = DEFAULT_DIM,
    noise: float = _NOISE,
    seed: int | np.random.Generator | None = 0,
) -> np.ndarray:
    """Stand-in embeddings, shape ``(len(attrs), dim)``, float32, L2-normalised.

    ``modality`` is ``"image"`` or ``"text"``; each adds its own constant offset.
    """
    if modality not in ("image", "text"):
        raise ValueError(f"Unknown modality {modality!r}: expected 'image' or 'text'")
    rng = check_random_state(seed)
    projection, off_image, off_text = _encoder(dim)
    x = np.stack([attribute_vector(a) for a in attrs]) @ projection
    x += _MODALITY_OFFSET * (off_image if modality == "image" else off_text)
    x += noise * rng.standard_normal(x.shape)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- drawing


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def draw_image(attrs: dict[str, str], *, dx: int = 0, dy: int = 0) -> Image.Image:
    """A 64x64 RGB drawing of ``attrs`` (shape, color, background, size), shifted by dx, dy."""
    im = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[attrs["background"]])
    d = ImageDraw.Draw(im)
    fill = COLORS[attrs["color"]]
    r = SIZE_RADIUS[attrs["size"]]
    cx, cy = IMAGE_SIZE / 2 + dx, IMAGE_SIZE / 2 + dy
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = attrs["shape"]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "star":
        d.polygon(_star(cx, cy, r), fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)
    else:  # cross
        w = max(2.0, 0.3 * r)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return im


def write_caption(attrs: dict[str, str], template: str, rng: np.random.Generator) -> str:
    """Fill ``template`` with a random synonym of each attribute of ``attrs``."""

    def pick(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    return template.format(
        shape=pick(SHAPES[attrs["shape"]]),
        color=attrs["color"],
        bg=pick(BACKGROUND_WORDS[attrs["background"]]),
        size=pick(SIZES[attrs["size"]]),
    )


# --------------------------------------------------------------------------- dataset


def _contradicts(caption_attrs: dict[str, str], image_attrs: dict[str, str]) -> bool:
    return any(image_attrs[k] != v for k, v in caption_attrs.items())


def _mismatch_cycle(
    rows: np.ndarray,
    image_of_row: np.ndarray,
    caption_attrs: list[dict[str, str]],
    image_attrs: list[dict[str, str]],
    rng: np.random.Generator,
) -> np.ndarray:
    """Order ``rows`` in a cycle; row order[j] receives the caption of order[j+1].

    Each moved caption must come from another image and contradict the receiving
    image (so the injected mismatch is a real one). Falls back to "another image".
    """

    def valid(order: np.ndarray, strict: bool) -> bool:
        for a, b in zip(order, np.roll(order, -1), strict=True):
            if image_of_row[a] == image_of_row[b]:
                return False
            if strict and not _contradicts(caption_attrs[b], image_attrs[image_of_row[a]]):
                return False
        return True

    for strict in (True, False):
        for _ in range(200):
            order = rng.permutation(rows)
            if valid(order, strict):
                return order
    raise ValueError(
        "could not shuffle captions across different images; lower mismatch_rate or raise n_images"
    )


def make_toy_dataset(
    out_dir: str | Path,
    *,
    n_images: int = 120,
    captions_per_image: int = 2,
    mismatch_rate: float = 0.2,
    seed: int | np.random.Generator | None = 0,
    dim: int = DEFAULT_DIM,
    label_noise: float = 0.15,
) -> dict[str, Any]:
    """Write a toy dataset with known mismatches to ``out_dir`` (see the module docstring).

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created; existing toy files are overwritten).
    n_images : int, default 120
        Number of drawings. Attribute combinations are unique while
        ``n_images <= 288`` (6 shapes x 6 colours x 4 backgrounds x 2 sizes).
    captions_per_image : int, default 2
        Captions per image (rows per image in ``captions.csv``), at most 8.
    mismatch_rate : float, default 0.2
        Fraction of rows whose caption is swapped with another row's, in [0, 1).
        ``round(mismatch_rate * n_rows)`` rows, but at least 2 when positive.
    seed : int, Generator or None, default 0
        Controls attributes, captions, the shuffle and the embedding noise.
    dim : int, default 32
        Embedding dimension of the stand-in encoder.
    label_noise : float, default 0.15
        Fraction of images whose ``label`` is flipped to another shape, in [0, 1).
        Drawn from its own stream of ``seed``, so it changes nothing else.

    Returns
    -------
    dict
        ``out_dir``, ``images_dir``, ``captions``, ``truth``, ``embeddings`` (paths),
        ``n_images``, ``n_rows``, ``n_mismatched`` and ``dim``.
    """
    if n_images < 2:
        raise ValueError(f"n_images must be at least 2, got {n_images}")
    if not 1 <= captions_per_image <= len(TEMPLATES):
        raise ValueError(
            f"captions_per_image must be in 1..{len(TEMPLATES)}, got {captions_per_image}"
        )
    if not 0.0 <= mismatch_rate < 1.0:
        raise ValueError(f"mismatch_rate must be in [0, 1), got {mismatch_rate}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    if isinstance(seed, np.random.Generator):
        label_rng = seed.spawn(1)[0]
    else:
        label_rng = np.random.default_rng(None if seed is None else [int(seed), 1])
    rng = check_random_state(seed)
    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    # attributes: unique combinations while there are enough of them
    combos = [
        {"shape": s, "color": c, "background": b, "size": z}
        for s in SHAPES
        for c in COLORS
        for b in BACKGROUNDS
        for z in SIZES
    ]
    picks = rng.choice(len(combos), size=n_images, replace=n_images > len(combos))
    image_attrs = [combos[int(i)] for i in picks]

    rows: list[dict[str, str]] = []
    for i, attrs in enumerate(image_attrs):
        image_id = f"toy_{i:04d}"
        dx, dy = (int(v) for v in rng.integers(-6, 7, size=2))
        draw_image(attrs, dx=dx, dy=dy).save(images_dir / f"{image_id}.png")
        templates = rng.choice(len(TEMPLATES), size=captions_per_image, replace=False)
        for k, t in enumerate(templates):
            rows.append(
                {
                    "image": f"images/{image_id}.png",
                    "caption": write_caption(attrs, TEMPLATES[int(t)], rng),
                    "image_id": image_id,
                    "caption_id": f"{image_id}_c{k}",
                    **attrs,
                }
            )
    n_rows = len(rows)
    image_of_row = np.repeat(np.arange(n_images), captions_per_image)
    original = [r["caption"] for r in rows]
    caption_attrs = [parse_caption(c) for c in original]

    # inject mismatches: a cycle over the chosen rows, one caption per image when possible
    k = round(mismatch_rate * n_rows)
    if 0 < mismatch_rate and k < 2:
        k = 2
    true_row = np.arange(n_rows)
    if k:
        if k <= n_images:
            imgs = rng.choice(n_images, size=k, replace=False)
            chosen = imgs * captions_per_image + rng.integers(0, captions_per_image, size=k)
        else:
            chosen = rng.choice(n_rows, size=k, replace=False)
        order = _mismatch_cycle(chosen, image_of_row, caption_attrs, image_attrs, rng)
        true_row[order] = np.roll(order, -1)
    for r in range(n_rows):
        rows[r]["caption"] = original[true_row[r]]

    # coarse class label: the shape, flipped to another shape for some images
    n_flip = round(label_noise * n_images)
    flipped = np.zeros(n_images, dtype=bool)
    flipped[label_rng.choice(n_images, size=n_flip, replace=False)] = True
    image_label = []
    for i, attrs in enumerate(image_attrs):
        others = [s for s in SHAPES if s != attrs["shape"]]
        image_label.append(
            others[label_rng.integers(len(others))] if flipped[i] else attrs["shape"]
        )
    for r in range(n_rows):
        rows[r]["label"] = image_label[image_of_row[r]]

    frame = pd.DataFrame(rows)
    truth = pd.DataFrame(
        {
            "row": np.arange(n_rows),
            "true_row": true_row,
            "is_mismatched": true_row != np.arange(n_rows),
            "true_label": [image_attrs[i]["shape"] for i in image_of_row],
            "is_label_noisy": flipped[image_of_row],
        }
    )

    # stand-in CLIP embeddings: image side from drawing attributes, text side from caption text
    image_emb = encode(image_attrs, modality="image", dim=dim, seed=rng)[image_of_row]
    text_emb = encode(
        [parse_caption(c) for c in frame["caption"]], modality="text", dim=dim, seed=rng
    )

    captions_path = write_table(frame, out / "captions.csv", force=True)
    truth_path = write_table(truth, out / "truth.csv", force=True)
    emb_path = out / "embeddings.npz"
    with atomic_open(emb_path, "wb") as fh:
        np.savez(fh, image=image_emb, text=text_emb)

    return {
        "out_dir": out,
        "images_dir": images_dir,
        "captions": captions_path,
        "truth": truth_path,
        "embeddings": emb_path,
        "n_images": n_images,
        "n_rows": n_rows,
        "n_mismatched": int((true_row != np.arange(n_rows)).sum()),
        "n_label_noisy": int(flipped[image_of_row].sum()),
        "dim": dim,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry: parse ``argv`` and call :func:`make_toy_dataset`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="examples/toy", help="output folder")
    parser.add_argument("--n-images", type=int, default=120)
    parser.add_argument("--captions-per-image", type=int, default=2)
    parser.add_argument("--mismatch-rate", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM)
    parser.add_argument("--label-noise", type=float, default=0.15)
    args = parser.parse_args(argv)
    info = make_toy_dataset(
        args.out,
        n_images=args.n_images,
        captions_per_image=args.captions_per_image,
        mismatch_rate=args.mismatch_rate,
        seed=args.seed,
        dim=args.dim,
        label_noise=args.label_noise,
    )
    print(
        f"wrote {info['n_rows']} rows ({info['n_images']} images, "
        f"{info['n_mismatched']} mismatched captions, {info['n_label_noisy']} rows with a "
        f"flipped label) to {info['out_dir']}"
    )
    print(f"  manifest:   {info['captions']}")
    print(f"  truth:      {info['truth']}")
    print(f"  embeddings: {info['embeddings']} (attribute stand-in for CLIP, d={info['dim']})")
    return info


if __name__ == "__main__":
    main()
