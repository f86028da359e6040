"""Files of a fine-tuning run: the weights and their open_clip configs, settings,
metrics, and ``resume.pt`` (save, load, and the layout of older versions)."""

from __future__ import annotations

import json
import logging
import math
import platform
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._utils import atomic_open, atomic_path, to_jsonable
from ..config import FinetuneConfig
from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    pass

logger = logging.getLogger(__name__)


CHECKPOINT_NAME = "open_clip_pytorch_model.bin"


OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"


MODEL_CONFIG_NAME = "model_config.json"


METRICS_NAME = "metrics.json"


SETTINGS_NAME = "finetune_config.yaml"


RESUME_NAME = "resume.pt"


_OUTPUT_NAMES = (
    CHECKPOINT_NAME,
    OPEN_CLIP_CONFIG_NAME,
    MODEL_CONFIG_NAME,
    METRICS_NAME,
    SETTINGS_NAME,
    RESUME_NAME,
)


#: Settings that may differ between an interrupted run and its resumption.
_RESUME_FREE = frozenset(
    {"device", "workers", "checkpoint_every", "keep_resume", "resume", "overwrite", "cache_images"}
)


def _versions() -> dict[str, str]:
    from .. import __version__

    out = {"pmpclean": __version__, "python": platform.python_version()}
    for name in ("numpy", "torch", "open_clip", "sklearn"):
        try:
            out[name] = str(getattr(__import__(name), "__version__", "?"))
        except Exception:  # noqa: BLE001 - a missing optional module is not an error here
            out[name] = "not installed"
    return out


def _write_json(path: Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, allow_nan=False, default=str)
        fh.write("\n")


def _save_weights(model: Any, out_dir: Path, model_cfg: dict[str, Any]) -> Path:
    import open_clip
    import torch

    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    target = out_dir / CHECKPOINT_NAME
    with atomic_path(target) as tmp:
        torch.save(state, tmp)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    _write_json(
        out_dir / OPEN_CLIP_CONFIG_NAME,
        to_jsonable({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}),
    )
    _write_json(out_dir / MODEL_CONFIG_NAME, to_jsonable(model_cfg))
    return target


def _settings_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def _prepare_out_dir(out_dir: Path, cfg: FinetuneConfig) -> bool:
    """Check the output folder; return True when an interrupted run should be resumed."""
    existing = [n for n in _OUTPUT_NAMES if (out_dir / n).exists()]
    resume_file = out_dir / RESUME_NAME
    if cfg.resume:
        if resume_file.is_file():
            return True
        if (out_dir / METRICS_NAME).is_file():
            raise ConfigError(
                f"The run in {out_dir} already finished (metrics.json is written and there is no "
                f"{RESUME_NAME}); there is nothing to resume. Pass overwrite to train again."
            )
        warnings.warn(
            f"resume was requested but {resume_file} does not exist; starting a new run.",
            stacklevel=3,
        )
        return False
    if existing and not cfg.overwrite:
        raise ConfigError(
            f"{out_dir} already holds a fine-tuning run ({', '.join(existing)}); pass resume "
            "(--resume) to continue an interrupted run or overwrite (--overwrite) to start over, "
            "or choose another output folder."
        )
    for name in existing:
        (out_dir / name).unlink()
    return False


def _write_settings(out: Path, settings: dict[str, Any], resolved: dict[str, Any]) -> None:
    import yaml

    doc = {"settings": settings, "resolved": resolved, "versions": _versions()}
    with atomic_open(out / SETTINGS_NAME, "w", encoding="utf-8") as fh:
        fh.write("# pmpclean finetune: resolved settings of this run\n")
        yaml.safe_dump(to_jsonable(doc), fh, sort_keys=False)


# --------------------------------------------------------------------------- resume.pt
# The payload layout is the one of every earlier version (weights, optimizer,
# scheduler, scaler, torch RNG, settings, n_train, the split arrays as tensors and the
# rest of the state as JSON); runs of versions before the global rematch have no
# ``partner`` arrays and no ``infonce`` / ``rematched_rows`` epoch statistics.


def save_resume(path: Path, *, run: Any, state: Any) -> None:
    """Write ``resume.pt`` atomically: the model, optimizer and schedule of ``run``, ``state``."""
    import torch

    def tensor(x: np.ndarray | None) -> Any:
        return None if x is None else torch.from_numpy(x)

    payload = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "settings": run.settings,
        "n_train": run.n_train,
        "clean": None if state.clean is None else torch.from_numpy(state.clean.astype(np.uint8)),
        "partner": tensor(state.partner),
        "partner_weight": tensor(state.partner_weight),
        "state_json": json.dumps(to_jsonable(state.scalars())),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_resume(path: Path, *, settings: dict[str, Any], n_train: int) -> dict[str, Any]:
    """Read ``resume.pt`` and check that it continues this run; return its payload.

    ``payload["state"]`` holds the training state as a dict of
    :class:`pmpclean.train.loop.TrainState` fields, arrays as numpy.
    """
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    out = path.parent
    old = ckpt["settings"]
    diff = sorted(k for k in settings if k not in _RESUME_FREE and old.get(k) != settings[k])
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in diff)
        raise ConfigError(
            f"Cannot resume the run in {out}: settings differ from the interrupted run "
            f"({details}). Use the same settings, or pass overwrite to start over."
        )
    if int(ckpt["n_train"]) != n_train:
        raise ConfigError(
            f"Cannot resume the run in {out}: the dataset now has {n_train} usable "
            f"training pairs, the interrupted run had {int(ckpt['n_train'])}. "
            "Use the same data, or pass overwrite to start over."
        )
    state = json.loads(ckpt["state_json"])
    if state.get("best_rsum") is None:
        state["best_rsum"] = -math.inf
    clean = ckpt["clean"]
    state["clean"] = None if clean is None else clean.numpy().astype(bool)
    partner = ckpt.get("partner")
    if partner is None:  # a run of an older version, or before the first split
        state["partner"] = np.full(n_train, -1, dtype=np.int64)
        state["partner_weight"] = np.zeros(n_train, dtype=np.float64)
    else:
        state["partner"] = partner.numpy().astype(np.int64)
        state["partner_weight"] = ckpt["partner_weight"].numpy().astype(np.float64)
    stats = state.get("epoch_stats") or {}
    stats.setdefault("infonce", 0.0)  # absent in runs of older versions
    stats.setdefault("rematched_rows", 0.0)
    state["epoch_stats"] = stats
    ckpt["state"] = state
    return ckpt
