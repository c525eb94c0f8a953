"""The M-flow toys (issue 13) at a longer budget than ``caloman toy``'s full setting.

Runs :func:`caloman.toy.run_toy` for one manifold toy (``circle`` or ``sphere-gaussian``) and
one of its methods (``mflow``, ``mflow-e``, ``ambient-flow``, ``two-step-vae``) with
``--epochs`` epochs per phase (the M-flow's manifold and density phases, the two-step VAE's
autoencoder and latent flow; the ambient flow gets their sum) and the learning-rate
schedule ``--lr-schedule`` (``cosine`` per phase, the default here, or ``constant``, as ``caloman toy``), on one
thread. Prints one JSON line with the metrics and the wall time; the table is in
docs/mflows.md ("A longer budget").

    .venv/bin/python scripts/mflow_toy_budget.py circle mflow --epochs 100 --lr-schedule cosine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from caloman.toy.experiment import full_settings, run_toy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["circle", "sphere-gaussian"])
    parser.add_argument("method", choices=["mflow", "mflow-e", "ambient-flow", "two-step-vae"])
    parser.add_argument("--epochs", type=int, default=100, help="epochs per phase (default 100)")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = full_settings()
    schedule = dataclasses.replace(settings.manifold.schedule, manifold_epochs=args.epochs,
                                   density_epochs=args.epochs, lr_schedule=args.lr_schedule)
    settings = dataclasses.replace(settings, manifold=dataclasses.replace(settings.manifold, schedule=schedule))
    start = time.perf_counter()
    result = run_toy(args.dataset, args.method, settings, seed=args.seed)
    print(json.dumps({"dataset": args.dataset, "method": args.method, "epochs": args.epochs,
                      "lr_schedule": args.lr_schedule, "seed": args.seed,
                      **{k: result.metrics.get(k) for k in ("manifold_distance", "log_density_error", "emd")},
                      "truth_emd": result.truth_metrics.get("emd"),
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
