"""The manifold-defining function F: R^n -> R^(n-m) and its training (EBIM, sec. 3.1).

F is trained so that data lie on its zero set and other points do not:

    loss = mean ||F(x_data)|| - neg_weight mean ||F(x_neg)|| + beta mean ||F(x_neg)||^2
           + rank_weight mean relu(sv_min - ||v^T J_F(x_data)|| / ||v||)^2

The negatives x_neg are short-run Langevin samples of the energy ||F|| from a
persistent replay buffer (refreshed with uniform noise in the data's box, and
clamped to that box as the reference's), so they sit where F is small but
should not be. The last term keeps J_F full rank
on the data (random v, one vector-Jacobian product per batch), which keeps the
zero set a regular level set of codimension c = n - m. The beta term bounds F
on the negatives, which the negative term would otherwise push to infinity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from caloman.errors import ConfigError, TrainingDivergedError
from caloman.implicit.contrastive import draw_starts
from caloman.networks import mlp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifoldConfig:
    """Sizes and training of F (defaults: the reference toys', hidden 32 instead of 8)."""

    codimension: int = 1  # c = n - m
    hidden: tuple[int, ...] = (32, 32, 32)
    epochs: int = 300
    batch_size: int = 100
    lr: float = 1e-2
    neg_weight: float = 0.3
    beta: float = 0.1
    rank_weight: float = 10.0  # mu
    sv_min: float = 1.0
    buffer_size: int = 10_000
    buffer_frac: float = 0.95  # negatives started from the buffer; the rest from uniform noise
    langevin_steps: int = 20
    langevin_step_size: float = 0.1  # eps
    langevin_alpha: float = 10.0
    langevin_grad_clamp: float = 0.03
    box_margin: float = 0.5  # uniform noise box: the data's box widened by this fraction of its size

    def __post_init__(self) -> None:
        if self.codimension < 1 or self.epochs < 0 or self.batch_size < 1 or not self.hidden:
            raise ConfigError(f"invalid manifold settings {self}: codimension >= 1, batch_size >= 1 and at "
                              "least one hidden layer are needed")
        if not 0.0 <= self.buffer_frac <= 1.0:
            raise ConfigError(f"buffer_frac must lie in [0, 1], got {self.buffer_frac}")


class ManifoldFunction(nn.Module):
    """F: (b, n) -> (b, c), an MLP with SiLU activations (smooth, so J_F is continuous)."""

    def __init__(self, features: int, codimension: int, hidden: tuple[int, ...] = (32, 32, 32)) -> None:
        super().__init__()
        if codimension >= features:
            raise ConfigError(f"codimension {codimension} must be below the dimension {features}")
        self.net = mlp(features, codimension, hidden, activation=nn.SiLU)
        self.features, self.codimension = features, codimension
        self.register_buffer("low", torch.full((features,), -1.0))
        self.register_buffer("high", torch.ones(features))
        self.history: list[dict[str, float]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def clamp(self, x: Tensor) -> Tensor:
        """Points x (b, features) clamped into the training box (as the reference's negatives)."""
        return torch.maximum(torch.minimum(x, self.high), self.low)

    def inside(self, x: Tensor) -> Tensor:
        """Whether each point x (b, features) lies in the training box; (b,) bool."""
        return ((x >= self.low) & (x <= self.high)).all(-1)

    def uniform(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n points uniform in the box F was trained in, (n, features)."""
        u = torch.rand(n, self.features, generator=generator)
        return self.low + u * (self.high - self.low)


def langevin(energy, initial: Tensor, steps: int, step_size: float, alpha: float, grad_clamp: float | None,
             generator: torch.Generator | None = None) -> Tensor:
    """Unconstrained Langevin q <- q + eps p - (alpha/2) clamp(grad E(q)); energy: (b, n) -> (b,)."""
    q = initial.detach()
    for _ in range(steps):
        qg = q.requires_grad_(True)
        grad = torch.autograd.grad(energy(qg).sum(), qg)[0]
        if grad_clamp is not None:
            grad = grad.clamp(-grad_clamp, grad_clamp)
        noise = torch.randn(q.shape, generator=generator, dtype=q.dtype)
        q = (q.detach() + step_size * noise - 0.5 * alpha * grad).detach()
    return q


def rank_penalty(F: nn.Module, x: Tensor, sv_min: float, generator: torch.Generator | None = None) -> Tensor:
    """mean relu(sv_min - ||v^T J_F(x)|| / ||v||)^2, v ~ N(0, I) in the codomain; differentiable in F."""
    out, vjp_fn = torch.func.vjp(F, x)
    v = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    (row,) = vjp_fn(v)
    ratio = torch.linalg.vector_norm(row, dim=-1) / torch.linalg.vector_norm(v, dim=-1).clamp_min(1e-12)
    return torch.relu(sv_min - ratio).square().mean()


def _negatives(F: ManifoldFunction, norm_f, buffer: Tensor, b: int, cfg: ManifoldConfig,
               generator: torch.Generator | None) -> Tensor:
    """b Langevin negatives (b, n) from the buffer (refreshed with uniform noise), clamped to F's box
    and written back to the buffer."""
    slots, start = draw_starts(buffer, b, cfg.buffer_frac, lambda k: F.uniform(k, generator), generator)
    for p in F.parameters():
        p.requires_grad_(False)
    negative = F.clamp(langevin(norm_f, start, cfg.langevin_steps, cfg.langevin_step_size, cfg.langevin_alpha,
                                cfg.langevin_grad_clamp, generator))
    for p in F.parameters():
        p.requires_grad_(True)
    buffer[slots] = negative
    return negative


def train_manifold(data: Tensor, config: ManifoldConfig = ManifoldConfig(),
                   generator: torch.Generator | None = None) -> ManifoldFunction:
    """Train F on data (N, n); returns F in eval mode with ``history`` (per epoch: loss, data and negative ||F||)."""
    if data.ndim != 2 or len(data) < 2:
        raise ConfigError(f"training data must be (points, dimension) with at least 2 points, got "
                          f"{tuple(data.shape)}")
    if not torch.isfinite(data).all():
        raise ConfigError("training data contain NaN or infinite values")
    cfg = config
    F = ManifoldFunction(data.shape[1], cfg.codimension, cfg.hidden)
    low, high = data.min(0).values, data.max(0).values
    span = (high - low).clamp_min(1e-6)
    F.low.copy_(low - cfg.box_margin * span)
    F.high.copy_(high + cfg.box_margin * span)
    buffer = F.uniform(cfg.buffer_size, generator)
    optimiser = torch.optim.Adam(F.parameters(), lr=cfg.lr)

    def norm_f(x: Tensor) -> Tensor:
        return torch.linalg.vector_norm(F(x), dim=-1)

    for epoch in range(cfg.epochs):
        order = torch.randperm(len(data), generator=generator)
        sums = torch.zeros(3)
        for i in range(0, len(data), cfg.batch_size):
            positive = data[order[i:i + cfg.batch_size]]
            b = len(positive)
            negative = _negatives(F, norm_f, buffer, b, cfg, generator)
            f_pos, f_neg = norm_f(positive), norm_f(negative)
            loss = (f_pos.mean() - cfg.neg_weight * f_neg.mean() + cfg.beta * f_neg.square().mean()
                    + cfg.rank_weight * rank_penalty(F, positive, cfg.sv_min, generator))
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"manifold training diverged at epoch {epoch + 1}; lower lr "
                                            f"({cfg.lr}) or the Langevin step size")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            sums += torch.tensor([float(loss.detach()) * b, float(f_pos.detach().sum()),
                                  float(f_neg.detach().sum())])
        n = len(data)
        F.history.append({"epoch": epoch + 1, "loss": float(sums[0]) / n, "data_norm": float(sums[1]) / n,
                          "negative_norm": float(sums[2]) / n})
    F.eval()
    for p in F.parameters():
        p.requires_grad_(False)
    return F
