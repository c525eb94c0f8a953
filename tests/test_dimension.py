"""Intrinsic-dimension estimation: exact kNN, the Levina-Bickel / MacKay-Ghahramani
estimator on data of known dimension, duplicates, result container, file and CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from caloman.cli import main
from caloman.cli.dimension import parse_k_values
from caloman.dimension import (
    DimensionEstimate,
    deduplicate,
    estimate_dimension,
    estimate_for_file,
    knn_distances,
    levina_bickel,
)
from caloman.errors import ConfigError
from caloman.io import write_showers

AMBIENT = 300


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _embed(z: np.ndarray, rng: np.random.Generator, noise: float = 0.0) -> np.ndarray:
    """Points z (n, m) placed in a random m-dimensional linear subspace of R^AMBIENT, plus isotropic noise."""
    basis, _ = np.linalg.qr(rng.standard_normal((AMBIENT, z.shape[1])))
    return z @ basis.T + noise * rng.standard_normal((z.shape[0], AMBIENT))


def _sphere(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform points on the unit d-sphere S^d, a d-dimensional manifold in R^(d+1)."""
    z = rng.standard_normal((n, d + 1))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _reference_knn(x: np.ndarray, k: int) -> np.ndarray:
    d = cdist(x, x)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k]


# -- nearest neighbours ------------------------------------------------------
@pytest.mark.parametrize("method", ["torch", "sklearn"])
def test_knn_distances_match_brute_force_reference(method):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 17)).astype(np.float32)
    got = knn_distances(x, 12, method=method, batch_size=64)  # several blocks, last one partial
    np.testing.assert_allclose(got, _reference_knn(x.astype(np.float64), 12), rtol=1e-12, atol=1e-12)


def test_knn_distances_are_exact_for_close_points_far_from_origin():
    # float32 |a|^2 + |b|^2 - 2ab alone would lose these 1e-3 distances next to norms of 1e4;
    # the float64 re-computation of the selected neighbours must recover them.
    rng = np.random.default_rng(1)
    x = 1e4 + rng.standard_normal((200, 5)) * 1e-3
    np.testing.assert_allclose(knn_distances(x, 5), _reference_knn(x, 5), rtol=1e-9)


def test_knn_excludes_the_query_by_index_so_duplicates_give_exact_zeros():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 4))
    x = np.vstack([x, x[:1], x[:1]])  # point 0 now exists three times
    d = knn_distances(x, 4)
    for i in (0, 50, 51):  # each copy has the two other copies at distance exactly 0, then a positive one
        assert d[i, 0] == 0.0 and d[i, 1] == 0.0 and d[i, 2] > 0.0
    assert (d[1:50, 0] > 0).all()
    np.testing.assert_allclose(d, _reference_knn(x, 4), atol=1e-12)


def test_knn_rejects_too_many_neighbours_and_unknown_method():
    x = np.zeros((5, 2)) + np.arange(5)[:, None]
    with pytest.raises(ValueError, match="k_max=5"):
        knn_distances(x, 5)
    with pytest.raises(ValueError, match="unknown kNN method"):
        knn_distances(x, 2, method="faiss")


# -- the estimator -----------------------------------------------------------
def test_levina_bickel_hand_computed_example():
    # Point A: T = 1, 2, 4; point B: T = 1, 1, e^2.
    dist = np.array([[1.0, 2.0, 4.0], [1.0, 1.0, math.e**2]])
    # k=2: mean_i log(T2/T1) = (log 2 + 0) / 2
    # k=3: A: (log 4 + log 2) / 2 = 1.5 log 2, B: (2 + 2) / 2 = 2; average, then invert (MacKay-Ghahramani)
    expected = [2 / math.log(2), 2 / (1.5 * math.log(2) + 2)]
    np.testing.assert_allclose(levina_bickel(dist, [2, 3]), expected, rtol=1e-14)
    # Levina-Bickel's own average of per-point inverses would give a different number: the test pins the correction.
    assert not math.isclose(expected[1], (1 / (1.5 * math.log(2)) + 1 / 2) / 2, rel_tol=0.05)


def test_levina_bickel_skips_zero_distance_neighbours():
    # A point with a duplicate: its zero distance is dropped and T_j read from the next column.
    with_zero = np.array([[0.0, 1.0, 2.0, 4.0], [1.0, 2.0, 4.0, 8.0]])
    without = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    np.testing.assert_allclose(levina_bickel(with_zero, [2, 3]), levina_bickel(without, [2, 3]), rtol=1e-14)
    # Too many zeros for k=3 in the first row: that point is left out of d_3 instead of giving inf/NaN.
    many_zeros = np.array([[0.0, 0.0, 1.0, 2.0], [1.0, 2.0, 4.0, 8.0]])
    np.testing.assert_allclose(levina_bickel(many_zeros, [3]), [1 / (1.5 * math.log(2))], rtol=1e-14)


def test_levina_bickel_rejects_bad_input():
    with pytest.raises(ValueError, match="sorted"):
        levina_bickel(np.array([[2.0, 1.0]]), [2])
    with pytest.raises(ValueError, match="out of range"):
        levina_bickel(np.array([[1.0, 2.0]]), [3])
    with pytest.raises(ValueError, match="non-zero"):
        levina_bickel(np.zeros((3, 2)), [2])


