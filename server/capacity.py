"""Adaptive student capacity: the smallest student that meets a Dice target within a CPU
latency budget (``capacity`` in the run config).

The server aggregates the teachers' proxy outputs once; then, smallest first, it distils each
candidate student from those same targets, has every site evaluate it on its private
validation split (metrics only; the test split is reported, never used to choose), and times
it on its own CPU (``runtime.threads`` threads; ``fedkd bench compress`` checks a budget on the
deploying machine). It stops at the first candidate that meets both the Dice target and the
latency budget, unless ``capacity.map_all``. If none does, the best candidate (highest
validation Dice among those within the latency budget, else the fastest) is exported, marked
as missing the target.

Candidates: ``model.student`` with its channels scaled by each of ``capacity.widths``, plus
(``capacity.deeper``) one with an extra level of twice the last width; ordered by parameter
count. A candidate over ``model.max_student_fraction`` of the teacher is skipped and listed.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

from common.config import ModelSpec, RunConfig, build_section
from common.models import FeatureNet, build_network, count_parameters, input_channels


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
             f"per {result['volume_slices']}-slice volume ({result['threads']} threads). "
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


def new_candidate(cfg: RunConfig, spec: ModelSpec) -> FeatureNet:
    import torch

    torch.manual_seed(cfg.runtime.seed)
    return FeatureNet(spec, input_channels(cfg.data))
