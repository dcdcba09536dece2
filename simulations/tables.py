"""The experiment report's figures and tables: what each run's report gives (Dice, steps, bytes,
time, the query), mean +- std per method, paired differences against the baseline, the
learning-rate search and the runs that were left out (:mod:`simulations.experiment` runs the
grid and writes the report with them)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from simulations.plots import _by_method

LR_TAG = "@lr="


def family(name: str) -> str:
    """The method of a run name (``fedavg@lr=0.002`` -> ``fedavg``)."""
    return name.split(LR_TAG)[0]


def _curve(strategy: str, last: dict) -> dict:
    """The run's learning curve: distillation loss per epoch, site Dice per FedAvg round, or
    pooled validation Dice per epoch."""
    if "distill" in last:
        return {"x": "distillation epoch", "y": "loss",
                "points": [[h["epoch"], h["loss"]] for h in last["distill"]["history"]]}
    if "weights" in last:
        return {"x": "round", "y": "mean site Dice",
                "points": [[h["round"], h["dice"]] for h in last["weights"]["history"]
                           if "dice" in h]}   # none under DP-SGD (the sites withhold it)
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


def dp_sgd_epsilon(state: dict, weights: Optional[dict]) -> Optional[float]:
    """The largest DP-SGD epsilon (per training slice) a site spent: its teacher's (kd), or by
    the last round of its local training (fedavg); None without DP-SGD."""
    eps = [t["dp_epsilon"] for t in state["teachers"].values() if "dp_epsilon" in t]
    eps += [h["dp_epsilon"] for h in (weights or {}).get("history", [])[-1:] if "dp_epsilon" in h]
    return max(eps) if eps else None


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
                            for f in q["sites"].values() if "epsilon" in f), default=None)
            or dp_sgd_epsilon(st, w),
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


def fold_of(run_cfg) -> Optional[int]:
    """A grid run's test fold (its RunConfig), None without cross-validation (how results and
    audits name it)."""
    return run_cfg.data.fold if run_cfg.data.folds else None


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


def view_markdown(results: list[dict], baseline: str, name: str, stamp: dict,
                  audit: Optional[list[dict]] = None) -> str:
    """The short view of a published grid (``docs/results/NAME.summary.md``, for a README
    block): per method the sites' Dice with its test cases and paired difference, each site's
    and unseen site's Dice (the header gives its test cases), the bytes a site moves and the
    wall time; with ``audit`` (simulations.mia rows of these runs) also epsilon and the
    membership-inference AUCs on the released model and on the replies: the mean over folds,
    and in how many folds the 95 % bootstrap interval holds 0.5; and the mean TPR at 1 % FPR."""
    groups = _by_method(results)
    sites = list(dict.fromkeys(s for r in results for s in r["site_dice"]))
    unseen = sorted({s for r in results for s in r["unseen_dice"]})
    runs = sorted({len(rows) for rows in groups.values()})
    first = next(iter(groups.values()), [])

    def cases(key: str, site: str) -> str:
        """A site's test cases over the row's runs (the folds split them); an unseen site's
        cases, the same in every run."""
        ns = [r.get(key, {}).get(site, 0) for r in first]
        n = sum(ns) if key == "site_cases" else max(ns, default=0)
        return f" ({n})" if n else ""

    lines = [f"Experiment `{name}`, commit `{stamp['commit'][:7]}`, data `{stamp['data']}`; "
             f"{'/'.join(map(str, runs))} runs (seeds x folds) a row; the full table, its "
             f"command and budgets: [docs/results/{name}.md](docs/results/{name}.md)."
             + (" Epsilon: per training slice over the whole run; MIA: membership-inference "
                "AUC, mean over folds (in how many folds its 95 % interval holds 0.5); then "
                "the true-positive rate at 1 % false positives, mean over folds."
                if audit else ""), "",
             f"| method | Dice, sites (test cases) | paired diff vs {baseline} | "
             + "".join(f"{s}{cases('site_cases', s)} | " for s in sites)
             + "".join(f"unseen {s}{cases('unseen_cases', s)} | " for s in unseen)
             + "MB moved per site | wall s |"
             + (" epsilon | MIA loss, student | MIA LiRA, student | MIA loss, replies |"
                if audit else ""),
             "|---" * (5 + len(sites) + len(unseen) + 4 * bool(audit)) + "|"]

    def mia(method: str, attack: str) -> str:
        rs = [r[attack] for r in audit if r["method"] == method and attack in r]
        if not rs:
            return "-"
        holds = sum(r["auc_ci"][0] <= 0.5 <= r["auc_ci"][1] for r in rs)
        return (f"{np.mean([r['auc'] for r in rs]):.2f} ({holds}/{len(rs)}); "
                f"{np.mean([r['tpr_at_1pct_fpr'] for r in rs]):.2f}")

    for m, rows in groups.items():
        d = paired_difference(rows, groups.get(baseline, [])) if m != baseline else None
        lines.append(
            f"| {m} | {_ms([r['dice_mean'] for r in rows], 3)} "
            f"({sum(r.get('n_test_cases', 0) for r in rows)}) | "
            + ("-" if d is None else f"{d[0]:+.3f} +- {d[1]:.3f}") + " | "
            + "".join(f"{_mean([r['site_dice'].get(s) for r in rows])} | " for s in sites)
            + "".join(f"{_mean([r['unseen_dice'].get(s) for r in rows])} | " for s in unseen)
            + f"{_mb(rows[0].get('site_bytes_moved'))} | "
            f"{np.mean([r['wall_seconds'] for r in rows]):.0f} |"
            + (f" {_eps(rows[0].get('epsilon')).replace('no noise', '-')} | {mia(m, 'loss')} | "
               f"{mia(m, 'lira')} | {mia(m, 'replies')} |" if audit else ""))
    return "\n".join(lines) + "\n"
