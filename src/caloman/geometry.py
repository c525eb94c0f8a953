"""Calorimeter geometry from CaloChallenge binning XML files.

A binning file lists layers by id (0..max). Each layer has radial bin edges in
mm and a number of equal angular (alpha) bins over [-pi, pi). Layers with a
single r edge hold no voxels. Voxels are stored in (layer, alpha, r) order: for
each layer, for each alpha bin, the radial bins from inside out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cache, cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from caloman.errors import BinningError, VoxelCountError

#: Short names of the binnings shipped with the package.
BUILTIN_BINNINGS = ("ds1-photons", "ds1-pions", "ds2", "ds3")

#: Readout thresholds in MeV: 1 MeV for dataset 1, 0.5 keV / 0.033 sampling
#: fraction for datasets 2 and 3 (CaloChallenge evaluation).
THRESHOLD_DS1_MEV = 1.0
THRESHOLD_DS23_MEV = 0.5e-3 / 0.033


@dataclass(frozen=True)
class Layer:
    """One longitudinal layer: radial edges in mm and the number of alpha bins."""

    id: int
    r_edges: tuple[float, ...]
    n_alpha: int

    @property
    def n_r(self) -> int:
        return len(self.r_edges) - 1

    @property
    def n_voxels(self) -> int:
        return self.n_r * self.n_alpha if self.n_r > 0 else 0

    @property
    def is_relevant(self) -> bool:
        """True when the layer holds voxels (more than one r edge)."""
        return self.n_r > 0

    @property
    def binned_in_alpha(self) -> bool:
        return self.n_alpha > 1


@dataclass(frozen=True)
class Binning:
    """A cylindrical voxelisation as described by one CaloChallenge binning file."""

    name: str
    particle: str
    pid: int
    layers: tuple[Layer, ...]
    source: str

    # -- counts and slices -------------------------------------------------
    @property
    def n_voxels(self) -> int:
        return int(self.bin_edges[-1])

    @cached_property
    def bin_edges(self) -> np.ndarray:
        """Cumulative voxel count over layer ids 0..max, shape (n_layers + 1,)."""
        return np.concatenate([[0], np.cumsum([layer.n_voxels for layer in self.layers])]).astype(np.int64)

    @property
    def relevant_layers(self) -> tuple[int, ...]:
        """Ids of the layers that hold voxels."""
        return tuple(layer.id for layer in self.layers if layer.is_relevant)

    @property
    def layers_binned_in_alpha(self) -> tuple[int, ...]:
        return tuple(layer.id for layer in self.layers if layer.is_relevant and layer.binned_in_alpha)

    def layer(self, layer_id: int) -> Layer:
        return self.layers[layer_id]

    def layer_slice(self, layer_id: int) -> slice:
        """Voxel range [bin_edges[l], bin_edges[l+1]) of a layer."""
        return slice(int(self.bin_edges[layer_id]), int(self.bin_edges[layer_id + 1]))

    # -- dataset conventions -----------------------------------------------
    @property
    def is_dataset1(self) -> bool:
        """Dataset-1 style (ATLAS-like photons or pions) as opposed to datasets 2/3."""
        return self.particle in ("photon", "pion")

    @property
    def readout_threshold(self) -> float:
        """Voxel readout threshold in MeV applied before every metric."""
        return THRESHOLD_DS1_MEV if self.is_dataset1 else THRESHOLD_DS23_MEV

    # -- voxel centres -----------------------------------------------------
    @cached_property
    def voxel_r(self) -> np.ndarray:
        """Radial centre of each voxel in mm, shape (n_voxels,)."""
        return np.concatenate([np.tile(_midpoints(layer.r_edges), layer.n_alpha)
                               for layer in self.layers if layer.is_relevant])

    @cached_property
    def voxel_alpha(self) -> np.ndarray:
        """Angular centre of each voxel in rad over [-pi, pi), shape (n_voxels,)."""
        return np.concatenate([np.repeat(alpha_centres(layer.n_alpha), layer.n_r)
                               for layer in self.layers if layer.is_relevant])

    @property
    def voxel_eta(self) -> np.ndarray:
        """eta = r cos(alpha) in mm (CaloChallenge convention), shape (n_voxels,)."""
        return self.voxel_r * np.cos(self.voxel_alpha)

    @property
    def voxel_phi(self) -> np.ndarray:
        """phi = r sin(alpha) in mm (CaloChallenge convention), shape (n_voxels,)."""
        return self.voxel_r * np.sin(self.voxel_alpha)

    def describe(self) -> str:
        parts = [f"{layer.id}: {layer.n_r} r x {layer.n_alpha} alpha" for layer in self.layers if layer.is_relevant]
        return f"{self.name} ({self.particle}, {self.n_voxels} voxels; layers {'; '.join(parts)})"


def alpha_centres(n_alpha: int) -> np.ndarray:
    """Centres of n equal angular bins over [-pi, pi); a single bin has centre 0."""
    return _midpoints(np.linspace(-np.pi, np.pi, n_alpha + 1))


def _midpoints(edges: tuple[float, ...] | np.ndarray) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    return 0.5 * (e[1:] + e[:-1])


def available_binnings() -> tuple[str, ...]:
    return BUILTIN_BINNINGS


def builtin_voxel_counts() -> dict[int, tuple[str, ...]]:
    """Voxel count -> names of the shipped binnings with that many voxels
    (368 ds1-photons, 533 ds1-pions, 6480 ds2, 40500 ds3)."""
    return dict(_builtin_voxel_counts())


@cache
def _builtin_voxel_counts() -> dict[int, tuple[str, ...]]:
    counts: dict[int, tuple[str, ...]] = {}
    for name in BUILTIN_BINNINGS:
        n = _load_builtin(name).n_voxels
        counts[n] = (*counts.get(n, ()), name)
    return counts


def binning_for_voxel_count(n_voxels: int) -> str:
    """Name of the one shipped binning whose showers have ``n_voxels`` voxels.

    Raises :class:`~caloman.errors.VoxelCountError` when no shipped binning (or
    more than one) has that count; the message lists the known counts.
    """
    counts = _builtin_voxel_counts()
    names = counts.get(int(n_voxels), ())
    if len(names) == 1:
        return names[0]
    known = ", ".join(f"{n} ({' or '.join(v)})" for n, v in sorted(counts.items()))
    what = f"names several shipped binnings ({', '.join(names)})" if names else "matches no shipped binning"
    raise VoxelCountError(f"{int(n_voxels)} voxels {what}; known voxel counts are {known}")


def load_binning(name_or_path: str | Path | Binning) -> Binning:
    """Load a built-in binning by short name (``ds1-photons``, ``ds1-pions``,
    ``ds2``, ``ds3``) or any CaloChallenge binning XML by path."""
    if isinstance(name_or_path, Binning):
        return name_or_path
    key = str(name_or_path)
    if key in BUILTIN_BINNINGS:
        return _load_builtin(key)
    path = Path(key)
    if not path.exists():
        raise BinningError(
            f"unknown binning '{key}': give one of {', '.join(BUILTIN_BINNINGS)} or the path of a binning XML file")
    return _parse(path.read_bytes(), name=path.stem, source=str(path))


@cache
def _load_builtin(name: str) -> Binning:
    data = resources.files("caloman.binnings").joinpath(f"{name}.xml").read_bytes()
    return _parse(data, name=name, source=f"caloman.binnings/{name}.xml")


def _parse(data: bytes, *, name: str, source: str) -> Binning:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise BinningError(f"{source} is not valid XML: {exc}") from exc
    bins = root.findall("Bin") if root.tag != "Bin" else [root]
    if len(bins) != 1:
        raise BinningError(f"{source}: expected exactly one <Bin> element, found {len(bins)}")
    bin_el = bins[0]
    layers = []
    for position, el in enumerate(bin_el.findall("Layer")):
        try:
            layer_id = int(el.attrib["id"])
            r_edges = tuple(float(s) for s in el.attrib["r_edges"].split(","))
            n_alpha = int(el.attrib.get("n_bin_alpha", "1"))
        except (KeyError, ValueError) as exc:
            raise BinningError(f"{source}: layer #{position} has a missing or malformed attribute ({exc})") from exc
        if layer_id != position:
            raise BinningError(
                f"{source}: layer ids must run 0, 1, 2, ... in order; found id {layer_id} at position {position}")
        if n_alpha < 1 or any(b <= a for a, b in zip(r_edges, r_edges[1:])):
            raise BinningError(f"{source}: layer {layer_id} needs n_bin_alpha >= 1 and increasing r_edges")
        layers.append(Layer(id=layer_id, r_edges=r_edges, n_alpha=n_alpha))
    if not any(layer.is_relevant for layer in layers):
        raise BinningError(f"{source}: no layer holds voxels")
    return Binning(name=name, particle=bin_el.attrib.get("name", "unknown"),
                   pid=int(bin_el.attrib.get("pid", "0")), layers=tuple(layers), source=source)
