"""Supervised training and evaluation of a segmentation network on preprocessed cases.

Used by a site to train its teacher, and by simulations for local and centralised baselines.
Loss: MONAI DiceCE on the slice labels. Model selection: best mean 3D Dice on validation cases,
with early stopping after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.config import TrainConfig
from common.augment import augmentation
from common.data import CaseVolume
from common.slices import SliceDataset, foreground_slices, slice_stack
from common.metrics import dice_score, hd95, summarize
from common.models import FeatureNet


@dataclass
class TrainResult:
    best_val_dice: float
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    reused: bool = False      # a finished checkpoint with the same settings was loaded
    resumed_from: int = 0     # last epoch of an unfinished checkpoint training went on from


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def predict_volume(model: torch.nn.Module, case: CaseVolume, context: int = 0,
                   batch_size: int = 32) -> np.ndarray:
    """Slice-wise argmax prediction of a case: (D, H, W) uint8."""
    model.eval()
    out = []
    for start in range(0, case.num_slices, batch_size):
        zs = range(start, min(case.num_slices, start + batch_size))
        x = torch.from_numpy(np.stack([slice_stack(case.image, z, context) for z in zs]))
        out.append(_logits(model, x).argmax(dim=1).to(torch.uint8).numpy())
    return np.concatenate(out, axis=0)


def evaluate_cases(model: torch.nn.Module, cases: list[CaseVolume], context: int = 0,
                   with_hd95: bool = True) -> dict:
    """Per-case 3D Dice (and HD95 in mm) and their summaries. Cases must be labeled."""
    per_case = []
    for case in cases:
        assert case.label is not None, f"{case.source}: evaluation needs a label"
        pred = predict_volume(model, case, context)
        row = {"case": case.case_id, "dice": dice_score(pred, case.label)}
        if with_hd95:
            row["hd95"] = hd95(pred, case.label, case.spacing)
        per_case.append(row)
    out = {"per_case": per_case, "dice": summarize([r["dice"] for r in per_case])}
    if with_hd95:
        out["hd95"] = summarize([r["hd95"] for r in per_case])
    return out


def summary_metrics(ev: dict) -> dict[str, float]:
    """Flatten :func:`evaluate_cases` output into ``dice_mean, dice_std, ..., hd95_*, n_cases``
    (figures only: what a site may report)."""
    out: dict[str, float] = {"n_cases": len(ev["per_case"])}
    for metric in ("dice", "hd95"):
        for stat, value in ev.get(metric, {}).items():
            if stat != "n":
                out[f"{metric}_{stat}"] = float(value)
    return out


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: str) -> Optional[dict]:
    """The checkpoint at ``path`` if it exists and was made with settings ``key``, else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a corrupt checkpoint is retrained, not trusted
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def train_segmenter(model: FeatureNet, train_cases: list[CaseVolume],
                    val_cases: list[CaseVolume], cfg: TrainConfig, context: int = 0,
                    seed: int = 0, log: Callable[[str], None] = print, tag: str = "train",
                    checkpoint: Optional[Path] = None, checkpoint_key: str = "",
                    regularizer: Optional[Callable[[torch.nn.Module, torch.Tensor, torch.Tensor],
                                                   torch.Tensor]] = None,
                    lr: Optional[float] = None, select_start: bool = False) -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch.

    Each epoch uses every slice with gland plus a random ``empty_slice_fraction`` of the others.
    Without validation cases the last epoch is kept.

    With ``checkpoint``, the full training state is saved after every epoch together with
    ``checkpoint_key`` (a digest of the settings and data). A later call with the same key
    reuses a finished run without training (``TrainResult.reused``) or resumes an unfinished
    one after its last completed epoch (``TrainResult.resumed_from``); another key retrains.

    ``regularizer(model, images, logits)``, if given, is added to every step's loss, with the
    step's (augmented) images (B, C, H, W) and the model's logits on them (B, 2, H, W): FedProx's
    proximal term, or a site adaptation's distillation terms. ``lr`` replaces ``cfg.lr`` as the
    peak learning rate (a FedAvg round's point on the cosine over rounds). With
    ``select_start`` the weights the model starts from are epoch 0, a candidate of the
    validation selection like any epoch (fine-tuning never returns worse validation Dice than
    it started from).
    """
    from monai.losses import DiceCELoss

    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    fg, bg = foreground_slices(train_cases)
    if not fg:
        raise ValueError(f"{tag}: no training slice contains gland")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr if lr is None else lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    transform = augmentation(cfg.intensity_augment) if cfg.augment else None
    if transform is not None:
        transform.set_random_state(seed=seed)
    best, best_epoch, best_state = -1.0, 0, None
    history: list[dict] = []
    first_epoch, spent = 1, 0.0
    saved = load_checkpoint(checkpoint, checkpoint_key) if checkpoint else None
    if saved is None and checkpoint and checkpoint.is_file():
        log(f"[{tag}] {checkpoint} was made with other settings or data (or is unreadable): "
            f"training from scratch")
    if saved is not None:
        model.load_state_dict(saved["model"])
        best, best_epoch, best_state = saved["best"], saved["best_epoch"], saved["best_state"]
        history, spent = saved["history"], saved["seconds"]
        if saved["done"]:
            if best_state is not None:
                model.load_state_dict(best_state)
            log(f"[{tag}] reusing finished checkpoint {checkpoint} (best val Dice "
                f"{best:.4f} at epoch {best_epoch})")
            return TrainResult(best_val_dice=max(best, 0.0) if val_cases else float("nan"),
                               best_epoch=best_epoch, epochs_run=saved["epoch"], seconds=spent,
                               history=history, reused=True)
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        rng.bit_generator.state = saved["rng"]
        gen.set_state(saved["gen"])
        first_epoch = saved["epoch"] + 1
        log(f"[{tag}] resuming from checkpoint {checkpoint} after epoch {saved['epoch']}")
    t_start = time.perf_counter() - spent
    epoch = first_epoch - 1
    done = False
    if select_start and val_cases and saved is None:
        best = evaluate_cases(model, val_cases, context, with_hd95=False)["dice"]["mean"]
        best_state = copy.deepcopy(model.state_dict())
        history.append({"epoch": 0, "val_dice": best, "steps": 0})
        log(f"[{tag}] epoch 0 (the weights received): val_dice={best:.4f}")
    for epoch in range(first_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        n_bg = int(round(len(bg) * cfg.empty_slice_fraction))
        chosen = fg + [bg[i] for i in rng.choice(len(bg), n_bg, replace=False)] if n_bg else fg
        ds = SliceDataset(train_cases, context, chosen, transform)
        loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=0,
                            generator=gen, drop_last=len(ds) > cfg.batch_size)
        model.train()
        losses = []
        for step, batch in enumerate(loader):
            if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
                break
            images = batch["image"].float()
            logits, _ = model(images)
            loss = loss_fn(logits, batch["label"])
            if regularizer is not None:
                loss = loss + regularizer(model, images, logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "steps": len(losses),
               "seconds": time.perf_counter() - t0}
        if val_cases:
            row["val_dice"] = evaluate_cases(model, val_cases, context, with_hd95=False)["dice"]["mean"]
            if row["val_dice"] > best:
                best, best_epoch = row["val_dice"], epoch
                best_state = copy.deepcopy(model.state_dict())
        history.append(row)
        val = f" val_dice={row['val_dice']:.4f}" if "val_dice" in row else ""
        log(f"[{tag}] epoch {epoch}/{cfg.epochs} loss={row['loss']:.4f}{val} "
            f"({row['seconds']:.1f}s)")
        stop = bool(val_cases) and epoch - best_epoch >= cfg.patience
        done = stop or epoch == cfg.epochs
        if checkpoint:
            save_checkpoint(checkpoint, {
                "key": checkpoint_key, "done": done, "epoch": epoch, "model": model.state_dict(),
                "opt": opt.state_dict(), "sched": sched.state_dict(), "best": best,
                "best_epoch": best_epoch, "best_state": best_state, "history": history,
                "rng": rng.bit_generator.state, "gen": gen.get_state(),
                "seconds": time.perf_counter() - t_start})
        if stop:
            log(f"[{tag}] early stop: no val Dice gain for {cfg.patience} epochs "
                f"(best {best:.4f} at epoch {best_epoch})")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(best_val_dice=max(best, 0.0) if val_cases else float("nan"),
                       best_epoch=best_epoch if best_state is not None else epoch,
                       epochs_run=epoch,
                       seconds=time.perf_counter() - t_start, history=history,
                       resumed_from=first_epoch - 1)


def seed_everything(seed: int, threads: int) -> None:
    """Seed torch and numpy's global generator; cap torch to ``threads`` intra-op threads."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
