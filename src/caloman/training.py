"""Training any :class:`~caloman.models.base.ShowerModel`, stage by stage, with
checkpoints that resume.

One loop serves every model: for each :class:`~caloman.models.base.Stage` in
order, build its tensors (``stage.make_data``), then mini-batch AdamW on the
stage's module with a learning-rate schedule, gradient clipping, early
stopping on the validation loss (the best epoch's weights are restored when
the stage ends) and a checkpoint after every epoch.

Checkpoints live in ``run_dir/checkpoints`` and load without executing code:
tensors (model weights, optimizer moments, the best epoch's weights) in
safetensors files, everything else (epoch, stage, optimizer hyper-parameters,
RNG states as lists, history) in ``latest.json``. ``latest.json`` is written
last and names the tensor files it belongs to with their SHA-256, so a crash
at any moment leaves the previous checkpoint intact: ``resume=True`` loses at
most the epoch that was running.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from caloman.distributed import Distributed
from caloman.errors import ConfigError, RunDirectoryError, TrainingDivergedError
from caloman.io import atomic_path
from caloman.models.base import ShowerModel, Stage
from caloman.progress import ProgressBar
from caloman.stage_data import CachedStageData, StageData, StreamedHeldStageData, StreamedStageData
from caloman.training_data import (
    StreamedSplit,
    TrainingShowers,
    cached_split,
    data_fingerprint,
    iter_chunks,
    split_in_memory,
    split_indices,
    stream_cache_path,
)

__all__ = ["TrainingConfig", "TrainingHistory", "StageHistory", "EpochRecord", "train_model", "train_split",
           "seed_everything", "learning_rate_at", "split_indices", "data_fingerprint"]

logger = logging.getLogger("caloman.training")

#: Learning-rate schedules understood by :func:`learning_rate_at`.
LR_SCHEDULES = ("cosine", "plateau", "constant")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "latest.json"
CHECKPOINT_FORMAT = "caloman-checkpoint/1"

#: Training settings that may change between an interrupted run and its resumption
#: (they extend or shorten training, or only affect speed); any other change is refused.
RESUMABLE_CHANGES = frozenset({"epochs", "stage_epochs", "patience", "stage_patience", "num_threads", "device",
                               "stream_cache"})


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingConfig:
    """How a model is trained (the same for every model kind).

    ``patience`` and ``grad_clip_norm`` are disabled by 0 (TOML has no null).
    ``stage_epochs`` / ``stage_learning_rates`` / ``stage_patience`` override ``epochs`` /
    ``learning_rate`` / ``patience`` for the named stages.
    """

    epochs: int = 20
    batch_size: int = 256
    learning_rate: float = 1e-3
    #: "cosine" (from learning_rate down to min_learning_rate over the stage),
    #: "plateau" (times plateau_factor after plateau_patience epochs without improvement) or "constant".
    lr_schedule: str = "cosine"
    #: epochs of linear warm-up from learning_rate / (warmup_epochs + 1) before the schedule starts
    warmup_epochs: int = 0
    min_learning_rate: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    weight_decay: float = 0.0
    #: early stopping: end a stage after this many epochs without a lower validation loss (0: never)
    patience: int = 10
    #: clip the global gradient norm to this value (0: no clipping)
    grad_clip_norm: float = 5.0
    validation_fraction: float = 0.2
    seed: int = 0
    #: train on a random max_showers showers of the file, drawn with the seed (None: all)
    max_showers: int | None = None
    #: torch CPU threads during training (None: torch's default)
    num_threads: int | None = None
    #: "cpu", "cuda", "cuda:1", ... or "auto" (cuda when available)
    device: str = "cpu"
    #: 0: hold the showers and each stage's tensors in memory; N: stream them in chunks of N
    #: showers, in bounded memory (docs/training-and-generation.md, "Streamed training")
    stream_chunk_showers: int = 0
    #: streamed training only: copy the run's showers once into an uncompressed file in the run
    #: directory (deleted when training ends) and read every epoch from there
    stream_cache: bool = False
    stage_epochs: dict[str, int] = field(default_factory=dict)
    stage_learning_rates: dict[str, float] = field(default_factory=dict)
    stage_patience: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.warmup_epochs < 0 or self.plateau_patience < 0 or self.patience < 0:
            problems.append("warmup_epochs, plateau_patience and patience must be >= 0")
        if not 0 < self.plateau_factor < 1:
            problems.append(f"plateau_factor must lie in (0, 1), got {self.plateau_factor}")
        if self.min_learning_rate < 0 or self.weight_decay < 0 or self.grad_clip_norm < 0:
            problems.append("min_learning_rate, weight_decay and grad_clip_norm must be >= 0")
        if not 0 < self.validation_fraction < 1:
            problems.append(f"validation_fraction must lie in (0, 1), got {self.validation_fraction}")
        if self.max_showers is not None and self.max_showers < 2:
            problems.append(f"max_showers must be >= 2 (one training, one validation shower), got {self.max_showers}")
        if self.num_threads is not None and self.num_threads < 1:
            problems.append(f"num_threads must be >= 1, got {self.num_threads}")
        if not (self.device in ("cpu", "auto") or self.device.startswith("cuda")):
            problems.append(f"device must be 'cpu', 'cuda[:N]' or 'auto', got {self.device!r}")
        if isinstance(self.stream_chunk_showers, bool) or not isinstance(self.stream_chunk_showers, int) or not (
                self.stream_chunk_showers == 0 or self.stream_chunk_showers >= self.batch_size):
            problems.append(f"stream_chunk_showers must be 0 (in memory) or a whole number of showers >= batch_size "
                            f"({self.batch_size}), got {self.stream_chunk_showers!r}")
        if not isinstance(self.stream_cache, bool) or (self.stream_cache and not self.stream_chunk_showers):
            problems.append(f"stream_cache must be true or false, and true only with stream_chunk_showers > 0; got "
                            f"{self.stream_cache!r} with stream_chunk_showers = {self.stream_chunk_showers!r}")
        if any(n < 1 for n in self.stage_epochs.values()):
            problems.append(f"stage_epochs must all be >= 1, got {self.stage_epochs}")
        if any(not lr > 0 for lr in self.stage_learning_rates.values()):
            problems.append(f"stage_learning_rates must all be > 0, got {self.stage_learning_rates}")
        if any(n < 0 for n in self.stage_patience.values()):
            problems.append(f"stage_patience must all be >= 0, got {self.stage_patience}")
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems))

    @classmethod
    def quick(cls, **overrides: Any) -> TrainingConfig:
        """Minutes on a laptop CPU: a first look, a demo, a smoke test. The small layer-energy
        flow gets 60 epochs (about a second each): with 20, E_tot/E_inc per incident energy,
        whose histograms are narrow at high energy, was the worst-modelled feature."""
        base = dict(epochs=20, batch_size=256, learning_rate=1e-3, lr_schedule="cosine", warmup_epochs=1,
                    patience=5, max_showers=20_000, stage_epochs={"layer_energy": 60})
        return cls(**{**base, **overrides})

    @classmethod
    def full(cls, **overrides: Any) -> TrainingConfig:
        """All showers, 80 epochs per stage with batches of 512 and early stopping after
        10 flat epochs. 80, not 40: CaloMan's losses still fall at epoch 40, and its strong
        low-level AUC went from 0.647 to 0.564 on 100,000 dataset-1 showers (2026-12-07,
        docs/caloman-model.md; 21.2 min on two otherwise idle threads). 160 autoencoder
        epochs (``stage_epochs = { autoencoder = 160 }``, ``stage_patience = { autoencoder = 0 }``)
        lower the high-level AUC but raise the low-level one from 1 to 4 TeV (step 14 there),
        so they are not the default. The paper's 200 epochs took 110 min on a GPU; pass
        ``epochs=200``."""
        base = dict(epochs=80, batch_size=512, learning_rate=1e-3, lr_schedule="cosine", warmup_epochs=2,
                    patience=10, max_showers=None)
        return cls(**{**base, **overrides})

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> TrainingConfig:
        """``quick`` or ``full`` (the ``--profile`` option)."""
        if name not in PROFILES:
            raise ConfigError(f"unknown training profile {name!r}; use one of {', '.join(PROFILES)}")
        return getattr(cls, name)(**overrides)

    def epochs_for(self, stage: str) -> int:
        return self.stage_epochs.get(stage, self.epochs)

    def learning_rate_for(self, stage: str) -> float:
        return self.stage_learning_rates.get(stage, self.learning_rate)

    def patience_for(self, stage: str) -> int:
        return self.stage_patience.get(stage, self.patience)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILES = ("quick", "full")


def learning_rate_at(config: TrainingConfig, stage: str, epoch: int, val_losses: list[float]) -> float:
    """Learning rate of 0-based ``epoch`` of ``stage``, given the validation
    losses of its earlier epochs.

    A pure function of the epoch and the loss history, so a resumed run needs no
    scheduler object (hand-written because torch's LambdaLR and
    ReduceLROnPlateau cannot be combined for warm-up followed by plateau decay).
    """
    base = config.learning_rate_for(stage)
    warmup = config.warmup_epochs
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    if config.lr_schedule == "constant":
        return base
    if config.lr_schedule == "cosine":
        span = max(1, config.epochs_for(stage) - warmup)
        t = min(1.0, (epoch - warmup) / span)
        return config.min_learning_rate + (base - config.min_learning_rate) * 0.5 * (1.0 + math.cos(math.pi * t))
    # plateau: like torch's ReduceLROnPlateau with threshold 0 and no cool-down
    lr, best, bad = base, math.inf, 0
    for loss in val_losses[warmup:epoch]:
        if loss < best:
            best, bad = loss, 0
        else:
            bad += 1
            if bad > config.plateau_patience:
                lr, bad = max(lr * config.plateau_factor, config.min_learning_rate), 0
    return lr


# ---------------------------------------------------------------------------
# history
# ---------------------------------------------------------------------------
@dataclass
class EpochRecord:
    """One finished epoch. ``epoch`` counts from 1; losses are per-shower means."""

    epoch: int
    train_loss: float
    val_loss: float
    learning_rate: float
    seconds: float


@dataclass
class StageHistory:
    """Epochs of one stage, its best epoch, wall time and memory.

    ``seconds`` is wall time including building the stage's tensors (summed over
    resumed sessions); ``peak_rss_mib`` is the process's peak resident memory
    (``resource.getrusage(...).ru_maxrss``) at the end of the stage, i.e. the peak
    of the whole process so far, data included, not of this stage alone.
    """

    name: str
    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    stopped_early: bool = False
    finished: bool = False
    seconds: float = 0.0
    peak_rss_mib: float | None = None

    def summary(self) -> str:
        """One line: epochs run, best validation loss, time, memory."""
        if not self.epochs:
            return f"{self.name}: not trained"
        stop = f", early stop after {len(self.epochs)}" if self.stopped_early else ""
        mem = f", peak RSS {self.peak_rss_mib:.0f} MiB" if self.peak_rss_mib is not None else ""
        return (f"{self.name}: {len(self.epochs)} epochs{stop}, best val loss {self.best_val_loss:.5g} "
                f"at epoch {self.best_epoch}, {self.seconds:.1f} s{mem}")


@dataclass
class TrainingHistory:
    """Per-stage, per-epoch record of a training run (``history.json``)."""

    stages: list[StageHistory] = field(default_factory=list)
    n_train: int = 0
    n_validation: int = 0
    preprocessing_seconds: float = 0.0

    def stage(self, name: str) -> StageHistory:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in history (stages: {', '.join(s.name for s in self.stages)})")

    def summary_lines(self) -> list[str]:
        return [s.summary() for s in self.stages]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingHistory:
        stages = [StageHistory(**{**s, "epochs": [EpochRecord(**e) for e in s["epochs"]]}) for s in d["stages"]]
        return cls(stages=stages, n_train=d["n_train"], n_validation=d["n_validation"],
                   preprocessing_seconds=d["preprocessing_seconds"])


# ---------------------------------------------------------------------------
# files: safetensors for tensors, JSON for the rest, every write atomic
# ---------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: Any, *, indent: int | None = 1) -> None:
    """Write JSON atomically (Python's JSON: inf and nan are allowed).
    ``indent=None`` is much faster for large records (json's C encoder)."""
    with atomic_path(path, suffix=".json.tmp") as tmp:
        tmp.write_text(json.dumps(data, indent=indent) + "\n")


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors to a safetensors file atomically; returns its SHA-256.

    Tensors are copied to contiguous CPU memory, and tied tensors (one storage
    under two names) are cloned, which safetensors requires.
    """
    seen: set[int] = set()
    plain = {}
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        plain[key] = t
    with atomic_path(path, suffix=".safetensors.tmp") as tmp:
        save_file(plain, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    return digest


def load_tensors(path: Path, *, sha256: str | None = None, what: str = "", remedy: str = "") -> dict[str, Tensor]:
    """Read a safetensors file (no code runs), checking its SHA-256 when given.

    Raises :class:`RunDirectoryError` naming the file and ``remedy`` when it is
    missing, truncated or does not match the checksum.
    """
    label = f"{path}{f' ({what})' if what else ''}"
    if not path.is_file():
        raise RunDirectoryError(f"{label} is missing; {remedy}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise RunDirectoryError(f"{label} does not match its recorded SHA-256: it is corrupt or was replaced; {remedy}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirectoryError(f"{label} is not a readable safetensors file ({exc}); {remedy}") from exc


def model_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state (weights and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------
# reproducibility
# ---------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed torch, numpy's and Python's global generators (do this before
    building a model so its initial weights are reproducible too)."""
    torch.manual_seed(seed)
    # the legacy global generator too: model code may still draw from it
    np.random.seed(seed % 2**32)  # noqa: NPY002
    random.seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 (see seed_everything)
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA device is available; use device = \"cpu\"")
    return torch.device(name)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------
# optimizer state <-> (tensors, JSON)
# ---------------------------------------------------------------------------
def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "state": plain}


