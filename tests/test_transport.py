"""Partial optimal transport: the dense solver (numpy and torch), the sparse solver
against POT, the dummy-extended problem and their invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pmpclean.errors import ConfigError
from pmpclean.transport import partial_plan, partial_transport, with_dummies

# --------------------------------------------------------------------------- helpers


def _dense_edges(cost: np.ndarray, allowed: np.ndarray):
    r, c = np.nonzero(allowed)
    return r, c, cost[r, c]


def _to_matrix(r, c, vals, shape):
    out = np.zeros(shape)
    out[r, c] = vals
    return out


# --------------------------------------------------------------------------- sparse solver


@pytest.mark.parametrize("mass", [0.3, 0.7, 1.0])
def test_plan_invariants_on_a_sparse_graph(mass: float) -> None:
    rng = np.random.default_rng(0)
    n_r, n_c = 40, 50
    allowed = rng.random((n_r, n_c)) < 0.3
    allowed[np.arange(n_r), np.arange(n_r)] = True  # a perfect matching exists
    cost = rng.random((n_r, n_c))
    r, c, e = _dense_edges(cost, allowed)
    a, b = np.full(n_r, 1 / n_r), np.full(n_c, 1 / n_r)
    log_plan, info = partial_transport(r, c, e, a, b, mass=mass, eps=0.05, tol=1e-7)
    plan = _to_matrix(r, c, np.exp(log_plan), (n_r, n_c))
    assert info["converged"]
    assert (plan >= 0).all()
    assert (plan.sum(1) <= a + 1e-6).all()
    assert (plan.sum(0) <= b + 1e-6).all()
    assert plan.sum() == pytest.approx(mass * min(a.sum(), b.sum()), rel=1e-5)
    assert (plan[~allowed] == 0).all()  # masked (non-edge) entries carry nothing


@settings(max_examples=25, deadline=None)
@given(
    n_r=st.integers(1, 12),
    n_c=st.integers(1, 12),
    mass=st.floats(0.05, 1.0),
    seed=st.integers(0, 10_000),
)
def test_plan_invariants_hypothesis(n_r: int, n_c: int, mass: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cost = rng.random((n_r, n_c))
    allowed = np.ones((n_r, n_c), dtype=bool)
    r, c, e = _dense_edges(cost, allowed)
    a = rng.uniform(0.5, 1.5, n_r)
    b = rng.uniform(0.5, 1.5, n_c)
    log_plan, info = partial_transport(r, c, e, a, b, mass=mass, eps=0.1, tol=1e-8, max_iter=5000)
    plan = _to_matrix(r, c, np.exp(log_plan), (n_r, n_c))
    assert (plan >= 0).all()
    assert (plan.sum(1) <= a * (1 + 1e-5)).all()
    assert (plan.sum(0) <= b * (1 + 1e-5)).all()
    assert plan.sum() == pytest.approx(mass * min(a.sum(), b.sum()), rel=1e-4)


def test_plan_equals_pot_sinkhorn_on_the_dummy_extended_problem() -> None:
    import ot

    rng = np.random.default_rng(1)
    n_r, n_c, mass, eps = 15, 18, 0.6, 0.1
    cost = rng.random((n_r, n_c))
    allowed = rng.random((n_r, n_c)) < 0.8
    a, b = np.full(n_r, 1 / n_r), np.full(n_c, 1 / n_r)
    r, c, e = _dense_edges(cost, allowed)
    log_plan, info = partial_transport(r, c, e, a, b, mass=mass, eps=eps, tol=1e-10, max_iter=5000)
    assert info["converged"]
    mine = _to_matrix(r, c, np.exp(log_plan), (n_r, n_c))
    m = mass * min(a.sum(), b.sum())
    big = 1e4
    M = np.full((n_r + 1, n_c + 1), 0.0)
    M[:n_r, :n_c] = np.where(allowed, cost, big)
    M[n_r, n_c] = big
    a_ext = np.r_[a, b.sum() - m]
    b_ext = np.r_[b, a.sum() - m]
    ref = ot.sinkhorn(a_ext, b_ext, M, eps, method="sinkhorn_log", numItermax=5000, stopThr=1e-11)[
        :n_r, :n_c
    ]
    np.testing.assert_allclose(mine, ref, atol=1e-8)


def test_small_reg_converges_to_pot_exact_partial_wasserstein() -> None:
    import ot

    rng = np.random.default_rng(2)
    n, mass = 20, 0.5
    cost = rng.random((n, n))
    a = b = np.full(n, 1 / n)
    exact = ot.partial.partial_wasserstein(a, b, cost, m=mass)
    r, c, e = _dense_edges(cost, np.ones((n, n), dtype=bool))
    log_plan, info = partial_transport(r, c, e, a, b, mass=mass, eps=5e-3, tol=1e-6, max_iter=5000)
    plan = _to_matrix(r, c, np.exp(log_plan), (n, n))
    assert info["converged"]
    assert (plan * cost).sum() == pytest.approx((exact * cost).sum(), rel=0.1)
    # the same rows are matched, to the same columns
    np.testing.assert_array_equal(plan.sum(1) > 0.5 / n, exact.sum(1) > 0.5 / n)
    rows = exact.sum(1) > 0.5 / n
    np.testing.assert_array_equal(plan[rows].argmax(1), exact[rows].argmax(1))


def test_agrees_with_pot_entropic_partial_for_small_reg() -> None:
    import ot

    rng = np.random.default_rng(3)
    n, mass = 25, 0.6
    cost = rng.random((n, n))
    a = b = np.full(n, 1 / n)
    pot = ot.partial.entropic_partial_wasserstein_logscale(
        a, b, cost, reg=5e-3, m=mass, numItermax=1000, stopThr=1e-9
    )
    r, c, e = _dense_edges(cost, np.ones((n, n), dtype=bool))
    log_plan, _ = partial_transport(r, c, e, a, b, mass=mass, eps=5e-3, tol=1e-6, max_iter=5000)
    plan = _to_matrix(r, c, np.exp(log_plan), (n, n))
    assert plan.sum() == pytest.approx(pot.sum(), rel=1e-3)
    # POT's solver has no entropy on the untransported mass, so the plans differ
    # slightly at finite reg; where both commit most of a row, they pick the same column
    sure = (pot.max(1) > 0.5 / n) & (plan.max(1) > 0.5 / n)
    assert sure.sum() >= 0.5 * mass * n
    np.testing.assert_array_equal(plan[sure].argmax(1), pot[sure].argmax(1))


def test_blocks_transport_their_own_mass() -> None:
    rng = np.random.default_rng(4)
    # two blocks of 5 rows / 5 columns, edges only inside blocks
    blk = np.repeat([0, 1], 5)
    allowed = blk[:, None] == blk[None, :]
    cost = rng.random((10, 10))
    r, c, e = _dense_edges(cost, allowed)
    a = b = np.full(10, 0.1)
    log_plan, _ = partial_transport(
        r, c, e, a, b, mass=0.4, eps=0.05, row_block=blk, col_block=blk, tol=1e-9
    )
    plan = _to_matrix(r, c, np.exp(log_plan), (10, 10))
    assert plan[:5].sum() == pytest.approx(0.4 * 0.5, rel=1e-5)
    assert plan[5:].sum() == pytest.approx(0.4 * 0.5, rel=1e-5)


# --------------------------------------------------------------------------- dense solver


def test_with_dummies_known_layout() -> None:
    cost = np.array([[0.1, 0.5, 0.9], [0.3, 0.2, 0.4]])
    allowed = np.array([[True, True, False], [True, True, True]])
    a, b = np.array([0.5, 0.5]), np.array([0.4, 0.4, 0.4])
    M, a_ext, b_ext = with_dummies(cost, a, b, 0.6, allowed=allowed)
    big = 1e3 * (0.5 + 1.0)  # 1000 x (largest allowed cost + 1)
    np.testing.assert_allclose(a_ext, [0.5, 0.5, 1.2 - 0.6])  # dummy row: unused capacity
    np.testing.assert_allclose(b_ext, [0.4, 0.4, 0.4, 1.0 - 0.6])  # dummy column: the rest
    expected = np.array(
        [[0.1, 0.5, big, 0.0], [0.3, 0.2, 0.4, 0.0], [0.0, 0.0, 0.0, big]]
    )  # forbidden cell and dummy-to-dummy corner cost `big`, dummies cost 0
    np.testing.assert_allclose(M, expected)
    # the whole row mass moves: no dummy column; a dummy row still fills the capacity
    M, a_ext, b_ext = with_dummies(cost, a, b, 1.0)
    assert M.shape == (3, 3) and a_ext[-1] == pytest.approx(0.2) and b_ext.shape == (3,)


def _reference_plan(cost, allowed, a, b, m, reg):
    """POT's log-domain Sinkhorn on the dummy-extended problem, built by hand."""
    import ot

    n, k = cost.shape
    M = np.zeros((n + 1, k + 1))
    M[:n, :k] = np.where(allowed, cost, 1e4)
    M[n, k] = 1e4
    a_ext, b_ext = np.r_[a, b.sum() - m], np.r_[b, a.sum() - m]
    plan = ot.sinkhorn(a_ext, b_ext, M, reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-12)
    return plan[:n, :k]


