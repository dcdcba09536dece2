"""``fedkd experiment --config configs/experiment.yaml``: methods x seeds in one harness.

Every method is a set of ``key.path=value`` overrides of the one run config (e.g.
``aggregation.method=mean``, ``distill.w_feature=0`` or ``federation.strategy=fedavg``); every
seed sets ``runtime.seed``. All runs use the same data and splits (``data.seed`` is not varied).
Federated methods (``federation.strategy: kd | fedavg | fedprox``) run in Flower's Simulation
Engine; the pooled-data baselines (``local``, ``central*``) in this process
(:mod:`simulations.baselines`). Run ``m`` with seed ``s`` writes ``RUN_DIR/m/seed_s/``; simulated
sites keep teacher checkpoints in ``RUN_DIR/state`` (shared), so methods that differ only on the
server reuse the teachers of their seed, and a repeated experiment resumes finished steps.

Outputs in ``RUN_DIR``: ``results.json`` (every figure of every run with its method, seed and
config; the teacher and student profiles; machine and wall time), ``report.md`` (mean +- std over
seeds) and the plots ``per_site_dice.png``, ``dice_vs_bytes.png``, ``learning_curves.png`` and
``montage.png`` (:mod:`simulations.plots`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from common.config import RunConfig, dump_config, with_overrides

STUDENT_STRATEGIES = ("kd", "fedavg", "fedprox", "central-student", "central-kd")


def method_configs(cfg: RunConfig) -> list[tuple[str, int, RunConfig]]:
    """Every (method, seed, config) of the grid, validated before anything runs."""
    root = Path(cfg.output.run_dir)
    runs = []
    for seed in cfg.experiment.seeds:
        for method, items in cfg.experiment.methods.items():
            runs.append((method, seed, with_overrides(cfg, [
                *items, ("runtime.seed", seed), ("name", f"{cfg.name}/{method}/seed_{seed}"),
                ("output", {"run_dir": str(root / method / f"seed_{seed}"),
                            "state_root": str(root / "state")})], f"experiment.methods.{method}")))
    return runs


def _curve(strategy: str, last: dict) -> dict:
    """The run's learning curve: distillation loss per epoch, site Dice per FedAvg round, or
    pooled validation Dice per epoch."""
    if "distill" in last:
        return {"x": "distillation epoch", "y": "loss",
                "points": [[h["epoch"], h["loss"]] for h in last["distill"]["history"]]}
    if "weights" in last:
        return {"x": "round", "y": "mean site Dice",
                "points": [[h["round"], h["dice"]] for h in last["weights"]["history"]]}
    if "central" in last:
        return {"x": "epoch", "y": "pooled val Dice",
                "points": [[h["epoch"], h.get("val_dice", float("nan"))]
                           for h in last["central"]["history"]]}
    return {}


def run_figures(report: dict) -> dict:
    """The figures of one run report that the comparison needs."""
    st = report["state"]
    strategy = report["config"]["federation"]["strategy"]
    last = st["rounds"][str(max(int(r) for r in st["rounds"]))]
    ev = last.get("evaluate", {})
    sites = ev.get("sites", {})
    unseen = last.get("unseen", {})
    replies = [f["reply_bytes"] for r in st["rounds"].values() if "query" in r
               for f in r["query"]["sites"].values()]
    if "weights" in last:  # FedAvg / FedProx: every site uploads the model every round
        w = last["weights"]
        per_site, total = w["bytes_per_site_round"], w["bytes_per_site_round"] * w["sites"] * len(w["history"])
    elif replies:
        per_site, total = float(np.mean(replies)), int(sum(replies))
    else:  # pooled-data baselines communicate nothing (they need the data itself)
        per_site, total = None, None
    return {"strategy": strategy,
            "model": "teacher" if strategy in ("local", "central") else "student",
            "dice_mean": ev.get("dice_mean"),
            "site_dice": {s: m["dice_mean"] for s, m in sites.items()},
            "site_hd95": {s: m["hd95_mean"] for s, m in sites.items()},
            "hd95_mean": float(np.mean([m["hd95_mean"] for m in sites.values()])) if sites else None,
            "unseen_dice": {s: m["dice_mean"] for s, m in unseen.items()},
            "unseen_hd95": {s: m["hd95_mean"] for s, m in unseen.items()},
            "target_dice": next((r["query"].get("target_dice") for r in st["rounds"].values()
                                 if "query" in r), None),
            "bytes_per_site_round": per_site, "bytes_to_server": total,
            "epsilon": max((f["epsilon"] for r in st["rounds"].values() if "query" in r
                            for f in r["query"]["sites"].values() if "epsilon" in f),
                           default=None),
            "local_matrix": last.get("local", {}).get("matrix"),
            "curve": _curve(strategy, last),
            "excluded": st["excluded"], "wall_seconds": report["wall_seconds"]}


def _ms(vals: list, digits: int) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return f"{np.mean(vals):.{digits}f} +- {np.std(vals):.{digits}f}"


def _eps(x) -> str:
    return "no noise" if x is None else f"{x:.3g}"


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def summary_markdown(results: list[dict], models: dict) -> str:
    """The comparison table (mean +- std over seeds) and the model profile table."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    unseen = sorted({s for r in results for s in r["unseen_dice"]})
    dp = any(r.get("epsilon") is not None for r in results)
    lines = ["| method | seeds | Dice, sites' test splits | HD95 mm | "
             + "".join(f"Dice, unseen {s} | " for s in unseen)
             + "targets vs proxy truth | " + ("epsilon | " if dp else "")
             + "model | MB per site per round | MB to server | wall s |",
             "|---" * (9 + len(unseen) + dp) + "|"]
    for m in methods:
        rows = [r for r in results if r["method"] == m]
        un = "".join(f"{_ms([r['unseen_dice'].get(s) for r in rows], 4)} | " for s in unseen)
        lines.append(
            f"| {m} | {len(rows)} | {_ms([r['dice_mean'] for r in rows], 4)} | "
            f"{_ms([r['hd95_mean'] for r in rows], 1)} | {un}"
            f"{_ms([r['target_dice'] for r in rows], 4)} | "
            + (f"{_eps(rows[0].get('epsilon'))} | " if dp else "") + f"{rows[0]['model']} | "
            f"{_mb(rows[0]['bytes_per_site_round'])} | {_mb(rows[0]['bytes_to_server'])} | "
            f"{np.mean([r['wall_seconds'] for r in rows]):.0f} |")
    lines += ["", "| model | parameters | MMACs per slice | CPU ms per slice | CPU ms per volume "
              "| threads |", "|---|---|---|---|---|---|"]
    for name, p in models.items():
        lines.append(f"| {name} | {p['parameters']:,} | {p['macs_per_slice'] / 1e6:.1f} | "
                     f"{p['slice_ms']:.1f} | {p['volume_ms']:.0f} ({p['depth']} slices) | "
                     f"{p['threads']} |")
    return "\n".join(lines)


