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

from common.config import ConfigError, RunConfig, dump_config, with_overrides
from common.data import DataError
from server.state import FederationError
from simulations.plots import _by_method

STUDENT_STRATEGIES = ("kd", "fedavg", "fedprox", "feddf", "central-student", "central-kd")


def method_configs(cfg: RunConfig) -> list[tuple[str, int, RunConfig]]:
    """Every (method, seed, config) of the grid, validated before anything runs.

    With ``experiment.folds`` = k, each seed runs k times (``data.fold`` = 0..k-1), folds outer
    and methods inner, so the methods of one fold share that fold's teachers. Run directories:
    ``RUN_DIR/METHOD/seed_S`` (``.../seed_S/fold_F`` with folds); teacher and central
    checkpoints: ``RUN_DIR/state/seed_S`` (``..._fold_F``)."""
    root = Path(cfg.output.run_dir)
    k = cfg.experiment.folds
    runs = []
    for seed in cfg.experiment.seeds:
        for fold in (range(k) if k else [None]):
            sub = f"seed_{seed}" + ("" if fold is None else f"/fold_{fold}")
            split = [] if fold is None else [("data.folds", k), ("data.fold", fold)]
            for method, items in cfg.experiment.methods.items():
                variants = [(method, method, [])]
                strategy = with_overrides(cfg, items, f"experiment.methods.{method}"
                                          ).federation.strategy
                if cfg.experiment.student_lrs and strategy in STUDENT_STRATEGIES:
                    variants = [(f"{method}{LR_TAG}{lr:g}", f"{method}/lr_{lr:g}",
                                 [("student.lr", lr)]) for lr in cfg.experiment.student_lrs]
                for name, folder, extra in variants:
                    runs.append((name, seed, with_overrides(cfg, [
                        *items, *extra, *split, ("runtime.seed", seed),
                        ("name", f"{cfg.name}/{folder}/{sub}"),
                        ("output", {"run_dir": str(root / folder / sub),
                                    "state_root": str(root / "state" / sub.replace("/", "_")),
                                    "export": False})],
                        f"experiment.methods.{method}")))
    return runs


LR_TAG = "@lr="


def family(name: str) -> str:
    """The method of a run name (``fedavg@lr=0.002`` -> ``fedavg``)."""
    return name.split(LR_TAG)[0]


def select_by_validation(results: list[dict]) -> list[dict]:
    """The learning-rate search's choice: per method, seed and fold, the run with the best
    validation Dice (the first on a tie); runs without variants are kept as they are."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["method"], r["seed"], r.get("fold"))
        val = r.get("val_dice")
        old = best.get(key)
        if old is None or (val is not None and (old.get("val_dice") is None
                                                or val > old["val_dice"])):
            best[key] = r
    return [r for r in results if best[(r["method"], r["seed"], r.get("fold"))] is r]


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


def student_steps(strategy: str, last: dict, weights: Optional[dict] = None) -> Optional[int]:
    """Optimizer steps on the final student's trajectory: distillation steps; for FedAvg /
    FedProx the sum over rounds of a site's mean local steps (``weights``: the round record
    that holds them; feddf adds both); for central-student its epochs' steps. None for
    teachers (local, central)."""
    weights = weights or last.get("weights")
    fed = int(round(sum(h.get("steps", 0) for h in weights["history"]))) if weights else 0
    if "distill" in last:
        return fed + int(sum(h.get("steps", 0) for h in last["distill"]["history"]))
    if weights:
        return fed
    if strategy == "central-student" and "central" in last:
        return int(sum(h.get("steps", 0) for h in last["central"]["history"]))
    return None


def _plus(steps: Optional[int], pretrain: Optional[int]) -> Optional[int]:
    """A student's steps with those of its proxy pretraining (student.proxy_pretrain_epochs)."""
    return steps if steps is None or not pretrain else steps + int(pretrain)


def run_queries(state: dict) -> list[dict]:
    """Every proxy query of a run state in order: each round's, then its consensus rounds'
    (the last one's targets are the distilled ones)."""
    out = []
    for _, r in sorted(state["rounds"].items(), key=lambda kv: int(kv[0])):
        if "query" in r:
            out.append(r["query"])
        out += [c["query"] for _, c in sorted(r.get("consensus", {}).items(),
                                               key=lambda kv: int(kv[0])) if "query" in c]
    return out


