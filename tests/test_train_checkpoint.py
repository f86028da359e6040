"""resume.pt: the training state round-trips, and files of earlier versions still load."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pmpclean.errors import ConfigError

torch = pytest.importorskip("torch")
checkpoint = pytest.importorskip("pmpclean.train.checkpoint")
loop = pytest.importorskip("pmpclean.train.loop")

SETTINGS = {"epochs": 3, "lr": 0.1, "device": "cpu"}


def _training_objects() -> SimpleNamespace:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return SimpleNamespace(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        settings=SETTINGS,
        n_train=5,
    )


def _old_payload(objects: SimpleNamespace) -> dict:
    """resume.pt as a version before the global rematch wrote it: no partner arrays,
    no ``infonce`` / ``rematched_rows`` statistics, ``best_rsum`` saved as null."""
    state = {
        "epoch": 1,
        "batch": 2,
        "step": 7,
        "split_info": {"source": "loss mixture"},
        "split_start": 0,
        "history": [{"epoch": 1, "loss": 2.0}],
        "epoch_stats": {"loss": 1.5, "chance": 3.0, "clean_rows": 4.0},
        "epoch_seconds": 1.25,
        "before": None,
        "best_rsum": None,
        "best_epoch": 1,
        "bad_epochs": 0,
        "stopped_early": False,
        "elapsed": 3.5,
    }
    return {
        "model": objects.model.state_dict(),
        "optimizer": objects.optimizer.state_dict(),
        "scheduler": objects.scheduler.state_dict(),
        "scaler": objects.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "settings": SETTINGS,
        "n_train": 5,
        "clean": torch.tensor([1, 0, 1, 1, 0], dtype=torch.uint8),
        "state_json": json.dumps(state),
    }


def test_resume_file_of_an_earlier_version_loads(tmp_path: Path) -> None:
    path = tmp_path / "resume.pt"
    torch.save(_old_payload(_training_objects()), path)
    ckpt = checkpoint.load_resume(path, settings=SETTINGS, n_train=5)
    state = loop.TrainState.from_dict(ckpt["state"])
    assert (state.epoch, state.batch, state.step, state.best_epoch) == (1, 2, 7, 1)
    assert state.best_rsum == -math.inf and state.elapsed == 3.5
    np.testing.assert_array_equal(state.clean, [True, False, True, True, False])
    np.testing.assert_array_equal(state.partner, [-1] * 5)  # no proposals in old runs
    np.testing.assert_array_equal(state.partner_weight, [0.0] * 5)
    assert state.partner.dtype == np.int64
    assert state.epoch_stats == {
        "loss": 1.5,
        "chance": 3.0,
        "clean_rows": 4.0,
        "infonce": 0.0,
        "rematched_rows": 0.0,
    }
    objects = _training_objects()
    objects.model.load_state_dict(ckpt["model"])
    objects.optimizer.load_state_dict(ckpt["optimizer"])


def test_resume_refuses_other_settings_or_data(tmp_path: Path) -> None:
    path = tmp_path / "resume.pt"
    torch.save(_old_payload(_training_objects()), path)
    with pytest.raises(ConfigError, match=r"settings differ .*lr: 0.1 -> 0.2"):
        checkpoint.load_resume(path, settings={**SETTINGS, "lr": 0.2}, n_train=5)
    # a setting free to change between sessions (the device) is no difference
    checkpoint.load_resume(path, settings={**SETTINGS, "device": "cuda"}, n_train=5)
    with pytest.raises(ConfigError, match="now has 6 usable training pairs.* had 5"):
        checkpoint.load_resume(path, settings=SETTINGS, n_train=6)


def test_training_state_round_trips(tmp_path: Path) -> None:
    objects = _training_objects()
    state = loop.TrainState(
        epoch=2,
        batch=1,
        step=9,
        clean=np.array([True, False, True, False, True]),
        partner=np.array([-1, 4, -1, 0, -1], dtype=np.int64),
        partner_weight=np.array([0.0, 0.9, 0.0, 0.7, 0.0]),
        split_info={"source": "audit (is_mismatched)", "n_suspects": 2},
        split_start=0,
        history=[{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}],
        epoch_stats={"loss": 0.25, "infonce": 0.5, "rematched_rows": 2.0},
        before={"rsum": 12.5},
        best_rsum=40.0,
        best_epoch=2,
        bad_epochs=1,
        elapsed=8.0,
    )
    path = tmp_path / "resume.pt"
    checkpoint.save_resume(path, run=objects, state=state)
    again = loop.TrainState.from_dict(
        checkpoint.load_resume(path, settings=SETTINGS, n_train=5)["state"]
    )
    for name in ("clean", "partner", "partner_weight"):
        np.testing.assert_array_equal(getattr(again, name), getattr(state, name))
        assert getattr(again, name).dtype == getattr(state, name).dtype
    assert again.scalars() == state.scalars()
