"""``caloman simulate``: write parameterised EM showers in the CaloChallenge format."""

from __future__ import annotations

import argparse
import logging
import time

from caloman.errors import ConfigError
from caloman.geometry import BUILTIN_BINNINGS, load_binning
from caloman.simulation.detector import detector_for
from caloman.simulation.energies import parse_energy_spec
from caloman.simulation.simulator import block_size, simulate_to_file

logger = logging.getLogger("caloman")

DESCRIPTION = """\
Simulate electromagnetic showers with the built-in parameterised (GFlash-style)
simulator and write them as a CaloChallenge HDF5 file. This is a physics
parameterisation (Grindhammer & Peters, hep-ex/0001020), NOT Geant4.
Showers are photon/electron (EM) showers only: with --binning ds1-pions the
file holds EM showers in the pion binning, not a hadronic simulation.
No readout threshold is applied (the evaluation applies it)."""

EPILOG = """\
examples:
  caloman simulate --binning ds1-photons --energies ladder --per-energy 1000 --seed 1 --out showers.h5
  caloman simulate --binning ds2 --energies loguniform:1000:1000000 --count 10000 --seed 2 --out ds2.h5
  caloman simulate --binning ds1-photons --energies from:reference.h5 --seed 3 --out sim.h5"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "simulate", help="simulate parameterised EM showers (GFlash-style, not Geant4) into a CaloChallenge file",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binning", default="ds1-photons",
                        help=f"binning name ({', '.join(BUILTIN_BINNINGS)}) or binning XML path "
                             "(default ds1-photons; ds1-pions gives EM showers, not pions)")
    parser.add_argument("--energies", default="ladder",
                        help="incident energies: 'ladder' (2^8..2^22 MeV, --per-energy each), "
                             "'loguniform:LOW:HIGH' in MeV (--count showers) or 'from:FILE.h5' (default ladder)")
    parser.add_argument("--per-energy", type=int, default=None, help="showers per ladder energy")
    parser.add_argument("--count", type=int, default=None, help="number of log-uniform showers")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1); same seed, same file")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="showers per write (memory only; the output does not depend on it)")
    parser.add_argument("--out", required=True, help="output HDF5 path (written atomically)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.chunk_size is not None and args.chunk_size < 1:
        raise ConfigError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    binning = load_binning(args.binning)
    energies = parse_energy_spec(args.energies, per_energy=args.per_energy, count=args.count, seed=args.seed)
    detector = detector_for(binning)
    logger.info("simulating %d EM showers in %s with %s (block %d, seed %d)", energies.shape[0], binning.name,
                detector.name, block_size(binning), args.seed)
    start = time.perf_counter()
    path = simulate_to_file(args.out, binning, energies, seed=args.seed, chunk_size=args.chunk_size,
                            detector=detector, attrs={"energies": args.energies})
    elapsed = time.perf_counter() - start
    logger.info("wrote %s: %d showers x %d voxels in %.1f s (%.2f ms/shower)", path, energies.shape[0],
                binning.n_voxels, elapsed, 1e3 * elapsed / max(1, energies.shape[0]))
    return 0
