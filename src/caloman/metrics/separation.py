"""Histograms of high-level features and their chi-squared separation power.

Separation power (triangular discrimination, eq. 15 of arXiv:2009.03796) of two
histograms h1, h2 normalised to sum to one over the bins::

    S = 0.5 * sum_i (h1_i - h2_i)^2 / (h1_i + h2_i + 1e-16)

0 for identical histograms, 1 for disjoint ones.

The binnings are those of the CaloChallenge evaluation code
(``evaluate_plotting_helper.py`` of CaloChallenge/homepage), which differs from
the prose description in two places; we follow the code:

* the log-spaced histograms use ``np.logspace(log10(threshold), log10(reference
  max), n)`` as *edges*, so E_layer has 40 edges = **39 bins** and the voxel
  energy distribution 50 edges = **49 bins**;
* entries outside the edges (for example E_layer = 0 below the threshold edge)
  are dropped before normalising, exactly like ``plt.hist(..., density=True)``
  multiplied by the bin widths.

Where the challenge would return NaN because no entry falls inside the edges
(``density=True`` of an empty histogram), we return a definite number instead:
0 when both samples are empty in range, 1 (disjoint) when only one is; that
sample's histogram is then all zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caloman.features import ShowerFeatures
from caloman.geometry import Binning, load_binning
from caloman.metrics import FeatureHistogram

__all__ = [
    "CHALLENGE_BINNINGS",
    "FeatureBinning",
    "LinearBins",
    "LogBins",
    "PerEnergyBins",
    "VoxelEnergyHistogram",
    "binning_family",
    "feature_histograms",
    "histogram_pair",
    "normalised_histogram",
    "per_energy_ranges",
    "separation_power",
]

#: Added to the denominator of the separation power, as in the challenge.
SEPARATION_EPSILON = 1e-16


def separation_power(reference_hist: np.ndarray, generated_hist: np.ndarray) -> float:
    """Chi-squared separation power of two histograms that each sum to one, shape (n_bins,)."""
    h1 = np.asarray(reference_hist, dtype=np.float64)
    h2 = np.asarray(generated_hist, dtype=np.float64)
    if h1.shape != h2.shape or h1.ndim != 1:
        raise ValueError(f"separation_power needs two 1-d histograms of equal length, got {h1.shape} and {h2.shape}")
    return float(0.5 * np.sum((h1 - h2) ** 2 / (h1 + h2 + SEPARATION_EPSILON)))


# -- the challenge's binnings -------------------------------------------------------

@dataclass(frozen=True)
class LinearBins:
    """``n_bins`` equal bins on [low, high] (edges ``np.linspace(low, high, n_bins + 1)``)."""

    low: float
    high: float
    n_bins: int

    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.n_bins + 1)


@dataclass(frozen=True)
class LogBins:
    """``n_edges`` log-spaced edges from the readout threshold to the reference maximum."""

    n_edges: int

    def edges(self, threshold: float, reference_max: float | np.floating) -> np.ndarray:
        """Edges ``np.logspace(log10(threshold), log10(reference_max), n_edges)``.

        ``reference_max`` should be the maximum in the dtype of the reference
        values (a float32 file gives a float32 maximum whose log10 is float32, as
        in the challenge). If the reference never exceeds the threshold, the
        challenge's call would fail; we use one decade above the threshold.
        """
        low = np.log10(threshold)
        high = np.log10(reference_max) if reference_max > threshold else low + 1.0
        return np.logspace(low, high, self.n_edges)


@dataclass(frozen=True)
class FeatureBinning:
    """Bins of one feature: a default, with other bins for some layer ids."""

    default: LinearBins | LogBins
    per_layer: tuple[tuple[tuple[int, ...], LinearBins], ...] = ()

    def for_layer(self, layer_id: int | None = None) -> LinearBins | LogBins:
        for layers, bins in self.per_layer:
            if layer_id in layers:
                return bins
        return self.default


@dataclass(frozen=True)
class PerEnergyBins:
    """E_tot / E_inc per incident energy (dataset 1): ranges [2^k, 2^(k+1)) MeV for
    k = 8..22 with ``default`` bins, and ``narrow`` bins for ``narrow_particles``
    from ``narrow_from_mev`` up (the challenge switches from the fifth energy on)."""

    default: LinearBins
    narrow: LinearBins
    narrow_from_mev: float
    narrow_particles: tuple[str, ...]

    def for_energy(self, energy_mev: float, particle: str) -> LinearBins:
        if particle in self.narrow_particles and energy_mev >= self.narrow_from_mev:
            return self.narrow
        return self.default


#: The challenge's histogram binnings, per dataset family: "ds1" (photons and
#: pions, ATLAS-like) and "ds23" (datasets 2 and 3). Layer-specific ranges apply
#: to the outer layers 12, 13 (and 12-14 for r) of dataset 1 only.
CHALLENGE_BINNINGS: dict[str, dict[str, FeatureBinning | PerEnergyBins]] = {
    "ds1": {
        "E_tot/E_inc": FeatureBinning(LinearBins(0.5, 1.5, 100)),
        "E_layer": FeatureBinning(LogBins(40)),
        "EC_eta": FeatureBinning(LinearBins(-100.0, 100.0, 100), (((12, 13), LinearBins(-500.0, 500.0, 100)),)),
        "EC_phi": FeatureBinning(LinearBins(-100.0, 100.0, 100), (((12, 13), LinearBins(-500.0, 500.0, 100)),)),
        "width_eta": FeatureBinning(LinearBins(0.0, 100.0, 100), (((12, 13), LinearBins(0.0, 400.0, 100)),)),
        "width_phi": FeatureBinning(LinearBins(0.0, 100.0, 100), (((12, 13), LinearBins(0.0, 400.0, 100)),)),
        "EC_r": FeatureBinning(LinearBins(0.0, 500.0, 100), (((12, 13, 14), LinearBins(0.0, 1500.0, 100)),)),
        "width_r": FeatureBinning(LinearBins(0.0, 500.0, 100), (((12, 13, 14), LinearBins(0.0, 1500.0, 100)),)),
        "sparsity": FeatureBinning(LinearBins(0.0, 1.0, 20)),
        "voxel_energy": FeatureBinning(LogBins(50)),
        "E_tot/E_inc per energy": PerEnergyBins(LinearBins(0.4, 1.4, 20), LinearBins(0.9, 1.1, 20),
                                                narrow_from_mev=2.0**12, narrow_particles=("photon",)),
    },
    "ds23": {
        "E_tot/E_inc": FeatureBinning(LinearBins(0.5, 1.5, 100)),
        "E_layer": FeatureBinning(LogBins(40)),
        "EC_eta": FeatureBinning(LinearBins(-30.0, 30.0, 100)),
        "EC_phi": FeatureBinning(LinearBins(-30.0, 30.0, 100)),
        "width_eta": FeatureBinning(LinearBins(0.0, 30.0, 100)),
        "width_phi": FeatureBinning(LinearBins(0.0, 30.0, 100)),
        "EC_r": FeatureBinning(LinearBins(0.0, 42.0, 100)),
        "width_r": FeatureBinning(LinearBins(0.0, 20.0, 100)),
        "sparsity": FeatureBinning(LinearBins(0.0, 1.0, 20)),
        "voxel_energy": FeatureBinning(LogBins(50)),
    },
}


def binning_family(binning: Binning) -> str:
    """Key of :data:`CHALLENGE_BINNINGS` for a binning: "ds1" or "ds23"."""
    return "ds1" if binning.is_dataset1 else "ds23"


def per_energy_ranges() -> list[tuple[float, float]]:
    """The dataset-1 incident-energy ranges [2^k, 2^(k+1)) MeV, k = 8..22, as the challenge builds them."""
    targets = 2.0 ** np.linspace(8, 23, 16)
    return [(float(targets[i]), float(targets[i + 1])) for i in range(len(targets) - 1)]


# -- histogramming ----------------------------------------------------------------

def normalised_histogram(values: np.ndarray, edges: np.ndarray, weights: np.ndarray | None = None
                         ) -> tuple[np.ndarray, float]:
    """Histogram of ``values`` on ``edges`` normalised to sum to one, and the number
    (or with ``weights``, same shape as values, the summed weight) of entries in range.
    Bins are [e_i, e_i+1) with the last one closed, entries outside are dropped
    (``np.histogram``); all zeros when nothing is in range."""
    counts, _ = np.histogram(np.asarray(values).reshape(-1), bins=edges,
                             weights=None if weights is None else np.asarray(weights).reshape(-1))
    return _normalise(counts)


def _normalise(counts: np.ndarray) -> tuple[np.ndarray, float]:
    total = counts.sum()
    if not total > 0:
        return np.zeros(len(counts)), 0
    return counts / total, total


def _separation_of(reference: np.ndarray, n_reference: float, generated: np.ndarray, n_generated: float) -> float:
    if n_reference == 0 or n_generated == 0:
        return 0.0 if n_reference == n_generated else 1.0
    return separation_power(reference, generated)


def histogram_pair(key: str, label: str, reference_values: np.ndarray, generated_values: np.ndarray,
                   edges: np.ndarray, *, log_x: bool = False, generated_weights: np.ndarray | None = None
                   ) -> FeatureHistogram:
    """Histogram one feature of both samples on shared edges and compute the separation
    power; ``generated_weights`` (one per generated value) weight the generated histogram."""
    ref, n_ref = normalised_histogram(reference_values, edges)
    gen, n_gen = normalised_histogram(generated_values, edges, generated_weights)
    return FeatureHistogram(key=key, label=label, bin_edges=np.asarray(edges, dtype=np.float64), reference=ref,
                            generated=gen, separation_power=_separation_of(ref, n_ref, gen, n_gen), log_x=log_x)


class VoxelEnergyHistogram:
    """Streaming histogram of all voxel energies of both samples (the challenge's
    ``plot_cell_dist``), for files too big to hold in memory.

    The edges need the reference's largest voxel energy, so evaluation reads the
    reference twice: a first pass (which also computes the features) finds the
    maximum, then chunks of both samples are added here. Counts are exact
    integers, identical to ``np.histogram`` of the flattened arrays::

        hist = VoxelEnergyHistogram(binning.readout_threshold, reference_max)
        for chunk in reference_chunks: hist.add_reference(chunk)
        for chunk in generated_chunks: hist.add_generated(chunk)
        feature_histogram = hist.result()

    Args:
        threshold: readout threshold in MeV (the first edge).
        reference_max: largest thresholded reference voxel energy, in the
            reference's dtype (see :meth:`LogBins.edges`).
        n_edges: 50, as the challenge (49 bins).
    """

    def __init__(self, threshold: float, reference_max: float | np.floating, n_edges: int = 50) -> None:
        self.edges = LogBins(n_edges).edges(threshold, reference_max)
        self.reference_counts = np.zeros(n_edges - 1, dtype=np.int64)
        self.generated_counts = np.zeros(n_edges - 1, dtype=np.float64)  # summed weights (1 each if unweighted)

    @classmethod
    def for_binning(cls, binning: Binning, reference_max: float | np.floating) -> VoxelEnergyHistogram:
        bins = CHALLENGE_BINNINGS[binning_family(binning)]["voxel_energy"].for_layer()
        return cls(binning.readout_threshold, reference_max, n_edges=bins.n_edges)

    def _counts(self, showers: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        values = np.asarray(showers).reshape(-1)
        # Same semantics as np.histogram (half-open bins, last closed), but O(n log n_bins)
        # instead of sorting: most of the evaluation time on big files is spent here.
        inside = (values >= self.edges[0]) & (values <= self.edges[-1])
        values = values[inside]
        index = np.searchsorted(self.edges, values, side="right") - 1
        index[index == len(self.edges) - 1] -= 1  # values equal to the last edge
        if weights is not None:  # one weight per shower, for each of its voxels
            per_voxel = np.broadcast_to(np.asarray(weights, dtype=np.float64).reshape(-1, 1), np.shape(showers))
            return np.bincount(index, weights=per_voxel.reshape(-1)[inside], minlength=len(self.edges) - 1)
        return np.bincount(index, minlength=len(self.edges) - 1)

    def add_reference(self, showers: np.ndarray) -> None:
        """Add thresholded reference showers (n, n_voxels), MeV."""
        self.reference_counts += self._counts(showers)

    def add_generated(self, showers: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add thresholded generated showers (n, n_voxels), MeV, with optional weights (n,)."""
        self.generated_counts += self._counts(showers, weights)

    def result(self, key: str = "voxel_energy") -> FeatureHistogram:
        ref, n_ref = _normalise(self.reference_counts)
        gen, n_gen = _normalise(self.generated_counts)
        return FeatureHistogram(key=key, label=r"voxel energy $E$ [MeV]", bin_edges=self.edges.copy(),
                                reference=ref, generated=gen,
                                separation_power=_separation_of(ref, n_ref, gen, n_gen), log_x=True)


