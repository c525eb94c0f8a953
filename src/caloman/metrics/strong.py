"""The strong classifier test: gradient-boosted trees, k-fold, per incident energy.

The challenge's network (:mod:`caloman.metrics.classifier`, setting "full") takes
hours on a CPU, and its small stand-in ("quick") cannot see defects that a
ten-second tree sees. This test is the project's yardstick of fidelity:

* the inputs are the challenge's (``low``, ``low_normed``, ``high``, see
  :func:`caloman.metrics.classifier.classifier_inputs`), plus, for every kind, the
  energy ratios log10(E_layer / E_inc) per layer and log10(E_tot / E_inc) and each
  layer's voxel-energy spectrum (counts of voxels in bands of doubling energy
  above the threshold, :func:`strong_inputs`): a network can form sums, ratios and
  counts of its inputs, a tree cannot, and without them a tree misses a layer's
  energy off by a few per cent or dim voxels lost near the threshold. Trees
  split on ranks, so a monotone transform of one input (log voxel energies,
  say) changes nothing;
* scikit-learn's :class:`~sklearn.ensemble.HistGradientBoostingClassifier`
  (log loss, early stopping on an internal 10 % validation split) is fitted
  k times (default 3), each time on all folds but one, and scores the fold it
  did not see; every shower is scored once, by a model that never saw it;
* AUC and JSD are the means over the folds, with the standard error of the mean
  over the folds as the uncertainty; the ROC curve is drawn from all
  out-of-fold scores;
* the same out-of-fold scores, restricted to one incident energy, give the AUC
  per energy: each discrete energy of a ladder (dataset 1), or log-spaced bins
  for a continuous spectrum.

JSD = (ln 2 - BCE) / ln 2 uses the trees' own probabilities (clipped to
[1e-6, 1 - 1e-6]): log-loss boosting with early stopping is close to
calibrated, so no isotonic step is added.

Cost grows with showers x inputs; both classes are cut to equal size, and to
at most ``max_values_per_class / n_inputs`` showers (dataset 1: all of 100,000;
dataset 2: about 7,400; dataset 3: about 1,200 for the low-level kinds, about
79,000 for the high-level one) so a test stays within minutes on two cores. The
showers kept are a seeded random subset of each class (:func:`strong_rows`), drawn
over the whole file, so the incident energies keep the file's spectrum; the
number per energy is reported (``n_per_energy``). :func:`strong_inputs` works row
by row, so a caller may build the inputs chunk by chunk from a file
(:func:`run_strong_test_on_inputs`) and get the same numbers as from whole arrays.

Memory of the trees grows with inputs x histogram bins: scikit-learn keeps one
histogram of ``n_inputs x (max_bins + 1)`` 20-byte entries per open leaf. For
the 40,772 low-level inputs of dataset 3 at 255 bins that is 209 MB per leaf,
several GB per tree. So the bins are cut to keep ``max_leaf_nodes`` histograms
within ``max_histogram_bytes`` (:meth:`StrongClassifierSettings.max_bins`):
dataset 1 and 2 keep 255 bins; dataset 3's low-level kinds get 58 quantile bins per
input (every voxel is still an input; only the trees' split points are coarser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from caloman.errors import ConfigError
from caloman.features import LOG_EPSILON
from caloman.geometry import Binning
from caloman.metrics import ClassifierResult
from caloman.metrics.classifier import (
    KINDS,
    PROBABILITY_FLOOR,
    check_showers,
    classifier_inputs,
    jensen_shannon_divergence,
)
from caloman.progress import ProgressBar

__all__ = ["StrongClassifierSettings", "energy_groups", "run_strong_test", "run_strong_test_on_inputs",
           "strong_input_count", "strong_inputs", "strong_rows"]

#: Voxel-energy bands per layer in the strong inputs: [t, 2t), [2t, 4t), ..., [2^(B-1) t, inf), t the threshold.
SPECTRUM_BANDS = 5

#: Bytes of one histogram entry of scikit-learn's boosted trees (sum of gradients, sum of hessians, count).
HISTOGRAM_ENTRY_BYTES = 20

#: The trees never use fewer bins than this (or more than scikit-learn's 255).
MIN_BINS, MAX_BINS = 16, 255

#: A spectrum with at most this many distinct incident energies is a ladder: one AUC per energy.
MAX_DISCRETE_ENERGIES = 40


@dataclass(frozen=True)
class StrongClassifierSettings:
    """Gradient-boosted trees, k-fold, per incident energy.

    Attributes:
        name: label stored in every result.
        n_folds: k of the k-fold (each shower is scored by the model that did not see it).
        max_iter: boosting iterations at most (early stopping usually ends sooner).
        learning_rate: shrinkage of each tree.
        max_leaf_nodes: leaves per tree.
        n_iter_no_change: early stopping patience on the internal validation loss.
        validation_fraction: part of each training fold used for early stopping.
        max_showers_per_class: cut each class to at most this many showers.
        max_values_per_class: and to at most this many (showers x inputs) values.
        energy_bins: log-spaced incident-energy bins for a continuous spectrum.
        min_showers_per_energy: per class, the fewest showers for an AUC at one energy.
        max_threads: OpenMP threads of the trees.
        max_histogram_bytes: the trees' open-leaf histograms stay within this many
            bytes (see :meth:`max_bins`).
    """

    name: str = "strong"
    n_folds: int = 3
    max_iter: int = 150
    learning_rate: float = 0.15
    max_leaf_nodes: int = 31
    n_iter_no_change: int = 10
    validation_fraction: float = 0.1
    max_showers_per_class: int | None = 100_000
    max_values_per_class: int = 50_000_000
    energy_bins: int = 10
    min_showers_per_energy: int = 20
    max_threads: int = 2
    max_histogram_bytes: int = 1_500_000_000

    def __post_init__(self) -> None:
        problems = []
        if self.n_folds < 2:
            problems.append(f"n_folds must be >= 2, got {self.n_folds}")
        if self.max_iter < 1 or self.max_leaf_nodes < 2 or self.n_iter_no_change < 1 or self.max_threads < 1:
            problems.append("max_iter, n_iter_no_change and max_threads must be >= 1, max_leaf_nodes >= 2")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.validation_fraction < 0.5:
            problems.append(f"validation_fraction must lie in (0, 0.5), got {self.validation_fraction}")
        if self.max_showers_per_class is not None and self.max_showers_per_class < 10:
            problems.append(f"max_showers_per_class must be >= 10, got {self.max_showers_per_class}")
        if self.max_histogram_bytes < 1_000_000:
            problems.append(f"max_histogram_bytes must be >= 1e6, got {self.max_histogram_bytes}")
        if self.max_values_per_class < 1000 or self.energy_bins < 1 or self.min_showers_per_energy < 2:
            problems.append("max_values_per_class must be >= 1000, energy_bins >= 1, min_showers_per_energy >= 2")
        if problems:
            raise ConfigError("invalid StrongClassifierSettings: " + "; ".join(problems))

    def showers_per_class(self, n_available: int, n_inputs: int) -> int:
        """How many showers of each class a test uses."""
        n = min(n_available, self.max_values_per_class // max(1, n_inputs))
        return n if self.max_showers_per_class is None else min(n, self.max_showers_per_class)

    def max_bins(self, n_inputs: int) -> int:
        """Histogram bins per input: 255 unless ``max_leaf_nodes`` histograms of
        ``n_inputs x (bins + 1)`` entries would exceed ``max_histogram_bytes``
        (never below :data:`MIN_BINS`)."""
        per_bin = max(1, n_inputs) * HISTOGRAM_ENTRY_BYTES * self.max_leaf_nodes
        return int(np.clip(self.max_histogram_bytes // per_bin - 1, MIN_BINS, MAX_BINS))


def _energy_key(mev: float) -> str:
    return f"{mev:.10g}"


def energy_groups(incident_energies: np.ndarray, n_bins: int = 10) -> tuple[list[str], np.ndarray]:
    """Group showers by incident energy for per-energy AUCs.

    A spectrum of at most :data:`MAX_DISCRETE_ENERGIES` distinct energies is a
    ladder: one group per energy, keyed by the energy in MeV. Otherwise
    ``n_bins`` log-spaced bins over the range widened to whole tenths of a decade
    (1 GeV - 1 TeV stays 1 GeV - 1 TeV), keyed by the bin's geometric centre rounded
    to 4 digits.

    Args:
        incident_energies: (N,) in MeV, positive.
    Returns:
        (keys, group index (N,)).
    """
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    levels = np.unique(energies.astype(np.float32))
    if len(levels) <= MAX_DISCRETE_ENERGIES:
        logs = np.log(levels.astype(np.float64))
        cuts = 0.5 * (logs[1:] + logs[:-1])
        return [_energy_key(float(v)) for v in levels], np.searchsorted(cuts, np.log(energies))
    # The range is snapped outwards to tenths of a decade, so that sub-samples of one spectrum
    # (the low-level test keeps fewer showers than the high-level one) share their bins.
    low = np.floor(np.log10(energies.min()) * 10 + 1e-6) / 10
    high = np.ceil(np.log10(energies.max()) * 10 - 1e-6) / 10
    edges = np.linspace(low, max(high, low + 0.1), n_bins + 1)
    centres = 10.0 ** (0.5 * (edges[1:] + edges[:-1]))
    keys = [_energy_key(float(f"{c:.4g}")) for c in centres]
    return keys, np.clip(np.searchsorted(edges, np.log10(energies), side="right") - 1, 0, n_bins - 1)


def strong_inputs(kind: str, incident_energies: np.ndarray, showers: np.ndarray, binning: Binning) -> np.ndarray:
    """The challenge's inputs of ``kind``, then the sums and counts a tree cannot form:

    * log10((E_layer + 1e-8) / E_inc) for every relevant layer and log10((E_tot + 1e-8) / E_inc);
    * every relevant layer's voxel-energy spectrum: the number of voxels in
      :data:`SPECTRUM_BANDS` bands [t 2^j, t 2^(j+1)) above the readout threshold t
      (the last band open-ended).

    Showers are thresholded already. Returns (N, n_kind + L + 1 + L * SPECTRUM_BANDS) float32.
    """
    energies, showers = check_showers(incident_energies, showers, binning, f"strong classifier inputs ({kind})")
    threshold = binning.readout_threshold
    edges = threshold * 2.0 ** np.arange(1, SPECTRUM_BANDS)
    layer_energies, spectra = [], []
    for layer in binning.relevant_layers:
        voxels = showers[:, binning.layer_slice(layer)]
        layer_energies.append(voxels.sum(axis=1, dtype=np.float64))
        band = np.searchsorted(edges, voxels, side="right")          # 0 .. SPECTRUM_BANDS - 1
        lit = voxels > 0
        spectra += [np.count_nonzero(lit & (band == j), axis=1) for j in range(SPECTRUM_BANDS)]
    layer_energies = np.stack(layer_energies, axis=1)
    totals = layer_energies.sum(axis=1, keepdims=True)
    ratios = np.log10((np.concatenate([layer_energies, totals], axis=1) + LOG_EPSILON) / energies[:, None])
    return np.concatenate([classifier_inputs(kind, energies, showers, binning), ratios, np.stack(spectra, axis=1)],
                          axis=1).astype(np.float32)


def strong_input_count(kind: str, binning: Binning) -> int:
    """Number of columns :func:`strong_inputs` gives for ``kind`` and ``binning``."""
    empty = np.zeros((1, binning.n_voxels), dtype=np.float32)
    return strong_inputs(kind, np.ones(1), empty, binning).shape[1]


def strong_rows(n_reference: int, n_generated: int, n_inputs: int, settings: StrongClassifierSettings,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The showers a strong test keeps: equal, seeded random subsets of both classes.

    Args:
        n_reference, n_generated: showers available in each class.
        n_inputs: inputs per shower (:func:`strong_input_count`).
    Returns:
        sorted row indices (n_per_class,) into the reference and into the generated sample.
    """
    n_per_class = settings.showers_per_class(min(n_reference, n_generated), n_inputs)
    if n_per_class < settings.n_folds * 5:
        raise ConfigError(f"{n_per_class} showers per class are too few for a {settings.n_folds}-fold classifier "
                          "test; give more showers")
    rng = np.random.default_rng(seed)
    ref_keep = np.sort(rng.permutation(n_reference)[:n_per_class])
    gen_keep = np.sort(rng.permutation(n_generated)[:n_per_class])
    return ref_keep, gen_keep


