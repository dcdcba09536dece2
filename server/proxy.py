"""The server's copy of the public proxy set: one folder or several (``data.proxy``), labelled,
unlabelled or mixed.

A labelled set (RUNMC, ``ucl-mr-proxy``) lets the server score aggregation candidates
(``aggregation.method: auto``), report how good the targets are, and mix the masks into the
targets (``distill.proxy_label_weight``); an unlabelled set (the public pool) only carries
images. Masks are used on the slices that have them and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from common.config import DataConfig, proxy_set_paths
from common.data import iter_proxy
from common.metrics import dice_score
from common.slices import proxy_slice_ids, slice_stack


@dataclass
class ProxySet:
    """The queried proxy slices, in the order of ``ids`` (``KEY/z``, :func:`common.data.proxy_key`;
    set by set in ``data.proxy`` order, case by case, slice by slice).

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
    blank: int = 0    # constant slices (e.g. the zero-filled ends of a cropped scan) left out

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


class _Rows:
    """Rows of one shape and dtype appended to a raw file, then read back memory-mapped."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.shape, self.n = path, np.dtype(dtype), None, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "wb")

    def add(self, rows: np.ndarray) -> None:
        self.shape = rows.shape[1:]
        self.file.write(np.ascontiguousarray(rows, self.dtype).tobytes())
        self.n += len(rows)

    def array(self) -> np.ndarray:
        self.file.close()
        return np.memmap(self.path, self.dtype, "r", shape=(self.n, *self.shape))


def load_proxy_set(cfg: DataConfig, cache_dir: Optional[Path] = None) -> ProxySet:
    """Read and preprocess every public set of ``data.proxy`` (masks where present), one
    volume at a time, and take every ``data.proxy_slice_step``-th slice of each volume, except
    constant slices: a scan's zero-filled ends carry no image, yet a teacher answers them (the
    pool's 113 blank slices all got a gland target), so they are never queried. With
    ``cache_dir`` the images and masks are written there and memory-mapped (server memory does
    not grow with the proxy set); else they are held in RAM."""
    folders = proxy_set_paths(cfg)
    names = [f.name for f in folders]
    ids: list[str] = []
    blank = 0
    labelled: list[bool] = []
    set_index: list[int] = []
    images: list[np.ndarray] | _Rows = [] if cache_dir is None else _Rows(
        cache_dir / "proxy_images.f32", np.float32)
    labels: list[np.ndarray] | _Rows = [] if cache_dir is None else _Rows(
        cache_dir / "proxy_masks.u8", np.uint8)
    add = (lambda rows, x: rows.append(x)) if cache_dir is None else (lambda rows, x: rows.add(x))
    for key, vol in iter_proxy(cfg, with_labels=True, folders=folders):
        i = names.index(vol.site)
        zs = [int(k.rpartition("/")[2]) for k in proxy_slice_ids({key: vol},
                                                                 cfg.proxy_slice_step)]
        flat = vol.image.reshape(vol.num_slices, -1)
        signal = flat.max(axis=1) > flat.min(axis=1)
        blank += sum(not signal[z] for z in zs)
        zs = [z for z in zs if signal[z]]   # a constant slice (zero-filled end) says nothing
        if not zs:
            continue
        ids += [f"{key}/{z}" for z in zs]
        add(images, np.stack([slice_stack(vol.image, z, cfg.context_slices) for z in zs]))
        mask = vol.label[zs] if vol.label is not None else np.zeros(
            (len(zs), *vol.image.shape[1:]), np.uint8)
        add(labels, mask)
        labelled += [vol.label is not None] * len(zs)
        set_index += [i] * len(zs)
    stacked = (lambda rows: np.concatenate(rows)) if cache_dir is None else (
        lambda rows: rows.array())
    labelled_arr = np.array(labelled, bool)
    mask_arr = stacked(labels)
    return ProxySet(ids, stacked(images), mask_arr if labelled_arr.any() else None,
                    labelled_arr, np.array(set_index, np.int64), names, blank)
