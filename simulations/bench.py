"""``fedkd bench NAME``: the figures a user would pick this system on, measured in one run.

* ``comm``      bytes each site moves (up and down) and the Dice it buys: KD with every reply
                encoding (float32 / float16 / int8 logits and features; compact foreground
                streams of 8 / 4 / 2 bits, zlib or lzma, downsampled, with pooled features) vs
                FedAvg of the student and of the teacher, and the bytes per site to reach the
                FedAvg student's Dice. The federation runs in this process over
                :class:`simulations.local_grid.LocalGrid` (the same ServerApp workflow and
                ClientApp as a deployment); with a real config it runs on real sites.
* ``compress``  teacher vs student: parameters, MACs, CPU latency per slice and per volume
                (eager PyTorch, a torch.export program, ONNX Runtime when installed), peak memory of a
                volume's inference (measured in a fresh process).
* ``scale``     server decoding + aggregation time and peak memory (tracemalloc) for
                ``bench.scale_sites`` simulated teacher replies of realistic size, in today's
                float16 encoding and the compact one, and the Simulation Engine's wall time for
                ``bench.engine_sites`` sites.

Each writes ``RUN_DIR/bench_NAME.json`` and ``RUN_DIR/bench_NAME.png`` and prints a table.
``comm`` is here, ``compress`` and ``scale`` in :mod:`simulations.bench_compress` and
:mod:`simulations.bench_scale`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.config import RunConfig, to_plain, with_overrides
from common.plotting import pyplot
from simulations.bench_kit import COMPACT, FULL, finish, markdown_table
from simulations.bench_compress import bench_compress
from simulations.bench_scale import bench_scale


def _federate(cfg: RunConfig, log: Callable[[str], None]) -> dict:
    """One federation of ``data.sites`` in this process (LocalGrid), as a deployment runs it."""
    from client.app import app
    from common.data import discover_sites
    from server.workflow import run_federation
    from simulations.local_grid import LocalGrid

    sites = list(discover_sites(cfg.data))
    grid = LocalGrid(app, {i + 1: {"partition-id": i} for i in range(len(sites))},
                     {"data-root": cfg.data.root, "state-root": cfg.output.state_root})
    return run_federation(grid, cfg, log)


# (name, overrides) of every reply encoding bench comm compares (common.codec); "+ features"
# sends the student's feature maps (full channels, or their channel RMS map when pooled)
ENCODINGS = [
    ("KD float32 + features", [*FULL, ("federation.precision", "float32")]),
    ("KD float16 + features", [*FULL, ("federation.precision", "float16")]),
    ("KD int8 + features", [*FULL, ("federation.precision", "int8")]),
    ("KD float16", [*FULL, ("federation.precision", "float16"), ("distill.w_feature", 0.0)]),
    ("KD 8-bit + pooled", [*COMPACT, ("reply.bits", 8)]),
    ("KD 4-bit + pooled", [*COMPACT, ("reply.bits", 4)]),
    ("KD 4-bit lzma + pooled", [*COMPACT, ("reply.bits", 4), ("reply.codec", "lzma")]),
    ("KD 4-bit /2 + pooled", [*COMPACT, ("reply.bits", 4), ("reply.downsample", 2)]),
    ("KD 2-bit + pooled", [*COMPACT, ("reply.bits", 2)]),
    ("KD 4-bit", [*COMPACT, ("reply.bits", 4), ("distill.w_feature", 0.0)]),
]


def bench_comm(cfg: RunConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Bytes each site moves and the Dice it buys: every reply encoding of KD (ENCODINGS, one
    query round each) vs FedAvg of the student and of the teacher (``bench.rounds`` rounds).

    A KD site sends its reply and receives the distilled student once; a FedAvg site sends and
    receives the model every round. Reported: bytes per site (up, down, total), final Dice
    (sites' test splits), and the bytes per site to reach the FedAvg student's final Dice: a
    method's total if its final Dice reaches it, else "not reached" (FedAvg's per-round figures
    are validation Dice, so its whole run counts)."""
    from simulations.simulate import ensure_data

    ensure_data(cfg)
    root = Path(cfg.output.run_dir) / "comm"
    b = cfg.bench
    common = [("output.state_root", str(root / "state"))]
    variants = list(ENCODINGS)
    variants += [("FedAvg student", [("federation.strategy", "fedavg"), ("federation.rounds", b.rounds)]),
                 ("FedAvg teacher", [("federation.strategy", "fedavg"), ("federation.rounds", b.rounds),
                                     ("model.student", to_plain(cfg)["model"]["teacher"]),
                                     ("model.max_student_fraction", 1.0)])]
    rows = []
    torch.set_num_threads(cfg.runtime.threads)
    for name, items in variants:
        run = with_overrides(cfg, [*common, *items, ("output.run_dir", str(root / name.replace(" ", "_").replace("/", "x")))],
                             f"bench comm {name}")
        t0 = time.perf_counter()
        report = _federate(run, log)
        last = report["state"]["rounds"][str(run.federation.rounds)]
        model_bytes = 4 * report["student_parameters"]
        if "weights" in last:
            w = last["weights"]
            rounds = len(w["history"])
            up = down = w["bytes_per_site_round"] * rounds
            encoding = "float32 weights"
        else:
            q = report["state"]["rounds"]["1"]["query"]
            up = float(np.mean([s["reply_bytes"] for s in q["sites"].values()]))
            down, rounds, encoding = model_bytes, 1, q["encoding"]
        rows.append({"method": name, "encoding": encoding, "up_bytes": up, "down_bytes": down,
                     "site_bytes": up + down, "rounds": rounds,
                     "sites": len(last["evaluate"]["sites"]),
                     "dice_final": last["evaluate"]["dice_mean"],
                     "seconds": time.perf_counter() - t0})
        print(f"[bench] comm: {name}: {(up + down) / 1e6:.3f} MB per site, Dice "
              f"{rows[-1]['dice_final']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    fedavg = next(r for r in rows if r["method"] == "FedAvg student")
    for r in rows:
        r["ratio_to_fedavg_student"] = r["site_bytes"] / fedavg["site_bytes"]
        r["reaches_fedavg"] = r["dice_final"] >= fedavg["dice_final"]
        r["bytes_to_fedavg_dice"] = r["site_bytes"] if r["reaches_fedavg"] else None
    out = {"fedavg_dice": fedavg["dice_final"], "rounds": b.rounds, "methods": rows}

    def mb(x):
        return "not reached" if x is None else f"{x / 1e6:.3f}"

    table = markdown_table(["method", "encoding", "MB up per site", "MB down per site",
                    "MB per site", "x FedAvg student", "final Dice",
                    f"MB per site to FedAvg's Dice {fedavg['dice_final']:.3f}"],
                   [[r["method"], r["encoding"], f"{r['up_bytes'] / 1e6:.3f}",
                     f"{r['down_bytes'] / 1e6:.3f}", f"{r['site_bytes'] / 1e6:.3f}",
                     f"{r['ratio_to_fedavg_student']:.2f}x", f"{r['dice_final']:.3f}",
                     mb(r["bytes_to_fedavg_dice"])] for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.plot([r["site_bytes"] / 1e6], [r["dice_final"]], "s" if "FedAvg" in r["method"] else "o",
                label=r["method"])
    ax.axhline(fedavg["dice_final"], color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("MB moved per site (up + down, whole run)")
    ax.set_ylabel("Dice (sites' test splits)")
    ax.legend(fontsize=6)
    return finish(cfg, "comm", out, table, fig)


BENCHES = {"comm": bench_comm, "compress": bench_compress, "scale": bench_scale}


def run_bench(name: str, cfg: RunConfig) -> dict:
    return BENCHES[name](cfg)