def _join_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in meta["state"].items():
        state.setdefault(int(index), {}).update(entries)
    # JSON turned tuples (Adam's betas) into lists
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------
@dataclass
class _Progress:
    """Where training stands; with the tensors, exactly what a checkpoint holds."""

    stage_index: int = 0
    next_epoch: int = 0
    best_val_loss: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    sequence: int = 0


class _Checkpointer:
    """Writes and reads ``run_dir/checkpoints`` (latest plus the current stage's best)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.record = self.dir / CHECKPOINT_FILE
        self.best_file: str | None = None
        self.best_sha: str | None = None

    def exists(self) -> bool:
        return self.record.exists()

    def write(self, progress: _Progress, model: ShowerModel, optimizer: torch.optim.Optimizer | None,
              best: dict[str, Tensor] | None, best_is_new: bool, info: dict[str, Any]) -> None:
        progress.sequence += 1
        tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
        optimizer_meta = None
        if optimizer is not None:
            opt_tensors, optimizer_meta = _split_optimizer_state(optimizer.state_dict())
            tensors.update(opt_tensors)
        name = f"state-{progress.sequence:06d}.safetensors"
        sha = save_tensors(self.dir / name, tensors)
        if best is None:
            self.best_file = self.best_sha = None
        elif best_is_new or self.best_file is None:
            self.best_file = f"best-{progress.sequence:06d}.safetensors"
            self.best_sha = save_tensors(self.dir / self.best_file, {f"model/{k}": v for k, v in best.items()})
        stages = info["stages"]
        record = {"format": CHECKPOINT_FORMAT, **dataclasses.asdict(progress),
                  "stage": stages[progress.stage_index] if progress.stage_index < len(stages) else None, **info,
                  "optimizer": optimizer_meta,
                  "files": {"state": name, "state_sha256": sha, "best": self.best_file, "best_sha256": self.best_sha}}
        # the commit point: until this rename the previous checkpoint stays valid
        write_json(self.record, record, indent=None)
        keep = {CHECKPOINT_FILE, name, self.best_file}
        for path in self.dir.iterdir():
            if path.name not in keep and path.is_file():
                path.unlink(missing_ok=True)

    def read(self) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor] | None]:
        remedy = "the checkpoint cannot be used: train again without --resume (into a new or emptied directory)"
        try:
            record = json.loads(self.record.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirectoryError(f"{self.record} is unreadable or corrupt ({exc}); {remedy}") from exc
        if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
            raise RunDirectoryError(f"{self.record} is not a {CHECKPOINT_FORMAT} record; {remedy}")
        files = record["files"]
        tensors = load_tensors(self.dir / files["state"], sha256=files["state_sha256"], what="checkpoint",
                               remedy=remedy)
        best = None
        if files["best"] is not None:
            best = load_tensors(self.dir / files["best"], sha256=files["best_sha256"], what="best epoch",
                                remedy=remedy)
            self.best_file, self.best_sha = files["best"], files["best_sha256"]
        return record, tensors, best


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------
EpochCallback = Callable[[str, EpochRecord], None]


def train_model(model: ShowerModel, incident_energies: np.ndarray, showers: np.ndarray, config: TrainingConfig,
                run_dir: str | Path, *, resume: bool = False, on_epoch_end: EpochCallback | None = None
                ) -> TrainingHistory:
    """Train every stage of ``model`` in place; checkpoints go to ``run_dir/checkpoints``.

    ``incident_energies`` (N,) and ``showers`` (N, n_voxels) are in MeV; with
    ``config.max_showers`` a random subset of that many, drawn with ``config.seed``,
    is used (:func:`caloman.training_data.split_in_memory`). The split into training and
    validation showers is seeded by ``config.seed``; ``model.fit_preprocessing``
    sees only the training showers. Global RNGs are seeded from ``config.seed``
    at the start (the model's initial weights are the caller's: call
    :func:`seed_everything` before building it).

    ``resume=True`` continues from ``run_dir/checkpoints``: finished stages are
    not retrained and the stage in progress restarts at the epoch after the last
    checkpoint, with the weights, optimizer state, best-so-far and RNG states of
    that moment, so with the same data, config, thread count and device the
    result equals an uninterrupted run's. ``make_data`` must depend only on
    earlier stages (it is called again when resuming mid-stage);
    ``fit_preprocessing`` runs again too before the checkpoint's weights are
    loaded over it.

    ``on_epoch_end(stage_name, record)`` is called after each epoch's checkpoint
    is written. Raises :class:`TrainingDivergedError` on a NaN or infinite loss
    (the last good checkpoint is kept), :class:`RunDirectoryError` when
    ``resume`` finds no usable checkpoint or a fresh run would overwrite one.
    """
    return train_split(model, split_in_memory(incident_energies, showers, config), config, run_dir, resume=resume,
                       on_epoch_end=on_epoch_end)


@dataclass
class _Session:
    """What every step of one training run shares."""

    model: ShowerModel
    data: TrainingShowers
    config: TrainingConfig
    run_dir: Path
    device: torch.device
    checkpointer: _Checkpointer
    history: TrainingHistory
    progress: _Progress
    info: dict[str, Any]
    distributed: Distributed | None
    on_epoch_end: EpochCallback | None

    @property
    def rank(self) -> int:
        return self.distributed.rank if self.distributed is not None else 0


def train_split(model: ShowerModel, data: TrainingShowers, config: TrainingConfig, run_dir: str | Path, *,
                resume: bool = False, on_epoch_end: EpochCallback | None = None,
                distributed: Distributed | None = None) -> TrainingHistory:
    """:func:`train_model` on showers already chosen and split
    (:func:`caloman.training_data.load_training_data`).

    With ``distributed`` this process is one rank of a data-parallel run and
    ``data`` its own share: the preprocessing is fitted on rank 0's share and
    broadcast (the trained energy range spans all ranks), each stage trains a
    DistributedDataParallel copy of its module (the global batch is
    ``world_size * batch_size``), losses are averaged over all ranks, and rank 0
    alone writes checkpoints, which hold every rank's RNG states.

    With ``config.stream_chunk_showers`` N > 0 the preprocessing is fitted in one pass
    over chunks of N training showers (``model.fit_preprocessing_chunks``) and every stage
    whose training split is larger than N is trained on chunks built per epoch
    (:class:`caloman.stage_data.StreamedStageData`); ``data`` may then be a
    :class:`~caloman.training_data.StreamedSplit` that holds no showers.
    """
    run_dir = Path(run_dir)
    checkpointer = _Checkpointer(run_dir)
    if resume and not checkpointer.exists():
        raise RunDirectoryError(f"{run_dir}: no checkpoint ({CHECKPOINT_DIR}/{CHECKPOINT_FILE}) to resume from; "
                                "train without --resume")
    if not resume and checkpointer.exists():
        raise RunDirectoryError(f"{run_dir} already holds a training checkpoint; pass --resume (resume=True) to "
                                "continue it, or choose a new run directory")
    device = distributed.device if distributed is not None else resolve_device(config.device)
    rank = distributed.rank if distributed is not None else 0
    cache = None
    if config.stream_cache and isinstance(data, StreamedSplit):
        cache = stream_cache_path(run_dir, rank, distributed.world_size if distributed is not None else 1)
        data = cached_split(data, cache)
    with _torch_threads(config.num_threads):
        model.to(device)
        if not resume:
            # a stream of its own: the caller seeded the initial weights with config.seed itself
            seed_everything(_stream_seed(config.seed, rank))
        t0 = time.perf_counter()
        # also when resuming (the checkpoint's weights then overwrite the fitted buffers), in case a
        # model keeps anything outside its state_dict
        if config.stream_chunk_showers:
            model.fit_preprocessing_chunks(lambda: iter_chunks(data, data.train_idx, config.stream_chunk_showers))
        else:
            model.fit_preprocessing(*data.read(data.train_idx))
        n_train, n_val = len(data.train_idx), len(data.val_idx)
        if distributed is not None:  # one model: rank 0's constants, the whole run's energy range
            distributed.broadcast_state(model)
            distributed.reduce_range(model.energy_range)
            n_train, n_val = (int(n) for n in distributed.sum(n_train, n_val))
        stages = model.stages()
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        history = TrainingHistory(stages=[StageHistory(name=n) for n in names], n_train=n_train,
                                  n_validation=n_val, preprocessing_seconds=time.perf_counter() - t0)
        info = {"training": config.to_dict(), "stages": names, "data_fingerprint": data.fingerprint,
                "split": {"seed": config.seed, "validation_fraction": config.validation_fraction,
                          "n_showers": data.n_showers, "n_validation": n_val},
                "world_size": distributed.world_size if distributed is not None else 1}
        session = _Session(model, data, config, run_dir, device, checkpointer, history, _Progress(), info,
                           distributed, on_epoch_end)
        stage_start_rng = _rng_state(device)
        checkpoint = None
        if resume:
            checkpoint = _restore(checkpointer, model, config, info, device)
            session.progress = _Progress(**{k: checkpoint["record"][k] for k in dataclasses.asdict(session.progress)})
            session.history = TrainingHistory.from_dict(checkpoint["record"]["history"])
            stage_start_rng = _rank_entry(checkpoint["record"], "stage_start_rng", rank)
            logger.info("resuming %s at stage '%s', epoch %d", run_dir,
                        names[session.progress.stage_index] if session.progress.stage_index < len(names) else "(done)",
                        session.progress.next_epoch + 1)
        while session.progress.stage_index < len(stages):
            _train_stage(session, stages[session.progress.stage_index], checkpoint, stage_start_rng)
            checkpoint = None
            stage_start_rng = _rng_state(device)
    if cache is not None:  # kept after an interruption, for --resume
        cache.unlink(missing_ok=True)
    model.eval()
    return session.history


def _stream_seed(seed: int, rank: int) -> int:
    """The training RNG seed of a rank (rank 0, and a single process, keep the historical stream)."""
    key = [seed, 1] if rank == 0 else [seed, 1, rank]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def _rank_entry(record: dict[str, Any], key: str, rank: int) -> Any:
    """A checkpoint's RNG state ``key`` for ``rank`` (distributed checkpoints keep one per rank)."""
    per_rank = record.get(f"rank_{key}")
    return per_rank[rank] if per_rank is not None else record[key]


