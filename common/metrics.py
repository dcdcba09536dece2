"""Segmentation metrics through MONAI: 3D Dice and 95th-percentile Hausdorff distance per case.

Conventions (stated so every report means the same thing):

* Dice of an empty prediction against an empty ground truth is 1.0; against a non-empty one, 0.
* HD95 is in millimetres on the preprocessed grid (``spacing``). When the prediction or the
  ground truth is empty (and the other is not), HD95 is the diagonal of the volume in mm: the
  worst possible value, instead of an infinity that would break means and JSON.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _onehot(mask: np.ndarray) -> torch.Tensor:
    """(D, H, W) binary -> (1, 2, D, H, W) float one-hot (background, gland)."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8)).long()
    return torch.nn.functional.one_hot(t, 2).permute(3, 0, 1, 2)[None].float()


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """3D Dice of the gland (class 1). pred, gt: (D, H, W) binary arrays."""
    from monai.metrics import compute_dice

    if not pred.any() and not gt.any():
        return 1.0
    return float(compute_dice(_onehot(pred), _onehot(gt), include_background=False,
                              ignore_empty=False)[0, 0])


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm. pred, gt: (D, H, W) binary; spacing:
    (sx, sy, sz) of the (H, W, D)-ordered grid as returned by the data layer."""
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() and not gt.any():
        return 0.0
    d, h, w = gt.shape
    if not pred.any() or not gt.any():
        return math.sqrt((h * spacing[0]) ** 2 + (w * spacing[1]) ** 2 + (d * spacing[2]) ** 2)
    # arrays are (D, H, W): spacing in that order is (sz, sx, sy)
    value = compute_hausdorff_distance(_onehot(pred), _onehot(gt), include_background=False,
                                       percentile=95, spacing=[spacing[2], spacing[0], spacing[1]])
    return float(value[0, 0])


def summarize(values: list[float]) -> dict[str, float]:
    """mean, std, median, min, max, p25, p75 of a list of per-case values (NaN-free)."""
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)),
            "min": float(a.min()), "max": float(a.max()),
            "p25": float(np.percentile(a, 25)), "p75": float(np.percentile(a, 75)), "n": len(a)}


def gland_ring_ratio(image: np.ndarray, label: np.ndarray, ring: int = 3) -> float:
    """Mean intensity of the gland over the mean of a ``ring``-pixel in-plane band around it:
    the contrast a network sees at the gland's border. On T2, gland and its surroundings
    (periprostatic fat, venous plexus, rectal wall) are of similar brightness: the real PROMISE12
    centres give medians of about 1.0-1.2. image, label: (D, H, W) preprocessed; NaN without gland.
    """
    lab = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[:, None]
    if lab.sum() == 0:
        return float("nan")
    grown = torch.nn.functional.max_pool2d(lab, 2 * ring + 1, stride=1, padding=ring)
    band = (grown > 0) & (lab == 0)
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[:, None]
    inner, outer = img[lab > 0].mean(), img[band].mean()
    return float(inner / outer.clamp_min(1e-6))


def case_weighted_mean(sites: dict[str, dict], value: str = "dice_mean",
                       count: str = "n_cases") -> float:
    """Mean of the sites' ``value`` weighted by their ``count`` of cases (sites without
    ``count`` are left out): the federation's figure over all its cases. NaN without a case."""
    rows = [m for m in sites.values() if count in m]
    n = sum(m[count] for m in rows)
    return sum(m[value] * m[count] for m in rows) / n if n else float("nan")
