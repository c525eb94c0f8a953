"""Generating showers from a trained model, in chunks, into CaloChallenge files.

:func:`generate` yields showers chunk by chunk (bounded memory for any count);
:func:`generate_to_file` streams them into an HDF5 file that appears only when
complete. Incident energies outside the range a model was trained on are
refused unless extrapolation is explicitly allowed, and every generated shower
is checked to be finite and non-negative.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from caloman.errors import ConfigError, EnergyRangeError, InvalidEnergyError
from caloman.io import ShowerFile, ShowerWriter, default_chunk_size
from caloman.models.base import ShowerModel
from caloman.progress import ProgressBar
from caloman.runs import LoadedRun, load_run
from caloman.shards import Shard, shard_attrs

logger = logging.getLogger("caloman.generation")

ENERGY_POLICIES = ("refuse", "warn")

#: Relative slack on the trained range: a held-out file's extreme energies differ from the training
#: split's by a hair (continuous spectra of datasets 2 and 3), which is no extrapolation.
RANGE_TOLERANCE = 0.01

_UNITS_MEV = {"mev": 1.0, "gev": 1e3, "tev": 1e6, "kev": 1e-3}


def format_energy(mev: float) -> str:
    """``4194.304`` GeV -> ``'4.19 TeV'``: three significant digits in the largest fitting unit."""
    for unit, scale in (("TeV", 1e6), ("GeV", 1e3), ("MeV", 1.0)):
        if abs(mev) >= scale:
            return f"{mev / scale:.3g} {unit}"
    return f"{mev * 1e3:.3g} keV"


def parse_energy(text: str | float) -> float:
    """An energy in MeV from ``'65536'`` (MeV), ``'65.5 GeV'``, ``'1TeV'``, ...

    Raises :class:`InvalidEnergyError` unless positive and finite.
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([-+0-9.eE]+)\s*([a-zA-Z]*)\s*", text)
        unit = m.group(2).lower() if m else ""
        try:
            if not m or (unit and unit not in _UNITS_MEV):
                raise ValueError
            value = float(m.group(1)) * _UNITS_MEV.get(unit, 1.0)
        except ValueError:
            raise InvalidEnergyError(f"cannot read energy {text!r}: give a number in MeV or a number with a unit "
                                     "(keV, MeV, GeV, TeV), e.g. 65536 or '65.5 GeV'") from None
    if not (math.isfinite(value) and value > 0):
        raise InvalidEnergyError(f"energy {text!r} must be positive and finite")
    return value


def incident_energies_from_file(path: str | Path, max_showers: int | None = None) -> np.ndarray:
    """The incident energies (N,) in MeV of a CaloChallenge file (``--energies-from``);
    its showers are not read."""
    with ShowerFile(path, check_values=False) as f:
        energies = f.incident_energies
    return energies[:max_showers] if max_showers is not None else energies


def fixed_incident_energy(energy: str | float, count: int) -> np.ndarray:
    """``count`` copies of one incident energy (``--energy E --count N``), in MeV."""
    if count < 1:
        raise InvalidEnergyError(f"--count must be >= 1, got {count}")
    return np.full(count, parse_energy(energy), dtype=np.float64)


def incident_energies_from(*, reference: str | Path | None = None, energy: str | float | None = None,
                           count: int | None = None) -> np.ndarray:
    """Incident energies (N,) in MeV from either a reference file or an energy and a count."""
    if (reference is None) == (energy is None):
        raise ConfigError("give either a reference file (--energies-from) or an energy with a count "
                          "(--energy E --count N)")
    if reference is not None:
        if count is not None:
            return incident_energies_from_file(reference, max_showers=count)
        return incident_energies_from_file(reference)
    if count is None:
        raise ConfigError("--energy needs --count N (the number of showers to generate)")
    return fixed_incident_energy(energy, count)


def check_energy_range(model: ShowerModel, incident_energies: np.ndarray, policy: str = "refuse") -> None:
    """Refuse (``policy="refuse"``, :class:`EnergyRangeError`) or log a warning
    (``"warn"``) when energies lie outside ``model.trained_energy_range()``."""
    if policy not in ENERGY_POLICIES:
        raise ConfigError(f"energy policy must be one of {', '.join(ENERGY_POLICIES)}, got {policy!r}")
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    if not (np.isfinite(energies).all() and (energies > 0).all()):
        raise InvalidEnergyError("incident energies must be positive and finite (MeV)")
    low, high = model.trained_energy_range()
    if not high > 0:
        message = ("the model has no trained energy range (its energy_range is unset: was it trained?); "
                   "re-train, or pass --allow-extrapolation to generate anyway")
    else:
        outside = (energies < low * (1 - RANGE_TOLERANCE)) | (energies > high * (1 + RANGE_TOLERANCE))
        if not outside.any():
            return
        asked = energies[outside]
        what = (format_energy(asked[0]) if np.all(asked == asked[0])
                else f"{outside.sum()} of {len(energies)} energies between {format_energy(asked.min())} and "
                     f"{format_energy(asked.max())}")
        message = (f"model trained on {format_energy(low)}..{format_energy(high)}; asked for {what}; "
                   "pass --allow-extrapolation to generate anyway")
    if policy == "refuse":
        raise EnergyRangeError(message)
    logger.warning("warning: extrapolating: %s", message.split("; pass")[0])


