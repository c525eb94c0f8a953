"""Which showers a training run uses, and how they are split.

A run trains on all showers of its file or, with ``max_showers``, on a seeded
random subset of them (files are often sorted by incident energy, so the first N
would cover only part of the spectrum); a seeded split then sets the validation
showers aside. :class:`SplitData` is what one process trains on: its showers and
the positions of its training and validation rows. In a data-parallel run
(:mod:`caloman.distributed`) each rank reads only its own share of the split
from the file.

With ``TrainingConfig.stream_chunk_showers`` the showers stay in the file:
:class:`StreamedSplit` holds only the row numbers and reads chunks of them when
training asks (:meth:`StreamedSplit.read`), so memory does not grow with the
number of showers. Both kinds give the same rows, split and fingerprint. With
``TrainingConfig.stream_cache`` the rows are first copied, once, into an
uncompressed file in the run directory (:func:`cached_split`), so that every
epoch reads raw float32 instead of inflating gzip.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from caloman.errors import ConfigError
from caloman.geometry import Binning
from caloman.io import INCIDENT_KEY, SHOWERS_KEY, ShowerFile, atomic_path, load_showers, subset_rows

if TYPE_CHECKING:
    from caloman.distributed import Distributed
    from caloman.training import TrainingConfig


@dataclass(frozen=True)
class SplitData:
    """Showers of one process: incident energies (n,) MeV, showers (n, n_voxels) MeV, and
    the rows ``train_idx`` / ``val_idx`` of them used for training / validation.
    ``n_showers`` counts the showers of the whole run (all ranks); ``fingerprint``
    identifies them (to refuse resuming on other data)."""

    incident_energies: np.ndarray
    showers: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    n_showers: int
    fingerprint: str

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Incident energies (n,) and showers (n, n_voxels) of rows ``positions`` (sorted)."""
        return self.incident_energies[positions], np.asarray(self.showers[positions])


@dataclass(frozen=True)
class StreamedSplit:
    """This process's showers left in the CaloChallenge file ``path``: its file rows
    ``rows`` (sorted), the positions ``train_idx`` / ``val_idx`` of its training and
    validation rows among them, ``n_showers`` and ``fingerprint`` as in :class:`SplitData`.
    :meth:`read` reads a chunk of them."""

    path: Path
    binning: Binning
    rows: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    n_showers: int
    fingerprint: str
    #: showers per contiguous stretch read from the file
    span: int

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Incident energies (n,) MeV and showers (n, n_voxels) MeV of rows ``positions`` (sorted),
        validated as they are read."""
        with ShowerFile(self.path, self.binning, check_values=False) as f:
            return f.read_rows(self.rows[positions], span=self.span)


#: What training reads its showers from.
TrainingShowers = SplitData | StreamedSplit


def stream_cache_path(run_dir: Path, rank: int = 0, world_size: int = 1) -> Path:
    """Where a streamed run keeps the uncompressed copy of this process's showers."""
    return run_dir / ("stream-cache.h5" if world_size == 1 else f"stream-cache-rank{rank}.h5")


def cached_split(data: StreamedSplit, path: Path) -> StreamedSplit:
    """``data`` read from an uncompressed copy of its rows at ``path`` (a CaloChallenge
    file: float64 incident energies, the showers in the source's dtype, contiguous, no
    filter). The copy is written chunk by chunk (values checked as they are read, once)
    and atomically, unless ``path`` already holds a copy of the same rows (an interrupted
    run resuming). Reading it returns the same arrays as reading the source, so training
    gives the same result; what changes is that an epoch copies raw bytes instead of
    inflating gzip (dataset 3: 6.8 s of a 17.5 s chunk of 4,096 showers, 2026-12-07)."""
    key = hashlib.sha256(np.ascontiguousarray(data.rows, dtype=np.int64).tobytes()).hexdigest()
    if not _holds_copy(path, data, key):
        n = len(data.rows)
        with atomic_path(path, suffix=".h5.tmp") as tmp, h5py.File(tmp, "w") as h5:
            energies = h5.create_dataset(INCIDENT_KEY, shape=(n, 1), dtype=np.float64)
            showers = None
            for start in range(0, n, data.span):
                e, x = data.read(np.arange(start, min(start + data.span, n)))
                if showers is None:
                    showers = h5.create_dataset(SHOWERS_KEY, shape=(n, x.shape[1]), dtype=x.dtype)
                energies[start:start + len(e), 0] = e
                showers[start:start + len(e)] = x
            h5.attrs.update({"cache_of": str(data.path), "rows_sha256": key, "fingerprint": data.fingerprint})
    return dataclasses.replace(data, path=path, rows=np.arange(len(data.rows)))


