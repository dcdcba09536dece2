"""``fedkd experiment --config configs/experiment.yaml``: methods x seeds in the Simulation Engine.

Every method is a set of ``key.path=value`` overrides of the one run config (e.g.
``aggregation.method=mean`` or ``distill.w_feature=0``); every seed sets ``runtime.seed``. All
runs use the same data and splits (``data.seed`` is not varied). Run ``m`` with seed ``s`` writes
``RUN_DIR/m/seed_s/``; simulated sites keep teacher checkpoints in ``RUN_DIR/state`` (shared), so
methods that differ only on the server reuse the teachers of their seed. The runner writes
``RUN_DIR/results.json`` (every figure with its method, seed and config) and
``RUN_DIR/report.md`` (mean +- std over seeds), and runs that already finished are reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from common.config import RunConfig, dump_config, from_dict, parse_override, to_plain


def method_configs(cfg: RunConfig) -> list[tuple[str, int, RunConfig]]:
    """Every (method, seed, config) of the grid, validated before anything runs."""
    root = Path(cfg.output.run_dir)
    runs = []
    for seed in cfg.experiment.seeds:
        for method, items in cfg.experiment.methods.items():
            data = to_plain(cfg)
            for item in items:
                key, value = parse_override(item)
                node = data
                parts = key.split(".")
                for part in parts[:-1]:
                    node = node.setdefault(part, {})
                node[parts[-1]] = value
            data["runtime"]["seed"] = seed
            data["output"] = {"run_dir": str(root / method / f"seed_{seed}"),
                              "state_root": str(root / "state")}
            data["name"] = f"{cfg.name}/{method}/seed_{seed}"
            runs.append((method, seed, from_dict(data, f"experiment.methods.{method}")))
    return runs


def _run_figures(report: dict) -> dict:
    st = report["state"]
    last = st["rounds"][max(st["rounds"], key=int)]
    ev = last.get("evaluate", {})
    query_bytes = [sum(f["reply_bytes"] for f in r["query"]["sites"].values())
                   for r in st["rounds"].values() if "query" in r]
    return {"dice_mean": ev.get("dice_mean"),
            "site_dice": {s: m["dice_mean"] for s, m in ev.get("sites", {}).items()},
            "site_hd95": {s: m["hd95_mean"] for s, m in ev.get("sites", {}).items()},
            "hd95_mean": float(np.mean([m["hd95_mean"] for m in ev.get("sites", {}).values()]))
            if ev.get("sites") else None,
            "target_dice": next((r["query"].get("target_dice") for r in st["rounds"].values()
                                 if "query" in r), None),
            "bytes_to_server": int(sum(query_bytes)),
            "excluded": st["excluded"], "wall_seconds": report["wall_seconds"]}


def summary_markdown(results: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = ["| method | seeds | student Dice (mean +- std) | HD95 mm | targets vs proxy truth | "
             "MB to server | wall s |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        rows = [r for r in results if r["method"] == m]

        def ms(key: str, digits: int = 4) -> str:
            vals = [r[key] for r in rows if r[key] is not None]
            if not vals:
                return "-"
            return f"{np.mean(vals):.{digits}f} +- {np.std(vals):.{digits}f}"

        lines.append(f"| {m} | {len(rows)} | {ms('dice_mean')} | {ms('hd95_mean', 1)} | "
                     f"{ms('target_dice')} | {np.mean([r['bytes_to_server'] for r in rows]) / 1e6:.1f} | "
                     f"{np.mean([r['wall_seconds'] for r in rows]):.0f} |")
    return "\n".join(lines)


def run_experiment(cfg: RunConfig, only: Optional[list[str]] = None) -> list[dict]:
    from simulations.simulate import ensure_data, simulate

    root = Path(cfg.output.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "config.yaml")
    runs = [r for r in method_configs(cfg) if not only or r[0] in only]
    ensure_data(cfg)
    results = []
    t0 = time.perf_counter()
    for i, (method, seed, run_cfg) in enumerate(runs, 1):
        print(f"[experiment] run {i}/{len(runs)}: {method} seed {seed} "
              f"({time.perf_counter() - t0:.0f} s so far)")
        report = simulate(run_cfg)
        results.append({"method": method, "seed": seed, **_run_figures(report),
                        "config": run_cfg.to_dict()})
        (root / "results.json").write_text(json.dumps(results, indent=1))
    table = summary_markdown(results)
    (root / "report.md").write_text(
        f"# Experiment `{cfg.name}`\n\nStudent Dice: mean over sites of the test-split Dice, "
        f"then mean +- std over seeds {cfg.experiment.seeds}.\n\n{table}\n\n"
        f"Wall time {time.perf_counter() - t0:.0f} s.\n")
    print(table)
    print(f"[experiment] results: {root / 'results.json'}; report: {root / 'report.md'}")
    return results
