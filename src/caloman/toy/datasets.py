"""Known-truth toy datasets: LaSeR's 2-D ones (arXiv:2106.00792, sec. 4; reference
``data/generate_*.py``) and densities on known manifolds for the M-flow
(arXiv:2003.13913): ``circle`` (a von Mises density on the unit circle in R^2) and
``sphere-gaussian`` (a von Mises-Fisher density, the sphere's Gaussian, on S^2 in R^3).

The manifold toys (EBIM, Ross et al. 2023, the reference notebooks; exact samplers here) lie on a
circle, two circles, a torus in R^3 or the sphere S^2 and are scored with the
sample Wasserstein distance only.

Each entry of :data:`DATASETS` gives a sampler ``sample(n, rng) -> (n, D)`` and the
histogram range the binned metrics use (over the first two coordinates). A dataset on
a known manifold also gives the exact distance of points from it and the true log
density on it, w.r.t. the manifold's surface measure (arc length, area). Adding a
dataset is one :func:`register_dataset` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Range = tuple[tuple[float, float], tuple[float, float]]


@dataclass(frozen=True)
class ToyDataset:
    name: str
    sample: Callable[[int, np.random.Generator], np.ndarray]
    hist_range: Range  # ((x_low, x_high), (y_low, y_high)) of the 100 x 100 metric histograms
    full_size: int  # size of the reference code's data set
    description: str
    dimension: int = 2
    metrics: tuple[str, ...] = ("emd", "jsd", "emd_paper", "jsd_paper")  # what metrics.json reports
    manifold_dimension: int | None = None  # m for data on an m-manifold (the implicit-manifold toys)
    #: exact distance (n,) of points (n, D) from the true manifold, for a dataset on one
    manifold_distance: Callable[[np.ndarray], np.ndarray] | None = None
    #: true log density (n,) of points (n, D) on the manifold, w.r.t. its surface measure
    log_density: Callable[[np.ndarray], np.ndarray] | None = None
    latent_dim: int | None = None  # the manifold's dimension


DATASETS: dict[str, ToyDataset] = {}


def register_dataset(dataset: ToyDataset) -> ToyDataset:
    DATASETS[dataset.name] = dataset
    return dataset


def _split_counts(n: int, parts: int) -> list[int]:
    return [n // parts + (i < n % parts) for i in range(parts)]


def _mixture(n: int, rng: np.random.Generator, centres: np.ndarray,
             component: Callable[[int, np.random.Generator], np.ndarray]) -> np.ndarray:
    """Equal shares of ``component`` shifted to each centre, shuffled; (n, 2)."""
    parts = [component(k, rng) + c for k, c in zip(_split_counts(n, len(centres)), centres)]
    x = np.concatenate(parts)
    return x[rng.permutation(n)]


def ring(n: int, rng: np.random.Generator, radius: float = 4.0, width: float = 1.0) -> np.ndarray:
    """A ring at the origin: radius ~ N(radius, width^2), angle uniform; (n, 2)."""
    r = rng.normal(radius, width, n)
    phi = rng.uniform(0.0, 2 * np.pi, n)
    return np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)


def four_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    centres = np.array([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]])
    return _mixture(n, rng, centres, lambda k, r: r.normal(size=(k, 2)))


def double_donut(n: int, rng: np.random.Generator) -> np.ndarray:
    return _mixture(n, rng, np.array([[-4.0, 0.0], [4.0, 0.0]]), ring)


def three_rings(n: int, rng: np.random.Generator) -> np.ndarray:
    return _mixture(n, rng, np.array([[-12.0, 0.0], [0.0, 0.0], [12.0, 0.0]]), ring)


register_dataset(ToyDataset("four-gaussians", four_gaussians, ((-9.0, 9.0), (-9.0, 9.0)), 100_000,
                            "unit-covariance Gaussians at (+-4, +-4), equal shares"))
register_dataset(ToyDataset("double-donut", double_donut, ((-11.0, 11.0), (-7.0, 7.0)), 100_000,
                            "two rings (radius ~ N(4, 1), uniform angle) centred at (+-4, 0)"))
register_dataset(ToyDataset("three-rings", three_rings, ((-19.0, 19.0), (-7.0, 7.0)), 150_000,
                            "three rings (radius ~ N(4, 1), uniform angle) centred at x = -12, 0, 12"))


MANIFOLD_METRICS = ("wasserstein", "emd")


def von_mises_circle(n: int, rng: np.random.Generator, means: tuple[float, ...], kappas: tuple[float, ...],
                     centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Equal-weight mixture of von Mises angles on the unit circle around ``centre``; (n, 2)."""
    component = rng.integers(len(means), size=n)
    phi = rng.vonmises(np.asarray(means)[component], np.asarray(kappas)[component])
    return np.stack([np.cos(phi), np.sin(phi)], axis=1) + np.asarray(centre)


