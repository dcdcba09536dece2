"""What a site does with a student it receives: evaluate it on a private split (as its policy
allows), train it locally (FedAvg / FedProx rounds), and adapt it to its own data (the adapted
copy stays at the site)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from client.node import LOG, Node, load_private, load_proxy_cases, site_train_config
from client.teacher import load_teacher, train_teacher
from common.config import RunConfig
from common.data import DataError
from common.slices import slice_stack
from common.losses import kd_kl_loss
from common.modelcard import write_model_dir
from common.models import FeatureNet, input_channels
from common.protocol import ProtocolError
from common.dp import spent_epsilon, train_dp_sgd
from common.training import evaluate_cases, summary_metrics, train_segmenter



def load_student(cfg: RunConfig, state_dict: dict[str, torch.Tensor]) -> FeatureNet:
    """The ``model.student`` network with ``state_dict``; ProtocolError names a missing or
    unexpected key, a wrong shape, or NaN/inf weights."""
    model = FeatureNet(cfg.model.student, input_channels(cfg.data))
    expected = model.net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    if missing or extra:
        raise ProtocolError(f"student: weights do not match model.student "
                            f"(missing {missing[:2]}, unexpected {extra[:2]})")
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ProtocolError(f"student.{k}: shape {tuple(v.shape)}, expected "
                                f"{tuple(expected[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ProtocolError(f"student.{k}: NaN/inf values")
    model.net.load_state_dict(state_dict)
    return model


def evaluate_student(cfg: RunConfig, node: Node, state_dict: dict[str, torch.Tensor],
                     split: str = "test") -> dict:
    """Dice and HD95 of the student on the private ``split`` (test, or val for model
    selection): summary figures only."""
    t0 = time.perf_counter()
    model = load_student(cfg, state_dict)
    cases = getattr(load_private(cfg, node), split)
    if not cases:
        raise DataError(f"{node.data_path}: site {node.site} has no {split} cases")
    out = summary_metrics(evaluate_cases(model, cases, cfg.data.context_slices))
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------
# 4. FedAvg / FedProx baseline: local epochs of the student architecture on private data
# --------------------------------------------------------------------------------------------
def train_student_local(cfg: RunConfig, node: Node, state_dict: dict[str, torch.Tensor],
                        server_round: int, proximal_mu: float = 0.0,
                        log: Callable[[str], None] = LOG.info) -> tuple[dict, dict]:
    """``federation.local_epochs`` of supervised training of the global student on the private
    train split, plus FedProx's ``mu/2 ||w - w_global||^2`` when ``proximal_mu > 0``.

    The recipe is the ``student`` section (as in distillation); the learning rate follows a
    cosine over the rounds, ``student.lr * (1 + cos(pi (round - 1) / rounds)) / 2``, as
    distillation's does over its epochs.

    Returns (new state dict, metrics with ``num-examples`` = training slices, FedAvg's weight,
    and the optimizer ``steps``).
    """
    t0 = time.perf_counter()
    model = load_student(cfg, state_dict)
    data = load_private(cfg, node)
    tcfg = cfg.student_train(site_train_config(cfg, node), epochs=cfg.federation.local_epochs)
    rounds = cfg.federation.rounds
    cosine = 0.5 * (1 + math.cos(math.pi * (min(max(server_round, 1), rounds) - 1) / rounds))
    lr = cfg.student.lr * cosine
    if cfg.privacy.dp_sgd_epsilon > 0:   # DP-SGD: the run's rounds x local epochs spend epsilon
        history, plan = train_dp_sgd(model, data.train, [], tcfg, cfg.privacy, tcfg.epochs,
                                     rounds * tcfg.epochs, cfg.data.context_slices,
                                     cfg.runtime.seed * 1000 + server_round,
                                     lr=cfg.privacy.dp_sgd_lr * cosine, log=log,
                                     tag=f"{node.site} student r{server_round}")
        done = min(max(server_round, 1), rounds) * plan["dp_steps"]   # the rounds so far
        metrics = {"num-examples": plan["dp_train_slices"], "steps": plan["dp_steps"],
                   "loss": float(history[-1]["loss"]), "seconds": time.perf_counter() - t0,
                   "dp_noise_multiplier": plan["dp_noise_multiplier"],
                   "dp_epsilon": plan["dp_epsilon"], "dp_delta": plan["dp_delta"],
                   "dp_epsilon_so_far": spent_epsilon(plan["dp_noise_multiplier"],
                                                      plan["dp_sample_rate"], done,
                                                      plan["dp_delta"])}
        return model.net.state_dict(), metrics
    regularizer = None
    if proximal_mu > 0:   # FedProx: mu/2 ||w - w_global||^2
        anchor = [p.detach().clone() for p in model.parameters()]

        def proximal(m: torch.nn.Module, _images, _logits) -> torch.Tensor:
            return 0.5 * proximal_mu * sum(((p - a) ** 2).sum()
                                           for p, a in zip(m.parameters(), anchor))
        regularizer = proximal
    res = train_segmenter(model, data.train, [], tcfg, cfg.data.context_slices,
                          cfg.runtime.seed * 1000 + server_round, log=log,
                          tag=f"{node.site} student r{server_round}", regularizer=regularizer,
                          lr=lr)
    metrics = {"num-examples": sum(c.num_slices for c in data.train),
               "steps": int(sum(h["steps"] for h in res.history)),
               "loss": float(res.history[-1]["loss"]) if res.history else float("nan"),
               "seconds": time.perf_counter() - t0}
    return model.net.state_dict(), metrics


# --------------------------------------------------------------------------------------------
# 5. Site adaptation: the final student fine-tuned on private data; it stays at the site
# --------------------------------------------------------------------------------------------
ADAPTED = "adapted_student"


def adapted_dir(node: Node) -> Path:
    """Where a site keeps its adapted student (``fedkd predict --model`` reads it)."""
    return node.state_dir / ADAPTED


def proxy_sampler(cfg: RunConfig, node: Node, seed: int) -> Callable[[int], torch.Tensor]:
    """``sample(n)``: n random slices of the site's copy of the public proxy set, (n, C, H, W)."""
    proxy = list(load_proxy_cases(cfg, node).values())
    items = [(c, z) for c in proxy for z in range(c.num_slices)]
    if not items:
        raise DataError(f"{os.pathsep.join(map(str, node.proxy_paths))}: the proxy set has no "
                        f"slices")
    gen = np.random.default_rng(seed)
    ctx = cfg.data.context_slices

    def sample(n: int) -> torch.Tensor:
        pick = gen.choice(len(items), size=min(n, len(items)), replace=False)
        return torch.from_numpy(np.stack([slice_stack(items[i][0].image, items[i][1], ctx)
                                          for i in pick])).float()
    return sample


