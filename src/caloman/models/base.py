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

Sampling is a deterministic map from explicit noise to showers,
:meth:`ShowerModel.sample_from_noise`, with the noise it needs described by
:meth:`ShowerModel.noise_shape`; :meth:`ShowerModel.sample` draws that noise
and applies the map. Export (:mod:`caloman.export`) and anything else that must
reproduce or steer a sample outside torch's generator use the map directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from caloman.errors import ConfigError

#: A re-iterable source of showers: each call starts a new pass over (incident energies (n,),
#: showers (n, n_voxels)) chunks in MeV (numpy arrays for preprocessing, tensors for stages).
ArrayChunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
TensorChunks = Callable[[], Iterator[tuple[Tensor, Tensor]]]
#: Most voxel values (showers x voxels) :meth:`ShowerModel.sample` generates at once; larger
#: batches go in pieces (noise and work arrays of a piece: a few GB).
SAMPLE_VALUES = 2**25


@dataclass
class Stage:
    """One separately trained part of a model.

    ``make_data(incident_energies, showers)`` maps physical inputs, incident
    energies (n,) and showers (n, n_voxels) in MeV as float32 tensors, to the
    tuple of tensors the stage trains on (first dimension n). In memory it is called
    once for the training split first and then for the validation split, after
    all earlier stages are trained, under ``torch.no_grad()`` with the model in
    eval mode; it must depend only on earlier stages (resuming calls it again),
    and a model may fit constants on its first (training-split) call.
    ``loss(batch)`` returns the mean loss of a batch (a tuple sliced from those
    tensors) as a scalar tensor. Only ``module``'s parameters
    are optimised in this stage.

    ``begin_epoch(epoch)``, when set, is called with the 0-based epoch before each
    training epoch (also when resuming), for a stage whose epochs alternate between
    phases (the M-flow's M/D schedule); ``loss`` then follows the phase in training mode
    and gives one comparable validation loss in eval mode. Most stages leave it None.

    ``compact``: the stage's tensors are a few numbers per shower (a flow on layer energies
    or on codes). Streamed training then builds them once, chunk by chunk, and holds them
    for all epochs as in memory (n x a few floats: 35 MB for 100,000 showers with 87
    numbers each), instead of reading and encoding the file again every epoch.

    Streamed training (``TrainingConfig.stream_chunk_showers``) never holds a split's
    tensors at once: ``make_data`` is called per chunk of showers, every epoch (validation
    chunks with a fixed seed). A stage with constants to fit sets ``fit(chunks)``, called
    once before the stage's first epoch (not when resuming mid-stage), under
    ``torch.no_grad()`` in eval mode, with ``chunks()`` yielding the training split as
    (incident energies (n,), showers (n, n_voxels)) float32 tensors in MeV, a new pass per
    call: it fits what the first ``make_data`` call fits in memory (from sums, or a seeded
    subsample, in memory that does not grow with the number of showers) and leaves the
    model so that ``make_data`` fits nothing more.
    """

    name: str
    module: nn.Module
    make_data: Callable[[Tensor, Tensor], tuple[Tensor, ...]]
    loss: Callable[[tuple[Tensor, ...]], Tensor]
    begin_epoch: Callable[[int], None] | None = None
    fit: Callable[[TensorChunks], None] | None = None
    compact: bool = False


@dataclass(frozen=True)
class NoiseBlock:
    """A named run of the noise one shower consumes: ``size`` numbers, standard normal
    (``"normal"``) or uniform on [0, 1) (``"uniform"``)."""

    name: str
    size: int
    distribution: Literal["normal", "uniform"] = "normal"


