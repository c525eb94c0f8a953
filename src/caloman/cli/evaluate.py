"""``caloman evaluate``: compare generated showers with reference showers using
the CaloChallenge metrics; writes metrics.json, summary.md and plots."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from caloman.cli import add_binning_argument, resolve_binning
from caloman.errors import ConfigError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", help="compare generated showers with reference showers (CaloChallenge metrics)",
        description=__doc__.replace("``", ""),
        epilog="example: caloman evaluate --generated gen.h5 --reference ref.h5 --binning ds1-photons "
               "--out results/eval --classifier strong")
    parser.add_argument("--generated", required=True, type=Path, help="HDF5 file of generated showers")
    parser.add_argument("--reference", required=True, type=Path, help="HDF5 file of reference (Geant4) showers")
    add_binning_argument(parser, "--reference")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--classifier", choices=("full", "strong", "quick", "none"), default="full",
                        help="classifier tests: the challenge's full protocol (default; comparable with published "
                             "tables, hours on a CPU), strong (gradient-boosted trees, 3-fold, AUC per incident "
                             "energy: the strongest test, minutes on a CPU), quick (a small network for unit tests, "
                             "never evidence of fidelity), or none")
    parser.add_argument("--seed", type=int, default=42, help="seed of every random choice (default 42, jetnet's)")
    parser.add_argument("--max-showers", type=_positive_int, default=None,
                        help="use at most N showers of each file, a seeded random subset")
    parser.add_argument("--classifier-max-showers", type=_positive_int, default=None,
                        help="the classifier tests use at most N showers per class, a seeded random subset "
                             "(default: as many as the setting's memory and time bounds allow; see "
                             "docs/evaluation.md, 'Evaluation at scale')")
    parser.add_argument("--no-plots", action="store_true", help="skip the pictures")
    parser.add_argument("--no-distances", action="store_true", help="skip FPD/KPD and PRDC")
    parser.add_argument("--weights", action="store_true",
                        help="weight the generated showers by the file's `weights` dataset (written by `caloman "
                             "generate` for a `caloman refine --method reweight` run): histograms, separation "
                             "powers and the strong classifier test (needs --classifier strong or none)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from caloman.evaluation import EvaluationConfig, evaluate_files  # noqa: PLC0415 (keep `caloman --help` fast)

    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is an existing file; give a folder name")
    config = EvaluationConfig(classifier=args.classifier, seed=args.seed, max_showers=args.max_showers,
                              classifier_max_showers=args.classifier_max_showers,
                              fpd_kpd=not args.no_distances, prdc=not args.no_distances, plots=not args.no_plots,
                              weights=args.weights)
    if args.classifier == "full":
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            logging.getLogger("caloman.cli.evaluate").warning(
                "warning: the full classifier protocol (3 x 2048 network, up to 50 epochs per test) takes hours "
                "on a CPU (about 13 min per epoch for dataset-1 photons on two cores); --classifier strong "
                "takes minutes and sees more")
    binning = resolve_binning(args.binning, args.reference)
    metrics = evaluate_files(args.generated, args.reference, binning, args.out, config)
    separation = metrics["separation_power"]
    worst = max(separation, key=separation.get) if separation else None
    print(f"evaluated {metrics['n_showers']['generated']} generated against "
          f"{metrics['n_showers']['reference']} reference showers ({metrics['binning']})")
    if metrics.get("weights"):
        print(f"generated showers weighted: ESS fraction {metrics['weights']['ess_fraction']:.3f}, "
              f"largest weight {metrics['weights']['max']:.3g}")
    if worst is not None:
        print(f"separation power: E_tot/E_inc {separation.get('E_tot/E_inc', float('nan')):.4f}, "
              f"largest {separation[worst]:.4f} ({worst})")
    for kind, result in metrics["classifier"].items():
        error = f" +- {result['auc_error']:.4f}" if result.get("auc_error") is not None else ""
        line = f"classifier {kind} ({result['setting']}): AUC {result['auc']:.4f}{error}, JSD {result['jsd']:.4f}"
        per_energy = result.get("auc_per_energy") or {}
        if per_energy:
            worst = max(per_energy, key=per_energy.get)
            line += f"; largest at one energy {per_energy[worst]:.4f} ({worst} MeV)"
        print(line)
    for key in ("fpd", "kpd"):
        if metrics.get(key):
            print(f"{key.upper()} x 1e3: {metrics[key]['value']:.4f} +- {metrics[key]['error']:.4f}")
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'summary.md'}")
    return 0
