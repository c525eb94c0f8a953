"""CaloFlow (Krause & Shih 2021, arXiv:2106.05285): two conditional normalizing
flows, the normalizing-flow baseline CaloMan is compared with.

Flow I (stage ``"layer_energy"``, section 4.1)
    p(E_0, ..., E_{L-1} | E_inc): the layer energies as energy-conserving
    u-variables in logit space (alpha = 1e-6; :class:`LayerEnergyEncoding`),
    modelled by :class:`LayerEnergyModel` (spline bound 14) conditioned on
    log10(E_inc / 10 GeV) (Eq. 4.4).
Flow II (stage ``"shape_flow"``, section 4.2)
    p(shapes | E_inc, E_i): a masked autoregressive flow (MAF) of
    rational-quadratic splines (bound 14) on all voxels. Training voxels get
    uniform noise in [0, 1] keV, fresh for every batch; each layer is then
    normalised to one and mapped to logit space (alpha = 1e-6). The condition
    is [log10(E_inc / 10 GeV), log10((E_i + 1 keV) / 100 GeV) + 2] (Eq. 4.4-4.5),
    with the layer energies of the (un-noised) data.

Generation (section 4.3): layer energies from Flow I, shapes from Flow II,
the logit undone and clipped to [0, 1], each layer renormalised to one and
multiplied by its sampled energy (so the layers carry exactly Flow I's
energies), then voxels below the binning's readout threshold are zeroed and,
by default, each layer is rescaled back to its sampled energy (see
:class:`CaloFlowConfig`).

Flow II's density costs one network pass per MADE block; sampling it costs
one pass per voxel per block (n_voxels x transforms passes, 368 x 8 = 2944
for dataset-1 photons at the paper's size), which is CaloFlow's known price.
:func:`maf_inverse` keeps that structure but computes in each pass only the
one feature it determines (zuko's inverse, like nflows', recomputes all of
them), which makes sampling 50 to 90 times faster at batch 100 and changes
nothing else.

Differences from the paper, all for want of the option in the flow library
or to fit this package's data:
* Flow I uses coupling spline transforms (:class:`LayerEnergyModel`, shared with
  CaloMan), not MADE blocks.
* Flow II's autoregressive order alternates forward and reversed over the whole
  voxel vector (the paper: layer-wise inversions and permutations), and its
  MADE blocks have no dropout (the paper: 5 %).
* Training voxels below the readout threshold are zeroed first and empty layers
  get a small uniform energy in Flow I's training data (both as in CaloMan),
  because dataset-1 layers are often empty (the paper's CaloGAN layers rarely are).
* The output threshold is the binning's readout threshold (1 MeV for dataset 1;
  the paper: 10 keV), which every metric applies too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from caloman.errors import ConfigError
from caloman.geometry import Binning
from caloman.models.base import ArrayChunks, NoiseBlock, NoiseShape, ShowerModel, Stage
from caloman.models.config import ModelConfig, check_flow_sizes
from caloman.models.flows import ConditionalFlow, rqs_inverse
from caloman.models.layer_energy import LOGIT_BOUND, LayerEnergyModel
from caloman.preprocessing import (
    LOGIT_ALPHA,
    LayerEnergyEncoding,
    LayerNormalisation,
    apply_threshold,
    inverse_logit,
    logit,
)

#: CaloFlow's reference energies (MeV): E_inc / 10 GeV (Eq. 4.4), (E_i + 1 keV) / 100 GeV (Eq. 4.5).
INCIDENT_REFERENCE_MEV = 1e4
LAYER_REFERENCE_MEV = 1e5
LAYER_OFFSET_MEV = 1e-3

#: Showers per chunk when a stage's data is built from a whole split.
_CHUNK = 4096
#: Most sequential Flow II network passes (n_voxels x transforms) an ONNX export unrolls. Measured
#: (2026-12-02, 2-core CPU): 368 x 2 passes with 16-unit MADE blocks took 218 s to export, made a
#: 14 MB graph that ONNX Runtime needs 35 s to open and runs at 86 ms per shower at batch 1.
MAX_EXPORTED_MADE_PASSES = 128


# -- conditions and noise, shared with the ambient flow ----------------------------------------
def incident_condition(incident_energies: Tensor) -> Tensor:
    """log10(E_inc / 10 GeV) (CaloFlow Eq. 4.4), shape (n, 1), for E_inc (n,) in MeV."""
    return torch.log10(incident_energies.reshape(-1, 1) / INCIDENT_REFERENCE_MEV)


def layer_energy_condition(layer_energies: Tensor) -> Tensor:
    """log10((E_i + 1 keV) / 100 GeV) + 2 (CaloFlow Eq. 4.5), shape (n, L), for E_i (n, L) in MeV."""
    return torch.log10((layer_energies + LAYER_OFFSET_MEV) / LAYER_REFERENCE_MEV) + 2


def noise_level_mev(noise_kev: float, threshold_mev: float) -> float:
    """Upper end (MeV) of the uniform voxel noise: ``noise_kev``, capped at the readout
    threshold so that noise alone never survives the output threshold."""
    level = 1e-3 * float(noise_kev)
    return min(level, threshold_mev) if threshold_mev > 0 else level


def stored_noise(showers: Tensor, enabled: bool) -> Tensor:
    """Unit uniform noise (n, V), float16, drawn once per shower for validation losses that do
    not change between epochs (training draws afresh); (n, 0) when noise is off."""
    if not enabled:
        return showers.new_zeros((len(showers), 0))
    return torch.rand(showers.shape, device=showers.device).half()


def noisy_voxels(showers: Tensor, unit_noise: Tensor | None, level_mev: float) -> Tensor:
    """Showers (n, V) in MeV plus uniform noise in [0, level_mev), in float64: fresh when
    ``unit_noise`` is None, else ``level_mev`` x the stored unit noise."""
    x = showers.double()
    if level_mev <= 0 or (unit_noise is not None and unit_noise.shape[-1] == 0):
        return x
    u = torch.rand_like(x) if unit_noise is None else unit_noise.double()
    return x + level_mev * u


# -- sampling a masked autoregressive flow ------------------------------------------------------
def maf_inverse(flow: ConditionalFlow, z: Tensor, context: Tensor) -> Tensor:
    """x = f^{-1}(z | c) for an autoregressive :class:`ConditionalFlow` (``coupling=False``):
    base points z (n, D), context (n, C) -> (n, D). Only for sampling (no autograd).

    Still one MADE pass per feature per transform, but zuko's inverse evaluates all D
    output groups and D splines in each of those passes to keep one feature; here a pass
    evaluates only that feature's output rows and spline, and the first layer is updated by
    the one new input (a rank-1 update). Same result as zuko's (tested); for CaloFlow's Flow II
    on dataset 1 at batch 100, 50 to 90 times faster. Coupling flows go to
    :meth:`ConditionalFlow.transform_inverse`.
    """
    if flow.coupling or flow.features < 2:
        return flow.transform_inverse(z, context)
    x = z
    for layer in reversed(flow.flow.transform.transforms):
        x = _made_inverse(layer, x, context, flow.bound)
    return x


def _made_inverse(layer: nn.Module, y: Tensor, context: Tensor, bound: float) -> Tensor:
    linears = [m for m in layer.hyper if isinstance(m, nn.Linear)]
    if any(not isinstance(m, nn.Linear | nn.ReLU) for m in layer.hyper):
        raise ValueError("maf_inverse expects a MADE of linear layers with ReLU activations")
    # zuko's MaskedLinear multiplies weight and mask in every call: do it once.
    weights = [m.weight * m.mask for m in linears]
    biases = [m.bias for m in linears]
    n, features = y.shape
    first = weights[0]  # (H, D + C): the inputs x, then the context
    pre = torch.addmm(biases[0], context.to(y.dtype), first[:, features:].T)  # x = 0 at the start
    out_weight = weights[-1].unflatten(0, (features, layer.total))  # rows grouped per feature
    out_bias = biases[-1].unflatten(0, (features, layer.total))
    columns: dict[int, Tensor] = {}
    # Feature i depends on the features of lower order: fix them in increasing order.
    for i in torch.argsort(layer.order).tolist():
        h = torch.relu(pre)
        for weight, bias in zip(weights[1:-1], biases[1:-1]):
            h = torch.relu(torch.addmm(bias, h, weight.T))
        params = torch.addmm(out_bias[i], h, out_weight[i].T)  # (n, 3K - 1)
        columns[i] = rqs_inverse(params.unsqueeze(1), y[:, i:i + 1], bound)  # (n, 1)
        pre = pre + columns[i] * first[:, i]
    # Gathered at the end rather than written in place: a traced graph (ONNX) records it as one concat.
    return torch.cat([columns[i] for i in range(features)], dim=-1)


@dataclass(frozen=True)
class CaloFlowConfig(ModelConfig):
    """Everything that defines an (untrained) CaloFlow model.

    Flow I (layer energies, coupling RQS flow with bound 14):
        layer_flow_transforms, layer_flow_hidden, layer_flow_bins. The paper
        (Table 2): 6 MADE blocks with an input layer of 64 and two hidden
        layers of 64, i.e. three layers of 64, 8 bins.
    Flow II (shapes, MAF with RQS, bound 14):
        shape_flow_transforms, shape_flow_hidden, shape_flow_bins. The paper
        (504 voxels): 8 MADE blocks of 378 / 1 x 378 units, i.e. two hidden
        layers of 378, 8 bins.
        shape_alpha: logit regulariser of the shapes (the paper's 1e-6).
    Noise and thresholds:
        noise: add uniform noise in [0, ``noise_kev``] keV to every training
            voxel before the layers are normalised (the paper's noise
            regularisation); capped at the readout threshold.
        threshold_inputs: zero training voxels below the readout threshold first.
        dequantise_empty_layers: Flow I sees an empty layer as a uniform energy
            below half the readout threshold (no point mass at u = 0).
        output_threshold: zero generated voxels below the readout threshold.
        rescale_after_threshold: then rescale each layer to its sampled energy
            (Flow I learnt the energies of thresholded showers); the paper
            thresholds at 10 keV and does not rescale.
    """

    layer_flow_transforms: int = 6
    layer_flow_hidden: tuple[int, ...] = (64, 64, 64)
    layer_flow_bins: int = 8
    shape_flow_transforms: int = 8
    shape_flow_hidden: tuple[int, ...] = (378, 378)
    shape_flow_bins: int = 8
    shape_alpha: float = LOGIT_ALPHA
    noise: bool = True
    noise_kev: float = 1.0
    threshold_inputs: bool = True
    dequantise_empty_layers: bool = True
    output_threshold: bool = True
    rescale_after_threshold: bool = True

    label = "caloflow"
    profiles = ("quick", "full", "paper")

    def __post_init__(self) -> None:
        check_flow_sizes(self, ("layer_flow_transforms", "shape_flow_transforms"),
                         ("layer_flow_bins", "shape_flow_bins"), ("layer_flow_hidden", "shape_flow_hidden"))
        if not 0 < self.shape_alpha < 0.5:
            raise ConfigError(f"model option shape_alpha must lie in (0, 0.5), got {self.shape_alpha}")
        if not self.noise_kev >= 0:
            raise ConfigError(f"model option noise_kev must be >= 0, got {self.noise_kev}")

    @classmethod
    def quick(cls) -> CaloFlowConfig:
        """Paper-sized Flow I; Flow II of 4 MADE blocks of 2 x 64 units (dataset 1: about 3 ms
        per shower at batch 100 on one CPU thread; about 3 s per training epoch on 1,600 showers)."""
        return cls(shape_flow_transforms=4, shape_flow_hidden=(64, 64))

    @classmethod
    def full(cls) -> CaloFlowConfig:
        """Sized for a 2-core CPU: paper-sized Flow I; Flow II of 4 MADE blocks of 2 x 128 units
        (4.7 M parameters for dataset 1; the full-profile training on 80,004 showers took
        58 min on two CPU cores, 2026-11-30). The paper's Flow II (8 x (378, 378), 28 M parameters) is ``paper``."""
        return cls(shape_flow_transforms=4, shape_flow_hidden=(128, 128))

    @classmethod
    def paper(cls) -> CaloFlowConfig:
        """The paper's sizes (Table 2): Flow I 6 x (64, 64, 64), Flow II 8 x (378, 378), 8 bins
        (the dataclass defaults)."""
        return cls()


# -- the model -----------------------------------------------------------------------------------
class CaloFlowModel(ShowerModel):
    """CaloFlow for one binning; see the module docstring."""

    kind = "caloflow"

    def __init__(self, config: CaloFlowConfig, binning: Binning) -> None:
        super().__init__(config, binning)
        self.noise_mev = noise_level_mev(config.noise_kev, self.threshold) if config.noise else 0.0
        self.layers = LayerNormalisation(binning)
        self.n_layers = self.layers.n_layers
        self.layer_energy = LayerEnergyModel(self.n_layers, 1, config.layer_flow_transforms,
                                             config.layer_flow_hidden, config.layer_flow_bins)
        self.shape_flow = ConditionalFlow(self.n_voxels, 1 + self.n_layers, config.shape_flow_transforms,
                                          config.shape_flow_hidden, config.shape_flow_bins, bound=LOGIT_BOUND,
                                          coupling=False)
        # s of the u-variables (u_0 = E_dep / (s E_inc)), fitted on the training showers.
        self.register_buffer("energy_u0_scale", torch.tensor(1.0, dtype=torch.float64))

    # -- preprocessing ---------------------------------------------------------------------
    def _clean(self, showers: Any) -> Any:
        return apply_threshold(showers, self.threshold) if self.config.threshold_inputs else showers

    def _encoding(self) -> LayerEnergyEncoding:
        return LayerEnergyEncoding(self.energy_u0_scale)

    def fit_preprocessing(self, incident_energies: np.ndarray, showers: np.ndarray) -> None:
        self.fit_preprocessing_chunks(lambda: iter([(incident_energies, showers)]))

    def fit_preprocessing_chunks(self, chunks: ArrayChunks) -> None:
        """s of the u-variables and the energy range: maxima and minima, exact chunk by chunk."""
        encoding, low, high = LayerEnergyEncoding(), np.inf, -np.inf
        for incident_energies, showers in chunks():
            incident = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
            # Layer sums in float32 (relative error ~1e-6, enough for s) spare a float64 copy of every shower.
            layer_energies = self.layers.layer_energies(self._clean(np.asarray(showers))).astype(np.float64)
            encoding.partial_fit(incident, layer_energies)
            low, high = min(low, float(incident.min())), max(high, float(incident.max()))
        self.energy_u0_scale.fill_(float(encoding.u0_scale))
        self.energy_range.copy_(torch.tensor([low, high], dtype=torch.float64))

    def shape_features(self, showers: Tensor, unit_noise: Tensor | None = None) -> Tensor:
        """Flow II's features (n, V): showers (n, V) in MeV plus the voxel noise (fresh, or
        ``unit_noise`` x the noise level), each layer normalised to one, in logit space."""
        x = noisy_voxels(showers, unit_noise, self.noise_mev)
        totals = self.layers.to_voxels(self.layers.layer_energies(x))
        shapes = torch.where(totals > 0, x / totals.clamp_min(1e-300), torch.zeros_like(x))
        return logit(shapes, self.config.shape_alpha)

    def shape_condition(self, incident_energies: Tensor, layer_energies: Tensor) -> Tensor:
        """Flow II's condition (n, 1 + L) for E_inc (n,) and layer energies (n, L) in MeV."""
        return torch.cat((incident_condition(incident_energies), layer_energy_condition(layer_energies)), dim=-1)

    # -- training stages ---------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("layer_energy", self.layer_energy, self._layer_energy_data, self._layer_energy_loss,
                      compact=True),
                Stage("shape_flow", self.shape_flow, self._shape_data, self._shape_loss)]

    def _chunked(self, incident_energies: Tensor, showers: Tensor, fn) -> tuple[Tensor, ...]:
        parts = [fn(incident_energies[i:i + _CHUNK].double(), self._clean(showers[i:i + _CHUNK]))
                 for i in range(0, len(showers), _CHUNK)]
        return tuple(torch.cat(column) for column in zip(*parts))

    def _layer_energy_data(self, incident_energies: Tensor, showers: Tensor) -> tuple[Tensor, ...]:
        def one(e: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
            energies = self.layers.layer_energies(x.double())
            if self.config.dequantise_empty_layers and self.threshold > 0:
                energies = torch.where(energies > 0, energies, torch.rand_like(energies) * (0.5 * self.threshold))
            return self._encoding().forward(e, energies).float(), incident_condition(e).float()

        return self._chunked(incident_energies, showers, one)

    def _layer_energy_loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        features, condition = batch
        return self.layer_energy.loss(features, condition)

    def _shape_data(self, incident_energies: Tensor, showers: Tensor) -> tuple[Tensor, ...]:
        # The features are made per batch in the loss, so every epoch sees fresh noise.
        def one(e: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            condition = self.shape_condition(e, self.layers.layer_energies(x.double()))
            return x.float(), stored_noise(x, self.noise_mev > 0), condition.float()

        return self._chunked(incident_energies, showers, one)

    def _shape_loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        showers, unit_noise, condition = batch
        # Validation (module in eval mode) uses the noise stored with the data: a loss that
        # does not fluctuate between epochs for early stopping.
        features = self.shape_features(showers, None if self.shape_flow.training else unit_noise)
        return -self.shape_flow.log_prob(features.to(condition.dtype), condition).mean()

    # -- generation ---------------------------------------------------------------------------
    def noise_shape(self) -> NoiseShape:
        """Standard normals: Flow I's base sample (L), then Flow II's (one per voxel)."""
        return NoiseShape((NoiseBlock("layer_energies", self.n_layers), NoiseBlock("voxels", self.n_voxels)))

    def export_refusal(self) -> str | None:
        passes = self.n_voxels * self.config.shape_flow_transforms
        if passes <= MAX_EXPORTED_MADE_PASSES:
            return None
        return (f"CaloFlow's Flow II is a masked autoregressive flow: one shower takes n_voxels x transforms = "
                f"{self.n_voxels:,} x {self.config.shape_flow_transforms} = {passes:,} network passes in sequence, "
                f"which a static ONNX graph can hold only unrolled (above {MAX_EXPORTED_MADE_PASSES:,} passes the "
                "graph takes minutes to build and to open); generate with `caloman generate`, or export CaloMan or "
                "the ambient flow, whose coupling flows invert in one pass per transform")

    def sample_layer_energies(self, incident_energies: Tensor, noise: Tensor) -> Tensor:
        """Flow I: layer energies (n, L) in MeV, float64, summing to u_0 s E_inc, from its
        standard-normal base noise (n, L)."""
        e = incident_energies.reshape(-1).double()
        encoded = self.layer_energy.from_noise(noise.to(self._dtype()), incident_condition(e).to(self._dtype()))
        return self._encoding().inverse(e, encoded.double())

    def sample_unthresholded(self, incident_energies: Tensor, normal: Tensor) -> tuple[Tensor, Tensor]:
        """Layer energies (n, L) from Flow I and showers (n, V) in MeV from Flow II, each layer
        renormalised to its sampled energy, before the readout threshold (float64), from
        standard-normal noise (n, L + V) laid out as :meth:`noise_shape` says."""
        e = incident_energies.reshape(-1).double()
        columns = self.noise_shape().offsets()
        layer_energies = self.sample_layer_energies(e, normal[:, columns["layer_energies"]])
        condition = self.shape_condition(e, layer_energies).to(self._dtype())
        y = maf_inverse(self.shape_flow, normal[:, columns["voxels"]].to(condition.dtype), condition)
        shapes = inverse_logit(y.double(), self.config.shape_alpha)
        totals = self.layers.to_voxels(self.layers.layer_energies(shapes))
        # A layer whose every voxel was clipped to zero stays empty (its energy cannot be placed).
        shapes = torch.where(totals > 0, shapes / totals.clamp_min(1e-300), torch.zeros_like(shapes))
        return layer_energies, shapes * self.layers.to_voxels(layer_energies)

    def postprocess(self, showers: Tensor, layer_energies: Tensor) -> Tensor:
        """The readout threshold and (``rescale_after_threshold``) each layer rescaled back to
        its sampled energy (a layer left empty stays empty)."""
        if not self.config.output_threshold:
            return showers
        kept = apply_threshold(showers, self.threshold)
        if not self.config.rescale_after_threshold:
            return kept
        totals = self.layers.layer_energies(kept)
        factor = torch.where(totals > 0, layer_energies / totals.clamp_min(1e-300), torch.zeros_like(totals))
        return kept * self.layers.to_voxels(factor)

    def sample_from_noise(self, incident_energies: Tensor, normal: Tensor, uniform: Tensor | None = None) -> Tensor:
        layer_energies, showers = self.sample_unthresholded(incident_energies, normal)
        return self.postprocess(showers, layer_energies).to(self._dtype())

    def _dtype(self) -> torch.dtype:
        return next(self.shape_flow.parameters()).dtype


__all__ = ["CaloFlowConfig", "CaloFlowModel", "incident_condition", "layer_energy_condition", "noise_level_mev"]
