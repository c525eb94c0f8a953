import json

import pytest

from caloman.cli import main
from caloman.errors import ConfigError
from caloman.metrics.strong import StrongClassifierSettings
from caloman.sensitivity import SensitivityConfig, run_sensitivity, write_sensitivity

FAST = StrongClassifierSettings(max_iter=40)


def test_small_suite_detects_stretched_widths_and_not_the_undamaged_pair(tmp_path):
    config = SensitivityConfig(per_energy=60, defects=("none", "widths_+3%"), settings=FAST)
    report = run_sensitivity(config)
    none, widths = report["results"]
    assert report["n_showers_per_sample"] == 900
    assert all(abs(v["auc"] - 0.5) < 0.05 for v in none["classifier"].values())
    assert widths["largest_auc"] > 0.8 and widths["passed"]
    path = write_sensitivity(report, tmp_path / "sens")
    assert "widths" in path.read_text()
    assert json.loads(path.with_suffix(".json").read_text())["results"][1]["defect"] == "widths_+3%"


def test_unknown_defect_is_refused():
    with pytest.raises(ConfigError, match="unknown defects"):
        SensitivityConfig(defects=("nope",))


def test_cli_exit_code_says_whether_the_suite_passed(tmp_path, capsys):
    # 10 showers per energy: far too few for the lattice to be seen, so the suite fails (exit 1).
    code = main(["sensitivity", "--out", str(tmp_path / "s"), "--per-energy", "10", "--defects",
                 "lattice_0.5MeV"])
    assert code == 1
    assert "All passed: **no**" in capsys.readouterr().out
    assert (tmp_path / "s" / "sensitivity.json").is_file()
