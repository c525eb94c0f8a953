import math

import numpy as np
import pytest

from caloman.errors import ConfigError, InvalidEnergyError
from caloman.metrics.distances import (
    fpd,
    fpd_sample_sizes,
    frechet_distance,
    kpd,
    mmd2_unbiased,
    normalise_features,
    prdc,
)

# -- Frechet distance ------------------------------------------------------------

def test_frechet_distance_one_dimension_closed_form():
    # N(1, 2^2) vs N(4, 0.5^2): (1 - 4)^2 + (2 - 0.5)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([4.0]), np.array([[0.25]])) \
        == pytest.approx(9.0 + 2.25)


def test_frechet_distance_against_identity_covariance():
    # With cov2 = I: Tr(A) + d - 2 Tr(A^(1/2)), Tr(A^(1/2)) = sum of sqrt(eigenvalues).
    a = np.array([[2.0, 0.6, 0.1], [0.6, 1.0, 0.3], [0.1, 0.3, 0.5]])
    mean1, mean2 = np.array([0.0, 1.0, 2.0]), np.array([0.5, 1.0, 0.0])
    expected = 0.25 + 4.0 + np.trace(a) + 3.0 - 2.0 * np.sqrt(np.linalg.eigvalsh(a)).sum()
    assert frechet_distance(mean1, a, mean2, np.eye(3)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mean1, a, mean1, a) == pytest.approx(0.0, abs=1e-10)


def test_normalise_features_uses_reference_maximum():
    x = np.array([[1.0, -4.0, 0.0], [2.0, 2.0, 0.0]])
    y = np.array([[4.0, 4.0, 3.0]])
    xn, yn = normalise_features(x, y)
    np.testing.assert_allclose(xn, [[0.5, -1.0, 0.0], [1.0, 0.5, 0.0]])
    np.testing.assert_allclose(yn, [[2.0, 1.0, 3.0]])   # all-zero reference feature left unscaled


# -- FPD -------------------------------------------------------------------------

def test_fpd_sample_sizes_equally_spaced_in_inverse_size():
    sizes = fpd_sample_sizes(10_000, 50_000, 10)
    assert len(sizes) == 10
    assert sizes[0] in (9_999, 10_000) and sizes[-1] in (49_999, 50_000)
    np.testing.assert_allclose(np.diff(1.0 / sizes), np.diff(1.0 / sizes)[0], rtol=3e-3)  # int truncation


def test_fpd_extrapolates_to_frechet_distance_of_the_samples():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20_000, 3))
    y = rng.normal(size=(20_000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([0.5, 0.0, -0.3])
    # Population: |mu|^2 + sum (1 - s)^2 = 0.34 + 1.0 + 0.25
    value, error = fpd(x, y, min_samples=1_000, max_samples=5_000, num_batches=10, normalise=False)
    empirical = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert abs(empirical - 1.59) < 0.05
    assert 0 < error < 0.05
    assert value == pytest.approx(empirical, abs=max(4 * error, 0.01))


def test_fpd_extrapolation_removes_the_finite_sample_bias():
    # Same sample on both sides: the distance between the empirical distributions is
    # 0, while two draws of 2,000 rows differ by about 2 d / N + d (d + 1) / (2 N).
    rng = np.random.default_rng(15)
    x = rng.normal(size=(5_000, 4))
    value, _ = fpd(x, x, min_samples=500, max_samples=2_000, num_batches=10, normalise=False)
    a, b = x[rng.choice(5_000, 2_000)], x[rng.choice(5_000, 2_000)]
    at_2000 = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert at_2000 > 0.005
    assert value < 1e-3


def test_fpd_of_identical_distributions_is_near_zero_and_below_shifted():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5_000, 4)), rng.normal(size=(5_000, 4))
    same, _ = fpd(x, y, min_samples=1_000, max_samples=4_000, num_batches=5)
    shifted, _ = fpd(x, y + 0.2, min_samples=1_000, max_samples=4_000, num_batches=5)
    assert 0.0 <= same < 2e-3
    assert shifted > 10 * same and shifted > 5e-3


def test_fpd_normalisation_makes_it_scale_free_and_seed_reproducible():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(3_000, 3)), rng.normal(1.0, 1.5, size=(3_000, 3))
    scale = np.array([1e-3, 10.0, 1e4])
    kwargs = dict(min_samples=500, max_samples=2_000, num_points=4, num_batches=3, seed=7)
    a = fpd(x, y, **kwargs)
    assert fpd(x * scale, y * scale, **kwargs) == pytest.approx(a, rel=1e-6)   # curve_fit tolerance
    assert fpd(x, y, **kwargs) == a
    # Without normalisation, a common factor c scales the distance by c^2.
    raw = fpd(x, y, normalise=False, **kwargs)[0]
    assert fpd(3 * x, 3 * y, normalise=False, **kwargs)[0] == pytest.approx(9 * raw, rel=1e-6)


def test_fpd_with_fewer_samples_than_min_samples_bootstraps():
    rng = np.random.default_rng(6)
    value, error = fpd(rng.normal(size=(200, 2)), rng.normal(2.0, 1.0, size=(300, 2)),
                       min_samples=1_000, max_samples=2_000, num_points=3, num_batches=2, normalise=False)
    assert math.isfinite(value) and math.isfinite(error)
    assert value == pytest.approx(8.0, abs=1.0)