def test_dense_plan_equals_pot_and_the_sparse_solver_numpy_and_torch() -> None:
    rng = np.random.default_rng(5)
    n, k, frac, reg = 12, 9, 0.6, 0.1
    cost = rng.random((n, k))
    allowed = rng.random((n, k)) < 0.8
    a, b = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, k)
    m = frac * min(a.sum(), b.sum())
    ref = _reference_plan(cost, allowed, a, b, m, reg)
    mine, info = partial_plan(
        cost, a, b, m, reg=reg, forbid=~allowed, max_iter=5000, tol=1e-12, log=True
    )
    assert info["converged"]
    np.testing.assert_allclose(mine, ref, atol=1e-9)
    as_t = [torch.from_numpy(x) for x in (cost, a, b, ~allowed)]
    on_torch = partial_plan(*as_t[:3], m, reg=reg, forbid=as_t[3], max_iter=5000, tol=1e-12)
    assert isinstance(on_torch, torch.Tensor)
    np.testing.assert_allclose(on_torch.numpy(), ref, atol=1e-9)
    knopp = partial_plan(
        cost, a, b, m, reg=reg, forbid=~allowed, method="sinkhorn", max_iter=5000, tol=1e-12
    )
    np.testing.assert_allclose(knopp, ref, atol=1e-7)
    r, c, e = _dense_edges(cost, allowed)
    log_plan, _ = partial_transport(r, c, e, a, b, mass=frac, eps=reg, tol=1e-11, max_iter=5000)
    np.testing.assert_allclose(_to_matrix(r, c, np.exp(log_plan), (n, k)), ref, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 10),
    k=st.integers(1, 10),
    frac=st.floats(0.05, 1.0),
    method=st.sampled_from(["sinkhorn", "sinkhorn_log"]),
    seed=st.integers(0, 10_000),
)
def test_dense_plan_invariants(n: int, k: int, frac: float, method: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cost = rng.gamma(2.0, 1.0, (n, k))
    forbid = rng.random((n, k)) < 0.2
    forbid[:, 0] = False  # every row keeps a partner: a full-mass plan exists
    a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / max(n, k))
    m = frac * min(a.sum(), b.sum())
    plan = partial_plan(cost, a, b, m, reg=0.5, forbid=forbid, method=method, max_iter=5000)
    assert (plan >= 0).all() and (plan[forbid] == 0).all()
    assert (plan.sum(1) <= a + 1e-6).all() and (plan.sum(0) <= b + 1e-6).all()
    assert plan.sum() == pytest.approx(m, rel=1e-4)


def test_dense_plan_sends_a_fully_forbidden_row_to_its_dummy() -> None:
    cost = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    forbid = np.array([[False, False], [False, False], [True, True]])
    a, b = np.full(3, 1 / 3), np.full(2, 0.5)
    plan = partial_plan(cost, a, b, 0.5, reg=0.05, forbid=forbid)
    assert plan[2].sum() == 0.0 and plan.sum() == pytest.approx(0.5)
    assert plan[0, 0] > 0.24 and plan[1, 1] > 0.24


def test_dense_plan_rejects_bad_settings() -> None:
    a = b = np.full(2, 0.5)
    with pytest.raises(ConfigError, match=r"transport mass must be in \(0, 1\], got 1.5"):
        partial_plan(np.zeros((2, 2)), a, b, 1.5, reg=0.1)
    with pytest.raises(ConfigError, match="Unknown transport method 'exact'"):
        partial_plan(np.zeros((2, 2)), a, b, 0.5, reg=0.1, method="exact")