def _restore(checkpointer: _Checkpointer, model: ShowerModel, config: TrainingConfig, info: dict[str, Any],
             device: torch.device) -> dict[str, Any]:
    record, tensors, best = checkpointer.read()
    # a setting added since the checkpoint was written counts as its default
    stored = {**{f.name: f.default for f in dataclasses.fields(TrainingConfig) if f.default is not dataclasses.MISSING},
              **record.get("training", {})}
    changed = sorted(k for k in set(stored) | set(info["training"])
                     if stored.get(k) != info["training"].get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k} {stored.get(k)!r} -> {info['training'].get(k)!r}" for k in changed)
        raise ConfigError(f"{checkpointer.record}: cannot resume with different training settings ({diffs}); "
                          "resume with the run's own settings or start a new run")
    if record.get("world_size", 1) != info["world_size"]:
        raise ConfigError(f"{checkpointer.record}: the run was trained by {record.get('world_size', 1)} process(es), "
                          f"not {info['world_size']}; resume with `torchrun --nproc-per-node "
                          f"{record.get('world_size', 1)}` (1: plain `caloman train`)")
    if record.get("stages") != info["stages"]:
        raise RunDirectoryError(f"{checkpointer.record}: checkpoint has stages {record.get('stages')}, the model has "
                                f"{info['stages']}; resume with the model the run was started with")
    if record.get("data_fingerprint") != info["data_fingerprint"]:
        raise RunDirectoryError(f"{checkpointer.record}: the showers differ from those the checkpoint was trained on "
                                f"(now {info['split']['n_showers']}, then {record['split']['n_showers']}); resume "
                                "with the same file and --max-showers, or start a new run")
    weights = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    _load_weights(model, weights, checkpointer.dir / record["files"]["state"])
    return {"record": record, "tensors": tensors, "best": best}


