"""Tests for the noise-robust parts of pmpclean.training: the RINCE clean loss and its
chance level (adaptive split warmup), and their settings.

The training loop itself is tested in ``tests/test_finetune.py``; these tests call the
loss and split helpers directly on small synthetic tensors, plus one short run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pmpclean.errors import ConfigError
from pmpclean.training import FinetuneConfig, finetune, partial_ot_plan

torch = pytest.importorskip("torch")
F = pytest.importorskip("pmpclean.training")
C = pytest.importorskip("pmpclean.config")
TL = pytest.importorskip("pmpclean.train.loss")
TT = pytest.importorskip("pmpclean.train.targets")

pytestmark = pytest.mark.filterwarnings("ignore:model .pmpclean-tiny. has RANDOM weights")


def _batch(b: int = 6, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    return img, txt


def test_robust_q_zero_is_infonce_and_positive_q_is_rince() -> None:
    img, txt = _batch()
    b = img.shape[0]
    scale = torch.tensor(10.0)
    groups = torch.arange(b)
    clean = torch.ones(b, dtype=torch.bool)
    logits = scale * img @ txt.T
    ce_i = -torch.diagonal(torch.log_softmax(logits, dim=1))
    ce_t = -torch.diagonal(torch.log_softmax(logits, dim=0))

    infonce, st0 = TL._batch_loss(img, txt, scale, clean, groups, groups, FinetuneConfig())
    assert torch.allclose(infonce, (0.5 * (ce_i + ce_t)).mean())
    assert st0["infonce"] == pytest.approx(float((0.5 * (ce_i + ce_t)).sum()), rel=1e-6)

    q = 0.5
    rince, st = TL._batch_loss(img, txt, scale, clean, groups, groups, FinetuneConfig(robust_q=q))
    p_i, p_t = torch.exp(-ce_i), torch.exp(-ce_t)
    expected = (0.5 * ((1 - p_i**q) + (1 - p_t**q)) / q).mean()
    assert torch.allclose(rince, expected)
    # the InfoNCE of the batch is still recorded (the split and the logs use it)
    assert st["infonce"] == pytest.approx(st0["infonce"], rel=1e-6)
    # q -> 0 recovers InfoNCE
    tiny, _ = TL._batch_loss(img, txt, scale, clean, groups, groups, FinetuneConfig(robust_q=1e-6))
    assert float(tiny) == pytest.approx(float(infonce), rel=1e-4)


def test_rince_pulls_less_on_pairs_the_model_cannot_fit() -> None:
    """Known answer: a swapped pair has a low probability for its given partner, so RINCE
    gives it a smaller share of the gradient than InfoNCE does."""
    d = 6
    eye = torch.eye(d)
    img = eye.clone()
    txt = eye.clone()
    txt[[4, 5]] = txt[[5, 4]]  # rows 4 and 5 are mismatched
    groups = torch.arange(d)
    clean = torch.ones(d, dtype=torch.bool)

    def grad_norms(cfg: FinetuneConfig) -> torch.Tensor:
        t = txt.clone().requires_grad_(True)
        loss, _ = TL._batch_loss(img, t, torch.tensor(5.0), clean, groups, groups, cfg)
        loss.backward()
        return t.grad.norm(dim=1)

    ratio = grad_norms(FinetuneConfig(robust_q=0.5)) / grad_norms(FinetuneConfig())
    # the fitted pairs keep (almost) their InfoNCE gradient, the swapped ones lose most
    # of it: their weight is p^q with p ~ 0.007, i.e. ~0.08
    assert bool((ratio[:4] > 0.9).all())
    assert bool((ratio[4:] < 0.1).all())


@pytest.mark.parametrize("b", [2, 8, 64])
@pytest.mark.parametrize("q", [0.0, 0.3, 1.0])
def test_chance_loss_is_the_loss_of_an_uninformed_model(b: int, q: float) -> None:
    # all logits equal: every partner has probability 1/b
    img = torch.nn.functional.normalize(torch.ones(b, 4), dim=1)
    txt = img.clone()
    groups = torch.arange(b)
    loss, _ = TL._batch_loss(
        img,
        txt,
        torch.tensor(3.0),
        torch.ones(b, dtype=torch.bool),
        groups,
        groups,
        FinetuneConfig(robust_q=q),
    )
    assert float(loss) == pytest.approx(TL._chance_loss(b, q), rel=1e-5)
    if q == 0:
        assert TL._chance_loss(b, q) == pytest.approx(math.log(b))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"robust_q": -0.1}, r"robust_q must be in \[0, 1\]"),
        ({"robust_q": 1.5}, r"robust_q must be in \[0, 1\]"),
        ({"robust_q": float("nan")}, r"robust_q must be in \[0, 1\]"),
    ],
)
def test_bad_robust_settings_fail_clearly(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        C._validate(FinetuneConfig(**options))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "robust_q", "resolved"),
    [("l2rm", None, 0.3), ("contrastive", None, 0.0), ("contrastive", 0.5, 0.5)],
)
def test_robust_q_default_is_rince_for_l2rm_from_random_init(
    tmp_path: Path, drawn_captions: Path, method: str, robust_q: float | None, resolved: float
) -> None:
    torch.set_num_threads(1)
    data = drawn_captions
    res = finetune(
        data,
        out_dir=tmp_path / "out",
        model="pmpclean-tiny",
        pretrained="none",
        method=method,
        robust_q=robust_q,
        epochs=2,
        batch_size=6,
        lr=2e-3,
        val_fraction=0.0,
        device="cpu",
        split_warmup_epochs=1,
        truth_col="true_row",
    )
    hist = res.metrics["history"]
    assert res.metrics["settings"]["robust_q"] == robust_q
    assert res.metrics["resolved"]["robust_q"] == resolved
    # the adaptive warmup compares the loss with its own chance level
    assert hist[0]["chance_loss"] == pytest.approx(TL._chance_loss(6, resolved))
    assert all(h["infonce_loss"] > 0 for h in hist)
    if resolved == 0:
        assert all(h["loss"] == pytest.approx(h["infonce_loss"]) for h in hist)
    else:
        assert all(h["loss"] < h["infonce_loss"] for h in hist)  # (1 - p^q)/q < -log p
    if method == "l2rm":
        assert hist[1]["split"]["source"] == "loss mixture"


def test_robust_q_default_stays_infonce_on_a_scan_folder(
    tmp_path: Path, drawn_captions: Path, scan_folder_of
) -> None:
    """With a scan's split from the first epoch the default clean loss is InfoNCE."""
    torch.set_num_threads(1)
    data = drawn_captions
    scan_dir = scan_folder_of(data, tmp_path / "scan")
    res = finetune(
        scan_dir,
        out_dir=tmp_path / "out",
        model="pmpclean-tiny",
        pretrained="none",
        epochs=1,
        batch_size=6,
        lr=2e-3,
        val_fraction=0.0,
        device="cpu",
    )
    assert res.metrics["dataset"]["audit_split"] is True
    assert res.metrics["resolved"]["robust_q"] == 0.0
    assert res.metrics["history"][0]["chance_loss"] == pytest.approx(math.log(6))


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(0, 0, 0.0), (9, 10, 0.71755), (10, 10, 0.85892), (0, 10, 0.0), (80, 100, 0.74407)],
)
def test_wilson_lower_bound_known_answers(k: int, n: int, expected: float) -> None:
    """One-sided 90 % Wilson bound (z = 1.2816), the planted check's pass mark; with k = n
    it is n / (n + z^2)."""
    assert TT._wilson_lower(k, n) == pytest.approx(expected, abs=5e-5)
    if n:
        assert TT._wilson_lower(k, n) <= k / n + 1e-12
        assert TT._wilson_lower(k, n, z=0.0) == pytest.approx(k / n)


