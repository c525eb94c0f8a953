import numpy as np
import pytest

from caloman.errors import BinningError, VoxelCountError
from caloman.geometry import (
    BUILTIN_BINNINGS,
    alpha_centres,
    binning_for_voxel_count,
    builtin_voxel_counts,
    load_binning,
)

# Voxel counts per relevant layer, from the CaloChallenge description.
EXPECTED = {
    "ds1-photons": ({0: 8, 1: 160, 2: 190, 3: 5, 12: 5}, 368),
    "ds1-pions": (None, 533),
    "ds2": (None, 45 * 16 * 9),
    "ds3": (None, 45 * 50 * 18),
}


@pytest.mark.parametrize("name", BUILTIN_BINNINGS)
def test_builtin_voxel_counts(name):
    per_layer, total = EXPECTED[name]
    b = load_binning(name)
    assert b.n_voxels == total
    assert b.voxel_r.shape == b.voxel_alpha.shape == (total,)
    if per_layer:
        assert {lid: b.layer(lid).n_voxels for lid in b.relevant_layers} == per_layer


def test_ds1_photons_layout():
    b = load_binning("ds1-photons")
    assert b.relevant_layers == (0, 1, 2, 3, 12)
    assert b.layers_binned_in_alpha == (1, 2)
    # bin_edges run over all layer ids; empty layers add zero voxels.
    assert b.layer_slice(0) == slice(0, 8)
    assert b.layer_slice(1) == slice(8, 168)
    assert b.layer_slice(2) == slice(168, 358)
    assert b.layer_slice(3) == slice(358, 363)
    assert b.layer_slice(4) == slice(363, 363)
    assert b.layer_slice(12) == slice(363, 368)
    assert b.readout_threshold == 1.0
    assert load_binning("ds2").readout_threshold == pytest.approx(0.5e-3 / 0.033)


def test_voxel_centres_order_alpha_then_r():
    b = load_binning("ds1-photons")
    s = b.layer_slice(1)
    r, a = b.voxel_r[s], b.voxel_alpha[s]
    # first 16 voxels: first alpha bin, radial bins from inside out
    assert np.allclose(r[:3], [1.0, 3.0, 5.0])
    assert np.allclose(a[:16], -np.pi + np.pi / 10)
    assert np.allclose(a[16:32], -np.pi + 3 * np.pi / 10)
    # single alpha bin has alpha 0, so eta = r and phi = 0
    s0 = b.layer_slice(0)
    assert np.allclose(b.voxel_alpha[s0], 0.0)
    assert np.allclose(b.voxel_eta[s0], b.voxel_r[s0])
    assert np.allclose(b.voxel_phi[s0], 0.0)
    assert np.allclose(b.voxel_eta[s], r * np.cos(a))


def test_alpha_centres():
    assert np.allclose(alpha_centres(1), [0.0])
    assert np.allclose(alpha_centres(4), [-3 * np.pi / 4, -np.pi / 4, np.pi / 4, 3 * np.pi / 4])


def test_load_by_path(tmp_path):
    p = tmp_path / "mini.xml"
    p.write_text('<Bins><Bin pid="22" name="photon">'
                 '<Layer id="0" r_edges="0,1,2" n_bin_alpha="1"/>'
                 '<Layer id="1" r_edges="0" n_bin_alpha="1"/>'
                 '<Layer id="2" r_edges="0,1,3" n_bin_alpha="2"/></Bin></Bins>')
    b = load_binning(p)
    assert b.n_voxels == 2 + 4
    assert b.relevant_layers == (0, 2)
    assert b.layer_slice(2) == slice(2, 6)


@pytest.mark.parametrize("text,match", [
    ("<Bins><Bin>", "not valid XML"),
    ('<Bins><Bin name="x"><Layer id="1" r_edges="0,1" n_bin_alpha="1"/></Bin></Bins>', "in order"),
    ('<Bins><Bin name="x"><Layer id="0" r_edges="0,2,1" n_bin_alpha="1"/></Bin></Bins>', "increasing"),
    ('<Bins><Bin name="x"><Layer id="0" n_bin_alpha="1"/></Bin></Bins>', "malformed"),
    ('<Bins><Bin name="x"><Layer id="0" r_edges="0" n_bin_alpha="1"/></Bin></Bins>', "no layer"),
])
def test_bad_binning_files(tmp_path, text, match):
    p = tmp_path / "bad.xml"
    p.write_text(text)
    with pytest.raises(BinningError, match=match):
        load_binning(p)


def test_unknown_name():
    with pytest.raises(BinningError, match="ds1-photons"):
        load_binning("ds9")


def test_binning_for_voxel_count_names_the_shipped_binnings():
    assert builtin_voxel_counts() == {368: ("ds1-photons",), 533: ("ds1-pions",), 6480: ("ds2",), 40500: ("ds3",)}
    for name in BUILTIN_BINNINGS:
        assert binning_for_voxel_count(load_binning(name).n_voxels) == name
    with pytest.raises(VoxelCountError) as exc:
        binning_for_voxel_count(14)
    message = str(exc.value)
    assert "14 voxels matches no shipped binning" in message
    assert "368 (ds1-photons), 533 (ds1-pions), 6480 (ds2), 40500 (ds3)" in message
