"""Which of a run's trained tensors are exactly those of other runs, grouped by module.

Two trainings that differ in one setting can still share whole stages: with the same data,
seed and condition, a stage comes out bit for bit the same. This tells which:

    .venv/bin/python scripts/compare_runs.py RUN OTHER [OTHER ...]

Prints, per top-level module or buffer of RUN's ``model.safetensors`` (the autoencoder,
the flows, the noise tables, the preprocessing constants), how many of its tensors are
``torch.equal`` to the same-named tensor of each OTHER run, and for the tensors that differ
the largest relative difference. Reads safetensors only (no pickle). Used for
docs/caloman-model.md ("The condition in CaloFlow's chain").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file


def largest_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny) over the elements (float64)."""
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max()) if a.numel() else 0.0


def compare(run: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, float]]:
    """Per group: (tensors, tensors equal, largest relative difference among the shape-matched rest)."""
    groups: dict[str, tuple[int, int, float]] = {}
    for key, value in run.items():
        group = key.split(".")[0]
        count, equal, worst = groups.get(group, (0, 0, 0.0))
        theirs = other.get(key)
        same_shape = theirs is not None and theirs.shape == value.shape
        if same_shape and torch.equal(theirs, value):
            equal += 1
        elif same_shape and value.is_floating_point():
            worst = max(worst, largest_relative_difference(value, theirs))
        else:
            worst = float("inf")
        groups[group] = (count + 1, equal, worst)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("others", type=Path, nargs="+")
    args = parser.parse_args()
    run = load_file(str(args.run / "model.safetensors"))
    for other_dir in args.others:
        print(f"{args.run} against {other_dir}:")
        other = load_file(str(other_dir / "model.safetensors"))
        for group, (count, equal, worst) in sorted(compare(run, other).items()):
            rest = "" if equal == count else f"; the rest differ by up to {worst:.3g} relative"
            print(f"  {group:24s} {equal:4d} of {count:4d} tensors equal{rest}")


if __name__ == "__main__":
    main()
