"""Peak memory of streamed training on dataset 3 (issue 15, item 1).

Simulates dataset-3 showers with the built-in simulator (`caloman simulate --binning ds3`),
then trains CaloMan streamed on the N showers of each ``--sizes`` entry (`caloman train
--stream-chunk-showers C --max-showers N`, ``--profile`` quick (default) or full, which sets
the networks' sizes, one epoch per stage, one thread)
in a child process, and records its peak resident memory (``os.wait4``'s ``ru_maxrss``, the
whole process: model, optimizer, chunks, calibration) and wall time. Prints one JSON line
per size. Peak memory that does not grow from the smaller size to the larger one is the
point; the figures are in docs/training-and-generation.md ("Streamed training").

    nice -n 10 .venv/bin/python scripts/stream_memory.py --simulate 5000 --repeat 4 --sizes 5000 20000

or step by step (``--keep`` the work folder, then ``--data`` its file):

    ... stream_memory.py --simulate 5000 --repeat 4 --sizes --workdir /tmp/stream-bench --keep
    ... stream_memory.py --data /tmp/stream-bench/ds3-train.h5 --sizes 5000 --workdir /tmp/stream-bench --keep

The issue's check, 100,000 showers in at most 8 GB (the simulator took 6.3 ms per dataset-3
shower on one core on 2026-12-07 at 15:50 UTC, so 10,000 showers take about a minute; the
100,000-row file is 9.7 GB gzipped, 16 GB as float32):

    nice -n 5 .venv/bin/python scripts/stream_memory.py --simulate 10000 --repeat 10 --sizes --workdir W --keep
    nice -n 5 .venv/bin/python scripts/stream_memory.py --data W/ds3-train.h5 --sizes 100000 --workdir W --keep

``--repeat K`` writes the simulated showers K times over into the training file (a file of
K x ``--simulate`` rows in less simulation time); memory does not depend on what the rows
hold. The work folder (default a new /tmp/stream-bench-*) is deleted at the end unless
``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caloman.io import ShowerFile, ShowerWriter


def caloman(*args: str) -> list[str]:
    """The command line of ``caloman ARGS`` with this interpreter."""
    return [sys.executable, "-m", "caloman", *args]


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run ``command``; (wall seconds, peak RSS in MiB of that process). Raises on failure."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024  # KiB on Linux


def repeated(source: Path, target: Path, times: int) -> None:
    """``target``: the showers of ``source`` written ``times`` times over, chunk by chunk."""
    with ShowerFile(source, "ds3", check_values=False) as f, ShowerWriter(target, f.n_voxels, binning="ds3") as w:
        for _ in range(times):
            for energies, showers in f.iter_chunks():
                w.append(energies, showers)


def simulate(work: Path, n: int, repeat: int) -> Path:
    """``work/ds3-train.h5``: n simulated dataset-3 showers (1 GeV..1 TeV), written ``repeat`` times over."""
    simulated, data = work / "ds3-simulated.h5", work / "ds3-train.h5"
    seconds, rss = run_measured(caloman("-q", "simulate", "--binning", "ds3", "--energies", "loguniform:1024:1048576",
                                        "--count", str(n), "--seed", "1", "--out", str(simulated)))
    print(json.dumps({"step": "simulate", "showers": n, "seconds": round(seconds, 1), "peak_rss_mib": round(rss)}),
          flush=True)
    if repeat > 1:
        repeated(simulated, data, repeat)
        simulated.unlink()
    else:
        simulated.rename(data)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simulate", type=int, default=5000, help="dataset-3 showers to simulate")
    parser.add_argument("--repeat", type=int, default=1, help="write the simulated showers this many times over")
    parser.add_argument("--sizes", type=int, nargs="*", default=[5000, 20000], help="showers to train on")
    parser.add_argument("--data", type=Path, default=None,
                        help="train on this dataset-3 file instead of simulating one (steps run as separate jobs)")
    parser.add_argument("--chunk", type=int, default=1024, help="--stream-chunk-showers")
    parser.add_argument("--profile", choices=["quick", "full"], default="quick",
                        help="the training profile, which sets the network sizes (one epoch per stage either way)")
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a new /tmp/stream-bench-*)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="stream-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = args.data or simulate(work, args.simulate, args.repeat)
        config = work / "stream.toml"
        config.write_text("[training]\nepochs = 1\nnum_threads = 1\nstage_epochs = { layer_energy = 1 }\n"
                          f"stream_chunk_showers = {args.chunk}\n")
        for size in args.sizes:
            run = work / f"run-{size}"
            seconds, rss = run_measured(caloman("-q", "train", str(data), "--binning", "ds3", "--out", str(run),
                                                "--profile", args.profile, "--max-showers", str(size), "--config",
                                                str(config)))
            history = json.loads((run / "history.json").read_text())
            print(json.dumps({"step": "train", "profile": args.profile, "showers": size, "n_train": history["n_train"],
                              "chunk": args.chunk, "seconds": round(seconds, 1), "peak_rss_mib": round(rss),
                              "stages": {s["name"]: round(s["seconds"], 1) for s in history["stages"]}}), flush=True)
            shutil.rmtree(run)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
