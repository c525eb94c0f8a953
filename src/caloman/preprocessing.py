"""Invertible transforms between physical showers (MeV) and model features.

Each transform is one small object with ``fit``, ``forward`` and ``inverse``;
its fitted constants are plain numbers exposed through ``state()`` (and
rebuilt by ``from_state``) so a model keeps them as buffers and its
``state_dict`` holds everything. ``forward`` and ``inverse`` accept numpy
arrays or torch tensors and return the same kind: the numpy path (float64)
fits and checks, the torch path runs inside the model's sampler without a
round trip through numpy. Constants in ``from_state`` may be 0-d tensors
(a model's buffers), which keeps the torch path on the model's device.

Two pipelines, chosen by name in :func:`make_preprocessing`:

``"paper"`` (CaloMan paper, section 3.1)
    voxels / (r_max E_inc) with r_max the largest E_dep / E_inc of the
    training showers, so voxels lie in [0, 1], plus E_dep / (r_max E_inc)
    appended as one more feature: (N, n_voxels + 1).
``"per-layer"`` (the authors' later submission; CaloFlow's Flow I / Flow II split)
    each layer's voxels divided by the layer energy (a shape summing to one)
    followed by the layer energies encoded as CaloFlow's u-variables in logit
    space: (N, n_voxels + n_layers), where n_layers counts the layers that hold
    voxels.

Incident energies are conditioned on as log E_inc scaled to [0, 1] over the
trained range (:class:`IncidentEnergyScaling`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from caloman.errors import ConfigError, InvalidEnergyError
from caloman.geometry import Binning

#: Names accepted by :func:`make_preprocessing`.
PREPROCESSINGS = ("paper", "per-layer")

#: Orders of :class:`LayerEnergyEncoding`'s chain of fractions: from the first layer (CaloFlow's)
#: or from the deepest.
LAYER_ENERGY_ORDERS = ("front", "back")
#: Orders of the condition's layer-energy chain: "flow" (the layer-energy flow's own) or a fixed one.
CONDITION_ORDERS = ("flow",) + LAYER_ENERGY_ORDERS

#: CaloFlow's logit regulariser (Krause & Shih 2021, Eq. 4.3): u in [0, 1] maps to [-13.8, 13.8].
LOGIT_ALPHA = 1e-6

#: Added to a layer's energy before dividing by it (MeV); keeps empty layers at zero.
LAYER_EPS_MEV = 1e-6

Array = Any  # numpy.ndarray or torch.Tensor; functions return the kind they are given


# -- numpy / torch neutral elementary operations ---------------------------------------
def _ops(x: Array) -> SimpleNamespace:
    if isinstance(x, torch.Tensor):
        return SimpleNamespace(
            log=torch.log, exp=torch.exp, sigmoid=torch.sigmoid, where=torch.where,
            flip=lambda a: torch.flip(a, dims=(-1,)),
            cat=lambda parts: torch.cat(parts, dim=-1),
            ones_like=torch.ones_like, cumprod=_cumprod_last,
        )
    return SimpleNamespace(
        log=np.log, exp=np.exp, sigmoid=lambda a: 0.5 * (1 + np.tanh(0.5 * a)), where=np.where,
        flip=lambda a: a[..., ::-1],
        cat=lambda parts: np.concatenate(parts, axis=-1),
        ones_like=np.ones_like, cumprod=lambda a: a.cumprod(-1),
    )


def _cumprod_last(a: torch.Tensor) -> torch.Tensor:
    """Cumulative product over the last axis; traced (ONNX has no cumprod) as the same
    sequence of multiplications, column by column."""
    if not torch.jit.is_tracing():
        return a.cumprod(-1)
    columns = [a[..., :1]]
    for i in range(1, a.shape[-1]):
        columns.append(columns[-1] * a[..., i:i + 1])
    return torch.cat(columns, dim=-1)


def _column(x: Array) -> Array:
    """(n,) or (n, 1) -> (n, 1)."""
    return x.reshape(-1, 1)


def _as_float64(x: Array) -> Array:
    if isinstance(x, torch.Tensor):
        return x
    return np.asarray(x, dtype=np.float64)


def _scalar(value: Any) -> Any:
    """A state entry as a float, or kept as a (0-d) tensor for the torch path."""
    if isinstance(value, torch.Tensor):
        return value.reshape(())
    return float(np.asarray(value).reshape(()))


def _check_positive_energies(incident_energies: np.ndarray) -> None:
    if not np.all(np.isfinite(incident_energies)) or np.any(incident_energies <= 0):
        raise InvalidEnergyError("incident energies must be finite and positive (MeV); found "
                                 f"min {np.nanmin(incident_energies):g}: check the shower file")


def logit(u: Array, alpha: float = LOGIT_ALPHA) -> Array:
    """log(x / (1 - x)) with x = alpha + (1 - 2 alpha) u (CaloFlow Eq. 4.2-4.3); u in [0, 1]."""
    x = alpha + (1 - 2 * alpha) * u
    ops = _ops(u)
    return ops.log(x) - ops.log(1 - x)


def inverse_logit(y: Array, alpha: float = LOGIT_ALPHA) -> Array:
    """Inverse of :func:`logit`, clipped to [0, 1] (a generated y may lie beyond +-13.8)."""
    return ((_ops(y).sigmoid(y) - alpha) / (1 - 2 * alpha)).clip(0, 1)


# -- single transforms ----------------------------------------------------------------------
class IncidentEnergyScaling:
    """log E_inc mapped linearly to [0, 1] over the trained range [E_min, E_max]
    (the paper scales E_inc to [0, 1]; the log spreads dataset 1's powers of two
    evenly). A single trained energy maps to 0."""

    def __init__(self, log_min: Any = 0.0, log_max: Any = 1.0) -> None:
        self.log_min = _scalar(log_min)
        self.log_max = _scalar(log_max)
        self._fitted = False  # partial_fit has seen energies: it extends the range from now on

    def fit(self, incident_energies: np.ndarray) -> IncidentEnergyScaling:
        self._fitted = False
        return self.partial_fit(incident_energies)

    def partial_fit(self, incident_energies: np.ndarray) -> IncidentEnergyScaling:
        """Extend the fitted range by more incident energies (n,) MeV: chunk by chunk over a
        file it ends where :meth:`fit` on the whole file does (a minimum and a maximum)."""
        e = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
        _check_positive_energies(e)
        low, high = float(np.log(e.min())), float(np.log(e.max()))
        if self._fitted:
            low, high = min(self.log_min, low), max(self.log_max, high)
        self.log_min, self.log_max, self._fitted = low, high, True
        return self

    @property
    def _span(self) -> Any:
        span = self.log_max - self.log_min
        return span if float(span) > 0 else 1.0

    def forward(self, incident_energies: Array) -> Array:
        """E_inc (n,) in MeV -> scaled (n,)."""
        e = _as_float64(incident_energies)
        return (_ops(e).log(e) - self.log_min) / self._span

    def inverse(self, scaled: Array) -> Array:
        """Scaled (n,) -> E_inc (n,) in MeV."""
        s = _as_float64(scaled)
        return _ops(s).exp(self.log_min + s * self._span)

    def state(self) -> dict[str, np.ndarray]:
        return {"log_min": np.float64(self.log_min), "log_max": np.float64(self.log_max)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> IncidentEnergyScaling:
        return cls(state["log_min"], state["log_max"])


class PaperScaling:
    """The CaloMan paper's scaling: x = voxels / (r_max E_inc), with
    r_max = max E_dep / E_inc over the training showers, and E_dep / (r_max E_inc)
    appended. Training voxels land in [0, 1]; the inverse multiplies back and
    clips negative voxels to zero (the appended feature is dropped)."""

    def __init__(self, r_max: Any = 1.0) -> None:
        self.r_max = _scalar(r_max)
        self._largest = -np.inf  # largest E_dep / E_inc seen by partial_fit

    def fit(self, incident_energies: np.ndarray, showers: np.ndarray) -> PaperScaling:
        self._largest = -np.inf
        return self.partial_fit(incident_energies, showers)

    def partial_fit(self, incident_energies: np.ndarray, showers: np.ndarray) -> PaperScaling:
        """Take more showers into r_max (a maximum: chunk by chunk equals :meth:`fit`)."""
        e = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
        _check_positive_energies(e)
        ratio = np.asarray(showers).sum(axis=1, dtype=np.float64) / e
        if ratio.size:
            self._largest = max(self._largest, float(ratio.max()))
        self.r_max = self._largest if self._largest > 0 else 1.0
        return self

    def forward(self, incident_energies: Array, showers: Array) -> Array:
        """E_inc (n,), voxels (n, V) in MeV -> features (n, V + 1)."""
        showers = _as_float64(showers)
        scale = self.r_max * _column(_as_float64(incident_energies))
        x = showers / scale
        return _ops(x).cat([x, x.sum(-1).reshape(-1, 1)])

    def inverse(self, incident_energies: Array, features: Array) -> Array:
        """Features (n, V + 1) -> voxels (n, V) in MeV, non-negative."""
        scale = self.r_max * _column(_as_float64(incident_energies))
        return features[..., :-1].clip(0, None) * scale

    def state(self) -> dict[str, np.ndarray]:
        return {"r_max": np.float64(self.r_max)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PaperScaling:
        return cls(state["r_max"])


class LayerNormalisation:
    """Per-layer shapes: each layer's voxels divided by the layer energy
    (+ ``eps`` MeV), so non-empty layers sum to one and empty ones stay zero.
    The layer energies (n, n_layers) of the layers that hold voxels come back
    separately; the inverse multiplies each layer by (E_layer + eps), which
    makes the round trip exact. No fitted constants."""

    def __init__(self, binning: Binning, eps: float = LAYER_EPS_MEV) -> None:
        self.n_voxels = binning.n_voxels
        self.slices = [binning.layer_slice(layer) for layer in binning.relevant_layers]
        self.sizes = [s.stop - s.start for s in self.slices]
        self.eps = eps
        # Voxel -> layer index, to broadcast per-layer values to voxels in one gather.
        self.voxel_layer = np.repeat(np.arange(len(self.slices)), self.sizes)
        self.starts = np.array([s.start for s in self.slices])
        self._voxel_layer_torch: dict[torch.device, torch.Tensor] = {}

    @property
    def n_layers(self) -> int:
        return len(self.slices)

    def fit(self, *_: Any) -> LayerNormalisation:
        return self

    def layer_energies(self, showers: Array) -> Array:
        """Voxels (n, V) -> layer energies (n, n_layers): one sum per layer's slice (a tensor;
        11 times faster than one ``index_add`` at 10,000 showers, and what ONNX can express)
        or one segment sum (numpy)."""
        if isinstance(showers, torch.Tensor):
            return torch.stack([showers[:, s].sum(-1) for s in self.slices], dim=-1)
        return np.add.reduceat(showers, self.starts, axis=-1)

    def to_voxels(self, per_layer: Array) -> Array:
        """Per-layer values (n, n_layers) -> the value of each voxel's layer (n, V)."""
        if isinstance(per_layer, torch.Tensor):
            return per_layer.index_select(-1, self._index(per_layer))
        return per_layer[:, self.voxel_layer]

    def _index(self, like: torch.Tensor) -> torch.Tensor:
        index = self._voxel_layer_torch.get(like.device)
        if index is None:
            index = torch.as_tensor(self.voxel_layer, device=like.device)
            self._voxel_layer_torch[like.device] = index
        return index

    def forward(self, showers: Array) -> tuple[Array, Array]:
        """Voxels (n, V) in MeV -> (shapes (n, V), layer energies (n, n_layers) in MeV)."""
        showers = _as_float64(showers)
        energies = self.layer_energies(showers)
        return showers / self.to_voxels(energies + self.eps), energies

    def inverse(self, shapes: Array, layer_energies: Array) -> Array:
        """Shapes (n, V) and layer energies (n, n_layers) in MeV -> voxels (n, V) in MeV."""
        return shapes * self.to_voxels(layer_energies + self.eps)

    def state(self) -> dict[str, np.ndarray]:
        return {}