def profile_models(cfg: RunConfig) -> dict:
    from common.models import build_student, build_teacher, input_channels
    from common.profile import profile_network

    ch = input_channels(cfg.data)
    teacher = build_teacher(cfg.model.teacher, ch)
    student = build_student(cfg.model.student, cfg.model.teacher, ch,
                            cfg.model.max_student_fraction)
    size = tuple(cfg.data.size)
    return {name: profile_network(net, size, threads=cfg.runtime.threads)
            for name, net in (("teacher", teacher), ("student", student))}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__}


def run_experiment(cfg: RunConfig, only: Optional[list[str]] = None) -> list[dict]:
    from simulations.simulate import ensure_data, simulate

    root = Path(cfg.output.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "config.yaml")
    runs = [r for r in method_configs(cfg) if not only or r[0] in only]
    if not runs:
        raise SystemExit(f"--only {' '.join(only or [])}: no such method (methods: "
                         f"{', '.join(cfg.experiment.methods)})")
    ensure_data(cfg)
    t0 = time.perf_counter()
    models = profile_models(cfg)
    print(f"[experiment] {len(runs)} runs ({len(dict.fromkeys(m for m, _, _ in runs))} methods x "
          f"{len(cfg.experiment.seeds)} seeds); teacher {models['teacher']['parameters']:,} "
          f"parameters, student {models['student']['parameters']:,}")
    results: list[dict] = []
    for i, (method, seed, run_cfg) in enumerate(runs, 1):
        spent = time.perf_counter() - t0
        eta = f", about {spent / (i - 1) * (len(runs) - i + 1) / 60:.1f} min left" if i > 1 else ""
        print(f"[experiment] ({i}/{len(runs)}) {method} seed {seed}: {spent / 60:.1f} min "
              f"so far{eta}", flush=True)
        report = simulate(run_cfg)
        results.append({"method": method, "seed": seed, **run_figures(report),
                        "config": run_cfg.to_dict()})
        print(f"[experiment] ({i}/{len(runs)}) {method} seed {seed}: Dice "
              f"{results[-1]['dice_mean']:.4f}", flush=True)
        _write(root, cfg, results, models, time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    _write(root, cfg, results, models, wall)
    write_report(cfg, results, models, wall, runs)
    return results


def write_report(cfg: RunConfig, results: list[dict], models: dict, wall: float,
                 runs: Optional[list] = None) -> Path:
    """``report.md`` and the plots of an experiment from its figures (``fedkd experiment
    --report-only`` calls it on an existing ``results.json``)."""
    from simulations.plots import experiment_plots

    root = Path(cfg.output.run_dir)
    table = summary_markdown(results, models)
    plots = experiment_plots(results, runs or method_configs(cfg), root)
    host = machine()
    (root / "report.md").write_text(
        f"# Experiment `{cfg.name}`\n\nDice: mean over each site's test-split cases, then mean "
        f"+- std over seeds {sorted({r['seed'] for r in results})}; unseen sites take no part in "
        f"training and are tested on all their cases. MB: what each site sends to the server "
        f"(KD: teacher outputs on the proxy set, once; FedAvg/FedProx: the model, every round); "
        f"the pooled-data baselines need the data itself and have no figure. Wall s: the run "
        f"itself; the first run of a seed also trains the seed's site teachers, which the "
        f"other runs of that seed reuse (as `central-kd` reuses `central`'s teacher).\n\n"
        f"{table}\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
        + f"\nMachine: {host['processor']}, {host['cpus']} CPUs, torch {host['torch']}; "
        f"wall time {wall / 60:.1f} min.\n")
    print(table)
    print(f"[experiment] {len(results)} runs in {wall / 60:.1f} min; results: "
          f"{root / 'results.json'}; report: {root / 'report.md'}")
    return root / "report.md"


def report_only(cfg: RunConfig) -> Path:
    """Rewrite ``report.md`` and the plots from ``RUN_DIR/results.json`` without running."""
    path = Path(cfg.output.run_dir) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run the experiment first)")
    data = json.loads(path.read_text())
    return write_report(cfg, data["runs"], data["models"], data["wall_seconds"])


def _write(root: Path, cfg: RunConfig, results: list[dict], models: dict, wall: float) -> None:
    (root / "results.json").write_text(json.dumps(
        {"name": cfg.name, "machine": machine(), "wall_seconds": wall, "models": models,
         "runs": results}, indent=1))