def _make_model(settings: StrongClassifierSettings, seed: int, n_inputs: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(
        max_iter=settings.max_iter, max_bins=settings.max_bins(n_inputs),
        learning_rate=settings.learning_rate, max_leaf_nodes=settings.max_leaf_nodes,
        early_stopping=True, validation_fraction=settings.validation_fraction,
        n_iter_no_change=settings.n_iter_no_change, random_state=seed)


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    error = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else math.nan
    return float(array.mean()), error


@dataclass
class _CrossFit:
    """Out-of-fold scores and per-fold results of one k-fold run."""

    scores: np.ndarray
    auc: list[float]
    jsd: list[float]
    iterations: list[int]
    auc_per_energy: dict[str, list[float]]


def _balanced_inputs(kind: str, reference: tuple[np.ndarray, np.ndarray], generated: tuple[np.ndarray, np.ndarray],
                     binning: Binning, settings: StrongClassifierSettings, seed: int
                     ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray]:
    """(energies, inputs) of the kept reference and generated showers (:func:`strong_rows`),
    and the kept generated rows."""
    ref_energies, ref_showers = check_showers(*reference, binning, "reference")
    gen_energies, gen_showers = check_showers(*generated, binning, "generated")
    ref_keep, gen_keep = strong_rows(len(ref_energies), len(gen_energies), strong_input_count(kind, binning),
                                     settings, seed)
    return ((ref_energies[ref_keep], strong_inputs(kind, ref_energies[ref_keep], ref_showers[ref_keep], binning)),
            (gen_energies[gen_keep], strong_inputs(kind, gen_energies[gen_keep], gen_showers[gen_keep], binning)),
            gen_keep)


def _cross_fit(kind: str, inputs: np.ndarray, labels: np.ndarray, group: np.ndarray,
               eligible: list[tuple[int, str]], settings: StrongClassifierSettings, seed: int,
               weights: np.ndarray | None) -> _CrossFit:
    """Fit on k - 1 folds, score the k-th, for every k; AUC per energy group of ``eligible``.
    ``weights`` (n,) are sample weights; None (unweighted) keeps the trees' constant-hessian
    fast path and the exact unweighted numbers."""
    result = _CrossFit(scores=np.empty(len(labels)), auc=[], jsd=[], iterations=[],
                       auc_per_energy={key: [] for _, key in eligible})
    # Stratify on (class, energy group): every fold sees every energy in both classes.
    strata = group * 2 + labels.astype(np.int64)
    folds = StratifiedKFold(n_splits=settings.n_folds, shuffle=True, random_state=seed)
    with threadpool_limits(limits=settings.max_threads, user_api="openmp"), \
            ProgressBar(settings.n_folds, desc=f"classifier {kind} (strong)", unit="fold") as bar:
        for fold, (train, test) in enumerate(folds.split(inputs, strata)):
            model = _make_model(settings, seed + fold, inputs.shape[1]).fit(
                inputs[train], labels[train], sample_weight=None if weights is None else weights[train])
            p = np.clip(model.predict_proba(inputs[test])[:, 1], PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
            result.scores[test] = p
            w = None if weights is None else weights[test]
            result.auc.append(float(roc_auc_score(labels[test], p, sample_weight=w)))
            result.jsd.append(jensen_shannon_divergence(labels[test], p, w))
            result.iterations.append(int(model.n_iter_))
            for g, key in eligible:
                mask = group[test] == g
                result.auc_per_energy[key].append(float(roc_auc_score(
                    labels[test][mask], p[mask], sample_weight=None if w is None else w[mask])))
            bar.update()
    return result


def run_strong_test(kind: str, reference: tuple[np.ndarray, np.ndarray], generated: tuple[np.ndarray, np.ndarray],
                    binning: Binning, settings: StrongClassifierSettings | None = None,
                    seed: int = 42, generated_weights: np.ndarray | None = None) -> ClassifierResult:
    """Separate reference from generated showers with boosted trees, k-fold, per energy.

    Args:
        kind: input kind, "low", "low_normed" or "high".
        reference: (incident_energies (N,), showers (N, V)) in MeV, thresholded.
        generated: the same for generated showers.
        binning: geometry of both samples.
        settings: :class:`StrongClassifierSettings` (default: the defaults).
        seed: seeds the subsets, the folds and the trees.
        generated_weights: one weight per generated shower (N,) (a reweighted generator):
            the trees train and the AUCs and JSD are computed with these sample weights
            (scaled so the generated class keeps its total weight). None: unweighted.

    Returns:
        :class:`ClassifierResult` with ``setting`` "strong": AUC and JSD as means
        over folds, ``auc_error`` (standard error over folds), ``auc_per_energy``
        and its errors, the out-of-fold ROC curve and ``best_epoch`` the mean number
        of boosting iterations.
    """
    settings = settings or StrongClassifierSettings()
    if kind not in KINDS:
        raise ConfigError(f"unknown classifier input kind {kind!r}: use one of {', '.join(KINDS)}")
    kept_reference, kept_generated, gen_keep = _balanced_inputs(kind, reference, generated, binning, settings, seed)
    weights = None if generated_weights is None else np.asarray(generated_weights, dtype=np.float64).reshape(-1)
    return run_strong_test_on_inputs(kind, kept_reference, kept_generated, settings, seed,
                                     None if weights is None else weights[gen_keep])


def run_strong_test_on_inputs(kind: str, reference: tuple[np.ndarray, np.ndarray],
                              generated: tuple[np.ndarray, np.ndarray], settings: StrongClassifierSettings,
                              seed: int = 42, generated_weights: np.ndarray | None = None) -> ClassifierResult:
    """The strong test on inputs built already (for example chunk by chunk from a file).

    Args:
        kind: input kind, recorded in the result.
        reference: (incident energies (n,) MeV, :func:`strong_inputs` (n, n_inputs)) of the
            kept reference showers, in the order of :func:`strong_rows`.
        generated: the same for the kept generated showers (same n).
        settings, seed: as :func:`run_strong_test`.
        generated_weights: (n,) weights of the kept generated showers, or None.
    """
    (ref_energies, ref_inputs), (gen_energies, gen_inputs) = reference, generated
    n_per_class = len(ref_energies)
    if len(gen_energies) != n_per_class or len(ref_inputs) != n_per_class or len(gen_inputs) != n_per_class:
        raise ConfigError(f"the strong test needs equal classes: {len(ref_inputs)} reference and "
                          f"{len(gen_inputs)} generated input rows")
    energies = np.concatenate([ref_energies, gen_energies]).astype(np.float64)
    inputs = np.concatenate([ref_inputs, gen_inputs])
    labels = np.concatenate([np.ones(n_per_class), np.zeros(n_per_class)])
    weights = None
    if generated_weights is not None:
        kept = np.asarray(generated_weights, dtype=np.float64).reshape(-1)
        weights = np.concatenate([np.ones(n_per_class), kept * (n_per_class / kept.sum())])
    keys, group = energy_groups(energies, settings.energy_bins)
    counts = {key: min(int(np.count_nonzero(group[:n_per_class] == g)), int(np.count_nonzero(group[n_per_class:] == g)))
              for g, key in enumerate(keys)}
    # An AUC per energy needs both classes in every test fold.
    eligible = [(g, key) for g, key in enumerate(keys)
                if counts[key] >= max(settings.min_showers_per_energy, settings.n_folds)]
    fit = _cross_fit(kind, inputs, labels, group, eligible, settings, seed, weights)

    auc, auc_error = _mean_and_error(fit.auc)
    per_energy, per_energy_error = {}, {}
    for _, key in eligible:
        per_energy[key], per_energy_error[key] = _mean_and_error(fit.auc_per_energy[key])
    fpr, tpr, _ = roc_curve(labels, fit.scores, sample_weight=weights)
    return ClassifierResult(kind=kind, auc=auc, jsd=float(np.mean(fit.jsd)), setting=settings.name,
                            fpr=fpr, tpr=tpr, best_epoch=int(round(float(np.mean(fit.iterations)))),
                            auc_error=auc_error, auc_per_energy=per_energy, auc_per_energy_error=per_energy_error,
                            n_per_energy={key: counts[key] for _, key in eligible}, n_per_class=n_per_class,
                            n_folds=settings.n_folds)
