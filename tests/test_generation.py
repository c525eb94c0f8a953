"""Generation: chunks, seeds, energy range, output checks, files, and the CLI end to end
(with the dummy model substituted for caloman.models.build_model)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import caloman.cli.train as cli_train
import caloman.runs
from caloman.cli import main
from caloman.errors import ConfigError, EnergyRangeError, InvalidEnergyError
from caloman.generation import (
    check_energy_range,
    fixed_incident_energy,
    format_energy,
    generate,
    generate_to_file,
    incident_energies_from,
    incident_energies_from_file,
    parse_energy,
)
from caloman.io import ShowerFile, write_showers
from caloman.runs import load_run, save_run
from caloman.training import TrainingHistory
from test_training import DummyModel, dummy_factory, fresh_model, small_config, tiny_binning, toy_showers

torch.set_num_threads(1)


def ranged_model(low=256.0, high=4.194304e6, n_voxels=6):
    model = fresh_model(n_voxels=n_voxels)
    model.energy_range.copy_(torch.tensor([low, high]))
    return model


def test_chunks_shapes_and_non_negative():
    model = ranged_model()
    energies = np.geomspace(256, 4e6, 25)
    chunks = list(generate(model, energies, batch_size=10, seed=3))
    assert [c.shape for c in chunks] == [(10, 6), (10, 6), (5, 6)]
    showers = np.concatenate(chunks)
    assert showers.dtype == np.float32 and np.isfinite(showers).all() and (showers >= 0).all()


def test_a_batch_above_the_value_bound_is_sampled_in_pieces_with_their_own_noise(monkeypatch):
    model = ranged_model()
    energies = torch.full((20,), 1e4)
    monkeypatch.setattr("caloman.models.base.SAMPLE_VALUES", 7 * model.n_voxels)  # pieces of 7 showers
    torch.manual_seed(4)
    with torch.inference_mode():
        whole = model.sample(energies)
        torch.manual_seed(4)
        pieces = torch.cat([model._sample_piece(energies[i:i + 7]) for i in (0, 7, 14)])
    assert whole.shape == (20, 6) and torch.equal(whole, pieces)
    assert not torch.equal(whole[:6], whole[7:13])


def test_seeded_and_leaves_global_rng_alone():
    model = ranged_model()
    energies = np.full(12, 1e4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = np.concatenate(list(generate(model, energies, batch_size=5, seed=1)))
    assert torch.equal(torch.get_rng_state(), before)
    b = np.concatenate(list(generate(model, energies, batch_size=5, seed=1)))
    c = np.concatenate(list(generate(model, energies, batch_size=5, seed=2)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a[:5], a[5:10])  # chunks get different streams


def test_energy_outside_range_is_refused_with_advice():
    model = ranged_model()
    with pytest.raises(EnergyRangeError) as info:
        generate(model, np.full(3, 1e7), batch_size=2, seed=0)  # raised at the call, not at first next()
    assert str(info.value) == ("model trained on 256 MeV..4.19 TeV; asked for 10 TeV; "
                               "pass --allow-extrapolation to generate anyway")
    with pytest.raises(EnergyRangeError, match="2 of 3 energies between 100 MeV and 10 TeV"):
        check_energy_range(model, np.array([100.0, 1e4, 1e7]))
    check_energy_range(model, np.array([256.0, 4.194304e6]) * np.array([0.995, 1.005]))  # 1% slack
    with pytest.raises(EnergyRangeError):
        check_energy_range(model, np.array([256.0 * 0.985]))


def test_extrapolation_warns_and_generates(caplog):
    model = ranged_model()
    with caplog.at_level(logging.WARNING, logger="caloman"):
        showers = np.concatenate(list(generate(model, np.full(3, 1e7), batch_size=2, seed=0, energy_policy="warn")))
    assert showers.shape == (3, 6)
    assert any("extrapolating" in r.getMessage() and "10 TeV" in r.getMessage() for r in caplog.records)


def test_untrained_model_has_no_range():
    with pytest.raises(EnergyRangeError, match="no trained energy range"):
        check_energy_range(fresh_model(), np.array([1e3]))


@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN or infinite"), (-1.0, "negative")])
def test_broken_model_output_is_caught(bad, kind):
    class Broken(DummyModel):
        def sample(self, incident_energies):
            out = torch.ones(len(incident_energies), self.n_voxels)
            if incident_energies[0] > 15:  # only the second chunk goes wrong
                out[1, 2] = bad
            return out

    model = Broken(6)
    model.energy_range.copy_(torch.tensor([1.0, 1e6]))
    with pytest.raises(InvalidEnergyError, match=f"{kind} voxel energies \\(shower 4,"):
        list(generate(model, np.array([10.0, 10, 10, 20, 20, 20]), batch_size=3, seed=0))


def test_energy_parsing_and_formatting():
    assert parse_energy("65536") == 65536.0
    assert parse_energy("65.5 GeV") == pytest.approx(65500.0)
    assert parse_energy("1TeV") == 1e6 and parse_energy("500 keV") == 0.5
    for bad in ("-3", "0", "ten GeV", "3 eV", "nan"):
        with pytest.raises(InvalidEnergyError):
            parse_energy(bad)
    assert format_energy(256) == "256 MeV" and format_energy(4.194304e6) == "4.19 TeV"
    assert format_energy(65536) == "65.5 GeV" and format_energy(0.5) == "500 keV"


def test_incident_energies_from(tmp_path):
    e, x = toy_showers(n=7)
    write_showers(tmp_path / "ref.h5", e, x)
    assert incident_energies_from_file(tmp_path / "ref.h5") == pytest.approx(e.astype(np.float32))
    assert len(incident_energies_from(reference=tmp_path / "ref.h5", count=3)) == 3
    assert np.array_equal(incident_energies_from(energy="2 GeV", count=4), np.full(4, 2000.0))
    assert np.array_equal(fixed_incident_energy(10, 2), [10.0, 10.0])
    with pytest.raises(ConfigError):
        incident_energies_from(reference=tmp_path / "ref.h5", energy=1.0, count=1)
    with pytest.raises(ConfigError, match="--count"):
        incident_energies_from(energy=1.0)
    with pytest.raises(InvalidEnergyError, match="--count"):
        fixed_incident_energy(1.0, 0)


def _saved_run(tmp_path):
    binning = tiny_binning(tmp_path)
    model = ranged_model(low=1e3, high=1e5)
    save_run(tmp_path / "run", model, binning, small_config(), TrainingHistory(), command_line=[])
    return load_run(tmp_path / "run", factory=dummy_factory)


def test_generate_to_file(tmp_path):
    loaded = _saved_run(tmp_path)
    energies = np.geomspace(1e3, 1e5, 9)
    out = generate_to_file(loaded, tmp_path / "gen.h5", energies, batch_size=4, seed=5)
    with ShowerFile(out, loaded.binning) as f:
        assert f.n_showers == 9 and f.n_voxels == 6
        assert f.incident_energies == pytest.approx(energies, rel=1e-6)
        _, showers = f.read()
    expected = np.concatenate(list(generate(loaded.model, energies, batch_size=4, seed=5)))
    assert np.array_equal(showers, expected)


def test_generate_to_file_refuses_before_writing(tmp_path):
    loaded = _saved_run(tmp_path)
    with pytest.raises(EnergyRangeError):
        generate_to_file(loaded, tmp_path / "gen.h5", np.array([1e3, 1e7]), batch_size=4, seed=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny-binning.xml"]
    generate_to_file(loaded, tmp_path / "gen.h5", np.array([1e3, 1e7]), batch_size=4, seed=5, energy_policy="warn")
    assert (tmp_path / "gen.h5").exists()


# -- CLI end to end ----------------------------------------------------------
@pytest.fixture
def dummy_models(monkeypatch):
    """Route the CLI's model building to the dummy model (the real models are not needed here)."""
    def build(kind, binning, *, profile, overrides):
        assert kind == "dummy" and profile == "quick"
        return DummyModel(binning.n_voxels, **(overrides or {}))

    monkeypatch.setattr(cli_train, "build_model", build)
    monkeypatch.setattr(cli_train, "default_model_factory", dummy_factory)
    monkeypatch.setattr(caloman.runs, "default_model_factory", dummy_factory)


