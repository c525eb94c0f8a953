"""TOML configuration files: tables, names, types, precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from caloman.config import ConfigFile, DataConfig, load_config, parse_config, training_config_from_dict
from caloman.errors import ConfigError
from caloman.models import model_config_from_dict
from caloman.training import TrainingConfig

FULL = """
[model]
latent_dim = 16
hidden = [512, 512]

[training]
epochs = 7
learning_rate = 1      # an integer is a fine number
lr_schedule = "plateau"
num_threads = 2
stage_epochs = { latent_flow = 80, autoencoder = 3 }
stage_patience = { autoencoder = 0 }

[data]
max_showers = 5000
"""


def write(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_full_file_into_typed_objects(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.model == {"latent_dim": 16, "hidden": [512, 512]}
    assert cfg.data == DataConfig(max_showers=5000)
    training = cfg.training_config("quick")
    assert isinstance(training, TrainingConfig)
    assert training.epochs == 7 and training.learning_rate == 1.0 and isinstance(training.learning_rate, float)
    assert training.lr_schedule == "plateau" and training.num_threads == 2 and training.max_showers == 5000
    assert training.epochs_for("latent_flow") == 80 and training.epochs_for("other") == 7
    assert training.patience_for("autoencoder") == 0 and training.patience_for("other") == training.patience
    # untouched fields come from the profile; options override the file
    assert training.patience == TrainingConfig.quick().patience
    assert cfg.training_config("full").patience == TrainingConfig.full().patience
    assert cfg.training_config("quick", epochs=2, seed=9).epochs == 2


def test_empty_file_is_the_profile(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.training_config("full") == TrainingConfig.full()
    assert ConfigFile(source="defaults").training_config() == TrainingConfig.quick()


def test_unknown_table_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown .*optimiser.*\[model\], \[training\], \[data\]"):
        load_config(write(tmp_path, "[optimiser]\nlr = 1\n"))


def test_unknown_training_key_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) epoch in \[training\]; valid keys are epochs, "
                                          r"batch_size, learning_rate"):
        load_config(write(tmp_path, "[training]\nepoch = 3\n"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) showers in \[data\]; valid keys are max_showers"):
        load_config(write(tmp_path, "[data]\nshowers = 3\n"))


@pytest.mark.parametrize("line, message", [
    ("epochs = 2.5", "epochs must be an integer, got 2.5"),
    ("epochs = true", "epochs must be an integer"),
    ("learning_rate = '1e-3'", "learning_rate must be a number"),
    ("max_showers = 'all'", "max_showers must be an integer or absent"),
    ("stage_epochs = { flow = 'x' }", "stage_epochs must be a table with an integer per entry"),
    ("lr_schedule = 'step'", "lr_schedule must be one of cosine, plateau, constant"),
    ("validation_fraction = 0", "validation_fraction must lie in"),
])
def test_bad_values(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, f"[training]\n{line}\n"))


def test_table_shapes_and_syntax(tmp_path):
    with pytest.raises(ConfigError, match="'training' must be a table"):
        load_config(write(tmp_path, "training = 3\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[training\nepochs = 3\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="both"):
        parse_config({"training": {"max_showers": 10}, "data": {"max_showers": 20}})


def test_training_config_from_dict_round_trip():
    cfg = TrainingConfig.full(stage_epochs={"a": 3})
    assert training_config_from_dict(cfg.to_dict()) == cfg
    # the per-stage early-stopping patience, as the per-stage epochs
    longer = TrainingConfig.full(stage_epochs={"autoencoder": 160}, stage_patience={"autoencoder": 0})
    assert (longer.epochs_for("autoencoder"), longer.patience_for("autoencoder")) == (160, 0)
    assert (longer.epochs_for("latent_flow"), longer.patience_for("latent_flow")) == (80, 10)
    assert training_config_from_dict(longer.to_dict()) == longer
    with pytest.raises(ConfigError, match="stage_patience"):
        TrainingConfig(stage_patience={"a": -1})
    with pytest.raises(ConfigError, match="unknown key"):
        training_config_from_dict({**cfg.to_dict(), "momentum": 0.9})


def test_the_shipped_dataset_3_configuration_is_a_valid_streamed_full_profile():
    path = Path(__file__).resolve().parents[1] / "configs" / "ds3-full.toml"
    training = load_config(path).training_config("full")
    assert training.stream_chunk_showers >= training.batch_size and training.stream_cache
    assert training.epochs_for("autoencoder") < training.epochs and training.patience_for("autoencoder") > 0


def test_the_shipped_dataset_2_configuration_chains_layer_energies_from_the_back():
    configs = Path(__file__).resolve().parents[1] / "configs"
    model = model_config_from_dict("caloman", load_config(configs / "ds2-full.toml").model, profile="full")
    assert model.layer_energy_order == "back" and model.preprocessing == "per-layer"
    ds3 = model_config_from_dict("caloman", load_config(configs / "ds3-full.toml").model, profile="full")
    assert ds3.layer_energy_order == "front"  # measured worse overall on dataset 3
    assert model_config_from_dict("caloman", {}, profile="full").layer_energy_order == "front"  # dataset 1's
    with pytest.raises(ConfigError, match="layer_energy_order"):
        model_config_from_dict("caloman", {"layer_energy_order": "middle"})
    with pytest.raises(ConfigError, match="layer_energy_order orders the per-layer"):
        model_config_from_dict("caloman", {"preprocessing": "paper", "reconstruction_loss": "mse",
                                           "layer_energy_order": "back"})
