"""`fedkd simulate` end to end through Flower's Simulation Engine (Ray) on a tiny federation."""

import json

from simulations.cli import main
from conftest import tiny_sim_config


def test_simulate_runs_the_federation_in_the_simulation_engine(tmp_path, capsys):
    path = tiny_sim_config(tmp_path, output={"run_dir": str(tmp_path / "run"),
                                             "state_root": str(tmp_path / "state")})
    assert main(["simulate", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "generating 2 synthetic sites" in out and "report:" in out and "| SiteB |" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["state"]["completed"] == ["train", "query_r1", "distill_r1", "evaluate_r1"]
    ev = report["state"]["rounds"]["1"]["evaluate"]["sites"]
    assert set(ev) == {"SiteA", "SiteB"}
    assert all(0.0 <= m["dice_mean"] <= 1.0 and m["n_cases"] == 1 for m in ev.values())
    assert len(list((tmp_path / "state" / "SiteA").glob("teacher-*.pt"))) == 1
    assert (tmp_path / "run" / "export" / "student.pt2").is_file()
