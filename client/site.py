"""What a hospital site does, independent of Flower: train its teacher, answer proxy queries,
evaluate a student. ``client/app.py`` maps Flower messages onto these functions.

Node configuration (``flower-supernode --node-config "..."``):

=================  ==============================================================================
key                meaning
=================  ==============================================================================
``data-path``      this site's private cases: a Liu-layout site folder (``CaseXX.nii.gz`` +
                   ``CaseXX_segmentation.nii.gz``), an MSD task folder, or a manifest file
``data-layout``    ``liu`` (default), ``msd`` or ``manifest``
``site``           the site's name in reports (default: the folder name)
``proxy-path``     the public proxy set: a Liu-layout folder, or several separated by ``:``
                   (``;`` on Windows), named as the run's ``data.proxy`` names them (labels
                   not needed)
``state-dir``      where the teacher checkpoint is kept (default ``~/.fedkd/state/SITE``)
``threads``        torch threads (default: the run config's ``runtime.threads``)
``train.KEY``      a site override of a ``train`` setting, e.g. ``train.batch_size=4``
=================  ==============================================================================

In a simulation the node config has only ``partition-id``: partition *i* is the *i*-th site
folder (sorted, the proxy folders excluded) under the Flower run config's ``data-root`` (default:
the YAML run config's ``data.root``), the proxy set is ``data.proxy`` there and the state directory is
``state-root/SITE``. ``data.sites`` (if set) lists the simulated sites' folders, relative to the root, in partition order (``state-root`` from the Flower run config, default ``output.state_root``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from client.egress import private_signatures
from client.policy import NodePolicy
from common.affinity import AffinityReference, fit_temperature, slice_embedding
from common.config import ConfigError, RunConfig, TrainConfig, proxy_set_paths
from common.typedconfig import build_section
from common.data import (
    CaseVolume,
    DataError,
    discover_liu_site,
    discover_manifest,
    discover_msd,
    load_proxy,
    site_folders,
)
from common.slices import slice_stack
from common.style import restyle, site_style
from common.splits import SiteData, load_site, load_unsplit
from common.logs import get_logger
from common.architectures import feature_names
from common.losses import kd_kl_loss
from common.modelcard import write_model_dir
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
from common.training import evaluate_cases, load_checkpoint, summary_metrics, train_segmenter

LOG = get_logger("fedkd.client")


@dataclass(frozen=True)
class Node:
    """Where a site's files are. Built from the Flower node config by :func:`resolve_node`."""

    site: str
    data_path: Path
    layout: str
    proxy_paths: tuple[Path, ...]   # the public sets' folders (empty: none configured)
    state_dir: Path
    threads: Optional[int]
    train_overrides: tuple[tuple[str, Any], ...] = ()
    policy: NodePolicy = NodePolicy.from_node_config({}, simulation=True)

    @property
    def data_folder(self) -> Path:
        """The folder of the site's data files (a manifest's folder for the manifest layout)."""
        return self.data_path if self.data_path.is_dir() else self.data_path.parent

    @property
    def teacher_checkpoint(self) -> Path:
        return self.state_dir / "teacher.pt"


def resolve_node(node_config: dict, run_config: dict, cfg: Optional[RunConfig] = None) -> Node:
    """Read the node config (see the module docstring). ConfigError names the bad key.

    In a simulation the data root and state root default to the run config's ``data.root`` and
    ``output.state_root`` (``cfg``, as the server sent it)."""
    cfg = cfg or RunConfig()
    nc = dict(node_config)
    overrides = tuple(sorted((k[len("train."):], v) for k, v in nc.items() if k.startswith("train.")))
    threads = nc.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"node config threads: expected a positive integer, got {threads!r}")
    if "data-path" in nc:
        data_path = Path(str(nc["data-path"])).expanduser()
        layout = str(nc.get("data-layout", "liu"))
        if layout not in ("liu", "msd", "manifest"):
            raise ConfigError(f"node config data-layout: expected liu, msd or manifest, "
                              f"got {layout!r}")
        site = str(nc.get("site") or (data_path.stem if layout == "manifest" else data_path.name))
        proxy = tuple(Path(p).expanduser() for p in str(nc.get("proxy-path") or "").split(
            os.pathsep) if p)
        state = Path(str(nc.get("state-dir") or Path.home() / ".fedkd" / "state" / site))
        return Node(site, data_path, layout, proxy, state.expanduser(), threads, overrides,
                    NodePolicy.from_node_config(nc, simulation=False))
    if "partition-id" in nc:
        root = Path(str(run_config.get("data-root") or cfg.data.root))
        if not root.is_dir():
            raise DataError(f"{root}: simulation data root not found (run `fedkd synth --out "
                            f"{root}`)")
        dcfg = replace(cfg.data, root=str(root))
        sites = site_folders(dcfg)
        pid = int(nc["partition-id"])
        if not 0 <= pid < len(sites):
            raise ConfigError(f"node config partition-id: {pid} but {root} has {len(sites)} "
                              f"site folders")
        state_root = Path(str(run_config.get("state-root") or cfg.output.state_root))
        return Node(sites[pid].name, sites[pid], "liu", tuple(proxy_set_paths(dcfg)),
                    state_root / sites[pid].name, threads, overrides,
                    NodePolicy.from_node_config(nc, simulation=True))
    raise ConfigError("node config: needs data-path (a hospital node) or partition-id "
                      "(a simulation)")


