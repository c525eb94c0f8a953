import json

import numpy as np
import pytest

from caloman.errors import ConfigError, InvalidEnergyError
from caloman.evaluation import EvaluationConfig, evaluate_arrays
from caloman.features import apply_threshold
from caloman.geometry import load_binning
from caloman.metrics.defects import scale_layer
from caloman.metrics.strong import (
    SPECTRUM_BANDS,
    StrongClassifierSettings,
    energy_groups,
    run_strong_test,
    strong_inputs,
)
from caloman.simulation import simulate_showers

FAST = StrongClassifierSettings(max_iter=60)


@pytest.fixture(scope="module")
def binning():
    return load_binning("ds1-photons")


@pytest.fixture(scope="module")
def two_samples(binning):
    """Two independent simulator samples, 300 showers at each of 4 energies (thresholded)."""
    energies = np.repeat([1024.0, 8192.0, 65536.0, 524288.0], 300)
    first = apply_threshold(simulate_showers(binning, energies, seed=11), 1.0)
    second = apply_threshold(simulate_showers(binning, energies, seed=12), 1.0)
    return energies, first, second


def test_energy_groups_of_a_ladder_key_each_energy_in_mev():
    energies = np.array([256.0, 512.0, 256.0, 4194304.0])
    keys, group = energy_groups(energies)
    assert keys == ["256", "512", "4194304"]
    np.testing.assert_array_equal(group, [0, 1, 0, 2])


def test_energy_groups_of_a_continuous_spectrum_are_log_bins():
    energies = np.geomspace(1e3, 1e6, 500)
    keys, group = energy_groups(energies, n_bins=3)
    assert keys == ["3162", "31620", "316200"]
    np.testing.assert_array_equal(np.bincount(group), [167, 166, 167])


def test_sub_samples_of_a_continuous_spectrum_share_their_energy_bins():
    """The low-level test keeps fewer showers than the high-level one: both tables' rows must
    be the same bins (before 2026-12-07 they were keyed 1415 and 1413 MeV side by side)."""
    energies = np.exp(np.random.default_rng(0).uniform(np.log(1e3), np.log(1e6), 20_000))
    keys, group = energy_groups(energies)
    sub = energies[:700]
    assert sub.min() > energies.min() and sub.max() < energies.max()
    sub_keys, sub_group = energy_groups(sub)
    assert sub_keys == keys and keys[0] == "1413" and keys[-1] == "707900"
    np.testing.assert_array_equal(sub_group, group[:700])


def test_strong_inputs_add_energy_ratios(binning):
    energies = np.array([1000.0])
    showers = np.zeros((1, binning.n_voxels))
    showers[0, binning.layer_slice(2)] = 1.0  # 190 MeV in the middle layer
    showers[0, binning.layer_slice(1).start + np.arange(4)] = [1.0, 1.5, 3.0, 40.0]  # strips: 45.5 MeV
    inputs = strong_inputs("low", energies, showers, binning)
    n_layers = len(binning.relevant_layers)
    n_base = 1 + binning.n_voxels
    assert inputs.shape == (1, n_base + n_layers + 1 + n_layers * SPECTRUM_BANDS)
    ratios = inputs[0, n_base:n_base + n_layers + 1]
    assert ratios[binning.relevant_layers.index(2)] == pytest.approx(np.log10(0.19), rel=1e-5)
    assert ratios[binning.relevant_layers.index(1)] == pytest.approx(np.log10(0.0455), rel=1e-5)
    assert ratios[-1] == pytest.approx(np.log10(0.2355), rel=1e-5)
    spectra = inputs[0, n_base + n_layers + 1:].reshape(n_layers, SPECTRUM_BANDS)
    # bands [1, 2), [2, 4), [4, 8), [8, 16), [16, inf) MeV
    np.testing.assert_array_equal(spectra[binning.relevant_layers.index(1)], [2, 1, 0, 0, 1])
    np.testing.assert_array_equal(spectra[binning.relevant_layers.index(2)], [190, 0, 0, 0, 0])
    assert spectra[binning.relevant_layers.index(0)].sum() == 0


