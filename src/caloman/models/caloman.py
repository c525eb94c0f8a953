"""CaloMan: density estimation on a learned shower manifold (Cresswell et al.
2022), with the energy-per-layer model of the authors' later submission and
the fidelity options described in docs/caloman-model.md.

Generation, for incident energies E (n,) in MeV:

1. ``"per-layer"`` preprocessing only: encoded layer energies
   e ~ p(e | E) from the layer-energy flow (CaloFlow's Flow I);
2. a latent code z ~ p(z | c) from the latent flow (or, ``latent_density = "ebim"``,
   Langevin dynamics of an energy, :mod:`caloman.models.latent_ebim`), c = [scaled E] or
   [scaled E, e / 14];
3. features x = psi(z) from the autoencoder's decoder (per-layer shapes that
   sum to one, or the paper's scaled voxels);
4. the preprocessing undone to MeV, then optional voxel noise, the readout
   threshold and a per-layer renormalisation to the sampled layer energies.

All randomness is explicit (:meth:`CaloManModel.noise_shape`): standard-normal
noise for the two flows and the voxel noise, and one uniform per voxel for the
exact Poisson draws of small rates (:mod:`caloman.models.voxel_noise`).

Training stages, in order: ``layer_energy`` (per-layer only), ``autoencoder``,
``latent_flow`` or ``latent_ebim`` (codes of the trained encoder).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from caloman.errors import ConfigError
from caloman.geometry import Binning
from caloman.models import spot_noise
from caloman.models.autoencoders import AUTOENCODER_KINDS, RECONSTRUCTION_LOSSES, Autoencoder, build_autoencoder
from caloman.models.base import ArrayChunks, NoiseBlock, NoiseShape, ShowerModel, Stage, TensorChunks
from caloman.models.config import ModelConfig, check_flow_sizes
from caloman.models.flows import HYPERNETS, ConditionalFlow
from caloman.models.latent_ebim import LatentEBIM, LatentEBIMSettings
from caloman.models.layer_energy import LOGIT_BOUND, LayerEnergyModel
from caloman.models.mflow import MFLOW_KINDS, SCHEDULES, MFlowAutoencoder, gram_log_det
from caloman.models.readout import LayerLayout, threshold_keeping_layer_energies
from caloman.models.voxel_noise import QUANTA_BIN_EDGES, poisson_fluctuations, quanta_bins, take
from caloman.preprocessing import (
    CONDITION_ORDERS,
    LAYER_ENERGY_ORDERS,
    PREPROCESSINGS,
    PaperPreprocessing,
    PerLayerPreprocessing,
    apply_threshold,
    make_preprocessing,
)

#: Encoder input transforms of the voxel features (the reconstruction target is never transformed).
ENCODER_INPUTS = ("none", "sqrt", "log")
#: Output noise models, see :attr:`CaloManConfig.voxel_noise`.
VOXEL_NOISES = ("none", "poisson", "poisson-gamma")
#: How a per-layer shower meets the readout threshold, see :attr:`CaloManConfig.layer_readout`.
LAYER_READOUTS = ("scale-then-threshold", "threshold-then-rescale")
#: The generalised autoencoders CaloMan can use: the MLP family and the M-flows.
CALOMAN_AUTOENCODERS = AUTOENCODER_KINDS + MFLOW_KINDS
#: Densities of the latent codes, see :attr:`CaloManConfig.latent_density`.
LATENT_DENSITIES = ("flow", "ebim")
#: Named configurations accepted by :meth:`CaloManConfig.profile`.
PROFILES = ("quick", "full", "paper")

#: Offset inside log(x + eps) for the "log" encoder input (shapes are fractions of a layer).
_LOG_INPUT_EPS = 1e-6
#: Showers per chunk when a stage's data is built from a whole split, and the most voxel
#: values per chunk (dataset 3: 414 showers; float64 work arrays of about 130 MB each).
_CHUNK = 4096
_CHUNK_VALUES = 2**24
#: log10 of reconstructed voxel energy (MeV): bin edges of the voxel-noise fit.
_QUANTA_BIN_EDGES = QUANTA_BIN_EDGES
#: Sub-bins per bin of the spot-scale table over which the occupancy fit averages.
_SUB_BINS = 4


def fit_noise_quantum(counts: Tensor, mean_sums: Tensor, square_sums: Tensor, lowest_energy: float = 0.0,
                      min_count: int = 100) -> float:
    """Energy quantum q (MeV) of a layer's voxel noise from binned autoencoder residuals.

    Per bin b of reconstructed voxel energy: n_b voxels, the sum of their reconstructed
    energies and of their squared residuals. Residual variance = q x (graininess) plus a
    reconstruction error that grows faster with x and does not follow a simple law, so
    q is the smallest variance-to-mean ratio v_b / m_b over bins with at least
    ``min_count`` voxels and mean energy >= ``lowest_energy`` (below that the readout
    threshold censors the residuals): an upper bound on q, reached where the shower is
    grainiest. 0 when no bin qualifies.
    """
    means = mean_sums / counts.clamp_min(1)
    use = (counts >= min_count) & (means >= lowest_energy) & (mean_sums > 0)
    if not bool(use.any()):
        return 0.0
    return float((square_sums[use] / mean_sums[use]).min())


def fit_occupancy_quanta(counts: Tensor, mean_sums: Tensor, occupied: Tensor, fallback: float, *,
                         min_count: int = 200, occupancy_range: tuple[float, float] = (0.02, 0.98),
                         min_quantum: float = 0.0) -> Tensor:
    """Quantum q (MeV) per bin of reconstructed voxel energy for one group of voxels (a ring
    of a layer) such that q Poisson(x / q) is above zero as often as the training voxels
    were above the readout threshold: 1 - exp(-m_b / q) = p_b, so q_b = -m_b / ln(1 - p_b).

    ``counts``, ``mean_sums`` and ``occupied`` are per-bin sums (n_bins,) of voxels, their
    reconstructed energies and how many were above threshold. Bins with fewer than
    ``min_count`` voxels or an occupancy outside ``occupancy_range`` take the value of the
    nearest usable bin; with no usable bin every bin gets ``fallback`` (the layer's q).
    Solutions below ``min_quantum`` are unusable too: with q under the readout threshold one
    quantum no longer crosses it and the relation above does not hold.
    Returns (n_bins,) float32.
    """
    n_bins = counts.shape[0]
    means = mean_sums / counts.clamp_min(1)
    occupancy = occupied / counts.clamp_min(1)
    use = ((counts >= min_count) & (occupancy > occupancy_range[0]) & (occupancy < occupancy_range[1])
           & (means > 0))
    quanta = -means / torch.log1p(-occupancy.clamp(max=1 - 1e-12))
    use &= quanta >= min_quantum
    if not bool(use.any()):
        return torch.full((n_bins,), float(fallback), dtype=torch.float32)
    usable = torch.nonzero(use).flatten()
    quanta = quanta[usable]
    nearest = (torch.arange(n_bins)[:, None] - usable[None, :]).abs().argmin(dim=1)
    return quanta[nearest].to(torch.float32)


def _tensor_chunks(incident_energies: Tensor, showers: Tensor, size: int) -> TensorChunks:
    """Showers held in memory, (n,), (n, V), as a chunk source of ``size`` showers per chunk."""
    return lambda: ((incident_energies[i:i + size], showers[i:i + size]) for i in range(0, len(showers), size))


def _pieces(chunks: TensorChunks, size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over ``chunks()``, each chunk cut into pieces of at most ``size`` showers."""
    for incident_energies, showers in chunks():
        for i in range(0, len(showers), size):
            yield incident_energies[i:i + size], showers[i:i + size]


def _every_nth(chunks: TensorChunks, stride: int, size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Every ``stride``-th shower of one pass over ``chunks()`` (counted over the pass, from
    the first), regrouped into pieces of ``size`` showers (the last one shorter): the same
    pieces as slicing ``[::stride]`` of all showers and cutting that into ``size``."""
    held: list[tuple[Tensor, Tensor]] = []
    n_held = seen = 0
    for incident_energies, showers in chunks():
        first = (-seen) % stride
        seen += len(showers)
        held.append((incident_energies[first::stride], showers[first::stride]))
        n_held += len(held[-1][1])
        while n_held >= size:
            e, x = _joined(held)
            yield e[:size], x[:size]
            held, n_held = [(e[size:], x[size:])], n_held - size
    if n_held:
        yield _joined(held)


def _joined(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(incident energies, showers) parts as one pair (no copy for a single part)."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@dataclass(frozen=True)
class CaloManConfig(ModelConfig):
    """Everything that defines an (untrained) CaloMan model.

    Preprocessing and autoencoder:
        preprocessing: ``"per-layer"`` (layer-energy flow + normalised layer
            shapes) or ``"paper"`` (voxels / (r_max E_inc) + E_dep).
        autoencoder: ``"vae"``, ``"ae"``, ``"wae"``, or an M-flow ``"mflow"`` / ``"mflow-e"``
            (:class:`~caloman.models.mflow.MFlowAutoencoder`; per-layer preprocessing with
            the log encoder input only).
        latent_dim: code dimension d; pass the intrinsic-dimension estimate
            (``caloman dimension``) as an override, else 20 (the paper's value).
        hidden: encoder hidden sizes (the decoder mirrors them).
        reconstruction_loss: ``"cross-entropy"`` (per-layer KL of the shapes;
            per-layer preprocessing only) or ``"mse"``.
        encoder_input: transform of the voxel features fed to the encoder:
            ``"log"`` (log(x + 1e-6), so dim voxels count), ``"sqrt"`` or ``"none"``.
        kl_weight: VAE KL weight against the summed reconstruction loss.
        mmd_weight: WAE MMD weight.
        conditional_autoencoder: encoder and decoder also see the flow's
            condition (scaled E_inc and the encoded layer energies), so the
            codes only hold what those do not fix (the paper conditions only
            the flow, fearing codes that do not generalise to unseen
            energies; measured here, conditioning gives better widths).
        layer_energy_order: the chain of fractions that encodes the layer energies
            (:class:`~caloman.preprocessing.LayerEnergyEncoding`; per-layer preprocessing
            only): ``"front"`` (CaloFlow's: the first layer's share first, the deepest
            layer takes the rest) or ``"back"`` (the deepest layer's share first, the
            first layer takes the rest). It orders the layer-energy flow's variables
            (and, with ``condition_order = "flow"``, the condition).
        condition_order: the chain in which the condition of the autoencoder and the
            latent flow holds the encoded layer energies: ``"flow"`` (default; the
            layer-energy flow's, ``layer_energy_order``, as every run before 2026-12-08),
            ``"front"`` or ``"back"``. With ``layer_energy_order = "back"`` and
            ``condition_order = "front"`` the flow's chain starts at the deepest layer
            while the decoder's condition stays CaloFlow's; generation re-encodes the
            sampled layer energies for the condition.
    Flows (coupling RQS flows, see :class:`ConditionalFlow`):
        flow_transforms, flow_hidden, flow_bins, flow_hypernet: the latent flow.
        layer_flow_transforms, layer_flow_hidden, layer_flow_bins: the layer-energy flow.
        latent_noise: std of Gaussian noise added to the standardised codes
            while training the latent flow (smooths the code density).
    Latent density:
        latent_density: ``"flow"`` (default, the latent flow above) or ``"ebim"``: an
            energy-based density E(z | c) on the codes, trained by contrastive divergence
            and sampled by ``ebim_steps`` Langevin steps from N(0, I)
            (:mod:`caloman.models.latent_ebim`; stage ``latent_ebim`` replaces ``latent_flow``).
        ebim_hidden, ebim_steps, ebim_step_size, ebim_alpha (0: eps^2), ebim_buffer_size,
            ebim_buffer_frac, ebim_beta: its settings
            (:class:`~caloman.models.latent_ebim.LatentEBIMSettings`).
    Sparsity and noise:
        threshold_inputs: zero training voxels below the binning's readout
            threshold before fitting (every metric does the same), so no
            capacity goes to sub-threshold noise.
        dequantise_empty_layers: give empty layers a uniform energy below half
            the threshold while training the layer-energy flow, so it never
            fits a point mass; such layers generate no voxel above threshold.
        output_threshold: zero generated voxels below the readout threshold so that
            each layer keeps its sampled energy (per-layer; how: ``layer_readout``).
        layer_readout: ``"scale-then-threshold"`` (default): each noisy layer is
            scaled so that what passes the threshold carries exactly the sampled
            energy (:mod:`caloman.models.readout`), which keeps the smallest lit
            voxels just above the threshold as in data; ``"threshold-then-rescale"``:
            threshold, then multiply the layer back to its energy (before
            2026-12-07; it lifts every lit voxel by the lost fraction, a tell).
        voxel_noise: ``"poisson-gamma"`` (default) draws each generated voxel
            as the energy of a Poisson number of Gamma-distributed spots
            (:mod:`caloman.models.spot_noise`), calibrated on the training
            showers when the latent-flow stage starts: the graininess of real
            showers (few deposits at low energy), which a smooth decoded mean
            shower lacks and which decides widths, sparsity and the voxel-energy
            spectrum after the readout threshold; ``"poisson"`` the older
            q Poisson(x / q), whose voxels lie on a lattice of quanta;
            ``"none"`` returns the decoded mean shower. Each layer is rescaled
            to its sampled energy afterwards.
        reconstruction_energy_power: p >= 0; each training shower's reconstruction loss is
            weighted by (E_inc / E_mid)^p, E_mid the geometric middle of the trained
            energy range; 0: unweighted.
    M-flow autoencoders (``autoencoder = "mflow"`` or ``"mflow-e"``; ignored otherwise):
        mflow_schedule: ``"sequential"`` (stage ``autoencoder`` = the manifold phase, then
            ``latent_flow`` = the density phase) or ``"alternating"`` (the paper's M/D: stage
            ``manifold_density`` alternates a manifold and a density epoch, then
            ``latent_flow`` finishes the density with the manifold fixed).
        mflow_features: 0 (default): the outer flow acts on all D log-shapes, each
            standardised; K > latent_dim: on their first K principal components (faster, but
            a linear reduction loses much of the shapes: see docs/mflows.md).
        mflow_transforms, mflow_hidden, mflow_bins: the outer coupling spline flow.
        mflow_reconstruction_weight: weight of the reconstruction loss in the manifold phase.
        The Me-flow's encoder uses ``hidden``.
    """

    preprocessing: str = "per-layer"
    autoencoder: str = "vae"
    latent_dim: int = 20
    hidden: tuple[int, ...] = (512, 512, 512)
    reconstruction_loss: str = "cross-entropy"
    encoder_input: str = "log"
    kl_weight: float = 1e-3
    mmd_weight: float = 1.0
    conditional_autoencoder: bool = True
    layer_energy_order: str = "front"
    condition_order: str = "flow"
    flow_transforms: int = 4
    flow_hidden: tuple[int, ...] = (128, 128)
    flow_bins: int = 8
    flow_hypernet: str = "mlp"
    layer_flow_transforms: int = 4
    layer_flow_hidden: tuple[int, ...] = (64, 64)
    layer_flow_bins: int = 16
    latent_noise: float = 0.0
    latent_density: str = "flow"
    ebim_hidden: tuple[int, ...] = (128, 128)
    ebim_steps: int = 30
    ebim_step_size: float = 0.1
    ebim_alpha: float = 1.0
    ebim_buffer_size: int = 10_000
    ebim_buffer_frac: float = 0.5
    ebim_beta: float = 0.1
    threshold_inputs: bool = True
    dequantise_empty_layers: bool = True
    output_threshold: bool = True
    layer_readout: str = "scale-then-threshold"
    voxel_noise: str = "poisson-gamma"
    reconstruction_energy_power: float = 0.5
    mflow_schedule: str = "sequential"
    mflow_features: int = 0
    mflow_transforms: int = 4
    mflow_hidden: tuple[int, ...] = (64,)
    mflow_bins: int = 8
    mflow_reconstruction_weight: float = 1.0

    label = "caloman"
    profiles = PROFILES

    def __post_init__(self) -> None:
        choices = {"preprocessing": PREPROCESSINGS, "autoencoder": CALOMAN_AUTOENCODERS,
                   "reconstruction_loss": RECONSTRUCTION_LOSSES, "encoder_input": ENCODER_INPUTS,
                   "flow_hypernet": HYPERNETS, "voxel_noise": VOXEL_NOISES, "mflow_schedule": SCHEDULES,
                   "layer_readout": LAYER_READOUTS, "latent_density": LATENT_DENSITIES,
                   "layer_energy_order": LAYER_ENERGY_ORDERS, "condition_order": CONDITION_ORDERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model option {name} = {getattr(self, name)!r} is not one of "
                                  f"{', '.join(map(repr, allowed))}")
        if self.reconstruction_loss == "cross-entropy" and self.preprocessing != "per-layer":
            raise ConfigError("reconstruction_loss = 'cross-entropy' compares per-layer shapes: use it with "
                              "preprocessing = 'per-layer', or set reconstruction_loss = 'mse'")
        if self.layer_energy_order != "front" and self.preprocessing != "per-layer":
            raise ConfigError("layer_energy_order orders the per-layer preprocessing's layer energies: use it "
                              "with preprocessing = 'per-layer'")
        if self.condition_order != "flow" and self.preprocessing != "per-layer":
            raise ConfigError("condition_order orders the per-layer preprocessing's layer energies in the "
                              "condition: use it with preprocessing = 'per-layer'")
        positive = {"latent_dim": self.latent_dim, "flow_transforms": self.flow_transforms,
                    "layer_flow_transforms": self.layer_flow_transforms}
        for name, value in positive.items():
            if int(value) < 1:
                raise ConfigError(f"model option {name} must be at least 1, got {value}")
        for name in ("flow_bins", "layer_flow_bins"):
            if int(getattr(self, name)) < 2:
                raise ConfigError(f"model option {name} must be at least 2, got {getattr(self, name)}")
        for name in ("hidden", "flow_hidden", "layer_flow_hidden"):
            sizes = getattr(self, name)
            if not sizes or any(int(s) < 1 for s in sizes):
                raise ConfigError(f"model option {name} must list positive layer sizes, got {sizes!r}")
        for name in ("kl_weight", "mmd_weight", "latent_noise", "reconstruction_energy_power"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"model option {name} must be >= 0, got {getattr(self, name)}")
        if self.autoencoder in MFLOW_KINDS:
            self._check_mflow()
        if self.latent_density == "ebim":
            self.ebim_settings()
            if self.autoencoder in MFLOW_KINDS and self.mflow_schedule == "alternating":
                raise ConfigError("latent_density = 'ebim' replaces the latent flow, which the alternating M-flow "
                                  "schedule trains with the manifold: use mflow_schedule = 'sequential'")

    def ebim_settings(self) -> LatentEBIMSettings:
        """The ``ebim_*`` options as checked settings (ConfigError for bad values)."""
        return LatentEBIMSettings(hidden=tuple(self.ebim_hidden), steps=self.ebim_steps,
                                  step_size=self.ebim_step_size, alpha=self.ebim_alpha,
                                  buffer_size=self.ebim_buffer_size, buffer_frac=self.ebim_buffer_frac,
                                  beta=self.ebim_beta)

    def _check_mflow(self) -> None:
        """An M-flow autoencoder works on per-layer log-shapes; ConfigError otherwise."""
        if self.preprocessing != "per-layer" or self.encoder_input != "log":
            raise ConfigError(f"autoencoder = {self.autoencoder!r} needs preprocessing = 'per-layer' and "
                              "encoder_input = 'log' (its flow acts on the log-shapes and decodes them through "
                              "the layer softmax)")
        check_flow_sizes(self, ("mflow_transforms",), ("mflow_bins",), ("mflow_hidden",))
        if self.mflow_features < 0 or (self.mflow_features and self.mflow_features <= self.latent_dim):
            raise ConfigError(f"model option mflow_features must be 0 (all voxels) or larger than latent_dim "
                              f"({self.latent_dim}), got {self.mflow_features}")
        if not self.mflow_reconstruction_weight > 0:
            raise ConfigError(f"model option mflow_reconstruction_weight must be > 0, got "
                              f"{self.mflow_reconstruction_weight}")

    @classmethod
    def quick(cls) -> CaloManConfig:
        """Small: trains in minutes on 2 CPU cores on 10-20k dataset-1 showers."""
        return cls(hidden=(256, 256), flow_hidden=(64, 64), layer_flow_transforms=3, layer_flow_hidden=(32, 32))

    @classmethod
    def full(cls) -> CaloManConfig:
        """Paper-sized networks (3 x 512 autoencoder MLPs, 4-transform latent flow) with this
        project's default fidelity choices."""
        return cls()

    @classmethod
    def paper(cls) -> CaloManConfig:
        """The published model as closely as this code allows: the paper's preprocessing,
        a VAE with squared error, the residual-GLU flow, no threshold handling. The VAE's
        KL weight is not in the paper; 1e-6 suits its [0, 1]-scaled features."""
        return cls(preprocessing="paper", reconstruction_loss="mse", encoder_input="none", kl_weight=1e-6,
                   flow_hypernet="residual-glu", flow_hidden=(128, 128, 128), threshold_inputs=False,
                   conditional_autoencoder=False, dequantise_empty_layers=False, output_threshold=False,
                   voxel_noise="none", reconstruction_energy_power=0.0)


def _build_autoencoder(config: CaloManConfig, features: int, context: int, layer_sizes: list[int],
                       per_layer: bool) -> Autoencoder:
    """The configured member of the generalised-autoencoder family on ``features`` inputs."""
    if config.autoencoder in MFLOW_KINDS:
        return MFlowAutoencoder(features, config.latent_dim, context=context, layer_sizes=layer_sizes,
                                loss=config.reconstruction_loss, kind=config.autoencoder,
                                flow_features=config.mflow_features, transforms=config.mflow_transforms,
                                hidden=config.mflow_hidden, bins=config.mflow_bins, encoder_hidden=config.hidden,
                                reconstruction_weight=config.mflow_reconstruction_weight)
    return build_autoencoder(config.autoencoder, features, config.latent_dim, config.hidden, context=context,
                             output="layer-softmax" if per_layer else "identity", layer_sizes=layer_sizes,
                             loss=config.reconstruction_loss, kl_weight=config.kl_weight,
                             mmd_weight=config.mmd_weight)


@dataclass
class _Features:
    """Preprocessed tensors of a batch of showers (float32)."""

    voxels: Tensor  # (n, D) autoencoder targets
    condition: Tensor  # (n, c) latent-flow condition
    incident: Tensor  # (n, 1) scaled incident energy
    layer_features: Tensor | None = field(default=None)  # (n, L) encoded layer energies


class CaloManModel(ShowerModel):
    """The two-step CaloMan model for one binning; see the module docstring."""

    kind = "caloman"

    def __init__(self, config: CaloManConfig, binning: Binning) -> None:
        super().__init__(config, binning)
        self.per_layer = config.preprocessing == "per-layer"
        pipeline = make_preprocessing(config.preprocessing, binning, layer_order=config.layer_energy_order)
        self._pipeline_template = pipeline
        # Fitted preprocessing constants live in buffers, named after the pipeline's state keys.
        self._state_keys = tuple(pipeline.state())
        for key, value in pipeline.state().items():
            self.register_buffer(f"pre_{key}", torch.tensor(float(value), dtype=torch.float64))

        layer_sizes = [binning.layer(layer).n_voxels for layer in binning.relevant_layers]
        n_layers = len(layer_sizes)
        self.n_layers = n_layers
        self.layer_layout = LayerLayout(layer_sizes)
        condition_size = 1 + (n_layers if self.per_layer else 0)
        self.layer_energy = (LayerEnergyModel(n_layers, 1, config.layer_flow_transforms, config.layer_flow_hidden,
                                              config.layer_flow_bins) if self.per_layer else None)
        self.autoencoder: Autoencoder = _build_autoencoder(
            config, pipeline.n_voxels if self.per_layer else pipeline.n_features,
            condition_size if config.conditional_autoencoder else 0, layer_sizes, self.per_layer)
        # The density of the codes: the latent flow, or (latent_density = "ebim") an energy-based model.
        ebim = config.latent_density == "ebim"
        self.latent_ebim = LatentEBIM(config.latent_dim, condition_size, config.ebim_settings()) if ebim else None
        self.latent_flow = None if ebim else ConditionalFlow(
            config.latent_dim, condition_size, config.flow_transforms, config.flow_hidden, config.flow_bins,
            hypernet=config.flow_hypernet)
        # Standardisation of the codes for the latent flow, fitted when its stage starts.
        self.register_buffer("latent_mean", torch.zeros(config.latent_dim))
        self.register_buffer("latent_std", torch.ones(config.latent_dim))
        self.register_buffer("latent_fitted", torch.tensor(False))
        # Energy quantum per layer (MeV) of the Poisson voxel noise, fitted with the codes.
        self.register_buffer("voxel_quanta", torch.zeros(n_layers))
        self.register_buffer("voxel_layer_index", self.layer_layout.layer_index.clone(),
                             persistent=False)
        # Finer quanta per (layer, ring of equal radius, reconstructed-energy bin), fitted to the
        # occupancy of the training voxels; all zero means "use voxel_quanta".
        rings = np.concatenate([np.unique(binning.voxel_r[binning.layer_slice(layer)], return_inverse=True)[1]
                                for layer in binning.relevant_layers])
        self.n_rings = int(rings.max()) + 1
        self.register_buffer("voxel_group_index", self.voxel_layer_index * self.n_rings + torch.as_tensor(rings),
                             persistent=False)
        self.register_buffer("voxel_quanta_table", torch.zeros(n_layers * self.n_rings, len(_QUANTA_BIN_EDGES) + 1))
        if config.voxel_noise == "poisson-gamma":
            # Spot shape k per layer, spot scale theta (MeV) per (layer, ring, energy bin) and the
            # Gamma quantile table, all fitted with the codes (:mod:`caloman.models.spot_noise`).
            self.register_buffer("spot_shapes", torch.zeros(n_layers))
            self.register_buffer("spot_scales", torch.zeros(n_layers * self.n_rings, len(_QUANTA_BIN_EDGES) + 1))
            self.register_buffer("spot_quantiles", torch.zeros(n_layers * spot_noise.TABLE_COUNTS,
                                                               spot_noise.TABLE_POINTS))
            self.register_buffer("spot_table_rows", self.voxel_layer_index * spot_noise.TABLE_COUNTS,
                                 persistent=False)

    # -- preprocessing -------------------------------------------------------------------
    def _pipeline(self) -> PaperPreprocessing | PerLayerPreprocessing:
        """The preprocessing with its constants taken from the buffers (torch path)."""
        pipeline = self._pipeline_template
        return pipeline.load_state({key: getattr(self, f"pre_{key}") for key in self._state_keys})

    def _clean(self, showers: Tensor | np.ndarray) -> Any:
        return apply_threshold(showers, self.threshold) if self.config.threshold_inputs else showers

    def fit_preprocessing(self, incident_energies: np.ndarray, showers: np.ndarray) -> None:
        self.fit_preprocessing_chunks(lambda: iter([(incident_energies, showers)]))

    def fit_preprocessing_chunks(self, chunks: ArrayChunks) -> None:
        """The preprocessing's constants (extremes: exact chunk by chunk) and the energy range."""
        pipeline = make_preprocessing(self.config.preprocessing, self.binning,
                                      layer_order=self.config.layer_energy_order)
        low, high = np.inf, -np.inf
        for incident_energies, showers in chunks():
            incident = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
            showers = self._clean(np.asarray(showers))  # sums accumulate in float64; no float64 copy
            pipeline.partial_fit(incident, showers)
            low, high = min(low, float(incident.min())), max(high, float(incident.max()))
        for key, value in pipeline.state().items():
            getattr(self, f"pre_{key}").fill_(float(value))
        self.energy_range.copy_(torch.tensor([low, high], dtype=torch.float64))
        self.latent_fitted.fill_(False)

    def _chunk_rows(self) -> int:
        """Showers per chunk of the work done on many showers at once (at most ``_CHUNK``,
        and about ``_CHUNK_VALUES`` voxel values)."""
        return max(1, min(_CHUNK, _CHUNK_VALUES // self.n_voxels))

    def _encoder_input(self, voxels: Tensor) -> Tensor:
        if self.config.encoder_input == "log":
            return torch.log(voxels.clamp_min(0) + _LOG_INPUT_EPS)
        if self.config.encoder_input == "sqrt":
            return voxels.clamp_min(0).sqrt()
        return voxels

    def _features(self, incident_energies: Tensor, showers: Tensor, *, random: bool = False) -> _Features:
        """Preprocess a batch: incident energies (n,) and showers (n, V) in MeV. Empty layers
        are dequantised with random energies for training (``random``), else with the
        middle of that range, so reconstructions see the conditions training saw."""
        incident = incident_energies.reshape(-1).double()
        showers = self._clean(showers.double())
        pipeline = self._pipeline()
        scaled = pipeline.incident.forward(incident).reshape(-1, 1)
        if not self.per_layer:
            return _Features(pipeline.forward(incident, showers).float(), scaled.float(), scaled.float())
        shapes, energies = pipeline.layers.forward(showers)
        if self.config.dequantise_empty_layers and self.config.threshold_inputs and self.threshold > 0:
            fill = torch.rand_like(energies) if random else torch.full_like(energies, 0.5)
            energies = torch.where(energies > 0, energies, fill * (0.5 * self.threshold))
        encoded = pipeline.energies.forward(incident, energies)
        in_condition = (pipeline.energies.with_order(self.config.condition_order).forward(incident, energies)
                        if self.reencodes_condition else encoded)
        condition = torch.cat((scaled, in_condition / LOGIT_BOUND), dim=-1)
        return _Features(shapes.float(), condition.float(), scaled.float(), encoded.float())

    @property
    def reencodes_condition(self) -> bool:
        """Whether the condition holds the layer energies in another chain than the flow's."""
        order = self.config.condition_order
        return self.per_layer and order not in ("flow", self.config.layer_energy_order)

    def condition_energies(self, incident: Tensor, encoded: Tensor, pipeline: Any = None) -> Tensor:
        """The layer energies in the condition's chain (n, L), from the layer-energy flow's
        encoded ones (n, L) and E_inc (n,) in MeV: ``encoded`` itself unless
        :attr:`reencodes_condition`, else decoded to MeV and encoded again (in float64);
        ``pipeline``: the caller's :meth:`_pipeline`, if it has one."""
        if not self.reencodes_condition:
            return encoded
        pipeline = pipeline or self._pipeline()
        energies = pipeline.energies.inverse(incident.double(), encoded.double())
        recoded = pipeline.energies.with_order(self.config.condition_order).forward(incident.double(), energies)
        return recoded.to(encoded.dtype)

    def _ae_context(self, condition: Tensor) -> Tensor | None:
        return condition if self.config.conditional_autoencoder else None

    # -- training stages -------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        stages = []
        if self.per_layer:
            stages.append(Stage("layer_energy", self.layer_energy, self._layer_energy_data, self._layer_energy_loss,
                                compact=True))
        if self.config.autoencoder in MFLOW_KINDS and self.config.mflow_schedule == "alternating":
            stages.append(self._manifold_density_stage())
        else:
            stages.append(Stage("autoencoder", self.autoencoder, self._autoencoder_data, self._autoencoder_loss,
                                fit=self._fit_autoencoder_inputs if self.config.autoencoder in MFLOW_KINDS else None))
        if self.latent_ebim is not None:
            stages.append(Stage("latent_ebim", self.latent_ebim, self._latent_data, self.latent_ebim.loss,
                                fit=self._fit_latent, compact=True))
        else:
            stages.append(Stage("latent_flow", self.latent_flow, self._latent_data, self._latent_loss,
                                fit=self._fit_latent, compact=True))
        return stages

    def _manifold_density_stage(self) -> Stage:
        """The M-flow's M/D schedule (Brehmer & Cranmer 2020, section 4): even epochs train the
        outer flow on the reconstruction loss, odd epochs the latent (inner) flow on the codes
        with the manifold fixed; the validation loss is the sum of both. The codes are not yet
        standardised here (that is fitted when ``latent_flow`` starts)."""
        phase = {"density": False}

        def begin_epoch(epoch: int) -> None:
            phase["density"] = epoch % 2 == 1

        def loss(batch: tuple[Tensor, ...]) -> Tensor:
            voxels, condition = batch
            training = self.autoencoder.training
            total = voxels.new_zeros(())
            if not (training and phase["density"]):
                total = total + self._autoencoder_loss(batch)
            if not training or phase["density"]:
                with torch.no_grad():
                    codes = self._codes(_Features(voxels, condition, condition[:, :1]))
                total = total + self._latent_loss(((codes - self.latent_mean) / self.latent_std, condition))
            return total

        return Stage("manifold_density", torch.nn.ModuleList([self.autoencoder, self.latent_flow]),
                     self._autoencoder_data, loss, begin_epoch=begin_epoch, fit=self._fit_autoencoder_inputs)

    def _chunked(self, incident_energies: Tensor, showers: Tensor, fn) -> tuple[Tensor, ...]:
        size = self._chunk_rows()
        parts = [fn(self._features(incident_energies[i:i + size], showers[i:i + size], random=True))
                 for i in range(0, len(showers), size)]
        return tuple(torch.cat(column) for column in zip(*parts))

    def _layer_energy_data(self, incident_energies: Tensor, showers: Tensor) -> tuple[Tensor, ...]:
        return self._chunked(incident_energies, showers, lambda f: (f.layer_features, f.incident))

    def _layer_energy_loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        features, incident = batch
        return self.layer_energy.loss(features, incident)

    def _autoencoder_data(self, incident_energies: Tensor, showers: Tensor) -> tuple[Tensor, ...]:
        voxels, condition = self._chunked(incident_energies, showers, lambda f: (f.voxels, f.condition))
        self.autoencoder.fit_inputs(self._encoder_input(voxels))
        return voxels, condition

    def _fit_autoencoder_inputs(self, chunks: TensorChunks) -> None:
        """Streamed training: the autoencoder's input constants (an M-flow's whitening) from
        sums over the training chunks."""
        self.autoencoder.fit_inputs_chunks(
            lambda: (self._encoder_input(self._features(e, x, random=True).voxels)
                     for e, x in _pieces(chunks, self._chunk_rows())))

    def _autoencoder_loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        voxels, condition = batch
        # The encoder sees the transformed voxels; the target stays untransformed.
        return self.autoencoder.loss(voxels, self._ae_context(condition), inputs=self._encoder_input(voxels),
                                     weights=self._reconstruction_weights(condition[:, 0]))

    def _reconstruction_weights(self, scaled_incident: Tensor) -> Tensor | None:
        """Per-shower weights (n,) of the reconstruction loss, (E_inc / E_mid)^p with E_mid
        the geometric middle of the trained energy range (p = ``reconstruction_energy_power``;
        None for p = 0). A shower of N spots has a shape likelihood N times its
        cross-entropy and N grows almost linearly with E_inc, so unweighted training spends
        the decoder's precision on low energies, where fluctuations hide its errors. A fixed
        reference (not a per-batch normalisation) keeps training and validation losses
        comparable."""
        power = float(self.config.reconstruction_energy_power)
        if power == 0:
            return None
        pipeline = self._pipeline()
        log_energy = pipeline.incident.inverse(scaled_incident.double()).log()
        log_middle = pipeline.incident.inverse(scaled_incident.new_full((1,), 0.5).double()).log()
        return (power * (log_energy - log_middle)).exp().to(scaled_incident.dtype)

    def _codes(self, features: _Features) -> Tensor:
        """Codes (n, d) of preprocessed showers (the posterior mean for a VAE)."""
        return self.autoencoder.encode(self._encoder_input(features.voxels), self._ae_context(features.condition))

    def _latent_data(self, incident_energies: Tensor, showers: Tensor) -> tuple[Tensor, ...]:
        codes, condition = self._chunked(incident_energies, showers, lambda f: (self._codes(f), f.condition))
        if not bool(self.latent_fitted):
            # The first call sees the training split (caloman.models.base.Stage): fit there.
            self.latent_mean.copy_(codes.mean(0))
            self.latent_std.copy_(codes.std(0).clamp_min(1e-6))
            self._fit_voxel_noise(_tensor_chunks(incident_energies, showers, self._chunk_rows()), len(showers))
            self.latent_fitted.fill_(True)
        return (codes - self.latent_mean) / self.latent_std, condition

    def _fit_latent(self, chunks: TensorChunks) -> None:
        """Streamed training: the code standardisation from float64 sums of the training codes
        (the same mean and unbiased std as in memory, up to rounding), then the voxel noise."""
        n, total, square = 0, 0.0, 0.0
        for e, x in _pieces(chunks, self._chunk_rows()):
            codes = self._codes(self._features(e, x, random=True)).double()
            n, total, square = n + len(codes), total + codes.sum(0), square + codes.square().sum(0)
        if n < 2:
            raise ConfigError(f"the latent flow needs at least 2 training showers to standardise its codes, got {n}")
        mean = total / n
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(((square - n * mean.square()) / (n - 1)).clamp_min(0).sqrt().clamp_min(1e-6))
        self._fit_voxel_noise(chunks, n)
        self.latent_fitted.fill_(True)

    def _fit_voxel_noise(self, chunks: TensorChunks, n_showers: int) -> None:
        """Calibrate the configured voxel noise on the ``n_showers`` training showers of ``chunks()``."""
        if self.config.voxel_noise == "poisson":
            layer_quanta, table = self._fit_voxel_quanta(chunks)
            self.voxel_quanta.copy_(layer_quanta)
            self.voxel_quanta_table.copy_(table)
        elif self.config.voxel_noise == "poisson-gamma":
            self._fit_spot_noise(chunks, n_showers)

    def _latent_loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        codes, condition = batch
        if self.config.latent_noise > 0:
            codes = codes + self.config.latent_noise * torch.randn_like(codes)
        return -self.latent_flow.log_prob(codes, condition).mean()

    def _fit_voxel_quanta(self, chunks: TensorChunks) -> tuple[Tensor, Tensor]:
        """Energy quanta (MeV) of the voxel noise from the autoencoder's reconstructions of
        the training showers of ``chunks()``, binned in reconstructed voxel energy.

        Returns the per-layer quanta (n_layers,) (:func:`fit_noise_quantum`, from the
        residual variance) and the table (n_layers * n_rings, n_bins) of per-ring quanta
        matched to the training occupancy (:func:`fit_occupancy_quanta`). One quantum per
        layer populated the outer voxels of the presampler and strips too often (their
        sparsity was the worst-modelled feature); the table fixes that. Bins whose
        occupancy-matched quantum would fall below the readout threshold (where the inversion
        does not hold) take the nearest valid bin of their ring, or the layer's quantum.
        """
        device = self.latent_mean.device
        edges = _QUANTA_BIN_EDGES.to(device)
        n_bins = len(edges) + 1
        n_groups = self.n_layers * self.n_rings
        sums = torch.zeros(4, n_groups * n_bins, dtype=torch.float64, device=device)
        for e, x in _pieces(chunks, self._chunk_rows()):
            mean = self._reconstruct(e, x, postprocess=False).double()
            clean = self._clean(x.double())
            cell = (self.voxel_group_index * n_bins + torch.bucketize(mean.clamp_min(1e-30).log10(), edges)).flatten()
            for row, values in enumerate((torch.ones_like(mean), mean, (clean - mean).square(),
                                          (clean > 0).double())):
                sums[row].index_add_(0, cell, values.flatten())
        sums = sums.reshape(4, self.n_layers, self.n_rings, n_bins).cpu()
        counts, means, squares, occupied = sums.sum(dim=2)  # per layer
        layer_quanta = torch.tensor([fit_noise_quantum(counts[layer], means[layer], squares[layer],
                                                       0.5 * self.threshold) for layer in range(self.n_layers)],
                                    dtype=torch.float32)
        table = layer_quanta[:, None, None].expand(self.n_layers, self.n_rings, n_bins).clone()
        for layer in range(self.n_layers):
            for ring in range(self.n_rings):
                table[layer, ring] = fit_occupancy_quanta(sums[0, layer, ring], sums[1, layer, ring],
                                                          sums[3, layer, ring], float(layer_quanta[layer]),
                                                          min_quantum=self.threshold)
        return layer_quanta, table.reshape(self.n_layers * self.n_rings, n_bins)

    def fit_spot_noise(self, incident_energies: Tensor, showers: Tensor, *, max_voxels_per_layer: int = 30_000,
                       seed: int = 0) -> dict[str, Any]:
        """Calibrate the ``"poisson-gamma"`` voxel noise on training showers (n,), (n, V) MeV
        (:mod:`caloman.models.spot_noise`): for every candidate spot shape k, the spot scales
        per (layer, ring, bin of reconstructed energy) by occupancy matching; then per layer
        the k whose scales give the highest censored likelihood of a random sample of that
        layer's training voxels (up to ``max_voxels_per_layer``) given their reconstructions.
        With the ``"scale-then-threshold"`` readout, which lights a few more voxels than the
        noise alone, the scales are then fitted once more to occupancy targets corrected by
        the ratio of the two (:meth:`_readout_occupancy_ratio`). Fills the ``spot_*`` buffers;
        returns the mean log-likelihood of every candidate per layer (for reports and tests)."""
        return self._fit_spot_noise(_tensor_chunks(incident_energies, showers, self._chunk_rows()), len(showers),
                                    max_voxels_per_layer=max_voxels_per_layer, seed=seed)

    def _fit_spot_noise(self, chunks: TensorChunks, n_showers: int, *, max_voxels_per_layer: int = 30_000,
                        seed: int = 0) -> dict[str, Any]:
        """:meth:`fit_spot_noise` on the ``n_showers`` showers of ``chunks()`` (a few passes;
        memory: one chunk and the voxel sample, whatever ``n_showers``)."""
        sums, (means, energies, cells) = self._spot_noise_statistics(chunks, n_showers, max_voxels_per_layer, seed)
        n_bins = len(_QUANTA_BIN_EDGES) + 1
        layer_of_cell = np.repeat(np.arange(self.n_layers), self.n_rings * n_bins)
        candidates = {k: self._spot_scale_table(*sums, k) for k in spot_noise.SHAPE_GRID}
        near_threshold = next(iter(candidates.values()))[1].flatten()  # the same cells for every k
        candidates = {k: table for k, (table, _) in candidates.items()}
        flat_candidates = {k: table.flatten() for k, table in candidates.items()}
        rng = np.random.default_rng(seed)
        shapes, scores = np.zeros(self.n_layers), {}
        for layer in range(self.n_layers):
            mine = np.nonzero((layer_of_cell[cells] == layer) & near_threshold[cells])[0]
            mine = rng.permutation(mine)[:max_voxels_per_layer]
            shapes[layer], scores[layer] = spot_noise.choose_shape(flat_candidates, means[mine], energies[mine],
                                                                   cells[mine], self.threshold)
        self._store_spot_noise(shapes, self._table_of_shapes(candidates, shapes))
        if self.per_layer and self.config.output_threshold and self.config.layer_readout == "scale-then-threshold":
            ratio = self._readout_occupancy_ratio(chunks, n_showers, seed)
            corrected = [sums[0], sums[1], sums[2] * ratio]
            refitted = {k: self._spot_scale_table(*corrected, k)[0] for k in set(shapes.tolist())}
            self._store_spot_noise(shapes, self._table_of_shapes(refitted, shapes))
        return {"spot_shapes": shapes.tolist(), "log_likelihood": scores}

    def _table_of_shapes(self, tables: dict[float, np.ndarray], shapes: np.ndarray) -> np.ndarray:
        """The (groups, bins) spot-scale table whose rows of each layer come from that layer's shape's table."""
        table = np.zeros_like(next(iter(tables.values())))
        for layer, shape in enumerate(shapes):
            rows = slice(layer * self.n_rings, (layer + 1) * self.n_rings)
            table[rows] = tables[float(shape)][rows]
        return table

    def _store_spot_noise(self, shapes: np.ndarray, table: np.ndarray) -> None:
        self.spot_shapes.copy_(torch.as_tensor(shapes, dtype=torch.float32))
        self.spot_scales.copy_(torch.as_tensor(table, dtype=torch.float32))
        self.spot_quantiles.copy_(spot_noise.quantile_table(shapes).reshape(-1, spot_noise.TABLE_POINTS))

    def _fine_bins(self) -> tuple[Tensor, Any]:
        """The sub-bin edges of log10(reconstructed energy) and a function that regroups
        per-sub-bin sums (..., groups * sub-bins) into (..., groups, bins, _SUB_BINS)."""
        edges = _QUANTA_BIN_EDGES
        n_bins, n_groups = len(edges) + 1, self.n_layers * self.n_rings
        fine_edges = torch.linspace(float(edges[0]), float(edges[-1]), _SUB_BINS * (len(edges) - 1) + 1,
                                    dtype=torch.float64)
        n_fine = len(fine_edges) + 1
        # fine bin f lies in table bin ceil(f / _SUB_BINS): (groups, bins, sub-bins), empty padding
        coarse = -(-np.arange(n_fine) // _SUB_BINS)
        position = np.arange(n_fine) - (coarse - 1) * _SUB_BINS - 1
        position[0] = 0

        def group(fine_sums: np.ndarray) -> np.ndarray:
            lead = fine_sums.shape[:-1]
            grouped = np.zeros(lead + (n_groups, n_bins, _SUB_BINS))
            grouped[..., coarse, position] = fine_sums.reshape(lead + (n_groups, n_fine))
            return grouped

        return fine_edges, group

    def _spot_noise_statistics(self, chunks: TensorChunks, n_showers: int, max_voxels_per_layer: int,
                               seed: int) -> tuple[list[np.ndarray], tuple[np.ndarray, ...]]:
        """Per (group, bin, sub-bin) sums of voxels, reconstructed energies and voxels above
        threshold over the ``n_showers`` training showers of ``chunks()``, and a seeded random
        sample of voxels (reconstructed and true energy, table cell) for the spot-shape
        likelihood (about 4 ``max_voxels_per_layer`` per layer, whatever ``n_showers``)."""
        edges = _QUANTA_BIN_EDGES.to(self.latent_mean.device)
        n_bins = len(edges) + 1
        fine_edges, group = self._fine_bins()
        n_fine = len(fine_edges) + 1
        sums = torch.zeros(3, self.n_layers * self.n_rings * n_fine, dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed)
        keep_share = min(1.0, 4.0 * max_voxels_per_layer * self.n_layers / max(1, n_showers * self.n_voxels))
        sample: list[tuple[Tensor, Tensor, Tensor]] = []
        for e, x in _pieces(chunks, self._chunk_rows()):
            mean = self._reconstruct(e, x, postprocess=False).double().cpu()
            clean = self._clean(x.double()).cpu()
            log_mean = mean.clamp_min(1e-30).log10()
            group_index = self.voxel_group_index.cpu()
            cell = group_index * n_bins + torch.bucketize(log_mean, edges.cpu())
            fine = (group_index * n_fine + torch.bucketize(log_mean, fine_edges)).flatten()
            for row, values in enumerate((torch.ones_like(mean), mean, (clean > 0).double())):
                sums[row].index_add_(0, fine, values.flatten())
            chosen = (torch.rand(mean.shape, generator=generator) < keep_share) & (mean > 1e-3 * self.threshold)
            sample.append((mean[chosen], clean[chosen], cell[chosen]))
        voxels = tuple(torch.cat(column).numpy() for column in zip(*sample))
        return list(group(sums.numpy())), voxels

    def _readout_occupancy_ratio(self, chunks: TensorChunks, n_showers: int, seed: int, *,
                                 max_showers: int = 40_000, min_lit: int = 20) -> np.ndarray:
        """Per (group, bin, sub-bin): voxels the fitted noise alone puts above the threshold
        over voxels the whole readout lights, on reconstructions of (a strided subset of) the
        training showers with their own layer energies. Multiplying the training occupancy
        by it makes the readout's occupancy match the training one. 1 where either count is
        below ``min_lit``; clipped to [0.5, 2]."""
        fine_edges, group = self._fine_bins()
        n_fine = len(fine_edges) + 1
        counts = torch.zeros(2, self.n_layers * self.n_rings * n_fine, dtype=torch.float64)
        generator = torch.Generator().manual_seed(seed + 1)
        stride = max(1, -(-n_showers // max_showers))
        pipeline = self._pipeline()
        for e, x in _every_nth(chunks, stride, self._chunk_rows()):
            mean = self._reconstruct(e, x, postprocess=False).float().cpu()
            normal, uniform, spot_normal = (torch.randn(mean.shape, generator=generator),
                                            torch.rand(mean.shape, generator=generator),
                                            torch.randn(mean.shape, generator=generator))
            noisy = self._spots(mean, normal, uniform, spot_normal)
            read = threshold_keeping_layer_energies(noisy, pipeline.layers.layer_energies(mean), self.layer_layout,
                                                    self.threshold)
            fine = (self.voxel_group_index.cpu() * n_fine
                    + torch.bucketize(mean.double().clamp_min(1e-30).log10(), fine_edges)).flatten()
            counts[0].index_add_(0, fine, (noisy >= self.threshold).double().flatten())
            counts[1].index_add_(0, fine, (read > 0).double().flatten())
        noise_lit, read_lit = counts.numpy()
        usable = (noise_lit >= min_lit) & (read_lit >= min_lit)
        ratio = np.where(usable, noise_lit / np.maximum(read_lit, 1), 1.0).clip(0.5, 2.0)
        return group(ratio)

    def _spot_scale_table(self, counts: np.ndarray, mean_sums: np.ndarray, occupied: np.ndarray, shape: float
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Spot scales (n_groups, n_bins) in MeV for one spot shape, and the mask of cells
        fitted by occupancy; groups with no usable bin take the median of their layer's
        fitted scales (or the threshold, if none)."""
        fits = [spot_noise.fit_scales(c, m, o, shape, self.threshold) for c, m, o in zip(counts, mean_sums, occupied)]
        table = np.stack([scales for scales, _ in fits])
        by_occupancy = np.stack([mask for _, mask in fits])
        for layer in range(self.n_layers):
            rows = table[layer * self.n_rings:(layer + 1) * self.n_rings]
            fitted = rows[np.isfinite(rows)]
            rows[~np.isfinite(rows)] = float(np.median(fitted)) if fitted.size else self.threshold
        return table, by_occupancy

    # -- generation ----------------------------------------------------------------------
    def noise_shape(self) -> NoiseShape:
        """Standard normals: the layer-energy flow's (per-layer only), the latent flow's (or the
        EBIM start and its Langevin increments) and (Poisson voxel noise) one per voxel;
        uniforms: one per voxel (Poisson voxel noise)."""
        blocks = [NoiseBlock("layer_energies", self.n_layers)] if self.per_layer else []
        blocks.append(NoiseBlock("latent", self.config.latent_dim))
        if self.latent_ebim is not None:
            blocks.append(NoiseBlock("latent_langevin", self.latent_ebim.noise_size))
        if self.config.voxel_noise != "none":
            blocks += [NoiseBlock("voxels", self.n_voxels), NoiseBlock("voxels", self.n_voxels, "uniform")]
        if self.config.voxel_noise == "poisson-gamma":
            blocks.append(NoiseBlock("spot_energies", self.n_voxels))
        return NoiseShape(tuple(blocks))

    def sample_from_noise(self, incident_energies: Tensor, normal: Tensor, uniform: Tensor | None = None) -> Tensor:
        incident = incident_energies.reshape(-1).to(self.latent_mean.dtype)
        normal = normal.to(incident.dtype)
        columns = self.noise_shape().offsets()
        pipeline = self._pipeline()
        scaled = pipeline.incident.forward(incident).reshape(-1, 1).to(incident.dtype)
        if self.per_layer:
            encoded = self.layer_energy.from_noise(normal[:, columns["layer_energies"]], scaled)
            condition = torch.cat((scaled, self.condition_energies(incident, encoded, pipeline) / LOGIT_BOUND), dim=-1)
        else:
            encoded, condition = None, scaled
        codes = self._sample_codes(normal, columns, condition)
        decoded = self.autoencoder.decode(codes * self.latent_std + self.latent_mean, self._ae_context(condition))
        voxel_noise = None
        if "voxels" in columns:
            voxel_noise = (normal[:, columns["voxels"]], uniform)
            if "spot_energies" in columns:
                voxel_noise += (normal[:, columns["spot_energies"]],)
        return self._to_showers(pipeline, incident, decoded, encoded, voxel_noise=voxel_noise)

    def _sample_codes(self, normal: Tensor, columns: dict[str, slice], condition: Tensor) -> Tensor:
        """Standardised codes (n, d) from the latent noise columns, by the configured latent density."""
        if self.latent_ebim is not None:
            return self.latent_ebim.sample_from_noise(condition, normal[:, columns["latent"]],
                                                      normal[:, columns["latent_langevin"]])
        return self.latent_flow.transform_inverse(normal[:, columns["latent"]], condition)

    def _to_showers(self, pipeline: Any, incident: Tensor, decoded: Tensor, encoded: Tensor | None, *,
                    voxel_noise: tuple[Tensor, ...] | None = None, postprocess: bool = True) -> Tensor:
        """Decoded features -> showers (n, V) in MeV, then the voxel noise driven by
        ``voxel_noise`` = (normal, uniform[, spot normal]) (n, V) each (None: none) and
        (``postprocess``) the readout threshold."""
        noisy = voxel_noise is not None
        threshold = postprocess and self.config.output_threshold
        if not self.per_layer:
            showers = pipeline.inverse(incident, decoded)
            showers = self._fluctuate(showers, *voxel_noise) if noisy else showers
            return apply_threshold(showers, self.threshold) if threshold else showers
        # Decoded in float64: in float32, rounding of u-variables near 0 or 1 is amplified in the
        # energies of nearly empty back layers (ONNX Runtime and PyTorch differed there by 3e-4).
        layer_energies = pipeline.energies.inverse(incident.double(), encoded.double()).to(decoded.dtype)
        showers = pipeline.layers.inverse(decoded, layer_energies)
        if not (noisy or threshold):
            return showers
        showers = self._fluctuate(showers, *voxel_noise) if noisy else showers
        if threshold and self.config.layer_readout == "scale-then-threshold":
            return threshold_keeping_layer_energies(showers, layer_energies, self.layer_layout, self.threshold)
        showers = apply_threshold(showers, self.threshold) if threshold else showers
        # Rescale every layer to its sampled energy (a layer left empty stays empty).
        kept = pipeline.layers.layer_energies(showers)
        factor = torch.where(kept > 0, layer_energies / kept.clamp_min(1e-30), torch.zeros_like(kept))
        return showers * pipeline.layers.to_voxels(factor)

    def _fluctuate(self, showers: Tensor, normal: Tensor, uniform: Tensor, spot_normal: Tensor | None = None
                   ) -> Tensor:
        """The configured voxel noise on showers (n, V) in MeV, from noise (n, V) each."""
        if spot_normal is None:
            return self._poisson(showers, normal, uniform)
        return self._spots(showers, normal, uniform, spot_normal)

    def _spots(self, showers: Tensor, normal: Tensor, uniform: Tensor, spot_normal: Tensor) -> Tensor:
        """Each voxel of showers (n, V) in MeV as theta Gamma(N k), N ~ Poisson(x / (k theta)),
        with k its layer's spot shape and theta its (layer, ring, energy) spot scale
        (:func:`~caloman.models.spot_noise.spot_fluctuations`)."""
        scales = self._per_voxel_entry(self.spot_scales, showers)
        shapes = self.spot_shapes.to(showers.dtype)[self.voxel_layer_index]
        return spot_noise.spot_fluctuations(showers, scales, shapes, self.spot_table_rows, self.spot_quantiles,
                                            normal, uniform, spot_normal)

    def _per_voxel_entry(self, table: Tensor, showers: Tensor) -> Tensor:
        """Each voxel's entry (n, V) of a (layer * ring, energy bin) table, the bin from the
        voxel's energy in showers (n, V) MeV: one flat gather (ONNX-friendly) instead of
        indexing with two index tensors."""
        cells = self.voxel_group_index * table.shape[1] + quanta_bins(showers)
        return take(table.to(showers.dtype).flatten(), cells)

    def _poisson(self, showers: Tensor, normal: Tensor, uniform: Tensor) -> Tensor:
        """Each voxel x of showers (n, V) drawn as q Poisson(x / q) from the noise (n, V) each
        (:func:`~caloman.models.voxel_noise.poisson_fluctuations`), q from its (layer, ring,
        energy) entry of ``voxel_quanta_table`` (or its layer's quantum for a model without
        the table; q = 0 keeps x)."""
        if bool((self.voxel_quanta_table > 0).any()):
            quanta = self._per_voxel_entry(self.voxel_quanta_table, showers)
        else:
            quanta = self.voxel_quanta.to(showers.dtype)[self.voxel_layer_index].expand_as(showers)
        return poisson_fluctuations(showers, quanta, normal, uniform)

    # -- density and reconstruction -------------------------------------------------------
    def reconstruct(self, incident_energies: Tensor, showers: Tensor) -> Tensor:
        """Showers (n, V) in MeV passed through encoder and decoder and post-processed
        (per-layer keeps the true layer energies). Deterministic: posterior-mean codes,
        no voxel noise."""
        return self._reconstruct(torch.as_tensor(incident_energies), torch.as_tensor(showers), postprocess=True)

    def _reconstruct(self, incident_energies: Tensor, showers: Tensor, *, postprocess: bool) -> Tensor:
        features = self._features(incident_energies, showers)
        decoded = self.autoencoder.decode(self._codes(features), self._ae_context(features.condition))
        incident = incident_energies.reshape(-1).to(decoded.dtype)
        return self._to_showers(self._pipeline(), incident, decoded, features.layer_features,
                                postprocess=postprocess)

    def reconstruction_error(self, incident_energies: Tensor, showers: Tensor) -> Tensor:
        """Per-shower reconstruction loss (n,) in the autoencoder's feature space, the
        quantity it was trained on (squared error, or per-layer KL of the shapes)."""
        features = self._features(torch.as_tensor(incident_energies), torch.as_tensor(showers))
        logits = self.autoencoder.decode_logits(self._codes(features), self._ae_context(features.condition))
        return self.autoencoder.reconstruction_loss(features.voxels, logits)

    def log_prob_on_manifold(self, incident_energies: Tensor, showers: Tensor) -> Tensor:
        """log p_M(x | E) = log p(z | c) - 0.5 log det(J^T J) (CaloMan paper Eq. 1), shape (n,),
        with z the (unstandardised) code of x, J = d psi / d z (D x d) the decoder's Jacobian
        at z; per-layer adds log p(e | E) of the encoded layer energies.

        Caveat: this is a density of the *preprocessed* features (layer shapes and
        logit-space u-variables, or the paper's scaled voxels) on the decoder's
        manifold; the Jacobian of the preprocessing is not included, so values compare
        showers of one binning and model, not across preprocessings. The shower's
        distance from the manifold is ignored (see :meth:`reconstruction_error`). For an
        M-flow autoencoder the code is the exact inverse of the decoder on its manifold, so
        this is the exact density of the model's showers on it; for the MLP family the
        encoder only approximates that inverse.
        """
        if self.latent_ebim is not None:
            raise ConfigError("latent_density = 'ebim' has no normalised density (the energy's normalisation "
                              "Z(E_inc) is unknown): use a run with the latent flow for densities and OOD scores")
        features = self._features(torch.as_tensor(incident_energies), torch.as_tensor(showers))
        context = self._ae_context(features.condition)
        codes = self._codes(features)
        standardised = (codes - self.latent_mean) / self.latent_std
        log_p = self.latent_flow.log_prob(standardised, features.condition) - self.latent_std.log().sum()
        log_p = log_p.double() - gram_log_det(self.autoencoder.decode, codes, context)
        if self.per_layer:
            log_p = log_p + self.layer_energy.log_prob(features.layer_features, features.incident).double()
        return log_p

    def latent_codes(self, incident_energies: Tensor, showers: Tensor) -> Tensor:
        """Standardised codes (n, d) of showers (n, V) in MeV, as the latent density sees them
        (the posterior mean for a VAE; empty layers dequantised to the middle of their range)."""
        incident, showers = torch.as_tensor(incident_energies), torch.as_tensor(showers)
        codes = [self._codes(self._features(incident[i:i + _CHUNK], showers[i:i + _CHUNK]))
                 for i in range(0, len(showers), _CHUNK)]
        return (torch.cat(codes) - self.latent_mean) / self.latent_std

    def project(self, incident_energies: Tensor, showers: Tensor) -> Tensor:
        """The nearest point on the learned manifold, as the autoencoder defines "nearest":
        showers (n, V) in MeV decoded from their own codes (:meth:`reconstruct`)."""
        return self.reconstruct(incident_energies, showers)

    def ood_score(self, incident_energies: Tensor, showers: Tensor, distance_scale: float = 1.0) -> Tensor:
        """Out-of-distribution score (n,) float64, larger = more anomalous: the distance from
        the manifold (:meth:`reconstruction_error`) divided by ``distance_scale`` minus the
        log density of the shower's projection on it (:meth:`log_prob_on_manifold`), the two
        criteria of Brehmer & Cranmer 2020 in one number (``distance_scale`` sets their
        balance; :func:`caloman.ood.fit_distance_scale` picks one from normal showers)."""
        distance = self.reconstruction_error(incident_energies, showers).double()
        return distance / distance_scale - self.log_prob_on_manifold(incident_energies, showers)

    def latent_blocks(self) -> tuple[str, ...]:
        """The base spaces of the two flows (layer-energy flow for per-layer preprocessing,
        latent flow) form the refinable latent; the voxel noise is the path's own noise."""
        return ("layer_energies", "latent") if self.per_layer else ("latent",)
