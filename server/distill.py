"""Distil the student on the public proxy images from aggregated teacher targets.

loss = w_kl      * T^2 KL(p_teachers^(1/T) || softmax(student / T))
     + w_lovasz  * Lovasz-softmax(student, argmax p_teachers)
     + w_dice    * Dice(student, argmax p_teachers)
     + w_feature * feature loss(student features -> 1x1 adapter per feature group, teacher targets;
                 common.losses.FeatureDistillLoss)

Weights and T come from ``distill`` in the run config; a weight of 0 switches a term off (for
ablations: ``--set distill.w_feature=0``). Shapes: proxy images (N, C_in, H, W); target
probabilities (N, 2, H, W); feature targets ``{"name@C": (N, C, h, w)}``.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from common.aggregation import Targets
from common.config import DistillConfig
from common.losses import (
    FeatureDistillLoss,
    dice_loss,
    kd_kl_loss,
    lovasz_softmax,
    probs_to_logits,
)
from common.models import FeatureNet


def distill_student(student: FeatureNet, images: np.ndarray, targets: Targets, cfg: DistillConfig,
                    seed: int = 0, log: Callable[[str], None] = print, tag: str = "distill",
                    feature_loss: Optional[FeatureDistillLoss] = None) -> list[dict]:
    """Train ``student`` in place on ``images`` (N, C_in, H, W) toward ``targets``.

    Returns the per-epoch history: total loss and each term's mean.
    """
    if images.shape[0] != targets.probs.shape[0]:
        raise ValueError(f"{images.shape[0]} proxy images but {targets.probs.shape[0]} targets")
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(images.astype(np.float32))
    p_all = torch.from_numpy(targets.probs)
    logit_all = probs_to_logits(p_all)
    label_all = p_all.argmax(dim=1)
    feat_all = {g: torch.from_numpy(f.astype(np.float32)) for g, f in targets.features.items()}
    if feature_loss is None and cfg.w_feature > 0 and feat_all:
        feature_loss = FeatureDistillLoss(student.feature_channels(),
                                          {g: f.shape[1] for g, f in feat_all.items()},
                                          cfg.feature_loss)
    params = list(student.parameters()) + (list(feature_loss.parameters()) if feature_loss else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    dice = dice_loss(batch=True)
    n = x_all.shape[0]
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        student.train()
        sums = {"loss": 0.0, "kl": 0.0, "lovasz": 0.0, "dice": 0.0, "feature": 0.0}
        steps = 0
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            logits, feats = student(x_all[idx])
            terms = {}
            if cfg.w_kl > 0:
                terms["kl"] = kd_kl_loss(logits, logit_all[idx], cfg.temperature)
            if cfg.w_lovasz > 0:
                terms["lovasz"] = lovasz_softmax(logits, label_all[idx])
            if cfg.w_dice > 0:
                terms["dice"] = dice(logits, label_all[idx])
            if cfg.w_feature > 0 and feature_loss is not None:
                terms["feature"] = feature_loss(feats, {g: f[idx] for g, f in feat_all.items()})
            weights = {"kl": cfg.w_kl, "lovasz": cfg.w_lovasz, "dice": cfg.w_dice,
                       "feature": cfg.w_feature}
            loss = sum(weights[k] * v for k, v in terms.items())
            if not isinstance(loss, torch.Tensor):
                raise ValueError("distill: every loss weight is 0")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            sums["loss"] += loss.item()
            for k, v in terms.items():
                sums[k] += v.item()
        sched.step()
        row = {"epoch": epoch, **{k: v / steps for k, v in sums.items()},
               "seconds": time.perf_counter() - t0}
        history.append(row)
        log(f"[{tag}] epoch {epoch}/{cfg.epochs} loss={row['loss']:.4f} kl={row['kl']:.4f} "
            f"lovasz={row['lovasz']:.4f} dice={row['dice']:.4f} feature={row['feature']:.4f} "
            f"({row['seconds']:.1f}s)")
    student.eval()
    return history
