"""The ambient flow: one conditional normalizing flow on the whole voxel vector,
the baseline that shows what learning the manifold first buys.

Features (n, V): f = log(x / E_inc + 1e-12) per voxel, x the voxel energy in MeV
plus (``noise``) uniform noise in [0, 1] keV drawn afresh for every training
batch, standardised per voxel with the training split's mean and standard
deviation. The flow is a stack of coupling rational-quadratic spline
transforms conditioned on log10(E_inc / 10 GeV) (CaloFlow's Eq. 4.4), so
sampling costs one network pass per transform. Generation inverts the
features, clips at zero and applies the readout threshold, which removes
what the noise put into empty voxels. One training stage, ``"flow"``.

Why the noise switch: most voxels of a shower are empty, so without noise
the data sit on a lower-dimensional set (every empty voxel at exactly
log 1e-12) inside the V-dimensional space the flow models. A flow can then
raise its likelihood without bound by collapsing mass onto that set
(manifold overfitting, Loaiza-Ganem et al. 2022, the CaloMan paper's
motivation): the training loss keeps falling while the non-empty voxels are
learnt worse. ``noise = false`` shows this; ``noise = true`` (the default) is
CaloFlow's remedy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from caloman.errors import ConfigError
from caloman.geometry import Binning
from caloman.models.base import ArrayChunks, NoiseBlock, NoiseShape, ShowerModel, Stage
from caloman.models.caloflow import (
    incident_condition,
    noise_level_mev,
    noisy_voxels,
    stored_noise,
)
from caloman.models.config import ModelConfig, check_flow_sizes
from caloman.models.flows import ConditionalFlow
from caloman.preprocessing import apply_threshold

#: Offset inside log(x / E_inc + eps): below noise / E_inc at the highest energies (1 keV / 4 TeV).
RATIO_EPS = 1e-12
#: Showers per chunk when statistics or stage data are built from a whole split.
_CHUNK = 4096
#: Seed of the noise drawn once to fit the feature standardisation (the global RNG is left alone).
_FIT_SEED = 0


@dataclass(frozen=True)
class AmbientFlowConfig(ModelConfig):
    """Everything that defines an (untrained) ambient flow.

    transforms, hidden, bins: the coupling RQS flow (hidden: each transform's
        hypernetwork layers).
    bound: the splines act on [-bound, bound] of the standardised features.
    noise: add uniform noise in [0, ``noise_kev``] keV to every training voxel
        (capped at the readout threshold); off shows manifold overfitting.
    threshold_inputs: zero training voxels below the readout threshold first.
    output_threshold: zero generated voxels below the readout threshold.
    cap_voxels: cap each generated voxel at E_inc x its largest voxel / E_inc in
        training, so the flow's far tails cannot produce voxels brighter than
        any seen (which otherwise dominate the energy sums).
    """

    transforms: int = 12
    hidden: tuple[int, ...] = (512, 512)
    bins: int = 8
    bound: float = 6.0
    noise: bool = True
    noise_kev: float = 1.0
    threshold_inputs: bool = True
    output_threshold: bool = True
    cap_voxels: bool = True

    label = "ambient-flow"
    profiles = ("quick", "full", "paper")

    def __post_init__(self) -> None:
        check_flow_sizes(self, ("transforms",), ("bins",), ("hidden",))
        if not self.bound > 0:
            raise ConfigError(f"model option bound must be > 0, got {self.bound}")
        if not self.noise_kev >= 0:
            raise ConfigError(f"model option noise_kev must be >= 0, got {self.noise_kev}")

    @classmethod
    def quick(cls) -> AmbientFlowConfig:
        """6 transforms with 2 x 256 hypernetworks: minutes of training on 2 CPU cores."""
        return cls(transforms=6, hidden=(256, 256))

    @classmethod
    def full(cls) -> AmbientFlowConfig:
        """Sized for a 2-core CPU: the quick network (6 transforms of 2 x 256, 7.2 M parameters for
        dataset 1), trained with the full budget (51 min on 80,004 showers on two CPU cores, 2026-11-30).
        The larger network of CaloFlow's size is ``paper``."""
        return cls(transforms=6, hidden=(256, 256))

    @classmethod
    def paper(cls) -> AmbientFlowConfig:
        """12 transforms with 2 x 512 hypernetworks (about 30 M parameters for dataset 1,
        the size of the CaloFlow paper's flow; the dataclass defaults)."""
        return cls()


