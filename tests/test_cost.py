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
    return loss, params, is_hold, (z, base, starts, counts)


def _fit_loss_and_grads(loss, params, is_hold) -> tuple[float, list[np.ndarray]]:
    """The mean fit loss at numpy raw parameters and its gradient (torch autograd)."""
    import torch

    p = [torch.tensor(q, dtype=torch.float64, requires_grad=True) for q in params]
    value = loss.forward(p)[torch.from_numpy(~is_hold)].mean()
    value.backward()
    return float(value), [q.grad.numpy() for q in p]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_key_loss_is_the_cross_entropy_of_each_true_edge(seed: int) -> None:
    """The key-point loss, recomputed in numpy from its formula: per segment the
    cross-entropy of its true (first) edge under softmax(-cost / temperature) with
    cost / temperature = slope * base + factor * mlp. A flipped sign of the cost or of
    the cross-entropy changes every value."""
    import torch

    loss, params, _, (z, base, starts, counts) = _key_loss(seed)
    w1, w2, slope = np.logaddexp(0, params[0]), -np.logaddexp(0, params[2]), np.exp(params[4])
    x = -(slope * base + (0.2 / 0.3) * (np.tanh(z @ w1 + params[1]) @ w2 + params[3]))
    want = [-x[a] + np.log(np.exp(x[a : a + c]).sum()) for a, c in zip(starts, counts, strict=True)]
    got = loss.forward([torch.tensor(q) for q in params]).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (got > 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edge_cost_gradient_matches_finite_differences(seed: int) -> None:
    """The gradient fit_edge_cost descends is the loss's derivative: every raw parameter
    (u, b1, v, b2, rho), central differences, fit segments only."""
    loss, params, is_hold, _ = _key_loss(seed)

    def fit_loss(p: list[np.ndarray]) -> float:
        return _fit_loss_and_grads(loss, p, is_hold)[0]

    _, grads = _fit_loss_and_grads(loss, params, is_hold)
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
    loss, params, is_hold, _ = _key_loss(3)
    _, before = _fit_loss_and_grads(loss, params, is_hold)
    moved = loss.base.clone()
    moved[loss.hold_inst] += 5.0  # change only the held-out instances
    loss.base = moved
    _, after = _fit_loss_and_grads(loss, params, is_hold)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_edge_cost_is_its_formula_in_float32_and_chunks_change_nothing() -> None:
    """cost = slope * (1 - sim) + scale * (tanh(f[:, use] @ w1 + b1) @ w2 + b2), float32."""
    rng = np.random.default_rng(4)
    use = ("sim", "col_margin", "col_csls")
    model = EdgeCost(
        rng.uniform(0, 1, size=(3, 5)).astype(np.float32),
        rng.normal(size=5).astype(np.float32),
        -rng.uniform(0, 1, size=5).astype(np.float32),
        0.37,
        0.2,
        use,
        slope=1.6,
    )
    sim = rng.uniform(-1, 1, size=40)
    feats = rng.normal(size=(40, len(FEATURE_NAMES)))  # float64 in: float32 out
    cols = [FEATURE_NAMES.index(u) for u in use]
    mlp = np.tanh(feats[:, cols] @ model.w1 + model.b1) @ model.w2 + 0.37
    want = 1.6 * (1.0 - sim) + 0.2 * mlp
    got = model(sim, feats)
    assert got.dtype == np.float32 and model.correction(feats).dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.correction(feats, chunk=7), model.correction(feats))


def test_average_costs_records_its_size_and_refuses_different_models() -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(30, 8, seed=8)
    args = (feats, sim, seg, np.full(seg.size, -1), is_true)
    a, b = (fit_edge_cost(*args, scale=0.1, temperature=0.02, seed=s) for s in (0, 1))
    assert average_costs([a, b]).info == {"n_models": 2}
    other = fit_edge_cost(*args, scale=0.2, temperature=0.02, seed=0)
    with pytest.raises(
        ValueError, match=r"^average_costs: the models differ in scale or features$"
    ):
        average_costs([a, other])
    with pytest.raises(ValueError, match=r"^average_costs needs at least one model$"):
        average_costs([])


def test_fit_paper_cost_takes_one_step_per_batch_and_reports_the_last_loss() -> None:
    """3 batches of width 8: three steps; at the paper's learning rate the weights stay
    at their start, so the last loss is sum(1 - s) over the last batch's key cells."""
    rng = np.random.default_rng(2)
    sims = rng.uniform(0.0, 0.6, size=(3, 8, 8))
    sup = np.zeros_like(sims, dtype=bool)
    sup[:, 1, 4] = sup[:, 6, 2] = True
    net = fit_paper_cost(sims, sup)
    assert net.info["steps"] == 3 and net.info["lr"] == 2e-6
    want = (1.0 - sims[2, 1, 4]) + (1.0 - sims[2, 6, 2])
    assert net.info["last_loss"] == pytest.approx(want, abs=1e-3)


