"""Figures for reports: a per-site montage of preprocessed slices with the gland outline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.config import DataConfig
from common.data import discover_liu_site, discover_sites, load_case, proxy_dir


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def site_montage(cfg: DataConfig, out: str | Path, cases_per_site: int = 1) -> Path:
    """One row per case index, one column per site (and the proxy set when present): the
    preprocessed slice with the largest gland area, mask outline in red. Returns the PNG path."""
    plt = _pyplot()
    groups = {site: recs[:cases_per_site] for site, recs in discover_sites(cfg).items()}
    if proxy_dir(cfg).is_dir():
        recs = discover_liu_site(proxy_dir(cfg), require_labels=False)
        groups[proxy_dir(cfg).name] = recs[:cases_per_site]
    fig, axes = plt.subplots(cases_per_site, len(groups), squeeze=False,
                             figsize=(2.4 * len(groups), 2.6 * cases_per_site))
    for col, (site, recs) in enumerate(groups.items()):
        for row, rec in enumerate(recs):
            vol = load_case(rec, cfg, require_label=rec.label is not None)
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
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
