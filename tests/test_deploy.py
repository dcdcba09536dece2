"""A real deployment on loopback: one ``flower-superlink`` and three ``flower-supernode``
processes with TLS and SuperNode authentication, runs submitted with ``flwr run``.

Scenarios: strangers refused (unregistered key, no CA); a crash of the coordinator (SuperLink and
ServerApp killed after the proxy query, SuperLink restarted on its database, run resubmitted)
resumes and every site evaluates; a SuperNode killed mid-round is excluded and named.

Every process the module starts (and the ServerApp / ClientApp / SuperExec processes Flower
spawns, found by the module's own ``FLWR_HOME`` in their environment) is killed at the end.
Bounded: each wait has a timeout; the module takes about 4 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from client.deploy import make_node_key, supernode_command
from server.deploy import add_connection, make_certificates, superlink_command
from simulations.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FED = "fedkd-test"
SITES = ("SiteA", "SiteB", "SiteC")

pytestmark = [
    pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                       reason=f"flower-superlink not installed next to {sys.executable}"),
    pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                       reason="finds Flower's detached processes through /proc (Linux)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_processes(home: Path) -> list[int]:
    """Pids of live processes whose environment has FLWR_HOME=home (ours and Flower's)."""
    marker = f"FLWR_HOME={home}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (Flower detaches them into new sessions, so a
    process group kill would miss them)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [c for c, p in parent.items() if p == pid]
        out += kids
        todo += kids
    return out