def _holds_copy(path: Path, data: StreamedSplit, key: str) -> bool:
    """Whether ``path`` is a complete copy of ``data``'s rows (same rows and fingerprint)."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as h5:
            return (h5.attrs.get("rows_sha256") == key and h5.attrs.get("fingerprint") == data.fingerprint
                    and h5[SHOWERS_KEY].shape[0] == len(data.rows))
    except (OSError, KeyError):
        return False


def iter_chunks(data: TrainingShowers, positions: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``data``'s rows ``positions`` (sorted) read ``size`` at a time, in order."""
    for start in range(0, len(positions), size):
        yield data.read(positions[start:start + size])


def split_indices(n_showers: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of ``n_showers`` rows.

    Returns sorted (train, validation) index arrays; the validation set has
    ``round(validation_fraction * n)`` rows, at least one, and so does training.
    """
    if n_showers < 2:
        raise ConfigError(f"need at least 2 showers to split into training and validation, got {n_showers}")
    n_val = min(n_showers - 1, max(1, round(validation_fraction * n_showers)))
    perm = np.random.default_rng(seed).permutation(n_showers)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def data_fingerprint(incident_energies: np.ndarray, showers: Any) -> str:
    """SHA-256 of the incident energies, the shower array's shape and up to
    1024 evenly spaced showers: cheap, and enough to notice a different file
    or a different ``max_showers`` on resume. ``showers``: an array, or anything
    with ``shape`` whose ``[rows]`` reads those rows (:class:`_FileRows`)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(incident_energies, dtype=np.float64).tobytes())
    h.update(repr(tuple(showers.shape)).encode())
    rows = np.unique(np.linspace(0, max(0, len(showers) - 1), min(1024, len(showers))).astype(np.int64))
    h.update(np.ascontiguousarray(showers[rows], dtype=np.float32).tobytes())
    return h.hexdigest()


def subset_seed(seed: int) -> int:
    """The seed of the ``max_showers`` subset, a stream apart from the split's."""
    return int(np.random.SeedSequence([seed, 2]).generate_state(1)[0])


def split_in_memory(incident_energies: np.ndarray, showers: np.ndarray, config: TrainingConfig) -> SplitData:
    """Arrays (N,), (N, n_voxels) in MeV -> the run's showers (the seeded ``max_showers``
    subset, in file order) and their seeded split."""
    incident_energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    if config.max_showers is not None and len(incident_energies) > config.max_showers:
        rows = subset_rows(len(incident_energies), config.max_showers, subset_seed(config.seed))
        incident_energies, showers = incident_energies[rows], showers[rows]
    if len(incident_energies) != len(showers):
        raise ConfigError(f"{len(incident_energies)} incident energies for {len(showers)} showers")
    train_idx, val_idx = split_indices(len(showers), config.validation_fraction, config.seed)
    return SplitData(incident_energies, showers, train_idx, val_idx, len(showers),
                     data_fingerprint(incident_energies, showers))


