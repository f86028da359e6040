"""Transport costs: fixed, learned edge-wise (EdgeCost) and the paper's network."""

from __future__ import annotations

import numpy as np
import pytest

from pmpclean.cost import (
    DEFAULT_FEATURES,
    FEATURE_NAMES,
    EdgeCost,
    PaperCost,
    average_costs,
    edge_features,
    fit_edge_cost,
    fit_paper_cost,
    fixed_cost,
)


def test_fixed_cost_is_one_minus_similarity() -> None:
    s = np.array([[0.9, 0.1], [-0.2, 0.5]])
    np.testing.assert_allclose(fixed_cost(s), 1.0 - s)


def test_edge_features_margins_and_scale() -> None:
    # one row with candidates 0.8 (best), 0.5, 0.3; columns: each edge's column best
    sim = np.array([0.8, 0.5, 0.3])
    row_best, row_second, row_mean = np.full(3, 0.8), np.full(3, 0.5), np.full(3, 0.55)
    col_best = np.array([0.8, 0.7, 0.3])
    col_second = np.array([0.6, 0.5, 0.1])
    col_mean = np.array([0.6, 0.6, 0.2])
    f = edge_features(
        sim, row_best, row_second, row_mean, col_best, col_second, col_mean, scale=0.5
    )
    assert f.shape == (3, len(FEATURE_NAMES)) and f.dtype == np.float32
    # sim / scale
    np.testing.assert_allclose(f[:, 0], sim / 0.5, rtol=1e-6)
    # row margin: the top edge is compared with the second best, others with the best
    np.testing.assert_allclose(f[:, 1], np.array([0.3, -0.3, -0.5]) / 0.5, rtol=1e-6)
    # column margin: edge 1 is not its column's best (0.7), edges 0 and 2 are
    np.testing.assert_allclose(f[:, 2], np.array([0.2, -0.2, 0.2]) / 0.5, rtol=1e-6)
    np.testing.assert_allclose(f[:, 3], (sim - 0.55) / 0.5, rtol=1e-6)
    np.testing.assert_allclose(f[:, 4], (sim - col_mean) / 0.5, rtol=1e-6)


def test_edge_features_single_candidate_has_zero_margin() -> None:
    f = edge_features(
        np.array([0.4]),
        np.array([0.4]),
        np.array([-np.inf]),
        np.array([0.4]),
        np.array([0.4]),
        np.array([-np.inf]),
        np.array([0.4]),
        scale=1.0,
    )
    assert np.isfinite(f).all()
    assert f[0, 1] == 0.0 and f[0, 2] == 0.0


def test_unfitted_edge_cost_equals_fixed_cost() -> None:
    rng = np.random.default_rng(0)
    model = EdgeCost(
        rng.normal(size=(len(DEFAULT_FEATURES), 8)).astype(np.float32),
        np.zeros(8, np.float32),
        np.zeros(8, np.float32),
        0.0,
        0.1,
    )
    sim = rng.uniform(-1, 1, size=50)
    feats = rng.normal(size=(50, 5)).astype(np.float32)
    np.testing.assert_allclose(model(sim, feats), 1.0 - sim, rtol=1e-6)


def _hubness_problem(n_seg: int, per_seg: int, seed: int):
    """Segments whose true edge stands out in its column but has not the best similarity.

    In each segment the decoy edge has a higher similarity but is a hub caption, close
    to every image (``sim - col_mean`` small); the true edge wins on ``col_csls``.
    """
    rng = np.random.default_rng(seed)
    n = n_seg * per_seg
    seg = np.repeat(np.arange(n_seg), per_seg)
    sim = rng.uniform(0.2, 0.4, size=n)
    col_csls = rng.uniform(-0.1, 0.1, size=n)
    true_idx = np.arange(n_seg) * per_seg
    decoy_idx = true_idx + 1
    sim[true_idx] = rng.uniform(0.42, 0.5, size=n_seg)
    col_csls[true_idx] = 0.2
    sim[decoy_idx] = sim[true_idx] + rng.uniform(0.01, 0.05, size=n_seg)
    col_csls[decoy_idx] = -0.05
    feats = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    feats[:, FEATURE_NAMES.index("sim")] = sim / 0.1
    feats[:, FEATURE_NAMES.index("col_csls")] = col_csls / 0.1
    is_true = np.zeros(n, dtype=bool)
    is_true[true_idx] = True
    return feats, sim, seg, is_true, true_idx


