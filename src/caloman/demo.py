"""``caloman demo``: the main job on built-in data, end to end.

Simulate showers with the built-in parameterised simulator, estimate the
intrinsic dimension, train CaloMan with that latent dimension, generate
showers for held-out incident energies, evaluate them against held-out
simulated showers, time generation, and write one report::

    DIR/
      report.md            the report (tables, plots, versions, seeds, configuration)
      data/                train.h5, reference.h5 (simulated)
      dimension/           dimension.json, dimension.png
      run/                 the trained run (config.json, model.safetensors, history.json, ...)
      generated.h5         generated showers for the reference energies
      evaluation/          metrics.json, summary.md, plots/
      timings.json         generation time per shower, simulation/training/evaluation wall times
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caloman import __version__
from caloman.benchmark import (
    BenchmarkConfig,
    count_parameters,
    machine_info,
    peak_rss_mib,
    simulate_builtin_data,
    time_model,
)
from caloman.errors import ConfigError
from caloman.geometry import load_binning
from caloman.io import atomic_path

logger = logging.getLogger("caloman.demo")

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the main job. ``profile`` "quick" runs in minutes on two
    cores; "full" uses 100,000 training showers and CaloMan's paper-sized networks."""

    profile: str = "quick"
    seed: int = 0
    classifier: str = "strong"
    threads: int = 2
    dimension_showers: int = 5_000
    dimension_k: tuple[int, ...] = tuple(range(2, 51))

    def __post_init__(self) -> None:
        if self.profile not in ("quick", "full"):
            raise ConfigError(f"profile must be quick or full, got {self.profile!r}")


