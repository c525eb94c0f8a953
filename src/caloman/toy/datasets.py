"""Known-truth 2-D datasets (LaSeR, arXiv:2106.00792, sec. 4; reference ``data/generate_*.py``).

Each entry of :data:`DATASETS` gives a sampler ``sample(n, rng) -> (n, 2)`` and the
histogram range the binned metrics use. Adding a dataset is one
:func:`register_dataset` call.
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