def run_figures(report: dict) -> dict:
    """The figures of one run report that the comparison needs."""
    st = report["state"]
    strategy = report["config"]["federation"]["strategy"]
    last = st["rounds"][str(max(int(r) for r in st["rounds"]))]
    ev = last.get("evaluate", {})
    sites = ev.get("sites", {})
    adapt = last.get("adapt")
    if adapt:   # each site's own adapted student on its test split (unseen sites: the global one)
        sites = {s: {"dice_mean": m["dice_mean_after"], "hd95_mean": m["hd95_mean_after"],
                     "n_cases": m["n_cases"]} for s, m in adapt["sites"].items()
                 if "dice_mean_after" in m}
        ev = {"dice_mean": adapt["dice_mean"], "val_dice_mean": adapt["val_dice_mean"],
              "sites": sites, "global_dice_mean": ev.get("dice_mean")}
    unseen = last.get("unseen", {})
    queries = run_queries(st)
    replies = [f["reply_bytes"] for q in queries for f in q["sites"].values()]
    w = next((r["weights"] for r in st["rounds"].values() if "weights" in r), None)
    n_sites = max(len(q["sites"]) for q in queries) if replies else 0
    # what a site receives: the float32 student (once, and once more per candidate that a
    # distillation's selection sends for validation), and the targets of every consensus round
    candidates = sum(len(r.get("distill", {}).get("selection", {}).get("val_dice", {}))
                     for r in st["rounds"].values())
    received = 4 * report.get("student_parameters", 0) * (1 + candidates) + sum(
        c["bytes"] for r in st["rounds"].values() for c in r.get("consensus", {}).values())
    if w:  # FedAvg / FedProx (and feddf's first stage): every site uploads every round
        per_site = w["bytes_per_site_round"]
        rounds = report["config"]["federation"]["rounds"]
        total = per_site * w["sites"] * rounds + int(sum(replies))
        # down and up every round, down once more for every round's evaluation, and the final
        # student for the test evaluation (+ feddf's replies and its selection candidates)
        moved = per_site * (2 * rounds + len(w["history"])) + received + (
            sum(replies) / n_sites if replies else 0)
    elif replies:  # KD: each site's replies, and the distilled student it receives once
        per_site, total = float(np.mean(replies)), int(sum(replies))
        moved = sum(replies) / n_sites + received
    else:  # pooled-data baselines communicate nothing (they need the data itself)
        per_site, total, moved = None, None, None
    return {"strategy": strategy,
            "model": ("teacher" if strategy in ("local", "central")
                      else "adapted student" if adapt else "student"),
            "global_dice_mean": ev.get("global_dice_mean"),
            "dice_mean": ev.get("dice_mean"),
            "val_dice": ev.get("val_dice_mean"),
            "site_dice": {s: m["dice_mean"] for s, m in sites.items()},
            "site_hd95": {s: m["hd95_mean"] for s, m in sites.items()},
            "hd95_mean": float(np.mean([m["hd95_mean"] for m in sites.values()])) if sites else None,
            "unseen_dice": {s: m["dice_mean"] for s, m in unseen.items()},
            "unseen_hd95": {s: m["hd95_mean"] for s, m in unseen.items()},
            "target_dice": queries[-1].get("target_dice") if queries else None,
            "bytes_per_site_round": per_site, "bytes_to_server": total,
            "site_bytes_moved": moved,
            "query_seconds": max((f["query_seconds"] for q in queries for f in q["sites"].values()
                                  if f.get("query_seconds") is not None), default=None),
            "epsilon": max((f["epsilon"] for q in queries
                            for f in q["sites"].values() if "epsilon" in f), default=None),
            "local_matrix": last.get("local", {}).get("matrix"),
            "n_test_cases": int(sum(m["n_cases"] for m in sites.values())),
            "site_cases": {s: int(m["n_cases"]) for s, m in sites.items()},
            "unseen_cases": {s: int(m["n_cases"]) for s, m in unseen.items() if "n_cases" in m},
            "student_steps": _plus(student_steps(strategy, last, w),
                                   st["rounds"].get("0", {}).get("pretrain", {}).get("steps")),
            "curve": _curve(strategy, last),
            "excluded": st["excluded"], "wall_seconds": report["wall_seconds"],
            "provenance": report.get("provenance")}