def test_cli_train_resume_generate(tmp_path, dummy_models, caplog):
    binning = tiny_binning(tmp_path)
    e, x = toy_showers(n=40)
    write_showers(tmp_path / "train.h5", e, x)
    (tmp_path / "cfg.toml").write_text("[model]\nhidden = 4\n[training]\nepochs = 2\nbatch_size = 8\n"
                                       "num_threads = 1\n")
    args = ["-q", "train", str(tmp_path / "train.h5"), "--binning", str(binning.source), "--model", "dummy",
            "--out", str(tmp_path / "run"), "--config", str(tmp_path / "cfg.toml"), "--seed", "4",
            "--max-showers", "30"]
    with caplog.at_level(logging.INFO, logger="caloman"):
        assert main(args) == 0
    assert any(r.getMessage().startswith("voxels: 2 epochs") for r in caplog.records)
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["model"] == {"kind": "dummy", "config": {"n_voxels": 6, "hidden": 4}}
    assert config["training"]["seed"] == 4 and config["training"]["max_showers"] == 30
    assert config["data"]["n_showers"] == 30 and config["command_line"]

    assert main(args) == 2  # the run exists: refuse to overwrite
    resume = args[:9] + ["--resume"]
    assert main(resume) == 0  # a finished run resumes to a rewrite
    assert main(resume + ["--seed", "5"]) == 2  # --resume keeps stored settings

    out = tmp_path / "gen.h5"
    assert main(["-q", "generate", str(tmp_path / "run"), "--energy", "10 GeV", "--count", "5",
                 "--out", str(out), "--seed", "1"]) == 0
    with ShowerFile(out) as f:
        assert f.n_showers == 5 and np.allclose(f.incident_energies, 1e4)
    assert main(["-q", "generate", str(tmp_path / "run"), "--energy", "1TeV", "--count", "5",
                 "--out", str(tmp_path / "far.h5")]) == 2
    assert not (tmp_path / "far.h5").exists()
    assert main(["-q", "generate", str(tmp_path / "run"), "--energies-from", str(tmp_path / "train.h5"),
                 "--out", str(tmp_path / "ref.h5"), "--allow-extrapolation", "--batch-size", "7"]) == 0
    with ShowerFile(tmp_path / "ref.h5") as f:
        assert f.n_showers == 40


