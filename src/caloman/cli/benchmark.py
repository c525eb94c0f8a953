"""``caloman benchmark``: generation speed, training time, memory and fidelity in one table."""

from __future__ import annotations

import argparse
from pathlib import Path

from caloman.cli import add_binning_argument, resolve_binning
from caloman.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "benchmark", help="time generation, training and memory; evaluate fidelity; write a markdown table",
        description="Train (or load with --run) each model on built-in dataset-1 photon showers (or --data), "
                    "time generation per shower at batch 1, 100 and 10,000 on the CPU (and the GPU when one is "
                    "available) including post-processing to MeV, with PyTorch and, exported to ONNX, with ONNX "
                    "Runtime, time a re-built reference sampler with the "
                    "authors' architecture in the same run, evaluate on held-out showers, and write "
                    "OUT/benchmark.md and OUT/benchmark.json.")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"), metavar="DIR",
                        help="output directory (default results/benchmark); data and runs are re-used from it")
    parser.add_argument("--profile", choices=("quick", "full"), default="quick")
    parser.add_argument("--models", default="caloman", help="comma-separated model kinds (default caloman)")
    parser.add_argument("--run", type=Path, metavar="RUN", help="benchmark this trained run (one model only)")
    parser.add_argument("--data", type=Path, metavar="TRAIN.h5", help="training file (default: simulate)")
    parser.add_argument("--reference", type=Path, metavar="REF.h5", help="held-out reference file")
    add_binning_argument(parser, "--reference", "; without --reference, RUN's binning, else ds1-photons (the "
                         "built-in data are simulated in it)")
    parser.add_argument("--classifier", choices=("strong", "full", "quick", "none"), default="strong",
                        help="classifier test of the fidelity evaluation (default strong: boosted trees per incident "
                             "energy; full: the challenge protocol, hours on CPU; quick: unit tests only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for the timings (default 2)")
    parser.add_argument("--batch-sizes", default="1,100,10000", help="comma-separated (default 1,100,10000)")
    parser.add_argument("--no-reference-sampler", action="store_true",
                        help="skip timing the re-built authors' sampler architecture")
    parser.add_argument("--no-onnx", action="store_true",
                        help="skip exporting each model to ONNX and timing it with ONNX Runtime")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from caloman.benchmark import BenchmarkConfig, run_benchmark

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.run is not None and len(models) != 1:
        raise ConfigError("--run benchmarks one trained run: give exactly one --models entry")
    if (args.data is None) != (args.reference is None):
        raise ConfigError("give both --data and --reference, or neither (then built-in showers are simulated)")
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError as exc:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from exc
    config = BenchmarkConfig(binning=_binning(args), profile=args.profile, models=models, batch_sizes=batch_sizes,
                             threads=args.threads, seed=args.seed, classifier=args.classifier,
                             reference_sampler=not args.no_reference_sampler, onnx=not args.no_onnx)
    report = run_benchmark(args.out, config, run_dirs={models[0]: args.run} if args.run else None,
                           train_file=args.data, reference_file=args.reference)
    print(f"benchmark: {Path(args.out) / 'benchmark.md'} ({report['seconds']:.0f} s)")
    return 0


def _binning(args: argparse.Namespace) -> str:
    """``--binning``; else the one ``--reference``'s voxel count names; else ``--run``'s own;
    else dataset-1 photons."""
    if args.binning is not None or args.reference is not None:
        return resolve_binning(args.binning, args.reference)
    if args.run is not None:
        from caloman.runs import read_run_config  # noqa: PLC0415

        return read_run_config(args.run).binning_key
    return "ds1-photons"
