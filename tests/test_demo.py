"""The main job end to end (slow: a few minutes on two cores)."""

import json

import pytest

from caloman.cli import main
from caloman.io import ShowerFile


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--classifier", "none"]) == 0
    report = (out / "report.md").read_text()
    assert "not Geant4" in report and "ms per shower" in report
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(metrics["separation_power"]) >= {"E_tot/E_inc", "E_layer_0", "sparsity_layer_12", "voxel_energy"}
    assert all(v is None or 0 <= v <= 1 for v in metrics["separation_power"].values())
    with ShowerFile(out / "generated.h5", "ds1-photons") as f:
        assert f.n_showers == 6000
    assert (out / "run" / "model.safetensors").exists() and (out / "dimension" / "dimension.json").exists()
    timings = json.loads((out / "timings.json").read_text())
    assert {t["batch_size"] for t in timings["generation"]} == {1, 100, 10_000}
    run_latent = json.loads((out / "run" / "config.json").read_text())["model"]["config"]["latent_dim"]
    assert timings["latent_dim"] == run_latent and f"latent dimension of the run: **{run_latent}**" in report
    # a second run re-uses the simulated data and the finished run
    assert main(["-q", "demo", "--out", str(out), "--classifier", "none"]) == 0
