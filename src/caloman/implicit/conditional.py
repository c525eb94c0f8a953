"""A conditional energy E(x | c) on R^n and Langevin sampling of exp(-E) driven by explicit noise.

The unconstrained relative of :mod:`~caloman.implicit.energy`: the density is on all
of R^n (x are, for example, codes of an autoencoder, which already lie on the
learned manifold), conditioned on a vector c. E is an MLP with SiLU activations on
[x, c]; its input gradient is written out by hand (:meth:`ConditionalEnergy.gradient`),
so that sampling needs no autograd: it runs under ``torch.inference_mode()`` and is a
static graph of plain tensor operations a tracer (ONNX export) can record.

Langevin dynamics (:func:`langevin_from_noise`) takes its Gaussian increments as an
argument, so a sample is a deterministic function of (start, noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from caloman.errors import ConfigError
from caloman.networks import mlp


class ConditionalEnergy(nn.Module):
    """E: x (b, n), c (b, k) -> (b,), an MLP on [x, c] with SiLU activations (k may be 0)."""

    def __init__(self, features: int, context: int = 0, hidden: Sequence[int] = (128, 128)) -> None:
        super().__init__()
        if features < 1 or context < 0 or not hidden:
            raise ConfigError(f"a conditional energy needs features >= 1, context >= 0 and a hidden layer; got "
                              f"{features}, {context}, {tuple(hidden)}")
        self.features, self.context = features, context
        self.net = mlp(features + context, 1, hidden, activation=nn.SiLU)

    def _inputs(self, x: Tensor, condition: Tensor | None) -> Tensor:
        return x if condition is None or self.context == 0 else torch.cat((x, condition.to(x.dtype)), dim=-1)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        return self.net(self._inputs(x, condition)).squeeze(-1)

    def gradient(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        """dE/dx (b, n) by a hand-written backward pass through the MLP (no autograd):
        silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a)."""
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        h = self._inputs(x, condition)
        slopes = []
        for linear in linears[:-1]:
            a = linear(h)
            s = torch.sigmoid(a)
            slopes.append(s * (1 + a * (1 - s)))
            h = a * s
        g = linears[-1].weight.to(x.dtype)  # (1, h_last), broadcast over the batch
        for linear, slope in zip(reversed(linears[:-1]), reversed(slopes)):
            g = (g * slope) @ linear.weight.to(x.dtype)
        return g[:, :self.features]


def langevin_from_noise(gradient: Callable[[Tensor], Tensor], start: Tensor, noise: Tensor, step_size: float,
                        alpha: float | None = None, grad_clamp: float | None = None) -> Tensor:
    """x_{t+1} = x_t - (alpha / 2) clamp(grad E(x_t)) + eps xi_t for t < T, from ``start`` (b, n)
    with increments ``noise`` (b, T n) standard normal (step t uses columns t n .. (t + 1) n);
    ``alpha`` None means eps^2 (the Langevin discretisation of exp(-E)). Returns x_T (b, n).
    A deterministic function of its arguments; T is fixed by the noise's width."""
    n = start.shape[-1]
    if noise.shape[-1] % n:
        raise ConfigError(f"Langevin noise width {noise.shape[-1]} is not a multiple of the dimension {n}")
    alpha = step_size ** 2 if alpha is None else alpha
    x = start
    for t in range(noise.shape[-1] // n):
        drift = gradient(x)
        if grad_clamp is not None:
            drift = drift.clamp(-grad_clamp, grad_clamp)
        x = x - 0.5 * alpha * drift + step_size * noise[:, t * n:(t + 1) * n]
    return x
