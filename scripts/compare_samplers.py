"""Generation time of several trained runs and the reference sampler, in one process.

`caloman benchmark --run` times one run against the reference sampler; two such
benchmarks on a shared machine can differ by more than the runs do. This script loads
every run given, then times each of them and the reference sampler alternately (twice,
best of the two medians), so their ratios come from the same conditions:

    .venv/bin/python scripts/compare_samplers.py VAE_RUN MFLOW_RUN --threads 2

Incident energies log-uniform over the dataset-1 ladder's range (256 MeV to 4.2 TeV),
drawn with a fixed seed. Prints one line per batch size: ms per shower of each run and
of the reference sampler, and each run's time over the first run's. Used for the M-flow
comparison in docs/mflows.md.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from caloman.allocator import keep_freed_memory
from caloman.benchmark import ReferenceSampler, time_sampler, timed_sampler
from caloman.runs import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (the first is the baseline of the ratios)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--batch-sizes", default="10000,100,1", help="comma-separated (default 10000,100,1)")
    parser.add_argument("--repeats", type=int, default=2, help="timings per sampler; the best is kept (default 2)")
    args = parser.parse_args()
    keep_freed_memory()  # as the generating commands do (caloman.allocator)
    torch.set_num_threads(args.threads)
    models = [load_run(run).model.eval() for run in args.runs]
    samplers = [timed_sampler(model) for model in models] + [ReferenceSampler(models[0].binning).eval()]
    names = [*args.runs, "reference sampler"]
    energies = np.exp(np.random.default_rng(0).uniform(np.log(256.0), np.log(4.2e6), 20_000)).astype(np.float32)
    torch.manual_seed(0)
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        best = [float("inf")] * len(samplers)
        for _ in range(args.repeats):
            for i, sample in enumerate(samplers):
                best[i] = min(best[i], time_sampler(sample, energies, batch, min_seconds=2.0).ms_per_shower)
        cells = [f"{name} {ms:.4f} ms ({ms / best[0]:.2f}x)" for name, ms in zip(names, best)]
        print(f"batch {batch}, {args.threads} threads: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
