"""The run directory: everything one training run leaves behind.

::

    RUN/
      config.json          versions, model kind and config, training config, binning,
                           seed, data file (path, size, mtime), command line, checksums
      model.safetensors    final weights (model.state_dict(), preprocessing included)
      history.json         per stage, per epoch: train / validation loss, learning rate, seconds
      checkpoints/         latest.json + tensor files (training.py), for --resume
      metrics/             written by evaluation, not here

Nothing here unpickles or executes anything: weights are safetensors, the rest
JSON. ``config.json`` is written first when training starts (so ``--resume``
knows the model) and rewritten last when it ends, with the SHA-256 of
``model.safetensors`` and ``history.json``; :func:`load_run` checks every file
and raises :class:`RunDirectoryError` naming the file at fault and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from caloman import __version__
from caloman.config import training_config_from_dict
from caloman.errors import BinningError, ConfigError, RunDirectoryError
from caloman.geometry import BUILTIN_BINNINGS, Binning, load_binning
from caloman.models.base import ShowerModel
from caloman.training import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    TrainingConfig,
    TrainingHistory,
    load_tensors,
    save_tensors,
    sha256_file,
    write_json,
)

if TYPE_CHECKING:
    from caloman.distributed import Distributed

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
HISTORY_FILE = "history.json"
METRICS_DIR = "metrics"
RUN_FORMAT = "caloman-run/1"

#: Builds an untrained model from (kind, model config dict, binning).
ModelFactory = Callable[[str, dict[str, Any], Binning], ShowerModel]


def default_model_factory(kind: str, model_config: dict[str, Any], binning: Binning) -> ShowerModel:
    """Rebuild a model through :func:`caloman.models.build_model` with its full
    stored config as overrides (imported here: the models package is heavier
    than what reading a run's configuration needs)."""
    from caloman.models import build_model

    return build_model(kind, binning, overrides=model_config)


@dataclass(frozen=True)
class DataSource:
    """The shower file a model was trained on, as it was at the time."""

    path: str
    size_bytes: int
    mtime: float
    n_showers: int | None = None

    @classmethod
    def of(cls, path: str | Path, n_showers: int | None = None) -> DataSource:
        p = Path(path).resolve()
        st = p.stat()
        return cls(path=str(p), size_bytes=st.st_size, mtime=st.st_mtime, n_showers=n_showers)

    def changed(self) -> bool:
        """True when the file is gone or its size or modification time differ."""
        p = Path(self.path)
        if not p.exists():
            return True
        st = p.stat()
        return st.st_size != self.size_bytes or st.st_mtime != self.mtime


@dataclass(frozen=True)
class RunConfig:
    """The content of ``config.json``."""

    model_kind: str
    model_config: dict[str, Any]
    training: TrainingConfig
    binning_name: str
    binning_source: str
    n_voxels: int
    data: DataSource | None = None
    command_line: list[str] | None = None
    caloman_version: str = __version__
    torch_version: str = torch.__version__
    numpy_version: str = np.__version__
    python_version: str = platform.python_version()
    created: str = ""
    #: SHA-256 of the finished run's files (empty while training)
    files: dict[str, str] = field(default_factory=dict)
    #: processes that trained the run data-parallel (torchrun --nproc-per-node); 1: one process
    world_size: int = 1

    @property
    def seed(self) -> int:
        return self.training.seed

    @property
    def finished(self) -> bool:
        return MODEL_FILE in self.files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_FORMAT,
            "caloman_version": self.caloman_version,
            "torch_version": self.torch_version,
            "numpy_version": self.numpy_version,
            "python_version": self.python_version,
            "created": self.created,
            "model": {"kind": self.model_kind, "config": self.model_config},
            "training": self.training.to_dict(),
            "binning": {"name": self.binning_name, "source": self.binning_source, "n_voxels": self.n_voxels},
            "seed": self.seed,
            "data": dataclasses.asdict(self.data) if self.data is not None else None,
            "command_line": self.command_line,
            "world_size": self.world_size,
            "files": self.files,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = CONFIG_FILE) -> RunConfig:
        remedy = "the file is damaged or not from caloman; re-train"
        if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
            raise RunDirectoryError(f"{source} is not a {RUN_FORMAT} configuration; {remedy}")
        try:
            training = training_config_from_dict(d["training"], source=source)
            data = DataSource(**d["data"]) if d.get("data") is not None else None
            return cls(model_kind=d["model"]["kind"], model_config=dict(d["model"]["config"]), training=training,
                       binning_name=d["binning"]["name"], binning_source=d["binning"]["source"],
                       n_voxels=int(d["binning"]["n_voxels"]), data=data, command_line=d.get("command_line"),
                       caloman_version=d["caloman_version"], torch_version=d["torch_version"],
                       numpy_version=d["numpy_version"], python_version=d.get("python_version", ""),
                       created=d.get("created", ""), files=dict(d.get("files") or {}),
                       world_size=int(d.get("world_size", 1)))
        except (KeyError, TypeError, ConfigError) as exc:
            raise RunDirectoryError(f"{source} lacks or has a malformed entry ({exc!r}); {remedy}") from exc

    @property
    def binning_key(self) -> str:
        """What :func:`~caloman.geometry.load_binning` takes for this run's binning: a shipped
        binning's name, else the path of its XML."""
        shipped = self.binning_source.startswith("caloman.binnings/") and self.binning_name in BUILTIN_BINNINGS
        return self.binning_name if shipped else self.binning_source

    def load_binning(self) -> Binning:
        try:
            binning = load_binning(self.binning_key)
        except BinningError as exc:
            raise RunDirectoryError(
                f"the run's binning cannot be loaded ({exc}); restore {self.binning_source}") from exc
        if binning.n_voxels != self.n_voxels:
            raise RunDirectoryError(f"binning {self.binning_source} now has {binning.n_voxels} voxels, the run was "
                                    f"trained with {self.n_voxels}; restore the original binning file")
        return binning