class LayerEnergyEncoding:
    """CaloFlow's Flow I variables (Krause & Shih 2021, Eq. 4.1-4.3) for layer
    energies E_0..E_{L-1} (the layers holding voxels, in order):

        u_0 = E_dep / (s E_inc),   u_i = E_{i-1} / (E_{i-1} + ... + E_{L-1})  (i >= 1),

    each mapped to logit space with alpha = 1e-6. ``s`` = max(1, largest
    E_dep / E_inc in training) keeps u_0 <= 1 when noise pushes E_dep above
    E_inc (CaloFlow has s = 1). A u_i whose remaining energy is zero is 0.

    Energy conserving by construction: the inverse hands out
    E_dep = u_0 s E_inc layer by layer, E_{i-1} = u_i x (what is left), the
    last layer taking the rest, so the layers sum to E_dep <= s E_inc and none
    is negative, whatever the features.

    ``order = "back"`` runs the same chain over the layers in reverse: u_1 is the
    deepest layer's share of E_dep and the first layer takes what is left. The
    layer that takes the rest inherits the errors of every fraction before it;
    "back" puts that at the first layer, which is rarely empty, instead of the
    deepest ones, which often are.
    """

    def __init__(self, u0_scale: Any = 1.0, alpha: float = LOGIT_ALPHA, order: str = "front") -> None:
        if order not in LAYER_ENERGY_ORDERS:
            raise ConfigError(f"layer-energy order {order!r} is not one of {', '.join(map(repr, LAYER_ENERGY_ORDERS))}")
        self.u0_scale = _scalar(u0_scale)
        self.alpha = alpha
        self.order = order
        self._largest = 1.0  # largest E_dep / E_inc seen by partial_fit, at least 1

    def _ordered(self, per_layer: Array) -> Array:
        """Per-layer values in chain order (an involution: also back to layer order)."""
        return _ops(per_layer).flip(per_layer) if self.order == "back" else per_layer

    def fit(self, incident_energies: np.ndarray, layer_energies: np.ndarray) -> LayerEnergyEncoding:
        self._largest = 1.0
        return self.partial_fit(incident_energies, layer_energies)

    def partial_fit(self, incident_energies: np.ndarray, layer_energies: np.ndarray) -> LayerEnergyEncoding:
        """Take more showers into s (a maximum: chunk by chunk equals :meth:`fit`)."""
        e = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
        _check_positive_energies(e)
        ratio = np.asarray(layer_energies, dtype=np.float64).sum(axis=1) / e
        if ratio.size:
            self._largest = max(self._largest, float(ratio.max()))
        self.u0_scale = self._largest
        return self

    def to_fractions(self, incident_energies: Array, layer_energies: Array) -> Array:
        """E_inc (n,), layer energies (n, L) in MeV -> u (n, L) in [0, 1]."""
        energies = _as_float64(layer_energies)
        ops = _ops(energies)
        # Energy in layers i..L-1, summed from the back so no cancellation occurs.
        remaining = ops.flip(ops.flip(energies).cumsum(-1))
        deposited = remaining[..., :1]
        u0 = deposited / (self.u0_scale * _column(_as_float64(incident_energies)))
        safe = ops.where(remaining[..., :-1] > 0, remaining[..., :-1], ops.ones_like(remaining[..., :-1]))
        ui = ops.where(remaining[..., :-1] > 0, energies[..., :-1] / safe, 0 * safe)
        return ops.cat([u0, ui]).clip(0, 1)

    def from_fractions(self, incident_energies: Array, u: Array) -> Array:
        """u (n, L) in [0, 1] -> layer energies (n, L) in MeV, summing to u_0 s E_inc."""
        ops = _ops(u)
        deposited = u[..., :1] * self.u0_scale * _column(incident_energies)
        # Fraction of E_dep left before layer i: prod_{j<i} (1 - u_j), j >= 1.
        left = ops.cat([ops.ones_like(u[..., :1]), ops.cumprod(1 - u[..., 1:])])
        share = ops.cat([u[..., 1:], ops.ones_like(u[..., :1])])
        return deposited * left * share

    def forward(self, incident_energies: Array, layer_energies: Array) -> Array:
        """E_inc (n,), layer energies (n, L) in MeV -> features (n, L) in [-13.8, 13.8],
        in chain order."""
        fractions = self.to_fractions(incident_energies, self._ordered(_as_float64(layer_energies)))
        return logit(fractions, self.alpha)

    def inverse(self, incident_energies: Array, features: Array) -> Array:
        """Features (n, L) -> layer energies (n, L) in MeV in layer order (non-negative,
        energy conserving)."""
        return self._ordered(self.from_fractions(incident_energies, inverse_logit(features, self.alpha)))

    def with_order(self, order: str) -> LayerEnergyEncoding:
        """The same fitted encoding with its chain in ``order``."""
        return LayerEnergyEncoding(self.u0_scale, self.alpha, order)

    def state(self) -> dict[str, np.ndarray]:
        return {"u0_scale": np.float64(self.u0_scale)}

    @classmethod
    def from_state(cls, state: dict[str, Any], order: str = "front") -> LayerEnergyEncoding:
        """The fitted constant from ``state``; the order is configuration, not fitted."""
        return cls(state["u0_scale"], order=order)


