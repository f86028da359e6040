"""Label audit: find wrong class labels of image-text pairs (UOT-RCL style).

Many multimodal datasets carry one class label per image-text pair, collected
coarsely and therefore noisy. :func:`audit_labels` scores every label with the
evidence of *both* modalities, following the unified optimal-transport framework
of UOT-RCL [1]_:

1. **Heads.** Small modality-specific heads (a linear or MLP encoder into a
   shared space, one set of class prototypes per modality, cosine logits) are
   trained on the features. Each row's class evidence comes from heads that never
   saw the row (cross-fitting over folds), so the heads cannot memorise its label.
2. **Semantic alignment.** Partial optimal transport moves mass from samples
   (uniform marginal) to classes (marginal = given label frequencies, optionally
   moved part-way towards an EM estimate of the true class prior). The cost of
   sending sample ``i`` to class ``k`` is *cross-modal consistent*:
   ``-t_v log p_img(k | x_i) - t_t log p_txt(k | t_i) - log T[k, y_i]``, i.e. low only
   when image, text and the given label (through the estimated noise transition
   ``T[true, given]``) agree; the temperatures ``t_v, t_t`` weigh the modalities by
   how well they explain the given labels. Only the most certain mass is
   transported first and the mass grows over rounds (curriculum): the rows of each
   round's partial plan are the corrected labels the heads are retrained on, its
   row mass is each sample's weight.
3. **Relation alignment.** A contrastive term ties the image and text embeddings
   of a pair in the shared space and each modality is also classified by the
   other modality's prototypes, narrowing the heterogeneity gap. The option
   ``relation_method="ot"`` replaces the contrastive term with a semantic-level
   entropic OT between a block's image and text embeddings (cost: distance in the
   shared space plus class disagreement); it measured worse on the Wikipedia
   benchmark (see ``benchmarks/results/labels.md``), so it is not the default.

The final full-mass plan (entropic, ``reg = 1``: its rows are Bayes posteriors)
gives, per row, the posterior of each class: the score of the given label, the
suggested label (its argmax) and the flag (another class is more probable).

``T`` starts from the label-free posterior (the labels are *not* assumed to be
mostly right, which would be a self-confirming fixed point) and is re-estimated
from the posteriors each round (EM with the heads fixed).

The transport (n samples to a handful of classes) is :func:`pmpclean.transport.partial_plan`
with POT's Sinkhorn-Knopp (``method="sinkhorn"``): the log-domain solvers were 50x
slower at this shape.

References
----------
.. [1] UOT-RCL: "Unified Optimal Transport Framework for Cross-Modal Retrieval
   with Noisy Labels", IEEE TNNLS 2025.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ._utils import check_random_state, one_torch_thread, resolve_device
from .errors import ConfigError, LabelAuditError
from .transport import partial_plan

__all__ = [
    "LABEL_METHODS",
    "LABEL_STATUSES",
    "LabelAudit",
    "LabelHeads",
    "audit_labels",
    "fit_label_heads",
    "flip_labels",
]

logger = logging.getLogger(__name__)

#: Audit methods: ``"uot"`` = cross-fitted heads + curriculum partial OT (default);
#: ``"heads"`` = the same cross-fitted heads without transport or curriculum (ablation).
LABEL_METHODS = ("uot", "heads")
#: Values of :attr:`LabelAudit.label_status`.
LABEL_STATUSES = ("ok", "missing_label", "unknown_label", "not_scored")
_HEADS = ("linear", "mlp")
_RELATIONS = ("nce", "ot")
_CALIBRATIONS = ("likelihood", "targets")

Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- results


@dataclass
class LabelAudit:
    """Per-row result of :func:`audit_labels` (all arrays have length ``n``, input order).

    An auditor's result of one shape (cf. cleanlab's Datalab issue managers): a
    :attr:`name`, the per-row output columns (:meth:`to_columns`, which the scan
    writes into audit.parquet as they are) and a :attr:`summary`.

    Attributes
    ----------
    label_status : ndarray of str, shape (n,)
        ``"ok"`` (audited), ``"missing_label"`` (no label given: not audited, but a label
        is suggested), ``"unknown_label"`` (label outside ``classes``: not audited, a
        label is suggested), ``"not_scored"`` (invalid row, non-finite features, or a
        class too small to learn).
    label_score : ndarray of float, shape (n,)
        [0, 1], higher = the given label is more likely right (posterior probability of
        the given label). NaN when the row is not ``"ok"``.
    is_label_issue : ndarray of bool, shape (n,)
        True when another class is more probable than the given one. False for rows
        that are not ``"ok"``.
    suggested_label : ndarray of object, shape (n,)
        The class suggested for the row (same values as the given labels); the given
        label when there is no issue; the most probable class for ``missing_label`` /
        ``unknown_label`` rows; ``None`` for ``not_scored`` rows.
    label_confidence : ndarray of float, shape (n,)
        [0, 1], posterior probability of ``suggested_label``; NaN for ``not_scored`` rows.
    classes : list
        Class values in index order (columns of ``proba``).
    proba : ndarray of float, shape (n, n_classes)
        Posterior class probabilities (rows sum to 1; NaN rows when not scored).
    summary : dict
        ``n_classes``, ``n_audited``, ``n_label_issues``, ``estimated_label_noise``,
        ``status_counts``, ``confusion`` (``{"classes", "given", "suggested", "counts"}``,
        counts[given][suggested] over audited rows), ``noise_transition``, ``settings``,
        ``warnings``.
    """

    label_status: np.ndarray
    label_score: np.ndarray
    is_label_issue: np.ndarray
    suggested_label: np.ndarray
    label_confidence: np.ndarray
    classes: list
    proba: np.ndarray
    summary: dict = field(default_factory=dict)
    #: The issue this auditor reports (its columns say ``label_*`` / ``is_label_issue``).
    name: ClassVar[str] = "label"

    def to_columns(self) -> dict[str, np.ndarray]:
        """The five output-contract columns, ready for ``DataFrame.assign(**...)``; the
        scan's audit.parquet holds exactly these."""
        return {
            "label_status": self.label_status,
            "label_score": self.label_score,
            "is_label_issue": self.is_label_issue,
            "suggested_label": self.suggested_label,
            "label_confidence": self.label_confidence,
        }


