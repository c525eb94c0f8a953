"""Generalised autoencoders: the first step of CaloMan, which learns the
shower manifold (Loaiza-Ganem et al. 2022; CaloMan paper section 3.3).

An encoder phi maps features x (n, D) to codes z (n, d) and a decoder psi maps
codes back; all members share one MLP builder (the paper: 3 hidden layers of
512, ReLU). The family:

``"ae"``   plain autoencoder, reconstruction loss only;
``"vae"``  variational autoencoder (Kingma & Welling 2014): Gaussian encoder,
           loss = reconstruction + ``kl_weight`` x KL(q(z|x) || N(0, I));
           the code of a shower is the posterior mean;
``"wae"``  Wasserstein autoencoder (Tolstikhin et al. 2018): deterministic
           encoder, loss = reconstruction + ``mmd_weight`` x MMD between the
           batch's codes and N(0, I) samples with inverse multiquadric kernels.

Reconstruction losses, summed over a shower's features and averaged over the
batch: ``"mse"`` (squared error) and ``"cross-entropy"`` (for per-layer
shapes: the KL divergence from each target layer distribution to the decoded
one, summed over layers; zero at perfect reconstruction).

Decoder output activations match the preprocessing: ``"layer-softmax"`` (a
softmax over each layer's voxels, so decoded layer shapes are non-negative
and sum to one by construction, at the cost of one softmax), ``"sigmoid"``
(features in [0, 1], the paper's scaling) or ``"identity"``.

Optionally (``context > 0``) encoder and decoder also see a condition
(a conditional autoencoder); the paper conditions only the density model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from caloman.networks import mlp

#: Autoencoder kinds, see :func:`build_autoencoder`.
AUTOENCODER_KINDS = ("vae", "ae", "wae")
RECONSTRUCTION_LOSSES = ("mse", "cross-entropy")
OUTPUT_ACTIVATIONS = ("identity", "sigmoid", "layer-softmax")

#: Bounds on a VAE encoder's log-variance, for numerical safety early in training.
_LOG_VAR_RANGE = (-16.0, 6.0)
#: Scales of the WAE's inverse multiquadric kernels, in units of 2 d (Tolstikhin et al. 2018, section 4).
_IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class LayerSoftmax(nn.Module):
    """Softmax over each layer's block of voxels: logits (n, V) -> shapes (n, V)
    whose layers each sum to one. ``sizes`` are the layers' voxel counts, in order.
    Equal-sized layers (datasets 2 and 3) reshape into one softmax; others take one
    softmax per layer. (A loop-free version with segment reductions over a voxel ->
    layer index was 4 to 7 times slower on dataset 1, batches of 1 to 10,000, with and
    without gradients, 2026-12-07.)"""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)
        self.equal = len(set(self.sizes)) == 1

    def forward(self, logits: Tensor) -> Tensor:
        if self.equal:
            return logits.unflatten(-1, (len(self.sizes), self.sizes[0])).softmax(-1).flatten(-2)
        return torch.cat([part.softmax(-1) for part in logits.split(self.sizes, dim=-1)], dim=-1)

    def log(self, logits: Tensor) -> Tensor:
        """log of :meth:`forward`, computed stably."""
        if self.equal:
            return logits.unflatten(-1, (len(self.sizes), self.sizes[0])).log_softmax(-1).flatten(-2)
        return torch.cat([part.log_softmax(-1) for part in logits.split(self.sizes, dim=-1)], dim=-1)


def output_activation(name: str, layer_sizes: Sequence[int] | None = None) -> nn.Module:
    if name == "identity":
        return nn.Identity()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "layer-softmax":
        if not layer_sizes:
            raise ValueError("the layer-softmax output needs the layers' voxel counts")
        return LayerSoftmax(layer_sizes)
    raise ValueError(f"unknown output activation {name!r}; choose one of {OUTPUT_ACTIVATIONS}")


class Autoencoder(nn.Module):
    """Encoder and decoder MLPs over features (n, D) with latent dimension d.

    Arguments:
        features: D.
        latent_dim: d.
        hidden: encoder hidden sizes; the decoder uses them reversed.
        context: size of an optional condition seen by encoder and decoder (0: none).
        output: decoder output activation, one of ``OUTPUT_ACTIVATIONS``.
        layer_sizes: voxel counts of the layers (for ``"layer-softmax"``).
        loss: reconstruction loss, one of ``RECONSTRUCTION_LOSSES``
            (``"cross-entropy"`` needs the ``"layer-softmax"`` output).
    """

    kind: ClassVar[str] = "ae"

    def __init__(self, features: int, latent_dim: int, hidden: Sequence[int] = (512, 512, 512), *,
                 context: int = 0, output: str = "identity", layer_sizes: Sequence[int] | None = None,
                 loss: str = "mse") -> None:
        super().__init__()
        if loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"unknown reconstruction loss {loss!r}; choose one of {RECONSTRUCTION_LOSSES}")
        if loss == "cross-entropy" and output != "layer-softmax":
            raise ValueError("the cross-entropy reconstruction loss needs the layer-softmax output")
        self.features = features
        self.latent_dim = latent_dim
        self.context = context
        self.loss_name = loss
        self._build_networks(tuple(hidden))
        self.output = output_activation(output, layer_sizes)

    def _build_networks(self, hidden: tuple[int, ...]) -> None:
        """The encoder and decoder MLPs (a subclass with other networks overrides this)."""
        self.encoder = mlp(self.features + self.context, self._encoder_outputs(self.latent_dim), hidden)
        self.decoder = mlp(self.latent_dim + self.context, self.features, tuple(reversed(hidden)))

    def fit_inputs(self, inputs: Tensor) -> None:
        """Fit constants of the networks on the training split's encoder inputs (n, D), before
        the first epoch (called on every ``make_data`` call; the first is the training split).
        Nothing to fit for the MLP autoencoders."""

    def fit_inputs_chunks(self, chunks: Callable[[], Iterator[Tensor]]) -> None:
        """:meth:`fit_inputs` for streamed training: ``chunks()`` yields the training split's
        encoder inputs (n, D) chunk by chunk. Nothing to fit for the MLP autoencoders."""

    @staticmethod
    def _encoder_outputs(latent_dim: int) -> int:
        return latent_dim

    def _with_context(self, x: Tensor, context: Tensor | None) -> Tensor:
        if self.context == 0:
            return x
        if context is None:
            raise ValueError("this autoencoder is conditional: pass the context")
        return torch.cat((x, context), dim=-1)

    def encode(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Codes (n, d) of features x (n, D); a VAE returns its posterior mean."""
        return self.encoder(self._with_context(x, context))[..., :self.latent_dim]

    def decode_logits(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Decoder output before the output activation, (n, D)."""
        return self.decoder(self._with_context(z, context))

    def decode(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Reconstructed features (n, D) of codes z (n, d)."""
        return self.output(self.decode_logits(z, context))

    def reconstruction_loss(self, x: Tensor, logits: Tensor) -> Tensor:
        """Per-shower reconstruction loss (n,) of targets x against decoder logits."""
        if self.loss_name == "cross-entropy":
            # KL(target layer shape || decoded one), summed over layers (each target layer sums to 1 or 0).
            return (torch.special.xlogy(x, x) - x * self.output.log(logits)).sum(-1)
        return (self.output(logits) - x).square().sum(-1)

    def regulariser(self, z: Tensor) -> Tensor:
        """The family's term on the batch's codes (n, d); zero for a plain autoencoder."""
        return z.new_zeros(())

    def loss(self, x: Tensor, context: Tensor | None = None, inputs: Tensor | None = None,
             weights: Tensor | None = None) -> Tensor:
        """Mean training loss of a batch of target features x (n, D); ``inputs`` is what
        the encoder sees when it differs from the target (a transformed x); ``weights`` (n,)
        multiply each shower's reconstruction loss (the regulariser is not weighted)."""
        z = self.encode(x if inputs is None else inputs, context)
        return _weighted(self.reconstruction_loss(x, self.decode_logits(z, context)), weights).mean() \
            + self.regulariser(z)


def _weighted(losses: Tensor, weights: Tensor | None) -> Tensor:
    return losses if weights is None else losses * weights


class PlainAutoencoder(Autoencoder):
    """Deterministic autoencoder trained on reconstruction only."""

    kind = "ae"


class VariationalAutoencoder(Autoencoder):
    """Gaussian-encoder VAE; ``kl_weight`` scales the KL term against the
    summed reconstruction loss (a beta-VAE with beta = kl_weight)."""

    kind = "vae"

    def __init__(self, *args, kl_weight: float = 1e-3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kl_weight = kl_weight

    @staticmethod
    def _encoder_outputs(latent_dim: int) -> int:
        return 2 * latent_dim

    def posterior(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and log-variance (n, d) each of q(z | x)."""
        mean, log_var = self.encoder(self._with_context(x, context)).chunk(2, dim=-1)
        return mean, log_var.clamp(*_LOG_VAR_RANGE)

    def loss(self, x: Tensor, context: Tensor | None = None, inputs: Tensor | None = None,
             weights: Tensor | None = None) -> Tensor:
        mean, log_var = self.posterior(x if inputs is None else inputs, context)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum(-1)
        reconstruction = _weighted(self.reconstruction_loss(x, self.decode_logits(z, context)), weights)
        return (reconstruction + self.kl_weight * kl).mean()


class WassersteinAutoencoder(Autoencoder):
    """WAE-MMD: codes pushed towards N(0, I) by an MMD penalty with a sum of
    inverse multiquadric kernels k(a, b) = C / (C + |a - b|^2)."""

    kind = "wae"

    def __init__(self, *args, mmd_weight: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mmd_weight = mmd_weight

    def regulariser(self, z: Tensor) -> Tensor:
        return self.mmd_weight * mmd_imq(z, torch.randn_like(z))


def mmd_imq(a: Tensor, b: Tensor) -> Tensor:
    """Unbiased squared MMD between samples a (n, d) and b (m, d) with inverse
    multiquadric kernels at the scales C = 2 d s, s in ``_IMQ_SCALES`` (the
    prior N(0, I) has variance 1)."""
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    if n < 2 or m < 2:
        return a.new_zeros(())
    dist_aa, dist_bb, dist_ab = torch.cdist(a, a).square(), torch.cdist(b, b).square(), torch.cdist(a, b).square()
    total = a.new_zeros(())
    off_a = 1 - torch.eye(n, dtype=a.dtype, device=a.device)
    off_b = 1 - torch.eye(m, dtype=a.dtype, device=a.device)
    for s in _IMQ_SCALES:
        c = 2.0 * d * s
        k_aa = (c / (c + dist_aa) * off_a).sum() / (n * (n - 1))
        k_bb = (c / (c + dist_bb) * off_b).sum() / (m * (m - 1))
        k_ab = (c / (c + dist_ab)).mean()
        total = total + k_aa + k_bb - 2 * k_ab
    return total


_AUTOENCODERS: dict[str, type[Autoencoder]] = {
    "ae": PlainAutoencoder, "vae": VariationalAutoencoder, "wae": WassersteinAutoencoder}


def build_autoencoder(kind: str, features: int, latent_dim: int, hidden: Sequence[int] = (512, 512, 512), *,
                      context: int = 0, output: str = "identity", layer_sizes: Sequence[int] | None = None,
                      loss: str = "mse", kl_weight: float = 1e-3, mmd_weight: float = 1.0) -> Autoencoder:
    """An autoencoder of the given kind (``"vae"``, ``"ae"`` or ``"wae"``); see :class:`Autoencoder`."""
    if kind not in _AUTOENCODERS:
        raise ValueError(f"unknown autoencoder {kind!r}; choose one of {AUTOENCODER_KINDS}")
    extra = {"vae": {"kl_weight": kl_weight}, "wae": {"mmd_weight": mmd_weight}}.get(kind, {})
    return _AUTOENCODERS[kind](features, latent_dim, hidden, context=context, output=output,
                               layer_sizes=layer_sizes, loss=loss, **extra)
