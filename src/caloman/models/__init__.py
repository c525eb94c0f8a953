"""Generative shower models behind one contract (:mod:`caloman.models.base`).

Each model kind registers a config class (a frozen dataclass with ``profile``,
``from_dict`` and ``to_dict``) and a model class taking ``(config, binning)``
in :data:`_REGISTRY`. Adding a kind ("caloflow", "ambient-flow") means adding
one entry there; :func:`build_model` and :func:`model_config_from_dict` then
serve it unchanged.
"""

from __future__ import annotations

from typing import Any

from caloman.errors import ConfigError
from caloman.geometry import Binning, load_binning
from caloman.models.ambient import AmbientFlowConfig, AmbientFlowModel
from caloman.models.base import ShowerModel, Stage
from caloman.models.caloflow import CaloFlowConfig, CaloFlowModel
from caloman.models.caloman import CaloManConfig, CaloManModel
from caloman.models.config import parse_options

#: kind -> (config class, model class).
_REGISTRY: dict[str, tuple[type, type[ShowerModel]]] = {
    "caloman": (CaloManConfig, CaloManModel),
    "caloflow": (CaloFlowConfig, CaloFlowModel),
    "ambient-flow": (AmbientFlowConfig, AmbientFlowModel),
}

#: Model kinds accepted by ``--model`` and :func:`build_model`.
MODEL_KINDS = tuple(_REGISTRY)


def _entry(kind: str) -> tuple[type, type[ShowerModel]]:
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    return _REGISTRY[kind]


def model_config_from_dict(kind: str, values: dict[str, Any], *, profile: str | None = None) -> Any:
    """The config of a ``kind`` model with ``values`` (e.g. a saved run's
    ``config_dict()`` or a TOML [model] table) replacing the fields of ``profile``
    (default: the config class's defaults). Unknown keys raise ConfigError naming
    the valid ones; lists become tuples."""
    config_class, _ = _entry(kind)
    base = config_class.profile(profile) if profile is not None else None
    return config_class.from_dict(dict(values), base=base)


def parse_model_options(kind: str, options: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``caloman train --model-option``) as typed overrides of a
    ``kind`` model's config fields; ConfigError for unknown keys (listing the valid ones)
    and values that do not parse as their field's type."""
    config_class, _ = _entry(kind)
    return parse_options(config_class, options, kind)


def build_model(kind: str, binning: Binning | str, *, profile: str = "quick",
                overrides: dict[str, Any] | None = None) -> ShowerModel:
    """An untrained model of ``kind`` for ``binning``: the ``profile`` configuration
    ("quick", "full", or a kind's own extra profiles) with ``overrides`` applied."""
    config_class, model_class = _entry(kind)
    config = model_config_from_dict(kind, overrides or {}, profile=profile)
    return model_class(config, load_binning(binning))


__all__ = ["MODEL_KINDS", "build_model", "model_config_from_dict", "parse_model_options", "ShowerModel", "Stage",
           "CaloManConfig", "CaloManModel", "CaloFlowConfig", "CaloFlowModel", "AmbientFlowConfig", "AmbientFlowModel"]
