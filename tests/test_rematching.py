"""Rematching with partial optimal transport: invariants, POT agreement, recovery, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmpclean.errors import ConfigError, RematchError
from pmpclean.rematching import (
    _Graph,
    _list_stats,
    _Lists,
    _make_nodes,
    _round_plan,
    _row_shares,
    rematch,
)
from pmpclean.synthetic import clip_like_pairs

# --------------------------------------------------------------------------- helpers


def _easy_pairs(n: int = 300, rate: float = 0.3, seed: int = 0, **kw):
    """CLIP-like pairs with a wide similarity band (true pairs clearly closest)."""
    return clip_like_pairs(
        n, dim=64, noise_rate=rate, semantic=2.0, noise=0.6, hub_fraction=0.0, seed=seed, **kw
    )


def _correct(data, rows: np.ndarray, proposed: np.ndarray) -> np.ndarray:
    return data.image_group[data.true_row[proposed]] == data.image_group[rows]


# --------------------------------------------------------------------------- rounding


def _greedy_reference(rows, cols, share, img, cap, n, q_min):
    """Plain greedy: edges by decreasing share (ties: image node, caption node)."""
    cand = np.full(n, -1)
    conf = np.zeros(n)
    used_r = np.zeros(img.size, dtype=int)
    used_c = np.zeros(cap.size, dtype=int)
    for e in sorted(range(len(share)), key=lambda e: (-share[e], rows[e], cols[e])):
        r, c = rows[e], cols[e]
        if share[e] <= q_min or used_r[r] >= img.cap[r] or used_c[c] >= cap.cap[c]:
            continue
        cand[img.order[img.start[r] + used_r[r]]] = cap.order[cap.start[c] + used_c[c]]
        conf[img.order[img.start[r] + used_r[r]]] = min(share[e], 1.0)
        used_r[r] += 1
        used_c[c] += 1
    return cand, conf


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), n_rows=st.integers(1, 30), density=st.floats(0.1, 1.0))
def test_round_plan_in_rounds_equals_the_plain_greedy(seed: int, n_rows: int, density: float):
    rng = np.random.default_rng(seed)
    ig = rng.integers(0, max(1, n_rows // 2), size=n_rows)  # images with several rows
    tg = rng.integers(0, max(1, (2 * n_rows) // 3), size=n_rows)  # repeated captions
    img, cap = _make_nodes(np.arange(n_rows), ig), _make_nodes(np.arange(n_rows), tg)
    allowed = rng.random((img.size, cap.size)) < density
    r, c = np.nonzero(allowed)
    share = rng.integers(0, 6, size=r.size) / 4.0  # coarse values: many ties, some > 1
    ref = _greedy_reference(r, c, share, img, cap, n_rows, 0.1)
    for loop_below in (0, 3, 10_000):  # all rounds, mixed, all loop
        got = _round_plan(r, c, share, img, cap, n_rows, 0.1, loop_below=loop_below)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1])


def test_row_shares_ignore_mass_beyond_the_top_edges() -> None:
    # two images (capacity 1 and 2); image 0 sends 0.5 to its top edge, 0.2 and 0.1
    # to the next ones and 0.1 in slivers over 10 far captions; 0.1 abstained
    rows = np.array([0] * 13 + [1, 1])
    q = np.array([0.5, 0.2, 0.1] + [0.01] * 10 + [1.2, 0.4])
    cap = np.array([1.0, 2.0])
    share = _row_shares(rows, q, cap, top=3)
    d0 = 0.5 + 0.2 + 0.1 + 0.1  # top-3 mass + abstained, slivers left out
    np.testing.assert_allclose(share[:3], np.array([0.5, 0.2, 0.1]) / d0)
    # image 1: top 3 * 2 edges hold everything; abstained 0.4 -> denominator (2.0) / 2
    np.testing.assert_allclose(share[13:], [1.2, 0.4])
    # without slivers the share is the plain fraction of the row's mass
    np.testing.assert_allclose(_row_shares(rows[:3], q[:3], cap[:1], top=3), q[:3])


def test_learned_cost_rises_beyond_every_candidate_list() -> None:
    lists = _Lists(np.array([[0.9, 0.7], [0.8, 0.6]], dtype=np.float32), np.array([[0, 1], [1, 0]]))
    short = _Lists(np.array([[0.5, -np.inf]], dtype=np.float32), np.array([[0, -1]]))
    rows, cols = np.array([0, 0, 1]), np.array([0, 1, 0])
    g = _Graph(
        rows,
        cols,
        np.array([0.9, 0.5, 0.4], dtype=np.float32),
        _list_stats(lists),
        _list_stats(lists),
    )
    # edge 0 is in its row's list; edges 1 and 2 lie below both lists' last entries
    np.testing.assert_allclose(g.beyond_lists(), [0.0, 0.1, 0.2], atol=1e-6)
    # a list shorter than k holds every allowed candidate: nothing lies beyond it
    g2 = _Graph(
        rows[:1],
        cols[:1],
        np.array([0.1], dtype=np.float32),
        _list_stats(short),
        _list_stats(short),
    )
    assert g2.beyond_lists()[0] == 0.0


# --------------------------------------------------------------------------- rematch


def test_swapped_pairs_are_recovered_and_others_untouched() -> None:
    img = np.eye(6, dtype=np.float32)
    txt = img[[1, 0, 2, 4, 3, 5]]  # rows 0<->1 and 3<->4 swapped
    r = rematch(img, txt, np.array([0, 1, 3, 4]), cost="fixed", k=3, min_confidence=0.5)
    assert r.proposed_row.tolist() == [1, 0, -1, 4, 3, -1]
    assert (r.rematch_confidence[[0, 1, 3, 4]] > 0.5).all()
    assert (r.rematch_confidence[[2, 5]] == 0).all()


@pytest.mark.parametrize("cost", ["fixed", "learned"])
def test_injected_mismatches_are_recovered(cost: str) -> None:
    # hard enough that the fixed cost is not already perfect on the keys (else the
    # learned cost keeps the fixed one, see test_learned_cost_keeps_a_perfect_fixed_cost)
    data = clip_like_pairs(400, dim=64, noise_rate=0.3, semantic=1.0, noise=0.8, seed=0)
    sus = data.is_mismatched
    r = rematch(
        data.image_emb,
        data.text_emb,
        sus,
        image_group=data.image_group,
        text_group=data.text_group,
        cost=cost,
        seed=0,
    )
    rows = np.flatnonzero(r.proposed_row >= 0)
    assert set(rows.tolist()) <= set(np.flatnonzero(sus).tolist())
    precision = _correct(data, rows, r.proposed_row[rows]).mean()
    coverage = rows.size / sus.sum()
    assert precision >= 0.95
    assert coverage >= 0.6
    assert r.info["cost_used"] == cost


def test_every_row_gets_an_output_with_the_documented_conventions() -> None:
    data = _easy_pairs(200, rate=0.4, seed=1)
    sus = data.is_mismatched
    r = rematch(data.image_emb, data.text_emb, sus, cost="fixed", min_confidence=0.6, seed=0)
    n = len(data)
    for arr in (r.proposed_row, r.rematch_confidence, r.candidate_row, r.candidate_confidence):
        assert arr.shape == (n,)
    assert r.proposed_row.dtype == np.int64
    assert (r.proposed_row[~sus] == -1).all() and (r.rematch_confidence[~sus] == 0).all()
    has = r.proposed_row >= 0
    assert (r.rematch_confidence[has] >= 0.6).all() and (r.rematch_confidence[has] <= 1).all()
    assert (r.rematch_confidence[~has] == 0).all()
    # abstentions keep their candidate for a later, different cut
    withheld = (r.candidate_row >= 0) & ~has
    assert (r.candidate_confidence[withheld] < 0.6).all()
    np.testing.assert_array_equal(r.proposed_row[has], r.candidate_row[has])
    # a caption is proposed at most once, never to its own row
    assert np.unique(r.candidate_row[r.candidate_row >= 0]).size == (r.candidate_row >= 0).sum()
    assert (r.candidate_row != np.arange(n))[r.candidate_row >= 0].all()


def test_low_mass_means_no_proposal() -> None:
    data = _easy_pairs(300, rate=0.4, seed=2)
    low = rematch(
        data.image_emb,
        data.text_emb,
        data.is_mismatched,
        cost="fixed",
        mass=0.2,
        min_confidence=0.5,
        seed=0,
    )
    high = rematch(
        data.image_emb,
        data.text_emb,
        data.is_mismatched,
        cost="fixed",
        mass=0.9,
        min_confidence=0.5,
        seed=0,
    )
    n_sus = data.is_mismatched.sum()
    assert (low.proposed_row >= 0).sum() <= 0.25 * n_sus
    assert (high.proposed_row >= 0).sum() > 2 * (low.proposed_row >= 0).sum()


def test_deterministic_under_a_seed() -> None:
    data = _easy_pairs(300, rate=0.3, seed=3)
    kw = {"image_group": data.image_group, "text_group": data.text_group, "cost": "learned"}
    r1 = rematch(data.image_emb, data.text_emb, data.is_mismatched, seed=5, **kw)
    r2 = rematch(data.image_emb, data.text_emb, data.is_mismatched, seed=5, **kw)
    np.testing.assert_array_equal(r1.proposed_row, r2.proposed_row)
    np.testing.assert_array_equal(r1.rematch_confidence, r2.rematch_confidence)


def test_indices_and_mask_give_the_same_result() -> None:
    data = _easy_pairs(150, rate=0.3, seed=4)
    m = rematch(data.image_emb, data.text_emb, data.is_mismatched, cost="fixed", seed=0)
    i = rematch(
        data.image_emb, data.text_emb, np.flatnonzero(data.is_mismatched), cost="fixed", seed=0
    )
    np.testing.assert_array_equal(m.proposed_row, i.proposed_row)


def test_sparse_solver_matches_dense_pot_on_the_full_graph() -> None:
    data = _easy_pairs(240, rate=0.4, seed=5)
    sus = data.is_mismatched
    kw = {"cost": "fixed", "mass": 0.8, "reg": 0.2, "min_confidence": 0.0, "tol": 1e-7, "seed": 0}
    dense = rematch(data.image_emb, data.text_emb, sus, solver="dense", **kw)
    full = rematch(data.image_emb, data.text_emb, sus, solver="sparse", k=int(sus.sum()), **kw)
    np.testing.assert_array_equal(dense.candidate_row, full.candidate_row)
    np.testing.assert_allclose(dense.candidate_confidence, full.candidate_confidence, atol=1e-3)
    knn = rematch(data.image_emb, data.text_emb, sus, solver="sparse", k=16, **kw)
    assert (knn.candidate_row == dense.candidate_row).mean() >= 0.97


def test_learned_sparse_proposals_match_dense_pot() -> None:
    data = clip_like_pairs(400, dim=64, noise_rate=0.4, semantic=1.0, noise=0.8, seed=22)
    sus = data.is_mismatched
    kw = {
        "cost": "learned",
        "min_confidence": 0.5,
        "seed": 0,
        "k": 16,
        "tol": 1e-5,
        "max_iter": 5000,
    }
    dense = rematch(data.image_emb, data.text_emb, sus, solver="dense", **kw)
    sparse = rematch(data.image_emb, data.text_emb, sus, **kw)
    assert dense.info["cost_used"] == sparse.info["cost_used"] == "learned"
    rows = np.flatnonzero(sus)
    assert (dense.proposed_row[rows] == sparse.proposed_row[rows]).mean() >= 0.99
    assert (sparse.proposed_row[rows] >= 0).mean() >= 0.3


def test_many_to_many_and_duplicates_never_give_nonsense() -> None:
    data = clip_like_pairs(
        360,
        dim=64,
        noise_rate=0.4,
        captions_per_image=3,
        duplicate_fraction=0.15,
        semantic=2.0,
        noise=0.6,
        seed=6,
    )
    ig, tg = data.image_group, data.text_group
    r = rematch(
        data.image_emb,
        data.text_emb,
        data.is_mismatched,
        image_group=ig,
        text_group=tg,
        cost="fixed",
        min_confidence=0.0,
        seed=0,
    )
    rows = np.flatnonzero(r.candidate_row >= 0)
    prop = r.candidate_row[rows]
    assert rows.size > 0
    existing = set(zip(ig.tolist(), tg.tolist(), strict=True))
    proposed = set(zip(ig[rows].tolist(), tg[prop].tolist(), strict=True))
    # never the original pairing, a duplicate of it, or a caption the image already has
    assert not proposed & existing
    # one image never receives the same caption text twice
    got = list(zip(ig[rows].tolist(), tg[prop].tolist(), strict=True))
    assert len(got) == len(set(got))
    # each caption row is proposed at most once
    assert np.unique(prop).size == prop.size
    correct = _correct(
        data,
        rows[r.candidate_confidence[rows] >= 0.5],
        r.candidate_row[rows][r.candidate_confidence[rows] >= 0.5],
    )
    assert correct.mean() >= 0.9


def test_identical_captions_are_one_candidate_with_room_for_each_copy() -> None:
    # images 0 and 1 both fit caption "A" (held twice, rows 2 and 3); the captions at
    # rows 0 and 1 fit images 2 and 3
    e = np.eye(4, dtype=np.float32)
    a_cap = (e[0] + e[1]) / np.sqrt(2)
    img = e
    txt = np.stack([e[2], e[3], a_cap, a_cap])
    tg = np.array([0, 1, 2, 2])  # rows 2 and 3 hold the same text
    r = rematch(
        img, txt, np.arange(4), text_group=tg, cost="fixed", k=4, reg=0.05, min_confidence=0.3
    )
    assert sorted(r.proposed_row[[0, 1]].tolist()) == [2, 3]  # each copy proposed once
    assert sorted(r.proposed_row[[2, 3]].tolist()) == [0, 1]


def test_empty_suspect_set_returns_no_proposal() -> None:
    data = _easy_pairs(50, rate=0.2, seed=7)
    r = rematch(data.image_emb, data.text_emb, np.zeros(50, dtype=bool))
    assert (r.proposed_row == -1).all() and (r.rematch_confidence == 0).all()
    assert r.info["reason"] == "no suspects: nothing to rematch"
    r = rematch(data.image_emb, data.text_emb, np.array([], dtype=np.int64))
    assert (r.proposed_row == -1).all()


def test_one_suspect_cannot_be_rematched_and_info_says_why() -> None:
    data = _easy_pairs(50, rate=0.2, seed=8)
    r = rematch(data.image_emb, data.text_emb, np.array([3]), cost="fixed")
    assert (r.proposed_row == -1).all()
    assert r.info["reason"].startswith("no allowed candidate")
    assert "pool='all'" in r.info["reason"]


def test_pool_all_offers_clean_captions() -> None:
    img = np.eye(4, dtype=np.float32)
    txt = img[[0, 1, 2, 2]].copy()  # row 3 holds a copy of caption 2; image 3 has no caption
    txt[3] = img[0] * 0.2 + img[2]
    txt[2] = img[3]  # row 2 holds image 3's caption (clean rows 0, 1)
    r = rematch(
        img / 1.0,
        txt / np.linalg.norm(txt, axis=1, keepdims=True),
        np.array([2]),
        pool="all",
        cost="fixed",
        k=3,
        min_confidence=0.0,
    )
    assert r.candidate_row[2] in (0, 1, 3)
    suspects_only = rematch(img, txt, np.array([2]), pool="suspects", cost="fixed")
    assert suspects_only.proposed_row[2] == -1


def test_invalid_rows_are_never_used() -> None:
    data = _easy_pairs(200, rate=0.4, seed=9)
    img = data.image_emb.copy()
    bad = np.flatnonzero(data.is_mismatched)[:5]
    img[bad[:3]] = np.nan
    valid = np.ones(len(data), dtype=bool)
    valid[bad[3:]] = False
    with pytest.warns(UserWarning, match="5 suspect rows have invalid embeddings"):
        r = rematch(
            img, data.text_emb, data.is_mismatched, valid=valid, cost="fixed", min_confidence=0.0
        )
    assert (r.candidate_row[bad] == -1).all()
    assert not np.isin(r.candidate_row, bad).any()
    assert r.info["n_suspects"] == data.is_mismatched.sum() - 5


def test_paper_cost_rematches_inside_batches() -> None:
    data = _easy_pairs(400, rate=0.3, seed=10)
    sus = data.is_mismatched
    r = rematch(
        data.image_emb,
        data.text_emb,
        sus,
        cost="paper",
        batch_size=16,
        mass=0.8,
        min_confidence=0.0,
        seed=0,
    )
    assert r.info["solver"] == "batch" and r.info["n_blocks"] == -(-sus.sum() // 16)
    assert r.info["cost_fit"]["steps"] == r.info["n_blocks"]
    # with one batch holding every suspect the true captions are all reachable
    one = rematch(
        data.image_emb,
        data.text_emb,
        sus,
        cost="paper",
        batch_size=int(sus.sum()),
        mass=0.8,
        seed=0,
    )
    rows = np.flatnonzero(one.proposed_row >= 0)
    assert rows.size >= 0.6 * sus.sum()
    assert _correct(data, rows, one.proposed_row[rows]).mean() >= 0.95
    # small random batches rarely contain the true caption: far fewer correct proposals
    rows_b = np.flatnonzero(r.candidate_row >= 0)
    assert _correct(data, rows_b, r.candidate_row[rows_b]).sum() < 0.5 * rows.size


def test_learned_cost_falls_back_to_fixed_without_clean_rows() -> None:
    data = _easy_pairs(100, rate=0.3, seed=11)
    with pytest.warns(
        UserWarning, match=r"learned cost \(--cost learned\) needs at least 16 clean rows"
    ):
        r = rematch(
            data.image_emb,
            data.text_emb,
            data.is_mismatched,
            clean=np.zeros(100, dtype=bool),
            cost="learned",
        )
    assert r.info["cost_used"] == "fixed"


def test_learned_cost_keeps_a_perfect_fixed_cost() -> None:
    data = _easy_pairs(400, rate=0.3, seed=0)
    # at a small reg the keys' true captions are already certain under 1 - sim
    r = rematch(data.image_emb, data.text_emb, data.is_mismatched, cost="learned", reg=0.05, seed=0)
    assert r.info["cost_used"] == "fixed"
    assert r.info["cost_fallback"] == "no step improved the held-out loss of the fixed cost"


def test_learned_cost_reports_its_fit() -> None:
    data = clip_like_pairs(400, dim=64, noise_rate=0.3, semantic=1.0, noise=0.8, seed=12)
    r = rematch(data.image_emb, data.text_emb, data.is_mismatched, cost="learned", seed=0)
    fit = r.info["cost_fit"]
    assert fit["n_keys"] >= 16
    assert fit["n_fits"] == 3 and 1 <= fit["n_kept"] <= 3
    assert fit["features"] == ["sim", "row_csls", "col_csls"]
    for fixed, learned in zip(fit["holdout_loss_fixed"], fit["holdout_loss_learned"], strict=True):
        assert learned <= fixed


def test_progress_is_reported() -> None:
    data = _easy_pairs(100, rate=0.3, seed=13)
    seen: list[tuple[str, int, int]] = []
    rematch(
        data.image_emb,
        data.text_emb,
        data.is_mismatched,
        cost="fixed",
        progress=lambda s, d, t: seen.append((s, d, t)),
    )
    stages = {s for s, _, _ in seen}
    assert {"rematch: neighbours", "rematch: transport", "rematch: proposals"} <= stages
    assert all(0 <= d <= t for _, d, t in seen)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mass": 0.0}, r"mass=0.0 is outside \(0, 1\]"),
        ({"mass": 1.5}, r"mass=1.5 is outside \(0, 1\].*use e.g. mass=0.8"),
        ({"reg": 0.0}, r"reg=0.0 must be a positive number"),
        ({"k": 0}, r"k=0 must be an integer >= 1"),
        ({"min_confidence": 1.2}, r"min_confidence=1.2 is outside \[0, 1\]"),
        ({"cost": "magic"}, r"Unknown method cost='magic': expected one of 'learned'"),
        ({"solver": "gpu"}, r"Unknown method solver='gpu'"),
        ({"pool": "clean"}, r"Unknown method pool='clean'"),
        ({"reg_units": "nats"}, r"Unknown method reg_units='nats'"),
        ({"cost": "paper", "solver": "sparse"}, r"cost='paper' needs solver='batch'"),
        ({"cost": "learned", "solver": "batch"}, r"solver='batch' supports cost='fixed'"),
        ({"cost": "paper", "pool": "all"}, r"cost='paper' .* needs pool='suspects'"),
        (
            {"solver": "dense", "block_size": 4},
            r"solver='dense' builds a \d+ x \d+ matrix, above "
            r"block_size=4; use solver='sparse'",
        ),
    ],
)
def test_bad_settings_raise_config_errors(kwargs: dict, match: str) -> None:
    data = _easy_pairs(60, rate=0.3, seed=14)
    with pytest.raises(ConfigError, match=match):
        rematch(data.image_emb, data.text_emb, data.is_mismatched, **kwargs)


def test_bad_inputs_raise_rematch_errors() -> None:
    data = _easy_pairs(20, rate=0.3, seed=15)
    img, txt = data.image_emb, data.text_emb
    with pytest.raises(RematchError, match=r"must be row-aligned \(n, d\) arrays of one shape"):
        rematch(img, txt[:10], np.array([0, 1]))
    with pytest.raises(
        RematchError,
        match=r"suspects is a boolean mask of shape \(5,\), "
        r"expected \(20,\)",
    ):
        rematch(img, txt, np.zeros(5, dtype=bool))
    with pytest.raises(RematchError, match=r"suspects holds row indices outside \[0, 20\)"):
        rematch(img, txt, np.array([3, 25]))
    with pytest.raises(RematchError, match=r"image_group has shape \(3,\), expected \(20,\)"):
        rematch(img, txt, np.array([0, 1]), image_group=np.zeros(3))


def test_calibrated_rematch_confidence_is_the_share_right() -> None:
    """The planted pairs calibrate the confidence: proposals at >= c are right >= c - 0.1."""
    from pmpclean.rematching import calibrated_rematch

    d = clip_like_pairs(
        1500, dim=64, noise_rate=0.3, n_clusters=20, semantic=0.8, noise=0.8, seed=0
    )
    sus = d.is_mismatched
    rm = calibrated_rematch(
        d.image_emb, d.text_emb, sus, image_group=d.image_group, min_confidence=0.0, seed=0
    )
    cal = rm.info["calibration"]
    assert cal["n_planted"] >= 500 and cal["n_answered"] >= 20
    cand, conf = rm.candidate_row, rm.candidate_confidence
    has = cand >= 0
    assert np.all(cand[has] < len(d.image_emb))  # planted captions never proposed
    right = np.zeros(has.size, bool)
    right[has] = d.image_group[d.true_row[cand[has]]] == d.image_group[has]
    for cut in (0.5, 0.8):
        take = has & (conf >= cut)
        assert take.sum() >= 20
        assert right[take].mean() >= cut - 0.1, (cut, right[take].mean())
        # and not more cautious than it says: the mean confidence is the share right
        assert abs(conf[take].mean() - right[take].mean()) < 0.1
    low = has & (conf < 0.3)
    if low.sum() >= 20:
        assert right[low].mean() < 0.5


def test_calibrated_rematch_of_a_blind_model_proposes_nothing() -> None:
    from pmpclean.rematching import calibrated_rematch

    d = clip_like_pairs(1000, dim=64, noise_rate=0.3, seed=0)
    rng = np.random.default_rng(0)
    blind = rng.standard_normal(d.text_emb.shape).astype(np.float32)
    rm = calibrated_rematch(d.image_emb, blind, d.is_mismatched, min_confidence=0.8, seed=0)
    assert (rm.proposed_row == -1).all()
    assert rm.info["calibration"]["precision"] < 0.1


def test_row_stack_reads_rows_as_the_concatenation_would() -> None:
    from pmpclean.rematching import RowStack

    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 4)).astype(np.float32)
    extra = rng.normal(size=(7, 4)).astype(np.float32)
    whole = np.concatenate([base, extra])
    st = RowStack(base, extra)
    assert st.shape == whole.shape and len(st) == 57
    mask = rng.random(57) < 0.3
    for rows in (
        slice(0, 57),
        slice(45, 55),
        slice(None, None, 3),
        np.array([56, 0, 49, 50, -1]),
        mask,
    ):
        np.testing.assert_array_equal(st[rows], whole[rows])
    np.testing.assert_array_equal(np.asarray(st), whole)
    with pytest.raises(IndexError):
        st[np.array([57])]
    # the planted problem reads the input arrays in place (no copy of the n rows)
    from pmpclean.rematching import plant_among_suspects

    img2, txt2, *_ = plant_among_suspects(
        base,
        base,
        np.zeros(50, bool),
        np.arange(50),
        np.arange(50),
        np.ones(50, bool),
        np.arange(3),
    )
    assert img2.base is base and txt2.base is base and img2.shape == (53, 4)


def test_propose_captions_keeps_its_earlier_public_name() -> None:
    import pmpclean.rematching as rematching

    assert rematching.rematch is rematching.propose_captions
    assert {"propose_captions", "rematch"} <= set(rematching.__all__)
