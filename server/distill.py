"""Distil the student on the public proxy images from aggregated teacher targets.

loss = w_kl      * T^2 KL(p_teachers^(1/T) || softmax(student / T)), each pixel weighted by
                 1 + kl_foreground_weight * p_teachers[gland] (mean over the weights)
     + w_lovasz  * Lovasz-softmax(student, argmax p_teachers), on pixels whose top target
                 probability reaches lovasz_confidence
     + w_dice    * Dice(student, p_teachers if soft_dice else argmax p_teachers)
     + w_feature * feature loss(student features -> 1x1 adapter per feature group, teacher targets;
                 common.losses.FeatureDistillLoss)

Loss weights and T come from ``distill``; a weight of 0 switches a term off (for ablations:
``--set distill.w_feature=0``). The optimiser recipe is the ``student`` section, the same as
FedAvg's local epochs: AdamW at ``student.lr`` with cosine decay over ``distill.epochs``, batches
of ``student.batch_size``, every slice whose target holds gland plus a random
``student.empty_slice_fraction`` of the others per epoch (or, with ``distill.steps_per_epoch``,
that many steps of slices drawn at random with the same odds, each public set at its
``distill.set_weights`` share: a budget in steps whatever the proxy set's size), and the standard augmentation
(:func:`common.augment.augment_batch`, the targets and feature maps moving with the image), then
with ``distill.style_augment`` the sites' styles (:func:`style_batch`).
Shapes: proxy images (N, C_in, H, W); target probabilities (N, 2, H, W); feature targets
``{"name@C": (N, C, h, w)}``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from server.aggregation import Targets
from common.augment import augment_batch
from common.config import ConfigError, DistillConfig, RunConfig, StudentConfig, TrainConfig
from common.losses import (
    FeatureDistillLoss,
    dice_loss,
    kd_kl_loss,
    lovasz_softmax,
    probs_to_logits,
)
from common.models import FeatureNet
from common.style import restyle

IGNORE = -1   # label of pixels left out of the Lovasz term


def epoch_slices(has_gland: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of one epoch: every slice with gland and a random ``fraction`` of the others
    (the empty-slice policy of supervised training)."""
    fg, bg = np.flatnonzero(has_gland), np.flatnonzero(~has_gland)
    n_bg = int(round(len(bg) * fraction))
    chosen = rng.choice(bg, n_bg, replace=False) if n_bg else np.empty(0, dtype=np.int64)
    return np.concatenate([fg, chosen]).astype(np.int64)