def _load_weights(model: torch.nn.Module, weights: dict[str, Tensor], source: Path) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise RunDirectoryError(f"{source}: weights do not fit the model ({exc}); resume with the model "
                                "configuration the run was started with") from exc


def _batches(tensors: tuple[Tensor, ...], order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, ...]]:
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield tuple(t[idx] for t in tensors)


def _train_stage(session: _Session, stage: Stage, checkpoint: dict[str, Any] | None,
                 stage_start_rng: dict[str, Any]) -> None:
    """Build the stage's data, train its module epoch by epoch, keep its best epoch."""
    t_stage = time.perf_counter()
    data = _stage_data(session, stage, stage_start_rng)
    params = list(stage.module.parameters())
    own = {id(p) for p in params}
    frozen = [p for p in session.model.parameters() if id(p) not in own and p.requires_grad]
    optimizer, best = _stage_optimizer(session, stage, params, checkpoint)
    n_epochs = session.config.epochs_for(stage.name)
    progress, patience = session.progress, session.config.patience_for(stage.name)
    for p in frozen:  # only this stage's module learns; earlier stages stay as trained
        p.requires_grad_(False)
    try:
        loss_fn = stage.loss if session.distributed is None else session.distributed.wrap(stage.module, stage.loss)
        while progress.next_epoch < n_epochs and not (patience and progress.epochs_since_best >= patience):
            t_stage, best = _epoch(session, stage, data, optimizer, params, loss_fn, best, stage_start_rng, t_stage)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    _finish_stage(session, stage, best, n_epochs, t_stage)


