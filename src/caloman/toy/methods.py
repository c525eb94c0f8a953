"""Generation methods for the toys: a base flow and its LaSeR / DCTR refinements.

Each entry of :data:`METHODS` trains on a training sample (n, 2) and returns
:class:`MethodOutput` (samples, optional per-sample weights, diagnostics).
Adding a method is one :func:`register_method` call.

- ``flow``: the base generator G, a deliberately small RealNVP (affine coupling)
  flow, like the paper's baseline: a diffeomorphism of a Gaussian cannot make
  separate modes or holes, so it leaves bridges and filled holes.
- ``dctr``: the base flow's samples with DCTR weights w(x) (weighted output).
- ``laser-refiner``: a spline flow fitted by weighted likelihood to (z, w(G(z)));
  samples G(z') with z' from the refiner (unweighted).
- ``laser-hmc``: HMC on log N(z; 0, 1) + log w(G(z)); samples G(z) (unweighted).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import zuko
from torch import Tensor, nn

from caloman.errors import ConfigError
from caloman.implicit import EnergyConfig, ManifoldConfig, SamplerConfig
from caloman.models.mflow import MFlowSchedule
from caloman.refinement import (
    ClassifierConfig,
    DensityRatio,
    DeterministicPullback,
    HMCConfig,
    RefinerConfig,
    WeightedFlowRefiner,
    fit_density_ratio,
    hmc_sample,
    weight_summary,
)


@dataclass(frozen=True)
class BaseFlowConfig:
    """The limited base flow (the paper: 12 RealNVP blocks of 3 x 48, 100 epochs on 480k points)."""

    transforms: int = 6
    hidden: tuple[int, ...] = (32, 32)
    epochs: int = 20
    batch_size: int = 2000  # the paper's batch
    lr: float = 1e-3
    weight_decay: float = 1e-5
    lr_decay: float = 0.999  # per epoch, as the paper


@dataclass(frozen=True)
class EBIMToyConfig:
    """EBIM on a manifold toy: F, the constrained energy, the volume estimate and the final chains."""

    manifold: ManifoldConfig = ManifoldConfig()
    energy: EnergyConfig = EnergyConfig()
    volume_points: int = 200_000  # uniform box points of the tube-method volume estimate
    volume_delta: float = 0.05  # tube radius
    sampler: SamplerConfig = SamplerConfig(steps=100, step_size=0.3)  # final chains, one sample each
    #: where the final chains start: "resample" (uniform points on the zero set drawn by exp(-E)) or
    #: "uniform" (uniform points on the zero set)
    chain_start: str = "resample"
    confine: bool = True  # chains (training negatives and final) stay in F's training box

    def __post_init__(self) -> None:
        if self.chain_start not in ("resample", "uniform"):
            raise ConfigError(f"chain_start must be 'resample' or 'uniform', got {self.chain_start!r}")


@dataclass(frozen=True)
class PushforwardConfig:
    """The two-step pushforward baseline: an autoencoder with an m-dimensional code, then a flow on the codes."""

    hidden: tuple[int, ...] = (64, 64)
    autoencoder_epochs: int = 300
    flow_transforms: int = 3
    flow_hidden: tuple[int, ...] = (64, 64)
    flow_epochs: int = 300
    batch_size: int = 100
    lr: float = 3e-3


@dataclass(frozen=True)
class ManifoldToyConfig:
    """The manifold toys' methods (:mod:`caloman.toy.manifold_methods`): every network's
    size, the training points used (None: all) and the schedule; the ambient flow trains
    for manifold_epochs + density_epochs, the two-step VAE's autoencoder for
    manifold_epochs and its latent flow for density_epochs."""

    train_points: int | None = 10_000
    transforms: int = 6
    hidden: tuple[int, ...] = (64, 64)
    vae_kl_weight: float = 1e-3
    schedule: MFlowSchedule = MFlowSchedule(manifold_epochs=15, density_epochs=15)


@dataclass(frozen=True)
class ToySettings:
    """Sizes and configurations of one toy experiment."""

    n_train: int
    n_eval: int  # generated (and truth) points the metrics use
    emd_points: int = 3000
    emd_repeats: int = 1  # independent EMD subsamples averaged
    refiner_points: int | None = None  # latent points (z ~ N(0, I), free to draw) the refiner trains on; None: n_train
    base_flow: BaseFlowConfig = BaseFlowConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    refiner: RefinerConfig = RefinerConfig()
    hmc: HMCConfig = HMCConfig()
    manifold_n_train: int = 1000  # the manifold toys' training points (the EBIM reference: 1000)
    manifold_n_eval: int = 5000  # their generated (and truth) points
    manifold_dimension: int | None = None  # m of the dataset's manifold, set by run_toy
    ebim: EBIMToyConfig = EBIMToyConfig()
    pushforward: PushforwardConfig = PushforwardConfig()
    manifold: ManifoldToyConfig = ManifoldToyConfig()


@dataclass
class MethodOutput:
    samples: np.ndarray  # (n, d)
    weights: np.ndarray | None = None  # (n,) or None (unweighted)
    info: dict[str, object] = field(default_factory=dict)
    zero_set: np.ndarray | None = None  # (k, d) points on a learned manifold, for the pictures
    #: the learned log density on the learned manifold at the projections of points (n, D) -> (n,),
    #: for a method that has one
    log_density: Callable[[np.ndarray], np.ndarray] | None = None


ToyMethod = Callable[[np.ndarray, ToySettings, torch.Generator], MethodOutput]
METHODS: dict[str, ToyMethod] = {}


def register_method(name: str) -> Callable[[ToyMethod], ToyMethod]:
    def decorate(fn: ToyMethod) -> ToyMethod:
        METHODS[name] = fn
        return fn
    return decorate


class BaseFlow(nn.Module):
    """x = G(z) = scale * T^-1(z), z ~ N(0, I): RealNVP on the data divided by its std (as the reference)."""

    def __init__(self, features: int, config: BaseFlowConfig) -> None:
        super().__init__()
        self.config = config
        self.flow = zuko.flows.RealNVP(features, transforms=config.transforms, hidden_features=config.hidden)
        self.register_buffer("scale", torch.ones(features))
        self.history: list[dict[str, float]] = []

    def generate(self, z: Tensor) -> Tensor:
        """G(z), (n, d) -> (n, d), differentiable."""
        return self.flow().transform.inv(z) * self.scale

    def fit(self, x: Tensor, generator: torch.Generator | None = None) -> BaseFlow:
        cfg = self.config
        self.scale.copy_(x.std(0))
        u = x / self.scale
        optimiser = torch.optim.Adam(self.flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=cfg.lr_decay)
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(u), generator=generator)
            total = 0.0
            for i in range(0, len(u), cfg.batch_size):
                batch = u[order[i:i + cfg.batch_size]]
                loss = -self.flow().log_prob(batch).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * len(batch)
            schedule.step()
            self.history.append({"epoch": epoch + 1, "nll": total / len(u) + float(self.scale.log().sum())})
        self.eval()
        return self

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(z, G(z)) for n latent points z ~ N(0, I)."""
        z = torch.randn(n, self.scale.shape[0], generator=generator)
        return z, torch.cat([self.generate(z[i:i + 65536]) for i in range(0, n, 65536)])


