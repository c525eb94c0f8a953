"""Pieces every contrastive-divergence trainer here shares (EBIM, sec. 3; Du & Mordatch 2019):
a persistent replay buffer of negatives and the regularised contrastive-divergence loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def draw_starts(buffer: Tensor, n: int, buffer_frac: float, fresh: Callable[[int], Tensor],
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Starting points of n negative chains: each a random row of ``buffer`` (N, dim) with
    probability ``buffer_frac``, else a fresh point from ``fresh(n)`` (n, dim). Returns the
    buffer slots (n,) the chains' ends go back to, and the starts (n, dim)."""
    slots = torch.randint(len(buffer), (n,), generator=generator)
    renew = torch.rand(n, generator=generator) > buffer_frac
    return slots, torch.where(renew.unsqueeze(-1), fresh(n), buffer[slots])


def contrastive_divergence(energy_data: Tensor, energy_negative: Tensor, beta: float) -> Tensor:
    """mean E(data) - mean E(neg) + beta (mean E(data)^2 + mean E(neg)^2); energies (b,) each.
    The beta term keeps E near zero, which the first two terms alone leave free to drift."""
    return (energy_data.mean() - energy_negative.mean()
            + beta * (energy_data.square().mean() + energy_negative.square().mean()))