def _ms(vals: list, digits: int) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    return f"{np.mean(vals):.{digits}f} +- {np.std(vals):.{digits}f}"


def _eps(x) -> str:
    return "no noise" if x is None else f"{x:.3g}"


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def _run_key(r: dict) -> tuple:
    return (r["seed"], r.get("fold"))


def paired_difference(rows: list[dict], base: list[dict], key: str = "dice_mean"
                      ) -> Optional[tuple[float, float, int]]:
    """Mean and std over the shared (seed, fold) runs of ``row[key] - base[key]``, and the
    number of pairs; None without a shared run."""
    ref = {_run_key(r): r[key] for r in base if r.get(key) is not None}
    diffs = [r[key] - ref[_run_key(r)] for r in rows
             if r.get(key) is not None and _run_key(r) in ref]
    if not diffs:
        return None
    return float(np.mean(diffs)), float(np.std(diffs)), len(diffs)


def summary_markdown(results: list[dict], models: dict, baseline: str = "fedavg") -> str:
    """The comparison table (mean +- std over runs: seeds x folds, with the test cases behind
    each figure and the paired difference against ``baseline``), the per-site table and the
    model profile table."""
    groups = _by_method(results)
    unseen = sorted({s for r in results for s in r["unseen_dice"]})
    dp = any(r.get("epsilon") is not None for r in results)
    has_base = baseline in groups
    lines = ["| method | runs | test cases | Dice, sites' test cases | "
             + (f"paired diff vs {baseline} | " if has_base else "")
             + "Dice, sites' validation | HD95 mm | "
             + "".join(f"Dice, unseen {s} | " for s in unseen)
             + "targets vs proxy truth | " + ("epsilon | " if dp else "")
             + "model | student steps | MB per site per round | MB to server | "
             + "MB moved per site | wall s |",
             "|---" * (13 + has_base + len(unseen) + dp) + "|"]
    for m, rows in groups.items():
        un = "".join(f"{_ms([r['unseen_dice'].get(s) for r in rows], 4)} | " for s in unseen)
        diff = ""
        if has_base:
            d = paired_difference(rows, groups[baseline]) if m != baseline else None
            diff = "- | " if d is None else f"{d[0]:+.4f} +- {d[1]:.4f} | "
        steps = [r.get("student_steps") for r in rows if r.get("student_steps") is not None]
        lines.append(
            f"| {m} | {len(rows)} | {sum(r.get('n_test_cases', 0) for r in rows)} | "
            f"{_ms([r['dice_mean'] for r in rows], 4)} | {diff}"
            f"{_ms([r.get('val_dice') for r in rows], 4)} | "
            f"{_ms([r['hd95_mean'] for r in rows], 1)} | {un}"
            f"{_ms([r['target_dice'] for r in rows], 4)} | "
            + (f"{_eps(rows[0].get('epsilon'))} | " if dp else "") + f"{rows[0]['model']} | "
            f"{f'{np.mean(steps):.0f}' if steps else '-'} | "
            f"{_mb(rows[0]['bytes_per_site_round'])} | {_mb(rows[0]['bytes_to_server'])} | "
            f"{_mb(rows[0].get('site_bytes_moved'))} | "
            f"{np.mean([r['wall_seconds'] for r in rows]):.0f} |")
    sites = list(dict.fromkeys(s for r in results for s in r["site_dice"]))
    cases = {s: sum(r.get("site_cases", {}).get(s, 0) for r in next(iter(groups.values())))
             for s in sites}
    lines += ["", "Dice per site (mean over runs; test cases over all runs in brackets):", "",
              "| method | " + " | ".join(f"{s} ({cases[s]})" if cases[s] else s for s in sites)
              + " | " + "".join(f"unseen {s} ({(results[0].get('unseen_cases') or {}).get(s, '?')}"
                                f") | " for s in unseen),
              "|---" * (1 + len(sites) + len(unseen)) + "|"]
    for m, rows in groups.items():
        lines.append(f"| {m} | " + " | ".join(
            f"{_mean([r['site_dice'].get(s) for r in rows])}" for s in sites) + " | "
            + "".join(f"{_mean([r['unseen_dice'].get(s) for r in rows])} | " for s in unseen))
    lines += ["", "| model | parameters | MMACs per slice | CPU ms per slice | CPU ms per volume "
              "| threads |", "|---|---|---|---|---|---|"]
    for name, p in models.items():
        lines.append(f"| {name} | {p['parameters']:,} | {p['macs_per_slice'] / 1e6:.1f} | "
                     f"{p['slice_ms']:.1f} | {p['volume_ms']:.0f} ({p['depth']} slices) | "
                     f"{p['threads']} |")
    return "\n".join(lines)


