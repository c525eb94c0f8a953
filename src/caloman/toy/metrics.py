"""Distances between a truth sample and a (possibly weighted) generated sample in 2-D.

- ``emd``: exact earth mover's (Wasserstein-1) distance, Euclidean ground metric,
  between subsamples of ``emd_points`` points (``ot.emd2``), the generated
  points carrying their normalised weights. In the data's units.
- ``jsd``: Jensen-Shannon divergence (natural log, in [0, ln 2]) between the
  100 x 100 histograms (probabilities) over the dataset's range, weighted.
- ``emd_paper`` / ``jsd_paper``: the LaSeR scores script's conventions
  (``utils/scores_and_plots.py``): histograms with ``density=True`` (bin values
  are densities, not probabilities), EMD between bin centres with the Euclidean
  ground metric divided by its maximum, JSD summed over the density values. These
  are the numbers comparable with the paper's Table 3 (which used 2M points).
  One difference: the exact EMD between two 100 x 100 histograms (up to 10^4 bins)
  takes minutes per pair on one core, so ``emd_paper`` solves it on a 50 x 50 grid
  (ground metric still divided by the 100 x 100 grid's maximum distance) and
  multiplies by 4, the ratio of the two grids' total density mass (sum of
  densities = 1 / bin area). It differs from the 100 x 100 value by the
  discretisation, well below a bin width (0.2-0.4 in data units).

- ``wasserstein``: the squared 2-Wasserstein distance W2^2 between the same
  kind of subsamples (``emd_points`` truth and generated points, ``ot.emd2``
  with the squared-Euclidean ground cost, any dimension), averaged over
  ``emd_repeats``. In squared data units. The implicit-manifold reference
  (``wasserstein_between_discretized_densities``) instead histograms both
  samples on a 100-bin-per-axis grid and divides the squared cost by its
  maximum over the grid, so its numbers are smaller by about that maximum
  (18 for a [-1.5, 1.5]^2 box) and not directly comparable.

For a dataset on a known manifold (:func:`manifold_metrics`):

- ``manifold_distance``: the mean exact distance of the generated points from the true
  manifold (for the unit circle and sphere | ||x|| - 1 |);
- ``log_density_error``: the mean absolute difference between the method's log density
  on its learned manifold and the true log density on the true one, both w.r.t. the
  manifold's surface measure, at ``LOG_DENSITY_POINTS`` truth points (None for a method
  without an on-manifold density).

Adding a metric is one entry in :data:`METRICS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import ot

from caloman.toy.datasets import Range, ToyDataset

BINS = 100

Metric = Callable[..., float]


def histogram(x: np.ndarray, weights: np.ndarray | None, hist_range: Range, bins: int = BINS,
              density: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D histogram of x (n, 2) over the range: probabilities (sum 1 over the range) or densities."""
    h, xe, ye = np.histogram2d(x[:, 0], x[:, 1], bins=bins, range=hist_range, weights=weights)
    total = h.sum()
    if total <= 0:
        raise ValueError("histogram: no weight inside the histogram range")
    h = h / total
    if density:
        h = h / ((xe[1] - xe[0]) * (ye[1] - ye[0]))
    return h, xe, ye


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """sum p/2 log(p/m) + q/2 log(q/m), m = (p + q)/2, with 0 log 0 = 0."""
    p, q = p.ravel(), q.ravel()
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / m), 0.0) + np.where(q > 0, q * np.log(q / m), 0.0)
    return float(0.5 * terms.sum())


def jsd(truth: np.ndarray, x: np.ndarray, weights: np.ndarray | None, *, hist_range: Range, **_: object) -> float:
    return js_divergence(histogram(truth, None, hist_range)[0], histogram(x, weights, hist_range)[0])


def emd(truth: np.ndarray, x: np.ndarray, weights: np.ndarray | None, *, rng: np.random.Generator,
        emd_points: int = 3000, emd_repeats: int = 1, **_: object) -> float:
    """Exact W1 between ``emd_points`` random truth points and ``emd_points`` random generated
    points, averaged over ``emd_repeats`` independent subsamples (the subsample's noise
    is a few per cent of the value; its bias, the W1 between two finite samples, is
    what the truth row measures)."""
    return float(np.mean([_emd_once(truth, x, weights, rng, emd_points) for _ in range(emd_repeats)]))


