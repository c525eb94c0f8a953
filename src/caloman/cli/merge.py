"""``caloman merge PART... --out OUT.h5``: join the parts of a sharded generation."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from caloman.shards import merge_shards

logger = logging.getLogger("caloman.cli.merge")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge", help="join the parts written by `caloman generate --shard I/N`",
        description="Check that the parts come from one sharded generation (same run, seed, batch size, binning "
                    "and incident energies; every index once) and write them, in order, as one CaloChallenge file.")
    parser.add_argument("parts", type=Path, nargs="+", metavar="PART", help="the parts, in any order")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT.h5", help="merged file to write")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    merge_shards(args.parts, args.out)
    logger.info("merged %d parts into %s", len(args.parts), args.out)
    return 0
