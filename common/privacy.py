"""Differential privacy of what a site shares: the Gaussian mechanism on its proxy outputs.

With ``privacy.noise_multiplier`` z > 0, a site answering a proxy query clips, per slice, what it
releases in two parts: the prediction (calibrated logits, or the foreground probability map of a
compact reply) to L2 norm ``privacy.clip_norm`` C_p, and the requested feature maps of that
slice (full or channel-pooled, flattened together) to ``privacy.feature_clip_norm`` C_f. Each
part gets independent N(0, (z C)^2) noise with its own C, before quantisation and encoding (which
are post-processing). Clipping the parts separately keeps large feature maps from squashing the
prediction (with one joint bound they dominate it).

Guarantee (what :func:`epsilon` reports). The unit of privacy is one private training case
(replace-one adjacency). Replacing a case can change the teacher, hence every slice's output, in
any way. Divided by their bounds, the P released parts of a slice form a vector of norm at most
sqrt(P), which moves by at most 2 sqrt(P); the release of N slices has L2 sensitivity
2 sqrt(P N) against noise of std z, i.e. the Gaussian mechanism with effective noise multiplier
``z_eff = z / (2 sqrt(P N))``, whose Renyi DP is ``eps_RDP(alpha) = k alpha / (2 z_eff^2)`` after
k releases (re-queries compose; Mironov 2017), converted to (epsilon, delta)-DP by ``epsilon =
min_alpha eps_RDP(alpha) + log(1/delta) / (alpha - 1)``. The bound is honest and therefore
loose: it assumes nothing about how training uses a case, so a meaningful epsilon needs a lot of
noise on hundreds of slices.
"""

from __future__ import annotations

import math

import numpy as np

ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 128, 256, 512,
                                                                                  1024, 4096])


def rdp_to_epsilon(rdp: list[float], delta: float, orders=ORDERS) -> float:
    """(epsilon, delta)-DP from Renyi DP values at ``orders``."""
    return float(min(r + math.log(1.0 / delta) / (a - 1.0) for r, a in zip(rdp, orders)))


def epsilon(noise_multiplier: float, n_slices: int, delta: float, releases: int = 1,
            parts: int = 1) -> float:
    """Epsilon of ``releases`` clipped, noised proxy replies of ``n_slices`` slices, each slice
    released in ``parts`` separately clipped parts (module docstring); ``inf`` without noise."""
    if noise_multiplier <= 0:
        return math.inf
    z_eff = noise_multiplier / (2.0 * math.sqrt(parts * n_slices))
    return rdp_to_epsilon([releases * a / (2.0 * z_eff ** 2) for a in ORDERS], delta)


def clip_and_noise(arrays: list[np.ndarray], clip_norm: float, noise_multiplier: float,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Per-slice clipping over all ``arrays`` together (each (B, ...), the same B slices) to L2
    norm ``clip_norm``, then Gaussian noise of std ``noise_multiplier * clip_norm``. float32 out.
    One released part; :func:`release` clips the prediction and the features separately."""
    if not arrays:
        return []
    flat = [a.reshape(a.shape[0], -1).astype(np.float32) for a in arrays]
    norms = np.sqrt(sum((f.astype(np.float64) ** 2).sum(axis=1) for f in flat))
    scale = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12)).astype(np.float32)
    out = []
    for a, f in zip(arrays, flat):
        noisy = f * scale[:, None] + rng.normal(0.0, noise_multiplier * clip_norm,
                                                f.shape).astype(np.float32)
        out.append(noisy.reshape(a.shape))
    return out


def release(prediction: np.ndarray, features: list[np.ndarray], clip_norm: float,
            feature_clip_norm: float, noise_multiplier: float, rng: np.random.Generator
            ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The Gaussian mechanism on one batch of a reply: the prediction (B, ...) clipped to
    ``clip_norm`` and the feature maps (each (B, ...)) together to ``feature_clip_norm``, each
    part noised with its own bound. Returns float32 arrays of the same shapes."""
    (pred,) = clip_and_noise([prediction], clip_norm, noise_multiplier, rng)
    return pred, clip_and_noise(features, feature_clip_norm, noise_multiplier, rng)
