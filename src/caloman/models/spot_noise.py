"""Continuous voxel fluctuations: each voxel as the energy of a Poisson number of Gamma spots.

A voxel of decoded mean energy m (MeV) is drawn as

    E = theta * Gamma(N k),   N ~ Poisson(m / (k theta)),

the sum of N spots whose visible energies are Gamma(k, theta) (a compound Poisson-Gamma,
or Tweedie, distribution): exactly zero when no spot landed, continuous above, with mean
m and variance m theta (1 + k). It is how a sampling calorimeter's cell fills (GFlash
spots, each with its own sampling fluctuation), and it contains the old lattice model
q Poisson(m / q) as its limit k -> infinity with k theta = q.

Calibration (:meth:`caloman.models.caloman.CaloManModel.fit_spot_noise`, with
:func:`fit_scales` and :func:`choose_shape`), on the autoencoder's reconstructions of
training showers: the scale theta is one number per (layer, ring, bin of reconstructed
energy), set so that E is above the readout threshold as often as the training voxels
were (occupancy matching, as for the old quanta); the spot shape k is one number per
layer, chosen by the censored likelihood of the near-threshold training voxels given
their reconstructed means (below the readout threshold only "below" is known).

Sampling is a deterministic map from explicit noise (one normal and one uniform per voxel
for N, :func:`~caloman.models.voxel_noise.poisson_counts`; one more normal per voxel for
the Gamma): Gamma(n k) is read from a table of its quantiles at standard-normal points
(linear interpolation; exact to 2e-4 in the CDF), for counts up to :data:`TABLE_COUNTS`,
and from the Wilson-Hilferty transform above (shape n k > 64 k there: CDF error about 6e-3
at shape 3, the smallest with k = 0.05, below 2e-3 from shape 10). ONNX has neither a
Gamma sampler nor an incomplete-gamma inverse; a table and a gather it has.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import special, stats
from torch import Tensor

from caloman.models.voxel_noise import poisson_counts, take

#: Counts of spots whose Gamma(n k) quantiles are tabulated (larger counts use Wilson-Hilferty).
TABLE_COUNTS = 64
#: Standard-normal points of the quantile table: -6 ... 6 in steps of 0.02.
TABLE_NORMAL_MIN, TABLE_NORMAL_STEP, TABLE_POINTS = -6.0, 0.02, 601
#: Candidate spot shapes k; the likelihood picks one per layer.
SHAPE_GRID = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Candidate spot scales theta, in units of the readout threshold (log-spaced, 30 per decade).
#: Dataset 1's fitted scales stay below 11 thresholds; datasets 2 and 3 read out at 15 keV and
#: need spots of up to a few thousand (a grid that ended at 200 lit far too many voxels there).
SCALE_GRID = np.geomspace(0.02, 2e5, 211)
#: The grid's first points, up to 200 thresholds: every calibration scans them; the rest of the
#: grid is computed only for the bins whose occupancy has not fallen to its target by then.
SCALE_GRID_FIRST = 121
#: Below this Poisson rate the compound distribution is summed term by term; above, a normal.
_EXACT_RATE_BELOW = 60.0
#: Terms of that sum: P(N > 128) < 1e-12 for rates below 60.
_MAX_TERMS = 128


def quantile_table(shapes: np.ndarray) -> Tensor:
    """Quantiles of Gamma(n k) (unit scale) for each layer's spot shape k (L,), n = 1 ...
    :data:`TABLE_COUNTS`, at the standard-normal points of the table: (L, TABLE_COUNTS,
    TABLE_POINTS) float32."""
    normals = TABLE_NORMAL_MIN + TABLE_NORMAL_STEP * np.arange(TABLE_POINTS)
    levels = stats.norm.cdf(normals)
    counts = np.arange(1, TABLE_COUNTS + 1, dtype=np.float64)
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 1, 1)
    table = special.gammaincinv(shapes * counts[None, :, None], levels[None, None, :])
    return torch.as_tensor(table, dtype=torch.float32)


def gamma_of_counts(counts: Tensor, shapes: Tensor, table_rows: Tensor, table: Tensor, normal: Tensor) -> Tensor:
    """Gamma(counts * shapes) (unit scale) as a function of standard normals, elementwise.

    counts: float spot counts (n, V) (0 gives 0); shapes: spot shape k per voxel (V,);
    table_rows: first row of each voxel's layer in the flattened table (V,) (layer *
    TABLE_COUNTS); table: (L * TABLE_COUNTS, TABLE_POINTS) quantiles (:func:`quantile_table`);
    normal: (n, V). Returns (n, V) in the dtype of ``normal``'s float type."""
    g = normal.clamp(TABLE_NORMAL_MIN, -TABLE_NORMAL_MIN)
    position = (g - TABLE_NORMAL_MIN) / TABLE_NORMAL_STEP
    lower = position.floor().clamp(max=TABLE_POINTS - 2)
    fraction = position - lower
    row = table_rows + counts.clamp(1, TABLE_COUNTS) - 1
    cell = (row * TABLE_POINTS + lower).long()
    flat = table.to(g.dtype).flatten()
    low, high = take(flat, cell), take(flat, cell + 1)
    tabulated = low + fraction * (high - low)
    shape = (counts * shapes).clamp_min(1.0)  # only used above TABLE_COUNTS, where it is > 64 k
    d = shape - 1.0 / 3.0
    wilson_hilferty = d * (1.0 + g / (9.0 * d).sqrt()).clamp_min(0).pow(3)
    values = torch.where(counts > TABLE_COUNTS, wilson_hilferty, tabulated)
    return torch.where(counts > 0, values, torch.zeros_like(values))


