"""Training loop, schedules, checkpoints and resume, with a tiny two-stage dummy model.

The dummy model (also imported by test_runs / test_generation) is a per-voxel
log-normal fit (stage "voxels": closed-form optimum = mean and std of
log(voxel + eps)) followed by a small MLP (stage "mlp") whose data depend on the
trained first stage and which draws random numbers in make_data and in its loss,
so resume must restore RNG states to reproduce an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from caloman.errors import ConfigError, RunDirectoryError, TrainingDivergedError
from caloman.geometry import load_binning
from caloman.models.base import NoiseBlock, NoiseShape, ShowerModel, Stage
from caloman.training import (
    TrainingConfig,
    TrainingHistory,
    learning_rate_at,
    seed_everything,
    split_indices,
    train_model,
)

torch.set_num_threads(1)

EPS = 1e-3


class LogNormalVoxels(nn.Module):
    def __init__(self, n_voxels: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(n_voxels))
        self.log_sigma = nn.Parameter(torch.zeros(n_voxels))

    def nll(self, y: torch.Tensor) -> torch.Tensor:
        z = (y - self.mu) * torch.exp(-self.log_sigma)
        return (0.5 * z**2 + self.log_sigma).mean()


class DummyModel(ShowerModel):
    """Stage 'voxels': log-normal per voxel; stage 'mlp': log E -> standardised log voxels."""

    kind = "dummy"

    def __init__(self, n_voxels: int, hidden: int = 8) -> None:
        super().__init__()
        self.n_voxels, self.hidden = n_voxels, hidden
        self.register_buffer("log_e_mean", torch.zeros(()))
        self.register_buffer("log_e_std", torch.ones(()))
        self.voxels = LogNormalVoxels(n_voxels)
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, n_voxels))

    def fit_preprocessing(self, incident_energies, showers):
        log_e = np.log(incident_energies)
        self.log_e_mean.fill_(float(log_e.mean()))
        self.log_e_std.fill_(float(log_e.std()) or 1.0)
        self.energy_range.copy_(torch.tensor([incident_energies.min(), incident_energies.max()]))

    def _condition(self, e):
        return ((torch.log(e) - self.log_e_mean) / self.log_e_std).unsqueeze(1)

    def _standardised(self, x):
        return (torch.log(x + EPS) - self.voxels.mu) * torch.exp(-self.voxels.log_sigma)

    def stages(self):
        def mlp_data(e, x):  # random jitter: make_data draws from the global RNG
            c = self._condition(e)
            return c + 0.01 * torch.randn_like(c), self._standardised(x)

        def mlp_loss(batch):  # and so does the loss
            c, target = batch
            return ((self.mlp(c) - target - 0.01 * torch.randn_like(target)) ** 2).mean()

        return [Stage("voxels", self.voxels, lambda e, x: (torch.log(x + EPS),), lambda b: self.voxels.nll(b[0])),
                Stage("mlp", self.mlp, mlp_data, mlp_loss)]

    def noise_shape(self):
        return NoiseShape((NoiseBlock("voxels", self.n_voxels),))

    def sample_from_noise(self, incident_energies, normal, uniform=None):
        z = self.mlp(self._condition(incident_energies)) + 0.1 * normal
        return (torch.exp(self.voxels.mu + torch.exp(self.voxels.log_sigma) * z) - EPS).clamp_min(0)

    def config_dict(self):
        return {"n_voxels": self.n_voxels, "hidden": self.hidden}


def dummy_factory(kind, config, binning):
    assert kind == "dummy"
    return DummyModel(**config)


TINY_BINNING_XML = """<Bins>
  <Bin name="photon" pid="22">
    <Layer id="0" r_edges="0,5,20" n_bin_alpha="3"/>
    <Layer id="1" r_edges="0" n_bin_alpha="1"/>
  </Bin>
