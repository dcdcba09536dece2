"""The hospital's Flower ClientApp (Message API).

Five handlers, one per message type of :mod:`common.protocol`:

* ``train.teacher``   train (or reuse / resume) the site's teacher on its private data;
* ``query.proxy``     the teacher's logits and features on named public proxy slices;
* ``evaluate.student`` the student's Dice / HD95 on the private test split (and, when asked, its
                      validation Dice);
* ``train.consensus`` fine-tune a copy of the teacher on its private data plus the federation's
                      consensus on the proxy slices; the copy answers the queries that name it;
* ``train.adapt``     fine-tune the final student on the private data and keep it in the node's
                      state directory (``adapted_student``); only metrics are returned.

and the two of Flower's built-in strategies (``FedAvg`` / ``FedProx``, the weight-sharing
baseline ``federation.strategy: fedavg | fedprox``):

* ``train``           local epochs of the global student on the private train split (FedProx's
                      proximal term when the config carries ``proximal-mu``); replies
                      ``arrays`` + ``metrics`` with ``num-examples``;
* ``evaluate``        the global student's Dice / HD95 on the private validation split (per round).

Any failure becomes a Flower error reply whose reason names the site, the file or field and the
cause; the node then answers the next message as usual. Paths come from the node config
(see :mod:`client.node`, :mod:`client.teacher`, :mod:`client.student`).
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client import node as node_ops
from client import student as student_ops
from client import teacher as teacher_ops
from client.egress import EgressError, check_reply
from client.policy import PolicyError
from common.config import ConfigError, RunConfig
from common.data import DataError
from common.logs import get_logger
from common.protocol import (
    CONSENSUS,
    ERR_BAD_MESSAGE,
    ERR_CONFIG,
    ERR_DATA,
    ERR_INTERNAL,
    ERR_POLICY,
    EVAL,
    FEATURES,
    FOREGROUND,
    FLWR_ARRAYS,
    FLWR_CONFIG,
    INFO,
    LOGITS,
    METRICS,
    QUERY,
    RUN,
    RUN_CONFIG_KEY,
    STATS,
    STUDENT,
    STYLE,
    ProtocolError,
    describe_message,
    config_from_text,
    reply_encoding,
)

LOG = get_logger("fedkd.client")

app = ClientApp()


def _field(msg: Message, record: str, key: str | None = None, kind: type = ConfigRecord):
    rec = msg.content.get(record) if msg.has_content() else None
    if rec is None:
        raise ProtocolError(f"message {msg.metadata.message_type}: missing record {record!r}")
    if not isinstance(rec, kind):
        raise ProtocolError(f"message {msg.metadata.message_type}: record {record!r} is a "
                            f"{type(rec).__name__}, expected {kind.__name__}")
    if key is None:
        return rec
    if key not in rec:
        raise ProtocolError(f"message {msg.metadata.message_type}: missing field {record}.{key}")
    return rec[key]


def _run_config(msg: Message) -> RunConfig:
    """The run config: ``run.config`` in fedkd's messages, ``config.run-config`` in the
    messages of Flower's strategies (their train/evaluate config record)."""
    if msg.has_content() and RUN not in msg.content and FLWR_CONFIG in msg.content:
        return config_from_text(_field(msg, FLWR_CONFIG, RUN_CONFIG_KEY),
                                f"message field {FLWR_CONFIG}.{RUN_CONFIG_KEY}")
    return config_from_text(_field(msg, RUN, "config"))


def _serve(msg: Message, context: Context,
           handler: Callable[[RunConfig, node_ops.Node, Message], RecordDict]) -> Message:
    """Resolve the node, parse the run config, call ``handler``; turn failures into error replies."""
    site = node_ops.site_label(context.node_config, context.node_id)
    outbox = node_ops.declared_state_dir(context.node_config)
    policy = node_ops.node_policy(context.node_config)
    try:
        cfg = _run_config(msg)
        node = node_ops.resolve_node(context.node_config, context.run_config, cfg)
        site, outbox, policy = node.site, node.state_dir, node.policy
        torch.set_num_threads(node.threads or cfg.runtime.client_threads or cfg.runtime.threads)
        LOG.info(f"[{site}] {msg.metadata.message_type}")
        content = handler(cfg, node, msg)
        if content.array_records:   # no private image leaves, whatever asked for it
            check_reply(content.array_records, node_ops.egress_signatures(cfg, node))
        content[INFO] = ConfigRecord({**content.get(INFO, {}), "site": site})
        return _sent(Message(content, reply_to=msg), outbox)
    except (PolicyError, EgressError) as exc:
        code, reason = ERR_POLICY, str(exc)
    except ProtocolError as exc:
        code, reason = ERR_BAD_MESSAGE, str(exc)
    except DataError as exc:
        code, reason = ERR_DATA, str(exc)
    except ConfigError as exc:
        code, reason = ERR_CONFIG, str(exc)
    except Exception as exc:  # a bug must not take the node down: report it
        code, reason = ERR_INTERNAL, f"{type(exc).__name__}: {exc}"
        LOG.error(traceback.format_exc())
    LOG.error(f"[{site}] {msg.metadata.message_type} failed: site {site}: {reason}")
    reason = policy.redact(f"site {site}: {reason}")   # the local log keeps the full paths
    return _sent(Message(Error(code=code, reason=reason), reply_to=msg), outbox)