def spot_fluctuations(showers: Tensor, scales: Tensor, shapes: Tensor, table_rows: Tensor, table: Tensor,
                      normal: Tensor, uniform: Tensor, spot_normal: Tensor) -> Tensor:
    """Each voxel m of showers (n, V) in MeV drawn as theta Gamma(N k), N ~ Poisson(m / (k
    theta)), with scales theta (n, V) in MeV (theta = 0 keeps m), spot shapes k (V,) and the
    quantile table (see :func:`gamma_of_counts`); noise: ``normal`` and ``uniform`` (n, V)
    for N, ``spot_normal`` (n, V) for the Gamma. Non-negative, (n, V)."""
    spot_mean = (scales * shapes).clamp_min(1e-12)
    counts = poisson_counts(showers / spot_mean, normal, uniform)
    energies = gamma_of_counts(counts, shapes.to(showers.dtype), table_rows, table, spot_normal.to(showers.dtype))
    return torch.where(scales > 0, energies * scales, showers)


# -- calibration (numpy, at fit time) ---------------------------------------------------------
def occupancy(means: np.ndarray, scales: np.ndarray, shape: float, threshold: float) -> np.ndarray:
    """P(theta Gamma(N k) > threshold), N ~ Poisson(m / (k theta)), for broadcastable means m
    and scales theta (MeV); exact sum below a rate of 60, a normal approximation above."""
    means, scales = np.broadcast_arrays(np.asarray(means, np.float64), np.asarray(scales, np.float64))
    rate = means / (shape * scales)
    out = np.empty(means.shape)
    exact = rate < _EXACT_RATE_BELOW
    n = np.arange(1, _MAX_TERMS + 1, dtype=np.float64)
    r, s = rate[exact][..., None], scales[exact][..., None]
    out[exact] = (stats.poisson.pmf(n, r) * special.gammaincc(n * shape, threshold / s)).sum(-1)
    m, s = means[~exact], scales[~exact]
    out[~exact] = stats.norm.sf(threshold, loc=m, scale=np.sqrt(m * s * (1.0 + shape)))
    return out


def occupancy_curves(means: np.ndarray, shape: float, threshold: float,
                     grid: np.ndarray | None = None) -> np.ndarray:
    """:func:`occupancy` for means (B,) at every scale of ``grid * threshold`` (default
    :data:`SCALE_GRID`): (B, S). The same numbers, faster: the Gamma tail of each count is
    shared by all means."""
    scales = (SCALE_GRID if grid is None else grid) * threshold
    n = np.arange(1, _MAX_TERMS + 1, dtype=np.float64)
    tails = special.gammaincc(n[:, None] * shape, threshold / scales[None, :])  # (N, S)
    rate = means[:, None] / (shape * scales[None, :])  # (B, S)
    log_pmf = (n[None, None, :] * np.log(np.maximum(rate, 1e-300))[..., None] - rate[..., None]
               - special.gammaln(n + 1.0)[None, None, :])
    out = np.einsum("bsn,ns->bs", np.exp(log_pmf), tails)
    wide = rate >= _EXACT_RATE_BELOW
    if wide.any():
        m = np.broadcast_to(means[:, None], rate.shape)[wide]
        s = np.broadcast_to(scales[None, :], rate.shape)[wide]
        out[wide] = stats.norm.sf(threshold, loc=m, scale=np.sqrt(m * s * (1.0 + shape)))
    return out


