"""Figures for reports: a per-site montage of preprocessed slices with the gland outline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import DataConfig, proxy_set_paths
from common.plotting import pyplot, save
from common.data import discover_liu_site, discover_sites, load_case


def site_montage(cfg: DataConfig, out: str | Path, cases_per_site: int = 1) -> Path:
    """One row per case index, one column per site (and each proxy set when present): the
    preprocessed slice with the largest gland area, mask outline in red. Returns the PNG path."""
    plt = pyplot()
    groups = {site: recs[:cases_per_site] for site, recs in discover_sites(cfg).items()}
    public = set()
    for folder in proxy_set_paths(cfg):
        if folder.is_dir():
            public.add(folder.name)
            groups[folder.name] = discover_liu_site(folder, require_labels=False)[:cases_per_site]
    fig, axes = plt.subplots(cases_per_site, len(groups), squeeze=False,
                             figsize=(2.4 * len(groups), 2.6 * cases_per_site))
    for col, (site, recs) in enumerate(groups.items()):
        for row, rec in enumerate(recs):
            vol = load_case(rec, cfg, require_label=rec.label is not None,
                            pad=cfg.proxy_pad if site in public else "zero")
            z = vol.num_slices // 2
            if vol.label is not None:
                z = int(np.argmax(vol.label.reshape(vol.num_slices, -1).sum(axis=1)))
            ax = axes[row, col]
            # arrays are (D, H=x, W=y) in RAS: show x across and anterior at the top
            ax.imshow(vol.image[z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
            if vol.label is not None:
                ax.contour(vol.label[z].T, levels=[0.5], colors="red", linewidths=1.0,
                           origin="lower")
            ax.set_title(f"{site}\n{rec.case_id} z={z}", fontsize=8)
            ax.axis("off")
    return save(fig, out)


def targets_montage(run_dir: str | Path, out: str | Path, per_set: int = 6) -> Path:
    """What a KD run's student was distilled toward: for each public set of its proxy, ``per_set``
    slices (evenly spread over those whose target holds gland) with the aggregated targets'
    gland outline (p > 0.5, red) and, when the affinity was sent, the slice's nearest site
    distance (``d``; 1 ~ a site's own unseen slices). Reads ``RUN_DIR/report.json``,
    ``proxy_cache/`` and ``targets_r1/`` (or the last consensus round's)."""
    import json

    run = Path(run_dir)
    report = json.loads((run / "report.json").read_text())
    query = report["state"]["rounds"]["1"].get("query")
    tags = sorted(p.name for p in run.glob("targets_c*")) or ["targets_r1"]
    if query is None or not (run / tags[-1] / "probs.npy").is_file():
        raise FileNotFoundError(f"{run}: not a KD run directory with kept targets")
    probs = np.load(run / tags[-1] / "probs.npy", mmap_mode="r")
    n, _, h, w = probs.shape
    raw = run / "proxy_cache" / "proxy_images.f32"
    c = raw.stat().st_size // (4 * n * h * w)
    images = np.memmap(raw, np.float32, "r", shape=(n, c, h, w))
    claim = (np.load(run / tags[-1] / "claim.npy") if (run / tags[-1] / "claim.npy").is_file()
             else None)
    sets = query.get("slices_per_set") or {"proxy": n}
    plt = pyplot()
    fig, axes = plt.subplots(len(sets), per_set, squeeze=False,
                             figsize=(2.0 * per_set, 2.2 * len(sets)))
    start = 0
    for row, (name, count) in enumerate(sets.items()):
        rows = np.arange(start, start + count)
        gland = rows[[bool((probs[r, 1] > 0.5).any()) for r in rows]]
        pick = gland[np.linspace(0, len(gland) - 1, per_set).astype(int)] if len(gland) else rows[:per_set]
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col >= len(pick):
                continue
            r = pick[col]
            ax.imshow(images[r, c // 2].T, cmap="gray", origin="lower", vmin=0, vmax=1)
            ax.contour(np.asarray(probs[r, 1]).T, levels=[0.5], colors="red", linewidths=1.0,
                       origin="lower")
            ax.set_title(f"{name}" + (f" d={claim[r]:.2f}" if claim is not None else ""),
                         fontsize=7)
        start += count
    return save(fig, out)


# --------------------------------------------------------------------------------------------
# Experiment figures (fedkd experiment)
# --------------------------------------------------------------------------------------------


def _by_method(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(r["method"], []).append(r)
    return out


def per_site_dice_plot(results: list[dict], out: Path) -> Path:
    """Grouped bars: Dice per site (unseen sites marked) per method, mean +- std over seeds."""
    plt = pyplot()
    groups = _by_method(results)
    sites = sorted({s for r in results for s in r["site_dice"]})
    unseen = sorted({s for r in results for s in r["unseen_dice"]})
    cols = sites + unseen
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.25 * len(cols) * len(groups))), 4.5))
    for k, (method, rows) in enumerate(groups.items()):
        vals = [[(r["site_dice"] | r["unseen_dice"]).get(s, np.nan) for r in rows] for s in cols]
        ax.bar(np.arange(len(cols)) + k * width, [np.nanmean(v) for v in vals], width,
               yerr=[np.nanstd(v) for v in vals], label=method, capsize=2)
    ax.set_xticks(np.arange(len(cols)) + width * (len(groups) - 1) / 2,
                  sites + [f"{s}\n(unseen)" for s in unseen])
    ax.set_ylabel("Dice (test cases)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=max(1, len(groups) // 5), loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    return save(fig, out)


def _dice_against(results: list[dict], out: Path, key: str, scale: float, xlabel: str,
                  missing: str = "") -> Path:
    """Mean +- std Dice (over seeds) per method against the mean of ``key`` x ``scale`` (log x).
    Methods without that figure are left out, or drawn as a labelled line with ``missing``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, rows in _by_method(results).items():
        dice = [r["dice_mean"] for r in rows]
        if rows[0].get(key) is None:
            if missing:
                ax.axhline(np.mean(dice), color="gray", ls="--", lw=1)
                ax.annotate(f"{method} ({missing})", (0.02, np.mean(dice)), fontsize=7,
                            xycoords=("axes fraction", "data"), xytext=(0, 3),
                            textcoords="offset points")
            continue
        x = np.mean([r[key] for r in rows]) * scale
        ax.errorbar(x, np.mean(dice), yerr=np.std(dice), fmt="o", capsize=3)
        ax.annotate(method, (x, np.mean(dice)), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Dice (sites' test splits)")
    return save(fig, out)


def dice_vs_bytes_plot(results: list[dict], out: Path) -> Path:
    """Dice vs megabytes sent to the server in the whole run; pooled-data baselines left out."""
    return _dice_against(results, out, "bytes_to_server", 1e-6,
                         "MB sent to the server (all sites, whole run)")


def dice_vs_epsilon_plot(results: list[dict], out: Path) -> Path:
    """Dice vs epsilon (largest over sites); a method without noise is a line (epsilon = inf)."""
    return _dice_against(results, out, "epsilon", 1.0,
                         "epsilon (delta as configured; largest over sites)", "no noise")


def learning_curves_plot(results: list[dict], out: Path) -> Path:
    """One panel per kind of curve (distillation loss, FedAvg rounds, pooled training); one line
    per method (first seed)."""
    plt = pyplot()
    first = {}
    for r in results:
        if r["curve"] and r["curve"].get("points") and r["method"] not in first:
            first[r["method"]] = r["curve"]
    kinds = list(dict.fromkeys((c["x"], c["y"]) for c in first.values())) or [("", "")]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.5), squeeze=False)
    for ax, (x, y) in zip(axes[0], kinds):
        for method, c in first.items():
            if (c["x"], c["y"]) == (x, y):
                pts = np.array(c["points"], dtype=float)
                ax.plot(pts[:, 0], pts[:, 1], marker=".", label=method)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
    return save(fig, out)


def prediction_montage(cfg, model, out: Path, title: str) -> Path:
    """One test case per site (and per unseen site): the slice with the largest gland, ground
    truth outlined in green and the model's prediction in red, with the case's Dice."""
    from common.metrics import dice_score
    from common.training import predict_volume
    from client.node import load_private, load_unsplit_cases
    from simulations.baselines import site_nodes, unseen_nodes

    plt = pyplot()
    nodes = [(n, False) for n in site_nodes(cfg)] + [(n, True) for n in unseen_nodes(cfg)]
    fig, axes = plt.subplots(1, len(nodes), figsize=(2.4 * len(nodes), 2.9), squeeze=False)
    for ax, (node, unseen) in zip(axes[0], nodes):
        if unseen:  # only tested: not split (it may hold a single case)
            case = load_unsplit_cases(cfg, node)[0]
        else:
            data = load_private(cfg, node)
            case = (data.test or data.val or data.train)[0]
        pred = predict_volume(model, case, cfg.data.context_slices)
        z = int(np.argmax(case.label.reshape(case.num_slices, -1).sum(axis=1)))
        ax.imshow(case.image[z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        for mask, color in ((case.label[z], "lime"), (pred[z], "red")):
            if mask.any():
                ax.contour(mask.T, levels=[0.5], colors=color, linewidths=1.0, origin="lower")
        ax.set_title(f"{node.site}{' (unseen)' if unseen else ''}\n{case.case_id} "
                     f"Dice {dice_score(pred, case.label):.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{title}: ground truth green, prediction red", fontsize=9)
    return save(fig, out)


def experiment_plots(results: list[dict], runs: list, root: Path) -> list[Path]:
    """The PNGs of an experiment report, in ``root``."""
    from simulations.baselines import final_model

    paths = [per_site_dice_plot(results, root / "per_site_dice.png"),
             dice_vs_bytes_plot(results, root / "dice_vs_bytes.png"),
             learning_curves_plot(results, root / "learning_curves.png")]
    if any(r.get("epsilon") is not None for r in results):
        paths.append(dice_vs_epsilon_plot(results, root / "dice_vs_epsilon.png"))
    students = [r for r in results if r["model"] == "student" and r["dice_mean"] is not None]
    federated = [r for r in students if r["strategy"] in ("kd", "fedavg", "fedprox", "feddf")]
    students = federated or students  # the montage shows the best *federated* student
    if students:
        best = max(_by_method(students).items(),
                   key=lambda kv: np.mean([r["dice_mean"] for r in kv[1]]))[1][0]
        name = best.get("run", best["method"])
        cfg = next(c for m, s, c in runs if m == name and s == best["seed"]
                   and (not c.data.folds or c.data.fold == best.get("fold")))
        paths.append(prediction_montage(cfg, final_model(cfg), root / "montage.png",
                                        f"student of {best['method']} (seed {best['seed']})"))
    return paths
