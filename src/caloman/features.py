"""High-level shower features of the CaloChallenge, as pure array functions.

Every function takes showers in MeV with shape (N, n_voxels) in the voxel order
of a :class:`~caloman.geometry.Binning` and returns arrays; nothing here reads
files except :func:`compute_features_from_file`, which streams one.

The definitions and the arithmetic follow the challenge's own evaluation code
(``HighLevelFeatures.py`` and ``evaluate.py`` of CaloChallenge/homepage), so that
histograms built from these features agree with the challenge's bin by bin:

* voxels *strictly below* the readout threshold are set to zero
  (``np.where(showers < threshold, 0, showers)``; a voxel equal to the threshold
  is kept), in the showers' own dtype;
* E_tot and E_layer are plain sums in the showers' own dtype (float32 files give
  float32 sums, as in the challenge; this matters for histogram edges that sit on
  the reference maximum);
* centres of energy and widths use voxel-centre coordinates in float64, divided
  by ``E_layer + 1e-16`` (again in the showers' dtype, as the challenge does);
  an empty layer therefore has centre 0 and width 0, never NaN;
* sparsity = 1 - fraction of voxels above zero, per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from caloman.errors import ShowerFileError, VoxelCountError
from caloman.geometry import Binning, load_binning
from caloman.io import ShowerFile

__all__ = [
    "ShowerFeatures",
    "apply_threshold",
    "compute_features",
    "compute_features_from_file",
    "high_level_names",
    "high_level_vector",
    "incident_energy_dtype",
]

#: Added to layer energies before dividing, as in the challenge (keeps empty layers finite).
CENTRE_EPSILON = 1e-16
#: Added to energies before log10 in the classifier / FPD input vector, as in the challenge.
LOG_EPSILON = 1e-8
#: Centres and widths enter the high-level vector divided by this (mm -> ~unit scale), as in the challenge.
LENGTH_SCALE_MM = 100.0


def apply_threshold(showers: np.ndarray, threshold: float) -> np.ndarray:
    """Copy of ``showers`` (N, n_voxels) with voxels below ``threshold`` (MeV) set to 0.

    As in the challenge the comparison is strict (``<``): a voxel exactly at the
    threshold survives. The dtype is kept; the threshold is compared as a Python
    float, so for float32 showers it is rounded to float32 first, as numpy does
    in the challenge's ``np.where(shower < min_energy, 0, shower)``.
    """
    showers = np.asarray(showers)
    return np.where(showers < float(threshold), np.zeros_like(showers), showers)


@dataclass(frozen=True)
class ShowerFeatures:
    """High-level features of N showers; every array has shape (N,).

    ``e_tot`` and ``e_layer`` keep the dtype of the showers they were computed
    from (MeV); centres and widths (mm) and sparsity are float64. Dicts are keyed
    by layer id: ``e_layer``, ``ec_r``, ``width_r`` and ``sparsity`` hold every
    relevant layer, ``ec_eta``, ``ec_phi``, ``width_eta`` and ``width_phi`` the
    layers binned in alpha.
    """

    incident_energies: np.ndarray
    e_tot: np.ndarray
    e_layer: dict[int, np.ndarray]
    ec_eta: dict[int, np.ndarray]
    ec_phi: dict[int, np.ndarray]
    width_eta: dict[int, np.ndarray]
    width_phi: dict[int, np.ndarray]
    ec_r: dict[int, np.ndarray]
    width_r: dict[int, np.ndarray]
    sparsity: dict[int, np.ndarray]

    @property
    def n_showers(self) -> int:
        return int(self.e_tot.shape[0])

    def __len__(self) -> int:
        return self.n_showers

    @classmethod
    def concatenate(cls, parts: Sequence[ShowerFeatures]) -> ShowerFeatures:
        """Join features of consecutive chunks of showers (in the given order)."""
        if not parts:
            raise ValueError("ShowerFeatures.concatenate needs at least one part")
        first = parts[0]

        def join(name: str) -> dict[int, np.ndarray]:
            return {layer: np.concatenate([getattr(p, name)[layer] for p in parts]) for layer in getattr(first, name)}

        return cls(
            incident_energies=np.concatenate([p.incident_energies for p in parts]),
            e_tot=np.concatenate([p.e_tot for p in parts]),
            e_layer=join("e_layer"), ec_eta=join("ec_eta"), ec_phi=join("ec_phi"),
            width_eta=join("width_eta"), width_phi=join("width_phi"),
            ec_r=join("ec_r"), width_r=join("width_r"), sparsity=join("sparsity"),
        )


def _layer_coordinates(binning: Binning, layer_id: int) -> np.ndarray:
    """(n_voxels_in_layer, k) matrix of coordinates whose energy-weighted sums give
    the moments: columns r, r^2 and, for alpha-binned layers, eta, eta^2, phi, phi^2 (mm, mm^2)."""
    sl = binning.layer_slice(layer_id)
    r = binning.voxel_r[sl]
    columns = [r, r * r]
    if binning.layer(layer_id).binned_in_alpha:
        eta, phi = binning.voxel_eta[sl], binning.voxel_phi[sl]
        columns += [eta, eta * eta, phi, phi * phi]
    return np.stack(columns, axis=1)


def _centre_and_width(first: np.ndarray, second: np.ndarray, denominator: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    centre = first / denominator
    # Clipping guards against tiny negative variances from rounding (one-voxel showers).
    width = np.sqrt(np.clip(second / denominator - centre**2, 0.0, None))
    return centre, width


def compute_features(incident_energies: np.ndarray, showers: np.ndarray, binning: Binning | str) -> ShowerFeatures:
    """High-level features of thresholded showers.

    Args:
        incident_energies: (N,) or (N, 1), MeV. Kept as given (dtype included), since
            E_tot / E_inc is later computed in the dtype the challenge would use.
        showers: (N, n_voxels) voxel energies in MeV, already passed through
            :func:`apply_threshold`. Integer input is converted to float64.
        binning: the showers' binning (object, built-in name or XML path).

    Returns:
        :class:`ShowerFeatures`; never NaN (empty layers and all-zero showers give
        centre 0, width 0, sparsity 1).
    """
    binning = load_binning(binning)
    showers = np.asarray(showers)
    if not np.issubdtype(showers.dtype, np.floating):
        showers = showers.astype(np.float64)
    if showers.ndim != 2 or showers.shape[1] != binning.n_voxels:
        raise VoxelCountError(
            f"showers have shape {showers.shape}, binning {binning.name} needs (N, {binning.n_voxels}); "
            "pass the binning the showers were made with")
    incident = np.asarray(incident_energies).reshape(-1)
    if incident.shape[0] != showers.shape[0]:
        raise ShowerFileError(f"{incident.shape[0]} incident energies for {showers.shape[0]} showers; "
                              "give one incident energy per shower")

    # One float64 copy for the moments; sums stay in the input dtype like the challenge's.
    showers64 = showers.astype(np.float64)
    e_layer, sparsity, ec_r, width_r = {}, {}, {}, {}
    ec_eta, ec_phi, width_eta, width_phi = {}, {}, {}, {}
    for layer_id in binning.relevant_layers:
        sl = binning.layer_slice(layer_id)
        block = showers[:, sl]
        energy = block.sum(axis=-1)
        e_layer[layer_id] = energy
        sparsity[layer_id] = 1.0 - (block > 0).mean(axis=-1)
        denominator = np.asarray(energy + CENTRE_EPSILON, dtype=np.float64)
        moments = showers64[:, sl] @ _layer_coordinates(binning, layer_id)
        ec_r[layer_id], width_r[layer_id] = _centre_and_width(moments[:, 0], moments[:, 1], denominator)
        if binning.layer(layer_id).binned_in_alpha:
            ec_eta[layer_id], width_eta[layer_id] = _centre_and_width(moments[:, 2], moments[:, 3], denominator)
            ec_phi[layer_id], width_phi[layer_id] = _centre_and_width(moments[:, 4], moments[:, 5], denominator)
    return ShowerFeatures(incident_energies=incident, e_tot=showers.sum(axis=-1), e_layer=e_layer,
                          ec_eta=ec_eta, ec_phi=ec_phi, width_eta=width_eta, width_phi=width_phi,
                          ec_r=ec_r, width_r=width_r, sparsity=sparsity)


def incident_energy_dtype(path: str) -> np.dtype:
    """The dtype ``incident_energies`` is stored with in a CaloChallenge file.

    :class:`~caloman.io.ShowerFile` hands out float64; the challenge divides E_tot
    by the stored dtype, so we cast back (exactly) before computing E_tot / E_inc.
    """
    with h5py.File(path, "r") as f:
        return np.dtype(f["incident_energies"].dtype)


def compute_features_from_file(shower_file: ShowerFile, binning: Binning | str, *,
                               chunk_size: int | None = None) -> ShowerFeatures:
    """Features of every shower in an open file, streamed chunk by chunk.

    Each chunk is thresholded at ``binning.readout_threshold`` and reduced to its
    features before the next is read, so dataset 3 never sits in memory whole.
    """
    binning = load_binning(binning)
    inc_dtype = incident_energy_dtype(str(shower_file.path))
    parts = [compute_features(incident.astype(inc_dtype), apply_threshold(showers, binning.readout_threshold), binning)
             for incident, showers in shower_file.iter_chunks(chunk_size)]
    if not parts:
        return compute_features(np.zeros(0, dtype=inc_dtype),
                                np.zeros((0, binning.n_voxels), dtype=np.float32), binning)
    return ShowerFeatures.concatenate(parts)


def high_level_names(binning: Binning | str) -> list[str]:
    """Column names of :func:`high_level_vector`, in order."""
    binning = load_binning(binning)
    relevant, alpha = binning.relevant_layers, binning.layers_binned_in_alpha
    names = ["log10(E_inc)"]
    names += [f"log10(E_layer_{layer} + 1e-8)" for layer in relevant]
    for what in ("EC_eta", "EC_phi", "width_eta", "width_phi"):
        names += [f"{what}_layer_{layer} / 100" for layer in alpha]
    names.append("log10(E_tot + 1e-8)")
    names += [f"sparsity_layer_{layer}" for layer in relevant]
    names += [f"EC_r_layer_{layer} / 100" for layer in relevant]
    names += [f"width_r_layer_{layer} / 100" for layer in relevant]
    return names


def high_level_vector(features: ShowerFeatures) -> np.ndarray:
    """The challenge's high-level classifier input, shape (N, F), float64.

    Column order (the challenge's ``prepare_high_data_for_classifier`` without its
    label column; names from :func:`high_level_names`):

    1. log10(E_inc)
    2. log10(E_layer + 1e-8) for every relevant layer
    3. EC_eta / 100, then EC_phi / 100, then width_eta / 100, then width_phi / 100,
       each for every alpha-binned layer (mm / 100)
    4. log10(E_tot + 1e-8)
    5. sparsity for every relevant layer
    6. EC_r / 100, then width_r / 100, for every relevant layer

    For dataset 1 photons (5 relevant layers, 2 in alpha) F = 30. FPD/KPD use the
    whole vector, as the challenge does.
    """
    n = features.n_showers
    layers = list(features.e_layer)
    alpha = list(features.ec_eta)

    def col(values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64).reshape(n, 1)

    columns = [col(np.log10(features.incident_energies))]
    columns += [col(np.log10(features.e_layer[layer] + LOG_EPSILON)) for layer in layers]
    for group in (features.ec_eta, features.ec_phi, features.width_eta, features.width_phi):
        columns += [col(group[layer] / LENGTH_SCALE_MM) for layer in alpha]
    columns.append(col(np.log10(features.e_tot + LOG_EPSILON)))
    columns += [col(features.sparsity[layer]) for layer in layers]
    columns += [col(features.ec_r[layer] / LENGTH_SCALE_MM) for layer in layers]
    columns += [col(features.width_r[layer] / LENGTH_SCALE_MM) for layer in layers]
    return np.concatenate(columns, axis=1)
