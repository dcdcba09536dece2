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

import torch

from common.config import ConfigError, RunConfig, dump_config, with_overrides
from common.data import DataError
from server.state import FederationError
from simulations.tables import (
    LR_TAG,
    excluded_markdown,
    family,
    fold_of,
    lr_search_markdown,
    run_figures,
    run_label,
    summary_markdown,
    view_markdown,
)

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

def _networks(cfg: RunConfig) -> dict:
    from common.models import build_student, build_teacher, input_channels

    ch = input_channels(cfg.data)
    return {"teacher": build_teacher(cfg.model.teacher, ch),
            "student": build_student(cfg.model.student, cfg.model.teacher, ch,
                                     cfg.model.max_student_fraction)}


def profile_models(cfg: RunConfig, nets: Optional[dict] = None) -> dict:
    """The teacher's and the student's (``nets``, default built from ``cfg``) size and CPU
    latency (common.profile), measured now."""
    from common.profile import profile_network

    return {name: profile_network(net, tuple(cfg.data.size), threads=cfg.runtime.threads)
            for name, net in (nets or _networks(cfg)).items()}


def run_profiles(root: Path, cfg: RunConfig) -> dict:
    """The profiles the grid measured when it ran (``root/results.json``), if they are of these
    networks (same parameter counts, input size and threads); else measured now. ``--collect``
    uses them, so a collect on a busy machine does not publish slower timings than the runs
    saw."""
    from common.models import count_parameters

    path = root / "results.json"
    try:
        stored = json.loads(path.read_text()).get("models") or {}
    except (OSError, ValueError):
        stored = {}
    nets = _networks(cfg)
    same = {"size": list(cfg.data.size), "threads": cfg.runtime.threads}
    if set(stored) == set(nets) and all(
            stored[k].get("parameters") == count_parameters(n)
            and all(stored[k].get(f) == v for f, v in same.items()) for k, n in nets.items()):
        return stored
    return profile_models(cfg, nets)


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
    return {"method": family(method), "run": method, "seed": seed, "fold": fold_of(run_cfg),
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
    from simulations.mia import published_mia
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
    models = run_profiles(root, cfg)
    wall = float(sum(r["wall_seconds"] for r in results))
    _write(root, cfg, results, models, wall)
    report_md = write_report(cfg, results, models, wall, runs)
    tables = summary_markdown(select_by_validation(results), models, cfg.experiment.baseline)
    if missing:
        tables += ("\n\nLeft out (not finished with these settings): "
                   + "; ".join(f"`{m}`" for m in missing) + "\n")
    done = {(r["run"], r["seed"], r["fold"]) for r in results}
    shown = [(m, s, c) for m, s, c in runs if (m, s, fold_of(c)) in done]
    audit, audit_rows = published_mia(
        root, {(m, s, fold_of(c)): config_digest(c) for m, s, c in shown}, stamp)
    write_published(cfg.name, stamp, tables + audit, results, shown, machine(),
                    command or f"fedkd experiment --collect ({cfg.name})", out_dir,
                    audit=audit_rows)
    (out_dir / f"{cfg.name}.summary.md").write_text(view_markdown(   # for a README block
        select_by_validation(results), cfg.experiment.baseline, cfg.name, stamp, audit_rows))
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
        fold = fold_of(run_cfg)
        tag = "" if fold is None else f" fold {fold}"
        print(f"[experiment] ({i}/{len(runs)}) {method} seed {seed}{tag}: {spent / 60:.1f} min "
              f"so far{eta}", flush=True)
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
