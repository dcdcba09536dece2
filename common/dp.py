"""DP-SGD training of a site's private model (Opacus), and its privacy accounting.

With ``privacy.dp_sgd_epsilon`` > 0 every model a site trains on its private cases is trained
with DP-SGD (Abadi et al., CCS 2016): each step draws the training slices by Poisson sampling at
rate q = 1 / ceil(N / ``privacy.dp_sgd_batch_size``) (N training slices), clips each slice's gradient to L2 norm
``privacy.dp_sgd_max_grad_norm`` and adds Gaussian noise of std sigma x that bound to their sum.

* **The unit of privacy is one training slice** (an example of the site's training set: its
  gland slices and a fixed share of its empty ones). A patient contributes 15-30 slices, so a
  patient-level guarantee follows only by group privacy and is much weaker.
* **sigma** is found with Opacus's RDP accountant so that *all* the site's DP-SGD steps in the
  run spend exactly ``dp_sgd_epsilon`` at ``privacy.delta``: a KD teacher's
  ``train.epochs`` epochs, or FedAvg's ``federation.rounds`` x ``federation.local_epochs``
  local epochs (every round's update is released, so the rounds compose).
* No early stopping and no selection on validation under DP: the model of the last step is the
  released one, so everything computed from it (a KD site's answers on the public slices, a
  FedAvg site's weights) is post-processing and covered by the same epsilon.

Not covered, and so withheld or stated: a KD site under DP sends no affinity, no calibration
temperature and no validation Dice (statistics of its private cases, not noised); the test
Dice of the final student that every method reports is a statistic of the test cases, outside
the guarantee (the README's privacy table says so). Opacus is installed with the project; its
noise comes from torch's generator, not a cryptographically secure one (``secure_mode`` needs
torchcsprng): adequate for measuring the trade-off, not for a production guarantee.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.augment import augmentation
from common.config import PrivacyConfig, TrainConfig
from common.data import CaseVolume
from common.slices import SliceDataset, foreground_slices
from common.training import evaluate_cases

UNIT = "slice"


def dp_slices(cases: list[CaseVolume], empty_fraction: float, seed: int) -> list[tuple[int, int]]:
    """The training set of one DP-SGD call, ``(case_index, z)``: every gland slice and a share
    ``empty_fraction`` of the empty ones, drawn once with ``seed`` (fixed over the call's epochs,
    not redrawn each epoch as :func:`common.training.train_segmenter` does; a FedAvg site's
    rounds each draw with their own seed)."""
    fg, bg = foreground_slices(cases)
    n_bg = int(round(len(bg) * empty_fraction))
    rng = np.random.default_rng(seed)
    return fg + ([bg[i] for i in sorted(rng.choice(len(bg), n_bg, replace=False))] if n_bg else [])


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps an epoch, as Opacus's Poisson loader makes them: k = ceil(n / batch_size) steps,
    each slice drawn with probability q = 1 / k."""
    return max(1, math.ceil(n / batch_size))


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """sigma such that ``steps`` DP-SGD steps at ``sample_rate`` spend ``epsilon`` (RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp"))


def spent_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon that ``steps`` DP-SGD steps at ``sample_rate`` with noise ``sigma`` spend
    (Opacus's RDP accountant)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, sample_rate, steps)] if steps else []
    return float(acc.get_epsilon(delta)) if steps else 0.0


class _Pairs(Dataset):
    """(image, label) tuples of a :class:`SliceDataset` (Opacus's empty-batch collate needs
    tuples)."""

    def __init__(self, ds: SliceDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        return torch.as_tensor(item["image"]).float(), torch.as_tensor(item["label"]).long()


def dp_plan(n: int, cfg: PrivacyConfig, epochs_in_run: int) -> dict:
    """The accounting of a site with ``n`` training slices whose run makes ``epochs_in_run``
    DP-SGD epochs: sample rate, steps, sigma and the epsilon they spend."""
    k = steps_per_epoch(n, cfg.dp_sgd_batch_size)
    q, steps = 1.0 / k, k * epochs_in_run
    sigma = noise_multiplier(cfg.dp_sgd_epsilon, cfg.delta, q, steps)
    return {"dp_epsilon": spent_epsilon(sigma, q, steps, cfg.delta), "dp_delta": cfg.delta,
            "dp_noise_multiplier": sigma, "dp_sample_rate": q, "dp_steps_in_run": steps,
            "dp_max_grad_norm": cfg.dp_sgd_max_grad_norm, "dp_train_slices": n, "dp_unit": UNIT}


def train_dp_sgd(model: torch.nn.Module, cases: list[CaseVolume], val_cases: list[CaseVolume],
                 tcfg: TrainConfig, pcfg: PrivacyConfig, epochs: int, epochs_in_run: int,
                 context: int = 0, seed: int = 0, lr: Optional[float] = None,
                 log: Callable[[str], None] = print, tag: str = "dp-sgd"
                 ) -> tuple[list[dict], dict]:
    """Train ``model`` in place for ``epochs`` DP-SGD epochs (of the ``epochs_in_run`` the site
    makes in the whole run, which set sigma); the last step's weights are kept. Returns the
    per-epoch history (loss, and validation Dice for the log only) and :func:`dp_plan`'s
    accounting (the run's epsilon), with ``dp_steps`` and ``dp_epsilon_this_call`` for this
    call's epochs."""
    from monai.losses import DiceCELoss
    from opacus import PrivacyEngine

    items = dp_slices(cases, tcfg.empty_slice_fraction, seed)
    if not items:
        raise ValueError(f"{tag}: no training slice")
    plan = dp_plan(len(items), pcfg, epochs_in_run)
    transform = augmentation(tcfg.intensity_augment) if tcfg.augment else None
    if transform is not None:
        transform.set_random_state(seed=seed)
    torch.manual_seed(seed)
    loader = DataLoader(_Pairs(SliceDataset(cases, context, items, transform)),
                        batch_size=pcfg.dp_sgd_batch_size, num_workers=0)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr if lr is None else lr,
                            weight_decay=tcfg.weight_decay)
    engine = PrivacyEngine(accountant="rdp")
    model.train()   # Opacus wraps a model in training mode only
    private, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, poisson_sampling=True,
        noise_multiplier=plan["dp_noise_multiplier"], max_grad_norm=pcfg.dp_sgd_max_grad_norm)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt.original_optimizer, T_max=epochs)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    history = []
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            private.train()
            losses = []
            for images, labels in loader:
                if len(images) == 0:   # an empty Poisson draw (odds (1 - q)^N ~ 1e-15): no step
                    continue
                logits = private(images)
                logits = logits[0] if isinstance(logits, tuple) else logits
                loss = loss_fn(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            sched.step()
            row = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "steps": len(losses), "seconds": time.perf_counter() - t0}
            if val_cases:
                row["val_dice"] = evaluate_cases(model, val_cases, context,
                                                 with_hd95=False)["dice"]["mean"]
            history.append(row)
            val = f" val_dice={row['val_dice']:.4f}" if "val_dice" in row else ""
            log(f"[{tag}] epoch {epoch}/{epochs} loss={row['loss']:.4f}{val} "
                f"({row['seconds']:.1f}s, DP-SGD sigma={plan['dp_noise_multiplier']:.3f})")
    finally:
        private._close()   # the hooks and per-sample gradients go; ``model`` is plain again
    done = steps_per_epoch(len(items), pcfg.dp_sgd_batch_size) * epochs
    plan["dp_steps"] = done
    plan["dp_epsilon_this_call"] = spent_epsilon(plan["dp_noise_multiplier"],
                                                 plan["dp_sample_rate"], done, pcfg.delta)
    # Opacus's own record of the steps it took, to check the figure reported above
    plan["dp_epsilon_opacus"] = float(engine.get_epsilon(pcfg.delta))
    return history, plan
