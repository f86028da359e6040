"""Shared test setup: CPU only, offline, a private embedding cache, fixed terminal width."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True)
_hyp_settings.register_profile("explore", derandomize=False)
_hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
