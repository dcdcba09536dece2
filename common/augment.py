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
``intensity="scanner"`` (teachers or students) adds only physical scanner changes, in one torch
implementation (:func:`scanner_intensity`) shared by both paths: a smooth multiplicative bias
field, a surface/endorectal-coil hot spot, wide gamma, blur and noise; no contrast inversion.
"""

from __future__ import annotations


import functools
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


# The scanner recipe (on top of the standard flips, affine, scale and shift).
SCANNER = {
    "bias_prob": 0.5, "bias": 0.4,                 # exp(quadratic field), coefficients U(-b, b)
    "coil_prob": 0.3, "coil_gain": (0.5, 2.0),     # x * (1 + g exp(-r^2 / 2 s^2))
    "coil_sigma": (0.15, 0.4),                     # s, in units of the image half-width
    "gamma_prob": 0.5, "gamma": (0.5, 2.0),
    "blur_prob": 0.2, "blur_sigma": (0.25, 1.0),   # pixels
    "noise_prob": 0.3, "noise_std": 0.06,
}


def scanner_intensity(x: torch.Tensor, gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """Physical scanner changes on a batch ``x`` (N, C, H, W) in [0, 1]; returns a new tensor
    (one draw per slice, the same across its context channels). Draws from ``gen`` (default:
    torch's global generator)."""
    a = SCANNER
    n, _, h, w = x.shape
    yy = torch.linspace(-1, 1, h).view(1, h, 1).expand(n, h, w)
    xx = torch.linspace(-1, 1, w).view(1, 1, w).expand(n, h, w)
    coef = _uniform(n * 5, -a["bias"], a["bias"], gen).view(5, n, 1, 1)
    field = coef[0] * yy + coef[1] * xx + coef[2] * yy * xx + coef[3] * yy ** 2 + coef[4] * xx ** 2
    field = torch.where(_coin(n, a["bias_prob"], gen).view(-1, 1, 1), field.exp(), torch.ones(1))
    cy, cx = _uniform(n, -0.6, 0.6, gen).view(-1, 1, 1), _uniform(n, -0.6, 0.6, gen).view(-1, 1, 1)
    sigma = _uniform(n, *a["coil_sigma"], gen).view(-1, 1, 1)
    gain = _uniform(n, *a["coil_gain"], gen).view(-1, 1, 1)
    spot = 1 + gain * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    field = field * torch.where(_coin(n, a["coil_prob"], gen).view(-1, 1, 1), spot, torch.ones(1))
    out = x * field[:, None]
    out = out / out.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8) * x.amax(
        dim=(1, 2, 3), keepdim=True)                                   # keep the slice's range
    gamma = torch.where(_coin(n, a["gamma_prob"], gen), _uniform(n, *a["gamma"], gen),
                        torch.ones(n)).view(-1, 1, 1, 1)
    out = out.clamp(0, 1).pow(gamma)
    blur = _coin(n, a["blur_prob"], gen)
    if bool(blur.any()):
        sig = _uniform(n, *a["blur_sigma"], gen)
        k = torch.arange(-2, 3, dtype=x.dtype)
        kern = torch.exp(-k.view(1, -1) ** 2 / (2 * sig.view(-1, 1) ** 2))
        kern = kern / kern.sum(dim=1, keepdim=True)                     # (N, 5)
        blurred = []
        for i in range(n):
            ki = kern[i]
            img = out[i:i + 1].transpose(0, 1)                          # (C, 1, H, W)
            img = F.conv2d(F.pad(img, (2, 2, 0, 0), mode="replicate"), ki.view(1, 1, 1, 5))
            img = F.conv2d(F.pad(img, (0, 0, 2, 2), mode="replicate"), ki.view(1, 1, 5, 1))
            blurred.append(img.transpose(0, 1))
        out = torch.where(blur.view(-1, 1, 1, 1), torch.cat(blurred), out)
    std = torch.where(_coin(n, a["noise_prob"], gen), _uniform(n, 0.0, a["noise_std"], gen),
                      torch.zeros(n)).view(-1, 1, 1, 1)
    return out + std * torch.randn(out.shape, generator=gen)


@functools.cache
def _scanner_transform():
    """The MONAI-path wrapper class (built on first use: MONAI's transforms take a second or
    more to import, and a node or server that never trains on the MONAI path need not pay it)."""
    from monai.transforms import MapTransform, RandomizableTransform

    class RandScannerIntensityd(MapTransform, RandomizableTransform):
        """One (C, H, W) slice under ``keys`` through :func:`scanner_intensity`, its draws from
        a torch generator seeded by this transform's own random state, so that
        ``Compose.set_random_state`` makes them reproducible (torch's global generator would
        depend on whatever ran before in the process, e.g. other sites' rounds in the same
        simulation actor)."""

        def __init__(self, keys):
            MapTransform.__init__(self, keys)
            RandomizableTransform.__init__(self, prob=1.0)

        def __call__(self, data):
            self.randomize(None)
            gen = torch.Generator().manual_seed(int(self.R.randint(0, 2**31 - 1)))
            d = dict(data)
            for key in self.key_iterator(d):
                img = torch.as_tensor(d[key], dtype=torch.float32)
                d[key] = scanner_intensity(img[None], gen)[0]
            return d

    return RandScannerIntensityd


def augmentation(intensity: str = "standard"):
    """MONAI transforms on ``{"image": (C, H, W), "label": (1, H, W)}``: the standard recipe
    (:data:`STANDARD`), its strong variant for teachers, or its scanner variant."""
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
    elif intensity == "scanner":
        steps += [_scanner_transform()("image")]
    else:
        steps += [RandAdjustContrastd("image", gamma=a["gamma"], prob=a["gamma_prob"]),
                  RandGaussianNoised("image", std=a["noise_std"], prob=a["noise_prob"])]
    return Compose(steps)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coin(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def augment_batch(image: torch.Tensor, maps: dict[str, torch.Tensor], gen: torch.Generator,
                  background: Optional[str] = None, intensity: str = "standard"
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
    if intensity == "scanner":
        return scanner_intensity(x.clamp(0, 1), gen), out_maps
    gamma = torch.where(_coin(n, a["gamma_prob"], gen), _uniform(n, *a["gamma"], gen),
                        torch.ones(n)).view(-1, 1, 1, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    rng = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-8)
    x = torch.where(gamma != 1, ((x - lo) / rng).pow(gamma) * rng + lo, x)
    std = torch.where(_coin(n, a["noise_prob"], gen), _uniform(n, 0.0, a["noise_std"], gen),
                      torch.zeros(n)).view(-1, 1, 1, 1)
    x = x + std * torch.randn(x.shape, generator=gen)
    return x, out_maps