def _stage_data(session: _Session, stage: Stage, stage_start_rng: dict[str, Any]) -> StageData:
    """The stage's training and validation tensors, built in memory or streamed per chunk
    (when the training split exceeds one chunk; a compact stage's chunks are built once and
    held), from the stage's starting RNG state
    (make_data and stage.fit may draw random numbers; also when resuming)."""
    _set_rng_state(stage_start_rng, session.device)
    chunk = session.config.stream_chunk_showers
    if not chunk or len(session.data.train_idx) <= chunk:
        return CachedStageData(session.model, stage, session.data, session.device, session.distributed)
    key = [session.config.seed, 3, session.progress.stage_index] + ([session.rank] if session.rank else [])
    streamed = StreamedHeldStageData if stage.compact else StreamedStageData
    return streamed(session.model, stage, session.data, session.device, session.distributed,
                    chunk_showers=chunk, fit=session.progress.next_epoch == 0, val_seed=key)


def _stage_optimizer(session: _Session, stage: Stage, params: list[torch.nn.Parameter],
                     checkpoint: dict[str, Any] | None) -> tuple[torch.optim.Optimizer, dict[str, Tensor] | None]:
    """AdamW for the stage and the best weights so far; from the checkpoint when resuming."""
    # foreach: one multi-tensor kernel per update step instead of a Python loop over the
    # parameters (the same update; about a tenth of a flow stage's step time on the CPU).
    optimizer = torch.optim.AdamW(params, lr=session.config.learning_rate_for(stage.name),
                                  weight_decay=session.config.weight_decay, foreach=True)
    best: dict[str, Tensor] | None = None
    if checkpoint is not None:
        record = checkpoint["record"]
        if record["optimizer"] is not None:
            optimizer.load_state_dict(_join_optimizer_state(checkpoint["tensors"], record["optimizer"]))
        if checkpoint["best"] is not None:
            best = {k[len("model/"):]: v.to(session.device) for k, v in checkpoint["best"].items()}
        if session.progress.next_epoch > 0:  # mid-stage: continue the random stream where the last epoch left it
            _set_rng_state(_rank_entry(record, "rng", session.rank), session.device)
    return optimizer, best


