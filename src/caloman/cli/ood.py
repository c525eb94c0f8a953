"""``caloman ood RUN --data HELDOUT.h5 --out DIR``: can a run's manifold scores tell
defective showers from normal ones?

Held-out normal showers (not used in training) are split in two halves; one half gets
each defect of the sensitivity suite in turn (a layer's energy off by 5 %, energy moved
from the core to the next ring, dim voxels lost, widths stretched, voxel energies on a
lattice; ``none`` is the null check). Reports the AUROC of the distance from the
manifold, of minus the log density on it, and of the combined OOD score. Writes ood.json
and ood.md. Any caloman run (every autoencoder: vae, ae, wae, mflow, mflow-e)."""

from __future__ import annotations

import argparse
from pathlib import Path

from caloman.metrics.defects import DEFECTS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "ood", help="AUROC of a run's out-of-distribution scores on defective showers",
        description=__doc__.replace("``", ""),
        epilog="example: caloman ood results/run --data results/data/reference.h5 --out results/ood")
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a trained caloman run directory")
    parser.add_argument("--data", required=True, type=Path, metavar="HELDOUT.h5",
                        help="held-out normal showers (not the training file)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--max-showers", type=int, default=4000,
                        help="held-out showers used, a seeded random subset (default 4000: 2000 per half)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the random defects")
    parser.add_argument("--defects", default=",".join(d.name for d in DEFECTS),
                        help="comma-separated defect names (default: all): "
                        + ", ".join(d.name for d in DEFECTS).replace("%", "%%"))  # argparse formats help with %
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from caloman.cli import run_and_showers, write_report
    from caloman.ood import OodConfig, render_markdown, run_ood_check

    config = OodConfig(defects=tuple(name.strip() for name in args.defects.split(",") if name.strip()),
                       seed=args.seed, max_showers=args.max_showers)
    loaded, energies, showers = run_and_showers(args)
    report = run_ood_check(loaded.model, energies, showers, loaded.binning, config)
    report["run"] = str(args.run_dir)
    report["data"] = str(args.data)
    write_report(args.out, "ood", report, render_markdown(report))
    return 0
