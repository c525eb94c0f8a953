"""The refinement core: DCTR weights, latent pull-back, weighted refiner flow, HMC."""

import math

import numpy as np
import pytest
import torch

from caloman.refinement import (
    ClassifierConfig,
    DeterministicPullback,
    HMCConfig,
    RefinerConfig,
    WeightedFlowRefiner,
    fit_density_ratio,
    fit_latent_weights,
    hmc_sample,
    weight_summary,
)

torch.set_num_threads(1)


def _generator(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)  # network initialisation and flow sampling use the global generator
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("calibration", ["none", "platt"])
def test_dctr_weights_match_the_analytic_ratio_of_two_gaussians(calibration):
    # generated N(0, 1), real N(0.5, 1) in 1-D: log p_real/p_gen = 0.5 x - 0.125.
    # Unequal sizes: the class-balance correction must remove log(n_real / n_gen) = log 2.
    g = _generator(1)
    generated = torch.randn(6000, 1, generator=g)
    real = torch.randn(12000, 1, generator=g) + 0.5
    config = ClassifierConfig(hidden=(16, 16), epochs=15, batch_size=512, lr=3e-3, calibration=calibration)
    ratio = fit_density_ratio(generated, real, config, generator=g)
    x = torch.linspace(-1.5, 2.0, 50)[:, None]
    with torch.no_grad():
        learned = ratio.log_weight(x)
    exact = 0.5 * x[:, 0] - 0.125
    assert float((learned - exact).abs().max()) < 0.15
    # reweighting the generated sample reproduces the real mean
    w = ratio.weight(generated)
    assert float((w * generated[:, 0]).sum() / w.sum()) == pytest.approx(0.5, abs=0.06)


def test_weight_clip_caps_the_largest_weight():
    g = _generator(2)
    generated = torch.randn(3000, 1, generator=g)
    real = torch.randn(3000, 1, generator=g) + 2.0  # true ratio exp(2x - 2) reaches e^4 at x = 3
    ratio = fit_density_ratio(generated, real, ClassifierConfig(hidden=(16,), epochs=10, max_weight=5.0),
                              generator=g)
    assert float(ratio.weight(torch.tensor([[3.0], [6.0]])).max()) <= 5.0 + 1e-9


def test_weight_summary():
    s = weight_summary(np.array([1.0, 1.0, 1.0, 1.0]))
    assert s["ess_fraction"] == pytest.approx(1.0)
    s = weight_summary(np.array([4.0, 0.0, 0.0, 0.0]))
    assert s["ess_fraction"] == pytest.approx(0.25)
    assert s["largest"][0] == 4.0 and s["quantiles"]["0.5"] == 0.0


def test_weighted_refiner_turns_n01_into_the_reweighted_target():
    # z ~ N(0, 1) with w = N(z; 0.5, 1) / N(z; 0, 1) = exp(0.5 z - 0.125): target N(0.5, 1)
    g = _generator(3)
    z = torch.randn(8000, 1, generator=g)
    w = torch.exp(0.5 * z[:, 0] - 0.125)
    config = RefinerConfig(transforms=2, hidden=(16, 16), epochs=30, batch_size=256, lr=3e-3, passes=None)
    refiner = WeightedFlowRefiner(1, config=config).fit(z, w, generator=g)
    sample = refiner.sample(20000)
    assert sample.shape == (20000, 1)
    assert float(sample.mean()) == pytest.approx(0.5, abs=0.07)
    assert float(sample.std()) == pytest.approx(1.0, abs=0.07)
    with torch.no_grad():  # and it is a normalised density near N(0.5, 1)
        lp = refiner.log_prob(torch.tensor([[0.5]]))
    assert float(lp) == pytest.approx(-0.5 * math.log(2 * math.pi), abs=0.1)


def test_conditional_refiner_needs_and_uses_the_condition():
    g = _generator(4)
    c = torch.rand(6000, 1, generator=g) * 2 - 1
    z = torch.randn(6000, 1, generator=g) + 2.0 * c  # target mean 2c, w = 1
    refiner = WeightedFlowRefiner(1, context=1, config=RefinerConfig(transforms=2, hidden=(16, 16), epochs=20,
                                                                     batch_size=256, lr=3e-3, passes=None))
    refiner.fit(z, torch.ones(6000), condition=c, generator=g)
    s = refiner.sample(condition=torch.full((4000, 1), 0.5))
    assert float(s.mean()) == pytest.approx(1.0, abs=0.15)
    with pytest.raises(ValueError):
        refiner.sample(10)


def test_hmc_samples_a_correlated_gaussian():
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    precision = torch.linalg.inv(cov)

    def log_prob(z, condition):
        d = z - mean
        return -0.5 * ((d @ precision) * d).sum(-1)

    g = _generator(5)
    config = HMCConfig(n_chains=200, step_size=0.3, leapfrog_steps=10, burn_in=100, samples_per_chain=100,
                       thinning=2)
    result = hmc_sample(log_prob, torch.randn(200, 2, generator=g, dtype=torch.float64) * 3, config, generator=g)
    x = result.flat()
    assert result.samples.shape == (100, 200, 2)
    assert 0.5 < result.acceptance_rate < 0.99
    assert torch.allclose(x.mean(0), mean, atol=0.06)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.08)


def test_hmc_per_chain_condition_shifts_each_chain():
    def log_prob(z, condition):
        return -0.5 * ((z - condition) ** 2).sum(-1)

    g = _generator(6)
    condition = torch.tensor([[-3.0], [3.0]]).repeat(100, 1)
    config = HMCConfig(n_chains=200, step_size=0.5, leapfrog_steps=5, burn_in=50, samples_per_chain=50)
    result = hmc_sample(log_prob, torch.zeros(200, 1), config, condition=condition, generator=g)
    means = result.samples.mean(0)[:, 0]
    assert float(means[0::2].mean()) == pytest.approx(-3.0, abs=0.15)
    assert float(means[1::2].mean()) == pytest.approx(3.0, abs=0.15)


def test_latent_weights_recover_the_conditional_mean_of_noisy_weights():
    # x = z + noise, w(x) = exp(x) has E[w | z] = exp(z + s^2/2) for noise N(0, s^2)
    g = _generator(7)
    s = 0.5
    z = torch.randn(12000, 1, generator=g)
    x = z + s * torch.randn(12000, 1, generator=g)
    w = torch.exp(x[:, 0])
    ratio = fit_latent_weights(z, w, ClassifierConfig(hidden=(16, 16), epochs=20, batch_size=512, lr=3e-3,
                                                      max_weight=None), generator=g)
    grid = torch.linspace(-1.5, 1.5, 31)[:, None]
    with torch.no_grad():
        learned = ratio.log_weight(grid)
    exact = grid[:, 0] + s ** 2 / 2
    assert float((learned - exact).abs().max()) < 0.2


def test_deterministic_pullback_is_the_ratio_at_g_of_z():
    g = _generator(8)
    ratio = fit_density_ratio(torch.randn(2000, 1, generator=g), torch.randn(2000, 1, generator=g) + 1,
                              ClassifierConfig(hidden=(8,), epochs=3), generator=g)
    pull = DeterministicPullback(ratio, lambda z: 2 * z + 1)
    z = torch.randn(10, 1, generator=g)
    assert torch.allclose(pull.weight(z), ratio.weight(2 * z + 1))
