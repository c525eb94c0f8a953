"""Attack a trained run at single incident energies: boosted trees on feature groups.

The strong evaluation gives one AUC per energy; this says *what* the trees see there.
For each energy it simulates fresh reference showers (two independent sets, for the
truth-against-truth floor), generates as many with the run, thresholds both, and
reports the 3-fold AUC of gradient-boosted trees on: the strong low-level inputs, each
layer's voxels and its sorted voxel energies, the lit-voxel count, the smallest lit
and the largest voxel per layer, the layer energies, and each high-level feature alone.

    .venv/bin/python scripts/attack_single_energy.py RUN --energies 256,1024,4194304 --showers 6000

Prints one JSON line per energy (AUCs and a few means). Used for docs/caloman-model.md
(steps 5 and 6). Dataset-1 photons only (the built-in simulator's binning of the run).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from caloman.features import compute_features, high_level_names, high_level_vector
from caloman.metrics.strong import strong_inputs
from caloman.runs import load_run
from caloman.simulation.simulator import simulate_showers


def tree_auc(reference: np.ndarray, generated: np.ndarray, seed: int = 0) -> float:
    """Out-of-fold AUC of boosted trees separating two (n, f) input sets."""
    inputs = np.concatenate([reference, generated])
    labels = np.r_[np.zeros(len(reference)), np.ones(len(generated))]
    trees = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.15, early_stopping=True, random_state=seed)
    scores = cross_val_predict(trees, inputs, labels, cv=StratifiedKFold(3, shuffle=True, random_state=seed),
                               method="predict_proba")[:, 1]
    return round(float(roc_auc_score(labels, scores)), 3)


def feature_groups(energy: float, showers: np.ndarray, binning) -> dict[str, np.ndarray]:
    """Named (n, f) input sets of thresholded showers (n, V) at one incident energy (MeV)."""
    incident = np.full(len(showers), energy)
    groups = {"strong_low": strong_inputs("low", incident, showers, binning)}
    lit_counts, smallest, largest, layer_energies = [], [], [], []
    for layer in binning.relevant_layers:
        voxels = showers[:, binning.layer_slice(layer)]
        lit = voxels > 0
        groups[f"layer{layer}_voxels"] = voxels
        groups[f"layer{layer}_sorted"] = -np.sort(-voxels, axis=1)[:, :12]
        lit_counts.append(lit.sum(1))
        smallest.append(np.where(lit, voxels, np.inf).min(1).clip(max=1e9))
        largest.append(voxels.max(1))
        layer_energies.append(voxels.sum(1))
    groups["lit_counts"], groups["min_lit"], groups["max_voxel"] = (np.stack(v, 1) for v in
                                                                     (lit_counts, smallest, largest))
    energies = np.stack(layer_energies, 1)
    groups["layer_energies"] = np.c_[energies, energies.sum(1)] / energy
    high = high_level_vector(compute_features(incident, showers, binning))
    groups["high"] = high
    for j, name in enumerate(high_level_names(binning)[1:], 1):
        groups["hl:" + name] = high[:, j:j + 1]
    return groups


def attack_setup(description: str, default_energies: str) -> tuple[argparse.Namespace, Any, Any]:
    """The attack scripts' command line (RUN, --energies, --showers, --seed), one torch
    thread, and the run's model (in eval mode) and binning."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("run")
    parser.add_argument("--energies", default=default_energies, help="MeV, comma-separated")
    parser.add_argument("--showers", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_run(args.run)
    return args, loaded.model.eval(), loaded.binning


def main() -> None:
    args, model, binning = attack_setup(__doc__.splitlines()[0], "256,1024,4194304")
    threshold = binning.readout_threshold
    for energy in (float(e) for e in args.energies.split(",")):
        n = args.showers
        references = [np.asarray(simulate_showers(binning, np.full(n, energy), seed=args.seed * 1000 + 11 + k))
                      for k in (0, 1)]
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            generated = model.sample(torch.full((n,), energy)).numpy()
        ref, ref2, gen = (feature_groups(energy, np.where(s >= threshold, s, 0.0), binning)
                          for s in (*references, generated))
        result = {name: tree_auc(ref[name], gen[name], args.seed) for name in ref}
        result["floor_strong_low"] = tree_auc(ref["strong_low"], ref2["strong_low"], args.seed)
        result["lit_mean_reference"] = ref["lit_counts"].mean(0).round(2).tolist()
        result["lit_mean_generated"] = gen["lit_counts"].mean(0).round(2).tolist()
        print(energy, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
