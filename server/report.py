"""The run report: ``report.json`` (every figure) and ``report.md`` (tables a person reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def _f(x, digits=4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def query_lines(q: dict) -> list[str]:
    """The report's lines of one proxy query (``rounds[r]["query"]``)."""
    lines: list[str] = []
    truth = (f" Aggregated targets vs the proxy ground truth: Dice {q['target_dice']:.4f}."
             if "target_dice" in q else "")
    how = q.get("encoding", q["precision"])
    sets = q.get("slices_per_set", {})
    parts = (" (" + ", ".join(f"{k} {v}" for k, v in sets.items()) + ")") if len(sets) > 1 else ""
    masks = (f"; {q['n_labelled']} with masks" if "n_labelled" in q else "")
    if q.get("blank_slices"):
        masks += f"; {q['blank_slices']} blank slices left out"
    lines += [f"Proxy query: {q['n_slices']} slices{parts}{masks}; replies: {how}.{truth}", ""]
    if q.get("auto") and not q["auto"]["scores"]:
        lines += [f"Aggregation `auto`: the proxy set has no masks to choose by; the "
                  f"student is distilled from the first candidate, "
                  f"`{q['auto']['chosen']}`.", ""]
    elif q.get("auto"):
        lines += ["Aggregation `auto`: targets vs the public proxy masks " + ", ".join(
            f"{m} {d:.4f}" for m, d in q["auto"]["scores"].items())
            + f"; the student is distilled from `{q['auto']['chosen']}`.", ""]
    cov = q.get("coverage")
    if cov:
        lines += [f"Proxy coverage: {cov['claimed']:.0%} of the proxy slices are within "
                  f"distance {cov['threshold']:g} of some site's own data (median nearest "
                  f"distance {cov['median']:.2f}; 1 = as close as the site's own unseen "
                  f"slices)." + (f" **{cov['warning']}**" if cov.get("warning") else ""),
                  ""]
        claims = {s: f["claimed"] for s, f in sorted(q["sites"].items()) if "claimed" in f}
        if claims:
            lines += ["Claimed per site (share of each public set's slices within that "
                      "distance of the site's own data): " + "; ".join(
                          f"{s} " + ", ".join(f"{n} {v:.0%}" for n, v in c.items())
                          for s, c in claims.items()) + ".", ""]
    dp = {s: f for s, f in q["sites"].items() if "epsilon" in f}
    if dp:
        lines += ["Differential privacy (Gaussian mechanism on every reply, "
                  "common.privacy): " + ", ".join(
                      f"{s} epsilon {f['epsilon']:.3g}" for s, f in sorted(dp.items()))
                  + f" at delta {next(iter(dp.values()))['delta']:g}.", ""]
    if q["sites"]:
        lines += ["| site | weight share | agreement | calibration T | median affinity "
                  "distance | proxy entropy | reply MB |",
                  "|---|---|---|---|---|---|---|"]
    for site, fig in sorted(q["sites"].items()):
        lines.append(f"| {site} | {_f(q['site_weights'].get(site), 3)} | "
                     f"{_f(q['agreement'].get(site), 3)} | {_f(fig.get('temperature'), 2)} | "
                     f"{_f(fig.get('affinity_median'), 2)} | {_f(fig['proxy_entropy'])} | "
                     f"{fig['reply_bytes'] / 1e6:.2f} |")
    return lines


