"""Evaluation in bounded memory: classifier inputs and PRDC built from seeded sub-samples
while the files stream, with the same numbers as from whole arrays."""

import numpy as np
import pytest

import caloman.evaluation as evaluation
import caloman.metrics.strong as strong
from caloman.errors import ConfigError
from caloman.evaluation import EvaluationConfig, evaluate_arrays, evaluate_files
from caloman.features import apply_threshold
from caloman.geometry import load_binning
from caloman.io import write_showers
from caloman.metrics.classifier import run_classifier_test
from caloman.metrics.strong import StrongClassifierSettings, run_strong_test, strong_input_count, strong_rows

FAST = StrongClassifierSettings(max_iter=20)
LIGHT = dict(fpd_kpd=False, prdc=False, plots=False)


def _sample(n, seed):
    rng = np.random.default_rng(seed)
    incident = 2.0 ** rng.integers(8, 12, n)
    showers = rng.gamma(0.3, 1.0, (n, 368)) * (rng.random((n, 368)) < 0.3)
    return incident, (showers * incident[:, None] / 33.0).astype(np.float32)


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A reference and a generated file (different sizes), read 7 showers per chunk."""
    ref, gen = _sample(150, 1), _sample(130, 2)
    write_showers(tmp_path / "ref.h5", *ref)
    write_showers(tmp_path / "gen.h5", *gen)
    monkeypatch.setattr(evaluation, "default_chunk_size", lambda n_voxels: 7)
    return ref, gen, tmp_path


def _thresholded(data):
    return data[0].astype(np.float64), apply_threshold(data[1], 1.0)


def test_strong_inputs_built_chunk_by_chunk_give_the_whole_array_numbers(files, monkeypatch):
    ref, gen, tmp_path = files
    monkeypatch.setattr(strong, "StrongClassifierSettings", lambda: FAST)
    metrics = evaluate_files(tmp_path / "gen.h5", tmp_path / "ref.h5", "ds1-photons", tmp_path / "out",
                             EvaluationConfig(classifier="strong", seed=5, **LIGHT))
    binning = load_binning("ds1-photons")
    for kind in ("low", "low_normed", "high"):
        whole = run_strong_test(kind, _thresholded(ref), _thresholded(gen), binning, FAST, seed=5)
        entry = metrics["classifier"][kind]
        assert entry["auc"] == whole.auc and entry["jsd"] == whole.jsd
        assert entry["auc_per_energy"] == whole.auc_per_energy and entry["n_per_class"] == 130


def test_network_test_on_streamed_rows_gives_the_whole_array_numbers(files):
    ref, gen, tmp_path = files
    metrics = evaluate_files(tmp_path / "gen.h5", tmp_path / "ref.h5", "ds1-photons", tmp_path / "out",
                             EvaluationConfig(classifier="quick", seed=3, **LIGHT))
    whole = run_classifier_test("high", _thresholded(ref), _thresholded(gen), load_binning("ds1-photons"),
                                "quick", seed=3)
    assert metrics["classifier"]["high"]["auc"] == whole.auc
    assert metrics["classifier"]["high"]["best_epoch"] == whole.best_epoch
    assert metrics["classifier_showers_per_class"] == {"classifier": 130}


def test_classifier_sub_sample_is_capped_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr(strong, "StrongClassifierSettings", lambda: FAST)
    ref, gen = _sample(200, 3), _sample(200, 4)
    config = EvaluationConfig(classifier="strong", seed=7, classifier_max_showers=60, **LIGHT)
    first = evaluate_arrays(ref, gen, "ds1-photons", tmp_path / "a", config)
    second = evaluate_arrays(ref, gen, "ds1-photons", tmp_path / "b", config)
    assert first["classifier_showers_per_class"] == {f"classifier_{k}": 60 for k in ("low", "low_normed", "high")}
    assert all(entry["n_per_class"] == 60 for entry in first["classifier"].values())
    assert first["classifier"] == second["classifier"]
    assert first["config"]["classifier_max_showers"] == 60
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "classifier showers per class low 60, low_normed 60, high 60" in summary


def test_strong_rows_are_seeded_and_bounded_by_values():
    settings = StrongClassifierSettings(max_values_per_class=10_000)
    a, b = strong_rows(500, 400, 100, settings, seed=1), strong_rows(500, 400, 100, settings, seed=1)
    other = strong_rows(500, 400, 100, settings, seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    assert len(a[0]) == len(a[1]) == 100 and not np.array_equal(a[0], other[0])
    assert np.all(np.diff(a[0]) > 0) and a[1].max() < 400


def test_tree_bins_keep_the_histograms_of_dataset_3_bounded():
    settings = StrongClassifierSettings()
    assert settings.max_bins(strong_input_count("low", load_binning("ds1-photons"))) == 255
    n_inputs = strong_input_count("low", load_binning("ds3"))
    bins = settings.max_bins(n_inputs)
    assert 16 <= bins < 255
    assert settings.max_leaf_nodes * n_inputs * (bins + 1) * 20 <= settings.max_histogram_bytes


def test_prdc_sub_sample_is_bounded_by_values(tmp_path, monkeypatch):
    seen = {}

    def prdc(reference, generated, k, seed):
        seen["shapes"] = reference.shape, generated.shape
        return {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}

    import caloman.metrics.distances as distances
    monkeypatch.setattr(distances, "prdc", prdc)
    config = EvaluationConfig(classifier="none", fpd_kpd=False, plots=False, prdc_max_values=368 * 40)
    metrics = evaluate_arrays(_sample(100, 5), _sample(90, 6), "ds1-photons", tmp_path / "out", config)
    assert seen["shapes"] == ((40, 368), (40, 368))
    assert metrics["prdc"]["n_showers"] == {"reference": 40, "generated": 40}
    assert metrics["config"]["prdc_max_values"] == 368 * 40


@pytest.mark.parametrize("bad", [dict(classifier_max_showers=5), dict(classifier_max_values=0),
                                 dict(prdc_max_values=-1), dict(classifier_max_showers=2.5),
                                 dict(prdc_max_values=True)])
def test_bad_scale_settings_raise_config_error(bad):
    with pytest.raises(ConfigError):
        EvaluationConfig(**bad)


def test_bad_histogram_budget_raises_config_error():
    with pytest.raises(ConfigError, match="max_histogram_bytes"):
        StrongClassifierSettings(max_histogram_bytes=10)
