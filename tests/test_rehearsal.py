"""The README's hospital quickstart rehearsal, run exactly as printed: a SuperLink and two
SuperNodes on localhost with TLS and node authentication, on the shipped real data
(../shared/data; skipped with the reason where it is absent).

The block between ``<!-- rehearsal -->`` and its closing fence is run with ``bash -e`` from the
repository folder, as a newcomer would paste it; its ``mktemp -d`` folder lands in this test's
temporary folder (``TMPDIR``), which is how the test finds the files and the processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent
DATA = REPO.parent / "shared" / "data" / "promise12"

pytestmark = [
    pytest.mark.skipif(not (DATA / "BIDMC").is_dir() or not (DATA / "RUNMC").is_dir(),
                       reason=f"the shipped real data is not at {DATA} (../shared/data beside "
                              f"the repository; a fresh clone does not have it)"),
    pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                       reason=f"flower-superlink not installed next to {sys.executable}"),
    pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                       reason="finds Flower's detached processes through /proc (Linux)"),
]


def readme_block(marker: str = "<!-- rehearsal -->") -> str:
    text = (REPO / "README.md").read_text()
    assert marker in text, f"README.md has no {marker} block"
    block = text.split(marker, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    return block + "\n"


def processes_under(folder: Path) -> list[int]:
    """Pids of live processes whose FLWR_HOME lies in ``folder`` (the block's and Flower's)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(e.startswith(f"FLWR_HOME={folder}".encode()) for e in env):
                pids.append(int(d.name))
    return pids


def test_the_readme_rehearsal_runs_a_tls_federation_of_two_hospitals(tmp_path):
    block = readme_block()
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("FLWR_HOME", None)
    try:
        out = subprocess.run(["bash", "-e", "-c", block], cwd=REPO, env=env, timeout=900,
                             capture_output=True, text=True, start_new_session=True)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        # the processes stop with the block (Flower's helpers watch their parents)
        deadline = time.monotonic() + 30
        while processes_under(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_under(tmp_path), "processes left running after the rehearsal"
    finally:
        for pid in processes_under(tmp_path):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    (root,) = [p for p in tmp_path.iterdir() if (p / "r1").is_dir()]
    report = json.loads((root / "r1" / "report.json").read_text())
    test = report["state"]["rounds"]["1"]["evaluate"]["sites"]
    assert set(test) == {"BIDMC", "UCL"}, test
    # a student that learnt nothing scores ~0; two tiny teachers' distillation reaches ~0.4-0.5
    assert all(m["dice_mean"] > 0.25 for m in test.values()), test
    # every reply of each node is in its outbox: the teacher's metrics, the answers on the
    # public slices, the test of the student; no weights
    for site in ("BIDMC", "UCL"):
        lines = [json.loads(x) for x in (root / "state" / site / "outbox.jsonl").read_text()
                 .splitlines()]
        assert [x["message_type"] for x in lines] == ["train.teacher", "query.proxy",
                                                      "evaluate.student"], lines
        assert all(x["direction"] == "from-site" and x["site"] == site for x in lines)
    with tarfile.open(root / "r1.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("SHA256SUMS") for n in names) and any("export" in n for n in names)
    assert "student Dice" in log                   # the block printed the report
