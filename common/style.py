"""Site style as a low-frequency amplitude spectrum (FedDG, Liu et al. CVPR 2021).

The amplitude of a slice's 2-D Fourier transform near the centre of the (shifted) spectrum holds
its low-frequency look: the overall contrast, the bias field of a surface or endorectal coil.
The phase holds where things are. Swapping the low-frequency amplitude of a public slice for a
site's, and keeping its phase, restyles the slice into the site's look without moving the
anatomy, so a segmentation target made for the slice still fits.

A site's style is the mean amplitude over its training slices inside the central window of
half-width ``b = floor(beta x min(H, W))``: a (2b+1, 2b+1) float32 array (13 x 13 for 64 x 64
slices at beta 0.1), an average over hundreds of slices, not an image.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_BETA = 0.1


def window_half_width(hw: tuple[int, int], beta: float = DEFAULT_BETA) -> int:
    """b: the central window of the shifted spectrum is (2b+1, 2b+1), at least 1 x 1."""
    if not 0.0 < beta <= 0.5:
        raise ValueError(f"style beta: expected in (0, 0.5], got {beta}")
    return max(0, int(np.floor(beta * min(hw))))


def _window(hw: tuple[int, int], b: int) -> tuple[slice, slice]:
    ch, cw = hw[0] // 2, hw[1] // 2
    return slice(ch - b, ch + b + 1), slice(cw - b, cw + b + 1)


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    """Centred 2-D FFT over the last two dims of ``x`` (..., H, W), complex."""
    return torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))


def site_style(slices: np.ndarray | torch.Tensor, beta: float = DEFAULT_BETA,
               chunk: int = 256) -> np.ndarray:
    """The mean low-frequency amplitude of ``slices`` (N, C, H, W) (every channel of every
    slice alike): (2b+1, 2b+1) float32. ValueError on an empty set."""
    n = len(slices)
    if n == 0:
        raise ValueError("site style: no slices")
    hw = tuple(slices.shape[-2:])
    rows, cols = _window(hw, window_half_width(hw, beta))
    total, count = None, 0
    for start in range(0, n, chunk):
        x = torch.as_tensor(np.asarray(slices[start:start + chunk], dtype=np.float32))
        amp = _spectrum(x).abs()[..., rows, cols]
        s = amp.reshape(-1, *amp.shape[-2:]).sum(dim=0)
        total = s if total is None else total + s
        count += amp.reshape(-1, *amp.shape[-2:]).shape[0]
    return (total / count).numpy().astype(np.float32)


def restyle(x: torch.Tensor, style: np.ndarray | torch.Tensor,
            lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``x`` (N, C, H, W) with its low-frequency amplitude moved toward ``style``
    ((2b+1, 2b+1), from :func:`site_style` on slices of the same size, or (N, 2b+1, 2b+1): one
    per slice): (1 - lam) x own + lam x style inside the window, the phase and the rest of the
    spectrum kept. ``lam`` is a float or an (N,) tensor (one per slice). Returns float32
    (N, C, H, W)."""
    style = torch.as_tensor(np.asarray(style, dtype=np.float32))
    k = style.shape[-1]
    if style.ndim not in (2, 3) or style.shape[-2] != k or k % 2 == 0 or \
            (style.ndim == 3 and style.shape[0] != x.shape[0]):
        raise ValueError(f"style: expected a (2b+1, 2b+1) window or one per slice, got "
                         f"{tuple(style.shape)} for {x.shape[0]} slices")
    if style.ndim == 3:
        style = style.view(x.shape[0], *([1] * (x.ndim - 3)), k, k)
    hw = tuple(x.shape[-2:])
    if k > min(hw):
        raise ValueError(f"style window {k} x {k} is larger than the slices {hw}")
    rows, cols = _window(hw, k // 2)
    spec = _spectrum(x)
    amp, phase = spec.abs(), spec.angle()
    lam_t = torch.as_tensor(lam, dtype=torch.float32)
    if lam_t.ndim == 1:
        lam_t = lam_t.view(-1, *([1] * (x.ndim - 1)))
    amp = amp.clone()
    amp[..., rows, cols] = (1.0 - lam_t) * amp[..., rows, cols] + lam_t * style
    out = torch.fft.ifft2(torch.fft.ifftshift(torch.polar(amp, phase), dim=(-2, -1)))
    return out.real.to(torch.float32)
