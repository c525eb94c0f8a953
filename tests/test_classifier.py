import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from caloman.errors import ConfigError, VoxelCountError
from caloman.geometry import Binning, Layer, load_binning
from caloman.metrics import ClassifierResult
from caloman.metrics import classifier as classifier_module
from caloman.metrics.classifier import (
    ClassifierSettings,
    build_classifier,
    calibrate_probabilities,
    classifier_inputs,
    jensen_shannon_divergence,
    run_classifier_test,
    split_sizes,
)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_binning():
    # Layer 0: 2 r x 2 alpha = 4 voxels; layer 1 empty; layer 2: 1 voxel.
    layers = (Layer(0, (0.0, 1.0, 2.0), 2), Layer(1, (0.0,), 1), Layer(2, (0.0, 5.0), 1))
    return Binning(name="tiny", particle="photon", pid=22, layers=layers, source="test")


# -- inputs -------------------------------------------------------------------

def test_low_inputs_are_log_energy_and_voxels_over_incident_energy(tiny_binning):
    energies = np.array([100.0, 1000.0])
    showers = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 10.0, 0.0, 100.0]])
    inputs = classifier_inputs("low", energies, showers, tiny_binning)
    np.testing.assert_allclose(inputs, [[2.0, 0.01, 0.02, 0.03, 0.04, 0.05],
                                        [3.0, 0.0, 0.0, 0.01, 0.0, 0.1]])
    # (N, 1) incident energies, as stored in the files, give the same result.
    np.testing.assert_array_equal(classifier_inputs("low", energies[:, None], showers, tiny_binning), inputs)


def test_low_normed_inputs_divide_by_layer_energy(tiny_binning):
    energies = np.array([100.0, 1000.0])
    showers = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 100.0]])
    inputs = classifier_inputs("low_normed", energies, showers, tiny_binning)
    expected = [[2.0, 0.1, 0.2, 0.3, 0.4, 1.0, math.log10(10 + 1e-8), math.log10(5 + 1e-8)],
                # an empty layer gives zeros and log10(1e-8) = -8
                [3.0, 0.0, 0.0, 0.0, 0.0, 1.0, -8.0, math.log10(100 + 1e-8)]]
    np.testing.assert_allclose(inputs, expected, rtol=1e-12)


def test_high_inputs_start_with_log_incident_energy():
    pytest.importorskip("caloman.features")
    binning = load_binning("ds1-photons")
    energies, showers = _showers(binning, 5, seed=0)
    inputs = classifier_inputs("high", energies, showers, binning)
    assert inputs.shape[0] == 5
    np.testing.assert_allclose(inputs[:, 0], np.log10(energies))


def test_inputs_reject_wrong_kind_and_voxel_count(tiny_binning):
    with pytest.raises(ConfigError, match="low_normed"):
        classifier_inputs("voxels", np.ones(2), np.ones((2, 5)), tiny_binning)
    with pytest.raises(VoxelCountError, match="5"):
        classifier_inputs("low", np.ones(2), np.ones((2, 6)), tiny_binning)


# -- settings and split -----------------------------------------------------------

def test_full_setting_is_the_challenge_protocol():
    photons = ClassifierSettings.full(load_binning("ds1-photons"))
    assert photons.name == "full"
    assert photons.hidden_layers == (2048, 2048, 2048)
    assert (photons.learning_rate, photons.batch_size, photons.max_epochs) == (2e-4, 1000, 50)
    assert photons.dtype == "float64" and photons.max_showers_per_class is None
    assert split_sizes(121_000, photons) == (80_000, 20_000, 21_000)
    assert split_sizes(130_000, photons) == (80_000, 20_000, 30_000)       # validation takes the rest
    assert split_sizes(12_100, photons) == (8_000, 2_000, 2_100)          # fewer showers: same proportions
    assert split_sizes(120_800, ClassifierSettings.full(load_binning("ds1-pions"))) == (80_000, 20_000, 20_800)
    assert split_sizes(100_000, ClassifierSettings.full(load_binning("ds2"))) == (60_000, 20_000, 20_000)


def test_quick_setting_is_small_and_labelled():
    quick = ClassifierSettings.quick()
    assert quick.name == "quick"
    assert sum(quick.hidden_layers) < 1000 and quick.max_epochs <= 15
    assert split_sizes(3_000, quick) == (1_800, 600, 600)
    with pytest.raises(ConfigError):
        split_sizes(2, quick)
    with pytest.raises(ConfigError):
        ClassifierSettings(split_fractions=(0.8, 0.2, 0.2))


def test_network_layout():
    net = build_classifier(368, (2048, 2048, 2048))
    linear = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(368, 2048), (2048, 2048), (2048, 2048), (2048, 1)]
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in net) == 3
    assert not any(isinstance(m, torch.nn.Dropout) for m in net)


# -- calibration and JSD ------------------------------------------------------------

