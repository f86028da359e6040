"""Shared test setup: CPU only, offline, a private embedding cache, fixed terminal width."""

from __future__ import annotations

import os
from pathlib import Path

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
