"""Local-only teachers tested on every site: the domain-shift matrix.

``fedkd cross-site --config configs/cross_site.yaml [--train-sites SiteA SiteB]`` trains one teacher
per training site on that site's private train split (validation-based early stopping), then
tests it on the test split of every site. Writes ``RUN_DIR/cross_site.json`` (per-case figures,
training histories, config) and ``RUN_DIR/cross_site.md`` (the Dice matrix), and prints the matrix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from common.config import RunConfig, dump_config
from common.data import DataError, discover_sites
from common.splits import load_site
from common.models import build_teacher, input_channels
from common.training import evaluate_cases, seed_everything, train_segmenter


def dice_matrix_markdown(matrix: dict[str, dict[str, float]], test_sites: list[str]) -> str:
    """Markdown table: one row per trained teacher, one column per test site (mean test Dice);
    the in-site cell is bold and each other cell shows its drop from it."""
    lines = ["| teacher \\ test | " + " | ".join(test_sites) + " |",
             "|---|" + "---|" * len(test_sites)]
    for train_site, row in matrix.items():
        own = row.get(train_site)
        cells = []
        for s in test_sites:
            if s == train_site:
                cells.append(f"**{row[s]:.3f}**")
            elif own is not None:
                cells.append(f"{row[s]:.3f} ({row[s] - own:+.3f})")
            else:
                cells.append(f"{row[s]:.3f}")
        lines.append(f"| {train_site} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_cross_site(cfg: RunConfig, train_sites: Optional[list[str]] = None) -> dict:
    seed_everything(cfg.runtime.seed, cfg.runtime.threads)
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    t0 = time.perf_counter()
    records = discover_sites(cfg.data)
    train_sites = train_sites or list(records)
    unknown = [s for s in train_sites if s not in records]
    if unknown:
        raise DataError(f"{cfg.data.root}: no site {unknown[0]!r} (sites: {', '.join(records)})")
    data = {s: load_site(cfg.data, recs, log=print) for s, recs in records.items()}
    in_ch = input_channels(cfg.data)
    result = {"config": cfg.to_dict(), "teachers": {}, "matrix": {}, "hd95": {}}
    for site in train_sites:
        torch.manual_seed(cfg.runtime.seed)
        model = build_teacher(cfg.teacher_spec(site), in_ch)
        tr = train_segmenter(model, data[site].train, data[site].val, cfg.train,
                             cfg.data.context_slices, cfg.runtime.seed, tag=f"teacher {site}")
        result["teachers"][site] = {"best_val_dice": tr.best_val_dice, "epochs": tr.epochs_run,
                                    "best_epoch": tr.best_epoch, "seconds": tr.seconds,
                                    "history": tr.history, "tests": {}}
        result["matrix"][site], result["hd95"][site] = {}, {}
        for test_site, d in data.items():
            ev = evaluate_cases(model, d.test, cfg.data.context_slices)
            result["teachers"][site]["tests"][test_site] = ev
            result["matrix"][site][test_site] = ev["dice"]["mean"]
            result["hd95"][site][test_site] = ev["hd95"]["mean"]
            print(f"[cross-site] teacher {site} on {test_site}: Dice {ev['dice']['mean']:.4f} "
                  f"HD95 {ev['hd95']['mean']:.1f} mm ({len(d.test)} test cases)")
    result["seconds"] = time.perf_counter() - t0
    (run_dir / "cross_site.json").write_text(json.dumps(result, indent=1))
    table = dice_matrix_markdown(result["matrix"], list(data))
    (run_dir / "cross_site.md").write_text(
        "# Local teachers tested on every site (mean 3D Dice on test splits)\n\n" + table +
        f"\n\nWall time {result['seconds']:.0f} s.\n")
    print(table)
    print(f"[cross-site] wrote {run_dir / 'cross_site.json'} and {run_dir / 'cross_site.md'} "
          f"({result['seconds']:.0f} s)")
    return result
