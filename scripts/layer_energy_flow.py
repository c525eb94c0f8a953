"""How much of a run's deepest-layer energy tell is its layer-energy flow's.

The layer energies alone, no autoencoder and no voxel noise: the run's trained flow and
flows retrained on the same training showers with other settings each sample one set of
layer energies for the held-out showers' incident energies, and every layer's energy is
compared with the held-out showers' by the CaloChallenge separation power (its E_layer
bins; a generated layer below the readout threshold counts as empty). Beside it, the
fraction of empty deepest layers: held-out layers with nothing above threshold, against
flow samples below half the threshold (training gives an empty layer an energy below
that, so this is the flow's own empty fraction; the full model's readout empties some
more layers, whose energy it cannot place above threshold in any voxel). The floor is
the separation of the two halves of the held-out file.

    python scripts/layer_energy_flow.py RUN --data TRAIN.h5 --reference TEST.h5 \
        [--variant NAME:transforms,hidden,bins,epochs[,back|front] ...] [--seed 0]

A variant may end in ``,back`` or ``,front``: the layer-energy encoding's chain order
(``CaloManConfig.layer_energy_order``; "back" starts at the deepest layer, so the first
layer takes what is left); without it, the run's own. ``,reversed`` is kept as a name for
``,back``: a test of whether the chain's order makes the deepest layers' error. ``,max``
(this script only, not a model option yet) chains layers 0..m-1, then the deepest layer
back to m+1, and the shower maximum m (the layer with the largest mean energy in the
held-out file) takes what is left.

The retrained flows use the run's preprocessing (its layer-energy encoding) and a plain
AdamW loop with the training module's cosine learning rate (no warm-up) and gradient
clipping, batches of 512, keeping the
epoch with the best loss on a seeded fifth of the training file; so a variant differs
from the run's stage in its split and schedule details as well as in the named settings.
Prints one line per flow: the largest separation over all layers and over the deepest
ten, the mean over the deepest ten, and the mean empty fraction of the deepest ten.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch

from caloman.io import ShowerFile
from caloman.metrics.separation import CHALLENGE_BINNINGS, binning_family, histogram_pair
from caloman.models.layer_energy import LayerEnergyModel
from caloman.preprocessing import LAYER_ENERGY_ORDERS, LayerEnergyEncoding, inverse_logit, logit
from caloman.runs import load_run
from caloman.training import TrainingConfig, learning_rate_at

DEFAULT_VARIANTS = ("longer:4,64x64,16,160", "wider:4,128x128,16,80", "deeper:8,64x64,16,80")
CHAIN_ORDERS = (*LAYER_ENERGY_ORDERS, "max")


class MaximumLastEncoding(LayerEnergyEncoding):
    """The chain over layers 0..m-1, then L-1 down to m+1; layer m (the shower maximum)
    takes what is left, so neither end of the shower inherits every fraction's error."""

    def __init__(self, u0_scale: float, n_layers: int, maximum: int) -> None:
        super().__init__(u0_scale)
        self.chain = torch.as_tensor(np.r_[np.arange(maximum), np.arange(n_layers - 1, maximum, -1), maximum])
        self.layer_of = torch.argsort(self.chain)

    def forward(self, incident_energies, layer_energies):
        return logit(self.to_fractions(incident_energies, layer_energies[..., self.chain]), self.alpha)

    def inverse(self, incident_energies, features):
        return self.from_fractions(incident_energies, inverse_logit(features, self.alpha))[..., self.layer_of]


def parse_variant(text: str) -> tuple[str, int, tuple[int, ...], int, int, str | None]:
    """NAME:transforms,HxH,bins,epochs[,order] -> its parts; order None: the run's."""
    name, spec = text.split(":")
    transforms, hidden, bins, epochs, *order = spec.split(",")
    chain = {"reversed": "back"}.get(order[0], order[0]) if order else None
    if chain is not None and chain not in CHAIN_ORDERS:
        raise SystemExit(f"variant {text!r}: order {order[0]!r} is not one of {', '.join(CHAIN_ORDERS)}")
    return name, int(transforms), tuple(int(h) for h in hidden.split("x")), int(bins), int(epochs), chain


def encoding_for(model, order: str | None, maximum: int) -> LayerEnergyEncoding:
    """The run's layer-energy encoding, with the chain in ``order`` (None: the run's; "max":
    ending at layer index ``maximum``)."""
    energies = model._pipeline().energies
    if order == "max":
        return MaximumLastEncoding(energies.u0_scale, model.n_layers, maximum)
    return energies.with_order(order or energies.order)


def reencode(model, features: torch.Tensor, condition: torch.Tensor, encoding: LayerEnergyEncoding) -> torch.Tensor:
    """The run's encoded layer energies (n, L) re-encoded by ``encoding`` (the same energies,
    dequantised empty layers included; the incident energy from the condition)."""
    pipeline = model._pipeline()
    incident = pipeline.incident.inverse(condition[:, 0].double())
    energies = pipeline.energies.inverse(incident, features.double())
    return encoding.forward(incident, energies).float()


