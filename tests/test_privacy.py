"""The Gaussian mechanism on proxy replies and its (epsilon, delta) accountant."""

import math

import numpy as np
import pytest

from common.privacy import clip_and_noise, epsilon


def test_epsilon_of_the_gaussian_mechanism():
    # one release, sensitivity = noise std (z_eff = 1): the RDP bound at delta 1e-5 is ~5.30
    assert epsilon(2.0, 1, 1e-5) == pytest.approx(5.2985, abs=1e-3)
    assert epsilon(0.0, 477, 1e-5) == math.inf
    eps = [epsilon(z, 477, 1e-5) for z in (5, 20, 80, 320)]
    assert eps == sorted(eps, reverse=True)  # more noise, less epsilon
    assert epsilon(20, 477, 1e-5, releases=4) > epsilon(20, 477, 1e-5)  # queries compose
    assert epsilon(20, 4 * 477, 1e-5) > epsilon(20, 477, 1e-5)  # more slices, more exposure


def test_clip_and_noise_bounds_each_slice_and_adds_the_stated_noise():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 10, (64, 2, 8, 8)).astype(np.float32)
    feats = rng.normal(0, 10, (64, 4, 4, 4)).astype(np.float32)
    (l0, f0) = clip_and_noise([logits, feats], 3.0, 0.0, rng)
    norms = np.sqrt((l0.reshape(64, -1) ** 2).sum(1) + (f0.reshape(64, -1) ** 2).sum(1))
    assert np.allclose(norms, 3.0, rtol=1e-5)  # every slice was above the clip norm
    small = [logits * 1e-3, feats * 1e-3]
    kept = clip_and_noise(small, 3.0, 0.0, rng)
    assert np.allclose(kept[0], small[0]) and np.allclose(kept[1], small[1])  # under C: unchanged
    noisy = clip_and_noise([np.zeros((2000, 50), np.float32)], 3.0, 0.5, rng)[0]
    assert noisy.dtype == np.float32 and noisy.std() == pytest.approx(1.5, rel=0.02)


def test_release_clips_prediction_and_features_separately():
    """Large feature maps no longer squash the prediction: each part has its own bound and
    noise; a release of P parts per slice is accounted as P N unit parts."""
    from common.privacy import release

    rng = np.random.default_rng(0)
    pred = rng.uniform(0, 1, (32, 1, 8, 8)).astype(np.float32)            # norm <= 8
    feats = [rng.normal(0, 100, (32, 16, 4, 4)).astype(np.float32)]       # norm ~ 1600
    p, (f,) = release(pred, feats, 20.0, 3.0, 0.0, rng)
    assert np.allclose(p, pred)                                           # under its bound
    assert np.allclose(np.sqrt((f.reshape(32, -1) ** 2).sum(1)), 3.0, rtol=1e-5)
    joint = clip_and_noise([pred, *feats], 20.0, 0.0, rng)[0]             # the old joint bound
    assert np.abs(joint).max() < 0.1 * np.abs(pred).max()
    p, (f,) = release(pred, feats, 20.0, 3.0, 0.5, rng)
    assert (p - pred).std() == pytest.approx(0.5 * 20.0, rel=0.05)
    assert release(pred, [], 20.0, 3.0, 0.5, rng)[1] == []
    assert epsilon(20, 477, 1e-5, parts=2) == pytest.approx(epsilon(20, 2 * 477, 1e-5))