def egress_signatures(cfg: RunConfig, node: Node) -> np.ndarray:
    """The site's private slices (every split; the centre channel as preprocessed), centred and
    of unit norm for the egress check (client.egress); cached per split."""
    data = load_private(cfg, node)
    key = json.dumps(["egress", str(node.data_path), _preprocessing_key(cfg),
                      [c.case_id for c in data.train + data.val + data.test]])
    if key not in _CACHE:
        _CACHE[key] = private_signatures(c.image[z] for c in data.train + data.val + data.test
                                         for z in range(c.num_slices))
    return _CACHE[key]


def node_policy(node_config: dict) -> NodePolicy:
    """The node's policy before the rest of the node is resolved (for an early error reply):
    the node config's, or the strict ``kd`` preset if that config is itself invalid."""
    try:
        return NodePolicy.from_node_config(node_config, simulation="data-path" not in node_config)
    except ConfigError:
        return NodePolicy.from_node_config({"policy": "kd"}, simulation=False)


def declared_state_dir(node_config: dict) -> Optional[Path]:
    """The node config's ``state-dir`` (None if it names none), known before anything else
    about the node is resolved: where even an early error reply is recorded."""
    value = node_config.get("state-dir")
    return Path(str(value)).expanduser() if value else None


def site_label(node_config: dict, node_id: int) -> str:
    """A name for error messages before the node config is fully resolved."""
    if node_config.get("site"):
        return str(node_config["site"])
    if node_config.get("data-path"):
        path = Path(str(node_config["data-path"]))
        return path.stem if node_config.get("data-layout") == "manifest" else path.name
    if "partition-id" in node_config:
        return f"partition {node_config['partition-id']}"
    return f"node {node_id}"


def site_train_config(cfg: RunConfig, node: Node) -> TrainConfig:
    """The server's training settings with this site's ``train.*`` node overrides applied."""
    data = asdict(cfg.train)
    for key, value in node.train_overrides:
        if key not in data:
            raise ConfigError(f"node config train.{key}: unknown key (valid: {', '.join(data)})")
        data[key] = value
    return build_section(TrainConfig, data, "node config train")


# --------------------------------------------------------------------------------------------
# Data (cached per process: a node answers several messages in a run)
# --------------------------------------------------------------------------------------------
_CACHE: dict[str, Any] = {}


def _preprocessing_key(cfg: RunConfig) -> dict:
    d = cfg.data
    return {"spacing": d.spacing, "size": d.size, "context": d.context_slices,
            "clip": d.clip_percentiles, "label_mode": d.label_mode, "msd_channel": d.msd_channel}


def _site_data_config(cfg: RunConfig, node: Node):
    if node.layout == "liu":
        return replace(cfg.data, root=str(node.data_path.parent), layout="liu",
                       sites=[node.data_path.name])
    if node.layout == "msd":
        return replace(cfg.data, root=str(node.data_path), layout="msd", sites=[])
    return replace(cfg.data, root=str(node.data_path.parent), layout="manifest",
                   manifest=str(node.data_path), sites=[])


def _records(node: Node) -> list:
    """The site's cases on disk (its layout's discovery; a manifest is filtered to the site)."""
    if node.layout == "liu":
        return discover_liu_site(node.data_path)
    if node.layout == "msd":
        return discover_msd(node.data_path)
    listed = discover_manifest(node.data_path)
    sites = sorted({r.site for r in listed})
    records = [r for r in listed if r.site == node.site]
    if not records and len(sites) == 1:  # a one-site manifest needs no site name
        records = listed
    if not records:
        raise ConfigError(f"node config site: {node.site!r} is not in "
                          f"{node.data_path} (sites: {', '.join(sites)})")
    return records


