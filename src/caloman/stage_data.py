"""A training stage's tensors, epoch by epoch: built once and kept (in memory), or built
chunk by chunk every epoch (streamed, ``TrainingConfig.stream_chunk_showers``).

Both give the training loop (:mod:`caloman.training`) the same thing: per epoch, a
sequence of (tensors of a chunk of training showers, the order of their rows this
epoch), and a sequence of validation tensors. In memory there is one chunk, the whole
split, built by ``Stage.make_data`` when the stage starts. Streamed, the training
positions are cut into chunks of ``stream_chunk_showers`` consecutive rows (consecutive
in the file, so a chunk is a few contiguous reads); every epoch visits the chunks in a
seeded random order and each chunk's rows in a seeded random order, building each
chunk's tensors just before training on it. Validation chunks are built with a seed of
their own (chunk and stage), so the validation loss of every epoch is measured on the
same tensors. Peak memory is one chunk's showers and tensors, whatever the number of
showers. A compact stage (``Stage.compact``: a few numbers per shower) is streamed once:
its tensors are built chunk by chunk when the stage starts and held, as in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from caloman.distributed import Distributed
from caloman.errors import ConfigError
from caloman.models.base import ShowerModel, Stage
from caloman.training_data import TrainingShowers, iter_chunks

#: Tensors of a chunk and the order of its rows in this epoch.
Chunk = tuple[tuple[Tensor, ...], Tensor]


class StageData:
    """The stage's tensors of one process; subclasses build them in memory or per chunk."""

    def __init__(self, model: ShowerModel, stage: Stage, data: TrainingShowers, device: torch.device) -> None:
        self.model, self.stage, self.data, self.device = model, stage, data, device

    def build(self, positions: np.ndarray) -> tuple[Tensor, ...]:
        """``stage.make_data`` of the rows ``positions`` (sorted), eval mode, no gradients."""
        e, x = self.data.read(positions)
        self.model.eval()
        with torch.no_grad():
            tensors = self.stage.make_data(torch.as_tensor(e, dtype=torch.float32, device=self.device),
                                           torch.as_tensor(x, dtype=torch.float32, device=self.device))
        check_stage_data(self.stage, tensors, len(positions))
        return tensors

    def n_batches(self, batch_size: int) -> int:
        """Training batches per epoch (each chunk ends with its own shorter batch)."""
        raise NotImplementedError

    def train_chunks(self, key: list[int]) -> Iterator[Chunk]:
        """One epoch's training chunks; ``key`` seeds the epoch's order."""
        raise NotImplementedError

    def val_chunks(self) -> Iterator[tuple[Tensor, ...]]:
        """The validation tensors, chunk by chunk, the same every epoch."""
        raise NotImplementedError


class HeldStageData(StageData):
    """Tensors held for the whole stage, ``self.train`` and ``self.val``: one chunk per epoch,
    the whole training split in the epoch's seeded order."""

    train: tuple[Tensor, ...]
    val: tuple[Tensor, ...]

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self.train[0]) // batch_size)

    def train_chunks(self, key: list[int]) -> Iterator[Chunk]:
        order = np.random.default_rng(key).permutation(len(self.train[0]))
        yield self.train, torch.as_tensor(order, device=self.train[0].device)

    def val_chunks(self) -> Iterator[tuple[Tensor, ...]]:
        yield self.val


class CachedStageData(HeldStageData):
    """Built once from all of the split (the in-memory training): the first ``make_data``
    call sees the whole training split and may fit the stage's constants there."""

    def __init__(self, model: ShowerModel, stage: Stage, data: TrainingShowers, device: torch.device,
                 distributed: Distributed | None) -> None:
        super().__init__(model, stage, data, device)
        self.train = self.build(data.train_idx)
        if distributed is not None and distributed.broadcast_buffers(model):
            # make_data fitted constants on this rank's share: take rank 0's and build again with them
            self.train = self.build(data.train_idx)
        self.val = self.build(data.val_idx)


