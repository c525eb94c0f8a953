"""The one evaluation of caloman: generated showers against reference showers,
with the CaloChallenge's metrics computed the challenge's way.

:func:`evaluate_files` (CaloChallenge HDF5 files, streamed) and
:func:`evaluate_arrays` (arrays in memory) run the same steps:

1. threshold every voxel at the binning's readout threshold (1 MeV for dataset
   1, 0.5 keV / 0.033 for datasets 2 and 3), as the challenge does;
2. high-level features (:mod:`caloman.features`) and the chi-squared separation
   power of every feature histogram (:mod:`caloman.metrics.separation`);
3. classifier tests on low-level, normalised low-level and high-level inputs
   (``config.classifier``: "strong" boosted trees per incident energy, the
   challenge's "full" protocol, the "quick" unit-test setting, or "none");
4. FPD and KPD on the high-level feature vector, precision / recall / density /
   coverage on log10 voxel energies;
5. plots (average showers, per-energy averages, feature histograms, ROC, AUC
   against incident energy);

and write ``metrics.json``, ``summary.md`` and ``plots/`` into the output folder,
all at once at the end: a failed evaluation leaves nothing new there.

Files are read in chunks: the reference twice (the voxel-energy histogram's
edges need the reference's largest voxel, found in the first pass), the
generated file once. The steps that need whole showers (classifier tests, PRDC,
the per-energy average-shower plot) get seeded random sub-samples, chosen before
reading and gathered chunk by chunk; their bounds are settings of
:class:`EvaluationConfig` (docs/evaluation.md, "Evaluation at scale").
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from caloman import __version__
from caloman.errors import ConfigError, InvalidEnergyError, ShowerFileError, VoxelCountError
from caloman.features import (
    ShowerFeatures,
    apply_threshold,
    compute_features,
    high_level_vector,
    incident_energy_dtype,
)
from caloman.geometry import Binning, load_binning
from caloman.io import ShowerFile, atomic_directory, check_voxel_energies, default_chunk_size
from caloman.metrics import ClassifierResult, FeatureHistogram
from caloman.metrics.separation import VoxelEnergyHistogram, feature_histograms
from caloman.progress import ProgressBar

__all__ = ["CLASSIFIER_KINDS", "EvaluationConfig", "classifier_summary_lines", "evaluate_arrays", "evaluate_files",
           "render_summary", "to_jsonable"]

logger = logging.getLogger("caloman")

#: Classifier tests run, in order: voxels / E_inc, voxels / E_layer, high-level features.
CLASSIFIER_KINDS = ("low", "low_normed", "high")
CLASSIFIER_SETTINGS = ("strong", "full", "quick", "none")

#: FPD and KPD are quoted x 1e3, as in the challenge's tables.
DISTANCE_SCALE = 1e3
#: PRDC replaces empty voxels by this energy (MeV) before log10, as the challenge.
PRDC_EMPTY_VOXEL_MEV = 0.1

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
PLOTS_DIR = "plots"


@dataclass(frozen=True)
class EvaluationConfig:
    """What to evaluate and how.

    Attributes:
        classifier: "strong" (gradient-boosted trees, 3-fold, AUC per incident
            energy, :mod:`caloman.metrics.strong`: the project's yardstick of fidelity,
            minutes on a CPU), "full" (the challenge's protocol: 3 x 2048 network, 50
            epochs, challenge splits; numbers comparable with published tables, hours on
            a CPU), "quick" (a small network for unit tests only, never evidence of
            fidelity), or "none".
        seed: seeds every random choice (sub-samples, classifier splits, FPD/KPD draws).
            42 is jetnet's default, so FPD/KPD draws are the challenge's.
        max_showers: use at most this many showers of each sample, chosen at random
            (seeded) over the whole file, since files may be ordered by energy.
        fpd_kpd: compute the Frechet and kernel physics distances.
        prdc: compute precision, recall, density and coverage.
        prdc_k: nearest neighbours of PRDC (challenge default 5).
        prdc_max_showers: PRDC uses a seeded random sub-sample of at most this many
            showers per sample (its cost grows as n_ref * n_gen).
        prdc_max_values: and of at most this many voxel values (showers x voxels) per
            sample, which bounds its memory (held as float64) and time on the large
            binnings: 10,000 showers for datasets 1 and 2, 2,469 for dataset 3.
        classifier_max_showers: the classifier tests use at most this many showers per
            class (None: as many as the setting and ``classifier_max_values`` allow).
        classifier_max_values: the network settings ("full", "quick") keep at most this
            many (showers x inputs) values per class (all of dataset 1's 121,000 showers;
            about 15,000 for dataset 2, 2,466 for dataset 3); the strong setting at most
            this many and at most its own 50,000,000 (a cost bound, see
            :mod:`caloman.metrics.strong`). Only the chosen showers are kept while the
            files stream, so memory follows these bounds, not the file sizes.
        plots: draw the pictures into ``out_dir/plots``.
        plot_max_voxels: the per-energy average-shower pictures use a seeded random
            sub-sample of at most this many voxel values (showers x voxels) per sample,
            to bound memory on dataset 3; all other plots use every shower.
        weights: weight the generated showers by the ``weights`` dataset of the generated
            file (a reweighted generator, ``caloman refine --method reweight``): feature
            histograms, separation powers, the average shower and (setting "strong")
            the classifier test; FPD/KPD and PRDC stay unweighted.
    """

    classifier: str = "full"
    seed: int = 42
    max_showers: int | None = None
    fpd_kpd: bool = True
    prdc: bool = True
    prdc_k: int = 5
    prdc_max_showers: int = 10_000
    prdc_max_values: int = 100_000_000
    classifier_max_showers: int | None = None
    classifier_max_values: int = 100_000_000
    plots: bool = True
    plot_max_voxels: int = 20_000_000
    weights: bool = False

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIER_SETTINGS:
            raise ConfigError(f"classifier must be one of {', '.join(CLASSIFIER_SETTINGS)}, got {self.classifier!r}")
        if self.max_showers is not None and self.max_showers < 1:
            raise ConfigError(f"max_showers must be a positive number of showers, got {self.max_showers}")
        if self.prdc_k < 1 or self.prdc_max_showers < 1 or self.plot_max_voxels < 1:
            raise ConfigError("prdc_k, prdc_max_showers and plot_max_voxels must be positive")
        if self.prdc_max_values < 1 or self.classifier_max_values < 1:
            raise ConfigError(f"prdc_max_values and classifier_max_values must be positive numbers of values, got "
                              f"{self.prdc_max_values} and {self.classifier_max_values}")
        if self.classifier_max_showers is not None and self.classifier_max_showers < 10:
            raise ConfigError(f"classifier_max_showers must be at least 10 showers per class, got "
                              f"{self.classifier_max_showers}")
        for name in ("max_showers", "prdc_k", "prdc_max_showers", "prdc_max_values", "classifier_max_showers",
                     "classifier_max_values", "plot_max_voxels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | np.integer)):
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
        if self.weights and self.classifier not in ("strong", "none"):
            raise ConfigError(f"weighted evaluation runs the classifier test with --classifier strong or none, not "
                              f"{self.classifier!r}")

    def prdc_showers(self, binning: Binning) -> int:
        """Showers per sample PRDC uses at most (``prdc_max_showers``, ``prdc_max_values``)."""
        return min(self.prdc_max_showers, max(self.prdc_k + 1, self.prdc_max_values // binning.n_voxels))


# -- where showers come from ----------------------------------------------------------

class _Sample:
    """One side of the comparison (reference or generated): yields thresholded
    chunks of the rows in use, from an open file or from arrays in memory."""

    def __init__(self, name: str, binning: Binning, *, file: ShowerFile | None = None,
                 arrays: tuple[np.ndarray, np.ndarray] | None = None, max_showers: int | None,
                 rng: np.random.Generator, weighted: bool = False) -> None:
        self.name = name
        self.binning = binning
        self.file = file
        if file is not None:
            self.path: Path | None = file.path
            self.n_available = file.n_showers
            self.incident_dtype = incident_energy_dtype(str(file.path))
        else:
            assert arrays is not None
            self.path = None
            self._incident, self._showers = _check_arrays(name, arrays, binning)
            self.n_available = len(self._incident)
            self.incident_dtype = self._incident.dtype
        if self.n_available == 0:
            raise ShowerFileError(f"{self.path or name}: holds no showers; nothing to evaluate")
        # Sorted row indices in use, or None for all rows.
        self.rows: np.ndarray | None = None
        if max_showers is not None and max_showers < self.n_available:
            self.rows = np.sort(rng.choice(self.n_available, size=max_showers, replace=False))
        self.n_used = self.n_available if self.rows is None else len(self.rows)
        #: per-shower weights of the rows in use (n_used,), or None for an unweighted sample
        self.weights = self._weights() if weighted else None

    def _weights(self) -> np.ndarray:
        weights = self.file.read_weights() if self.file is not None else None
        if weights is None:
            raise ShowerFileError(f"{self.path or self.name}: has no 'weights' dataset to weight the {self.name} "
                                  "showers by; generate with a reweighted run (caloman refine --method reweight), "
                                  "or leave out --weights")
        return weights if self.rows is None else weights[self.rows]

    def _raw_chunks(self) -> Iterator[tuple[int, int]]:
        size = default_chunk_size(self.binning.n_voxels)
        for start in range(0, self.n_available, size):
            yield start, min(start + size, self.n_available)

    def chunks(self, desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(incident energies (n,) in the stored dtype, thresholded showers (n, n_voxels)) per chunk."""
        with ProgressBar(self.n_used, desc=desc, unit="showers") as bar:
            for start, stop in self._raw_chunks():
                if self.rows is not None:
                    lo, hi = np.searchsorted(self.rows, [start, stop])
                    if lo == hi:
                        continue  # no selected row in this chunk: skip reading it
                    select = self.rows[lo:hi] - start
                if self.file is not None:
                    incident, showers = self.file.read(start, stop)
                else:
                    incident, showers = self._incident[start:stop], self._showers[start:stop]
                if self.rows is not None:
                    incident, showers = incident[select], showers[select]
                yield (np.asarray(incident).astype(self.incident_dtype, copy=False),
                       apply_threshold(showers, self.binning.readout_threshold))
                bar.update(len(incident))


