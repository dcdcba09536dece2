"""Aggregation of teacher predictions on the proxy set into distillation targets.

All methods work on teacher probabilities ``p_k`` of shape (N, 2, H, W) (softmax of the logits a
site sends) and fold replies in one at a time, so server memory does not grow with the number of
sites: the state is a weighted sum and a sum of weights of the size of one reply.

* ``mean`` (FedMD / FedDF): ``p = (1/K) sum_k p_k``.
* ``era`` (DS-FL entropy-reduction averaging): the mean sharpened with temperature
  ``T_era < 1``, ``p = softmax(log(mean_k p_k) / T_era)``, i.e. ``p_c ∝ (mean_k p_kc)^(1/T_era)``.
  (DS-FL's ``softmax(mean / T)`` sharpens ten-class outputs but, on two classes with
  probabilities in [0, 1], softens them at T = 0.5; the log form sharpens at every T < 1.)
* ``affinity``: per-slice weights from each site's own judgement of how much a proxy
  slice looks like its private data (``common.affinity``: ``d_k(n)`` ~ 1 for the site's own
  unseen slices, larger further away), sent with the reply::

      w_k(n) = exp(-d_k(n) / tau_a) / sum_j exp(-d_j(n) / tau_a),   p(n) = sum_k w_k(n) p_k(n)

  ``tau_a`` is ``aggregation.affinity_temperature``. With ``aggregation.affinity_margin`` m > 0
  the distance is ``max(d - m, 0)``: every site that claims a slice (d <= m) weighs equally on it
  (an ensemble where several sites recognise the slice), the others decay as before. The
  teachers' probabilities are calibrated at the site (temperature scaling on its validation
  split, ``reply.calibrate``). A site that sends no affinity (privacy noise on) counts as
  d = 1 everywhere. ``Targets.claim`` keeps ``min_k d_k(n)``: a slice that no teacher claims
  can be left out of distillation (``distill.max_claim_distance``).
* ``adaptive`` (the earlier default): per-pixel weights from each teacher's confidence times
  its site reliability, normalised over teachers::

      w~_k(x) = r_k * exp(-H(p_k(x)) / tau),   H(p) = -sum_c p_c log p_c   (nats)
      w_k(x)  = w~_k(x) / sum_j w~_j(x)
      p(x)    = sum_k w_k(x) p_k(x)

  ``r_k`` is the validation Dice the site reported (floored at 0.01), ``tau`` is
  ``aggregation.confidence_temperature``. With ``use_agreement``, ``r_k`` is further multiplied by
  ``a_k``, the Dice between teacher k's hard mask and the hard mask of the reliability-weighted
  mean ensemble over all proxy slices; that needs a second pass, so each reply is spilled to a
  float16 memory-mapped file in ``spill_dir`` (disk, not RAM) during the first.
* ``single``: the one designated teacher's probabilities (single-teacher distillation).
* ``auto`` (the default; :class:`AutoAggregator`): the same replies folded by each of
  ``aggregation.auto_candidates`` (affinity with its margin, mean, adaptive, era); the server
  keeps the targets that agree best with the public proxy set's own masks (no site data is
  read, no extra traffic). With a proxy set without masks it keeps the first candidate.

Feature targets: teachers of different architectures have feature maps with different channel
counts. Features are grouped by ``(name, channels)`` and each group's target is, per slice, the
mean of its teachers' maps weighted by each teacher's mean pixel weight on that slice (the
weights of the probabilities); the student gets one 1x1 adapter per group.
Memory grows with the number of distinct teacher architectures, not with the number of sites.

Replies arrive in whatever order the sites answer. Each one's weighted contribution is computed
in float32 and added into float64 sums (cast back to float32 at the end), and the site tables are
kept in site order, so the targets do not depend on the arrival order: two runs of one
configuration distil from the same targets.
(Averaging raw maps of independently trained teachers of one architecture is an approximation;
``distill.feature_loss: attention`` compares channel-pooled attention maps instead.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from common.config import AggregationConfig

EPS = 1e-8
MIN_RELIABILITY = 0.01


def entropy(p: np.ndarray) -> np.ndarray:
    """Per-pixel entropy in nats: (N, K, H, W) -> (N, H, W)."""
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def sharpen(p: np.ndarray, temperature: float, axis: int = 1) -> np.ndarray:
    """``softmax(log p / T)``: p_c^(1/T) renormalised; T < 1 lowers the entropy."""
    return softmax(np.log(np.clip(p, 1e-12, None)) / temperature, axis=axis)


def confidence_weight(p: np.ndarray, reliability: float, tau: float) -> np.ndarray:
    """Unnormalised adaptive weight w~_k(x) = r_k * exp(-H(p_k(x)) / tau): (N, H, W)."""
    return max(reliability, MIN_RELIABILITY) * np.exp(-entropy(p) / tau)


def hard_dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = float(np.logical_and(a, b).sum())
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2 * inter / total


@dataclass
class Targets:
    """Distillation targets. ``probs``: (N, 2, H, W) float32 summing to 1 over classes;
    ``features``: ``{"name@channels": (N, C, h, w)}``; ``site_weights``: each site's mean share
    of the per-pixel weight (sums to 1); ``agreement``: per-site agreement when computed;
    ``claim``: (N,) the smallest site affinity distance of each slice (``affinity`` only);
    ``styles``: (S, k, k) the sites' shared styles (``reply.share_style`` only, common.style)."""

    probs: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)
    site_weights: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    claim: Optional[np.ndarray] = None
    styles: Optional[np.ndarray] = None


