"""Energy-based implicit manifolds: projection, constrained Langevin, arithmetic, density, training."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import i0, i1

from caloman.cli import main
from caloman.errors import ConfigError
from caloman.implicit import (
    Intersection,
    ManifoldConfig,
    ManifoldFunction,
    SamplerConfig,
    Union,
    constrained_langevin,
    estimate_volume,
    normalised_density,
    project,
    resample_uniform,
    tangent_projection,
    train_manifold,
)
from caloman.toy import DATASETS

torch.set_num_threads(1)


def unit_sphere(x):
    """||x||^2 - 1: the unit circle in R^2, the unit sphere in R^3; (b, n) -> (b, 1)."""
    return (x ** 2).sum(-1, keepdim=True) - 1.0


def circle_at(cx):
    return lambda x: ((x - torch.tensor([cx, 0.0])) ** 2).sum(-1, keepdim=True) - 1.0


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dimension", [2, 3])
def test_projection_lands_on_circle_and_sphere(dimension):
    x = torch.randn(300, dimension, generator=_gen()) * 2
    y = project(unit_sphere, x)
    assert torch.allclose(y.norm(dim=-1), torch.ones(300), atol=1e-5)
    # the Gauss-Newton projection of a point on a sphere moves it radially
    cosine = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    assert cosine.min() > 0.999


def test_tangent_projection_is_orthogonal_to_the_normal():
    x = project(unit_sphere, torch.randn(200, 3, generator=_gen(1)))
    v = torch.randn(200, 3, generator=_gen(2))
    p = tangent_projection(unit_sphere, x, v)
    assert (p * x).sum(-1).abs().max() < 1e-5  # the normal of the unit sphere at x is x
    assert torch.allclose(p, v - (v * x).sum(-1, keepdim=True) * x, atol=1e-5)


def test_constrained_langevin_with_zero_energy_is_uniform_on_the_circle():
    start = torch.tensor([[1.0, 0.0]]).repeat(2000, 1)  # every chain starts at angle 0
    result = constrained_langevin(unit_sphere, start, None, SamplerConfig(steps=120, step_size=0.3), _gen(3))
    assert result.mean_residual < 1e-4
    angle = torch.atan2(result.samples[:, 1], result.samples[:, 0])
    # uniform angles: mean resultant length ~ 1/sqrt(2000) = 0.02; the start alone would give 1
    assert torch.hypot(torch.cos(angle).mean(), torch.sin(angle).mean()) < 0.08
    counts = torch.histc(angle, bins=4, min=-math.pi, max=math.pi)
    assert (counts / 2000 - 0.25).abs().max() < 0.05


def test_constrained_langevin_follows_an_energy():
    def energy(x):  # exp(-E) ~ von Mises with kappa 3 at angle 0
        return -3.0 * x[:, 0]

    start = project(unit_sphere, torch.randn(2000, 2, generator=_gen(4)))
    result = constrained_langevin(unit_sphere, start, energy, SamplerConfig(steps=150, step_size=0.3), _gen(5))
    assert result.mean_residual < 1e-4
    expected = float(i1(3.0) / i0(3.0))  # mean cos(angle) of von Mises kappa 3 (0.810); uniform angles give 0
    # unadjusted Langevin (no Metropolis step, as the paper): step 0.3 leaves a bias of a few hundredths
    assert float(result.samples[:, 0].mean()) == pytest.approx(expected, abs=0.06)


def test_chains_confined_to_a_box_stay_in_it():
    # the line x2 = 0 is unbounded; confined chains must stay in [-1, 1] in x1
    line = lambda x: x[:, 1:2]  # noqa: E731
    low, high = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    start = torch.zeros(500, 2)
    free = constrained_langevin(line, start, None, SamplerConfig(steps=100, step_size=0.3), _gen(20))
    assert float(free.samples[:, 0].abs().max()) > 2.0  # unconfined: a random walk of spread 3
    held = constrained_langevin(line, start, None, SamplerConfig(steps=100, step_size=0.3), _gen(20), (low, high))
    assert float(held.samples[:, 0].abs().max()) <= 1.0
    assert held.samples[:, 1].abs().max() < 1e-6
    assert held.rejected_fraction > 0
    # still spread over the segment (uniform on [-1, 1]: a quarter of the points beyond 0.5)
    assert 0.15 < float((held.samples[:, 0] > 0.5).float().mean()) < 0.35


def test_resampling_uniform_points_by_the_energy_follows_exp_minus_e():
    volume = estimate_volume(unit_sphere, torch.tensor([-1.5, -1.5]), torch.tensor([1.5, 1.5]), codimension=1,
                             points=100_000, delta=0.02, generator=_gen(21))
    x = resample_uniform(lambda x: -3.0 * x[:, 0], volume, 4000, _gen(22))  # von Mises kappa 3 at angle 0
    assert (x.norm(dim=-1) - 1).abs().max() < 1e-5
    assert float(x[:, 0].mean()) == pytest.approx(float(i1(3.0) / i0(3.0)), abs=0.03)


def test_union_of_two_circles_samples_both():
    union = Union(circle_at(-1.8), circle_at(1.8))
    x = torch.randn(1000, 2, generator=_gen(6)) * 2
    result = constrained_langevin(union, x, None, SamplerConfig(steps=30, step_size=0.2), _gen(7))
    s = result.samples
    distance = torch.minimum((s - torch.tensor([-1.8, 0])).norm(dim=-1), (s - torch.tensor([1.8, 0])).norm(dim=-1))
    assert (distance - 1).abs().max() < 1e-4
    assert 0.4 < float((s[:, 0] > 0).float().mean()) < 0.6


def test_intersection_of_sphere_and_plane_is_the_equator():
    equator = Intersection(unit_sphere, lambda x: x[:, 2:3])
    assert equator(torch.zeros(4, 3)).shape == (4, 2)
    x = torch.randn(500, 3, generator=_gen(8))
    result = constrained_langevin(equator, x, None, SamplerConfig(steps=40, step_size=0.3), _gen(9))
    s = result.samples
    assert s[:, 2].abs().max() < 1e-5
    assert (s.norm(dim=-1) - 1).abs().max() < 1e-5
    assert result.mean_residual < 1e-4


def test_density_of_a_constant_energy_on_the_unit_circle_is_one_over_two_pi():
    volume = estimate_volume(unit_sphere, torch.tensor([-1.5, -1.5]), torch.tensor([1.5, 1.5]), codimension=1,
                             points=200_000, delta=0.02, generator=_gen(10))
    assert volume.volume == pytest.approx(2 * math.pi, rel=0.05)
    assert (volume.uniform_points.norm(dim=-1) - 1).abs().max() < 1e-5
    density = normalised_density(lambda x: torch.full(x.shape[:1], 2.5), torch.tensor([[1.0, 0.0]]), volume)
    assert float(density) == pytest.approx(1 / (2 * math.pi), rel=0.05)


def test_sphere_area_by_the_tube_method():
    volume = estimate_volume(unit_sphere, -1.3 * torch.ones(3), 1.3 * torch.ones(3), codimension=1,
                             points=200_000, delta=0.05, generator=_gen(11))
    assert volume.volume == pytest.approx(4 * math.pi, rel=0.05)


def test_training_f_decreases_its_norm_on_the_data():
    rng = np.random.default_rng(0)
    data = torch.as_tensor(DATASETS["von-mises-mixture"].sample(200, rng), dtype=torch.float32)
    F = train_manifold(data, ManifoldConfig(epochs=40, batch_size=20, buffer_size=500), _gen(12))
    first, last = F.history[0], F.history[-1]
    # ||F|| on the data falls relative to ||F|| on the Langevin negatives (the scale of F is free)
    assert last["data_norm"] / last["negative_norm"] < 0.5 * first["data_norm"] / first["negative_norm"]
    # points off the circle have a larger ||F|| than the data
    far = torch.as_tensor([[0.0, 0.0], [1.8, 1.8], [-1.9, 0.3]])
    assert float(F(far).norm(dim=-1).min()) > float(F(data).norm(dim=-1).median())


def test_negatives_are_clamped_to_the_box_and_written_back():
    from caloman.implicit.manifold import _negatives  # noqa: PLC0415

    F = ManifoldFunction(2, 1)
    config = ManifoldConfig(buffer_size=4, buffer_frac=1.0, langevin_steps=0)
    buffer = torch.tensor([[3.0, 0.0], [0.5, -7.0], [0.2, 0.3], [-2.0, 2.0]])  # F's box is [-1, 1]^2
    norm = lambda x: F(x).norm(dim=-1)  # noqa: E731
    negative = _negatives(F, norm, buffer, 32, config, _gen(23))
    assert negative.abs().max() <= 1.0 and (negative.abs() == 1.0).any()
    assert buffer.abs().max() <= 1.0  # the clamped negatives replaced their buffer slots


def test_bad_input_raises_typed_errors():
    with pytest.raises(ConfigError):
        train_manifold(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]))
    with pytest.raises(ConfigError):
        SamplerConfig(step_size=0.0)
    with pytest.raises(ConfigError):
        ManifoldConfig(codimension=0)
    with pytest.raises(ConfigError):
        constrained_langevin(unit_sphere, torch.ones(3))


def test_manifold_datasets_lie_on_their_manifolds():
    rng = np.random.default_rng(1)
    circle = DATASETS["von-mises-mixture"].sample(1000, rng)
    assert np.allclose(np.hypot(circle[:, 0], circle[:, 1]), 1.0)
    two = DATASETS["two-circles"].sample(1000, rng)
    assert np.allclose(np.hypot(np.abs(two[:, 0]) - 1.8, two[:, 1]), 1.0)
    assert np.mean(two[:, 0] > 0) == pytest.approx(0.5, abs=0.01)
    torus = DATASETS["torus"].sample(1000, rng)
    assert np.allclose(np.hypot(np.hypot(torus[:, 0], torus[:, 1]) - 3.0, torus[:, 2]), 1.0)
    sphere = DATASETS["sphere-mixture"].sample(3000, rng)
    assert np.allclose(np.linalg.norm(sphere, axis=1), 1.0)
    near_pole = sphere[sphere[:, 2] > 0.9]
    # P(cos > 0.9) for vMF kappa 5 is 0.39, a third of the points: 0.13 (uniform on S^2: 0.05)
    assert len(near_pole) > 0.11 * 3000


def test_cli_quick_ebim_on_two_circles(tmp_path):
    out = tmp_path / "ebim"
    assert main(["-q", "toy", "two-circles", "--method", "ebim", "--out", str(out), "--quick"]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(record["wasserstein"]) and record["wasserstein"] > record["truth"]["wasserstein"] >= 0
    assert "jsd" not in record
    assert record["method_info"]["samples"]["mean_residual_norm"] < 1e-4
    assert record["sizes"]["train"] == 300
    assert (out / "toy.png").stat().st_size > 1000


def test_flow_toys_refuse_ebim_and_pushforward(tmp_path):
    assert main(["-q", "toy", "double-donut", "--method", "ebim", "--out", str(tmp_path / "x"), "--quick"]) == 2
    assert not (tmp_path / "x").exists()