def _check_arrays(name: str, arrays: tuple[np.ndarray, np.ndarray], binning: Binning
                  ) -> tuple[np.ndarray, np.ndarray]:
    try:
        incident, showers = arrays
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: give a pair (incident_energies, showers)") from exc
    incident = np.asarray(incident).reshape(-1)
    showers = np.asarray(showers)
    if showers.ndim != 2 or showers.shape[1] != binning.n_voxels:
        raise VoxelCountError(f"{name}: showers have shape {showers.shape}, binning {binning.name} needs "
                              f"(N, {binning.n_voxels}); pass the binning the showers were made with")
    if incident.shape[0] != showers.shape[0]:
        raise ShowerFileError(f"{name}: {incident.shape[0]} incident energies for {showers.shape[0]} showers")
    if not (np.isfinite(incident).all() and (incident > 0).all()):
        raise InvalidEnergyError(f"{name}: incident energies must be positive and finite (MeV)")
    check_voxel_energies(showers, where=name)
    return incident, showers


@dataclass(frozen=True)
class _Gather:
    """Rows a later step needs, collected while a sample streams: ``build`` turns the
    selected rows of a chunk (incident energies (n,), thresholded showers (n, V)) into
    a tuple of arrays with n rows each (default: the rows themselves)."""

    positions: np.ndarray          # sorted positions among the rows in use
    build: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]] | None = None