# --------------------------------------------------------------------------- validation


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    try:  # pandas NA / NaT without importing pandas
        return bool(value != value)  # noqa: PLR0124
    except (TypeError, ValueError):
        return False


def _norm_label(value: Any) -> Any:
    """Labels compare by value: numpy scalars become Python scalars, strings are stripped."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 3.0 read from a CSV column with NaNs means class 3
    return value


def _sorted_classes(values: list[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types: keep first-seen order
        return values


def _features(x: Any, name: str, n: int | None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ConfigError(
            f"{name} must be a 2-D array (n_rows, n_features), got shape {arr.shape}; "
            "pass one feature row per dataset row."
        )
    if n is not None and arr.shape[0] != n:
        raise ConfigError(
            f"{name} has {arr.shape[0]} rows but image_feats has {n}; both modalities need "
            "one row per dataset row, in the same order."
        )
    if arr.shape[1] == 0:
        raise ConfigError(f"{name} has zero feature columns; give at least one feature.")
    return arr


def _encode_labels(
    labels: Sequence[Any] | np.ndarray,
    n: int,
    usable: np.ndarray,
    classes: Sequence[Any] | None,
    min_class_size: int,
    warn: list[str],
) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Return (class index per row, -1 when not audited; status per row; classes)."""
    values = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
    if len(values) != n:
        raise ConfigError(
            f"labels has {len(values)} entries but the features have {n} rows; give one "
            "label per row (missing labels as None/NaN/empty)."
        )
    status = np.full(n, "ok", dtype=object)
    missing = np.array([_is_missing(v) for v in values], dtype=bool)
    normed = [None if m else _norm_label(v) for v, m in zip(values, missing, strict=True)]
    status[missing] = "missing_label"

    if classes is not None:
        cls = [_norm_label(c) for c in classes]
        if len(set(cls)) != len(cls):
            raise ConfigError(f"classes contains duplicates: {cls}; list each class once.")
        known = set(cls)
        unknown = np.array(
            [(not m) and (v not in known) for v, m in zip(normed, missing, strict=True)]
        )
        status[unknown] = "unknown_label"
        if unknown.any():
            examples = sorted({repr(normed[i]) for i in np.flatnonzero(unknown)})[:5]
            warn.append(
                f"{int(unknown.sum())} row(s) carry a label outside the given classes "
                f"({', '.join(examples)}); they are not audited (label_status='unknown_label') "
                "but get a suggested label. Add the value to the classes list if it is a class."
            )
    else:
        seen: dict[Any, None] = {}
        for v, m, u in zip(normed, missing, usable, strict=True):
            if not m and u:
                seen.setdefault(v, None)
        cls = _sorted_classes(list(seen))

    status[~usable] = "not_scored"
    index = {c: k for k, c in enumerate(cls)}
    y = np.array(
        [index.get(v, -1) if s == "ok" else -1 for v, s in zip(normed, status, strict=True)]
    )

    counts = np.bincount(y[y >= 0], minlength=len(cls))
    present = [c for c, k in zip(cls, counts, strict=True) if k > 0]
    if len(present) < 2:
        only = f"the single class {present[0]!r}" if present else "no labels at all"
        raise LabelAuditError(
            f"The label column has {only} among the {int(usable.sum())} scorable rows; a label "
            "audit needs at least 2 classes with 2 or more rows each. Check that --label-col "
            "names the class column (or drop it to run the pair audit only)."
        )
    small = [k for k, c in enumerate(counts) if 0 < c < min_class_size]
    if small:
        parts = []
        for k in small:
            rows = np.flatnonzero(y == k)
            parts.append(
                f"{cls[k]!r} (row{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:5]))})"
            )
        warn.append(
            f"{len(small)} class(es) have fewer than {min_class_size} member(s): "
            f"{'; '.join(parts)}. A class needs at least {min_class_size} rows to learn its "
            "prototype, so these rows are not scored (label_status='not_scored'). Merge the "
            "class into another one or relabel the rows."
        )
        for k in small:
            status[y == k] = "not_scored"
            y[y == k] = -1
    # classes left in the model: at least min_class_size members
    counts = np.bincount(y[y >= 0], minlength=len(cls))
    if int((counts > 0).sum()) < 2:
        left = {c: int(k) for c, k in zip(cls, counts, strict=True) if k > 0}
        raise LabelAuditError(
            f"After setting aside classes with fewer than {min_class_size} rows, fewer than 2 "
            f"classes are left ({left}); a label audit needs at least 2 classes with "
            f"{min_class_size} or more rows each. Check the label column."
        )
    return y, status, cls


# --------------------------------------------------------------------------- noise fixtures


