import math

import numpy as np
import pytest

from caloman.errors import VoxelCountError
from caloman.features import (
    ShowerFeatures,
    apply_threshold,
    compute_features,
    compute_features_from_file,
    high_level_names,
    high_level_vector,
)
from caloman.geometry import load_binning
from caloman.io import ShowerFile, write_showers

# Layer 0: r bins [0,1), [1,3) -> centres 0.5, 2 (one alpha bin, alpha = 0).
# Layer 1: empty.  Layer 2: r bins [0,2), [2,4) -> centres 1, 3; four alpha bins with
# centres -3pi/4, -pi/4, pi/4, 3pi/4. Voxel order (alpha, r): 2 + 8 = 10 voxels.
TINY_XML = """<Bins>
  <Bin pid="22" name="photon">
    <Layer id="0" r_edges="0,1,3" n_bin_alpha="1"/>
    <Layer id="1" r_edges="0" n_bin_alpha="1"/>
    <Layer id="2" r_edges="0,2,4" n_bin_alpha="4"/>
  </Bin>
</Bins>
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.xml"
    path.write_text(TINY_XML)
    return load_binning(path)


def _voxel_l2(alpha_bin, r_bin):
    return 2 + 2 * alpha_bin + r_bin


def test_apply_threshold_is_strict_keeps_dtype_and_copies():
    showers = np.array([[0.5, 1.0, 1.5, 0.0]], dtype=np.float32)
    out = apply_threshold(showers, 1.0)
    assert out.dtype == np.float32
    assert out.tolist() == [[0.0, 1.0, 1.5, 0.0]]  # equal to the threshold survives, as in the challenge
    assert showers[0, 0] == 0.5  # input untouched


def test_features_by_hand(tiny):
    shower = np.zeros((1, 10))
    shower[0, 0], shower[0, 1] = 2.0, 6.0              # layer 0: r = 0.5 and r = 2
    shower[0, _voxel_l2(0, 0)] = 4.0                   # layer 2: alpha = -3pi/4, r = 1
    shower[0, _voxel_l2(2, 1)] = 4.0                   # layer 2: alpha = +pi/4,  r = 3
    f = compute_features(np.array([20.0]), shower, tiny)

    assert f.e_tot[0] == 16.0
    assert set(f.e_layer) == {0, 2} and set(f.ec_eta) == {2}
    assert f.e_layer[0][0] == 8.0 and f.e_layer[2][0] == 8.0
    # layer 0 (r only): centre (0.5*2 + 2*6)/8, width^2 = (0.25*2 + 4*6)/8 - centre^2
    assert f.ec_r[0][0] == pytest.approx(13 / 8, rel=1e-12)
    assert f.width_r[0][0] == pytest.approx(math.sqrt(24.5 / 8 - (13 / 8) ** 2), rel=1e-12)
    # layer 2: points (r, alpha) = (1, -3pi/4) and (3, pi/4) with equal energy
    c = math.cos(math.pi / 4)
    eta = np.array([-c, 3 * c])
    phi = np.array([-c, 3 * c])
    assert f.ec_eta[2][0] == pytest.approx(eta.mean(), rel=1e-12)
    assert f.ec_phi[2][0] == pytest.approx(phi.mean(), rel=1e-12)
    assert f.width_eta[2][0] == pytest.approx(eta.std(), rel=1e-12)  # energy-weighted (population) std
    assert f.width_eta[2][0] == pytest.approx(math.sqrt(2), rel=1e-12)
    assert f.ec_r[2][0] == pytest.approx(2.0, rel=1e-12)
    assert f.width_r[2][0] == pytest.approx(1.0, rel=1e-12)
    assert f.sparsity[0][0] == 0.0
    assert f.sparsity[2][0] == pytest.approx(0.75)


def test_empty_layers_and_all_zero_showers_give_no_nan(tiny):
    showers = np.zeros((3, 10), dtype=np.float32)
    showers[1, _voxel_l2(1, 0)] = 5.0  # only layer 2, a single voxel: width 0
    f = compute_features(np.array([10.0, 10.0, 10.0], dtype=np.float32), showers, tiny)
    vector = high_level_vector(f)
    assert np.isfinite(vector).all()
    for group in (f.ec_r, f.width_r, f.ec_eta, f.ec_phi, f.width_eta, f.width_phi, f.sparsity):
        for values in group.values():
            assert np.isfinite(values).all()
    assert f.ec_r[0][0] == 0.0 and f.width_r[0][0] == 0.0 and f.sparsity[0][0] == 1.0
    assert f.ec_r[0][1] == 0.0  # layer 0 empty in shower 1
    assert f.ec_r[2][1] == pytest.approx(1.0) and f.width_r[2][1] == 0.0
    assert f.ec_eta[2][1] == pytest.approx(math.cos(-math.pi / 4))
    assert f.sparsity[2][1] == pytest.approx(7 / 8)
    # log10(0 + 1e-8) = -8 for empty energies
    names = high_level_names(tiny)
    assert vector[0, names.index("log10(E_tot + 1e-8)")] == pytest.approx(-8.0, abs=1e-5)


def test_sums_keep_the_shower_dtype_like_the_challenge(tiny):
    showers = np.full((2, 10), 1.1, dtype=np.float32)
    f = compute_features(np.ones(2), showers, tiny)
    assert f.e_tot.dtype == np.float32 and f.e_layer[0].dtype == np.float32
    assert np.array_equal(f.e_tot, showers.sum(axis=-1))
    assert f.ec_r[0].dtype == np.float64


def test_ds1_photons_vector_layout():
    binning = load_binning("ds1-photons")
    showers = np.zeros((2, 368), dtype=np.float32)
    # layer 1 starts at voxel 8; alpha bin 7 (centre -pi + 7.5 * 2pi/10), r bin 3 (centre 7 mm)
    showers[0, 8 + 7 * 16 + 3] = 50.0
    showers[1, 0] = 3.0
    f = compute_features(np.array([256.0, 512.0]), showers, binning)
    alpha = -math.pi + 7.5 * 2 * math.pi / 10
    assert f.ec_eta[1][0] == pytest.approx(7 * math.cos(alpha), rel=1e-12)
    assert f.ec_phi[1][0] == pytest.approx(7 * math.sin(alpha), rel=1e-12)
    assert f.width_eta[1][0] == 0.0
    names = high_level_names(binning)
    vector = high_level_vector(f)
    assert vector.shape == (2, 30) and len(names) == 30
    assert names[:7] == ["log10(E_inc)"] + [f"log10(E_layer_{layer} + 1e-8)" for layer in (0, 1, 2, 3, 12)] \
        + ["EC_eta_layer_1 / 100"]
    assert vector[0, 0] == pytest.approx(math.log10(256))
    assert vector[0, names.index("EC_phi_layer_1 / 100")] == pytest.approx(7 * math.sin(alpha) / 100)
    assert vector[1, names.index("sparsity_layer_0")] == pytest.approx(7 / 8)
    assert vector[1, names.index("EC_r_layer_0 / 100")] == pytest.approx(2.5 / 100)


def test_chunked_features_equal_whole_bitwise(tmp_path):
    binning = load_binning("ds1-photons")
    rng = np.random.default_rng(1)
    incident = 2.0 ** rng.integers(8, 23, 300)
    showers = (rng.gamma(0.4, 30.0, (300, 368)) * (rng.random((300, 368)) < 0.4)).astype(np.float32)
    path = write_showers(tmp_path / "s.h5", incident, showers, binning=binning)
    whole = compute_features(incident.astype(np.float32), apply_threshold(showers, 1.0), binning)
    with ShowerFile(path, binning) as f:
        streamed = compute_features_from_file(f, binning, chunk_size=64)
    assert isinstance(streamed, ShowerFeatures) and streamed.n_showers == 300
    assert streamed.incident_energies.dtype == np.float32  # the file's stored dtype
    assert np.array_equal(streamed.e_tot, whole.e_tot)
    for name in ("e_layer", "ec_eta", "ec_phi", "width_eta", "width_phi", "ec_r", "width_r", "sparsity"):
        for layer, values in getattr(whole, name).items():
            assert np.array_equal(getattr(streamed, name)[layer], values), (name, layer)


def test_wrong_voxel_count_is_a_typed_error(tiny):
    with pytest.raises(VoxelCountError, match="needs"):
        compute_features(np.ones(2), np.zeros((2, 11)), tiny)
