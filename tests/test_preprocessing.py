import math

import numpy as np
import pytest
import torch

from caloman.errors import ConfigError, InvalidEnergyError
from caloman.geometry import Binning, Layer, load_binning
from caloman.preprocessing import (
    LAYER_EPS_MEV,
    IncidentEnergyScaling,
    LayerEnergyEncoding,
    LayerNormalisation,
    PaperScaling,
    apply_threshold,
    inverse_logit,
    logit,
    make_preprocessing,
)

torch.set_num_threads(1)


def tiny_binning() -> Binning:
    """Layer 0: 2 r x 2 alpha = 4 voxels; layer 1 holds none; layer 2: 1 voxel."""
    layers = (Layer(0, (0.0, 1.0, 2.0), 2), Layer(1, (0.0,), 1), Layer(2, (0.0, 5.0), 1))
    return Binning(name="tiny", particle="photon", pid=22, layers=layers, source="test")


def showers(n=50, v=368, seed=0):
    rng = np.random.default_rng(seed)
    incident = 2.0 ** rng.integers(8, 23, n)
    voxels = rng.gamma(0.3, 1.0, (n, v)) * incident[:, None] / v
    voxels[rng.random(voxels.shape) < 0.4] = 0
    return incident, voxels


# -- incident energy ------------------------------------------------------------------------
def test_incident_energy_scaling_is_log_linear_on_trained_range():
    scaling = IncidentEnergyScaling().fit(np.array([1024.0, 256.0, 4096.0]))
    # log2: 256 -> 8, 4096 -> 12, so 1024 (10) sits half way.
    assert np.allclose(scaling.forward(np.array([256.0, 1024.0, 4096.0])), [0.0, 0.5, 1.0], atol=1e-15)
    e = np.array([300.0, 2000.0, 1e5])
    assert np.allclose(scaling.inverse(scaling.forward(e)), e, rtol=1e-14)


def test_incident_energy_scaling_torch_matches_numpy_and_state_round_trips():
    scaling = IncidentEnergyScaling().fit(np.array([256.0, 4096.0]))
    restored = IncidentEnergyScaling.from_state({k: torch.tensor(v) for k, v in scaling.state().items()})
    e = np.array([300.0, 700.0])
    out = restored.forward(torch.tensor(e))
    assert isinstance(out, torch.Tensor)
    assert np.allclose(out.numpy(), scaling.forward(e), rtol=1e-14)


def test_incident_energy_scaling_single_energy_and_bad_energies():
    scaling = IncidentEnergyScaling().fit(np.array([512.0, 512.0]))
    assert scaling.forward(np.array([512.0])) == pytest.approx(0.0)
    assert scaling.inverse(np.array([0.0])) == pytest.approx(512.0)
    with pytest.raises(InvalidEnergyError):
        IncidentEnergyScaling().fit(np.array([100.0, -1.0]))


# -- paper scaling --------------------------------------------------------------------------
def test_paper_scaling_hand_computed():
    incident = np.array([10.0, 20.0])
    voxels = np.array([[5.0, 5.0, 5.0], [2.0, 0.0, 8.0]])  # E_dep / E_inc = 1.5, 0.5
    scaling = PaperScaling().fit(incident, voxels)
    assert scaling.r_max == pytest.approx(1.5)
    x = scaling.forward(incident, voxels)
    assert x.shape == (2, 4)
    assert np.allclose(x[0], [1 / 3, 1 / 3, 1 / 3, 1.0])
    assert np.allclose(x[1], [2 / 30, 0.0, 8 / 30, 10 / 30])
    assert np.allclose(scaling.inverse(incident, x), voxels, rtol=1e-14)


def test_paper_scaling_inverse_clips_negative_voxels():
    scaling = PaperScaling(r_max=2.0)
    out = scaling.inverse(np.array([10.0]), np.array([[-0.1, 0.25, 0.5]]))
    assert np.array_equal(out, [[0.0, 5.0]])