def test_fpd_rejects_bad_input():
    with pytest.raises(ConfigError):
        fpd(np.zeros((10, 2)), np.zeros((10, 3)))
    with pytest.raises(InvalidEnergyError):
        fpd(np.full((10, 2), np.nan), np.zeros((10, 2)))
    with pytest.raises(ConfigError):
        fpd(np.zeros((10, 2)), np.zeros((10, 2)), min_samples=100, max_samples=10)


# -- KPD -------------------------------------------------------------------------

def _kernel(a, b, degree=4):
    return (a @ b.T / a.shape[1] + 1.0) ** degree


def test_mmd2_unbiased_matches_direct_double_sum():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.3
    kxx, kyy, kxy = _kernel(x, x), _kernel(y, y), _kernel(x, y)
    expected = (sum(kxx[i, j] for i in range(7) for j in range(7) if i != j) / 42
                + sum(kyy[i, j] for i in range(5) for j in range(5) if i != j) / 20
                - 2 * kxy.mean())
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-12)


def test_kpd_estimates_mmd_between_the_empirical_distributions():
    # Batches draw rows with replacement, so the unbiased estimate has expectation
    # equal to MMD^2 between the empirical distributions of the two inputs.
    rng = np.random.default_rng(9)
    x = rng.normal(size=(40, 2))
    y = rng.normal(size=(50, 2)) * 1.3 + np.array([0.8, -0.4])
    exact = _kernel(x, x).mean() + _kernel(y, y).mean() - 2 * _kernel(x, y).mean()
    value, error = kpd(x, y, num_batches=12, batch_size=800, normalise=False)
    assert exact > 0.5
    assert 0 < error < 0.2 * exact
    assert value == pytest.approx(exact, abs=3 * error)


def test_kpd_one_dimension_gaussian_closed_form():
    # d = 1: MMD^2 = sum_j C(4, j) (m_j(P) - m_j(Q))^2 with raw moments m_j.
    def moments(mu, s):
        return [1.0, mu, mu**2 + s**2, mu**3 + 3 * mu * s**2, mu**4 + 6 * mu**2 * s**2 + 3 * s**4]

    p, q = moments(0.0, 0.5), moments(0.5, 0.5)
    exact = sum(math.comb(4, j) * (p[j] - q[j]) ** 2 for j in range(5))
    rng = np.random.default_rng(10)
    x, y = rng.normal(0.0, 0.5, size=(50_000, 1)), rng.normal(0.5, 0.5, size=(50_000, 1))
    value, error = kpd(x, y, num_batches=10, batch_size=2_000, normalise=False)
    assert value == pytest.approx(exact, rel=0.1)
    assert error < 0.2 * exact


def test_kpd_of_identical_distributions_is_near_zero():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(4_000, 5)), rng.normal(size=(4_000, 5))
    same, same_error = kpd(x, y, num_batches=6, batch_size=800)
    shifted, _ = kpd(x, y + 0.3, num_batches=6, batch_size=800)
    assert abs(same) < 3 * same_error + 1e-4
    assert shifted > 20 * abs(same)
    assert kpd(x, y, num_batches=6, batch_size=800) == (same, same_error)


# -- precision / recall / density / coverage ------------------------------------

def test_prdc_hand_computed_example():
    # Reference 0, 1, 2, 3 with k = 1: every ball has radius 1. Generated 0.5 and 10
    # (each other's nearest neighbour, radius 9.5).
    reference = np.array([[0.0], [1.0], [2.0], [3.0]])
    generated = np.array([[0.5], [10.0]])
    result = prdc(reference, generated, k=1)
    assert result == pytest.approx({"precision": 0.5,   # only 0.5 lies in a reference ball
                                    "recall": 1.0,      # all reference points lie in the ball of 0.5
                                    "density": 1.0,     # 0.5 lies in two balls, 10 in none: (2 + 0) / 2
                                    "coverage": 0.5})   # balls of 0 and 1 hold a generated point


def test_prdc_identical_distributions_expectations():
    # Naeem et al.: for identical distributions E[density] = 1 and
    # E[coverage] = 1 - prod_{i=1..k} (N - i) / (M + N - i) ~ 1 - 2^-k for M = N.
    rng = np.random.default_rng(12)
    reference, generated = rng.normal(size=(1_500, 3)), rng.normal(size=(1_500, 3))
    result = prdc(reference, generated, k=5)
    expected_coverage = 1 - np.prod([(1_500 - i) / (3_000 - i) for i in range(1, 6)])
    assert result["density"] == pytest.approx(1.0, abs=0.08)
    assert result["coverage"] == pytest.approx(expected_coverage, abs=0.02)
    assert result["precision"] > 0.9 and result["recall"] > 0.9


def test_prdc_disjoint_sets_score_zero_and_subsampling_is_seeded():
    rng = np.random.default_rng(13)
    reference = rng.normal(size=(300, 4))
    far = prdc(reference, reference + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    big = rng.normal(size=(2_000, 4))
    a = prdc(big, big[::-1] + 0.1, k=3, max_samples=400, seed=1)
    assert a == prdc(big, big[::-1] + 0.1, k=3, max_samples=400, seed=1)
    assert a != prdc(big, big[::-1] + 0.1, k=3, max_samples=400, seed=2)


def test_prdc_chunking_does_not_change_the_result():
    rng = np.random.default_rng(14)
    reference, generated = rng.normal(size=(200, 3)), rng.normal(0.3, 1.0, size=(250, 3))
    assert prdc(reference, generated, k=4, chunk_size=7) == prdc(reference, generated, k=4, chunk_size=1000)


def test_prdc_needs_more_points_than_k():
    with pytest.raises(ConfigError):
        prdc(np.zeros((3, 2)), np.zeros((10, 2)), k=5)