def test_planted_rows_are_a_quarter_of_the_clean_rows_at_most_256_or_none() -> None:
    from types import SimpleNamespace

    def planted(n: int, n_suspects: int) -> int:
        clean = np.ones(n, dtype=bool)
        clean[n - n_suspects :] = False
        train = SimpleNamespace(image_index=np.arange(n), text_group=np.arange(n))
        rows = TT._plant_rows(clean, train, np.random.default_rng(0))
        assert clean[rows].all() and np.array_equal(rows, np.sort(rows))
        return rows.size

    assert planted(100, 20) == 20  # a quarter of 80 clean rows
    assert planted(2000, 100) == 256  # at most 256
    assert planted(40, 8) == 8  # 32 // 4 = 8: just enough
    assert planted(38, 8) == 0  # 30 // 4 = 7 < 8: unchecked


@pytest.mark.parametrize(
    ("plan", "rows_kept", "cols_kept"),
    [
        ([[0.05, 0.35], [0.30, 0.10]], [0, 1], [0, 1]),
        ([[0.01, 0.01], [0.30, 0.10]], [1], [0, 1]),  # row 0 moves 4 % < min_plan_mass
    ],
)
def test_suspects_soft_target_loss_is_the_symmetric_kl_to_the_plan(
    monkeypatch: pytest.MonkeyPatch,
    plan: list[list[float]],
    rows_kept: list[int],
    cols_kept: list[int],
) -> None:
    """In-batch targets (suspect_targets="batch"): the plan between the batch's suspects,
    normalised per row (and per column), is matched to the model's in-batch softmax by a
    symmetric KL; the batch loss is (clean InfoNCE + noisy_weight * KL / 2) / b."""
    img, txt = _batch(5, 8, seed=3)
    scale = torch.tensor(7.0)
    clean = torch.tensor([True, True, True, False, False])
    groups = torch.arange(5)
    cfg = FinetuneConfig(
        suspect_targets="batch", target_quantile=None, noisy_weight=0.7, ot_mass=0.9, ot_reg=0.2
    )
    fixed = torch.tensor(plan)
    calls = []

    def fake_plan(cost: torch.Tensor, **kw: object) -> torch.Tensor:
        calls.append((cost, kw))
        return fixed

    monkeypatch.setattr(TL, "partial_ot_plan", fake_plan)
    loss, stats = TL._batch_loss(img, txt, scale, clean, groups, groups, cfg)

    ((cost, kw),) = calls
    torch.testing.assert_close(cost, 1.0 - img[3:] @ txt[3:].T)
    assert kw["mass"] == 0.9 and kw["reg"] == 0.2
    assert torch.equal(kw["forbid"], torch.eye(2, dtype=torch.bool))  # its own caption
    sub = scale * img[3:] @ txt[3:].T

    def sym_kl(logits: torch.Tensor, p_plan: torch.Tensor) -> torch.Tensor:
        q = p_plan / p_plan.sum(1, keepdim=True)
        log_p = torch.log_softmax(logits, 1)
        p = log_p.exp()
        return ((q * (q.log() - log_p)).sum(1) + (p * (log_p - q.log())).sum(1)).sum()

    kl = 0.5 * sym_kl(sub[rows_kept], fixed[rows_kept])
    kl = kl + 0.5 * sym_kl(sub.T[cols_kept], fixed.T[cols_kept])
    logits = scale * img @ txt.T
    ce = torch.nn.functional.cross_entropy
    infonce = 0.5 * (
        ce(logits, torch.arange(5), reduction="none")
        + ce(logits.T, torch.arange(5), reduction="none")
    )
    expected = (infonce[:3].sum() + 0.7 * kl) / 5
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert stats["noisy_targets"] == (len(rows_kept) + len(cols_kept)) / 2
    assert stats["noisy_loss"] == pytest.approx(float(kl), rel=1e-5)
    assert stats["noisy_rows"] == 2 and stats["clean_rows"] == 3
    assert stats["clean_loss"] == pytest.approx(float(infonce[:3].sum()), rel=1e-5)
    assert stats["infonce"] == pytest.approx(float(infonce.sum()), rel=1e-5)


