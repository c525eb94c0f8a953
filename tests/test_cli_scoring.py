"""End to end through the command line: ``caloman components`` and ``caloman ood`` on a tiny
trained CaloMan run (one epoch per stage, so the numbers mean nothing; the files and their
fields do)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from caloman.cli import main
from caloman.io import write_showers
from test_generation import write_caloman_toy


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("caloman.models.caloman")
    tmp_path = tmp_path_factory.mktemp("scoring")
    write_caloman_toy(tmp_path, n=240, batch_size=64)  # for its tiny cfg.toml; the showers are replaced
    # three discrete incident energies (as in the CaloChallenge's dataset 1), 80 showers each
    rng = np.random.default_rng(1)
    e = np.repeat([1e3, 1e4, 1e5], 80)
    x = rng.gamma(0.3, 1.0, (240, 368)) * (rng.uniform(size=(240, 368)) < 0.4)
    x = (x * (0.9 * e / np.maximum(x.sum(axis=1), 1e-3))[:, None]).astype(np.float32)
    write_showers(tmp_path / "train.h5", e, x, binning="ds1-photons")
    run = tmp_path / "run"
    assert main(["-q", "train", str(tmp_path / "train.h5"), "--binning", "ds1-photons", "--model", "caloman",
                 "--out", str(run), "--config", str(tmp_path / "cfg.toml"), "--latent-dim", "3"]) == 0
    return tmp_path, run


def test_components_writes_its_report_and_fails_cleanly(tiny_run, capsys):
    tmp_path, run = tiny_run
    out = tmp_path / "components"
    assert main(["-q", "components", str(run), "--data", str(tmp_path / "train.h5"), "--out", str(out),
                 "--dims", "2", "--points", "40", "--epochs", "2", "--samples", "60", "--threads", "1"]) == 0
    report = json.loads((out / "components.json").read_text())
    assert report["config"]["dims"] == 2 and report["seed"] == 0
    rows = report["energies"]
    assert [row["incident_energy"] for row in rows] == [1e3, 1e4, 1e5]
    assert all(row["showers"] == 80 and row["components"] >= 1 and math.isfinite(row["data_mean_norm_f"])
               for row in rows)
    assert (out / "components.md").read_text().strip()
    assert "components.json" in capsys.readouterr().out
    missing = tmp_path / "components-missing"
    assert main(["-q", "components", str(run), "--data", str(tmp_path / "absent.h5"), "--out", str(missing)]) == 2
    assert not missing.exists()


def test_ood_writes_its_report_and_fails_cleanly(tiny_run):
    tmp_path, run = tiny_run
    out = tmp_path / "ood"
    assert main(["-q", "ood", str(run), "--data", str(tmp_path / "train.h5"), "--out", str(out),
                 "--max-showers", "120", "--threads", "1"]) == 0
    report = json.loads((out / "ood.json").read_text())
    assert report["run"] == str(run) and report["data"] == str(tmp_path / "train.h5")
    assert report["results"] and all(0.0 <= auroc <= 1.0 for r in report["results"] for auroc in r["auroc"].values())
    assert (out / "ood.md").read_text().strip()
    bad = tmp_path / "ood-bad"
    assert main(["-q", "ood", str(run), "--data", str(tmp_path / "train.h5"), "--out", str(bad),
                 "--defects", "no-such-defect"]) == 2
    assert not bad.exists()
