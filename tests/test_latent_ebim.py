"""CaloMan's energy-based latent density (latent_density = "ebim") and the conditional energy
and explicit-noise Langevin sampler of caloman.implicit it is built on."""

from __future__ import annotations

import pytest
import torch

from caloman.errors import ConfigError
from caloman.geometry import load_binning
from caloman.implicit import ConditionalEnergy, langevin_from_noise
from caloman.io import write_showers
from caloman.models import build_model, parse_model_options
from caloman.models.latent_ebim import LatentEBIM, LatentEBIMSettings
from caloman.runs import load_run, save_run, train_run
from caloman.simulation import ladder_energies, simulate_showers
from caloman.training import TrainingConfig, seed_everything, train_model
from test_mflow_caloman import TINY_XML
from test_models import TINY, tiny_binning, toy_showers

torch.set_num_threads(1)

EBIM = {**TINY, "latent_density": "ebim", "ebim_hidden": [16], "ebim_steps": 5, "ebim_buffer_size": 64}


# -- caloman.implicit.conditional -----------------------------------------------------------------
def test_hand_written_energy_gradient_is_autograds():
    torch.manual_seed(0)
    energy = ConditionalEnergy(3, 2, (8, 8)).double()
    x, c = torch.randn(5, 3, dtype=torch.float64, requires_grad=True), torch.randn(5, 2, dtype=torch.float64)
    expected = torch.autograd.grad(energy(x, c).sum(), x)[0]
    assert torch.allclose(energy.gradient(x.detach(), c), expected, atol=1e-12)


def test_langevin_is_a_function_of_its_noise_and_follows_the_gradient():
    start, noise = torch.randn(4, 2), torch.randn(4, 2 * 50)
    gradient = lambda x: x  # noqa: E731 (E = |x|^2 / 2)
    a = langevin_from_noise(gradient, start, noise, 0.1, alpha=1.0)
    assert torch.equal(a, langevin_from_noise(gradient, start, noise, 0.1, alpha=1.0))
    assert not torch.equal(a, langevin_from_noise(gradient, start, torch.randn(4, 100), 0.1, alpha=1.0))
    quiet = langevin_from_noise(gradient, start, torch.zeros(4, 100), 0.1, alpha=1.0)
    assert torch.allclose(quiet, start * 0.5 ** 50)  # x <- x - x / 2 per step
    with pytest.raises(ConfigError, match="multiple"):
        langevin_from_noise(gradient, start, torch.zeros(4, 5), 0.1)


