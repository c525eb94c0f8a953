"""CaloMan's voxel fluctuation model as a deterministic map from explicit noise.

Each voxel of decoded energy x (MeV) becomes q K, K ~ Poisson(x / q), with q the
voxel's energy quantum (:mod:`caloman.models.caloman` fits it). The draw takes one
number per voxel:

* rates x / q from ``EXACT_POISSON_BELOW`` up: the rounded normal approximation
  round(rate + sqrt(rate) g), g standard normal (skewness below 0.32 there);
* smaller rates: the exact Poisson quantile of a uniform u on [0, 1),
  K = #{k : P(K <= k) < u} (inverse-CDF sampling), evaluated in float64.

Both are functions of the explicit noise, so an exported ONNX graph (which has no
Poisson operator and no bucketize) computes them too: the energy bins of the quanta
come from a closed formula (:func:`quanta_bins`), and under tracing the Poisson
quantiles are found in a fixed number of stages of the same CDF (:func:`poisson_quantile`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Voxel-noise rates (x / q) below this are drawn from the exact Poisson distribution.
EXACT_POISSON_BELOW = 10.0
#: log10 of reconstructed voxel energy (MeV): bin edges of the voxel-noise quanta (uniform in log10).
QUANTA_BIN_EDGES = torch.linspace(-3.0, 7.0, 41, dtype=torch.float64)
#: Largest count of the exact Poisson draws, and the counts settled by the end of each stage
#: of its static-graph form (after 0 and 1, settled for all voxels at once). Rates below 10
#: exceed 39 with probability < 1e-12, far below the 2^-24 resolution of float32 uniforms, so
#: the cap never changes a count drawn from one.
POISSON_MAX_COUNT = 40
POISSON_STAGES = (8, 20, POISSON_MAX_COUNT)
#: Eagerly, more unsettled entries than this are searched rather than staged (faster for large batches).
SEARCH_ABOVE = 4096
_LOG_FACTORIALS = torch.tensor([math.lgamma(k + 1) for k in range(POISSON_MAX_COUNT)], dtype=torch.float64)


def quanta_bins(energies: Tensor) -> Tensor:
    """Index of each voxel's energy bin, ``torch.bucketize(log10(energies), QUANTA_BIN_EDGES)``
    with energies (any shape, MeV) clamped at 1e-30 MeV; int64, same shape."""
    return log10_bins(energies.clamp_min(1e-30).log10())


def log10_bins(log_energies: Tensor) -> Tensor:
    """``torch.bucketize(log_energies, QUANTA_BIN_EDGES)`` bit for bit, without bucketize,
    which ONNX lacks: the edges are j / 4 for j = -12..28, so the number of edges below v is
    ceil(4 v) + 12 clamped to [0, 41], which floating point gets exactly (a power-of-two
    scale, a ceiling, a small integer)."""
    step, first = float(QUANTA_BIN_EDGES[1] - QUANTA_BIN_EDGES[0]), float(QUANTA_BIN_EDGES[0])
    return ((log_energies / step).ceil() - first / step).clamp(0, QUANTA_BIN_EDGES.shape[0]).long()


def take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` for a 1-D ``values`` and an index of any shape. Eagerly one
    ``index_select`` on the flattened index, 3 to 4 times faster than advanced indexing on
    millions of entries; a traced graph gets the plain indexing (one ONNX Gather)."""
    if torch.jit.is_tracing():
        return values[index]
    return values.index_select(0, index.flatten()).view(index.shape)


def poisson_quantile(rate: Tensor, uniform: Tensor) -> Tensor:
    """The Poisson(rate) quantile of ``uniform``, #{k : P(K <= k) < u} (at most
    ``POISSON_MAX_COUNT``), for rates below ``EXACT_POISSON_BELOW`` and uniforms on [0, 1)
    of one shape; float64 counts of that shape.

    Counts 0 and 1 (most draws) are settled for every entry at once; the others go on
    through a fixed number of stages of k (:data:`POISSON_STAGES`; what a traced graph,
    which cannot stop early, computes) or, when many, as a search up k over the entries
    still unsettled (work follows the counts drawn). The two agree up to float64
    rounding of the CDF (tested).
    """
    lam, u = rate.double().flatten(), uniform.double().flatten()
    zero = lam.neg().exp()  # P(K = 0)
    pmf = zero * lam  # P(K = 1)
    cdf = zero + pmf  # P(K <= 1)
    more = cdf < u
    counts = (zero < u).to(lam.dtype) + more.to(lam.dtype)
    active = more.nonzero().squeeze(-1)  # counts of 2 and more
    rest = tuple(take(values, active) for values in (lam, u, pmf, cdf))
    # Few entries: per-operation overhead decides, and the stages take fewest operations.
    staged = torch.jit.is_tracing() or active.shape[0] <= SEARCH_ABOVE
    found = _counts_in_stages(*rest) if staged else _counts_by_search(*rest)
    return counts.scatter_(0, active, found).reshape(rate.shape)


