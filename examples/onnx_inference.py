"""Generate showers from a caloman ONNX export with onnxruntime and numpy alone
(no caloman, no PyTorch), and write them as a CaloChallenge HDF5 file (h5py).

    python examples/onnx_inference.py model.onnx --energy 65536 --count 1000 --out showers.h5

Reads the sidecar ``model.json`` beside the graph (written by ``caloman export``),
draws the noise it asks for, runs the graph in batches and writes
``incident_energies`` (N, 1) and ``showers`` (N, n_voxels), both in MeV, voxels in
the CaloChallenge (layer, alpha, r) order, for either export convention; for a
reweighted run's export (a second output ``weights``) also ``weights`` (N,).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import onnxruntime as ort

#: Relative slack on the trained energy range (as caloman generate allows).
RANGE_TOLERANCE = 0.01


def load_sidecar(onnx_path: Path) -> dict:
    """The sidecar ``model.json`` of ``model.onnx``."""
    sidecar = onnx_path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    if meta.get("format") != "caloman-onnx/1":
        raise SystemExit(f"{sidecar} is not a caloman-onnx/1 sidecar")
    return meta


def check_energy(meta: dict, energy: float, allow_extrapolation: bool) -> None:
    """Refuse an incident energy (MeV) outside the trained range, unless allowed."""
    low, high = meta["energy_range_mev"]
    if not low * (1 - RANGE_TOLERANCE) <= energy <= high * (1 + RANGE_TOLERANCE) and not allow_extrapolation:
        raise SystemExit(f"the model was trained on {low:g}..{high:g} MeV; asked for {energy:g} MeV "
                         "(pass --allow-extrapolation to generate anyway)")


def graph_inputs(meta: dict, energies: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The graph's inputs for incident energies (n,) in MeV, with fresh noise."""
    runtime, n = meta["runtime"], len(energies)
    normal = rng.standard_normal((n, runtime["n_normal"]), dtype=np.float32)
    uniform = rng.random((n, runtime["n_uniform"]), dtype=np.float32)
    if meta["convention"] == "par04":
        condition = np.zeros((n, len(meta["par04"]["condition"])), dtype=np.float32)
        condition[:, 0] = energies / meta["par04"]["energy_scale_mev"]
        return {"input": np.concatenate([normal, uniform, condition], axis=1)}
    feeds = {"normal_noise": normal, "incident_energy": energies.astype(np.float32).reshape(-1, 1)}
    if runtime["n_uniform"]:
        feeds["uniform_noise"] = uniform
    return feeds


def to_calochallenge(meta: dict, output: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """The graph's output (n, V) as voxel energies in MeV in the CaloChallenge order."""
    if meta["convention"] != "par04":
        return output
    showers = np.empty_like(output)
    showers[:, meta["par04"]["voxel_order"]] = output * energies[:, None]  # output i holds voxel order[i]
    return showers


def write_calochallenge(path: Path, energies: np.ndarray, showers: np.ndarray, weights: np.ndarray | None = None
                        ) -> None:
    """Write the datasets to a temporary file and rename it into place when complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("incident_energies", data=energies.reshape(-1, 1), compression="gzip")
            f.create_dataset("showers", data=showers, compression="gzip")
            if weights is not None:
                f.create_dataset("weights", data=weights.astype(np.float64))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model.onnx written by caloman export (model.json beside it)")
    parser.add_argument("--energy", type=float, required=True, help="incident energy in MeV")
    parser.add_argument("--count", type=int, required=True, help="number of showers")
    parser.add_argument("--out", type=Path, required=True, help="output CaloChallenge HDF5 file")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--allow-extrapolation", action="store_true")
    args = parser.parse_args(argv)

    meta = load_sidecar(args.model)
    check_energy(meta, args.energy, args.allow_extrapolation)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(args.seed)
    energies = np.full(args.count, args.energy, dtype=np.float32)
    weighted = bool(meta["runtime"].get("weighted", 0))
    chunks, weights = [], []
    for start in range(0, args.count, args.batch_size):
        batch = energies[start:start + args.batch_size]
        outputs = session.run(None, graph_inputs(meta, batch, rng))
        chunks.append(to_calochallenge(meta, outputs[0], batch))
        if weighted:
            weights.append(outputs[1])
    write_calochallenge(args.out, energies, np.concatenate(chunks), np.concatenate(weights) if weighted else None)
    print(f"{args.count} showers of {args.energy:g} MeV ({meta['binning']['name']}, {meta['run']['model_kind']}) "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
