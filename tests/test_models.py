import math

import numpy as np
import pytest
import torch

from caloman.errors import ConfigError
from caloman.geometry import Binning, Layer, load_binning
from caloman.models import MODEL_KINDS, build_model, model_config_from_dict
from caloman.models.autoencoders import LayerSoftmax, build_autoencoder, mmd_imq
from caloman.models.caloman import CaloManConfig, CaloManModel
from caloman.models.flows import NUMPY_MAX_BATCH, ConditionalFlow
from caloman.models.layer_energy import LayerEnergyModel
from caloman.models.readout import threshold_keeping_layer_energies
from caloman.models.spot_noise import SHAPE_GRID
from caloman.models.voxel_noise import QUANTA_BIN_EDGES, log10_bins, poisson_quantile, quanta_bins
from caloman.preprocessing import apply_threshold

torch.set_num_threads(1)

TINY = {"latent_dim": 2, "hidden": [16], "flow_hidden": [16], "flow_transforms": 2, "layer_flow_hidden": [8],
        "layer_flow_transforms": 2, "flow_bins": 4, "layer_flow_bins": 4}


def tiny_binning() -> Binning:
    """Layer 0: 2 r x 3 alpha = 6 voxels; layer 1 holds none; layer 2: 3 r x 1 alpha."""
    layers = (Layer(0, (0.0, 1.0, 2.0), 3), Layer(1, (0.0,), 1), Layer(2, (0.0, 1.0, 2.0, 3.0), 1))
    return Binning(name="tiny", particle="photon", pid=22, layers=layers, source="test")