def _counts_by_search(lam: Tensor, u: Tensor, pmf: Tensor, cdf: Tensor) -> Tensor:
    """Counts (m,) >= 2 for rates and uniforms (m,) given P(K = 1) and P(K <= 1) (m,): a
    search up k, P(K = k) = P(K = k - 1) rate / k, counting the k whose CDF is still below u.

    Every entry takes the same steps whether or not it is settled (the CDF only grows, so a
    settled entry adds nothing), and the entries still unsettled are gathered into smaller
    arrays only once they are fewer than half: a gather per step cost more than the steps."""
    counts = torch.full_like(lam, 2.0)
    position = None  # where the entries of the current arrays sit in ``counts`` (None: all, in order)
    pmf, cdf, found = pmf.clone(), cdf.clone(), torch.zeros_like(lam)
    for k in range(2, POISSON_MAX_COUNT):
        pmf = pmf.mul_(lam).div_(k)
        below = cdf.add_(pmf) < u
        found.add_(below)
        unsettled = int(below.sum())
        if unsettled == 0:
            break
        if 2 * unsettled < below.shape[0]:
            _add_at(counts, position, found)
            keep = below.nonzero().squeeze(-1)
            position = keep if position is None else position.index_select(0, keep)
            lam, u, pmf, cdf = (values.index_select(0, keep) for values in (lam, u, pmf, cdf))
            found = torch.zeros_like(lam)
    _add_at(counts, position, found)
    return counts


def _add_at(counts: Tensor, position: Tensor | None, values: Tensor) -> None:
    """counts[position] += values in place (position None: everywhere)."""
    if position is None:
        counts.add_(values)
    else:
        counts.index_add_(0, position, values)


def _counts_in_stages(lam: Tensor, u: Tensor, pmf: Tensor, cdf: Tensor) -> Tensor:
    """:func:`_counts_by_search` for a static graph, which cannot stop early: the CDF one
    stage of k at a time (:data:`POISSON_STAGES`), P(K = k) = exp(k log rate - rate - log k!)."""
    counts = torch.full_like(lam, 2.0)
    active = torch.arange(lam.shape[0], device=lam.device)
    log_factorials = _LOG_FACTORIALS.to(lam.device)
    lam = lam.clamp_min(1e-300)  # for the log (these rates are not small: P(K <= 1) < u)
    start = 2
    for stop in POISSON_STAGES:
        if active.shape[0] == 0 and not torch.jit.is_tracing():
            break  # nothing left to settle (a traced graph keeps every stage)
        k = torch.arange(start, stop, dtype=lam.dtype, device=lam.device)
        pmf = (k * lam.log().unsqueeze(-1) - lam.unsqueeze(-1) - log_factorials[start:stop]).exp()
        stage_cdf = cdf.unsqueeze(-1) + pmf.cumsum(-1)  # (m, stop - start)
        below = stage_cdf < u.unsqueeze(-1)
        counts.scatter_(0, active, start + below.sum(-1).to(lam.dtype))
        keep = below[:, -1].nonzero().squeeze(-1)  # all below u: the count is larger still
        active, lam, u, cdf = active[keep], lam[keep], u[keep], stage_cdf[keep, -1]
        start = stop
    return counts


def poisson_counts(rate: Tensor, normal: Tensor, uniform: Tensor) -> Tensor:
    """Poisson(rate) counts (n, V), float in the rates' dtype, from one standard normal (n, V)
    or, for rates below ``EXACT_POISSON_BELOW``, one uniform (n, V) per entry."""
    counts = (rate + rate.sqrt() * normal.to(rate.dtype)).round().clamp_min(0)
    small = rate < EXACT_POISSON_BELOW
    if torch.jit.is_tracing():
        # A graph draws on every voxel and keeps the small rates' draws: same values, no compaction.
        exact = poisson_quantile(torch.where(small, rate, torch.zeros_like(rate)), uniform)
        return torch.where(small, exact.to(counts.dtype), counts)
    index = small.flatten().nonzero().squeeze(-1)  # one search for the small rates, not three
    exact = poisson_quantile(take(rate.flatten(), index), take(uniform.flatten(), index))
    counts.view(-1).index_copy_(0, index, exact.to(counts.dtype))
    return counts


def poisson_fluctuations(showers: Tensor, quanta: Tensor, normal: Tensor, uniform: Tensor) -> Tensor:
    """Each voxel x of showers (n, V) in MeV drawn as q Poisson(x / q) with quanta q (n, V)
    in MeV (q = 0 keeps x), from one standard normal (n, V) or, for rates below
    ``EXACT_POISSON_BELOW``, one uniform (n, V) per voxel; (n, V) in the showers' dtype."""
    counts = poisson_counts(showers / quanta.clamp_min(1e-12), normal, uniform)
    return torch.where(quanta > 0, counts * quanta, showers)


__all__ = ["EXACT_POISSON_BELOW", "QUANTA_BIN_EDGES", "POISSON_MAX_COUNT", "POISSON_STAGES", "quanta_bins",
           "log10_bins", "take", "poisson_quantile", "poisson_counts", "poisson_fluctuations"]