@pytest.mark.parametrize("d", [2, 5])
@pytest.mark.parametrize("shape", ["sphere", "gaussian"])
@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_estimate_recovers_known_dimension_in_300_dimensions(d, shape, noise):
    rng = np.random.default_rng(10 * d + (shape == "sphere") + int(noise > 0))
    n = 2000
    z = _sphere(d, n, rng) if shape == "sphere" else rng.standard_normal((n, d))
    x = _embed(z, rng, noise)  # noise norm ~0.017, below the k=20 neighbour distances
    d_20 = estimate_dimension(x, [20])[0]
    assert abs(d_20 - d) < 0.1 * d, f"{shape} of dimension {d}, noise {noise}: d_20 = {d_20:.2f}"


def test_large_noise_fills_the_ambient_space_at_small_k():
    # Isotropic noise larger than the neighbour spacing makes the data look high-dimensional
    # at small k, and the estimate falls back towards d as k (the probed scale) grows.
    rng = np.random.default_rng(3)
    x = _embed(rng.standard_normal((2000, 2)), rng, noise=1e-2)
    d_5, d_50 = estimate_dimension(x, [5, 50])
    assert d_5 > 6 and d_50 < d_5


def test_estimate_is_invariant_to_scale_and_translation():
    rng = np.random.default_rng(4)
    x = _embed(rng.standard_normal((500, 3)), rng)
    base = estimate_dimension(x, [5, 10])
    np.testing.assert_allclose(estimate_dimension(1e3 * x + 7.0, [5, 10]), base, rtol=1e-6)


def test_duplicates_give_finite_estimates_equal_to_the_distinct_points():
    rng = np.random.default_rng(5)
    x = _embed(rng.standard_normal((600, 3)), rng)
    with_copies = np.vstack([x, x[:200], x[:50]])
    est = estimate_dimension(with_copies, [2, 5, 10])
    assert np.isfinite(est).all()
    np.testing.assert_allclose(est, estimate_dimension(x, [2, 5, 10]), rtol=1e-12)
    # Without deduplication the distances hold zeros; the estimator must still stay finite.
    assert np.isfinite(levina_bickel(knn_distances(with_copies, 10), [2, 5, 10])).all()


def test_deduplicate_treats_negative_zero_as_zero():
    x = np.array([[0.0, 1.0], [-0.0, 1.0], [1.0, 1.0]])
    assert deduplicate(x).shape == (2, 2)


# -- result container ---------------------------------------------------------
def _result(**estimates: list[float]) -> DimensionEstimate:
    return DimensionEstimate(k_values=(5, 10, 20),
                             estimates={k: np.asarray(v) for k, v in estimates.items()},
                             n_points=dict.fromkeys(estimates, 100), n_duplicates=dict.fromkeys(estimates, 0),
                             method="torch", seconds=1.5)


def test_recommended_rounds_d10_of_the_preprocessed_curve():
    r = _result(raw=[30.0, 25.4, 20.0], preprocessed=[25.0, 19.5, 15.0])
    assert r.recommended() == 20  # 19.5 rounds half up
    assert r.recommended(label="raw") == 25
    assert r.recommended(k=20) == 15
    assert _result(preprocessed=[9.0, 19.49, 8.0]).recommended() == 19
    assert _result(raw=[9.0, 7.6, 5.0]).recommended() == 8  # falls back to raw
    assert _result(raw=[1.0, 0.2, 0.1]).recommended() == 1  # at least one latent dimension
    with pytest.raises(ConfigError, match="--k including 50"):
        r.recommended(k=50)


def test_dimension_estimate_json_round_trip():
    r = _result(raw=[30.0, 25.4, 20.0], preprocessed=[25.0, 19.5, 15.0])
    back = DimensionEstimate.from_json(r.to_json())
    assert back.k_values == r.k_values and back.method == "torch" and back.n_points == r.n_points
    for label in r.estimates:
        np.testing.assert_array_equal(back.estimates[label], r.estimates[label])
    with pytest.raises(ConfigError):
        DimensionEstimate.from_json('{"k_values": [2]}')


@pytest.mark.parametrize(("text", "expected"), [
    ("2..6", (2, 3, 4, 5, 6)), ("2,5,10", (2, 5, 10)), ("10,2..4,2", (2, 3, 4, 10)), ("7", (7,)),
])
def test_parse_k_values(text, expected):
    assert parse_k_values(text) == expected


@pytest.mark.parametrize("text", ["1..5", "6..2", "a,b", "", "2...5"])
def test_parse_k_values_rejects_bad_input(text):
    with pytest.raises(ConfigError):
        parse_k_values(text)


