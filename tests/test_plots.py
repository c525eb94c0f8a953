"""Tests of caloman.plots: every picture is a valid PNG, written atomically, from tiny inputs."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pytest
from matplotlib.figure import Figure

from caloman import plots
from caloman.errors import InvalidEnergyError, VoxelCountError
from caloman.geometry import load_binning
from caloman.metrics import ClassifierResult, FeatureHistogram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_png(path: Path, min_bytes: int = 5_000, max_bytes: int = 1_000_000) -> tuple[int, int]:
    assert path.is_file()
    size = path.stat().st_size
    assert min_bytes < size < max_bytes, f"{path.name}: {size} bytes"
    return png_size(path)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture(scope="module")
def ds1():
    return load_binning("ds1-photons")


@pytest.fixture(scope="module")
def ds2():
    return load_binning("ds2")


def synthetic_mean(binning) -> np.ndarray:
    """A mean shower falling off in r, brighter in the middle layers, with a few exact zeros."""
    layer = np.repeat(np.arange(len(binning.layers)), [layer.n_voxels for layer in binning.layers])
    mean = 1e3 * np.exp(-binning.voxel_r / 20.0) * (1.0 + layer)
    mean[::17] = 0.0
    return mean


# -- geometry of the polar panels (hand-computed expectations) ---------------------
def test_layer_mesh_keeps_alpha_r_voxel_order(ds1):
    """Voxels are stored (alpha, r): value k*n_r + j must colour radial bin j in angular bin k."""
    n_alpha, edges = 2, (0.0, 1.0, 3.0, 7.0)
    values = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])  # alpha 0: r bins 1,2,3; alpha 1: 10,20,30
    theta, rho, colour = plots._layer_mesh(values, edges, n_alpha, ds1)
    assert colour.shape == (3, theta.size - 1)
    assert theta[0] == pytest.approx(-np.pi) and theta[-1] == pytest.approx(np.pi)
    centres = 0.5 * (theta[1:] + theta[:-1])
    first_half = centres < 0  # alpha bin 0 covers [-pi, 0)
    np.testing.assert_array_equal(colour[:, first_half][:, 0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(colour[:, ~first_half][:, 0], [10.0, 20.0, 30.0])
    # dataset 1 draws ln(1 + r / mm)
    np.testing.assert_allclose(rho, np.log([1.0, 2.0, 4.0, 8.0]))


def test_single_alpha_bin_is_a_full_ring_and_zeros_are_blank(ds1):
    theta, _, colour = plots._layer_mesh(np.array([5.0, 0.0, 2.0]), (0.0, 5.0, 10.0, 30.0), 1, ds1)
    assert theta.size - 1 >= plots._MIN_ANGULAR_STEPS  # a smooth circle, not a polygon
    assert np.all(colour[0] == 5.0) and np.all(colour[2] == 2.0)
    assert colour.mask[1].all() and not colour.mask[0].any()


def test_radius_is_linear_for_datasets_2_and_3(ds2):
    edges = np.array(ds2.layer(0).r_edges)
    np.testing.assert_allclose(plots._radial_coordinate(edges, ds2), edges)


def test_colour_scale_is_shared_and_spans_fixed_decades():
    a = np.array([0.0, 1e-9, 2.0, 50.0])
    b = np.array([0.0, 3e-3, 400.0])
    norm = plots._colour_norm(a, b)
    assert norm.vmax == 400.0
    assert norm.vmin == pytest.approx(400.0 * 10.0 ** -plots.COLOUR_DECADES)
    narrow = plots._colour_norm(np.array([2.0, 8.0]))
    assert (narrow.vmin, narrow.vmax) == (2.0, 8.0)  # smallest non-zero when within range
    zero = plots._colour_norm(np.zeros(4))
    assert 0 < zero.vmin < zero.vmax


# -- energy rows ----------------------------------------------------------------------
def test_dataset1_ladder_is_thinned_to_evenly_spaced_rungs():
    ladder = 2.0 ** np.arange(8, 23)  # 15 energies, 256 MeV .. 4.19 TeV
    energies = np.repeat(ladder, 3)
    groups = plots.energy_groups(energies, max_rows=8)
    assert len(groups) == 8
    chosen = [float(np.unique(energies[mask])[0]) for _, mask in groups]
    assert chosen == list(2.0 ** np.arange(8, 23, 2))
    assert all(mask.sum() == 3 for _, mask in groups)
    assert groups[0][0].startswith("256 MeV") and groups[-1][0].startswith("4.19 TeV")


def test_continuous_energies_fill_log_spaced_bins_exactly_once():
    rng = np.random.default_rng(3)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e6), 500))
    groups = plots.energy_groups(energies, max_rows=5)
    masks = np.array([mask for _, mask in groups])
    np.testing.assert_array_equal(masks.sum(axis=0), 1)  # every shower in exactly one row
    maxima = [energies[m].max() for m in masks]
    assert maxima == sorted(maxima)
    # log-spaced: each bin spans the same factor (1e3)^(1/5)
    edges = np.geomspace(energies.min(), energies.max(), 6)
    for (_, mask), lo, hi in zip(groups, edges[:-1], edges[1:]):
        assert energies[mask].min() >= lo and energies[mask].max() <= hi


def test_few_distinct_energies_give_one_row_each():
    groups = plots.energy_groups(np.array([1e4, 1e3, 1e4, 5e5]), max_rows=8)
    assert [int(m.sum()) for _, m in groups] == [1, 2, 1]


# -- pictures -------------------------------------------------------------------------
def test_average_shower_ds1(tmp_path, ds1):
    path = plots.plot_average_shower(synthetic_mean(ds1), ds1, tmp_path / "avg.png", title="toy")
    assert path == tmp_path / "avg.png"
    width, height = assert_png(path)
    assert width > 2 * height  # one row of five layers
    assert leftovers(tmp_path) == ["avg.png"]


def test_average_shower_ds2_is_a_grid_under_one_megabyte(tmp_path, ds2):
    rng = np.random.default_rng(0)
    mean = rng.gamma(1.0, 1.0, ds2.n_voxels) * np.exp(-ds2.voxel_r / 10.0)  # noisy: worst case for PNG size
    width, height = assert_png(plots.plot_average_shower(mean, ds2, tmp_path / "ds2.png"))
    assert height > width / 3  # 5 rows of 9 panels, not one strip of 45


def test_comparison_and_all_zero_showers(tmp_path, ds1):
    zero = np.zeros(ds1.n_voxels)
    assert_png(plots.plot_average_shower(zero, ds1, tmp_path / "zero.png"))
    w, h = assert_png(plots.plot_average_shower_comparison(synthetic_mean(ds1), zero, ds1, tmp_path / "cmp.png"))
    assert h > 0.3 * w  # two rows
    assert_png(plots.plot_average_shower_comparison(zero, zero, ds1, tmp_path / "cmp0.png"))


def test_per_energy_rows(tmp_path, ds1):
    energies = np.repeat([256.0, 4096.0, 65536.0], 2)
    showers = np.outer(energies / 1e3, synthetic_mean(ds1))
    w, h = assert_png(plots.plot_average_showers_per_energy(energies, showers, ds1, tmp_path / "pe.png"))
    assert h > w / 2  # three rows
    zeros = np.zeros_like(showers)
    assert_png(plots.plot_average_showers_per_energy(energies[:, None], zeros, ds1, tmp_path / "pe0.png"))


def make_histogram(key: str, log_x: bool = False) -> FeatureHistogram:
    edges = np.logspace(0, 3, 11) if log_x else np.linspace(0.0, 1.0, 11)
    ref = np.full(10, 0.1)
    gen = np.r_[np.zeros(5), np.full(5, 0.2)]
    return FeatureHistogram(key=key, label=key, bin_edges=edges, reference=ref, generated=gen,
                            separation_power=0.25, log_x=log_x)


def test_feature_histograms_grouped_by_family(tmp_path, ds1):
    keys = ["E_tot/E_inc", "voxel_energy", "E_tot/E_inc_E_256", "E_tot/E_inc_E_65536"]
    keys += [f"E_layer_{layer}" for layer in ds1.relevant_layers]
    keys += [f"EC_eta_layer_{layer}" for layer in ds1.layers_binned_in_alpha]
    histograms = [make_histogram(k, log_x=k.startswith("E_layer")) for k in keys]
    histograms.append(FeatureHistogram("E_layer_x", "all zero", np.linspace(0, 1, 3), np.zeros(2), np.zeros(2), 0.0))
    paths = plots.plot_feature_histograms(histograms, tmp_path / "features")
    assert [p.name for p in paths] == [
        "features_E_tot_E_inc_per_energy.png", "features_E_tot_E_inc.png", "features_E_layer.png",
        "features_EC_eta.png", "features_voxel_energy.png", "features_other.png"]
    for p in paths:
        assert_png(p, min_bytes=2_000)
    assert leftovers(tmp_path / "features") == sorted(p.name for p in paths)


def test_keys_are_classified_by_family_and_sorted_by_layer_or_energy():
    groups = {}
    for layer in range(45):
        family, order, title = plots._classify(f"width_r_layer_{layer}")
        groups.setdefault(family.slug, []).append((order, title))
    assert list(groups) == ["width_r"]
    assert groups["width_r"][12] == (12.0, "layer 12")
    family, order, title = plots._classify("E_tot/E_inc_E_4096")
    assert (family.slug, order) == ("E_tot_E_inc_per_energy", 4096.0) and "4.1 GeV" in title


def test_panels_are_split_into_balanced_figures_of_at_most_16():
    assert plots._split_panels(45) == [slice(0, 15), slice(15, 30), slice(30, 45)]
    assert plots._split_panels(16) == [slice(0, 16)]
    assert [s.stop - s.start for s in plots._split_panels(17)] == [8, 9]
    assert plots._split_panels(7) == [slice(0, 7)]


def test_45_layer_feature_family_is_one_grid_figure(tmp_path):
    histograms = [make_histogram(f"EC_r_layer_{i}") for i in range(45)] + [make_histogram("E_tot/E_inc")]
    paths = plots.plot_feature_histograms(histograms, tmp_path)
    assert {p.name for p in paths} == {"features_E_tot_E_inc.png", "features_EC_r.png"}
    width, height = assert_png(tmp_path / "features_EC_r.png")
    assert width > 1.5 * height  # 9 columns x 5 rows of panels, not a near-square layout
    # a dataset-1 family (5 layers) keeps its near-square layout
    (tmp_path / "ds1").mkdir()
    small = plots.plot_feature_histograms([make_histogram(f"EC_r_layer_{i}") for i in range(5)], tmp_path / "ds1")
    assert [p.name for p in small] == ["features_EC_r.png"]


def test_roc_dimension_and_history(tmp_path):
    fpr = np.linspace(0.0, 1.0, 50)
    results = [ClassifierResult(kind, auc, 0.01, "quick", fpr, fpr ** p)
               for kind, auc, p in [("low", 0.7, 0.5), ("low_normed", 0.6, 0.7), ("high", 0.52, 0.95)]]
    w, h = assert_png(plots.plot_roc(results, tmp_path / "roc.png"))
    assert abs(w - h) < 0.2 * w
    assert_png(plots.plot_dimension_curve(np.array([5, 10, 20, 50]),
                                          {"raw": np.array([9.0, 8.5, 8.2, 8.0]), "E = 1 GeV": np.array([4.0] * 4)},
                                          tmp_path / "dim.png"))
    history = {"autoencoder/train": [1.0, 0.5, 0.3], "autoencoder/val": [1.1, 0.6, 0.7],
               "flow/train": [-1.0, -2.0], "flow/val": [float("nan"), -1.5]}
    assert_png(plots.plot_training_history(history, tmp_path / "hist.png"))
    assert_png(plots.plot_training_history({}, tmp_path / "empty.png"))


def test_auc_per_energy_needs_strong_results_of_one_setting(tmp_path):
    fpr = np.linspace(0.0, 1.0, 5)
    per_energy = {"256": 0.51, "65536": 0.8, "4194304": 0.95}
    strong = [ClassifierResult(kind, 0.7, 0.1, "strong", fpr, fpr, auc_error=0.01, auc_per_energy=per_energy,
                               auc_per_energy_error={k: 0.01 for k in per_energy}) for kind in ("low", "high")]
    w, h = assert_png(plots.plot_auc_per_energy(strong, tmp_path / "auc.png"))
    assert w > h
    with pytest.raises(ValueError, match="strong"):
        plots.plot_auc_per_energy([ClassifierResult("low", 0.6, 0.1, "quick", fpr, fpr)], tmp_path / "no.png")
    mixed = [strong[0], dataclasses.replace(strong[1], setting="mine")]
    with pytest.raises(ValueError, match="settings"):
        plots.plot_auc_per_energy(mixed, tmp_path / "no.png")
    assert not (tmp_path / "no.png").exists()


def test_plotting_leaves_global_matplotlib_state_alone(tmp_path, ds1):
    before = dict(mpl.rcParams)
    plots.plot_average_shower(synthetic_mean(ds1), ds1, tmp_path / "a.png")
    assert dict(mpl.rcParams) == before


# -- nothing half-written on errors -----------------------------------------------------
def test_invalid_data_raises_and_writes_nothing(tmp_path, ds1):
    with pytest.raises(VoxelCountError, match="368"):
        plots.plot_average_shower(np.ones(367), ds1, tmp_path / "bad.png")
    with pytest.raises(InvalidEnergyError):
        plots.plot_average_shower_comparison(np.ones(368), np.full(368, np.nan), ds1, tmp_path / "bad.png")
    with pytest.raises(InvalidEnergyError):
        plots.plot_average_showers_per_energy(np.array([-1.0]), np.ones((1, 368)), ds1, tmp_path / "bad.png")
    bad = FeatureHistogram("E_layer_1", "x", np.linspace(0, 1, 4), np.ones(3), np.ones(2), 0.1)
    with pytest.raises(ValueError, match="E_layer_1"):
        plots.plot_feature_histograms([make_histogram("E_layer_0"), bad], tmp_path)
    fpr = np.linspace(0, 1, 5)
    mixed = [ClassifierResult("low", 0.6, 0.1, "full", fpr, fpr), ClassifierResult("high", 0.6, 0.1, "quick", fpr, fpr)]
    with pytest.raises(ValueError, match="settings"):
        plots.plot_roc(mixed, tmp_path / "roc.png")
    with pytest.raises(ValueError):
        plots.plot_dimension_curve(np.arange(3), {"raw": np.ones(4)}, tmp_path / "dim.png")
    assert leftovers(tmp_path) == []


def test_invalid_path_leaves_nothing(tmp_path, ds1):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OSError):
        plots.plot_average_shower(synthetic_mean(ds1), ds1, blocker / "avg.png")
    assert leftovers(tmp_path) == ["not_a_dir"]


@pytest.mark.parametrize("palette", [False, True])
def test_failure_while_writing_removes_the_partial_file(tmp_path, monkeypatch, palette):
    """A crash in the middle of savefig must leave neither the target nor a temporary file."""
    def broken_savefig(self, fname, **kwargs):
        if hasattr(fname, "write"):
            fname.write(PNG_SIGNATURE)
        else:
            Path(fname).write_bytes(PNG_SIGNATURE + b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with plots._figure(2.0, 2.0) as fig, pytest.raises(RuntimeError, match="disk full"):
        plots._save(fig, tmp_path / "out.png", palette=palette)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.plot_roc([ClassifierResult("low", 0.5, 0.0, "quick", np.r_[0.0, 1.0], np.r_[0.0, 1.0])],
                       tmp_path / "roc.png")
    assert leftovers(tmp_path) == []
