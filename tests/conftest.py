"""Shared test setup: CPU only, offline, a private embedding cache, fixed terminal width."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings as _hyp_settings

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["COLUMNS"] = "120"
os.environ.pop("PMPCLEAN_DEBUG", None)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never write to the user's real cache from a test."""
    monkeypatch.setenv("PMPCLEAN_CACHE_DIR", str(tmp_path_factory.mktemp("pmpclean-cache")))


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the project; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def _write_scan_folder(manifest: Path, folder: Path) -> Path:
    """A minimal ``pmpclean scan`` output for ``manifest``: the truth as the audit's split.

    ``audit.csv`` holds the manifest's rows with ``image_path`` (as given, relative to the
    manifest, which ``summary.json`` names) and ``is_mismatched`` from ``true_row``.
    """
    import json

    import numpy as np
    import pandas as pd

    frame = pd.read_csv(manifest)
    frame["image_path"] = frame["image"]
    frame["is_mismatched"] = frame["true_row"].to_numpy() != np.arange(len(frame))
    folder.mkdir(parents=True)
    frame.to_csv(folder / "audit.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"manifest": str(manifest)}))
    return folder


@pytest.fixture
def scan_folder_of():
    """``scan_folder_of(manifest, folder)`` writes a truth-split scan folder (see above)."""
    return _write_scan_folder


# Property tests draw the same examples on every run (CI must not depend on luck);
# HYPOTHESIS_PROFILE=explore searches afresh.
_hyp_settings.register_profile("ci", derandomize=True)
_hyp_settings.register_profile("explore", derandomize=False)
_hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
_BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20)}
_SHAPES = ("circle", "square")


