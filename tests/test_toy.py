"""The toy experiments: datasets, metrics, the `caloman toy` command."""

import json

import numpy as np
import pytest
import torch

from caloman.cli import main
from caloman.toy import DATASETS, METHODS
from caloman.toy.datasets import ring
from caloman.toy.metrics import emd, emd_paper, histogram, js_divergence, jsd

torch.set_num_threads(1)


def test_datasets_have_their_known_shapes():
    rng = np.random.default_rng(0)
    g = DATASETS["four-gaussians"].sample(40000, rng)
    assert g.shape == (40000, 2)
    for sx in (-1, 1):
        for sy in (-1, 1):
            part = g[(np.sign(g[:, 0]) == sx) & (np.sign(g[:, 1]) == sy)]
            assert len(part) == pytest.approx(10000, rel=0.05)
            assert np.allclose(part.mean(0), [4 * sx, 4 * sy], atol=0.05)
            assert np.allclose(part.std(0), 1.0, atol=0.05)
    donut = DATASETS["double-donut"].sample(40000, rng)
    assert np.mean(donut[:, 0] < 0) == pytest.approx(0.5, abs=0.01)
    assert np.allclose(donut.mean(0), 0.0, atol=0.06)
    one = ring(40000, rng)
    r = np.hypot(one[:, 0], one[:, 1])
    assert r.mean() == pytest.approx(4.0, abs=0.03) and r.std() == pytest.approx(1.0, abs=0.03)
    assert np.abs(np.arctan2(one[:, 1], one[:, 0]).mean()) < 0.05  # uniform angle
    assert np.mean(np.hypot(donut[:, 0] - 4, donut[:, 1]) < 1.0) < 0.01  # a hole at each centre
    rings = DATASETS["three-rings"].sample(30000, rng)
    for centre in (-12.0, 0.0, 12.0):
        near = rings[np.abs(rings[:, 0] - centre) < 6]
        assert len(near) == pytest.approx(10000, rel=0.05)
        assert np.abs(near[:, 0].mean() - centre) < 0.1
    assert {"flow", "dctr", "laser-refiner", "laser-hmc"} <= set(METHODS)


def test_jsd_is_zero_for_identical_and_ln2_for_disjoint_histograms():
    x = DATASETS["double-donut"].sample(5000, np.random.default_rng(1))
    rng = DATASETS["double-donut"].hist_range
    assert jsd(x, x.copy(), None, hist_range=rng) == pytest.approx(0.0, abs=1e-12)
    p = np.array([0.5, 0.5, 0.0, 0.0])
    assert js_divergence(p, p[::-1].copy()) == pytest.approx(np.log(2))


def test_weights_enter_the_histogram_and_jsd():
    x = np.array([[0.5, 0.5], [-0.5, -0.5]])
    h, _, _ = histogram(x, np.array([3.0, 1.0]), ((-1, 1), (-1, 1)), bins=2)
    assert h.sum() == pytest.approx(1.0) and h.max() == pytest.approx(0.75)
    truth = np.array([[0.5, 0.5]] * 3 + [[-0.5, -0.5]])
    assert jsd(truth, x, np.array([3.0, 1.0]), hist_range=((-1, 1), (-1, 1))) == pytest.approx(0.0, abs=1e-12)


def test_emd_of_a_shifted_point_set_is_the_shift():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(500, 2))
    shift = np.array([0.3, -0.4])  # |shift| = 0.5
    assert emd(a, a + shift, None, rng=np.random.default_rng(0), emd_points=500) == pytest.approx(0.5, abs=1e-6)
    # weights: all mass on the shifted copies of the first half is a different, larger distance
    w = np.r_[np.ones(250), np.zeros(250)]
    assert emd(a, a + shift, w, rng=np.random.default_rng(0), emd_points=500) > 0.5 + 1e-3


def test_paper_emd_is_zero_for_identical_and_grows_with_a_shift():
    x = DATASETS["four-gaussians"].sample(4000, np.random.default_rng(3))
    r = DATASETS["four-gaussians"].hist_range
    assert emd_paper(x, x, None, hist_range=r) == pytest.approx(0.0, abs=1e-6)
    assert emd_paper(x, x + [1.0, 0.0], None, hist_range=r) > emd_paper(x, x + [0.5, 0.0], None, hist_range=r) > 0


@pytest.mark.parametrize("method", ["flow", "dctr", "laser-refiner", "laser-hmc"])
def test_cli_quick_writes_metrics_and_plot(tmp_path, method):
    out = tmp_path / "toy"
    assert main(["-q", "toy", "four-gaussians", "--method", method, "--out", str(out), "--quick", "--seed", "3"]) == 0
    record = json.loads((out / "metrics.json").read_text())
    for key in ("emd", "jsd", "emd_paper", "jsd_paper"):
        assert np.isfinite(record[key]) and record[key] >= 0
        assert np.isfinite(record["truth"][key])
    assert record["method"] == method and record["seed"] == 3 and record["profile"] == "quick"
    assert record["weighted"] == (method == "dctr")
    assert record["sizes"]["train"] == 3000 and "versions" in record and "timings_s" in record
    assert (out / "toy.png").stat().st_size > 1000
    if method == "laser-hmc":
        assert 0 < record["method_info"]["hmc"]["acceptance_rate"] <= 1


def test_cli_failure_leaves_nothing(tmp_path, monkeypatch):
    import caloman.cli.toy as toy_cli

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(toy_cli, "plot_toy", broken)
    out = tmp_path / "toy"
    with pytest.raises(RuntimeError):
        main(["-q", "toy", "double-donut", "--method", "flow", "--out", str(out), "--quick"])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_unknown_names(tmp_path):
    assert main(["-q", "toy", "no-such-toy", "--method", "flow", "--out", str(tmp_path / "x"), "--quick"]) == 2
    assert main(["-q", "toy", "double-donut", "--method", "nope", "--out", str(tmp_path / "x"), "--quick"]) == 2
    assert not (tmp_path / "x").exists()
