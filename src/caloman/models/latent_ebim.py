"""An energy-based density on CaloMan's latent codes (``latent_density = "ebim"``).

In place of the latent flow, p(z | c) = exp(-E(z | c)) / Z(c) on the standardised
codes z (d,), with the flow's condition c (scaled E_inc, and the encoded layer
energies for per-layer preprocessing); E is a
:class:`~caloman.implicit.conditional.ConditionalEnergy` (EBIM, Ross et al. 2023,
sec. 3.2, without the constraint: the autoencoder already defines the manifold).

Training (stage ``latent_ebim``): contrastive divergence, the negatives for a batch
of codes being ``steps`` Langevin steps under the batch's conditions from a
persistent replay buffer (a ``buffer_frac`` share of chains, the rest from fresh
N(0, I) starts, the generation start). The buffer is a buffer of the module, so it
is saved with the run and a resumed stage continues it. The validation loss is the
IMQ-kernel MMD between the validation codes and codes generated from fixed noise
under the same conditions, both joined to the condition: it scores the sampler
that generation uses, not the energy's (unknown) normalisation.

Generation: z_0 ~ N(0, I) in the standardised code space (the ``latent`` noise
block), then ``steps`` Langevin steps z <- z - (alpha / 2) grad E(z | c) + eps xi,
xi from the ``latent_langevin`` block (``steps`` x d normals per shower): a
deterministic function of the noise, with a hand-written gradient (no autograd), so
it runs in inference mode and traces to a static graph. There is no normalised
density (Z(c) is unknown), so :meth:`CaloManModel.log_prob_on_manifold` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from caloman.errors import ConfigError
from caloman.implicit.conditional import ConditionalEnergy, langevin_from_noise
from caloman.implicit.contrastive import contrastive_divergence, draw_starts
from caloman.models.autoencoders import mmd_imq

#: Seed of the fixed noise the validation samples are drawn with (comparable epochs).
_VALIDATION_SEED = 0


@dataclass(frozen=True)
class LatentEBIMSettings:
    """The ``ebim_*`` options of :class:`~caloman.models.caloman.CaloManConfig`, checked."""

    hidden: tuple[int, ...] = (128, 128)
    steps: int = 30  # Langevin steps per negative (training) and per sample (generation)
    step_size: float = 0.1  # eps, the std of each step's noise
    alpha: float = 1.0  # gradient step coefficient; 0 means eps^2 (exact Langevin for exp(-E))
    buffer_size: int = 10_000
    buffer_frac: float = 0.5  # share of negative chains continued from the replay buffer
    beta: float = 0.1  # weight of the E^2 regulariser of the contrastive-divergence loss

    def __post_init__(self) -> None:
        if not self.hidden or any(int(s) < 1 for s in self.hidden):
            raise ConfigError(f"model option ebim_hidden must list positive layer sizes, got {self.hidden!r}")
        if self.steps < 1 or self.buffer_size < 1:
            raise ConfigError(f"model options ebim_steps and ebim_buffer_size must be at least 1, got "
                              f"{self.steps} and {self.buffer_size}")
        if not self.step_size > 0 or not self.alpha >= 0 or not self.beta >= 0:
            raise ConfigError(f"model options ebim_step_size must be > 0, ebim_alpha and ebim_beta >= 0; got "
                              f"{self.step_size}, {self.alpha}, {self.beta}")
        if not 0.0 <= self.buffer_frac <= 1.0:
            raise ConfigError(f"model option ebim_buffer_frac must lie in [0, 1], got {self.buffer_frac}")


class LatentEBIM(nn.Module):
    """E(z | c) on standardised codes z (n, features) given conditions c (n, context)."""

    def __init__(self, features: int, context: int, settings: LatentEBIMSettings) -> None:
        super().__init__()
        self.features, self.settings = features, settings
        self.energy = ConditionalEnergy(features, context, settings.hidden)
        # Persistent negative chains (saved with the run, so resuming continues them).
        self.register_buffer("replay", torch.randn(settings.buffer_size, features))

    @property
    def noise_size(self) -> int:
        """Langevin normals per sample: steps x features."""
        return self.settings.steps * self.features

    def sample_from_noise(self, condition: Tensor, start: Tensor, noise: Tensor) -> Tensor:
        """Codes (n, features) from the start (n, features) and the Langevin noise (n, noise_size)."""
        s = self.settings
        return langevin_from_noise(lambda z: self.energy.gradient(z, condition), start, noise, s.step_size,
                                   s.alpha or None)

    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        """Contrastive divergence in training mode, the validation MMD in eval mode (module docstring)."""
        codes, condition = batch
        return self._contrastive_loss(codes, condition) if self.training else self._validation_mmd(codes, condition)

    def _contrastive_loss(self, codes: Tensor, condition: Tensor) -> Tensor:
        n = len(codes)
        with torch.no_grad():
            slots, start = draw_starts(self.replay, n, self.settings.buffer_frac,
                                       lambda k: torch.randn(k, self.features, device=codes.device))
            noise = torch.randn(n, self.noise_size, device=codes.device, dtype=codes.dtype)
            negative = self.sample_from_noise(condition, start.to(codes.dtype), noise)
            negative = torch.where(torch.isfinite(negative), negative, start)
            self.replay[slots] = negative.to(self.replay.dtype)
        return contrastive_divergence(self.energy(codes, condition), self.energy(negative, condition),
                                      self.settings.beta)

    def _validation_mmd(self, codes: Tensor, condition: Tensor) -> Tensor:
        generator = torch.Generator(device=codes.device).manual_seed(_VALIDATION_SEED)
        start = torch.randn(codes.shape, generator=generator, device=codes.device, dtype=codes.dtype)
        noise = torch.randn(len(codes), self.noise_size, generator=generator, device=codes.device,
                            dtype=codes.dtype)
        generated = self.sample_from_noise(condition, start, noise)
        return mmd_imq(torch.cat((codes, condition), -1), torch.cat((generated, condition), -1))
