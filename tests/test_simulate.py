"""`fedkd simulate` end to end through Flower's Simulation Engine (Ray) on a tiny federation."""

import json

import yaml

from common.cli import main


def test_simulate_runs_the_federation_in_the_simulation_engine(tmp_path, capsys):
    cfg = {
        "data": {"root": str(tmp_path / "data"), "size": [64, 64], "spacing": [2.0, 2.0]},
        "synth": {"sites": 2, "cases": 5, "proxy_cases": 2, "seed": 1},
        "model": {"teacher": {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 1},
                  "student": {"channels": [4, 8, 16, 32], "num_res_units": 0},
                  "max_student_fraction": 0.25},
        "train": {"epochs": 2}, "distill": {"epochs": 2},
        "output": {"run_dir": str(tmp_path / "run"), "state_root": str(tmp_path / "state")},
    }
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["simulate", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "generating 2 synthetic sites" in out and "report:" in out and "| SiteB |" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["state"]["completed"] == ["train", "query_r1", "distill_r1", "evaluate_r1"]
    ev = report["state"]["rounds"]["1"]["evaluate"]["sites"]
    assert set(ev) == {"SiteA", "SiteB"}
    assert all(0.0 <= m["dice_mean"] <= 1.0 and m["n_cases"] == 1 for m in ev.values())
    assert (tmp_path / "state" / "SiteA" / "teacher.pt").is_file()
    assert (tmp_path / "run" / "export" / "student.ts").is_file()
