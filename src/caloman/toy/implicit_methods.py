"""Methods for the manifold toys: EBIM and a two-step pushforward baseline.

- ``ebim``: the energy-based implicit manifold (Ross et al. 2023): F trained on
  the data (:func:`caloman.implicit.train_manifold`), a constrained energy on
  {F = 0} by contrastive divergence, samples from constrained Langevin chains
  started at uniform points on the learned zero set (tube method) resampled by
  exp(-E), confined to F's training box.
- ``pushforward``: an autoencoder with an m-dimensional code (the project's
  :class:`~caloman.models.autoencoders.PlainAutoencoder`) and a zuko spline flow
  on the standardised codes; samples decode flow samples. One chart: it cannot
  represent a circle (or two) without a seam or a bridge, which is EBIM's point.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import zuko
from torch import Tensor, nn

from caloman.errors import ConfigError
from caloman.implicit import (
    constrained_langevin,
    estimate_volume,
    normalised_density,
    resample_uniform,
    train_energy,
    train_manifold,
)
from caloman.models.autoencoders import PlainAutoencoder
from caloman.toy.methods import MethodOutput, ToySettings, register_method, timed


def _manifold_dimension(train: np.ndarray, settings: ToySettings) -> int:
    m = settings.manifold_dimension
    if m is None or not 0 < m < train.shape[1]:
        raise ConfigError(f"the {train.shape[1]}-D dataset has no manifold dimension below it (got {m}); "
                          "ebim and pushforward need a manifold toy (von-mises-mixture, two-circles, torus, "
                          "sphere-mixture)")
    return m


@register_method("ebim")
def ebim_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    cfg = settings.ebim
    m = _manifold_dimension(train, settings)
    codimension = train.shape[1] - m
    info: dict[str, object] = {"codimension": codimension}
    data = torch.as_tensor(train, dtype=torch.float32)
    start = time.perf_counter()
    F = train_manifold(data, dataclasses.replace(cfg.manifold, codimension=codimension), g)
    start = timed(info, "manifold", start)
    with torch.no_grad():
        data_norm = torch.linalg.vector_norm(F(data), dim=-1)
    info["manifold"] = {"final": F.history[-1] if F.history else None,
                        "data_norm_median": float(data_norm.median())}
    volume = estimate_volume(F, F.low, F.high, codimension=codimension, points=cfg.volume_points,
                             delta=cfg.volume_delta, sampler=cfg.sampler, generator=g)
    on = volume.uniform_points
    on = on[(torch.linalg.vector_norm(F(on), dim=-1) < cfg.sampler.tolerance * 10) & F.inside(on)]
    if len(on) < 10:
        raise ConfigError("the learned zero set is (nearly) empty in the data's box: F did not train; "
                          "raise the manifold epochs or lower neg_weight")
    volume.uniform_points = on
    start = timed(info, "volume", start)
    info["volume"] = {"estimate": volume.volume, "standard_error": volume.standard_error,
                      "uniform_points": len(on), "delta": volume.delta, "box_points": volume.box_points}
    box = (F.low, F.high) if cfg.confine else None
    energy = train_energy(F, data, on, cfg.energy, g, box)
    start = timed(info, "energy", start)
    info["energy_final"] = energy.history[-1] if energy.history else None
    if cfg.chain_start == "resample":
        initial = resample_uniform(energy, volume, settings.n_eval, g)
    else:
        initial = on[torch.randint(len(on), (settings.n_eval,), generator=g)]
    chains = constrained_langevin(F, initial, energy, cfg.sampler, g, box)
    timed(info, "sample", start)
    density = normalised_density(energy, data, volume)
    info["samples"] = {"mean_residual_norm": chains.mean_residual, "rejected_fraction": chains.rejected_fraction,
                       "chain_start": cfg.chain_start, "confined_to_box": cfg.confine}
    info["density_on_training_data"] = {"mean_log": float(density.log().mean())}
    return MethodOutput(chains.samples.numpy(), None, info, zero_set=on.numpy())


def _fit(loss: Callable[[Tensor], Tensor], parameters: Iterable[nn.Parameter], data: Tensor, epochs: int,
         batch_size: int, lr: float, g: torch.Generator) -> float:
    """Adam on mini-batches of data for ``epochs``; returns the last epoch's mean loss."""
    optimiser = torch.optim.Adam(list(parameters), lr=lr)
    total = math.nan
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=g)
        total = 0.0
        for i in range(0, len(data), batch_size):
            batch = data[order[i:i + batch_size]]
            value = loss(batch)
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
            total += float(value.detach()) * len(batch)
        total /= len(data)
    return total


@register_method("pushforward")
def pushforward_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    cfg = settings.pushforward
    m = _manifold_dimension(train, settings)
    info: dict[str, object] = {"latent_dimension": m}
    data = torch.as_tensor(train, dtype=torch.float32)
    start = time.perf_counter()
    autoencoder = PlainAutoencoder(data.shape[1], m, cfg.hidden)
    info["autoencoder_final_mse"] = _fit(autoencoder.loss, autoencoder.parameters(), data, cfg.autoencoder_epochs,
                                         cfg.batch_size, cfg.lr, g)
    start = timed(info, "autoencoder", start)
    with torch.no_grad():
        codes = autoencoder.encode(data)
    centre, scale = codes.mean(0), codes.std(0).clamp_min(1e-6)
    flow = zuko.flows.NSF(m, transforms=cfg.flow_transforms, hidden_features=cfg.flow_hidden)
    info["flow_final_nll"] = _fit(lambda z: -flow().log_prob(z).mean(), flow.parameters(), (codes - centre) / scale,
                                  cfg.flow_epochs, cfg.batch_size, cfg.lr, g)
    start = timed(info, "flow", start)
    with torch.no_grad():
        z = flow().sample((settings.n_eval,)) * scale + centre
        x = autoencoder.decode(z)
        lines = [torch.linspace(float(lo) - 0.1, float(hi) + 0.1, 400 if m == 1 else 50)
                 for lo, hi in zip(codes.min(0).values, codes.max(0).values)]
        grid = lines[0].unsqueeze(-1) if m == 1 else torch.cartesian_prod(*lines)
        zero_set = autoencoder.decode(grid)  # the decoder's image: the learned manifold
    timed(info, "sample", start)
    return MethodOutput(x.numpy(), None, info, zero_set=zero_set.numpy())
