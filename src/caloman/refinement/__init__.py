"""Post-hoc refinement of any generator (LaSeR, Winterhalder et al. 2021, arXiv:2106.00792).

Generic over vectors (torch tensors), nothing shower-specific:

- :mod:`~caloman.refinement.weights`: DCTR classifier weights w(x) = f / (1 - f) between
  generated and real samples from an MLP, and :func:`weight_summary`.
- :mod:`~caloman.refinement.trees`: the same from gradient-boosted trees, cross-fitted
  (each training sample's weight from a model that did not see it) and calibrated.
- :mod:`~caloman.refinement.latent`: pulling the weights back to the generator's latent
  space, w(z) = w(G(z)) (deterministic G) or E[w | z] (G with its own noise).
- :mod:`~caloman.refinement.refiner`: a (conditional) flow trained by weighted maximum
  likelihood on (z, w); new samples are G(refiner sample).
- :mod:`~caloman.refinement.hmc`: batched Hamiltonian Monte Carlo on log p(z) + log w(z).
"""

from caloman.refinement.hmc import HMCConfig, HMCResult, hmc_sample
from caloman.refinement.latent import DeterministicPullback, fit_latent_weights
from caloman.refinement.refiner import RefinerConfig, WeightedFlowRefiner
from caloman.refinement.trees import TreeClassifierConfig, TreeDensityRatio, fit_tree_density_ratio
from caloman.refinement.weights import ClassifierConfig, DensityRatio, fit_density_ratio, weight_summary

__all__ = [
    "ClassifierConfig", "DensityRatio", "DeterministicPullback", "HMCConfig", "HMCResult", "RefinerConfig",
    "TreeClassifierConfig", "TreeDensityRatio", "WeightedFlowRefiner", "fit_density_ratio", "fit_latent_weights",
    "fit_tree_density_ratio", "hmc_sample", "weight_summary",
]
