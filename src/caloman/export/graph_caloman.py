"""CaloMan's sampling map as recorded in the exported graph, in fewer operators.

:class:`CaloManGraph` computes :meth:`CaloManModel.sample_from_noise
<caloman.models.caloman.CaloManModel.sample_from_noise>` for the per-layer CaloMan with
MLP flow hypernetworks (every default and full-profile run) with the two flows as
:class:`~caloman.export.graph_flow.GraphCouplingFlow` on states that carry their
condition along:

* layer-energy flow: state [layer-energy noise (L), scaled E_inc];
* latent flow: state [latent noise (d), encoded layer energies (L), scaled E_inc], whose
  condition [scaled E_inc, encoded / 14] is folded into the hypernetworks' first layers
  (the encoded layer energies in the condition's chain: re-encoded where
  ``condition_order`` differs from the flow's);
* the decoder's first layer reads the latent flow's output state: the code standardisation
  (codes * std + mean) and the condition are folded into its weights;
* the rest (layer-energy decoding, per-layer scaling, voxel noise, readout) is the model's
  own ``_to_showers``, unchanged.

The same maths in another order of float32 rounding; the export's self-check and the tests
compare it with the PyTorch sampler. Other models (and CaloMan variants it does not cover:
:func:`graph_sampler` decides) are traced through ``sample_from_noise`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from caloman.export.graph_flow import GraphCouplingFlow, _is_linear, supports
from caloman.models.autoencoders import Autoencoder
from caloman.models.base import ShowerModel
from caloman.models.layer_energy import LOGIT_BOUND


class TracedSampler(nn.Module):
    """Any model's ``sample_from_noise`` as a module: (E_inc (n,) MeV, normal, uniform) -> showers."""

    fused = False

    def __init__(self, model: ShowerModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, incident: Tensor, normal: Tensor, uniform: Tensor | None) -> Tensor:
        return self.model.sample_from_noise(incident, normal, uniform)


def _plain_decoder(autoencoder: nn.Module) -> bool:
    """Whether decode(z, c) is output(decoder(cat(z, c))) with a linear first decoder layer."""
    kind, decoder = type(autoencoder), getattr(autoencoder, "decoder", None)
    return (isinstance(autoencoder, Autoencoder) and isinstance(decoder, nn.Sequential) and _is_linear(decoder[0])
            and all(getattr(kind, name) is getattr(Autoencoder, name)
                    for name in ("decode", "decode_logits", "_with_context")))


def fusable(model: ShowerModel) -> bool:
    """Whether :class:`CaloManGraph` covers ``model``: a per-layer CaloMan whose flows are
    coupling flows with MLP hypernetworks and whose decoder is a plain MLP (not one with an
    EBIM latent density, which has no latent flow: traced)."""
    return (getattr(model, "kind", None) == "caloman" and type(model).__name__ == "CaloManModel"
            and getattr(model, "per_layer", False) and getattr(model, "latent_flow", None) is not None
            and supports(model.layer_energy.flow) and supports(model.latent_flow)
            and _plain_decoder(model.autoencoder))


class CaloManGraph(nn.Module):
    """(E_inc (n,) MeV, normal (n, N), uniform (n, U) or None) -> showers (n, V) MeV, for a
    model :func:`fusable` accepts; see the module docstring."""

    fused = True

    def __init__(self, model: ShowerModel) -> None:
        super().__init__()
        if not fusable(model):
            raise ValueError("CaloManGraph covers the per-layer CaloMan with MLP flow hypernetworks")
        self.model = model
        layers, latent = model.n_layers, model.config.latent_dim
        self.columns = model.noise_shape().offsets()
        # Latent state's condition columns [encoded (L), scaled] -> condition [scaled, encoded / 14].
        to_condition = torch.zeros(layers + 1, layers + 1, dtype=torch.float64)
        to_condition[layers, 0] = 1.0
        to_condition[torch.arange(layers), 1 + torch.arange(layers)] = 1.0 / LOGIT_BOUND
        self.layer_flow = GraphCouplingFlow(model.layer_energy.flow)
        self.latent_flow = GraphCouplingFlow(model.latent_flow, to_condition)
        first = model.autoencoder.decoder[0]
        weight, bias = first.weight.detach().double(), first.bias.detach().double()
        std, mean = model.latent_std.double(), model.latent_mean.double()
        folded = torch.zeros(weight.shape[0], latent + layers + 1, dtype=torch.float64)
        folded[:, :latent] = weight[:, :latent] * std
        if model.config.conditional_autoencoder:
            folded[:, latent:] = weight[:, latent:] @ to_condition.t()
        self.decoder_input = nn.Linear(folded.shape[1], folded.shape[0], dtype=first.weight.dtype)
        self.decoder_input.weight.data.copy_(folded)
        self.decoder_input.bias.data.copy_(bias + weight[:, :latent] @ mean)
        self.decoder_input.requires_grad_(False)
        self.n_layers = layers

    def forward(self, incident_energies: Tensor, normal: Tensor, uniform: Tensor | None) -> Tensor:
        model, columns = self.model, self.columns
        incident = incident_energies.reshape(-1).to(model.latent_mean.dtype)
        normal = normal.to(incident.dtype)
        pipeline = model._pipeline()
        scaled = pipeline.incident.forward(incident).reshape(-1, 1).to(incident.dtype)
        layer_state = self.layer_flow(torch.cat((normal[:, columns["layer_energies"]], scaled), dim=-1))
        encoded = layer_state[:, :self.n_layers]
        if model.reencodes_condition:  # the condition holds the layer energies in another chain
            layer_state = torch.cat((model.condition_energies(incident, encoded, pipeline), scaled), dim=-1)
        latent_state = self.latent_flow(torch.cat((normal[:, columns["latent"]], layer_state), dim=-1))
        decoded = model.autoencoder.output(model.autoencoder.decoder[1:](self.decoder_input(latent_state)))
        voxel_noise = None
        if "voxels" in columns:
            voxel_noise = (normal[:, columns["voxels"]], uniform)
            if "spot_energies" in columns:
                voxel_noise += (normal[:, columns["spot_energies"]],)
        return model._to_showers(pipeline, incident, decoded, encoded, voxel_noise=voxel_noise)


def graph_sampler(model: ShowerModel, fused: bool = True) -> nn.Module:
    """The module the export traces for ``model``: :class:`CaloManGraph` where it applies and
    ``fused``, else :class:`TracedSampler`."""
    return CaloManGraph(model) if fused and fusable(model) else TracedSampler(model)


__all__ = ["CaloManGraph", "TracedSampler", "fusable", "graph_sampler"]
