"""`flwr run .` starts Flower's local simulation SuperLink and runs the ServerApp and ClientApp of
pyproject.toml in the installed environment (no per-run dependency install), as the README says."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_sim_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flwr_run_starts_a_local_simulation(tmp_path):
    from simulations.synthetic import write_dataset

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flwr").is_file():
        pytest.skip(f"no flwr command beside {sys.executable}")
    write_dataset(tmp_path / "data", n_sites=2, n_cases=5, n_proxy=2, seed=1, log=lambda s: None)
    cfg = tiny_sim_config(tmp_path, output={"run_dir": str(tmp_path / "run"),
                                            "state_root": str(tmp_path / "state")})
    home = tmp_path / "flwr_home"
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    run_config = (f"config='{cfg}' data-root='{tmp_path / 'data'}' "
                  f"state-root='{tmp_path / 'state'}'")
    try:
        proc = subprocess.run([str(bin_dir / "flwr"), "run", str(REPO), "--run-config", run_config,
                               "--federation-config", "num-supernodes=2", "--stream"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:  # the local SuperLink outlives `flwr run` (Flower keeps it for the next run)
        subprocess.run(["pkill", "-f", str(home / "local-superlink")], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Starting local SuperLink" in out and "(2 simulated SuperNodes)" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["state"]["completed"] == ["train", "query_r1", "distill_r1", "evaluate_r1"]
    assert set(report["state"]["rounds"]["1"]["evaluate"]["sites"]) == {"SiteA", "SiteB"}
    assert len(list((tmp_path / "state" / "SiteA").glob("teacher-*.pt"))) == 1
    # the app ran from Flower's copy of the bundle, with no per-run environment
    apps = list((home / "apps").iterdir())
    assert len(apps) == 1 and (apps[0] / "server" / "app.py").is_file()
    assert not any("Installing app dependencies" in line for line in out.splitlines())
    assert shutil.which("uv", path=str(home)) is None
