"""Sharded generation and `caloman merge`: the merged parts equal the unsharded file,
and part sets that do not form one generation are refused with ShardError."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import caloman.runs
from caloman.cli import main
from caloman.errors import ConfigError, ShardError
from caloman.io import ShowerFile, ShowerWriter, write_showers
from caloman.runs import save_run
from caloman.shards import Shard, merge_shards, shard_attrs
from caloman.training import TrainingHistory
from test_training import dummy_factory, fresh_model, small_config, tiny_binning

torch.set_num_threads(1)


def test_shards_split_whole_chunks_evenly_and_completely():
    for n, batch, count in [(23, 4, 3), (100, 10, 10), (7, 1, 2), (50, 7, 4)]:
        ranges = [Shard(i, count).chunk_range(n, batch) for i in range(1, count + 1)]
        assert ranges[0][:2] == (0, 0) and ranges[-1][2] == n
        for (_, a0, b0), (c1, a1, b1) in zip(ranges, ranges[1:]):
            assert b0 == a1 == c1 * batch and b0 > a0 and b1 > a1  # contiguous, whole chunks, none empty
    assert Shard.parse(" 2/ 4") == Shard(2, 4)
    for bad in ("0/4", "5/4", "2-4", "a/b"):
        with pytest.raises(ConfigError):
            Shard.parse(bad)
    with pytest.raises(ConfigError, match="--batch-size 3 or less"):
        Shard(1, 3).chunk_range(10, 5)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(caloman.runs, "default_model_factory", dummy_factory)
    binning = tiny_binning(tmp_path)
    model = fresh_model()
    model.energy_range.copy_(torch.tensor([1e3, 1e5]))
    save_run(tmp_path / "run", model, binning, small_config(), TrainingHistory(), command_line=[])
    energies = np.geomspace(1e3, 1e5, 23)
    write_showers(tmp_path / "ref.h5", energies, np.ones((23, 6), dtype=np.float32))
    return tmp_path / "run"


def _generate(run_dir, out, *extra):
    return main(["-q", "generate", str(run_dir), "--energies-from", str(run_dir.parent / "ref.h5"),
                 "--batch-size", "4", "--seed", "3", "--out", str(out), *extra])


def _read(path):
    with ShowerFile(path) as f:
        return f.incident_energies, f.read()[1], f.attrs


def test_shards_merged_in_any_order_equal_the_unsharded_file(run_dir, tmp_path):
    assert _generate(run_dir, tmp_path / "whole.h5") == 0
    parts = [tmp_path / f"part{i}.h5" for i in (1, 2, 3)]
    for i, part in enumerate(parts, start=1):
        assert _generate(run_dir, part, "--shard", f"{i}/3") == 0
    sizes = [ShowerFile(p, check_values=False).n_showers for p in parts]
    assert sizes == [8, 8, 7]  # 6 chunks of 4 (the last 3) in whole chunks
    assert main(["-q", "merge", *map(str, parts[::-1]), "--out", str(tmp_path / "merged.h5")]) == 0
    e_whole, x_whole, _ = _read(tmp_path / "whole.h5")
    e_merged, x_merged, attrs = _read(tmp_path / "merged.h5")
    assert np.array_equal(e_whole, e_merged) and np.array_equal(x_whole, x_merged)
    assert attrs["merged_shards"] == 3 and "shard_index" not in attrs and attrs["seed"] == 3
    # a different seed gives different showers: the equality above is not vacuous
    assert _generate(run_dir, tmp_path / "other.h5", "--seed", "4") == 0
    assert not np.array_equal(_read(tmp_path / "other.h5")[1], x_whole)


def test_bad_part_sets_are_refused_and_write_nothing(run_dir, tmp_path):
    parts = [tmp_path / f"part{i}.h5" for i in (1, 2, 3)]
    for i, part in enumerate(parts, start=1):
        assert _generate(run_dir, part, "--shard", f"{i}/3") == 0
    assert _generate(run_dir, tmp_path / "again2.h5", "--shard", "2/3") == 0
    assert _generate(run_dir, tmp_path / "seed9.h5", "--shard", "2/3", "--seed", "9") == 0
    out = tmp_path / "merged.h5"
    cases = {
        "missing": ([parts[0], parts[2]], "shard\\(s\\) 2 of 3 missing"),
        "duplicate index": ([*parts, tmp_path / "again2.h5"], "are both shard 2/3"),
        "same file twice": ([*parts, parts[1]], "given more than once"),
        "other seed": ([parts[0], tmp_path / "seed9.h5", parts[2]], "different generations \\(seed 9 vs 3\\)"),
        "not a part": ([*parts, run_dir.parent / "ref.h5"], "is not a part of a sharded generation"),
        "output is a part": ([*parts[:2], out], "is one of the parts"),
    }
    for name, (given, message) in cases.items():
        if name == "output is a part":
            out.write_bytes(parts[2].read_bytes())
            with pytest.raises(ShardError, match=message):
                merge_shards(given, out)
            out.unlink()
            continue
        with pytest.raises(ShardError, match=message):
            merge_shards(given, out)
        assert main(["-q", "merge", *map(str, given), "--out", str(out)]) == 2, name
        assert not out.exists(), name


def test_damaged_part_rows_or_energies_are_refused(run_dir, tmp_path):
    parts = [tmp_path / f"part{i}.h5" for i in (1, 2)]
    for i, part in enumerate(parts, start=1):
        assert _generate(run_dir, part, "--shard", f"{i}/2") == 0
    with h5py.File(parts[1], "a") as h5:
        h5["incident_energies"][0] = 2e3
    with pytest.raises(ShardError, match="incident energies differ"):
        merge_shards(parts, tmp_path / "merged.h5")
    assert not (tmp_path / "merged.h5").exists()
    with h5py.File(parts[1], "a") as h5:
        h5.attrs["shard_start"] = 4
    with pytest.raises(ShardError, match="should hold rows 12.."):
        merge_shards(parts, tmp_path / "merged.h5")


def test_weights_are_carried(tmp_path):
    energies = np.geomspace(1e3, 1e5, 10)
    showers = np.random.default_rng(0).exponential(1.0, (10, 6)).astype(np.float32)
    weights = np.linspace(0.5, 1.5, 10)
    common = {"seed": 0, "batch_size": 5, "run_dir": "r", "model_kind": "dummy", "binning": "tiny"}
    paths = []
    for index, (start, stop) in enumerate([(0, 5), (5, 10)], start=1):
        paths.append(tmp_path / f"w{index}.h5")
        attrs = {**common, **shard_attrs(Shard(index, 2), energies, start, stop)}
        with ShowerWriter(paths[-1], 6, attrs=attrs, weights=True) as w:
            w.append(energies[start:stop], showers[start:stop], weights[start:stop])
    merge_shards(paths, tmp_path / "merged.h5")
    with ShowerFile(tmp_path / "merged.h5") as f:
        assert np.allclose(f.read_weights(), weights) and np.array_equal(f.read()[1], showers)
