"""Parameterised electromagnetic shower simulation (GFlash-style), vectorised.

This is a physics-based *parameterisation* of photon / electron showers
(Grindhammer & Peters, hep-ex/0001020), not Geant4. For pion binnings it still
simulates electromagnetic showers: there is no hadronic simulation here.

One shower, step by step (all showers of a block at once, numpy):

1. Draw correlated (T, alpha) of the longitudinal Gamma profile
   (:func:`gflash.sample_longitudinal`, sampling-calorimeter parameters).
2. For every readout layer: the energy fraction is the Gamma CDF difference
   over the layer's depth interval; the layer is cut into sub-slices of at
   most 0.5 X0, and at each sub-slice's relative depth tau the two-component
   radial CDF gives the probability of every radial bin (the outside of the
   last edge is lateral leakage); sub-slices are combined with their energy
   weights; the azimuth is uniform over the alpha bins.
3. The layer's number of energy spots is N_spot = 93 ln(Z) E^0.876 times the
   spot-profile fraction in the layer; the spots are distributed over the
   voxels (plus the leakage bin, lost) with one multinomial draw, so voxel
   fluctuations have the statistics of N independent spots without looping
   over spots (10^5 at TeV energies).
4. Sampling fluctuations, in two Gamma stages whose variances add up to
   c_S^2 E_layer (GeV), so the layer and total resolutions are c_S / sqrt(E):
   the layer's visible energy V is Gamma distributed with mean E_layer and
   variance (c_S^2 - theta) E_layer, and every spot's visible energy is
   Gamma(k, theta) with k = V / (theta N_layer_spots). Gammas of one scale add
   up, so a voxel holding n spots is one Gamma(n k, theta) draw: continuous
   voxel energies without a loop over spots, exactly zero where no spot
   landed. theta (:func:`local_sampling_variance`) is the part of c_S^2 that
   makes N spots fluctuate like GFlash's sampling-calorimeter spot count
   10.3 / c_S E^0.959 (about 70 % of c_S^2 for dataset 1). A per-shower
   constant term multiplies all layers.
5. Calibration (``energy_scale``), Gaussian readout noise on every voxel
   (0.05 MeV for dataset 1, far below the 1 MeV threshold; see
   docs/simulator.md), output clipped at zero. No threshold: the evaluation
   applies it.

Energy behind the last layer, in gaps between layers and outside the radial
range is lost; energy in upstream material is lost unless the detector
recovers it into its first layer (dataset 1, like a presampler correction).

Reproducibility: an int seed drives independent generators per block of
:func:`block_size` showers, ``SeedSequence(seed, spawn_key=(1, block))``, so
results do not depend on how the work is chunked or streamed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caloman import __version__
from caloman.errors import ConfigError, InvalidEnergyError
from caloman.geometry import Binning, load_binning
from caloman.io import ShowerWriter
from caloman.progress import ProgressBar
from caloman.simulation import gflash
from caloman.simulation.detector import DetectorSpec, detector_for

#: Stream of the root SeedSequence for showers (incident energies use stream 0).
SHOWER_STREAM = 1

#: Thickest depth sub-slice (X0) over which the radial profile is taken as constant.
MAX_SUBSLICE_X0 = 0.5

#: A block holds about this many voxel values (bounded memory); see :func:`block_size`.
_VALUES_PER_BLOCK = 2**20

#: Smallest share of a layer's sampling variance c_S^2 E that is drawn spot by spot (see
#: :func:`local_sampling_variance`), so voxel energies stay continuous. It binds only for c_S below 0.024-0.055 or
#: above 0.89 sqrt(GeV) (256 MeV to 4 TeV), none of the built-in detectors (0.10, 0.165, 0.20, 0.50).
MIN_LOCAL_SAMPLING_SHARE = 0.1

GENERATOR_DESCRIPTION = "parameterised simulation (GFlash-style), not Geant4"


@dataclass(frozen=True)
class _LayerPlan:
    """What the simulation needs of one readout layer, precomputed."""

    layer_id: int
    voxels: slice
    depth_edges: np.ndarray      # (n_sub + 1,) X0
    r_edges: np.ndarray          # (n_r + 1,) in R_M
    n_alpha: int
    stochastic_term: float


def block_size(binning: str | Path | Binning) -> int:
    """Showers per independently seeded block: a power of two holding about
    2^20 voxel values, between 16 and 2048 (2048 for dataset 1, 128 for
    dataset 2, 16 for dataset 3). Part of the seed contract: the same seed and
    binning give the same showers."""
    n_voxels = load_binning(binning).n_voxels
    exponent = math.floor(math.log2(max(1.0, _VALUES_PER_BLOCK / n_voxels)))
    return int(min(2048, max(16, 2**exponent)))


def _plan(binning: Binning, detector: DetectorSpec) -> tuple[_LayerPlan, ...]:
    plans = []
    first = min(spec.depth_start for spec in detector.layers)
    moliere = detector.medium.moliere_radius_mm
    for layer in binning.layers:
        if not layer.is_relevant:
            continue
        spec = detector.layer(layer.id)
        start = 0.0 if (detector.upstream_recovered and spec.depth_start == first) else spec.depth_start
        n_sub = max(1, math.ceil((spec.depth_end - start) / MAX_SUBSLICE_X0 - 1e-9))
        plans.append(_LayerPlan(
            layer_id=layer.id,
            voxels=binning.layer_slice(layer.id),
            depth_edges=np.linspace(start, spec.depth_end, n_sub + 1),
            r_edges=np.asarray(layer.r_edges, dtype=np.float64) / moliere,
            n_alpha=layer.n_alpha,
            stochastic_term=detector.stochastic_term_of(layer.id),
        ))
    return tuple(plans)


def local_sampling_variance(energy_gev: np.ndarray, z: float, stochastic_term: float) -> np.ndarray:
    """The share theta (GeV) of a layer's sampling variance c_S^2 E that fluctuates spot by spot.

    GFlash describes the cell-level fluctuations of a sampling calorimeter by
    N_S = 10.3 / c_S E^0.959 spots of equal energy (hep-ex/0001020, sec. 3.4),
    fewer than the N_H = 93 ln(Z) E^0.876 of a homogeneous medium. The
    simulator distributes N_H spots and gives each an independent Gamma
    energy of scale theta, so a voxel holding a fraction f of the energy
    fluctuates by 1/(f N_H) + theta/(f E); equating that to GFlash's
    1/(f N_S) gives theta = E/N_S - E/N_H. Clipped to
    [:data:`MIN_LOCAL_SAMPLING_SHARE` c_S^2, c_S^2]; the rest of c_S^2 is
    drawn once per layer and shower. For the dataset-1 accordion
    (c_S = 0.10, Z 65.8) theta is 64-73 % of c_S^2 from 256 MeV to 4 TeV.
    """
    e = np.asarray(energy_gev, dtype=np.float64)
    c2 = stochastic_term ** 2
    theta = e / gflash.spot_count(e, z, stochastic_term) - e / gflash.spot_count(e, z)
    return np.clip(theta, MIN_LOCAL_SAMPLING_SHARE * c2, c2)


def _check_energies(incident_energies: np.ndarray) -> np.ndarray:
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(energies) | (energies <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidEnergyError(
            f"incident energy {i} is {float(energies[i]):.7g} MeV; incident energies must be positive and finite (MeV)")
    return energies


def _simulate_block(plans: tuple[_LayerPlan, ...], detector: DetectorSpec, n_voxels: int,
                    energies_mev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Showers (n, n_voxels) in MeV, float32, for incident energies (n,) in MeV."""
    medium = detector.medium
    z = medium.z_eff
    sampling = gflash.SamplingTerms(medium.sampling_frequency, medium.e_hat)
    n = energies_mev.shape[0]
    energy_gev = energies_mev * 1e-3

    # 1. per-shower longitudinal parameters
    fluctuations = gflash.longitudinal_fluctuations(
        gflash.log_y(energy_gev, medium.critical_energy_mev), z, sampling,
        min_ln_y_for_widths=float(gflash.log_y(gflash.WIDTH_FREEZE_GEV, medium.critical_energy_mev)))
    t_max, alpha = gflash.sample_longitudinal(fluctuations, rng)
    mean_alpha = np.exp(fluctuations.mean_log_alpha)
    spot_t, spot_alpha = gflash.spot_profile(t_max, alpha, z, sampling=True)
    # The homogeneous spot count: GFlash's smaller sampling count (10.3 / c_S E^0.959) also stands for the
    # sampling fluctuations, which are applied here explicitly as Gamma energies (step 4).
    n_spots = gflash.spot_count(energy_gev, z)
    constant = np.maximum(1.0 + detector.constant_term * rng.standard_normal(n), 0.0)
    scale = constant * detector.energy_scale

    showers = np.zeros((n, n_voxels), dtype=np.float64)
    col = (slice(None), None)
    for plan in plans:
        edges = plan.depth_edges
        # 2. energy in each depth sub-slice, and the layer's fraction
        cdf = gflash.gamma_profile_cdf(edges[None, :], t_max[col], alpha[col])     # (n, n_sub + 1)
        slice_energy = np.diff(cdf, axis=1)                                        # (n, n_sub)
        layer_fraction = slice_energy.sum(axis=1)                                  # (n,)
        weights = slice_energy / np.where(layer_fraction > 0, layer_fraction, 1.0)[col]
        mid = 0.5 * (edges[1:] + edges[:-1])
        tau = gflash.relative_depth(mid[None, :], t_max[col], alpha[col], mean_alpha[col])
        core, tail, core_weight = gflash.radial_parameters(tau, energy_gev[col], z, sampling)
        ring_cdf = gflash.radial_cdf(plan.r_edges[None, None, :], core[..., None], tail[..., None],
                                     core_weight[..., None])                       # (n, n_sub, n_r + 1)
        ring = np.clip(np.diff(ring_cdf, axis=2), 0.0, None)
        ring = np.einsum("is,isr->ir", weights, ring)                              # (n, n_r)
        # Layers too deep to see any energy (CDF underflow) get the profile of their first sub-slice.
        empty = layer_fraction <= 0
        if empty.any():
            ring[empty] = np.clip(np.diff(ring_cdf[empty, 0, :], axis=1), 0.0, None)
        # voxel order within a layer is (alpha, r): every alpha bin gets 1/n_alpha of each ring
        voxel_p = np.broadcast_to((ring / plan.n_alpha)[:, None, :], (n, plan.n_alpha, ring.shape[1])).reshape(n, -1)
        leak = np.clip(1.0 - voxel_p.sum(axis=1), 0.0, 1.0)
        pvals = np.concatenate([voxel_p, leak[:, None]], axis=1)
        pvals /= pvals.sum(axis=1, keepdims=True)

        # 3. spots in this layer, distributed over voxels + leakage
        spot_fraction = (gflash.gamma_profile_cdf(edges[-1], spot_t, spot_alpha)
                         - gflash.gamma_profile_cdf(edges[0], spot_t, spot_alpha))
        layer_spots = np.maximum(1, np.rint(n_spots * spot_fraction)).astype(np.int64)
        counts = rng.multinomial(layer_spots, pvals)[:, :-1]

        # 4. sampling fluctuations in two Gamma stages whose variances add up to c_S^2 E_layer (GeV):
        #    the layer's visible energy V ~ Gamma(E_layer / (c_S^2 - theta), c_S^2 - theta), then every spot
        #    carries Gamma(k, theta) with k = V / (theta N_layer_spots): a voxel with n spots holds Gamma(n k, theta)
        #    (Gammas of one scale add up), continuous, and exactly 0 for n = 0 (standard_gamma(0) == 0).
        c2 = plan.stochastic_term ** 2
        theta = local_sampling_variance(energy_gev, z, plan.stochastic_term)      # (n,) GeV
        layer_var = c2 - theta
        layer_gev = energy_gev * layer_fraction
        has_layer_var = layer_var > 0
        visible_gev = np.where(
            has_layer_var, rng.gamma(layer_gev / np.where(has_layer_var, layer_var, 1.0)) * layer_var, layer_gev)
        spot_shape = visible_gev / (theta * layer_spots)                             # k
        showers[:, plan.voxels] = rng.standard_gamma(counts * spot_shape[col]) * (theta * 1e3 * scale)[col]

    # 5. readout noise, clipped: outputs are non-negative
    if detector.noise_mev > 0:
        showers += detector.noise_mev * rng.standard_normal(showers.shape)
        np.clip(showers, 0.0, None, out=showers)
    return showers.astype(np.float32)