# -- files and CLI --------------------------------------------------------------
def _manifold_showers(energies: list[float], per_energy: int, latent: int, rng: np.random.Generator):
    """Dataset-1 photon showers (368 voxels) on a ``latent``-dimensional manifold: E_inc * f(z).

    Every voxel stays above the 1 MeV readout threshold, so the threshold does not change the manifold.
    """
    n_voxels = 368
    mixing = rng.uniform(-1, 1, (latent, n_voxels)) / latent
    incident = np.repeat(np.asarray(energies, dtype=np.float64), per_energy)
    z = rng.uniform(-1, 1, (incident.size, latent))
    showers = incident[:, None] / n_voxels * (1.0 + 0.5 * z @ mixing)
    return incident, showers.astype(np.float32)


def test_estimate_for_file_curves_threshold_and_duplicates(tmp_path):
    rng = np.random.default_rng(6)
    incident, showers = _manifold_showers([1024.0, 4096.0], per_energy=400, latent=3, rng=rng)
    # 40 near-copies that differ only by a 0.5 MeV deposit below the 1 MeV threshold: after the
    # threshold they are exact duplicates of their originals and must be counted as such.
    copies = showers[:40].copy()
    copies[:, 0] = 0.0
    showers[:40, 0] = 0.5
    path = write_showers(tmp_path / "s.h5", np.concatenate([incident, incident[:40]]),
                         np.vstack([showers, copies]), binning="ds1-photons")

    est = estimate_for_file(path, "ds1-photons", [5, 10, 20], per_energy=True, preprocess=True)
    assert set(est.estimates) == {"raw", "preprocessed", "E=1024MeV", "E=4096MeV"}
    assert est.n_duplicates["raw"] == 40 and est.n_points["raw"] == 800
    assert est.n_points["E=1024MeV"] == 400 and est.n_duplicates["E=1024MeV"] == 40
    for label, curve in est.estimates.items():
        assert abs(curve[1] - 3) < 0.5, f"{label}: d_10 = {curve[1]:.2f}, data are 3-dimensional"
    assert est.recommended() == 3


def test_estimate_for_file_subsample_is_seeded(tmp_path):
    rng = np.random.default_rng(7)
    incident, showers = _manifold_showers([2048.0], per_energy=500, latent=4, rng=rng)
    path = write_showers(tmp_path / "s.h5", incident, showers, binning="ds1-photons")
    a = estimate_for_file(path, "ds1-photons", [5, 10], max_showers=200, preprocess=False, seed=1)
    b = estimate_for_file(path, "ds1-photons", [5, 10], max_showers=200, preprocess=False, seed=1)
    c = estimate_for_file(path, "ds1-photons", [5, 10], max_showers=200, preprocess=False, seed=2)
    assert a.n_points == {"raw": 200} and set(a.estimates) == {"raw"}
    np.testing.assert_array_equal(a.estimates["raw"], b.estimates["raw"])
    assert not np.array_equal(a.estimates["raw"], c.estimates["raw"])
    with pytest.raises(ConfigError, match="--max-showers"):
        estimate_for_file(path, "ds1-photons", [5, 10], max_showers=8, preprocess=False)


def test_per_energy_needs_discrete_energies(tmp_path):
    rng = np.random.default_rng(8)
    incident, showers = _manifold_showers([1000.0], per_energy=100, latent=2, rng=rng)
    incident = incident * rng.uniform(1, 2, incident.size)  # a continuous spectrum
    path = write_showers(tmp_path / "s.h5", incident, showers, binning="ds1-photons")
    with pytest.raises(ConfigError, match="--per-energy"):
        estimate_for_file(path, "ds1-photons", [5], per_energy=True, preprocess=False)


def test_cli_writes_json_and_prints_table(tmp_path, capsys):
    rng = np.random.default_rng(9)
    incident, showers = _manifold_showers([512.0, 1024.0], per_energy=150, latent=2, rng=rng)
    path = write_showers(tmp_path / "s.h5", incident, showers, binning="ds1-photons")
    out = tmp_path / "out"
    rc = main(["-q", "dimension", str(path), "--binning", "ds1-photons", "--k", "2..12", "--out", str(out),
               "--per-energy", "--seed", "3"])
    assert rc == 0
    doc = json.loads((out / "dimension.json").read_text())
    assert doc["k_values"] == list(range(2, 13)) and doc["seed"] == 3
    assert doc["config"]["per_energy"] is True and "numpy" in doc["versions"]
    assert set(doc["estimates"]) == {"raw", "preprocessed", "E=512MeV", "E=1024MeV"}
    assert doc["recommended_latent_dim"] == {"k": 10, "label": "preprocessed", "value": 2}
    assert DimensionEstimate.from_json(out / "dimension.json").recommended() == 2
    printed = capsys.readouterr().out
    assert "d_10" in printed and "recommended latent dimension: 2" in printed


def test_too_few_distinct_showers_is_a_config_error(tmp_path):
    rng = np.random.default_rng(10)
    incident, showers = _manifold_showers([1024.0], per_energy=30, latent=2, rng=rng)
    showers = np.vstack([showers] * 3)  # 90 showers, 30 distinct
    path = write_showers(tmp_path / "s.h5", np.tile(incident, 3), showers, binning="ds1-photons")
    with pytest.raises(ConfigError, match="30 distinct showers of 90"):
        estimate_for_file(path, "ds1-photons", [2, 40], preprocess=False)