def flip_labels(
    labels: np.ndarray,
    *,
    rate: float,
    kind: str = "symmetric",
    n_classes: int | None = None,
    seed: int | np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Inject label noise at known rows (benchmark and test fixture).

    Parameters
    ----------
    labels : ndarray of int, shape (n,)
        Clean class indices in ``[0, n_classes)``.
    rate : float
        Fraction of rows whose label is changed, in [0, 1].
    kind : {"symmetric", "asymmetric"}
        ``"symmetric"``: ``round(rate * n)`` rows chosen uniformly get a uniformly drawn
        *different* class. ``"asymmetric"``: in every class ``c``, ``round(rate * n_c)``
        rows are flipped to class ``(c + 1) % n_classes`` (class-flip noise).
    n_classes : int, optional
        Defaults to ``labels.max() + 1``.
    seed : int, Generator or None

    Returns
    -------
    noisy : ndarray of int, shape (n,)
    flipped : ndarray of bool, shape (n,)
        True where ``noisy != labels``.
    """
    y = np.asarray(labels).astype(np.int64)
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"rate must be in [0, 1], got {rate}.")
    k = int(n_classes if n_classes is not None else y.max() + 1)
    rng = check_random_state(seed)
    noisy = y.copy()
    if kind == "symmetric":
        rows = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
        shift = rng.integers(1, k, size=len(rows))
        noisy[rows] = (y[rows] + shift) % k
    elif kind == "asymmetric":
        for c in range(k):
            members = np.flatnonzero(y == c)
            rows = rng.choice(members, size=int(round(rate * len(members))), replace=False)
            noisy[rows] = (c + 1) % k
    else:
        raise ConfigError(f"Unknown noise kind {kind!r}: expected 'symmetric' or 'asymmetric'.")
    return noisy, noisy != y


# --------------------------------------------------------------------------- heads


def _standardize(x: np.ndarray, fit_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x[fit_rows].mean(axis=0)
    sd = x[fit_rows].std(axis=0)
    sd[sd < 1e-12] = 1.0
    return mu, sd


@dataclass
class _HeadConfig:
    head: str = "linear"  # encoder kind: "linear" or "mlp" (one hidden ReLU layer)
    dim: int = 64  # width of the shared embedding space
    hidden: int = 256  # hidden width of the MLP encoder
    steps: int = 100  # full-batch Adam steps per fit (warm-up round)
    lr: float = 1e-2  # Adam learning rate
    weight_decay: float = 1e-3  # L2 penalty on weights and prototypes (not biases)
    cosine: bool = True  # cosine-to-prototype logits (else dot products, shrunk by decay)
    scale: float = 10.0  # inverse temperature of cosine logits
    nce_scale: float = 10.0  # inverse temperature of the pair-alignment (InfoNCE) term
    relation: float = 0.5  # weight of the relation (cross-modal) alignment terms
    # pair alignment: "nce" (InfoNCE) or "ot" (semantic-level OT; measured worse on the
    # Wikipedia benchmark: label-issue F1 0.54 vs 0.80 at 40 % symmetric noise, 2.4x slower)
    relation_method: str = "nce"
    relation_reg: float = 0.05  # entropic regularisation of the "ot" relation plan
    shared_prototypes: bool = False  # one prototype set for both modalities
    dropout: float = 0.0  # input dropout (regularises the heads)
    batch: int = 256  # rows per step in the pair-alignment (InfoNCE) term
    round_steps: int = 30  # Adam steps per curriculum round (heads are warm-started)


class LabelHeads:
    """Fitted modality heads: standardisation, encoders and class prototypes.

    ``embed_image`` / ``embed_text`` map features into the shared unit-norm space
    (for retrieval); ``predict_log_proba`` gives per-modality class log-probabilities.
    Built by :func:`fit_label_heads`; holds a CPU torch module.
    """

    def __init__(self, module: Any, stats: tuple[np.ndarray, ...], classes: list[Any]):
        self._module = module
        self._stats = stats
        self.classes = classes

    def _tensor(self, x: np.ndarray, which: int) -> Any:
        import torch

        mu, sd = self._stats[2 * which], self._stats[2 * which + 1]
        return torch.as_tensor((np.asarray(x, dtype=np.float64) - mu) / sd, dtype=torch.float32)

    def embed_image(self, image_feats: np.ndarray) -> np.ndarray:
        """Image rows ``(m, d_img)`` -> unit-norm embeddings ``(m, dim)``."""
        import torch

        with torch.no_grad():
            return self._module.embed(self._tensor(image_feats, 0), 0).numpy()

    def embed_text(self, text_feats: np.ndarray) -> np.ndarray:
        """Text rows ``(m, d_txt)`` -> unit-norm embeddings ``(m, dim)``."""
        import torch

        with torch.no_grad():
            return self._module.embed(self._tensor(text_feats, 1), 1).numpy()

    def proba_image(self, image_feats: np.ndarray) -> np.ndarray:
        """Image rows ``(m, d_img)`` -> class probabilities ``(m, n_classes)`` (semantic space)."""
        return self._proba(image_feats, 0)

    def proba_text(self, text_feats: np.ndarray) -> np.ndarray:
        """Text rows ``(m, d_txt)`` -> class probabilities ``(m, n_classes)`` (semantic space)."""
        return self._proba(text_feats, 1)

    def _proba(self, x: np.ndarray, which: int) -> np.ndarray:
        import torch

        with torch.no_grad(), one_torch_thread():
            z = self._module.enc[which](self._tensor(x, which))
            return torch.softmax(self._module.logits(z, which), 1).double().numpy()

    def predict_log_proba(
        self, image_feats: np.ndarray, text_feats: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-modality class log-probabilities, each ``(m, n_classes)``."""
        import torch

        with torch.no_grad(), one_torch_thread():
            lv, lt = self._module(self._tensor(image_feats, 0), self._tensor(text_feats, 1))[:2]
            return (
                torch.log_softmax(lv, 1).double().numpy(),
                torch.log_softmax(lt, 1).double().numpy(),
            )


def _make_module(
    d_img: int, d_txt: int, n_classes: int, cfg: _HeadConfig, rng: np.random.Generator
):
    import torch
    from torch import nn

    def linear(d_in: int, d_out: int) -> nn.Linear:
        layer = nn.Linear(d_in, d_out)
        bound = 1.0 / math.sqrt(d_in)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(rng.uniform(-bound, bound, (d_out, d_in))))
            layer.bias.zero_()
        return layer

    def encoder(d_in: int) -> nn.Module:
        layers: list[nn.Module] = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
        if cfg.head == "mlp":
            layers += [linear(d_in, cfg.hidden), nn.ReLU(), linear(cfg.hidden, cfg.dim)]
        else:
            layers += [linear(d_in, cfg.dim)]
        return nn.Sequential(*layers)

    class _Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleList([encoder(d_img), encoder(d_txt)])
            n_sets = 1 if cfg.shared_prototypes else 2
            protos = rng.standard_normal((n_sets, n_classes, cfg.dim))
            self.protos = nn.Parameter(torch.as_tensor(protos, dtype=torch.float32))

        def embed(self, x: torch.Tensor, which: int) -> torch.Tensor:
            """Unit-norm embedding in the shared space (retrieval, pair alignment)."""
            return nn.functional.normalize(self.enc[which](x), dim=1)

        def logits(self, z: torch.Tensor, which: int) -> torch.Tensor:
            """Class logits of raw embeddings ``z`` against prototype set ``which``."""
            p = self.protos[min(which, len(self.protos) - 1)]
            if cfg.cosine:
                return (
                    cfg.scale
                    * nn.functional.normalize(z, dim=1)
                    @ (nn.functional.normalize(p, dim=1).T)
                )
            return z @ p.T

        def forward(self, xv: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, ...]:
            rv, rt = self.enc[0](xv), self.enc[1](xt)
            return (
                self.logits(rv, 0),  # image through image prototypes
                self.logits(rt, 1),  # text through text prototypes
                self.logits(rv, 1),  # image through text prototypes (relation alignment)
                self.logits(rt, 0),  # text through image prototypes
                nn.functional.normalize(rv, dim=1),
                nn.functional.normalize(rt, dim=1),
            )

    return _Module().float()


