"""The LaSeR refiner: a flow fitted by weighted maximum likelihood to the reweighted latent.

Given latent points z_i (from the generator's prior) and their pulled-back
weights w_i, the refiner q maximises sum_i w_i log q(z_i | c_i) / sum_i w_i, i.e.
it fits the density p(z) w(z) / Z (arXiv:2106.00792, sec. 3; the reference's
``flow_train.py`` with ``weighted=True``). Refined samples are G(z) with z ~ q.

The paper's refiner is a GAN with a larger noise space (to change topology); a
flow cannot change topology either, but a rational-quadratic spline flow (zuko's
NSF, Durkan et al. 2019) can squeeze mass out of the regions w sends to zero far
better than the affine base flow, trains by plain likelihood (stable, no
adversarial balance) and takes the condition (CaloMan's incident energy) as
context. Its input is standardised by the weighted mean and std of z.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import zuko
from torch import Tensor, nn

from caloman.errors import ConfigError
from caloman.models.flows import ConditionalFlow
from caloman.refinement.weights import split_indices

#: Flows a refiner can be (see :class:`RefinerConfig`).
REFINER_FLOWS = ("coupling", "zuko-nsf")
#: The coupling flow's splines act on [-5, 5] of the standardised latent (zuko's NSF default).
STANDARDISED_BOUND = 5.0


@dataclass(frozen=True)
class RefinerConfig:
    """Architecture and training of the weighted-likelihood refiner flow."""

    transforms: int = 4
    hidden: tuple[int, ...] = (64, 64)
    bins: int = 8
    passes: int | None = 2  # zuko's NSF: 2 = coupling; None = fully autoregressive
    #: "coupling": caloman's conditional coupling spline flow (:class:`~caloman.models.flows.
    #: ConditionalFlow`, the fused sampler CaloMan's own flows use; a conditional refiner
    #: only); "zuko-nsf": zuko's NSF (an unconditional refiner, and refined runs written
    #: before 2026-12-07, which cost 2.9x the base model's generation time at batch 10,000)
    flow: str = "coupling"
    epochs: int = 60
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    validation_fraction: float = 0.1
    patience: int = 8


class WeightedFlowRefiner(nn.Module):
    """q(z | condition) for z of shape (n, features) and condition (n, context) or None."""

    def __init__(self, features: int, context: int = 0, config: RefinerConfig = RefinerConfig()) -> None:
        super().__init__()
        self.features, self.context, self.config = features, context, config
        if config.flow not in REFINER_FLOWS:
            raise ConfigError(f"refiner flow must be one of {', '.join(REFINER_FLOWS)}, got {config.flow!r}")
        #: caloman's fused coupling flow (conditional refiners with 2 or more features)
        self.fused = config.flow == "coupling" and context > 0 and features > 1
        if self.fused:
            self.flow = ConditionalFlow(features, context, transforms=config.transforms, hidden=config.hidden,
                                        bins=config.bins, bound=STANDARDISED_BOUND)
        else:
            self.flow = zuko.flows.NSF(features, context, bins=config.bins, transforms=config.transforms,
                                       hidden_features=config.hidden, passes=config.passes)
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.history: list[dict[str, float]] = []

    def _dist(self, condition: Tensor | None):
        return self.flow(self._condition(condition)) if self.context else self.flow()

    def log_prob(self, z: Tensor, condition: Tensor | None = None) -> Tensor:
        """log q(z | condition), (n, features) -> (n,)."""
        u = (z - self.shift) / self.scale
        if self.fused:
            return self.flow.log_prob(u, self._condition(condition)) - self.scale.log().sum()
        return self._dist(condition).log_prob(u) - self.scale.log().sum()

    def from_noise(self, noise: Tensor, condition: Tensor | None = None) -> Tensor:
        """The deterministic map behind :meth:`sample`: z (n, features) for standard-normal
        base noise (n, features) of the flow, one row per row of condition (n, context)."""
        if self.fused:
            return self.flow.transform_inverse(noise, self._condition(condition)) * self.scale + self.shift
        return self._dist(condition).transform.inv(noise) * self.scale + self.shift

    def _condition(self, condition: Tensor | None) -> Tensor:
        if condition is None:
            raise ValueError(f"this refiner is conditional ({self.context} features): pass condition")
        return condition

    def sample(self, n: int | None = None, condition: Tensor | None = None) -> Tensor:
        """n samples (unconditional) or one per row of condition (n, context); (n, features)."""
        with torch.no_grad():
            if self.fused:
                noise = torch.randn(len(self._condition(condition)), self.features, dtype=self.shift.dtype,
                                    device=self.shift.device)
                return self.from_noise(noise, condition)
            if self.context:
                u = self._dist(condition).sample()
            else:
                if n is None:
                    raise ValueError("sample: give n for an unconditional refiner")
                u = self._dist(None).sample((n,))
            return u * self.scale + self.shift

    def fit(self, z: Tensor, w: Tensor, condition: Tensor | None = None, *,
            generator: torch.Generator | None = None) -> WeightedFlowRefiner:
        """Weighted maximum likelihood on z (n, features), w (n,) >= 0, condition (n, context).
        Early stopping on a validation split (best validation loss kept). Returns self."""
        cfg = self.config
        z = torch.as_tensor(z)
        w = torch.as_tensor(w, dtype=z.dtype).reshape(len(z))
        if not bool((w >= 0).all()) or float(w.sum()) <= 0:
            raise ValueError("refiner: weights must be non-negative with a positive sum")
        if (condition is None) != (self.context == 0):
            raise ValueError(f"refiner with {self.context} condition features got "
                             f"{'no' if condition is None else 'a'} condition")
        self.to(z.dtype)
        mean = (w[:, None] * z).sum(0) / w.sum()
        var = (w[:, None] * (z - mean) ** 2).sum(0) / w.sum()
        self.shift.copy_(mean)
        self.scale.copy_(var.sqrt().clamp_min(1e-6))
        train, val = split_indices(len(z), cfg.validation_fraction, generator)

        def loss_of(idx: Tensor) -> Tensor:
            c = None if condition is None else condition[idx]
            return -(w[idx] * self.log_prob(z[idx], c)).sum() / w[idx].sum()

        optimiser = torch.optim.Adam(self.flow.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best, best_state, stale = math.inf, copy.deepcopy(self.state_dict()), 0
        for epoch in range(cfg.epochs):
            self.train()
            order = train[torch.randperm(len(train), generator=generator)]
            total = 0.0
            for i in range(0, len(order), cfg.batch_size):
                loss = loss_of(order[i:i + cfg.batch_size])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss.detach()) * min(cfg.batch_size, len(order) - i)
            self.eval()
            with torch.no_grad():
                val_loss = float(loss_of(val))
            self.history.append({"epoch": epoch + 1, "train_loss": total / len(order), "val_loss": val_loss})
            if val_loss < best - 1e-6:
                best, best_state, stale = val_loss, copy.deepcopy(self.state_dict()), 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        history = self.history
        self.load_state_dict(best_state)
        self.history = history
        self.eval()
        return self
