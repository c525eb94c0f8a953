import json
import math
import sys
import types

import numpy as np
import pytest

from caloman.errors import ConfigError, VoxelCountError
from caloman.evaluation import EvaluationConfig, evaluate_arrays, evaluate_files
from caloman.features import apply_threshold, compute_features, high_level_vector
from caloman.io import write_showers
from caloman.metrics import ClassifierResult, classifier

OFF = dict(classifier="none", fpd_kpd=False, prdc=False, plots=False)


def _sample(n, seed, scale=1.0, v=368):
    rng = np.random.default_rng(seed)
    incident = 2.0 ** rng.integers(8, 15, n)
    showers = rng.gamma(0.3, 1.0, (n, v)) * (rng.random((n, v)) < 0.3)
    showers *= scale * incident[:, None] / (0.09 * v)
    return incident, showers.astype(np.float32)


def test_self_evaluation_is_exactly_zero_and_writes_both_files(tmp_path):
    data = _sample(200, 0)
    metrics = evaluate_arrays(reference=data, generated=data, binning="ds1-photons", out_dir=tmp_path / "out",
                              config=EvaluationConfig(**OFF))
    separation = metrics["separation_power"]
    assert {"E_tot/E_inc", "E_layer_12", "EC_eta_layer_2", "width_r_layer_0", "sparsity_layer_3",
            "voxel_energy", "E_tot/E_inc_E_256"} <= set(separation)
    assert all(value == 0.0 for value in separation.values())
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == metrics
    assert on_disk["n_showers"] == {"reference": 200, "generated": 200}
    assert on_disk["config"]["classifier"] == "none" and on_disk["seed"] == 42
    assert set(on_disk["versions"]) >= {"caloman", "numpy", "torch"}
    assert on_disk["classifier"] == {} and on_disk["fpd"] is None
    assert "x 1e3" in on_disk["units"]["fpd"]
    assert {"reference_features", "generated_features", "total"} <= set(on_disk["timings"])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| `E_tot/E_inc` | 0.0000 |" in summary and "classifier setting `none`" in summary
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temporary files


def test_files_and_arrays_agree_and_differences_are_seen(tmp_path):
    ref, gen = _sample(300, 1), _sample(250, 2, scale=1.2)
    write_showers(tmp_path / "ref.h5", *ref)
    write_showers(tmp_path / "gen.h5", *gen)
    from_files = evaluate_files(tmp_path / "gen.h5", tmp_path / "ref.h5", "ds1-photons", tmp_path / "a",
                                EvaluationConfig(**OFF))
    from_arrays = evaluate_arrays(ref, gen, "ds1-photons", tmp_path / "b", EvaluationConfig(**OFF))
    assert from_files["separation_power"] == from_arrays["separation_power"]
    assert from_files["files"]["reference"].endswith("ref.h5")
    assert from_arrays["files"] == {"reference": None, "generated": None}
    # a 20% energy scale shift must show in E_tot / E_inc
    assert from_files["separation_power"]["E_tot/E_inc"] > 0.2


def test_voxel_energy_histogram_of_streamed_files_is_the_challenge_one(tmp_path):
    ref, gen = _sample(120, 3), _sample(90, 4, scale=0.8)
    write_showers(tmp_path / "ref.h5", *ref)
    write_showers(tmp_path / "gen.h5", *gen)
    metrics = evaluate_files(tmp_path / "gen.h5", tmp_path / "ref.h5", "ds1-photons", tmp_path / "out",
                             EvaluationConfig(**OFF))
    r, g = apply_threshold(ref[1], 1.0), apply_threshold(gen[1], 1.0)
    edges = np.logspace(np.log10(1.0), np.log10(r.max()), 50)
    hr = np.histogram(r.ravel(), edges)[0]
    hg = np.histogram(g.ravel(), edges)[0]
    hr, hg = hr / hr.sum(), hg / hg.sum()
    expected = 0.5 * np.sum((hr - hg) ** 2 / (hr + hg + 1e-16))
    assert metrics["separation_power"]["voxel_energy"] == pytest.approx(expected, rel=1e-12)


def test_max_showers_is_a_seeded_random_subset(tmp_path):
    ref, gen = _sample(300, 5), _sample(300, 6)
    one = evaluate_arrays(ref, gen, "ds1-photons", tmp_path / "1", EvaluationConfig(**OFF, max_showers=100))
    two = evaluate_arrays(ref, gen, "ds1-photons", tmp_path / "2", EvaluationConfig(**OFF, max_showers=100))
    other = evaluate_arrays(ref, gen, "ds1-photons", tmp_path / "3", EvaluationConfig(**OFF, max_showers=100, seed=1))
    assert one["n_showers"] == {"reference": 100, "generated": 100}
    assert one["n_showers_available"] == {"reference": 300, "generated": 300}
    assert one["separation_power"] == two["separation_power"]
    assert one["separation_power"] != other["separation_power"]