def _check_seed(seed: int | np.random.Generator | None) -> int | np.random.Generator:
    """An int seed (fresh entropy for None); SeedSequence needs it non-negative."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    if int(seed) != seed or int(seed) < 0:
        raise ConfigError(f"the seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _block_generator(seed: int, block: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(SHOWER_STREAM, block))))


def iter_shower_blocks(binning: str | Path | Binning, incident_energies: np.ndarray,
                       seed: int | np.random.Generator | None = None, *, detector: DetectorSpec | None = None
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (incident_energies (n,), showers (n, n_voxels)) block by block, in order.

    ``seed``: an int (or None for fresh entropy) gives every block of
    :func:`block_size` showers its own generator, so the output depends only
    on (seed, binning, energies); a ``numpy.random.Generator`` is used as is,
    block after block.
    """
    binning = load_binning(binning)
    detector = detector if detector is not None else detector_for(binning)
    energies = _check_energies(incident_energies)
    plans = _plan(binning, detector)
    size = block_size(binning)
    seed = _check_seed(seed)
    for b, start in enumerate(range(0, energies.shape[0], size)):
        rng = seed if isinstance(seed, np.random.Generator) else _block_generator(seed, b)
        block = energies[start:start + size]
        yield block, _simulate_block(plans, detector, binning.n_voxels, block, rng)


