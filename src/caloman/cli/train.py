"""``caloman train FILE [--binning B] --model M --out RUN``: train a model into a run directory.

Left out, the binning is the shipped one named by FILE's voxel count (with
--resume: the run's own binning). Under ``torchrun --nproc-per-node N -m caloman
train ...`` the N processes train one model data-parallel (:mod:`caloman.distributed`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from caloman.cli import add_binning_argument, resolve_binning
from caloman.config import ConfigFile, load_config
from caloman.distributed import joined
from caloman.errors import ConfigError
from caloman.geometry import Binning, load_binning
from caloman.models.base import ShowerModel
from caloman.runs import (
    CONFIG_FILE,
    default_model_factory,
    read_run_config,
    save_run,
    train_run,
)
from caloman.training import PROFILES, train_split
from caloman.training_data import load_training_data

logger = logging.getLogger("caloman.cli.train")

DEFAULT_MODEL = "caloman"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a shower model on a CaloChallenge file",
        description="Train a shower model stage by stage into a run directory (config.json, model.safetensors, "
                    "history.json, checkpoints/). Settings: profile < --config file < options.")
    parser.add_argument("file", type=Path, metavar="FILE", help="CaloChallenge HDF5 file with training showers")
    add_binning_argument(parser, "FILE", "; with --resume, the run's own binning")
    parser.add_argument("--model", default=None, help=f"model kind (default {DEFAULT_MODEL})")
    parser.add_argument("--out", required=True, type=Path, metavar="RUN", help="run directory to create")
    parser.add_argument("--profile", choices=PROFILES, default=None,
                        help="training budget and model size: quick (default; minutes on a CPU) or full (all "
                             "showers, 80 epochs per stage)")
    parser.add_argument("--model-profile", metavar="NAME", default=None,
                        help="model size of its own: quick, full, or a kind's extra one such as paper (the "
                             "published sizes); default: --profile")
    parser.add_argument("--config", type=Path, metavar="CFG.toml",
                        help="TOML file with [model], [training] and [data] settings")
    parser.add_argument("--model-option", action="append", default=None, metavar="KEY=VALUE",
                        help="set one field of the model's config, checked against it (repeatable), e.g. "
                             "--model-option autoencoder=mflow --model-option hidden=512,512; overrides the "
                             "config file's [model] table")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in RUN with its stored settings")
    parser.add_argument("--seed", type=int, help="seed of the split, initial weights and batches")
    parser.add_argument("--max-showers", type=int, metavar="N",
                        help="train on N showers of FILE drawn at random with the seed")
    parser.add_argument("--stream-chunk-showers", type=int, metavar="N",
                        help="stream the showers from FILE in shuffled chunks of N (at least the batch size) in "
                             "bounded memory, instead of holding them all (0, the default)")
    latent = parser.add_mutually_exclusive_group()
    latent.add_argument("--latent-dim", type=int, metavar="D", help="latent dimension (model option latent_dim)")
    latent.add_argument("--latent-dim-from", type=Path, metavar="DIMENSION.json",
                        help="take the latent dimension from `caloman dimension` output (its recommended value)")
    parser.set_defaults(func=run)
    return parser


def build_model(kind: str, binning: Binning, *, profile: str, overrides: dict[str, Any] | None) -> ShowerModel:
    """The models package's builder (looked up at call time so tests can substitute it)."""
    from caloman.models import build_model as build

    return build(kind, binning, profile=profile, overrides=overrides)


def _model_options(kind: str, options: list[str]) -> dict[str, Any]:
    """--model-option KEY=VALUE strings as typed overrides of the ``kind`` model's config."""
    from caloman.models import parse_model_options

    return parse_model_options(kind, options)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if args.resume:
        run_config = read_run_config(out)
        changed = [opt for opt, value in (("--profile", args.profile), ("--model-profile", args.model_profile),
                                          ("--config", args.config),
                                          ("--seed", args.seed), ("--max-showers", args.max_showers),
                                          ("--stream-chunk-showers", args.stream_chunk_showers),
                                          ("--model-option", args.model_option),
                                          ("--latent-dim", args.latent_dim),
                                          ("--latent-dim-from", args.latent_dim_from)) if value is not None]
        if changed:
            raise ConfigError(f"--resume continues {out} with the settings stored in {out / CONFIG_FILE}; drop "
                              f"{', '.join(changed)}, or start a new run with another --out")
        if args.model is not None and args.model != run_config.model_kind:
            raise ConfigError(f"{out} holds a '{run_config.model_kind}' run, not '{args.model}'")
        binning = run_config.load_binning()
        if args.binning is None:
            print(f"binning: {binning.name} (stored in {out / CONFIG_FILE})", file=sys.stderr)
        elif load_binning(args.binning).n_voxels != binning.n_voxels:
            raise ConfigError(f"{out} was trained with binning {run_config.binning_name} ({binning.n_voxels} voxels), "
                              f"not {args.binning}")
        training = run_config.training
        if run_config.data is not None and Path(args.file).resolve() != Path(run_config.data.path):
            logger.warning("warning: resuming with %s; the run started with %s", args.file, run_config.data.path)
        elif run_config.data is not None and run_config.data.changed():
            logger.warning("warning: %s changed (size or time) since the run started; training resumes only if "
                           "its showers are the same", args.file)
        model = default_model_factory(run_config.model_kind, run_config.model_config, binning)
    else:
        binning_name = resolve_binning(args.binning, args.file)
        file_config = load_config(args.config) if args.config is not None else ConfigFile(source="defaults")
        cli = {k: v for k, v in (("seed", args.seed), ("max_showers", args.max_showers),
                                 ("stream_chunk_showers", args.stream_chunk_showers)) if v is not None}
        profile = args.profile or "quick"
        kind = args.model or DEFAULT_MODEL
        options = _model_options(kind, args.model_option) if args.model_option else {}
        model_overrides = {**file_config.model, **options}
        if args.latent_dim is not None and args.model_option and any(
                o.partition("=")[0].strip() == "latent_dim" for o in args.model_option):
            raise ConfigError("latent_dim is set by both --latent-dim and --model-option; keep one")
        if args.latent_dim is not None:
            model_overrides["latent_dim"] = args.latent_dim
        elif args.latent_dim_from is not None:
            from caloman.dimension import DimensionEstimate

            model_overrides["latent_dim"] = DimensionEstimate.from_json(args.latent_dim_from).recommended()
            logger.info("latent dimension %d from %s", model_overrides["latent_dim"], args.latent_dim_from)
        training = file_config.training_config(profile, **cli)
        with joined(training.device) as distributed:
            logger.info("training %s on %s (%s) into %s", kind, args.file, binning_name, out)
            loaded = train_run(args.file, binning_name, out, model_kind=kind, profile=profile, training=training,
                               model_overrides=model_overrides, model_profile=args.model_profile, builder=build_model,
                               distributed=distributed)
        for line in loaded.history.summary_lines():
            logger.info("%s", line)
        logger.info("run saved in %s", out)
        return 0

    with joined(training.device) as distributed:
        data = load_training_data(args.file, binning, training, distributed)
        logger.info("training %s on %d showers of %s (%s, %d voxels) into %s", model.kind, data.n_showers,
                    args.file, binning.name, binning.n_voxels, out)
        history = train_split(model, data, training, out, resume=args.resume, distributed=distributed)
        if distributed is None or distributed.is_main:
            save_run(out, model, binning, training, history, run_config=run_config)
    for line in history.summary_lines():
        logger.info("%s", line)
    logger.info("run saved in %s", out)
    return 0