def rank_rows(n_file: int, config: TrainingConfig, rank: int, world_size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rank ``rank``'s share of a file of ``n_file`` showers: (its file rows, sorted; the
    positions of its training rows among them; of its validation rows; the run's number
    of showers). Ranks take every ``world_size``-th row of the run's training and
    validation rows, so each spans the whole file; training shares are cut to one
    size (all ranks run the same number of batches), dropping at most
    ``world_size - 1`` training showers."""
    used = np.arange(n_file) if config.max_showers is None else subset_rows(n_file, config.max_showers,
                                                                             subset_seed(config.seed))
    train_idx, val_idx = split_indices(len(used), config.validation_fraction, config.seed)
    per_rank = len(train_idx) // world_size
    if per_rank < 1 or len(val_idx) < world_size:
        raise ConfigError(f"{len(used)} showers give {len(train_idx)} training and {len(val_idx)} validation showers, "
                          f"fewer than one of each for each of {world_size} processes; use more showers or processes "
                          "fewer")
    mine_train = used[train_idx[rank::world_size][:per_rank]]
    mine_val = used[val_idx[rank::world_size]]
    rows = np.sort(np.concatenate((mine_train, mine_val)))
    return rows, np.searchsorted(rows, mine_train), np.searchsorted(rows, mine_val), len(used)


@dataclass(frozen=True)
class _FileRows:
    """File rows ``rows`` of ``path`` as a read-only array of showers for :func:`data_fingerprint`."""

    path: Path
    binning: Binning
    rows: np.ndarray
    n_voxels: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.n_voxels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        with ShowerFile(self.path, self.binning, check_values=False) as f:  # few rows far apart: one at a time
            return f.read_rows(self.rows[positions], span=1)[1]


def load_training_data(path: str | Path, binning: Binning | str | Path, config: TrainingConfig,
                       distributed: Distributed | None = None) -> TrainingShowers:
    """Read the run's showers from a CaloChallenge file and split them; in a
    data-parallel run only this rank's share (:func:`rank_rows`) is read. With
    ``config.stream_chunk_showers`` nothing is read yet: a :class:`StreamedSplit`."""
    if config.stream_chunk_showers:
        return _streamed_split(Path(path), binning, config, distributed)
    if distributed is None:
        incident_energies, showers = load_showers(path, binning, max_showers=config.max_showers,
                                                  subset_seed=subset_seed(config.seed))
        return split_in_memory(incident_energies, showers, config)
    with ShowerFile(path, binning, check_values=False) as f:
        n_file = f.n_showers
    rows, train_idx, val_idx, n_used = rank_rows(n_file, config, distributed.rank, distributed.world_size)
    incident_energies, showers = load_showers(path, binning, rows=rows)
    prints = distributed.gather(data_fingerprint(incident_energies, showers))
    fingerprint = hashlib.sha256("".join(prints).encode()).hexdigest()
    return SplitData(incident_energies, showers, train_idx, val_idx, n_used, fingerprint)


def _streamed_split(path: Path, binning: Binning | str | Path, config: TrainingConfig,
                    distributed: Distributed | None) -> StreamedSplit:
    """The rows :func:`load_training_data` would read, left in the file."""
    with ShowerFile(path, binning, check_values=False) as f:
        binning, n_file, n_voxels, energies = f.binning, f.n_showers, f.n_voxels, f.incident_energies
    if distributed is None:
        rows = np.arange(n_file) if config.max_showers is None else subset_rows(n_file, config.max_showers,
                                                                                 subset_seed(config.seed))
        train_idx, val_idx = split_indices(len(rows), config.validation_fraction, config.seed)
        n_used = len(rows)
    else:
        rows, train_idx, val_idx, n_used = rank_rows(n_file, config, distributed.rank, distributed.world_size)
    fingerprint = data_fingerprint(energies[rows], _FileRows(path, binning, rows, n_voxels))
    if distributed is not None:
        fingerprint = hashlib.sha256("".join(distributed.gather(fingerprint)).encode()).hexdigest()
    return StreamedSplit(path, binning, rows, train_idx, val_idx, n_used, fingerprint,
                         span=config.stream_chunk_showers)