def named(pids: list[int], name: str) -> list[int]:
    out = []
    for pid in pids:
        try:
            if name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def wait_for(check, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Deployment:
    def __init__(self, root: Path):
        self.root = root
        self.home = root / "flwr"
        self.env = {**os.environ, "FLWR_HOME": str(self.home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=REPO, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        """(Re)start the SuperLink on its database and wait for its Control API."""
        if "superlink" in self.procs:
            self.procs[f"superlink_{len(self.procs)}"] = self.procs.pop("superlink")
        self.start("superlink", superlink_command(self.root / "certs", host="127.0.0.1",
                                                  port=self.port,
                                                  database=self.root / "superlink.db"))
        wait_for(lambda: self.flwr("supernode", "ls", FED).returncode == 0, 60,
                 "the SuperLink's Control API")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=REPO, timeout=timeout,
                              capture_output=True, text=True)

    def online(self) -> int:
        out = self.flwr("supernode", "ls", FED, "--format", "json")
        if out.returncode:
            return 0
        return sum(n.get("status") == "online" for n in json.loads(out.stdout).get("nodes", []))

    def supernode(self, site: str, key: Path, data: Path, with_ca: bool = True,
                  retries: int | None = None) -> list[str]:
        node = {"data-path": str(data / site), "proxy-path": str(data / "PROXY"),
                "state-dir": str(self.root / "state" / site), "threads": 1}
        argv = supernode_command(self.address, self.certs["ca"], key, node, port=free_port())
        if not with_ca:  # Flower falls back to the system's certificate store
            i = argv.index("--root-certificates")
            argv = argv[:i] + argv[i + 2:]
        return argv + ["--max-retries", str(retries)] if retries else argv

    def submit(self, name: str, run_yaml: Path, run_dir: Path) -> subprocess.Popen:
        cfg = f'config="{run_yaml}" run-dir="{run_dir}"'
        return self.start(name, [str(BIN / "flwr"), "run", ".", FED, "--run-config", cfg,
                                 "--stream"])

    def stop(self) -> None:
        for _ in range(3):
            pids = flwr_processes(self.home) + [p.pid for p in self.procs.values()
                                                if p.poll() is None]
            if not pids:
                return
            for pid in set(pids):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.5)
        for p in self.procs.values():
            p.wait(timeout=10)


def run_config(root: Path, **extra) -> Path:
    cfg = {"data": {"root": str(root / "data"), "size": [64, 64], "spacing": [2.0, 2.0]},
           "model": {"teacher": {"channels": [8, 16, 32, 64], "strides": [2, 2, 2],
                                 "num_res_units": 1},
                     "student": {"channels": [4, 8, 16, 32], "num_res_units": 0},
                     "max_student_fraction": 0.25},
           "train": {"epochs": 2}, "distill": {"epochs": 2},
           "federation": {"min_sites": 3, "wait_timeout_s": 30},
           "output": {"audit": True}}
    for section, values in extra.items():
        cfg[section].update(values)
    path = root / f"run_{len(list(root.glob('run_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    d = Deployment(root)
    write_dataset(root / "data", n_sites=3, n_cases=5, n_proxy=2, seed=0, log=lambda s: None)
    d.certs = make_certificates(root / "certs")
    d.keys = {s: make_node_key(root / "keys", s) for s in (*SITES, "Rogue")}
    add_connection(FED, d.address, d.certs["ca"], home=d.home)
    try:
        d.start_superlink()
        d.node_ids = {}
        for site in SITES:
            out = d.flwr("supernode", "register", str(d.keys[site]["pub"]), FED)
            assert out.returncode == 0, out.stdout + out.stderr
            d.node_ids[site] = int(out.stdout.split("SuperNode ")[1].split()[0])
        for site in SITES:
            d.start(site, d.supernode(site, d.keys[site]["key"], root / "data"))
        wait_for(lambda: d.online() == 3, 90, "3 SuperNodes online", every=1.0)
        yield d
    finally:
        d.stop()
        assert not flwr_processes(d.home), "processes left running"


def test_strangers_are_refused(dep):
    """A SuperNode with an unregistered key, and one without the federation's CA, cannot join."""
    data = dep.root / "data"
    rogue = dep.start("rogue", dep.supernode("SiteA", dep.keys["Rogue"]["key"], data, retries=2))
    no_ca = dep.start("no_ca", dep.supernode("SiteA", dep.keys["SiteA"]["key"], data,
                                             with_ca=False, retries=2))
    assert rogue.wait(timeout=90) != 0
    assert no_ca.wait(timeout=90) != 0
    assert "Failed to activate SuperNode" in dep.log("rogue")
    assert "CERTIFICATE_VERIFY_FAILED" in dep.log("no_ca")
    assert dep.online() == 3


@pytest.fixture(scope="module")
def resumed(dep):
    """The coordinator's machine crashes: the SuperLink and the ServerApp process are killed
    (SIGKILL) after the proxy query; the SuperLink restarts on its database, the SuperNodes
    reconnect by themselves, and the same run is submitted again with the same run directory.
    Returns (run dir, kill time)."""
    run_dir = dep.root / "run_resume"
    run_yaml = run_config(dep.root, distill={"epochs": 150})
    first = dep.submit("flwr_run_killed", run_yaml, run_dir)
    state = run_dir / "state.json"
    wait_for(lambda: state.is_file() and "query_r1" in json.loads(state.read_text())["completed"],
             300, "the query step of the first ServerApp")
    servers = named(flwr_processes(dep.home), "flwr-serverapp")
    assert servers, "no ServerApp process found"
    link = dep.procs["superlink"].pid
    for pid in [*servers, *descendants(link), link]:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    first.wait(timeout=120)
    assert "evaluate_r1" not in json.loads(state.read_text())["completed"]
    dep.start_superlink()
    wait_for(lambda: dep.online() == 3, 120, "the SuperNodes to reconnect", every=1.0)
    second = dep.submit("flwr_run_resumed", run_yaml, run_dir)
    assert second.wait(timeout=400) == 0, dep.log("flwr_run_resumed")[-3000:]
    return run_dir, killed_at


def test_federation_runs_over_tls_and_every_site_evaluates(dep, resumed):
    run_dir, _ = resumed
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed"] == ["train", "query_r1", "distill_r1", "evaluate_r1"]
    assert not state["excluded"]
    assert {int(n) for n in state["nodes"]} == set(dep.node_ids.values())
    evaluated = state["rounds"]["1"]["evaluate"]["sites"]
    assert sorted(evaluated) == list(SITES)
    assert all(0.0 <= s["dice_mean"] <= 1.0 and s["n_cases"] == 1 for s in evaluated.values())
    assert (run_dir / "report.md").is_file() and (run_dir / "export" / "model_card.json").is_file()
    # the payload audit of a real SuperLink: replies from registered nodes only, proxy-sized
    lines = [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]
    replies = [x for x in lines if x["direction"] == "from-site"]
    assert {x["node"] for x in replies} == set(dep.node_ids.values())
    n_proxy = state["rounds"]["1"]["query"]["n_slices"]
    arrays = [a for x in replies if x["message_type"] == "query.proxy" for a in x["arrays"]]
    assert {a["name"] for a in arrays} >= {"foreground", "affinity"}   # compact replies
    assert all((a["stream"]["shape"] if "stream" in a else a["shape"])[0] == n_proxy
               for a in arrays)


def test_crashed_coordinator_resumes_without_retraining_teachers(dep, resumed):
    run_dir, killed_at = resumed
    log = dep.log("flwr_run_resumed")
    assert "skipping step train (done)" in log and "skipping step query_r1 (done)" in log
    sent_after = [x["message_type"] for x in map(json.loads, (run_dir / "audit.jsonl")
                                                 .read_text().splitlines())
                  if x["time"] > killed_at and x["direction"] == "to-site"]
    assert "train.teacher" not in sent_after and "query.proxy" not in sent_after
    assert sent_after.count("evaluate.student") == 3


def test_supernode_killed_mid_round_run_completes_without_it(dep):
    """SiteC's SuperNode (and its ClientApp) die while the proxy query is out; with min_sites 2
    the run completes with SiteA and SiteB, and the report names SiteC."""
    run_dir = dep.root / "run_fault"
    proc = dep.submit("flwr_run_fault", run_config(dep.root, federation={"min_sites": 2}),
                      run_dir)
    audit = run_dir / "audit.jsonl"
    wait_for(lambda: audit.is_file() and '"to-site", "message_type": "query.proxy"'
             in audit.read_text(), 300, "the proxy query", every=0.05)
    victim = dep.procs["SiteC"].pid
    for pid in [*descendants(victim), victim]:  # the SuperNode, its SuperExec and ClientApp
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=400) == 0, dep.log("flwr_run_fault")[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert sorted(state["rounds"]["1"]["evaluate"]["sites"]) == ["SiteA", "SiteB"]
    missing = [k for k in state["excluded"] if k.endswith("/SiteC")]
    assert missing and missing[0].split("/")[0] in ("query_r1", "evaluate_r1"), state["excluded"]
    assert "SiteC" in (run_dir / "report.md").read_text().split("Excluded")[-1]