def _epoch(session: _Session, stage: Stage, data: StageData, optimizer: torch.optim.Optimizer,
           params: list[torch.nn.Parameter], loss_fn: Callable[[tuple[Tensor, ...]], Tensor],
           best: dict[str, Tensor] | None, stage_start_rng: dict[str, Any], t_stage: float
           ) -> tuple[float, dict[str, Tensor] | None]:
    """One epoch: train, validate, record, checkpoint. Returns (new stage clock, best weights)."""
    config, progress = session.config, session.progress
    stage_history = session.history.stage(stage.name)
    n_epochs = config.epochs_for(stage.name)
    epoch = progress.next_epoch
    t_epoch = time.perf_counter()
    lr = learning_rate_at(config, stage.name, epoch, [r.val_loss for r in stage_history.epochs])
    for group in optimizer.param_groups:
        group["lr"] = lr
    key = [config.seed, progress.stage_index, epoch] + ([session.rank] if session.rank else [])
    train_loss = _train_batches(session, stage, data, key, optimizer, params, loss_fn, lr)
    val_loss = _evaluate(stage, data.val_chunks(), config.batch_size, session.distributed)
    if not math.isfinite(val_loss):
        _diverged(stage.name, epoch, n_epochs, f"validation loss is {val_loss}", lr, progress, session.run_dir)
    record = EpochRecord(epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss, learning_rate=lr,
                         seconds=time.perf_counter() - t_epoch)
    stage_history.epochs.append(record)
    improved = progress.best_val_loss is None or val_loss < progress.best_val_loss
    if improved:
        progress.best_val_loss, progress.best_epoch, progress.epochs_since_best = val_loss, epoch + 1, 0
        best = model_state(session.model)
    else:
        progress.epochs_since_best += 1
    progress.next_epoch += 1
    stage_history.best_epoch, stage_history.best_val_loss = progress.best_epoch, progress.best_val_loss
    now = time.perf_counter()
    stage_history.seconds += now - t_stage
    logger.info("%s epoch %d/%d: train loss %.5g, val loss %.5g, lr %.3g, %.1f s", stage.name, epoch + 1,
                n_epochs, train_loss, val_loss, lr, record.seconds)
    _checkpoint(session, optimizer, best, improved, stage_start_rng)
    if session.on_epoch_end is not None:
        session.on_epoch_end(stage.name, record)
    return now, best