def _mixture(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes z (n, 2) given c ~ U(-1, 1): z_0 = +-1.2 + 0.3 N, z_1 = c + 0.3 N (two modes per c)."""
    c = torch.rand(n, 1, generator=generator) * 2 - 1
    z = 0.3 * torch.randn(n, 2, generator=generator)
    z[:, 0] += 1.2 * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    z[:, 1] += c[:, 0]
    return z, c


def test_latent_ebim_learns_a_conditional_mixture():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    settings = LatentEBIMSettings(hidden=(32, 32), steps=20, alpha=3.0, buffer_frac=0.0, buffer_size=1000)
    model = LatentEBIM(2, 1, settings)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()
    z, c = _mixture(1000, generator)
    with torch.no_grad():
        untrained = float(model.loss((z, c)))
    model.train()
    for _ in range(300):
        loss = model.loss(_mixture(256, generator))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.inference_mode():
        trained = float(model.loss((z, c)))
        samples = model.sample_from_noise(c, torch.randn(1000, 2, generator=generator),
                                          torch.randn(1000, model.noise_size, generator=generator))
    assert trained < 0.3 * untrained  # the validation MMD of the generator fell
    near = ((samples[:, 0].abs() - 1.2).abs() < 0.6).float().mean()
    assert near > 0.75  # samples land at the modes z_0 = +-1.2 ...
    assert 0.3 < float((samples[:, 0] > 0).float().mean()) < 0.7  # ... both of them ...
    offset = samples[:, 1] - c[:, 0]
    assert abs(float(offset.mean())) < 0.15 and float(offset.std()) < 0.5  # ... at the condition's z_1


# -- the CaloMan option ---------------------------------------------------------------------------------
def _train(run, incident, voxels, **kw):
    seed_everything(0)
    model = build_model("caloman", tiny_binning(), overrides={**EBIM, "voxel_noise": "none"})
    config = TrainingConfig(epochs=3, batch_size=64, learning_rate=3e-3, patience=0, seed=0, num_threads=1,
                            stage_epochs={"layer_energy": 1, "autoencoder": 1})
    return model, config, train_model(model, incident, voxels, config, run, **kw)


def test_ebim_caloman_trains_saves_loads_and_resumes(tmp_path):
    incident, voxels = toy_showers(300)
    model, config, history = _train(tmp_path / "run", incident, voxels)
    assert [s.name for s in history.stages] == ["layer_energy", "autoencoder", "latent_ebim"]
    assert model.latent_flow is None and "latent_ebim.replay" in model.state_dict()
    (tmp_path / "tiny.xml").write_text(TINY_XML)
    save_run(tmp_path / "run", model, load_binning(tmp_path / "tiny.xml"), config, history, command_line=["test"])
    loaded = load_run(tmp_path / "run").model
    energies = torch.as_tensor(incident[:40], dtype=torch.float32)
    for n in (1, 40):
        with torch.inference_mode():
            torch.manual_seed(3)
            a = model.sample(energies[:n])
            torch.manual_seed(3)
            b = loaded.sample(energies[:n])
        assert torch.equal(a, b) and torch.isfinite(a).all() and (a >= 0).all()

    class Stop(Exception):
        pass

    def stop(name, record):
        if name == "latent_ebim" and record.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        _train(tmp_path / "resumed", incident, voxels, on_epoch_end=stop)
    resumed, _, resumed_history = _train(tmp_path / "resumed", incident, voxels, resume=True)
    assert ([r.val_loss for r in resumed_history.stage("latent_ebim").epochs]
            == [r.val_loss for r in history.stage("latent_ebim").epochs])
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_ebim_generation_is_a_function_of_the_declared_noise():
    model = build_model("caloman", tiny_binning(), overrides=EBIM)
    incident, voxels = toy_showers(100)
    model.fit_preprocessing(incident, voxels)
    model.eval()
    shape = model.noise_shape()
    offsets = shape.offsets()
    assert offsets["latent_langevin"].stop - offsets["latent_langevin"].start == 5 * EBIM["latent_dim"]
    assert model.latent_blocks() == ("layer_energies", "latent")
    energies = torch.as_tensor(incident[:30], dtype=torch.float32)
    normal, uniform = shape.draw(30)
    with torch.inference_mode():
        a = model.sample_from_noise(energies, normal, uniform)
        b = model.sample_from_noise(energies, normal.clone(), uniform.clone())
        moved = normal.clone()
        moved[:, offsets["latent_langevin"]] = torch.randn(30, offsets["latent_langevin"].stop
                                                           - offsets["latent_langevin"].start)
        c = model.sample_from_noise(energies, moved, uniform)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ConfigError, match="no normalised density"):
        model.log_prob_on_manifold(incident[:5], voxels[:5])


@pytest.mark.parametrize("overrides, match", [
    ({"latent_density": "diffusion"}, "latent_density"),
    ({"latent_density": "ebim", "ebim_steps": 0}, "ebim_steps"),
    ({"latent_density": "ebim", "ebim_buffer_frac": 1.5}, "ebim_buffer_frac"),
    ({"latent_density": "ebim", "ebim_step_size": 0.0}, "ebim_step_size"),
    ({"latent_density": "ebim", "ebim_hidden": []}, "ebim_hidden"),
    ({"latent_density": "ebim", "autoencoder": "mflow", "mflow_schedule": "alternating"}, "sequential"),
])
def test_bad_ebim_options_raise_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_model("caloman", tiny_binning(), overrides={**TINY, **overrides})


def test_ebim_options_parse_from_the_command_line():
    values = parse_model_options("caloman", ["latent_density=ebim", "ebim_hidden=64,64", "ebim_steps=12",
                                             "ebim_step_size=0.05"])
    model = build_model("caloman", tiny_binning(), overrides={**TINY, **values})
    assert model.latent_ebim.settings == LatentEBIMSettings(hidden=(64, 64), steps=12, step_size=0.05)
    with pytest.raises(ConfigError, match="ebim_steps"):
        parse_model_options("caloman", ["ebim_steps=many"])


def test_quick_profile_ebim_run_on_a_tiny_file_round_trips_and_exports(tmp_path):
    """The quick CaloMan with latent_density = ebim through train_run (2 epochs per stage) on 300
    simulated dataset-1 photons; the loaded run samples the same showers, and the ONNX export
    (whose own check compares ONNX Runtime with PyTorch) succeeds."""
    energies = ladder_energies(20)
    data = write_showers(tmp_path / "train.h5", energies, simulate_showers("ds1-photons", energies, seed=3),
                         binning="ds1-photons")
    training = TrainingConfig(epochs=2, batch_size=64, patience=0, num_threads=1, seed=1)
    result = train_run(data, "ds1-photons", tmp_path / "run", model_kind="caloman", training=training,
                       model_profile="quick", model_overrides={"latent_density": "ebim", "ebim_steps": 10},
                       command_line=["test"])
    loaded = load_run(result.run_dir).model
    assert loaded.config.latent_density == "ebim" and loaded.config.hidden == (256, 256)
    e = torch.full((8,), 10_000.0)
    with torch.inference_mode():
        torch.manual_seed(0)
        a = result.model.sample(e)
        torch.manual_seed(0)
        b = loaded.sample(e)
    assert torch.equal(a, b)
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from caloman.export import export_onnx

    export = export_onnx(result.run_dir, tmp_path / "ebim.onnx")
    assert export.check.showers > 0