def log_likelihood(means: np.ndarray, energies: np.ndarray, scales: np.ndarray, shape: float,
                   threshold: float) -> np.ndarray:
    """Log-likelihood of voxel energies (MeV, 0 = below the readout threshold) under the
    model with decoded means, scales (MeV) and spot shape, elementwise: the compound density
    above the threshold, log P(E <= threshold) for censored voxels."""
    means, energies, scales = (np.asarray(a, np.float64) for a in np.broadcast_arrays(means, energies, scales))
    rate = means / (shape * scales)
    out = np.empty(means.shape)
    lit = energies > 0
    dark = ~lit
    out[dark] = np.log(np.clip(1.0 - occupancy(means[dark], scales[dark], shape, threshold), 1e-300, None))
    exact = lit & (rate < _EXACT_RATE_BELOW)
    n = np.arange(1, _MAX_TERMS + 1, dtype=np.float64)
    r, e, s = rate[exact][..., None], energies[exact][..., None], scales[exact][..., None]
    terms = stats.poisson.logpmf(n, r) + stats.gamma.logpdf(e, n * shape, scale=s)
    out[exact] = special.logsumexp(terms, axis=-1)
    normal = lit & ~exact
    m, s = means[normal], scales[normal]
    out[normal] = stats.norm.logpdf(energies[normal], loc=m, scale=np.sqrt(m * s * (1.0 + shape)))
    return out


def match_occupancy(means: np.ndarray, occupancies: np.ndarray, shape: float, threshold: float,
                    weights: np.ndarray | None = None) -> np.ndarray:
    """Scale theta (MeV) per bin such that the model's occupancy equals the training
    occupancy, on the branch where occupancy falls as theta grows (few large spots, as the
    old quanta q >= threshold); the closest achievable value where none matches.

    means (B,) or (B, K): the bin's mean energy, or the mean energies of K sub-bins with
    ``weights`` (B, K) (their voxel counts): the model occupancy is then averaged over the
    sub-bins, since occupancy is far from linear in m near the threshold and the occupancy
    at a bin's mean is not its mean occupancy. occupancies (B,) -> theta (B,)."""
    means = np.asarray(means, np.float64)
    weights = None if weights is None else np.asarray(weights, np.float64)
    occupancies = np.asarray(occupancies, np.float64)
    first = SCALE_GRID[:SCALE_GRID_FIRST]
    curves = _model_curves(means, weights, shape, threshold, first)
    out = [_crossing(curve, target, first * threshold) for curve, target in zip(curves, occupancies)]
    # Bins still above their target at the first part's end need the rest of the grid (datasets 2, 3).
    short = [b for b, theta in enumerate(out) if theta is None]
    if short:
        grid = SCALE_GRID * threshold
        rest = _model_curves(means[short], None if weights is None else weights[short], shape, threshold,
                             SCALE_GRID[SCALE_GRID_FIRST:])
        for b, tail in zip(short, rest):
            theta = _crossing(np.concatenate([curves[b], tail]), occupancies[b], grid)
            out[b] = grid[-1] if theta is None else theta
    return np.array(out, dtype=np.float64)


def _crossing(curve: np.ndarray, target: float, grid: np.ndarray) -> float | None:
    """The scale of ``grid`` (MeV) where the occupancy ``curve`` first falls to ``target`` after
    its peak (log-linear interpolation between the grid points around it); the peak's scale
    if the peak is already at or below it; None if the curve never falls that far."""
    peak = int(curve.argmax())
    below = np.nonzero(curve[peak:] <= target)[0]
    if len(below) == 0:
        return None
    j = peak + int(below[0])
    if j == peak:
        return float(grid[peak])
    c0, c1 = curve[j - 1], curve[j]
    t = (c0 - target) / max(c0 - c1, 1e-300)
    return float(np.exp(np.log(grid[j - 1]) + t * (np.log(grid[j]) - np.log(grid[j - 1]))))


