"""A site's teacher: trained (or reused) on the private train split, refined on the federation's
targets (consensus), and answering the proxy query on the public slices (calibrated, coded,
checked by the egress check before it leaves)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from client.node import (
    CACHE,
    LOG,
    Node,
    load_private,
    load_proxy_cases,
    preprocessing_key,
    site_train_config,
)
from common.affinity import AffinityReference, fit_temperature, slice_embedding
from common.config import ConfigError, RunConfig, TrainConfig
from common.data import CaseVolume
from common.slices import slice_stack
from common.style import restyle, site_style
from common.splits import SiteData
from common.architectures import feature_names
from common.losses import kd_kl_loss
from common.models import FeatureNet, build_teacher, input_channels
from common.privacy import epsilon, release
from common.provenance import data_fingerprint
from common.protocol import (
    AFFINITY,
    ProtocolError,
    ReplyEncoder,
    check_precision,
    parse_slice_ids,
    release_maps,
)
from common.dp import train_dp_sgd
from common.training import load_checkpoint, save_checkpoint, train_segmenter



def teacher_key(cfg: RunConfig, node: Node, tcfg: TrainConfig, data: SiteData) -> str:
    """Digest of everything that determines the teacher: architecture, training settings,
    preprocessing, the split and the case ids, and the content of the site's data files
    (common.provenance: regenerated or edited data never reuses a stale teacher), and with
    ``train.public_init_epochs`` that of the public sets it starts on. Same key = the
    checkpoint can be reused."""
    payload = {"spec": asdict(cfg.teacher_spec(node.site)), "train": tcfg.fingerprint(),
               "data": preprocessing_key(cfg), "seed": cfg.runtime.seed,
               "files": data_fingerprint([node.data_folder]),
               "cases": {k: [c.case_id for c in getattr(data, k)] for k in ("train", "val", "test")}}
    if tcfg.public_init_epochs:   # the public start: the content of the site's public sets
        payload["public"] = data_fingerprint(node.proxy_paths)
    if cfg.privacy.dp_sgd_epsilon > 0:   # a DP-SGD teacher is another teacher: every setting
        payload["dp_sgd"] = {k: v for k, v in asdict(cfg.privacy).items()   # of its training
                             if k.startswith("dp_sgd_") or k == "delta"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def train_teacher(cfg: RunConfig, node: Node, log: Callable[[str], None] = LOG.info) -> dict:
    """Train (or reuse/resume) this site's teacher. Returns metrics only."""
    t0 = time.perf_counter()
    data = load_private(cfg, node)
    tcfg = site_train_config(cfg, node)
    if cfg.privacy.dp_sgd_epsilon > 0:
        return train_dp_teacher(cfg, node, data, tcfg, log, t0)
    torch.manual_seed(cfg.runtime.seed)
    model = build_teacher(cfg.teacher_spec(node.site), input_channels(cfg.data))
    key = teacher_key(cfg, node, tcfg, data)
    if tcfg.public_init_epochs and load_checkpoint(node.teacher_checkpoint(key), key) is None:
        public_init(cfg, node, model, tcfg, log)   # a fresh teacher (else the checkpoint's)
    res = train_segmenter(model, data.train, data.val, tcfg, cfg.data.context_slices,
                          cfg.runtime.seed, log=log, tag=f"{node.site} teacher",
                          checkpoint=node.teacher_checkpoint(key), checkpoint_key=key)
    counts = data.counts()
    return {"val_dice": float(res.best_val_dice), "train_cases": counts["train"],
            "val_cases": counts["val"], "test_cases": counts["test"],
            "train_slices": sum(c.num_slices for c in data.train),
            "epochs_run": res.epochs_run, "best_epoch": res.best_epoch,
            "seconds": time.perf_counter() - t0, "train_seconds": res.seconds,
            "reused": int(res.reused), "resumed_from": res.resumed_from}