@pytest.fixture(scope="session")
def drawn_captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 drawings (6 colours x 2 backgrounds x 2 shapes), one caption each, 4 swapped.

    ``captions.csv`` (columns ``image``, ``caption``, ``true_row``) beside ``img/``;
    the swapped rows 0, 7, 13 and 22 form one cycle, a known answer. Read-only.
    """
    import numpy as np
    import pandas as pd
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("drawn")
    (root / "img").mkdir()
    rows = []
    for c, rgb in _COLORS.items():
        for b, bg in _BACKGROUNDS.items():
            for shape in _SHAPES:
                name = f"img/{c}_{b}_{shape}.png"
                im = Image.new("RGB", (32, 32), bg)
                draw = ImageDraw.Draw(im)
                (draw.ellipse if shape == "circle" else draw.rectangle)((6, 6, 26, 26), fill=rgb)
                im.save(root / name)
                rows.append({"image": name, "caption": f"a {c} {shape} on {b}"})
    frame = pd.DataFrame(rows)
    true_row = np.arange(len(frame))
    swap = np.array([0, 7, 13, 22])
    true_row[swap] = np.roll(swap, -1)
    frame["caption"] = frame["caption"].to_numpy()[true_row]
    frame["true_row"] = true_row
    frame.to_csv(root / "captions.csv", index=False)
    return root / "captions.csv"


# --------------------------------------------------------------------------- image twins

# EXIF orientation -> how a camera stored the upright picture (numpy, independent of PIL)
_EXIF_STORED = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, 1),  # phone held upright: stored turned 90 degrees left
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transverse
    8: lambda a: np.rot90(a, -1),  # stored turned 90 degrees right
}


def write_image_twins(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Image files in unusual modes or orientations, each with its 8-bit RGB twin.

    Returns ``{name: (file, twin)}``: ``twin`` is a plain RGB PNG of what ``file``
    shows (upright, transparency on white, 16-bit and float ranges scaled), so a
    faithful decoder gives the same pixels for both, up to rounding (1 level).
    The picture is 16 x 10 and asymmetric, so that any rotation or flip shows.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    h, w = 10, 16
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[0, 0], rgb[-1, -1] = 0, 255  # the extremes of the range are present
    gray = rgb[..., 0].copy()
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[:, 0], alpha[:, 1] = 0, 255  # fully transparent and fully opaque columns

    def on_white(color: np.ndarray, a: np.ndarray) -> np.ndarray:
        f = a.astype(np.float64)[..., None] / 255
        out = color.astype(np.float64).reshape(h, w, -1) * f + 255 * (1 - f)
        return np.broadcast_to(np.rint(out), (h, w, 3)).astype(np.uint8)

    def as_rgb(g: np.ndarray) -> np.ndarray:
        return np.repeat(g[..., None], 3, axis=2)

    pairs: dict[str, tuple[Any, np.ndarray, str]] = {}  # name -> (image, twin pixels, suffix)
    wide = gray.astype(np.uint16) * 257
    pairs["I;16 png"] = (Image.fromarray(wide), as_rgb(gray), ".png")
    pairs["I;16B tiff"] = (
        Image.frombytes("I;16B", (w, h), wide.astype(">u2").tobytes()),
        as_rgb(gray),
        ".tiff",
    )
    pairs["I tiff"] = (Image.fromarray(wide.astype(np.int32)), as_rgb(gray), ".tiff")
    unit = gray.astype(np.float32) / 255
    pairs["F [0,1] tiff"] = (Image.fromarray(unit), as_rgb(gray), ".tiff")
    pairs["F [0,255] tiff"] = (
        Image.fromarray(gray.astype(np.float32)),
        as_rgb(gray),
        ".tiff",
    )
    pairs["1 png"] = (
        Image.fromarray(gray >= 128),
        as_rgb(np.where(gray >= 128, 255, 0).astype(np.uint8)),
        ".png",
    )
    pairs["L png"] = (Image.fromarray(gray), as_rgb(gray), ".png")
    pairs["LA png"] = (
        Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA"),
        on_white(gray, alpha),
        ".png",
    )
    pairs["RGBA png"] = (
        Image.fromarray(np.concatenate([rgb, alpha[..., None]], axis=2), mode="RGBA"),
        on_white(rgb, alpha),
        ".png",
    )
    cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    ink = cmyk.astype(np.float64)
    pairs["CMYK tiff"] = (
        Image.frombytes("CMYK", (w, h), cmyk.tobytes()),
        np.rint((255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255).astype(np.uint8),
        ".tiff",
    )
    palette = rng.integers(0, 256, (6, 3), dtype=np.uint8)
    index = rng.integers(0, 6, (h, w), dtype=np.uint8)
    index[0, 0] = 5
    pal = Image.fromarray(index, mode="P")
    pal.putpalette(palette.ravel().tolist())
    pairs["P png"] = (pal, palette[index], ".png")
    pal_t = pal.copy()
    pal_t.info["transparency"] = 5  # palette entry 5 is transparent
    pairs["P transparent png"] = (
        pal_t,
        np.where((index == 5)[..., None], 255, palette[index]).astype(np.uint8),
        ".png",
    )
    pa = np.stack([index, alpha], axis=2)
    pa_im = Image.frombytes("PA", (w, h), pa.tobytes())
    pa_im.putpalette(palette.ravel().tolist())
    pairs["PA tiff"] = (pa_im, on_white(palette[index], alpha), ".tiff")
    for orientation, stored in _EXIF_STORED.items():
        pairs[f"EXIF orientation {orientation} png"] = (
            Image.fromarray(np.ascontiguousarray(stored(rgb))),
            rgb,
            ".png",
        )

    out: dict[str, tuple[Path, Path]] = {}
    for i, (name, (image, twin, suffix)) in enumerate(pairs.items()):
        path, twin_path = folder / f"m{i}{suffix}", folder / f"m{i}-twin.png"
        kwargs: dict[str, Any] = {}
        if name.startswith("EXIF"):
            exif = Image.Exif()
            exif[0x0112] = int(name.split()[2])
            kwargs["exif"] = exif
        if "transparency" in image.info:
            kwargs["transparency"] = image.info["transparency"]
        image.save(path, **kwargs)
        Image.fromarray(np.ascontiguousarray(twin), mode="RGB").save(twin_path)
        out[name] = (path, twin_path)
    return out


@pytest.fixture(scope="session")
def image_twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """:func:`write_image_twins` in a session folder (read-only)."""
    return write_image_twins(tmp_path_factory.mktemp("twins"))
