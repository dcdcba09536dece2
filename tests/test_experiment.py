"""`fedkd experiment`: a tiny grid (2 sites, 2 methods, 1 seed) through the Simulation Engine."""

import json

import pytest

from common.cli import main
from common.config import ConfigError, load_config
from conftest import tiny_sim_config
from simulations.experiment import method_configs


def tiny(tmp_path, methods, seeds=(0,)):
    return tiny_sim_config(tmp_path, output={"run_dir": str(tmp_path / "exp")},
                           experiment={"methods": methods, "seeds": list(seeds)})


def test_grid_configs_are_validated_before_anything_runs(tmp_path):
    path = tiny(tmp_path, {"a": [], "m": ["aggregation.method=mean"]}, seeds=(0, 3))
    runs = method_configs(load_config(path))
    assert [(m, s) for m, s, _ in runs] == [("a", 0), ("m", 0), ("a", 3), ("m", 3)]
    cfg = runs[3][2]
    assert cfg.aggregation.method == "mean" and cfg.runtime.seed == 3
    assert cfg.output.run_dir.endswith("exp/m/seed_3") and cfg.output.state_root.endswith("exp/state")
    assert cfg.data.seed == runs[0][2].data.seed  # same splits for every run
    bad = tiny(tmp_path, {"x": ["aggregation.method=median"]})
    with pytest.raises(ConfigError, match="experiment.methods.x: aggregation.method: expected one of"):
        method_configs(load_config(bad))
    with pytest.raises(ConfigError, match="is not a key.path=value override"):
        load_config(tiny(tmp_path, {"x": ["output.run_dir=/elsewhere"]}))


def test_tiny_grid_runs_end_to_end(tmp_path, capsys):
    path = tiny(tmp_path, {"adaptive-kd": [], "mean-kd": ["aggregation.method=mean"]})
    assert main(["experiment", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results] == [("adaptive-kd", 0), ("mean-kd", 0)]
    for r in results:
        assert 0.0 <= r["dice_mean"] <= 1.0 and set(r["site_dice"]) == {"SiteA", "SiteB"}
        assert r["bytes_to_server"] > 0 and 0.0 <= r["target_dice"] <= 1.0
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "| adaptive-kd | 1 |" in report and "| mean-kd | 1 |" in report
    # the second method reused the first one's teachers (same seed, shared state root)
    mean_report = json.loads((tmp_path / "exp" / "mean-kd" / "seed_0" / "report.json").read_text())
    assert all(t["reused"] == 1 for t in mean_report["state"]["teachers"].values())