def public_init(cfg: RunConfig, node: Node, model: FeatureNet, tcfg: TrainConfig,
                log: Callable[[str], None]) -> None:
    """``train.public_init_epochs`` of training of ``model`` on the labelled volumes of the
    site's copy of the public sets (the teacher's recipe, no validation): public data, so no
    privacy cost. ConfigError if no public set there has masks."""
    from common.data import load_proxy

    cases = [c for c in load_proxy(replace(cfg.data, layout="liu"), with_labels=True,
                                   folders=list(node.proxy_paths)).values()
             if c.label is not None]
    if not cases:
        raise ConfigError(f"train.public_init_epochs: no public set at {node.site} "
                          f"({', '.join(map(str, node.proxy_paths))}) has masks")
    train_segmenter(model, cases, [], replace(tcfg, epochs=tcfg.public_init_epochs),
                    cfg.data.context_slices, cfg.runtime.seed, log=log,
                    tag=f"{node.site} teacher, public init")


def train_dp_teacher(cfg: RunConfig, node: Node, data: SiteData, tcfg: TrainConfig,
                     log: Callable[[str], None], t0: float) -> dict:
    """The teacher trained with DP-SGD (common.dp): ``train.epochs`` epochs spending
    ``privacy.dp_sgd_epsilon``, the last kept (no selection on validation). Returns metrics:
    the accounting and the counts; no validation Dice (a statistic the guarantee does not
    cover)."""
    key = teacher_key(cfg, node, tcfg, data)
    path = node.teacher_checkpoint(key)
    saved = load_checkpoint(path, key)
    if saved is not None and saved.get("done") and "dp" in saved:
        plan, history, reused = saved["dp"], saved["history"], True
        log(f"[{node.site} teacher] reusing the DP-SGD teacher {path} "
            f"(epsilon {plan['dp_epsilon']:.2f})")
    else:
        torch.manual_seed(cfg.runtime.seed)
        model = build_teacher(cfg.teacher_spec(node.site), input_channels(cfg.data))
        if tcfg.public_init_epochs:
            public_init(cfg, node, model, tcfg, log)
        history, plan = train_dp_sgd(model, data.train, data.val, tcfg, cfg.privacy,
                                     tcfg.epochs, tcfg.epochs, cfg.data.context_slices,
                                     cfg.runtime.seed, lr=cfg.privacy.dp_sgd_lr, log=log,
                                     tag=f"{node.site} teacher")
        reused = False
        state = model.state_dict()
        save_checkpoint(path, {
            "key": key, "done": True, "epoch": tcfg.epochs, "model": state, "best_state": state,
            "best": history[-1].get("val_dice", 0.0), "best_epoch": tcfg.epochs,
            "history": history, "dp": plan, "seconds": time.perf_counter() - t0})
    counts = data.counts()
    return {"train_cases": counts["train"], "val_cases": counts["val"],
            "test_cases": counts["test"], "train_slices": sum(c.num_slices for c in data.train),
            "epochs_run": len(history), "best_epoch": len(history),
            "seconds": time.perf_counter() - t0, "reused": int(reused), "resumed_from": 0,
            **{k: v for k, v in plan.items() if k != "dp_unit"}}


def refined_checkpoint(node: Node, refined: str) -> Path:
    """Where the teacher refined on consensus ``refined`` (common.protocol.consensus_id) is kept."""
    if not refined.isalnum():
        raise ProtocolError(f"query.teacher: {refined!r} is not a consensus id")
    return node.state_dir / "consensus" / f"{refined}.pt"


def refined_key(cfg: RunConfig, node: Node, refined: str) -> str:
    """Checkpoint key of a refined teacher: its own teacher's key and the consensus id."""
    base = teacher_key(cfg, node, site_train_config(cfg, node), load_private(cfg, node))
    return hashlib.sha256(f"{base}/{refined}".encode()).hexdigest()