def feature_histograms(reference: ShowerFeatures, generated: ShowerFeatures, binning: Binning | str,
                       voxel_energy: VoxelEnergyHistogram | None = None, *,
                       per_energy: bool | None = None, generated_weights: np.ndarray | None = None
                       ) -> list[FeatureHistogram]:
    """All feature histograms of the challenge with their separation powers.

    Keys, in this order (``{l}`` is the layer id):

    * ``E_tot/E_inc``
    * ``E_layer_{l}`` (relevant layers; 39 log bins from the threshold to the reference maximum)
    * ``EC_eta_layer_{l}``, ``EC_phi_layer_{l}``, ``width_eta_layer_{l}``, ``width_phi_layer_{l}`` (alpha-binned layers)
    * ``EC_r_layer_{l}``, ``width_r_layer_{l}``, ``sparsity_layer_{l}`` (relevant layers)
    * ``voxel_energy`` (only when ``voxel_energy`` is given: it needs every voxel, see
      :class:`VoxelEnergyHistogram`)
    * dataset 1 only (or ``per_energy=True``): ``E_tot/E_inc_E_{energy}`` per incident-energy
      range [2^k, 2^(k+1)) MeV, ``{energy}`` the lower edge as an integer in MeV (``E_tot/E_inc_E_256``
      ... ``E_tot/E_inc_E_4194304``), for every range that holds reference showers.

    Args:
        reference, generated: features of thresholded showers.
        binning: the showers' binning; its family selects the ranges in :data:`CHALLENGE_BINNINGS`.
        voxel_energy: filled voxel-energy histogram of both samples, or None to leave that key out.
        per_energy: force the per-energy histograms on or off (default: dataset 1 only, as the challenge).
        generated_weights: one weight per generated shower (n,), weighting every generated
            histogram (a reweighted generator); None: unweighted.
    """
    gw = None if generated_weights is None else np.asarray(generated_weights, dtype=np.float64).reshape(-1)
    binning = load_binning(binning)
    table = CHALLENGE_BINNINGS[binning_family(binning)]
    threshold = binning.readout_threshold
    out = [histogram_pair("E_tot/E_inc", r"$E_\mathrm{tot}/E_\mathrm{inc}$",
                          reference.e_tot / reference.incident_energies, generated.e_tot / generated.incident_energies,
                          table["E_tot/E_inc"].for_layer().edges(), generated_weights=gw)]

    for layer in reference.e_layer:
        ref_values = reference.e_layer[layer]
        edges = table["E_layer"].for_layer(layer).edges(threshold, ref_values.max() if len(ref_values) else 0.0)
        out.append(histogram_pair(f"E_layer_{layer}", rf"$E_{{{layer}}}$ [MeV]", ref_values,
                                  generated.e_layer[layer], edges, log_x=True, generated_weights=gw))

    specs = [("EC_eta", "ec_eta", r"centre of energy in $\eta$, layer {l} [mm]"),
             ("EC_phi", "ec_phi", r"centre of energy in $\phi$, layer {l} [mm]"),
             ("width_eta", "width_eta", r"width in $\eta$, layer {l} [mm]"),
             ("width_phi", "width_phi", r"width in $\phi$, layer {l} [mm]"),
             ("EC_r", "ec_r", "centre of energy in $r$, layer {l} [mm]"),
             ("width_r", "width_r", "width in $r$, layer {l} [mm]"),
             ("sparsity", "sparsity", "sparsity (fraction of empty voxels), layer {l}")]
    for name, attribute, label in specs:
        ref_group, gen_group = getattr(reference, attribute), getattr(generated, attribute)
        for layer in ref_group:
            out.append(histogram_pair(f"{name}_layer_{layer}", label.format(l=layer), ref_group[layer],
                                      gen_group[layer], table[name].for_layer(layer).edges(), generated_weights=gw))

    if voxel_energy is not None:
        out.append(voxel_energy.result())

    if per_energy if per_energy is not None else binning.is_dataset1:
        rule = CHALLENGE_BINNINGS["ds1"]["E_tot/E_inc per energy"]
        ref_ratio = reference.e_tot / reference.incident_energies
        gen_ratio = generated.e_tot / generated.incident_energies
        ref_inc = np.asarray(reference.incident_energies).reshape(-1)
        gen_inc = np.asarray(generated.incident_energies).reshape(-1)
        for low, high in per_energy_ranges():
            in_ref = (ref_inc >= low) & (ref_inc < high)
            if not in_ref.any():
                continue
            in_gen = (gen_inc >= low) & (gen_inc < high)
            out.append(histogram_pair(f"E_tot/E_inc_E_{int(low)}",
                                      r"$E_\mathrm{tot}/E_\mathrm{inc}$" + f", $E_\\mathrm{{inc}}$ = {int(low)} MeV",
                                      ref_ratio[in_ref], gen_ratio[in_gen],
                                      rule.for_energy(low, binning.particle).edges(),
                                      generated_weights=None if gw is None else gw[in_gen]))
    return out