def _model_curves(means: np.ndarray, weights: np.ndarray | None, shape: float, threshold: float,
                  grid: np.ndarray) -> np.ndarray:
    """The model's occupancy per bin at the scales ``grid * threshold``: (B, S) for means (B,), or
    for sub-bin means (B, K) the average over the sub-bins weighted by ``weights`` (B, K)."""
    if means.ndim == 1:
        return occupancy_curves(means, shape, threshold, grid)
    used = weights > 0
    sub = np.zeros(means.shape + (len(grid),))
    sub[used] = occupancy_curves(means[used], shape, threshold, grid)
    return (sub * weights[..., None]).sum(1) / weights.sum(1, keepdims=True)


def fit_scales(counts: np.ndarray, mean_sums: np.ndarray, occupied: np.ndarray, shape: float,
               threshold: float, *, min_count: int = 200, min_each: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Scales theta (MeV) for the energy bins (B,) of one group of voxels (a ring of a layer)
    from sums of voxels, reconstructed energies and voxels above threshold, per bin (B,) or
    per sub-bin (B, K) of each bin.

    Where a bin has at least ``min_count`` voxels, ``min_each`` of them above and
    ``min_each`` below the threshold, theta matches the occupancy (:func:`match_occupancy`,
    averaged over the sub-bins); this includes the far tails, where the decoder's mean is
    tiny but real showers still light a voxel now and then. Every other bin (too few
    voxels, or always lit) takes the nearest fitted bin's value: far above the threshold the
    spot scale is not seen in the occupancy, and the spread around the reconstruction there
    is mostly the autoencoder's residual, which is correlated across voxels (adding it as
    independent voxel noise was measured and rejected, docs/caloman-model.md). With no bin
    fitted, NaN (the caller decides). Returns the scales and the mask of fitted bins."""
    sub = [np.asarray(a, np.float64) for a in (counts, mean_sums, occupied)]
    sub = [a[:, None] if a.ndim == 1 else a for a in sub]
    counts, mean_sums, occupied = (a.sum(1) for a in sub)
    means = mean_sums / np.maximum(counts, 1)
    rates = occupied / np.maximum(counts, 1)
    fitted = (counts >= min_count) & (means > 0) & (occupied >= min_each) & (counts - occupied >= min_each)
    out = np.full(len(counts), np.nan)
    if not fitted.any():
        return out, fitted
    weights = sub[0][fitted]
    out[fitted] = match_occupancy(sub[1][fitted] / np.maximum(weights, 1), rates[fitted], shape, threshold, weights)
    usable = np.nonzero(fitted)[0]
    nearest = np.abs(np.arange(len(counts))[:, None] - usable[None, :]).argmin(axis=1)
    return out[usable][nearest], fitted


def choose_shape(group_scales: dict[float, np.ndarray], means: np.ndarray, energies: np.ndarray,
                 cells: np.ndarray, threshold: float) -> tuple[float, dict[float, float]]:
    """The spot shape with the highest censored likelihood of sampled training voxels:
    ``group_scales`` maps each candidate k to the fitted scale table (flattened (group, bin)
    cells), ``means``/``energies`` (m,) are reconstructed and true voxel energies (MeV),
    ``cells`` (m,) their cell in the table. Pass voxels of the cells near the threshold
    (fitted by occupancy): there the spot shape decides the spectrum, while far above it
    the likelihood mostly measures the autoencoder's residuals. Returns the best k and the
    mean log-likelihood of every candidate; with no voxels, k = 1 and no scores."""
    if len(means) == 0:
        return 1.0, {}
    scores = {}
    for shape, scales in group_scales.items():
        theta = scales[cells]
        ok = np.isfinite(theta) & (theta > 0)
        scores[shape] = float(log_likelihood(means[ok], energies[ok], theta[ok], shape, threshold).mean())
    best = max(scores, key=scores.get)
    return best, scores


__all__ = ["TABLE_COUNTS", "SHAPE_GRID", "quantile_table", "gamma_of_counts", "spot_fluctuations", "occupancy",
           "log_likelihood", "match_occupancy", "fit_scales", "choose_shape"]
