"""Command-line interface: ``caloman <command> ...``.

Each command lives in its own module exposing ``add_parser(subparsers)`` and
``run(args) -> int``; this module only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from caloman import __version__, progress
from caloman.allocator import keep_freed_memory
from caloman.errors import CalomanError, VoxelCountError

#: command name -> module (under caloman.cli) implementing it
COMMANDS = {
    "simulate": "simulate",
    "evaluate": "evaluate",
    "dimension": "dimension",
    "train": "train",
    "generate": "generate",
    "merge": "merge",
    "export": "export",
    "benchmark": "benchmark",
    "demo": "demo",
    "sensitivity": "sensitivity",
    "toy": "toy",
    "refine": "refine",
    "ood": "ood",
    "components": "components",
}
#: commands that generate many showers: they keep freed memory for reuse (caloman.allocator)
GENERATING_COMMANDS = frozenset({"generate", "benchmark", "demo", "refine"})


def add_binning_argument(parser: argparse.ArgumentParser, source: str, note: str = "") -> None:
    """The optional ``--binning`` of a command that reads a shower file; ``source``
    names, for the help text, the file whose voxel count picks it when left out
    (``note`` is appended to that help). Resolve it with :func:`resolve_binning`."""
    from caloman.geometry import BUILTIN_BINNINGS, builtin_voxel_counts  # noqa: PLC0415

    known = ", ".join(f"{n} {' or '.join(names)}" for n, names in sorted(builtin_voxel_counts().items()))
    parser.add_argument("--binning", default=None, metavar="BINNING",
                        help=f"{', '.join(BUILTIN_BINNINGS)} or the path of a CaloChallenge binning XML; "
                             f"default: inferred from the number of voxels in {source} ({known}){note}")


def resolve_binning(binning: str | None, path: str | Path) -> str:
    """``binning`` as given, or, when it is None, the shipped binning named by the
    voxel count of the shower file ``path`` (read from the file's shape alone).
    The inferred choice is printed to stderr; a count that names no shipped
    binning raises :class:`~caloman.errors.VoxelCountError` asking for --binning."""
    if binning is not None:
        return binning
    from caloman.geometry import binning_for_voxel_count  # noqa: PLC0415
    from caloman.io import read_voxel_count  # noqa: PLC0415

    n_voxels = read_voxel_count(path)
    try:
        name = binning_for_voxel_count(n_voxels)
    except VoxelCountError as exc:
        raise VoxelCountError(f"{path}: cannot infer the binning: {exc}; pass --binning with the name or the "
                              "binning XML the file was made with") from None
    print(f"binning: {name} (inferred from {n_voxels} voxels in {path})", file=sys.stderr)
    return name


def run_and_showers(args: argparse.Namespace):
    """For commands that score a run on a shower file (``components``, ``ood``): torch CPU
    threads from ``--threads``, the run from ``RUN``, and a seeded subset (``--max-showers``,
    ``--seed``) of ``--data`` in the run's binning. Returns (loaded run, energies, showers)."""
    import torch  # noqa: PLC0415

    from caloman.io import load_showers  # noqa: PLC0415
    from caloman.runs import load_run  # noqa: PLC0415

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = load_run(args.run_dir)
    energies, showers = load_showers(args.data, loaded.binning, max_showers=args.max_showers, subset_seed=args.seed)
    return loaded, energies, showers


def write_report(out: Path, stem: str, report: dict, text: str) -> None:
    """``STEM.json`` and the markdown ``STEM.md`` into the folder ``out``, all at once (a
    failure leaves nothing there); the markdown is echoed, then where both went."""
    import json  # noqa: PLC0415

    from caloman.io import atomic_directory  # noqa: PLC0415

    with atomic_directory(out) as work:
        (work / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (work / f"{stem}.md").write_text(text)
    print(text, end="" if text.endswith("\n") else "\n")
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'}")


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
    if args.command in GENERATING_COMMANDS:
        keep_freed_memory()
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
