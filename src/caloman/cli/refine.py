"""``caloman refine RUN --data TRAIN.h5 --out REFINED``: refine a trained run with
DCTR weights (LaSeR, arXiv:2106.00792); see docs/refinement.md."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "refine", help="refine a trained run: DCTR reweighting, a latent refiner flow, or HMC in the latent space",
        description="Train a classifier between the run's samples and its training showers (never held-out "
                    "showers) and write a refined run that generate, evaluate, benchmark and export accept.",
        epilog="example: caloman refine runs/ds1 --data train.h5 --out runs/ds1-refined --method refiner")
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run directory written by caloman train")
    parser.add_argument("--data", required=True, type=Path, metavar="TRAIN.h5",
                        help="the run's training file (not the held-out file you evaluate with)")
    parser.add_argument("--out", required=True, type=Path, metavar="REFINED", help="refined run directory to write")
    parser.add_argument("--method", choices=("reweight", "refiner", "hmc"), default="reweight",
                        help="reweight: per-shower DCTR weights (a `weights` dataset from generate); refiner: a flow "
                             "on the latent fitted to p(z) w(z); hmc: Hamiltonian Monte Carlo on p(z) w(z) at "
                             "generation time (default reweight)")
    parser.add_argument("--profile", choices=("quick", "full"), default="quick",
                        help="classifier / refiner sizes and epochs (default quick: at most 20,000 showers)")
    parser.add_argument("--classifier", choices=("trees", "mlp"), default="trees",
                        help="DCTR classifier of the weights: trees (gradient-boosted trees like the strong test's, "
                             "cross-fitted, Platt-calibrated; default) or mlp (a small network)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of torch and of the trees (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples, splits and initial weights")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415 (keep `caloman --help` fast)

    from caloman.errors import ConfigError  # noqa: PLC0415
    from caloman.refinement.runs import RefineSettings, refine_run  # noqa: PLC0415

    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    settings = RefineSettings.profile(args.profile).with_options(dctr=args.classifier, threads=args.threads)
    config = refine_run(args.run_dir, args.data, args.out, method=args.method, profile=args.profile, seed=args.seed,
                        settings=settings)
    report = config["report"]
    weights = report["weights"]
    print(f"DCTR weights ({args.classifier}) of {weights['n']} generated showers: ESS fraction "
          f"{weights['ess_fraction']:.3f}, mean {weights['mean']:.3f}, "
          f"largest {', '.join(f'{w:.3g}' for w in weights['largest'])}")
    history = report.get("classifier_history")
    if isinstance(history, dict) and "out_of_fold_auc" in history:
        print(f"tree classifier, generated vs training showers: out-of-fold AUC {history['out_of_fold_auc']:.3f}")
    if "latent_weights" in report:
        print(f"latent weights E[w | z]: ESS fraction {report['latent_weights']['ess_fraction']:.3f}")
    if "hmc_trial" in report:
        print(f"HMC trial ({report['hmc_trial']['chains']} chains): acceptance rate "
              f"{report['hmc_trial']['acceptance_rate']:.3f}")
    print(f"wrote refined run {args.out} ({args.method})")
    return 0