# -- layer normalisation --------------------------------------------------------------------
def test_layer_normalisation_shapes_energies_and_round_trip():
    norm = LayerNormalisation(tiny_binning())
    assert norm.n_layers == 2
    voxels = np.array([[1.0, 3.0, 0.0, 4.0, 2.0],
                       [0.0, 0.0, 0.0, 0.0, 7.0]])  # second shower: layer 0 empty
    shapes, energies = norm.forward(voxels)
    assert np.array_equal(energies, [[8.0, 2.0], [0.0, 7.0]])
    assert np.allclose(shapes[0], [1 / 8, 3 / 8, 0, 4 / 8, 1.0], rtol=1e-6)
    assert np.array_equal(shapes[1, :4], np.zeros(4))
    assert np.allclose(shapes[:, 4], 1.0, rtol=1e-6)
    assert np.allclose(norm.inverse(shapes, energies), voxels, rtol=1e-14, atol=1e-300)


def test_layer_normalisation_torch_path():
    norm = LayerNormalisation(load_binning("ds1-photons"))
    _, voxels = showers(5)
    shapes, energies = norm.forward(torch.tensor(voxels))
    assert torch.allclose(norm.inverse(shapes, energies), torch.tensor(voxels), rtol=1e-13)
    assert torch.allclose(shapes[:, norm.slices[1]].sum(-1), energies[:, 1] / (energies[:, 1] + LAYER_EPS_MEV))


# -- layer energy encoding ------------------------------------------------------------------
def test_logit_bounds_and_inverse():
    u = np.array([0.0, 0.5, 1.0])
    y = logit(u)
    assert np.allclose(y, [math.log(1e-6 / (1 - 1e-6)), 0.0, math.log((1 - 1e-6) / 1e-6)])
    assert np.allclose(inverse_logit(y), u, atol=1e-15)
    assert np.array_equal(inverse_logit(np.array([-50.0, 50.0])), [0.0, 1.0])


def test_layer_energy_encoding_hand_computed():
    encoding = LayerEnergyEncoding()
    energies = np.array([[2.0, 1.0, 1.0]])
    u = encoding.to_fractions(np.array([8.0]), energies)
    # u0 = 4 / 8, u1 = 2 / 4, u2 = 1 / 2
    assert np.allclose(u, [[0.5, 0.5, 0.5]])
    assert np.allclose(encoding.forward(np.array([8.0]), energies), 0.0, atol=1e-12)
    assert np.allclose(encoding.inverse(np.array([8.0]), np.zeros((1, 3))), energies)


def test_layer_energy_encoding_empty_remainder_and_round_trip():
    encoding = LayerEnergyEncoding()
    incident = np.array([10.0, 10.0, 10.0])
    energies = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 4.0, 5.0]])
    u = encoding.to_fractions(incident, energies)
    assert np.allclose(u, [[0.3, 1.0, 0.0], [0.0, 0.0, 0.0], [0.9, 0.0, 4 / 9]])
    assert np.allclose(encoding.from_fractions(incident, u), energies, rtol=1e-14, atol=1e-14)
    # Through logit space the round trip holds to the resolution alpha = 1e-6 gives.
    back = encoding.inverse(incident, encoding.forward(incident, energies))
    assert np.allclose(back, energies, rtol=1e-9, atol=1e-9)


def test_layer_energy_encoding_fits_scale_above_one():
    encoding = LayerEnergyEncoding().fit(np.array([10.0, 10.0]), np.array([[6.0, 6.0], [1.0, 2.0]]))
    assert encoding.u0_scale == pytest.approx(1.2)
    assert LayerEnergyEncoding().fit(np.array([10.0]), np.array([[1.0, 2.0]])).u0_scale == 1.0


def test_layer_energy_encoding_conserves_energy_for_any_features():
    encoding = LayerEnergyEncoding(u0_scale=1.5)
    rng = np.random.default_rng(1)
    incident = rng.uniform(100, 1e5, 1000)
    features = rng.uniform(-20, 20, (1000, 5))
    energies = encoding.inverse(incident, features)
    u0 = inverse_logit(features[:, 0])
    assert np.all(energies >= 0)
    assert np.allclose(energies.sum(1), u0 * 1.5 * incident, rtol=1e-12)
    assert np.all(energies.sum(1) <= 1.5 * incident * (1 + 1e-12))


def test_layer_energy_encoding_torch_matches_numpy():
    encoding = LayerEnergyEncoding(u0_scale=1.2)
    rng = np.random.default_rng(2)
    incident, energies = rng.uniform(100, 1e4, 20), rng.gamma(1.0, 100.0, (20, 4))
    features = encoding.forward(incident, energies)
    out = encoding.forward(torch.tensor(incident), torch.tensor(energies))
    assert np.allclose(out.numpy(), features, rtol=1e-12)
    back = encoding.inverse(torch.tensor(incident), torch.tensor(features))
    assert np.allclose(back.numpy(), encoding.inverse(incident, features), rtol=1e-12)