def lr_search_markdown(results: list[dict], chosen: list[dict]) -> str:
    """Every learning rate of the search: mean validation and test Dice over runs, and how
    often validation chose it."""
    lines = ["Learning-rate search (`experiment.student_lrs`; the table above keeps, per seed "
             "and fold, the run with the best validation Dice):", "",
             "| method | student.lr | runs | validation Dice | test Dice | chosen |",
             "|---|---|---|---|---|---|"]
    picked = {id(r) for r in chosen}
    for m, rows in _by_method([r for r in results if r.get("lr") is not None]).items():
        for lr in sorted({r["lr"] for r in rows}):
            sub = [r for r in rows if r["lr"] == lr]
            lines.append(f"| {m} | {lr:g} | {len(sub)} | {_ms([r.get('val_dice') for r in sub], 4)}"
                         f" | {_ms([r['dice_mean'] for r in sub], 4)} | "
                         f"{sum(id(r) in picked for r in sub)} |")
    return "\n".join(lines)


def _mean(vals: list) -> str:
    vals = [v for v in vals if v is not None]
    return f"{np.mean(vals):.3f}" if vals else "-"


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


def selected_runs(cfg: RunConfig, only: Optional[list[str]] = None
                  ) -> list[tuple[str, int, RunConfig]]:
    """The grid's runs, restricted to the methods (or method families) named in ``only``."""
    runs = [r for r in method_configs(cfg) if not only or r[0] in only or family(r[0]) in only]
    if not runs:
        raise SystemExit(f"--only {' '.join(only or [])}: no such method (methods: "
                         f"{', '.join(cfg.experiment.methods)})")
    return runs


def result_row(method: str, seed: int, run_cfg: RunConfig, report: dict) -> dict:
    """One run's line of ``results.json``."""
    fold = run_cfg.data.fold if run_cfg.data.folds else None
    return {"method": family(method), "run": method, "seed": seed, "fold": fold,
            "lr": run_cfg.student.lr if LR_TAG in method else None,
            **run_figures(report), "config": run_cfg.to_dict()}


def collect_experiment(cfg: RunConfig, only: Optional[list[str]] = None,
                       command: str = "", out_dir: Path = Path("docs/results")) -> Path:
    """``--collect``: ``results.json`` and ``report.md`` from the finished runs of the grid (each
    run's ``report.json``), without running anything, and the published table
    ``out_dir/NAME.md`` (simulations.results). A run whose report is missing, was made with
    settings other than the grid's now, or lost a site on the way, is left out and named; runs
    of several code or data versions are refused (SystemExit naming each version's runs)."""
    from server.state import config_digest, stored_config
    from common.provenance import data_fingerprint, run_folders
    from simulations.results import check_one_version, write_published

    root = Path(cfg.output.run_dir)
    runs = selected_runs(cfg, only)
    results, missing, folders = [], [], set()
    for method, seed, run_cfg in runs:
        path = Path(run_cfg.output.run_dir) / "report.json"
        report = json.loads(path.read_text()) if path.is_file() else None
        if report is None or config_digest(stored_config(report["config"], str(path))) != \
                config_digest(run_cfg):
            missing.append(f"{path} ({'missing' if report is None else 'other settings'})")
            continue
        if report["state"].get("excluded"):   # a site was lost: not the run the grid asked for
            missing.append(f"{path} (excluded " + "; ".join(
                f"{k}: {v}" for k, v in sorted(report["state"]["excluded"].items())) + ")")
            continue
        results.append(result_row(method, seed, run_cfg, report))
        results[-1]["data_now"] = data_fingerprint(run_folders(run_cfg))
        folders.update(run_folders(run_cfg))
    for m in missing:
        print(f"[experiment] left out, not finished with these settings: {m}")
    if not results:
        raise SystemExit(f"[experiment] {root}: no finished run of these methods to collect")
    stamp = check_one_version(results, run_label)
    stamp["data"] = data_fingerprint(folders)   # every folder any run of the table read
    models = profile_models(cfg)
    wall = float(sum(r["wall_seconds"] for r in results))
    _write(root, cfg, results, models, wall)
    report_md = write_report(cfg, results, models, wall, runs)
    tables = summary_markdown(select_by_validation(results), models, cfg.experiment.baseline)
    if missing:
        tables += ("\n\nLeft out (not finished with these settings): "
                   + "; ".join(f"`{m}`" for m in missing) + "\n")
    done = {(r["run"], r["seed"], r["fold"]) for r in results}
    write_published(cfg.name, stamp, tables, results,
                    [x for x in runs if (x[0], x[1], x[2].data.fold if x[2].data.folds else None)
                     in done], machine(), command or f"fedkd experiment --collect ({cfg.name})",
                    out_dir)
    return report_md


