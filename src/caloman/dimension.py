"""Intrinsic dimension of shower data: Levina-Bickel MLE with the
MacKay-Ghahramani correction (CaloMan paper, Eq. 2)::

    d_k = [ 1 / (n (k-1)) * sum_i sum_{j<k} log(T_k(x_i) / T_j(x_i)) ]^-1

with T_j(x_i) the Euclidean distance from x_i to its j-th nearest neighbour,
x_i itself excluded. Levina and Bickel average the per-point estimates (the
inverses of the bracket); MacKay and Ghahramani showed that the likelihood
of all points together averages the brackets and inverts once, which is less
biased (a per-point inverse of a noisy bracket overestimates d). The curve d_k over k
(2..50) is reported for raw voxels, for the model's preprocessed input and,
optionally, per incident energy; the latent dimension of the two-step model
defaults to the rounded value at k = 10 (the paper's choice, d_10 = 20).

k-nearest neighbours: exact, blocked brute force.
Trees (KD / ball) degrade to brute force in ~370 dimensions, and approximate
libraries (pynndescent, faiss) are not dependencies. Brute force is one
float32 GEMM per block of queries with |a-b|^2 = |a|^2 + |b|^2 - 2 a.b,
followed by a partial sort (``torch.topk``): 100,000 x 369 is ~3.7e12
multiply-adds. torch is used rather than numpy because its GEMM and its
top-k both run on all cores (numpy's ``argpartition`` is single threaded and
was 3-4x slower here); scikit-learn's brute-force ``NearestNeighbors`` is as
fast and is kept as ``method="sklearn"`` for cross-checks. The float32 trick
loses precision when neighbours are close compared with the norms (and need not
give exactly zero for duplicates), so it only *selects* candidates: the
distances to the ``k_max + 16`` candidates are recomputed exactly in float64
from coordinate differences and sorted. Duplicates therefore come out as
exact zeros and small distances are not eaten by cancellation.

Measured (100,000 x 369 random float32, k_max = 50, torch on 2 CPU cores shared
with other jobs, load ~5.5): 334 s wall for 147 s of CPU time, i.e. about 75 s
on two idle cores; 20,000 points take 1/25 of that. Details in docs/dimension.md.

Duplicates (distance 0) make log(T_k / T_j) infinite. They are handled twice:
:func:`estimate_dimension` deduplicates the points first (a repeated shower
is a point mass and says nothing about the dimension of the manifold; keeping
its copies would only weight it more), and :func:`levina_bickel`, which only
sees distances, skips zero-distance neighbours of each point (T_1 is the first
non-zero distance), so no input gives infinities or NaN.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caloman.errors import ConfigError
from caloman.features import apply_threshold
from caloman.geometry import Binning, load_binning
from caloman.io import ShowerFile
from caloman.progress import progress

logger = logging.getLogger(__name__)

#: kNN implementations accepted by :func:`knn_distances` ("auto" = "torch").
KNN_METHODS = ("auto", "torch", "sklearn")

#: Extra candidates taken from the float32 ranking before the exact float64
#: re-ranking, so rounding near the k_max-th neighbour cannot drop a true one.
_CANDIDATE_MARGIN = 16

#: The float32 distance block of one batch holds about this many values (256 MB).
_BLOCK_VALUES = 2**26

#: The float64 candidate differences of one refinement step hold about this many values.
_REFINE_VALUES = 2**22

#: The model's preprocessing whose output is the "preprocessed" curve.
PREPROCESSING = "paper"

#: Default k at which the latent dimension is read off (the paper's choice).
DEFAULT_RECOMMEND_K = 10


# -- nearest neighbours ------------------------------------------------------
def knn_distances(x: np.ndarray, k_max: int, *, method: str = "auto", batch_size: int | None = None,
                  seed: int = 0) -> np.ndarray:
    """Distances from every point to its ``k_max`` nearest neighbours.

    Parameters
    ----------
    x : (n, D) array of points (any float dtype; compared in float32, reported exactly in float64).
    k_max : number of neighbours, 1 <= k_max <= n - 1.
    method : "torch" (blocked float32 GEMM + top-k, the default for "auto") or
        "sklearn" (``NearestNeighbors(algorithm="brute")``); both exact.
    batch_size : queries per block; default keeps the (batch, n) float32 block near 256 MB.
    seed : unused by the exact methods here (they are deterministic); accepted so that
        callers pass one seed through and an approximate method can use it.

    Returns
    -------
    (n, k_max) float64 array, each row sorted ascending: column j-1 is T_j(x_i), the
    distance to the j-th nearest neighbour. The query's own index is excluded, so a
    duplicate of x_i elsewhere in ``x`` appears as an exact 0.
    """
    del seed  # deterministic methods only; see docstring
    x = _as_points(x)
    n = x.shape[0]
    if not 1 <= k_max <= n - 1:
        raise ValueError(f"k_max={k_max} needs 1 <= k_max <= n - 1 = {n - 1}; use more points or a smaller k")
    if method not in KNN_METHODS:
        raise ValueError(f"unknown kNN method {method!r}; choose one of {', '.join(KNN_METHODS)}")
    n_candidates = min(n - 1, k_max + _CANDIDATE_MARGIN)
    # Centring costs nothing and shrinks |a|^2 + |b|^2, hence the float32 cancellation error.
    centred = (x - x.mean(axis=0, dtype=np.float64)).astype(np.float32)
    if method == "sklearn":
        candidates = _candidates_sklearn(centred, n_candidates)
    else:
        candidates = _candidates_torch(centred, n_candidates, batch_size)
    return _exact_sorted_distances(x, candidates, k_max)


def _as_points(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected points of shape (n, D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("points contain NaN or infinite values; clean the input before estimating its dimension")
    return x


def _candidates_torch(x32: np.ndarray, n_candidates: int, batch_size: int | None) -> np.ndarray:
    """Indices (n, n_candidates) of the nearest points by float32 squared distance, self excluded."""
    import torch  # heavy import kept local: only this path needs it

    n = x32.shape[0]
    batch = batch_size or max(1, _BLOCK_VALUES // n)
    points = torch.from_numpy(x32)
    sq_norms = (points * points).sum(dim=1)
    out = np.empty((n, n_candidates), dtype=np.int64)
    starts = range(0, n, batch)
    with torch.no_grad():
        for start in progress(starts, desc="nearest neighbours", total=len(starts), unit="block"):
            stop = min(start + batch, n)
            d2 = torch.addmm(sq_norms[None, :], points[start:stop], points.T, alpha=-2.0)
            d2.add_(sq_norms[start:stop, None]).clamp_(min=0.0)  # rounding can make d^2 slightly negative
            rows = torch.arange(stop - start)
            d2[rows, rows + start] = float("inf")  # exclude the query itself by index, not by zero distance
            out[start:stop] = torch.topk(d2, n_candidates, dim=1, largest=False, sorted=False).indices.numpy()
    return out


def _candidates_sklearn(x32: np.ndarray, n_candidates: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    # kneighbors() without a query excludes each training point's own index.
    nn = NearestNeighbors(n_neighbors=n_candidates, algorithm="brute").fit(x32)
    return nn.kneighbors(return_distance=False)


def _exact_sorted_distances(x: np.ndarray, candidates: np.ndarray, k_max: int) -> np.ndarray:
    """Float64 distances from each point to its candidates, from coordinate differences, sorted."""
    n, n_cand = candidates.shape
    dim = x.shape[1]
    rows = max(1, _REFINE_VALUES // (n_cand * dim))
    out = np.empty((n, k_max), dtype=np.float64)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        query = x[start:stop, None, :].astype(np.float64)
        diff = x[candidates[start:stop]].astype(np.float64) - query
        dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        out[start:stop] = np.sort(dist, axis=1)[:, :k_max]
    return out


# -- the estimator -----------------------------------------------------------
def levina_bickel(distances: np.ndarray, k_values: Sequence[int]) -> np.ndarray:
    """Levina-Bickel MLE of the intrinsic dimension with MacKay-Ghahramani averaging.

    Parameters
    ----------
    distances : (n, K) sorted nearest-neighbour distances, self excluded (:func:`knn_distances`).
    k_values : neighbourhood sizes, each 2 <= k <= K.

    Returns
    -------
    (len(k_values),) float64: d_k = [mean_i (1/(k-1)) sum_{j<k} log(T_k / T_j)]^-1.

    Zero distances (duplicates of x_i) are skipped: for a point with z zero
    distances, T_j is read from column z + j - 1, and points with fewer than k
    non-zero distances do not enter d_k. d_k is infinite only if every used
    point has its k neighbours all at the same distance.
    """
    dist = np.asarray(distances, dtype=np.float64)
    if dist.ndim != 2 or dist.shape[1] < 2:
        raise ValueError(f"expected distances of shape (n, K) with K >= 2, got {dist.shape}")
    if not np.isfinite(dist).all() or (dist < 0).any():
        raise ValueError("distances must be finite and non-negative")
    if (np.diff(dist, axis=1) < 0).any():
        raise ValueError("each row of distances must be sorted ascending (nearest first)")
    ks = _check_k_values(k_values, dist.shape[1])

    n_points, n_cols = dist.shape
    n_zero = (dist <= 0).sum(axis=1)
    # Shift each row left past its zeros; padding columns are marked invalid by `usable`.
    cols = np.minimum(n_zero[:, None] + np.arange(n_cols)[None, :], n_cols - 1)
    shifted = np.take_along_axis(dist, cols, axis=1)
    log_t = np.log(np.where(shifted > 0, shifted, 1.0))
    cum_log = np.cumsum(log_t, axis=1)
    n_nonzero = n_cols - n_zero

    estimates = np.empty(len(ks))
    for m, k in enumerate(ks):
        usable = n_nonzero >= k
        if not usable.any():
            raise ValueError(
                f"no point has {k} non-zero neighbour distances (n={n_points}); deduplicate the points "
                "or compute more neighbours")
        # sum_{j<k} log(T_k / T_j) = (k - 1) log T_k - sum_{j<k} log T_j
        per_point = ((k - 1) * log_t[usable, k - 1] - cum_log[usable, k - 2]) / (k - 1)
        mean = per_point.mean()
        estimates[m] = 1.0 / mean if mean > 0 else np.inf
    return estimates


def _check_k_values(k_values: Sequence[int], k_available: int) -> tuple[int, ...]:
    ks = tuple(int(k) for k in k_values)
    if not ks:
        raise ValueError("k_values is empty; give at least one k >= 2")
    bad = [k for k in ks if not 2 <= k <= k_available]
    if bad:
        raise ValueError(f"k values {bad} out of range: need 2 <= k <= {k_available} (neighbours available)")
    return ks


def deduplicate(x: np.ndarray) -> np.ndarray:
    """The distinct rows of ``x`` (n_distinct, D), in sorted order; -0.0 and 0.0 count as equal."""
    x = np.asarray(x)
    if x.shape[0] == 0:
        return x
    return np.unique(x + 0.0, axis=0)  # + 0.0 turns -0.0 into 0.0, which np.unique compares bytewise


def estimate_dimension(x: np.ndarray, k_values: Sequence[int], *, method: str = "auto",
                       batch_size: int | None = None, seed: int = 0) -> np.ndarray:
    """d_k for each k in ``k_values`` on points ``x`` (n, D), duplicates removed first.

    Returns (len(k_values),) float64. See :func:`knn_distances` for the other arguments.
    """
    points = deduplicate(_as_points(x))
    ks = _check_k_values(k_values, points.shape[0] - 1)
    distances = knn_distances(points, max(ks), method=method, batch_size=batch_size, seed=seed)
    return levina_bickel(distances, ks)


# -- results -----------------------------------------------------------------
@dataclass(frozen=True, eq=False)  # eq=False: fields hold arrays, whose == is elementwise
class DimensionEstimate:
    """Intrinsic-dimension curves d_k of one data set, one curve per representation.

    ``estimates`` maps a label ("raw": voxel energies in MeV after the readout
    threshold; "preprocessed": the model's input; "E=1024MeV": raw voxels of the
    showers with that incident energy) to an array (len(k_values),).
    ``n_points`` and ``n_duplicates`` count the distinct points used and the
    duplicate rows dropped, per label.
    """

    k_values: tuple[int, ...]
    estimates: Mapping[str, np.ndarray]
    n_points: Mapping[str, int]
    n_duplicates: Mapping[str, int] = field(default_factory=dict)
    method: str = "torch"
    seconds: float = 0.0
    preprocessing: str = ""  # name of the preprocessing behind "preprocessed" ("" if none)

    def at(self, k: int, label: str | None = None) -> float:
        """d_k of one curve (default: see :meth:`recommended`)."""
        label = self.default_label() if label is None else label
        if label not in self.estimates:
            raise ConfigError(f"no dimension estimate labelled {label!r}; have {', '.join(self.estimates)}")
        if k not in self.k_values:
            raise ConfigError(
                f"k={k} was not estimated (k values: {_format_k(self.k_values)}); rerun `caloman dimension` "
                f"with --k including {k}")
        return float(self.estimates[label][self.k_values.index(k)])

    def recommended(self, k: int = DEFAULT_RECOMMEND_K, label: str | None = None) -> int:
        """Latent dimension for the two-step model: d_k rounded half up, at least 1.

        Read at k = 10 by default, the paper's choice (d_10 = 20 for dataset-1
        photons; small k overestimates, large k misses compact directions), on
        the "preprocessed" curve when present (that is what the autoencoder
        sees), else "raw", else the first label.
        """
        value = self.at(k, label)
        if not math.isfinite(value):
            raise ConfigError(
                f"d_{k} is not finite ({value}); the data are degenerate, set the latent dimension by hand")
        return max(1, math.floor(value + 0.5))

    def default_label(self) -> str:
        """The curve the latent dimension is read from: "preprocessed", else "raw", else the first."""
        for label in ("preprocessed", "raw"):
            if label in self.estimates:
                return label
        if not self.estimates:
            raise ConfigError("this dimension estimate holds no curves")
        return next(iter(self.estimates))

    def to_dict(self) -> dict:
        return {
            "k_values": list(self.k_values),
            "estimates": {label: [float(v) for v in values] for label, values in self.estimates.items()},
            "n_points": {label: int(v) for label, v in self.n_points.items()},
            "n_duplicates": {label: int(v) for label, v in self.n_duplicates.items()},
            "method": self.method,
            "seconds": float(self.seconds),
            "preprocessing": self.preprocessing,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (infinite estimates are written as ``Infinity``)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping) -> DimensionEstimate:
        """Inverse of :meth:`to_dict`; unknown keys (e.g. a CLI's ``config``) are ignored."""
        try:
            return cls(
                k_values=tuple(int(k) for k in data["k_values"]),
                estimates={label: np.asarray(v, dtype=np.float64) for label, v in data["estimates"].items()},
                n_points={label: int(v) for label, v in data["n_points"].items()},
                n_duplicates={label: int(v) for label, v in data.get("n_duplicates", {}).items()},
                method=str(data.get("method", "")),
                seconds=float(data.get("seconds", 0.0)),
                preprocessing=str(data.get("preprocessing", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"not a dimension estimate ({exc!r}); expected the output of `caloman dimension`") from exc

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> DimensionEstimate:
        """Read a ``dimension.json`` file (or its text)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.exists():
                raise ConfigError(f"{path}: no such file; run `caloman dimension` to create it")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"dimension estimate is not valid JSON ({exc}); re-run `caloman dimension`") from exc
        return cls.from_dict(data)


def _format_k(ks: Sequence[int]) -> str:
    return ", ".join(str(k) for k in ks)


# -- files -------------------------------------------------------------------
#: --per-energy groups showers by exact incident energy; more distinct values than
#: this means a continuous spectrum (datasets 2/3), where the grouping makes no sense.
_MAX_DISCRETE_ENERGIES = 64


def estimate_for_file(path: str | Path, binning: str | Path | Binning, k_values: Sequence[int], *,
                      max_showers: int | None = None, per_energy: bool = False, preprocess: bool = True,
                      seed: int = 0, method: str = "auto", batch_size: int | None = None) -> DimensionEstimate:
    """Dimension curves of a CaloChallenge file.

    "raw": voxel energies in MeV with the readout threshold applied;
    "preprocessed" (``preprocess=True``): the model's preprocessing ("paper"),
    fitted on the same showers; per incident energy (``per_energy=True``): raw
    voxels of each energy group, labelled "E=<MeV>MeV" (d_k is invariant under
    the per-energy rescaling of the paper's preprocessing, so raw is used).
    ``max_showers`` draws that many showers at random (``seed``) instead of
    using the whole file.
    """
    t0 = time.perf_counter()
    binning = load_binning(binning)
    ks = tuple(int(k) for k in k_values)
    if not ks or min(ks) < 2:
        raise ConfigError(f"k values must all be >= 2 (T_1 .. T_(k-1) enter d_k), got {list(ks)}")
    incident, showers = _read_sample(Path(path), binning, max_showers, seed)
    if showers.shape[0] < max(ks) + 1:
        raise ConfigError(
            f"{path}: {showers.shape[0]} showers cannot give {max(ks)} neighbours each; "
            f"use more showers (--max-showers) or a smaller largest k")
    raw = apply_threshold(showers, binning.readout_threshold)

    curves: dict[str, np.ndarray] = {}
    n_points: dict[str, int] = {}
    n_dup: dict[str, int] = {}

    def add(label: str, x: np.ndarray, *, required: bool = True) -> None:
        points = deduplicate(x)
        if points.shape[0] < max(ks) + 1:
            message = (f"{path} ({label}): {points.shape[0]} distinct showers of {x.shape[0]} cannot give "
                       f"{max(ks)} neighbours each")
            if required:
                raise ConfigError(f"{message}; use more showers (--max-showers) or a smaller largest k")
            logger.warning("%s; skipped", message)
            return
        distances = knn_distances(points, max(ks), method=method, batch_size=batch_size, seed=seed)
        curves[label] = levina_bickel(distances, ks)
        n_points[label], n_dup[label] = int(points.shape[0]), int(x.shape[0] - points.shape[0])

    add("raw", raw)
    if preprocess:
        add("preprocessed", _preprocess(incident, raw, binning))
    if per_energy:
        for energy in _discrete_energies(incident, path):
            add(f"E={_format_energy(energy)}MeV", raw[incident == energy], required=False)
    resolved = "torch" if method == "auto" else method
    return DimensionEstimate(k_values=ks, estimates=curves, n_points=n_points, n_duplicates=n_dup,
                             method=resolved, seconds=time.perf_counter() - t0,
                             preprocessing=PREPROCESSING if preprocess else "")


def _read_sample(path: Path, binning: Binning, max_showers: int | None, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Incident energies (m,) and showers (m, V) of all showers or ``max_showers`` drawn at random."""
    with ShowerFile(path, binning, check_values=False) as f:  # chunks are validated as they are read
        n = f.n_showers
        if max_showers is None or max_showers >= n:
            keep = None
        else:
            if max_showers < 1:
                raise ConfigError(f"--max-showers must be positive, got {max_showers}")
            # A random subset, not the first rows: files may be ordered by incident energy.
            keep = np.sort(np.random.default_rng(seed).choice(n, size=max_showers, replace=False))
        incident_parts, shower_parts = [], []
        start = 0
        for inc, sh in f.iter_chunks():
            stop = start + sh.shape[0]
            if keep is None:
                incident_parts.append(inc)
                shower_parts.append(sh)
            else:
                lo, hi = np.searchsorted(keep, [start, stop])
                incident_parts.append(inc[keep[lo:hi] - start])
                shower_parts.append(sh[keep[lo:hi] - start])
            start = stop
    if not shower_parts:
        raise ConfigError(f"{path}: the file holds no showers")
    return np.concatenate(incident_parts), np.concatenate(shower_parts)


def _preprocess(incident: np.ndarray, showers: np.ndarray, binning: Binning) -> np.ndarray:
    """The model's input (N, D): the paper's preprocessing fitted on these showers."""
    from caloman.preprocessing import make_preprocessing  # imports torch; only needed here

    pre = make_preprocessing(PREPROCESSING, binning).fit(incident, showers)
    x = np.asarray(pre.forward(incident, showers), dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != showers.shape[0]:
        raise ConfigError(f"preprocessing {PREPROCESSING!r} returned shape {x.shape}, expected ({showers.shape[0]}, D)")
    return x


def _discrete_energies(incident: np.ndarray, path: str | Path) -> np.ndarray:
    energies = np.unique(incident)
    if energies.size > _MAX_DISCRETE_ENERGIES:
        raise ConfigError(
            f"{path}: {energies.size} distinct incident energies; --per-energy needs the discrete energies of "
            "dataset 1 (15 values), drop --per-energy for continuous spectra")
    return energies


def _format_energy(energy: float) -> str:
    return str(int(round(energy))) if abs(energy - round(energy)) < 1e-6 * max(1.0, energy) else f"{energy:g}"
