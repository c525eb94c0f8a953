"""The refined run directory and the ``caloman refine`` pipeline.

::

    REFINED/
      config.json               kind "refined", method, the base run (path relative to
                                REFINED and absolute, SHA-256 of its model.safetensors
                                and config.json), classifier / refiner / HMC settings,
                                weight summaries, seed, versions, checksum of:
      refinement.safetensors    the DCTR classifier ("ratio."), for refiner and hmc the
                                latent-weight classifier ("latent_ratio."), for refiner
                                the refiner flow ("refiner.")

No pickle: tensors are safetensors, the rest JSON. :func:`load_refined_run`
(reached through :func:`caloman.runs.load_run`) finds the base run, refuses it
when it changed since refinement, and returns a :class:`~caloman.runs.LoadedRun`
whose model is a :class:`~caloman.refinement.showers.RefinedModel`.

What :func:`refine_run` trains on: the base model's samples for the training
file's incident energies (label 0) against the training file's showers (label 1).
Never the held-out showers evaluation uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from caloman import __version__
from caloman.errors import ConfigError, RunDirectoryError
from caloman.io import atomic_directory, load_showers
from caloman.refinement.hmc import HMCConfig
from caloman.refinement.latent import fit_latent_weights
from caloman.refinement.refiner import RefinerConfig, WeightedFlowRefiner
from caloman.refinement.showers import CLASSIFIERS, METHODS, RefinedModel, energy_condition, shower_features
from caloman.refinement.trees import TreeClassifierConfig, TreeDensityRatio, fit_tree_density_ratio
from caloman.refinement.weights import (
    CalibratedRatio,
    ClassifierConfig,
    DensityRatio,
    fit_density_ratio,
    weight_summary,
)
from caloman.training import load_tensors, save_tensors, sha256_file

logger = logging.getLogger("caloman.refinement")

REFINED_FORMAT = "caloman-refined/1"
REFINED_KIND = "refined"
CONFIG_FILE = "config.json"
TENSORS_FILE = "refinement.safetensors"
PROFILES = ("quick", "full")
FEATURE_NOTES = {
    "mlp": "log1p(E_voxel / threshold), log10(E_layer / E_inc + 1e-6), scaled log E_inc",
    "trees": "strong test's low inputs (log10 E_inc, E_voxel / E_inc, layer energy ratios, voxel spectra), "
             "high-level vector",
}


@dataclass(frozen=True)
class RefineSettings:
    """Everything ``caloman refine`` trains, per ``--profile``.

    ``max_showers``: training showers used (and as many generated); ``latent_points``:
    latent draws, per training shower, the refiner fits (their weights come from the
    learned E[w | z, E], so they cost one classifier evaluation each);
    ``hmc_trial_chains``: chains run once at refine time to report the acceptance rate.
    ``dctr``: which DCTR classifier gives the weights, ``"trees"`` (``trees``, boosted
    trees, cross-fitted) or ``"mlp"`` (``classifier``).
    """

    classifier: ClassifierConfig
    latent_classifier: ClassifierConfig
    refiner: RefinerConfig
    hmc: HMCConfig
    max_showers: int | None
    latent_points: int = 4
    hmc_trial_chains: int = 256
    batch_size: int = 4096
    dctr: str = "trees"
    trees: TreeClassifierConfig = TreeClassifierConfig()

    def __post_init__(self) -> None:
        if self.dctr not in CLASSIFIERS:
            raise ConfigError(f"unknown DCTR classifier {self.dctr!r}; use one of {', '.join(CLASSIFIERS)}")

    @classmethod
    def profile(cls, name: str) -> RefineSettings:
        if name == "quick":
            return cls(classifier=ClassifierConfig(epochs=20, min_epochs=5, patience=4),
                       latent_classifier=ClassifierConfig(epochs=20, min_epochs=5, patience=4),
                       refiner=RefinerConfig(epochs=30, patience=5),
                       hmc=HMCConfig(step_size=0.1, leapfrog_steps=10, burn_in=50),
                       max_showers=20_000, latent_points=2, hmc_trial_chains=128)
        if name == "full":
            return cls(classifier=ClassifierConfig(hidden=(256, 256, 256), epochs=100, min_epochs=30, patience=10),
                       latent_classifier=ClassifierConfig(hidden=(128, 128, 128), epochs=60, min_epochs=20,
                                                          patience=8),
                       refiner=RefinerConfig(transforms=6, hidden=(128, 128), epochs=100, patience=10),
                       hmc=HMCConfig(step_size=0.1, leapfrog_steps=20, burn_in=200),
                       max_showers=None)
        raise ConfigError(f"unknown refine profile {name!r}; use one of {', '.join(PROFILES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_options(self, *, dctr: str | None = None, threads: int | None = None) -> RefineSettings:
        """These settings with another DCTR classifier and / or tree thread count."""
        settings = self if dctr is None else dataclasses.replace(self, dctr=dctr)
        if threads is not None:
            settings = dataclasses.replace(settings, trees=dataclasses.replace(settings.trees, max_threads=threads))
        return settings


def _from_dict(cls: type, values: dict[str, Any]) -> Any:
    """A frozen config dataclass from its ``asdict`` (lists back to tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def is_refined_run(run_dir: str | Path) -> bool:
    """True when ``run_dir/config.json`` is that of a refined run."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("kind") == REFINED_KIND
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


# -- the pipeline ------------------------------------------------------------------------

def _in_batches(fn, *tensors: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(*(t[i:i + batch_size] for t in tensors)) for i in range(0, len(tensors[0]), batch_size)])


def _fit_shower_ratio(model: Any, incident: Tensor, generated: Tensor, real: Tensor, settings: RefineSettings,
                      seed: int, generator: torch.Generator) -> tuple[CalibratedRatio, Tensor, dict[str, Any]]:
    """Train the DCTR classifier ``settings.dctr`` on the generated (label 0) and real
    (label 1) showers at the same ``incident`` energies. Returns the ratio, each
    generated shower's weight (n,) and the report: weight summary, training history
    and input count. Tree weights are out-of-fold (cross-fitted); MLP weights are in-sample."""
    def features(showers: Tensor) -> Tensor:
        return _in_batches(lambda e, x: shower_features(settings.dctr, model, e, x), incident, showers,
                           batch_size=settings.batch_size)

    gen_x, real_x = features(generated), features(real)
    report: dict[str, Any] = {"n_classifier_inputs": int(gen_x.shape[1])}
    if settings.dctr == "trees":
        fit = fit_tree_density_ratio(gen_x, real_x, settings.trees, seed=seed)
        ratio, weights = fit.ratio, fit.generated_log_weight.exp()
        report["classifier_history"] = {"iterations": fit.iterations, "cross_fitted": True,
                                        "out_of_fold_auc": fit.out_of_fold_auc}
    else:
        ratio = fit_density_ratio(gen_x, real_x, settings.classifier, generator=generator)
        weights = ratio.weight(gen_x)
        report["classifier_history"] = ratio.history
    report["weights"] = weight_summary(weights)
    return ratio, weights.to(torch.float32), report


def refine_run(base_dir: str | Path, data: str | Path, out_dir: str | Path, *, method: str = "reweight",
               profile: str = "quick", seed: int = 0, settings: RefineSettings | None = None,
               command_line: list[str] | None = None) -> dict[str, Any]:
    """Refine the trained run ``base_dir`` with its training file ``data`` into ``out_dir``
    (written atomically: a failure leaves nothing there). Returns the refined run's
    config.json content (with the weight summaries)."""
    from caloman.runs import RUN_FORMAT, load_run

    if method not in METHODS:
        raise ConfigError(f"unknown refinement method {method!r}; use one of {', '.join(METHODS)}")
    settings = settings or RefineSettings.profile(profile)
    out_dir, base_dir = Path(out_dir), Path(base_dir)
    if (out_dir / CONFIG_FILE).exists():
        raise RunDirectoryError(f"{out_dir} already holds a run; choose another --out")
    if is_refined_run(base_dir):
        raise ConfigError(f"{base_dir} is itself a refined run; refine its base run instead")
    base = load_run(base_dir)
    model = base.model
    if base.config.data is not None and Path(base.config.data.path) != Path(data).resolve():
        logger.warning("warning: %s is not the file %s was trained on (%s); refine on training showers only, never "
                       "on the held-out showers you evaluate with", data, base_dir, base.config.data.path)
    # a random subset, not the first N: training files are often sorted by incident energy
    incident_np, real_np = load_showers(data, base.binning, max_showers=settings.max_showers, subset_seed=seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    incident = torch.as_tensor(incident_np, dtype=torch.float32)
    real = torch.as_tensor(real_np, dtype=torch.float32)
    n = len(incident)
    if n < 20:
        raise ConfigError(f"{data}: {n} showers are too few to train the refinement classifier")

    # the base model's samples for the training energies, keeping the latent each came from
    latent = model.sample_latent(n)
    with torch.no_grad():
        generated = _in_batches(lambda e, z: model.showers_from_latent(e, z), incident, latent,
                                batch_size=settings.batch_size)
    logger.info("refine: sampled %d showers of %s; training the %s classifier", n, base_dir, settings.dctr)
    ratio, weights, report = _fit_shower_ratio(model, incident, generated, real, settings, seed, generator)
    n_inputs = report.pop("n_classifier_inputs")
    logger.info("refine: weights: ESS fraction %.3f, largest %s", report["weights"]["ess_fraction"],
                ", ".join(f"{w:.3g}" for w in report["weights"]["largest"]))
    tensors = {f"ratio.{k}": v for k, v in ratio.state_dict().items()}
    latent_ratio = refiner = None
    if method in ("refiner", "hmc"):
        condition = energy_condition(model, incident)
        latent_ratio = fit_latent_weights(torch.cat([latent, condition], 1), weights, settings.latent_classifier,
                                          generator=generator)
        tensors.update({f"latent_ratio.{k}": v for k, v in latent_ratio.state_dict().items()})
        report["latent_classifier_history"] = latent_ratio.history
        # fresh latent draws at the training energies, weighted by the learned E[w | z, E]
        repeat = torch.arange(n).repeat(settings.latent_points)
        z, c = model.sample_latent(len(repeat)), condition[repeat]
        w_z = latent_ratio.weight(torch.cat([z, c], 1))
        report["latent_weights"] = weight_summary(w_z)
        if method == "refiner":
            refiner = WeightedFlowRefiner(z.shape[1], 1, settings.refiner).fit(z, w_z, c, generator=generator)
            tensors.update({f"refiner.{k}": v for k, v in refiner.state_dict().items()})
            report["refiner_history"] = refiner.history
    refined = RefinedModel(model, method, ratio, latent_ratio=latent_ratio, refiner=refiner, hmc=settings.hmc,
                           classifier=settings.dctr)
    if method == "hmc":
        trial = torch.randperm(n, generator=generator)[:settings.hmc_trial_chains]
        refined.hmc_latent(model.sample_latent(len(trial)), energy_condition(model, incident[trial]))
        report["hmc_trial"] = {"chains": len(trial), "acceptance_rate": refined.last_acceptance_rate}

    base_abs = base_dir.resolve()
    config = {
        "format": REFINED_FORMAT,
        "kind": REFINED_KIND,
        "method": method,
        "profile": profile,
        "seed": seed,
        "base_run": {
            "path": os.path.relpath(base_abs, out_dir.resolve()),
            "absolute_path": str(base_abs),
            "format": RUN_FORMAT,
            "model_kind": base.config.model_kind,
            "model_sha256": sha256_file(base_abs / "model.safetensors"),
            "config_sha256": sha256_file(base_abs / CONFIG_FILE),
        },
        "data": {"path": str(Path(data).resolve()), "n_showers": n},
        "features": {"classifier": FEATURE_NOTES[settings.dctr],
                     "latent_classifier": "latent z (the base model's latent blocks), scaled log E_inc",
                     "n_classifier_inputs": n_inputs, "latent_size": int(latent.shape[1]),
                     "latent_blocks": list(model.latent_blocks())},
        "settings": settings.to_dict(),
        "report": report,
        "versions": {"caloman": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command_line": list(sys.argv) if command_line is None else command_line,
    }
    with atomic_directory(out_dir) as work:
        config["files"] = {TENSORS_FILE: save_tensors(work / TENSORS_FILE, tensors,
                                                      metadata={"format": REFINED_FORMAT, "method": method})}
        (work / CONFIG_FILE).write_text(json.dumps(config, indent=1, allow_nan=False) + "\n")
    return config


# -- loading -----------------------------------------------------------------------------

def _base_dir(run_dir: Path, entry: dict[str, Any]) -> Path:
    """The base run: its path relative to the refined run first, then the absolute one;
    refused when its weights or configuration differ from those refined."""
    candidates = [run_dir / entry["path"], Path(entry["absolute_path"])]
    found = next((p for p in candidates if (p / CONFIG_FILE).is_file()), None)
    if found is None:
        raise RunDirectoryError(f"{run_dir}: its base run is gone (looked in {candidates[0]} and {candidates[1]}); "
                                "put the base run back, or refine again")
    for name, key in (("model.safetensors", "model_sha256"), (CONFIG_FILE, "config_sha256")):
        if not (found / name).is_file() or sha256_file(found / name) != entry[key]:
            raise RunDirectoryError(f"{run_dir}: the base run's {found / name} changed since refinement (SHA-256 "
                                    "differs): the refinement belongs to other weights; restore the base run or "
                                    "refine again")
    return found


def load_refined_run(run_dir: str | Path, *, factory: Any = None, device: str | torch.device = "cpu") -> Any:
    """Load a refined run (see the module docstring) as a :class:`~caloman.runs.LoadedRun`
    with ``refinement`` set to its config.json content."""
    from caloman.runs import load_run

    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    remedy = "the refined run is damaged; refine again with `caloman refine`"
    try:
        config = json.loads(path.read_text())
        if config.get("format") != REFINED_FORMAT:
            raise RunDirectoryError(f"{path} is not a {REFINED_FORMAT} configuration; {remedy}")
        method, entry, settings = config["method"], config["base_run"], config["settings"]
        dctr = settings.get("dctr", "mlp")  # runs refined before the tree classifier used the MLP
        features = config["features"]
        sha = config["files"][TENSORS_FILE]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunDirectoryError(f"{path} is unreadable or malformed ({exc!r}); {remedy}") from exc
    base = load_run(_base_dir(run_dir, entry), factory=factory)
    tensors = load_tensors(run_dir / TENSORS_FILE, sha256=sha, what="refinement", remedy=remedy)

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    def ratio_of(prefix: str, key: str, n_inputs: int) -> CalibratedRatio:
        if key == "classifier" and dctr == "trees":
            return TreeDensityRatio.from_state_dict(part(prefix), _from_dict(TreeClassifierConfig,
                                                                             settings["trees"]).max_weight)
        cfg = _from_dict(ClassifierConfig, settings[key])
        ratio = DensityRatio(n_inputs, cfg.hidden, cfg.max_weight)
        ratio.load_state_dict(part(prefix))
        return ratio.eval()

    try:
        ratio = ratio_of("ratio.", "classifier", features["n_classifier_inputs"])
        latent_ratio = refiner = None
        if method in ("refiner", "hmc"):
            latent_ratio = ratio_of("latent_ratio.", "latent_classifier", features["latent_size"] + 1)
        if method == "refiner":
            # refined runs written before the coupling refiner used zuko's NSF
            refiner_config = _from_dict(RefinerConfig, {"flow": "zuko-nsf", **settings["refiner"]})
            refiner = WeightedFlowRefiner(features["latent_size"], 1, refiner_config)
            refiner.load_state_dict(part("refiner."))
            refiner.eval()
        model = RefinedModel(base.model, method, ratio, latent_ratio=latent_ratio, refiner=refiner,
                             hmc=_from_dict(HMCConfig, settings["hmc"]), classifier=dctr)
    except (KeyError, TypeError, RuntimeError, ConfigError) as exc:
        raise RunDirectoryError(f"{run_dir / TENSORS_FILE} does not fit {path} ({exc}); {remedy}") from exc
    model.to(device)
    model.eval()
    return dataclasses.replace(base, model=model, run_dir=run_dir, refinement=config)