def test_fit_edge_cost_learns_a_rule_the_fixed_cost_misses() -> None:
    feats, sim, seg, is_true, true_idx = _hubness_problem(60, 12, seed=0)
    model = fit_edge_cost(
        feats, sim, seg, np.full(seg.size, -1), is_true, scale=0.1, temperature=0.02, seed=0
    )
    assert model.info["kept"] is True
    assert model.info["holdout_loss_learned"] < 0.5 * model.info["holdout_loss_fixed"]
    cost = model(sim, feats).reshape(60, 12)
    fixed = (1.0 - sim).reshape(60, 12)
    # the fixed cost prefers the decoy everywhere; the learned one the true edge
    assert (fixed.argmin(axis=1) == 1).all()
    assert (cost.argmin(axis=1) == 0).mean() > 0.95


def test_fitted_edge_cost_never_rises_with_similarity_or_a_feature() -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(60, 12, seed=7)
    model = fit_edge_cost(
        feats, sim, seg, np.full(seg.size, -1), is_true, scale=0.1, temperature=0.02, seed=0
    )
    assert model.info["kept"] is True
    assert (model.w1 >= 0).all() and (model.w2 <= 0).all() and model.slope > 0
    rng = np.random.default_rng(0)
    # far outside the fitted range too: the cost must not dip for extreme inputs
    probe_sim = rng.uniform(-1, 1, size=2000)
    probe = rng.normal(0, 20, size=(2000, len(FEATURE_NAMES))).astype(np.float32)
    base = model(probe_sim, probe)
    assert (model(probe_sim + 0.05, probe) <= base + 1e-6).all()
    for j in range(len(FEATURE_NAMES)):
        up = probe.copy()
        up[:, j] += 1.0
        assert (model(probe_sim, up) <= base + 1e-6).all(), FEATURE_NAMES[j]


def test_fit_edge_cost_uses_column_segments_too() -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(40, 10, seed=1)
    model = fit_edge_cost(
        feats, sim, np.full(seg.size, -1), seg, is_true, scale=0.1, temperature=0.02, seed=0
    )
    assert model.info["n_segments"] == 40
    assert model.info["kept"] is True


def test_fit_edge_cost_is_deterministic_under_seed() -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(30, 8, seed=2)
    args = (feats, sim, seg, np.full(seg.size, -1), is_true)
    m1 = fit_edge_cost(*args, scale=0.1, temperature=0.02, seed=7)
    m2 = fit_edge_cost(*args, scale=0.1, temperature=0.02, seed=7)
    np.testing.assert_array_equal(m1.w1, m2.w1)
    np.testing.assert_array_equal(m1.w2, m2.w2)


def test_fit_edge_cost_reads_only_the_features_it_is_given() -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(60, 12, seed=5)
    model = fit_edge_cost(
        feats,
        sim,
        seg,
        np.full(seg.size, -1),
        is_true,
        scale=0.1,
        temperature=0.02,
        use=("sim", "row_margin"),
        seed=0,
    )
    assert model.use == ("sim", "row_margin") and model.w1.shape[0] == 2
    other = feats.copy()
    other[:, FEATURE_NAMES.index("col_csls")] = 123.0  # a column it does not read
    np.testing.assert_array_equal(model(sim, feats), model(sim, other))
    with pytest.raises(ValueError, match=r"unknown edge features \['bogus'\]"):
        fit_edge_cost(
            feats,
            sim,
            seg,
            np.full(seg.size, -1),
            is_true,
            scale=0.1,
            temperature=0.02,
            use=("bogus",),
        )


def test_fit_edge_cost_with_too_few_keys_keeps_the_fixed_cost() -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(5, 6, seed=3)
    model = fit_edge_cost(
        feats, sim, seg, np.full(seg.size, -1), is_true, scale=0.1, temperature=0.02, seed=0
    )
    assert model.info["kept"] is False
    assert "only 5 usable key segments" in model.info["reason"]
    np.testing.assert_allclose(model(sim, feats), 1.0 - sim, rtol=1e-6)


def test_fit_edge_cost_ignores_segments_without_their_true_edge() -> None:
    feats, sim, seg, is_true, true_idx = _hubness_problem(20, 6, seed=4)
    is_true[true_idx[:12]] = False  # 12 keys whose truth is not among their candidates
    model = fit_edge_cost(
        feats, sim, seg, np.full(seg.size, -1), is_true, scale=0.1, temperature=0.02, seed=0
    )
    assert model.info["n_segments"] == 8


def test_average_costs_is_the_mean_of_the_models() -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(40, 10, seed=6)
    args = (feats, sim, seg, np.full(seg.size, -1), is_true)
    models = [fit_edge_cost(*args, scale=0.1, temperature=0.02, seed=s) for s in range(3)]
    avg = average_costs(models)
    assert avg.w1.shape == (len(DEFAULT_FEATURES), 3 * 16)
    assert avg.slope == pytest.approx(np.mean([m.slope for m in models]))
    np.testing.assert_allclose(
        avg(sim, feats), np.mean([m(sim, feats) for m in models], axis=0), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="at least one model"):
        average_costs([])