OUTBOX = "outbox.jsonl"


def _sent(reply: Message, state_dir: Optional[Path]) -> Message:
    """Record ``reply`` in the node's outbox, ``STATE_DIR/outbox.jsonl`` (one JSON line per
    reply: message type, every array's record, name, shape, dtype and bytes, every metric and
    config value, an error's reason; never array contents), so that the hospital sees at the
    hospital everything its node sent. A reply is sent even if the outbox cannot be written
    (the node's log says so)."""
    if state_dir is None:
        return reply
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with (state_dir / OUTBOX).open("a") as fh:
            fh.write(json.dumps(describe_message(reply, "from-site", values=True)) + "\n")
    except OSError as exc:
        LOG.error(f"outbox {state_dir / OUTBOX} not written: {exc}")
    return reply


def _train(cfg: RunConfig, node: node_ops.Node, msg: Message) -> RecordDict:
    metrics = teacher_ops.train_teacher(cfg, node, log=LOG.info)
    how = "reused checkpoint" if metrics["reused"] else f"{metrics['epochs_run']} epochs"
    quality = (f"val Dice {metrics['val_dice']:.4f}" if "val_dice" in metrics else
               f"DP-SGD epsilon {metrics['dp_epsilon']:.2f} (validation Dice withheld)")
    LOG.info(f"[{node.site}] teacher ready: {quality} ({how}, {metrics['seconds']:.1f}s)")
    return RecordDict({METRICS: MetricRecord(metrics),
                       INFO: ConfigRecord({"teacher_arch": cfg.teacher_spec(node.site).arch})})


