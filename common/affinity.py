"""How much a proxy slice looks like a site's own data, and teacher calibration, both computed
at the site from its private data; only one number per proxy slice and one temperature leave it.

**Affinity.** A teacher's bottleneck map (N, C, h, w) is pooled to a slice embedding (N, 2C):
the spatial mean and standard deviation per channel. The site standardises the embeddings of its
private *train* slices (per-dimension mean and std) and scores a slice by its mean Euclidean
distance to the ``k`` nearest train embeddings, divided by sqrt(2C). The score is then divided
by the median score of the site's private *validation* slices, so that

    d_k(n) ~ 1   for a proxy slice n as close to site k's data as its own unseen slices,
    d_k(n) >> 1  for a slice that site k has never seen anything like.

The normalisation makes the distances of different sites comparable at the server, which turns
them into per-slice teacher weights (``server.aggregation``, method ``affinity``).

**Calibration.** Temperature scaling (Guo et al., 2017): the scalar T that minimises the pixel
negative log-likelihood of softmax(logits / T) on the private validation split, searched on a
log grid. A site divides its proxy logits by T before it sends them, so the server combines
calibrated probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TEMPERATURE_GRID = np.exp(np.linspace(np.log(0.25), np.log(8.0), 31))


def slice_embedding(bottleneck: torch.Tensor) -> np.ndarray:
    """(N, C, h, w) feature map -> (N, 2C) float64: per-channel spatial mean and std."""
    flat = bottleneck.flatten(2).double()
    return torch.cat([flat.mean(dim=2), flat.std(dim=2, unbiased=False)], dim=1).numpy()


class AffinityReference:
    """The site's private train embeddings (M, D), standardised, and the validation median."""

    def __init__(self, train: np.ndarray, val: np.ndarray, k: int = 5):
        if len(train) < 2:
            raise ValueError(f"affinity: {len(train)} train slice(s); at least 2 are needed")
        self.mean = train.mean(axis=0)
        self.std = train.std(axis=0) + 1e-6
        self.train = (train - self.mean) / self.std
        self.k = max(1, min(k, len(train)))
        ref = self.raw_distance(val) if len(val) else self.raw_distance(train, leave_one_out=True)
        self.scale = float(max(np.median(ref), 1e-6))

    def raw_distance(self, emb: np.ndarray, leave_one_out: bool = False) -> np.ndarray:
        """(N, D) -> (N,): mean distance to the k nearest standardised train embeddings."""
        z = (emb - self.mean) / self.std
        d = np.sqrt(np.maximum(((z[:, None, :] - self.train[None]) ** 2).sum(axis=2), 0.0))
        k = self.k
        if leave_one_out:
            d = np.sort(d, axis=1)[:, 1:]
            k = min(k, d.shape[1])
        part = np.sort(d, axis=1)[:, :k]
        return part.mean(axis=1) / np.sqrt(z.shape[1])

    def distance(self, emb: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) float32: normalised distance d(n), ~1 for the site's own unseen data."""
        return (self.raw_distance(emb) / self.scale).astype(np.float32)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the pixel NLL: logits (N, 2, H, W), labels (N, H, W) int."""
    if logits.numel() == 0:
        return 1.0
    labels = labels.long()
    nll = [float(F.cross_entropy(logits / t, labels)) for t in TEMPERATURE_GRID]
    return float(TEMPERATURE_GRID[int(np.argmin(nll))])
