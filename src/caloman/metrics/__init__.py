"""Evaluation metrics of the CaloChallenge: separation powers, classifier tests,
physics distances. The result containers shared by metrics, plots and reports
live here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FeatureHistogram:
    """One feature histogrammed for reference and generated showers.

    ``reference`` and ``generated`` are normalised so each sums to one over the
    bins (entries outside the range are dropped, as in the challenge).
    """

    key: str                 # metrics.json key, e.g. "E_layer_2"
    label: str               # axis label for plots, e.g. r"$E_{2}$ [MeV]"
    bin_edges: np.ndarray    # (n_bins + 1,)
    reference: np.ndarray    # (n_bins,)
    generated: np.ndarray    # (n_bins,)
    separation_power: float
    log_x: bool = False


@dataclass(frozen=True)
class ClassifierResult:
    """Outcome of one classifier test on the held-out (validation) split."""

    kind: str                # "low", "low_normed" or "high"
    auc: float
    jsd: float
    setting: str             # "strong", "full" or "quick"
    fpr: np.ndarray = field(repr=False)   # ROC curve
    tpr: np.ndarray = field(repr=False)
    best_epoch: int = -1     # network: epoch kept; trees: mean boosting iterations
    # The strong (k-fold) test only: standard error of the AUC over folds, and the
    # AUC per incident energy (key: energy in MeV as a string) with its error and
    # the showers per class at that energy.
    auc_error: float | None = None
    auc_per_energy: dict[str, float] | None = None
    auc_per_energy_error: dict[str, float] | None = None
    n_per_energy: dict[str, int] | None = None
    n_per_class: int | None = None
    n_folds: int | None = None