def run_experiment(cfg: RunConfig, only: Optional[list[str]] = None) -> list[dict]:
    from simulations.simulate import ensure_data, simulate

    root = Path(cfg.output.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "config.yaml")
    runs = selected_runs(cfg, only)
    ensure_data(cfg)
    t0 = time.perf_counter()
    models = profile_models(cfg)
    print(f"[experiment] {len(runs)} runs ({len(dict.fromkeys(m for m, _, _ in runs))} methods x "
          f"{len(cfg.experiment.seeds)} seeds); teacher {models['teacher']['parameters']:,} "
          f"parameters, student {models['student']['parameters']:,}")
    results: list[dict] = []
    failed: list[dict] = []
    for i, (method, seed, run_cfg) in enumerate(runs, 1):
        spent = time.perf_counter() - t0
        eta = f", about {spent / (i - 1) * (len(runs) - i + 1) / 60:.1f} min left" if i > 1 else ""
        tag = f" fold {run_cfg.data.fold}" if run_cfg.data.folds else ""
        print(f"[experiment] ({i}/{len(runs)}) {method} seed {seed}{tag}: {spent / 60:.1f} min "
              f"so far{eta}", flush=True)
        fold = run_cfg.data.fold if run_cfg.data.folds else None
        try:
            report = simulate(run_cfg)
        except (FederationError, ConfigError, DataError, RuntimeError) as exc:
            # one failed run must not cost the rest of the grid: record it, go on
            failed.append({"method": family(method), "run": method, "seed": seed, "fold": fold,
                           "error": f"{type(exc).__name__}: {exc}",
                           "run_dir": run_cfg.output.run_dir})
            print(f"[experiment] ({i}/{len(runs)}) {method} seed {seed}{tag}: FAILED: "
                  f"{failed[-1]['error']} (see {run_cfg.output.run_dir}); going on", flush=True)
            _write(root, cfg, results, models, time.perf_counter() - t0, failed)
            continue
        results.append(result_row(method, seed, run_cfg, report))
        print(f"[experiment] ({i}/{len(runs)}) {method} seed {seed}{tag}: Dice "
              f"{results[-1]['dice_mean']:.4f} on {results[-1]['n_test_cases']} test cases",
              flush=True)
        _write(root, cfg, results, models, time.perf_counter() - t0, failed)
    wall = time.perf_counter() - t0
    _write(root, cfg, results, models, wall, failed)
    if not results:
        raise SystemExit(f"[experiment] every run failed; the first: {failed[0]['error']}")
    write_report(cfg, results, models, wall, runs, failed)
    if failed:
        print(f"[experiment] {len(failed)} run(s) FAILED (listed in {root / 'report.md'})")
    return results


