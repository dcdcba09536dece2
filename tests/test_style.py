"""Site style (common.style): the low-frequency amplitude swap, its config rules, and the
distillation's style augmentation."""

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_config
from common.protocol import STYLE, ProtocolError, decode_style
from common.style import restyle, site_style, window_half_width
from server.distill import style_batch


def smooth_slices(n: int, seed: int, bias: float = 0.0) -> torch.Tensor:
    """(n, 1, 64, 64) blobs on noise, times a left-to-right bias ramp of strength ``bias``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64] / 63.0
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.1, 0.2)]
        img = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2) * 1.0 + 0.1 * rng.normal(size=(64, 64))
        out.append(img * (1.0 + bias * xx))
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


def spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))


def test_restyle_swaps_the_low_frequency_amplitude_and_keeps_the_rest():
    x, other = smooth_slices(6, 0), smooth_slices(40, 1, bias=2.0)
    style = site_style(other.numpy())
    b = window_half_width((64, 64))
    assert b == 6 and style.shape == (13, 13) and style.dtype == np.float32
    assert torch.allclose(restyle(x, style, 0.0), x, atol=1e-5)
    out = restyle(x, style, 1.0)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    amp = spectrum(out).abs()[..., 32 - b:32 + b + 1, 32 - b:32 + b + 1]
    assert torch.allclose(amp, torch.from_numpy(style).expand_as(amp), rtol=1e-3, atol=1e-2)
    # outside the window nothing moved, and the phase (where things are) is kept
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[32 - b:32 + b + 1, 32 - b:32 + b + 1] = False
    assert torch.allclose(spectrum(out)[..., outside], spectrum(x)[..., outside], atol=1e-3)
    keep = spectrum(x).abs() > 1.0
    assert torch.allclose(spectrum(out).angle()[keep], spectrum(x).angle()[keep], atol=1e-3)
    # a brighter, higher-contrast set: the restyled slices take its brightness (the zero
    # frequency) and its low-frequency energy, not its anatomy
    bright = 2.5 * smooth_slices(40, 1) + 0.5
    out = restyle(x, site_style(bright.numpy()), 1.0)
    assert abs(float(out.mean()) - float(bright.mean())) < 0.1 * float(bright.mean())
    assert float(x.mean()) < 0.5 * float(bright.mean())
    mask = x > 0.5   # the blobs stay where they were: still the brightest pixels
    assert float(out[mask].mean()) > float(out[~mask].mean()) + 0.5


def test_restyle_takes_one_style_and_strength_per_slice():
    x = smooth_slices(4, 2)
    styles = np.stack([site_style(smooth_slices(10, s, bias=b).numpy())
                       for s, b in ((3, 0.0), (4, 2.0), (5, 0.0), (6, 2.0))])
    lam = torch.tensor([0.0, 1.0, 0.0, 0.5])
    out = restyle(x, styles, lam)
    for i in range(4):
        assert torch.allclose(out[i:i + 1], restyle(x[i:i + 1], styles[i], float(lam[i])),
                              atol=1e-5)
    assert torch.allclose(out[0], x[0], atol=1e-5) and not torch.allclose(out[1], x[1], atol=1e-2)
    with pytest.raises(ValueError, match="one per slice, got .* for 4 slices"):
        restyle(x, styles[:3], 1.0)
    with pytest.raises(ValueError, match="expected a \\(2b\\+1, 2b\\+1\\) window"):
        restyle(x, np.ones((4, 4), np.float32), 1.0)
    with pytest.raises(ValueError, match="no slices"):
        site_style(np.empty((0, 1, 64, 64), np.float32))


def test_style_batch_restyles_the_share_it_is_given():
    x = smooth_slices(64, 7)
    styles = np.stack([site_style(smooth_slices(10, 8, bias=3.0).numpy())])
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(style_batch(x, styles, 0.0, gen), x)
    out = style_batch(x, styles, 0.5, gen)
    changed = (out - x).abs().flatten(1).amax(dim=1) > 1e-3
    assert 20 <= int(changed.sum()) <= 44   # about half of 64
    assert torch.equal(out[~changed], x[~changed])


def test_style_settings_are_checked_where_they_are_set():
    with pytest.raises(ConfigError, match="distill.style_augment: needs reply.share_style"):
        load_config(None, ["distill.style_augment=0.5"])
    with pytest.raises(ConfigError, match="strategy 'fedavg' does not send"):
        load_config(None, ["federation.strategy=fedavg", "reply.share_style=true"])
    with pytest.raises(ConfigError, match="reply.own_style"):
        load_config(None, ["reply.own_style=1.5"])
    cfg = load_config(None, ["reply.share_style=true", "distill.style_augment=0.5",
                             "reply.own_style=1.0"])
    assert cfg.distill.style_augment == 0.5 and cfg.reply.own_style == 1.0


def test_a_malformed_style_in_a_reply_is_a_protocol_error():
    from flwr.app import Array, ArrayRecord, RecordDict

    def reply(a):
        return RecordDict({STYLE: ArrayRecord({"amplitude": Array(a)})})

    good = np.ones((13, 13), np.float32)
    assert np.array_equal(decode_style(reply(good), (64, 64), 0.1), good)
    with pytest.raises(ProtocolError, match="no style.amplitude"):
        decode_style(RecordDict(), (64, 64), 0.1)
    with pytest.raises(ProtocolError, match=r"shape \(64, 64\).*expected \(13, 13\)"):
        decode_style(reply(np.ones((64, 64), np.float32)), (64, 64), 0.1)
    with pytest.raises(ProtocolError, match="negative"):
        decode_style(reply(-good), (64, 64), 0.1)
