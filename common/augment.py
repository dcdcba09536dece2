"""Training augmentation, one recipe for every network that learns from slices.

Two implementations of the same standard recipe (:data:`STANDARD`):

* :func:`augmentation` - MONAI dictionary transforms on one slice and its label, used by
  supervised training (teachers, FedAvg / FedProx local epochs, central baselines);
* :func:`augment_batch` - the same draws on a batch in torch, used by distillation, where the
  soft targets (N, 2, H, W) and the teachers' feature maps (N, C, h, w) must move with the image:
  a flip or rotation of the image is applied to every map at its own resolution (the sampling
  grid is in normalised coordinates), intensity changes touch the image only.

``intensity="strong"`` (teachers only, ``train.intensity_augment``) adds what changes between
scanners and protocols: contrast inversion, histogram shift, bias field, wide gamma, blur, noise.
"""

from __future__ import annotations


from typing import Optional

import torch
import torch.nn.functional as F

# The standard recipe: probabilities and ranges shared by both implementations.
STANDARD = {
    "flip_prob": 0.5,          # left-right flip (first spatial axis)
    "affine_prob": 0.5,        # rotation and zoom
    "rotate": 0.2,             # radians, uniform in [-rotate, rotate]
    "zoom": 0.1,               # scale factor uniform in [1 - zoom, 1 + zoom]
    "scale_prob": 0.5, "scale": 0.2,   # x * (1 + U(-scale, scale))
    "shift_prob": 0.5, "shift": 0.1,   # x + U(-shift, shift)
    "gamma_prob": 0.3, "gamma": (0.7, 1.5),
    "noise_prob": 0.2, "noise_std": 0.03,  # N(0, s), s ~ U(0, noise_std)
}


def _invert(x):
    return 1.0 - x  # images are scaled to [0, 1] by preprocessing


def augmentation(intensity: str = "standard"):
    """MONAI transforms on ``{"image": (C, H, W), "label": (1, H, W)}``: the standard recipe
    (:data:`STANDARD`), or its strong variant for teachers."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandHistogramShiftd,
        RandLambdad,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    a = STANDARD
    steps = [
        RandFlipd(["image", "label"], prob=a["flip_prob"], spatial_axis=0),
        RandAffined(["image", "label"], prob=a["affine_prob"], rotate_range=a["rotate"],
                    scale_range=a["zoom"], mode=["bilinear", "nearest"], padding_mode="zeros"),
        RandScaleIntensityd("image", factors=a["scale"], prob=a["scale_prob"]),
        RandShiftIntensityd("image", offsets=a["shift"], prob=a["shift_prob"]),
    ]
    if intensity == "strong":
        steps += [
            RandLambdad("image", func=_invert, prob=0.2),
            RandHistogramShiftd("image", num_control_points=(5, 10), prob=0.5),
            RandBiasFieldd("image", coeff_range=(0.1, 0.4), prob=0.5),
            RandAdjustContrastd("image", gamma=(0.5, 2.0), prob=0.5),
            RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=0.2),
            RandGaussianNoised("image", std=0.08, prob=0.3),
        ]
    else:
        steps += [RandAdjustContrastd("image", gamma=a["gamma"], prob=a["gamma_prob"]),
                  RandGaussianNoised("image", std=a["noise_std"], prob=a["noise_prob"])]
    return Compose(steps)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coin(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def augment_batch(image: torch.Tensor, maps: dict[str, torch.Tensor], gen: torch.Generator,
                  background: Optional[str] = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The standard recipe on a batch: ``image`` (N, C, H, W) in [0, 1] and spatial ``maps``
    {name: (N, C', h, w)} that follow it (any resolution). Returns new tensors.

    ``background`` names a map of class probabilities (N, 2, h, w) whose area moved in from
    outside the slice is filled with background (probability 1 for class 0), as the zero padding
    of the image is."""
    a = STANDARD
    n = image.shape[0]
    flip = _coin(n, a["flip_prob"], gen)
    affine = _coin(n, a["affine_prob"], gen)
    angle = torch.where(affine, _uniform(n, -a["rotate"], a["rotate"], gen), torch.zeros(n))
    zoom = torch.where(affine, _uniform(n, 1 - a["zoom"], 1 + a["zoom"], gen), torch.ones(n))
    # output coordinate -> input coordinate, in normalised (x = width, y = height) coordinates;
    # a flip of the first spatial axis (height) negates y
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    sy = torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos * sy
    moved = flip | affine

    def warp(x: torch.Tensor, mode: str) -> torch.Tensor:
        if not bool(moved.any()):
            return x
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
        return torch.where(moved.view(-1, 1, 1, 1), out, x)

    x = warp(image, "bilinear")
    out_maps = {}
    for name, m in maps.items():
        w = warp(m, "bilinear")
        if name == background:
            w = w.clone()
            w[:, 0] = w[:, 0] + (1.0 - w.sum(dim=1)).clamp_min(0.0)
        out_maps[name] = w
    # intensity: the image only
    scale = torch.where(_coin(n, a["scale_prob"], gen),
                        1 + _uniform(n, -a["scale"], a["scale"], gen), torch.ones(n))
    shift = torch.where(_coin(n, a["shift_prob"], gen),
                        _uniform(n, -a["shift"], a["shift"], gen), torch.zeros(n))
    x = x * scale.view(-1, 1, 1, 1) + shift.view(-1, 1, 1, 1)
    gamma = torch.where(_coin(n, a["gamma_prob"], gen), _uniform(n, *a["gamma"], gen),
                        torch.ones(n)).view(-1, 1, 1, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    rng = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-8)
    x = torch.where(gamma != 1, ((x - lo) / rng).pow(gamma) * rng + lo, x)
    std = torch.where(_coin(n, a["noise_prob"], gen), _uniform(n, 0.0, a["noise_std"], gen),
                      torch.zeros(n)).view(-1, 1, 1, 1)
    x = x + std * torch.randn(x.shape, generator=gen)
    return x, out_maps