def _train_module(
    xv: np.ndarray,
    xt: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray,
    cfg: _HeadConfig,
    rng: np.random.Generator,
    device: str,
    *,
    module: Any = None,
    steps: int | None = None,
) -> Any:
    """Full-batch training on soft targets (n, K) with per-row weights (n,).

    ``module`` continues training an earlier module (curriculum rounds warm-start).
    The pair-alignment term uses a seeded random block of ``cfg.batch`` rows per step.
    """

    with one_torch_thread():
        return _train_loop(xv, xt, targets, weights, cfg, rng, device, module, steps)


def _train_loop(xv, xt, targets, weights, cfg, rng, device, module, steps):  # type: ignore[no-untyped-def]
    import torch

    if module is None:
        module = _make_module(xv.shape[1], xt.shape[1], targets.shape[1], cfg, rng)
    module = module.to(device)
    tv = torch.as_tensor(xv, dtype=torch.float32, device=device)
    tt = torch.as_tensor(xt, dtype=torch.float32, device=device)
    tq = torch.as_tensor(targets, dtype=torch.float32, device=device)
    tw = torch.as_tensor(weights / max(weights.sum(), 1e-12), dtype=torch.float32, device=device)
    decay = [p for n_, p in module.named_parameters() if not n_.endswith("bias")]
    other = [p for n_, p in module.named_parameters() if n_.endswith("bias")]
    opt = torch.optim.Adam(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=cfg.lr,
    )
    pool = np.flatnonzero(weights > 0)
    n_block = min(cfg.batch, len(pool))
    idx = torch.arange(n_block, device=device)
    module.train()
    for _ in range(cfg.steps if steps is None else steps):
        opt.zero_grad()
        lv, lt, xv_, xt_, zv, zt = module(tv, tt)
        ce = -(tq * (torch.log_softmax(lv, 1) + torch.log_softmax(lt, 1))).sum(1)
        loss = (tw * ce).sum()
        if cfg.relation > 0:
            # cross-prototype classification: each modality through the other's prototypes
            cross = -(tq * (torch.log_softmax(xv_, 1) + torch.log_softmax(xt_, 1))).sum(1)
            blk = torch.as_tensor(rng.choice(pool, n_block, replace=False), device=device)
            if cfg.relation_method == "ot":
                align = _relation_ot(zv[blk], zt[blk], tq[blk], cfg.relation_reg)
            else:
                # pair alignment (InfoNCE both ways) on a block of the weighted rows
                s = cfg.nce_scale * zv[blk] @ zt[blk].T
                align = 0.5 * (
                    torch.nn.functional.cross_entropy(s, idx)
                    + torch.nn.functional.cross_entropy(s.T, idx)
                )
            loss = loss + cfg.relation * ((tw * cross).sum() + align)
        loss.backward()
        opt.step()
    module.eval()
    return module.cpu()


def _relation_ot(zv: Any, zt: Any, q: Any, reg: float) -> Any:
    """Semantic-level OT between the image and text embeddings of a block.

    Cost ``C[i, j] = (1 - cos(zv_i, zt_j)) + (1 - q_i . q_j)``: an image and a text are
    cheap to match when they are close in the shared space *and* share class mass
    (``q``: the current soft labels). The entropic plan (uniform marginals, computed
    without gradient) couples each image with the texts of its class, not only with
    its own caption; the loss is the transport cost of the embeddings under that plan,
    which pulls the two modalities' class structures together.
    """
    import torch

    dist = 1.0 - zv @ zt.T
    with torch.no_grad():
        cost = dist + (1.0 - q @ q.T)
        n = cost.shape[0]
        log_k = -cost / reg
        log_u = torch.zeros(n, dtype=cost.dtype, device=cost.device)
        log_v = torch.zeros_like(log_u)
        log_a = torch.full_like(log_u, -math.log(n))
        for _ in range(50):
            log_u = log_a - torch.logsumexp(log_k + log_v[None, :], 1)
            log_v = log_a - torch.logsumexp(log_k + log_u[:, None], 0)
        plan = torch.exp(log_u[:, None] + log_k + log_v[None, :])
    return (plan * dist).sum() * n


