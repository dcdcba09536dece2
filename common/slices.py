"""2D / 2.5D slices of preprocessed cases, for training, evaluation and proxy queries."""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data import CaseVolume


def slice_stack(vol: np.ndarray, z: int, context: int) -> np.ndarray:
    """Slice ``z`` of ``vol`` (D, H, W) with ``context`` neighbours per side as channels:
    returns (2*context+1, H, W); neighbours beyond the ends repeat the edge slice."""
    idx = np.clip(np.arange(z - context, z + context + 1), 0, vol.shape[0] - 1)
    return vol[idx]


class SliceDataset(Dataset):
    """2D/2.5D slices of preprocessed cases.

    Item: ``{"image": (C, H, W) float32, "label": (1, H, W) int64 (absent if unlabeled),
    "id": "site/case/z"}`` with C = 2*context+1. ``slices`` optionally restricts the items to
    ``(case_index, z)`` pairs; ``transform`` is a MONAI dictionary transform (augmentation).
    """

    def __init__(self, cases: list[CaseVolume], context: int = 0,
                 slices: Optional[Iterable[tuple[int, int]]] = None, transform=None):
        self.cases = cases
        self.context = context
        self.items = list(slices) if slices is not None else [
            (ci, z) for ci, c in enumerate(cases) for z in range(c.num_slices)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def slice_id(self, i: int) -> str:
        ci, z = self.items[i]
        return f"{self.cases[ci].site}/{self.cases[ci].case_id}/{z}"

    def __getitem__(self, i: int) -> dict:
        ci, z = self.items[i]
        case = self.cases[ci]
        item = {"image": torch.from_numpy(slice_stack(case.image, z, self.context).copy()),
                "id": self.slice_id(i)}
        if case.label is not None:
            item["label"] = torch.from_numpy(case.label[z][None].astype(np.int64))
        if self.transform is not None:
            item = self.transform(item)
        return item


def foreground_slices(cases: list[CaseVolume]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(with_gland, without_gland)`` lists of ``(case_index, z)``."""
    fg, bg = [], []
    for ci, c in enumerate(cases):
        assert c.label is not None
        has = c.label.reshape(c.num_slices, -1).any(axis=1)
        for z in range(c.num_slices):
            (fg if has[z] else bg).append((ci, z))
    return fg, bg


def proxy_slice_ids(proxy: dict[str, CaseVolume], step: int | dict[str, int] = 1) -> list[str]:
    """The slice ids of a proxy set that the server queries, ``KEY/z`` in key order: every
    ``step``-th slice of each volume (z = 0, step, 2 step, ...); ``step`` may be given per
    public set ({set name: step}, a volume's set being its ``site``; 1 for a set not named)."""
    def every(vol: CaseVolume) -> int:
        return step.get(vol.site, 1) if isinstance(step, dict) else step

    return [f"{key}/{z}" for key, vol in sorted(proxy.items())
            for z in range(0, vol.num_slices, every(vol))]