@dataclass(frozen=True)
class NoiseShape:
    """The noise one shower needs, as consecutive blocks: the normal blocks in order
    form the ``normal`` tensor of :meth:`ShowerModel.sample_from_noise`, the uniform
    blocks its ``uniform`` tensor."""

    blocks: tuple[NoiseBlock, ...]

    def _size(self, distribution: str) -> int:
        return sum(b.size for b in self.blocks if b.distribution == distribution)

    @property
    def normal(self) -> int:
        """Standard-normal numbers per shower."""
        return self._size("normal")

    @property
    def uniform(self) -> int:
        """Uniform numbers per shower (0 for a model driven by normal noise alone)."""
        return self._size("uniform")

    def offsets(self, distribution: Literal["normal", "uniform"] = "normal") -> dict[str, slice]:
        """Block name -> its columns in the ``normal`` (or ``uniform``) tensor."""
        slices, start = {}, 0
        for block in self.blocks:
            if block.distribution == distribution:
                slices[block.name] = slice(start, start + block.size)
                start += block.size
        return slices

    def draw(self, n: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
             ) -> tuple[Tensor, Tensor]:
        """Noise for n showers from torch's global generator: normal (n, normal) and
        uniform (n, uniform)."""
        normal = torch.randn(n, self.normal, device=device, dtype=dtype)
        return normal, torch.rand(n, self.uniform, device=device, dtype=dtype)


