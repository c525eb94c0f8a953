"""Command-line interface: ``caloman <command> ...``.

Each command lives in its own module exposing ``add_parser(subparsers)`` and
``run(args) -> int``; this module only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from caloman import __version__, progress
from caloman.errors import CalomanError

#: command name -> module (under caloman.cli) implementing it
COMMANDS = {
    "simulate": "simulate",
    "evaluate": "evaluate",
    "dimension": "dimension",
    "train": "train",
    "generate": "generate",
    "benchmark": "benchmark",
    "demo": "demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caloman", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"caloman {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f"caloman.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"caloman.cli.{module}":
                continue  # command not implemented in this build
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    progress.enable(not args.quiet and sys.stderr.isatty())
    try:
        return int(args.func(args) or 0)
    except CalomanError as exc:
        print(f"caloman {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"caloman {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