def _train_batches(session: _Session, stage: Stage, data: StageData, key: list[int],
                   optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                   loss_fn: Callable[[tuple[Tensor, ...]], Tensor], lr: float) -> float:
    """One pass over the training chunks of ``data`` in the epoch's order (seeded by ``key``);
    the mean training loss (over all ranks)."""
    config, progress = session.config, session.progress
    epoch, n_epochs = progress.next_epoch, config.epochs_for(stage.name)
    n_batches = data.n_batches(config.batch_size)
    _begin_epoch(stage, epoch)
    total, seen, b = 0.0, 0, 0
    with ProgressBar(n_batches, desc=f"{stage.name} {epoch + 1}/{n_epochs}", unit="batch") as bar:
        for tensors, order in data.train_chunks(key):
            stage.module.train()  # after the chunk was built in eval mode
            for batch in _batches(tensors, order, config.batch_size):
                b += 1
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(batch)
                if not torch.isfinite(loss):
                    _diverged(stage.name, epoch, n_epochs, f"loss is {loss.item()} at batch {b}/{n_batches}",
                              lr, progress, session.run_dir)
                loss.backward()
                if config.grad_clip_norm:
                    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm, foreach=True)
                    if not torch.isfinite(norm):
                        _diverged(stage.name, epoch, n_epochs, f"gradient norm is {norm.item()} at batch "
                                  f"{b}/{n_batches}", lr, progress, session.run_dir)
                optimizer.step()
                n = len(batch[0])
                total += loss.item() * n
                seen += n
                bar.update()
                bar.set_postfix(loss=f"{total / seen:.4g}")
            del tensors, order  # free the chunk before the next one is built
    if session.distributed is not None:
        total, seen = session.distributed.sum(total, seen)
    return total / seen


