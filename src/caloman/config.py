"""Configuration files for ``caloman train --config cfg.toml``.

A TOML file with up to three tables::

    [model]                  # overrides of the model's own config (names depend on --model)
    latent_dim = 16

    [training]               # fields of caloman.training.TrainingConfig
    epochs = 50
    learning_rate = 3e-4
    stage_epochs = { latent_flow = 80 }

    [data]
    max_showers = 50000

Unknown tables and unknown ``[training]`` / ``[data]`` keys are errors that
list the valid names; values are type-checked against the dataclass fields.
``[model]`` keys are checked by the model's config when the model is built.
Precedence in the CLI: profile defaults < config file < command-line options.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caloman.errors import ConfigError
from caloman.training import TrainingConfig

SECTIONS = ("model", "training", "data")


@dataclass(frozen=True)
class DataConfig:
    """Which showers of the input file are used."""

    #: train on a seeded random subset of max_showers showers of the file (None: all)
    max_showers: int | None = None


@dataclass(frozen=True)
class ConfigFile:
    """A parsed configuration file.

    ``model`` holds model-config overrides (checked when the model is built);
    ``training`` holds checked :class:`TrainingConfig` overrides, turned into a
    config by :meth:`training_config` on top of a profile.
    """

    source: str
    model: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = DataConfig()

    def training_config(self, profile: str = "quick", **overrides: Any) -> TrainingConfig:
        """The profile's TrainingConfig with this file's [training] and [data]
        settings, then ``overrides`` (e.g. from command-line options), applied."""
        values = dict(self.training)
        if self.data.max_showers is not None:
            values["max_showers"] = self.data.max_showers
        values.update(overrides)
        try:
            return TrainingConfig.profile(profile, **values)
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from exc


def load_config(path: str | Path) -> ConfigFile:
    """Read and check a TOML configuration file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc.strerror or exc})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return parse_config(data, source=str(path))


def parse_config(data: dict[str, Any], *, source: str = "config") -> ConfigFile:
    """Check an already parsed mapping with [model], [training] and [data] tables."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) or key(s) {', '.join(unknown)}; valid tables are "
                          f"{', '.join(f'[{s}]' for s in SECTIONS)}")
    for name in SECTIONS:
        if name in data and not isinstance(data[name], dict):
            raise ConfigError(f"{source}: '{name}' must be a table ([{name}]), got {type(data[name]).__name__}")
    training = checked_fields(TrainingConfig, data.get("training", {}), section="training", source=source)
    data_values = checked_fields(DataConfig, data.get("data", {}), section="data", source=source)
    if "max_showers" in training and "max_showers" in data_values:
        raise ConfigError(f"{source}: max_showers is set in both [training] and [data]; keep the one under [data]")
    if data_values.get("max_showers") is not None and data_values["max_showers"] < 2:
        raise ConfigError(f"{source}: [data] max_showers must be >= 2, got {data_values['max_showers']}")
    # validate values (ranges, schedule names) now rather than at training time
    try:
        TrainingConfig(**training)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return ConfigFile(source=source, model=dict(data.get("model", {})), training=training,
                      data=DataConfig(**data_values))


def training_config_from_dict(values: dict[str, Any], *, source: str = "training config") -> TrainingConfig:
    """A TrainingConfig from a complete or partial mapping (e.g. a run's config.json)."""
    checked = checked_fields(TrainingConfig, values, section="training", source=source)
    try:
        return TrainingConfig(**checked)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def checked_fields(cls: type, values: dict[str, Any], *, section: str, source: str) -> dict[str, Any]:
    """``values`` with names checked against the fields of dataclass ``cls`` and
    types against their annotations (ints accepted for floats)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} in [{section}]; valid keys are "
                          f"{', '.join(names)}")
    out = {}
    for key, value in values.items():
        try:
            out[key] = _coerce(value, hints[key])
        except TypeError as exc:
            raise ConfigError(f"{source}: [{section}] {key} must be {exc}, got {value!r} "
                              f"({type(value).__name__})") from None
    return out


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` or TypeError naming what was expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError(" or ".join(_describe(a) for a in args))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise TypeError(_describe(tp))
        try:
            return {_coerce(k, key_type): _coerce(v, value_type) for k, v in value.items()}
        except TypeError:
            raise TypeError(_describe(tp)) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(_describe(tp))
    raise TypeError(_describe(tp))


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "absent"
    if typing.get_origin(tp) is dict:
        key_type, value_type = typing.get_args(tp)
        return f"a table with {_describe(value_type)} per entry"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))