def timed(info: dict, key: str, start: float) -> float:
    now = time.perf_counter()
    info.setdefault("timings_s", {})[key] = round(now - start, 3)
    return now


def _base(train: np.ndarray, settings: ToySettings, g: torch.Generator, info: dict) -> BaseFlow:
    start = time.perf_counter()
    base = BaseFlow(train.shape[1], settings.base_flow).fit(torch.as_tensor(train, dtype=torch.float32), g)
    timed(info, "base_flow", start)
    info["base_flow_final_nll"] = base.history[-1]["nll"]
    return base


def _base_and_ratio(train: np.ndarray, settings: ToySettings, g: torch.Generator, info: dict
                    ) -> tuple[BaseFlow, DensityRatio]:
    base = _base(train, settings, g, info)
    start = time.perf_counter()
    _, generated = base.sample(len(train), g)
    ratio = fit_density_ratio(generated, torch.as_tensor(train, dtype=torch.float32), settings.classifier,
                              generator=g)
    timed(info, "classifier", start)
    info["classifier_epochs"] = len(ratio.history)
    info["classifier_best_val_loss"] = min(h["val_loss"] for h in ratio.history)
    info["calibration"] = {"slope": float(ratio.slope), "bias": float(ratio.bias)}
    return base, ratio


@register_method("flow")
def flow_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    info: dict[str, object] = {}
    base = _base(train, settings, g, info)
    start = time.perf_counter()
    _, x = base.sample(settings.n_eval, g)
    timed(info, "generate", start)
    return MethodOutput(x.numpy(), None, info)


@register_method("dctr")
def dctr_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    info: dict[str, object] = {}
    base, ratio = _base_and_ratio(train, settings, g, info)
    start = time.perf_counter()
    _, x = base.sample(settings.n_eval, g)
    w = ratio.weight(x)
    timed(info, "generate", start)
    info["weights"] = weight_summary(w)
    return MethodOutput(x.numpy(), w.numpy(), info)


@register_method("laser-refiner")
def laser_refiner_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    info: dict[str, object] = {}
    base, ratio = _base_and_ratio(train, settings, g, info)
    pullback = DeterministicPullback(ratio, base.generate)
    start = time.perf_counter()
    z, _ = base.sample(settings.refiner_points or len(train), g)
    w = pullback.weight(z)
    info["latent_weights"] = weight_summary(w)
    refiner = WeightedFlowRefiner(z.shape[1], config=settings.refiner).fit(z, w, generator=g)
    start = timed(info, "refiner", start)
    info["refiner_epochs"] = len(refiner.history)
    z_refined = refiner.sample(settings.n_eval)
    with torch.no_grad():
        x = torch.cat([base.generate(z_refined[i:i + 65536]) for i in range(0, len(z_refined), 65536)])
    timed(info, "generate", start)
    return MethodOutput(x.numpy(), None, info)


@register_method("laser-hmc")
def laser_hmc_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    info: dict[str, object] = {}
    base, ratio = _base_and_ratio(train, settings, g, info)
    pullback = DeterministicPullback(ratio, base.generate)
    for p in pullback.parameters():
        p.requires_grad_(False)

    def log_prob(z: Tensor, condition: Tensor | None) -> Tensor:
        return -0.5 * (z ** 2).sum(-1) + pullback.log_weight(z)

    cfg = settings.hmc
    start = time.perf_counter()
    initial = torch.randn(cfg.n_chains, train.shape[1], generator=g)
    result = hmc_sample(log_prob, initial, cfg, generator=g)
    z = result.flat()
    with torch.no_grad():
        x = torch.cat([base.generate(z[i:i + 65536]) for i in range(0, len(z), 65536)])
    timed(info, "hmc", start)
    info["hmc"] = {"acceptance_rate": result.acceptance_rate, "burn_in_acceptance_rate":
                   result.burn_in_acceptance_rate, "step_size": result.step_size, "n_samples": len(z)}
    if not math.isfinite(result.acceptance_rate) or result.acceptance_rate < 0.05:
        info["hmc"]["warning"] = "acceptance below 5 %: the chains barely move"
    return MethodOutput(x.numpy(), None, info)