def test_fit_paper_cost_a_key_point_already_at_zero_cost_moves_nothing() -> None:
    """relu(1 - s) is 0 at s = 1 exactly, and so is its gradient: no step."""
    sims = np.full((4, 6, 6), 0.3)
    sims[:, 2, 2] = 1.0
    sup = np.zeros_like(sims, dtype=bool)
    sup[:, 2, 2] = True
    net = fit_paper_cost(sims, sup, lr=1e-2)
    np.testing.assert_array_equal(net.weight, -np.eye(6, dtype=np.float32))
    np.testing.assert_array_equal(net.bias, np.ones(6, dtype=np.float32))
    assert net.info["last_loss"] == 0.0


def _fit_rows(feats, sim, seg, is_true, **kw):
    """fit_edge_cost on key-image (row) segments only, scale 0.1, seed 0 unless given."""
    kw = {"scale": 0.1, "seed": 0, **kw}
    return fit_edge_cost(feats, sim, seg, np.full(seg.size, -1), is_true, **kw)


def _same_segments(n_seg: int, sims: list[float], true_at: int = 0):
    """n_seg identical segments with edges of similarity ``sims``, the true one at
    ``true_at``; the only feature is the similarity."""
    per = len(sims)
    sim = np.tile(np.array(sims), n_seg)
    seg = np.repeat(np.arange(n_seg), per)
    is_true = np.zeros(sim.size, dtype=bool)
    is_true[true_at::per] = True
    feats = np.zeros((sim.size, len(FEATURE_NAMES)), dtype=np.float32)
    feats[:, 0] = sim / 0.1
    return feats, sim, seg, is_true