# -- pipelines ------------------------------------------------------------------------------
class PaperPreprocessing:
    """The paper's pipeline: features (N, V + 1) = PaperScaling; condition = scaled E_inc."""

    name = "paper"

    def __init__(self, binning: Binning) -> None:
        self.n_voxels = binning.n_voxels
        self.incident = IncidentEnergyScaling()
        self.voxels = PaperScaling()

    @property
    def n_features(self) -> int:
        return self.n_voxels + 1

    def fit(self, incident_energies: np.ndarray, showers: np.ndarray) -> PaperPreprocessing:
        self.incident, self.voxels = IncidentEnergyScaling(), PaperScaling()
        return self.partial_fit(incident_energies, showers)

    def partial_fit(self, incident_energies: np.ndarray, showers: np.ndarray) -> PaperPreprocessing:
        """Fit on one more chunk of showers; over all chunks of a file the constants equal
        :meth:`fit` on the whole file (they are minima and maxima)."""
        self.incident.partial_fit(incident_energies)
        self.voxels.partial_fit(incident_energies, showers)
        return self

    def forward(self, incident_energies: Array, showers: Array) -> Array:
        """E_inc (N,), showers (N, V) in MeV -> features (N, V + 1)."""
        return self.voxels.forward(incident_energies, showers)

    def inverse(self, incident_energies: Array, features: Array) -> Array:
        """Features (N, V + 1) -> showers (N, V) in MeV, non-negative."""
        return self.voxels.inverse(incident_energies, features)

    def state(self) -> dict[str, np.ndarray]:
        return {**_prefixed("incident", self.incident.state()), **_prefixed("paper", self.voxels.state())}

    def load_state(self, state: dict[str, Any]) -> PaperPreprocessing:
        self.incident = IncidentEnergyScaling.from_state(_unprefixed("incident", state))
        self.voxels = PaperScaling.from_state(_unprefixed("paper", state))
        return self