def report_markdown(report: dict) -> str:
    st = report["state"]
    lines = [f"# Federated distillation run `{report['name']}`", "",
             f"Strategy `{report['config']['federation']['strategy']}`, aggregation "
             f"`{report['config']['aggregation']['method']}`, "
             f"{report['config']['federation']['rounds']} round(s), final model "
             f"{report['student_parameters']:,} parameters, wall time "
             f"{report['wall_seconds']:.0f} s."]
    if st["teachers"]:  # FedAvg / FedProx train none
        lines += ["", "## Teachers (local training)", "",
                  "| site | val Dice | train cases | epochs | seconds | reused | DP-SGD epsilon (per slice) |",
                  "|---|---|---|---|---|---|---|"]
    for site, m in sorted(st["teachers"].items()):
        lines.append(f"| {site} | {_f(m.get('val_dice'))} | {int(m['train_cases'])} | "
                     f"{int(m['epochs_run'])} | {m['seconds']:.0f} | "
                     f"{'yes' if m['reused'] else 'no'} | {_f(m.get('dp_epsilon'), 2)} |")
    for rnd, r in sorted(st["rounds"].items(), key=lambda kv: int(kv[0])):
        lines += ["", f"## Round {rnd}", ""]
        pre = r.get("pretrain")
        if pre:
            lines += [f"Student pretrained on the public proxy set's masks "
                      f"(student.proxy_pretrain_epochs): {pre['steps']} steps, {pre['epochs']} "
                      f"epochs on {pre['cases']} volumes, {pre['seconds']:.0f} s.", ""]
        q = r.get("query")
        if q:
            lines += query_lines(q)
        for c, rec in sorted(r.get("consensus", {}).items(), key=lambda kv: int(kv[0])):
            k = report["config"].get("consensus", {})
            lines += ["", f"Consensus round {c}: the targets ({rec['bytes'] / 1e6:.2f} MB) went "
                      f"to every site, which refined a copy of its teacher on its private "
                      f"labels and them ({k.get('epochs')} epochs, lr {k.get('lr')}, weight "
                      f"{k.get('weight')}; its validation Dice picks the epoch) and answered "
                      f"again.", "", "| site | teacher val Dice before | after | epoch chosen |",
                      "|---|---|---|---|"]
            lines += [f"| {site} | {_f(m['val_dice_before'])} | {_f(m['val_dice_after'])} | "
                      f"{int(m['best_epoch'])} |" for site, m in sorted(rec["sites"].items())]
            if rec.get("query"):
                lines += [""] + query_lines(rec["query"])
        w = r.get("weights")
        if w:
            lines += [f"{w['strategy']} of the student over {w['sites']} sites: "
                      f"{w['bytes_per_site_round'] / 1e6:.2f} MB from each site per round (and "
                      f"as much back).", "", "| round | mean site Dice | mean HD95 mm |",
                      "|---|---|---|"]
            lines += [f"| {h['round']} | {_f(h.get('dice'))} | {_f(h.get('hd95'), 1)} |"
                      for h in w["history"]]
            if w.get("selection"):
                lines += ["", f"Round {w['selection']['round']} kept: the best sites' "
                          f"validation Dice (`federation.select_round`)."]
        cap = r.get("capacity")
        if cap and "chosen" in cap:
            from server.capacity import capacity_markdown

            lines += [""] + capacity_markdown(cap) + ["", "![capacity](capacity.png)"]
        ev = r.get("evaluate")
        if ev:
            who = ("site's own teacher" if report["config"]["federation"]["strategy"] == "local"
                   else "teacher" if report["config"]["federation"]["strategy"] == "central"
                   else "student")
            lines += ["", f"| site | {who} Dice (mean +- std) | HD95 mm (mean) | test cases |",
                      "|---|---|---|---|"]
            for site, m in sorted(ev["sites"].items()):
                lines.append(f"| {site} | {m['dice_mean']:.4f} +- {_f(m.get('dice_std'))} | "
                             f"{m['hd95_mean']:.1f} | {int(m['n_cases'])} |")
            lines.append(f"| **all** | **{_f(ev['dice_mean'])}** | | |")
        ad = r.get("adapt")
        if ad:
            a = report["config"].get("adapt", {})
            lines += ["", f"Site adaptation: each site fine-tuned this student on its private "
                      f"data ({a.get('epochs')} epochs, lr {a.get('lr')}, teacher weight "
                      f"{a.get('w_teacher')}, proxy weight {a.get('w_proxy')}); the adapted "
                      f"students stay at the sites (STATE_DIR/adapted_student).", "",
                      "| site | val Dice before | val Dice after | epoch chosen | test Dice "
                      "before | test Dice after | test cases |", "|---|---|---|---|---|---|---|"]
            for site, m in sorted(ad["sites"].items()):
                lines.append(f"| {site} | {_f(m['val_dice_before'])} | {_f(m['val_dice_after'])} "
                             f"| {int(m['best_epoch'])} | {_f(m.get('dice_mean_before'))} | "
                             f"{_f(m.get('dice_mean_after'))} | {int(m['n_cases'])} |")
            lines.append(f"| **all** | | | | **{_f(ad['dice_mean_before'])}** | "
                         f"**{_f(ad['dice_mean'])}** | |")
        loc = r.get("local")
        if loc:
            cols = sorted(next(iter(loc["matrix"].values())))
            extra = sorted(next(iter(loc["unseen"].values()), {}))
            lines += ["", "Local teachers on every site (rows: teacher, columns: test site; "
                      "unseen sites: all their cases):", "",
                      "| teacher | " + " | ".join(cols + [f"{s} (unseen)" for s in extra]) + " |",
                      "|---" * (len(cols) + len(extra) + 1) + "|"]
            for t, row in sorted(loc["matrix"].items()):
                vals = [row[c] for c in cols] + [loc["unseen"][t][c] for c in extra]
                lines.append(f"| {t} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        un = r.get("unseen")
        if un:
            lines += ["", "| unseen site (all cases) | Dice (mean) | HD95 mm (mean) | cases |",
                      "|---|---|---|---|"]
            lines += [f"| {s} | {m['dice_mean']:.4f} | {m['hd95_mean']:.1f} | {int(m['n_cases'])} |"
                      for s, m in sorted(un.items())]
    if st["excluded"]:
        lines += ["", "## Excluded", ""] + [f"- `{k}`: {v}" for k, v in sorted(st["excluded"].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict, run_dir: Path, log: Callable[[str], None] = print) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    (run_dir / "report.md").write_text(report_markdown(report))
    log(f"[server] report: {run_dir / 'report.md'}")