def fit_label_heads(
    image_feats: np.ndarray,
    text_feats: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int | None = None,
    sample_weight: np.ndarray | None = None,
    head: str = "linear",
    dim: int = 64,
    steps: int = 300,
    relation: float = 0.5,
    shared_prototypes: bool = True,
    seed: int | np.random.Generator | None = None,
    device: str = "cpu",
    **options: Any,
) -> LabelHeads:
    """Train image and text heads on class labels (for retrieval or as a probe).

    Parameters
    ----------
    image_feats : ndarray, shape (n, d_img)
    text_feats : ndarray, shape (n, d_txt)
        The widths may differ.
    labels : ndarray of int, shape (n,) or float, shape (n, n_classes)
        Class indices (rows with ``-1`` are ignored) or soft targets.
    n_classes : int, optional
    sample_weight : ndarray, shape (n,), optional
    head, dim, steps, relation, shared_prototypes, **options
        Head settings (see :func:`audit_labels`).
    seed : int, Generator or None
    device : str

    Returns
    -------
    LabelHeads
    """
    rng = check_random_state(seed)
    xv = _features(image_feats, "image_feats", None)
    xt = _features(text_feats, "text_feats", xv.shape[0])
    y = np.asarray(labels)
    if y.ndim == 1:
        y = y.astype(np.int64)
        k = int(n_classes if n_classes is not None else y.max() + 1)
        rows = y >= 0
        targets = np.zeros((len(y), k))
        targets[np.flatnonzero(rows), y[rows]] = 1.0
    else:
        targets = y.astype(np.float64)
        rows = np.ones(len(y), dtype=bool)
    w = rows.astype(np.float64) if sample_weight is None else np.asarray(sample_weight) * rows
    cfg = _head_config(
        head=head,
        dim=dim,
        steps=steps,
        relation=relation,
        shared_prototypes=shared_prototypes,
        **options,
    )
    mv, sv = _standardize(xv, rows)
    mt, st = _standardize(xt, rows)
    zv, zt = (xv - mv) / sv, (xt - mt) / st
    module = _train_module(
        zv[rows], zt[rows], targets[rows], w[rows], cfg, rng, resolve_device(device)
    )
    return LabelHeads(module, (mv, sv, mt, st), list(range(targets.shape[1])))


def _head_config(**kwargs: Any) -> _HeadConfig:
    known = set(_HeadConfig.__dataclass_fields__)
    bad = sorted(set(kwargs) - known)
    if bad:
        raise ConfigError(
            f"Unknown label-audit option(s) {bad}; known head options: {sorted(known)}."
        )
    cfg = _HeadConfig(**kwargs)
    if cfg.head not in _HEADS:
        raise ConfigError(f"Unknown head {cfg.head!r}: expected one of {', '.join(_HEADS)}.")
    if cfg.relation_method not in _RELATIONS:
        raise ConfigError(
            f"Unknown relation_method {cfg.relation_method!r}: expected one of "
            f"{', '.join(_RELATIONS)}."
        )
    if cfg.dim < 2 or cfg.steps < 1:
        raise ConfigError(f"dim must be >= 2 and steps >= 1, got dim={cfg.dim}, steps={cfg.steps}.")
    return cfg


# --------------------------------------------------------------------------- transport

# The label audit's transport: Sinkhorn-Knopp, warm-restarted up to 10 times (a small
# ``reg`` with a class whose only cheap samples are taken converges slowly, and stopping
# early would move visibly less than the requested mass).
_partial_transport = functools.partial(
    partial_plan, reg=1.0, method="sinkhorn", max_iter=2000, tol=1e-9, max_rounds=10
)


# --------------------------------------------------------------------------- audit


def _on_standardized(module: Any, classes: list[Any], d_img: int, d_txt: int) -> LabelHeads:
    """Heads over features that are already standardised (identity scaling)."""
    scaling = (np.zeros(d_img), np.ones(d_img), np.zeros(d_txt), np.ones(d_txt))
    return LabelHeads(module, scaling, classes)


