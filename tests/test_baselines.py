"""The baselines CaloFlow and the ambient flow, and the checks every model kind passes
(CaloMan included) on the shared training, run-directory and generation machinery."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from caloman.errors import ConfigError
from caloman.geometry import load_binning
from caloman.io import write_showers
from caloman.models import MODEL_KINDS, build_model, model_config_from_dict
from caloman.models.ambient import RATIO_EPS, AmbientFlowConfig, AmbientFlowModel
from caloman.models.caloflow import (
    CaloFlowConfig,
    CaloFlowModel,
    incident_condition,
    layer_energy_condition,
    maf_inverse,
    noise_level_mev,
)
from caloman.models.flows import NUMPY_MAX_BATCH, ConditionalFlow
from caloman.runs import load_run, train_run
from caloman.simulation import ladder_energies, simulate_showers
from caloman.training import TrainingConfig

torch.set_num_threads(1)

BINNING = "ds1-photons"
KINDS = ("caloman", "caloflow", "ambient-flow")
#: Small networks of each kind: the checks are about plumbing and invariants, not quality.
TINY = {
    "caloman": {"latent_dim": 2, "hidden": [16], "flow_hidden": [16], "flow_transforms": 2,
                "layer_flow_hidden": [8], "layer_flow_transforms": 2, "flow_bins": 4, "layer_flow_bins": 4},
    "caloflow": {"layer_flow_transforms": 2, "layer_flow_hidden": [8], "layer_flow_bins": 4,
                 "shape_flow_transforms": 2, "shape_flow_hidden": [16], "shape_flow_bins": 4},
    "ambient-flow": {"transforms": 2, "hidden": [16], "bins": 4},
}
STAGES = {"caloman": ["layer_energy", "autoencoder", "latent_flow"], "caloflow": ["layer_energy", "shape_flow"],
          "ambient-flow": ["flow"]}
#: The buffer holding s of the u-variables (layers sum to at most s E_inc), where energy conservation is built in.
U0_SCALE = {"caloman": "pre_energy_u0_scale", "caloflow": "energy_u0_scale"}


@pytest.fixture(scope="module")
def showers() -> tuple[np.ndarray, np.ndarray]:
    """300 simulated dataset-1 photon showers, 20 per energy of the 15-energy ladder."""
    energies = ladder_energies(20)
    return energies, simulate_showers(BINNING, energies, seed=3)


def fitted(kind: str, showers, **overrides):
    model = build_model(kind, BINNING, overrides={**TINY[kind], **overrides})
    model.fit_preprocessing(*showers)
    model.eval()
    return model


# -- checks every kind passes -------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_samples_are_physical_showers(kind, showers):
    incident, voxels = showers
    model = fitted(kind, showers)
    assert model.trained_energy_range() == pytest.approx((incident.min(), incident.max()))
    threshold = load_binning(BINNING).readout_threshold
    for n in (1, 40):
        torch.manual_seed(0)
        with torch.inference_mode():
            out = model.sample(torch.as_tensor(incident[-n:], dtype=torch.float32))
        assert out.shape == (n, 368) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and (out >= 0).all()
        assert not ((out > 0) & (out < threshold)).any()  # the readout threshold is applied
    if kind in U0_SCALE:  # energy conservation of the u-variables: E_dep <= s E_inc
        scale = float(getattr(model, U0_SCALE[kind]))
        assert scale >= 1.0
        assert torch.all(out.double().sum(1) <= scale * torch.as_tensor(incident[-40:]) * (1 + 1e-5))


@pytest.mark.parametrize("kind", KINDS)
def test_sample_is_sample_from_noise_with_drawn_noise(kind, showers):
    """The contract: sample() draws noise_shape() noise (normal, then uniform) and applies
    the deterministic map sample_from_noise, which the ONNX export records."""
    model = fitted(kind, showers)
    energies = showers[0]
    shape = model.noise_shape()
    assert shape.normal == sum(b.size for b in shape.blocks if b.distribution == "normal")
    incident = torch.as_tensor(energies[::3], dtype=torch.float32)
    with torch.inference_mode():
        torch.manual_seed(5)
        sampled = model.sample(incident)
        torch.manual_seed(5)
        normal, uniform = shape.draw(len(incident))
        again = model.sample_from_noise(incident, normal, uniform if shape.uniform else None)
        other = model.sample_from_noise(incident, torch.randn_like(normal), torch.rand_like(uniform))
    assert torch.equal(sampled, again)  # sample is the noise map applied to drawn noise
    assert not torch.equal(sampled, other)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_training_run_saves_loads_and_reproduces_samples(kind, showers, tmp_path):
    incident, voxels = showers
    data = write_showers(tmp_path / "train.h5", incident, voxels, binning=BINNING)
    training = TrainingConfig(epochs=2, batch_size=64, patience=0, num_threads=1, seed=1)
    trained = train_run(data, BINNING, tmp_path / "run", model_kind=kind, training=training,
                        model_overrides=TINY[kind], command_line=["test"])
    history = trained.history
    assert [s.name for s in history.stages] == STAGES[kind]
    for stage in history.stages:
        assert stage.finished and len(stage.epochs) == 2
        assert all(math.isfinite(r.train_loss) and math.isfinite(r.val_loss) for r in stage.epochs)

    loaded = load_run(tmp_path / "run")
    assert loaded.config.model_kind == kind and type(loaded.model) is type(trained.model)
    energies = torch.as_tensor(incident[::7], dtype=torch.float32)
    with torch.inference_mode():
        torch.manual_seed(11)
        a = trained.model.sample(energies)
        torch.manual_seed(11)
        b = loaded.model.sample(energies)
    assert torch.equal(a, b)


def test_registry_profiles_and_config_round_trip():
    assert set(KINDS) <= set(MODEL_KINDS)
    for kind, config_class in (("caloflow", CaloFlowConfig), ("ambient-flow", AmbientFlowConfig)):
        for profile in ("quick", "full", "paper"):
            config = config_class.profile(profile)
            again = model_config_from_dict(kind, json.loads(json.dumps(config.to_dict())))
            assert again == config
        for profile in ("quick", "full"):  # the paper-sized networks are too big to build in a unit test
            model = build_model(kind, BINNING, profile=profile)
            assert model.config == config_class.profile(profile) and model.kind == kind
    paper = CaloFlowConfig.profile("paper")
    assert (paper.shape_flow_transforms, paper.shape_flow_hidden, paper.shape_flow_bins) == (8, (378, 378), 8)
    assert (paper.layer_flow_transforms, paper.layer_flow_hidden) == (6, (64, 64, 64))
    ambient = AmbientFlowConfig.profile("paper")
    assert (ambient.transforms, ambient.hidden) == (12, (512, 512))
    full = CaloFlowConfig.profile("full")
    assert (full.shape_flow_transforms, full.shape_flow_hidden) == (4, (128, 128))
    assert full.layer_flow_hidden == paper.layer_flow_hidden


@pytest.mark.parametrize("kind, overrides, match", [
    ("caloflow", {"shape_flow_layers": 3}, "valid options: layer_flow_transforms"),
    ("caloflow", {"shape_flow_hidden": 64}, "list"),
    ("caloflow", {"shape_flow_bins": 1}, "at least 2"),
    ("caloflow", {"noise": "yes"}, "true or false"),
    ("caloflow", {"shape_alpha": 0.7}, "shape_alpha"),
    ("ambient-flow", {"transforms": 2.5}, "integer"),
    ("ambient-flow", {"bound": -1.0}, "bound"),
])
def test_bad_overrides_raise_config_errors(kind, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_model(kind, BINNING, overrides=overrides)


# -- CaloFlow ----------------------------------------------------------------------------------------
def test_caloflow_conditions_and_noise_level_follow_the_paper():
    e = torch.tensor([1e3, 1e4, 1e5], dtype=torch.float64)  # 1, 10, 100 GeV
    assert torch.allclose(incident_condition(e), torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64))
    layers = torch.tensor([[0.0, 1e5 - 1e-3, 1e3 - 1e-3]], dtype=torch.float64)  # MeV
    assert torch.allclose(layer_energy_condition(layers), torch.tensor([[-6.0, 2.0, 0.0]], dtype=torch.float64))
    assert noise_level_mev(1.0, 1.0) == pytest.approx(1e-3)  # 1 keV, below dataset 1's 1 MeV threshold
    assert noise_level_mev(100.0, 0.015) == pytest.approx(0.015)  # capped at the readout threshold
    assert noise_level_mev(1.0, 0.0) == pytest.approx(1e-3)


def test_caloflow_shape_features_are_noisy_normalised_logits(showers):
    model = fitted("caloflow", showers)
    binning = load_binning(BINNING)
    x = torch.zeros(1, 368, dtype=torch.float64)
    x[0, 10], x[0, 11] = 30.0, 10.0  # layer 1 (voxels 8..167): 40 MeV in two voxels
    unit = torch.full((1, 368), 0.5).half()
    features = model.shape_features(x, unit)
    level = 1e-3  # 1 keV
    layer1 = binning.layer_slice(1)
    noisy = x[0, layer1] + 0.5 * level
    expected = noisy / noisy.sum()
    alpha = 1e-6
    expected = torch.logit(alpha + (1 - 2 * alpha) * expected)
    assert torch.allclose(features[0, layer1], expected, atol=1e-9)
    # A layer holding only noise becomes a uniform shape.
    layer12 = binning.layer_slice(12)
    assert torch.allclose(features[0, layer12], torch.logit(torch.tensor(alpha + (1 - 2 * alpha) / 5,
                                                                         dtype=torch.float64)))


def test_caloflow_training_noise_is_fresh_validation_noise_is_fixed(showers):
    incident, voxels = showers
    model = fitted("caloflow", showers)
    stage = model.stages()[1]
    with torch.no_grad():
        data = stage.make_data(torch.as_tensor(incident[:50], dtype=torch.float32), torch.as_tensor(voxels[:50]))
        model.shape_flow.eval()
        assert stage.loss(data).item() == stage.loss(data).item()
        model.shape_flow.train()
        assert stage.loss(data).item() != stage.loss(data).item()


def test_caloflow_layers_carry_the_sampled_energies(showers):
    incident, _ = showers
    model = fitted("caloflow", showers)
    layers = model.layers
    torch.manual_seed(2)
    with torch.inference_mode():
        e = torch.as_tensor(incident[::10])
        energies, before = model.sample_unthresholded(e, torch.randn(len(e), model.noise_shape().normal))
    # Flow I's u-variables: non-negative layers summing to u_0 s E_inc <= s E_inc.
    assert (energies >= 0).all()
    assert torch.all(energies.sum(1) <= float(model.energy_u0_scale) * torch.as_tensor(incident[::10]) * (1 + 1e-9))
    # After renormalisation, before the threshold, every layer holds exactly its sampled energy.
    assert torch.allclose(layers.layer_energies(before), energies, rtol=1e-9, atol=1e-9)


def test_caloflow_postprocess_thresholds_then_rescales(showers):
    model = fitted("caloflow", showers)
    x = torch.zeros(1, 368, dtype=torch.float64)
    x[0, 0:3] = torch.tensor([0.5, 2.0, 3.0])  # layer 0: 5.5 MeV, one voxel below 1 MeV
    x[0, 8] = 0.4  # layer 1: only a sub-threshold voxel
    energies = model.layers.layer_energies(x)
    out = model.postprocess(x, energies)
    assert out[0, :3].tolist() == pytest.approx([0.0, 2.2, 3.3])  # 5 MeV kept, rescaled by 5.5 / 5
    assert out[0, 8] == 0.0 and out.sum() == pytest.approx(5.5)
    plain = fitted("caloflow", showers, rescale_after_threshold=False).postprocess(x, energies)
    assert plain[0, :3].tolist() == [0.0, 2.0, 3.0]


def test_shape_flow_is_a_maf_with_one_pass_density_and_exact_inverse():
    torch.manual_seed(0)
    flow = ConditionalFlow(9, 3, transforms=2, hidden=(16, 16), bins=6, bound=14.0, coupling=False)
    with torch.no_grad():
        for p in flow.parameters():  # away from the near-identity initialisation
            p.add_(0.1 * torch.randn_like(p))
    calls = []
    for layer in flow.flow.transform.transforms:
        layer.hyper.register_forward_hook(lambda *_: calls.append(1))
    x, c = 3 * torch.randn(20, 9), torch.randn(20, 3)
    with torch.no_grad():
        log_p = flow.log_prob(x, c)
        assert torch.isfinite(log_p).all() and len(calls) == 2  # density: one pass per MADE block
        calls.clear()
        flow.sample(c)
        assert len(calls) == 2 * 9  # zuko's sampling: one pass per feature per block
        z = flow(c).transform(x)
        assert torch.allclose(maf_inverse(flow, z, c), x, atol=1e-4)  # x -> z -> x
        assert torch.allclose(maf_inverse(flow, z, c), flow(c).transform.inv(z), atol=1e-4)
        # Autoregressive: changing the first block's last feature in its order moves only that output.
        first = flow.flow.transform.transforms[0](c)
        last = int(torch.argmax(flow.flow.transform.transforms[0].order))
        shifted = x.clone()
        shifted[:, last] += 1.0
        moved = (first(shifted) - first(x)).abs().amax(0) > 0
        assert moved.tolist() == [i == last for i in range(9)]


def test_caloflow_sampler_inverts_its_density(showers):
    """Round trip on the model's own Flow II (368 voxels): x -> z -> x."""
    incident, voxels = showers
    model = fitted("caloflow", showers)
    with torch.no_grad():
        for p in model.shape_flow.parameters():
            p.add_(0.02 * torch.randn_like(p))
        _, _, condition = model.stages()[1].make_data(torch.as_tensor(incident[-4:], dtype=torch.float32),
                                                      torch.as_tensor(voxels[-4:]))
        x = model.shape_features(torch.as_tensor(voxels[-4:])).float()
        z = model.shape_flow(condition).transform(x)
        assert torch.allclose(maf_inverse(model.shape_flow, z, condition), x, atol=2e-3)


