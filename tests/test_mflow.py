"""M-flows (caloman.models.mflow) and the manifold toys."""

import math

import numpy as np
import pytest
import torch

from caloman.errors import ConfigError
from caloman.models.mflow import MFlow, MFlowConfig, MFlowSchedule, gram_log_det, phase_learning_rates, train_mflow
from caloman.toy import DATASETS, quick_settings, run_toy

torch.set_num_threads(1)


def _model(kind: str = "mflow", features: int = 3, latent_dim: int = 2) -> MFlow:
    torch.manual_seed(0)
    return MFlow(features, latent_dim, 0, MFlowConfig(kind=kind, outer_transforms=2, outer_hidden=(16, 16),
                                                      inner_transforms=2, inner_hidden=(16, 16)))


def test_the_encoder_inverts_the_decoder_exactly():
    model = _model()
    u = torch.randn(64, 2)
    with torch.no_grad():
        x = model.decode(u)
        assert torch.allclose(model.encode(x), u, atol=1e-4)
        assert torch.allclose(model.project(x), x, atol=1e-4)  # points on the manifold stay put
        assert model.reconstruction_error(x).max() < 1e-7


def test_gram_log_det_of_a_linear_embedding_is_the_log_of_its_singular_values():
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    u = torch.randn(5, 2)
    value = gram_log_det(lambda z, c: z @ a.T, u)
    assert torch.allclose(value, torch.full((5,), math.log(6.0), dtype=torch.float64), atol=1e-6)


def test_an_untrained_mflow_density_is_the_latent_density_on_its_slice():
    # Change-of-variables check: the density on the manifold integrates the volume change of g.
    model = _model(features=2, latent_dim=1)
    u = torch.linspace(-1, 1, 9)[:, None]
    with torch.no_grad():
        x = model.decode(u)
    expected = model.latent_log_prob(u).double() - gram_log_det(model.decode, u)
    assert torch.allclose(model.log_prob_on_manifold(x), expected, atol=1e-4)
    # the arc length of g over [-1, 1] integrates exp(0.5 log det J^T J) du
    fine = torch.linspace(-1, 1, 2001)[:, None]
    with torch.no_grad():
        curve = model.decode(fine)
    length = (curve[1:] - curve[:-1]).norm(dim=1).sum()
    with torch.no_grad():
        speed = gram_log_det(model.decode, fine).exp()
    assert float(length) == pytest.approx(float(speed.mean() * 2), rel=1e-3)


def test_circle_and_sphere_truths_are_normalised_on_their_manifolds():
    t = np.linspace(0, 2 * np.pi, 20001)[:-1]
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    assert np.exp(DATASETS["circle"].log_density(circle)).mean() * 2 * np.pi == pytest.approx(1.0, rel=1e-6)
    rng = np.random.default_rng(0)
    v = rng.normal(size=(200_000, 3))
    sphere = v / np.linalg.norm(v, axis=1, keepdims=True)
    assert np.exp(DATASETS["sphere-gaussian"].log_density(sphere)).mean() * 4 * np.pi == pytest.approx(1, rel=0.01)
    for name in ("circle", "sphere-gaussian"):
        assert DATASETS[name].manifold_distance(DATASETS[name].sample(100, rng)).max() < 1e-12


@pytest.mark.parametrize("kind", ["mflow", "mflow-e"])
@pytest.mark.parametrize("schedule", ["sequential", "alternating"])
def test_both_schedules_reduce_both_losses(kind, schedule):
    x = torch.as_tensor(DATASETS["circle"].sample(512, np.random.default_rng(1)), dtype=torch.float32)
    model = _model(kind, features=2, latent_dim=1)
    history = train_mflow(model, x, MFlowSchedule(schedule=schedule, manifold_epochs=4, density_epochs=4,
                                                  batch_size=64, lr=3e-3), generator=torch.Generator().manual_seed(0))
    for phase in ("manifold", "density"):
        losses = [h["loss"] for h in history if h["phase"] == phase]
        assert len(losses) == 4 and losses[-1] < losses[0]
    phases = [h["phase"] for h in history]
    assert phases[:2] == (["manifold", "manifold"] if schedule == "sequential" else ["manifold", "density"])


def test_cosine_rates_fall_within_each_phase_of_the_alternating_schedule():
    x = torch.as_tensor(DATASETS["circle"].sample(128, np.random.default_rng(2)), dtype=torch.float32)
    schedule = MFlowSchedule(schedule="alternating", manifold_epochs=4, density_epochs=2, batch_size=64, lr=2e-3,
                             lr_schedule="cosine")
    history = train_mflow(_model("mflow", features=2, latent_dim=1), x, schedule,
                          generator=torch.Generator().manual_seed(0))
    manifold = [h["lr"] for h in history if h["phase"] == "manifold"]
    density = [h["lr"] for h in history if h["phase"] == "density"]
    assert manifold == pytest.approx([2e-3, 2e-3 * (0.5 + 0.5 * np.cos(np.pi / 4)), 1e-3,
                                      2e-3 * (0.5 - 0.5 * np.cos(np.pi / 4))])
    assert density == pytest.approx([2e-3, 1e-3])
    assert phase_learning_rates(MFlowSchedule(lr=1e-3), 3) == [1e-3] * 3  # "constant", the default


def test_bad_configurations_raise_typed_errors():
    with pytest.raises(ConfigError):
        MFlowConfig(kind="flow")
    with pytest.raises(ConfigError):
        MFlowSchedule(schedule="random")
    with pytest.raises(ConfigError, match="lr_schedule"):
        MFlowSchedule(lr_schedule="step")
    with pytest.raises(ConfigError):
        MFlow(2, 2)


@pytest.mark.parametrize("method", ["mflow", "mflow-e", "ambient-flow", "two-step-vae"])
def test_manifold_toy_methods_run_quick(method):
    result = run_toy("circle", method, quick_settings(), seed=0)
    assert result.output.samples.shape == (3000, 2)
    assert np.isfinite(result.metrics["manifold_distance"]) and np.isfinite(result.metrics["wasserstein"])
    assert result.truth_metrics["manifold_distance"] < 1e-12 and result.truth_metrics["log_density_error"] < 1e-12
    assert (result.metrics["log_density_error"] is None) == (method == "ambient-flow")
