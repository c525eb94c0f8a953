"""The sensitivity suite: is the strong classifier test able to see small defects?

Two independent samples of the built-in simulator at the same incident
energies play reference and "generated" showers. The second sample is given
each defect of :data:`caloman.metrics.defects.DEFECTS` in turn (one layer's
energy off by 5 %, energy moved from the core to the next ring, dim voxels
lost, radial profiles stretched, voxel energies on a lattice) and the strong
test is run on all three inputs. A test that deserves trust finds every defect
(largest AUC of the three inputs at least :data:`DETECTION_AUC`) and finds
nothing where there is none (AUC 0.50 +- 0.02 for the undamaged pair).

``caloman sensitivity --out DIR`` writes ``sensitivity.json`` and
``sensitivity.md``; docs/evaluation-strong.md records the measured table.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caloman import __version__
from caloman.errors import ConfigError
from caloman.evaluation import CLASSIFIER_KINDS, to_jsonable
from caloman.features import apply_threshold
from caloman.geometry import Binning, load_binning
from caloman.io import atomic_directory
from caloman.metrics.defects import DEFECTS, Defect
from caloman.metrics.strong import StrongClassifierSettings, run_strong_test
from caloman.simulation.energies import ladder_energies
from caloman.simulation.simulator import simulate_showers

__all__ = ["DETECTION_AUC", "NULL_TOLERANCE", "SensitivityConfig", "render_markdown", "run_sensitivity",
           "write_sensitivity"]

#: A defect counts as detected when the largest of the three overall AUCs reaches this.
DETECTION_AUC = 0.65
#: Two undamaged samples must give AUC 0.5 within this, for every input.
NULL_TOLERANCE = 0.02


@dataclass(frozen=True)
class SensitivityConfig:
    """What the suite runs.

    Attributes:
        binning: the geometry (the defects' layer ids are those of dataset 1).
        per_energy: showers per ladder energy and sample (1,400 x 15 = 21,000, the
            full-profile demo's held-out size; the quick demo evaluates 6,000).
        seed: the reference sample uses ``seed``, the defective one ``seed + 1``.
        defects: names of :data:`~caloman.metrics.defects.DEFECTS` to run (all by default).
        settings: the strong test's settings.
    """

    binning: str = "ds1-photons"
    per_energy: int = 1_400
    seed: int = 0
    defects: tuple[str, ...] = tuple(d.name for d in DEFECTS)
    settings: StrongClassifierSettings = StrongClassifierSettings()

    def __post_init__(self) -> None:
        known = {d.name for d in DEFECTS}
        unknown = [name for name in self.defects if name not in known]
        if unknown:
            raise ConfigError(f"unknown defects {unknown}; known: {', '.join(sorted(known))}")
        if self.per_energy < 10:
            raise ConfigError(f"per_energy must be >= 10 showers, got {self.per_energy}")


def _defect(name: str) -> Defect:
    return next(d for d in DEFECTS if d.name == name)


def run_defect(defect: Defect, reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray],
               binning: Binning, settings: StrongClassifierSettings, seed: int) -> dict[str, Any]:
    """The strong test of ``reference`` (thresholded) against ``defect`` applied to ``other`` (raw
    showers in MeV, thresholded after the defect).

    Returns a dict with the defect's name and description, per input kind the AUC,
    its error and the AUC per energy, the largest AUC and whether it is detected.
    """
    rng = np.random.default_rng([seed, 7])
    damaged = apply_threshold(defect.apply(other[1], binning, rng), binning.readout_threshold)
    start = time.perf_counter()
    kinds = {}
    for kind in CLASSIFIER_KINDS:
        result = run_strong_test(kind, reference, (other[0], damaged), binning, settings, seed=seed)
        kinds[kind] = {"auc": result.auc, "auc_error": result.auc_error, "auc_per_energy": result.auc_per_energy}
    largest = max(v["auc"] for v in kinds.values())
    entry: dict[str, Any] = {"defect": defect.name, "description": defect.description, "classifier": kinds,
                             "largest_auc": largest, "seconds": round(time.perf_counter() - start, 1)}
    if defect.kind == "none":
        entry["passed"] = all(abs(v["auc"] - 0.5) <= NULL_TOLERANCE for v in kinds.values())
    else:
        entry["passed"] = largest >= DETECTION_AUC
    return entry


def run_sensitivity(config: SensitivityConfig | None = None) -> dict[str, Any]:
    """Simulate the two samples and run every defect of ``config``; returns the report dict."""
    config = config or SensitivityConfig()
    binning = load_binning(config.binning)
    energies = ladder_energies(config.per_energy)
    # The reference is thresholded once here; the other sample after each defect (a defect may move voxels
    # across the threshold).
    reference = (energies, apply_threshold(simulate_showers(binning, energies, config.seed),
                                           binning.readout_threshold))
    other = (energies, simulate_showers(binning, energies, config.seed + 1))
    results = [run_defect(_defect(name), reference, other, binning, config.settings, config.seed)
               for name in config.defects]
    return {
        "date": time.strftime("%Y-%m-%d"),
        "caloman_version": __version__,
        "python": platform.python_version(),
        "config": dataclasses.asdict(config),
        "n_showers_per_sample": int(len(energies)),
        "detection_auc": DETECTION_AUC,
        "null_tolerance": NULL_TOLERANCE,
        "results": results,
        "all_passed": all(r["passed"] for r in results),
    }


def render_markdown(report: dict[str, Any]) -> str:
    """The suite's table as markdown."""
    cfg = report["config"]
    lines = [f"# Sensitivity of the strong classifier test ({report['date']})", "",
             f"caloman {report['caloman_version']}; {report['n_showers_per_sample']:,} showers per sample "
             f"({cfg['per_energy']:,} at each ladder energy), binning {cfg['binning']}, seed {cfg['seed']}; "
             f"detected: largest AUC >= {report['detection_auc']}; no defect: every AUC within "
             f"0.5 +- {report['null_tolerance']}.", "",
             "| defect | AUC low | AUC low-normed | AUC high | largest AUC at one energy | passed | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        cells = [f"{r['description']} (`{r['defect']}`)"]
        for kind in CLASSIFIER_KINDS:
            v = r["classifier"][kind]
            cells.append(f"{v['auc']:.3f} ± {v['auc_error']:.3f}")
        per_energy = r["classifier"]["low"]["auc_per_energy"] or {}
        if per_energy:
            key = max(per_energy, key=per_energy.get)
            cells.append(f"{per_energy[key]:.3f} at {float(key) / 1e3:.4g} GeV (low)")
        else:
            cells.append("n/a")
        cells += ["yes" if r["passed"] else "**no**", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"All passed: {'yes' if report['all_passed'] else '**no**'}.", ""]
    return "\n".join(lines)


def write_sensitivity(report: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``sensitivity.json`` and ``sensitivity.md`` into ``out_dir`` (atomically); returns the .md path."""
    with atomic_directory(out_dir) as work:
        (work / "sensitivity.json").write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
        (work / "sensitivity.md").write_text(render_markdown(report))
    return Path(out_dir) / "sensitivity.md"