def test_layer_energy_encoding_back_order_hand_computed():
    encoding = LayerEnergyEncoding(order="back")
    energies = np.array([[1.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    u = inverse_logit(encoding.forward(np.array([8.0, 10.0]), energies))
    # Chain from the deepest layer: u0 = 4 / 8, u1 = 2 / 4 (deepest), u2 = 1 / 2; the first layer takes the rest.
    # Second row: nothing deep, so u1 = u2 = 0 and layer 0 keeps all 3.
    assert np.allclose(u, [[0.5, 0.5, 0.5], [0.3, 0.0, 0.0]], atol=1e-6)
    back = encoding.inverse(np.array([8.0, 10.0]), encoding.forward(np.array([8.0, 10.0]), energies))
    assert np.allclose(back, energies, rtol=1e-9, atol=1e-9)
    torch_back = encoding.inverse(torch.tensor([8.0, 10.0]), torch.tensor(encoding.forward(np.array([8.0, 10.0]),
                                                                                          energies)))
    assert np.allclose(torch_back.numpy(), back, rtol=1e-12)
    # Whatever the features, the first layer is the one that takes what the chain leaves.
    features = np.random.default_rng(4).uniform(-20, 20, (200, 3))
    out = encoding.inverse(np.full(200, 8.0), features)
    left = inverse_logit(features[:, 0]) * 8.0 - out[:, 1:].sum(1)
    assert np.all(out >= 0) and np.allclose(out[:, 0], left, atol=1e-12)
    with pytest.raises(ConfigError, match="front"):
        LayerEnergyEncoding(order="middle")


# -- pipelines ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,order", [("paper", "front"), ("per-layer", "front"), ("per-layer", "back")])
def test_pipeline_round_trip(name, order):
    binning = load_binning("ds1-photons")
    incident, voxels = showers(64)
    pipeline = make_preprocessing(name, binning, layer_order=order).fit(incident, voxels)
    x = pipeline.forward(incident, voxels)
    n_layers = len(binning.relevant_layers)
    assert x.shape == (64, 369 if name == "paper" else 368 + n_layers)
    assert np.allclose(pipeline.inverse(incident, x), voxels, rtol=1e-8, atol=1e-10)
    # Same through torch, with the constants as tensors (a model's buffers).
    restored = make_preprocessing(name, binning, layer_order=order).load_state(
        {k: torch.tensor(v) for k, v in pipeline.state().items()})
    xt = restored.forward(torch.tensor(incident), torch.tensor(voxels))
    assert np.allclose(xt.numpy(), x, rtol=1e-12, atol=1e-14)
    assert np.allclose(restored.inverse(torch.tensor(incident), xt).numpy(), voxels, rtol=1e-8, atol=1e-10)


def test_paper_pipeline_features_in_unit_interval():
    incident, voxels = showers(64)
    x = make_preprocessing("paper", load_binning("ds1-photons")).fit(incident, voxels).forward(incident, voxels)
    assert isinstance(x, np.ndarray)
    assert x.min() >= 0 and x.max() <= 1 + 1e-12
    assert x[:, -1].max() == pytest.approx(1.0)


def test_per_layer_pipeline_inverse_is_non_negative_for_any_features():
    binning = tiny_binning()
    pipeline = make_preprocessing("per-layer", binning)
    rng = np.random.default_rng(3)
    features = rng.normal(0, 5, (10, pipeline.n_features))
    out = pipeline.inverse(rng.uniform(10, 100, 10), features)
    assert out.shape == (10, 5) and np.all(out >= 0)


def test_unknown_preprocessing():
    with pytest.raises(ConfigError, match="per-layer"):
        make_preprocessing("logit", tiny_binning())
    with pytest.raises(ConfigError, match="per-layer"):
        make_preprocessing("paper", tiny_binning(), layer_order="back")


def test_apply_threshold():
    x = np.array([[0.5, 1.0, 2.0]])
    assert np.array_equal(apply_threshold(x, 1.0), [[0.0, 1.0, 2.0]])
    assert apply_threshold(x, 0.0) is x
