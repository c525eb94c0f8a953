"""One toy experiment: train a method on a dataset, score it and a truth sample against truth."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from caloman.implicit import EnergyConfig, ManifoldConfig, SamplerConfig
from caloman.models.mflow import MFlowSchedule
from caloman.refinement import ClassifierConfig, HMCConfig, RefinerConfig
from caloman.toy.datasets import DATASETS, ToyDataset
from caloman.toy.methods import (
    METHODS,
    BaseFlowConfig,
    EBIMToyConfig,
    ManifoldToyConfig,
    MethodOutput,
    PushforwardConfig,
    ToySettings,
)
from caloman.toy.metrics import evaluate, manifold_metrics


def full_settings() -> ToySettings:
    """The intermediate 'full' setting (the paper: 480k training points, 100 epochs, 2M evaluation
    points, on GPUs; here a few minutes on one CPU core per run)."""
    return ToySettings(
        n_train=50_000, n_eval=100_000, emd_points=3000, emd_repeats=5,
        base_flow=BaseFlowConfig(epochs=30),
        classifier=ClassifierConfig(epochs=100, batch_size=512, lr=3e-3, patience=10, min_epochs=30),
        refiner=RefinerConfig(epochs=40, batch_size=1024, lr=2e-3, patience=8), refiner_points=150_000,
        # many short chains: 5000 x 20 kept (every 2nd transition) after 100 burn-in transitions
        hmc=HMCConfig(n_chains=5000, step_size=0.1, leapfrog_steps=20, burn_in=100, samples_per_chain=20,
                      thinning=2),
    )


def quick_settings() -> ToySettings:
    """Seconds per method: tiny samples and few epochs (a smoke test, not a measurement)."""
    return ToySettings(
        n_train=3000, n_eval=3000, emd_points=1000,
        base_flow=BaseFlowConfig(transforms=4, epochs=3),
        classifier=ClassifierConfig(hidden=(32, 32), epochs=3, batch_size=256),
        refiner=RefinerConfig(transforms=2, hidden=(32, 32), epochs=3, batch_size=256),
        hmc=HMCConfig(n_chains=100, leapfrog_steps=5, burn_in=10, samples_per_chain=30),
        manifold_n_train=300, manifold_n_eval=1000,
        ebim=EBIMToyConfig(manifold=ManifoldConfig(epochs=15, buffer_size=1000),
                           energy=EnergyConfig(epochs=2, buffer_size=300,
                                               sampler=SamplerConfig(steps=3, step_size=0.3)),
                           volume_points=20_000, sampler=SamplerConfig(steps=10, step_size=0.3)),
        pushforward=PushforwardConfig(autoencoder_epochs=20, flow_epochs=10, flow_transforms=2, flow_hidden=(32, 32)),
        manifold=ManifoldToyConfig(train_points=1000, transforms=3, hidden=(16, 16),
                                   schedule=MFlowSchedule(manifold_epochs=2, density_epochs=2)),
    )


@dataclass
class ToyResult:
    dataset: ToyDataset
    method: str
    settings: ToySettings
    seed: int
    truth: np.ndarray  # the reference truth sample the metrics compare against
    output: MethodOutput
    metrics: dict[str, float]
    truth_metrics: dict[str, float]  # an independent truth sample of the same size: the noise floor
    timings_s: dict[str, float]

    def summary(self) -> dict[str, object]:
        """Everything metrics.json holds except versions."""
        return {
            **self.metrics,
            "dataset": self.dataset.name, "dataset_description": self.dataset.description, "method": self.method,
            "seed": self.seed, "truth": self.truth_metrics,
            "weighted": self.output.weights is not None,
            "sizes": {"train": self.settings.n_train, "eval": self.settings.n_eval,
                      "generated": int(len(self.output.samples)), "emd_points": self.settings.emd_points,
                      "emd_repeats": self.settings.emd_repeats},
            "hist_range": self.dataset.hist_range, "settings": dataclasses.asdict(self.settings),
            "method_info": self.output.info, "timings_s": self.timings_s,
        }


def run_toy(dataset: str, method: str, settings: ToySettings, seed: int = 0) -> ToyResult:
    """Train ``method`` on ``settings.n_train`` points of ``dataset`` and score it against a truth sample."""
    ds, fn = DATASETS[dataset], METHODS[method]
    if ds.manifold_dimension is not None:
        settings = dataclasses.replace(settings, n_train=settings.manifold_n_train, n_eval=settings.manifold_n_eval,
                                       manifold_dimension=ds.manifold_dimension)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = ds.sample(settings.n_train, rng).astype(np.float32)
    truth = ds.sample(settings.n_eval, rng)
    truth_again = ds.sample(settings.n_eval, rng)
    start = time.perf_counter()
    output = fn(train, settings, generator)
    method_time = time.perf_counter() - start
    metric_rng = np.random.default_rng(seed + 1)
    metrics = evaluate(truth, output.samples, output.weights, hist_range=ds.hist_range, rng=metric_rng,
                       emd_points=settings.emd_points, emd_repeats=settings.emd_repeats, metrics=ds.metrics)
    truth_metrics = evaluate(truth, truth_again, None, hist_range=ds.hist_range, rng=metric_rng,
                             emd_points=settings.emd_points, emd_repeats=settings.emd_repeats, metrics=ds.metrics)
    if ds.manifold_distance is not None:
        metrics |= manifold_metrics(ds, truth, output.samples, output.log_density)
        truth_metrics |= manifold_metrics(ds, truth, truth_again, ds.log_density)
    timings = {"method": round(method_time, 3), "metrics": round(time.perf_counter() - start - method_time, 3)}
    return ToyResult(ds, method, settings, seed, truth, output, metrics, truth_metrics, timings)
