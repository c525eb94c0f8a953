"""Methods for the manifold toys (``circle``, ``sphere-gaussian``; arXiv:2003.13913):

- ``mflow``: an M-flow (:mod:`caloman.models.mflow`), encoder = the outer flow's inverse;
- ``mflow-e``: the Me-flow, with a separate encoder network;
- ``ambient-flow``: a plain spline flow in R^D, whose samples have no reason to lie on
  the manifold (its density is w.r.t. the volume of R^D, so it has no on-manifold
  log density to compare);
- ``two-step-vae``: a small VAE (decoder mean = the manifold) and a flow on its
  posterior-mean codes, with the on-manifold density log p(z) - 0.5 log det(J^T J).

Each returns samples and a ``log_density`` callable (points (n, D) -> log density (n,)
on the learned manifold at their projections), used by ``log_density_error``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import zuko

from caloman.models.autoencoders import build_autoencoder
from caloman.models.mflow import MFlow, MFlowConfig, gram_log_det, phase_learning_rates, train_mflow
from caloman.toy.methods import MethodOutput, ToySettings, register_method


def _points(train: np.ndarray, settings: ToySettings) -> torch.Tensor:
    limit = settings.manifold.train_points
    return torch.as_tensor(train[:limit] if limit else train, dtype=torch.float32)


def _latent_dim(train: np.ndarray) -> int:
    # Both manifold toys are unit spheres S^(D-1) in R^D.
    return train.shape[1] - 1


def _batched(fn, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    return np.concatenate([fn(torch.as_tensor(x[i:i + batch], dtype=torch.float32)).detach().numpy()
                           for i in range(0, len(x), batch)])


def _mflow(kind: str, train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    cfg = settings.manifold
    x = _points(train, settings)
    model = MFlow(x.shape[1], _latent_dim(train), 0, MFlowConfig(kind=kind, outer_hidden=cfg.hidden,
                                                                 outer_transforms=cfg.transforms))
    start = time.perf_counter()
    history = train_mflow(model, x, cfg.schedule, generator=g)
    trained = time.perf_counter()
    with torch.no_grad():
        samples = model.sample(settings.n_eval).numpy()
    info = {"history": history, "timings_s": {"train": round(trained - start, 3),
                                              "generate": round(time.perf_counter() - trained, 3)},
            "train_points": len(x), "final_reconstruction_mse": float(
                model.reconstruction_error(x[:5000]).mean().detach())}
    return MethodOutput(samples, None, info, log_density=lambda p: _batched(model.log_prob_on_manifold, p))


@register_method("mflow")
def mflow_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    return _mflow("mflow", train, settings, g)


@register_method("mflow-e")
def mflow_e_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    return _mflow("mflow-e", train, settings, g)


def _fit(parameters, loss_fn, x: torch.Tensor, epochs: int, settings: ToySettings, g: torch.Generator
         ) -> list[float]:
    """Adam on shuffled batches of x (n, D) for ``epochs`` at the M-flow schedule's learning rates
    (the same rate schedule as the M-flow's phases); mean loss per epoch."""
    cfg = settings.manifold.schedule
    optimiser = torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    for rate in phase_learning_rates(cfg, epochs):
        for group in optimiser.param_groups:
            group["lr"] = rate
        order, total, batches = torch.randperm(len(x), generator=g), 0.0, 0
        for i in range(0, len(x), cfg.batch_size):
            loss = loss_fn(x[order[i:i + cfg.batch_size]])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, batches = total + float(loss.detach()), batches + 1
        history.append(total / batches)
    return history


def _epochs(settings: ToySettings) -> int:
    schedule = settings.manifold.schedule
    return schedule.manifold_epochs + schedule.density_epochs


@register_method("ambient-flow")
def ambient_flow_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    cfg = settings.manifold
    x = _points(train, settings)
    flow = zuko.flows.NSF(x.shape[1], 0, transforms=cfg.transforms, hidden_features=cfg.hidden)
    start = time.perf_counter()
    history = _fit(flow.parameters(), lambda b: -flow().log_prob(b).mean(), x, _epochs(settings), settings, g)
    with torch.no_grad():
        samples = flow().sample((settings.n_eval,)).numpy()
    info = {"history": history, "train_points": len(x), "timings_s": {"train": round(time.perf_counter() - start, 3)},
            "log_density": "none: an ambient density in R^D has no on-manifold counterpart"}
    return MethodOutput(samples, None, info)


@register_method("two-step-vae")
def two_step_vae_method(train: np.ndarray, settings: ToySettings, g: torch.Generator) -> MethodOutput:
    cfg = settings.manifold
    x = _points(train, settings)
    d = _latent_dim(train)
    vae = build_autoencoder("vae", x.shape[1], d, cfg.hidden, kl_weight=cfg.vae_kl_weight)
    flow = zuko.flows.NSF(d, 0, transforms=cfg.transforms, hidden_features=cfg.hidden)
    start = time.perf_counter()
    epochs = cfg.schedule.manifold_epochs, cfg.schedule.density_epochs
    vae_history = _fit(vae.parameters(), vae.loss, x, epochs[0], settings, g)
    vae.eval()
    with torch.no_grad():
        codes = vae.encode(x)
    flow_history = _fit(flow.parameters(), lambda b: -flow().log_prob(b).mean(), codes, epochs[1], settings, g)
    with torch.no_grad():
        samples = vae.decode(flow().sample((settings.n_eval,))).numpy()

    def log_density(p: torch.Tensor) -> torch.Tensor:
        z = vae.encode(p)
        return flow().log_prob(z).double() - gram_log_det(lambda u, c: vae.decode(u), z)

    info = {"vae_history": vae_history, "flow_history": flow_history, "train_points": len(x),
            "timings_s": {"train": round(time.perf_counter() - start, 3)}}
    return MethodOutput(samples, None, info, log_density=lambda p: _batched(log_density, p))
