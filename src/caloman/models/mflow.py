"""M-flows: a generalised autoencoder built from one invertible flow (Brehmer & Cranmer
2020, "Flows for simultaneous manifold learning and density estimation",
arXiv:2003.13913).

An outer flow f: R^D -> R^D (zuko's spline MAF) maps padded latents to data; the
learned manifold is the image of the d-dimensional slice {v = 0}:

    decoder  g(u) = f(u, 0)                    u (n, d) -> x (n, D)
    encoder  u = first d coordinates of f^-1(x)  (``"mflow"``), or a separate MLP (``"mflow-e"``)
    density  log p_M(x) = log p_u(u | c) - 0.5 log det(J^T J),   J = dg/du (D x d)

with p_u an inner flow on u, conditioned on c (the incident energy, or nothing). For
the M-flow the encoder is the flow's own inverse, so ``encode(decode(u)) == u``
exactly and ``project = decode o encode`` is idempotent. The Me-flow's encoder is
free (the paper's "M_e-flow"): consistency holds only as far as training reached.

Training (:func:`train_mflow`) follows the paper's schedules, as typed configuration
(:class:`MFlowSchedule`): ``"sequential"`` trains the manifold (f, and the encoder of
an Me-flow) on the reconstruction error, then the inner flow h on the codes with f
frozen; ``"alternating"`` alternates a manifold epoch and a density epoch.

The Jacobian is evaluated with forward-mode autodiff (``torch.func.jacfwd``): d
columns for D rows, cheap for a low-dimensional manifold.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import zuko
from torch import Tensor, nn

from caloman.errors import ConfigError, TrainingDivergedError
from caloman.models.autoencoders import Autoencoder, mlp
from caloman.models.flows import ConditionalFlow

#: Generalised autoencoders of this module: the M-flow and the M-flow with a separate encoder.
MFLOW_KINDS = ("mflow", "mflow-e")
#: Training schedules of :func:`train_mflow`.
SCHEDULES = ("sequential", "alternating")
#: Learning-rate schedules of :class:`MFlowSchedule` (per phase).
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class MFlowConfig:
    """Architecture of an :class:`MFlow`.

    kind: ``"mflow"`` (encoder = f^-1 then projection) or ``"mflow-e"`` (separate MLP encoder).
    outer_transforms, outer_hidden, outer_bins: the outer spline flow f on D features.
    inner_transforms, inner_hidden, inner_bins: the inner flow h on the d latents.
    encoder_hidden: hidden sizes of the Me-flow's encoder.
    The splines act on zuko's [-5, 5] (identity outside): features should lie well inside.
    """

    kind: str = "mflow"
    outer_transforms: int = 6
    outer_hidden: tuple[int, ...] = (64, 64)
    outer_bins: int = 8
    inner_transforms: int = 4
    inner_hidden: tuple[int, ...] = (32, 32)
    inner_bins: int = 8
    encoder_hidden: tuple[int, ...] = (64, 64)

    def __post_init__(self) -> None:
        if self.kind not in MFLOW_KINDS:
            raise ConfigError(f"M-flow kind {self.kind!r} is not one of {', '.join(MFLOW_KINDS)}")
        for name in ("outer_transforms", "inner_transforms"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"M-flow option {name} must be at least 1, got {getattr(self, name)}")
        for name in ("outer_bins", "inner_bins"):
            if int(getattr(self, name)) < 2:
                raise ConfigError(f"M-flow option {name} must be at least 2, got {getattr(self, name)}")


@dataclass(frozen=True)
class MFlowSchedule:
    """How :func:`train_mflow` trains an M-flow.

    schedule: ``"sequential"`` (``manifold_epochs`` on the reconstruction error, then
        ``density_epochs`` on the inner likelihood) or ``"alternating"`` (a manifold epoch
        and a density epoch in turn, ``max(manifold_epochs, density_epochs)`` rounds).
    reconstruction_weight: weight of the mean squared reconstruction error in the manifold
        phase (the reference implementation's 1000 for its ``sequential`` algorithm).
    manifold_likelihood_weight: weight of the inner likelihood added to the manifold phase
        (0: pure reconstruction, as the paper's M phase).
    lr_schedule: ``"constant"`` (``lr`` throughout) or ``"cosine"`` (each phase's rate falls
        from ``lr`` towards 0 along a half cosine over that phase's epochs, as CaloMan's stages do).
    """

    schedule: Literal["sequential", "alternating"] = "sequential"
    manifold_epochs: int = 20
    density_epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    reconstruction_weight: float = 1000.0
    manifold_likelihood_weight: float = 0.0
    clip_norm: float = 5.0
    lr_schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"M-flow schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"M-flow lr_schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.manifold_epochs < 0 or self.density_epochs < 0 or self.batch_size < 1:
            raise ConfigError("M-flow schedule: epochs must be >= 0 and batch_size >= 1")
        if not (self.reconstruction_weight > 0 and self.manifold_likelihood_weight >= 0):
            raise ConfigError("M-flow schedule: reconstruction_weight must be > 0, manifold_likelihood_weight >= 0")


def gram_log_det(decode: Callable[[Tensor, Tensor | None], Tensor], u: Tensor, context: Tensor | None = None
                 ) -> Tensor:
    """0.5 log det(J^T J), shape (n,) float64, of a decoder x = decode(u, c) at latents u (n, d)
    (context (n, c) or None): the log volume change from the latent space to the decoded
    manifold's surface measure. ``decode`` maps batches (n, d) -> (n, D)."""

    def decode_one(z: Tensor, c: Tensor | None) -> Tensor:
        return decode(z[None], None if c is None else c[None])[0]

    if len(u):
        # One plain call first: lazy caches of the decoder (a flow's sampling plan) must not be
        # built from inside torch.func, whose tensors numpy cannot read.
        with torch.no_grad():
            decode(u[:1], None if context is None else context[:1])
    with warnings.catch_warnings():
        # torch's forward-mode AD loads decompositions through the deprecated torch.jit.script.
        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=DeprecationWarning)
        jacobian = torch.func.vmap(torch.func.jacfwd(decode_one), in_dims=(0, None if context is None else 0))(
            u, context)
    gram = jacobian.transpose(-1, -2).double() @ jacobian.double()
    return 0.5 * torch.linalg.slogdet(gram)[1]


class MFlow(nn.Module):
    """An M-flow (or Me-flow) on ``features`` = D dimensions with a ``latent_dim`` = d manifold.

    Arguments:
        features: D (>= 2).
        latent_dim: d (1 <= d < D).
        context: size of the inner flow's condition (0: unconditional).
        config: architecture, :class:`MFlowConfig`.
    """

    def __init__(self, features: int, latent_dim: int, context: int = 0, config: MFlowConfig = MFlowConfig()
                 ) -> None:
        super().__init__()
        if not 1 <= latent_dim < features:
            raise ConfigError(f"an M-flow needs 1 <= latent_dim < features, got latent_dim {latent_dim} "
                              f"for {features} features")
        self.features, self.latent_dim, self.context, self.config = features, latent_dim, context, config
        self.outer = zuko.flows.NSF(features, 0, transforms=config.outer_transforms,
                                    hidden_features=config.outer_hidden, bins=config.outer_bins)
        self.inner = zuko.flows.NSF(latent_dim, context, transforms=config.inner_transforms,
                                    hidden_features=config.inner_hidden, bins=config.inner_bins)
        self.encoder = mlp(features, latent_dim, config.encoder_hidden) if config.kind == "mflow-e" else None

    # -- the manifold ---------------------------------------------------------------------
    def decode(self, u: Tensor, context: Tensor | None = None) -> Tensor:
        """g(u) = f(u, 0): points (n, D) on the manifold for latents u (n, d). ``context`` is
        accepted for the decoder signature of :func:`gram_log_det` and ignored."""
        padded = torch.cat((u, u.new_zeros(*u.shape[:-1], self.features - self.latent_dim)), dim=-1)
        return self.outer().transform.inv(padded)

    def encode(self, x: Tensor) -> Tensor:
        """Latents u (n, d) of points x (n, D): the first d coordinates of f^-1(x) (M-flow)
        or the encoder network's output (Me-flow)."""
        if self.encoder is not None:
            return self.encoder(x)
        return self.outer().transform(x)[..., :self.latent_dim]

    def project(self, x: Tensor) -> Tensor:
        """The manifold point g(encode(x)) (n, D) of x (n, D)."""
        return self.decode(self.encode(x))

    def reconstruction_error(self, x: Tensor) -> Tensor:
        """Squared distance ||x - project(x)||^2 (n,) of x (n, D) from its projection."""
        return (x - self.project(x)).square().sum(-1)

    # -- the density on it ----------------------------------------------------------------
    def latent_log_prob(self, u: Tensor, context: Tensor | None = None) -> Tensor:
        """log p_u(u | c) (n,) of the inner flow, u (n, d), context (n, c) or None."""
        return self.inner(self._context(context, len(u))).log_prob(u)

    def log_prob_on_manifold(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """log p_M (n,) float64 of the projections of x (n, D): log p_u(u | c) - 0.5 log det(J^T J)
        at u = encode(x), a density w.r.t. the learned manifold's surface measure (nats per
        unit d-volume). The distance of x from the manifold is not included (see :meth:`ood_score`)."""
        u = self.encode(x)
        return self.latent_log_prob(u, context).double() - gram_log_det(self.decode, u)

    def ood_score(self, x: Tensor, context: Tensor | None = None, distance_scale: float = 1.0) -> Tensor:
        """Out-of-distribution score (n,), larger = more anomalous: the squared distance from the
        manifold in units of ``distance_scale``^2 minus the log density of the projection on it,
        ||x - g(u)||^2 / scale^2 - log p_M(g(u)) (the paper's two criteria, summed)."""
        return self.reconstruction_error(x).double() / distance_scale ** 2 - self.log_prob_on_manifold(x, context)

    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        """n points (n, D) on the manifold: g(u), u ~ p_u(u | c) (context (n, c) or None)."""
        context = self._context(context, n)
        u = self.inner(context).sample() if context is not None else self.inner().sample((n,))
        return self.decode(u)

    def _context(self, context: Tensor | None, n: int) -> Tensor | None:
        if self.context == 0:
            return None
        if context is None or context.shape != (n, self.context):
            raise ConfigError(f"this M-flow's inner flow is conditional: pass a context of shape ({n}, "
                              f"{self.context})")
        return context

    # -- the two phases' losses ---------------------------------------------------------------
    def manifold_parameters(self) -> list[nn.Parameter]:
        """What the manifold phase trains: the outer flow, and the encoder of an Me-flow."""
        params = list(self.outer.parameters())
        return params + (list(self.encoder.parameters()) if self.encoder is not None else [])

    def manifold_loss(self, x: Tensor, context: Tensor | None, schedule: MFlowSchedule) -> Tensor:
        """Mean loss of the manifold phase for a batch x (n, D): the weighted reconstruction
        error, plus (optionally) the weighted inner negative log-likelihood."""
        u = self.encode(x)
        loss = schedule.reconstruction_weight * (x - self.decode(u)).square().sum(-1).mean()
        if schedule.manifold_likelihood_weight > 0:
            loss = loss - schedule.manifold_likelihood_weight * self.latent_log_prob(u, context).mean()
        return loss

    def density_loss(self, x: Tensor, context: Tensor | None) -> Tensor:
        """Mean negative log-likelihood of the inner flow on the (fixed) codes of x (n, D)."""
        with torch.no_grad():
            u = self.encode(x)
        return -self.latent_log_prob(u, context).mean()


def train_mflow(model: MFlow, x: Tensor, schedule: MFlowSchedule, context: Tensor | None = None,
                generator: torch.Generator | None = None) -> list[dict[str, float]]:
    """Train ``model`` on points x (n, D) (context (n, c) or None) with the schedule's phases.

    Returns the history: one entry per epoch with its ``phase`` (``"manifold"`` or
    ``"density"``), ``epoch``, mean ``loss`` and learning rate ``lr``. Raises TrainingDivergedError on a
    non-finite loss.
    """
    manifold_opt = torch.optim.Adam(model.manifold_parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    density_opt = torch.optim.Adam(model.inner.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    phases = _phase_order(schedule)
    rates = {"manifold": phase_learning_rates(schedule, schedule.manifold_epochs),
             "density": phase_learning_rates(schedule, schedule.density_epochs)}
    done = {"manifold": 0, "density": 0}
    history = []
    for epoch, phase in enumerate(phases, start=1):
        optimiser, rate = (manifold_opt if phase == "manifold" else density_opt), rates[phase][done[phase]]
        for group in optimiser.param_groups:
            group["lr"] = rate
        done[phase] += 1
        if phase == "manifold":
            loss = _epoch(x, context, schedule, generator, manifold_opt, model.manifold_parameters(),
                          lambda xb, cb: model.manifold_loss(xb, cb, schedule))
        else:
            loss = _epoch(x, context, schedule, generator, density_opt, list(model.inner.parameters()),
                          model.density_loss)
        history.append({"epoch": epoch, "phase": phase, "loss": loss, "lr": rate})
    model.eval()
    return history


def phase_learning_rates(schedule: MFlowSchedule, epochs: int) -> list[float]:
    """The learning rate of each of a phase's ``epochs`` epochs."""
    if schedule.lr_schedule == "constant":
        return [schedule.lr] * epochs
    return [0.5 * schedule.lr * (1.0 + math.cos(math.pi * i / epochs)) for i in range(epochs)]


def _phase_order(schedule: MFlowSchedule) -> list[str]:
    if schedule.schedule == "sequential":
        return ["manifold"] * schedule.manifold_epochs + ["density"] * schedule.density_epochs
    rounds = max(schedule.manifold_epochs, schedule.density_epochs)
    order = []
    for i in range(rounds):
        order += ["manifold"] if i < schedule.manifold_epochs else []
        order += ["density"] if i < schedule.density_epochs else []
    return order


def _epoch(x: Tensor, context: Tensor | None, schedule: MFlowSchedule, generator: torch.Generator | None,
           optimiser: torch.optim.Optimizer, params: list[nn.Parameter],
           loss_fn: Callable[[Tensor, Tensor | None], Tensor]) -> float:
    """One pass over shuffled batches; returns the mean batch loss."""
    order = torch.randperm(len(x), generator=generator)
    total, batches = 0.0, 0
    for i in range(0, len(x), schedule.batch_size):
        index = order[i:i + schedule.batch_size]
        loss = loss_fn(x[index], None if context is None else context[index])
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"M-flow loss became {float(loss)}; lower the learning rate "
                                        f"(now {schedule.lr}) or the reconstruction weight")
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, schedule.clip_norm)
        optimiser.step()
        total += float(loss.detach())
        batches += 1
    return total / max(batches, 1)


class MFlowAutoencoder(Autoencoder):
    """CaloMan's generalised autoencoder as an M-flow (``kind="mflow"``) or Me-flow
    (``"mflow-e"``); CaloMan's latent flow is its inner flow.

    It works in the encoder's input space, log(shape + 1e-6) per voxel (n, D), reduced to
    K = ``flow_features`` whitened principal components (K = D: each voxel standardised,
    no rotation), fitted on the training showers (:meth:`fit_inputs`):

        a = ((s - centre) @ basis) / scale                      s (n, D) -> a (n, K)
        encoder   u = first d coordinates of f^-1(a; c)          (Me-flow: an MLP of [a, c])
        decoder   a = f(u, 0; c),  s = centre + (a * scale) @ basis^T,  logits = s

    f is a coupling spline flow (:class:`ConditionalFlow`, the latent flow's fused inverse,
    so decoding is as fast as sampling a flow), conditioned on c when the autoencoder is
    conditional. Decoded logits become shapes through the layer softmax, as for the other
    members. Because basis^T basis = I, ``encode(decode_logits(u)) == u`` exactly for the
    M-flow (float64: ~1e-13; float32: up to ~1e-4, the stored basis's rounding amplified by
    the whitening scales). The reconstruction loss (the configured one, times
    ``reconstruction_weight``: the manifold phase) trains f; the inner density is CaloMan's.
    """

    kind = "mflow"

    def __init__(self, features: int, latent_dim: int, *, context: int = 0, layer_sizes: list[int] | None = None,
                 loss: str = "cross-entropy", kind: str = "mflow", flow_features: int = 0, transforms: int = 4,
                 hidden: tuple[int, ...] = (64,), bins: int = 8,
                 encoder_hidden: tuple[int, ...] = (256, 256), reconstruction_weight: float = 1.0) -> None:
        if kind not in MFLOW_KINDS:
            raise ConfigError(f"M-flow kind {kind!r} is not one of {', '.join(MFLOW_KINDS)}")
        self.flow_features = int(flow_features) or features
        if not 1 <= latent_dim < self.flow_features <= features:
            raise ConfigError(f"an M-flow autoencoder needs latent_dim < flow features <= {features}, got "
                              f"latent_dim {latent_dim} and {self.flow_features} flow features")
        self.kind = kind
        self._flow_sizes = (int(transforms), tuple(hidden), int(bins))
        self.reconstruction_weight = float(reconstruction_weight)
        super().__init__(features, latent_dim, encoder_hidden, context=context, output="layer-softmax",
                         layer_sizes=layer_sizes, loss=loss)
        self.register_buffer("centre", torch.zeros(features))
        self.register_buffer("basis", torch.eye(features, self.flow_features))
        self.register_buffer("scale", torch.ones(self.flow_features))
        self.register_buffer("inputs_fitted", torch.tensor(False))

    def _build_networks(self, hidden: tuple[int, ...]) -> None:
        transforms, flow_hidden, bins = self._flow_sizes
        self.outer = ConditionalFlow(self.flow_features, self.context, transforms, flow_hidden, bins)
        self.encoder = mlp(self.flow_features + self.context, self.latent_dim, hidden) if self.kind == "mflow-e" \
            else None

    def fit_inputs(self, inputs: Tensor) -> None:
        """Principal axes, centre and whitening scales of encoder inputs (n, D), once (the
        training split; later calls, and calls after loading a fitted model, change nothing)."""
        if bool(self.inputs_fitted):
            return
        x = inputs.double()
        centre = x.mean(0)
        if self.flow_features == self.features:
            basis = torch.eye(self.features, dtype=torch.float64, device=x.device)
        else:
            centred = x - centre
            eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / max(1, len(x) - 1))
            basis = vectors[:, eigenvalues.argsort(descending=True)[:self.flow_features]]
        scale = ((x - centre) @ basis).std(0).clamp_min(1e-3)
        self.centre.copy_(centre)
        self.basis.copy_(basis)
        self.scale.copy_(scale)
        self.inputs_fitted.fill_(True)

    def fit_inputs_chunks(self, chunks: Callable[[], Iterator[Tensor]]) -> None:
        """:meth:`fit_inputs` from sums over encoder inputs (n, D) chunk by chunk, in one pass:
        the centre, then the covariance (D x D; with all D features kept only its diagonal),
        whose leading eigenvectors are the basis and the square roots of whose eigenvalues
        are the scales. Equals the in-memory fit up to rounding."""
        if bool(self.inputs_fitted):
            return
        full = self.flow_features == self.features
        n, total, second = 0, 0.0, 0.0
        for x in chunks():
            x = x.double()
            n, total = n + len(x), total + x.sum(0)
            second = second + (x.square().sum(0) if full else x.T @ x)
        centre = total / n
        if full:
            basis = torch.eye(self.features, dtype=torch.float64, device=centre.device)
            variance = (second - n * centre.square()) / max(1, n - 1)
        else:
            covariance = (second - n * torch.outer(centre, centre)) / max(1, n - 1)
            eigenvalues, vectors = torch.linalg.eigh(covariance)
            order = eigenvalues.argsort(descending=True)[:self.flow_features]
            basis, variance = vectors[:, order], eigenvalues[order]
        self.centre.copy_(centre)
        self.basis.copy_(basis)
        self.scale.copy_(variance.clamp_min(0).sqrt().clamp_min(1e-3))
        self.inputs_fitted.fill_(True)

    def explained_variance(self, inputs: Tensor) -> float:
        """Share of the variance of encoder inputs (n, D) that the K components keep."""
        centred = inputs.double() - self.centre.double()
        kept = centred @ self.basis.double()
        return float(kept.square().sum() / centred.square().sum().clamp_min(1e-30))

    def _flow_context(self, context: Tensor | None, like: Tensor) -> Tensor:
        # No batch size as a Python number: a traced graph (ONNX export) keeps the batch dynamic.
        if self.context == 0:
            return like[:, :0]
        if context is None:
            raise ValueError("this autoencoder is conditional: pass the context")
        return context.to(like.dtype)

    def reduce(self, inputs: Tensor) -> Tensor:
        """Whitened components a (n, K) of encoder inputs (n, D)."""
        return ((inputs - self.centre) @ self.basis) / self.scale

    def encode(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Codes u (n, d) of encoder inputs x (n, D): the first d coordinates of f^-1(a; c)
        (M-flow) or the encoder MLP's output (Me-flow)."""
        a = self.reduce(x)
        c = self._flow_context(context, a)
        if self.encoder is not None:
            return self.encoder(torch.cat((a, c), dim=-1))
        return self.outer.transform(a, c)[..., :self.latent_dim]

    def decode_logits(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Decoded log-shapes (n, D) of codes z (n, d): the encoder-input space, g(z) = f(z, 0; c)
        mapped back from the components (the layer softmax of these is the decoded shape)."""
        c = self._flow_context(context, z)
        padded = torch.nn.functional.pad(z, (0, self.flow_features - self.latent_dim))
        a = self.outer.transform_inverse(padded, c)
        return self.centre + (a * self.scale) @ self.basis.T

    def loss(self, x: Tensor, context: Tensor | None = None, inputs: Tensor | None = None,
             weights: Tensor | None = None) -> Tensor:
        """The manifold phase: ``reconstruction_weight`` times the mean (weighted) reconstruction
        loss of target shapes x (n, D) from encoder inputs ``inputs``; no regulariser."""
        return self.reconstruction_weight * super().loss(x, context, inputs, weights)