@pytest.mark.parametrize(
    ("cap", "kept_decoys"),
    [(1, []), (2, [0.45]), (3, [0.45, 0.3]), (32, [0.45, 0.3, 0.1, 0.0])],
)
def test_fit_edge_cost_keeps_the_true_edge_and_the_most_similar_others(
    cap: int, kept_decoys: list[float]
) -> None:
    """max_per_segment caps a segment at its true edge plus the most similar decoys: the
    fixed cost's held-out loss is the cross-entropy over exactly those edges."""
    # decoys in no particular order; the true edge (0.5) is not the first listed
    feats, sim, seg, is_true = _same_segments(12, [0.1, 0.5, 0.0, 0.45, 0.3], true_at=1)
    model = _fit_rows(feats, sim, seg, is_true, temperature=0.1, max_per_segment=cap)
    x = -(1.0 - np.array([0.5, *kept_decoys])) / 0.1
    want = float(np.log(np.exp(x).sum()) - x[0])
    assert model.info["holdout_loss_fixed"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert model.info["features"] == list(DEFAULT_FEATURES)


def test_fit_edge_cost_counts_row_and_column_segments_apart() -> None:
    """A key image's segment and a key caption's segment with the same number are two
    segments; edges of no key are ignored; no key at all is reported, not an error."""
    feats, sim, seg, is_true = _same_segments(6, [0.5, 0.2, 0.1])
    none = np.full(seg.size, -1)
    # rows: segments 0..5 on every edge; columns: the same numbering on the same edges
    both = fit_edge_cost(feats, sim, seg, seg, is_true, scale=0.1, temperature=0.1, seed=0)
    assert both.info["n_segments"] == 12
    rows = fit_edge_cost(feats, sim, seg, none, is_true, scale=0.1, temperature=0.1, seed=0)
    cols = fit_edge_cost(feats, sim, none, seg, is_true, scale=0.1, temperature=0.1, seed=0)
    assert rows.info["n_segments"] == cols.info["n_segments"] == 6
    # only row segment 0, and column segments: still counted apart
    first = np.where(seg == 0, 0, -1)
    mixed = fit_edge_cost(feats, sim, first, seg, is_true, scale=0.1, temperature=0.1, seed=0)
    assert mixed.info["n_segments"] == 7
    one = fit_edge_cost(feats, sim, first, none, is_true, scale=0.1, temperature=0.1, seed=0)
    assert one.info["n_segments"] == 1
    empty = fit_edge_cost(feats, sim, none, none, is_true, scale=0.1, temperature=0.1, seed=0)
    assert empty.info["n_segments"] == 0 and empty.info["kept"] is False
    np.testing.assert_allclose(empty(sim, feats), 1.0 - sim, rtol=1e-6)


@pytest.mark.parametrize("holdout", [0.0, 1.0])
def test_fit_edge_cost_holds_out_a_quarter_when_the_draw_holds_out_none_or_all(
    holdout: float,
) -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(22, 6, seed=9)
    model = _fit_rows(feats, sim, seg, is_true, temperature=0.02, holdout=holdout)
    info = model.info
    assert (info["n_holdout"], info["n_fit"]) == (22 // 4, 22 - 22 // 4)
    assert info["steps"] > 0 and info["kept"] is True


def test_fit_edge_cost_needs_eight_segments_and_counts_its_split() -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(8, 6, seed=10)
    none = np.full(seg.size, -1)
    eight = fit_edge_cost(feats, sim, seg, none, is_true, scale=0.1, temperature=0.02, seed=0)
    assert "reason" not in eight.info or "usable key segments" not in eight.info["reason"]
    assert eight.info["steps"] > 0
    assert eight.info["n_fit"] + eight.info["n_holdout"] == 8 and eight.info["n_holdout"] >= 1
    seven = seg < 7
    few = fit_edge_cost(
        feats[seven],
        sim[seven],
        seg[seven],
        none[seven],
        is_true[seven],
        scale=0.1,
        temperature=0.02,
        seed=0,
    )
    assert few.info["steps"] == 0 and few.info["kept"] is False


def test_fit_edge_cost_is_blind_to_the_units_of_its_features() -> None:
    """Features are standardised before the fit: scaling or shifting a feature column
    gives the same costs on the correspondingly scaled features."""
    feats, sim, seg, is_true, _ = _hubness_problem(40, 10, seed=11)
    args = (sim, seg, np.full(seg.size, -1), is_true)
    model = fit_edge_cost(feats, *args, scale=0.1, temperature=0.02, seed=0)
    moved = feats.astype(np.float64).copy()
    moved[:, FEATURE_NAMES.index("col_csls")] = 37.0 * moved[:, FEATURE_NAMES.index("col_csls")] + 5
    moved[:, FEATURE_NAMES.index("sim")] *= 0.01
    other = fit_edge_cost(moved, *args, scale=0.1, temperature=0.02, seed=0)
    assert model.info["kept"] and other.info["kept"]
    np.testing.assert_allclose(other(sim, moved), model(sim, feats), rtol=2e-3, atol=2e-3)


def test_fit_edge_cost_reports_the_loss_of_the_model_it_returns() -> None:
    """Identical segments: every segment's loss is the held-out mean, so the reported
    held-out losses can be recomputed from the returned model (and from 1 - sim)."""
    sims = [0.5, 0.45, 0.3, 0.1, 0.0]
    feats, sim, seg, is_true = _same_segments(12, sims)
    rng = np.random.default_rng(1)
    feats[:, 3:] = np.tile(rng.normal(size=(5, 2)), (12, 1))  # the same csls in every segment

    def nll(cost: np.ndarray) -> float:
        x = -np.asarray(cost[:5], dtype=np.float64) / 0.1
        return float(np.log(np.exp(x - x.max()).sum()) + x.max() - x[0])

    for seed in range(4):  # four held-out draws
        model = _fit_rows(feats, sim, seg, is_true, temperature=0.1, seed=seed)
        info = model.info
        assert info["kept"] is True and info["slope"] == model.slope
        assert isinstance(info["best_step"], int) and isinstance(info["steps"], int)
        assert info["holdout_loss_fixed"] == pytest.approx(nll(1.0 - sim), rel=1e-9)
        assert info["holdout_loss_learned"] == pytest.approx(nll(model(sim, feats)), rel=1e-3)
        # the key points are separable: the fit sharpens the cost until they are certain
        assert info["holdout_loss_learned"] < 0.02 * info["holdout_loss_fixed"]
        assert model.slope > 1.5


def test_fit_edge_cost_stops_after_patience_steps_without_improvement() -> None:
    feats, sim, seg, is_true, _ = _hubness_problem(40, 10, seed=12)
    args = (feats, sim, seg, np.full(seg.size, -1), is_true)
    for patience in (0, 3, 10):
        m = fit_edge_cost(*args, scale=0.1, temperature=0.02, steps=500, patience=patience, seed=0)
        # the held-out loss last improved before step best_step + 1; the loop ends at the
        # first step patience + 1 steps later
        assert m.info["steps"] == m.info["best_step"] + patience + 2 < 500
    full = fit_edge_cost(*args, scale=0.1, temperature=0.02, steps=7, patience=100, seed=0)
    assert full.info["steps"] == 7


def test_fit_edge_cost_keeps_the_fixed_cost_when_nothing_improves_on_it() -> None:
    feats, sim, seg, is_true = _same_segments(12, [0.9, 0.0, 0.0])
    model = _fit_rows(feats, sim, seg, is_true, temperature=0.01)
    assert model.info["kept"] is False
    assert model.info["reason"] == "no step improved the held-out loss of the fixed cost"
    np.testing.assert_allclose(model(sim, feats), 1.0 - sim, rtol=1e-6)
