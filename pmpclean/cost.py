"""[3] Transport costs for rematching: fixed, learned edge-wise, and the L2RM paper's network.

A rematch problem is a bipartite *candidate graph*: suspect images on one side,
candidate captions on the other, one edge per (image, caption) pair that may be
proposed. Every cost here is a cost per edge, **lower = more likely a true pair**.

* :func:`fixed_cost` is ``1 - similarity``, the starting point of L2RM.
* :class:`EdgeCost` is the learned cost pmpclean uses by default. A small MLP maps
  per-edge features (:func:`edge_features`; by default the similarity and how it
  compares with the mean of the row's and of the column's nearest candidates, a
  hubness correction) to a correction of ``slope * (1 - s)``. It is monotone: a pair
  that is more similar, absolutely or relative to the alternatives, never costs more.
  It does not depend on any batch size, so one model serves a block of 128 or a
  graph of a million suspects. It is fitted by :func:`fit_edge_cost` on *key
  points*: confident clean pairs planted among the suspects, whose true caption is
  known; :func:`average_costs` averages several fits.
* :class:`PaperCost` re-implements the L2RM cost network
  (``FeedForward_Network`` in the authors' code): a ``Linear(B, B)`` + ReLU applied to
  each row of a ``B x B`` within-batch similarity matrix, initialised to
  ``relu(1 - s)`` and trained by :func:`fit_paper_cost` to lower the cost of planted
  key points. Its input width equals the batch size ``B``; it is kept as an option
  (``rematch(cost="paper")``) for comparison.

References
----------
.. [1] Han, H., et al. (2024). "Learning to Rematch Mismatched Pairs for Robust
   Cross-Modal Retrieval" (L2RM). CVPR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._utils import check_random_state, one_torch_thread

__all__ = [
    "DEFAULT_FEATURES",
    "FEATURE_NAMES",
    "EdgeCost",
    "PaperCost",
    "average_costs",
    "edge_features",
    "fit_edge_cost",
    "fit_paper_cost",
    "fixed_cost",
]

#: Columns of :func:`edge_features`, all in units of ``scale`` (see there).
FEATURE_NAMES = ("sim", "row_margin", "col_margin", "row_csls", "col_csls")


def fixed_cost(sim: np.ndarray) -> np.ndarray:
    """The fixed transport cost ``1 - sim``.

    Parameters
    ----------
    sim : ndarray, any shape
        Cosine similarities, higher = more alike.

    Returns
    -------
    ndarray, same shape, float
        Cost, lower = more likely a true pair.
    """
    return 1.0 - np.asarray(sim)


def edge_features(
    sim: np.ndarray,
    row_best: np.ndarray,
    row_second: np.ndarray,
    row_mean: np.ndarray,
    col_best: np.ndarray,
    col_second: np.ndarray,
    col_mean: np.ndarray,
    *,
    scale: float,
) -> np.ndarray:
    """Per-edge features of a candidate graph (batch-size free).

    All arguments are per edge (already gathered from per-row / per-column
    statistics of the candidate lists), so the features do not depend on how many
    rows or columns the problem has.

    Parameters
    ----------
    sim : ndarray, shape (E,)
        Similarity of the edge's image and caption.
    row_best, row_second, row_mean : ndarray, shape (E,)
        Best, second-best and mean similarity of the edge's image over its top-k
        allowed captions.
    col_best, col_second, col_mean : ndarray, shape (E,)
        The same for the edge's caption over its top-k allowed images.
    scale : float
        Spread of the similarities (e.g. their standard deviation over the edges);
        every feature is divided by it, so the features are comparable between
        embedding models with narrow (CLIP) or wide similarity bands.

    Returns
    -------
    ndarray, shape (E, 5), float32
        Columns :data:`FEATURE_NAMES`: ``sim``, ``row_margin`` = sim minus the row's
        best *other* caption (positive only for the row's top edge), ``col_margin``
        likewise for the column, and the CSLS-like ``sim - row_mean`` and
        ``sim - col_mean`` (hubness corrections).
    """
    s = np.asarray(sim, dtype=np.float64)
    row_alt = np.where(s >= row_best, row_second, row_best)
    col_alt = np.where(s >= col_best, col_second, col_best)
    feats = np.stack([s, s - row_alt, s - col_alt, s - row_mean, s - col_mean], axis=1) / float(
        scale
    )
    # a list with a single entry has no alternative (-inf): no competition = margin 0
    feats[~np.isfinite(feats)] = 0.0
    return feats.astype(np.float32)


#: Features the learned cost uses by default. The margins against the best
#: alternative sharpen the cost on key points but mislead it on detected suspects
#: (benchmarks/results/rematch.md, "Cost ablation").
DEFAULT_FEATURES = ("sim", "row_csls", "col_csls")


def _feature_columns(use: tuple[str, ...]) -> list[int]:
    unknown = [u for u in use if u not in FEATURE_NAMES]
    if unknown or not use:
        raise ValueError(f"unknown edge features {unknown}: expected names from {FEATURE_NAMES}")
    return [FEATURE_NAMES.index(u) for u in use]


@dataclass
class EdgeCost:
    """A fitted edge-wise cost: ``cost = slope * (1 - sim) + scale * mlp(features[:, use])``.

    The MLP has one ``tanh`` hidden layer. :func:`fit_edge_cost` keeps ``w1 >= 0``,
    ``w2 <= 0`` and ``slope > 0``, so the fitted cost never increases when the
    similarity or any feature increases: a pair that is more similar, absolutely or
    relative to the alternatives, never costs more. This keeps the cost sane far from
    the key points it was fitted on (pairs outside every candidate list get a cost at
    least as high as their similarity says). A model with a zero output layer and
    ``slope=1`` is exactly the fixed cost ``1 - sim``.

    Attributes
    ----------
    w1 : ndarray, shape (len(use), h)
    b1 : ndarray, shape (h,)
    w2 : ndarray, shape (h,)
    b2 : float
    scale : float
        The similarity spread the features were divided by (see :func:`edge_features`).
    use : tuple of str
        The :data:`FEATURE_NAMES` the MLP reads.
    info : dict
        Fit diagnostics: key points used, held-out loss of the fixed and the fitted
        cost, steps, whether the fit was kept.
    slope : float
        Weight of ``1 - sim`` (> 0; a global sharpening or flattening of the fixed cost).
    """

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: float
    scale: float
    use: tuple[str, ...] = DEFAULT_FEATURES
    info: dict = field(default_factory=dict)
    slope: float = 1.0

    def correction(self, features: np.ndarray, *, chunk: int = 1 << 20) -> np.ndarray:
        """MLP output in units of ``scale``, shape (E,), float32.

        ``features`` holds all :data:`FEATURE_NAMES` columns (E, 5).
        """
        f = np.asarray(features, dtype=np.float32)[:, _feature_columns(self.use)]
        out = np.empty(f.shape[0], dtype=np.float32)
        w1 = self.w1.astype(np.float32)
        b1 = self.b1.astype(np.float32)
        w2 = self.w2.astype(np.float32)
        for lo in range(0, f.shape[0], chunk):
            h = np.tanh(np.einsum("ef,fh->eh", f[lo : lo + chunk], w1) + b1)
            out[lo : lo + chunk] = h @ w2 + np.float32(self.b2)
        return out

    def __call__(self, sim: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Cost per edge, shape (E,), lower = more likely a true pair."""
        base = np.float32(self.slope) * (1.0 - np.asarray(sim, dtype=np.float32))
        return base + np.float32(self.scale) * self.correction(features)


def average_costs(models: list[EdgeCost]) -> EdgeCost:
    """One :class:`EdgeCost` equal to the mean of several (an ensemble, as a wider MLP).

    ``mean_i(tanh(z W1_i + b1_i) w2_i + b2_i)`` is the MLP with the hidden units of
    all models side by side and the output weights divided by their number; the
    slopes are averaged. The mean of monotone costs is monotone.
    """
    if not models:
        raise ValueError("average_costs needs at least one model")
    m = len(models)
    if len({(md.scale, md.use) for md in models}) != 1:
        raise ValueError("average_costs: the models differ in scale or features")
    return EdgeCost(
        np.concatenate([md.w1 for md in models], axis=1),
        np.concatenate([md.b1 for md in models]),
        np.concatenate([md.w2 for md in models]) / m,
        float(np.mean([md.b2 for md in models])),
        models[0].scale,
        models[0].use,
        {"n_models": m},
        float(np.mean([md.slope for md in models])),
    )


def fit_edge_cost(
    features: np.ndarray,
    sim: np.ndarray,
    row_seg: np.ndarray,
    col_seg: np.ndarray,
    is_true: np.ndarray,
    *,
    scale: float,
    temperature: float,
    use: tuple[str, ...] = DEFAULT_FEATURES,
    hidden: int = 16,
    steps: int = 200,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    holdout: float = 0.25,
    patience: int = 30,
    max_per_segment: int = 32,
    seed: int | np.random.Generator | None = None,
) -> EdgeCost:
    # long: numpydoc of 50 lines; instances, standardisation, descent and folding back
    """Fit an :class:`EdgeCost` on key points with a known true edge.

    The training edges are the candidate edges of key images (``row_seg >= 0``)
    and of key captions (``col_seg >= 0``); each segment holds exactly one true edge
    (``is_true``), the key's own pairing. The loss is the cross-entropy of the true
    edge under ``softmax(-cost / temperature)`` within its row and within its
    column, i.e. a one-row / one-column relaxation of entropic transport at
    regularisation ``temperature``: the fitted cost is calibrated for transport at
    that regularisation. The weights are parametrised so that the cost is monotone
    (``w1 = softplus(.) >= 0``, ``w2 = -softplus(.) <= 0``, ``slope = exp(.)``), on
    standardised features. Segments are split into fit and held-out keys; the step
    with the lowest held-out loss is kept, and the fit is discarded (the model stays
    equal to ``1 - sim``, ``info["kept"] = False``) when no step improves on the
    fixed cost on the held-out keys. Segments whose true edge is not among the
    edges (a key whose caption is not among its candidates) are ignored.

    Parameters
    ----------
    features : ndarray, shape (E, 5)
        :func:`edge_features` of the training edges (all :data:`FEATURE_NAMES`).
    sim : ndarray, shape (E,)
        Similarity of each training edge.
    row_seg, col_seg : ndarray, shape (E,), int
        Key-image segment and key-caption segment of each edge, ``-1`` when the edge
        belongs to none. An edge may belong to both.
    is_true : ndarray, shape (E,), bool
        The key's own pairing.
    scale : float
        Similarity spread used by :func:`edge_features`.
    temperature : float
        Softmax temperature in cost units (use the transport regularisation).
    use : tuple of str
        The features the MLP reads (default :data:`DEFAULT_FEATURES`).
    hidden, steps, lr, weight_decay : int, int, float, float
        MLP width and full-batch Adam settings.
    holdout : float
        Fraction of the key segments held out for model selection.
    patience : int
        Stop after this many steps without a better held-out loss.
    max_per_segment : int
        Edges kept per segment: the true one and the most similar others (a hub
        caption's column can hold hundreds of edges whose softmax weight is
        negligible; capping keeps a step's cost proportional to the number of keys).
    seed : int, Generator or None
        Seed of the held-out split and of the weight initialisation.

    Returns
    -------
    EdgeCost
    """
    rng = check_random_state(seed)
    cols = _feature_columns(tuple(use))
    f = np.asarray(features, dtype=np.float64)[:, cols]
    n_feat = f.shape[1]
    # Monotone parametrisation: w1 = softplus(u) >= 0, w2 = -softplus(v) <= 0 and
    # slope = exp(rho) > 0, so the cost never rises with the similarity or a feature.
    u = rng.normal(0.0, 0.5, size=(n_feat, hidden))
    b1_init = rng.normal(0.0, 1.0, size=hidden)
    model = EdgeCost(
        np.logaddexp(0.0, u).astype(np.float32),
        np.zeros(hidden, np.float32),
        np.zeros(hidden, np.float32),
        0.0,
        float(scale),
        tuple(use),
    )
    row_seg = np.asarray(row_seg, dtype=np.int64)
    col_seg = np.asarray(col_seg, dtype=np.int64)
    is_true = np.asarray(is_true, dtype=bool)

    # Instances (edge, segment): key rows first, then key columns.
    n_rows = int(row_seg.max()) + 1 if (row_seg >= 0).any() else 0
    r_edges = np.flatnonzero(row_seg >= 0)
    c_edges = np.flatnonzero(col_seg >= 0)
    edge_of = np.concatenate([r_edges, c_edges])
    seg = np.concatenate([row_seg[r_edges], n_rows + col_seg[c_edges]])
    n_true = np.bincount(seg, weights=is_true[edge_of], minlength=int(seg.max(initial=-1)) + 1)
    keep = (n_true == 1)[seg]  # a segment whose true edge is missing teaches nothing
    edge_of, seg = edge_of[keep], seg[keep]
    _, seg = np.unique(seg, return_inverse=True)
    seg = seg.ravel()
    # by segment; inside it the true edge first, then by decreasing similarity
    s_all = np.asarray(sim, dtype=np.float64)
    order = np.lexsort((-s_all[edge_of], ~is_true[edge_of], seg))
    edge_of, seg = edge_of[order], seg[order]
    n_seg = int(seg.max(initial=-1)) + 1
    if n_seg > 0:
        first = np.searchsorted(seg, np.arange(n_seg))
        rank = np.arange(seg.size) - first[seg]
        edge_of, seg = edge_of[rank < max_per_segment], seg[rank < max_per_segment]
    info: dict = {"n_segments": n_seg, "features": list(use), "kept": False, "steps": 0}
    model.info = info
    if n_seg < 8:
        info["reason"] = f"only {n_seg} usable key segments (need 8)"
        return model
    is_hold = rng.random(n_seg) < holdout
    if is_hold.all() or not is_hold.any():
        is_hold = np.zeros(n_seg, dtype=bool)
        is_hold[rng.choice(n_seg, size=max(1, n_seg // 4), replace=False)] = True
    counts = np.bincount(seg, minlength=n_seg)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # standardised features (a positive rescaling: monotonicity is unchanged); folded
    # back into w1 and b1 at the end
    mu = f[edge_of].mean(axis=0)
    sd = f[edge_of].std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    z = ((f[edge_of] - mu) / sd).astype(np.float32)
    base = (1.0 - s_all[edge_of]) / temperature
    factor = float(scale) / float(temperature)
    true_pos = np.flatnonzero(is_true[edge_of])  # one per segment, in segment order
    hold_inst = is_hold[seg]
    n_fit = int((~is_hold).sum())
    n_hold = int(is_hold.sum())

    # raw parameters: u (n_feat, h), b1 (h), v (h), b2 (1), rho (1)
    init = [u, b1_init, np.full(hidden, -2.0), np.zeros(1), np.zeros(1)]
    loss = _KeyLoss(z, base, factor, starts, counts, true_pos, hold_inst, n_fit)
    with one_torch_thread():
        nll0, best_loss, best_params, best_step, last = _descend(
            loss, init, is_hold, steps=steps, lr=lr, weight_decay=weight_decay, patience=patience
        )
    info.update(
        n_fit=n_fit,
        n_holdout=n_hold,
        holdout_loss_fixed=float(nll0[is_hold].mean()),
        holdout_loss_learned=float(best_loss),
        best_step=int(best_step),
        steps=int(last),
    )
    if best_params is not None:
        w1, w2, slope = (np.asarray(w.numpy(), dtype=np.float64) for w in _weights(best_params))
        slope = float(slope[0])
        w1 = w1 / sd[:, None]  # (f - mu) / sd @ w1 + b1 == f @ (w1 / sd) + (b1 - mu @ (w1 / sd))
        model.w1 = w1.astype(np.float32)
        model.b1 = (best_params[1].numpy() - mu @ w1).astype(np.float32)
        model.w2 = w2.astype(np.float32)
        model.b2 = float(best_params[3][0])
        model.slope = slope
        info["kept"] = True
        info["slope"] = slope
    else:
        info["reason"] = "no step improved the held-out loss of the fixed cost"
    return model


def _descend(
    loss: _KeyLoss,
    init: list[np.ndarray],
    is_hold: np.ndarray,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    patience: int,
) -> tuple[np.ndarray, float, list[Any] | None, int, int]:
    """Full-batch Adam on the fit segments' mean loss from the raw parameters ``init``.

    Returns the held-out segments' loss under the fixed cost ``1 - sim`` (per segment),
    the best held-out loss, the raw parameters that reached it (None: no step beat the
    fixed cost), the step before which they were taken and the steps run.
    """
    import torch

    params = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in init]
    with torch.no_grad():
        nll0 = loss.nll_of(-loss.base).numpy()  # the fixed cost 1 - sim
    best_loss, best_params, best_step = float(nll0[is_hold].mean()), None, 0
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    hold = torch.from_numpy(is_hold)
    last = 0
    for step in range(1, steps + 1):
        last = step
        opt.zero_grad()
        nll = loss.forward(params)
        hold_loss = float(nll.detach()[hold].mean())
        if hold_loss < best_loss - 1e-6:
            best_loss, best_step = hold_loss, step - 1
            best_params = [p.detach().clone() for p in params]
        elif step - 1 - best_step > patience:
            break
        nll[~hold].mean().backward()  # the held-out segments select; they never pull
        opt.step()
    with torch.no_grad():
        final = float(loss.forward(params)[hold].mean())
    if final < best_loss - 1e-6:
        best_loss, best_step = final, last
        best_params = [p.detach().clone() for p in params]
    return nll0, best_loss, best_params, best_step, last


def _weights(p: list[Any]) -> tuple[Any, Any, Any]:
    """``w1 = softplus(u) >= 0``, ``w2 = -softplus(v) <= 0``, ``slope = exp(rho) > 0``
    from the raw parameters ``[u, b1, v, b2, rho]`` (torch tensors): the monotone
    parametrisation of :class:`EdgeCost`."""
    import torch.nn.functional as F

    return F.softplus(p[0]), -F.softplus(p[2]), p[4].exp()


class _KeyLoss:
    """The key-point loss :func:`fit_edge_cost` minimises (torch; autograd differentiates it).

    Per instance (edge, segment): ``x = -(slope * base + factor * (tanh(z @ w1 + b1) @ w2
    + b2))`` with ``w1, w2, slope`` from :func:`_weights`; the loss of a segment is the
    cross-entropy of its true edge under ``softmax(x)`` within the segment. The raw
    parameters are ``[u (n_feat, h), b1 (h), v (h), b2 (1), rho (1)]``, float64 tensors.
    Instances are ordered by segment; ``hold_inst`` marks those of held-out segments.
    """

    def __init__(
        self,
        z: np.ndarray,
        base: np.ndarray,
        factor: float,
        starts: np.ndarray,
        counts: np.ndarray,
        true_pos: np.ndarray,
        hold_inst: np.ndarray,
        n_fit: int,
    ) -> None:
        import torch

        self.z = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
        self.base = torch.from_numpy(np.asarray(base, dtype=np.float64))
        self.factor = float(factor)
        counts = np.asarray(counts, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64)
        # segments as rows of an (n_seg, longest) index into x, padded with an index
        # past its end (where the logits get -inf): one dense log-sum-exp per step
        width = int(counts.max(initial=1))
        col = np.arange(width)
        pad = np.where(col < counts[:, None], starts[:, None] + col, int(counts.sum()))
        self.pad = torch.from_numpy(pad)
        self.true_pos = torch.from_numpy(np.asarray(true_pos, dtype=np.int64))
        self.hold_inst = np.asarray(hold_inst, dtype=bool)
        self.n_fit = n_fit

    def nll_of(self, x: Any) -> Any:
        """Per-segment cross-entropy of the true edge, (n_seg,), from the logits ``x`` (E,)."""
        import torch

        ext = torch.cat([x, x.new_full((1,), -torch.inf)])
        return torch.logsumexp(ext[self.pad], dim=1) - x[self.true_pos]

    def forward(self, p: list[Any]) -> Any:
        """Per-segment loss (n_seg,) at the raw parameters ``p``."""
        import torch

        w1, w2, slope = _weights(p)
        # float32 hidden layer: half the memory traffic of these thin products
        h = torch.tanh(self.z @ w1.float() + p[1].float()).double()
        x = -(slope * self.base + self.factor * (h @ w2 + p[3]))
        return self.nll_of(x)


@dataclass
class PaperCost:
    """The L2RM cost network: ``cost = relu(sims @ weight.T + bias)`` row-wise.

    Attributes
    ----------
    weight : ndarray, shape (B, B)
        Initialised to ``-I``.
    bias : ndarray, shape (B,)
        Initialised to ``1``.
    info : dict
        Training diagnostics (steps, final loss, learning rate).
    """

    weight: np.ndarray
    bias: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """The input width ``B`` (the batch size it was built for)."""
        return int(self.weight.shape[0])

    def __call__(self, sims: np.ndarray) -> np.ndarray:
        """Cost of each (image, caption) cell of within-batch similarity matrices.

        Parameters
        ----------
        sims : ndarray, shape (..., n_images, B)
            Similarities of each batch image to the batch's ``B`` captions.

        Returns
        -------
        ndarray, same shape, float32, >= 0, lower = more likely a true pair.
        """
        s = np.asarray(sims, dtype=np.float32)
        return np.maximum(s @ self.weight.T.astype(np.float32) + self.bias, 0.0)


def fit_paper_cost(
    sims: np.ndarray,
    supervision: np.ndarray,
    *,
    lr: float = 2e-6,
) -> PaperCost:
    """Train the L2RM cost network on planted key-point batches, as the paper does.

    One Adam step per batch on ``sum(supervision * cost)`` (the authors' loss: it
    only lowers the cost of the key points' true pairings), starting from
    ``weight = -I``, ``bias = 1``.

    Parameters
    ----------
    sims : ndarray, shape (T, B, B)
        For each of ``T`` training batches, the similarities of ``B`` images (suspect
        images with a few clean key images planted at random positions) to ``B``
        captions (the key captions among them).
    supervision : ndarray, shape (T, B, B), bool
        True at (key image, its own caption).
    lr : float
        Adam learning rate (the authors' default ``lr_cost`` is 2e-6).

    Returns
    -------
    PaperCost
    """
    import torch

    s = torch.from_numpy(np.asarray(sims, dtype=np.float64))
    sup = np.asarray(supervision, dtype=bool)
    b = s.shape[-1]
    weight = (-torch.eye(b, dtype=torch.float64)).requires_grad_()
    bias = torch.ones(b, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    loss = float("nan")
    with one_torch_thread():
        for t in range(s.shape[0]):
            i, j = (torch.from_numpy(a) for a in np.nonzero(sup[t]))
            # the cost of each key point's true pairing: relu(s[i] . weight[j] + bias[j])
            cost = torch.relu((s[t][i] * weight[j]).sum(1) + bias[j]).sum()
            loss = float(cost.detach())
            opt.zero_grad()
            cost.backward()
            opt.step()
    return PaperCost(
        weight.detach().numpy().astype(np.float32),
        bias.detach().numpy().astype(np.float32),
        {"steps": int(s.shape[0]), "last_loss": loss, "lr": float(lr)},
    )
