"""A mismatch detector learnt from planted mismatches (positive-unlabelled learning).

A pair statistic (:func:`pmpclean.score.pair_scores`) compares a pair's cosine with its
neighbourhood in one fixed way. Hard mismatches (the caption of a similar photo) differ
from true pairs in several small ways at once: the caption's best other image fits it
a little better than its own, that image's own caption fits it less well, exchanging
the two captions raises both pairs' similarity, and so on. This module measures those
*neighbourhood features* of every pair (:func:`pair_features`) and learns how to weigh
them on the data itself:

1. Known mismatches are planted in a copy of the dataset: pairs of confident rows whose
   images are similar (:func:`pmpclean.score.plant_pairs`, ``"similar"`` kind) exchange
   their captions. Each planted row's features are computed by the same function, on
   the same kind of data, as the real rows' (nothing about the plants is special-cased).
2. A small classifier separates the planted rows (labelled positives) from the copy's
   other rows (unlabelled: clean pairs and the data's own mismatches). Under the
   selected-completely-at-random assumption its output is a monotone function of the
   probability of a mismatch (Elkan and Noto, KDD 2008), so it ranks rows as that
   probability does.
3. The classifier scores the real rows of the original data, cross-fitted: the rows of
   each fold are scored by a model that never saw them among the unlabelled rows.

The score is a *ranking* (higher = more likely a true pair, unbounded), like
:attr:`pmpclean.score.PairScores.score`; it is not a calibrated probability.

Experimental: the scan does not use it. On Flickr8k-MiniLM hard noise it ranks below the
``margin`` statistic and it loses on random shuffles, and even a classifier of the same
features trained on the *true* labels gains only 0.03-0.05 AUROC over ``csls``
(``benchmarks/results/hard_auroc.md``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ._utils import check_random_state
from .errors import ConfigError
from .score import PLANT_KINDS, pair_scores, plant_pairs

__all__ = ["FEATURE_NAMES", "DETECTOR_MODELS", "PuScores", "pair_features", "pu_scores"]

#: Columns of :func:`pair_features`, in order.
FEATURE_NAMES = (
    "cosine",  # own pair's cosine
    "best_caption",  # image's best other caption (cosine)
    "second_caption",  # image's second-best other caption
    "best_image",  # caption's best other image
    "caption_mean",  # mean cosine of the image's k nearest other captions
    "image_mean",  # mean cosine of the caption's k nearest other images
    "caption_rank",  # other captions (of k) that beat the own caption
    "image_rank",  # other images (of k) that beat the own image
    "csls",  # 2 cosine - caption_mean - image_mean
    "margin",  # cosine - (best_caption + best_image) / 2
    "image_image",  # cosine of the image to the best other image of the caption
    "text_text",  # cosine of the caption to the best other caption of the image
    "alt_image_own",  # own pair cosine of the row holding the best other image
    "alt_caption_own",  # own pair cosine of the row holding the best other caption
    "steal_image",  # caption fits the alt image better than that row's caption by this
    "steal_caption",  # image fits the alt caption better than that row's image by this
    "swap_image",  # gain in summed cosine when captions are exchanged with the alt-image row
    "swap_caption",  # the same with the alt-caption row
    "cycle",  # 1 when the caption's best other image's best other caption is this row's
)

#: Classifiers of :func:`pu_scores`.
DETECTOR_MODELS = ("logistic", "boosting")


@dataclass
class PuScores:
    """Per-row detector output (arrays of shape (n,); NaN for rows not scored).

    Attributes
    ----------
    score : ndarray, float64
        Higher = more likely a true pair (unbounded): minus the cross-fitted log-odds
        that the row is a planted mismatch rather than a row of the data.
    features : ndarray, shape (n, len(FEATURE_NAMES)), float64
        :func:`pair_features` of the real rows.
    planted_auroc : float
        Cross-fitted AUROC of the planted rows against the copy's other rows: how well
        the detector tells planted mismatches from the data (0.5 = not at all).
    info : dict
        Number of planted rows, folds, model, kinds.
    """

    score: np.ndarray
    features: np.ndarray
    planted_auroc: float
    info: dict = field(default_factory=dict)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 1e-12, n, 1.0)


def pair_features(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    *,
    image_group: np.ndarray | None = None,
    text_group: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    k: int = 10,
    seed: int | None = 0,
) -> np.ndarray:
    """Neighbourhood features of every pair, from one neighbour search per side.

    Parameters
    ----------
    image_emb, text_emb : ndarray, shape (n, d)
        Row-aligned embeddings (normalised here).
    image_group, text_group, valid
        As in :func:`pmpclean.score.pair_scores`.
    k : int
        Neighbourhood size of the mean and rank features.
    seed : int or None
        Seed of the approximate neighbour search (large data only).

    Returns
    -------
    ndarray, shape (n, len(FEATURE_NAMES)), float64
        Columns as :data:`FEATURE_NAMES`; NaN rows for rows not scored, NaN entries
        where a neighbour is missing.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ConfigError(f"k must be an integer >= 2 (neighbours per side), got {k!r}.")
    ps = pair_scores(
        image_emb,
        text_emb,
        image_group=image_group,
        text_group=text_group,
        valid=valid,
        k=int(k),
        method="csls",
        seed=seed,
    )
    n = ps.score.size
    img, txt = _unit(image_emb), _unit(text_emb)
    s = ps.similarity
    ai, ac = ps.alt_image_row, ps.alt_caption_row  # rows holding the alt image / caption
    has_i, has_c = ai >= 0, ac >= 0
    ai0, ac0 = np.maximum(ai, 0), np.maximum(ac, 0)

    def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.einsum("nd,nd->n", a, b).astype(np.float64)

    def only(mask: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.where(mask, x, np.nan)

    image_image = only(has_i, dot(img, img[ai0]))
    text_text = only(has_c, dot(txt, txt[ac0]))
    alt_image_own = only(has_i, s[ai0])
    alt_caption_own = only(has_c, s[ac0])
    # the alt image with this caption, and this image with the alt caption
    steal_image = ps.alt_image_similarity - alt_image_own
    steal_caption = ps.alt_caption_similarity - alt_caption_own
    # exchanging captions with the alt-image row: (img, txt[ai]) and (img[ai], txt)
    swap_image = only(has_i, dot(img, txt[ai0])) + ps.alt_image_similarity - s - alt_image_own
    swap_caption = ps.alt_caption_similarity + only(has_c, dot(img[ac0], txt)) - s - alt_caption_own
    # cycle: the caption's best other image prefers (among other captions) this caption
    tg = np.arange(n) if text_group is None else np.unique(text_group, return_inverse=True)[1]
    back = ac[ai0]
    cycle = only(has_i, (back >= 0) & (tg.ravel()[np.maximum(back, 0)] == tg.ravel()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        best_alt = np.nanmean(np.stack([ps.alt_caption_similarity, ps.alt_image_similarity]), 0)
    cols = [
        s,
        ps.alt_caption_similarity,
        ps.second_caption_similarity,
        ps.alt_image_similarity,
        ps.image_alt,
        ps.text_alt,
        ps.image_rank,
        ps.text_rank,
        ps.score,
        s - best_alt,
        image_image,
        text_text,
        alt_image_own,
        alt_caption_own,
        steal_image,
        steal_caption,
        swap_image,
        swap_caption,
        cycle.astype(np.float64),
    ]
    out = np.stack(cols, axis=1).astype(np.float64)
    out[~ps.valid] = np.nan
    return out


def _classifier(model: str, seed: int):
    if model == "logistic":
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(
            SimpleImputer(strategy="median"),
            StandardScaler(),
            LogisticRegression(C=1.0, max_iter=2000),
        )
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=200,
        learning_rate=0.05,
        max_leaf_nodes=15,
        min_samples_leaf=40,
        l2_regularization=1.0,
        random_state=seed,
    )


def _swaps(
    plants: dict[str, tuple[np.ndarray, np.ndarray]],
    kinds: tuple[str, ...],
    text_codes: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (row, row) caption exchanges, each source given one kind of ``kinds``.

    :func:`pmpclean.score.plant_pairs` gives every kind the same sources; each source
    keeps the partner of one kind drawn at random, so that the kinds share the plants.
    """
    partner: dict[int, list[int]] = {}
    for kd in kinds:
        for a, b in zip(*plants[kd], strict=True):
            partner.setdefault(int(a), []).append(int(b))
    used: set[int] = set()
    keep_a, keep_b = [], []
    sources = list(partner)
    for i in rng.permutation(len(sources)).tolist():
        a = sources[i]
        options = partner[a]
        b = options[int(rng.integers(len(options)))]
        if a in used or b in used or text_codes[a] == text_codes[b]:
            continue
        used.update((a, b))
        keep_a.append(a)
        keep_b.append(b)
    return np.array(keep_a, dtype=np.int64), np.array(keep_b, dtype=np.int64)


def pu_scores(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    *,
    image_group: np.ndarray | None = None,
    text_group: np.ndarray | None = None,
    valid: np.ndarray | None = None,
    kinds: tuple[str, ...] = ("similar",),
    plant_rate: float = 0.1,
    model: str = "logistic",
    n_folds: int = 5,
    k: int = 10,
    seed: int | None = 0,
) -> PuScores:
    """Rank pairs with a detector trained on planted mismatches against the data's rows.

    Parameters
    ----------
    image_emb, text_emb : ndarray, shape (n, d)
        Row-aligned embeddings.
    image_group, text_group, valid
        As in :func:`pmpclean.score.pair_scores`.
    kinds : tuple of str
        Plant kinds of :func:`pmpclean.score.plant_pairs` used as positives.
    plant_rate : float
        Rows of the copy that receive a planted caption, at most; in (0, 0.5].
    model : {"logistic", "boosting"}
        Logistic regression on standardised features, or small gradient-boosted trees.
    n_folds : int
        Folds of the cross-fitting (>= 2).
    k : int
        Neighbourhood size of :func:`pair_features`.
    seed : int or None
        Randomness of the plants, the folds and the classifier.

    Returns
    -------
    PuScores
        ``score`` higher = more likely a true pair (unbounded), NaN for rows not scored.

    Raises
    ------
    ConfigError
        For an unknown model or kind, a rate outside (0, 0.5], fewer than 2 folds, or
        data too small to plant (fewer than 20 planted rows).
    """
    _check(model, kinds, plant_rate, n_folds)
    rng = check_random_state(seed)
    int_seed = int(rng.integers(2**31 - 1))
    shared = {"image_group": image_group, "valid": valid, "k": k, "seed": int_seed}
    feats = pair_features(image_emb, text_emb, text_group=text_group, **shared)
    scored = ~np.all(np.isnan(feats), axis=1)
    perm = _planted_copy(image_emb, image_group, text_group, scored, kinds, plant_rate, rng)
    copy_feats = pair_features(
        image_emb,
        np.asarray(text_emb)[perm],
        text_group=None if text_group is None else np.asarray(text_group)[perm],
        **shared,
    )
    planted = perm != np.arange(perm.size)
    train_ok = scored & ~np.all(np.isnan(copy_feats), axis=1)
    fold = rng.integers(0, n_folds, perm.size)
    logit, copy_out = _cross_fit(
        feats, copy_feats, planted, scored, train_ok, fold, model, int_seed
    )
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(copy_out)
    auroc = float(roc_auc_score(planted[ok], copy_out[ok])) if ok.any() else float("nan")
    info = {
        "n_planted": int(planted.sum()),
        "kinds": tuple(kinds),
        "model": model,
        "n_folds": int(n_folds),
        "k": int(k),
    }
    return PuScores(score=-logit, features=feats, planted_auroc=auroc, info=info)


def _check(model: str, kinds: tuple[str, ...], plant_rate: float, n_folds: int) -> None:
    if model not in DETECTOR_MODELS:
        raise ConfigError(
            f"Unknown model {model!r} for the detector: expected one of "
            f"{', '.join(DETECTOR_MODELS)}."
        )
    bad = [kd for kd in kinds if kd not in PLANT_KINDS]
    if bad or not kinds:
        raise ConfigError(
            f"kinds must be a non-empty subset of {', '.join(PLANT_KINDS)}, got {kinds!r}."
        )
    if not (0.0 < float(plant_rate) <= 0.5):
        raise ConfigError(f"plant_rate must be in (0, 0.5], got {plant_rate!r}.")
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ConfigError(f"n_folds must be an integer >= 2, got {n_folds!r}.")


def _planted_copy(
    image_emb: np.ndarray,
    image_group: np.ndarray | None,
    text_group: np.ndarray | None,
    scored: np.ndarray,
    kinds: tuple[str, ...],
    plant_rate: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The caption permutation of the planted copy: exchanges between plant partners."""
    n = scored.size
    tcodes = (
        np.arange(n)
        if text_group is None
        else np.unique(np.asarray(text_group), return_inverse=True)[1].ravel()
    )
    # Sources are drawn from every scored row (a constant score makes plant_pairs' pool
    # the whole data): an exchange plants a mismatch whatever the row held before, and
    # sources from the confident half only would teach the detector what confident rows
    # look like rather than what a mismatch looks like. Half the planted rows are
    # sources (an exchange plants two rows).
    plants = plant_pairs(
        np.where(scored, 0.0, np.nan),
        image_emb,
        image_group=image_group,
        n_plants=max(1, int(plant_rate * scored.sum() / 2)),
        seed=rng,
    )
    a, b = _swaps(plants, tuple(kinds), tcodes, rng)
    if 2 * a.size < 20:
        raise ConfigError(
            f"only {2 * a.size} rows could be planted (need 20): the detector needs more "
            "scored rows or distinct images; use a pair statistic instead."
        )
    perm = np.arange(n)
    perm[a], perm[b] = b, a
    return perm


def _cross_fit(
    feats: np.ndarray,
    copy_feats: np.ndarray,
    planted: np.ndarray,
    scored: np.ndarray,
    train_ok: np.ndarray,
    fold: np.ndarray,
    model: str,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-odds of "planted" for the real rows and the copy's rows, fold by fold.

    The model of fold ``f`` is trained on the copy's rows outside ``f`` and scores the
    rows of ``f`` only, so that no real row is scored by a model that saw it.
    """
    n = feats.shape[0]
    real, copy = np.full(n, np.nan), np.full(n, np.nan)
    for f in np.unique(fold).tolist():
        tr = train_ok & (fold != f)
        clf = _classifier(model, seed + f)
        clf.fit(copy_feats[tr], planted[tr])
        te, ct = scored & (fold == f), train_ok & (fold == f)
        if te.any():
            real[te] = clf.decision_function(feats[te])
        if ct.any():
            copy[ct] = clf.decision_function(copy_feats[ct])
    return real, copy
