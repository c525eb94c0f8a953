"""Generation time of a full-profile-sized coupling refiner against its base run, in one process.

The refiner's speed does not depend on its trained weights, so this swaps an untrained
refiner of the `full` profile's size (6 transforms of 128 x 128) into a refined run
(`caloman refine ... --method refiner`) and times it, the run's own refiner and the base
model interleaved (3 rounds, median), at batch 1, 100 and 10,000 on 2 threads.

    .venv/bin/python scripts/refiner_speed.py REFINED_RUN
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from caloman.benchmark import time_sampler
from caloman.refinement.refiner import RefinerConfig, WeightedFlowRefiner
from caloman.refinement.runs import RefineSettings
from caloman.runs import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a refined run written with --method refiner")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_run(args.run)
    model, base = loaded.model, loaded.model.base
    own = model.refiner
    size = RefineSettings.profile("full").refiner
    full = WeightedFlowRefiner(own.features, 1, RefinerConfig(transforms=size.transforms, hidden=size.hidden,
                                                              bins=size.bins, flow="coupling"))
    full.shift.copy_(own.shift)
    full.scale.copy_(own.scale)
    full.eval()
    energies = np.geomspace(256, 4.2e6, 15).astype(np.float32)
    for batch in (1, 100, 10_000):
        times: dict[str, list[float]] = {"run's refiner": [], "full-size coupling refiner": [], "base": []}
        for _ in range(3):
            for name, refiner in (("run's refiner", own), ("full-size coupling refiner", full)):
                model.refiner = refiner
                times[name].append(time_sampler(model.sample, energies, batch, min_seconds=1).ms_per_shower)
            times["base"].append(time_sampler(base.sample, energies, batch, min_seconds=1).ms_per_shower)
        median = {k: statistics.median(v) for k, v in times.items()}
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.4f} ms ({v / median['base']:.2f}x base)"
                                             for k, v in median.items()))


if __name__ == "__main__":
    main()
