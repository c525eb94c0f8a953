"""Data-parallel training on PyTorch's own engine (``torch.distributed``).

``torchrun --nproc-per-node N -m caloman train ...`` starts N processes with
``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT`` in their environment;
:func:`from_environment` joins them into one process group (gloo on CPU, NCCL on
CUDA). :class:`Distributed` holds the few collective steps training needs: every
rank trains a :class:`torch.nn.parallel.DistributedDataParallel` copy of the
stage's module on its own shard of the showers (gradients averaged across ranks
after each batch), losses are summed across ranks, and state that a rank fitted
on its own shard is replaced by rank 0's, so all copies stay identical. Rank 0
alone writes files.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from caloman import progress
from caloman.errors import ConfigError

#: how long a collective waits for the other ranks before failing (a crashed rank ends the job)
TIMEOUT = datetime.timedelta(minutes=30)


class _StageLoss(nn.Module):
    """A stage's loss as a module's forward, so DistributedDataParallel sees the
    batches (its gradient hooks are armed in forward) and owns the stage's parameters."""

    def __init__(self, module: nn.Module, loss: Callable[[tuple[Tensor, ...]], Tensor]) -> None:
        super().__init__()
        self.module = module
        self._loss = loss

    def forward(self, *batch: Tensor) -> Tensor:
        return self._loss(batch)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel job: ``rank`` of ``world_size``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory and checkpoints."""
        return self.rank == 0

    def wrap(self, module: nn.Module, loss: Callable[[tuple[Tensor, ...]], Tensor]
             ) -> Callable[[tuple[Tensor, ...]], Tensor]:
        """The stage's loss through DistributedDataParallel: call it with a batch, then
        ``backward()`` leaves the gradient averaged over all ranks in every parameter."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(_StageLoss(module, loss), device_ids=device_ids)
        return lambda batch: ddp(*batch)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all ranks."""
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_buffers(self, module: nn.Module) -> bool:
        """Overwrite every buffer of ``module`` with rank 0's; True when one of this rank's differed."""
        changed = False
        for buffer in module.buffers():
            mine = buffer.detach().clone()
            received = buffer.detach().to(self._collective_device())
            dist.broadcast(received, src=0)
            buffer.data.copy_(received)
            changed = changed or not torch.equal(mine, buffer)
        return changed

    def broadcast_state(self, module: nn.Module) -> None:
        """Overwrite every parameter and buffer of ``module`` with rank 0's."""
        with torch.no_grad():
            for t in (*module.parameters(), *module.buffers()):
                received = t.detach().to(self._collective_device())
                dist.broadcast(received, src=0)
                t.data.copy_(received)

    def reduce_range(self, bounds: Tensor) -> None:
        """(low, high) in place: the lowest low and the highest high over all ranks."""
        low = bounds[:1].detach().to(self._collective_device()).clone()
        high = bounds[1:].detach().to(self._collective_device()).clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        bounds.copy_(torch.cat((low, high)).to(bounds.device))

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (JSON-like values)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def environment_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from exc


def from_environment(device: str = "cpu") -> Distributed | None:
    """Join the process group torchrun describes in the environment, or None for a single
    process (``WORLD_SIZE`` unset or 1). ``device`` is the training device: "cpu" uses
    gloo; "cuda"/"auto" with CUDA uses NCCL and this rank's ``LOCAL_RANK`` GPU."""
    world_size = environment_world_size()
    if world_size <= 1:
        return None
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; train in one process")
    rank = int(os.environ["RANK"])
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        target = torch.device("cuda", local)
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
    return Distributed(rank=rank, world_size=world_size, device=target)


def shutdown() -> None:
    """Leave the process group (end of a distributed command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def joined(device: str = "cpu") -> Iterator[Distributed | None]:
    """:func:`from_environment` for the length of a command: ranks other than 0 log only
    warnings and show no progress bars; the process group is left at the end."""
    distributed = from_environment(device)
    if distributed is not None and not distributed.is_main:
        logging.getLogger("caloman").setLevel(logging.WARNING)
        progress.enable(False)
    try:
        yield distributed
    except BaseException:
        if distributed is not None:
            shutdown()  # no final barrier: the other ranks may never reach it
        raise
    if distributed is not None:
        # Every rank reaches the end before any leaves the group: a rank that tears down its
        # gloo pairs while a peer still uses them can abort the process at exit ("terminate called").
        try:
            distributed.barrier()
        finally:
            shutdown()
