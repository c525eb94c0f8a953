"""Typed configuration shared by every model kind.

Each model's configuration is a frozen dataclass deriving from
:class:`ModelConfig`, which gives it the named profiles (``quick``, ``full``
and any extra ones listed in ``profiles``), construction from a JSON or TOML
table with type checks, and a JSON-able dict.
"""

from __future__ import annotations

import dataclasses
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
