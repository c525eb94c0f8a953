"""Refinement applied to shower models: the classifier's inputs, the refiner's
condition, and :class:`RefinedModel`, a trained model with a refinement on top.

:mod:`caloman.refinement` (weights, latent, refiner, hmc) works on plain vectors;
this module is where showers, incident energies and the model contract
(:meth:`~caloman.models.base.ShowerModel.latent_blocks`,
:meth:`~caloman.models.base.ShowerModel.showers_from_latent`) meet it, so no
model is special-cased.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from caloman.errors import ConfigError
from caloman.geometry import Binning
from caloman.models.base import NoiseBlock, NoiseShape, ShowerModel, Stage
from caloman.refinement.hmc import HMCConfig, hmc_sample
from caloman.refinement.refiner import WeightedFlowRefiner
from caloman.refinement.weights import CalibratedRatio

logger = logging.getLogger("caloman.refinement")

Method = Literal["reweight", "refiner", "hmc"]
METHODS: tuple[str, ...] = ("reweight", "refiner", "hmc")

Classifier = Literal["trees", "mlp"]
#: The DCTR classifiers: boosted trees (:mod:`caloman.refinement.trees`) or an MLP (:mod:`caloman.refinement.weights`).
CLASSIFIERS: tuple[str, ...] = ("trees", "mlp")

#: Added to E_layer / E_inc before the logarithm (an empty layer gives log10(1e-6) = -6).
LAYER_FRACTION_FLOOR = 1e-6


def energy_condition(model: ShowerModel, incident_energies: Tensor) -> Tensor:
    """The scaled incident energy (n, 1): log E_inc mapped to [0, 1] over the model's
    trained range (the refiner's condition and part of every classifier input)."""
    low, high = model.trained_energy_range()
    if not high > 0:
        raise ConfigError("the model has no trained energy range (was it trained?); re-train it")
    log_e = torch.log(incident_energies.reshape(-1, 1).to(torch.float32))
    span = max(math.log(high) - math.log(low), 1e-6)
    return (log_e - math.log(low)) / span


def classifier_features(model: ShowerModel, incident_energies: Tensor, showers: Tensor) -> Tensor:
    """The DCTR classifier's input (n, n_voxels + n_layers + 1), float32, after the
    binning's readout threshold (as evaluation sees showers):

    - log(1 + E_voxel / threshold) per voxel (0 for an empty voxel, no floor to choose);
    - log10(E_layer / E_inc + 1e-6) per layer that has voxels (the energy split, which
      the strong test separates first);
    - the scaled log E_inc of :func:`energy_condition`, so the ratio is conditional:
      both classes share the training file's incident energies, the classifier
      learns p_real(x | E) / p_generated(x | E).
    """
    binning: Binning = model.binning
    showers = showers.to(torch.float32)
    showers = torch.where(showers >= binning.readout_threshold, showers, torch.zeros_like(showers))
    incident = incident_energies.reshape(-1, 1).to(torch.float32)
    voxels = torch.log1p(showers / binning.readout_threshold)
    layers = [showers[:, binning.layer_slice(layer.id)].sum(1, keepdim=True)
              for layer in binning.layers if layer.n_voxels > 0]
    fractions = torch.log10(torch.cat(layers, dim=1) / incident + LAYER_FRACTION_FLOOR)
    return torch.cat([voxels, fractions, energy_condition(model, incident_energies)], dim=1)


def tree_classifier_features(model: ShowerModel, incident_energies: Tensor, showers: Tensor) -> Tensor:
    """The boosted-tree DCTR classifier's input (n, F), float64, after the readout threshold:
    the strong test's ``low`` inputs (:func:`caloman.metrics.strong.strong_inputs`: log10 E_inc,
    voxels / E_inc, layer and total energy ratios, per-layer voxel spectra) followed by the
    challenge's high-level vector (:func:`caloman.metrics.classifier.classifier_inputs`
    ``"high"``: centres, widths, sparsity, ...). Trees split on ranks, so voxels / E_inc
    serves as well as their logarithm; the energy enters as log10 E_inc, so the ratio is
    conditional, as with :func:`classifier_features`.
    """
    from caloman.metrics.classifier import classifier_inputs  # noqa: PLC0415 (sklearn-heavy, only for trees)
    from caloman.metrics.strong import strong_inputs  # noqa: PLC0415

    binning: Binning = model.binning
    showers = showers.detach().to("cpu", torch.float64)
    showers = torch.where(showers >= binning.readout_threshold, showers, torch.zeros_like(showers)).numpy()
    energies = incident_energies.detach().to("cpu", torch.float64).reshape(-1).numpy()
    low = strong_inputs("low", energies, showers, binning)
    high = classifier_inputs("high", energies, showers, binning)
    return torch.from_numpy(np.concatenate([low.astype(np.float64), high], axis=1))


def shower_features(classifier: str, model: ShowerModel, incident_energies: Tensor, showers: Tensor) -> Tensor:
    """The input of the DCTR classifier ``classifier`` (one of :data:`CLASSIFIERS`), (n, F)."""
    if classifier == "trees":
        return tree_classifier_features(model, incident_energies, showers)
    if classifier == "mlp":
        return classifier_features(model, incident_energies, showers)
    raise ConfigError(f"unknown DCTR classifier {classifier!r}; use one of {', '.join(CLASSIFIERS)}")


class RefinedModel(ShowerModel):
    """A trained base model with a refinement (:data:`METHODS`) on top.

    - ``reweight``: samples are the base model's; :meth:`shower_weights` gives each
      shower its DCTR weight w(x) = ratio(shower_features(classifier, x)).
    - ``refiner``: the latent blocks of the base model's noise are replaced by the
      refiner flow's base noise (block ``"refiner"``); :meth:`sample_from_noise`
      maps it through the refiner to z given the scaled energy, then runs the
      unchanged base model on z and the base's other noise.
    - ``hmc``: :meth:`sample_from_noise` starts one chain per shower at the latent
      part of the noise, runs ``hmc.burn_in`` transitions on log p(z) + log w(z | E)
      (standard-normal p, learned w = E[w | z, E]) and keeps the last state. The
      momenta and accept decisions come from torch's global generator (which
      generation seeds per chunk), so the map is not a function of the noise alone.
    """

    kind = "refined"

    def __init__(self, base: ShowerModel, method: Method, ratio: CalibratedRatio, *,
                 latent_ratio: CalibratedRatio | None = None, refiner: WeightedFlowRefiner | None = None,
                 hmc: HMCConfig | None = None, classifier: Classifier = "mlp") -> None:
        super().__init__(None, base.binning)
        if method not in METHODS:
            raise ConfigError(f"unknown refinement method {method!r}; use one of {', '.join(METHODS)}")
        if classifier not in CLASSIFIERS:
            raise ConfigError(f"unknown DCTR classifier {classifier!r}; use one of {', '.join(CLASSIFIERS)}")
        if method == "refiner" and (refiner is None or latent_ratio is None):
            raise ConfigError("a refiner run needs its refiner flow and latent weights")
        if method == "hmc" and (hmc is None or latent_ratio is None):
            raise ConfigError("an hmc run needs its sampler settings and latent weights")
        self.base, self.method, self.ratio = base, method, ratio
        self.latent_ratio, self.refiner, self.hmc = latent_ratio, refiner, hmc
        self.classifier = classifier  # which features ``ratio`` takes
        self.energy_range.copy_(base.energy_range)
        self.last_acceptance_rate: float | None = None  # of the latest hmc batch
        self.weighted = method == "reweight"

    def fit_preprocessing(self, incident_energies: np.ndarray, showers: np.ndarray) -> None:
        raise ConfigError("a refined run is made by `caloman refine`, not trained by `caloman train`")

    def stages(self) -> list[Stage]:
        raise ConfigError("a refined run is made by `caloman refine`, not trained by `caloman train`")

    def trained_energy_range(self) -> tuple[float, float]:
        return self.base.trained_energy_range()

    def noise_shape(self) -> NoiseShape:
        base = self.base.noise_shape()
        if self.method != "refiner":
            return base
        latent = set(self.base.latent_blocks())
        rest = tuple(b for b in base.blocks if not (b.distribution == "normal" and b.name in latent))
        return NoiseShape((NoiseBlock("refiner", self.base.latent_size()), *rest))

    def sample_from_noise(self, incident_energies: Tensor, normal: Tensor, uniform: Tensor | None = None) -> Tensor:
        if self.method == "reweight":
            return self.base.sample_from_noise(incident_energies, normal, uniform)
        condition = energy_condition(self.base, incident_energies).to(normal.device)
        if self.method == "refiner":
            k = self.base.latent_size()
            latent = self.refiner.from_noise(normal[:, :k].to(torch.float32), condition)
            return self.base.showers_from_latent(incident_energies, latent, normal[:, k:], uniform)
        latent_cols, rest_cols = self.base.latent_columns()
        latent = self.hmc_latent(normal[:, latent_cols], condition)
        return self.base.showers_from_latent(incident_energies, latent, normal[:, rest_cols], uniform)

    def latent_log_prob(self, latent: Tensor, condition: Tensor | None) -> Tensor:
        """Unnormalised log of the refined latent density, log p(z) + log w(z | E), (n,)."""
        return -0.5 * (latent ** 2).sum(-1) + self.latent_ratio.log_weight(torch.cat([latent, condition], dim=1))

    def hmc_latent(self, initial: Tensor, condition: Tensor) -> Tensor:
        """One chain per row of ``initial`` (n, latent_size) at the scaled energies
        (n, 1), ``hmc.burn_in`` transitions; the final states (n, latent_size)."""
        config = dataclasses.replace(self.hmc, n_chains=len(initial), samples_per_chain=1, thinning=1,
                                     burn_in=max(0, self.hmc.burn_in - 1))
        # generation runs under inference_mode; the leapfrog needs gradients of log w
        with torch.inference_mode(False), torch.enable_grad():
            result = hmc_sample(self.latent_log_prob, initial.detach().clone().to(torch.float32), config,
                                condition=condition.detach().clone())
        self.last_acceptance_rate = result.acceptance_rate
        logger.info("hmc: %d chains, acceptance %.3f (burn-in %.3f), step size %.3g", len(initial),
                    result.acceptance_rate, result.burn_in_acceptance_rate, result.step_size)
        return result.samples[-1]

    def shower_weights(self, incident_energies: Tensor, showers: Tensor) -> Tensor | None:
        if self.method != "reweight":
            return None
        features = shower_features(self.classifier, self.base, incident_energies, showers)
        if torch.jit.is_tracing():  # one pass with the batch dynamic, not a loop of fixed chunks (ONNX export)
            return self.ratio.log_weight(features).exp()
        return self.ratio.weight(features.to(self.ratio.slope.device))

    def export_refusal(self) -> str | None:
        """reweight and refiner runs export (the graph holds the classifier or the refiner flow
        beside the base model); hmc runs cannot: see the message."""
        if self.method == "hmc":
            return (f"an hmc-refined run draws each shower's latent by Hamiltonian Monte Carlo ({self.hmc.burn_in} "
                    f"transitions of {self.hmc.leapfrog_steps} leapfrog steps, each needing the gradient of the "
                    "latent classifier, with momenta and accept decisions from torch's generator), which a static "
                    "per-shower graph cannot hold; export its base run (the `base_run` entry of its config.json), "
                    "or refine with --method refiner, whose runs export")
        if self.method == "reweight" and self.classifier == "trees":
            return ("a reweight run with the boosted-tree classifier computes its weights with scikit-learn's tree "
                    "walker, which a torch graph cannot hold; refine with --classifier mlp for an exportable "
                    "weights output, or export its base run (the `base_run` entry of its config.json) for the "
                    "unweighted showers")
        return self.base.export_refusal()

    def config_dict(self) -> dict[str, object]:
        return {"method": self.method, "base_kind": self.base.kind, "classifier": self.classifier}