def adapt_student(cfg: RunConfig, node: Node, state_dict: dict[str, torch.Tensor],
                  log: Callable[[str], None] = LOG.info) -> dict:
    """Fine-tune the received student on this site's private train split and keep it here.

    Loss per step: DiceCE on the private labels
    + ``adapt.w_teacher`` x KL(own teacher || student) on the same (augmented) private images
    + ``adapt.w_proxy`` x KL(received student || student) on ``adapt.proxy_batch_size`` public
    proxy slices (both KL at ``adapt.temperature``). The site's validation split picks the epoch,
    the received weights being epoch 0 (so validation Dice never drops).

    The adapted weights and a model card go to ``STATE_DIR/adapted_student`` (``fedkd predict
    --model`` runs them). Returns metrics only: Dice before and after on the validation and
    test splits, the chosen epoch, steps and seconds.
    """
    t0 = time.perf_counter()
    a = cfg.adapt
    model = load_student(cfg, state_dict)
    received = load_student(cfg, state_dict).eval()
    data = load_private(cfg, node)
    if not data.val:
        raise DataError(f"{node.data_path}: site {node.site} has no validation cases "
                        f"(adaptation picks its epoch on them)")
    teacher = None
    if a.w_teacher > 0:
        train_teacher(cfg, node, log)   # reuses the site's checkpoint when it has one
        teacher = load_teacher(cfg, node)[0].eval()
    sample = proxy_sampler(cfg, node, cfg.runtime.seed) if a.w_proxy > 0 else None
    t = a.temperature

    def terms(m: torch.nn.Module, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if teacher is not None:
            with torch.no_grad():
                target = teacher(images)[0]
            loss = loss + a.w_teacher * kd_kl_loss(logits, target, t)
        if sample is not None:
            x = sample(a.proxy_batch_size)
            with torch.no_grad():
                target = received(x)[0]
            loss = loss + a.w_proxy * kd_kl_loss(m(x)[0], target, t)
        return loss

    before = evaluate_student(cfg, node, state_dict, "test") if data.test else {}
    tcfg = cfg.student_train(site_train_config(cfg, node), epochs=a.epochs, patience=a.patience)
    res = train_segmenter(model, data.train, data.val, tcfg, cfg.data.context_slices,
                          cfg.runtime.seed, log=log, tag=f"{node.site} adapt", regularizer=terms,
                          lr=a.lr, select_start=True)
    after = evaluate_student(cfg, node, model.net.state_dict(), "test") if data.test else {}
    val_before = float(res.history[0]["val_dice"])
    metrics = {"val_dice_before": val_before, "val_dice_after": float(res.best_val_dice),
               "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
               "steps": int(sum(h.get("steps", 0) for h in res.history)),
               "val_cases": len(data.val), "seconds": time.perf_counter() - t0}
    for key, ev in (("before", before), ("after", after)):
        for stat in ("dice_mean", "dice_std", "hd95_mean"):
            if stat in ev:
                metrics[f"{stat}_{key}"] = float(ev[stat])
    metrics["n_cases"] = len(data.test)
    write_model_dir(adapted_dir(node), cfg, model.net, [node.site],
                    {k: v for k, v in metrics.items() if k != "seconds"})
    return metrics
