"""The continuous voxel fluctuation model (caloman.models.spot_noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from caloman.models import spot_noise as sn


def _draw(means: np.ndarray, scale: float, shape: float, n: int, seed: int = 0) -> np.ndarray:
    """The model's draws for voxels of the given means (V,), n showers each: (n, V)."""
    generator = torch.Generator().manual_seed(seed)
    showers = torch.as_tensor(np.broadcast_to(means, (n, len(means))).copy(), dtype=torch.float32)
    noise = [torch.randn(showers.shape, generator=generator), torch.rand(showers.shape, generator=generator),
             torch.randn(showers.shape, generator=generator)]
    table = sn.quantile_table(np.array([shape])).reshape(-1, sn.TABLE_POINTS)
    scales = torch.full_like(showers, scale)
    shapes = torch.full((len(means),), shape)
    rows = torch.zeros(len(means), dtype=torch.long)
    return sn.spot_fluctuations(showers, scales, shapes, rows, table, *noise).numpy()


def _reference(mean: float, scale: float, shape: float, n: int, seed: int = 1) -> np.ndarray:
    """The same compound Poisson-Gamma drawn with numpy's exact samplers."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(mean / (shape * scale), n)
    return scale * rng.standard_gamma(counts * shape)


@pytest.mark.parametrize("mean", [0.4, 3.0, 40.0, 2000.0])
def test_draws_follow_the_compound_poisson_gamma(mean):
    drawn = _draw(np.array([mean]), scale=2.0, shape=0.5, n=40_000)[:, 0]
    exact = _reference(mean, 2.0, 0.5, 40_000)
    assert (drawn >= 0).all()
    assert np.mean(drawn == 0) == pytest.approx(np.mean(exact == 0), abs=0.01)
    lit_d, lit_e = drawn[drawn > 0], exact[exact > 0]
    if len(lit_e) > 100:
        assert stats.ks_2samp(lit_d, lit_e).pvalue > 1e-3
    # mean m and variance m theta (1 + k)
    assert drawn.mean() == pytest.approx(mean, rel=0.03)
    assert drawn.var() == pytest.approx(mean * 2.0 * 1.5, rel=0.06)


def test_gamma_table_matches_the_exact_quantiles():
    """Interpolated table values against scipy's Gamma quantiles, counts 1..64 and above."""
    shape = 0.3
    table = sn.quantile_table(np.array([shape])).reshape(-1, sn.TABLE_POINTS)
    normal = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
    for count in (1, 2, 7, 64, 65, 300):
        counts = torch.full_like(normal, float(count))
        got = sn.gamma_of_counts(counts, torch.tensor(shape, dtype=torch.float64), torch.tensor(0), table, normal)
        want = stats.gamma(count * shape).ppf(stats.norm.cdf(normal.numpy()))
        # compare in CDF space: the error a user could see in the spectrum
        cdf = stats.gamma(count * shape).cdf(got.numpy())
        assert np.abs(cdf - stats.norm.cdf(normal.numpy())).max() < (2e-3 if count > 64 else 2e-4), count
        assert np.all(np.diff(got.numpy()) >= 0)
        assert np.allclose(got.numpy()[400], want[400], rtol=1e-3)


def test_no_spots_give_exactly_zero_and_no_negative_energies():
    drawn = _draw(np.array([1e-4, 0.01, 5.0]), scale=3.0, shape=1.0, n=5000)
    assert (drawn >= 0).all()
    assert (drawn[:, 0] == 0).mean() > 0.999


def test_occupancy_is_the_probability_of_exceeding_the_threshold():
    threshold = 1.0
    for mean, scale, shape in ((0.5, 2.0, 0.5), (3.0, 1.0, 2.0), (200.0, 0.5, 1.0)):
        drawn = _draw(np.array([mean]), scale, shape, 60_000)[:, 0]
        predicted = sn.occupancy(np.array(mean), np.array(scale), shape, threshold)
        assert np.mean(drawn > threshold) == pytest.approx(float(predicted), abs=0.01)
    curves = sn.occupancy_curves(np.array([0.5, 3.0]), 0.5, threshold)
    direct = sn.occupancy(np.array([[0.5], [3.0]]), sn.SCALE_GRID[None, :] * threshold, 0.5, threshold)
    assert np.allclose(curves, direct, atol=1e-10)


def test_calibration_recovers_known_scale_and_shape():
    """Toy training voxels with a known spread: the occupancy fit returns the scale that
    made them, and the likelihood prefers the true spot shape."""
    rng = np.random.default_rng(3)
    threshold, scale, shape = 1.0, 2.5, 1.0
    means = np.exp(rng.uniform(np.log(0.2), np.log(30.0), 60_000))
    energies = scale * rng.standard_gamma(rng.poisson(means / (shape * scale)) * shape)
    energies = np.where(energies > threshold, energies, 0.0)
    edges = np.linspace(np.log(0.2), np.log(30.0), 9)
    bins = np.digitize(np.log(means), edges[1:-1])
    counts = np.bincount(bins, minlength=8)
    mean_sums = np.bincount(bins, means, minlength=8)
    occupied = np.bincount(bins, energies > 0, minlength=8)
    fitted, by_occupancy = sn.fit_scales(counts, mean_sums, occupied, shape, threshold)
    usable = (occupied >= 20) & (counts - occupied >= 20)
    assert np.array_equal(by_occupancy, usable) and usable.sum() >= 4
    # where the occupancy still moves with theta (not ~1), the fit recovers theta to 10 %
    sensitive = usable & (occupied / counts < 0.95)
    assert sensitive.sum() >= 4 and np.allclose(fitted[sensitive], scale, rtol=0.1)
    tables = {k: sn.fit_scales(counts, mean_sums, occupied, k, threshold)[0] for k in sn.SHAPE_GRID}
    near = by_occupancy[bins[:20_000]]
    best, scores = sn.choose_shape(tables, means[:20_000][near], energies[:20_000][near], bins[:20_000][near],
                                   threshold)
    assert best == shape, scores


