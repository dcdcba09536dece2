"""The server's copy of the public proxy set: one folder or several (``data.proxy``), labelled,
unlabelled or mixed.

A labelled set (RUNMC, ``ucl-mr-proxy``) lets the server score aggregation candidates
(``aggregation.method: auto``), report how good the targets are, and mix the masks into the
targets (``distill.proxy_label_weight``); an unlabelled set (the public pool) only carries
images. Masks are used on the slices that have them and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from common.config import DataConfig, proxy_set_paths
from common.data import load_proxy
from common.metrics import dice_score
from common.protocol import parse_slice_ids
from common.slices import proxy_slice_ids, slice_stack


@dataclass
class ProxySet:
    """The queried proxy slices, in the order of ``ids`` (``KEY/z``, :func:`common.data.proxy_key`).

    ``images`` (N, C, H, W) float32; ``labels`` (N, H, W) uint8 or None when no slice has a mask
    (rows of unlabelled slices are 0 and must be read through ``labelled``); ``labelled`` (N,)
    bool; ``set_index`` (N,) int into ``set_names`` (the public sets' folder names).
    """

    ids: list[str]
    images: np.ndarray
    labels: Optional[np.ndarray]
    labelled: np.ndarray
    set_index: np.ndarray
    set_names: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_labelled(self) -> int:
        return int(self.labelled.sum())

    def slices_per_set(self) -> dict[str, int]:
        return {name: int((self.set_index == i).sum()) for i, name in enumerate(self.set_names)}

    def target_dice(self, probs: np.ndarray) -> float:
        """Mean over the labelled proxy cases of the 3D Dice between ``probs`` (N, 2, H, W)
        argmax and the masks (unlabelled cases are left out)."""
        if self.labels is None:
            raise ValueError("target_dice: no proxy slice has a mask")
        rows = np.flatnonzero(self.labelled)
        pred = probs[rows].argmax(axis=1)
        cases = [self.ids[r].rpartition("/")[0] for r in rows]
        scores = []
        for case in dict.fromkeys(cases):
            mine = [k for k, c in enumerate(cases) if c == case]
            scores.append(dice_score(pred[mine], self.labels[rows[mine]]))
        return float(np.mean(scores))


def load_proxy_set(cfg: DataConfig) -> ProxySet:
    """Read and preprocess every public set of ``data.proxy`` (masks where present), and take
    every ``data.proxy_slice_step``-th slice of each volume."""
    folders = proxy_set_paths(cfg)
    vols = load_proxy(cfg, with_labels=True, folders=folders)
    ids = proxy_slice_ids(vols, cfg.proxy_slice_step)
    where = [(vols[c], z) for c, z in parse_slice_ids(ids, vols)]
    images = np.stack([slice_stack(c.image, z, cfg.context_slices)
                       for c, z in where]).astype(np.float32)
    labelled = np.array([c.label is not None for c, _ in where], bool)
    labels = None
    if labelled.any():
        blank = np.zeros(images.shape[-2:], np.uint8)
        labels = np.stack([c.label[z] if c.label is not None else blank for c, z in where])
    names = [f.name for f in folders]
    set_index = np.array([names.index(c.site) for c, _ in where], np.int64)
    return ProxySet(ids, images, labels, labelled, set_index, names)
