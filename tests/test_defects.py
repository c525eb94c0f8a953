import numpy as np
import pytest

from caloman.geometry import load_binning
from caloman.metrics.defects import (
    DEFECTS,
    core_to_ring,
    lose_dim_voxels,
    round_to_lattice,
    scale_layer,
    stretch_radially,
)
from caloman.simulation import simulate_showers


@pytest.fixture(scope="module")
def binning():
    return load_binning("ds1-photons")


@pytest.fixture(scope="module")
def showers(binning):
    return simulate_showers(binning, np.full(50, 65536.0), seed=5).astype(np.float64)


def _layer_sums(showers, binning):
    return np.stack([showers[:, binning.layer_slice(layer)].sum(axis=1) for layer in binning.relevant_layers], 1)


def test_scale_layer_changes_one_layer_only(binning, showers):
    out = scale_layer(showers, binning, 1, 1.03)
    factors = np.where(np.asarray(binning.relevant_layers) == 1, 1.03, 1.0)
    np.testing.assert_allclose(_layer_sums(out, binning), _layer_sums(showers, binning) * factors, rtol=1e-12)


def test_core_to_ring_keeps_layer_energies_and_moves_the_core(binning, showers):
    out = core_to_ring(showers, binning, 0.05)
    np.testing.assert_allclose(_layer_sums(out, binning), _layer_sums(showers, binning))
    core = binning.layer_slice(2).start  # first radial bin of the first angular bin of the middle layer
    np.testing.assert_allclose(out[:, core], 0.95 * showers[:, core])


def test_stretch_moves_energy_outwards_and_loses_nothing_inside(binning, showers):
    out = stretch_radially(showers, binning, 1.03)
    layer = binning.layer(2)
    n_r = len(layer.r_edges) - 1
    centres = 0.5 * (np.asarray(layer.r_edges[1:]) + np.asarray(layer.r_edges[:-1]))
    block = binning.layer_slice(2)

    def mean_radius(s):
        radial = s[:, block].reshape(len(s), layer.n_alpha, n_r).sum(axis=1)
        return (radial * centres).sum(axis=1) / radial.sum(axis=1)

    growth = mean_radius(out) / mean_radius(showers)
    assert 1.01 < np.median(growth) < 1.05
    assert (_layer_sums(out, binning) <= _layer_sums(showers, binning) + 1e-9).all()
    assert (out >= -1e-12).all()
    np.testing.assert_allclose(stretch_radially(showers, binning, 1.0), showers, atol=1e-9)


def test_lattice_and_dim_voxel_loss(showers):
    lattice = round_to_lattice(showers, 0.5)
    np.testing.assert_allclose(lattice / 0.5, np.round(lattice / 0.5), atol=1e-9)
    rng = np.random.default_rng(0)
    lost = lose_dim_voxels(showers, 1.0, 2.0, 1.0, rng)
    assert not ((lost >= 1.0) & (lost < 2.0)).any()
    np.testing.assert_array_equal(lost[showers >= 2.0], showers[showers >= 2.0])


def test_every_defect_applies_without_changing_its_input(binning, showers):
    before = showers.copy()
    for defect in DEFECTS:
        out = defect.apply(showers, binning, np.random.default_rng(1))
        assert out.shape == showers.shape
        assert (defect.kind == "none") == np.array_equal(out, showers)
    np.testing.assert_array_equal(showers, before)
