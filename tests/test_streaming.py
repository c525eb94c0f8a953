"""Streamed training (``TrainingConfig.stream_chunk_showers``): the rows read from the file,
the preprocessing and stage constants fitted chunk by chunk, the per-epoch chunk order,
and CaloMan trained streamed against in memory (same weights when one chunk holds the
split; trains and resumes exactly with smaller chunks)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from caloman.cli import main
from caloman.errors import ConfigError
from caloman.geometry import load_binning
from caloman.io import write_showers
from caloman.models import build_model
from caloman.models.base import Stage
from caloman.models.mflow import MFlowAutoencoder
from caloman.preprocessing import make_preprocessing
from caloman.stage_data import StreamedHeldStageData, StreamedStageData
from caloman.training import TrainingConfig, seed_everything, train_model, train_split
from caloman.training_data import SplitData, StreamedSplit, cached_split, iter_chunks, load_training_data
from test_generation import write_caloman_toy
from test_training import Interrupt, fresh_model, toy_showers

torch.set_num_threads(1)

# Poisson voxel noise: its calibration takes a fraction of a second; the spot noise's takes tens
# of seconds on a busy CPU (its streamed fit is checked in a slow test)
TINY = dict(hidden=(16,), flow_hidden=(8,), layer_flow_hidden=(8,), latent_dim=3, voxel_noise="poisson")


def _config(**kw):
    return TrainingConfig(**{**dict(epochs=2, batch_size=32, num_threads=1, seed=1, patience=0), **kw})


def _caloman(**overrides):
    seed_everything(1)
    return build_model("caloman", load_binning("ds1-photons"), profile="quick", overrides={**TINY, **overrides})


def _ds1_showers(seed, n=250):
    """Incident energies (n,) 256 MeV..4 TeV and gamma-distributed dataset-1 photon showers (n, 368) MeV."""
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(np.log(256), np.log(4e6), n))
    return e, (rng.gamma(0.3, 1.0, (n, 368)) * e[:, None] / 300).astype(np.float32)


def _in_chunks(e, x, size=60):
    return lambda: ((e[i:i + size], x[i:i + size]) for i in range(0, len(e), size))


# -- the option ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-1, 16, True, 2.5])
def test_bad_stream_chunk_showers_is_a_config_error(value):
    with pytest.raises(ConfigError, match="stream_chunk_showers"):
        TrainingConfig(batch_size=32, stream_chunk_showers=value)
    assert TrainingConfig(batch_size=32, stream_chunk_showers=32).stream_chunk_showers == 32


@pytest.mark.parametrize("settings", [dict(stream_cache=True), dict(stream_cache=1, stream_chunk_showers=32)])
def test_stream_cache_needs_streaming_and_a_bool(settings):
    with pytest.raises(ConfigError, match="stream_cache"):
        TrainingConfig(batch_size=32, **settings)


def test_cli_rejects_a_bad_chunk_size_with_exit_code_2(tmp_path, capsys):
    write_caloman_toy(tmp_path, n=40, batch_size=16)
    code = main(["train", str(tmp_path / "train.h5"), "--out", str(tmp_path / "run"), "--config",
                 str(tmp_path / "cfg.toml"), "--stream-chunk-showers", "8"])
    assert code == 2 and "stream_chunk_showers" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_model_without_a_streaming_fit_is_refused(tmp_path):
    e, x = toy_showers()
    with pytest.raises(ConfigError, match="cannot train streamed"):
        train_model(fresh_model(), e, x, _config(batch_size=16, stream_chunk_showers=16), tmp_path / "run")


# -- data and preprocessing --------------------------------------------------------------------
def test_streamed_split_reads_the_rows_the_in_memory_split_holds(tmp_path):
    e, x = toy_showers(n=90)
    write_showers(tmp_path / "f.h5", e, x)
    for max_showers in (None, 70):
        memory = load_training_data(tmp_path / "f.h5", None, _config(max_showers=max_showers))
        streamed = load_training_data(tmp_path / "f.h5", None, _config(max_showers=max_showers,
                                                                       stream_chunk_showers=32))
        assert isinstance(memory, SplitData) and isinstance(streamed, StreamedSplit)
        assert streamed.fingerprint == memory.fingerprint and streamed.n_showers == memory.n_showers
        for idx in ("train_idx", "val_idx"):
            positions = getattr(memory, idx)
            assert np.array_equal(getattr(streamed, idx), positions)
            for got, want in zip(streamed.read(positions), memory.read(positions)):
                np.testing.assert_array_equal(got, want)


def test_the_stream_cache_reads_what_the_file_holds_and_is_rewritten_for_other_rows(tmp_path):
    e, x = toy_showers(n=90)
    write_showers(tmp_path / "f.h5", e, x)
    streamed = load_training_data(tmp_path / "f.h5", None, _config(max_showers=70, stream_chunk_showers=32))
    cached = cached_split(streamed, tmp_path / "run" / "stream-cache.h5")
    assert cached.fingerprint == streamed.fingerprint and np.array_equal(cached.rows, np.arange(70))
    for positions in (streamed.train_idx, streamed.val_idx, streamed.train_idx[5:40]):
        for got, want in zip(cached.read(positions), streamed.read(positions)):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    other = load_training_data(tmp_path / "f.h5", None, _config(max_showers=60, stream_chunk_showers=32))
    recached = cached_split(other, tmp_path / "run" / "stream-cache.h5")  # not the copy of these rows
    for got, want in zip(recached.read(other.val_idx), other.read(other.val_idx)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["per-layer", "paper"])
def test_preprocessing_fitted_chunk_by_chunk_equals_the_whole_fit(name):
    binning = load_binning("ds1-photons")
    e, x = _ds1_showers(3)
    whole = make_preprocessing(name, binning).fit(e, x).state()
    pipeline = make_preprocessing(name, binning)
    for start in range(0, 250, 60):
        pipeline.partial_fit(e[start:start + 60], x[start:start + 60])
    assert pipeline.state() == whole
    # refitting starts afresh
    assert make_preprocessing(name, binning).fit(e[:10], x[:10]).fit(e, x).state() == whole

    memory, streamed = _caloman(preprocessing=name, reconstruction_loss="mse"), _caloman(preprocessing=name,
                                                                                        reconstruction_loss="mse")
    memory.fit_preprocessing(e, x)
    streamed.fit_preprocessing_chunks(_in_chunks(e, x))
    for key, value in memory.state_dict().items():
        assert torch.equal(streamed.state_dict()[key], value), key


@pytest.mark.parametrize("kind", ["caloflow", "ambient-flow"])
def test_other_models_fit_their_preprocessing_chunk_by_chunk_as_a_whole(kind):
    e, x = _ds1_showers(4)
    whole, chunked = (build_model(kind, load_binning("ds1-photons"), profile="quick") for _ in range(2))
    whole.fit_preprocessing(e, x)
    chunked.fit_preprocessing_chunks(_in_chunks(e, x))
    fitted = dict(chunked.named_buffers())
    for key, value in whole.named_buffers():  # the fitted constants (weights are random)
        torch.testing.assert_close(fitted[key], value, rtol=1e-12, atol=0, msg=key)


@pytest.mark.parametrize("noise", ["poisson", pytest.param("poisson-gamma", marks=pytest.mark.slow)])
def test_stage_constants_fitted_streamed_match_the_in_memory_fit(noise):
    """The latent standardisation and the voxel noise, fitted from chunks (stage.fit) and from
    the whole split (the first make_data call); no random dequantisation, so both see the same codes."""
    rng = np.random.default_rng(0)
    e = np.exp(rng.uniform(np.log(256), np.log(4e6), 300))
    x = rng.gamma(0.3, 1.0, (300, 368)) * (rng.uniform(size=(300, 368)) < 0.4)
    x = torch.as_tensor(x * (0.9 * e / np.maximum(x.sum(axis=1), 1e-3))[:, None], dtype=torch.float32)
    e = torch.as_tensor(e, dtype=torch.float32)
    memory, streamed = (_caloman(voxel_noise=noise, dequantise_empty_layers=False) for _ in range(2))
    for model in (memory, streamed):
        model.fit_preprocessing(e.numpy(), x.numpy())
        model.eval()
    with torch.no_grad():
        memory.stages()[-1].make_data(e, x)
        streamed.stages()[-1].fit(lambda: ((e[i:i + 70], x[i:i + 70]) for i in range(0, 300, 70)))
    assert bool(streamed.latent_fitted)
    for key in ("latent_mean", "latent_std", "voxel_quanta", "voxel_quanta_table"):
        torch.testing.assert_close(getattr(streamed, key), getattr(memory, key), rtol=1e-4, atol=1e-5)
    if noise == "poisson":
        assert bool((streamed.voxel_quanta_table > 0).any())
    else:
        assert torch.equal(streamed.spot_shapes, memory.spot_shapes)
        torch.testing.assert_close(streamed.spot_scales, memory.spot_scales, rtol=0.05, atol=1e-4)


@pytest.mark.parametrize("flow_features", [0, 6])
def test_mflow_input_whitening_from_chunks_matches_the_whole_fit(flow_features):
    x = torch.randn(200, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    whole, chunked = (MFlowAutoencoder(8, 2, layer_sizes=[4, 4], flow_features=flow_features) for _ in range(2))
    whole.fit_inputs(x.float())
    chunked.fit_inputs_chunks(lambda: (x[i:i + 64].float() for i in range(0, 200, 64)))
    torch.testing.assert_close(chunked.centre, whole.centre)
    torch.testing.assert_close(chunked.scale, whole.scale, rtol=1e-4, atol=1e-5)
    # eigenvectors are defined up to sign
    torch.testing.assert_close((chunked.basis.T @ whole.basis).abs(), torch.eye(chunked.basis.shape[1]),
                               rtol=0, atol=1e-4)


# -- chunk order ----------------------------------------------------------------------------
def test_each_epoch_visits_every_row_once_in_a_new_seeded_order():
    e, x = toy_showers(n=100)
    data = SplitData(e, x, np.arange(80), np.arange(80, 100), 100, "")
    stage = Stage("rows", torch.nn.Linear(1, 1), lambda e, x: (e,), lambda batch: batch[0].sum())
    model = fresh_model()
    streamed = StreamedStageData(model, stage, data, torch.device("cpu"), None, chunk_showers=32, fit=True,
                                 val_seed=[0])

    def epoch(key):
        return [float(t[0][i]) for t, order in streamed.train_chunks(key) for i in order]

    first, second = epoch([1, 0, 0]), epoch([1, 0, 1])
    assert sorted(first) == sorted(np.float32(e[:80]).tolist()) and len(set(first)) == 80
    assert first != second and first == epoch([1, 0, 0])
    chunk_sizes = [len(t[0]) for t, _ in streamed.train_chunks([1, 0, 0])]
    assert sorted(chunk_sizes) == [16, 32, 32]
    assert streamed.n_batches(10) == 4 + 4 + 2
    assert np.concatenate([t[0].numpy() for t in streamed.val_chunks()]).tolist() == np.float32(e[80:]).tolist()


def test_a_compact_stage_is_read_once_and_held_with_the_rows_the_chunks_hold():
    e, x = toy_showers(n=100)
    data = SplitData(e, x, np.arange(80), np.arange(80, 100), 100, "")
    calls = []

    def make_data(energies, showers):
        calls.append(len(energies))
        return energies, torch.rand(len(energies))  # a random draw: seeded per chunk

    stage = Stage("codes", torch.nn.Linear(1, 1), make_data, lambda batch: batch[0].sum(), compact=True)

    def held(fit):
        return StreamedHeldStageData(fresh_model(), stage, data, torch.device("cpu"), None, chunk_showers=32,
                                     fit=fit, val_seed=[0])

    first = held(fit=True)
    assert calls == [32, 32, 16, 20]  # the training chunks, then the validation chunk, once
    orders = [[float(t[0][i]) for t, order in first.train_chunks([1, 0, k]) for i in order] for k in range(2)]
    assert calls == [32, 32, 16, 20]  # epochs read nothing
    assert sorted(orders[0]) == sorted(np.float32(e[:80]).tolist()) and orders[0] != orders[1]
    assert first.n_batches(10) == 8
    assert first.val[0].tolist() == np.float32(e[80:]).tolist()
    torch.rand(5)  # the global stream moves on: a resumed stage builds the same tensors all the same
    again = held(fit=False)
    for a, b in zip(first.train + first.val, again.train + again.val):
        assert torch.equal(a, b)


# -- CaloMan end to end --------------------------------------------------------------------------
def test_one_chunk_holding_the_split_trains_exactly_as_in_memory(tmp_path):
    write_caloman_toy(tmp_path, n=120, batch_size=32)
    states = []
    for name, chunk in (("memory", 0), ("streamed", 120)):
        config = _config(stream_chunk_showers=chunk)
        data = load_training_data(tmp_path / "train.h5", "ds1-photons", config)
        model = _caloman()
        train_split(model, data, config, tmp_path / name)
        states.append(model.state_dict())
    assert isinstance(data, StreamedSplit)
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key


@pytest.mark.parametrize("stop_at", [("autoencoder", 1), ("latent_flow", 1)])
def test_streamed_training_in_small_chunks_resumes_to_the_uninterrupted_result(tmp_path, stop_at):
    write_caloman_toy(tmp_path, n=150, batch_size=32)
    config = _config(stream_chunk_showers=40)
    data = load_training_data(tmp_path / "train.h5", "ds1-photons", config)
    reference = _caloman()
    history = train_split(reference, data, config, tmp_path / "reference")
    assert all(s.finished and np.isfinite(s.best_val_loss) for s in history.stages)

    def stop(stage, record):
        if (stage, record.epoch) == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_split(_caloman(), data, config, tmp_path / "run", on_epoch_end=stop)
    seed_everything(5)
    resumed = build_model("caloman", load_binning("ds1-photons"), profile="quick", overrides=TINY)
    train_split(resumed, data, config, tmp_path / "run", resume=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_cached_streamed_run_trains_as_from_the_file_resumes_from_its_cache_and_removes_it(tmp_path,
                                                                                              monkeypatch):
    write_caloman_toy(tmp_path, n=150, batch_size=32)
    config = _config(stream_chunk_showers=40)
    data = load_training_data(tmp_path / "train.h5", "ds1-photons", config)
    reference = _caloman()
    train_split(reference, data, config, tmp_path / "reference")

    def stop(stage, record):
        if (stage, record.epoch) == ("autoencoder", 1):
            raise Interrupt

    cached = dataclasses.replace(config, stream_cache=True)
    with pytest.raises(Interrupt):
        train_split(_caloman(), data, cached, tmp_path / "run", on_epoch_end=stop)
    assert (tmp_path / "run" / "stream-cache.h5").is_file()  # kept for the resume

    def no_rewrite(*args, **kwargs):
        raise AssertionError("the cache of the same rows was written again")

    monkeypatch.setattr("caloman.training_data.atomic_path", no_rewrite)
    resumed = _caloman()
    train_split(resumed, data, cached, tmp_path / "run", resume=True)
    assert not (tmp_path / "run" / "stream-cache.h5").exists()
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_resume_refuses_to_switch_between_streamed_and_in_memory(tmp_path):
    write_caloman_toy(tmp_path, n=100, batch_size=32)
    config = _config(epochs=1, stream_chunk_showers=32)
    data = load_training_data(tmp_path / "train.h5", "ds1-photons", config)

    def stop(stage, record):
        raise Interrupt

    with pytest.raises(Interrupt):
        train_split(_caloman(), data, config, tmp_path / "run", on_epoch_end=stop)
    with pytest.raises(ConfigError, match="stream_chunk_showers"):
        train_split(_caloman(), data, _config(epochs=1), tmp_path / "run", resume=True)


def test_cli_trains_streamed_and_the_run_generates(tmp_path):
    write_caloman_toy(tmp_path, n=120, batch_size=32)
    run = tmp_path / "run"
    assert main(["-q", "train", str(tmp_path / "train.h5"), "--out", str(run), "--config", str(tmp_path / "cfg.toml"),
                 "--latent-dim", "3", "--model-option", "voxel_noise=poisson", "--stream-chunk-showers", "40"]) == 0
    assert json.loads((run / "config.json").read_text())["training"]["stream_chunk_showers"] == 40
    assert main(["-q", "train", str(tmp_path / "train.h5"), "--out", str(run), "--resume",
                 "--stream-chunk-showers", "64"]) == 2  # a stored setting
    assert main(["-q", "generate", str(run), "--energy", "10 GeV", "--count", "5", "--out",
                 str(tmp_path / "gen.h5")]) == 0


def test_chunk_iteration_covers_the_positions_in_order():
    e, x = toy_showers(n=50)
    data = SplitData(e, x, np.arange(50), np.arange(0), 50, "")
    chunks = list(iter_chunks(data, np.arange(5, 50), 20))
    assert [len(c[0]) for c in chunks] == [20, 20, 5]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), x[5:])


@pytest.mark.slow
def test_two_processes_train_streamed_and_the_run_generates(tmp_path):
    """DistributedDataParallel with streaming: each rank streams its own share of the file."""
    from caloman.runs import load_run
    from test_distributed import _cli_rank, _spawn

    write_caloman_toy(tmp_path, n=160, batch_size=32, extra_training="stream_chunk_showers = 32\n")
    run = tmp_path / "run"
    _spawn(_cli_rank, [["-q", "train", str(tmp_path / "train.h5"), "--model", "caloman", "--out", str(run),
                        "--config", str(tmp_path / "cfg.toml"), "--latent-dim", "3",
                        "--model-option", "voxel_noise=poisson"]], False)
    history = json.loads((run / "history.json").read_text())
    assert history["n_train"] == 128 and all(s["finished"] for s in history["stages"])
    load_run(run)
    assert main(["-q", "generate", str(run), "--energy", "10 GeV", "--count", "5", "--out",
                 str(tmp_path / "gen.h5")]) == 0


def test_every_nth_regroups_a_strided_pass_like_slicing_all_showers():
    from caloman.models.caloman import _every_nth, _tensor_chunks

    e = torch.arange(103.0)
    x = torch.stack([e, -e], dim=1)
    pieces = list(_every_nth(_tensor_chunks(e, x, 17), 3, 10))
    assert [len(p[0]) for p in pieces] == [10, 10, 10, 5]
    assert torch.equal(torch.cat([p[0] for p in pieces]), e[::3])
    assert torch.equal(torch.cat([p[1] for p in pieces]), x[::3])