def write_caloman_toy(tmp_path, *, n, batch_size, extra_training=""):
    """``train.h5``: n gamma-distributed dataset-1 photon showers, 256 MeV..4 TeV;
    ``cfg.toml``: tiny CaloMan networks, one epoch. Returns the incident energies (n,)."""
    rng = np.random.default_rng(0)
    e = np.exp(rng.uniform(np.log(256), np.log(4e6), n))
    x = rng.gamma(0.3, 1.0, (n, 368)) * (rng.uniform(size=(n, 368)) < 0.4)
    x = (x * (0.9 * e / np.maximum(x.sum(axis=1), 1e-3))[:, None]).astype(np.float32)
    write_showers(tmp_path / "train.h5", e, x, binning="ds1-photons")
    (tmp_path / "cfg.toml").write_text(
        "[model]\nhidden = [16]\nflow_hidden = [8]\nlayer_flow_hidden = [8]\n"
        f"[training]\nepochs = 1\nbatch_size = {batch_size}\nnum_threads = 1\n{extra_training}")
    return e


def test_cli_with_the_caloman_model(tmp_path):
    """The real --model caloman, tiny networks, one epoch per stage: train, then generate."""
    pytest.importorskip("caloman.models.caloman")
    write_caloman_toy(tmp_path, n=200, batch_size=64)
    run = tmp_path / "run"
    assert main(["-q", "train", str(tmp_path / "train.h5"), "--binning", "ds1-photons", "--model", "caloman",
                 "--out", str(run), "--config", str(tmp_path / "cfg.toml"), "--latent-dim", "3"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["kind"] == "caloman" and config["model"]["config"]["latent_dim"] == 3
    assert main(["-q", "generate", str(run), "--energies-from", str(tmp_path / "train.h5"), "--count", "20",
                 "--out", str(tmp_path / "gen.h5")]) == 0
    with ShowerFile(tmp_path / "gen.h5", "ds1-photons") as f:
        assert f.n_showers == 20


def test_cli_train_latent_dim_from_dimension_json(tmp_path):
    """`caloman train --latent-dim-from dimension.json` uses the estimate's recommended dimension."""
    from caloman.dimension import DimensionEstimate

    rng = np.random.default_rng(1)
    n = 120
    e = np.exp(rng.uniform(np.log(256), np.log(4e6), n))
    x = (rng.gamma(0.3, 1.0, (n, 368)) * (0.01 * e[:, None])).astype(np.float32)
    write_showers(tmp_path / "train.h5", e, x, binning="ds1-photons")
    estimate = DimensionEstimate(k_values=(5, 10, 20), estimates={"preprocessed": np.array([6.0, 4.4, 3.0])},
                                 n_points={"preprocessed": n})
    (tmp_path / "dimension.json").write_text(estimate.to_json())
    (tmp_path / "cfg.toml").write_text(
        "[model]\nhidden = [16]\nflow_hidden = [8]\nlayer_flow_hidden = [8]\n"
        "[training]\nepochs = 1\nbatch_size = 64\nnum_threads = 1\n")
    run = tmp_path / "run"
    assert main(["-q", "train", str(tmp_path / "train.h5"), "--binning", "ds1-photons", "--out", str(run),
                 "--config", str(tmp_path / "cfg.toml"), "--latent-dim-from", str(tmp_path / "dimension.json")]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["config"]["latent_dim"] == 4  # d at k = 10, rounded
    assert main(["-q", "train", str(tmp_path / "train.h5"), "--binning", "ds1-photons", "--out",
                 str(tmp_path / "run2"), "--latent-dim-from", str(tmp_path / "absent.json")]) == 2


def test_cli_train_model_profile_sets_the_size_apart_from_the_budget(tmp_path):
    """`--model-profile paper` builds the kind's paper configuration under the quick training budget;
    an unknown model profile is a usage error that writes nothing."""
    rng = np.random.default_rng(2)
    n = 120
    e = np.exp(rng.uniform(np.log(256), np.log(4e6), n))
    x = (rng.gamma(0.3, 1.0, (n, 368)) * (0.01 * e[:, None])).astype(np.float32)
    write_showers(tmp_path / "train.h5", e, x, binning="ds1-photons")
    (tmp_path / "cfg.toml").write_text(
        "[model]\nhidden = [16]\nflow_hidden = [8]\nlayer_flow_hidden = [8]\nlatent_dim = 3\n"
        "[training]\nepochs = 1\nbatch_size = 64\nnum_threads = 1\n")
    base = ["-q", "train", str(tmp_path / "train.h5"), "--binning", "ds1-photons", "--model", "caloman"]
    run = tmp_path / "run"
    assert main(base + ["--out", str(run), "--config", str(tmp_path / "cfg.toml"), "--model-profile", "paper"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["config"]["preprocessing"] == "paper"  # the paper profile's, not quick's
    assert config["training"]["epochs"] == 1 and config["training"]["max_showers"] == 20_000  # quick budget
    assert main(base + ["--out", str(run), "--resume", "--model-profile", "quick"]) == 2  # stored settings only
    assert main(base + ["--out", str(tmp_path / "run2"), "--model-profile", "huge"]) == 2
    assert not (tmp_path / "run2").exists()
