"""server.strategy.FedKD: the federated distillation as a Flower strategy, in a plain Flower
ServerApp (simulations/strategy_app.py) in Flower's Simulation Engine."""


import numpy as np
import pytest
import torch
import yaml

from common.config import load_config
from simulations.synthetic import write_dataset

SETTINGS = {"data": {"size": [64, 64], "spacing": [2.0, 2.0]},
            "model": {"teacher": {"channels": [8, 16, 32, 64], "strides": [2, 2, 2],
                                  "num_res_units": 1},
                      "student": {"channels": [4, 8, 16, 32], "num_res_units": 0},
                      "max_student_fraction": 0.25},
            "train": {"epochs": 15}, "distill": {"epochs": 30},
            "runtime": {"threads": 1, "client_threads": 1}}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed3")
    write_dataset(root, n_sites=3, n_cases=8, n_proxy=6, seed=0, log=lambda s: None)
    cfg = {**SETTINGS, "data": {**SETTINGS["data"], "root": str(root)},
           "output": {"run_dir": str(root / "run"), "state_root": str(root / "state")}}
    path = root / "fedkd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


def test_a_twenty_line_serverapp_distils_the_same_student_as_the_coordinator(
        sites, tmp_path, monkeypatch, capfd):
    """The example ServerApp runs FedKD in the Simulation Engine: the sites train (or reuse)
    their teachers, answer one proxy query, and the student it distils is the coordinator's
    student for the same config, to the last bit; the sites' test Dice is printed once."""
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from simulations import strategy_app
    from simulations.local_grid import LocalGrid
    from server.workflow import run_federation

    root, path = sites
    lines = sum(1 for line in open(strategy_app.__file__)
                if line.strip() and not line.startswith(("#", '"""', "    FEDKD")))
    assert lines <= 30
    monkeypatch.setenv("FEDKD_CONFIG", str(path))
    monkeypatch.setenv("FEDKD_STUDENT", str(tmp_path / "student.pt"))
    run_simulation(strategy_app.app, client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2}})
    out = capfd.readouterr().out
    printed = [line for line in out.splitlines() if line.startswith("{'SiteA'")]
    assert len(printed) == 1
    dice = eval(printed[0])   # noqa: S307 - the app's own dict of floats
    assert set(dice) == {"SiteA", "SiteB", "SiteC"} and np.mean(list(dice.values())) > 0.15
    strategy_student = torch.load(tmp_path / "student.pt")
    # the coordinator, same config, same (reused) teachers
    cfg = load_config(path)
    grid = LocalGrid(client_app, {i + 1: {"partition-id": i} for i in range(3)})
    report = run_federation(grid, cfg, lambda s: None)
    coordinator_student = torch.load(root / "run" / "student_r1.pt")
    assert strategy_student.keys() == coordinator_student.keys()
    assert all(torch.equal(strategy_student[k], coordinator_student[k]) for k in strategy_student)
    assert all(t["reused"] == 1 for t in report["state"]["teachers"].values())
    sites_test = report["state"]["rounds"]["1"]["evaluate"]["sites"]
    assert {s: round(m["dice_mean"], 4) for s, m in sites_test.items()} == dice
