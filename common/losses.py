"""Losses: Dice (MONAI), Lovasz-softmax, temperature-scaled KL, and feature distillation.

Shapes: logits and probabilities are (B, K, H, W) with K classes; hard labels are (B, H, W) or
(B, 1, H, W) integers; soft targets are (B, K, H, W) probabilities summing to 1 over K.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def dice_loss(include_background: bool = False, batch: bool = False):
    """MONAI soft Dice on softmax outputs. Call as ``loss(logits, target)`` where ``target`` is a
    (B, 1, H, W) label map or (B, K, H, W) soft/one-hot target. ``batch=True`` pools the whole
    batch into one Dice (stable when many slices hold no gland)."""
    from monai.losses import DiceLoss

    hard = DiceLoss(softmax=True, to_onehot_y=True, include_background=include_background,
                    batch=batch)
    soft = DiceLoss(softmax=True, to_onehot_y=False, include_background=include_background,
                    batch=batch)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == logits.dim() and target.shape[1] == logits.shape[1]:
            return soft(logits, target.float())
        if target.dim() == logits.dim() - 1:
            target = target[:, None]
        return hard(logits, target)

    return loss


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors (Berman et al.,
    Alg. 1): ``g_i = Delta(pi_1..pi_i) - Delta(pi_1..pi_{i-1})`` with
    ``Delta(M) = |M| / |Y u M|`` evaluated on the errors sorted in decreasing order."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax_flat(probas: torch.Tensor, labels: torch.Tensor,
                        classes: str = "present") -> torch.Tensor:
    """Lovasz-softmax on flattened inputs: probas (P, K), labels (P,) int. Mean over classes
    (only the classes present in ``labels`` when ``classes='present'``)."""
    if probas.numel() == 0:
        return probas.sum() * 0.0
    losses = []
    for c in range(probas.shape[1]):
        fg = (labels == c).to(probas.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probas[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[perm])))
    if not losses:
        return probas.sum() * 0.0
    return torch.stack(losses).mean()


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, per_image: bool = False,
                   classes: str = "present", ignore_index: Optional[int] = None) -> torch.Tensor:
    """Lovasz-softmax loss (Berman, Triki, Blaschko, CVPR 2018), a convex surrogate of the
    Jaccard loss. logits (B, K, H, W); labels (B, H, W) or (B, 1, H, W) int."""
    if labels.dim() == logits.dim():
        labels = labels[:, 0]
    probas = logits.softmax(dim=1)
    k = probas.shape[1]

    def flat(p: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, H, W), (B, H, W) -> (P, K), (P,) without ignored pixels."""
        p, y = p.permute(0, 2, 3, 1).reshape(-1, k), y.reshape(-1)
        if ignore_index is not None:
            keep = y != ignore_index
            p, y = p[keep], y[keep]
        return p, y

    if per_image:
        return torch.stack([lovasz_softmax_flat(*flat(p[None], y[None]), classes=classes)
                            for p, y in zip(probas, labels)]).mean()
    return lovasz_softmax_flat(*flat(probas, labels), classes=classes)


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes and averaged over the
    batch and pixels (Hinton et al.). Both inputs (B, K, H, W). To distil from probabilities
    ``p`` (e.g. an aggregated ensemble) pass ``teacher_logits = log(p)``. ``weight`` (B, H, W)
    makes it a weighted mean over pixels (e.g. more weight where the target holds gland)."""
    t = temperature
    log_q = F.log_softmax(student_logits / t, dim=1)
    log_p = F.log_softmax(teacher_logits / t, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    if weight is not None:
        return (kl * weight).sum() / weight.sum().clamp_min(1e-8) * t * t
    return kl.mean() * t * t


def probs_to_logits(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Log-probabilities usable as teacher logits (clamped away from 0)."""
    return probs.clamp_min(eps).log()


def attention_map(feat: torch.Tensor) -> torch.Tensor:
    """Attention transfer map (Zagoruyko & Komodakis): mean over channels of f^2, flattened and
    L2-normalised per sample. (B, C, H, W) -> (B, H*W)."""
    return F.normalize(feat.pow(2).mean(dim=1).flatten(1), dim=1)


class FeatureDistillLoss(nn.Module):
    """Feature distillation between student and teacher maps with the same names.

    A teacher key may carry a suffix, ``name@group`` (the server's per-architecture targets,
    ``enc2@32``): it is compared with the student map ``name``, through its own adapter.

    ``mse``: student map -> learnable 1x1 conv adapter (C_s -> C_t) -> bilinear resize to the
    teacher's H, W -> mean squared error against the teacher map.
    ``attention``: attention-transfer distance between the channel-pooled maps (no adapter; the
    student map is resized to the teacher's H, W). The loss is averaged over feature names.
    """

    def __init__(self, student_channels: dict[str, int], teacher_channels: dict[str, int],
                 mode: str = "mse"):
        super().__init__()
        self.mode = mode
        self.source = {k: k.split("@")[0] for k in teacher_channels}
        self.names = [k for k in teacher_channels if self.source[k] in student_channels]
        if not self.names:
            raise ValueError(f"no feature maps in common between student "
                             f"({sorted(student_channels)}) and teacher ({sorted(teacher_channels)})")
        self.adapters = nn.ModuleDict({
            n: nn.Conv2d(student_channels[self.source[n]], teacher_channels[n], kernel_size=1)
            for n in self.names} if mode == "mse" else {})

    def forward(self, student_feats: dict[str, torch.Tensor],
                teacher_feats: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for n in self.names:
            s = student_feats[self.source[n]]
            t = teacher_feats[n].to(s.dtype)
            if self.mode == "mse":
                s = self.adapters[n](s)
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            if self.mode == "mse":
                total = total + F.mse_loss(s, t)
            else:
                total = total + (attention_map(s) - attention_map(t)).pow(2).sum(dim=1).mean()
        return total / len(self.names)