def stage_tensors(model, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer-energy stage's training tensors (encoded energies, condition) of a whole file."""
    stage = next(s for s in model.stages() if s.name == "layer_energy")
    parts = []
    with ShowerFile(path, model.binning, check_values=False) as f, torch.no_grad():
        for e, x in f.iter_chunks(2048):
            parts.append(stage.make_data(torch.as_tensor(e, dtype=torch.float32), torch.as_tensor(x)))
    return tuple(torch.cat(column) for column in zip(*parts))


def held_out_layer_energies(model, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Incident energies (n,) and thresholded layer energies (n, L) of a file, MeV."""
    pipeline, energies, layers = model._pipeline(), [], []
    with ShowerFile(path, model.binning, check_values=False) as f:
        for e, x in f.iter_chunks(2048):
            x = np.where(x >= model.threshold, x, 0).astype(np.float64)
            layers.append(np.asarray(pipeline.layers.layer_energies(torch.as_tensor(x))))
            energies.append(e)
    return np.concatenate(energies), np.concatenate(layers)


def sampled_layer_energies(model, flow: LayerEnergyModel, incident: np.ndarray, seed: int,
                           encoding: LayerEnergyEncoding | None = None) -> np.ndarray:
    pipeline = model._pipeline()
    encoding = encoding or pipeline.energies
    e = torch.as_tensor(incident, dtype=torch.float64)
    scaled = pipeline.incident.forward(e).reshape(-1, 1).float()
    noise = torch.randn(len(e), flow.n_layers, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        encoded = flow.from_noise(noise, scaled)
    return np.asarray(encoding.inverse(e, encoded.double()))


def separations(model, reference: np.ndarray, generated: np.ndarray) -> np.ndarray:
    table = CHALLENGE_BINNINGS[binning_family(model.binning)]
    out = []
    for i, layer in enumerate(model.binning.relevant_layers):
        edges = table["E_layer"].for_layer(layer).edges(model.threshold, reference[:, i].max())
        out.append(histogram_pair(f"E_layer_{layer}", "", reference[:, i], generated[:, i], edges).separation_power)
    return np.asarray(out)


def retrain(features: torch.Tensor, condition: torch.Tensor, n_layers: int, transforms: int,
            hidden: tuple[int, ...], bins: int, epochs: int, seed: int) -> tuple[LayerEnergyModel, float, int]:
    torch.manual_seed(seed)
    # the product's cosine schedule (no warm-up), learning rate, batch size and gradient clipping
    config = TrainingConfig(epochs=epochs, batch_size=512, learning_rate=1e-3, lr_schedule="cosine",
                            warmup_epochs=0, seed=seed)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))
    n_val = len(features) // 5
    val, train = order[:n_val], order[n_val:]
    flow = LayerEnergyModel(n_layers, condition.shape[1], transforms, hidden, bins)
    optimizer = torch.optim.AdamW(flow.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    best, best_loss, best_epoch = None, math.inf, 0
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(config, "layer_energy", epoch, [])
        flow.train()
        for batch in train[torch.randperm(len(train))].split(config.batch_size):
            loss = flow.loss(features[batch], condition[batch])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), config.grad_clip_norm)
            optimizer.step()
        flow.eval()
        with torch.no_grad():
            val_loss = float(flow.loss(features[val], condition[val]))
        if val_loss < best_loss:
            best, best_loss, best_epoch = copy.deepcopy(flow.state_dict()), val_loss, epoch + 1
    flow.load_state_dict(best)
    return flow.eval(), best_loss, best_epoch


def report(name: str, model, reference: np.ndarray, generated: np.ndarray, empty: np.ndarray, extra: str = ""
           ) -> None:
    """One flow's line; ``generated`` layer energies (n, L) MeV, ``empty`` (n, L) which count as empty."""
    powers = separations(model, reference, np.where(empty | (generated < model.threshold), 0.0, generated))
    deep = powers[-10:]
    if len(powers) > 35:  # datasets 2 and 3 (45 layers)
        print(f"{name:>10}: mean over layer indices 0-24 / 25-34 / 35-: {powers[:25].mean():.4f} / "
              f"{powers[25:35].mean():.4f} / {powers[35:].mean():.4f}")
    print(f"{name:>10}: max {powers.max():.4f} (layer index {int(powers.argmax())}), deepest ten max "
          f"{deep.max():.4f} mean {deep.mean():.4f}, empty {empty[:, -10:].mean():.3f} (held out "
          f"{(reference[:, -10:] == 0).mean():.3f}){extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True, help="the run's training file")
    parser.add_argument("--reference", required=True, help="held-out showers")
    parser.add_argument("--variant", action="append", default=None,
                        help=f"NAME:transforms,HIDDENxHIDDEN,bins,epochs (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = load_run(args.run).model.eval()
    incident, reference = held_out_layer_energies(model, args.reference)
    maximum = int(reference.mean(axis=0).argmax())
    print(f"shower maximum (largest mean layer energy): layer index {maximum}", flush=True)
    half = len(incident) // 2
    report("floor", model, reference[:half], reference[half:2 * half], reference[half:2 * half] == 0,
           " (two held-out halves)")
    generated = sampled_layer_energies(model, model.layer_energy, incident, args.seed)
    report("run", model, reference, generated, generated < 0.5 * model.threshold)
    torch.manual_seed(args.seed)  # the dequantised empty layers of the training tensors
    features, condition = stage_tensors(model, args.data)
    for text in args.variant or DEFAULT_VARIANTS:
        name, transforms, hidden, bins, epochs, order = parse_variant(text)
        t0 = time.perf_counter()
        encoding = encoding_for(model, order, maximum)
        inputs = reencode(model, features, condition, encoding)
        flow, loss, epoch = retrain(inputs, condition, model.n_layers, transforms, hidden, bins, epochs, args.seed)
        generated = sampled_layer_energies(model, flow, incident, args.seed, encoding)
        report(name, model, reference, generated, generated < 0.5 * model.threshold,
               f"; val loss {loss:.3f} at epoch {epoch}/{epochs}, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