class StreamedStageData(StageData):
    """Built per chunk of ``chunk_showers`` training (or validation) rows, every epoch.
    ``fit``: call ``stage.fit`` on the training chunks first (a stage's first epoch; a
    stage resumed mid-way has its constants from the checkpoint). ``val_seed`` seeds the
    validation chunks (chunk j: seeded with (val_seed, j))."""

    def __init__(self, model: ShowerModel, stage: Stage, data: TrainingShowers, device: torch.device,
                 distributed: Distributed | None, *, chunk_showers: int, fit: bool, val_seed: list[int]) -> None:
        super().__init__(model, stage, data, device)
        self.chunk_showers, self.val_seed = chunk_showers, val_seed
        if fit and stage.fit is not None:
            self.model.eval()
            with torch.no_grad():
                stage.fit(self._tensor_chunks)
        if distributed is not None:  # one model: rank 0's constants (fitted on its share)
            distributed.broadcast_buffers(model)

    def _tensor_chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        for e, x in iter_chunks(self.data, self.data.train_idx, self.chunk_showers):
            yield (torch.as_tensor(e, dtype=torch.float32, device=self.device),
                   torch.as_tensor(x, dtype=torch.float32, device=self.device))

    def n_batches(self, batch_size: int) -> int:
        n, size = len(self.data.train_idx), self.chunk_showers
        return (n // size) * -(-size // batch_size) + -(-(n % size) // batch_size)

    def train_chunks(self, key: list[int]) -> Iterator[Chunk]:
        rng = np.random.default_rng(key)
        positions, size = self.data.train_idx, self.chunk_showers
        for chunk in rng.permutation(-(-len(positions) // size)):
            block = positions[chunk * size:(chunk + 1) * size]
            # yielded without a local name, so the chunk is freed once the loop moves on
            yield self.build(block), torch.as_tensor(rng.permutation(len(block)), device=self.device)

    def val_chunks(self) -> Iterator[tuple[Tensor, ...]]:
        return self._seeded_chunks(self.data.val_idx)

    def _seeded_chunks(self, positions: np.ndarray, *suffix: int) -> Iterator[tuple[Tensor, ...]]:
        """``positions`` built ``chunk_showers`` at a time, in order, chunk j with torch's
        generator seeded by (val_seed, j, *suffix) (and restored afterwards)."""
        size = self.chunk_showers
        devices = [self.device] if self.device.type == "cuda" else []
        for j, start in enumerate(range(0, len(positions), size)):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(np.random.SeedSequence([*self.val_seed, j, *suffix]).generate_state(1)[0]))
                tensors = self.build(positions[start:start + size])
            yield tensors
            del tensors


class StreamedHeldStageData(HeldStageData, StreamedStageData):
    """A compact stage (``Stage.compact``) in streamed training: ``stage.fit`` on the
    training chunks as :class:`StreamedStageData`, then every chunk built once (training
    chunk i seeded with (val_seed, i, 1), so a resumed stage rebuilds the same tensors
    whether or not it fitted) and held for all epochs."""

    def __init__(self, model: ShowerModel, stage: Stage, data: TrainingShowers, device: torch.device,
                 distributed: Distributed | None, *, chunk_showers: int, fit: bool, val_seed: list[int]) -> None:
        super().__init__(model, stage, data, device, distributed, chunk_showers=chunk_showers, fit=fit,
                         val_seed=val_seed)
        self.train = tuple(torch.cat(column) for column in zip(*self._seeded_chunks(data.train_idx, 1)))
        self.val = tuple(torch.cat(column) for column in zip(*self._seeded_chunks(data.val_idx)))


def check_stage_data(stage: Stage, data: tuple[Tensor, ...], n: int) -> None:
    """ConfigError unless ``make_data`` returned a non-empty tuple of tensors with n rows each."""
    if not isinstance(data, tuple) or not data or any(len(t) != n for t in data):
        shapes = [tuple(t.shape) for t in data] if isinstance(data, tuple) else type(data).__name__
        raise ConfigError(f"stage '{stage.name}': make_data must return a non-empty tuple of tensors whose first "
                          f"dimension is the number of showers ({n}); got {shapes}")