def feature_group(name: str, channels: int) -> str:
    return f"{name}@{channels}"


CHUNK = 256   # slices folded (and finalised) at a time: temporaries stay small whatever N


def _zeros(shape: tuple, dtype, spill_dir: Optional[Path], name: str) -> np.ndarray:
    """Zeros in RAM, or (``spill_dir`` given) in a memory-mapped ``.npy`` file there: the OS
    pages them out as needed, so server memory does not grow with the proxy set."""
    if spill_dir is None:
        return np.zeros(shape, dtype)
    spill_dir.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(spill_dir / f"{name}.npy", "w+", dtype, shape)


class StreamingAggregator:
    """Fold teacher replies into targets one at a time (see the module docstring).

    Replies are folded ``CHUNK`` slices at a time; with a ``spill_dir`` the running sums and the
    targets are memory-mapped files there (RAM holds a chunk's temporaries, not N slices)."""

    def __init__(self, cfg: AggregationConfig, spill_dir: Optional[Path] = None):
        self.cfg = cfg
        self.method = cfg.method
        self.num: Optional[np.ndarray] = None      # sum_k w~_k p_k  (N, 2, H, W) float64
        self.den: Optional[np.ndarray] = None      # sum_k w~_k      (N, H, W) float64
        self.site_mass: dict[str, float] = {}      # sum over pixels of w~_k
        self.feat_num: dict[str, np.ndarray] = {}
        self.feat_den: dict[str, np.ndarray] = {}   # (N,) per group
        self.claim: Optional[np.ndarray] = None      # affinity: min_k d_k(n)
        self.reliability: dict[str, float] = {}
        self.styles: dict[str, np.ndarray] = {}     # reply.share_style: each site's (k, k)
        self.spill_dir = spill_dir
        self.spilled: dict[str, Path] = {}
        if self.method == "adaptive" and cfg.use_agreement and spill_dir is None:
            raise ValueError("aggregation.use_agreement needs a spill directory")

    @property
    def sites(self) -> list[str]:
        """The sites folded in so far, sorted by name (not in arrival order)."""
        return sorted(self.reliability)

    def add(self, site: str, probs: np.ndarray, reliability: float,
            features: Optional[dict[str, np.ndarray]] = None,
            affinity: Optional[np.ndarray] = None, style: Optional[np.ndarray] = None) -> None:
        """Fold in one teacher: probs (N, 2, H, W) float; features {name: (N, C, h, w)};
        affinity (N,) the site's distance of each slice to its own data (``affinity``); style
        (k, k) the site's shared style (kept for the targets, in site order)."""
        if self.method == "single" and self.reliability:
            raise ValueError(f"aggregation 'single' takes one teacher; got {site} after "
                             f"{self.sites[0]}")
        if self.num is not None and probs.shape != self.num.shape:
            raise ValueError(f"{site}: probabilities of shape {probs.shape}, expected "
                             f"{self.num.shape}")
        self.reliability[site] = float(reliability)
        if style is not None:
            self.styles[site] = style
        slice_d = None
        if self.method == "affinity":
            d = np.ones(len(probs), np.float32) if affinity is None else affinity
            if d.shape != probs.shape[:1]:
                raise ValueError(f"{site}: affinity of shape {d.shape}, expected "
                                 f"({probs.shape[0]},)")
            self.claim = d.copy() if self.claim is None else np.minimum(self.claim, d)
            slice_d = np.clip(d - self.cfg.affinity_margin, 0.0, 50.0)
        agreement = self.method == "adaptive" and self.cfg.use_agreement
        if agreement:   # first pass: reliability only; the reply waits on disk for the second
            path = self.spill_dir / f"{len(self.spilled):04d}.npy"
            spill = _zeros(probs.shape, np.float16, self.spill_dir, path.stem)
            for start in range(0, len(probs), CHUNK):
                spill[start:start + CHUNK] = probs[start:start + CHUNK]
            spill.flush()
            self.spilled[site] = path

        def weight(p: np.ndarray, rows: slice) -> np.ndarray:
            if agreement:
                return np.full(p.shape[:1] + p.shape[2:], max(reliability, MIN_RELIABILITY),
                               np.float32)
            if self.method == "adaptive":
                return confidence_weight(p, reliability, self.cfg.confidence_temperature)
            if slice_d is not None:
                w = np.exp(-slice_d[rows] / self.cfg.affinity_temperature).astype(np.float32)
                return np.broadcast_to(w[:, None, None], p.shape[:1] + p.shape[2:])
            return np.ones(p.shape[:1] + p.shape[2:], np.float32)

        slice_w = self._fold(site, probs, weight)
        for name, f in (features or {}).items():
            key = feature_group(name, f.shape[1])
            if key not in self.feat_num:
                self.feat_num[key] = _zeros(f.shape, np.float64, self.spill_dir, f"feat_{key}")
                self.feat_den[key] = np.zeros(len(f), np.float64)
            num = self.feat_num[key]
            for start in range(0, len(f), CHUNK):
                rows = slice(start, start + CHUNK)
                num[rows] += slice_w[rows, None, None, None] * np.asarray(f[rows], np.float32)
            self.feat_den[key] += slice_w

    def _fold(self, site: str, probs: np.ndarray,
              weight: Callable[[np.ndarray, slice], np.ndarray]) -> np.ndarray:
        """Add ``weight(p, rows) * p`` of every chunk of ``probs`` into the sums; returns each
        slice's mean weight (N,) float32."""
        n = len(probs)
        if self.num is None:
            self.num = _zeros(probs.shape, np.float64, self.spill_dir, "num")
            self.den = _zeros(probs.shape[:1] + probs.shape[2:], np.float64, self.spill_dir, "den")
        slice_w = np.empty(n, np.float32)
        mass = 0.0
        for start in range(0, n, CHUNK):
            rows = slice(start, start + CHUNK)
            p = np.asarray(probs[rows], np.float32)
            w = weight(p, rows)
            self.num[rows] += p * w[:, None]   # float32 products; float64 sums (order-free)
            self.den[rows] += w
            mass += float(w.sum(dtype=np.float64))
            slice_w[rows] = w.mean(axis=(1, 2))
        self.site_mass[site] = mass
        return slice_w

    def _agreement_pass(self) -> dict[str, float]:
        """Second pass of ``use_agreement``: a_k from the spilled replies, then the adaptive
        fold with weights r_k * a_k * exp(-H / tau)."""
        ensemble = np.empty(self.den.shape, bool)
        for start in range(0, len(ensemble), CHUNK):
            rows = slice(start, start + CHUNK)
            ensemble[rows] = self.num[rows, 1] > self.num[rows, 0]   # argmax == 1
        agreement = {}
        self.num = self.den = None
        for site, path in sorted(self.spilled.items()):
            p = np.load(path, mmap_mode="r")
            agreement[site] = hard_dice(np.asarray(p[:, 1] > p[:, 0]), ensemble)
            r = max(self.reliability[site], MIN_RELIABILITY) * max(agreement[site], MIN_RELIABILITY)
            self._fold(site, p, lambda q, rows: confidence_weight(
                q, r, self.cfg.confidence_temperature))
            del p
            path.unlink()
        return agreement

    def release(self) -> None:
        """Drop the running sums (after :meth:`finalize`; the site tables stay)."""
        self.num = self.den = None
        self.feat_num, self.feat_den = {}, {}

    def finalize(self, as_method: Optional[str] = None) -> Targets:
        """The targets (memory-mapped in ``spill_dir`` when there is one). ``as_method="era"``
        on the sums of ``mean`` (the same uniform weights): ERA's targets without a second set
        of sums."""
        method = as_method or self.method
        if method != self.method and (self.method, method) != ("mean", "era"):
            raise ValueError(f"the sums of {self.method!r} do not give {method!r}")
        if self.num is None:
            raise ValueError("no teacher replies to aggregate")
        agreement = self._agreement_pass() if self.spilled else {}
        probs = _zeros(self.num.shape, np.float32, self.spill_dir, f"targets_{method}")
        for start in range(0, len(probs), CHUNK):
            rows = slice(start, start + CHUNK)
            p = self.num[rows] / np.maximum(self.den[rows], EPS)[:, None]
            probs[rows] = sharpen(p, self.cfg.era_temperature) if method == "era" else p
        total = sum(self.site_mass[s] for s in self.sites)
        weights = {s: self.site_mass[s] / total for s in self.sites}
        feats = {}
        for k, v in sorted(self.feat_num.items()):
            out = feats[k] = _zeros(v.shape, np.float32, self.spill_dir, f"targets_{method}_{k}")
            for start in range(0, len(v), CHUNK):
                rows = slice(start, start + CHUNK)
                out[rows] = v[rows] / np.maximum(self.feat_den[k][rows], EPS)[:, None, None, None]
        styles = np.stack([self.styles[s] for s in self.sites if s in self.styles]) \
            if self.styles else None
        return Targets(probs, feats, weights, agreement, self.claim, styles)