@dataclass(frozen=True)
class LoadedRun:
    """A finished run, ready to generate: the model (eval mode, trained weights),
    its binning, its configuration and training history."""

    model: ShowerModel
    binning: Binning
    config: RunConfig
    history: TrainingHistory
    run_dir: Path
    #: a refined run's config.json (:mod:`caloman.refinement.runs`); None for a trained run
    refinement: dict[str, Any] | None = None


def make_run_config(model: ShowerModel, binning: Binning, training: TrainingConfig, *,
                    data_path: str | Path | None = None, n_showers: int | None = None,
                    command_line: list[str] | None = None, world_size: int = 1) -> RunConfig:
    """Describe a run (not yet written). ``command_line`` defaults to ``sys.argv``."""
    return RunConfig(model_kind=model.kind, model_config=model.config_dict(), training=training,
                     binning_name=binning.name, binning_source=binning.source, n_voxels=binning.n_voxels,
                     data=DataSource.of(data_path, n_showers) if data_path is not None else None,
                     command_line=list(sys.argv) if command_line is None else command_line,
                     created=datetime.now(UTC).isoformat(timespec="seconds"), world_size=world_size)


def write_run_config(run_dir: str | Path, run_config: RunConfig) -> Path:
    """Write ``config.json`` atomically (creating the run directory)."""
    path = Path(run_dir) / CONFIG_FILE
    write_json(path, run_config.to_dict())
    return path