</Bins>
"""


def tiny_binning(tmp_path):
    path = tmp_path / "tiny-binning.xml"
    path.write_text(TINY_BINNING_XML)
    return load_binning(path)


def toy_showers(n=60, n_voxels=6, seed=0):
    """Incident energies (n,) 1..100 GeV, log-normal voxels (n, n_voxels) in MeV."""
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n))
    fractions = np.exp(rng.normal(np.linspace(-3, -1, n_voxels), 0.5, (n, n_voxels)))
    return e, (e[:, None] * fractions).astype(np.float32)


def small_config(**kw):
    base = dict(epochs=3, batch_size=16, learning_rate=0.05, patience=0, seed=1, num_threads=1)
    return TrainingConfig(**{**base, **kw})


def fresh_model(seed=7, n_voxels=6):
    seed_everything(seed)
    return DummyModel(n_voxels)


class Interrupt(Exception):
    pass


# -- split, schedules, config ------------------------------------------------
def test_split_is_seeded_disjoint_and_complete():
    train, val = split_indices(100, 0.2, seed=3)
    train2, val2 = split_indices(100, 0.2, seed=3)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert len(val) == 20 and len(train) == 80
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    assert not np.array_equal(split_indices(100, 0.2, seed=4)[1], val)
    assert [len(s) for s in split_indices(2, 0.01, 0)] == [1, 1]  # never an empty side
    with pytest.raises(ConfigError):
        split_indices(1, 0.2, 0)


def test_cosine_schedule_with_warmup_closed_form():
    cfg = TrainingConfig(epochs=6, learning_rate=1.0, warmup_epochs=2, lr_schedule="cosine")
    lrs = [learning_rate_at(cfg, "s", e, []) for e in range(6)]
    expected = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected)
    cfg = TrainingConfig(epochs=6, learning_rate=1.0, stage_learning_rates={"s": 0.1}, stage_epochs={"s": 3},
                         lr_schedule="constant")
    assert learning_rate_at(cfg, "s", 2, []) == pytest.approx(0.1)
    assert learning_rate_at(cfg, "other", 2, []) == pytest.approx(1.0)


def test_plateau_schedule_halves_after_patience_flat_epochs():
    cfg = TrainingConfig(learning_rate=1.0, lr_schedule="plateau", plateau_patience=1, plateau_factor=0.5)
    losses = [3.0, 2.0, 2.5, 2.5, 1.0, 1.5, 1.5]
    lrs = [learning_rate_at(cfg, "s", e, losses[:e]) for e in range(len(losses) + 1)]
    # bad epochs after the best (2.0): 2.5, 2.5 -> second exceeds patience 1 -> halve; same after 1.0
    assert lrs == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25])


def test_training_config_profiles_and_validation():
    assert TrainingConfig.quick().epochs < TrainingConfig.full().epochs
    assert TrainingConfig.full().max_showers is None
    assert TrainingConfig.profile("quick", epochs=3).epochs == 3
    assert small_config(stage_epochs={"mlp": 5}).epochs_for("mlp") == 5
    for bad in (dict(epochs=0), dict(learning_rate=0.0), dict(lr_schedule="step"), dict(validation_fraction=1.0),
                dict(batch_size=0), dict(stage_epochs={"mlp": 0}), dict(device="tpu")):
        with pytest.raises(ConfigError):
            small_config(**bad)
    with pytest.raises(ConfigError, match="quick, full"):
        TrainingConfig.profile("huge")


# -- the loop ------------------------------------------------------------------
def test_loss_decreases_and_first_stage_reaches_closed_form(tmp_path):
    e, x = toy_showers(n=200)
    model = fresh_model()
    cfg = small_config(epochs=25, batch_size=8, learning_rate=0.1, stage_epochs={"mlp": 2})
    history = train_model(model, e, x, cfg, tmp_path / "run")
    voxels = history.stage("voxels")
    losses = [r.train_loss for r in voxels.epochs]
    assert losses[-1] < losses[0] - 1.0
    train_idx, _ = split_indices(len(e), cfg.validation_fraction, cfg.seed)
    y = np.log(x[train_idx].astype(np.float64) + EPS)
    # maximum-likelihood log-normal: mean and (population) std of log voxels
    assert model.voxels.mu.detach().numpy() == pytest.approx(y.mean(axis=0), abs=0.02)
    assert np.exp(model.voxels.log_sigma.detach().numpy()) == pytest.approx(y.std(axis=0), rel=0.03)
    assert history.n_train == 160 and history.n_validation == 40
    assert model.trained_energy_range() == pytest.approx((e[train_idx].min(), e[train_idx].max()))
    assert all(s.finished and s.seconds > 0 and s.peak_rss_mib > 0 for s in history.stages)


def test_later_stage_leaves_earlier_stage_weights_alone(tmp_path):
    e, x = toy_showers()
    model = fresh_model()
    after_first = {}

    def record(stage, rec):
        if stage == "mlp" and rec.epoch == 1:
            after_first["mu"] = model.voxels.mu.detach().clone()

    train_model(model, e, x, small_config(), tmp_path / "run", on_epoch_end=record)
    assert torch.equal(model.voxels.mu, after_first["mu"])
    assert all(p.requires_grad for p in model.parameters())  # freezing is undone


def test_nan_loss_raises_training_diverged_naming_stage_and_epoch(tmp_path):
    class Diverging(DummyModel):
        calls = 0

        def stages(self):
            stages = super().stages()
            inner = stages[1].loss

            def loss(batch):
                Diverging.calls += 1
                value = inner(batch)
                return value * float("nan") if Diverging.calls > 5 else value  # 4 batches/epoch: epoch 2

            stages[1].loss = loss
            return stages

    e, x = toy_showers()
    seed_everything(0)
    model = Diverging(6)
    with pytest.raises(TrainingDivergedError) as info:
        train_model(model, e, x, small_config(), tmp_path / "run")
    message = str(info.value)
    assert "'mlp'" in message and "epoch 2/3" in message and "learning rate" in message
    record = json.loads((tmp_path / "run/checkpoints/latest.json").read_text())
    assert record["stage_index"] == 1 and record["next_epoch"] == 1  # last good epoch kept


def test_early_stopping_restores_best_epoch_weights(tmp_path):
    class Walker(ShowerModel):
        """One parameter p walks from 0 towards 10 (training target); the
        validation target is 3, so validation loss is lowest near p = 3."""

        kind = "walker"

        def __init__(self):
            super().__init__()
            self.step = nn.Module()
            self.step.p = nn.Parameter(torch.zeros(()))

        def fit_preprocessing(self, incident_energies, showers):
            self.energy_range.copy_(torch.tensor([1.0, 2.0]))

        def stages(self):
            def loss(batch):
                target = 10.0 if self.step.training else 3.0
                return (self.step.p - target) ** 2 + 0 * batch[0].sum()

            return [Stage("walk", self.step, lambda e, x: (e,), loss)]

        def noise_shape(self):
            return NoiseShape(())

        def sample_from_noise(self, incident_energies, normal, uniform=None):
            return torch.zeros(len(incident_energies), 1)

    model = Walker()
    seen = {}
    cfg = small_config(epochs=30, batch_size=1000, learning_rate=1.0, lr_schedule="constant", patience=2,
                       grad_clip_norm=0.0)
    history = train_model(model, np.ones(10), np.ones((10, 1), np.float32), cfg, tmp_path / "run",
                          on_epoch_end=lambda s, r: seen.setdefault(r.epoch, model.step.p.item()))
    walk = history.stage("walk")
    best = min(walk.epochs, key=lambda r: r.val_loss)
    assert walk.stopped_early and len(walk.epochs) == best.epoch + 2 < 30
    assert walk.best_epoch == best.epoch
    assert model.step.p.item() == seen[best.epoch]  # the best epoch's weights, not the last
    assert abs(model.step.p.item() - 3.0) < 1.0
    # early stopping off for this stage alone: all 30 epochs, the best epoch's weights still kept
    model = Walker()
    history = train_model(model, np.ones(10), np.ones((10, 1), np.float32),
                          dataclasses.replace(cfg, stage_patience={"walk": 0}), tmp_path / "run-no-stop")
    walk = history.stage("walk")
    assert not walk.stopped_early and len(walk.epochs) == 30
    assert abs(model.step.p.item() - 3.0) < 1.0


# -- checkpoints and resume ----------------------------------------------------
def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    e, x = toy_showers()
    model = fresh_model()
    with pytest.raises(Interrupt):
        def stop(stage, rec):
            if stage == "mlp" and rec.epoch == 2:
                raise Interrupt

        train_model(model, e, x, small_config(), tmp_path / "run", on_epoch_end=stop)
    files = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert files[0].startswith("best-") and files[2].startswith("state-") and files[1] == "latest.json"
    assert len(files) == 3  # latest only, plus best
    record = json.loads((tmp_path / "run/checkpoints/latest.json").read_text())
    assert record["stage"] == "mlp" and record["stage_index"] == 1
    assert record["next_epoch"] == 2 and len(record["rng"]["torch"]) > 0
    assert record["optimizer"]["param_groups"][0]["lr"] == pytest.approx(learning_rate_at(small_config(), "mlp", 1,
                                                                                          []))
    tensors = load_file(str(tmp_path / "run/checkpoints" / record["files"]["state"]))
    assert torch.equal(tensors["model/voxels.mu"], model.voxels.mu.detach())
    assert any(k.startswith("optimizer/") for k in tensors)


def _interrupted_then_resumed(tmp_path, e, x, cfg, stop_at):
    """Train until the callback raises after (stage, epoch), then resume in a new model object."""
    run = tmp_path / "interrupted"

    def stop(stage, rec):
        if (stage, rec.epoch) == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_model(fresh_model(), e, x, cfg, run, on_epoch_end=stop)
    calls = []
    model = fresh_model(seed=99)  # different initial weights: everything must come from the checkpoint
    history = train_model(model, e, x, cfg, run, resume=True, on_epoch_end=lambda s, r: calls.append((s, r.epoch)))
    return model, history, calls


@pytest.mark.parametrize("stop_at", [("voxels", 2), ("voxels", 3), ("mlp", 1)])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, stop_at):
    e, x = toy_showers()
    cfg = small_config(stage_epochs={"voxels": 3, "mlp": 3})
    reference = fresh_model()
    ref_history = train_model(reference, e, x, cfg, tmp_path / "reference")
    model, history, calls = _interrupted_then_resumed(tmp_path, e, x, cfg, stop_at)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert [[r.train_loss for r in s.epochs] for s in history.stages] == \
        [[r.train_loss for r in s.epochs] for s in ref_history.stages]
    order = [("voxels", 1), ("voxels", 2), ("voxels", 3), ("mlp", 1), ("mlp", 2), ("mlp", 3)]
    assert calls == order[order.index(stop_at) + 1:]  # no finished epoch or stage is repeated


def test_crash_inside_an_epoch_loses_only_that_epoch(tmp_path):
    class Crashing(DummyModel):
        crash_at: int | None = None
        calls = 0

        def stages(self):
            stages = super().stages()
            inner = stages[0].loss

            def loss(batch):
                Crashing.calls += 1
                if Crashing.calls == Crashing.crash_at:
                    raise Interrupt  # e.g. the machine went down mid-epoch
                return inner(batch)

            stages[0].loss = loss
            return stages

    e, x = toy_showers()
    cfg = small_config(stage_epochs={"voxels": 4, "mlp": 1})
    reference = fresh_model()
    train_model(reference, e, x, cfg, tmp_path / "reference")
    Crashing.crash_at = 4 * 2 + 2  # 4 batches per epoch: second batch of epoch 3
    seed_everything(7)
    with pytest.raises(Interrupt):
        train_model(Crashing(6), e, x, cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run/checkpoints/latest.json").read_text())
    assert record["next_epoch"] == 2  # epochs 1 and 2 survive
    Crashing.crash_at = None
    model = Crashing(6)
    history = train_model(model, e, x, cfg, tmp_path / "run", resume=True)
    assert [r.epoch for r in history.stage("voxels").epochs] == [1, 2, 3, 4]
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_resume_refusals(tmp_path):
    e, x = toy_showers()
    cfg = small_config()
    with pytest.raises(RunDirectoryError, match="no checkpoint"):
        train_model(fresh_model(), e, x, cfg, tmp_path / "run", resume=True)
    train_model(fresh_model(), e, x, cfg, tmp_path / "run")
    with pytest.raises(RunDirectoryError, match="--resume"):
        train_model(fresh_model(), e, x, cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="learning_rate"):
        train_model(fresh_model(), e, x, small_config(learning_rate=0.01), tmp_path / "run", resume=True)
    with pytest.raises(RunDirectoryError, match="showers differ"):
        train_model(fresh_model(), e[:50], x[:50], cfg, tmp_path / "run", resume=True)
    # a finished run resumes to nothing: same weights, no extra epochs
    model = fresh_model(seed=5)
    history = train_model(model, e, x, cfg, tmp_path / "run", resume=True)
    assert [len(s.epochs) for s in history.stages] == [3, 3]


def test_corrupt_checkpoint_is_reported(tmp_path):
    e, x = toy_showers()
    train_model(fresh_model(), e, x, small_config(), tmp_path / "run")
    record = json.loads((tmp_path / "run/checkpoints/latest.json").read_text())
    state = tmp_path / "run/checkpoints" / record["files"]["state"]
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(RunDirectoryError, match="state-.*SHA-256"):
        train_model(fresh_model(), e, x, small_config(), tmp_path / "run", resume=True)


def test_history_round_trips_through_json(tmp_path):
    e, x = toy_showers()
    history = train_model(fresh_model(), e, x, small_config(), tmp_path / "run")
    again = TrainingHistory.from_dict(json.loads(json.dumps(history.to_dict())))
    assert again == history
    lines = history.summary_lines()
    assert len(lines) == 2 and lines[0].startswith("voxels: 3 epochs") and "MiB" in lines[0]


def test_max_showers_is_a_seeded_random_subset_the_same_from_file_or_arrays(tmp_path):
    """Files sorted by energy: the first N would be the lowest energies only."""
    from caloman.io import load_showers, write_showers
    from caloman.training_data import load_training_data, split_in_memory

    e, x = toy_showers(n=200)
    order = np.argsort(e)
    write_showers(tmp_path / "sorted.h5", e[order], x[order])
    e_file, x_file = load_showers(tmp_path / "sorted.h5")
    config = small_config(max_showers=50)
    from_arrays = split_in_memory(e_file, x_file, config)
    from_file = load_training_data(tmp_path / "sorted.h5", None, config)
    assert from_arrays.n_showers == from_file.n_showers == 50
    assert np.array_equal(from_arrays.incident_energies, from_file.incident_energies)
    assert np.array_equal(from_arrays.showers, from_file.showers)
    assert from_arrays.fingerprint == from_file.fingerprint
    assert np.all(np.diff(from_file.incident_energies) > 0)  # file order kept
    assert from_file.incident_energies.max() > np.median(e)  # not the 50 lowest energies
    other = split_in_memory(e_file, x_file, small_config(max_showers=50, seed=2))
    assert not np.array_equal(other.incident_energies, from_arrays.incident_energies)