def test_other_rows_of_the_same_image_are_no_negatives() -> None:
    """Rows 0 and 1 show one image: each is left out of the other's softmax (both ways)."""
    img, txt = _batch(4, 8, seed=5)
    scale = torch.tensor(5.0)
    image_group = torch.tensor([0, 0, 1, 2])
    text_group = torch.arange(4)
    loss, _ = TL._batch_loss(
        img, txt, scale, torch.ones(4, dtype=torch.bool), image_group, text_group, FinetuneConfig()
    )
    logits = scale * img @ txt.T
    keep = ~torch.tensor(
        [[False, True, False, False], [True, False, False, False]] + [[False] * 4] * 2
    )
    ce_rows = [
        -torch.log_softmax(logits[i][keep[i]], 0)[keep[i][: i + 1].sum() - 1] for i in range(4)
    ]
    ce_cols = [
        -torch.log_softmax(logits[:, j][keep[:, j]], 0)[keep[: j + 1, j].sum() - 1]
        for j in range(4)
    ]
    expected = 0.5 * (torch.stack(ce_rows) + torch.stack(ce_cols)).sum() / 4
    torch.testing.assert_close(loss, expected)


def test_zero_noisy_weight_gives_suspects_no_targets() -> None:
    img, txt = _batch(6, 8, seed=6)
    clean = torch.tensor([True, True, True, True, False, False])
    groups = torch.arange(6)
    cfg = FinetuneConfig(suspect_targets="batch", ot_mass=1.0, target_quantile=None)
    _, on = TL._batch_loss(img, txt, torch.tensor(10.0), clean, groups, groups, cfg)
    assert on["noisy_targets"] == 2
    off_cfg = cfg.replace(noisy_weight=0.0)
    loss, off = TL._batch_loss(img, txt, torch.tensor(10.0), clean, groups, groups, off_cfg)
    assert off["noisy_rows"] == 2 and off["noisy_targets"] == 0 and off["noisy_loss"] == 0


def test_partial_ot_plan_of_a_single_row_moves_its_mass() -> None:
    """One image, three captions, 30 % of the mass: it goes to the cheapest caption."""
    cost = torch.tensor([[0.9, 0.1, 0.5]])
    plan = partial_ot_plan(cost, mass=0.3, reg=0.02)
    assert float(plan.sum()) == pytest.approx(0.3, rel=1e-3)
    assert float(plan[0, 1]) == pytest.approx(0.3, rel=1e-2)


def test_planted_rows_follow_the_generator() -> None:
    """Which clean rows are planted is a seeded random choice, not always the first ones."""
    from types import SimpleNamespace

    n = 400
    clean = np.arange(n) < 300
    train = SimpleNamespace(image_index=np.arange(n), text_group=np.arange(n))
    a = TT._plant_rows(clean, train, np.random.default_rng(0))
    b = TT._plant_rows(clean, train, np.random.default_rng(1))
    again = TT._plant_rows(clean, train, np.random.default_rng(0))
    assert a.size == b.size == 75 and np.array_equal(a, again)
    assert not np.array_equal(a, b)