def test_paper_cost_starts_at_relu_one_minus_similarity() -> None:
    b = 6
    net = PaperCost(-np.eye(b, dtype=np.float32), np.ones(b, dtype=np.float32))
    s = np.random.default_rng(0).uniform(-0.5, 1.5, size=(4, b))
    np.testing.assert_allclose(net(s), np.maximum(1.0 - s, 0.0), rtol=1e-6)
    assert net.batch_size == b


def test_fit_paper_cost_lowers_the_cost_of_key_points_only_through_their_cells() -> None:
    rng = np.random.default_rng(0)
    t, b = 20, 8
    sims = rng.uniform(0.0, 0.6, size=(t, b, b))
    sup = np.zeros((t, b, b), dtype=bool)
    sup[:, 0, 3] = True
    start = PaperCost(-np.eye(b, dtype=np.float32), np.ones(b, dtype=np.float32))
    net = fit_paper_cost(sims, sup, lr=1e-2)
    assert net.info["steps"] == t
    before = start(sims)[:, 0, 3].mean()
    after = net(sims)[:, 0, 3].mean()
    assert after < before - 0.05
    # columns that never carry a key point keep their initial weights
    np.testing.assert_allclose(net.weight[1], -np.eye(b)[1], atol=1e-7)
    np.testing.assert_allclose(net.bias[1], 1.0, atol=1e-7)


def test_fit_paper_cost_with_the_authors_learning_rate_barely_moves() -> None:
    rng = np.random.default_rng(1)
    sims = rng.uniform(0.0, 0.6, size=(10, 8, 8))
    sup = np.zeros_like(sims, dtype=bool)
    sup[:, 2, 5] = True
    net = fit_paper_cost(sims, sup)  # lr = 2e-6, the paper's lr_cost
    assert np.abs(net.weight + np.eye(8)).max() < 1e-4


def _key_loss(seed: int):
    """A small key-point loss of fit_edge_cost: 12 segments of 3-7 edges, 3 held out."""
    from pmpclean.cost import _KeyLoss

    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 8, size=12)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n_inst = int(counts.sum())
    seg = np.repeat(np.arange(12), counts)
    is_hold = np.zeros(12, dtype=bool)
    is_hold[[2, 5, 9]] = True
    z = rng.normal(size=(n_inst, 3)).astype(np.float32)
    base = rng.uniform(0.5, 1.5, size=n_inst) / 0.3
    loss = _KeyLoss(z, base, 0.2 / 0.3, starts, counts, starts, is_hold[seg], int((~is_hold).sum()))
    hidden = 4
    params = [
        rng.normal(0, 0.5, size=(3, hidden)),
        rng.normal(0, 1.0, size=hidden),
        rng.normal(-1.0, 0.5, size=hidden),
        rng.normal(0, 0.5, size=1),
        rng.normal(0, 0.3, size=1),
    ]
    return loss, params, is_hold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edge_cost_gradient_matches_finite_differences(seed: int) -> None:
    """The hand-written gradient of the key-point loss is the loss's derivative: every
    raw parameter (u, b1, v, b2, rho), central differences, fit segments only."""
    loss, params, is_hold = _key_loss(seed)

    def fit_loss(p: list[np.ndarray]) -> float:
        return float(loss.forward(p)[2][~is_hold].mean())

    h, soft, _ = loss.forward(params)
    grads = loss.grads(params, h, soft)
    assert [g.shape for g in grads] == [p.shape for p in params]
    eps = 1e-3
    for k, p in enumerate(params):
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            up = [q.copy() for q in params]
            down = [q.copy() for q in params]
            up[k][idx] += eps
            down[k][idx] -= eps
            numeric[idx] = (fit_loss(up) - fit_loss(down)) / (2 * eps)
        name = ("u", "b1", "v", "b2", "rho")[k]
        np.testing.assert_allclose(grads[k], numeric, rtol=2e-2, atol=2e-4, err_msg=name)
        if name == "b2":  # one shift of every edge: the softmax within a segment ignores it
            assert np.abs(grads[k]).max() < 1e-9
        else:  # a parameter the loss really depends on
            assert np.abs(numeric).max() > 1e-3, name


def test_edge_cost_gradient_ignores_held_out_segments() -> None:
    """Held-out segments select the model; they must not pull on it."""
    loss, params, is_hold = _key_loss(3)
    h, soft, _ = loss.forward(params)
    before = loss.grads(params, h, soft)
    moved = loss.base.copy()
    moved[loss.hold_inst] += 5.0  # change only the held-out instances
    loss.base = moved
    h2, soft2, _ = loss.forward(params)
    after = loss.grads(params, h2, soft2)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
