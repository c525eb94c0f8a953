import json

import numpy as np
import pytest

from caloman.cli import main
from caloman.io import write_showers

TINY_XML = """<Bins>
  <Bin pid="22" name="photon">
    <Layer id="0" r_edges="0,5,20" n_bin_alpha="1"/>
    <Layer id="1" r_edges="0,2,6,30" n_bin_alpha="4"/>
  </Bin>
</Bins>
"""


def _files(tmp_path, v=368, n=150):
    rng = np.random.default_rng(0)
    paths = []
    for name, scale in (("ref.h5", 1.0), ("gen.h5", 1.1)):
        incident = 2.0 ** rng.integers(8, 12, n)
        showers = rng.gamma(0.5, 1.0, (n, v)) * (rng.random((n, v)) < 0.5) * scale * incident[:, None] / (0.25 * v)
        paths.append(write_showers(tmp_path / name, incident, showers.astype(np.float32)))
    return paths


def test_cli_end_to_end_and_self_comparison(tmp_path, capsys):
    ref, gen = _files(tmp_path)
    common = ["--binning", "ds1-photons", "--classifier", "none", "--no-plots", "--no-distances"]
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--out", str(tmp_path / "o"),
                 *common]) == 0
    out = capsys.readouterr().out
    assert "evaluated 150 generated against 150 reference showers" in out
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["separation_power"]["E_tot/E_inc"] > 0
    assert (tmp_path / "o" / "summary.md").exists()

    assert main(["evaluate", "--generated", str(ref), "--reference", str(ref), "--out", str(tmp_path / "self"),
                 "--max-showers", "100", "--seed", "7", *common]) == 0
    metrics = json.loads((tmp_path / "self" / "metrics.json").read_text())
    assert metrics["n_showers"]["reference"] == 100 and metrics["seed"] == 7
    assert all(value == 0.0 for value in metrics["separation_power"].values())


def test_cli_writes_plots_for_a_custom_binning(tmp_path):
    xml = tmp_path / "tiny.xml"
    xml.write_text(TINY_XML)
    ref, gen = _files(tmp_path, v=14, n=60)
    assert main(["-q", "evaluate", "--generated", str(gen), "--reference", str(ref), "--binning", str(xml),
                 "--out", str(tmp_path / "o"), "--classifier", "none", "--no-distances"]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    plots = metrics["plots"]
    assert "plots/features_E_layer.png" in plots and "plots/average_shower_generated.png" in plots
    assert all((tmp_path / "o" / p).stat().st_size > 0 for p in plots)


def test_cli_errors_exit_2_with_a_message(tmp_path, capsys):
    ref, gen = _files(tmp_path)
    rc = main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--binning", "ds9",
               "--out", str(tmp_path / "o"), "--classifier", "none"])
    assert rc == 2
    assert "unknown binning 'ds9'" in capsys.readouterr().err
    rc = main(["evaluate", "--generated", str(tmp_path / "missing.h5"), "--reference", str(ref),
               "--binning", "ds1-photons", "--out", str(tmp_path / "o"), "--classifier", "none"])
    assert rc == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--binning", "ds1-photons",
              "--out", str(tmp_path / "o"), "--max-showers", "0"])
    assert exc.value.code == 2