def load_private(cfg: RunConfig, node: Node) -> SiteData:
    """This site's private data, split by case, preprocessed as the run config says."""
    key = json.dumps(["private", str(node.data_path), node.layout, _preprocessing_key(cfg),
                      asdict(cfg.data.split), cfg.data.seed, cfg.data.group_pattern,
                      cfg.data.folds, cfg.data.fold],
                     sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = load_site(_site_data_config(cfg, node), _records(node), log=LOG.info)
    return _CACHE[key]


def load_unsplit_cases(cfg: RunConfig, node: Node) -> list[CaseVolume]:
    """Every case of a site that is only tested (an unseen site: not split, so one case is
    enough), preprocessed as the run config says; cached like :func:`load_private`, whatever
    the split settings."""
    key = json.dumps(["unsplit", str(node.data_path), node.layout, _preprocessing_key(cfg)],
                     sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = load_unsplit(_site_data_config(cfg, node), _records(node), log=LOG.info)
    return _CACHE[key]


def load_proxy_cases(cfg: RunConfig, node: Node) -> dict[str, CaseVolume]:
    """The public proxy set held by this site, ``{case_id: volume}`` (no labels)."""
    if not node.proxy_paths:
        raise ConfigError("node config proxy-path: not set (needed to answer proxy queries)")
    key = json.dumps(["proxy", [str(p) for p in node.proxy_paths], _preprocessing_key(cfg),
                      cfg.data.proxy_pad], sort_keys=True)
    if key not in _CACHE:
        _CACHE[key] = load_proxy(replace(cfg.data, layout="liu"), folders=list(node.proxy_paths))
    return _CACHE[key]


# --------------------------------------------------------------------------------------------
# 1. Train the teacher
# --------------------------------------------------------------------------------------------
def teacher_key(cfg: RunConfig, node: Node, tcfg: TrainConfig, data: SiteData) -> str:
    """Digest of everything that determines the teacher: architecture, training settings,
    preprocessing, the split and the case ids, and the content of the site's data files
    (common.provenance: regenerated or edited data never reuses a stale teacher). Same key = the
    checkpoint can be reused."""
    payload = {"spec": asdict(cfg.teacher_spec(node.site)), "train": tcfg.fingerprint(),
               "data": _preprocessing_key(cfg), "seed": cfg.runtime.seed,
               "files": data_fingerprint([node.data_folder]),
               "cases": {k: [c.case_id for c in getattr(data, k)] for k in ("train", "val", "test")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def train_teacher(cfg: RunConfig, node: Node, log: Callable[[str], None] = LOG.info) -> dict:
    """Train (or reuse/resume) this site's teacher. Returns metrics only."""
    t0 = time.perf_counter()
    data = load_private(cfg, node)
    tcfg = site_train_config(cfg, node)
    torch.manual_seed(cfg.runtime.seed)
    model = build_teacher(cfg.teacher_spec(node.site), input_channels(cfg.data))
    res = train_segmenter(model, data.train, data.val, tcfg, cfg.data.context_slices,
                          cfg.runtime.seed, log=log, tag=f"{node.site} teacher",
                          checkpoint=node.teacher_checkpoint,
                          checkpoint_key=teacher_key(cfg, node, tcfg, data))
    counts = data.counts()
    return {"val_dice": float(res.best_val_dice), "train_cases": counts["train"],
            "val_cases": counts["val"], "test_cases": counts["test"],
            "train_slices": sum(c.num_slices for c in data.train),
            "epochs_run": res.epochs_run, "best_epoch": res.best_epoch,
            "seconds": time.perf_counter() - t0, "train_seconds": res.seconds,
            "reused": int(res.reused), "resumed_from": res.resumed_from}


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
        state = load_checkpoint(node.teacher_checkpoint, key)
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
    if key in _CACHE:
        return _CACHE[key]
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
    _CACHE[key] = out
    return out


def own_style(cfg: RunConfig, node: Node) -> np.ndarray:
    """This site's style (common.style): the mean low-frequency amplitude of its training
    slices, (2b+1, 2b+1) float32 at ``reply.style_beta``; cached per split."""
    data = load_private(cfg, node)
    key = json.dumps(["style", str(node.data_path), _preprocessing_key(cfg),
                      [c.case_id for c in data.train], cfg.reply.style_beta])
    if key not in _CACHE:
        ctx = cfg.data.context_slices
        slices = np.stack([slice_stack(c.image, z, ctx) for c in data.train
                           for z in range(c.num_slices)])
        _CACHE[key] = site_style(slices, cfg.reply.style_beta)
    return _CACHE[key]


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
    send_affinity = cfg.aggregation.uses("affinity") and dp.noise_multiplier == 0
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
    lr = cfg.student.lr * 0.5 * (1 + math.cos(math.pi * (min(max(server_round, 1), rounds) - 1)
                                              / rounds))
    regularizer = None
    if proximal_mu > 0:
        anchor = [p.detach().clone() for p in model.parameters()]

        def regularizer(m: torch.nn.Module, _images, _logits) -> torch.Tensor:
            return 0.5 * proximal_mu * sum(((p - a) ** 2).sum()
                                           for p, a in zip(m.parameters(), anchor))
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
