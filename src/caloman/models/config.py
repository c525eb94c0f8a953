"""Typed configuration shared by every model kind.

Each model's configuration is a frozen dataclass deriving from
:class:`ModelConfig`, which gives it the named profiles (``quick``, ``full``
and any extra ones listed in ``profiles``), construction from a JSON or TOML
table with type checks, and a JSON-able dict.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import numpy as np

from caloman.errors import ConfigError


class ModelConfig:
    """Mixin for a model's frozen config dataclass.

    Subclasses set ``label`` (the model kind, for messages), list their named
    configurations in ``profiles`` and implement one classmethod per profile.
    """

    label: ClassVar[str] = "model"
    profiles: ClassVar[tuple[str, ...]] = ("quick", "full")

    @classmethod
    def profile(cls, name: str) -> Any:
        """The named configuration (``quick``, ``full``, ...)."""
        if name not in cls.profiles:
            raise ConfigError(f"unknown model profile {name!r}; choose one of {', '.join(cls.profiles)}")
        return getattr(cls, name)()

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: Any = None) -> Any:
        """``base`` (default: the defaults) with ``values`` replacing its fields."""
        return config_from_dict(cls, values, base, cls.label)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def config_from_dict(cls: type, values: dict[str, Any], base: Any, label: str) -> Any:
    """``base`` (default: ``cls()``) with ``values`` replacing its fields, type-checked against
    the defaults; lists become tuples (JSON and TOML have no tuples). Unknown keys raise
    ConfigError naming the valid ones."""
    base = base if base is not None else cls()
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {label} model option(s) {', '.join(unknown)}; valid options: {', '.join(names)}")
    converted = {}
    for key, value in values.items():
        default = getattr(base, key)
        if isinstance(default, tuple):
            if not isinstance(value, list | tuple) or not all(isinstance(v, int | np.integer) for v in value):
                raise ConfigError(f"model option {key} must be a list of layer sizes, got {value!r}")
            value = tuple(int(v) for v in value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"model option {key} must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ConfigError(f"model option {key} must be an integer, got {value!r}")
            value = int(value)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                raise ConfigError(f"model option {key} must be a number, got {value!r}")
            value = float(value)
        converted[key] = value
    return dataclasses.replace(base, **converted)


def parse_options(cls: type, options: list[str], label: str) -> dict[str, Any]:
    """Command-line ``KEY=VALUE`` strings (``caloman train --model-option``) as a dict of
    typed values for the fields of config dataclass ``cls``: ints, floats, ``true`` /
    ``false``, strings as written, layer sizes as ``512,512``. Raises ConfigError for a
    string without ``=``, an unknown key (naming the valid ones), a key given twice, or a
    value that does not parse as its field's type. Ranges and choices are checked when
    the config is built."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for option in options:
        key, sep, text = option.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"model option {option!r} is not KEY=VALUE (e.g. latent_dim=16)")
        if key not in names:
            raise ConfigError(f"unknown {label} model option {key!r}; valid options: {', '.join(names)}")
        if key in values:
            raise ConfigError(f"model option {key} is given twice")
        values[key] = _parse_value(key, text, hints[key])
    return values


def _parse_value(key: str, text: str, tp: Any) -> Any:
    """``text`` as a value of field type ``tp`` (str, int, float, bool or tuple[int, ...])."""
    try:
        if tp is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if typing.get_origin(tp) is tuple:
            return tuple(int(part) for part in text.split(",") if part.strip())
        if tp is str:
            return text
    except ValueError:
        pass
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, "comma-separated layer sizes such as 512,512")
    raise ConfigError(f"model option {key} must be {expected}, got {text!r}")


def check_flow_sizes(config: Any, transforms: tuple[str, ...], bins: tuple[str, ...], hidden: tuple[str, ...]) -> None:
    """ConfigError unless the named fields are >= 1 transforms, >= 2 bins, positive layer sizes."""
    for name in transforms:
        if int(getattr(config, name)) < 1:
            raise ConfigError(f"model option {name} must be at least 1, got {getattr(config, name)}")
    for name in bins:
        if int(getattr(config, name)) < 2:
            raise ConfigError(f"model option {name} must be at least 2, got {getattr(config, name)}")
    for name in hidden:
        sizes = getattr(config, name)
        if not sizes or any(int(s) < 1 for s in sizes):
            raise ConfigError(f"model option {name} must list positive layer sizes, got {sizes!r}")