def generate(model: ShowerModel, incident_energies: np.ndarray, *, batch_size: int, seed: int,
             energy_policy: str = "refuse") -> Iterator[np.ndarray]:
    """Yield showers (n_chunk, n_voxels) in MeV, float32, for consecutive chunks
    of ``batch_size`` incident energies (N,) in MeV.

    Chunk ``i`` is sampled with torch's generator seeded from (``seed``, ``i``)
    inside :func:`torch.random.fork_rng`, so the same seed and batch size give
    the same showers and the caller's global RNG state is left untouched.
    Raises :class:`EnergyRangeError` for energies outside the trained range
    (unless ``energy_policy="warn"``) and :class:`InvalidEnergyError` if the
    model produces NaN, infinite or negative voxel energies.
    """
    # checks run now, not at the first next(): a plain function returning the generator
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    check_energy_range(model, energies, energy_policy)
    return (showers for showers, _ in _sample_chunks(model, energies, batch_size, seed))


def _sample_chunks(model: ShowerModel, energies: np.ndarray, batch_size: int, seed: int, first_chunk: int = 0
                   ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(showers (n, n_voxels) float32, the model's per-shower weights (n,) or None) per chunk;
    chunk k of ``energies`` is seeded as chunk ``first_chunk + k`` of the whole generation."""
    model.eval()
    device = _model_device(model)
    fork_devices = [device] if device.type == "cuda" else []
    n_voxels = None
    for index, start in enumerate(range(0, len(energies), batch_size), start=first_chunk):
        chunk = energies[start:start + batch_size]
        chunk_seed = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
        with torch.random.fork_rng(devices=fork_devices), torch.inference_mode():
            torch.manual_seed(chunk_seed)
            incident = torch.as_tensor(chunk, dtype=torch.float32, device=device)
            showers = model.sample(incident)
            weights = model.shower_weights(incident, showers)
        out = showers.detach().to("cpu", torch.float32).numpy()
        if out.ndim != 2 or out.shape[0] != len(chunk) or (n_voxels is not None and out.shape[1] != n_voxels):
            raise InvalidEnergyError(f"model.sample returned shape {out.shape} for {len(chunk)} energies; expected "
                                     f"({len(chunk)}, n_voxels): the model is broken")
        n_voxels = out.shape[1]
        _check_generated(out, chunk, start)
        yield out, None if weights is None else weights.detach().to("cpu", torch.float64).numpy()


def _check_generated(showers: np.ndarray, energies: np.ndarray, offset: int) -> None:
    bad = ~np.isfinite(showers).all(axis=1) | (showers < 0).any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        kind = "NaN or infinite" if not np.isfinite(showers[row]).all() else "negative"
        raise InvalidEnergyError(
            f"the model generated {kind} voxel energies (shower {offset + row}, incident energy "
            f"{format_energy(float(energies[row]))}); its weights are damaged or training diverged: re-train, or "
            "check the run's history.json for a loss that blew up")


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def default_batch_size(n_voxels: int) -> int:
    """Showers per generated chunk: about 4 M voxel values, at most 10,000."""
    return min(10_000, default_chunk_size(n_voxels))


def generate_to_file(run: str | Path | LoadedRun, out_path: str | Path, incident_energies: np.ndarray,
                     batch_size: int | None = None, seed: int = 0, energy_policy: str = "refuse", *,
                     attrs: dict[str, str | int | float] | None = None, shard: Shard | None = None) -> Path:
    """Generate one shower per incident energy (N,) in MeV with a trained run and
    stream them into a CaloChallenge HDF5 file at ``out_path`` (written
    atomically: it appears only once complete). Returns the path.

    With ``shard`` only that part of the energies is generated (whole chunks,
    each seeded as in the unsharded run, see :mod:`caloman.shards`), and the file
    records its place for :func:`caloman.shards.merge_shards`."""
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    if len(energies) == 0:
        raise InvalidEnergyError("no incident energies given: nothing to generate")
    n_voxels = loaded.binning.n_voxels
    batch_size = batch_size or default_batch_size(n_voxels)
    check_energy_range(loaded.model, energies, energy_policy)  # before anything is written
    file_attrs = {"generator": f"caloman {loaded.config.caloman_version}", "model_kind": loaded.config.model_kind,
                  "run_dir": str(loaded.run_dir.resolve()), "binning": loaded.binning.name, "seed": seed,
                  "batch_size": batch_size, **(attrs or {})}
    first_chunk = 0
    if shard is not None:
        first_chunk, start, stop = shard.chunk_range(len(energies), batch_size)
        file_attrs.update(shard_attrs(shard, energies, start, stop))
        energies = energies[start:stop]
    if loaded.refinement is not None:
        file_attrs["refinement"] = loaded.refinement["method"]
    weighted = loaded.model.weighted  # then every shower gets a weight (a `weights` dataset)
    t0 = time.perf_counter()
    with ShowerWriter(out_path, n_voxels, binning=loaded.binning, attrs=file_attrs, weights=weighted) as writer, \
            ProgressBar(len(energies), desc="generate", unit="shower") as bar:
        start = 0
        for showers, weights in _sample_chunks(loaded.model, energies, batch_size, seed, first_chunk):
            writer.append(energies[start:start + len(showers)], showers, weights)
            start += len(showers)
            bar.update(len(showers))
    seconds = time.perf_counter() - t0
    logger.info("generated %d showers in %.1f s (%.0f showers/s) into %s", len(energies), seconds,
                len(energies) / max(seconds, 1e-9), out_path)
    return Path(out_path)

