"""`caloman refine` on a tiny CaloMan: the latent interface, refined run directories,
weights through generate and evaluate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from caloman.cli import main
from caloman.errors import RunDirectoryError
from caloman.io import ShowerFile, write_showers
from caloman.metrics.separation import normalised_histogram
from caloman.refinement.showers import RefinedModel, shower_features
from caloman.runs import load_run, train_run
from caloman.training import TrainingConfig

torch.set_num_threads(1)

TINY = {"latent_dim": 2, "hidden": [16], "flow_hidden": [16], "flow_transforms": 2, "layer_flow_hidden": [8],
        "layer_flow_transforms": 2, "flow_bins": 4, "layer_flow_bins": 4}
BINNING_XML = """<Bins>
  <Bin pid="22" name="photon">
    <Layer id="0" r_edges="0,5,20" n_bin_alpha="1"/>
    <Layer id="1" r_edges="0,2,6,30" n_bin_alpha="4"/>
  </Bin>
</Bins>
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A CaloMan run (per-layer preprocessing, Poisson voxel noise) trained for 2 epochs on 300 showers."""
    tmp = tmp_path_factory.mktemp("refine")
    (tmp / "binning.xml").write_text(BINNING_XML)
    rng = np.random.default_rng(0)
    incident = 2.0 ** rng.integers(10, 14, 300)
    showers = rng.gamma(2.0, 1.0, (300, 14)) * incident[:, None] / 28.0
    write_showers(tmp / "train.h5", incident, showers.astype(np.float32))
    train_run(tmp / "train.h5", tmp / "binning.xml", tmp / "run", model_overrides=TINY,
              training=TrainingConfig(epochs=2, batch_size=64, num_threads=1, patience=0))
    return tmp


def _refine(tmp, method, out=None, base_dir=None, classifier="trees"):
    out = out or tmp / f"refined-{method}-{classifier}"
    if not out.exists():
        assert main(["-q", "refine", str(base_dir or tmp / "run"), "--data", str(tmp / "train.h5"), "--out", str(out),
                     "--method", method, "--classifier", classifier, "--threads", "1"]) == 0
    return out


def test_latent_round_trip(base):
    model = load_run(base / "run").model
    assert model.latent_blocks() == ("layer_energies", "latent")
    latent_cols, rest_cols = model.latent_columns()
    # two layers + latent_dim; the voxel noise: two normals per voxel (spot count and spot energies)
    assert model.latent_size() == 2 + 2 and len(rest_cols) == 2 * model.n_voxels == 28
    torch.manual_seed(3)
    incident = torch.full((50,), 4096.0)
    normal, uniform = model.noise_shape().draw(50)
    with torch.no_grad():
        expected = model.sample_from_noise(incident, normal, uniform)
        again = model.showers_from_latent(incident, normal[:, latent_cols], normal[:, rest_cols], uniform)
    assert torch.equal(again, expected)


@pytest.mark.parametrize(("method", "classifier"), [("reweight", "trees"), ("refiner", "trees"), ("hmc", "trees"),
                                                    ("reweight", "mlp")])
def test_refine_then_generate(base, method, classifier, capsys):
    refined = _refine(base, method, classifier=classifier)
    assert "ESS fraction" in capsys.readouterr().out
    config = json.loads((refined / "config.json").read_text())
    assert config["kind"] == "refined" and config["method"] == method
    assert config["settings"]["dctr"] == classifier
    assert 0 < config["report"]["weights"]["ess_fraction"] <= 1
    assert sorted(p.name for p in refined.iterdir()) == ["config.json", "refinement.safetensors"]
    loaded = load_run(refined)
    assert isinstance(loaded.model, RefinedModel) and loaded.refinement["method"] == method
    assert loaded.model.classifier == classifier
    out = base / f"gen-{method}-{classifier}.h5"
    assert main(["-q", "generate", str(refined), "--energy", "4096", "--count", "40", "--out", str(out)]) == 0
    with ShowerFile(out) as f:
        weights = f.read_weights()
        assert f.n_showers == 40
    if method == "reweight":
        assert weights is not None and weights.shape == (40,) and (weights > 0).all()
    else:
        assert weights is None
    if method == "reweight":  # the stored classifier, reloaded, gives the weights generate wrote
        with ShowerFile(out) as f:
            incident, showers = f.read()
        features = shower_features(classifier, loaded.model.base, torch.as_tensor(incident), torch.as_tensor(showers))
        assert np.allclose(loaded.model.ratio.weight(features).numpy(), weights, rtol=1e-5)
    if method == "hmc":
        assert 0 < loaded.model.hmc.burn_in and 0 <= config["report"]["hmc_trial"]["acceptance_rate"] <= 1


def test_tree_weights_are_cross_fitted_at_refine_time(base):
    config = json.loads((_refine(base, "reweight") / "config.json").read_text())
    assert config["report"]["classifier_history"]["cross_fitted"] is True
    assert len(config["report"]["classifier_history"]["iterations"]) == config["settings"]["trees"]["n_folds"]


def test_a_run_refined_before_the_tree_classifier_loads_as_mlp(base, tmp_path):
    refined = tmp_path / "old"
    shutil.copytree(_refine(base, "reweight", classifier="mlp"), refined)
    config = json.loads((refined / "config.json").read_text())
    del config["settings"]["dctr"], config["settings"]["trees"]
    (refined / "config.json").write_text(json.dumps(config))
    assert load_run(refined).model.classifier == "mlp"


def test_refiner_noise_replaces_the_latent_blocks(base):
    model = load_run(_refine(base, "refiner")).model
    names = [(b.name, b.distribution) for b in model.noise_shape().blocks]
    assert names == [("refiner", "normal"), ("voxels", "normal"), ("voxels", "uniform"), ("spot_energies", "normal")]
    incident = torch.full((20,), 2048.0)
    normal, uniform = model.noise_shape().draw(20)
    with torch.no_grad():
        assert torch.equal(model.sample_from_noise(incident, normal, uniform),
                           model.sample_from_noise(incident, normal, uniform))


def test_refined_run_refuses_a_changed_or_missing_base(base, tmp_path):
    shutil.copytree(base / "run", tmp_path / "here" / "run")
    refined = _refine(base, "reweight", out=tmp_path / "here" / "refined", base_dir=tmp_path / "here" / "run")
    shutil.copytree(tmp_path / "here", tmp_path / "moved")
    weights = tmp_path / "here" / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(RunDirectoryError, match="changed since refinement"):
        load_run(refined)
    # moved together with its base: found by the path relative to the refined run
    assert isinstance(load_run(tmp_path / "moved" / "refined").model, RefinedModel)
    shutil.rmtree(tmp_path / "moved" / "run")
    shutil.rmtree(tmp_path / "here" / "run")
    with pytest.raises(RunDirectoryError, match="base run is gone"):
        load_run(tmp_path / "moved" / "refined")


def test_failed_refine_leaves_nothing(base, tmp_path):
    out = tmp_path / "refined"
    assert main(["-q", "refine", str(base / "run"), "--data", str(tmp_path / "missing.h5"), "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.iterdir())


def test_evaluate_with_and_without_weights(base, capsys):
    refined = _refine(base, "reweight")
    gen = base / "gen-eval.h5"
    assert main(["-q", "generate", str(refined), "--energies-from", str(base / "train.h5"), "--out", str(gen)]) == 0
    args = ["-q", "evaluate", "--generated", str(gen), "--reference", str(base / "train.h5"), "--binning",
            str(base / "binning.xml"), "--no-plots", "--no-distances"]
    assert main([*args, "--out", str(base / "ev-w"), "--weights", "--classifier", "none"]) == 0
    assert main([*args, "--out", str(base / "ev"), "--classifier", "none"]) == 0
    weighted = json.loads((base / "ev-w" / "metrics.json").read_text())
    plain = json.loads((base / "ev" / "metrics.json").read_text())
    assert weighted["weights"]["n"] == 300 and plain["weights"] is None
    assert weighted["separation_power"] != plain["separation_power"]
    unweighted = base / "gen-refiner-eval.h5"
    assert main(["-q", "generate", str(_refine(base, "refiner")), "--energy", "4096", "--count", "30",
                 "--out", str(unweighted)]) == 0
    capsys.readouterr()
    assert main([*args[:2], "--generated", str(unweighted), *args[4:], "--out", str(base / "ev-u"),
                 "--classifier", "none", "--weights"]) == 2
    assert "no 'weights' dataset" in capsys.readouterr().err


def test_weighted_histogram():
    hist, total = normalised_histogram(np.array([0.5, 1.5, 1.5]), np.array([0.0, 1.0, 2.0]), np.array([3.0, 0.5, 0.5]))
    assert np.allclose(hist, [0.75, 0.25]) and total == 4.0


def test_weighted_strong_test_ignores_showers_of_weight_zero(base):
    from caloman.geometry import load_binning
    from caloman.metrics.strong import StrongClassifierSettings, run_strong_test

    binning = load_binning(base / "binning.xml")
    with ShowerFile(base / "train.h5") as f:
        incident, showers = f.read()
    half = len(incident) // 2
    reference = (incident[:half], showers[:half])
    # generated: the other half of the same distribution, plus as many showers with three times the energy
    generated = (np.concatenate([incident[half:], incident[half:]]),
                 np.concatenate([showers[half:], 3 * showers[half:]]))
    weights = np.concatenate([np.ones(len(incident) - half), np.zeros(len(incident) - half)])
    settings = StrongClassifierSettings(max_iter=20, max_threads=1, max_showers_per_class=None)
    plain = run_strong_test("low", reference, generated, binning, settings, seed=0)
    weighted = run_strong_test("low", reference, generated, binning, settings, seed=0, generated_weights=weights)
    assert plain.auc > 0.7 and abs(weighted.auc - 0.5) < 0.15


def test_benchmark_times_a_refined_run_with_its_weights_and_its_base(base, monkeypatch):
    from caloman.benchmark import BenchmarkConfig, render_markdown, time_loaded

    loaded = load_run(_refine(base, "reweight"))
    calls = []
    weights = loaded.model.shower_weights
    monkeypatch.setattr(loaded.model, "shower_weights", lambda e, x: calls.append(len(e)) or weights(e, x))
    config = BenchmarkConfig(batch_sizes=(1, 50), threads=1, min_seconds=0.0, reference_sampler=False, onnx=False)
    timings, base_timings = time_loaded(loaded, np.full(60, 4096.0), config)
    assert [t.batch_size for t in timings] == [t.batch_size for t in base_timings] == [1, 50]
    assert 1 in calls and 50 in calls  # the timed refined calls computed the weights
    assert time_loaded(load_run(base / "run"), np.full(60, 4096.0), config)[1] == []  # a plain run has no base row
    as_dicts = [{"batch_size": b, "device": "cpu", "ms_per_shower": ms, "calls": 3, "threads": 1}
                for b, ms in ((1, 3.0), (50, 0.2))]
    report = {"config": {"profile": "quick", "threads": 1, "batch_sizes": [1, 50], "classifier": "none"},
              "machine": {"torch": "2", "cpu": "cpu"}, "date": "2026", "caloman_version": "0", "command": "c",
              "data": {"n_reference": 60}, "reference_sampler": [],
              "models": [{"model": "caloman", "parameters": 1, "training_seconds": None, "training_peak_rss_mib": None,
                          "timings": [{**t, "ms_per_shower": 1.5 * t["ms_per_shower"]} for t in as_dicts],
                          "base_timings": as_dicts, "evaluation": {}}]}
    md = render_markdown(report)
    assert "| caloman: its base run | 3.0000 | 0.2000 |" in md and "| caloman | 1.50 | 1.50 |" in md
