"""Out-of-distribution check on showers: do a model's manifold scores tell defective
showers from normal ones?

Held-out normal showers are split in two halves by a seeded permutation. One half stays
as it is; the other gets each defect of the sensitivity suite
(:data:`caloman.metrics.defects.DEFECTS`, thresholded after the defect as there) in turn.
Every shower is scored by the model's manifold API (any CaloMan variant:
``reconstruction_error``, ``log_prob_on_manifold``, ``ood_score``), and the AUROC of the
score separating the defective half from the normal half is reported for three scores:

- ``distance``: the distance from the manifold (the reconstruction error);
- ``density``: minus the log density of the shower's projection on the manifold;
- ``combined``: ``ood_score`` with ``distance_scale`` fitted on the normal half
  (:func:`fit_distance_scale`: both terms with equal spread there).

AUROC 0.5 means the score cannot tell; 1.0 that every defective shower scores higher than
every normal one (below 0.5: the defect makes showers look *more* typical to that score).
The ``none`` defect (an unchanged copy) checks the null: its AUROCs must be near 0.5.
``caloman ood RUN --data HELDOUT.h5 --out DIR`` writes ``ood.json`` and ``ood.md``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from caloman import __version__
from caloman.errors import ConfigError
from caloman.features import apply_threshold
from caloman.geometry import Binning
from caloman.metrics.defects import DEFECTS

__all__ = ["SCORES", "OodConfig", "fit_distance_scale", "manifold_scores", "render_markdown", "run_ood_check"]

#: The scores whose AUROC is reported, in table order.
SCORES = ("distance", "density", "combined")
#: Showers per call into the model (the Jacobian of the density is per shower).
_BATCH = 256


@dataclass(frozen=True)
class OodConfig:
    """What :func:`run_ood_check` runs: ``defects`` by name, the seed of the split and of
    the random defects, and at most ``max_showers`` held-out showers (None: all)."""

    defects: tuple[str, ...] = tuple(d.name for d in DEFECTS)
    seed: int = 0
    max_showers: int | None = 4000

    def __post_init__(self) -> None:
        known = {d.name for d in DEFECTS}
        unknown = [name for name in self.defects if name not in known]
        if unknown:
            raise ConfigError(f"unknown defects {unknown}; known: {', '.join(sorted(known))}")
        if self.max_showers is not None and self.max_showers < 20:
            raise ConfigError(f"max_showers must be >= 20 (two halves of normal showers), got {self.max_showers}")


def manifold_scores(model: Any, incident_energies: np.ndarray, showers: np.ndarray) -> dict[str, np.ndarray]:
    """Distance from the manifold and minus the log density on it, (n,) each, of showers
    (n, V) in MeV at incident energies (n,) MeV, for a model with the manifold API."""
    if not all(hasattr(model, name) for name in ("reconstruction_error", "log_prob_on_manifold", "ood_score")):
        raise ConfigError(f"a {getattr(model, 'kind', type(model).__name__)} model has no learned manifold "
                          "(reconstruction_error, log_prob_on_manifold); the OOD check needs a caloman run")
    distance, density = [], []
    for start in range(0, len(showers), _BATCH):
        e = torch.as_tensor(np.asarray(incident_energies[start:start + _BATCH]), dtype=torch.float32)
        x = torch.as_tensor(np.asarray(showers[start:start + _BATCH]), dtype=torch.float32)
        with torch.no_grad():
            distance.append(model.reconstruction_error(e, x).double().numpy())
        # Forward-mode AD for the Jacobian of the density: outside no_grad, nothing is kept.
        density.append(-model.log_prob_on_manifold(e, x).detach().double().numpy())
    return {"distance": np.concatenate(distance), "density": np.concatenate(density)}


def fit_distance_scale(distance: np.ndarray, density: np.ndarray) -> float:
    """``distance_scale`` of ``ood_score`` that gives its two terms equal standard deviations
    on normal showers: std(distance) / std(-log p)."""
    spread = float(np.std(density))
    return float(np.std(distance)) / spread if spread > 0 else 1.0


def _auroc(normal: np.ndarray, outlier: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(normal)), np.ones(len(outlier))]
    scores = np.r_[normal, outlier]
    finite = np.isfinite(scores)
    return float(roc_auc_score(labels[finite], scores[finite]))


def run_ood_check(model: Any, incident_energies: np.ndarray, showers: np.ndarray, binning: Binning,
                  config: OodConfig | None = None) -> dict[str, Any]:
    """The AUROC of each score for each defect (see the module docstring); returns the report
    dict (``results``: one entry per defect with ``auroc`` per score)."""
    config = config or OodConfig()
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    n = len(energies) if config.max_showers is None else min(len(energies), config.max_showers)
    if n < 20:
        raise ConfigError(f"the OOD check needs at least 20 held-out showers, got {n}")
    order = np.random.default_rng([config.seed, 11]).permutation(len(energies))[:n]
    normal_idx, other_idx = np.sort(order[:n // 2]), np.sort(order[n // 2:])
    threshold = binning.readout_threshold
    start = time.perf_counter()
    normal = manifold_scores(model, energies[normal_idx], apply_threshold(np.asarray(showers[normal_idx]),
                                                                          threshold))
    scale = fit_distance_scale(normal["distance"], normal["density"])
    normal["combined"] = normal["distance"] / scale + normal["density"]
    results = []
    for name in config.defects:
        defect = next(d for d in DEFECTS if d.name == name)
        rng = np.random.default_rng([config.seed, 7])
        damaged = apply_threshold(defect.apply(np.asarray(showers[other_idx]), binning, rng), threshold)
        scores = manifold_scores(model, energies[other_idx], damaged)
        scores["combined"] = scores["distance"] / scale + scores["density"]
        results.append({"defect": name, "description": defect.description,
                        "auroc": {s: _auroc(normal[s], scores[s]) for s in SCORES},
                        "median_score": {s: float(np.median(scores[s])) for s in SCORES}})
    return {
        "date": time.strftime("%Y-%m-%d"),
        "caloman_version": __version__,
        "model": getattr(model, "kind", type(model).__name__),
        "autoencoder": getattr(getattr(model, "config", None), "autoencoder", None),
        "n_normal": int(len(normal_idx)),
        "n_outlier": int(len(other_idx)),
        "distance_scale": scale,
        "median_normal_score": {s: float(np.median(normal[s])) for s in SCORES},
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per defect, AUROC per score."""
    lines = [f"# OOD check ({report['model']}, autoencoder {report['autoencoder']}, {report['date']})", "",
             f"{report['n_normal']} normal against {report['n_outlier']} defective held-out showers; "
             f"distance scale {report['distance_scale']:.4g}.", "",
             "| defect | " + " | ".join(f"AUROC {s}" for s in SCORES) + " |",
             "|---|" + "---:|" * len(SCORES)]
    for r in report["results"]:
        lines.append(f"| {r['defect']} | " + " | ".join(f"{r['auroc'][s]:.3f}" for s in SCORES) + " |")
    return "\n".join(lines) + "\n"
