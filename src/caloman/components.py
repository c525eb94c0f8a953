"""How many connected components the latent codes form at each incident energy, read off an
implicit manifold (EBIM, Ross et al. 2023, sec. 3.1; :mod:`caloman.implicit`).

A pushforward density (one chart, as CaloMan's latent flow) cannot put mass on several
disjoint pieces without a bridge of low density between them; the zero set of a learned
F can. Per incident energy (each distinct value; quantile bins of log E_inc when there are
more than ``max_energies`` values):

1. the model's standardised codes of those showers (:meth:`ShowerModel.latent_codes`), at
   most ``max_points``, reduced to their ``dims`` leading principal components and scaled
   to unit variance overall;
2. F: R^dims -> R^codimension trained on them (:func:`caloman.implicit.train_manifold`);
3. ``samples`` points on its zero set (:func:`count_components`): codes drawn at random,
   jittered by ``jitter`` times the codes' median nearest-neighbour distance, projected onto
   F = 0 and moved ``spread_steps`` constrained Langevin steps (E = 0, confined to F's box)
   along it, so the samples cover the zero set near the codes, gaps between codes included
   when the zero set bridges them;
4. the graph joining each sample to its ``neighbours`` nearest samples when closer than
   ``scale`` times the median distance to the ``neighbours``-th nearest sample (the scale
   rule: it follows the sampling density, so a gap counts when it is several typical
   spacings wide); components by :func:`scipy.sparse.csgraph.connected_components`. A
   component with less than ``min_fraction`` of the samples is a fragment, reported but
   not counted.

Samples whose projection failed (||F|| above ``residual_limit``) are dropped and counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.neighbors import NearestNeighbors
from torch import Tensor

from caloman.errors import ConfigError
from caloman.implicit import ManifoldConfig, SamplerConfig, constrained_langevin, train_manifold
from caloman.implicit.sampling import ImplicitFunction


@dataclass(frozen=True)
class ComponentsConfig:
    """Settings of the component count (module docstring)."""

    dims: int = 3
    codimension: int = 1
    max_points: int = 1000
    epochs: int = 60
    samples: int = 2000
    jitter: float = 1.0
    spread_steps: int = 20
    step_size: float = 0.05
    neighbours: int = 10
    scale: float = 3.0
    min_fraction: float = 0.02
    residual_limit: float = 1e-3
    max_energies: int = 30

    def __post_init__(self) -> None:
        if self.dims < 2 or not 1 <= self.codimension < self.dims:
            raise ConfigError(f"components: need dims >= 2 and 1 <= codimension < dims, got dims={self.dims}, "
                              f"codimension={self.codimension}")
        if min(self.max_points, self.samples, self.neighbours, self.max_energies) < 2 or self.epochs < 1:
            raise ConfigError("components: max_points, samples, neighbours and max_energies must be >= 2 and "
                              "epochs >= 1")
        if not (self.scale > 0 and self.step_size > 0 and self.jitter >= 0 and 0 <= self.min_fraction < 1
                and self.spread_steps >= 0):
            raise ConfigError("components: scale and step_size must be > 0, jitter and spread_steps >= 0, "
                              "min_fraction in [0, 1)")


@dataclass
class ComponentCount:
    components: int  # components holding at least min_fraction of the samples
    sizes: list[int]  # samples per component, largest first (fragments included)
    fragments: int  # components below min_fraction
    radius: float  # edge length limit of the graph (the scale rule)
    samples: int  # samples in the graph
    dropped: int  # samples whose projection onto F = 0 failed
    mean_residual: float  # mean ||F|| of the samples in the graph


def graph_components(points: np.ndarray, neighbours: int, scale: float, min_fraction: float
                     ) -> tuple[int, list[int], int, float]:
    """Connected components of the scale-rule kNN graph on points (n, dim): (components of at
    least ``min_fraction`` of the points, all sizes largest first, fragments, radius)."""
    k = min(neighbours, len(points) - 1)
    if k < 1:
        raise ConfigError(f"components: need at least 2 points for a graph, got {len(points)}")
    distances, index = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    radius = float(scale * np.median(distances[:, k]))
    keep = distances[:, 1:] <= radius
    rows = np.repeat(np.arange(len(points)), k)[keep.ravel()]
    graph = csr_matrix((np.ones(len(rows)), (rows, index[:, 1:].ravel()[keep.ravel()])),
                       shape=(len(points), len(points)))
    _, labels = connected_components(graph, directed=False)
    sizes = sorted(np.bincount(labels).tolist(), reverse=True)
    counted = sum(s >= min_fraction * len(points) for s in sizes)
    return counted, sizes, len(sizes) - counted, radius


def count_components(F: ImplicitFunction, points: Tensor, box: tuple[Tensor, Tensor],
                     config: ComponentsConfig = ComponentsConfig(), generator: torch.Generator | None = None
                     ) -> ComponentCount:
    """Components of the zero set of F near points (n, dim), sampled as in steps 3-4 of the
    module docstring; ``box`` = (low, high) (dim,) confines the chains."""
    points = torch.as_tensor(points, dtype=torch.float32)
    spacing = float(np.median(NearestNeighbors(n_neighbors=2).fit(points.numpy()).kneighbors()[0][:, 0]))
    pick = torch.randint(len(points), (config.samples,), generator=generator)
    start = points[pick] + config.jitter * spacing * torch.randn(config.samples, points.shape[1],
                                                                  generator=generator)
    sampler = SamplerConfig(steps=config.spread_steps, step_size=config.step_size)
    result = constrained_langevin(F, start, None, sampler, generator, box)
    with torch.no_grad():
        residual = torch.linalg.vector_norm(F(result.samples), dim=-1)
    good = torch.isfinite(residual) & (residual < config.residual_limit)
    if int(good.sum()) < 2:
        raise ConfigError(f"components: only {int(good.sum())} of {config.samples} samples reached F = 0; the "
                          "manifold fit failed (try more epochs)")
    kept = result.samples[good]
    counted, sizes, fragments, radius = graph_components(kept.numpy(), config.neighbours, config.scale,
                                                         config.min_fraction)
    return ComponentCount(counted, sizes, fragments, radius, len(kept), int((~good).sum()),
                          float(residual[good].mean()))


def principal_components(codes: Tensor, dims: int) -> Tensor:
    """codes (n, d) centred, projected on their ``dims`` leading principal axes and divided by
    their overall standard deviation; (n, min(dims, d))."""
    centred = codes - codes.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    reduced = centred @ v[:dims].T
    return reduced / reduced.std().clamp_min(1e-12)


def energy_groups(incident_energies: np.ndarray, max_energies: int) -> list[tuple[float, np.ndarray]]:
    """(representative E_inc in MeV, row indices) per distinct energy, or per quantile bin of
    log E_inc (``max_energies`` bins, the geometric mean as representative) when there are more."""
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    values = np.unique(energies)
    if len(values) <= max_energies:
        return [(float(v), np.nonzero(energies == v)[0]) for v in values]
    edges = np.quantile(np.log(energies), np.linspace(0, 1, max_energies + 1))
    bins = np.clip(np.searchsorted(edges, np.log(energies), side="right") - 1, 0, max_energies - 1)
    return [(float(np.exp(np.log(energies[bins == b]).mean())), np.nonzero(bins == b)[0])
            for b in range(max_energies) if (bins == b).any()]


def components_per_energy(model: Any, incident_energies: np.ndarray, showers: np.ndarray,
                          config: ComponentsConfig = ComponentsConfig(), seed: int = 0) -> list[dict[str, Any]]:
    """One row per incident energy (module docstring): E_inc, showers, the count and the fit's
    mean ||F|| on the codes; ``model`` any ShowerModel with :meth:`latent_codes`."""
    rows = []
    for energy, index in energy_groups(incident_energies, config.max_energies):
        generator = torch.Generator().manual_seed(seed)
        chosen = index[torch.randperm(len(index), generator=generator)[:config.max_points].numpy()]
        with torch.no_grad():
            codes = model.latent_codes(torch.as_tensor(incident_energies[chosen], dtype=torch.float32),
                                       torch.as_tensor(showers[chosen], dtype=torch.float32))
        points = principal_components(codes.float(), config.dims)
        if len(points) < max(config.neighbours + 1, 10):
            rows.append({"incident_energy": energy, "showers": len(index), "components": None,
                         "note": f"only {len(points)} showers"})
            continue
        torch.manual_seed(seed)
        F = train_manifold(points, ManifoldConfig(codimension=config.codimension, epochs=config.epochs),
                           generator)
        count = count_components(F, points, (F.low, F.high), config, generator)
        with torch.no_grad():
            fit = float(torch.linalg.vector_norm(F(points), dim=-1).mean())
        rows.append({"incident_energy": energy, "showers": len(index), "codes_used": len(points),
                     **asdict(count), "data_mean_norm_f": fit})
    return rows


def render_markdown(rows: list[dict[str, Any]], config: ComponentsConfig) -> str:
    """The per-energy table as markdown."""
    lines = [f"Components of the codes' implicit manifold ({config.dims} principal components, codimension "
             f"{config.codimension}; kNN graph k = {config.neighbours}, radius {config.scale} x median k-th "
             f"neighbour distance; components below {config.min_fraction:.0%} of the samples are fragments)", "",
             "| E_inc (MeV) | showers | components | fragments | largest shares | mean ‖F‖ codes | dropped |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("components") is None:
            lines.append(f"| {row['incident_energy']:.4g} | {row['showers']} | – | – | {row['note']} | – | – |")
            continue
        shares = ", ".join(f"{s / row['samples']:.2f}" for s in row["sizes"][:4])
        lines.append(f"| {row['incident_energy']:.4g} | {row['showers']} | {row['components']} | {row['fragments']} "
                     f"| {shares} | {row['data_mean_norm_f']:.3g} | {row['dropped']} |")
    return "\n".join(lines) + "\n"
