"""How tightly a run ties the strip layer's lateral shape to the middle layer's, at single energies.

For each incident energy it simulates showers with the built-in simulator and prints, for
the strip layer (1) and the middle layer (2) of dataset 1, the correlation of their
energy-weighted radial widths and of their radial centroids (`caloman.features`: width_r, EC_r), and each one's spread
(mm), for five sets: simulated (``ref``), a second simulated set (``other``, the floor),
the run's samples (``gen``), other simulated showers reconstructed through encoder and
decoder with their true layer energies and the run's voxel noise (``recon``) and the same
without voxel noise (``mean``, the decoded means). The readout threshold is applied first.

    .venv/bin/python scripts/lateral_ties.py RUN --energies 4194304,65536 --showers 3000

Used for docs/caloman-model.md (step 11) and docs/mflows.md. Needs a CaloMan run with
the Poisson-Gamma voxel noise (as `scripts/attack_autoencoder.py`, whose reconstruction
it uses).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from attack_autoencoder import SHORT_NAMES, comparison_sets

from caloman.features import apply_threshold, compute_features
from caloman.runs import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="CaloMan run directory")
    parser.add_argument("--energies", default="4194304,65536", help="incident energies in MeV, comma-separated")
    parser.add_argument("--showers", type=int, default=3000, help="showers per set and energy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_run(args.run).model.eval()
    binning = model.binning
    for energy in (float(e) for e in args.energies.split(",")):
        n = args.showers
        for long_name, showers in comparison_sets(model, binning, energy, n, seed=0).items():
            name = SHORT_NAMES[long_name]
            features = compute_features(np.full(n, energy), apply_threshold(showers, binning.readout_threshold),
                                        binning)
            (w1, c1), (w2, c2) = ((features.width_r[layer], features.ec_r[layer]) for layer in (1, 2))
            print(f"{energy:.0f} {name:6s} width corr L1-L2 {np.corrcoef(w1, w2)[0, 1]:.3f} "
                  f"centroid corr L1-L2 {np.corrcoef(c1, c2)[0, 1]:.3f} width sd L1 {w1.std():.3f} "
                  f"L2 {w2.std():.3f} centroid sd L1 {c1.std():.3f} L2 {c2.std():.3f}", flush=True)


if __name__ == "__main__":
    main()