def _checkpoint(session: _Session, optimizer: torch.optim.Optimizer | None, best: dict[str, Tensor] | None,
                improved: bool, stage_start_rng: dict[str, Any] | None) -> None:
    """Write the checkpoint (rank 0 only; every rank's RNG states gathered into it).
    ``stage_start_rng`` None: the stage has ended, the next one starts from the current state."""
    rng = _rng_state(session.device)
    states = {"rng": rng, "stage_start_rng": rng if stage_start_rng is None else stage_start_rng}
    if session.distributed is not None:
        states["rank_rng"] = session.distributed.gather(states["rng"])
        states["rank_stage_start_rng"] = session.distributed.gather(states["stage_start_rng"])
    if session.distributed is None or session.distributed.is_main:
        session.checkpointer.write(session.progress, session.model, optimizer, best, improved,
                                   {**session.info, **states, "history": session.history.to_dict()})


def _finish_stage(session: _Session, stage: Stage, best: dict[str, Tensor] | None, n_epochs: int,
                  t_stage: float) -> None:
    """End of stage: keep the best epoch's weights, mark the stage done, checkpoint."""
    progress = session.progress
    stage_history = session.history.stage(stage.name)
    stage_history.stopped_early = progress.next_epoch < n_epochs
    if best is not None:
        session.model.load_state_dict(best)
    stage_history.finished = True
    stage_history.seconds += time.perf_counter() - t_stage
    stage_history.peak_rss_mib = _peak_rss_mib()
    logger.info("%s", stage_history.summary())
    progress.stage_index += 1
    progress.next_epoch, progress.best_val_loss, progress.best_epoch, progress.epochs_since_best = 0, None, None, 0
    _checkpoint(session, None, None, False, None)


def _begin_epoch(stage: Stage, epoch: int) -> None:
    """Tell a stage whose epochs alternate between phases (``Stage.begin_epoch``, the M-flow's
    M/D schedule) which 0-based epoch starts; nothing for other stages."""
    if stage.begin_epoch is not None:
        stage.begin_epoch(epoch)


def _evaluate(stage: Stage, chunks: Iterator[tuple[Tensor, ...]], batch_size: int,
              distributed: Distributed | None = None) -> float:
    """Mean validation loss over the validation chunks with the stage's module in eval mode
    (over all ranks)."""
    total, seen = 0.0, 0
    for tensors in chunks:
        stage.module.eval()
        order = torch.arange(len(tensors[0]), device=tensors[0].device)
        with torch.no_grad():
            for batch in _batches(tensors, order, batch_size):
                n = len(batch[0])
                total += stage.loss(batch).item() * n
                seen += n
        del tensors, order
    if distributed is not None:
        total, seen = distributed.sum(total, seen)
    return total / seen


def _diverged(stage: str, epoch: int, n_epochs: int, what: str, lr: float, progress: _Progress,
              run_dir: Path) -> None:
    if progress.next_epoch:
        kept = f"the checkpoint after epoch {progress.next_epoch} is kept in {run_dir / CHECKPOINT_DIR}"
    elif progress.stage_index:
        kept = f"the checkpoint of the earlier stages is kept in {run_dir / CHECKPOINT_DIR}"
    else:
        kept = "no checkpoint was written"
    raise TrainingDivergedError(
        f"training diverged in stage '{stage}' at epoch {epoch + 1}/{n_epochs}: {what}. Lower the learning rate "
        f"(it was {lr:.3g}; set learning_rate or stage_learning_rates under [training] in a --config file) or "
        f"the gradient clipping norm (grad_clip_norm), and train again in a new run directory; {kept}")