def wasserstein(truth: np.ndarray, x: np.ndarray, weights: np.ndarray | None, *, rng: np.random.Generator,
                emd_points: int = 3000, emd_repeats: int = 1, **_: object) -> float:
    """W2^2 (squared-Euclidean cost) between ``emd_points`` truth and generated points, averaged over
    ``emd_repeats`` subsamples; any dimension."""
    return float(np.mean([_emd_once(truth, x, weights, rng, emd_points, "sqeuclidean")
                          for _ in range(emd_repeats)]))


def _emd_once(truth: np.ndarray, x: np.ndarray, weights: np.ndarray | None, rng: np.random.Generator,
              emd_points: int, metric: str = "euclidean") -> float:
    a_idx = rng.choice(len(truth), size=min(emd_points, len(truth)), replace=False)
    b_idx = rng.choice(len(x), size=min(emd_points, len(x)), replace=False)
    a = np.full(len(a_idx), 1.0 / len(a_idx))
    b = np.full(len(b_idx), 1.0) if weights is None else np.asarray(weights, dtype=np.float64)[b_idx]
    if b.sum() <= 0:
        raise ValueError("emd: the subsample's weights sum to zero")
    b = b / b.sum()
    cost = ot.dist(truth[a_idx].astype(np.float64), x[b_idx].astype(np.float64), metric=metric)
    return float(ot.emd2(a, b, cost, numItermax=10_000_000))


def jsd_paper(truth: np.ndarray, x: np.ndarray, weights: np.ndarray | None, *, hist_range: Range,
              **_: object) -> float:
    """JSD summed over the 100 x 100 density (not probability) histograms, as the reference."""
    return js_divergence(histogram(truth, None, hist_range, density=True)[0],
                         histogram(x, weights, hist_range, density=True)[0])


def emd_paper(truth: np.ndarray, x: np.ndarray, weights: np.ndarray | None, *, hist_range: Range,
              coarsen: int = 2, **_: object) -> float:
    """Histogram EMD in the reference script's units, solved on a grid ``coarsen`` times
    coarser (see the module docstring). Bins empty in both are dropped (they carry no
    mass, so the optimum is unchanged) to keep the cost matrix small."""
    fine_x = (hist_range[0][1] - hist_range[0][0]) * (1 - 1 / BINS)  # bin-centre spans of the 100 x 100 grid
    fine_y = (hist_range[1][1] - hist_range[1][0]) * (1 - 1 / BINS)
    max_distance = np.hypot(fine_x, fine_y)  # the reference divides by M.max()
    bins = BINS // coarsen
    p, xe, ye = histogram(truth, None, hist_range, bins=bins, density=True)
    q = histogram(x, weights, hist_range, bins=bins, density=True)[0]
    xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
    centres = np.stack(np.meshgrid(xc, yc, indexing="ij"), axis=-1).reshape(-1, 2)
    p, q = p.ravel(), q.ravel()
    used = (p > 0) | (q > 0)
    cost = ot.dist(centres[used], centres[used], metric="euclidean") / max_distance
    return float(ot.emd2(p[used], q[used], cost, numItermax=10_000_000)) * coarsen ** 2


METRICS: dict[str, Metric] = {"emd": emd, "jsd": jsd, "emd_paper": emd_paper, "jsd_paper": jsd_paper,
                               "wasserstein": wasserstein}

#: Truth points at which ``log_density_error`` compares densities (a Jacobian each).
LOG_DENSITY_POINTS = 5000


def manifold_metrics(dataset: ToyDataset, truth: np.ndarray, x: np.ndarray,
                     log_density: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, float | None]:
    """``manifold_distance`` of the points x (n, D) and ``log_density_error`` of ``log_density``
    at the first ``LOG_DENSITY_POINTS`` truth points (n, D), for a dataset on a known manifold."""
    points = truth[:LOG_DENSITY_POINTS]
    error = None
    if log_density is not None:
        error = float(np.mean(np.abs(np.asarray(log_density(points)) - dataset.log_density(points))))
    return {"manifold_distance": float(np.mean(dataset.manifold_distance(x))), "log_density_error": error}


def evaluate(truth: np.ndarray, x: np.ndarray, weights: np.ndarray | None, *, hist_range: Range,
             rng: np.random.Generator, emd_points: int = 3000, emd_repeats: int = 1,
             metrics: tuple[str, ...] = ("emd", "jsd", "emd_paper", "jsd_paper")) -> dict[str, float]:
    """All requested metrics of (x, weights) against truth."""
    return {name: METRICS[name](truth, x, weights, hist_range=hist_range, rng=rng, emd_points=emd_points,
                                emd_repeats=emd_repeats)
            for name in metrics}