def test_config_and_input_errors_are_typed(tmp_path):
    with pytest.raises(ConfigError, match="classifier"):
        EvaluationConfig(classifier="fast")
    with pytest.raises(ConfigError, match="max_showers"):
        EvaluationConfig(max_showers=0)
    data = _sample(10, 0)
    with pytest.raises(VoxelCountError, match="368"):
        evaluate_arrays(data, (data[0], data[1][:, :300]), "ds1-photons", tmp_path, EvaluationConfig(**OFF))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="existing file"):
        evaluate_arrays(data, data, "ds1-photons", tmp_path / "file", EvaluationConfig(**OFF))


def test_classifier_and_distances_are_called_with_the_agreed_inputs(tmp_path, monkeypatch):
    calls = {}

    def run_classifier_test(kind, reference, generated, binning, setting, seed, preselected):
        calls.setdefault("classifier", []).append((kind, setting, seed, reference[1].min(), len(generated[0])))
        # only the classifier's rows reach it: equal classes, cut to the smaller sample
        assert preselected and reference[1].shape == (60, 368) and reference[0].shape == (60,)
        return ClassifierResult(kind=kind, auc=0.5 + 0.1 * len(calls["classifier"]), jsd=0.01, setting=setting,
                                fpr=np.array([0.0, 1.0]), tpr=np.array([0.0, 1.0]), best_epoch=3)

    def fpd(reference_features, generated_features, seed):
        calls["fpd"] = (reference_features, generated_features, seed)
        return 0.0012, 0.0003

    def kpd(reference_features, generated_features, seed):
        return -0.0001, 0.00005

    def prdc(reference, generated, k, seed):
        calls["prdc"] = (reference, generated, k)
        return {"precision": 0.9, "recall": 0.8, "density": 1.0, "coverage": 0.7}

    monkeypatch.setitem(sys.modules, "caloman.metrics.classifier",
                        types.SimpleNamespace(run_classifier_test=run_classifier_test,
                                              resolve_settings=classifier.resolve_settings,
                                              classifier_rows=classifier.classifier_rows))
    monkeypatch.setitem(sys.modules, "caloman.metrics.distances", types.SimpleNamespace(fpd=fpd, kpd=kpd, prdc=prdc))
    ref, gen = _sample(80, 7), _sample(60, 8)
    config = EvaluationConfig(classifier="quick", seed=3, plots=False, prdc_max_showers=50)
    metrics = evaluate_arrays(ref, gen, "ds1-photons", tmp_path, config)

    assert [c[0] for c in calls["classifier"]] == ["low", "low_normed", "high"]
    assert all(c[1] == "quick" and c[2] == 3 for c in calls["classifier"])
    assert calls["classifier"][0][3] == 0.0  # thresholded showers
    assert metrics["classifier"]["high"] == {"auc": pytest.approx(0.8), "jsd": 0.01, "setting": "quick",
                                             "best_epoch": 3}
    # FPD/KPD on the whole high-level vector (log10 E_inc included), reported x 1e3
    expected_vector = high_level_vector(compute_features(ref[0], apply_threshold(ref[1], 1.0), "ds1-photons"))
    np.testing.assert_allclose(calls["fpd"][0], expected_vector, rtol=1e-6)
    assert calls["fpd"][0].shape == (80, 30) and calls["fpd"][2] == 3
    assert metrics["fpd"] == {"value": pytest.approx(1.2), "error": pytest.approx(0.3)}
    assert metrics["kpd"]["value"] == pytest.approx(-0.1)
    # PRDC: log10 voxel energies, empty voxels at 0.1 MeV, at most prdc_max_showers showers
    reference_voxels, generated_voxels, k = calls["prdc"]
    assert reference_voxels.shape == (50, 368) and generated_voxels.shape == (50, 368) and k == 5
    assert reference_voxels.min() == pytest.approx(-1.0) and math.isfinite(reference_voxels.max())
    assert metrics["prdc"]["precision"] == 0.9
    summary = (tmp_path / "summary.md").read_text()
    assert "Setting: **quick**" in summary and "not comparable" in summary and "| FPD | 1.2000" in summary


def test_missing_optional_part_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "caloman.metrics.classifier", None)
    data = _sample(20, 0)
    with pytest.raises(ConfigError, match="classifier none"):
        evaluate_arrays(data, data, "ds1-photons", tmp_path, EvaluationConfig(**{**OFF, "classifier": "quick"}))