class AutoAggregator:
    """``aggregation.method: auto``: the same replies folded by each method of
    ``aggregation.auto_candidates``; :meth:`finalize` keeps the targets with the highest
    ``score`` (the server's Dice against the public proxy set's own masks: public data only).
    No extra traffic: every candidate reads the same replies (with the affinity). Memory: one
    set of running sums per candidate, except that ``era`` reads the sums of ``mean`` (the same
    uniform weights, sharpened at the end); candidates are finalised one at a time and only the
    best targets so far are kept."""

    def __init__(self, cfg: AggregationConfig, spill_dir: Optional[Path] = None):
        self.candidates = list(cfg.auto_candidates)
        self.members: dict[str, StreamingAggregator] = {}
        for m in self.candidates:
            base = self.base(m)
            if base not in self.members:
                self.members[base] = StreamingAggregator(
                    dataclasses.replace(cfg, method=base),
                    None if spill_dir is None else spill_dir / base)
        self.scores: dict[str, float] = {}
        self.chosen: Optional[str] = None

    def base(self, method: str) -> str:
        """The member whose sums give ``method``'s targets."""
        return "mean" if method == "era" and "mean" in self.candidates else method

    @property
    def sites(self) -> list[str]:
        return next(iter(self.members.values())).sites

    def add(self, site: str, probs: np.ndarray, reliability: float,
            features: Optional[dict[str, np.ndarray]] = None,
            affinity: Optional[np.ndarray] = None, style: Optional[np.ndarray] = None) -> None:
        for agg in self.members.values():
            agg.add(site, probs, reliability, features, affinity, style)

    def finalize(self, score: Optional[Callable[[np.ndarray], float]] = None) -> Targets:
        """The chosen targets; ``score(probs (N, 2, H, W))`` rates each candidate's targets
        (ties: the earlier candidate). ``scores`` and ``chosen`` say what was picked. Without
        ``score`` (a proxy set without masks) the first candidate is kept, unscored."""
        claim = next((a.claim for a in self.members.values() if a.claim is not None), None)
        todo = self.candidates if score is not None else self.candidates[:1]
        self.scores, best = {}, None
        for i, m in enumerate(todo):
            agg = self.members[self.base(m)]
            targets = agg.finalize(as_method=m)
            if all(self.base(later) != self.base(m) for later in todo[i + 1:]):
                agg.release()
            if score is not None:
                self.scores[m] = float(score(targets.probs))
            if best is None or self.scores[m] > self.scores[self.chosen]:   # first of equals
                best, self.chosen = targets, m
            del targets
        return dataclasses.replace(best, claim=claim)


