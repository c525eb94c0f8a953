"""How a run shares one layer's energy among its voxels, at single incident energies.

For one layer and each energy it simulates showers with the built-in simulator and prints
each voxel's share of the layer energy (mean and s.d.) and the correlation of the first
voxel's share with every other's, for the simulated showers (``ref``), a second simulated
set (``other``, the floor), the run's samples (``gen``) and a third simulated set passed
through encoder and decoder with their true layer energies, with the run's voxel noise
(``recon``) and without (``mean``, the decoded means): `attack_autoencoder.comparison_sets`.
The readout threshold is applied first. Used for docs/caloman-model.md (after step 15: dataset 1's layer 3 at 2 TeV).

    .venv/bin/python scripts/layer_shares.py RUN --layer 3 --energies 2097152 --showers 6000

Needs a CaloMan run with the Poisson-Gamma voxel noise (the reconstruction is
`scripts/attack_autoencoder.py`'s).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from attack_autoencoder import SHORT_NAMES, comparison_sets

from caloman.runs import load_run


def shares(showers: np.ndarray, columns: slice, threshold: float) -> np.ndarray:
    """Each voxel's share (n, v) of the layer's energy after the readout threshold."""
    layer = np.where(showers >= threshold, showers, 0.0)[:, columns]
    return layer / np.maximum(layer.sum(1, keepdims=True), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--layer", type=int, default=3, help="index of the layer in the binning (default 3)")
    parser.add_argument("--energies", default="2097152", help="MeV, comma-separated")
    parser.add_argument("--showers", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_run(args.run)
    model, binning = loaded.model.eval(), loaded.binning
    offsets = binning.bin_edges
    columns = slice(int(offsets[args.layer]), int(offsets[args.layer + 1]))
    for energy in (float(e) for e in args.energies.split(",")):
        for name, showers in comparison_sets(model, binning, energy, args.showers, args.seed).items():
            f = shares(showers, columns, binning.readout_threshold).astype(np.float64)
            print(f"{energy:g} layer {args.layer} {SHORT_NAMES[name]:5s} share mean {np.round(f.mean(0), 4).tolist()} "
                  f"s.d. {np.round(f.std(0), 4).tolist()} corr(first, each) "
                  f"{np.round(np.corrcoef(f.T)[0], 3).tolist()}", flush=True)


if __name__ == "__main__":
    main()