class PerLayerPreprocessing:
    """Layer shapes plus encoded layer energies: features (N, V + L) =
    [LayerNormalisation shapes (N, V), LayerEnergyEncoding features (N, L)], the
    energies' chain in ``layer_order`` ("front" or "back")."""

    name = "per-layer"

    def __init__(self, binning: Binning, layer_order: str = "front") -> None:
        self.n_voxels = binning.n_voxels
        self.layer_order = layer_order
        self.incident = IncidentEnergyScaling()
        self.layers = LayerNormalisation(binning)
        self.energies = LayerEnergyEncoding(order=layer_order)

    @property
    def n_layers(self) -> int:
        return self.layers.n_layers

    @property
    def n_features(self) -> int:
        return self.n_voxels + self.n_layers

    def fit(self, incident_energies: np.ndarray, showers: np.ndarray) -> PerLayerPreprocessing:
        self.incident, self.energies = IncidentEnergyScaling(), LayerEnergyEncoding(order=self.layer_order)
        return self.partial_fit(incident_energies, showers)

    def partial_fit(self, incident_energies: np.ndarray, showers: np.ndarray) -> PerLayerPreprocessing:
        """Fit on one more chunk of showers; over all chunks of a file the constants equal
        :meth:`fit` on the whole file (they are minima and maxima)."""
        self.incident.partial_fit(incident_energies)
        showers = np.asarray(showers)
        layer_energies = np.stack([showers[:, s].sum(axis=1, dtype=np.float64) for s in self.layers.slices], axis=1)
        self.energies.partial_fit(incident_energies, layer_energies)
        return self

    def forward(self, incident_energies: Array, showers: Array) -> Array:
        """E_inc (N,), showers (N, V) in MeV -> features (N, V + L)."""
        shapes, layer_energies = self.layers.forward(showers)
        encoded = self.energies.forward(incident_energies, layer_energies)
        return _ops(shapes).cat([shapes, encoded])

    def split(self, features: Array) -> tuple[Array, Array]:
        """Features (N, V + L) -> (shapes (N, V), encoded layer energies (N, L))."""
        return features[..., :self.n_voxels], features[..., self.n_voxels:]

    def inverse(self, incident_energies: Array, features: Array) -> Array:
        """Features (N, V + L) -> showers (N, V) in MeV, non-negative."""
        shapes, encoded = self.split(features)
        layer_energies = self.energies.inverse(_as_float64(incident_energies), encoded)
        return self.layers.inverse(shapes.clip(0, None), layer_energies)

    def state(self) -> dict[str, np.ndarray]:
        return {**_prefixed("incident", self.incident.state()), **_prefixed("energy", self.energies.state())}

    def load_state(self, state: dict[str, Any]) -> PerLayerPreprocessing:
        self.incident = IncidentEnergyScaling.from_state(_unprefixed("incident", state))
        self.energies = LayerEnergyEncoding.from_state(_unprefixed("energy", state), self.layer_order)
        return self


