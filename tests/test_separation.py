import numpy as np
import pytest

from caloman.features import apply_threshold, compute_features
from caloman.geometry import load_binning
from caloman.metrics.separation import (
    CHALLENGE_BINNINGS,
    VoxelEnergyHistogram,
    feature_histograms,
    histogram_pair,
    normalised_histogram,
    separation_power,
)


def test_separation_power_worked_example():
    # 0.5 * [ (0.25^2 / 0.75) * 2 + 0.5^2 / 0.5 ] = 0.5 * (1/6 + 1/2) = 1/3
    assert separation_power([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]) == pytest.approx(1 / 3, rel=1e-12)
    assert separation_power([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    assert separation_power([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError):
        separation_power([1.0], [0.5, 0.5])


def test_matches_density_times_bin_width_convention():
    # The challenge normalises with density=True and multiplies by the bin widths.
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.1, 5000), rng.normal(1.02, 0.12, 4000)
    edges = np.linspace(0.5, 1.5, 101)
    da, _ = np.histogram(a, edges, density=True)
    db, _ = np.histogram(b, edges, density=True)
    da, db = da * np.diff(edges), db * np.diff(edges)
    expected = 0.5 * np.sum((da - db) ** 2 / (da + db + 1e-16))
    h = histogram_pair("x", "x", a, b, edges)
    assert h.separation_power == pytest.approx(expected, rel=1e-12)
    assert h.reference.sum() == pytest.approx(1.0) and h.generated.sum() == pytest.approx(1.0)


def test_out_of_range_entries_are_dropped_and_empty_cases_are_defined():
    hist, n = normalised_histogram(np.array([-1.0, 0.1, 0.1, 0.6, 2.0]), np.array([0.0, 0.5, 1.0]))
    assert n == 3 and hist.tolist() == pytest.approx([2 / 3, 1 / 3])
    edges = np.array([0.0, 1.0, 2.0])
    assert histogram_pair("x", "x", [5.0], [7.0], edges).separation_power == 0.0
    one_empty = histogram_pair("x", "x", [0.5], [7.0], edges)
    assert one_empty.separation_power == 1.0 and one_empty.generated.tolist() == [0.0, 0.0]


def test_voxel_histogram_streams_like_np_histogram():
    rng = np.random.default_rng(3)
    ref = apply_threshold((rng.gamma(0.3, 40.0, (200, 50))).astype(np.float32), 1.0)
    gen = apply_threshold((rng.gamma(0.3, 45.0, (150, 50))).astype(np.float32), 1.0)
    ref[0, 0], ref[0, 1], gen[0, 0] = 1.0, ref.max(), 10 * ref.max()  # on both end edges, and beyond
    hist = VoxelEnergyHistogram(1.0, ref.max())
    for chunk in np.array_split(ref, 7):
        hist.add_reference(chunk)
    for chunk in np.array_split(gen, 3):
        hist.add_generated(chunk)
    edges = np.logspace(np.log10(1.0), np.log10(ref.max()), 50)  # 50 edges = 49 bins, as the challenge
    assert np.array_equal(hist.edges, edges)
    assert np.array_equal(hist.reference_counts, np.histogram(ref.ravel(), edges)[0])
    assert np.array_equal(hist.generated_counts, np.histogram(gen.ravel(), edges)[0])
    result = hist.result()
    assert result.key == "voxel_energy" and result.log_x and len(result.reference) == 49


def _features(binning, n, seed, scale=1.0, energies=None):
    rng = np.random.default_rng(seed)
    incident = energies if energies is not None else 2.0 ** rng.integers(8, 23, n)
    showers = rng.gamma(0.4, 1.0, (n, binning.n_voxels)) * (rng.random((n, binning.n_voxels)) < 0.4)
    # E_tot close to E_inc, so E_tot / E_inc lands in the challenge's ranges
    showers *= scale * incident[:, None] / (0.16 * binning.n_voxels)
    return compute_features(incident, apply_threshold(showers.astype(np.float32), binning.readout_threshold), binning)


def test_ds1_photon_keys_and_edges():
    binning = load_binning("ds1-photons")
    ref, gen = _features(binning, 400, 0), _features(binning, 300, 1, scale=1.1)
    hists = {h.key: h for h in feature_histograms(ref, gen, binning)}
    layers, alpha = (0, 1, 2, 3, 12), (1, 2)
    expected = {"E_tot/E_inc"} | {f"E_layer_{layer}" for layer in layers}
    expected |= {f"{name}_layer_{layer}" for name in ("EC_eta", "EC_phi", "width_eta", "width_phi") for layer in alpha}
    expected |= {f"{name}_layer_{layer}" for name in ("EC_r", "width_r", "sparsity") for layer in layers}
    present = {int(2**k) for k in range(8, 23) if (ref.incident_energies == 2**k).any()}
    expected |= {f"E_tot/E_inc_E_{e}" for e in present}
    assert set(hists) == expected  # no voxel_energy without a voxel histogram
    assert np.array_equal(hists["E_tot/E_inc"].bin_edges, np.linspace(0.5, 1.5, 101))
    # E_layer: 40 log-spaced edges (39 bins) from the threshold to the float32 reference maximum
    ref_max = ref.e_layer[2].max()
    assert ref_max.dtype == np.float32
    assert np.array_equal(hists["E_layer_2"].bin_edges, np.logspace(np.log10(1.0), np.log10(ref_max), 40))
    assert np.array_equal(hists["EC_eta_layer_1"].bin_edges, np.linspace(-100, 100, 101))
    assert np.array_equal(hists["width_phi_layer_2"].bin_edges, np.linspace(0, 100, 101))
    assert np.array_equal(hists["EC_r_layer_12"].bin_edges, np.linspace(0, 1500, 101))
    assert np.array_equal(hists["width_r_layer_3"].bin_edges, np.linspace(0, 500, 101))
    assert np.array_equal(hists["sparsity_layer_0"].bin_edges, np.linspace(0, 1, 21))
    # per-energy: wide bins below 4096 MeV, narrow from there for photons
    assert np.array_equal(hists["E_tot/E_inc_E_2048"].bin_edges, np.linspace(0.4, 1.4, 21))
    assert np.array_equal(hists["E_tot/E_inc_E_4096"].bin_edges, np.linspace(0.9, 1.1, 21))
    for h in hists.values():
        assert 0.0 <= h.separation_power <= 1.0
        assert h.reference.sum() == pytest.approx(1.0) or h.reference.sum() == 0.0


def test_pions_keep_wide_bins_and_ds2_uses_its_ranges():
    pions = load_binning("ds1-pions")
    ref = _features(pions, 100, 0, energies=np.full(100, 65536.0))
    hists = {h.key: h for h in feature_histograms(ref, ref, pions)}
    assert np.array_equal(hists["E_tot/E_inc_E_65536"].bin_edges, np.linspace(0.4, 1.4, 21))
    assert all(h.separation_power == 0.0 for h in hists.values())
    table = CHALLENGE_BINNINGS["ds23"]
    assert np.array_equal(table["EC_eta"].for_layer(12).edges(), np.linspace(-30, 30, 101))
    assert np.array_equal(table["EC_r"].for_layer(12).edges(), np.linspace(0, 42, 101))
    assert np.array_equal(table["width_r"].for_layer(3).edges(), np.linspace(0, 20, 101))


def test_per_energy_histogram_selects_showers_by_energy():
    binning = load_binning("ds1-photons")
    energies = np.array([256.0] * 50 + [512.0] * 50)
    ref = _features(binning, 100, 0, energies=energies)
    gen = _features(binning, 100, 0, energies=energies)
    # same showers at 256 MeV, different ones at 512 MeV
    gen_other = _features(binning, 100, 5, energies=energies)
    mixed = type(gen)(**{**gen.__dict__, "e_tot": np.concatenate([gen.e_tot[:50], gen_other.e_tot[50:]])})
    hists = {h.key: h for h in feature_histograms(ref, mixed, binning)}
    assert hists["E_tot/E_inc_E_256"].separation_power == 0.0
    assert hists["E_tot/E_inc_E_512"].separation_power > 0.0
    assert "E_tot/E_inc_E_1024" not in hists
