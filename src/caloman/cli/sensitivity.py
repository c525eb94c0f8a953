"""``caloman sensitivity``: prove the strong classifier test's power on injected defects.

Two independent built-in simulator samples at the dataset-1 ladder energies;
the second gets each known defect in turn (a layer's energy off by 5 %, energy
moved from the core to the next ring, dim voxels lost, widths stretched by 3 %,
voxel energies on a lattice) and the strong test runs on all three inputs.
Writes sensitivity.json and sensitivity.md; exits 1 when a defect is missed or
the undamaged pair is not at AUC 0.50 +- 0.02."""

from __future__ import annotations

import argparse
from pathlib import Path

from caloman.metrics.defects import DEFECTS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sensitivity", help="prove the strong classifier test's power on injected defects",
        description=__doc__.replace("``", ""),
        epilog="example: caloman sensitivity --out results/sensitivity --per-energy 1400")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--per-energy", type=int, default=1_400,
                        help="showers per ladder energy and sample (default 1400: 21,000 per sample, "
                             "the full demo's held-out size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reference sample (the other: seed + 1)")
    parser.add_argument("--defects", default=",".join(d.name for d in DEFECTS),
                        help="comma-separated defect names (default: all): "
                        + ", ".join(d.name for d in DEFECTS).replace("%", "%%"))  # argparse formats help with %
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from caloman.sensitivity import SensitivityConfig, render_markdown, run_sensitivity, write_sensitivity

    config = SensitivityConfig(per_energy=args.per_energy, seed=args.seed,
                               defects=tuple(name.strip() for name in args.defects.split(",") if name.strip()))
    report = run_sensitivity(config)
    path = write_sensitivity(report, args.out)
    print(render_markdown(report))
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0 if report["all_passed"] else 1
