"""MAUVE: how close the synthetic text distribution Q is to the real one P (Pillutla et al., NeurIPS 2021,
"MAUVE: Measuring the Gap Between Neural Text and Human Text using Divergence Frontiers").

Written from the paper's description (the ``mauve-text`` package is GPLv3 and is not used or copied).

Steps, for features of real (p) and synthetic (q) texts:

1. L2-normalise every feature row.
2. PCA fitted on the union of p and q, keeping the fewest components whose explained variance reaches
   ``pca_variance`` (0.9).
3. k-means on the union (seeded), with ``max(2, round(n / 10))`` clusters, n = number of points in the
   union. (The reference package's "auto" uses a tenth of the smaller set instead; pass
   ``num_clusters`` to match it.)
4. P and Q become histograms of cluster assignments (normalised counts).
5. Divergence curve: for each lambda in a grid over (0, 1), with the mixture R = lambda P + (1 - lambda) Q,
   the point (x, y) = (exp(-c KL(Q || R)), exp(-c KL(P || R))), scaling c = 5.
6. MAUVE = area under the curve, closed by the two limit points (0, 1) (lambda -> 1, R -> P) and
   (1, 0) (lambda -> 0, R -> Q), as the paper does. The area is taken with the trapezoidal rule along
   decreasing lambda, along which x rises and y falls (KL(P||R) falls and KL(Q||R) rises with lambda,
   by convexity of KL), so the curve is a monotone frontier.

MAUVE is 1 for P = Q (every point is (1, 1); the closed curve bounds the unit square). For disjoint
supports x = (1 - lambda)^c and y = lambda^c, and the exact area is (c!)^2 / (2c)!, 1/252 for c = 5: near
0. The default grid has 25 lambdas, as the reference implementation, so values are comparable to it;
published MAUVE numbers also depend on the featuriser (the paper uses GPT-2 large; ghostdp uses MiniLM).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


def _as_distribution(h: np.ndarray, name: str) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D histogram; got shape {h.shape}.")
    if np.any(h < 0) or not np.all(np.isfinite(h)):
        raise ValueError(f"{name} must be finite and non-negative; got {h}.")
    total = h.sum()
    if total <= 0:
        raise ValueError(f"{name} is all zeros: no points were assigned to any bin.")
    return h / total


def _kl(a: np.ndarray, b: np.ndarray) -> float:
    """KL(a || b) = sum_i a_i log(a_i / b_i), with 0 log 0 = 0 (b_i > 0 wherever a_i > 0 here)."""
    nz = a > 0
    return float(np.sum(a[nz] * np.log(a[nz] / b[nz])))


def default_lambdas(num: int = 25) -> np.ndarray:
    """``num`` mixture weights evenly spaced in [1e-6, 1 - 1e-6] (open interval: both KLs finite)."""
    if num < 1:
        raise ValueError(f"default_lambdas(num={num}): need at least one lambda.")
    return np.linspace(1e-6, 1 - 1e-6, num)


def divergence_curve(
    p_hist: np.ndarray, q_hist: np.ndarray, *, scaling: float = 5.0, lambdas: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The divergence frontier ``(x, y)``, ordered by decreasing lambda, with the endpoints added.

    x_lambda = exp(-c KL(Q || R_lambda)), y_lambda = exp(-c KL(P || R_lambda)), R_lambda = lambda P +
    (1 - lambda) Q; the first point is (0, 1) and the last (1, 0).
    """
    p = _as_distribution(p_hist, "p_hist")
    q = _as_distribution(q_hist, "q_hist")
    if p.shape != q.shape:
        raise ValueError(f"p_hist and q_hist need the same bins; got {p.shape} and {q.shape}.")
    if scaling <= 0:
        raise ValueError(f"scaling={scaling}: need c > 0.")
    lam = default_lambdas() if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    if lam.ndim != 1 or np.any(lam <= 0) or np.any(lam >= 1):
        raise ValueError(f"lambdas must be a 1-D array inside the open interval (0, 1); got {lam}.")
    lam = np.sort(lam)[::-1]  # decreasing lambda: x rises, y falls
    xs, ys = [0.0], [1.0]
    for lmb in lam:
        r = lmb * p + (1 - lmb) * q
        xs.append(float(np.exp(-scaling * _kl(q, r))))
        ys.append(float(np.exp(-scaling * _kl(p, r))))
    xs.append(1.0)
    ys.append(0.0)
    return np.asarray(xs), np.asarray(ys)


def mauve_from_histograms(
    p_hist: np.ndarray, q_hist: np.ndarray, *, scaling: float = 5.0, lambdas: np.ndarray | None = None
) -> float:
    """MAUVE from two histograms over the same bins: the trapezoidal area under :func:`divergence_curve`."""
    x, y = divergence_curve(p_hist, q_hist, scaling=scaling, lambdas=lambdas)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