def toy_showers(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Showers on a two-parameter family: a layer split and a radial width,
    with incident energies between 1 and 100 GeV; all voxels above 1 MeV."""
    rng = np.random.default_rng(seed)
    incident = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n))
    split = rng.beta(4, 4, n)[:, None]
    width = rng.uniform(0.5, 2.0, n)[:, None]
    core = np.exp(-np.array([0.0, 1.0]) / width)  # two radial bins
    layer0 = np.tile(core, 3) / (3 * core.sum(1, keepdims=True))
    depth = np.exp(-np.arange(3) * width)
    layer2 = depth / depth.sum(1, keepdims=True)
    deposited = 0.95 * incident[:, None]
    voxels = np.hstack([split * layer0, (1 - split) * layer2]) * deposited
    return incident, voxels


def trained_steps(model: CaloManModel, incident: np.ndarray, voxels: np.ndarray, steps: int) -> dict[str, tuple]:
    """Train each stage by hand for ``steps`` Adam steps; returns (first, last) mean losses."""
    e, x = torch.as_tensor(incident, dtype=torch.float32), torch.as_tensor(voxels, dtype=torch.float32)
    model.fit_preprocessing(incident, voxels)
    losses = {}
    for stage in model.stages():
        model.eval()
        with torch.no_grad():
            data = stage.make_data(e, x)
        optimiser = torch.optim.Adam(stage.module.parameters(), lr=3e-3)
        stage.module.train()
        history = []
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,))
            loss = stage.loss(tuple(t[idx] for t in data))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            history.append(loss.item())
        losses[stage.name] = (np.mean(history[:10]), np.mean(history[-10:]))
    model.eval()
    return losses


# -- flows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("features, batch", [(5, 3), (5, NUMPY_MAX_BATCH + 10), (4, 1)])
def test_fused_inverse_matches_zuko(features, batch):
    torch.manual_seed(0)
    flow = ConditionalFlow(features, 3, transforms=4, hidden=(16, 16), bins=6, bound=4.0)
    with torch.no_grad():
        for p in flow.parameters():  # move away from the near-identity initialisation
            p.add_(0.1 * torch.randn_like(p))
        z, c = 2 * torch.randn(batch, features), torch.randn(batch, 3)
        expected = flow(c).transform.inv(z)
        fused = flow.transform_inverse(z, c)  # numpy path up to NUMPY_MAX_BATCH rows
        assert torch.allclose(fused, expected, atol=2e-5)
        assert torch.allclose(flow(c).transform(fused), z, atol=5e-4)
    with torch.enable_grad():  # torch path
        assert torch.allclose(flow.transform_inverse(z, c).detach(), expected, atol=2e-5)


@pytest.mark.parametrize("hypernet, features", [("mlp", 5), ("mlp", 2), ("residual-glu", 15)])
def test_fused_log_prob_and_its_gradients_are_zukos(hypernet, features):
    torch.manual_seed(0)
    flow = ConditionalFlow(features, 3, transforms=4, hidden=(16, 16), bins=8, bound=4.0, hypernet=hypernet).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, c = 2.5 * torch.randn(300, features, dtype=torch.float64), torch.randn(300, 3, dtype=torch.float64)
    x[:20] *= 4  # some features outside [-bound, bound], where the splines are the identity
    fused, expected = flow.log_prob(x, c), flow(c).log_prob(x)
    assert torch.allclose(fused, expected, rtol=1e-9, atol=1e-9)
    assert torch.allclose(flow.transform(x, c), flow(c).transform(x), rtol=1e-9, atol=1e-9)  # the M-flow encoder's map
    grads = [torch.autograd.grad(f().mean(), list(flow.parameters()))
             for f in (lambda: flow.log_prob(x, c), lambda: flow(c).log_prob(x))]
    for ours, zukos in zip(*grads):
        assert torch.allclose(ours, zukos, rtol=1e-7, atol=1e-9)


def test_residual_glu_flow_and_autoregressive_flow_sample():
    torch.manual_seed(0)
    c = torch.randn(7, 2)
    for flow in (ConditionalFlow(3, 2, hidden=(8, 8), hypernet="residual-glu"),
                 ConditionalFlow(3, 2, hidden=(8,), coupling=False)):
        with torch.no_grad():
            x = flow.sample(c)
            assert x.shape == (7, 3)
            assert torch.isfinite(flow.log_prob(x, c)).all()
            if flow.coupling:
                assert torch.allclose(flow(c).transform(x), flow(c).transform(flow.transform_inverse(
                    flow(c).transform(x), c)), atol=1e-4)


def test_flow_learns_conditional_gaussian():
    """x | c ~ N((c, -c), 0.3^2 I): the NLL must approach its entropy 2 (0.5 log(2 pi e) + log 0.3) = 0.43."""
    torch.manual_seed(0)
    flow = ConditionalFlow(2, 1, transforms=2, hidden=(32, 32), bins=8)
    optimiser = torch.optim.Adam(flow.parameters(), lr=5e-3)
    losses = []
    for _ in range(300):
        c = torch.rand(256, 1) * 2 - 1
        x = torch.cat((c, -c), dim=1) + 0.3 * torch.randn(256, 2)
        loss = -flow.log_prob(x, c).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    entropy = 2 * (0.5 * math.log(2 * math.pi * math.e) + math.log(0.3))
    assert np.mean(losses[:10]) > entropy + 1.0
    assert np.mean(losses[-30:]) < entropy + 0.15
    with torch.no_grad():
        sample = flow.sample(torch.full((4000, 1), 0.5))
    assert torch.allclose(sample.mean(0), torch.tensor([0.5, -0.5]), atol=0.05)
    assert torch.allclose(sample.std(0), torch.tensor([0.3, 0.3]), atol=0.05)


def test_flow_sampling_plan_follows_weight_updates():
    torch.manual_seed(0)
    flow = ConditionalFlow(4, 1, transforms=2, hidden=(8,))
    c, z = torch.zeros(1, 1), torch.randn(1, 4)
    with torch.no_grad():
        before = flow.transform_inverse(z, c)
        for p in flow.parameters():
            p.add_(0.2)
        after = flow.transform_inverse(z, c)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, flow(c).transform.inv(z), atol=1e-5)
        flow.double()
        assert flow.transform_inverse(z.double(), c.double()).dtype == torch.float64


# -- autoencoders -------------------------------------------------------------------------------
def test_layer_softmax_sums_to_one_per_layer():
    logits = torch.randn(4, 9)
    out = LayerSoftmax([6, 3])(logits)
    assert torch.allclose(out[:, :6].sum(1), torch.ones(4)) and torch.allclose(out[:, 6:].sum(1), torch.ones(4))
    equal = LayerSoftmax([3, 3, 3])
    assert torch.allclose(equal(logits), torch.cat([t.softmax(-1) for t in logits.split(3, -1)], -1))
    assert torch.allclose(equal.log(logits).exp(), equal(logits))
    # Layers far apart in scale stay finite and normalised (each layer is shifted by its own maximum).
    unequal = LayerSoftmax([6, 3])
    extreme = torch.cat((torch.randn(4, 6) - 1000.0, torch.randn(4, 3) + 1000.0), dim=1)
    out = unequal(extreme)
    assert torch.isfinite(out).all() and torch.allclose(out[:, :6].sum(1), torch.ones(4))
    assert torch.allclose(unequal.log(extreme), torch.log(out))
    assert torch.allclose(out[:, :6], torch.softmax(extreme[:, :6], -1))


def test_mmd_separates_shifted_samples():
    torch.manual_seed(0)
    a, b = torch.randn(300, 3), torch.randn(300, 3)
    same = mmd_imq(a, b)
    shifted = mmd_imq(a + 1.0, b)
    assert abs(same) < 0.02 and shifted > 10 * abs(same)


@pytest.mark.parametrize("kind", ["vae", "ae", "wae"])
def test_autoencoder_losses_and_codes(kind):
    torch.manual_seed(0)
    ae = build_autoencoder(kind, 9, 2, (16,), output="layer-softmax", layer_sizes=[6, 3], loss="cross-entropy")
    x = torch.softmax(torch.randn(32, 9), -1)
    x = torch.cat((x[:, :6] / x[:, :6].sum(1, keepdim=True), x[:, 6:] / x[:, 6:].sum(1, keepdim=True)), 1)
    loss = ae.loss(x)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.equal(ae.encode(x), ae.encode(x))  # deterministic codes (VAE: the mean)
    assert ae.decode(ae.encode(x)).shape == (32, 9)
    # Cross-entropy recon is the per-layer KL: zero when the decoder reproduces the target.
    logits = torch.log(x + 1e-30)
    assert torch.allclose(ae.reconstruction_loss(x, logits), torch.zeros(32), atol=1e-5)


def test_autoencoder_rejects_cross_entropy_without_layer_softmax():
    with pytest.raises(ValueError, match="layer-softmax"):
        build_autoencoder("ae", 9, 2, (16,), output="sigmoid", loss="cross-entropy")


# -- the CaloMan model ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    {},
    {"preprocessing": "paper", "reconstruction_loss": "mse", "autoencoder": "wae"},
    {"autoencoder": "ae", "conditional_autoencoder": False, "voxel_noise": "none", "flow_hypernet": "residual-glu"},
    {"layer_energy_order": "back", "condition_order": "front"},
])
def test_untrained_model_samples_physical_showers(overrides):
    binning = tiny_binning()
    model = build_model("caloman", binning, overrides={**TINY, **overrides})
    incident, voxels = toy_showers(200)
    model.fit_preprocessing(incident, voxels)
    assert model.trained_energy_range() == pytest.approx((incident.min(), incident.max()))
    model.eval()
    for n in (1, 50):
        with torch.inference_mode():
            out = model.sample(torch.as_tensor(incident[:n], dtype=torch.float32))
        assert out.shape == (n, binning.n_voxels)
        assert torch.isfinite(out).all() and (out >= 0).all()
        # The readout threshold: nothing between 0 and 1 MeV.
        assert not ((out > 0) & (out < 1.0)).any()


def test_per_layer_samples_conserve_energy():
    model = build_model("caloman", tiny_binning(), overrides=TINY)
    incident, voxels = toy_showers(100)
    model.fit_preprocessing(incident, voxels)
    scale = float(model.pre_energy_u0_scale)
    torch.manual_seed(1)
    with torch.inference_mode():
        out = model.sample(torch.as_tensor(incident, dtype=torch.float32)).double()
    assert torch.all(out.sum(1) <= scale * torch.as_tensor(incident) * (1 + 1e-5))


def test_condition_order_front_keeps_caloflows_condition_under_a_back_flow():
    """layer_energy_order = "back" with condition_order = "front": the layer-energy flow's
    variables are the back chain, the condition holds the front one, in the training
    features and, re-encoded from the flow's sample, in generation."""
    binning = tiny_binning()
    incident, voxels = toy_showers(64)
    models = {}
    for name, overrides in {"front": {}, "back": {"layer_energy_order": "back"},
                            "mixed": {"layer_energy_order": "back", "condition_order": "front"},
                            "same": {"layer_energy_order": "back", "condition_order": "back"}}.items():
        models[name] = build_model("caloman", binning, overrides={**TINY, **overrides})
        models[name].fit_preprocessing(incident, voxels)
    e, x = torch.as_tensor(incident), torch.as_tensor(voxels)
    features = {name: model._features(e, x) for name, model in models.items()}
    assert not torch.allclose(features["back"].condition, features["front"].condition)
    assert torch.equal(features["mixed"].condition, features["front"].condition)
    assert torch.equal(features["mixed"].layer_features, features["back"].layer_features)
    assert torch.equal(features["same"].condition, features["back"].condition)
    mixed = models["mixed"]
    assert mixed.reencodes_condition and not models["back"].reencodes_condition
    assert not models["same"].reencodes_condition
    back_chain = features["back"].layer_features.double()
    assert torch.equal(models["back"].condition_energies(e, back_chain), back_chain)
    recoded = mixed.condition_energies(e, back_chain)
    assert torch.allclose(recoded, features["front"].layer_features.double(), atol=1e-4)


@pytest.mark.parametrize("voxel_noise", ["poisson", "poisson-gamma"])
def test_state_dict_rebuild_reproduces_samples(voxel_noise):
    binning = tiny_binning()
    model = build_model("caloman", binning, overrides={**TINY, "voxel_noise": voxel_noise})
    incident, voxels = toy_showers(300)
    trained_steps(model, incident, voxels, steps=5)
    assert bool(model.latent_fitted)
    if voxel_noise == "poisson":
        assert (model.voxel_quanta >= 0).all()
        model.voxel_quanta.fill_(5.0)  # the toy has no graininess to fit: force the noise on
    else:
        # fitted with the codes: a shape from the grid per layer, positive scales, a monotone table
        assert set(model.spot_shapes.tolist()) <= set(SHAPE_GRID)
        assert (model.spot_scales > 0).all()
        assert (model.spot_quantiles.diff(dim=1) >= 0).all()
    twin = build_model("caloman", binning, overrides=model.config_dict())
    twin.load_state_dict(model.state_dict())
    twin.eval()
    energies = torch.as_tensor(incident[:40], dtype=torch.float32)
    for n in (1, 40):
        with torch.inference_mode():
            torch.manual_seed(7)
            a = model.sample(energies[:n])
            torch.manual_seed(7)
            b = twin.sample(energies[:n])
        assert torch.equal(a, b)
    state = model.state_dict()
    for key in ("pre_incident_log_min", "pre_energy_u0_scale", "latent_mean", "latent_std", "voxel_quanta",
                "energy_range"):
        assert key in state


@pytest.mark.parametrize("overrides", [{}, {"preprocessing": "paper", "reconstruction_loss": "mse",
                                            "autoencoder": "ae"}])
def test_stages_losses_fall(overrides):
    torch.manual_seed(0)
    model = build_model("caloman", tiny_binning(), overrides={**TINY, **overrides})
    incident, voxels = toy_showers(1000)
    losses = trained_steps(model, incident, voxels, steps=150)
    expected = ["autoencoder", "latent_flow"] if overrides else ["layer_energy", "autoencoder", "latent_flow"]
    assert list(losses) == expected
    for name, (first, last) in losses.items():
        assert last < first, (name, first, last)
    # The toy showers lie on a 2-parameter family: a 2-d code reconstructs them closely.
    error = model.reconstruction_error(incident[:200], voxels[:200])
    assert error.shape == (200,) and torch.all(error >= 0)
    log_p = model.log_prob_on_manifold(incident[:20], voxels[:20])
    assert log_p.shape == (20,) and torch.isfinite(log_p).all()


def test_layer_energy_model_learns_layer_split():
    """The toy's layer-0 fraction is Beta(4, 4) and E_dep = 0.95 E_inc: after training,
    sampled layer energies must reproduce both."""
    torch.manual_seed(0)
    model = build_model("caloman", tiny_binning(), overrides={**TINY, "layer_flow_hidden": [32, 32],
                                                              "layer_flow_transforms": 3})
    incident, voxels = toy_showers(2000)
    e, x = torch.as_tensor(incident, dtype=torch.float32), torch.as_tensor(voxels, dtype=torch.float32)
    model.fit_preprocessing(incident, voxels)
    stage = model.stages()[0]
    features, condition = stage.make_data(e, x)
    optimiser = torch.optim.Adam(model.layer_energy.parameters(), lr=5e-3)
    for _ in range(400):
        idx = torch.randint(0, len(x), (256,))
        loss = stage.loss((features[idx], condition[idx]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        sampled = model.layer_energy.sample(condition)
        energies = model._pipeline().energies.inverse(e.double(), sampled.double())
    fraction = energies[:, 0] / energies.sum(1)
    assert fraction.mean().item() == pytest.approx(0.5, abs=0.03)
    assert fraction.std().item() == pytest.approx(1 / 6, abs=0.03)  # Beta(4, 4): sqrt(1/36)
    assert (energies.sum(1) / e).median().item() == pytest.approx(0.95, abs=0.02)


def test_layer_energy_model_is_reusable_alone():
    model = LayerEnergyModel(3, context=1, transforms=2, hidden=(8,))
    c = torch.rand(5, 1)
    with torch.no_grad():
        x = model.sample(c)
    assert x.shape == (5, 3) and torch.isfinite(model.log_prob(x, c)).all()


# -- configuration ----------------------------------------------------------------------------------
def test_build_model_profiles_and_overrides():
    binning = load_binning("ds1-photons")
    assert "caloman" in MODEL_KINDS
    quick, full = build_model("caloman", binning), build_model("caloman", binning, profile="full")
    assert quick.config == CaloManConfig.quick() and full.config == CaloManConfig.full()
    assert [s.name for s in quick.stages()] == ["layer_energy", "autoencoder", "latent_flow"]
    paper = build_model("caloman", binning, profile="paper")
    assert [s.name for s in paper.stages()] == ["autoencoder", "latent_flow"]
    model = build_model("caloman", binning, overrides={"latent_dim": 12, "hidden": [64, 32]})
    assert model.config.latent_dim == 12 and model.config.hidden == (64, 32)
    assert model.autoencoder.encoder[0].in_features == 368 + 6  # voxels + [scaled E_inc, 5 layer energies]


def test_config_round_trips_through_json_dict():
    config = CaloManConfig.from_dict({"autoencoder": "wae", "flow_hidden": [32, 32], "latent_noise": 0.05})
    import json

    again = model_config_from_dict("caloman", json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize("overrides, match", [
    ({"latent_dims": 3}, "valid options: preprocessing"),
    ({"autoencoder": "gan"}, "'vae'"),
    ({"preprocessing": "paper"}, "cross-entropy"),
    ({"hidden": 512}, "list"),
    ({"latent_dim": 2.5}, "integer"),
    ({"flow_transforms": 0}, "at least 1"),
    ({"condition_order": "middle"}, "condition_order"),
    ({"preprocessing": "paper", "reconstruction_loss": "mse", "condition_order": "front"}, "condition_order orders"),
])
def test_bad_overrides_raise_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_model("caloman", tiny_binning(), overrides=overrides)


def test_unknown_kind_and_profile():
    with pytest.raises(ConfigError, match="caloman"):
        build_model("calogan", tiny_binning())
    with pytest.raises(ConfigError, match="quick"):
        build_model("caloman", tiny_binning(), profile="huge")


def test_noise_quantum_fit_separates_graininess_from_reconstruction_error():
    """Residual variance 3 x + 0.01 x^2 (MeV^2): the fitted quantum is about 3 MeV, not
    inflated by the energy-proportional error that dominates bright voxels."""
    from caloman.models.caloman import _QUANTA_BIN_EDGES, fit_noise_quantum

    rng = np.random.default_rng(0)
    x = 10 ** rng.uniform(-1, 5, 400_000)
    r = rng.normal(0, np.sqrt(3.0 * x + 0.01 * x**2))
    cell = torch.bucketize(torch.as_tensor(np.log10(x)), _QUANTA_BIN_EDGES)
    n_bins = len(_QUANTA_BIN_EDGES) + 1
    sums = [torch.zeros(n_bins, dtype=torch.float64).index_add_(0, cell, torch.as_tensor(v))
            for v in (np.ones_like(x), x, r**2)]
    assert fit_noise_quantum(*sums) == pytest.approx(3.0, rel=0.1)
    assert (r**2).sum() / x.sum() > 100  # what one ratio over all voxels would give
    # Bins below the lowest energy are ignored (there the readout threshold censors residuals).
    assert fit_noise_quantum(*sums, lowest_energy=1000.0) > 10
    assert fit_noise_quantum(torch.zeros(n_bins), torch.zeros(n_bins), torch.zeros(n_bins)) == 0.0


def test_voxel_noise_has_poisson_moments():
    """q Poisson(x / q): mean x, variance q x and P(0) = exp(-x / q), for the exact draws
    (rate 0.5) and the normal approximation (rate 50); a layer with q = 0 is untouched."""
    model = build_model("caloman", tiny_binning(), overrides=TINY)
    model.voxel_quanta.copy_(torch.tensor([2.0, 0.0]))
    showers = torch.tensor([[1.0, 1.0, 1.0, 100.0, 100.0, 100.0, 5.0, 5.0, 5.0]]).repeat(20_000, 1)
    torch.manual_seed(0)
    noisy = model._poisson(showers, torch.randn_like(showers), torch.rand_like(showers))
    low, high = noisy[:, :3].flatten(), noisy[:, 3:6].flatten()
    assert low.mean().item() == pytest.approx(1.0, rel=0.02) and low.var().item() == pytest.approx(2.0, rel=0.03)
    assert (low == 0).float().mean().item() == pytest.approx(math.exp(-0.5), abs=0.01)
    assert high.mean().item() == pytest.approx(100.0, rel=0.01) and high.var().item() == pytest.approx(200, rel=0.05)
    assert torch.equal(noisy[:, 6:], showers[:, 6:])


def test_fit_occupancy_quanta_inverts_the_poisson_occupancy():
    from caloman.models.caloman import fit_occupancy_quanta

    n_bins = 6
    counts = torch.tensor([0.0, 1000, 1000, 50, 1000, 1000], dtype=torch.float64)
    means = torch.tensor([0.0, 0.5, 2.0, 3.0, 8.0, 30.0], dtype=torch.float64)
    # occupancy of q Poisson(m / q) with q = 2 MeV: 1 - exp(-m / 2); the last bin is always occupied
    occupancy = 1 - torch.exp(-means / 2.0)
    occupancy[5] = 1.0
    q = fit_occupancy_quanta(counts, means * counts, occupancy * counts, fallback=7.0)
    assert q.shape == (n_bins,)
    assert torch.allclose(q[[1, 2, 4]], torch.tensor(2.0), rtol=1e-5)
    assert q[0] == pytest.approx(2.0, rel=1e-5)  # empty bin: nearest usable one
    assert q[3] == pytest.approx(2.0, rel=1e-5)  # too few voxels: nearest usable one
    assert q[5] == pytest.approx(2.0, rel=1e-5)  # occupancy 1 carries no information
    none_usable = fit_occupancy_quanta(torch.zeros(n_bins), torch.zeros(n_bins), torch.zeros(n_bins), fallback=7.0)
    assert torch.all(none_usable == 7.0)


def test_poisson_noise_uses_the_quanta_table_when_fitted():
    torch.manual_seed(0)
    model = build_model("caloman", "ds1-photons", profile="quick")
    n_voxels = model.n_voxels
    showers = torch.full((4000, n_voxels), 0.5)
    model.voxel_quanta.fill_(2.0)
    noise = torch.randn_like(showers), torch.rand_like(showers)
    per_layer = (model._poisson(showers, *noise) > 0).double().mean().item()
    assert per_layer == pytest.approx(1 - np.exp(-0.25), abs=0.01)
    model.voxel_quanta_table.fill_(0.5)  # a finer table takes precedence
    per_ring = (model._poisson(showers, *noise) > 0).double().mean().item()
    assert per_ring == pytest.approx(1 - np.exp(-1.0), abs=0.01)


def test_caloman_noise_layout():
    model = build_model("caloman", "ds1-photons", overrides=TINY)
    shape = model.noise_shape()
    assert shape.offsets() == {"layer_energies": slice(0, 5), "latent": slice(5, 7), "voxels": slice(7, 375),
                               "spot_energies": slice(375, 743)}
    assert shape.offsets("uniform") == {"voxels": slice(0, 368)}
    lattice = build_model("caloman", "ds1-photons", overrides={**TINY, "voxel_noise": "poisson"}).noise_shape()
    assert (lattice.normal, lattice.uniform) == (375, 368)
    smooth = build_model("caloman", "ds1-photons", overrides={**TINY, "voxel_noise": "none"}).noise_shape()
    assert (smooth.normal, smooth.uniform) == (7, 0)


def test_quanta_bins_are_bucketize_bit_for_bit():
    """The closed-form bins (an ONNX graph has no bucketize) equal bucketize's, edges and their
    neighbouring floats included, in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        edges = QUANTA_BIN_EDGES.to(dtype)
        neighbours = [torch.nextafter(edges, torch.tensor(t, dtype=dtype)) for t in (-10.0, 10.0)]
        tiny = torch.tensor([0.0, 1e-300 if dtype == torch.float64 else 1e-44, -1e-44, 40.0, -50.0], dtype=dtype)
        log_e = torch.cat([edges, *neighbours, torch.rand(20_000, dtype=dtype) * 14 - 5, tiny])
        assert torch.equal(log10_bins(log_e), torch.bucketize(log_e, edges))
    energies = torch.tensor([0.0, 1e-40, 1e-3, 1.0, 3e38])
    assert torch.equal(quanta_bins(energies), torch.bucketize(energies.clamp_min(1e-30).log10(), edges.float()))


def test_poisson_quantile_is_the_exact_poisson_inverse_cdf():
    """Exact draws by inverse CDF: scipy's Poisson quantile, for many draws (searched eagerly) and
    few (staged, as in a traced graph), at the extremes of the rate and of float32 uniforms."""
    from scipy.stats import poisson

    generator = torch.Generator().manual_seed(0)
    for n in (40_000, 500):
        rate = torch.cat([torch.rand(n, generator=generator) * 10, torch.tensor([0.0, 1e-30, 9.999])])
        uniform = torch.cat([torch.rand(n, generator=generator), torch.tensor([0.5, 0.999, 1 - 2**-24])])
        counts = poisson_quantile(rate, uniform)
        assert np.array_equal(counts.numpy(), poisson.ppf(uniform.double().numpy(), rate.double().numpy()))


def test_poisson_search_and_stages_agree():
    from caloman.models.voxel_noise import _counts_by_search, _counts_in_stages

    generator = torch.Generator().manual_seed(1)
    rate = torch.rand(100_000, generator=generator, dtype=torch.float64) * 10
    uniform = torch.rand(100_000, generator=generator, dtype=torch.float64)
    zero = torch.exp(-rate)
    cdf = zero * (1 + rate)
    more = cdf < uniform
    args = (rate[more], uniform[more], (zero * rate)[more], cdf[more])
    assert len(args[0]) > 50_000 and torch.equal(_counts_by_search(*args), _counts_in_stages(*args))


def test_spot_noise_calibration_corrects_the_readouts_extra_occupancy():
    """Sparse low-energy showers: scaling a layer before the threshold lights voxels the noise
    alone leaves just below it. The calibration corrects its occupancy targets for that, so
    the readout then lights as many voxels as the uncorrected noise alone did (the occupancy
    the calibration matches to the training showers), where without the correction it
    lights more."""
    incident, voxels = toy_showers(3000, seed=4)
    incident = incident / 500.0  # 2-200 MeV: a few MeV per voxel, many near the 1 MeV threshold
    rng = np.random.default_rng(5)
    noisy = 0.8 * rng.standard_gamma(rng.poisson(voxels / 500.0 / 0.8) * 1.0)  # spots of 0.8 MeV on average
    data = apply_threshold(noisy, 1.0)
    e, x = torch.as_tensor(incident, dtype=torch.float32), torch.as_tensor(data, dtype=torch.float32)

    def occupancies(readout: str) -> tuple[float, float]:
        """Lit fractions on the training reconstructions: the noise alone, then with the readout."""
        torch.manual_seed(0)
        model = build_model("caloman", tiny_binning(), overrides={**TINY, "voxel_noise": "poisson-gamma",
                                                                 "layer_readout": readout})
        model.fit_preprocessing(incident, data)
        model.eval()
        with torch.no_grad():
            model.fit_spot_noise(e, x)
            means = model._reconstruct(e, x, postprocess=False).float()
            g = torch.Generator().manual_seed(1)
            spots = model._spots(means, torch.randn(means.shape, generator=g), torch.rand(means.shape, generator=g),
                                 torch.randn(means.shape, generator=g))
            read = threshold_keeping_layer_energies(spots, model._pipeline().layers.layer_energies(means),
                                                    model.layer_layout, 1.0)
        return float((spots >= 1.0).float().mean()), float((read > 0).float().mean())

    (_, corrected), (calibrated, uncorrected) = occupancies("scale-then-threshold"), occupancies(
        "threshold-then-rescale")
    assert 0.2 < (data > 0).mean() < 0.9
    assert uncorrected > calibrated + 0.01  # the readout's extra voxels
    assert abs(corrected - calibrated) < 0.5 * (uncorrected - calibrated)
