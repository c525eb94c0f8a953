"""Batched Hamiltonian Monte Carlo on a log-density given as a torch function.

Standard HMC (Duane et al. 1987; Neal 2011, arXiv:1206.1901) as LaSeR uses it
(arXiv:2106.00792, sec. 3 and 4.1): potential U(z) = -log p(z) - log w(z), identity
mass, leapfrog integration, one Metropolis-Hastings accept/reject per chain and
transition. Chains run in parallel as one batch. Written by hand because no
maintained PyTorch package runs many chains batched on an arbitrary torch
log-density (hamiltorch works on one flat parameter vector and is not on PyPI).

During burn-in the step size can be adapted towards a target acceptance rate
(a Robbins-Monro update of log step size on the mean acceptance probability);
it is frozen before samples are kept, so the kept chain is a valid MCMC. Each
transition jitters the step size by +-10 % to avoid periodic trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LogDensity = Callable[[Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class HMCConfig:
    """Sampler settings. ``samples_per_chain`` are kept after ``burn_in`` transitions,
    one every ``thinning`` transitions."""

    n_chains: int = 100
    step_size: float = 0.05
    leapfrog_steps: int = 20
    burn_in: int = 500
    samples_per_chain: int = 100
    thinning: int = 1
    adapt_step_size: bool = True
    target_acceptance: float = 0.75


@dataclass
class HMCResult:
    """samples (samples_per_chain, n_chains, d); acceptance rates are mean Metropolis
    acceptance probabilities min(1, exp(-dH)) over chains and transitions."""

    samples: Tensor
    acceptance_rate: float  # over the kept phase
    burn_in_acceptance_rate: float
    step_size: float  # the (adapted) step size used for the kept samples

    def flat(self) -> Tensor:
        """All kept samples as (samples_per_chain * n_chains, d)."""
        return self.samples.reshape(-1, self.samples.shape[-1])


def _log_prob_and_grad(log_prob: LogDensity, z: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        lp = log_prob(z, condition)
        (grad,) = torch.autograd.grad(lp.sum(), z)
    return lp.detach(), grad.detach()


def _transition(log_prob: LogDensity, z: Tensor, lp: Tensor, grad: Tensor, step: float, n_steps: int,
                condition: Tensor | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One HMC transition for all chains; returns new (z, lp, grad) and the acceptance probabilities."""
    p0 = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    q, g = z, grad
    p = p0 + 0.5 * step * g  # d/dz log p = -dU/dz
    for i in range(n_steps):
        q = q + step * p
        lp_q, g = _log_prob_and_grad(log_prob, q, condition)
        if i < n_steps - 1:
            p = p + step * g
    p = p + 0.5 * step * g
    # H = U + |p|^2/2; accept with min(1, exp(H0 - H1)); non-finite proposals are rejected
    log_accept = (lp_q - lp) - 0.5 * (p ** 2).sum(-1) + 0.5 * (p0 ** 2).sum(-1)
    log_accept = torch.where(torch.isfinite(log_accept), log_accept, torch.full_like(log_accept, -math.inf))
    accept_prob = log_accept.clamp(max=0).exp()
    accept = torch.rand(len(z), generator=generator, dtype=z.dtype) < accept_prob
    z = torch.where(accept[:, None], q, z)
    lp = torch.where(accept, lp_q, lp)
    grad = torch.where(accept[:, None], g, grad)
    return z, lp, grad, accept_prob


def hmc_sample(log_prob: LogDensity, initial: Tensor, config: HMCConfig = HMCConfig(), *,
               condition: Tensor | None = None, generator: torch.Generator | None = None) -> HMCResult:
    """Run ``config.n_chains`` chains from ``initial`` (n_chains, d).

    ``log_prob(z, condition)`` maps (n_chains, d) and the per-chain condition
    (n_chains, c) or None to (n_chains,) unnormalised log-densities, differentiably in z.
    """
    z = torch.as_tensor(initial).detach().clone()
    if z.ndim != 2 or len(z) != config.n_chains:
        raise ValueError(f"hmc_sample: initial must be (n_chains={config.n_chains}, d), got {tuple(z.shape)}")
    if condition is not None and len(condition) != len(z):
        raise ValueError(f"hmc_sample: condition has {len(condition)} rows for {len(z)} chains")
    lp, grad = _log_prob_and_grad(log_prob, z, condition)
    if not bool(torch.isfinite(lp).all()):
        raise ValueError("hmc_sample: log_prob is not finite at some initial points")
    log_step = math.log(config.step_size)

    def jitter() -> float:
        return math.exp(log_step) * (0.9 + 0.2 * float(torch.rand((), generator=generator)))

    burn_accept = []
    for t in range(config.burn_in):
        z, lp, grad, prob = _transition(log_prob, z, lp, grad, jitter(), config.leapfrog_steps, condition, generator)
        burn_accept.append(float(prob.mean()))
        if config.adapt_step_size:
            log_step += (burn_accept[-1] - config.target_acceptance) / math.sqrt(t + 10)
    kept, accept = [], []
    for _ in range(config.samples_per_chain):
        for _ in range(config.thinning):
            z, lp, grad, prob = _transition(log_prob, z, lp, grad, jitter(), config.leapfrog_steps, condition,
                                            generator)
            accept.append(float(prob.mean()))
        kept.append(z.clone())
    samples = torch.stack(kept) if kept else z.new_zeros((0, *z.shape))
    return HMCResult(samples=samples, acceptance_rate=sum(accept) / max(1, len(accept)),
                     burn_in_acceptance_rate=sum(burn_accept) / max(1, len(burn_accept)),
                     step_size=math.exp(log_step))