@dataclass(frozen=True)
class MauveConfig:
    """Options of :func:`compute_mauve` (defaults follow the paper).

    Args:
        pca_variance: fraction of explained variance the PCA keeps, in (0, 1].
        num_clusters: k-means clusters; None means ``max(2, round(n / 10))`` with n the union size.
        scaling: the constant c in exp(-c KL).
        num_lambdas: size of the lambda grid of the divergence curve.
        kmeans_n_init: k-means restarts (best inertia kept).
        kmeans_max_iter: k-means iteration cap per restart.
        seed: seeds PCA (randomised solvers) and k-means.
    """

    pca_variance: float = 0.9
    num_clusters: int | None = None
    scaling: float = 5.0
    num_lambdas: int = 25
    kmeans_n_init: int = 5
    kmeans_max_iter: int = 500
    seed: int = 25

    def __post_init__(self) -> None:
        if not 0 < self.pca_variance <= 1:
            raise ValueError(f"MauveConfig.pca_variance={self.pca_variance}: need a fraction in (0, 1].")
        if self.num_clusters is not None and self.num_clusters < 2:
            raise ValueError(f"MauveConfig.num_clusters={self.num_clusters}: need >= 2 (or None for n/10).")
        if self.scaling <= 0:
            raise ValueError(f"MauveConfig.scaling={self.scaling}: need > 0.")
        if self.num_lambdas < 1:
            raise ValueError(f"MauveConfig.num_lambdas={self.num_lambdas}: need >= 1.")


@dataclass(frozen=True, eq=False)
class MauveResult:
    """MAUVE and what it was computed from (the curve and histograms, for plots and debugging)."""

    mauve: float
    curve_x: np.ndarray
    curve_y: np.ndarray
    p_hist: np.ndarray
    q_hist: np.ndarray
    num_clusters: int
    num_components: int

    def to_dict(self) -> dict[str, float | int]:
        """The scalar figures, JSON-ready."""
        return {"mauve": self.mauve, "num_clusters": self.num_clusters, "pca_components": self.num_components}


def quantize(
    p_features: np.ndarray, q_features: np.ndarray, config: MauveConfig
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Steps 1-4: ``(p_hist, q_hist, num_clusters, num_components)``, histograms as counts."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    p = np.asarray(p_features, dtype=np.float64)
    q = np.asarray(q_features, dtype=np.float64)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(
            f"compute_mauve needs feature matrices (n_p, d) and (n_q, d); got {p.shape} and {q.shape}."
        )
    if len(p) == 0 or len(q) == 0:
        raise ValueError(f"compute_mauve needs at least one point on each side; got {len(p)} and {len(q)}.")
    union = np.concatenate([p, q])  # (n, d)
    norms = np.linalg.norm(union, axis=1, keepdims=True)
    union = union / np.maximum(norms, 1e-12)
    n = len(union)
    k = config.num_clusters if config.num_clusters is not None else max(2, round(n / 10))
    if k > n:
        raise ValueError(f"MAUVE with {k} clusters needs at least {k} points; got {n}. Lower num_clusters.")
    pca = PCA(n_components=None, svd_solver="full", random_state=config.seed).fit(union)
    cum = np.cumsum(pca.explained_variance_ratio_)
    n_comp = int(min(np.searchsorted(cum, config.pca_variance - 1e-12) + 1, len(cum)))
    reduced = pca.transform(union)[:, :n_comp]  # (n, n_comp)
    logger.info("MAUVE: %d points, %d PCA components, %d clusters", n, n_comp, k)
    km = KMeans(
        n_clusters=k, n_init=config.kmeans_n_init, max_iter=config.kmeans_max_iter, random_state=config.seed
    ).fit(reduced)
    assign = km.labels_
    p_hist = np.bincount(assign[: len(p)], minlength=k).astype(np.float64)
    q_hist = np.bincount(assign[len(p):], minlength=k).astype(np.float64)
    return p_hist, q_hist, k, n_comp


def compute_mauve(
    p_features: np.ndarray, q_features: np.ndarray, config: MauveConfig | None = None
) -> MauveResult:
    """MAUVE between real features ``p_features`` (n_p, d) and synthetic ``q_features`` (n_q, d)."""
    config = config if config is not None else MauveConfig()
    p_hist, q_hist, k, n_comp = quantize(p_features, q_features, config)
    lambdas = default_lambdas(config.num_lambdas)
    x, y = divergence_curve(p_hist, q_hist, scaling=config.scaling, lambdas=lambdas)
    value = mauve_from_histograms(p_hist, q_hist, scaling=config.scaling, lambdas=lambdas)
    return MauveResult(
        mauve=value, curve_x=x, curve_y=y, p_hist=p_hist, q_hist=q_hist, num_clusters=k, num_components=n_comp
    )
