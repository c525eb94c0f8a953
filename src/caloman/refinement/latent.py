"""Pulling DCTR weights back to a generator's latent space (LaSeR, arXiv:2106.00792, sec. 3).

The refined latent density is p(z) w(z). For a deterministic generator x = G(z)
the latent weight is w(G(z)) (:class:`DeterministicPullback`, differentiable in z,
what HMC needs). When the path z -> x has its own noise (a decoder that samples,
a simulator), the right weight is the conditional mean E[w(x) | z], which the
paper learns with a second classifier: z weighted by w(G(z)) (label 1) against
the same z unweighted (label 0). Its f / (1 - f) is p(z) E[w|z] / (p(z) E[w]),
so E[w|z] = E[w] f / (1 - f) (:func:`fit_latent_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from caloman.refinement.weights import ClassifierConfig, DensityRatio, LabelledSample, split_indices, train_ratio


class DeterministicPullback(nn.Module):
    """log w(z) = log w(G(z)) for a deterministic, differentiable ``generate``: (n, k) -> (n, d)."""

    def __init__(self, ratio: DensityRatio, generate: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.ratio = ratio
        self.generate = generate

    def log_weight(self, z: Tensor) -> Tensor:
        """(n, k) -> (n,), differentiable in z."""
        return self.ratio.log_weight(self.generate(z))

    def forward(self, z: Tensor) -> Tensor:
        return self.log_weight(z)

    @torch.no_grad()
    def weight(self, z: Tensor, batch_size: int = 65536) -> Tensor:
        return torch.cat([self.log_weight(z[i:i + batch_size]).exp() for i in range(0, len(z), batch_size)])


def fit_latent_weights(z: Tensor, w: Tensor, config: ClassifierConfig | None = None, *,
                       generator: torch.Generator | None = None) -> DensityRatio:
    """Learn E[w | z] from latent points z (n, k) and the weights w (n,) of the samples
    generated from them. Returns a :class:`DensityRatio` whose ``weight(z)`` estimates
    E[w | z] in the units of w (its mean over z is the mean of w)."""
    config = config or ClassifierConfig()
    z = torch.as_tensor(z)
    w = torch.as_tensor(w, dtype=z.dtype).reshape(len(z))
    if not bool((w >= 0).all()) or float(w.sum()) <= 0:
        raise ValueError("fit_latent_weights: weights must be non-negative with a positive sum")
    # one split of the points, so no z is in training for one class and validation for the other
    train_idx, val_idx = split_indices(len(z), config.validation_fraction, generator)

    def labelled(idx: Tensor) -> LabelledSample:
        zs = z[idx]
        ones = torch.ones(len(idx), dtype=z.dtype)
        return LabelledSample(torch.cat([zs, zs]), torch.cat([torch.zeros_like(ones), ones]),
                              torch.cat([ones, w[idx]]))

    ratio = train_ratio(labelled(train_idx), labelled(val_idx), config, generator=generator)
    ratio.log_offset.fill_(math.log(float(w.mean())))
    return ratio
