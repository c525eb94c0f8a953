"""Energy-based implicit manifolds (EBIM; Ross, Loaiza-Ganem, Caterini, Cresswell 2023).

A manifold is the zero set {x : F(x) = 0} of a learned map F: R^n -> R^(n-m)
(:mod:`~caloman.implicit.manifold`); a density on it is exp(-E(x)) / Z with a
constrained energy-based model E (:mod:`~caloman.implicit.energy`), sampled by
constrained Langevin dynamics (:mod:`~caloman.implicit.sampling`). Zero sets
combine by union and intersection (:mod:`~caloman.implicit.arithmetic`). An
unconstrained conditional energy E(x | c), sampled by Langevin dynamics driven by
explicit noise (:mod:`~caloman.implicit.conditional`), serves densities on vectors
that already lie on a manifold (an autoencoder's codes).
Works on any vectors; depends only on torch and numpy.
"""

from caloman.implicit.arithmetic import Intersection, Union
from caloman.implicit.conditional import ConditionalEnergy, langevin_from_noise
from caloman.implicit.contrastive import contrastive_divergence, draw_starts
from caloman.implicit.energy import (
    EnergyConfig,
    EnergyModel,
    ManifoldVolume,
    estimate_volume,
    normalised_density,
    resample_uniform,
    train_energy,
)
from caloman.implicit.manifold import ManifoldConfig, ManifoldFunction, langevin, train_manifold
from caloman.implicit.sampling import (
    SamplerConfig,
    SamplerResult,
    constrained_langevin,
    project,
    tangent_projection,
)

__all__ = ["ConditionalEnergy", "EnergyConfig", "EnergyModel", "Intersection", "ManifoldConfig", "ManifoldFunction",
           "ManifoldVolume", "SamplerConfig", "SamplerResult", "Union", "constrained_langevin",
           "contrastive_divergence", "draw_starts", "estimate_volume", "langevin", "langevin_from_noise",
           "normalised_density", "project", "resample_uniform", "tangent_projection", "train_energy", "train_manifold"]
