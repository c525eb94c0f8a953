"""Time a caloman run's PyTorch sampler against ONNX Runtime on exported graphs, in one process.

    python examples/onnx_latency.py RUN model.onnx [other.onnx ...] [--threads 1,2] [--fixed-batch]

Needs caloman (and torch) besides onnxruntime: a measuring script, not an inference example.
Per batch size (1, 100, 10,000) the same pre-drawn noise and incident energies (log-uniform over
the trained range, numpy seed 0) go to ``sample_from_noise`` (torch) and to each graph (ONNX
Runtime: ``caloman.export.runtime.session_options``: the given intra-op threads, 1 inter-op
thread, sequential execution, all graph optimisations, spinning worker threads), at each
thread count of ``--threads`` (torch with as many threads); with ``--fixed-batch`` each graph
also runs in a session whose batch axis is fixed to the batch size (what a framework calling
at batch 1 can do). The samplers alternate, best of 7 repeats. Prints ms per shower as wall time
and as this thread's CPU time (``time.thread_time``, which leaves out time other processes held
the core, but also the work of ONNX Runtime's or torch's other threads: compare CPU times only
at 1 thread). Noise drawing is not timed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import onnxruntime as ort
import torch

from caloman.export.runtime import session_options
from caloman.runs import load_run

BATCHES = ((1, 200), (100, 10), (10_000, 1))  # (batch size, calls per repeat)
REPEATS = 7


def best_time(call, calls: int) -> tuple[float, float]:
    """Best (wall, thread CPU) seconds per call over the repeats, after one warm-up call."""
    call()
    wall = cpu = float("inf")
    for _ in range(REPEATS):
        w, c = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            call()
        wall, cpu = min(wall, (time.perf_counter() - w) / calls), min(cpu, (time.thread_time() - c) / calls)
    return wall, cpu


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("graphs", nargs="+")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts (default 1)")
    parser.add_argument("--fixed-batch", action="store_true", help="also time sessions with a fixed batch axis")
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    model = load_run(args.run).model.eval()
    low, high = model.trained_energy_range()
    shape = model.noise_shape()
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.machine()}; run {args.run}")
    for n, calls in BATCHES:
        energies = np.exp(rng.uniform(np.log(low), np.log(high), n)).astype(np.float32)
        normal = rng.standard_normal((n, shape.normal), dtype=np.float32)
        uniform = rng.random((n, shape.uniform), dtype=np.float32)
        feeds = {"normal_noise": normal, "incident_energy": energies.reshape(-1, 1),
                 **({"uniform_noise": uniform} if shape.uniform else {})}
        tensors = (torch.from_numpy(energies), torch.from_numpy(normal),
                   torch.from_numpy(uniform) if shape.uniform else None)
        rows = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                rows[f"pytorch, {threads} thread(s)"] = best_time(lambda t=tensors: model.sample_from_noise(*t), calls)
            for path in args.graphs:
                for fixed in (False, True) if args.fixed_batch else (False,):
                    options = session_options(threads, batch_size=n if fixed else None)
                    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                    name = f"{path}, {threads} thread(s){', batch fixed' if fixed else ''}"
                    rows[name] = best_time(lambda s=session, f=feeds: s.run(None, f), calls)
        for name, (wall, cpu) in rows.items():
            print(f"batch {n:6d}  {name:60s} wall {1e3 * wall / n:8.4f}  cpu {1e3 * cpu / n:8.4f} ms/shower")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