def test_calibration_reaches_spots_far_above_a_low_threshold():
    """Dataset 2 and 3 read out at 15 keV, and their voxels hold MeV: spots thousands of times
    the threshold. A grid that stopped at 200 thresholds lit far too many voxels there (every
    strong AUC 1.000 on built-in dataset-2 showers, 2026-12-07); the fit must reach the scale."""
    rng = np.random.default_rng(5)
    threshold, scale, shape = 0.0152, 1500 * 0.0152, 0.25
    means = np.exp(rng.uniform(np.log(0.05), np.log(20.0), 60_000))
    energies = scale * rng.standard_gamma(rng.poisson(means / (shape * scale)) * shape)
    energies = np.where(energies > threshold, energies, 0.0)
    edges = np.linspace(np.log(0.05), np.log(20.0), 9)
    bins = np.digitize(np.log(means), edges[1:-1])
    counts, mean_sums = np.bincount(bins, minlength=8), np.bincount(bins, means, minlength=8)
    occupied = np.bincount(bins, energies > 0, minlength=8)
    fitted, by_occupancy = sn.fit_scales(counts, mean_sums, occupied, shape, threshold)
    sensitive = by_occupancy & (occupied / counts > 0.05) & (occupied / counts < 0.95)
    assert sensitive.sum() >= 4 and np.allclose(fitted[sensitive], scale, rtol=0.1)


def test_the_grid_beyond_200_thresholds_is_scanned_only_where_needed(monkeypatch):
    """match_occupancy scans the first SCALE_GRID_FIRST scales for every bin and the rest only for
    bins whose occupancy is still above target there; the result equals scanning all of it."""
    rng = np.random.default_rng(1)
    means = np.exp(rng.uniform(np.log(0.05), np.log(50.0), (200, 4)))
    weights = rng.integers(1, 100, (200, 4)).astype(float)
    occupancies = rng.uniform(0.01, 0.9, 200)
    lazy = sn.match_occupancy(means, occupancies, 0.5, 0.0152, weights)
    assert (lazy > 200 * 0.0152).any() and (lazy < 200 * 0.0152).any()  # both kinds of bins present
    monkeypatch.setattr(sn, "SCALE_GRID_FIRST", len(sn.SCALE_GRID))
    np.testing.assert_array_equal(lazy, sn.match_occupancy(means, occupancies, 0.5, 0.0152, weights))


def test_always_lit_and_sparse_bins_take_the_nearest_fitted_scale():
    counts = np.array([50, 1000, 1000, 1000])  # too few; fitted; fitted; always lit
    means = np.array([0.1, 0.5, 2.0, 300.0])
    occupied = np.array([5, 100, 500, 1000])
    scales, fitted = sn.fit_scales(counts, counts * means, occupied, 0.5, 1.0)
    assert fitted.tolist() == [False, True, True, False]
    assert scales[0] == scales[1] and scales[3] == scales[2]
    assert np.all(np.isfinite(scales)) and np.all(scales > 0)


def test_likelihood_is_normalised():
    """Censored density integrates to one: P(below) + integral above the threshold."""
    threshold, mean, scale, shape = 1.0, 2.0, 1.5, 0.5
    grid = np.linspace(threshold, 60.0, 20_001)
    density = np.exp(sn.log_likelihood(np.full_like(grid, mean), grid, np.full_like(grid, scale), shape,
                                       threshold))
    below = np.exp(sn.log_likelihood(np.array([mean]), np.array([0.0]), np.array([scale]), shape, threshold))[0]
    assert below + np.trapezoid(density, grid) == pytest.approx(1.0, abs=2e-3)


def test_round_trip_sample_then_fit_recovers_the_parameters():
    """Voxels drawn by the model's own sampler, thresholded as training data are, then
    calibrated: the fit returns the scale and spot shape they were drawn with."""
    threshold, scale, shape = 1.0, 3.0, 0.5
    means = np.exp(np.linspace(np.log(0.3), np.log(20.0), 400))
    drawn = _draw(means, scale, shape, n=200, seed=5)  # (200, 400)
    energies = np.where(drawn >= threshold, drawn, 0.0).flatten()
    flat_means = np.broadcast_to(means, drawn.shape).flatten()
    bins = np.digitize(np.log(flat_means), np.linspace(np.log(0.3), np.log(20.0), 9)[1:-1])
    counts = np.bincount(bins, minlength=8)
    sums = np.bincount(bins, flat_means, minlength=8)
    occupied = np.bincount(bins, energies > 0, minlength=8)
    tables, fitted = {}, None
    for k in sn.SHAPE_GRID:
        tables[k], fitted = sn.fit_scales(counts, sums, occupied, k, threshold)
    sensitive = fitted & (occupied / counts < 0.95)
    assert sensitive.sum() >= 4 and np.allclose(tables[shape][sensitive], scale, rtol=0.1)
    near = fitted[bins]
    best, _ = sn.choose_shape(tables, flat_means[near], energies[near], bins[near], threshold)
    assert best == shape