def simulate_showers(binning: str | Path | Binning, incident_energies: np.ndarray,
                     seed: int | np.random.Generator | None = None, *,
                     detector: DetectorSpec | None = None) -> np.ndarray:
    """Simulate EM showers (photons / electrons) for the given binning.

    Parameters
    ----------
    binning : a built-in binning name (``ds1-photons``, ``ds1-pions``, ``ds2``,
        ``ds3``), a binning XML path or a :class:`~caloman.geometry.Binning`.
        For ``ds1-pions`` the showers are electromagnetic (photon) showers in
        the pion binning, not a hadronic simulation.
    incident_energies : (N,) in MeV.
    seed : int for a reproducible, chunking-independent stream; a numpy
        Generator to draw from directly; None for fresh entropy.
    detector : override the detector table (default :func:`detector_for`).

    Returns
    -------
    showers : (N, n_voxels) float32, voxel energies in MeV, non-negative.
    """
    binning = load_binning(binning)
    parts = [showers for _, showers in iter_shower_blocks(binning, incident_energies, seed, detector=detector)]
    if not parts:
        return np.zeros((0, binning.n_voxels), dtype=np.float32)
    return np.concatenate(parts)


def simulate_to_file(path: str | Path, binning: str | Path | Binning, incident_energies: np.ndarray,
                     seed: int | None = None, chunk_size: int | None = None, *,
                     detector: DetectorSpec | None = None,
                     attrs: dict[str, str | int | float] | None = None) -> Path:
    """Simulate showers and stream them into a CaloChallenge HDF5 file, atomically.

    The file's attributes record the caloman version, seed, binning, detector
    and that the showers come from a parameterised simulation, not Geant4.
    ``chunk_size`` (showers per write, default: the block size) changes
    memory use and nothing else. Returns the path written.
    """
    binning = load_binning(binning)
    detector = detector if detector is not None else detector_for(binning)
    energies = _check_energies(incident_energies)
    seed = _check_seed(seed)
    if isinstance(seed, np.random.Generator):
        raise ConfigError("simulate_to_file needs an int seed (recorded in the file), not a Generator")
    size = block_size(binning)
    chunk = max(1, int(chunk_size)) if chunk_size is not None else size
    file_attrs: dict[str, str | int | float] = {
        "generator": GENERATOR_DESCRIPTION,
        "caloman_version": __version__,
        "seed": str(seed),
        "binning": binning.name,
        "binning_source": binning.source,
        "detector": detector.name,
        "detector_description": detector.describe(),
        "showers": "electromagnetic (photon/electron) showers; no hadronic simulation",
        "block_size": size,
        "units": "MeV",
    }
    file_attrs.update(attrs or {})
    pending_e: list[np.ndarray] = []
    pending_s: list[np.ndarray] = []
    n_pending = 0
    with ShowerWriter(path, binning.n_voxels, binning=binning, attrs=file_attrs) as writer, \
            ProgressBar(total=int(energies.shape[0]), desc="simulate", unit="shower") as bar:
        for block_e, block_s in iter_shower_blocks(binning, energies, seed, detector=detector):
            pending_e.append(block_e)
            pending_s.append(block_s)
            n_pending += block_e.shape[0]
            while n_pending >= chunk:
                e_all, s_all = np.concatenate(pending_e), np.concatenate(pending_s)
                writer.append(e_all[:chunk], s_all[:chunk])
                bar.update(chunk)
                pending_e, pending_s, n_pending = [e_all[chunk:]], [s_all[chunk:]], n_pending - chunk
        if n_pending:
            writer.append(np.concatenate(pending_e), np.concatenate(pending_s))
            bar.update(n_pending)
    return Path(path)