def load_teacher(cfg: RunConfig, node: Node, features: Optional[list[str]] = None,
                 refined: str = "") -> tuple[FeatureNet, float]:
    """The trained teacher of this run's settings (returning the feature maps ``features``,
    default: those of its spec) and its validation Dice; with ``refined``, its copy refined on
    that consensus (:func:`refine_teacher`)."""
    spec = cfg.teacher_spec(node.site)
    if features is not None:
        valid = feature_names(spec)
        unknown = [f for f in features if f not in valid]
        if unknown:
            raise ProtocolError(f"query.features: {unknown[0]!r} is not returned by the teacher "
                                f"of {node.site} (its features: {', '.join(valid)})")
        spec = replace(spec, features=list(features))
    data = load_private(cfg, node)
    if refined:
        path = refined_checkpoint(node, refined)
        state = load_checkpoint(path, refined_key(cfg, node, refined))
        if state is None or not state.get("done"):
            raise ProtocolError(f"query.teacher: no teacher refined on consensus {refined} in "
                                f"{path.parent} (send train.consensus first)")
    else:
        key = teacher_key(cfg, node, site_train_config(cfg, node), data)
        state = load_checkpoint(node.teacher_checkpoint(key), key)
        if state is None or not state.get("done"):
            raise ProtocolError(f"no trained teacher for these settings in {node.state_dir} "
                                f"(send train.teacher first)")
    model = build_teacher(spec, input_channels(cfg.data))
    model.load_state_dict(state["best_state"] or state["model"])
    model.eval()
    return model, float(max(state["best"], 0.0))


# --------------------------------------------------------------------------------------------
# 2. Proxy query
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def site_reference(cfg: RunConfig, node: Node, model: FeatureNet, affinity: bool,
                   batch_size: int = 32, refined: str = "") -> dict:
    """What the site measures on its private data to qualify its proxy reply (common.affinity):
    ``{"temperature": float}`` and, with ``affinity``, ``"affinity": AffinityReference`` (then
    ``model`` must return the ``bottleneck`` map). Cached per teacher checkpoint (``refined``:
    the refined copy's consensus id) and split; nothing here leaves the site."""
    data = load_private(cfg, node)
    key = json.dumps(["reference", teacher_key(cfg, node, site_train_config(cfg, node), data),
                      str(node.state_dir), affinity, refined])
    if key in CACHE:
        return CACHE[key]
    ctx = cfg.data.context_slices

    def run(cases: list[CaseVolume]):
        """Batches of (logits (B, 2, H, W), features, labels (B, H, W)) over every slice."""
        items = [(c, z) for c in cases for z in range(c.num_slices)]
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            x = torch.from_numpy(np.stack([slice_stack(c.image, z, ctx) for c, z in chunk]))
            out, feats = model(x)
            yield out, feats, torch.from_numpy(
                np.stack([c.label[z] for c, z in chunk]).astype(np.int64))

    val = list(run(data.val))
    logits = torch.cat([o for o, _, _ in val]) if val else torch.empty(0)
    labels = torch.cat([y for _, _, y in val]) if val else torch.empty(0)
    out = {"temperature": fit_temperature(logits, labels)}
    if affinity:
        def embed(batches) -> np.ndarray:
            emb = [slice_embedding(f["bottleneck"]) for _, f, _ in batches]
            return np.concatenate(emb) if emb else np.empty((0, 0))

        out["affinity"] = AffinityReference(embed(run(data.train)), embed(val),
                                            cfg.reply.affinity_k)
    CACHE[key] = out
    return out


def own_style(cfg: RunConfig, node: Node) -> np.ndarray:
    """This site's style (common.style): the mean low-frequency amplitude of its training
    slices, (2b+1, 2b+1) float32 at ``reply.style_beta``; cached per split."""
    data = load_private(cfg, node)
    key = json.dumps(["style", str(node.data_path), preprocessing_key(cfg),
                      [c.case_id for c in data.train], cfg.reply.style_beta])
    if key not in CACHE:
        ctx = cfg.data.context_slices
        slices = np.stack([slice_stack(c.image, z, ctx) for c in data.train
                           for z in range(c.num_slices)])
        CACHE[key] = site_style(slices, cfg.reply.style_beta)
    return CACHE[key]


