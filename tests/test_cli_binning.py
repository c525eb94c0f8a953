"""`--binning` may be left out: the shipped binning is inferred from a shower file's voxel count
(caloman evaluate, train and dimension), with one shared helper and one typed error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import caloman.cli.train as cli_train
import caloman.runs
from caloman.cli import build_parser, main, resolve_binning
from caloman.errors import VoxelCountError
from caloman.io import write_showers
from test_training import DummyModel, dummy_factory, toy_showers

torch.set_num_threads(1)

KNOWN = "368 (ds1-photons), 533 (ds1-pions), 6480 (ds2), 40500 (ds3)"


def _shower_file(path, n_voxels=368, n=120, seed=0):
    rng = np.random.default_rng(seed)
    incident = 2.0 ** rng.integers(8, 12, n)
    showers = rng.gamma(0.5, 1.0, (n, n_voxels)) * (rng.random((n, n_voxels)) < 0.5) * incident[:, None] / n_voxels
    return write_showers(path, incident, showers.astype(np.float32))


def _assert_unknown_count(capsys, command):
    err = capsys.readouterr().err
    assert f"caloman {command}: error:" in err and "14 voxels matches no shipped binning" in err
    assert KNOWN in err and "pass --binning" in err


# -- the shared helper -----------------------------------------------------------
def test_resolve_binning_keeps_an_explicit_binning_without_reading_the_file(tmp_path, capsys):
    assert resolve_binning("ds2", tmp_path / "absent.h5") == "ds2"
    assert resolve_binning(str(tmp_path / "my.xml"), tmp_path / "absent.h5") == str(tmp_path / "my.xml")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("n_voxels", "name"), [(368, "ds1-photons"), (533, "ds1-pions")])
def test_resolve_binning_infers_and_says_so(tmp_path, capsys, n_voxels, name):
    path = _shower_file(tmp_path / "f.h5", n_voxels=n_voxels, n=4)
    assert resolve_binning(None, path) == name
    assert capsys.readouterr().err.strip() == f"binning: {name} (inferred from {n_voxels} voxels in {path})"


def test_resolve_binning_unknown_count_is_a_voxel_count_error(tmp_path):
    path = _shower_file(tmp_path / "odd.h5", n_voxels=14, n=4)
    with pytest.raises(VoxelCountError) as exc:
        resolve_binning(None, path)
    message = str(exc.value)
    assert message.startswith(f"{path}: cannot infer the binning: 14 voxels") and KNOWN in message
    assert "pass --binning" in message


@pytest.mark.parametrize("argv", [["evaluate", "--generated", "g.h5", "--reference", "r.h5", "--out", "o"],
                                  ["train", "f.h5", "--out", "run"],
                                  ["dimension", "f.h5", "--out", "d"],
                                  ["benchmark", "--data", "f.h5", "--reference", "r.h5"]])
def test_binning_is_optional_in_every_command_that_reads_a_shower_file(argv):
    assert build_parser().parse_args(argv).binning is None
    assert build_parser().parse_args([*argv, "--binning", "ds3"]).binning == "ds3"


# -- caloman evaluate --------------------------------------------------------------
FAST = ["--classifier", "none", "--no-plots", "--no-distances"]


def test_evaluate_infers_the_binning_from_the_reference(tmp_path, capsys):
    ref = _shower_file(tmp_path / "ref.h5", seed=0)
    gen = _shower_file(tmp_path / "gen.h5", seed=1)
    out = tmp_path / "o"
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert f"binning: ds1-photons (inferred from 368 voxels in {ref})" in captured.err
    assert "evaluated 120 generated against 120 reference showers (ds1-photons)" in captured.out
    assert json.loads((out / "metrics.json").read_text())["binning"] == "ds1-photons"


def test_evaluate_generated_with_another_voxel_count_keeps_the_mismatch_error(tmp_path, capsys):
    ref = _shower_file(tmp_path / "ref.h5")
    gen = _shower_file(tmp_path / "gen.h5", n_voxels=533, n=10)
    out = tmp_path / "o"
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--out", str(out), *FAST]) == 2
    assert f"{gen}: expected 368 voxels from ds1-photons.xml, file has 533" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_unknown_voxel_count_exits_2_and_writes_nothing(tmp_path, capsys):
    ref = _shower_file(tmp_path / "ref.h5", n_voxels=14, n=10)
    out = tmp_path / "o"
    assert main(["evaluate", "--generated", str(ref), "--reference", str(ref), "--out", str(out), *FAST]) == 2
    _assert_unknown_count(capsys, "evaluate")
    assert not out.exists()


# -- caloman dimension -------------------------------------------------------------
def test_dimension_infers_the_binning(tmp_path, capsys):
    path = _shower_file(tmp_path / "s.h5")
    out = tmp_path / "d"
    assert main(["-q", "dimension", str(path), "--k", "2..5", "--no-preprocessed", "--out", str(out)]) == 0
    assert f"binning: ds1-photons (inferred from 368 voxels in {path})" in capsys.readouterr().err
    assert json.loads((out / "dimension.json").read_text())["config"]["binning"] == "ds1-photons"


def test_dimension_unknown_voxel_count_exits_2_and_writes_nothing(tmp_path, capsys):
    path = _shower_file(tmp_path / "s.h5", n_voxels=14, n=10)
    out = tmp_path / "d"
    assert main(["-q", "dimension", str(path), "--k", "2..5", "--out", str(out)]) == 2
    _assert_unknown_count(capsys, "dimension")
    assert not out.exists()


# -- caloman train (the dummy model stands in for the real ones) ---------------------
@pytest.fixture
def dummy_models(monkeypatch):
    def build(kind, binning, *, profile, overrides):
        assert kind == "dummy"
        return DummyModel(binning.n_voxels, **(overrides or {}))

    monkeypatch.setattr(cli_train, "build_model", build)
    monkeypatch.setattr(cli_train, "default_model_factory", dummy_factory)
    monkeypatch.setattr(caloman.runs, "default_model_factory", dummy_factory)


def _train_dummy(tmp_path, n_voxels: int, n: int):
    """A one-epoch dummy-model run in tmp_path/run on n toy showers; returns (data file, run)."""
    e, x = toy_showers(n=n, n_voxels=n_voxels)
    data = write_showers(tmp_path / "train.h5", e, x)
    (tmp_path / "cfg.toml").write_text("[model]\nhidden = 2\n[training]\nepochs = 1\nbatch_size = 8\n"
                                       "num_threads = 1\n")
    run = tmp_path / "run"
    args = ["-q", "train", str(data), "--model", "dummy", "--out", str(run), "--config", str(tmp_path / "cfg.toml")]
    assert main(args) == 0
    return data, run


def test_train_infers_the_binning_and_resumes_with_the_runs_own(tmp_path, capsys, dummy_models):
    data, run = _train_dummy(tmp_path, 368, 24)
    assert f"binning: ds1-photons (inferred from 368 voxels in {data})" in capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["config"]["n_voxels"] == 368 and "ds1-photons" in json.dumps(config)

    assert main(["-q", "train", str(data), "--model", "dummy", "--out", str(run), "--resume"]) == 0
    assert f"binning: ds1-photons (stored in {run / 'config.json'})" in capsys.readouterr().err
    assert main(["-q", "train", str(data), "--binning", "ds2", "--out", str(run), "--resume"]) == 2
    assert "was trained with binning ds1-photons" in capsys.readouterr().err


def test_benchmark_takes_the_binning_from_the_reference_or_the_run(tmp_path, capsys, dummy_models):
    """`caloman benchmark --run` on a dataset-2 run must not read its files as dataset 1."""
    from caloman.cli.benchmark import _binning

    data, run = _train_dummy(tmp_path, 6480, 16)
    parse = build_parser().parse_args
    assert _binning(parse(["benchmark", "--run", str(run)])) == "ds2"
    assert _binning(parse(["benchmark", "--run", str(run), "--data", str(data), "--reference", str(data)])) == "ds2"
    assert f"binning: ds2 (inferred from 6480 voxels in {data})" in capsys.readouterr().err
    assert _binning(parse(["benchmark", "--binning", "ds3", "--run", str(run)])) == "ds3"
    assert _binning(parse(["benchmark"])) == "ds1-photons"


def test_train_unknown_voxel_count_exits_2_and_writes_nothing(tmp_path, capsys, dummy_models):
    e, x = toy_showers(n=10, n_voxels=14)
    data = write_showers(tmp_path / "train.h5", e, x)
    run = tmp_path / "run"
    assert main(["-q", "train", str(data), "--model", "dummy", "--out", str(run)]) == 2
    _assert_unknown_count(capsys, "train")
    assert not run.exists()


def test_write_report_writes_both_files_at_once_and_nothing_on_failure(tmp_path, capsys):
    """The report writer that `components` and `ood` share: STEM.json and STEM.md together, echoed."""
    import caloman.cli as cli

    cli.write_report(tmp_path / "out", "ood", {"auroc": 0.5}, "| a |\n")
    assert json.loads((tmp_path / "out" / "ood.json").read_text()) == {"auroc": 0.5}
    assert (tmp_path / "out" / "ood.md").read_text() == "| a |\n"
    assert capsys.readouterr().out.startswith("| a |\nwrote ")
    with pytest.raises(TypeError):  # a report json cannot write leaves no folder behind
        cli.write_report(tmp_path / "failed", "ood", {"x": object()}, "text")
    assert not (tmp_path / "failed").exists()
