"""``caloman demo --out DIR [--profile quick|full]``: the main job on built-in data."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="simulate, estimate dimension, train, generate, evaluate and report (the main job)",
        description="The main job on built-in data: simulate dataset-1 photon showers with the parameterised "
                    "simulator, estimate the intrinsic dimension, train CaloMan, generate showers for held-out "
                    "energies, evaluate them and write DIR/report.md. Re-running with the same DIR re-uses "
                    "the simulated data and a finished run.")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument("--profile", choices=("quick", "full"), default="quick",
                        help="quick: minutes on 2 cores (default); full: 100,000 showers, CaloMan's paper-sized "
                             "networks")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and generation (default 0)")
    parser.add_argument("--classifier", choices=("strong", "full", "quick", "none"), default="strong",
                        help="classifier test setting (default strong: boosted trees per incident energy, minutes; "
                             "full is the challenge protocol, hours on CPU; quick is for unit tests only)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from caloman.demo import DemoConfig, run_demo

    report = run_demo(args.out, DemoConfig(profile=args.profile, seed=args.seed, classifier=args.classifier,
                                           threads=args.threads))
    print(f"report: {report}")
    return 0
