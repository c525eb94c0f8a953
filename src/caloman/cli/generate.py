"""``caloman generate RUN --out OUT.h5``: sample showers from a trained run.

With ``--shard I/N`` only part I of N is written (``caloman merge`` joins the parts);
under ``torchrun --nproc-per-node N`` each process writes one part and rank 0 merges
them into OUT.h5."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from caloman.distributed import environment_world_size, joined
from caloman.generation import generate_to_file, incident_energies_from, parse_energy
from caloman.runs import load_run
from caloman.shards import Shard, merge_shards

logger = logging.getLogger("caloman.cli.generate")


def _energy(text: str) -> float:
    try:
        return parse_energy(text)
    except Exception as exc:  # argparse reports ArgumentTypeError as a usage error
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="generate showers with a trained run",
        description="Generate one shower per incident energy with a trained run and write a CaloChallenge file.")
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="run directory written by caloman train")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--energies-from", type=Path, metavar="REF.h5",
                        help="use the incident energies of this CaloChallenge file (with --count: its first N)")
    source.add_argument("--energy", type=_energy, metavar="E",
                        help="one incident energy for all showers: MeV, or with a unit ('65.5GeV', '1TeV')")
    parser.add_argument("--count", type=int, metavar="N", help="number of showers (with --energy)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="showers per chunk (default: by voxel count)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT.h5", help="output file")
    parser.add_argument("--shard", type=_shard, metavar="I/N",
                        help="write only part I (1..N) of N, whole chunks seeded as in the unsharded run; join the "
                             "parts with `caloman merge`")
    parser.add_argument("--allow-extrapolation", action="store_true",
                        help="generate even for energies outside the model's trained range (with a warning)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    energies = incident_energies_from(reference=args.energies_from, energy=args.energy, count=args.count)
    loaded = load_run(args.run_dir)
    options = dict(batch_size=args.batch_size, seed=args.seed,
                   energy_policy="warn" if args.allow_extrapolation else "refuse")
    if args.shard is not None or environment_world_size() == 1:
        generate_to_file(loaded, args.out, energies, shard=args.shard, **options)
        return 0
    with joined() as distributed:  # under torchrun: one part per rank, rank 0 merges them
        count = distributed.world_size
        parts = [args.out.with_name(f".{args.out.name}.part{i}-of-{count}.h5") for i in range(1, count + 1)]
        try:
            generate_to_file(loaded, parts[distributed.rank], energies, shard=Shard(distributed.rank + 1, count),
                             **options)
            distributed.barrier()
            if distributed.is_main:
                merge_shards(parts, args.out)
            distributed.barrier()
        finally:
            parts[distributed.rank].unlink(missing_ok=True)
    return 0
