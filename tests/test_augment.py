"""The batch augmentation of distillation moves soft targets and feature maps with the image."""

import numpy as np
import torch

from common import augment
from common.augment import STANDARD, augment_batch


def test_geometry_moves_targets_and_features_with_the_image(monkeypatch):
    # geometry only: no intensity change, so image and maps must stay pixel-aligned
    monkeypatch.setitem(augment.STANDARD, "scale_prob", 0.0)
    monkeypatch.setitem(augment.STANDARD, "shift_prob", 0.0)
    monkeypatch.setitem(augment.STANDARD, "gamma_prob", 0.0)
    monkeypatch.setitem(augment.STANDARD, "noise_prob", 0.0)
    n = 64
    img = torch.zeros(n, 1, 32, 32)
    img[:, :, 4:14, 18:28] = 1.0                     # an off-centre square
    probs = torch.stack([1 - img[:, 0], img[:, 0]], dim=1)
    feat = torch.nn.functional.avg_pool2d(img, 4)    # the same square at a quarter resolution
    x, maps = augment_batch(img, {"probs": probs, "feat": feat}, torch.Generator().manual_seed(0),
                            background="probs")
    p, f = maps["probs"], maps["feat"]
    assert x.shape == img.shape and p.shape == probs.shape and f.shape == feat.shape
    moved = (x - img).abs().flatten(1).amax(dim=1) > 0.5
    assert 0.5 * n < moved.sum() < n  # most samples are flipped or rotated, some untouched
    # the gland probability follows the image exactly (same grid, same interpolation)
    assert torch.allclose(p[:, 1], x[:, 0], atol=1e-5)
    # probabilities still sum to 1 (the area moved in from outside is background)
    assert torch.allclose(p.sum(dim=1), torch.ones_like(p[:, 0]), atol=1e-5)
    # the low-resolution map moved the same way: its mass centre matches the image's
    def centre(t):
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, t.shape[-2]), torch.linspace(-1, 1, t.shape[-1]),
                                indexing="ij")
        w = t[:, 0].clamp_min(0)
        return torch.stack([(w * ys).sum((1, 2)), (w * xs).sum((1, 2))], 1) / w.sum((1, 2))[:, None]
    assert (centre(x) - centre(f)).abs().max() < 0.12
    # a flip of the first spatial axis sends the square to the other side of that axis
    flipped = centre(x)[:, 0] > 0.2
    assert flipped.any() and (centre(f)[flipped, 0] > 0.1).all()


def test_intensity_changes_the_image_only_within_the_recipe_ranges():
    img = torch.full((200, 1, 8, 8), 0.5)
    probs = torch.stack([torch.ones(200, 8, 8), torch.zeros(200, 8, 8)], dim=1)
    x, maps = augment_batch(img, {"probs": probs}, torch.Generator().manual_seed(1),
                            background="probs")
    assert torch.allclose(maps["probs"], probs, atol=1e-5)  # all background, moved or not
    mean = x.mean(dim=(1, 2, 3))
    lo = 0.5 * (1 - STANDARD["scale"]) - STANDARD["shift"] - 0.02
    hi = 0.5 * (1 + STANDARD["scale"]) + STANDARD["shift"] + 0.02
    assert lo < mean.min() and mean.max() < hi and mean.std() > 0.03


def test_scanner_intensity_is_physical_reproducible_and_leaves_targets_alone():
    from common.augment import augment_batch, augmentation, scanner_intensity

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    r2 = (yy - 16) ** 2 + (xx - 16) ** 2
    blob, ring = r2 <= 25, (r2 > 36) & (r2 <= 81)            # a gland and a ring around it
    x = torch.where(blob, 0.6, 0.4).expand(64, 1, 32, 32).clone()
    a = scanner_intensity(x, torch.Generator().manual_seed(3))
    b = scanner_intensity(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert (a - x).abs().amax(dim=(1, 2, 3)).max() > 0.05       # it changes intensities
    # a smooth field, a monotone gamma, mild blur and noise: the gland stays brighter than the
    # tissue around it (a tissue-contrast inversion would flip this for whole slices)
    contrast = a[:, 0][:, blob].mean(1) - a[:, 0][:, ring].mean(1)
    assert (contrast > 0).float().mean() >= 0.9 and contrast.mean() > 0.1, contrast
    x = x[:16]
    probs = torch.softmax(torch.randn(16, 2, 32, 32, generator=g), dim=1)
    _, maps = augment_batch(x, {"probs": probs}, torch.Generator().manual_seed(1),
                            background="probs", intensity="scanner")
    _, ref = augment_batch(x, {"probs": probs}, torch.Generator().manual_seed(1),
                           background="probs")
    assert torch.allclose(maps["probs"], ref["probs"])          # targets move only with geometry
    out = augmentation("scanner")({"image": x[0].numpy(), "label": np.zeros((1, 32, 32), np.int64)})
    assert tuple(out["image"].shape) == (1, 32, 32)


def test_monai_scanner_augmentation_follows_its_random_state_only():
    """The MONAI path (FedAvg local epochs, central baselines, adaptation) seeds the scanner
    draws from the transform's random state: a seeded pipeline gives the same slices whatever
    torch's global generator did before (another site's round in the same simulation actor),
    and another seed gives other slices."""
    from common.augment import augmentation

    x = torch.full((1, 32, 32), 0.5)
    x[:, 8:24, 8:24] = 0.7

    def run(seed, disturb):
        t = augmentation("scanner")
        t.set_random_state(seed=seed)
        out = []
        for i in range(8):
            torch.rand(disturb + i)     # whatever else draws from the global generator
            out.append(t({"image": x.numpy().copy(), "label": np.zeros((1, 32, 32))})["image"])
        return torch.stack([torch.as_tensor(o) for o in out])

    a, b, c = run(5, 0), run(5, 3), run(6, 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - x).abs().amax() > 0.05