def read_run_config(run_dir: str | Path) -> RunConfig:
    """Read and check ``config.json`` of a run (finished or not)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir}: no such run directory; train one with "
                                "`caloman train FILE --binning B --model M --out RUN`")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{path} is missing: {run_dir} is not a caloman run directory or its training "
                                "never started; re-train with `caloman train ... --out RUN`")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"{path} is unreadable or not valid JSON ({exc}); re-train") from exc
    return RunConfig.from_dict(d, source=str(path))


def save_run(run_dir: str | Path, model: ShowerModel, binning: Binning, training: TrainingConfig,
             history: TrainingHistory, *, run_config: RunConfig | None = None, data_path: str | Path | None = None,
             n_showers: int | None = None, command_line: list[str] | None = None) -> Path:
    """Write the finished run: ``model.safetensors``, ``history.json``, then
    ``config.json`` with their checksums (written last, so a run directory whose
    config lists checksums is complete). ``run_config`` (e.g. the one written when
    training started) is kept if given, else made from the other arguments."""
    run_dir = Path(run_dir)
    if run_config is None:
        run_config = make_run_config(model, binning, training, data_path=data_path, n_showers=n_showers,
                                     command_line=command_line)
    model_sha = save_tensors(run_dir / MODEL_FILE, model.state_dict(),
                             metadata={"format": "caloman-model/1", "model_kind": model.kind})
    write_json(run_dir / HISTORY_FILE, history.to_dict())
    files = {MODEL_FILE: model_sha, HISTORY_FILE: sha256_file(run_dir / HISTORY_FILE)}
    write_run_config(run_dir, dataclasses.replace(run_config, training=training, files=files))
    return run_dir


def load_run(run_dir: str | Path, *, factory: ModelFactory | None = None, device: str | torch.device = "cpu"
             ) -> LoadedRun:
    """Load a finished run, checking every file.

    Raises :class:`RunDirectoryError` for a missing, truncated, altered or
    mismatched file (``config.json``, ``model.safetensors``, ``history.json``,
    weights whose tensors do not fit the model the config describes), naming it
    and saying what to do. ``factory`` rebuilds the untrained model from the
    config (default: :func:`caloman.models.build_model`). A refined run
    (``caloman refine``) loads with its base run, its model a
    :class:`~caloman.refinement.showers.RefinedModel`.
    """
    run_dir = Path(run_dir)
    from caloman.refinement.runs import is_refined_run, load_refined_run  # noqa: PLC0415 (torch-heavy)

    if is_refined_run(run_dir):  # a trained run with `caloman refine` on top: same interface
        return load_refined_run(run_dir, factory=factory, device=device)
    config = read_run_config(run_dir)
    resume_hint = _resume_hint(run_dir, config)
    if not config.finished:
        raise RunDirectoryError(f"{run_dir}: training has not finished ({CONFIG_FILE} lists no {MODEL_FILE}); "
                                f"{resume_hint}")
    weights = load_tensors(run_dir / MODEL_FILE, sha256=config.files[MODEL_FILE], what="final weights",
                           remedy=resume_hint)
    history_path = run_dir / HISTORY_FILE
    if not history_path.is_file():
        raise RunDirectoryError(f"{history_path} is missing; {resume_hint}")
    if sha256_file(history_path) != config.files.get(HISTORY_FILE):
        raise RunDirectoryError(f"{history_path} does not match its checksum in {CONFIG_FILE}: it is corrupt or "
                                f"was edited; {resume_hint}")
    try:
        history = TrainingHistory.from_dict(json.loads(history_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunDirectoryError(f"{history_path} is malformed ({exc!r}); {resume_hint}") from exc
    binning = config.load_binning()
    model = (factory or default_model_factory)(config.model_kind, config.model_config, binning)
    _check_weights_fit(model, weights, run_dir / MODEL_FILE)
    model.load_state_dict(weights, strict=True)
    model.to(device)
    model.eval()
    return LoadedRun(model=model, binning=binning, config=config, history=history, run_dir=run_dir)


def _resume_hint(run_dir: Path, config: RunConfig) -> str:
    if (run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file():
        data = config.data.path if config.data is not None else "FILE"
        return (f"finish or rewrite the run from its checkpoint with `caloman train {data} --binning "
                f"{config.binning_name} --model {config.model_kind} --out {run_dir} --resume`, or re-train")
    return "re-train the model (`caloman train ... --out RUN`)"


def _check_weights_fit(model: ShowerModel, weights: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    problems = [f"missing {k}" for k in sorted(set(expected) - set(weights))]
    problems += [f"unexpected {k}" for k in sorted(set(weights) - set(expected))]
    problems += [f"{k}: file {tuple(weights[k].shape)}, model {tuple(expected[k].shape)}"
                 for k in sorted(set(expected) & set(weights)) if weights[k].shape != expected[k].shape]
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise RunDirectoryError(
            f"{source} does not fit the model described in {CONFIG_FILE} ({'; '.join(problems[:5])}{more}): the "
            f"weights belong to another model configuration; restore the matching {CONFIG_FILE} or re-train")


def train_run(data_file: str | Path, binning: Binning | str | Path, run_dir: str | Path, *,
              model_kind: str = "caloman", profile: str = "quick", training: TrainingConfig | None = None,
              model_overrides: dict[str, Any] | None = None, model_profile: str | None = None,
              command_line: list[str] | None = None,
              builder: Callable[..., ShowerModel] | None = None,
              distributed: Distributed | None = None) -> LoadedRun:
    """Train a new model on a CaloChallenge file into ``run_dir`` and return it loaded.

    The one place a fresh run is built, trained and saved (used by ``caloman
    train``, ``caloman demo`` and ``caloman benchmark``). ``training`` defaults
    to the profile's :class:`TrainingConfig`; the initial weights follow its seed.
    The model is the kind's ``model_profile`` configuration (default: ``profile``, e.g. a
    full training of CaloFlow's ``paper``-sized networks) with ``model_overrides``.
    ``builder`` replaces :func:`caloman.models.build_model` (same signature).
    With ``max_showers`` a seeded random subset is used. ``distributed``: this
    process is one rank of a data-parallel run (:mod:`caloman.distributed`); every
    rank reads its own share of the file and rank 0 writes the run directory.
    """
    from caloman.models import build_model
    from caloman.training import seed_everything, train_split
    from caloman.training_data import load_training_data

    run_dir = Path(run_dir)
    if (run_dir / CONFIG_FILE).exists() or (run_dir / CHECKPOINT_DIR).exists():
        raise RunDirectoryError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
                                "output directory")
    binning = load_binning(binning)
    training = training if training is not None else TrainingConfig.profile(profile)
    seed_everything(training.seed)  # initial weights follow the seed too
    model = (builder or build_model)(model_kind, binning, profile=model_profile or profile,
                                     overrides=model_overrides or None)
    data = load_training_data(data_file, binning, training, distributed)
    run_config = make_run_config(model, binning, training, data_path=data_file, n_showers=data.n_showers,
                                 command_line=command_line,
                                 world_size=distributed.world_size if distributed is not None else 1)
    main = distributed is None or distributed.is_main
    if distributed is not None:
        distributed.barrier()  # every rank has seen that run_dir is new before rank 0 writes into it
    if main:
        write_run_config(run_dir, run_config)
    history = train_split(model, data, training, run_dir, distributed=distributed)
    if main:
        save_run(run_dir, model, binning, training, history, run_config=run_config)
    if distributed is not None:
        distributed.barrier()  # the run directory is complete before any rank reads it
    return LoadedRun(model=model, binning=binning, config=read_run_config(run_dir), history=history, run_dir=run_dir)
