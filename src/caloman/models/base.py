"""The contract every shower model follows, so training, checkpoints,
generation and benchmarks are written once for all models (CaloMan, CaloFlow,
ambient flow).

A model is a ``torch.nn.Module`` whose whole learned state, including fitted
preprocessing constants (as buffers), lives in ``state_dict()``: a run is
saved as safetensors weights plus JSON configuration, and loading never
unpickles anything. Training proceeds stage by stage (for CaloMan: the
layer-energy model, the autoencoder, then the latent flow); a later stage's
data may depend on earlier trained stages (the latent flow trains on codes from
the trained encoder), so a stage builds its tensors only when it starts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Stage:
    """One separately trained part of a model.

    ``make_data(incident_energies, showers)`` maps physical inputs, incident
    energies (n,) and showers (n, n_voxels) in MeV as float32 tensors, to the
    tuple of tensors the stage trains on (first dimension n). It is called once
    for the training split first and then for the validation split, after
    all earlier stages are trained, under ``torch.no_grad()`` with the model in
    eval mode; it must depend only on earlier stages (resuming calls it again),
    and a model may fit constants on its first (training-split) call.
    ``loss(batch)`` returns the mean loss of a batch (a tuple sliced from those
    tensors) as a scalar tensor. Only ``module``'s parameters
    are optimised in this stage.
    """

    name: str
    module: nn.Module
    make_data: Callable[[Tensor, Tensor], tuple[Tensor, ...]]
    loss: Callable[[tuple[Tensor, ...]], Tensor]


class ShowerModel(nn.Module, ABC):
    """Base class of generative shower models.

    Subclasses set ``kind`` (the ``--model`` name), take one frozen config
    dataclass (with ``to_dict()``, as :class:`caloman.models.config.ModelConfig`
    gives) and a binning, pass both to ``super().__init__``, and implement the
    methods below. The base keeps ``config``, ``binning``, ``n_voxels`` and the
    binning's readout ``threshold`` (MeV).
    """

    kind: ClassVar[str]

    def __init__(self, config: Any = None, binning: Any = None) -> None:
        super().__init__()
        self.config = config
        if binning is not None:
            self.binning = binning
            self.n_voxels = binning.n_voxels
            self.threshold = float(binning.readout_threshold)
        # Trained incident-energy range in MeV; generation refuses energies outside it.
        self.register_buffer("energy_range", torch.tensor([0.0, 0.0], dtype=torch.float64))

    @abstractmethod
    def fit_preprocessing(self, incident_energies: np.ndarray, showers: np.ndarray) -> None:
        """Fit preprocessing constants on training showers (n,), (n, n_voxels) in MeV.
        Must also set ``energy_range``."""

    @abstractmethod
    def stages(self) -> list[Stage]:
        """The training stages, in the order they are trained."""

    @abstractmethod
    def sample(self, incident_energies: Tensor) -> Tensor:
        """Generate showers (n, n_voxels) in MeV, non-negative, for incident
        energies (n,) in MeV. Called under ``torch.inference_mode()``."""

    def config_dict(self) -> dict[str, Any]:
        """JSON-able configuration sufficient to rebuild an untrained twin."""
        if self.config is None:
            raise NotImplementedError(f"{type(self).__name__} has no config: override config_dict")
        return self.config.to_dict()

    def trained_energy_range(self) -> tuple[float, float]:
        low, high = (float(v) for v in self.energy_range)
        return low, high
