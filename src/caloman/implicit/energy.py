"""A constrained energy-based model on a zero set and its normalised density (EBIM, sec. 3.2).

The density is p(x) = exp(-E(x)) / Z with respect to the manifold's volume
measure (no Jacobian term), Z = vol(M) * E_{u ~ uniform(M)}[exp(-E(u))].
E is trained by contrastive divergence, negatives from constrained Langevin
chains on M kept in a persistent buffer:

    loss = mean E(x_data) - mean E(x_neg) + beta (mean E(x_data)^2 + mean E(x_neg)^2)

Volume and uniform points (:func:`estimate_volume`), the tube method: draw
points uniformly in a box B containing M, keep those whose linearised
distance to M, d(x) = ||(J J^T)^{-1/2} F(x)||, is below delta, and project
them onto M. The kept fraction times vol(B) is the volume of the tube of
radius delta, which is vol(M) * (volume of the c-ball of radius delta) up to
curvature terms of relative order delta^2 (exact for a circle's annulus);
the projected points are uniform on M to the same order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from caloman.errors import ConfigError, TrainingDivergedError
from caloman.implicit.contrastive import contrastive_divergence, draw_starts
from caloman.implicit.sampling import SamplerConfig, _jvp, _vjp, conjugate_gradient, constrained_langevin, project
from caloman.networks import mlp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnergyConfig:
    """Size and training of the constrained energy (reference toys: 2 layers, Adam 0.01, 10-20 epochs)."""

    hidden: tuple[int, ...] = (32, 32)
    epochs: int = 20
    batch_size: int = 100
    lr: float = 1e-2
    beta: float = 0.1
    buffer_size: int = 2000
    buffer_frac: float = 0.95
    sampler: SamplerConfig = SamplerConfig(steps=10, step_size=0.3)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.buffer_size < 1:
            raise ConfigError(f"invalid energy settings {self}")


class EnergyModel(nn.Module):
    """E: (b, n) -> (b,), an MLP with SiLU activations."""

    def __init__(self, features: int, hidden: tuple[int, ...] = (32, 32)) -> None:
        super().__init__()
        self.net = mlp(features, 1, hidden, activation=nn.SiLU)
        self.history: list[dict[str, float]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)


@dataclass
class ManifoldVolume:
    volume: float  # vol(M) estimate (length for m = 1, area for m = 2)
    standard_error: float  # binomial error of the tube fraction, propagated
    uniform_points: Tensor  # (k, n): tube points projected onto M, approximately uniform on M
    delta: float
    box_points: int


def _linearised_distance(F: Callable[[Tensor], Tensor], x: Tensor, sampler: SamplerConfig) -> Tensor:
    """||(J J^T)^{-1/2} F(x)|| = sqrt(F^T (J J^T)^{-1} F), the first-order distance to F = 0; (b,)."""
    residual = F(x)
    u = conjugate_gradient(lambda w: _jvp(F, x, _vjp(F, x, w)), residual, sampler.cg_iterations,
                           sampler.cg_tolerance)
    return (residual * u).sum(-1).clamp_min(0).sqrt()


def estimate_volume(F: Callable[[Tensor], Tensor], low: Tensor, high: Tensor, *, codimension: int,
                    points: int = 200_000, delta: float = 0.02, batch: int = 50_000,
                    sampler: SamplerConfig | None = None, generator: torch.Generator | None = None
                    ) -> ManifoldVolume:
    """vol(M) for M = {F = 0} inside the box [low, high] (n,) by the tube method (module docstring)."""
    sampler = sampler or SamplerConfig()
    if delta <= 0 or points < 1:
        raise ConfigError(f"delta must be positive and points >= 1, got delta={delta}, points={points}")
    box = float(torch.prod(high - low))
    ball = math.pi ** (codimension / 2) / math.gamma(codimension / 2 + 1) * delta ** codimension
    kept: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, points, batch):
            k = min(batch, points - start)
            x = low + torch.rand(k, len(low), generator=generator) * (high - low)
            kept.append(x[_linearised_distance(F, x, sampler) < delta])
    inside = torch.cat(kept)
    fraction = len(inside) / points
    volume = fraction * box / ball
    error = math.sqrt(max(fraction * (1 - fraction), 0.0) / points) * box / ball
    on_manifold = project(F, inside, config=sampler) if len(inside) else inside
    return ManifoldVolume(volume, error, on_manifold, delta, points)


def normalised_density(energy: Callable[[Tensor], Tensor], x: Tensor, volume: ManifoldVolume) -> Tensor:
    """p(x) = exp(-E(x)) / (vol(M) mean_u exp(-E(u))), u the volume's uniform points; x (b, n) -> (b,)."""
    with torch.no_grad():
        e_uniform = energy(volume.uniform_points)
        shift = e_uniform.min()  # for numerical range; cancels in the ratio
        log_z = math.log(volume.volume) + float(torch.logsumexp(-(e_uniform - shift), 0)) - math.log(len(e_uniform))
        return torch.exp(-(energy(x) - shift) - log_z)