def test_independent_samples_are_indistinguishable(binning, two_samples):
    energies, first, second = two_samples
    result = run_strong_test("low", (energies, first), (energies, second), binning, FAST, seed=1)
    assert result.setting == "strong"
    assert abs(result.auc - 0.5) < 0.04
    assert result.auc_error is not None and result.auc_error < 0.03
    assert set(result.auc_per_energy) == {"1024", "8192", "65536", "524288"}
    assert result.n_per_class == 1200 and result.n_folds == 3
    assert result.n_per_energy == {"1024": 300, "8192": 300, "65536": 300, "524288": 300}


def test_a_defect_at_one_energy_shows_at_that_energy_only(binning, two_samples):
    energies, first, second = two_samples
    damaged = second.copy()
    at = energies == 524288.0
    damaged[at] = scale_layer(second[at], binning, 1, 1.10)  # strips 10 % hot at 524 GeV only
    result = run_strong_test("low", (energies, first), (energies, damaged), binning, FAST, seed=1)
    assert result.auc_per_energy["524288"] > 0.75
    for key in ("1024", "8192", "65536"):
        assert result.auc_per_energy[key] < 0.6
    assert 0.55 < result.auc < result.auc_per_energy["524288"]


def test_high_level_input_sees_a_layer_energy_shift(binning, two_samples):
    energies, first, second = two_samples
    damaged = scale_layer(second, binning, 2, 1.05)
    result = run_strong_test("high", (energies, first), (energies, damaged), binning, FAST, seed=1)
    assert result.auc > 0.75


def test_strong_test_is_reproducible(binning, two_samples):
    energies, first, second = two_samples
    a = run_strong_test("high", (energies, first), (energies, second), binning, FAST, seed=3)
    b = run_strong_test("high", (energies, first), (energies, second), binning, FAST, seed=3)
    assert a.auc == b.auc and a.auc_per_energy == b.auc_per_energy


def test_settings_are_validated():
    with pytest.raises(ConfigError):
        StrongClassifierSettings(n_folds=1)
    with pytest.raises(ConfigError):
        StrongClassifierSettings(validation_fraction=0.7)
    assert StrongClassifierSettings().showers_per_class(200_000, 400) == 100_000
    assert StrongClassifierSettings().showers_per_class(100_000, 40_772) == 1_226  # dataset 3, low inputs


def test_too_few_showers_and_bad_energies_are_refused(binning, two_samples):
    energies, first, second = two_samples
    with pytest.raises(ConfigError, match="too few"):
        run_strong_test("low", (energies[:5], first[:5]), (energies[:5], second[:5]), binning, FAST)
    bad = energies.copy()
    bad[0] = -1.0
    with pytest.raises(InvalidEnergyError):
        run_strong_test("low", (bad, first), (energies, second), binning, FAST)


def test_evaluate_with_the_strong_setting_writes_per_energy_metrics_and_plot(binning, two_samples, tmp_path,
                                                                           monkeypatch):
    import caloman.metrics.strong as strong

    monkeypatch.setattr(strong, "StrongClassifierSettings", lambda: FAST)
    energies, first, second = two_samples
    out = tmp_path / "ev"
    evaluate_arrays((energies, first), (energies, second), binning, out,
                    EvaluationConfig(classifier="strong", fpd_kpd=False, prdc=False))
    metrics = json.loads((out / "metrics.json").read_text())
    for kind in ("low", "low_normed", "high"):
        entry = metrics["classifier"][kind]
        assert entry["setting"] == "strong"
        assert {"auc", "jsd", "auc_error", "auc_per_energy"} <= set(entry)
        assert set(entry["auc_per_energy"]) == {"1024", "8192", "65536", "524288"}
    assert (out / "plots" / "auc_per_energy.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "AUC per incident energy" in summary and "| 524288 |" in summary


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -4.0])
def test_evaluate_leaves_no_output_folder_for_invalid_showers(binning, two_samples, tmp_path, bad_value):
    energies, first, second = two_samples
    broken = second.copy()
    broken[3, 10] = bad_value
    out = tmp_path / "never"
    with pytest.raises(Exception, match="voxel"):
        evaluate_arrays((energies, first), (energies, broken), binning, out,
                        EvaluationConfig(classifier="none", fpd_kpd=False, prdc=False))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_evaluate_into_an_existing_folder_keeps_other_files(binning, two_samples, tmp_path):
    energies, first, second = two_samples
    out = tmp_path / "ev"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    evaluate_arrays((energies[:50], first[:50]), (energies[:50], second[:50]), binning, out,
                    EvaluationConfig(classifier="none", fpd_kpd=False, prdc=False, plots=False))
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "metrics.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ev"]