def _query(cfg: RunConfig, node: node_ops.Node, msg: Message) -> RecordDict:
    q = _field(msg, QUERY)
    for key in ("slice_ids", "features", "precision"):
        if key not in q:
            raise ProtocolError(f"message {msg.metadata.message_type}: missing field query.{key}")
    ids, feats = q["slice_ids"], q["features"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ProtocolError("query.slice_ids: expected a list of strings")
    if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
        raise ProtocolError("query.features: expected a list of strings")
    batch = q.get("batch_size", 32)
    if not isinstance(batch, int) or isinstance(batch, bool):
        raise ProtocolError(f"query.batch_size: expected an integer, got {batch!r}")
    teacher = q.get("teacher", "")
    if not isinstance(teacher, str):
        raise ProtocolError(f"query.teacher: expected a string, got {teacher!r}")
    logits, features, stats = teacher_ops.answer_proxy_query(cfg, node, ids, feats,
                                                          str(q["precision"]), batch, teacher)
    LOG.info(f"[{node.site}] proxy reply: {stats['n_slices']} slices, "
             f"{stats['reply_bytes'] / 1e6:.2f} MB ({reply_encoding(cfg, str(q['precision']), bool(feats))}), "
             f"entropy {stats['proxy_entropy']:.4f}, {stats['seconds']:.1f}s")
    style = stats.pop("style", None)
    content = RecordDict({
        LOGITS: ArrayRecord({k: Array(v) for k, v in logits.items()}),
        FEATURES: ArrayRecord({k: Array(v) for k, v in features.items()}),
        STATS: MetricRecord(stats),
    })
    if style is not None:   # reply.share_style: the site's mean low-frequency amplitude
        content[STYLE] = ArrayRecord({"amplitude": Array(style)})
    return content


def _consensus(cfg: RunConfig, node: node_ops.Node, msg: Message) -> RecordDict:
    ids = _field(msg, QUERY, "slice_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ProtocolError("query.slice_ids: expected a list of strings")
    record = _field(msg, CONSENSUS, kind=ArrayRecord)
    if FOREGROUND not in record:
        raise ProtocolError(f"consensus: missing array {FOREGROUND!r}")
    metrics = teacher_ops.refine_teacher(cfg, node, ids, record[FOREGROUND].numpy(), log=LOG.info)
    how = "reused" if metrics["reused"] else f"epoch {metrics['best_epoch']}"
    LOG.info(f"[{node.site}] teacher refined on the consensus: val Dice "
             f"{metrics['val_dice_before']:.4f} -> {metrics['val_dice_after']:.4f} ({how}, "
             f"{metrics['seconds']:.1f}s)")
    return RecordDict({METRICS: MetricRecord(metrics)})


def _evaluate(cfg: RunConfig, node: node_ops.Node, msg: Message) -> RecordDict:
    split, with_val = "test", False
    if msg.content.get(EVAL) is not None:
        split = _field(msg, EVAL, "split")
        if split not in ("test", "val"):
            raise ProtocolError(f"evaluate.split: expected 'test' or 'val', got {split!r}")
        with_val = bool(_field(msg, EVAL).get("with_val", False))
    weights = _weights(msg, STUDENT)
    if split == "test":
        node.policy.count_test_evaluation(node.state_dir, msg.metadata.run_id)
    val = student_ops.evaluate_student(cfg, node, weights, "val") if with_val else None
    metrics = node.policy.filter_metrics(student_ops.evaluate_student(cfg, node, weights, split))
    if val is not None:
        metrics.update(val_dice_mean=val["dice_mean"], val_n_cases=val["n_cases"])
    LOG.info(f"[{node.site}] student: Dice {metrics['dice_mean']:.4f} "
             f"HD95 {metrics['hd95_mean']:.1f} mm on {metrics['n_cases']} {split} cases")
    return RecordDict({METRICS: MetricRecord(metrics)})


def _adapt(cfg: RunConfig, node: node_ops.Node, msg: Message) -> RecordDict:
    node.policy.count_test_evaluation(node.state_dir, msg.metadata.run_id)  # test figures
    metrics = student_ops.adapt_student(cfg, node, _weights(msg, STUDENT), log=LOG.info)
    for when in ("_before", "_after"):
        metrics = node.policy.filter_metrics(metrics, suffix=when)
    test = (f"; test Dice {metrics['dice_mean_before']:.4f} -> {metrics['dice_mean_after']:.4f}"
            if "dice_mean_after" in metrics else "")
    LOG.info(f"[{node.site}] adapted student: val Dice {metrics['val_dice_before']:.4f} -> "
             f"{metrics['val_dice_after']:.4f} (epoch {metrics['best_epoch']}){test}; kept in "
             f"{student_ops.adapted_dir(node)}")
    return RecordDict({METRICS: MetricRecord(metrics)})


def _weights(msg: Message, record: str) -> dict[str, torch.Tensor]:
    try:
        return _field(msg, record, kind=ArrayRecord).to_torch_state_dict()
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"{record}: cannot decode the weights ({exc})") from None


def _fedavg_train(cfg: RunConfig, node: node_ops.Node, msg: Message) -> RecordDict:
    node.policy.check_weights()   # weights trained on private data: the hospital decides
    conf = _field(msg, FLWR_CONFIG)
    rnd = int(conf.get("server-round", 0))
    mu = float(conf.get("proximal-mu", 0.0))
    state, metrics = student_ops.train_student_local(cfg, node, _weights(msg, FLWR_ARRAYS), rnd, mu)
    LOG.info(f"[{node.site}] student round {rnd}: loss {metrics['loss']:.4f} "
             f"({metrics['seconds']:.1f}s{f', proximal mu {mu}' if mu else ''})")
    return RecordDict({FLWR_ARRAYS: ArrayRecord(state), METRICS: MetricRecord(metrics)})


def _fedavg_evaluate(cfg: RunConfig, node: node_ops.Node, msg: Message) -> RecordDict:
    # per-round figures of Flower's strategies: the validation split (the test split is read
    # once, by fedkd's evaluate.student of the final model)
    if cfg.privacy.dp_sgd_epsilon > 0:   # a statistic the DP-SGD guarantee does not cover
        return RecordDict({METRICS: MetricRecord({"num-examples": 1})})   # weight only
    m = student_ops.evaluate_student(cfg, node, _weights(msg, FLWR_ARRAYS), "val")
    return RecordDict({METRICS: MetricRecord({"dice": m["dice_mean"], "hd95": m["hd95_mean"],
                                              "num-examples": int(m["n_cases"])})})


def _handler(work: Callable[[RunConfig, node_ops.Node, Message], RecordDict]
             ) -> Callable[[Message, Context], Message]:
    """A Flower message handler that serves ``work`` (:func:`_serve`: policy, outbox, errors)."""
    def handle(msg: Message, context: Context) -> Message:
        return _serve(msg, context, work)
    return handle


# The message types this node answers (common.protocol), and Flower's own train / evaluate of
# the weight-sharing methods (FedAvg / FedProx / FedDF; refused by the `kd` node policy).
for register, work in ((app.train("teacher"), _train), (app.train("consensus"), _consensus),
                       (app.train("adapt"), _adapt), (app.query("proxy"), _query),
                       (app.evaluate("student"), _evaluate), (app.train(), _fedavg_train),
                       (app.evaluate(), _fedavg_evaluate)):
    register(_handler(work))