def von_mises_mixture(n: int, rng: np.random.Generator) -> np.ndarray:
    return von_mises_circle(n, rng, (0.0, 2.0), (4.0, 8.0))


def two_circles(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit circles at (-1.8, 0) and (1.8, 0), half the points each, von Mises kappa 2 at angles pi/2, -pi/2."""
    left, right = _split_counts(n, 2)
    x = np.concatenate([von_mises_circle(left, rng, (np.pi / 2,), (2.0,), (-1.8, 0.0)),
                        von_mises_circle(right, rng, (-np.pi / 2,), (2.0,), (1.8, 0.0))])
    return x[rng.permutation(n)]


def torus(n: int, rng: np.random.Generator, major: float = 3.0, minor: float = 1.0) -> np.ndarray:
    """Torus in R^3 (radii 3, 1): independent von Mises angles (mean 0, kappa 2; mean pi/2, kappa 4),
    a product density in the angles (not in the torus's area measure); (n, 3)."""
    u, v = rng.vonmises(0.0, 2.0, n), rng.vonmises(np.pi / 2, 4.0, n)
    ring = major + minor * np.cos(v)
    return np.stack([ring * np.cos(u), ring * np.sin(u), minor * np.sin(v)], axis=1)


def von_mises_fisher(n: int, rng: np.random.Generator, mean: np.ndarray, kappa: float) -> np.ndarray:
    """Von Mises-Fisher on S^2 (exact: the cosine to the mean is w = 1 + log(u + (1 - u) e^(-2 kappa)) / kappa)."""
    u = rng.uniform(size=n)
    w = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * kappa)) / kappa
    phi = rng.uniform(0.0, 2 * np.pi, n)
    s = np.sqrt(np.clip(1.0 - w ** 2, 0.0, None))
    local = np.stack([s * np.cos(phi), s * np.sin(phi), w], axis=1)
    mean = np.asarray(mean, dtype=float) / np.linalg.norm(mean)
    # a rotation taking e_z to the mean (Householder reflection; it maps the vMF onto itself)
    e = np.array([0.0, 0.0, 1.0])
    v = e - mean
    if np.linalg.norm(v) < 1e-12:
        return local
    h = np.eye(3) - 2.0 * np.outer(v, v) / (v @ v)
    return local @ h.T


def sphere_mixture(n: int, rng: np.random.Generator) -> np.ndarray:
    """Equal mixture of von Mises-Fisher (kappa 5) at +-(1, 0, 0) and (0, 0, 1) on S^2; (n, 3)."""
    means = (np.array([1.0, 0.0, 0.0]), np.array([-1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]))
    x = np.concatenate([von_mises_fisher(k, rng, m, 5.0) for k, m in zip(_split_counts(n, 3), means)])
    return x[rng.permutation(n)]


register_dataset(ToyDataset("von-mises-mixture", von_mises_mixture, ((-1.5, 1.5), (-1.5, 1.5)), 1000,
                            "unit circle: von Mises mixture, means 0 and 2 rad, kappa 4 and 8, equal weights",
                            metrics=MANIFOLD_METRICS, manifold_dimension=1))
register_dataset(ToyDataset("two-circles", two_circles, ((-3.3, 3.3), (-1.5, 1.5)), 1000,
                            "unit circles at (+-1.8, 0), von Mises kappa 2 (means pi/2 left, -pi/2 right), "
                            "equal weights", metrics=MANIFOLD_METRICS, manifold_dimension=1))
register_dataset(ToyDataset("torus", torus, ((-4.5, 4.5), (-4.5, 4.5)), 1000,
                            "torus in R^3 (radii 3, 1), product of von Mises angles (0, kappa 2; pi/2, kappa 4)",
                            dimension=3, metrics=MANIFOLD_METRICS, manifold_dimension=2))