class _Accumulator:
    """Everything one streaming pass over a sample collects."""

    def __init__(self, sample: _Sample, *, gather: dict[str, _Gather]) -> None:
        self.binning = sample.binning
        self.parts: list[ShowerFeatures] = []
        self.max_voxel: np.floating | None = None
        self.sum_shower = np.zeros(sample.binning.n_voxels)
        self.n = 0
        self.weights = sample.weights              # (n_used,) or None
        self.gather = gather
        self.gathered: dict[str, list[tuple[np.ndarray, ...]]] = {k: [] for k in gather}

    def add(self, incident: np.ndarray, showers: np.ndarray) -> None:
        self.parts.append(compute_features(incident, showers, self.binning))
        if showers.size:
            chunk_max = showers.max()
            self.max_voxel = chunk_max if self.max_voxel is None else max(self.max_voxel, chunk_max)
        weights = self.chunk_weights(len(incident))
        self.sum_shower += (showers.sum(axis=0, dtype=np.float64) if weights is None
                            else weights @ showers.astype(np.float64))
        for key, gather in self.gather.items():
            lo, hi = np.searchsorted(gather.positions, [self.n, self.n + len(incident)])
            if hi > lo:
                local = gather.positions[lo:hi] - self.n
                rows = (incident[local], showers[local])
                self.gathered[key].append(rows if gather.build is None else gather.build(*rows))
        self.n += len(incident)

    def chunk_weights(self, n: int) -> np.ndarray | None:
        """Weights of the next ``n`` rows to be added (None: unweighted)."""
        return None if self.weights is None else self.weights[self.n:self.n + n]

    def features(self) -> ShowerFeatures:
        return ShowerFeatures.concatenate(self.parts)

    def mean_shower(self) -> np.ndarray:
        total = self.n if self.weights is None else float(self.weights.sum())
        return self.sum_shower / max(total, 1e-300) if self.n else self.sum_shower

    def collected(self, key: str) -> tuple[np.ndarray, ...]:
        """The gathered rows of ``key`` joined, (incident energies, showers) by default."""
        pieces = self.gathered[key]
        if not pieces:
            return np.zeros(0), np.zeros((0, self.binning.n_voxels))
        return tuple(np.concatenate([piece[i] for piece in pieces]) for i in range(len(pieces[0])))

    def release(self, key: str) -> tuple[np.ndarray, ...]:
        """:meth:`collected`, then forget the pieces (their memory is freed)."""
        joined = self.collected(key)
        self.gathered[key] = []
        return joined


