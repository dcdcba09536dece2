"""Adaptive student capacity: the smallest student that meets a Dice target within a CPU
latency budget (``capacity`` in the run config).

The server aggregates the teachers' proxy outputs once; then, smallest first, it distils each
candidate student from those same targets, has every site evaluate it on its private
validation split (metrics only; the test split is reported, never used to choose), and times
it on its own CPU (``runtime.threads`` threads; the fastest of 10 passes, which other work on
a shared machine disturbs least; ``fedkd bench compress`` checks a budget on the deploying
machine). It stops at the first candidate that meets both the Dice target and the
latency budget, unless ``capacity.map_all``. If none does, the best candidate (highest
validation Dice among those within the latency budget, else the fastest) is exported, marked
as missing the target.

Candidates: ``model.student`` with its channels scaled by each of ``capacity.widths``, plus
(``capacity.deeper``) one with an extra level of twice the last width; ordered by parameter
count. A candidate over ``model.max_student_fraction`` of the teacher is skipped and listed.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from server.aggregation import Targets
from common.config import ModelSpec, RunConfig
from common.typedconfig import build_section
from common.models import FeatureNet, build_network, build_teacher, count_parameters, input_channels
from common.profile import profile_network
from server.distill import distill_student
from server.state import FederationError


def candidate_specs(cfg: RunConfig) -> list[tuple[str, ModelSpec, int]]:
    """``[(name, spec, parameters)]`` of the candidate students, fewest parameters first."""
    base = cfg.model.student
    specs = {}
    for w in cfg.capacity.widths:
        specs[f"width x{w:g}"] = replace(base, channels=[max(2, round(c * w)) for c in base.channels])
    if cfg.capacity.deeper:
        specs["deeper"] = replace(base, channels=[*base.channels, 2 * base.channels[-1]],
                                  strides=[*base.strides, 2])
    ch = input_channels(cfg.data)
    out = [(name, spec, count_parameters(build_network(spec, ch))) for name, spec in specs.items()]
    return sorted(out, key=lambda t: t[2])


def fits(val_dice: float, target: float, within_budget: bool) -> bool:
    """A candidate fits when it is within the latency budget and its validation Dice reaches
    the target; a candidate that finds no gland (Dice 0: it collapsed to background) never
    fits, even when the target is 0."""
    return within_budget and val_dice > 0.0 and val_dice >= target


def dice_target(cfg: RunConfig, teachers: dict[str, dict]) -> float:
    """The target: ``capacity.dice_target``, or ``relative_target`` x the teachers' mean
    validation Dice (weighted by validation cases), whichever is larger."""
    rel = 0.0
    if cfg.capacity.relative_target and teachers:
        n = sum(t.get("val_cases", 1) for t in teachers.values())
        mean = sum(t["val_dice"] * t.get("val_cases", 1) for t in teachers.values()) / n
        rel = cfg.capacity.relative_target * mean
    return max(cfg.capacity.dice_target, rel)


def within_budget(cfg: RunConfig, profile: dict) -> bool:
    c = cfg.capacity
    return ((not c.max_slice_ms or profile["slice_ms"] <= c.max_slice_ms)
            and (not c.max_volume_ms or profile["volume_ms"] <= c.max_volume_ms))


def choose(cfg: RunConfig, rows: dict[str, dict]) -> tuple[str, bool]:
    """(chosen candidate, whether it meets the target and budget)."""
    done = {n: r for n, r in rows.items() if "val_dice" in r}
    fits = [n for n, r in done.items() if r["meets"]]
    if fits:
        return min(fits, key=lambda n: done[n]["parameters"]), True
    in_budget = [n for n, r in done.items() if r["within_budget"]]
    if in_budget:
        return max(in_budget, key=lambda n: done[n]["val_dice"]), False
    return min(done, key=lambda n: done[n]["slice_ms"]), False


def chosen_spec(rounds: dict) -> Optional[ModelSpec]:
    """The architecture a finished capacity search chose (``state.json``'s ``rounds``), or
    None when the run had no capacity search."""
    cap = rounds.get("1", {}).get("capacity", {})
    if "chosen" not in cap:
        return None
    return build_section(ModelSpec, cap["candidates"][cap["chosen"]]["spec"], "capacity")


def student_config(cfg: RunConfig, spec: ModelSpec) -> RunConfig:
    """``cfg`` with ``spec`` as the student (what the sites build to evaluate it)."""
    from common.config import with_overrides

    return with_overrides(cfg, [("model.student", asdict(spec)),
                                ("model.max_student_fraction", 1.0)], "capacity candidate")


def capacity_plot(result: dict, out: Path) -> Path:
    """Validation Dice vs CPU latency per slice of every evaluated candidate, with the targets."""
    from common.plotting import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in result["candidates"].items():
        if "val_dice" not in r:
            continue
        chosen = name == result["chosen"]
        ax.plot(r["slice_ms"], r["val_dice"], "*" if chosen else "o", ms=12 if chosen else 6,
                color="C3" if chosen else "C0")
        ax.annotate(f"{name}\n{r['parameters']:,} p", (r["slice_ms"], r["val_dice"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    if result["dice_target"]:
        ax.axhline(result["dice_target"], color="gray", ls="--", lw=1, label="Dice target")
    if result["max_slice_ms"]:
        ax.axvline(result["max_slice_ms"], color="gray", ls=":", lw=1, label="latency budget")
    ax.set_xlabel(f"CPU ms per slice ({result['threads']} threads)")
    ax.set_ylabel("Dice (sites' validation splits)")
    ax.set_ylim(0, 1)
    if result["dice_target"] or result["max_slice_ms"]:
        ax.legend(fontsize=8)
    return save(fig, out)


def capacity_markdown(result: dict) -> list[str]:
    verdict = ("meets the target" if result["met"] else
               "**misses the target** (no candidate met it; this is the best one)")
    lines = [f"Adaptive capacity: Dice target {result['dice_target']:.4f} on the sites' "
             f"validation splits, latency budget "
             f"{result['max_slice_ms'] or '-'} ms per slice / {result['max_volume_ms'] or '-'} ms "
             f"per {result['volume_slices']}-slice volume ({result['threads']} threads; the "
             f"fastest of {result.get('timing_repeats', 10)} timed passes). "
             f"Chosen: `{result['chosen']}`, which {verdict}.", "",
             "| candidate | parameters | MMACs/slice | ms/slice | ms/volume | val Dice | "
             "test Dice | " + " | ".join(result["sites"]) + " | meets |",
             "|---" * (8 + len(result["sites"])) + "|"]
    for name, r in result["candidates"].items():
        if "val_dice" not in r:
            lines.append(f"| {name} | {r['parameters']:,} | | | | {r.get('skipped', 'not run')} |"
                         + " |" * (len(result["sites"]) + 2))
            continue
        sites = " | ".join(f"{r['site_test_dice'].get(s, float('nan')):.3f}" for s in result["sites"])
        lines.append(f"| {name} | {r['parameters']:,} | {r['macs_per_slice'] / 1e6:.1f} | "
                     f"{r['slice_ms']:.1f} | {r['volume_ms']:.0f} | {r['val_dice']:.4f} | "
                     f"{r['test_dice']:.4f} | {sites} | {'yes' if r['meets'] else 'no'} |")
    return lines


# timed passes per candidate (the fastest counts: a shared machine only ever slows a pass down)
TIMING_REPEATS = 10


def new_candidate(cfg: RunConfig, spec: ModelSpec) -> FeatureNet:
    torch.manual_seed(cfg.runtime.seed)
    return FeatureNet(spec, input_channels(cfg.data))


def search(coord, targets: Targets) -> None:
    """The coordinator's capacity step: distil the candidate students from ``targets``,
    smallest first; each site evaluates each on its validation (and test) split; the chosen
    one becomes ``student_r1.pt``. Resumable per candidate (``coord.state``)."""

    t0 = time.perf_counter()
    c = coord.cfg.capacity
    result = coord.state.rounds.setdefault("1", {}).setdefault("capacity", {"candidates": {}})
    result.update(dice_target=dice_target(coord.cfg, coord.state.teachers),
                  max_slice_ms=c.max_slice_ms, max_volume_ms=c.max_volume_ms,
                  volume_slices=c.volume_slices, threads=coord.cfg.runtime.threads,
                  timing_repeats=TIMING_REPEATS, sites=sorted(set(coord.site_nodes().values())))
    rows = result["candidates"]
    budget = coord.cfg.model.max_student_fraction * count_parameters(
        build_teacher(coord.cfg.model.teacher, coord.in_channels))
    proxy = coord.proxy()
    coord.log(f"[server] capacity: Dice target {result['dice_target']:.4f}; candidates "
             + ", ".join(f"{n} ({p:,})" for n, _, p in candidate_specs(coord.cfg)))
    for name, spec, params in candidate_specs(coord.cfg):
        row = rows.get(name, {})
        if not ("val_dice" in row or "skipped" in row):  # not done before a restart
            row = {"parameters": params, "channels": list(spec.channels)}
            if params > budget:
                row["skipped"] = "over model.max_student_fraction"
            else:
                student = new_candidate(coord.cfg, spec)
                history = distill_student(student, proxy.images, targets, coord.cfg.distill,
                                          coord.cfg.student, coord.cfg.runtime.seed, coord.log,
                                          tag=f"distill {name}", set_index=proxy.set_index,
                                          set_names=proxy.set_names)
                weights = student.net.state_dict()
                path = coord.run_dir / f"capacity_{len(rows)}.pt"
                torch.save(weights, path)
                ccfg = student_config(coord.cfg, spec)
                val = coord.site_metrics(ccfg, weights, "val", f"capacity/{name}/val")
                test = coord.site_metrics(ccfg, weights, "test", f"capacity/{name}/test")
                prof = profile_network(student, tuple(coord.cfg.data.size), c.volume_slices,
                                       coord.cfg.runtime.threads, TIMING_REPEATS, statistic="min")
                ok = within_budget(coord.cfg, prof)
                row.update(spec=asdict(spec), weights=path.name, val_dice=val["dice_mean"],
                           test_dice=test["dice_mean"], test=test,
                           site_test_dice={s: m["dice_mean"] for s, m in test["sites"].items()},
                           macs_per_slice=prof["macs_per_slice"], slice_ms=prof["slice_ms"],
                           volume_ms=prof["volume_ms"], within_budget=ok,
                           meets=fits(val["dice_mean"], result["dice_target"], ok),
                           distill_loss=history[-1]["loss"])
                coord.log(f"[server] capacity: {name}: val Dice {val['dice_mean']:.4f}, "
                         f"{prof['slice_ms']:.1f} ms/slice, "
                         f"{'meets' if row['meets'] else 'misses'} the target")
            rows[name] = row
            coord.state.save(coord.run_dir)
        if row.get("meets") and not c.map_all:
            break
    if not any("val_dice" in r for r in rows.values()):
        raise FederationError("capacity: every candidate is over model.max_student_fraction")
    chosen, met = choose(coord.cfg, rows)
    result.update(chosen=chosen, met=met)
    shutil.copyfile(coord.run_dir / rows[chosen]["weights"], coord.run_dir / "student_r1.pt")
    coord.state.rounds["1"]["evaluate"] = rows[chosen]["test"]
    capacity_plot(result, coord.run_dir / "capacity.png")
    coord.log(f"[server] capacity: chose {chosen} ({rows[chosen]['parameters']:,} parameters)"
             + ("" if met else ": NO candidate meets the target; exporting the best one"))
    coord._done("capacity", time.perf_counter() - t0)
