"""The torch modules recorded as ONNX graphs: a trained model's
:meth:`~caloman.models.base.ShowerModel.sample_from_noise` behind one of two
input/output conventions.

``"caloman"``
    inputs ``normal_noise`` (n, N) standard normal, ``uniform_noise`` (n, U) uniform on
    [0, 1) (only for models that need it) and ``incident_energy`` (n, 1) in MeV; output
    ``showers`` (n, V), voxel energies in MeV in the CaloChallenge (layer, alpha, r) order,
    and for a weighted generator (``ShowerModel.weighted``: a DCTR-reweighted run) a second
    output ``weights`` (n,), each shower's weight (:meth:`ShowerModel.shower_weights`).
``"par04"`` (the Geant4 Par04 example's inference interface)
    input ``input`` (n, N + U + C): the noise followed by the condition vector
    [E_inc / energy_scale, then C - 1 entries Par04 fills with the angle and the
    geometry one-hot, which these models ignore]; output ``output`` (n, V), voxel
    energies divided by E_inc, in (r, phi, z) order (:func:`par04_voxel_order`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from caloman.export.graph_caloman import graph_sampler
from caloman.geometry import Binning
from caloman.models.base import ShowerModel

CONVENTIONS = ("caloman", "par04")


def par04_voxel_order(binning: Binning) -> np.ndarray:
    """For each output position of the Par04 convention, the CaloChallenge voxel it holds
    (n_voxels,): voxels sorted by (radial bin, angular bin, layer), the C order of an
    (r, phi, z) mesh. For binnings whose layers differ in their bins (dataset 1) the
    order is the same sort, but the voxels form no rectangular mesh."""
    r_index, alpha_index, layer_index = [], [], []
    for position, layer_id in enumerate(binning.relevant_layers):
        layer = binning.layer(layer_id)
        r_index.append(np.tile(np.arange(layer.n_r), layer.n_alpha))
        alpha_index.append(np.repeat(np.arange(layer.n_alpha), layer.n_r))
        layer_index.append(np.full(layer.n_voxels, position))
    keys = (np.concatenate(layer_index), np.concatenate(alpha_index), np.concatenate(r_index))
    return np.lexsort(keys)  # the last key is the primary one: r, then alpha, then layer


def par04_mesh(binning: Binning) -> tuple[int, int, int] | None:
    """(n_r, n_phi, n_z) when every layer holding voxels has the same bins, else None."""
    layers = [binning.layer(layer_id) for layer_id in binning.relevant_layers]
    if len({(layer.n_r, layer.n_alpha) for layer in layers}) != 1:
        return None
    return layers[0].n_r, layers[0].n_alpha, len(layers)


class CalomanConvention(nn.Module):
    """Noise and incident energies in, showers in MeV out (see the module docstring)."""

    def __init__(self, model: ShowerModel, fused: bool = True) -> None:
        super().__init__()
        self.model = model
        self.sampler = graph_sampler(model, fused)
        self.has_uniform = model.noise_shape().uniform > 0
        self.weighted = bool(model.weighted)

    def forward(self, normal_noise: Tensor, *rest: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """normal (n, N), [uniform (n, U)], incident energy (n, 1) MeV -> showers (n, V) MeV
        [and, for a weighted generator, weights (n,)]."""
        uniform, incident = rest if self.has_uniform else (None, rest[0])
        showers = self.sampler(incident.reshape(-1), normal_noise, uniform)
        if not self.weighted:
            return showers
        return showers, self.model.shower_weights(incident.reshape(-1), showers)

    def input_names(self) -> list[str]:
        return ["normal_noise", *(["uniform_noise"] if self.has_uniform else []), "incident_energy"]

    def output_names(self) -> list[str]:
        return ["showers", *(["weights"] if self.weighted else [])]


class Par04Convention(nn.Module):
    """One input vector [noise, condition] in, showers / E_inc in (r, phi, z) order out."""

    def __init__(self, model: ShowerModel, energy_scale_mev: float, condition_size: int, fused: bool = True) -> None:
        super().__init__()
        self.model = model
        self.sampler = graph_sampler(model, fused)
        shape = model.noise_shape()
        self.n_normal, self.n_uniform = shape.normal, shape.uniform
        self.energy_scale_mev = float(energy_scale_mev)
        self.condition_size = int(condition_size)
        self.register_buffer("order", torch.as_tensor(par04_voxel_order(model.binning)), persistent=False)

    @property
    def input_size(self) -> int:
        return self.n_normal + self.n_uniform + self.condition_size

    def forward(self, inputs: Tensor) -> Tensor:
        """inputs (n, N + U + C) -> voxel energies / E_inc (n, V) in (r, phi, z) order."""
        normal = inputs[:, :self.n_normal]
        uniform = inputs[:, self.n_normal:self.n_normal + self.n_uniform] if self.n_uniform else None
        start = self.n_normal + self.n_uniform
        incident = inputs[:, start:start + 1] * self.energy_scale_mev  # (n, 1) MeV
        showers = self.sampler(incident.reshape(-1), normal, uniform)
        return showers[:, self.order] / incident.to(showers.dtype)

    def input_names(self) -> list[str]:
        return ["input"]

    def output_names(self) -> list[str]:
        return ["output"]


__all__ = ["CONVENTIONS", "CalomanConvention", "Par04Convention", "par04_voxel_order", "par04_mesh"]
