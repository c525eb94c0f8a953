"""The refinement core: DCTR weights, latent pull-back, weighted refiner flow, HMC."""

import math

import numpy as np
import pytest
import torch

from caloman.errors import ConfigError
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


def test_coupling_refiner_is_caloman_s_fused_flow_and_learns_a_conditional_shift():
    g = _generator(5)
    c = torch.rand(6000, 1, generator=g) * 2 - 1
    z = torch.randn(6000, 2, generator=g) + torch.cat([2.0 * c, -c], dim=1)  # mean (2c, -c), w = 1
    config = RefinerConfig(transforms=2, hidden=(16, 16), epochs=20, batch_size=256, lr=3e-3)
    refiner = WeightedFlowRefiner(2, context=1, config=config)
    assert refiner.fused and config.flow == "coupling"
    refiner.fit(z, torch.ones(6000), condition=c, generator=g)
    s = refiner.sample(condition=torch.full((4000, 1), 0.5))
    assert float(s[:, 0].mean()) == pytest.approx(1.0, abs=0.15)
    assert float(s[:, 1].mean()) == pytest.approx(-0.5, abs=0.15)
    noise, cond = torch.randn(50, 2, generator=g), torch.zeros(50, 1)
    with torch.no_grad():  # the map from noise is deterministic, and log q is its density
        a, b = refiner.from_noise(noise, cond), refiner.from_noise(noise, cond)
        assert torch.equal(a, b)
        zuko_view = refiner.flow(cond)  # the same parameters through zuko
        expected = zuko_view.log_prob((a - refiner.shift) / refiner.scale) - refiner.scale.log().sum()
        assert torch.allclose(refiner.log_prob(a, cond), expected, atol=1e-4)
    with pytest.raises(ValueError):
        refiner.sample(10)
    with pytest.raises(ConfigError):
        WeightedFlowRefiner(2, context=1, config=RefinerConfig(flow="maf"))
    unconditional = WeightedFlowRefiner(2, config=config)  # no condition: zuko's NSF
    assert not unconditional.fused


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


# -- the boosted-tree DCTR classifier --------------------------------------------------

def _tree_config(**kw):
    from caloman.refinement.trees import TreeClassifierConfig

    base = dict(max_leaf_nodes=8, min_samples_leaf=200, n_iter_no_change=20, l2_regularization=1.0)
    return TreeClassifierConfig(**{**base, **kw})


def test_tree_walk_reproduces_scikit_learn():
    # the stored trees (no pickle) must give scikit-learn's own decision function, NaN included
    from sklearn.ensemble import HistGradientBoostingClassifier

    from caloman.refinement.trees import TreeDensityRatio, pack_trees

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3))
    x[:100, 1] = np.nan
    label = (x[:, 0] + np.nan_to_num(x[:, 1]) ** 2 + rng.normal(size=2000) > 0.5).astype(float)
    model = HistGradientBoostingClassifier(max_iter=30, max_leaf_nodes=15, random_state=0).fit(x, label)
    ratio = pack_trees([model])
    assert np.allclose(ratio.logit(torch.as_tensor(x)).numpy(), model.decision_function(x), rtol=0, atol=1e-12)
    again = TreeDensityRatio.from_state_dict(ratio.state_dict())
    assert torch.equal(again.logit(torch.as_tensor(x)), ratio.logit(torch.as_tensor(x)))


def test_tree_weights_match_the_analytic_ratio_of_two_gaussians():
    # as for the MLP: generated N(0, 1), real N(0.5, 1), log w = 0.5 x - 0.125; unequal sizes (prior log 2)
    from caloman.refinement.trees import fit_tree_density_ratio

    rng = np.random.default_rng(1)
    generated = rng.normal(size=(6000, 1))
    real = rng.normal(size=(12000, 1)) + 0.5
    fit = fit_tree_density_ratio(generated, real, _tree_config(), seed=0)
    x = torch.linspace(-1.0, 1.5, 50, dtype=torch.float64)[:, None]  # where both samples are dense
    error = (fit.ratio.log_weight(x) - (0.5 * x[:, 0] - 0.125)).abs()
    assert float(error.mean()) < 0.08 and float(error.max()) < 0.25  # piecewise constant: steps, not a line
    # both the cross-fitted weights of the training sample and the ensemble's reproduce the real mean
    for w in (fit.generated_log_weight.exp(), fit.ratio.weight(torch.as_tensor(generated))):
        assert float((w * torch.as_tensor(generated[:, 0])).sum() / w.sum()) == pytest.approx(0.5, abs=0.05)
    assert float(fit.generated_log_weight.exp().mean()) == pytest.approx(1.0, abs=0.05)


def test_tree_weights_are_cross_fitted():
    # two samples of one distribution: the trees memorise noise, so in-sample scores separate the
    # training points, the out-of-fold scores used for the weights do not
    from sklearn.metrics import roc_auc_score

    from caloman.refinement.trees import fit_tree_density_ratio

    rng = np.random.default_rng(2)
    generated, real = rng.normal(size=(600, 5)), rng.normal(size=(600, 5))
    config = _tree_config(min_samples_leaf=2, max_leaf_nodes=31, n_iter_no_change=60, max_iter=60,
                          l2_regularization=0.0, calibration="none")
    fit = fit_tree_density_ratio(generated, real, config, seed=0)
    label = np.r_[np.zeros(600), np.ones(600)]
    out_of_fold = torch.cat([fit.generated_log_weight, fit.real_log_weight]).numpy()
    in_sample = fit.ratio.log_weight(torch.as_tensor(np.concatenate([generated, real]))).numpy()
    assert abs(roc_auc_score(label, out_of_fold) - 0.5) < 0.06
    assert fit.out_of_fold_auc == pytest.approx(roc_auc_score(label, out_of_fold), abs=0.02)  # calibration is monotone
    assert roc_auc_score(label, in_sample) > 0.65


def test_tree_weight_clip_and_bad_config():
    from caloman.refinement.trees import TreeClassifierConfig, fit_tree_density_ratio

    rng = np.random.default_rng(3)
    fit = fit_tree_density_ratio(rng.normal(size=(1500, 1)), rng.normal(size=(1500, 1)) + 2.0,
                                 _tree_config(max_weight=5.0, min_samples_leaf=20), seed=0)
    assert float(fit.ratio.weight(torch.tensor([[3.0], [6.0]], dtype=torch.float64)).max()) <= 5.0 + 1e-9
    assert float(fit.generated_log_weight.max()) <= math.log(5.0) + 1e-9
    with pytest.raises(ConfigError, match="n_folds"):
        TreeClassifierConfig(n_folds=1)
    with pytest.raises(ConfigError, match="too few"):
        fit_tree_density_ratio(np.zeros((5, 1)), np.ones((5, 1)))