def make_aggregator(cfg: AggregationConfig, spill_dir: Optional[Path] = None
                    ) -> "StreamingAggregator | AutoAggregator":
    """The aggregator of ``cfg.method`` (``auto``: an :class:`AutoAggregator`)."""
    return (AutoAggregator if cfg.method == "auto" else StreamingAggregator)(cfg, spill_dir)


def aggregate(cfg: AggregationConfig, probs: dict[str, np.ndarray], reliability: dict[str, float],
              spill_dir: Optional[Path] = None,
              affinity: Optional[dict[str, np.ndarray]] = None) -> Targets:
    """Batch form: aggregate ``{site: (N, 2, H, W)}`` at once (same result as streaming)."""
    agg = StreamingAggregator(cfg, spill_dir)
    for site, p in probs.items():
        agg.add(site, p, reliability[site], affinity=(affinity or {}).get(site))
    return agg.finalize()


def pixel_weights(cfg: AggregationConfig, probs: dict[str, np.ndarray],
                  reliability: dict[str, float]) -> dict[str, np.ndarray]:
    """The normalised per-pixel weights w_k(x) of ``adaptive`` (or uniform), (N, H, W) each."""
    raw = {s: (confidence_weight(p, reliability[s], cfg.confidence_temperature)
               if cfg.method == "adaptive" else np.ones(p.shape[:1] + p.shape[2:]))
           for s, p in probs.items()}
    total = sum(raw.values())
    return {s: w / total for s, w in raw.items()}
