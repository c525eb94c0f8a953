"""Known, small, physical defects injected into showers, to prove a test's power.

A fidelity test is only trusted once it has been seen to catch defects of a
known size: each function here takes showers (N, n_voxels) in MeV in the voxel
order of a :class:`~caloman.geometry.Binning` and returns a modified copy; none
changes its input. :mod:`caloman.sensitivity` runs the strong classifier test
on reference showers against defective copies of independent ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caloman.errors import ConfigError
from caloman.geometry import Binning

__all__ = ["DEFECTS", "Defect", "core_to_ring", "lose_dim_voxels", "round_to_lattice", "scale_layer",
           "stretch_radially"]


def _copy(showers: np.ndarray) -> np.ndarray:
    return np.array(showers, dtype=np.float64, copy=True)


def scale_layer(showers: np.ndarray, binning: Binning, layer_id: int, factor: float) -> np.ndarray:
    """Every voxel of layer ``layer_id`` times ``factor`` (a layer's energy scale off)."""
    out = _copy(showers)
    out[:, binning.layer_slice(layer_id)] *= factor
    return out


def core_to_ring(showers: np.ndarray, binning: Binning, fraction: float) -> np.ndarray:
    """Move ``fraction`` of the innermost radial bin's energy to the next ring, for every
    angular bin of every layer with at least two radial bins (layer energies are kept)."""
    out = _copy(showers)
    for layer_id in binning.relevant_layers:
        layer = binning.layer(layer_id)
        n_r = layer.n_voxels // layer.n_alpha
        if n_r < 2:
            continue
        start = binning.layer_slice(layer_id).start
        core = start + np.arange(layer.n_alpha) * n_r
        moved = fraction * out[:, core]
        out[:, core] -= moved
        out[:, core + 1] += moved
    return out


def lose_dim_voxels(showers: np.ndarray, threshold_mev: float, upper_mev: float, probability: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Voxels in [threshold, upper) MeV set to zero, each with ``probability`` (dim hits lost)."""
    out = _copy(showers)
    dim = (out >= threshold_mev) & (out < upper_mev)
    out[dim & (rng.random(out.shape) < probability)] = 0.0
    return out


def stretch_radially(showers: np.ndarray, binning: Binning, factor: float) -> np.ndarray:
    """Every layer's radial profile stretched by ``factor`` (widths times about ``factor``).

    Per layer and angular bin the cumulative energy C(r), linear within a radial
    bin, becomes C(r / factor); energy pushed beyond the last edge is lost, as
    lateral leakage would be.
    """
    out = _copy(showers)
    for layer_id in binning.relevant_layers:
        layer = binning.layer(layer_id)
        edges = np.asarray(layer.r_edges, dtype=np.float64)
        n_r = len(edges) - 1
        block = binning.layer_slice(layer_id)
        energies = out[:, block].reshape(len(out), layer.n_alpha, n_r)
        cumulative = np.concatenate([np.zeros(energies.shape[:2] + (1,)), np.cumsum(energies, axis=2)], axis=2)
        # C(edges / factor) by linear interpolation between the edges, per shower and angular bin.
        position = np.clip(np.searchsorted(edges, edges / factor, side="right") - 1, 0, n_r - 1)
        width = edges[position + 1] - edges[position]
        t = np.clip((edges / factor - edges[position]) / np.where(width > 0, width, 1.0), 0.0, 1.0)
        stretched = cumulative[..., position] + t * (cumulative[..., position + 1] - cumulative[..., position])
        out[:, block] = np.diff(stretched, axis=2).reshape(len(out), -1)
    return out


def round_to_lattice(showers: np.ndarray, quantum_mev: float) -> np.ndarray:
    """Voxel energies rounded to the nearest multiple of ``quantum_mev``."""
    out = _copy(showers)
    return np.round(out / quantum_mev) * quantum_mev


@dataclass(frozen=True)
class Defect:
    """One named defect of a given size, for the sensitivity suite.

    Attributes:
        name: short key, used in tables and metrics.
        description: what it does, with its size.
        kind: "layer_scale", "core_to_ring", "dim_voxels_lost", "radial_stretch", "lattice" or "none".
        size: the defect's parameter (a factor, a fraction, a probability or a quantum in MeV).
        layer_id: the layer of "layer_scale".
    """

    name: str
    description: str
    kind: str
    size: float = 0.0
    layer_id: int | None = None

    def apply(self, showers: np.ndarray, binning: Binning, rng: np.random.Generator) -> np.ndarray:
        """The defective copy of ``showers`` (N, n_voxels) in MeV."""
        if self.kind == "none":
            return np.array(showers, copy=True)
        if self.kind == "layer_scale":
            if self.layer_id is None:
                raise ConfigError(f"defect {self.name}: layer_scale needs a layer_id")
            return scale_layer(showers, binning, self.layer_id, self.size)
        if self.kind == "core_to_ring":
            return core_to_ring(showers, binning, self.size)
        if self.kind == "dim_voxels_lost":
            threshold = binning.readout_threshold
            return lose_dim_voxels(showers, threshold, 2.0 * threshold, self.size, rng)
        if self.kind == "radial_stretch":
            return stretch_radially(showers, binning, self.size)
        if self.kind == "lattice":
            return round_to_lattice(showers, self.size)
        raise ConfigError(f"unknown defect kind {self.kind!r}")


#: The suite's defects for dataset 1 (layer ids as in the photon binning: 1 strips, 2 middle).
DEFECTS = (
    Defect("none", "no defect: two independent simulator samples", "none"),
    Defect("strip_energy_+5%", "strip layer (1) energy x 1.05", "layer_scale", 1.05, layer_id=1),
    Defect("core_to_ring_5%", "5 % of the core bin's energy moved to the next ring, every layer", "core_to_ring",
           0.05),
    Defect("dim_voxels_lost_30%", "30 % of the voxels between threshold and twice threshold lost",
           "dim_voxels_lost", 0.3),
    Defect("widths_+3%", "radial profiles stretched by 3 %", "radial_stretch", 1.03),
    Defect("lattice_0.5MeV", "voxel energies rounded to multiples of 0.5 MeV", "lattice", 0.5),
)
