"""Projection onto a zero set and constrained Langevin dynamics on it (EBIM, sec. 3.2).

``F`` is any callable mapping points (b, n) to residuals (b, c), row by row
(row i of F(x) depends only on x[i]); c = n - m is the codimension. Jacobian
products come from :mod:`torch.func` (J v by ``jvp``, J^T u by ``vjp``), so the
Jacobian is never formed. Per chain, (J J^T) u = J p is solved by conjugate
gradients; the Lagrange multiplier that returns a step to F = 0 by Newton's
method on the c x c system J(q') J(q)^T (built from c JVPs; c is small).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from caloman.errors import ConfigError

logger = logging.getLogger(__name__)

ImplicitFunction = Callable[[Tensor], Tensor]
Energy = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    """Constrained Langevin: q' = q + eps p - (alpha/2) grad E(q) + J(q)^T lambda with p tangent.

    ``alpha`` None means eps^2 (the Langevin discretisation of exp(-E)).
    """

    steps: int = 20
    step_size: float = 0.1  # eps
    alpha: float | None = None
    grad_clamp: float | None = None  # elementwise clamp of grad E (the reference's grad_clamp); None: off
    cg_iterations: int = 10
    cg_tolerance: float = 1e-10
    newton_iterations: int = 20
    tolerance: float = 1e-6  # a step counts as returned to the manifold when max_i |F_i| < tolerance

    def __post_init__(self) -> None:
        if self.steps < 0 or self.step_size <= 0 or self.newton_iterations < 1 or self.cg_iterations < 1:
            raise ConfigError(f"invalid sampler settings {self}: steps >= 0, step_size > 0 and at least one "
                              "CG and Newton iteration are needed")
        if self.tolerance <= 0:
            raise ConfigError(f"sampler tolerance must be positive, got {self.tolerance}")


@dataclass
class SamplerResult:
    samples: Tensor  # (b, n), on the manifold up to the tolerance
    mean_residual: float  # mean ||F|| of the samples
    rejected_fraction: float  # steps whose Newton solve did not converge or that left the box (chain stayed put)


def _jvp(F: ImplicitFunction, x: Tensor, v: Tensor) -> Tensor:
    return torch.func.jvp(F, (x,), (v,))[1]


def _vjp(F: ImplicitFunction, x: Tensor, u: Tensor) -> Tensor:
    return torch.func.vjp(F, x)[1](u)[0]


def conjugate_gradient(operator: Callable[[Tensor], Tensor], rhs: Tensor, iterations: int,
                       tolerance: float) -> Tensor:
    """Solve A u = rhs for each row of rhs (b, c), A symmetric positive definite per row."""
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    d = r.clone()
    rr = (r * r).sum(-1, keepdim=True)
    for _ in range(iterations):
        if float(rr.max()) < tolerance:
            break
        ad = operator(d)
        step = rr / (d * ad).sum(-1, keepdim=True).clamp_min(1e-30)
        u = u + step * d
        r = r - step * ad
        rr_new = (r * r).sum(-1, keepdim=True)
        d = r + rr_new / rr.clamp_min(1e-30) * d
        rr = rr_new
    return u


def tangent_projection(F: ImplicitFunction, x: Tensor, v: Tensor, config: SamplerConfig = SamplerConfig()) -> Tensor:
    """v - J^T (J J^T)^{-1} J v: vectors v (b, n) projected onto the tangent spaces at x (b, n)."""
    with torch.no_grad():
        jv = _jvp(F, x, v)
        u = conjugate_gradient(lambda w: _jvp(F, x, _vjp(F, x, w)), jv, config.cg_iterations, config.cg_tolerance)
        return v - _vjp(F, x, u)


def project(F: ImplicitFunction, x: Tensor, iterations: int = 50, tolerance: float = 1e-6,
            config: SamplerConfig = SamplerConfig()) -> Tensor:
    """Points x (b, n) moved onto F = 0 by Gauss-Newton minimum-norm steps x <- x - J^T (J J^T)^{-1} F(x)."""
    x = x.detach().clone()
    with torch.no_grad():
        for _ in range(iterations):
            residual = F(x)
            if float(residual.abs().max()) < tolerance:
                break
            u = conjugate_gradient(lambda w, x=x: _jvp(F, x, _vjp(F, x, w)), residual, config.cg_iterations,
                                   config.cg_tolerance)
            x = x - _vjp(F, x, u)
    return x


def _newton_multiplier(F: ImplicitFunction, q: Tensor, proposal: Tensor, config: SamplerConfig
                       ) -> tuple[Tensor, Tensor]:
    """lambda (b, c) with F(proposal + J(q)^T lambda) = 0 by Newton; returns (new points, converged (b,))."""
    c = F(q[:1]).shape[-1]
    lam = proposal.new_zeros(len(q), c)
    basis = torch.eye(c, dtype=q.dtype)
    directions = [_vjp(F, q, basis[k].expand(len(q), c)) for k in range(c)]  # columns of J(q)^T, each (b, n)
    y = proposal
    for _ in range(config.newton_iterations):
        residual = F(y)
        if float(residual.abs().max()) < config.tolerance:
            break
        matrix = torch.stack([_jvp(F, y, d) for d in directions], dim=-1)  # (b, c, c): J(y) J(q)^T
        lam = lam - torch.linalg.solve(matrix, residual.unsqueeze(-1)).squeeze(-1)
        y = proposal + sum(lam[:, k:k + 1] * directions[k] for k in range(c))
    residual = F(y)
    converged = (residual.abs().amax(-1) < config.tolerance) & torch.isfinite(y).all(-1)
    return y, converged


def constrained_langevin(F: ImplicitFunction, initial: Tensor, energy: Energy | None = None,
                         config: SamplerConfig = SamplerConfig(), generator: torch.Generator | None = None,
                         box: tuple[Tensor, Tensor] | None = None) -> SamplerResult:
    """Run ``config.steps`` constrained Langevin steps from ``initial`` (b, n), projected onto F = 0 first.

    ``energy`` maps (b, n) to (b,); None means E = 0 (the uniform density on the zero set).
    A chain whose Newton solve fails keeps its point for that step (counted in ``rejected_fraction``);
    so does one whose step would leave ``box`` = (low, high), each (n,), when given: the chains then
    sample the zero set inside the box (a learned zero set is not compact; outside the data's box it
    has pieces no data constrain, along which unconfined chains drift away).
    """
    if initial.ndim != 2:
        raise ConfigError(f"initial points must be (chains, dimension), got shape {tuple(initial.shape)}")
    eps = config.step_size
    alpha = eps ** 2 if config.alpha is None else config.alpha
    q = project(F, initial, tolerance=config.tolerance, config=config)
    rejected = 0
    for _ in range(config.steps):
        momentum = torch.randn(q.shape, generator=generator, dtype=q.dtype)
        p = tangent_projection(F, q, momentum, config)
        drift = torch.zeros_like(q)
        if energy is not None:
            with torch.enable_grad():
                qg = q.detach().requires_grad_(True)
                drift = torch.autograd.grad(energy(qg).sum(), qg)[0]
            if config.grad_clamp is not None:
                drift = drift.clamp(-config.grad_clamp, config.grad_clamp)
        with torch.no_grad():
            y, ok = _newton_multiplier(F, q, q + eps * p - 0.5 * alpha * drift, config)
            if box is not None:
                ok &= ((y >= box[0]) & (y <= box[1])).all(-1)
            q = torch.where(ok.unsqueeze(-1), y, q)
        rejected += int((~ok).sum())
    with torch.no_grad():
        residual = float(torch.linalg.vector_norm(F(q), dim=-1).mean())
    total = max(config.steps * len(q), 1)
    if rejected:
        logger.debug("constrained Langevin: %d of %d steps rejected (Newton did not converge or left the box)",
                     rejected, total)
    return SamplerResult(q.detach(), residual, rejected / total)
