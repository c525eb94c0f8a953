"""Incident energies for simulated showers, in MeV.

Three sources: the dataset-1 ladder (2^8 ... 2^22 MeV, 256 MeV to ~4 TeV, a
fixed number of showers per energy), log-uniform in a range (as datasets 2
and 3, 1 GeV to 1 TeV), or the incident energies of an existing file (to
simulate a reference sample for a generated one). :func:`parse_energy_spec`
turns the command-line strings ``ladder``, ``loguniform:LOW:HIGH`` and
``from:FILE`` into arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caloman.errors import ConfigError, InvalidEnergyError
from caloman.io import ShowerFile

#: Dataset-1 incident energies are 2**k MeV for these k (256 MeV ... 4.19 TeV).
LADDER_EXPONENTS = tuple(range(8, 23))

#: Stream of the root SeedSequence used for incident energies (showers use another stream).
ENERGY_STREAM = 0


def ladder_energies(per_energy: int, exponents: tuple[int, ...] = LADDER_EXPONENTS) -> np.ndarray:
    """``per_energy`` showers at each 2**k MeV, grouped by energy in increasing
    order; shape (len(exponents) * per_energy,)."""
    if per_energy < 1:
        raise ConfigError(f"--per-energy must be at least 1, got {per_energy}")
    return np.repeat(2.0 ** np.asarray(exponents, dtype=np.float64), per_energy)


def loguniform_energies(count: int, low_mev: float, high_mev: float,
                        rng: np.random.Generator | int | None = None) -> np.ndarray:
    """``count`` energies drawn log-uniformly in [low, high] MeV, shape (count,).
    An int seed draws from the incident-energy stream of that seed."""
    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if not (np.isfinite(low_mev) and np.isfinite(high_mev) and 0 < low_mev <= high_mev):
        raise InvalidEnergyError(
            f"log-uniform range needs 0 < LOW <= HIGH (MeV), got {low_mev!r}..{high_mev!r}")
    generator = energy_generator(rng) if not isinstance(rng, np.random.Generator) else rng
    return np.exp(generator.uniform(np.log(low_mev), np.log(high_mev), size=count))


def energies_from_file(path: str | Path) -> np.ndarray:
    """The incident energies (MeV) of a CaloChallenge file, shape (N,)."""
    with ShowerFile(path, check_values=False) as f:
        return np.array(f.incident_energies, dtype=np.float64)


def energy_generator(seed: int | None) -> np.random.Generator:
    """The generator of the incident-energy stream of ``seed`` (independent of
    the shower stream, so the energies do not shift the showers)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(ENERGY_STREAM,))))


def parse_energy_spec(spec: str, *, per_energy: int | None = None, count: int | None = None,
                      seed: int | None = None) -> np.ndarray:
    """Incident energies (MeV) from a command-line string.

    * ``ladder``: dataset-1 energies 2^8..2^22 MeV, ``per_energy`` each;
    * ``loguniform:LOW:HIGH``: ``count`` energies log-uniform in [LOW, HIGH] MeV;
    * ``from:FILE``: the incident energies of an existing CaloChallenge file.
    """
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == "ladder" and not rest:
        if per_energy is None:
            raise ConfigError("--energies ladder needs --per-energy N (showers per energy)")
        return ladder_energies(per_energy)
    if kind == "loguniform":
        parts = rest.split(":")
        if len(parts) != 2:
            raise ConfigError(f"expected loguniform:LOW:HIGH in MeV (e.g. loguniform:1000:1000000), got '{spec}'")
        try:
            low, high = float(parts[0]), float(parts[1])
        except ValueError as exc:
            raise ConfigError(f"loguniform bounds must be numbers in MeV, got '{spec}'") from exc
        if count is None:
            raise ConfigError("--energies loguniform:LOW:HIGH needs --count N")
        return loguniform_energies(count, low, high, seed)
    if kind == "from" and rest:
        return energies_from_file(rest)
    raise ConfigError(
        f"unknown energy specification '{spec}': use 'ladder', 'loguniform:LOW:HIGH' (MeV) or 'from:FILE.h5'")