# -- the ambient flow ------------------------------------------------------------------------------
def test_ambient_features_invert_and_the_noise_switch(showers):
    incident, voxels = showers
    e, x = torch.as_tensor(incident), torch.as_tensor(voxels, dtype=torch.float64)
    x = x * (x >= 1.0)
    clean = fitted("ambient-flow", showers, noise=False)
    back = clean.to_showers(e, clean.features(e, x))
    assert torch.allclose(back, x, rtol=1e-9, atol=1e-9)
    # Without noise every empty voxel of a shower maps to one point, log(1e-12): a lower-dimensional set.
    raw = clean.log_features(e, x)
    assert torch.all(raw[x == 0] == math.log(RATIO_EPS))
    # With noise (1 keV) empty voxels spread out below the smallest possible noise / E_inc.
    noisy = fitted("ambient-flow", showers)
    raw = noisy.log_features(e, x)
    empty = raw[x == 0]
    assert empty.std() > 0.5 and torch.all(empty < math.log(1e-3 / e.min().item() + RATIO_EPS))
    back = noisy.to_showers(e, noisy.features(e, x, torch.zeros(x.shape).half()))
    assert torch.allclose(back, x, rtol=1e-9, atol=1e-9)  # stored noise of zero: the exact inverse


def test_ambient_flow_samples_in_one_pass_per_transform_and_caps_voxels(showers):
    incident, _ = showers
    model = fitted("ambient-flow", showers, transforms=3)
    assert model.flow.coupling
    calls = []
    for layer in model.flow.flow.transform.transforms:
        layer.hyper.register_forward_hook(lambda *_: calls.append(1))
    e = torch.as_tensor(incident[:NUMPY_MAX_BATCH + 8], dtype=torch.float32)  # the torch sampling path
    with torch.inference_mode():
        out = model.sample(e)
    assert len(calls) == 3
    cap = torch.exp(model.log_ratio_max) * e.double()[:, None]
    assert torch.all(out.double() <= cap * (1 + 1e-6))


def test_baseline_models_are_exported():
    from caloman import models

    assert models.CaloFlowModel is CaloFlowModel and models.AmbientFlowModel is AmbientFlowModel