def test_isotonic_calibration_pools_and_clips():
    # Labels 0, 1, 0 at 0.1, 0.2, 0.3: pool-adjacent-violators merges the last two to 0.5.
    calibrated = calibrate_probabilities([0.1, 0.2, 0.3], [0, 1, 0], [0.05, 0.1, 0.25, 0.3, 0.9])
    np.testing.assert_allclose(calibrated, [1e-6, 1e-6, 0.5, 0.5, 0.5])
    separable = calibrate_probabilities([0.2, 0.2, 0.6, 0.6], [0, 0, 1, 1], [0.2, 0.6])
    np.testing.assert_allclose(separable, [1e-6, 1 - 1e-6])


def test_jsd_is_rescaled_bce():
    assert jensen_shannon_divergence([0, 1, 1, 0], [0.5] * 4) == pytest.approx(0.0, abs=1e-15)
    bce = -(math.log(0.8) + math.log(0.6)) / 2
    assert jensen_shannon_divergence([1, 0], [0.8, 0.4]) == pytest.approx((math.log(2) - bce) / math.log(2))
    assert jensen_shannon_divergence([1, 0], [1 - 1e-6, 1e-6]) == pytest.approx(1 - 1e-6 / math.log(2), rel=1e-9)


# -- the full test on synthetic showers ----------------------------------------------

def _showers(binning, n, seed, layer2_scale=1.0):
    """Toy showers: gamma-distributed voxel fractions of 90 % of E_inc, 1 MeV threshold."""
    rng = np.random.default_rng(seed)
    energies = 2.0 ** rng.integers(8, 15, size=n)
    fractions = rng.gamma(0.3, 1.0, size=(n, binning.n_voxels))
    showers = 0.9 * energies[:, None] * fractions / fractions.sum(axis=1, keepdims=True)
    showers[:, binning.layer_slice(2)] *= layer2_scale
    showers[showers < binning.readout_threshold] = 0.0
    return energies, showers


@pytest.fixture(scope="module")
def photons():
    return load_binning("ds1-photons")


def test_identical_distributions_are_not_separated(photons):
    result = run_classifier_test("low", _showers(photons, 1_000, 1), _showers(photons, 1_000, 2), photons,
                                 "quick", seed=0)
    assert isinstance(result, ClassifierResult)
    assert result.setting == "quick" and result.kind == "low"
    assert abs(result.auc - 0.5) < 0.1     # about 3.5 sigma for 200 + 200 validation showers
    assert result.jsd < 0.1
    assert 1 <= result.best_epoch <= ClassifierSettings.quick().max_epochs


def test_different_distributions_are_separated(photons):
    # Layer 2 carries twice the energy in the generated showers.
    result = run_classifier_test("low", _showers(photons, 1_000, 1), _showers(photons, 1_000, 2, 2.0), photons,
                                 "quick", seed=0)
    assert result.auc > 0.97
    assert result.jsd > 0.6
    assert result.fpr[0] == 0 and result.fpr[-1] == 1 and np.all(np.diff(result.tpr) >= 0)


def test_calibration_is_fitted_on_test_and_applied_to_validation(photons, monkeypatch):
    calls = []

    def recording(test_probabilities, test_labels, probabilities):
        calibrated = calibrate_probabilities(test_probabilities, test_labels, probabilities)
        calls.append((len(test_probabilities), len(probabilities), calibrated))
        return calibrated

    monkeypatch.setattr(classifier_module, "calibrate_probabilities", recording)
    settings = ClassifierSettings(name="tiny", hidden_layers=(32,), learning_rate=1e-3, batch_size=100,
                                  max_epochs=3, split_fractions=(0.5, 0.3, 0.2), device="cpu", dtype="float32")
    result = run_classifier_test("low_normed", _showers(photons, 500, 1), _showers(photons, 400, 2, 1.5),
                                 photons, settings, seed=3)
    # 400 showers per class (the larger class is cut): test 120 + 120, validation 80 + 80.
    assert [(n_test, n_val) for n_test, n_val, _ in calls] == [(240, 160)]
    calibrated = calls[0][2]
    assert calibrated.min() >= 1e-6 and calibrated.max() <= 1 - 1e-6
    labels = np.concatenate([np.ones(80), np.zeros(80)])
    assert result.auc == pytest.approx(roc_auc_score(labels, calibrated))
    assert result.jsd == pytest.approx(jensen_shannon_divergence(labels, calibrated))
    assert result.setting == "tiny"


def test_same_seed_same_numbers_and_state_left_alone(photons):
    reference, generated = _showers(photons, 600, 1), _showers(photons, 600, 2, 1.3)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = run_classifier_test("low", reference, generated, photons, "quick", seed=5)
    assert torch.rand(1) == expected_next          # the caller's torch RNG is untouched
    assert torch.get_num_threads() == 1            # thread count restored
    second = run_classifier_test("low", reference, generated, photons, "quick", seed=5)
    other = run_classifier_test("low", reference, generated, photons, "quick", seed=6)
    assert (first.auc, first.jsd, first.best_epoch) == (second.auc, second.jsd, second.best_epoch)
    np.testing.assert_array_equal(first.fpr, second.fpr)
    assert (other.auc, other.jsd) != (first.auc, first.jsd)


def test_unknown_setting_is_a_config_error(photons):
    with pytest.raises(ConfigError, match="quick"):
        run_classifier_test("low", _showers(photons, 20, 1), _showers(photons, 20, 2), photons, "fast", seed=0)
