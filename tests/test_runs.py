"""Run directories: save, load, and every way a run directory can be broken."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import caloman
from caloman.errors import RunDirectoryError
from caloman.runs import (
    CONFIG_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    load_run,
    make_run_config,
    read_run_config,
    save_run,
    write_run_config,
)
from caloman.training import train_model
from test_training import DummyModel, dummy_factory, fresh_model, small_config, tiny_binning, toy_showers

torch.set_num_threads(1)


@pytest.fixture
def trained_run(tmp_path):
    """A finished run of the dummy model on a tiny custom binning (6 voxels)."""
    binning = tiny_binning(tmp_path)
    e, x = toy_showers()
    data = tmp_path / "data.h5"
    data.write_bytes(b"stand-in for the training file")
    cfg = small_config(epochs=2)
    model = fresh_model()
    run = tmp_path / "run"
    run_config = make_run_config(model, binning, cfg, data_path=data, n_showers=len(e), command_line=["caloman", "x"])
    write_run_config(run, run_config)
    history = train_model(model, e, x, cfg, run)
    save_run(run, model, binning, cfg, history, run_config=run_config)
    return run, model, history


def test_round_trip(trained_run):
    run, model, history = trained_run
    loaded = load_run(run, factory=dummy_factory)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert not loaded.model.training
    assert loaded.history == history
    config = loaded.config
    assert config.model_kind == "dummy" and config.model_config == {"n_voxels": 6, "hidden": 8}
    assert config.training == small_config(epochs=2) and config.seed == 1
    assert config.binning_name == "tiny-binning" and config.n_voxels == 6 == loaded.binning.n_voxels
    assert config.caloman_version == caloman.__version__ and config.torch_version == torch.__version__
    assert config.numpy_version == np.__version__
    assert config.data.size_bytes == len(b"stand-in for the training file") and config.data.n_showers == 60
    assert config.command_line == ["caloman", "x"] and config.finished
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", CONFIG_FILE, HISTORY_FILE, MODEL_FILE]
    assert json.loads((run / CONFIG_FILE).read_text())["seed"] == 1


def test_missing_config_json(trained_run):
    run, *_ = trained_run
    (run / CONFIG_FILE).unlink()
    with pytest.raises(RunDirectoryError, match=r"config\.json is missing.*re-train"):
        load_run(run, factory=dummy_factory)


def test_missing_run_directory(tmp_path):
    with pytest.raises(RunDirectoryError, match="no such run directory"):
        load_run(tmp_path / "nowhere", factory=dummy_factory)


def test_config_json_not_json(trained_run):
    run, *_ = trained_run
    (run / CONFIG_FILE).write_text('{"format": "caloman-run/1", ')
    with pytest.raises(RunDirectoryError, match="not valid JSON"):
        load_run(run, factory=dummy_factory)


def test_truncated_weights(trained_run):
    run, *_ = trained_run
    data = (run / MODEL_FILE).read_bytes()
    (run / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirectoryError, match=r"model\.safetensors.*corrupt.*--resume"):
        load_run(run, factory=dummy_factory)


def test_unreadable_weights_with_matching_checksum(trained_run):
    run, *_ = trained_run
    (run / MODEL_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    d = json.loads((run / CONFIG_FILE).read_text())
    from caloman.training import sha256_file

    d["files"][MODEL_FILE] = sha256_file(run / MODEL_FILE)
    (run / CONFIG_FILE).write_text(json.dumps(d))
    with pytest.raises(RunDirectoryError, match="not a readable safetensors file"):
        load_run(run, factory=dummy_factory)


def test_missing_weights_points_to_resume(trained_run):
    run, *_ = trained_run
    (run / MODEL_FILE).unlink()
    with pytest.raises(RunDirectoryError, match=r"model\.safetensors.*missing.*caloman train .* --resume"):
        load_run(run, factory=dummy_factory)


def test_weights_not_matching_config_shapes(trained_run):
    run, *_ = trained_run
    d = json.loads((run / CONFIG_FILE).read_text())
    d["model"]["config"]["hidden"] = 5
    (run / CONFIG_FILE).write_text(json.dumps(d))
    with pytest.raises(RunDirectoryError, match=r"mlp\.0\.weight: file \(8, 1\), model \(5, 1\)"):
        load_run(run, factory=dummy_factory)


def test_weights_of_another_model(trained_run):
    class Other(DummyModel):
        def __init__(self, n_voxels, hidden):
            super().__init__(n_voxels, hidden)
            self.extra = torch.nn.Linear(2, 2)

    run, *_ = trained_run
    with pytest.raises(RunDirectoryError, match=r"missing extra\.weight"):
        load_run(run, factory=lambda kind, cfg, binning: Other(**cfg))


def test_history_edited_or_missing(trained_run):
    run, *_ = trained_run
    (run / HISTORY_FILE).write_text((run / HISTORY_FILE).read_text().replace("voxels", "voxelz"))
    with pytest.raises(RunDirectoryError, match=r"history\.json does not match its checksum"):
        load_run(run, factory=dummy_factory)
    (run / HISTORY_FILE).unlink()
    with pytest.raises(RunDirectoryError, match=r"history\.json is missing"):
        load_run(run, factory=dummy_factory)


def test_unfinished_run(tmp_path):
    binning = tiny_binning(tmp_path)
    model = fresh_model()
    write_run_config(tmp_path / "run", make_run_config(model, binning, small_config()))
    assert not read_run_config(tmp_path / "run").finished
    with pytest.raises(RunDirectoryError, match="has not finished"):
        load_run(tmp_path / "run", factory=dummy_factory)


def test_binning_file_gone(trained_run, tmp_path):
    run, *_ = trained_run
    (tmp_path / "tiny-binning.xml").unlink()
    with pytest.raises(RunDirectoryError, match="binning cannot be loaded"):
        load_run(run, factory=dummy_factory)


def test_save_leaves_no_temporary_files(trained_run):
    run, *_ = trained_run
    leftovers = [p.name for p in run.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_builtin_binning_round_trip(tmp_path):
    from caloman.geometry import load_binning

    binning = load_binning("ds1-photons")
    model = DummyModel(binning.n_voxels)
    rng = np.random.default_rng(0)
    model.fit_preprocessing(rng.uniform(1e3, 1e4, 10), rng.uniform(0, 1, (10, binning.n_voxels)))
    from caloman.training import TrainingHistory

    save_run(tmp_path / "run", model, binning, small_config(), TrainingHistory(), command_line=[])
    loaded = load_run(tmp_path / "run", factory=dummy_factory)
    assert loaded.binning is binning  # the packaged binning, by name
    assert loaded.model.trained_energy_range() == model.trained_energy_range()
