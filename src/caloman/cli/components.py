"""``caloman components RUN --data FILE --out DIR``: how many connected components a run's
latent codes form at each incident energy, counted on an implicit manifold fitted to them
(:mod:`caloman.components`). Writes components.json and components.md."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from caloman.components import ComponentsConfig

    d = ComponentsConfig()
    parser = subparsers.add_parser(
        "components", help="connected components of a run's latent codes per incident energy (implicit manifold)",
        description=__doc__.replace("``", ""),
        epilog="example: caloman components results/run --data results/data/train.h5 --out results/components")
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a trained caloman run directory")
    parser.add_argument("--data", required=True, type=Path, metavar="FILE", help="showers to encode (HDF5)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--max-showers", type=int, default=None, help="read a seeded random subset of the file")
    parser.add_argument("--dims", type=int, default=d.dims,
                        help=f"principal components of the codes (default {d.dims})")
    parser.add_argument("--codimension", type=int, default=d.codimension,
                        help=f"codimension of the fitted manifold (default {d.codimension})")
    parser.add_argument("--points", type=int, default=d.max_points,
                        help=f"codes per energy the manifold is fitted to (default {d.max_points})")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"manifold training epochs (default {d.epochs})")
    parser.add_argument("--samples", type=int, default=d.samples,
                        help=f"points sampled on the zero set per energy (default {d.samples})")
    parser.add_argument("--neighbours", type=int, default=d.neighbours,
                        help=f"k of the kNN graph (default {d.neighbours})")
    parser.add_argument("--scale", type=float, default=d.scale,
                        help=f"edge limit in units of the median k-th neighbour distance (default {d.scale})")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsets, fits and samples (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from caloman.cli import run_and_showers, write_report
    from caloman.components import ComponentsConfig, components_per_energy, render_markdown

    config = ComponentsConfig(dims=args.dims, codimension=args.codimension, max_points=args.points,
                              epochs=args.epochs, samples=args.samples, neighbours=args.neighbours, scale=args.scale)
    loaded, energies, showers = run_and_showers(args)
    loaded.model.eval()
    rows = components_per_energy(loaded.model, energies, showers, config, seed=args.seed)
    report = {"run": str(args.run_dir), "data": str(args.data), "seed": args.seed,
              "config": config.__dict__, "energies": rows}
    write_report(args.out, "components", report, render_markdown(rows, config))
    return 0