def write_report(cfg: RunConfig, results: list[dict], models: dict, wall: float,
                 runs: Optional[list] = None, failed: Optional[list[dict]] = None) -> Path:
    """``report.md`` and the plots of an experiment from its figures (``fedkd experiment
    --report-only`` calls it on an existing ``results.json``)."""
    from simulations.plots import experiment_plots

    root = Path(cfg.output.run_dir)
    chosen = select_by_validation(results)
    table = summary_markdown(chosen, models, cfg.experiment.baseline)
    if len(chosen) < len(results):
        table += "\n\n" + lr_search_markdown(results, chosen)
    plots = experiment_plots(chosen, runs or method_configs(cfg), root)
    host = machine()
    (root / "report.md").write_text(
        f"# Experiment `{cfg.name}`\n\nDice: mean over the sites' test cases of a run, then mean "
        f"+- std over runs (seeds {sorted({r['seed'] for r in results})}"
        + (f" x {cfg.experiment.folds} folds: every case is tested once per seed" if
           cfg.experiment.folds else "") + "); test cases: summed over the runs. Paired diff: "
        f"the method minus `{cfg.experiment.baseline}` on the same seed and fold, mean +- std. "
        f"Selection and early stopping read validation splits only; unseen sites take no part "
        f"in training and are tested on all their cases. Student steps: optimizer steps on the "
        f"final student's path (FedAvg: a site's mean local steps summed over rounds). MB: what each site sends to the server "
        f"(KD: teacher outputs on the proxy set, once; FedAvg/FedProx: the model, every round); "
        f"MB moved per site: up and down (KD: its replies and the distilled student it receives; "
        f"FedAvg/FedProx: the model up and down every round); "
        f"the pooled-data baselines need the data itself and have no figure. Wall s: the run "
        f"itself; the first run of a seed also trains the seed's site teachers, which the "
        f"other runs of that seed reuse (as `central-kd` reuses `central`'s teacher).\n\n"
        f"{table}\n\n" + "".join(f"![{p.stem}]({p.name})\n" for p in plots)
        + ("".join(["\n**Failed runs** (not in the figures above):\n\n"]
                   + [f"* {run_label(f)}: {f['error']}\n" for f in failed]) if failed else "")
        + excluded_markdown(results)
        + f"\nMachine: {host['processor']}, {host['cpus']} CPUs, torch {host['torch']}; "
        f"wall time {wall / 60:.1f} min.\n")
    print(table)
    print(f"[experiment] {len(results)} runs in {wall / 60:.1f} min; results: "
          f"{root / 'results.json'}; report: {root / 'report.md'}")
    return root / "report.md"


def run_label(r: dict) -> str:
    """How a report names one run of the grid: a backquoted run name, its seed and fold."""
    return f"`{r.get('run', r['method'])}` seed {r['seed']}" + (
        "" if r.get("fold") is None else f" fold {r['fold']}")


def excluded_markdown(results: list[dict]) -> str:
    """A warning naming every run that finished without some site (a step excluded it: no
    reply, an error reply, a malformed reply; e.g. a site killed mid-run): its figures cover
    fewer sites than the others. Empty when no run excluded a site."""
    lines = [f"* {run_label(r)}, `{step_site}`: {reason}\n" for r in results
             for step_site, reason in sorted((r.get("excluded") or {}).items())]
    if not lines:
        return ""
    print(f"[experiment] WARNING: {len(lines)} site exclusion(s) in finished runs; their figures "
          f"cover fewer sites (report.md lists them; rerun after deleting the run directory)")
    return ("\n**Runs that excluded a site** (their figures cover fewer sites than the others; "
            "delete the run directory and rerun to repeat them):\n\n" + "".join(lines))


def report_only(cfg: RunConfig) -> Path:
    """Rewrite ``report.md`` and the plots from ``RUN_DIR/results.json`` without running."""
    path = Path(cfg.output.run_dir) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run the experiment first)")
    data = json.loads(path.read_text())
    return write_report(cfg, data["runs"], data["models"], data["wall_seconds"],
                        failed=data.get("failed"))


def _write(root: Path, cfg: RunConfig, results: list[dict], models: dict, wall: float,
           failed: Optional[list[dict]] = None) -> None:
    (root / "results.json").write_text(json.dumps(
        {"name": cfg.name, "machine": machine(), "wall_seconds": wall, "models": models,
         "runs": results, "failed": failed or []}, indent=1))
