"""Reading and writing CaloChallenge HDF5 shower files.

A file holds two datasets, both in MeV: ``incident_energies`` of shape (N, 1)
and ``showers`` of shape (N, n_voxels); a weighted sample (a DCTR-reweighted
generator, ``caloman refine --method reweight``) adds ``weights`` (N,), one
non-negative weight per shower. Files without weights are unweighted. Reading streams in chunks so that even
dataset 3 (40,500 voxels) never needs the whole file in memory; every value is
validated as it is read. Writing goes to a temporary file in the target
directory that is renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from caloman.errors import ConfigError, InvalidEnergyError, ShowerFileError, VoxelCountError
from caloman.geometry import Binning, load_binning

INCIDENT_KEY = "incident_energies"
SHOWERS_KEY = "showers"
WEIGHTS_KEY = "weights"

#: Showers read per chunk is chosen so a chunk holds about this many values.
_VALUES_PER_CHUNK = 4_000_000


def default_chunk_size(n_voxels: int) -> int:
    """Number of showers per streamed chunk for a given voxel count."""
    return max(1, _VALUES_PER_CHUNK // max(1, n_voxels))


class ShowerFile:
    """A validated, read-only CaloChallenge file opened for streaming.

    Use as a context manager::

        with ShowerFile("showers.h5", binning="ds1-photons") as f:
            for incident_energies, showers in f.iter_chunks():
                ...

    On open the keys, shapes, voxel count and incident energies are checked;
    with ``check_values=True`` (default) every voxel is scanned for NaN,
    infinities and negative values in one streaming pass. Chunks returned by
    :meth:`iter_chunks` and :meth:`read` are validated again as they are read.
    """

    def __init__(self, path: str | Path, binning: str | Path | Binning | None = None,
                 *, check_values: bool = True) -> None:
        self.path = Path(path)
        self.binning = load_binning(binning) if binning is not None else None
        self._h5 = _open_hdf5(self.path)
        try:
            self._showers = _checked_showers_dataset(self.path, self._h5, self.binning)
            self.incident_energies = self._read_incident_energies()
            if check_values:
                for _ in self.iter_chunks():
                    pass
        except BaseException:
            self._h5.close()
            raise

    def _read_incident_energies(self) -> np.ndarray:
        try:
            e = np.asarray(self._h5[INCIDENT_KEY][...], dtype=np.float64).reshape(-1)
        except OSError as exc:
            raise ShowerFileError(f"{self.path}: incident energies unreadable ({exc}); the file is corrupt") from exc
        bad = ~np.isfinite(e) | (e <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidEnergyError(
                f"{self.path}: incident energy of shower {i} is {_plain(e[i])} MeV; "
                "incident energies must be positive and finite (MeV)")
        return e

    # -- access ------------------------------------------------------------
    @property
    def has_weights(self) -> bool:
        return WEIGHTS_KEY in self._h5

    def read_weights(self) -> np.ndarray | None:
        """The per-shower weights (N,) float64, checked finite and non-negative, or None
        for a file without a ``weights`` dataset."""
        if not self.has_weights:
            return None
        try:
            w = np.asarray(self._h5[WEIGHTS_KEY][...], dtype=np.float64).reshape(-1)
        except (OSError, TypeError) as exc:
            raise ShowerFileError(f"{self.path}: weights unreadable ({exc}); the file is corrupt") from exc
        if len(w) != self.n_showers:
            raise ShowerFileError(f"{self.path}: {len(w)} weights for {self.n_showers} showers; the file is "
                                  "inconsistent")
        if not (np.isfinite(w).all() and (w >= 0).all()) or not w.sum() > 0:
            raise InvalidEnergyError(f"{self.path}: weights must be finite and non-negative with a positive sum")
        return w

    @property
    def attrs(self) -> dict[str, object]:
        """The file's HDF5 attributes (generator, seed, shard, ...) as plain Python values."""
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._h5.attrs.items()}

    @property
    def n_showers(self) -> int:
        return int(self._showers.shape[0])

    @property
    def n_voxels(self) -> int:
        return int(self._showers.shape[1])

    def __len__(self) -> int:
        return self.n_showers

    def read(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Incident energies (n,) and showers (n, n_voxels) of rows [start, stop), validated."""
        stop = self.n_showers if stop is None else min(stop, self.n_showers)
        try:
            block = np.asarray(self._showers[start:stop])
        except OSError as exc:
            raise ShowerFileError(
                f"{self.path}: showers {start}..{stop} unreadable ({exc}); the file is corrupt or truncated") from exc
        check_voxel_energies(block, where=f"{self.path}", offset=start)
        return self.incident_energies[start:stop], block

    def read_rows(self, rows: np.ndarray, *, span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Incident energies (n,) and showers (n, n_voxels) of the sorted file ``rows``, validated,
        read as contiguous stretches of at most ``span`` rows (default :func:`default_chunk_size`)
        so memory holds the result and one stretch."""
        rows = np.asarray(rows, dtype=np.int64)
        span = span or default_chunk_size(self.n_voxels)
        energies, showers = [], []
        i = 0
        while i < len(rows):
            start = int(rows[i])
            stop = min(start + span, int(rows[-1]) + 1)
            j = int(np.searchsorted(rows, stop))
            e, x = self.read(start, stop)
            energies.append(e[rows[i:j] - start])
            showers.append(x[rows[i:j] - start])
            i = j
        if len(showers) <= 1:
            return (energies[0], showers[0]) if showers else (np.zeros(0), np.zeros((0, self.n_voxels), np.float32))
        return np.concatenate(energies), np.concatenate(showers)

    def iter_chunks(self, chunk_size: int | None = None, *, stop: int | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (incident_energies, showers) chunks in file order."""
        size = chunk_size or default_chunk_size(self.n_voxels)
        end = self.n_showers if stop is None else min(stop, self.n_showers)
        for start in range(0, end, size):
            yield self.read(start, min(start + size, end))

    def close(self) -> None:
        self._h5.close()

    def __enter__(self) -> ShowerFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: float) -> str:
    """A number as users write it (``-4``, ``0.5``, ``nan``, ``inf``), never a numpy repr
    such as ``np.float32(-4.0)``; seven significant digits, the precision of float32."""
    return f"{float(value):.7g}"


def _open_hdf5(path: Path) -> h5py.File:
    if not path.exists():
        raise ShowerFileError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ShowerFileError(
            f"{path}: cannot be opened as HDF5 ({exc}); the file is corrupt or truncated, "
            "re-create or re-download it") from exc


def _checked_showers_dataset(path: Path, h5: h5py.File, binning: Binning | None) -> h5py.Dataset:
    """The showers dataset of an open file after checking keys, shapes and (with a binning) the voxel count."""
    missing = [k for k in (INCIDENT_KEY, SHOWERS_KEY) if k not in h5]
    if missing:
        raise ShowerFileError(
            f"{path}: missing dataset(s) {', '.join(missing)}; a CaloChallenge file needs "
            f"'{INCIDENT_KEY}' (N, 1) and '{SHOWERS_KEY}' (N, n_voxels)")
    inc, sh = h5[INCIDENT_KEY], h5[SHOWERS_KEY]
    if not isinstance(inc, h5py.Dataset) or not isinstance(sh, h5py.Dataset):
        raise ShowerFileError(f"{path}: '{INCIDENT_KEY}' and '{SHOWERS_KEY}' must be datasets, not groups")
    if sh.ndim != 2:
        raise ShowerFileError(
            f"{path}: '{SHOWERS_KEY}' must be 2-dimensional (N, n_voxels), has shape {sh.shape}")
    if inc.ndim not in (1, 2) or (inc.ndim == 2 and inc.shape[1] != 1):
        raise ShowerFileError(f"{path}: '{INCIDENT_KEY}' must have shape (N, 1), has {inc.shape}")
    if inc.shape[0] != sh.shape[0]:
        raise ShowerFileError(
            f"{path}: {inc.shape[0]} incident energies but {sh.shape[0]} showers; the file is inconsistent")
    if binning is not None and sh.shape[1] != binning.n_voxels:
        raise VoxelCountError(
            f"{path}: expected {binning.n_voxels} voxels from {Path(binning.source).name}, "
            f"file has {sh.shape[1]}; pass the binning the file was made with")
    return sh


def read_voxel_count(path: str | Path) -> int:
    """Voxels per shower of a CaloChallenge file, from its dataset shapes alone (no shower is read).

    Raises :class:`ShowerFileError` for a missing, unreadable or malformed file.
    """
    path = Path(path)
    with _open_hdf5(path) as h5:
        return int(_checked_showers_dataset(path, h5, None).shape[1])


def check_voxel_energies(showers: np.ndarray, *, where: str = "showers", offset: int = 0) -> None:
    """Raise :class:`InvalidEnergyError` for NaN, infinite or negative voxel energies."""
    finite = np.isfinite(showers)
    if not finite.all():
        row, col = (int(v) for v in np.argwhere(~finite)[0])
        raise InvalidEnergyError(f"{where}: shower {offset + row} has NaN or infinite voxel energies "
                                 f"({_plain(showers[row, col])} MeV in voxel {col})")
    if (showers < 0).any():
        row, col = (int(v) for v in np.argwhere(showers < 0)[0])
        raise InvalidEnergyError(
            f"{where}: shower {offset + row} has a negative voxel energy "
            f"({_plain(showers[row, col])} MeV in voxel {col})")


def subset_rows(n_showers: int, max_showers: int, seed: int) -> np.ndarray:
    """A uniformly random ``max_showers`` of ``n_showers`` rows, sorted (file order), drawn
    with ``numpy.random.default_rng(seed)``; all rows when ``max_showers >= n_showers``."""
    if max_showers >= n_showers:
        return np.arange(n_showers)
    return np.sort(np.random.default_rng(seed).choice(n_showers, max_showers, replace=False))


def load_showers(path: str | Path, binning: str | Path | Binning | None = None,
                 max_showers: int | None = None, subset_seed: int | None = None, *,
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a whole file into memory: all of it, its first ``max_showers``, with
    ``subset_seed`` a uniformly random ``max_showers`` of them (:func:`subset_rows`), or
    the given sorted ``rows``; always in file order, read chunk by chunk so only the
    selected showers are held (files sorted by energy need a random subset).

    Returns incident energies (N,) in MeV (float64) and showers (N, n_voxels).
    """
    with ShowerFile(path, binning, check_values=False) as f:
        if rows is None and max_showers is not None and subset_seed is not None and max_showers < f.n_showers:
            rows = subset_rows(f.n_showers, max_showers, subset_seed)
        if rows is not None:
            keep = np.zeros(f.n_showers, dtype=bool)
            keep[rows] = True
            stop = int(np.max(rows)) + 1 if len(rows) else 0
            chunks, offset = [], 0
            for energies, showers in f.iter_chunks(stop=stop):
                mask = keep[offset:offset + len(energies)]
                chunks.append((energies[mask], showers[mask]))
                offset += len(energies)
        else:
            stop = f.n_showers if max_showers is None else min(max_showers, f.n_showers)
            chunks = list(f.iter_chunks(stop=stop))
    if not chunks:
        return np.zeros(0), np.zeros((0, f.n_voxels), dtype=np.float32)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success,
    delete it on any error, so ``path`` is never left half written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates mode 0600; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success its entries
    replace those of the same name in ``path`` (created if missing; other
    entries there stay), on any error it is deleted, so a failed command leaves
    nothing new at ``path``."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"output folder {target} is an existing file; give a folder name")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)
    try:
        yield work
        if not target.exists():
            os.replace(work, target)
            return
        for entry in work.iterdir():
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(entry, destination)
        work.rmdir()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


class ShowerWriter:
    """Stream showers into a new CaloChallenge file, atomically.

    ::

        with ShowerWriter("out.h5", n_voxels=368) as w:
            w.append(incident_energies, showers)

    The file appears at its path only when the ``with`` block ends without error.
    """

    def __init__(self, path: str | Path, n_voxels: int, *, binning: str | Path | Binning | None = None,
                 dtype: np.dtype | type = np.float32, compression_level: int = 4,
                 attrs: dict[str, str | int | float] | None = None, weights: bool = False) -> None:
        self.path = Path(path)
        self.binning = load_binning(binning) if binning is not None else None
        self.weighted = weights
        if self.binning is not None and self.binning.n_voxels != n_voxels:
            raise VoxelCountError(
                f"{self.path}: binning {self.binning.name} has {self.binning.n_voxels} voxels, "
                f"writer asked for {n_voxels}")
        self.n_voxels = n_voxels
        self.dtype = np.dtype(dtype)
        self.compression_level = compression_level
        self.attrs = attrs or {}
        self.n_written = 0
        self._ctx = None
        self._h5: h5py.File | None = None

    def __enter__(self) -> ShowerWriter:
        self._ctx = atomic_path(self.path, suffix=".h5.tmp")
        tmp = self._ctx.__enter__()
        self._h5 = h5py.File(tmp, "w")
        rows = min(default_chunk_size(self.n_voxels), max(1, 2**18 // self.n_voxels))
        self._inc = self._h5.create_dataset(INCIDENT_KEY, shape=(0, 1), maxshape=(None, 1), dtype=self.dtype,
                                            chunks=(4096, 1), compression="gzip",
                                            compression_opts=self.compression_level)
        self._sh = self._h5.create_dataset(SHOWERS_KEY, shape=(0, self.n_voxels), maxshape=(None, self.n_voxels),
                                           dtype=self.dtype, chunks=(rows, self.n_voxels), compression="gzip",
                                           compression_opts=self.compression_level)
        if self.weighted:
            self._w = self._h5.create_dataset(WEIGHTS_KEY, shape=(0,), maxshape=(None,), dtype=np.float64,
                                              chunks=(4096,), compression="gzip",
                                              compression_opts=self.compression_level)
        for key, value in self.attrs.items():
            self._h5.attrs[key] = value
        return self

    def append(self, incident_energies: np.ndarray, showers: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Append showers (n, n_voxels) with incident energies (n,) or (n, 1), in MeV, and
        (a writer opened with ``weights=True``, then required) their weights (n,)."""
        assert self._h5 is not None, "use ShowerWriter as a context manager"
        inc = np.asarray(incident_energies, dtype=np.float64).reshape(-1, 1)
        sh = np.asarray(showers)
        if sh.ndim != 2 or sh.shape[1] != self.n_voxels:
            raise VoxelCountError(f"{self.path}: expected showers of shape (n, {self.n_voxels}), got {sh.shape}")
        if inc.shape[0] != sh.shape[0]:
            raise ShowerFileError(f"{self.path}: {inc.shape[0]} incident energies for {sh.shape[0]} showers")
        if not (np.isfinite(inc).all() and (inc > 0).all()):
            raise InvalidEnergyError(f"{self.path}: incident energies must be positive and finite")
        check_voxel_energies(sh, where=str(self.path), offset=self.n_written)
        n = sh.shape[0]
        if (weights is not None) != self.weighted:
            raise ConfigError(f"{self.path}: weights given to a writer opened with weights={self.weighted}"
                              if weights is not None else f"{self.path}: this writer needs weights for every shower")
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
            if len(w) != n or not (np.isfinite(w).all() and (w >= 0).all()):
                raise InvalidEnergyError(f"{self.path}: expected {n} finite non-negative weights, got {w.shape}")
            self._w.resize(self.n_written + n, axis=0)
            self._w[self.n_written:] = w
        self._inc.resize(self.n_written + n, axis=0)
        self._sh.resize(self.n_written + n, axis=0)
        self._inc[self.n_written:] = inc
        self._sh[self.n_written:] = sh
        self.n_written += n

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._h5 is not None and self._ctx is not None
        self._h5.close()
        self._ctx.__exit__(exc_type, exc, tb)


def write_showers(path: str | Path, incident_energies: np.ndarray, showers: np.ndarray, *,
                  binning: str | Path | Binning | None = None, dtype: np.dtype | type = np.float32,
                  attrs: dict[str, str | int | float] | None = None) -> Path:
    """Write a whole CaloChallenge file atomically; returns its path."""
    showers = np.asarray(showers)
    with ShowerWriter(path, showers.shape[1], binning=binning, dtype=dtype, attrs=attrs) as w:
        chunk = default_chunk_size(showers.shape[1])
        for start in range(0, showers.shape[0], chunk):
            w.append(np.asarray(incident_energies).reshape(-1)[start:start + chunk], showers[start:start + chunk])
    return Path(path)