def rows_of(array: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of an array in RAM or memory-mapped, as a float32 tensor (only these rows
    are read)."""
    return torch.from_numpy(np.asarray(array[idx.numpy()], dtype=np.float32))


def has_gland_target(probs: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(N,) whether a slice's target (N, 2, H, W) has a pixel whose argmax is gland, read
    ``chunk`` slices at a time."""
    return np.concatenate([(probs[i:i + chunk, 1] > probs[i:i + chunk, 0]).any(axis=(1, 2))
                           for i in range(0, len(probs), chunk)]) if len(probs) else np.zeros(0, bool)


def draw_odds(has_gland: np.ndarray, usable: np.ndarray, empty_fraction: float,
              set_index: Optional[np.ndarray] = None, set_names: Sequence[str] = (),
              set_weights: Optional[dict[str, float]] = None) -> np.ndarray:
    """(N,) probabilities of drawing each proxy slice for a step: a gland slice counts 1, an
    empty one ``empty_fraction``, an unusable one 0; with ``set_weights`` ({set name: share}),
    each set's slices are scaled so that the set gets its share (``set_index`` (N,) indexes
    ``set_names``; a set without a share gets none)."""
    w = np.where(has_gland, 1.0, empty_fraction) * usable
    if set_weights:
        if set_index is None:
            raise ValueError("distill.set_weights: the proxy slices' sets are not known")
        total = sum(set_weights.values())
        for i, name in enumerate(set_names):
            rows = set_index == i
            mass = w[rows].sum()
            share = set_weights.get(name, 0.0) / total
            if share > 0 and mass == 0:
                raise ValueError(f"distill.set_weights.{name}: the set has no usable slice")
            w[rows] = w[rows] * (share / mass) if mass > 0 else 0.0
    if w.sum() <= 0:
        raise ValueError("distill: no proxy slice can be drawn")
    return w / w.sum()


def style_batch(x: torch.Tensor, styles: np.ndarray, share: float,
                gen: torch.Generator) -> torch.Tensor:
    """``x`` (B, C, H, W) with about ``share`` of its slices restyled (common.style.restyle),
    each into one of ``styles`` (S, k, k) drawn at random, at a strength uniform in [0, 1]."""
    pick = torch.rand(len(x), generator=gen) < share
    n = int(pick.sum())
    if n == 0:
        return x
    which = torch.randint(len(styles), (n,), generator=gen)
    x = x.clone()
    x[pick] = restyle(x[pick], np.asarray(styles)[which.numpy()], torch.rand(n, generator=gen))
    return x


def distill_student(student: FeatureNet, images: np.ndarray, targets: Targets, cfg: DistillConfig,
                    recipe: Optional[StudentConfig] = None, seed: int = 0,
                    log: Callable[[str], None] = print, tag: str = "distill",
                    feature_loss: Optional[FeatureDistillLoss] = None,
                    on_epoch: Optional[Callable[[int, FeatureNet], None]] = None,
                    set_index: Optional[np.ndarray] = None,
                    set_names: Sequence[str] = (),
                    styles: Optional[np.ndarray] = None) -> list[dict]:
    """Train ``student`` in place on ``images`` (N, C_in, H, W) toward ``targets``
    (``set_index`` (N,) into ``set_names``: each slice's public set, for ``distill.set_weights``;
    ``styles`` (S, k, k): the sites' shared styles, for ``distill.style_augment``: that share of
    the drawn slices is restyled into a random site's look at a random strength, common.style).

    Returns the per-epoch history: total loss, each term's mean, the slices used and the
    optimizer steps. ``on_epoch(epoch, student)`` is called after every epoch (e.g. to keep
    checkpoints for selection on validation).
    """
    recipe = recipe or StudentConfig()
    if images.shape[0] != targets.probs.shape[0]:
        raise ValueError(f"{images.shape[0]} proxy images but {targets.probs.shape[0]} targets")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    has_gland = has_gland_target(targets.probs)
    usable = np.ones(len(images), bool)
    if cfg.max_claim_distance is not None and targets.claim is not None:
        usable = targets.claim <= cfg.max_claim_distance
        log(f"[{tag}] {int((~usable).sum())} of {len(usable)} proxy slices left out: no site "
            f"claims them (nearest distance > {cfg.max_claim_distance:g})")
        if not usable.any():
            raise ValueError(f"{tag}: no proxy slice within distill.max_claim_distance "
                             f"{cfg.max_claim_distance:g} of any site")
    if not has_gland.any() and recipe.empty_slice_fraction == 0:
        raise ValueError(f"{tag}: no target holds gland and student.empty_slice_fraction is 0")
    feat_all = targets.features
    if feature_loss is None and cfg.w_feature > 0 and feat_all:
        feature_loss = FeatureDistillLoss(student.feature_channels(),
                                          {g: f.shape[1] for g, f in feat_all.items()},
                                          cfg.feature_loss)
    params = list(student.parameters()) + (list(feature_loss.parameters()) if feature_loss else [])
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    dice = dice_loss(batch=True)
    weights = {"kl": cfg.w_kl, "lovasz": cfg.w_lovasz, "dice": cfg.w_dice,
               "feature": cfg.w_feature}
    if not any(w > 0 for w in weights.values()):
        raise ValueError("distill: every loss weight is 0")
    if cfg.style_augment > 0 and (styles is None or len(styles) == 0):
        raise ValueError(f"{tag}: distill.style_augment needs the sites' styles "
                         f"(reply.share_style), and none came")
    odds = None
    if cfg.steps_per_epoch:
        odds = draw_odds(has_gland, usable, recipe.empty_slice_fraction, set_index, set_names,
                         cfg.set_weights)
        if set_index is not None:
            log(f"[{tag}] {cfg.steps_per_epoch} steps an epoch; share of the draws by set: "
                + ", ".join(f"{n} {odds[set_index == i].sum():.2f}"
                            for i, n in enumerate(set_names)))
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        student.train()
        sums = {"loss": 0.0, "kl": 0.0, "lovasz": 0.0, "dice": 0.0, "feature": 0.0}
        steps = 0
        if odds is None:   # one pass over the epoch's slices
            chosen = torch.from_numpy(np.intersect1d(
                epoch_slices(has_gland, recipe.empty_slice_fraction, rng), np.flatnonzero(usable)))
            order = chosen[torch.randperm(len(chosen), generator=gen)]
        else:              # a fixed number of steps, slices drawn at their odds
            order = torch.from_numpy(rng.choice(len(odds), cfg.steps_per_epoch * recipe.batch_size,
                                                p=odds))
            chosen = torch.unique(order)
        for idx in order.split(recipe.batch_size):
            x, p = rows_of(images, idx), rows_of(targets.probs, idx)
            feats_t = {g: rows_of(f, idx) for g, f in feat_all.items()}
            if recipe.augment:
                x, maps = augment_batch(x, {"probs": p, **feats_t}, gen, background="probs",
                                        intensity=recipe.intensity_augment)
                p = maps.pop("probs")
                feats_t = maps
            if cfg.style_augment > 0:
                x = style_batch(x, styles, cfg.style_augment, gen)
            logits, feats = student(x)
            terms = {}
            if cfg.w_kl > 0:
                weight = 1.0 + cfg.kl_foreground_weight * p[:, 1] if cfg.kl_foreground_weight else None
                terms["kl"] = kd_kl_loss(logits, probs_to_logits(p), cfg.temperature, weight)
            label = p.argmax(dim=1)
            if cfg.w_lovasz > 0:
                if cfg.lovasz_confidence > 0.5:
                    label = torch.where(p.amax(dim=1) >= cfg.lovasz_confidence, label, IGNORE)
                terms["lovasz"] = lovasz_softmax(logits, label, ignore_index=IGNORE)
            if cfg.w_dice > 0:
                terms["dice"] = dice(logits, p if cfg.soft_dice else p.argmax(dim=1))
            if cfg.w_feature > 0 and feature_loss is not None:
                terms["feature"] = feature_loss(feats, feats_t)
            loss = sum(weights[k] * v for k, v in terms.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            sums["loss"] += loss.item()
            for k, v in terms.items():
                sums[k] += v.item()
        sched.step()
        row = {"epoch": epoch, **{k: v / max(steps, 1) for k, v in sums.items()},
               "slices": len(chosen), "steps": steps, "seconds": time.perf_counter() - t0}
        history.append(row)
        log(f"[{tag}] epoch {epoch}/{cfg.epochs} loss={row['loss']:.4f} kl={row['kl']:.4f} "
            f"lovasz={row['lovasz']:.4f} dice={row['dice']:.4f} feature={row['feature']:.4f} "
            f"({len(chosen)} slices, {row['seconds']:.1f}s)")
        if on_epoch is not None:
            student.eval()
            on_epoch(epoch, student)
    student.eval()
    return history


def distill_on_proxy(student: FeatureNet, proxy, targets: Targets, cfg: RunConfig,
                     log: Callable[[str], None] = print, tag: str = "distill",
                     on_epoch: Optional[Callable[[int, FeatureNet], None]] = None) -> list[dict]:
    """:func:`distill_student` on a server's public proxy set (server.proxy.ProxySet) as the run
    config says: the public masks mixed in (``distill.proxy_label_weight``), each set's share
    of the draws, the sites' styles. What every distillation of the project calls (the
    coordinator's rounds, self-training, the FedKD strategy, central-kd)."""
    if cfg.distill.proxy_label_weight > 0:
        targets = mix_labels(targets, proxy.labels, cfg.distill.proxy_label_weight,
                             proxy.labelled)
    return distill_student(student, proxy.images, targets, cfg.distill, cfg.student,
                           cfg.runtime.seed, log, tag=tag, on_epoch=on_epoch,
                           set_index=proxy.set_index, set_names=proxy.set_names,
                           styles=targets.styles)


@torch.no_grad()
def model_probs(model: FeatureNet, images: np.ndarray, folder: Optional[Path] = None,
                batch: int = 64) -> np.ndarray:
    """``model``'s softmax (N, 2, H, W) float32 on ``images`` (N, C, H, W), ``batch`` slices at
    a time; memory-mapped in ``folder/probs.npy`` when ``folder`` is given."""
    model.eval()
    n, (h, w) = len(images), images.shape[-2:]
    if folder is None:
        out = np.empty((n, 2, h, w), np.float32)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(folder / "probs.npy", "w+", np.float32, (n, 2, h, w))
    for start in range(0, n, batch):
        x = torch.from_numpy(np.asarray(images[start:start + batch], dtype=np.float32))
        out[start:start + batch] = model(x)[0].softmax(dim=1).numpy()
    if isinstance(out, np.memmap):
        out.flush()
    return out


def mix_labels(targets: Targets, labels: np.ndarray, weight: float,
               labelled: Optional[np.ndarray] = None) -> Targets:
    """Targets with the public proxy masks mixed in: probs (N, 2, H, W) become
    (1 - weight) x probs + weight x one-hot(labels (N, H, W)) on the ``labelled`` (N,) slices
    (default: all); the others, features and claims unchanged."""
    if labels.shape != targets.probs.shape[:1] + targets.probs.shape[2:]:
        raise ValueError(f"proxy masks of shape {labels.shape} for targets of shape "
                         f"{targets.probs.shape}")
    rows = np.ones(len(labels), bool) if labelled is None else labelled
    onehot = np.stack([labels[rows] == 0, labels[rows] == 1], axis=1).astype(np.float32)
    probs = targets.probs.astype(np.float32, copy=True)
    probs[rows] = (1.0 - weight) * probs[rows] + weight * onehot
    return dataclasses.replace(targets, probs=probs)


def pretrain_on_proxy(student: FeatureNet, cfg: RunConfig, log: Callable[[str], None] = print
                      ) -> dict:
    """Train ``student`` in place on the public proxy set's own masks (``student.
    proxy_pretrain_epochs`` epochs of supervised DiceCE, the ``student`` recipe): see
    :func:`train_on_public_masks`."""
    epochs = cfg.student.proxy_pretrain_epochs
    return train_on_public_masks(student, cfg, cfg.student_train(epochs=epochs, patience=epochs),
                                 "student.proxy_pretrain_epochs", log, tag="proxy pretrain")


def train_on_public_masks(model: FeatureNet, cfg: RunConfig, recipe: TrainConfig, setting: str,
                          log: Callable[[str], None] = print, tag: str = "public start") -> dict:
    """Train ``model`` in place for ``recipe.epochs`` epochs of ``recipe`` on every slice of
    every proxy volume that has a mask (no validation: the last epoch is kept): the public
    start of a student (:func:`pretrain_on_proxy`) or of the pooled baselines' teacher.
    ConfigError, naming ``setting`` and the folder, if the proxy set has no masks. Returns
    {epochs, cases, seconds, steps}."""
    from common.data import iter_proxy
    from common.training import train_segmenter

    cases = [c for _, c in iter_proxy(cfg.data, with_labels=True, labelled_only=True)]
    if not cases:
        raise ConfigError(f"{setting}={recipe.epochs} needs a public proxy set with masks; "
                          f"data.proxy ({cfg.data.proxy}) has none")
    res = train_segmenter(model, cases, [], recipe, cfg.data.context_slices, cfg.runtime.seed,
                          log=log, tag=tag)
    return {"epochs": res.epochs_run, "cases": len(cases), "seconds": res.seconds,
            "steps": int(sum(h.get("steps", 0) for h in res.history))}