def run_demo(out_dir: str | Path, config: DemoConfig) -> Path:
    """Run the whole main job into ``out_dir``; returns the report's path."""
    from caloman.dimension import estimate_for_file
    from caloman.evaluation import EvaluationConfig, evaluate_files
    from caloman.generation import generate_to_file
    from caloman.plots import plot_dimension_curve, plot_training_history
    from caloman.runs import load_run, train_run
    from caloman.training import TrainingConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    binning = load_binning("ds1-photons")
    bench = BenchmarkConfig(profile=config.profile, seed=config.seed, threads=config.threads, min_seconds=1.0)
    wall: dict[str, float] = {}
    started = datetime.now(UTC)

    t0 = time.perf_counter()
    logger.info("[1/6] simulating built-in dataset-1 photon showers into %s", out_dir / "data")
    train_file, reference_file, simulator_ms = simulate_builtin_data(out_dir / "data", binning, bench)
    wall["simulation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logger.info("[2/6] estimating the intrinsic dimension on %d showers", config.dimension_showers)
    dim = estimate_for_file(train_file, binning, list(config.dimension_k), max_showers=config.dimension_showers,
                            preprocess=True, seed=config.seed)
    dim_dir = out_dir / "dimension"
    dim_dir.mkdir(exist_ok=True)
    with atomic_path(dim_dir / "dimension.json") as tmp:
        tmp.write_text(dim.to_json())
    plot_dimension_curve(np.asarray(dim.k_values), {k: np.asarray(v) for k, v in dim.estimates.items()},
                         dim_dir / "dimension.png")
    latent_dim = dim.recommended()
    wall["dimension"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_dir = out_dir / "run"
    if (run_dir / "model.safetensors").exists():
        logger.info("[3/6] re-using the trained run in %s", run_dir)
        loaded = load_run(run_dir)
    else:
        logger.info("[3/6] training CaloMan (%s profile, latent dimension %d) into %s", config.profile, latent_dim,
                    run_dir)
        training = TrainingConfig.profile(config.profile, seed=config.seed, num_threads=config.threads)
        loaded = train_run(train_file, binning, run_dir, model_kind="caloman", profile=config.profile,
                           training=training, model_overrides={"latent_dim": latent_dim})
    history = {f"{s.name}/{part}": [getattr(e, f"{part}_loss") for e in s.epochs]
               for s in loaded.history.stages for part in ("train", "val")}
    plot_training_history(history, out_dir / "training_history.png")
    wall["training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from caloman.io import ShowerFile

    with ShowerFile(reference_file, binning, check_values=False) as f:
        reference_energies = np.array(f.incident_energies)
    logger.info("[4/6] generating %d showers", len(reference_energies))
    generated_file = generate_to_file(loaded, out_dir / "generated.h5", reference_energies, seed=config.seed)
    wall["generation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logger.info("[5/6] evaluating against %d held-out simulated showers", len(reference_energies))
    metrics = evaluate_files(generated_file, reference_file, binning, out_dir / "evaluation",
                             EvaluationConfig(classifier=config.classifier, seed=config.seed))
    wall["evaluation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logger.info("[6/6] timing generation")
    timings = time_model(loaded.model.sample, reference_energies, bench, ["cpu"])
    wall["timing"] = time.perf_counter() - t0

    record = {
        "caloman_version": __version__, "date": started.isoformat(timespec="seconds"),
        "config": dataclasses.asdict(config), "machine": machine_info(),
        "latent_dim": int(loaded.model.config.latent_dim), "estimated_latent_dim": latent_dim,
        "parameters": count_parameters(loaded.model),
        "simulator_ms_per_shower": simulator_ms, "wall_seconds": wall,
        "generation": [dataclasses.asdict(t) for t in timings], "process_peak_rss_mib": peak_rss_mib(),
    }
    with atomic_path(out_dir / "timings.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    report = render_report(out_dir, record, metrics, loaded, dim)
    with atomic_path(out_dir / REPORT_FILE) as tmp:
        tmp.write_text(report)
    logger.info("report written to %s", out_dir / REPORT_FILE)
    return out_dir / REPORT_FILE


def _img(out_dir: Path, path: Path, alt: str) -> str:
    return f"![{alt}]({path.relative_to(out_dir).as_posix()})" if path.exists() else f"({alt}: not drawn)"


def render_report(out_dir: Path, record: dict[str, Any], metrics: dict[str, Any], loaded: Any, dim: Any) -> str:
    """The demo report as markdown (images linked relative to ``out_dir``)."""
    from caloman.evaluation import classifier_summary_lines
    cfg = record["config"]
    plots = out_dir / "evaluation" / "plots"
    seps: dict[str, float | None] = metrics.get("separation_power", {})
    finite = {k: v for k, v in seps.items() if v is not None}
    worst = sorted(finite, key=finite.get, reverse=True)[:8]
    clf = metrics.get("classifier", {})
    lines = [
        "# caloman demo report", "",
        f"{record['date']} · caloman {record['caloman_version']} · torch {record['machine']['torch']} · "
        f"{record['machine']['cpu']} · {cfg['threads']} threads · profile `{cfg['profile']}` · seed {cfg['seed']}", "",
        "Data: the built-in **parameterised (GFlash-style) simulation, not Geant4**, dataset-1 photon binning "
        "(368 voxels), incident energies 256 MeV to 4 TeV (2^8..2^22 MeV).", "",
        "## Wall time", "", "| step | seconds |", "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in record["wall_seconds"].items()], "",
        f"Simulator: {record['simulator_ms_per_shower']:.3f} ms per shower. "
        if record["simulator_ms_per_shower"] is not None and np.isfinite(record["simulator_ms_per_shower"]) else "",
        "", "## Intrinsic dimension", "",
        f"Levina-Bickel (MacKay-Ghahramani) estimate on {dim.n_points[dim.default_label()]:,} distinct showers; "
        f"d at k = 10: {record['estimated_latent_dim']}; latent dimension of the run: **{record['latent_dim']}**"
        + (" (a re-used run trained with another dimension)." if record["latent_dim"] != record["estimated_latent_dim"]
           else "."), "",
        _img(out_dir, out_dir / "dimension" / "dimension.png", "intrinsic dimension vs k"), "",
        "## Training", "",
        f"{record['parameters']:,} parameters. " + "; ".join(loaded.history.summary_lines()), "",
        _img(out_dir, out_dir / "training_history.png", "training history"), "",
        "## Generation speed (ms per shower, CPU, incl. post-processing to MeV)", "",
        "| batch size | ms per shower |", "|---|---|",
        *[f"| {t['batch_size']:,} | {t['ms_per_shower']:.4f} |" for t in record["generation"]], "",
        "## Fidelity against held-out simulated showers", "",
        *(classifier_summary_lines(clf) if clf else ["Classifier tests not run (setting `none`)."]), "",
        _img(out_dir, plots / "auc_per_energy.png", "classifier AUC per incident energy") if clf else "", "",
        f"Separation power (χ², challenge binning): maximum {max(finite.values()):.4f}, median "
        f"{float(np.median(list(finite.values()))):.4f} over {len(finite)} histograms. Largest:" if finite else "",
        "", "| feature | separation power |", "|---|---|",
        *[f"| `{k}` | {finite[k]:.4f} |" for k in worst], "",
        "FPD x1e3: " + _value(metrics.get("fpd")) + " · KPD x1e3: " + _value(metrics.get("kpd")), "",
        "Full table: [evaluation/summary.md](evaluation/summary.md); all numbers: "
        "[evaluation/metrics.json](evaluation/metrics.json).", "",
        "## Pictures", "",
        _img(out_dir, plots / "average_shower_reference.png", "average reference shower"), "",
        _img(out_dir, plots / "average_shower_generated.png", "average generated shower"), "",
        _img(out_dir, plots / "features_E_layer.png", "layer energies"), "",
        _img(out_dir, plots / "features_E_tot_E_inc.png", "E_tot / E_inc"), "",
        _img(out_dir, plots / "features_width_eta.png", "widths in eta"), "",
        _img(out_dir, plots / "features_voxel_energy.png", "voxel energies"), "",
        _img(out_dir, plots / "roc.png", "classifier ROC"), "",
        "## Reproduce", "",
        f"`caloman demo --out {out_dir} --profile {cfg['profile']} --seed {cfg['seed']}`; the run's full "
        "configuration is in `run/config.json`, the evaluation's in `evaluation/metrics.json`.", "",
    ]
    return "\n".join(lines)


def _value(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    err = entry.get("error")
    return f"{entry['value']:.3f}" + (f" ± {err:.3f}" if err is not None else "")