class AmbientFlowModel(ShowerModel):
    """A conditional coupling flow p(voxels | E_inc) on all voxels; see the module docstring."""

    kind = "ambient-flow"

    def __init__(self, config: AmbientFlowConfig, binning: Binning) -> None:
        super().__init__(config, binning)
        self.noise_mev = noise_level_mev(config.noise_kev, self.threshold) if config.noise else 0.0
        self.flow = ConditionalFlow(self.n_voxels, 1, config.transforms, config.hidden, config.bins,
                                    bound=config.bound)
        # Per-voxel standardisation of the log features, fitted on the training showers.
        self.register_buffer("feature_mean", torch.zeros(self.n_voxels, dtype=torch.float64))
        self.register_buffer("feature_std", torch.ones(self.n_voxels, dtype=torch.float64))
        # Largest log(x / E_inc) of each voxel in training: generated voxels are capped there, so a
        # sample in the flow's far tail cannot become a voxel brighter than any seen in training.
        self.register_buffer("log_ratio_max", torch.zeros(self.n_voxels, dtype=torch.float64))

    # -- preprocessing ---------------------------------------------------------------------
    def _clean(self, showers: Any) -> Any:
        return apply_threshold(showers, self.threshold) if self.config.threshold_inputs else showers

    def log_features(self, incident_energies: Tensor, showers: Tensor, unit_noise: Tensor | None = None) -> Tensor:
        """Unstandardised features log(x / E_inc + 1e-12) (n, V), float64, of showers (n, V) in
        MeV with the voxel noise (fresh, or ``unit_noise`` x the noise level) added."""
        x = noisy_voxels(showers, unit_noise, self.noise_mev)
        return torch.log(x / incident_energies.reshape(-1, 1).double() + RATIO_EPS)

    def features(self, incident_energies: Tensor, showers: Tensor, unit_noise: Tensor | None = None) -> Tensor:
        """Standardised features (n, V), float64 (see :meth:`log_features`)."""
        return (self.log_features(incident_energies, showers, unit_noise) - self.feature_mean) / self.feature_std

    def to_showers(self, incident_energies: Tensor, features: Tensor) -> Tensor:
        """Inverse of :meth:`features` without the noise: showers (n, V) in MeV, float64, no
        readout threshold; ``cap_voxels``: each voxel at most E_inc x its largest x / E_inc in training."""
        log_ratio = features.double() * self.feature_std + self.feature_mean
        if self.config.cap_voxels:
            log_ratio = torch.minimum(log_ratio, self.log_ratio_max)
        ratio = torch.exp(log_ratio) - RATIO_EPS
        return ratio.clamp_min(0) * incident_energies.reshape(-1, 1).double()

    def fit_preprocessing(self, incident_energies: np.ndarray, showers: np.ndarray) -> None:
        self.fit_preprocessing_chunks(lambda: ((incident_energies[i:i + _CHUNK], showers[i:i + _CHUNK])
                                               for i in range(0, len(incident_energies), _CHUNK)))

    def fit_preprocessing_chunks(self, chunks: ArrayChunks) -> None:
        """Feature means and spreads from sums, maxima and the energy range, chunk by chunk
        (the voxel noise drawn from one seeded generator along the pass)."""
        generator = torch.Generator().manual_seed(_FIT_SEED)
        total = torch.zeros(self.n_voxels, dtype=torch.float64)
        square = torch.zeros(self.n_voxels, dtype=torch.float64)
        largest = torch.full((self.n_voxels,), -torch.inf, dtype=torch.float64)
        n, low, high = 0, np.inf, -np.inf
        for incident_energies, showers in chunks():
            incident = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
            x = self._clean(torch.as_tensor(np.asarray(showers), dtype=torch.float64))
            noise = torch.rand(x.shape, generator=generator, dtype=torch.float64) if self.noise_mev > 0 else None
            f = self.log_features(torch.as_tensor(incident), x, noise)
            total += f.sum(0)
            square += f.square().sum(0)
            largest = torch.maximum(largest, f.max(0).values)
            n, low, high = n + len(incident), min(low, float(incident.min())), max(high, float(incident.max()))
        mean = total / n
        # A voxel that is always empty without noise has zero spread: keep it finite.
        std = (square / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.log_ratio_max.copy_(largest)
        self.energy_range.copy_(torch.tensor([low, high], dtype=torch.float64))

    # -- training ----------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("flow", self.flow, self._data, self._loss)]

    def _data(self, incident_energies: Tensor, showers: Tensor) -> tuple[Tensor, ...]:
        # The features are made per batch in the loss, so every epoch sees fresh noise.
        parts = []
        for i in range(0, len(showers), _CHUNK):
            x = self._clean(showers[i:i + _CHUNK]).float()
            parts.append((x, stored_noise(x, self.noise_mev > 0), incident_energies[i:i + _CHUNK].reshape(-1, 1)))
        return tuple(torch.cat(column) for column in zip(*parts))

    def _loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        showers, unit_noise, incident = batch
        # Validation (module in eval mode) uses the noise stored with the data.
        features = self.features(incident, showers, None if self.flow.training else unit_noise)
        condition = incident_condition(incident.double()).float()
        return -self.flow.log_prob(features.float(), condition).mean()

    # -- generation ---------------------------------------------------------------------------
    def noise_shape(self) -> NoiseShape:
        """One standard normal per voxel: the flow's base sample."""
        return NoiseShape((NoiseBlock("voxels", self.n_voxels),))

    def sample_from_noise(self, incident_energies: Tensor, normal: Tensor, uniform: Tensor | None = None) -> Tensor:
        dtype = next(self.flow.parameters()).dtype
        e = incident_energies.reshape(-1).double()
        features = self.flow.transform_inverse(normal.to(dtype), incident_condition(e).to(dtype))
        showers = self.to_showers(e, features)
        if self.config.output_threshold:
            showers = apply_threshold(showers, self.threshold)
        return showers.to(dtype)


__all__ = ["AmbientFlowConfig", "AmbientFlowModel"]
