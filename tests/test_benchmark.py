import numpy as np
import pytest
import torch

from caloman.benchmark import BenchmarkConfig, ReferenceSampler, count_parameters, render_markdown, time_sampler
from caloman.errors import ConfigError
from caloman.geometry import load_binning


def test_time_sampler_counts_per_shower():
    calls = []

    def sample(energies):
        calls.append(len(energies))
        return energies.unsqueeze(-1).repeat(1, 3)

    t = time_sampler(sample, np.array([1.0, 2.0, 3.0]), 5, min_seconds=0.0, min_calls=4, warmup_calls=2)
    assert t.batch_size == 5 and t.calls == 4 and t.ms_per_shower > 0
    assert calls == [5] * 6  # 2 warm-up + 4 timed, each a full batch


def test_reference_sampler_is_physical_and_conserves_layer_energy():
    torch.manual_seed(0)
    binning = load_binning("ds1-photons")
    sampler = ReferenceSampler(binning)
    energies = torch.tensor([256.0, 65536.0, 4194304.0])
    with torch.inference_mode():
        showers = sampler(energies)
    assert showers.shape == (3, 368)
    assert torch.isfinite(showers).all() and (showers >= 0).all()
    # layers are normalised and scaled by energies that sum to E_inc
    assert torch.allclose(showers.sum(-1), energies, rtol=1e-4)
    assert count_parameters(sampler) > 730_000  # the 3 x 512 decoder alone has 41*512 + 2*512*512 + 512*368


def test_config_validation():
    with pytest.raises(ConfigError):
        BenchmarkConfig(profile="huge")
    with pytest.raises(ConfigError):
        BenchmarkConfig(models=())
    with pytest.raises(ConfigError):
        BenchmarkConfig(batch_sizes=(0,))
    assert BenchmarkConfig(profile="full").train_per_energy * 15 >= 100_000


def _timings(values):
    return [{"batch_size": b, "device": "cpu", "ms_per_shower": v, "calls": 3, "threads": 2}
            for b, v in zip((1, 10_000), values)]


def test_markdown_tables_and_ratios():
    report = {
        "config": {"profile": "quick", "threads": 2, "batch_sizes": [1, 10_000], "classifier": "quick"},
        "machine": {"torch": "2.13", "cpu": "test cpu"},
        "date": "2026-01-01T00:00:00+00:00", "caloman_version": "0", "command": "caloman benchmark",
        "data": {"n_reference": 10, "simulator_ms_per_shower": float("nan")},
        "reference_sampler": _timings([4.0, 0.1]),
        "models": [
            {"model": "caloman", "parameters": 10, "training_seconds": 60.0, "training_peak_rss_mib": 100.0,
             "timings": _timings([1.0, 0.05]),
             "evaluation": {"separation_power": {"a": 0.01, "b": 0.3}, "classifier": {"low": {"auc": 0.6}},
                            "fpd": {"value": 1.5, "error": 0.1}, "kpd": None}},
            {"model": "caloflow", "parameters": 20, "training_seconds": None, "training_peak_rss_mib": None,
             "timings": _timings([100.0, 0.5]), "evaluation": {}},
        ],
    }
    md = render_markdown(report)
    assert "| caloman | 0.25 | 0.50 |" in md          # vs reference sampler: 1/4, 0.05/0.1
    assert "| caloflow | 100.00 | 10.00 |" in md       # vs CaloMan: 100/1, 0.5/0.05
    assert "| caloman | 10 | 1.0 min | 100 MiB |" in md
    assert "| caloman | 0.3000 | b | 0.600 |" in md
    assert "nan" not in md.lower()
    assert md.startswith("# caloman benchmark (quick profile)")   # older reports: no trained_with_profile
    assert render_markdown({**report, "trained_with_profile": []}).startswith("# caloman benchmark (given runs)")
    assert render_markdown({**report, "trained_with_profile": ["caloman"]}).startswith(
        "# caloman benchmark (quick profile)")
