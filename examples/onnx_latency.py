"""Time a caloman run's PyTorch sampler against ONNX Runtime on exported graphs, in one process.

    python examples/onnx_latency.py RUN model.onnx [other.onnx ...]

Needs caloman (and torch) besides onnxruntime: a measuring script, not an inference example.
Per batch size (1, 100, 10,000) the same pre-drawn noise and incident energies (log-uniform over
the trained range, numpy seed 0) go to ``sample_from_noise`` (torch, 1 thread) and to each graph
(ONNX Runtime: 1 intra-op thread, 1 inter-op thread, sequential execution, all graph
optimisations); the samplers alternate, best of 7 repeats. Prints ms per shower as wall time and
as this thread's CPU time (``time.thread_time``, which leaves out time other processes held the
core: the figure to compare on a shared machine). Noise drawing is not timed.
"""

from __future__ import annotations

import platform
import sys
import time

import numpy as np
import onnxruntime as ort
import torch

from caloman.runs import load_run

BATCHES = ((1, 200), (100, 10), (10_000, 1))  # (batch size, calls per repeat)
REPEATS = 7


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


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
    if len(argv) < 2:
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    model = load_run(argv[0]).model.eval()
    sessions = {path: session(path) for path in argv[1:]}
    low, high = model.trained_energy_range()
    shape = model.noise_shape()
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.machine()}; run {argv[0]}")
    for n, calls in BATCHES:
        energies = np.exp(rng.uniform(np.log(low), np.log(high), n)).astype(np.float32)
        normal = rng.standard_normal((n, shape.normal), dtype=np.float32)
        uniform = rng.random((n, shape.uniform), dtype=np.float32)
        feeds = {"normal_noise": normal, "incident_energy": energies.reshape(-1, 1),
                 **({"uniform_noise": uniform} if shape.uniform else {})}
        args = (torch.from_numpy(energies), torch.from_numpy(normal),
                torch.from_numpy(uniform) if shape.uniform else None)
        with torch.inference_mode():
            rows = {"pytorch": best_time(lambda args=args: model.sample_from_noise(*args), calls)}
        for path, s in sessions.items():
            rows[path] = best_time(lambda s=s, feeds=feeds: s.run(None, feeds), calls)
        for name, (wall, cpu) in rows.items():
            print(f"batch {n:6d}  {name:40s} wall {1e3 * wall / n:8.4f}  cpu {1e3 * cpu / n:8.4f} ms/shower")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
