"""Small network builders shared by every package that trains one (models, implicit manifolds)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(in_features: int, out_features: int, hidden: Sequence[int],
        activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear-activation stack: in -> hidden[0] -> ... -> hidden[-1] -> out (no final activation)."""
    sizes = (in_features, *hidden, out_features)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)