register_dataset(ToyDataset("sphere-mixture", sphere_mixture, ((-1.5, 1.5), (-1.5, 1.5)), 1000,
                            "S^2: von Mises-Fisher mixture, kappa 5 at (+-1, 0, 0) and (0, 0, 1), equal weights",
                            dimension=3, metrics=MANIFOLD_METRICS, manifold_dimension=2))
#: The M-flow toys report the binned metrics and the Wasserstein distance (their own
#: manifold metrics are added by ``run_toy``).
MANIFOLD_TOY_METRICS = ("emd", "jsd", "wasserstein")
#: Concentration and mean direction of the manifold toys' densities.
CIRCLE_KAPPA, CIRCLE_MEAN = 2.0, np.pi / 2
SPHERE_KAPPA, SPHERE_MEAN = 3.0, np.array([0.0, 0.0, 1.0])


def unit_sphere_distance(x: np.ndarray) -> np.ndarray:
    """| ||x|| - 1 |, (n,): the exact distance of points x (n, D) from the unit sphere S^(D-1)."""
    return np.abs(np.linalg.norm(x, axis=1) - 1.0)


def von_mises_unit_circle(n: int, rng: np.random.Generator) -> np.ndarray:
    """(cos t, sin t) with t ~ von Mises(CIRCLE_MEAN, CIRCLE_KAPPA); (n, 2)."""
    t = rng.vonmises(CIRCLE_MEAN, CIRCLE_KAPPA, n)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def von_mises_circle_log_density(x: np.ndarray) -> np.ndarray:
    """log p per unit arc length (n,) at points x (n, 2) on the circle (their angle counts):
    kappa cos(t - mu) - log(2 pi I0(kappa)), I0 computed scaled (i0e) for stability."""
    from scipy.special import i0e  # noqa: PLC0415

    t = np.arctan2(x[:, 1], x[:, 0])
    return CIRCLE_KAPPA * (np.cos(t - CIRCLE_MEAN) - 1.0) - np.log(2 * np.pi * i0e(CIRCLE_KAPPA))


def von_mises_fisher_sphere(n: int, rng: np.random.Generator) -> np.ndarray:
    """von Mises-Fisher points on S^2 about SPHERE_MEAN = +z with concentration SPHERE_KAPPA
    (Wood 1994: the cosine w to the mean by inversion, the azimuth uniform); (n, 3)."""
    k = SPHERE_KAPPA
    w = 1.0 + np.log(rng.uniform(size=n) * (1 - np.exp(-2 * k)) + np.exp(-2 * k)) / k
    phi = rng.uniform(0.0, 2 * np.pi, n)
    s = np.sqrt(np.clip(1 - w ** 2, 0.0, None))
    return np.stack([s * np.cos(phi), s * np.sin(phi), w], axis=1)


def von_mises_fisher_log_density(x: np.ndarray) -> np.ndarray:
    """log p per unit area (n,) at points x (n, 3) on S^2 (their direction counts):
    log(kappa / (4 pi sinh kappa)) + kappa mu.x."""
    k = SPHERE_KAPPA
    direction = x / np.linalg.norm(x, axis=1, keepdims=True)
    # log sinh k = k + log(1 - exp(-2k)) - log 2
    return np.log(k / (2 * np.pi)) - k - np.log1p(-np.exp(-2 * k)) + k * direction @ SPHERE_MEAN


register_dataset(ToyDataset("circle", von_mises_unit_circle, ((-1.5, 1.5), (-1.5, 1.5)), 100_000,
                            f"von Mises density (mean angle pi/2, kappa {CIRCLE_KAPPA:g}) on the unit circle in R^2",
                            metrics=MANIFOLD_TOY_METRICS, manifold_distance=unit_sphere_distance,
                            log_density=von_mises_circle_log_density, latent_dim=1))
register_dataset(ToyDataset("sphere-gaussian", von_mises_fisher_sphere, ((-1.5, 1.5), (-1.5, 1.5)), 100_000,
                            f"von Mises-Fisher density (mean +z, kappa {SPHERE_KAPPA:g}) on the unit sphere S^2 in "
                            "R^3; histograms over (x1, x2)", dimension=3, metrics=MANIFOLD_TOY_METRICS,
                            manifold_distance=unit_sphere_distance, log_density=von_mises_fisher_log_density,
                            latent_dim=2))