Preprocessing = PaperPreprocessing | PerLayerPreprocessing


def make_preprocessing(name: str, binning: Binning, *, layer_order: str = "front") -> Preprocessing:
    """The preprocessing pipeline ``"paper"`` or ``"per-layer"`` for a binning (unfitted);
    ``layer_order`` is the per-layer pipeline's layer-energy chain order."""
    if name == "paper":
        if layer_order != "front":
            raise ConfigError(f"layer-energy order {layer_order!r} needs preprocessing = 'per-layer' (the paper's "
                              "pipeline has no layer energies)")
        return PaperPreprocessing(binning)
    if name == "per-layer":
        return PerLayerPreprocessing(binning, layer_order)
    raise ConfigError(f"unknown preprocessing {name!r}; choose one of {', '.join(PREPROCESSINGS)}")


def apply_threshold(showers: Array, threshold: float) -> Array:
    """Voxels below ``threshold`` MeV set to zero (the readout threshold every metric applies)."""
    if threshold <= 0:
        return showers
    return showers * (showers >= threshold)


def _prefixed(prefix: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}_{k}": v for k, v in state.items()}


def _unprefixed(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in state.items() if k.startswith(prefix + "_")}


__all__ = [
    "PREPROCESSINGS", "LAYER_ENERGY_ORDERS", "CONDITION_ORDERS", "LOGIT_ALPHA", "LAYER_EPS_MEV",
    "IncidentEnergyScaling", "PaperScaling",
    "LayerNormalisation", "LayerEnergyEncoding", "PaperPreprocessing", "PerLayerPreprocessing", "make_preprocessing",
    "apply_threshold", "logit", "inverse_logit",
]