@torch.no_grad()
def answer_proxy_query(cfg: RunConfig, node: Node, slice_ids: list[str], features: list[str],
                       precision: str = "float16", batch_size: int = 32, teacher: str = ""
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Run the teacher (``teacher``: its copy refined on that consensus) on the named proxy
    slices.

    Returns ``(logits record, features record, stats)`` as arrays for the wire:

    * ``reply.output: logits``: ``{"logits": (N, 2, H, W)}`` in ``precision`` (int8 adds
      ``logits.scale`` (N, 2)); ``foreground``: ``{"foreground": stream}``, the gland
      probability (N, 1, H/f, W/f) with f = ``reply.downsample``, quantised to ``reply.bits`` and
      coded with ``reply.codec`` (common.codec);
    * ``reply.features: full``: ``{name: (N, C, h, w)}`` in ``precision`` (+ ``.scale``);
      ``pooled``: ``{name: stream}`` of the channel RMS map (N, 1, h, w);
    * the affinity (N,) float32 in the logits record when the targets may use it
      (``aggregation.method`` affinity, or auto with affinity among its candidates).

    With ``reply.own_style`` > 0 every proxy slice is first restyled toward this site's own
    look (:func:`own_style`); with ``reply.share_style`` that style is returned as
    ``stats["style"]`` (an array, counted in ``reply_bytes``: the caller moves it to the reply's
    ``style`` record).

    Memory is bounded: the outputs are preallocated in the wire dtype (or as quantised codes)
    and filled ``batch_size`` slices at a time. With ``privacy.noise_multiplier`` > 0 every
    slice's prediction and features are clipped and noised, each part with its own bound
    (common.privacy), and the stats carry the release's ``dp_epsilon``.
    """
    check_precision(precision)
    if not slice_ids:
        raise ProtocolError("query.slice_ids: empty")
    if batch_size < 1:
        raise ProtocolError(f"query.batch_size: expected >= 1, got {batch_size}")
    t0 = time.perf_counter()
    dp = cfg.privacy
    reply = cfg.reply
    # the affinity is an unnoised statistic of the private data: not released under privacy noise
    # (and under DP-SGD teachers, which cover the answers but not that statistic)
    send_affinity = (cfg.aggregation.uses("affinity") and dp.noise_multiplier == 0
                     and dp.dp_sgd_epsilon == 0)
    needs_reference = send_affinity or reply.calibrate
    taps = list(features) + (["bottleneck"] if send_affinity and "bottleneck" not in features
                             else [])
    model, val_dice = load_teacher(cfg, node, taps, teacher)
    reference = (site_reference(cfg, node, model, send_affinity, refined=teacher)
                 if needs_reference else None)
    temperature = reference["temperature"] if reply.calibrate else 1.0
    proxy = load_proxy_cases(cfg, node)
    wanted = parse_slice_ids(slice_ids, proxy)
    n = len(wanted)
    encoder = ReplyEncoder(reply, precision, n, features)
    affinity = np.empty(n, np.float32) if send_affinity else None
    entropy_sum = 0.0
    noise = np.random.default_rng()  # fresh OS entropy: the noise must not be reproducible
    style = own_style(cfg, node) if reply.own_style > 0 or reply.share_style else None
    for start in range(0, n, batch_size):
        chunk = wanted[start:start + batch_size]
        rows = slice(start, start + len(chunk))
        x = torch.from_numpy(np.stack([slice_stack(proxy[c].image, z, cfg.data.context_slices)
                                       for c, z in chunk]))
        if reply.own_style > 0:
            x = restyle(x, style, reply.own_style)
        logits, feats = model(x)
        if affinity is not None:
            affinity[rows] = reference["affinity"].distance(slice_embedding(feats["bottleneck"]))
        pred, maps = release_maps(logits, [feats[f] for f in features], reply, temperature)
        if dp.noise_multiplier > 0:  # Gaussian mechanism: nothing unnoised leaves the site
            pred, maps = release(pred, maps, dp.clip_norm, dp.feature_clip_norm,
                                 dp.noise_multiplier, noise)
        if reply.output == "foreground":
            p = torch.from_numpy(np.clip(pred[:, 0], 0.0, 1.0))
            probs = torch.stack([1 - p, p], dim=1)
        else:
            probs = torch.from_numpy(pred).softmax(dim=1)
        entropy_sum += float(-(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean(dim=(1, 2)).sum())
        encoder.add(rows, pred, maps)
    out_logits, out_feats = encoder.records()
    if affinity is not None:
        out_logits[AFFINITY] = affinity
    reply_bytes = sum(a.nbytes for a in (*out_logits.values(), *out_feats.values()))
    stats = {"val_dice": val_dice, "proxy_entropy": entropy_sum / n, "n_slices": n,
             "reply_bytes": reply_bytes, "temperature": temperature,
             "seconds": time.perf_counter() - t0}
    if reply.share_style:
        stats["style"] = style
        stats["reply_bytes"] += style.nbytes
    if dp.dp_sgd_epsilon > 0:   # the answers are post-processing of the DP-SGD teacher; the
        del stats["val_dice"]    # validation Dice is not covered, so it stays at the site
    if dp.noise_multiplier > 0:
        parts = 1 + bool(features)
        stats.update(dp_noise_multiplier=dp.noise_multiplier, dp_clip_norm=dp.clip_norm,
                     dp_parts=parts, dp_delta=dp.delta,
                     dp_epsilon=epsilon(dp.noise_multiplier, n, dp.delta, parts=parts))
    return out_logits, out_feats, stats


# --------------------------------------------------------------------------------------------
# 2b. Consensus round: refine a copy of the teacher on the federation's targets
# --------------------------------------------------------------------------------------------
def refine_teacher(cfg: RunConfig, node: Node, slice_ids: list[str], stream: np.ndarray,
                   log: Callable[[str], None] = LOG.info) -> dict:
    """Fine-tune a copy of this site's teacher on its private train split (its Dice + CE, the
    teacher's own recipe) plus ``consensus.weight`` x KL(consensus || teacher) on
    ``consensus.proxy_batch_size`` random proxy slices per step; ``stream`` is the server's
    consensus (common.protocol.encode_consensus) on ``slice_ids``. The site's validation split
    picks the epoch. The copy is kept as ``STATE_DIR/consensus/ID.pt`` (ID =
    common.protocol.consensus_id; a repeated message reuses it) and answers the queries that
    name it; the teacher itself is not changed. Returns metrics only."""
    from common.protocol import consensus_id, decode_consensus

    t0 = time.perf_counter()
    if not slice_ids:
        raise ProtocolError("query.slice_ids: empty")
    c = cfg.consensus
    proxy = load_proxy_cases(cfg, node)
    wanted = parse_slice_ids(slice_ids, proxy)
    ctx = cfg.data.context_slices
    images = torch.from_numpy(np.stack([slice_stack(proxy[k].image, z, ctx)
                                        for k, z in wanted])).float()
    fg = torch.from_numpy(decode_consensus(stream, len(wanted), tuple(images.shape[-2:])))
    target = torch.stack([1 - fg, fg], dim=1).clamp_min(1e-6).log()   # (N, 2, H, W)
    refined = consensus_id(stream, cfg)
    model, before = load_teacher(cfg, node)
    data = load_private(cfg, node)
    gen = np.random.default_rng(cfg.runtime.seed)

    def consensus_term(m: torch.nn.Module, _images, logits: torch.Tensor) -> torch.Tensor:
        rows = torch.from_numpy(gen.choice(len(wanted), min(c.proxy_batch_size, len(wanted)),
                                           replace=False))
        return c.weight * kd_kl_loss(m(images[rows])[0], target[rows])

    tcfg = replace(site_train_config(cfg, node), epochs=c.epochs, patience=c.epochs)
    path = refined_checkpoint(node, refined)
    path.parent.mkdir(parents=True, exist_ok=True)
    res = train_segmenter(model, data.train, data.val, tcfg, ctx, cfg.runtime.seed, log=log,
                          tag=f"{node.site} consensus", checkpoint=path,
                          checkpoint_key=refined_key(cfg, node, refined),
                          regularizer=consensus_term if c.weight > 0 else None, lr=c.lr)
    return {"val_dice_before": before, "val_dice_after": float(res.best_val_dice),
            "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
            "steps": int(sum(h.get("steps", 0) for h in res.history)),
            "reused": int(res.reused), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# 3. Evaluate a student
# --------------------------------------------------------------------------------------------
