"""The messages between the server (ServerApp) and a site (ClientApp), defined once for both.

Every instruction carries the run config as YAML in ``ConfigRecord "run"`` (key ``config``), so
one validated :class:`~common.config.RunConfig` drives preprocessing, models and training on
every site; node-local paths come from the site's node config, never from the server.

=====================  ===========================================  ===========================================
message type           server -> site (content)                     site -> server (reply content)
=====================  ===========================================  ===========================================
``train.teacher``      ``run``: {config}                            ``metrics`` (MetricRecord): val_dice,
                                                                    train_cases, val_cases, test_cases,
                                                                    train_slices, epochs_run, best_epoch,
                                                                    seconds, reused (1 = checkpoint reused)
                                                                    ``info`` (ConfigRecord): site, teacher_arch
``query.proxy``        ``run``: {config}; ``query``: {slice_ids     ``logits`` (ArrayRecord), as ``reply`` in
                       (list[str], "PROXY/CaseXX/z"), features      the run config says: ``logits`` (N, 2, H,
                       (list[str]), precision ("float32" |          W) divided by the site's calibration
                       "float16" | "int8"), batch_size (int),       temperature (int8: + ``logits.scale``
                       teacher (str, optional: the refined          (N, 2) float32), or ``foreground``, a
                       teacher of a train.consensus)}               uint8 stream (common.codec) of the gland
                                                                    probability (N, 1, H/f, W/f); with
                                                                    aggregation affinity ``affinity`` (N,)
                                                                    float32 (common.affinity)
                                                                    ``features`` (ArrayRecord): per requested
                                                                    name (N, C, h, w) (+ .scale), or a stream
                                                                    of its channel RMS map (N, 1, h, w)
                                                                    ``stats`` (MetricRecord): val_dice,
                                                                    proxy_entropy, n_slices, reply_bytes,
                                                                    temperature, seconds (dp_* under noise);
                                                                    ``style`` (ArrayRecord, reply.share_style
                                                                    only): ``amplitude`` (2b+1, 2b+1)
                                                                    float32, the site's mean low-frequency
                                                                    amplitude (common.style)
                                                                    ``info``: site, slice_ids
``train.consensus``    ``run``: {config}; ``query``: {slice_ids};   ``metrics`` (MetricRecord):
                       ``consensus`` (ArrayRecord): ``foreground``, val_dice_before, val_dice_after,
                       a stream (common.codec) of the aggregated    best_epoch, epochs_run, steps, seconds,
                       gland probability (N, 1, H, W) on those      reused (1 = refined copy reused)
                       slices; the site fine-tunes a copy of its    ``info``: site
                       teacher on it and its private labels
                       (``consensus`` section) and keeps it
``evaluate.student``   ``run``: {config}; ``student``              ``metrics`` (MetricRecord): dice_mean,
                       (ArrayRecord): the student's state dict;     dice_std, dice_median, dice_min, dice_max,
                       ``evaluate``: {split: "test" (default) |
                       "val", with_val: bool (optional: the         dice_p25, dice_p75, hd95_* (same), n_cases;
                       validation figures too, for selection)}      with_val: val_dice_mean, val_n_cases
                                                                    ``info``: site
``train.adapt``        ``run``: {config}; ``student``               ``metrics`` (MetricRecord):
                       (ArrayRecord): the final student, which      val_dice_before, val_dice_after,
                       the site fine-tunes on its private data      dice_mean_before, dice_mean_after,
                       (``adapt`` section) and keeps in its         dice_std_*, hd95_mean_* (test split),
                       state directory                              n_cases, val_cases, best_epoch,
                                                                    epochs_run, steps, seconds
                                                                    ``info``: site
=====================  ===========================================  ===========================================

The FedAvg / FedProx baseline (``federation.strategy: fedavg | fedprox``) uses Flower's built-in
strategies and their message types unchanged: ``train`` and ``evaluate`` with ``arrays`` (the
global student's state dict) and ``config`` (Flower's ``server-round``, FedProx's
``proximal-mu``, and the run config as YAML under ``run-config``). A site replies ``train`` with
``arrays`` (its locally trained student) and ``metrics`` {num-examples (training slices), loss,
seconds, steps}, and ``evaluate`` with ``metrics`` {dice, hd95, num-examples} on its validation
split (the per-round figures; the final model is evaluated with ``evaluate.student``).

``train.adapt`` is sent after the final evaluation when ``adapt.enabled``, with whatever
student the federation produced (distilled or FedAvg). ``train.consensus`` is sent after the
first proxy query when ``consensus.rounds`` > 0; the next ``query.proxy`` names the refined
teacher by :func:`consensus_id` of the consensus it was sent.

N is the number of proxy slices requested; arrays are in request order. Nothing a site sends is
derived from its private images except metrics (and, with ``reply.share_style``, its style: one
small mean spectrum, a separate privacy contract); every other array in a reply has N as its
leading dimension, and every stream declares N as the leading dimension of what it decodes to
(the audit test walks every reply to check this).

A request that cannot be served gets a Flower error reply (``Message(error=Error(code, reason))``)
whose reason names the site, the file or field, and the cause; the node keeps serving.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import yaml

from common.codec import CodecError, decode_stream, encode_stream, quantize, read_header
from common.config import ReplyConfig, RunConfig, from_dict, to_plain

TRAIN_TEACHER = "train.teacher"
QUERY_PROXY = "query.proxy"
EVALUATE_STUDENT = "evaluate.student"
ADAPT_STUDENT = "train.adapt"   # the adapted weights stay at the site; metrics come back
TRAIN_CONSENSUS = "train.consensus"   # refine the teacher on the consensus; metrics come back

RUN = "run"            # ConfigRecord: {"config": YAML text of the RunConfig}
QUERY = "query"        # ConfigRecord of a proxy query
STUDENT = "student"    # ArrayRecord: student state dict
EVAL = "evaluate"      # ConfigRecord of evaluate.student: {"split": "test" | "val"} (optional)
METRICS = "metrics"    # MetricRecord in replies
STATS = "stats"        # MetricRecord in proxy replies
INFO = "info"          # ConfigRecord in replies
LOGITS = "logits"      # ArrayRecord in proxy replies
FEATURES = "features"  # ArrayRecord in proxy replies
SCALE_SUFFIX = ".scale"
AFFINITY = "affinity"  # optional (N,) float32 array in the logits record (common.affinity)
FOREGROUND = "foreground"  # compact reply: gland probability stream in the logits record
STYLE = "style"            # ArrayRecord of a proxy reply (reply.share_style): {"amplitude": (k, k)}
CONSENSUS = "consensus"    # ArrayRecord of train.consensus: the FOREGROUND stream of the targets
# Flower's built-in strategies (FedAvg / FedProx baseline) send ``arrays`` + ``config``; the run
# config travels in their config record under RUN_CONFIG_KEY.
FLWR_ARRAYS = "arrays"
FLWR_CONFIG = "config"
RUN_CONFIG_KEY = "run-config"

PRECISIONS = ("float32", "float16", "int8")

# Flower Error codes of error replies
ERR_BAD_MESSAGE = 4001   # missing or malformed field
ERR_DATA = 4002          # a data file or folder is unusable
ERR_CONFIG = 4003        # the run config or node config is invalid
ERR_POLICY = 4030        # the node's policy refuses the request (client.policy)
ERR_INTERNAL = 5000      # anything else (a bug): the reason carries the exception


class ProtocolError(ValueError):
    """A message lacks a field or a field has the wrong type/shape. Names the field."""


def parse_slice_ids(ids: list[str], proxy: dict[str, Any]) -> list[tuple[str, int]]:
    """Proxy slice ids ``"CaseXX/z"`` -> (case id, z), checked against ``proxy`` ({case id:
    volume with ``num_slices``}); ProtocolError names the first bad id."""
    out = []
    for sid in ids:
        case, _, z = str(sid).rpartition("/")
        if case not in proxy or not z.isdigit() or int(z) >= proxy[case].num_slices:
            raise ProtocolError(f"query.slice_ids: {sid!r} is not a slice of the proxy set "
                                f"(expected CASE/z with CASE in {sorted(proxy)[:3]}...)")
        out.append((case, int(z)))
    return out


def config_to_text(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def config_from_text(text: Any, source: str = "message field run.config") -> RunConfig:
    if not isinstance(text, str):
        raise ProtocolError(f"{source}: expected YAML text, got {type(text).__name__}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProtocolError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{source}: expected a mapping")
    return from_dict(data, source)


# --------------------------------------------------------------------------------------------
# Quantisation of proxy replies
# --------------------------------------------------------------------------------------------
def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit quantisation with one scale per (slice, channel).

    x: (N, C, H, W) float -> (q (N, C, H, W) int8, scale (N, C) float32), x ~= q * scale.
    The error is at most scale / 2 = max|x[n, c]| / 254 per element.
    """
    amax = np.abs(x).reshape(x.shape[0], x.shape[1], -1).max(axis=2).astype(np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, :, None, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8`: (N, C, H, W) float32."""
    return q.astype(np.float32) * scale[:, :, None, None].astype(np.float32)


def check_precision(precision: str) -> None:
    """ProtocolError unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ProtocolError(f"query.precision: expected one of {', '.join(PRECISIONS)}, "
                            f"got {precision!r}")


def encode_array(x: np.ndarray, precision: str) -> dict[str, np.ndarray]:
    """Encode an (N, C, H, W) float array for the wire: ``{"": data}`` (+ ``".scale"`` for int8)."""
    check_precision(precision)
    if precision == "float32":
        return {"": x.astype(np.float32)}
    if precision == "float16":
        return {"": x.astype(np.float16)}
    q, s = quantize_int8(x)
    return {"": q, SCALE_SUFFIX: s}


def decode_array(data: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Decode an array of :func:`encode_array` back to float32."""
    if data.dtype == np.int8:
        if scale is None:
            raise ProtocolError("int8 array without its .scale array")
        return dequantize_int8(data, scale)
    return data.astype(np.float32)


def release_maps(logits: "torch.Tensor", features: list, reply: ReplyConfig,
                 temperature: float = 1.0) -> tuple[np.ndarray, list[np.ndarray]]:
    """What a site releases for a batch of proxy slices, before any privacy noise and coding.

    logits (B, 2, H, W) and feature maps [(B, C, h, w)] (torch) ->
    prediction: ``reply.output: logits``: logits / temperature (B, 2, H, W); ``foreground``:
    the calibrated gland probability (B, 1, H/f, W/f), average-pooled by f = ``reply.downsample``;
    features: as they are, or (``reply.features: pooled``) the channel RMS map (B, 1, h, w).
    """
    import torch

    pred = logits / temperature
    if reply.output == "foreground":
        pred = pred.softmax(dim=1)[:, 1:2]
        if reply.downsample > 1:
            pred = torch.nn.functional.avg_pool2d(pred, reply.downsample)
    if reply.features == "pooled":
        features = [f.pow(2).mean(dim=1, keepdim=True).sqrt() for f in features]
    return pred.numpy(), [f.numpy() for f in features]


class ReplyEncoder:
    """Builds the two array records of a proxy reply, a batch of slices at a time.

    Memory is bounded by the wire format: outputs are preallocated in the wire dtype (or as
    quantised codes) for the N slices and filled batch by batch (:meth:`add`); :meth:`records`
    entropy-codes the compact streams (common.codec). The site (``answer_proxy_query``) and the
    benchmark's simulated replies both encode through here.
    """

    def __init__(self, reply: ReplyConfig, precision: str, n: int, features: list[str]):
        check_precision(precision)
        self.reply, self.precision, self.n, self.features = reply, precision, n, list(features)
        self.compact = reply.output == "foreground"
        self.pooled = reply.features == "pooled"
        self.logits: dict[str, np.ndarray] = {}
        self.feats: dict[str, np.ndarray] = {}
        self.coded: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, bool]] = {}

    def add(self, rows: slice, pred: np.ndarray, maps: list[np.ndarray]) -> None:
        """Store slices ``rows`` of the reply: ``pred`` and ``maps`` as :func:`release_maps`
        returns them (noised or not)."""
        parts = ([(FOREGROUND if self.compact else "logits", pred, self.compact, True)]
                 + [(f, a, self.pooled, False) for f, a in zip(self.features, maps)])
        for i, (name, arr, is_coded, fixed) in enumerate(parts):
            if is_coded:
                q, scale = quantize(arr, self.reply.bits, fixed)
                if (i, name) not in self.coded:
                    self.coded[i, name] = (np.empty((self.n, *q.shape[1:]), np.uint8),
                                           np.empty((self.n, q.shape[1]), np.float32), fixed)
                self.coded[i, name][0][rows], self.coded[i, name][1][rows] = q, scale
                continue
            dest = self.logits if i == 0 else self.feats
            for suffix, enc in encode_array(arr, self.precision).items():
                key = name + suffix
                if key not in dest:
                    dest[key] = np.empty((self.n, *enc.shape[1:]), dtype=enc.dtype)
                dest[key][rows] = enc

    def records(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(logits record, features record) as arrays for the wire."""
        for (i, name), (codes, scales, fixed) in self.coded.items():
            (self.logits if i == 0 else self.feats)[name] = encode_stream(
                codes, scales, self.reply.bits, self.reply.codec, fixed)
        self.coded = {}
        return self.logits, self.feats


# --------------------------------------------------------------------------------------------
# Building requests and reading replies (used by the server and the tests)
# --------------------------------------------------------------------------------------------
def train_request(cfg: RunConfig):
    """Content of a ``train.teacher`` instruction."""
    from flwr.app import ConfigRecord, RecordDict

    return RecordDict({RUN: ConfigRecord({"config": config_to_text(cfg)})})


def query_request(cfg: RunConfig, slice_ids: list[str], features: list[str],
                  precision: str = "float16", batch_size: int = 32, teacher: str = ""):
    """Content of a ``query.proxy`` instruction (slice ids are ``CASE/z`` of the proxy set;
    ``teacher``: the :func:`consensus_id` of a refined teacher, "" for the site's own)."""
    from flwr.app import ConfigRecord, RecordDict

    query = {"slice_ids": list(slice_ids), "features": list(features), "precision": precision,
             "batch_size": batch_size}
    if teacher:
        query["teacher"] = teacher
    return RecordDict({RUN: ConfigRecord({"config": config_to_text(cfg)}),
                       QUERY: ConfigRecord(query)})


def encode_consensus(foreground: np.ndarray, reply: ReplyConfig) -> np.ndarray:
    """The consensus a server sends in ``train.consensus``: the targets' gland probability
    (N, 1, H, W) in [0, 1] as one stream, quantised to ``reply.bits`` and coded with
    ``reply.codec`` as a compact reply is (common.codec)."""
    codes, scales = quantize(foreground, reply.bits, True)
    return encode_stream(codes, scales, reply.bits, reply.codec, True)


def decode_consensus(stream: np.ndarray, n: int, hw: tuple[int, int]) -> np.ndarray:
    """(N, H, W) float32 gland probability of a :func:`encode_consensus` stream; ProtocolError
    names what is wrong."""
    try:
        return decode_stream(stream, (n, 1, *hw), True, n * hw[0] * hw[1])[:, 0]
    except CodecError as exc:
        raise ProtocolError(f"consensus: {exc}") from None


def consensus_id(stream: np.ndarray, cfg: RunConfig) -> str:
    """The name of the teacher a site refines on ``stream`` with ``cfg.consensus``: the same on
    the server and the site, so that the next query can ask for it."""
    import hashlib
    import json
    from dataclasses import asdict

    settings = asdict(cfg.consensus)
    settings.pop("rounds")   # how a copy is refined, not how many rounds the run has
    h = hashlib.sha256(np.ascontiguousarray(stream, np.uint8).tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return "c" + h.hexdigest()[:16]


def consensus_request(cfg: RunConfig, slice_ids: list[str], stream: np.ndarray):
    """Content of a ``train.consensus`` instruction: the proxy slice ids and the consensus
    stream of :func:`encode_consensus` on them."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    return RecordDict({RUN: ConfigRecord({"config": config_to_text(cfg)}),
                       QUERY: ConfigRecord({"slice_ids": list(slice_ids)}),
                       CONSENSUS: ArrayRecord({FOREGROUND: Array(stream)})})


def evaluate_request(cfg: RunConfig, student_state: dict, split: str = "test",
                     with_val: bool = False):
    """Content of an ``evaluate.student`` instruction (``student_state``: torch state dict of
    ``cfg.model.student``; ``split``: the private split to evaluate on, test or val;
    ``with_val``: also report the validation Dice, by which an experiment selects among runs)."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    return RecordDict({RUN: ConfigRecord({"config": config_to_text(cfg)}),
                       STUDENT: ArrayRecord(student_state),
                       EVAL: ConfigRecord({"split": split, "with_val": with_val})})


def adapt_request(cfg: RunConfig, student_state: dict):
    """Content of a ``train.adapt`` instruction: the run config (its ``adapt`` section) and the
    final student's state dict."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    return RecordDict({RUN: ConfigRecord({"config": config_to_text(cfg)}),
                       STUDENT: ArrayRecord(student_state)})


def decode_record_array(record, key: str) -> np.ndarray:
    """Array ``key`` of an ArrayRecord of :func:`encode_array`, decoded to float32 (with its
    ``.scale`` array when int8)."""
    scale = record[key + SCALE_SUFFIX].numpy() if key + SCALE_SUFFIX in record else None
    return decode_array(record[key].numpy(), scale)


def decode_proxy_reply(content) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(logits (N, 2, H, W) float32, {feature: (N, C, h, w) float32})`` from a proxy reply."""
    if LOGITS not in content or FEATURES not in content:
        raise ProtocolError("proxy reply: missing logits or features record")
    if "logits" not in content[LOGITS]:
        raise ProtocolError("proxy reply: logits record has no 'logits' array")
    feats = content[FEATURES]
    return decode_record_array(content[LOGITS], "logits"), {
        k: decode_record_array(feats, k) for k in feats.keys() if not k.endswith(SCALE_SUFFIX)}


def reply_encoding(cfg: RunConfig, precision: str, features: bool = True) -> str:
    """A short label of how proxy replies are encoded, e.g. ``foreground 4-bit zlib /2,
    features pooled 4-bit zlib`` or ``logits float16, features float16`` (``features``: whether
    feature maps are requested)."""
    r = cfg.reply
    coded = f"{r.bits}-bit {r.codec}"
    out = (f"foreground {coded}" + (f" /{r.downsample}" if r.downsample > 1 else "")
           if r.output == "foreground" else f"logits {precision}")
    if not features:
        return out + ", no features"
    return out + ", features " + (f"pooled {coded}" if r.features == "pooled" else precision)


def read_proxy_reply(content, cfg: RunConfig, n: int, hw: tuple[int, int],
                     features: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What the server distils from: ``(probs (N, 2, H, W) float32, {feature: (N, C, h, w)
    float32})`` of a proxy reply encoded as ``cfg.reply`` says (logits in a precision, or
    compact streams, common.codec). The compact foreground map is upsampled bilinearly to
    (H, W). ProtocolError names the array and the cause of anything malformed, oversize,
    non-finite or of the wrong shape."""
    import torch

    def stream(record, key: str, expect: tuple, fixed: bool) -> np.ndarray:
        try:   # a map is never finer than the image: n * H * W values at most
            return decode_stream(record[key].numpy(), expect, fixed, n * hw[0] * hw[1])
        except CodecError as exc:
            raise ProtocolError(f"proxy reply: {key}: {exc}") from None

    if LOGITS not in content or FEATURES not in content:
        raise ProtocolError("proxy reply: missing logits or features record")
    rec, frec = content[LOGITS], content[FEATURES]
    r = cfg.reply
    if r.output == "foreground":
        if FOREGROUND not in rec:
            raise ProtocolError("proxy reply: logits record has no 'foreground' stream")
        h, w = hw[0] // r.downsample, hw[1] // r.downsample
        p = torch.from_numpy(stream(rec, FOREGROUND, (n, 1, h, w), True))
        if r.downsample > 1:
            p = torch.nn.functional.interpolate(p, size=tuple(hw), mode="bilinear",
                                                align_corners=False).clamp(0.0, 1.0)
        probs = torch.cat([1 - p, p], dim=1).numpy()
    else:   # only the logits: the requested features are decoded once, below
        if "logits" not in rec:
            raise ProtocolError("proxy reply: logits record has no 'logits' array")
        logits = decode_record_array(rec, "logits")
        if logits.shape != (n, 2, *hw):
            raise ProtocolError(f"logits of shape {logits.shape}, expected {(n, 2, *hw)}")
        if not np.isfinite(logits).all():
            raise ProtocolError("logits contain NaN/inf")
        probs = torch.from_numpy(logits).softmax(dim=1).numpy()
    feats = {}
    for name in features:
        if name not in frec:
            raise ProtocolError(f"feature {name!r} missing from the reply")
        if r.features == "pooled":
            feats[name] = stream(frec, name, (n, 1, None, None), False)
            continue
        f = decode_record_array(frec, name)
        if f.ndim != 4 or f.shape[0] != n:
            raise ProtocolError(f"feature {name!r} of shape {f.shape}, expected "
                                f"(N={n}, C, h, w)")
        if not np.isfinite(f).all():
            raise ProtocolError(f"feature {name!r} contains NaN/inf")
        feats[name] = f
    return probs.astype(np.float32, copy=False), feats


def decode_affinity(content, n: int) -> Optional[np.ndarray]:
    """The per-slice affinity distances (N,) float32 of a proxy reply, or None if it has none.
    ProtocolError if the array is not N finite values >= 0."""
    record = content[LOGITS] if LOGITS in content else {}
    if AFFINITY not in record:
        return None
    a = record[AFFINITY].numpy()
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.floating):
        raise ProtocolError(f"proxy reply: affinity of shape {a.shape} and dtype {a.dtype}, "
                            f"expected ({n},) floats")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ProtocolError("proxy reply: affinity holds NaN, infinite or negative values")
    return a.astype(np.float32)


def decode_style(content, hw: tuple[int, int], beta: float) -> np.ndarray:
    """The site style of a proxy reply (``reply.share_style``): (2b+1, 2b+1) float32, b from
    ``beta`` and the slice size ``hw`` (common.style). ProtocolError if it is missing, of
    another shape, negative or not finite."""
    from common.style import window_half_width

    k = 2 * window_half_width(hw, beta) + 1
    if STYLE not in content or "amplitude" not in content[STYLE]:
        raise ProtocolError("proxy reply: reply.share_style is on but the reply has no "
                            "style.amplitude")
    a = content[STYLE]["amplitude"].numpy()
    if a.shape != (k, k) or a.dtype != np.float32:
        raise ProtocolError(f"proxy reply: style.amplitude of shape {a.shape} and dtype "
                            f"{a.dtype}, expected ({k}, {k}) float32")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ProtocolError("proxy reply: style.amplitude holds NaN, infinite or negative values")
    return a


def describe_message(msg, direction: str, values: bool = False) -> dict:
    """What an audit line says about a Flower ``msg`` (the coordinator's audit, server.audit,
    and a node's outbox, client.app): direction (``to-site`` / ``from-site``), node, site (from
    the reply's ``info`` record), message type, total array bytes, every array's record, name,
    shape, dtype and bytes (for a coded stream of common.codec also the shape it decodes to, its
    bits and codec), and the keys of metric and config records (``values``: their values too);
    an error reply's reason. Never array contents."""
    import time

    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    md = msg.metadata
    row = {"time": time.time(), "direction": direction, "message_type": md.message_type,
           "node": md.dst_node_id if direction == "to-site" else md.src_node_id,
           "arrays": [], "records": {}, "bytes": 0}
    if msg.has_error():
        row["error"] = msg.error.reason
        return row
    content = msg.content
    info = content.get("info") if isinstance(content.get("info"), ConfigRecord) else None
    if info is not None and "site" in info:
        row["site"] = str(info["site"])
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            for key, arr in rec.items():
                entry = {"record": name, "name": key, "shape": list(arr.shape),
                         "dtype": str(arr.dtype), "bytes": len(arr.data)}
                head = stream_header(arr)
                if head is not None:
                    bits, codec, fixed, _, shape = head
                    entry["stream"] = {"shape": list(shape), "bits": bits, "codec": codec,
                                       "range": "[0, 1]" if fixed else "scaled"}
                row["arrays"].append(entry)
                row["bytes"] += len(arr.data)
        elif isinstance(rec, (MetricRecord, ConfigRecord)):
            row["records"][name] = ({k: _plain(rec[k]) for k in sorted(rec.keys())} if values
                                    else sorted(rec.keys()))
    return row


def _plain(v: Any) -> Any:
    """A record value as JSON can hold it (lists stay lists; bytes as their length)."""
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    return list(v) if isinstance(v, (list, tuple)) else v


def stream_header(arr) -> Optional[tuple]:
    """The header of a coded reply stream (common.codec.read_header: bits, codec, fixed range,
    payload length, the shape it decodes to), or None if ``arr`` is not one."""
    if str(arr.dtype) != "uint8" or len(arr.shape) != 1:
        return None
    try:
        return read_header(arr.numpy())
    except CodecError:
        return None


def read_teacher_reply(content, cfg: RunConfig, n: int, hw: tuple[int, int],
                       features: list[str]) -> tuple:
    """Everything the server reads from one site's ``query.proxy`` reply: ``(probs (N, 2, H, W),
    {feature: map}, affinity (N,) or None, style (k, k) or None)`` (:func:`read_proxy_reply`,
    :func:`decode_affinity`, :func:`decode_style` with ``reply.share_style``). ProtocolError
    names what is malformed."""
    probs, feats = read_proxy_reply(content, cfg, n, hw, features)
    style = decode_style(content, hw, cfg.reply.style_beta) if cfg.reply.share_style else None
    return probs, feats, decode_affinity(content, n), style
