"""Which step of CaloMan's sampling path carries a tell: the flows, or the autoencoder and voxel noise?

At single incident energies it simulates reference showers and compares, with boosted
trees on the strong 'high' inputs (the high-level vector, the layer-energy ratios and the
per-layer voxel-energy spectra), the reference against:

* ``other``: a second simulated set (the truth-against-truth floor);
* ``generated``: the run's own samples (both flows, decoder, voxel noise, readout);
* ``reconstructed``: other simulated showers passed through encoder and decoder with their
  true layer energies and codes, then the run's voxel noise and readout: no flow involved;
* ``decoded_mean``: the same reconstructions without voxel noise.

If ``reconstructed`` is told apart nearly as well as ``generated``, the tell is in the
autoencoder and the voxel noise, and no refinement of the latent distribution can remove
it. Also per column group (each alone) for ``generated``, and the r centroids' spread and
correlation across layers.

    .venv/bin/python scripts/attack_autoencoder.py RUN --energies 512,65536,4194304 --showers 6000

Prints one JSON line per energy. Used for docs/caloman-model.md (step 7).
Dataset-1 photons (the built-in simulator's binning of the run).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from attack_single_energy import attack_setup, tree_auc

from caloman.features import high_level_names
from caloman.metrics.strong import SPECTRUM_BANDS, strong_inputs
from caloman.simulation.simulator import simulate_showers


def column_groups(binning) -> dict[str, list[int]]:
    """Columns of the strong 'high' input by kind of feature."""
    names = high_level_names(binning)
    n_layers, n_high = len(binning.relevant_layers), len(names)

    def starting(*prefixes: str) -> list[int]:
        return [i for i, name in enumerate(names) if name.startswith(prefixes)]

    return {"layer_energies": [*range(1, 1 + n_layers), names.index("log10(E_tot + 1e-8)")],
            "EC_alpha": starting("EC_eta", "EC_phi"), "width_alpha": starting("width_eta", "width_phi"),
            "sparsity": starting("sparsity"), "EC_r": starting("EC_r"), "width_r": starting("width_r"),
            "spectra": list(range(n_high + n_layers + 1, n_high + n_layers + 1 + n_layers * SPECTRUM_BANDS))}


def reconstructed(model, incident: torch.Tensor, showers: np.ndarray, seed: int, noisy: bool) -> np.ndarray:
    """Showers (n, V) MeV through encoder and decoder (true layer energies, posterior-mean codes),
    then (``noisy``) the run's voxel noise, and the readout."""
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        features = model._features(incident, torch.as_tensor(showers, dtype=incident.dtype))
        decoded = model.autoencoder.decode(model._codes(features), model._ae_context(features.condition))
        shape = showers.shape
        noise = (torch.randn(shape, generator=generator), torch.rand(shape, generator=generator),
                 torch.randn(shape, generator=generator)) if noisy else None
        return model._to_showers(model._pipeline(), incident, decoded, features.layer_features,
                                 voxel_noise=noise).numpy()


#: Short names of :func:`comparison_sets`' sets, as ``lateral_ties.py`` and ``layer_shares.py`` print them.
SHORT_NAMES = {"reference": "ref", "other": "other", "generated": "gen", "reconstructed": "recon",
               "decoded_mean": "mean"}


def comparison_sets(model, binning, energy: float, n: int, seed: int) -> dict[str, np.ndarray]:
    """n showers (n, V) MeV at one incident energy in five sets: simulated (``reference``), a
    second simulated set (``other``, the floor), the run's samples (``generated``) and a third
    simulated set through encoder and decoder with the run's voxel noise (``reconstructed``) and
    without (``decoded_mean``). Simulation seeds seed * 1000 + 11, 12, 13; sampling seed ``seed``."""
    reference, other, to_encode = (np.asarray(simulate_showers(binning, np.full(n, energy),
                                                               seed=seed * 1000 + 11 + k)) for k in range(3))
    incident = torch.full((n,), energy)
    torch.manual_seed(seed)
    with torch.inference_mode():
        generated = model.sample(incident).numpy()
    return {"reference": reference, "other": other, "generated": generated,
            "reconstructed": reconstructed(model, incident, to_encode, seed, noisy=True),
            "decoded_mean": reconstructed(model, incident, to_encode, seed, noisy=False)}


def main() -> None:
    args, model, binning = attack_setup(__doc__.splitlines()[0], "512,65536,4194304")
    if model.kind != "caloman" or model.config.voxel_noise != "poisson-gamma":
        raise SystemExit("this attack needs a CaloMan run with the poisson-gamma voxel noise")
    threshold, groups = binning.readout_threshold, column_groups(binning)
    for energy in (float(e) for e in args.energies.split(",")):
        n = args.showers
        sets = comparison_sets(model, binning, energy, n, args.seed)
        inputs = {name: strong_inputs("high", np.full(n, energy), np.where(s >= threshold, s, 0.0), binning)
                  for name, s in sets.items()}
        ref = inputs["reference"]
        result = {name: tree_auc(ref, x, args.seed) for name, x in inputs.items() if name != "reference"}
        result["generated_by_group"] = {group: tree_auc(ref[:, cols], inputs["generated"][:, cols], args.seed)
                                        for group, cols in groups.items()}
        result["reconstructed_by_group"] = {group: tree_auc(ref[:, cols], inputs["reconstructed"][:, cols], args.seed)
                                            for group, cols in groups.items()}
        ec_r = groups["EC_r"]
        result["EC_r_std_mm"] = {name: (100 * x[:, ec_r].std(0)).round(2).tolist() for name, x in inputs.items()}
        result["EC_r_corr_layers_1_2"] = {name: round(float(np.corrcoef(x[:, ec_r[1]], x[:, ec_r[2]])[0, 1]), 3)
                                          for name, x in inputs.items()}
        print(energy, json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