def resample_uniform(energy: Callable[[Tensor], Tensor], volume: ManifoldVolume, n: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """n points (n, dim) drawn with replacement from the volume's uniform points with probability
    proportional to exp(-E): approximately p = exp(-E) / Z on M, each component of M in proportion to
    its mass under p (constrained chains cannot move between components; started here, they need not)."""
    with torch.no_grad():
        e = energy(volume.uniform_points)
        probabilities = torch.softmax(-(e - e.min()), 0)
    return volume.uniform_points[torch.multinomial(probabilities, n, replacement=True, generator=generator)]


def train_energy(F: Callable[[Tensor], Tensor], data: Tensor, initial_negatives: Tensor,
                 config: EnergyConfig = EnergyConfig(), generator: torch.Generator | None = None,
                 box: tuple[Tensor, Tensor] | None = None) -> EnergyModel:
    """Contrastive divergence for E on the zero set of F. data (N, n); initial_negatives (k, n) on or
    near the manifold (they refill the buffer); ``box`` confines the negative chains
    (:func:`constrained_langevin`); returns E in eval mode with ``history``."""
    cfg = config
    energy = EnergyModel(data.shape[1], cfg.hidden)
    optimiser = torch.optim.Adam(energy.parameters(), lr=cfg.lr)
    fill = torch.randint(len(initial_negatives), (cfg.buffer_size,), generator=generator)
    buffer = project(F, initial_negatives[fill], config=cfg.sampler)

    def frozen_energy(x: Tensor) -> Tensor:
        return torch.func.functional_call(energy, {k: v.detach() for k, v in energy.named_parameters()}, (x,))

    for epoch in range(cfg.epochs):
        order = torch.randperm(len(data), generator=generator)
        total, residual = 0.0, 0.0
        batches = 0
        for i in range(0, len(data), cfg.batch_size):
            positive = data[order[i:i + cfg.batch_size]]
            b = len(positive)
            slots, start = draw_starts(buffer, b, cfg.buffer_frac, lambda k: initial_negatives[
                torch.randint(len(initial_negatives), (k,), generator=generator)], generator)
            chain = constrained_langevin(F, start, frozen_energy, cfg.sampler, generator, box)
            negative = chain.samples
            buffer[slots] = negative
            e_pos, e_neg = energy(positive), energy(negative)
            loss = contrastive_divergence(e_pos, e_neg, cfg.beta)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"energy training diverged at epoch {epoch + 1}; lower lr ({cfg.lr})")
            optimiser.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(energy.parameters(), 1.0)
            optimiser.step()
            total += float(loss.detach()) * b
            residual += chain.mean_residual
            batches += 1
        energy.history.append({"epoch": epoch + 1, "loss": total / len(data),
                               "negative_mean_residual": residual / max(batches, 1)})
    energy.eval()
    for p in energy.parameters():
        p.requires_grad_(False)
    return energy