class ShowerModel(nn.Module, ABC):
    """Base class of generative shower models.

    Subclasses set ``kind`` (the ``--model`` name), take one frozen config
    dataclass (with ``to_dict()``, as :class:`caloman.models.config.ModelConfig`
    gives) and a binning, pass both to ``super().__init__``, and implement the
    methods below. The base keeps ``config``, ``binning``, ``n_voxels`` and the
    binning's readout ``threshold`` (MeV).
    """

    kind: ClassVar[str]
    #: True for a weighted generator, whose :meth:`shower_weights` returns one weight per shower
    weighted: bool = False

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

    def fit_preprocessing_chunks(self, chunks: ArrayChunks) -> None:
        """:meth:`fit_preprocessing` from the training showers chunk by chunk (``chunks()``:
        one pass, numpy (n,), (n, n_voxels) in MeV), for streamed training; a model that
        can fit its constants so (sums, extremes, a seeded subsample) overrides this."""
        raise ConfigError(f"model kind '{self.kind}' cannot train streamed (its preprocessing needs every shower at "
                          "once); set stream_chunk_showers = 0 (--stream-chunk-showers 0) to train in memory")

    @abstractmethod
    def stages(self) -> list[Stage]:
        """The training stages, in the order they are trained."""

    @abstractmethod
    def noise_shape(self) -> NoiseShape:
        """The noise one shower consumes in :meth:`sample_from_noise`."""

    @abstractmethod
    def sample_from_noise(self, incident_energies: Tensor, normal: Tensor, uniform: Tensor | None = None) -> Tensor:
        """Showers (n, n_voxels) in MeV, non-negative, for incident energies (n,) in MeV,
        as a deterministic function of the noise: ``normal`` (n, noise_shape().normal)
        standard-normal and ``uniform`` (n, noise_shape().uniform) uniform numbers on
        [0, 1) (None when the shape has none). The same noise gives the same showers;
        traceable (no data-dependent Python control flow when ``torch.jit.is_tracing()``)
        so that :mod:`caloman.export` can record it as a static graph."""

    def sample(self, incident_energies: Tensor) -> Tensor:
        """Generate showers (n, n_voxels) in MeV, non-negative, for incident
        energies (n,) in MeV, with noise from torch's global generator (normal first,
        then uniform). Called under ``torch.inference_mode()``.

        A batch of more than ``SAMPLE_VALUES // n_voxels`` showers is generated in pieces
        of that many (each drawing its own noise), so memory stays bounded on large
        binnings: dataset 1 up to 91,000 showers in one piece, dataset 3 in pieces of 828
        (at 10,000 showers in one piece it needed more than 24 GB)."""
        piece = max(1, SAMPLE_VALUES // self.n_voxels)
        if len(incident_energies) <= piece:
            return self._sample_piece(incident_energies)
        first = self._sample_piece(incident_energies[:piece])
        out = first.new_empty((len(incident_energies),) + tuple(first.shape[1:]))
        out[:piece] = first
        del first
        for start in range(piece, len(incident_energies), piece):
            out[start:start + piece] = self._sample_piece(incident_energies[start:start + piece])
        return out

    def _sample_piece(self, incident_energies: Tensor) -> Tensor:
        dtype = next((p.dtype for p in self.parameters()), torch.float32)
        normal, uniform = self.noise_shape().draw(len(incident_energies), device=incident_energies.device,
                                                  dtype=dtype)
        return self.sample_from_noise(incident_energies, normal, uniform if uniform.shape[1] else None)

    # -- the refinable latent (LaSeR, :mod:`caloman.refinement`) -----------------------------
    def latent_blocks(self) -> tuple[str, ...]:
        """Names of the normal noise blocks that form the latent z a refinement may
        reshape (default: every normal block). The other blocks stay the path's own
        noise, drawn afresh for every shower."""
        return tuple(dict.fromkeys(b.name for b in self.noise_shape().blocks if b.distribution == "normal"))

    def latent_columns(self) -> tuple[list[int], list[int]]:
        """Columns of the ``normal`` noise tensor that hold the latent, and the rest."""
        offsets = self.noise_shape().offsets()
        unknown = set(self.latent_blocks()) - set(offsets)
        if unknown:
            raise ValueError(f"{type(self).__name__}.latent_blocks names no normal noise block: {sorted(unknown)}")
        latent = [i for name in self.latent_blocks() for i in range(*offsets[name].indices(10**12))]
        chosen = set(latent)
        return latent, [i for i in range(self.noise_shape().normal) if i not in chosen]

    def latent_size(self) -> int:
        """Numbers in one shower's latent z."""
        return len(self.latent_columns()[0])

    def sample_latent(self, n: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                      ) -> Tensor:
        """n latents (n, latent_size()) from the model's own prior, standard normal."""
        return torch.randn(n, self.latent_size(), device=device, dtype=dtype)

    def showers_from_latent(self, incident_energies: Tensor, latent: Tensor, normal_rest: Tensor | None = None,
                            uniform: Tensor | None = None) -> Tensor:
        """Showers (n, n_voxels) in MeV from latents (n, latent_size()): ``latent`` fills
        the latent blocks' columns of the normal noise, ``normal_rest`` (n, normal -
        latent_size()) the others and ``uniform`` the uniform noise; those two are drawn
        from torch's global generator when None. Then :meth:`sample_from_noise`."""
        shape = self.noise_shape()
        latent_cols, rest_cols = self.latent_columns()
        n = len(latent)
        parts = [latent]
        if rest_cols:
            parts.append(torch.randn(n, len(rest_cols), device=latent.device, dtype=latent.dtype)
                         if normal_rest is None else normal_rest.to(latent.dtype))
        # One concatenation and (when the latent is not the leading columns) one permutation, with no
        # batch size fixed in them: traceable for ONNX export (caloman.export) with a dynamic batch.
        normal = torch.cat(parts, dim=1) if rest_cols else latent
        source = latent_cols + rest_cols
        if source != list(range(len(source))):
            normal = normal.index_select(1, torch.as_tensor(source, device=latent.device).argsort())
        if uniform is None and shape.uniform:
            uniform = torch.rand(n, shape.uniform, device=latent.device, dtype=latent.dtype)
        return self.sample_from_noise(incident_energies, normal, uniform)

    def shower_weights(self, incident_energies: Tensor, showers: Tensor) -> Tensor | None:
        """One weight per generated shower (n,) for a weighted generator (``weighted``: a
        DCTR-reweighted run), or None for an unweighted one (every model but those)."""
        return None

    def latent_codes(self, incident_energies: Tensor, showers: Tensor) -> Tensor:
        """The codes (n, d) of showers (n, n_voxels) in MeV that the model's latent density is
        trained on, for diagnostics of the code space (:mod:`caloman.components`); a model with
        no code space raises ConfigError."""
        raise ConfigError(f"model kind {self.kind!r} has no latent codes (only CaloMan-type models do)")

    def export_refusal(self) -> str | None:
        """Why :meth:`sample_from_noise` cannot be recorded as a static graph (a sentence
        saying what to do instead), or None when it can."""
        return None

    def config_dict(self) -> dict[str, Any]:
        """JSON-able configuration sufficient to rebuild an untrained twin."""
        if self.config is None:
            raise NotImplementedError(f"{type(self).__name__} has no config: override config_dict")
        return self.config.to_dict()

    def trained_energy_range(self) -> tuple[float, float]:
        low, high = (float(v) for v in self.energy_range)
        return low, high