def _folds(
    y: np.ndarray, n_folds: int, rng: np.random.Generator, groups: np.ndarray | None = None
) -> np.ndarray:
    """Fold id per row, stratified by label; rows of one group share a fold.

    Groups (e.g. the captions of one image) must not straddle folds: a head trained on
    one row of an image would otherwise see the image and its given label, noisy or
    not, when it predicts the image's other rows.
    """
    if groups is None:
        groups = np.arange(len(y))
    uniq, inverse = np.unique(groups, return_inverse=True)
    # a group's stratum is the label of its first row
    first = np.full(len(uniq), len(y), dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(len(y)))
    group_label = y[first]
    group_fold = np.empty(len(uniq), dtype=np.int64)
    for c in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == c))
        group_fold[members] = (np.arange(len(members)) + rng.integers(n_folds)) % n_folds
    return group_fold[inverse]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def audit_labels(  # noqa: C901 - see the comment below
    image_feats: np.ndarray,
    text_feats: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    valid: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    classes: Sequence[Any] | None = None,
    method: str = "uot",
    rounds: int = 4,
    mass_start: float = 0.3,
    mass_end: float = 1.0,
    n_folds: int = 3,
    reg: float = 1.0,
    select_reg: float = 0.2,
    em_steps: int = 1,
    final_em_steps: int = 1,
    calibrate: str = "likelihood",
    prior_em: float = 0.25,
    min_class_size: int = 2,
    seed: int | np.random.Generator | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    **options: Any,
) -> LabelAudit:
    # long: numpydoc of 83 lines; the stages in order (heads, prototypes, transport, flags)
    """Audit the class label of every image-text pair.

    Parameters
    ----------
    image_feats : ndarray, shape (n, d_img)
        Image features or embeddings (any width).
    text_feats : ndarray, shape (n, d_txt)
        Text features or embeddings; ``d_txt`` may differ from ``d_img``.
    labels : sequence, shape (n,)
        Given class labels of any hashable type. ``None``, NaN and empty strings are
        missing labels (status ``"missing_label"``, not an error).
    valid : ndarray of bool, shape (n,), optional
        Rows that may be scored (e.g. pair-audit status ``ok``); others are
        ``"not_scored"``. Rows with non-finite features are never scored.
    groups : ndarray of int, shape (n,), optional
        Rows that share a group (e.g. several captions of one image) are kept in the
        same cross-fitting fold, so that no row's evidence comes from a head that was
        trained on its own image. Default: every row its own group.
    classes : sequence, optional
        The allowed classes, in index order. Labels outside it get status
        ``"unknown_label"``. Default: the sorted distinct given labels.
    method : {"uot", "heads"}
        ``"uot"``: cross-fitted heads and curriculum partial OT (see module doc).
        ``"heads"``: cross-fitted heads trained once on the given labels; the posterior
        is the product of the modality posteriors (an ablation, no transport).
    rounds : int
        Curriculum rounds after the warm-up round (heads retrained each round).
    mass_start, mass_end : float
        Transported mass of the first and last curriculum round, in (0, 1]; it grows
        linearly in between. The final scoring plan always moves the full mass.
    n_folds : int
        Cross-fitting folds (>= 2): each row's evidence comes from heads trained on the
        other folds.
    reg : float
        Entropic regularisation of the scoring transport; 1.0 makes the plan rows Bayes
        posteriors under the cost's log-likelihoods.
    select_reg : float
        Entropic regularisation of the curriculum's partial plans. Smaller = sharper
        selection of the most certain rows and harder pseudo-labels (0.2 measured best
        on the Wikipedia benchmark; 1.0 is gentler and slightly better at <= 20 % noise,
        clearly worse at >= 40 %).
    em_steps, final_em_steps : int
        EM updates of the noise transition ``T`` per round / after the last round, with
        the heads fixed (``T`` starts from the label-free posterior: a cautious start
        that does not assume the labels are mostly right).
    calibrate : {"likelihood", "targets"}
        How the two heads' out-of-fold log-probabilities are weighted (one temperature
        per modality, 0 = ignore it): ``"likelihood"`` maximises the likelihood of the
        given labels under the noise model, ``sum_i log sum_k p(k | x_i) T[k, y_i]``;
        ``"targets"`` fits each head to its training targets.
    prior_em : float
        In [0, 1]. The transport's class marginal is ``(1 - prior_em) * label
        frequencies + prior_em * EM estimate of the true class prior`` (Saerens et al.,
        2002). 0 = the label frequencies as given; noise that moves mass between classes
        biases them, and 0.25 fixed that on small separable data without hurting the
        Wikipedia benchmark (1.0 did hurt it: weak features let the prior drift).
    min_class_size : int
        Classes with fewer audited rows are set aside (their rows ``"not_scored"``,
        with a warning).
    seed : int, Generator or None
        Fold assignment and head initialisation.
    device : str
        Torch device of the heads (``"cpu"`` is fast enough: the heads are small).
    progress : callable, optional
        ``progress(stage, done, total)``.
    **options
        Head settings (see ``_HeadConfig``): ``head`` ("linear" | "mlp"), ``dim``,
        ``hidden``, ``steps`` (warm-up Adam steps), ``round_steps`` (per curriculum
        round, warm-started), ``lr``, ``weight_decay``, ``cosine``, ``scale``,
        ``nce_scale``, ``relation``, ``relation_method`` ("nce" | "ot"),
        ``relation_reg``, ``batch``, ``dropout``, ``shared_prototypes``.

    Returns
    -------
    LabelAudit

    Raises
    ------
    LabelAuditError
        Fewer than two classes with ``min_class_size`` rows.
    ConfigError
        Unknown method or option, shapes that do not match, settings out of range.
    """
    if method not in LABEL_METHODS:
        raise ConfigError(
            f"Unknown method {method!r} for the label audit: expected one of "
            f"{', '.join(LABEL_METHODS)}."
        )
    if not (0.0 < mass_start <= 1.0 and 0.0 < mass_end <= 1.0 and mass_start <= mass_end):
        raise ConfigError(
            f"mass_start and mass_end must satisfy 0 < mass_start <= mass_end <= 1, got "
            f"{mass_start} and {mass_end}."
        )
    if calibrate not in _CALIBRATIONS:
        raise ConfigError(
            f"Unknown calibrate {calibrate!r}: expected one of {', '.join(_CALIBRATIONS)}."
        )
    if (
        n_folds < 2
        or rounds < 0
        or reg <= 0
        or select_reg <= 0
        or min_class_size < 1
        or em_steps < 1
        or final_em_steps < 1
        or not 0.0 <= prior_em <= 1.0
    ):
        raise ConfigError(
            "need n_folds >= 2, rounds >= 0, reg > 0, select_reg > 0, em_steps >= 1, "
            "final_em_steps >= 1, 0 <= prior_em <= 1 and min_class_size >= 1; got "
            f"n_folds={n_folds}, rounds={rounds}, reg={reg}, select_reg={select_reg}, "
            f"em_steps={em_steps}, final_em_steps={final_em_steps}, prior_em={prior_em}, "
            f"min_class_size={min_class_size}."
        )
    cfg = _head_config(**options)
    dev = resolve_device(device)
    rng = check_random_state(seed)
    xv = _features(image_feats, "image_feats", None)
    n = xv.shape[0]
    xt = _features(text_feats, "text_feats", n)
    warn: list[str] = []
    usable = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool).copy()
    if usable.shape != (n,):
        raise ConfigError(f"valid must be a boolean array of shape ({n},), got {usable.shape}.")
    finite = np.isfinite(xv).all(1) & np.isfinite(xt).all(1)
    if (usable & ~finite).any():
        bad = np.flatnonzero(usable & ~finite)
        warn.append(
            f"{len(bad)} row(s) have non-finite features (rows {', '.join(map(str, bad[:5]))}"
            f"{', ...' if len(bad) > 5 else ''}); they are not scored."
        )
    usable &= finite
    y, status, cls = _encode_labels(labels, n, usable, classes, min_class_size, warn)
    for w in warn:
        warnings.warn(w, stacklevel=2)

    k = len(cls)
    ok = np.flatnonzero(y >= 0)
    others = np.flatnonzero(usable & (status != "not_scored") & (y < 0))
    yo = y[ok]
    n_ok = len(ok)
    counts = np.bincount(yo, minlength=k).astype(np.float64)
    active = counts > 0  # classes with audited members; others get no mass
    n_folds_eff = int(min(n_folds, counts[active].min()))
    if n_folds_eff < n_folds:
        logger.info(
            "label audit: %d folds (smallest class has %d rows)",
            n_folds_eff,
            int(counts[active].min()),
        )
    n_folds_eff = max(n_folds_eff, 2)

    mv, sv = _standardize(xv, ok)
    mt, st = _standardize(xt, ok)
    zv, zt = (xv - mv) / sv, (xt - mt) / st
    zv_ok, zt_ok = zv[ok], zt[ok]
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ConfigError(f"groups must have shape ({n},), got {groups.shape}.")
    fold = _folds(yo, n_folds_eff, rng, None if groups is None else groups[ok])
    onehot = np.zeros((n_ok, k))
    onehot[np.arange(n_ok), yo] = 1.0

    total_steps = (1 + (rounds if method == "uot" else 0)) * n_folds_eff + 1
    done = 0

    def tick(stage: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(stage, done, total_steps)

    fold_modules: list[Any] = [None] * n_folds_eff

    def crossfit(targets: np.ndarray, weights: np.ndarray, stage: str):
        lv = np.zeros((n_ok, k))
        lt = np.zeros((n_ok, k))
        for f in range(n_folds_eff):
            tr, te = fold != f, fold == f
            warm = fold_modules[f] is not None
            mod = _train_module(
                zv_ok[tr],
                zt_ok[tr],
                targets[tr],
                weights[tr],
                cfg,
                rng,
                dev,
                module=fold_modules[f],
                steps=cfg.round_steps if warm else None,
            )
            fold_modules[f] = mod
            heads = _on_standardized(mod, cls, zv.shape[1], zt.shape[1])
            lv[te], lt[te] = heads.predict_log_proba(zv_ok[te], zt_ok[te])
            tick(stage)
        return lv, lt

    a = np.full(n_ok, 1.0 / n_ok)
    b = counts / n_ok
    # columns of classes with no audited member get (almost) no mass
    b = np.where(active, b, 1e-12)
    b = b / b.sum()

    b_labels = b.copy()
    # warm-up: heads trained on the given labels
    targets, weights = onehot, np.ones(n_ok)
    lv, lt = crossfit(targets, weights, "label audit: warm-up")
    temps = _temperatures(lv, lt, targets, weights)
    history: list[dict[str, Any]] = []
    if method == "uot":
        # noise transition T[true, given], first estimated from the label-free posterior
        # (one EM step from "labels carry no information"): a cautious start
        cost = -(temps[0] * lv + temps[1] * lt)
        post = _rows(_partial_transport(cost, a, b, 1.0, reg=reg))
        trans = _transition(post, yo, k)
        for r in range(rounds):
            frac = r / max(rounds - 1, 1)
            mass = mass_start + (mass_end - mass_start) * frac
            cost = _cost(lv, lt, temps, trans, yo)
            plan = _partial_transport(cost, a, b, mass, reg=select_reg)
            row = plan.sum(1)
            targets = plan / np.maximum(row[:, None], 1e-300)
            weights = np.clip(row / a, 0.0, 1.0)
            post, trans, b = _em(lv, lt, temps, trans, yo, a, b, reg, em_steps, prior_em, b_labels)
            history.append(
                {
                    "round": r + 1,
                    "mass": float(mass),
                    "selected": float((weights > 0.5).mean()),
                    "temperatures": [round(t, 3) for t in temps],
                    "estimated_noise": float(1.0 - post[np.arange(n_ok), yo].mean()),
                }
            )
            lv, lt = crossfit(targets, weights, f"label audit: round {r + 1}/{rounds}")
            if calibrate == "targets":
                temps = _temperatures(lv, lt, targets, weights)
            else:
                temps = _likelihood_temperatures(lv, lt, trans, yo, b)
        post, trans, b = _em(
            lv, lt, temps, trans, yo, a, b, reg, final_em_steps, prior_em, b_labels
        )
        post = _rows(_partial_transport(_cost(lv, lt, temps, trans, yo), a, b, 1.0, reg=reg))
    else:
        # naive-Bayes product of the modality posteriors, no label evidence, no transport
        logb = np.log(np.maximum(b, 1e-300))
        post = np.exp(_log_softmax(temps[0] * lv + temps[1] * lt - logb[None, :]))
        trans = _transition(post, yo, k)

    # final heads on all audited rows for rows that were not audited (missing/unknown)
    post_other = np.zeros((0, k))
    if len(others):
        final_targets = post if method == "uot" else onehot
        mod = _train_module(zv_ok, zt_ok, final_targets, np.ones(n_ok), cfg, rng, dev)
        heads = _on_standardized(mod, cls, zv.shape[1], zt.shape[1])
        pv, pt = heads.predict_log_proba(zv[others], zt[others])
        # same model as the EM's temperature fit: softmax(t_v log p_v + t_t log p_t + log b)
        ev = temps[0] * pv + temps[1] * pt + np.log(np.maximum(b, 1e-300))[None, :]
        post_other = np.exp(_log_softmax(ev + np.where(active, 0.0, -np.inf)[None, :]))
    tick("label audit: scoring")

    return _assemble(
        n,
        status,
        y,
        ok,
        others,
        post,
        post_other,
        cls,
        labels,
        warn,
        history,
        trans,
        dict(
            method=method,
            rounds=rounds,
            mass_start=mass_start,
            mass_end=mass_end,
            n_folds=n_folds_eff,
            reg=reg,
            select_reg=select_reg,
            temperatures=list(temps),
            min_class_size=min_class_size,
            device=dev,
            **cfg.__dict__,
        ),
    )


_TEMPS = np.concatenate([np.linspace(0.05, 1.0, 20), np.geomspace(1.1, 10.0, 24)])


def _temperature(logp: np.ndarray, target: np.ndarray, weight: np.ndarray) -> float:
    """Scalar t minimising the weighted cross-entropy of softmax(t * logp) to the targets."""
    best, best_t = np.inf, 1.0
    for t in _TEMPS:
        loss = -(weight * (target * _log_softmax(t * logp)).sum(1)).sum()
        if loss < best:
            best, best_t = loss, float(t)
    return best_t


def _temperatures(
    lv: np.ndarray, lt: np.ndarray, target: np.ndarray, weight: np.ndarray
) -> tuple[float, float]:
    """Per-modality calibration of the out-of-fold head log-probabilities."""
    return _temperature(lv, target, weight), _temperature(lt, target, weight)


_LTEMPS = np.array([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 5.0, 8.0])


def _likelihood_temperatures(
    lv: np.ndarray, lt: np.ndarray, trans: np.ndarray, y: np.ndarray, b: np.ndarray
) -> tuple[float, float]:
    """(t_v, t_t) maximising the likelihood of the given labels, sum_i log sum_k p_ik T[k, y_i]."""
    t_y = trans[:, y].T
    logb = np.log(np.maximum(b, 1e-300))[None, :]
    best, temps = -np.inf, (1.0, 1.0)
    for tv in _LTEMPS:
        for tt in _LTEMPS:
            p = np.exp(_log_softmax(tv * lv + tt * lt + logb))
            ll = np.log(np.maximum((p * t_y).sum(1), 1e-300)).sum()
            if ll > best:
                best, temps = ll, (float(tv), float(tt))
    return temps


def _cost(
    lv: np.ndarray, lt: np.ndarray, temps: tuple[float, float], trans: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Cross-modal consistent cost (n, K): -t_v log p_v - t_t log p_t - log T[k, y_i]."""
    return -(temps[0] * lv + temps[1] * lt) - np.log(np.maximum(trans[:, y].T, 1e-300))


def _em(lv, lt, temps, trans, y, a, b, reg, steps, prior_em=0.0, b0=None):
    """``steps`` EM updates of T (and of the class prior) with the heads fixed.

    Returns (posterior (n, K), T (K, K), class prior (K,)). The prior update is the
    EM of Saerens et al. (2002): the mean prior-adjusted posterior, iterated; the
    transport then uses it as its class marginal.
    """
    post = None
    b0 = b if b0 is None else b0
    for _ in range(max(steps, 1)):
        cost = _cost(lv, lt, temps, trans, y)
        if prior_em > 0:
            keep = b0 > 1e-9
            est = b
            for _ in range(20):
                q = np.exp(_log_softmax(-cost + np.log(np.maximum(est, 1e-300))[None, :]))
                est = np.where(keep, np.maximum(q.mean(0), 1e-6), b0)
                est = est / est.sum()
            b = (1.0 - prior_em) * b0 + prior_em * est
        post = _rows(_partial_transport(cost, a, b, 1.0, reg=reg))
        trans = _transition(post, y, trans.shape[0])
    return post, trans, b


def _rows(plan: np.ndarray) -> np.ndarray:
    return plan / np.maximum(plan.sum(1, keepdims=True), 1e-300)


def _transition(post: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Row-stochastic T[true, given] from posteriors (n, K) and given labels (n,)."""
    joint = np.zeros((k, k))
    np.add.at(joint.T, y, post)  # joint[true, given] += post[i, true]
    joint += 1e-3
    return joint / joint.sum(1, keepdims=True)


def _assemble(
    n, status, y, ok, others, post, post_other, cls, labels, warn, history, trans, settings
) -> LabelAudit:
    k = len(cls)
    given = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
    proba = np.full((n, k), np.nan)
    proba[ok] = post
    proba[others] = post_other
    score = np.full(n, np.nan)
    score[ok] = post[np.arange(len(ok)), y[ok]]
    sugg_idx = np.full(n, -1)
    sugg_idx[ok] = post.argmax(1)
    sugg_idx[others] = post_other.argmax(1) if len(others) else []
    issue = np.zeros(n, dtype=bool)
    issue[ok] = sugg_idx[ok] != y[ok]
    conf = np.full(n, np.nan)
    scored = sugg_idx >= 0
    conf[scored] = proba[np.flatnonzero(scored), sugg_idx[scored]]
    suggested = np.empty(n, dtype=object)
    for i in range(n):
        if sugg_idx[i] < 0:
            suggested[i] = None
        elif status[i] == "ok" and not issue[i]:
            suggested[i] = given[i]
        else:
            suggested[i] = cls[sugg_idx[i]]
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y[ok], sugg_idx[ok]), 1)
    status_counts = {s: int((status == s).sum()) for s in LABEL_STATUSES if (status == s).any()}
    summary = {
        "n_classes": k,
        "n_audited": len(ok),
        "n_label_issues": int(issue.sum()),
        "estimated_label_noise": float(1.0 - score[ok].mean()) if len(ok) else float("nan"),
        "status_counts": status_counts,
        "confusion": {
            "classes": list(cls),
            "given": list(cls),
            "suggested": list(cls),
            "counts": confusion.tolist(),
        },
        "noise_transition": np.round(trans, 4).tolist(),
        "curriculum": history,
        "settings": settings,
        "warnings": list(warn),
    }
    return LabelAudit(
        label_status=status.astype(str).astype(object),
        label_score=score,
        is_label_issue=issue,
        suggested_label=suggested,
        label_confidence=conf,
        classes=list(cls),
        proba=proba,
        summary=summary,
    )
