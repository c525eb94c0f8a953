"""``caloman toy``: a known-truth 2-D experiment (LaSeR's toys) for one dataset and method."""

from __future__ import annotations

import argparse
import json
import logging
import platform
from importlib import metadata

import numpy as np

from caloman import __version__
from caloman.errors import ConfigError
from caloman.io import atomic_directory
from caloman.toy import DATASETS, METHODS, full_settings, quick_settings, run_toy
from caloman.toy.plots import plot_manifold_toy, plot_toy

logger = logging.getLogger("caloman")

EPILOG = """\
examples:
  caloman toy double-donut --method flow --out toy/donut-flow
  caloman toy four-gaussians --method laser-hmc --out toy/gauss-hmc --seed 2
  caloman toy three-rings --method dctr --out /tmp/rings --quick
  caloman toy two-circles --method ebim --out toy/circles-ebim

writes DIR/metrics.json (emd, jsd and the paper-convention emd_paper, jsd_paper at the top
level; 'truth': the same for an independent truth sample, the noise floor) and DIR/toy.png.
The manifold toys (von-mises-mixture, two-circles, torus, sphere-mixture; methods ebim,
pushforward) report wasserstein (W2^2 of subsamples) and emd instead, and toy.png shows the
samples over the learned manifold."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "toy", help="known-truth experiment: train a method on a toy dataset, score it (EMD, JSD, W2)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--quick", action="store_true", help="tiny samples and few epochs (seconds; a smoke test)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=run)
    return parser


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"caloman": __version__, "numpy": np.__version__,
                                       "python": platform.python_version()}
    for package in ("torch", "zuko", "pot"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def run(args: argparse.Namespace) -> int:
    from caloman.evaluation import to_jsonable  # noqa: PLC0415

    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown toy dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if args.method not in METHODS:
        raise ConfigError(f"unknown toy method {args.method!r}; choose one of {', '.join(METHODS)}")
    settings = quick_settings() if args.quick else full_settings()
    manifold = DATASETS[args.dataset].manifold_dimension is not None
    logger.info("toy %s with %s (%s, seed %d): %d training points, %d evaluation points", args.dataset,
                args.method, "quick" if args.quick else "full", args.seed,
                settings.manifold_n_train if manifold else settings.n_train,
                settings.manifold_n_eval if manifold else settings.n_eval)
    with atomic_directory(args.out) as work:
        result = run_toy(args.dataset, args.method, settings, seed=args.seed)
        record = {**result.summary(), "profile": "quick" if args.quick else "full", "versions": _versions()}
        (work / "metrics.json").write_text(json.dumps(to_jsonable(record), indent=2) + "\n")
        if result.dataset.manifold_dimension is None:
            plot_toy(work / "toy.png", result.truth, result.output.samples, result.output.weights,
                     result.dataset.hist_range, method=args.method, dataset=args.dataset)
        else:
            plot_manifold_toy(work / "toy.png", result.truth, result.output.samples, result.output.zero_set,
                              method=args.method, dataset=args.dataset)
    scores = ", ".join(f"{name} {value:.4g} (truth {result.truth_metrics[name]:.4g})"
                       for name, value in result.metrics.items())
    logger.info("%s %s: %s -> %s", args.dataset, args.method, scores, args.out)
    return 0