def _positions(n_used: int, at_most: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted random positions (without replacement) of a sub-sample of at most ``at_most`` rows."""
    if n_used <= at_most:
        return np.arange(n_used)
    return np.sort(rng.choice(n_used, size=at_most, replace=False))


# -- the evaluation ---------------------------------------------------------------------

def evaluate_files(generated: str | Path, reference: str | Path, binning: Binning | str | Path,
                   out_dir: str | Path, config: EvaluationConfig | None = None) -> dict[str, Any]:
    """Evaluate a generated CaloChallenge file against a reference file.

    Writes ``metrics.json``, ``summary.md`` and (if ``config.plots``) ``plots/*.png``
    into ``out_dir`` and returns the metrics dict (the content of ``metrics.json``).
    Raises :class:`~caloman.errors.ShowerFileError` (and subclasses) for unreadable
    or inconsistent files, :class:`~caloman.errors.ConfigError` for bad settings.
    """
    config = config or EvaluationConfig()
    binning = load_binning(binning)
    with ExitStack() as stack:
        files = {}
        for name, path in (("reference", reference), ("generated", generated)):
            # Values are checked chunk by chunk as they are read, so no separate scan here.
            files[name] = stack.enter_context(ShowerFile(path, binning, check_values=False))
        samples = _make_samples(binning, config, files=files)
        return _evaluate(samples, binning, Path(out_dir), config)


def evaluate_arrays(reference: tuple[np.ndarray, np.ndarray], generated: tuple[np.ndarray, np.ndarray],
                    binning: Binning | str | Path, out_dir: str | Path,
                    config: EvaluationConfig | None = None) -> dict[str, Any]:
    """Evaluate generated showers against reference showers held in memory.

    ``reference`` and ``generated`` are (incident_energies (N,) or (N, 1), showers
    (N, n_voxels)) in MeV, not yet thresholded. Same outputs as :func:`evaluate_files`.
    """
    config = config or EvaluationConfig()
    binning = load_binning(binning)
    samples = _make_samples(binning, config, arrays={"reference": reference, "generated": generated})
    return _evaluate(samples, binning, Path(out_dir), config)


def _make_samples(binning: Binning, config: EvaluationConfig, *, files: dict[str, ShowerFile] | None = None,
                  arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, _Sample]:
    samples = {}
    for name in ("reference", "generated"):
        # The same stream for both sides: a file compared with itself uses the same
        # rows on both sides and gives separation powers of exactly zero.
        rng = np.random.default_rng([config.seed, 0])
        samples[name] = _Sample(name, binning, file=files[name] if files else None,
                                arrays=arrays[name] if arrays else None, max_showers=config.max_showers, rng=rng,
                                weighted=config.weights and name == "generated")
    return samples


class _Laps:
    """Wall time of each named step, in seconds."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = self._clock = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[step] = round(now - self._clock, 4)
        self._clock = now

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": round(time.perf_counter() - self._start, 4)}


def _evaluate(samples: dict[str, _Sample], binning: Binning, out_dir: Path, config: EvaluationConfig
              ) -> dict[str, Any]:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output folder {out_dir} is an existing file; give a folder name")
    laps = _Laps()
    classifier_plan = _ClassifierPlan(samples, binning, config)
    accumulators, voxel_histogram = _read_samples(samples, binning, config, classifier_plan, laps)
    ref_features, gen_features = accumulators["reference"].features(), accumulators["generated"].features()
    histograms = feature_histograms(ref_features, gen_features, binning, voxel_histogram,
                                    generated_weights=samples["generated"].weights)
    laps("separation_power")
    metrics = _metrics_header(samples, binning, config, histograms)
    # Everything is written into a temporary folder that replaces out_dir's entries
    # only at the end: invalid input or a failure on the way leaves nothing behind.
    with atomic_directory(out_dir) as work_dir:
        metrics["classifier_showers_per_class"] = classifier_plan.n_per_class()
        classifier_results = classifier_plan.run(metrics, accumulators, laps)
        _physics_distances(metrics, ref_features, gen_features, config, laps)
        _precision_recall(metrics, accumulators, config, laps)
        if config.plots:
            metrics["plots"] = _draw_plots(work_dir, binning, histograms, accumulators, classifier_results)
            laps("plots")
        metrics["timings"] = laps.total()
        metrics = to_jsonable(metrics)
        (work_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        (work_dir / SUMMARY_FILE).write_text(render_summary(metrics))
    return metrics


def _read_samples(samples: dict[str, _Sample], binning: Binning, config: EvaluationConfig,
                  classifier_plan: _ClassifierPlan, laps: _Laps
                  ) -> tuple[dict[str, _Accumulator], VoxelEnergyHistogram]:
    """Stream both samples: features, sums, sub-samples, classifier inputs and the voxel-energy histogram.

    Pass 1 over the reference: features, largest voxel, sums; the pass over the
    generated sample fills the voxel histogram too (its edges need the
    reference's largest voxel); pass 2 over the reference fills its voxel histogram.
    Returns the accumulators by sample name and the voxel-energy histogram.
    """
    accumulators = {}
    for name, sample in samples.items():
        rng = np.random.default_rng([config.seed, 1])  # same rows on both sides, as in _make_samples
        gather = {}
        if config.prdc:
            gather["prdc"] = _Gather(_positions(sample.n_used, config.prdc_showers(binning), rng))
        if config.plots:
            gather["plot"] = _Gather(_positions(sample.n_used, max(1, config.plot_max_voxels // binning.n_voxels),
                                                rng))
        gather.update(classifier_plan.gathers[name])
        accumulators[name] = _Accumulator(sample, gather=gather)

    ref_acc, gen_acc = accumulators["reference"], accumulators["generated"]
    logger.info("evaluate: reading %d reference and %d generated showers", samples["reference"].n_used,
                samples["generated"].n_used)
    for incident, showers in samples["reference"].chunks("reference features"):
        ref_acc.add(incident, showers)
    laps("reference_features")
    voxel_hist = VoxelEnergyHistogram.for_binning(binning, ref_acc.max_voxel if ref_acc.max_voxel is not None else 0.0)
    for incident, showers in samples["generated"].chunks("generated features"):
        voxel_hist.add_generated(showers, gen_acc.chunk_weights(len(incident)))
        gen_acc.add(incident, showers)
    laps("generated_features")
    for _, showers in samples["reference"].chunks("reference voxel energies"):
        voxel_hist.add_reference(showers)
    laps("reference_voxel_histogram")
    return accumulators, voxel_hist


def _metrics_header(samples: dict[str, _Sample], binning: Binning, config: EvaluationConfig,
                    histograms: list[FeatureHistogram]) -> dict[str, Any]:
    """The metrics dict with provenance and separation powers; later steps fill the rest."""
    return {
        "caloman_version": __version__,
        "versions": _versions(),
        "binning": binning.name,
        "binning_source": binning.source,
        "threshold_mev": binning.readout_threshold,
        "seed": config.seed,
        "config": asdict(config),
        "files": {name: (str(s.path.resolve()) if s.path is not None else None) for name, s in samples.items()},
        "n_showers": {name: s.n_used for name, s in samples.items()},
        "n_showers_available": {name: s.n_available for name, s in samples.items()},
        "units": {
            "separation_power": "chi-squared separation power of normalised histograms, 0 (identical) to 1 (disjoint)",
            "fpd": "Frechet physics distance x 1e3 (as the CaloChallenge quotes it)",
            "kpd": "kernel physics distance x 1e3 (as the CaloChallenge quotes it)",
            "auc_per_energy": "incident energy in MeV -> AUC of the showers at that energy (strong setting)",
            "timings": "seconds",
        },
        "separation_power": {h.key: h.separation_power for h in histograms},
        "classifier": {},
        "fpd": None,
        "kpd": None,
        "prdc": None,
        "weights": _weights_entry(samples["generated"].weights),
        "notes": ["weighted generated sample: feature histograms, separation powers, average showers and the "
                  "strong classifier test use its weights; FPD/KPD and PRDC do not"]
        if samples["generated"].weights is not None else [],
    }


def _weights_entry(weights: np.ndarray | None) -> dict[str, Any] | None:
    """What metrics.json records of the generated sample's weights (None: unweighted)."""
    if weights is None:
        return None
    ess = float(weights.sum() ** 2 / (len(weights) * np.square(weights).sum()))
    return {"n": len(weights), "ess_fraction": ess, "mean": float(weights.mean()), "max": float(weights.max())}


def _classifier_entry(result: ClassifierResult) -> dict[str, Any]:
    """What metrics.json records of one classifier test."""
    entry: dict[str, Any] = {"auc": result.auc, "jsd": result.jsd, "setting": result.setting}
    if result.auc_per_energy is None:
        entry["best_epoch"] = result.best_epoch
        return entry
    entry.update(auc_error=result.auc_error, auc_per_energy=result.auc_per_energy,
                 auc_per_energy_error=result.auc_per_energy_error, n_per_energy=result.n_per_energy,
                 n_per_class=result.n_per_class, n_folds=result.n_folds, boosting_iterations=result.best_epoch)
    return entry


class _ClassifierPlan:
    """Which showers each classifier test uses, and how its inputs are built while the files stream.

    The rows are chosen before reading (seeded, from the sample sizes alone) and only
    they are kept: for the strong setting the inputs of each kind
    (:func:`caloman.metrics.strong.strong_inputs`, row by row, so the same numbers as
    from whole arrays), for the networks the thresholded showers. Memory then grows
    with the sub-sample, never with the files.
    """

    def __init__(self, samples: dict[str, _Sample], binning: Binning, config: EvaluationConfig) -> None:
        self.binning, self.config = binning, config
        self.gathers: dict[str, dict[str, _Gather]] = {"reference": {}, "generated": {}}
        self.rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}    # gather key -> (reference, generated) rows
        n_ref, n_gen = samples["reference"].n_used, samples["generated"].n_used
        if config.classifier == "strong":
            strong = _optional("caloman.metrics.strong", None, "the classifier tests", "--classifier none")
            base = strong.StrongClassifierSettings()
            at_most = base.max_showers_per_class
            if config.classifier_max_showers is not None:
                at_most = _smallest(config.classifier_max_showers, at_most)
            self.module, self.settings = strong, replace(
                base, max_showers_per_class=at_most,
                max_values_per_class=min(base.max_values_per_class, config.classifier_max_values))
            for kind in CLASSIFIER_KINDS:
                n_inputs = strong.strong_input_count(kind, binning)
                rows = strong.strong_rows(n_ref, n_gen, n_inputs, self.settings, config.seed)
                self._add(f"classifier_{kind}", rows, functools.partial(_strong_inputs, strong, kind, binning))
        elif config.classifier != "none":
            network = _optional("caloman.metrics.classifier", None, "the classifier tests", "--classifier none")
            self.module, self.settings = network, network.resolve_settings(config.classifier, binning)
            # The widest input (low_normed: log10 E_inc, voxels, one energy per layer) bounds the memory.
            n_inputs = 1 + binning.n_voxels + len(binning.relevant_layers)
            at_most = _smallest(max(1, config.classifier_max_values // n_inputs), config.classifier_max_showers)
            self._add("classifier", network.classifier_rows(n_ref, n_gen, self.settings, config.seed, at_most))

    def _add(self, key: str, rows: tuple[np.ndarray, np.ndarray], build: Callable | None = None) -> None:
        self.rows[key] = rows
        for name, chosen in zip(("reference", "generated"), rows):
            self.gathers[name][key] = _Gather(np.unique(chosen), build)

    def n_per_class(self) -> dict[str, int]:
        """Showers per class of each gathered sub-sample (recorded in metrics.json)."""
        return {key: len(rows[0]) for key, rows in self.rows.items()}

    def run(self, metrics: dict[str, Any], accumulators: dict[str, _Accumulator], laps: _Laps
            ) -> list[ClassifierResult]:
        """Run the three tests into ``metrics["classifier"]``."""
        if self.config.classifier == "none":
            return []
        ref_acc, gen_acc = accumulators["reference"], accumulators["generated"]
        results = []
        for kind in CLASSIFIER_KINDS:
            if self.config.classifier == "strong":
                key = f"classifier_{kind}"
                weights = gen_acc.weights
                result = self.module.run_strong_test_on_inputs(
                    kind, ref_acc.release(key), gen_acc.release(key), self.settings, seed=self.config.seed,
                    generated_weights=None if weights is None else weights[self.rows[key][1]])
            else:
                reference = _in_order(ref_acc.collected("classifier"), self.rows["classifier"][0])
                generated = _in_order(gen_acc.collected("classifier"), self.rows["classifier"][1])
                result = self.module.run_classifier_test(kind, reference, generated, self.binning,
                                                         setting=self.config.classifier, seed=self.config.seed,
                                                         preselected=True)
            results.append(result)
            metrics["classifier"][kind] = _classifier_entry(result)
            laps(f"classifier_{kind}")
        return results


def _smallest(value: int, cap: int | None) -> int:
    """``value``, cut to ``cap`` unless that is None."""
    return value if cap is None else min(value, cap)


def _strong_inputs(strong: Any, kind: str, binning: Binning, incident: np.ndarray, showers: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(incident energies (n,) float64, strong inputs (n, n_inputs) float32) of one chunk's chosen rows."""
    energies = incident.astype(np.float64)
    return energies, strong.strong_inputs(kind, energies, showers, binning)


def _in_order(gathered: tuple[np.ndarray, ...], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows gathered in file order, put into the order ``rows`` (distinct indices) lists them."""
    incident, showers = gathered
    order = np.searchsorted(np.sort(rows), rows)
    return incident[order].astype(np.float64), showers[order]


def _physics_distances(metrics: dict[str, Any], ref_features: ShowerFeatures, gen_features: ShowerFeatures,
                       config: EvaluationConfig, laps: _Laps) -> None:
    """FPD and KPD (x 1e3) on the high-level feature vector into ``metrics``."""
    if not config.fpd_kpd:
        return
    if min(ref_features.n_showers, gen_features.n_showers) < 2:
        metrics["notes"].append("FPD/KPD skipped: they need at least 2 showers per sample")
        return
    fpd = _optional("caloman.metrics.distances", "fpd", "FPD", "fpd_kpd=False")
    kpd = _optional("caloman.metrics.distances", "kpd", "KPD", "fpd_kpd=False")
    # The whole high-level vector, log10(E_inc) included: the challenge passes
    # prepare_high_data_for_classifier(...)[:, :-1], which drops only the label column.
    ref_vector, gen_vector = high_level_vector(ref_features), high_level_vector(gen_features)
    value, error = fpd(ref_vector, gen_vector, seed=config.seed)
    metrics["fpd"] = {"value": value * DISTANCE_SCALE, "error": error * DISTANCE_SCALE}
    value, error = kpd(ref_vector, gen_vector, seed=config.seed)
    metrics["kpd"] = {"value": value * DISTANCE_SCALE, "error": error * DISTANCE_SCALE}
    laps("fpd_kpd")


def _precision_recall(metrics: dict[str, Any], accumulators: dict[str, _Accumulator], config: EvaluationConfig,
                      laps: _Laps) -> None:
    """Precision, recall, density and coverage on log10 voxel energies into ``metrics``."""
    if not config.prdc:
        return
    ref_voxels = accumulators["reference"].collected("prdc")[1]
    gen_voxels = accumulators["generated"].collected("prdc")[1]
    if min(len(ref_voxels), len(gen_voxels)) <= config.prdc_k:
        metrics["notes"].append(f"PRDC skipped: it needs more than k = {config.prdc_k} showers per sample")
        return
    prdc = _optional("caloman.metrics.distances", "prdc", "PRDC", "prdc=False")
    metrics["prdc"] = prdc(_prdc_input(ref_voxels), _prdc_input(gen_voxels), k=config.prdc_k, seed=config.seed)
    metrics["prdc"]["n_showers"] = {"reference": len(ref_voxels), "generated": len(gen_voxels)}
    laps("prdc")


def _optional(module: str, attribute: str | None, what: str, switch_off: str) -> Any:
    """Import a part of caloman that is loaded only when needed (torch, matplotlib are slow to import)."""
    try:
        loaded = importlib.import_module(module)
        return loaded if attribute is None else getattr(loaded, attribute)
    except (ModuleNotFoundError, AttributeError) as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name not in (module, None):
            raise  # a missing third-party dependency is a real error
        raise ConfigError(f"{what} need {module}.{attribute or ''}, which this build of caloman lacks; "
                          f"switch them off ({switch_off})") from exc


def _prdc_input(showers: np.ndarray) -> np.ndarray:
    """log10 of voxel energies with empty voxels at 0.1 MeV (the challenge's PRDC input), (n, n_voxels)."""
    return np.log10(np.where(showers == 0.0, np.asarray(PRDC_EMPTY_VOXEL_MEV, dtype=showers.dtype), showers))


def _draw_plots(out_dir: Path, binning: Binning, histograms: list[FeatureHistogram],
                accumulators: dict[str, _Accumulator], classifier_results: list[ClassifierResult]) -> list[str]:
    plots = _optional("caloman.plots", None, "the plots", "--no-plots")

    plot_dir = out_dir / PLOTS_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = list(plots.plot_feature_histograms(histograms, plot_dir))
    for name, acc in accumulators.items():
        paths.append(plots.plot_average_shower(acc.mean_shower(), binning, plot_dir / f"average_shower_{name}.png",
                                               title=f"Average {name} shower"))
        incident, showers = acc.collected("plot")
        if len(incident):
            paths.append(plots.plot_average_showers_per_energy(
                incident, showers, binning, plot_dir / f"average_showers_per_energy_{name}.png"))
    if classifier_results:
        paths.append(plots.plot_roc(classifier_results, plot_dir / "roc.png"))
        if all(r.auc_per_energy for r in classifier_results):
            paths.append(plots.plot_auc_per_energy(classifier_results, plot_dir / "auc_per_energy.png"))
    return [str(Path(p).relative_to(out_dir)) if Path(p).is_relative_to(out_dir) else str(p) for p in paths]


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"caloman": __version__, "numpy": np.__version__,
                                       "python": platform.python_version()}
    for package in ("torch", "h5py", "scipy", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def to_jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- the human-readable summary ------------------------------------------------------------

def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


_SETTING_NOTES = {
    "strong": "gradient-boosted trees, k-fold, per incident energy: the project's yardstick of fidelity",
    "full": "the challenge's full protocol, comparable with its published numbers",
    "quick": "a small network for unit tests: not evidence of fidelity, not comparable with the challenge",
}


def classifier_summary_lines(classifier: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of the classifier section: one table, and for the strong setting AUC per energy."""
    settings = sorted({v.get("setting", "?") for v in classifier.values()})
    setting = ", ".join(settings)
    note = _SETTING_NOTES.get(setting, "a custom setting: not comparable with the challenge's published numbers")
    lines = [f"Setting: **{setting}** ({note}). AUC 0.5 means indistinguishable.", ""]
    per_energy = {kind: r["auc_per_energy"] for kind, r in classifier.items() if r.get("auc_per_energy")}
    if not per_energy:
        lines += [f"| input ({setting}) | AUC | JSD |", "|---|---:|---:|"]
        lines += [f"| {kind} | {_fmt(r.get('auc'))} | {_fmt(r.get('jsd'))} |" for kind, r in classifier.items()]
        return lines
    lines += [f"| input ({setting}) | AUC | +- | JSD | showers per class |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {kind} | {_fmt(r.get('auc'))} | {_fmt(r.get('auc_error'))} | {_fmt(r.get('jsd'))} | "
              f"{r.get('n_per_class', '?')} |" for kind, r in classifier.items()]
    kinds = list(per_energy)
    energies = sorted({float(e) for values in per_energy.values() for e in values})
    lines += ["", "AUC per incident energy (+- the standard error over folds):", "",
              "| E_inc [MeV] | " + " | ".join(kinds) + " |", "|---:|" + "---:|" * len(kinds)]
    for energy in energies:
        cells = []
        for kind in kinds:
            key = next((k for k in per_energy[kind] if float(k) == energy), None)
            error = (classifier[kind].get("auc_per_energy_error") or {}).get(key)
            cells.append("n/a" if key is None else f"{per_energy[kind][key]:.3f} +- {_fmt(error, 3)}")
        lines.append(f"| {energy:.10g} | " + " | ".join(cells) + " |")
    return lines


def _bounds_lines(metrics: dict[str, Any]) -> list[str]:
    """The sub-sample bounds of the config and the sub-samples used (evaluation at scale)."""
    config = metrics.get("config") or {}
    if "classifier_max_values" not in config:
        return []
    per_class = metrics.get("classifier_showers_per_class") or {}
    used = ", ".join(f"{key.removeprefix('classifier_') or key} {n}" for key, n in per_class.items())
    prdc = (metrics.get("prdc") or {}).get("n_showers")
    return [f"- sub-samples (seeded): classifier showers per class {used or 'none'} (bounds: "
            f"classifier_max_showers {config.get('classifier_max_showers')}, classifier_max_values "
            f"{config['classifier_max_values']:,}); PRDC showers per sample "
            f"{prdc['reference'] if prdc else 'none'} (prdc_max_showers {config.get('prdc_max_showers'):,}, "
            f"prdc_max_values {config.get('prdc_max_values'):,})"]


def render_summary(metrics: dict[str, Any]) -> str:
    """Markdown summary of a metrics dict (as written to ``summary.md``)."""
    lines = ["# caloman evaluation", ""]
    files = metrics.get("files", {})
    n = metrics.get("n_showers", {})
    for name in ("reference", "generated"):
        source = files.get(name) or "arrays in memory"
        lines.append(f"- {name}: `{source}` ({n.get(name, '?')} showers)")
    if metrics.get("weights"):
        weights = metrics["weights"]
        lines.append(f"- generated showers weighted (`--weights`): ESS fraction {weights['ess_fraction']:.3f}, "
                     f"largest weight {weights['max']:.3g}")
    lines += [f"- binning: {metrics['binning']}, readout threshold {metrics['threshold_mev']:.6g} MeV, "
              f"seed {metrics['seed']}", f"- caloman {metrics['caloman_version']}"]
    lines += _bounds_lines(metrics) + [""]

    lines += ["## Separation power of feature histograms", "",
              "Chi-squared separation power (0: identical, 1: disjoint); lower is better.", "",
              "| feature | separation power |", "|---|---:|"]
    for key, value in metrics["separation_power"].items():
        lines.append(f"| `{key}` | {_fmt(value)} |")
    lines.append("")

    classifier = metrics.get("classifier") or {}
    lines.append("## Classifier tests")
    lines.append("")
    if classifier:
        lines += classifier_summary_lines(classifier)
    else:
        lines.append("Not run (classifier setting `none`).")
    lines.append("")

    lines += ["## Physics distances", ""]
    if metrics.get("fpd") or metrics.get("kpd"):
        lines += ["| distance (x 1e3) | value | error |", "|---|---:|---:|"]
        for key in ("fpd", "kpd"):
            if metrics.get(key):
                lines.append(f"| {key.upper()} | {_fmt(metrics[key]['value'])} | {_fmt(metrics[key]['error'])} |")
    else:
        lines.append("FPD / KPD not computed.")
    lines.append("")
    prdc = metrics.get("prdc")
    if prdc:
        lines += ["| PRDC | value |", "|---|---:|"]
        for key in ("precision", "recall", "density", "coverage"):
            if key in prdc:
                lines.append(f"| {key} | {_fmt(prdc[key])} |")
        lines.append("")
    for note in metrics.get("notes", []):
        lines.append(f"- {note}")
    timings = metrics.get("timings", {})
    if timings:
        lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {step} | {seconds:.2f} |" for step, seconds in timings.items()]
    return "\n".join(lines) + "\n"
