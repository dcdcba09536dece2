"""The site ClientApp driven in-process with Flower Messages on a tiny synthetic federation."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, Metadata, RecordDict

from client.app import app
from client.node import load_private, load_proxy_cases, resolve_node
from client.student import train_student_local
from common.slices import proxy_slice_ids
from common.config import ConfigError, load_config
from common.models import FeatureNet
from common.protocol import (ERR_BAD_MESSAGE, ERR_CONFIG, ERR_DATA, EVALUATE_STUDENT, QUERY_PROXY,
                             TRAIN_TEACHER, decode_proxy_reply, evaluate_request, query_request,
                             train_request)
from simulations.synthetic import write_dataset
from common.training import evaluate_cases

_ids = iter(range(10**6))


def send(content: RecordDict, mtype: str, node_config: dict, run_config: dict | None = None,
         run_id: int = 1) -> Message:
    md = Metadata(run_id=run_id, message_id=f"m{next(_ids)}", src_node_id=0, dst_node_id=7,
                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600,
                  message_type=mtype)
    ctx = Context(run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(),
                  run_config=run_config or {})
    return app(Message(content, metadata=md), ctx)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    state = tmp_path_factory.mktemp("state")
    write_dataset(root, n_sites=2, n_cases=10, n_proxy=3, seed=0, log=lambda s: None)
    cfg = load_config(None, [
        "data.size=[64,64]", "data.spacing=[2.0,2.0]",
        "model.teacher.channels=[8,16,32,64]", "model.teacher.strides=[2,2,2]",
        "model.teacher.num_res_units=1", "model.student.channels=[4,8,16,32]",
        "model.student.num_res_units=0", "train.epochs=30", "train.patience=30",
        "reply.output=logits", "reply.features=full",    # the precisions; compact: own tests
    ])
    node = {"data-path": str(root / "SiteA"), "proxy-path": str(root / "PROXY"),
            "state-dir": str(state / "SiteA"), "policy": "open"}   # kd: its own tests
    return root, cfg, node


@pytest.fixture(scope="module")
def trained(fed):
    root, cfg, node = fed
    t0 = time.perf_counter()
    reply = send(train_request(cfg), TRAIN_TEACHER, node)
    return reply, time.perf_counter() - t0


def test_teacher_trains_to_a_dice_floor_and_reports_metrics_only(trained):
    """Floor 0.6 val Dice: the same 6-case 64x64 set-up measured 0.76-0.81 over seeds 0-3
    (tests/test_training.py); predicting nothing scores 0."""
    reply, _ = trained
    assert not reply.has_error(), reply.error
    m = reply.content["metrics"]
    assert m["val_dice"] > 0.6
    assert (m["train_cases"], m["val_cases"], m["test_cases"]) == (6, 2, 2)
    assert m["train_slices"] > 100 and m["epochs_run"] == 30 and m["reused"] == 0
    assert reply.content["info"]["site"] == "SiteA"
    assert not reply.content.array_records


def test_repeated_request_reuses_the_checkpoint(fed, trained):
    root, cfg, node = fed
    first, first_seconds = trained
    t0 = time.perf_counter()
    again = send(train_request(cfg), TRAIN_TEACHER, node)
    assert again.content["metrics"]["reused"] == 1
    assert again.content["metrics"]["val_dice"] == pytest.approx(first.content["metrics"]["val_dice"])
    assert time.perf_counter() - t0 < 0.5 * first_seconds


def test_site_overrides_from_node_config(fed, tmp_path):
    root, cfg, node = fed
    local = {**node, "state-dir": str(tmp_path / "override"), "train.epochs": 2}
    reply = send(train_request(cfg), TRAIN_TEACHER, local)
    assert reply.content["metrics"]["epochs_run"] == 2
    bad = send(train_request(cfg), TRAIN_TEACHER, {**local, "train.epochs": "two"})
    assert bad.has_error() and bad.error.code == ERR_CONFIG
    assert "node config train.epochs: expected an integer" in bad.error.reason


@pytest.mark.parametrize("precision,dtype", [("float32", np.float32), ("float16", np.float16),
                                             ("int8", np.int8)])
def test_proxy_reply_shapes_and_dtypes(fed, trained, precision, dtype):
    root, cfg, node = fed
    ids = ["Case00/3", "Case02/0", "Case01/5", "Case00/4", "Case01/0"]
    reply = send(query_request(cfg, ids, ["enc2", "dec2"], precision, batch_size=2), QUERY_PROXY, node)
    assert not reply.has_error(), reply.error
    logits, feats = reply.content["logits"], reply.content["features"]
    assert logits["logits"].shape == (5, 2, 64, 64) and logits["logits"].numpy().dtype == dtype
    assert feats["enc2"].shape == (5, 16, 16, 16) and feats["dec2"].shape == (5, 16, 16, 16)
    if precision == "int8":
        assert logits["logits.scale"].shape == (5, 2) and feats["enc2.scale"].shape == (5, 16)
    stats = reply.content["stats"]
    assert stats["n_slices"] == 5 and 0.0 <= stats["proxy_entropy"] <= math.log(2)
    assert stats["val_dice"] > 0.6
    sent = sum(a.numpy().nbytes for rec in (logits, feats) for a in rec.values())
    assert stats["reply_bytes"] == sent


def test_precisions_agree_and_int8_error_is_bounded(fed, trained):
    root, cfg, node = fed
    ids = [f"Case01/{z}" for z in range(6)]
    replies = {p: decode_proxy_reply(send(query_request(cfg, ids, ["enc2"], p), QUERY_PROXY,
                                          node).content) for p in ("float32", "float16", "int8")}
    ref_logits, ref_feats = replies["float32"]
    for precision in ("float16", "int8"):
        logits, feats = replies[precision]
        for ref, got in ((ref_logits, logits), (ref_feats["enc2"], feats["enc2"])):
            amax = np.abs(ref).reshape(ref.shape[0], ref.shape[1], -1).max(axis=2)
            bound = (amax / 254.0 if precision == "int8" else amax / 1000.0)[:, :, None, None]
            assert (np.abs(got - ref) <= bound + 1e-6).all(), precision
    # the same slices in a different order and batch size give the same rows
    again, _ = decode_proxy_reply(send(query_request(cfg, ids[::-1], ["enc2"], "float32", 4),
                                       QUERY_PROXY, node).content)
    assert np.allclose(again[::-1], ref_logits, atol=1e-5)


def test_compact_reply_matches_the_logits_within_its_quantisation(fed, trained):
    """reply.output foreground + reply.features pooled: one coded stream per map; decoded, the
    gland probability is the calibrated softmax within half a 4-bit step, the pooled feature is
    the channel RMS of the full map, and the reply is far smaller."""
    from common.config import with_overrides
    from common.protocol import read_proxy_reply

    root, cfg, node = fed
    ids = [f"Case01/{z}" for z in range(8)]
    full = send(query_request(cfg, ids, ["enc2"], "float32"), QUERY_PROXY, node)
    small_cfg = with_overrides(cfg, ["reply.output=foreground", "reply.bits=4",
                                     "reply.features=pooled"])
    small = send(query_request(small_cfg, ids, ["enc2"], "float32"), QUERY_PROXY, node)
    assert not small.has_error(), small.error
    logits_rec, feat_rec = small.content["logits"], small.content["features"]
    assert set(logits_rec.keys()) == {"foreground", "affinity"} and set(feat_rec.keys()) == {"enc2"}
    assert logits_rec["foreground"].numpy().dtype == np.uint8
    ref_probs, ref_feats = read_proxy_reply(full.content, cfg, 8, (64, 64), ["enc2"])
    probs, feats = read_proxy_reply(small.content, small_cfg, 8, (64, 64), ["enc2"])
    assert probs.shape == (8, 2, 64, 64) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(probs - ref_probs).max() <= 0.5 / 15 + 1e-3
    rms = np.sqrt((ref_feats["enc2"] ** 2).mean(axis=1, keepdims=True))
    assert feats["enc2"].shape == rms.shape == (8, 1, 16, 16)
    amax = rms.reshape(8, -1).max(axis=1)[:, None, None, None]
    assert (np.abs(feats["enc2"] - rms) <= amax / 30 + 1e-4).all()
    assert small.content["stats"]["reply_bytes"] * 10 < full.content["stats"]["reply_bytes"]
    # downsampled: a quarter of the values, upsampled back at the server
    half_cfg = with_overrides(small_cfg, ["reply.downsample=2"])
    half = send(query_request(half_cfg, ids, [], "float32"), QUERY_PROXY, node)
    probs2, _ = read_proxy_reply(half.content, half_cfg, 8, (64, 64), [])
    assert probs2.shape == (8, 2, 64, 64)
    assert np.abs(probs2 - ref_probs).mean() < 0.05
    # the server reading with another encoding than the site used gets a clear error, and so
    # does a truncated stream (the coordinator excludes the site with this reason)
    from common.protocol import ProtocolError

    with pytest.raises(ProtocolError, match="no 'foreground' stream"):
        read_proxy_reply(full.content, small_cfg, 8, (64, 64), ["enc2"])
    stream = logits_rec["foreground"].numpy()
    small.content["logits"] = ArrayRecord({"foreground": Array(stream[:-9])})
    with pytest.raises(ProtocolError, match="proxy reply: foreground: zlib payload is truncated"):
        read_proxy_reply(small.content, small_cfg, 8, (64, 64), ["enc2"])


def test_reply_carries_calibrated_logits_and_a_per_slice_affinity(fed, trained):
    """Default (affinity): an (N,) float32 affinity, ~1 on slices like the site's own; the
    logits are the raw ones divided by the temperature fit on the site's validation split. With
    mean aggregation the logits are still calibrated and no affinity is sent."""
    root, cfg, node = fed
    ids = [f"Case0{c}/{z}" for c in range(3) for z in range(0, 12, 3)]
    reply = send(query_request(cfg, ids, ["enc2"], "float32"), QUERY_PROXY, node)
    assert not reply.has_error(), reply.error
    aff = reply.content["logits"]["affinity"].numpy()
    assert aff.shape == (len(ids),) and aff.dtype == np.float32
    assert np.isfinite(aff).all() and 0.3 < np.median(aff) < 5.0
    stats = reply.content["stats"]
    assert stats["reply_bytes"] == sum(a.numpy().nbytes for rec in ("logits", "features")
                                       for a in reply.content[rec].values())
    t = stats["temperature"]
    assert 0.25 <= t <= 8.0
    raw_cfg = replace(cfg, reply=replace(cfg.reply, calibrate=False),
                      aggregation=replace(cfg.aggregation, method="mean"))
    raw = send(query_request(raw_cfg, ids, [], "float32"), QUERY_PROXY, node)
    assert "affinity" not in raw.content["logits"] and raw.content["stats"]["temperature"] == 1.0
    raw_logits = raw.content["logits"]["logits"].numpy()
    got = reply.content["logits"]["logits"].numpy()
    assert np.allclose(got, raw_logits / t, atol=1e-4)
    mean_cfg = replace(cfg, aggregation=replace(cfg.aggregation, method="mean"))
    calibrated = send(query_request(mean_cfg, ids, [], "float32"), QUERY_PROXY, node)
    assert not calibrated.has_error(), calibrated.error
    assert "affinity" not in calibrated.content["logits"]
    assert np.allclose(calibrated.content["logits"]["logits"].numpy(), got, atol=1e-4)


def test_evaluation_against_known_models(fed, trained):
    root, cfg, node = fed
    # 1. an all-zero student predicts background everywhere: Dice 0, HD95 = volume diagonal
    student = FeatureNet(cfg.model.student)
    zero = {k: torch.zeros_like(v) for k, v in student.net.state_dict().items()}
    reply = send(evaluate_request(cfg, zero), EVALUATE_STUDENT, node)
    assert not reply.has_error(), reply.error
    m = reply.content["metrics"]
    assert m["n_cases"] == 2 and m["dice_mean"] == 0.0 and m["dice_max"] == 0.0
    assert m["hd95_min"] > 64 * 2.0  # at least the in-plane extent in mm
    # 2. a random student: the site's figures equal a direct evaluation of the same weights
    torch.manual_seed(3)
    student = FeatureNet(cfg.model.student)
    reply = send(evaluate_request(cfg, student.net.state_dict()), EVALUATE_STUDENT, node)
    direct = evaluate_cases(student, load_private(cfg, resolve_node(node, {})).test)
    m = reply.content["metrics"]
    assert m["dice_mean"] == pytest.approx(direct["dice"]["mean"], abs=1e-6)
    assert m["hd95_median"] == pytest.approx(direct["hd95"]["median"], abs=1e-5)
    assert not reply.content.array_records


def test_malformed_messages_get_error_replies_and_the_node_keeps_serving(fed, trained):
    root, cfg, node = fed
    good = query_request(cfg, ["Case00/1"], ["enc2"], "float16")
    cases = []
    cases.append((RecordDict({}), QUERY_PROXY, "missing record 'run'"))
    c = query_request(cfg, ["Case00/1"], ["enc2"]); c["run"]["config"] = "train: [1"
    cases.append((c, QUERY_PROXY, "run.config: not valid YAML"))
    c = query_request(cfg, ["Case00/1"], ["enc2"]); c["run"]["config"] = "train: {epochs: -1}"
    cases.append((c, QUERY_PROXY, "train.epochs: expected a value >= 1"))
    c = query_request(cfg, ["Case00/1"], ["enc2"]); del c["query"]["slice_ids"]
    cases.append((c, QUERY_PROXY, "missing field query.slice_ids"))
    cases.append((query_request(cfg, ["Case99/1"], ["enc2"]), QUERY_PROXY,
                  "query.slice_ids: 'Case99/1' is not a slice"))
    cases.append((query_request(cfg, ["Case00/999"], ["enc2"]), QUERY_PROXY, "'Case00/999'"))
    cases.append((query_request(cfg, ["Case00/1"], ["enc2"], "int4"), QUERY_PROXY,
                  "query.precision: expected one of"))
    cases.append((query_request(cfg, ["Case00/1"], ["enc9"]), QUERY_PROXY,
                  "query.features: 'enc9' is not returned"))
    c = query_request(cfg, ["Case00/1"], ["enc2"]); c["query"]["batch_size"] = "big"
    cases.append((c, QUERY_PROXY, "query.batch_size: expected an integer"))
    student = FeatureNet(cfg.model.student).net.state_dict()
    wrong = dict(student); key = next(iter(wrong)); wrong[key] = torch.zeros(3, 3)
    cases.append((evaluate_request(cfg, wrong), EVALUATE_STUDENT, f"student.{key}: shape (3, 3)"))
    nan = {k: v.clone() for k, v in student.items()}; nan[key].fill_(float("nan"))
    cases.append((evaluate_request(cfg, nan), EVALUATE_STUDENT, f"student.{key}: NaN/inf"))
    c = evaluate_request(cfg, student); c["student"] = ArrayRecord({})
    cases.append((c, EVALUATE_STUDENT, "student: weights do not match"))
    for content, mtype, needle in cases:
        reply = send(content, mtype, node)
        assert reply.has_error(), needle
        assert reply.error.reason.startswith("site SiteA: ") and needle in reply.error.reason, \
            (needle, reply.error.reason)
        assert reply.error.code in (ERR_BAD_MESSAGE, ERR_CONFIG)
        ok = send(good, QUERY_PROXY, node)  # the node answers the next message normally
        assert not ok.has_error()


def test_query_before_training_and_bad_node_config(fed, tmp_path):
    root, cfg, node = fed
    fresh = {**node, "state-dir": str(tmp_path / "never-trained")}
    reply = send(query_request(cfg, ["Case00/1"], ["enc2"]), QUERY_PROXY, fresh)
    assert reply.has_error() and "send train.teacher first" in reply.error.reason
    reply = send(train_request(cfg), TRAIN_TEACHER, {"site": "X"})
    assert reply.has_error() and reply.error.code == ERR_CONFIG
    assert "needs data-path" in reply.error.reason
    reply = send(train_request(cfg), TRAIN_TEACHER, {**node, "data-path": str(root / "nowhere")})
    assert reply.has_error() and reply.error.code == ERR_DATA and "nowhere" in reply.error.reason


def test_corrupt_private_file_is_an_error_reply_naming_site_and_file(fed, tmp_path):
    root, cfg, node = fed
    site = tmp_path / "Broken"
    shutil.copytree(root / "SiteB", site)
    raw = (site / "Case04.nii.gz").read_bytes()
    (site / "Case04.nii.gz").write_bytes(raw[: len(raw) // 3])
    local = {"data-path": str(site), "proxy-path": str(root / "PROXY"),
             "state-dir": str(tmp_path / "state")}
    reply = send(train_request(cfg), TRAIN_TEACHER, local)
    assert reply.has_error() and reply.error.code == ERR_DATA
    assert reply.error.reason.startswith("site Broken: ")
    assert "Case04.nii.gz: unreadable or truncated" in reply.error.reason


def test_simulation_partition_maps_to_a_synthetic_site(fed, tmp_path):
    root, _, _ = fed
    n = resolve_node({"partition-id": 1, "num-partitions": 2},
                     {"data-root": str(root), "state-root": str(tmp_path)})
    assert n.site == "SiteB" and n.proxy_paths == (root / "PROXY",) and n.state_dir == tmp_path / "SiteB"
    with pytest.raises(ConfigError, match="partition-id: 2 but .* has 2 site folders"):
        resolve_node({"partition-id": 2}, {"data-root": str(root)})


def test_audit_no_reply_array_is_shaped_like_private_data(fed, trained):
    """Walk every array of every reply kind: each must have the number of requested proxy
    slices as its leading dimension (train and evaluate replies carry no arrays at all)."""
    from common.codec import stream_shape
    from common.config import with_overrides

    root, cfg, node = fed
    proxy = load_proxy_cases(cfg, resolve_node(node, {}))
    all_ids = proxy_slice_ids(proxy)
    replies = [(send(train_request(cfg), TRAIN_TEACHER, node), None),
               (send(evaluate_request(cfg, FeatureNet(cfg.model.student).net.state_dict()),
                     EVALUATE_STUDENT, node), None)]
    compact = with_overrides(cfg, ["reply.output=foreground", "reply.features=pooled"])
    for n, precision, c in ((1, "float32", cfg), (7, "int8", cfg), (len(all_ids), "float16", cfg),
                            (5, "float16", compact)):
        ids = all_ids[:n]
        replies.append((send(query_request(c, ids, ["enc1", "enc2", "bottleneck", "dec2"],
                                           precision, 3), QUERY_PROXY, node), n))
    private_shapes = {c.image.shape for c in load_private(cfg, resolve_node(node, {})).test}
    for reply, n in replies:
        assert not reply.has_error(), reply.error
        arrays = [(name, key, arr) for name, rec in reply.content.array_records.items()
                  for key, arr in rec.items()]
        if n is None:
            assert arrays == []
        for name, key, arr in arrays:
            shape = arr.shape
            if arr.dtype == "uint8":   # a coded stream: what it decodes to is checked
                shape = stream_shape(arr.numpy())
            assert shape[0] == n, (name, key, shape)
            assert tuple(shape) not in private_shapes


def test_manifest_node_must_name_a_listed_site(fed, tmp_path):
    root, cfg, node = fed
    man = tmp_path / "cases.csv"
    man.write_text("site,image,label\n" + "\n".join(
        f"{s},{root}/{s}/Case0{i}.nii.gz,{root}/{s}/Case0{i}_segmentation.nii.gz"
        for s in ("SiteA", "SiteB") for i in range(5)))
    local = {"data-path": str(man), "data-layout": "manifest", "site": "SiteC",
             "proxy-path": str(root / "PROXY"), "state-dir": str(tmp_path / "s")}
    reply = send(train_request(cfg), TRAIN_TEACHER, local)
    assert reply.has_error() and reply.error.code == ERR_CONFIG
    assert "'SiteC' is not in" in reply.error.reason and "SiteA, SiteB" in reply.error.reason


def test_fedprox_proximal_term_keeps_local_weights_near_the_global_model(fed):
    root, cfg, node_config = fed
    cfg = load_config(None, ["data.size=[64,64]", "data.spacing=[2.0,2.0]",
                             "model.student.channels=[4,8,16,32]", "model.student.num_res_units=0",
                             "federation.local_epochs=2"])
    node = resolve_node(node_config, {}, cfg)
    torch.manual_seed(0)
    start = FeatureNet(cfg.model.student).net.state_dict()
    n_slices = sum(c.num_slices for c in load_private(cfg, node).train)

    def drift(mu):
        state, metrics = train_student_local(cfg, node, start, 1, mu, log=lambda s: None)
        assert metrics["num-examples"] == n_slices and math.isfinite(metrics["loss"])
        return sum(float((state[k].float() - start[k].float()).norm()) for k in start)

    assert drift(100.0) < 0.5 * drift(0.0)


def test_gaussian_mechanism_on_the_proxy_reply(fed, trained):
    from common.config import with_overrides
    from common.privacy import epsilon

    root, cfg, node = fed
    ids = [f"Case01/{z}" for z in range(6)]
    clean, _ = decode_proxy_reply(send(query_request(cfg, ids, [], "float32"), QUERY_PROXY,
                                       node).content)
    assert "dp_epsilon" not in send(query_request(cfg, ids, [], "float32"), QUERY_PROXY,
                                    node).content["stats"]
    dp_cfg = with_overrides(cfg, ["privacy.noise_multiplier=0.5", "privacy.clip_norm=2.0"])
    r1, r2 = (send(query_request(dp_cfg, ids, [], "float32"), QUERY_PROXY, node) for _ in "ab")
    a, b = (decode_proxy_reply(r.content)[0] for r in (r1, r2))
    assert r1.content["stats"]["dp_epsilon"] == pytest.approx(epsilon(0.5, 6, 1e-5))
    assert r1.content["stats"]["dp_parts"] == 1
    assert not np.allclose(a, b)  # fresh noise on every release
    norms = np.sqrt((clean.reshape(6, -1) ** 2).sum(axis=1))
    clipped = clean * np.minimum(1.0, 2.0 / norms)[:, None, None, None]
    assert (a - clipped).std() == pytest.approx(0.5 * 2.0, rel=0.05)  # noise std = z * C


def test_adaptation_keeps_the_student_at_the_site_and_returns_metrics_only(fed, trained):
    """train.adapt of a student trained at another site (SiteB, 30 epochs; val Dice 0.44 at
    SiteA): SiteA's labels, its teacher and the proxy term lift its validation Dice by more than
    0.05 in 10 epochs at lr 1e-3 (measured 0.44 -> 0.52; from 15 or 25 SiteB epochs +0.04 and
    +0.06; a fine-tuning that cannot move, lr 1e-7, gains nothing), the adapted weights
    are kept in the node's state directory, where `fedkd predict --model` reads them, and the
    reply carries metrics only."""
    from client.student import adapted_dir
    from common.config import with_overrides
    from common.modelcard import load_model_dir, read_card
    from common.protocol import ADAPT_STUDENT, adapt_request

    root, cfg, node = fed
    elsewhere = resolve_node({**node, "data-path": str(root / "SiteB"),
                              "state-dir": node["state-dir"] + "_B"}, {}, cfg)
    torch.manual_seed(0)
    start = FeatureNet(cfg.model.student).net.state_dict()
    received, _ = train_student_local(with_overrides(cfg, [("federation.local_epochs", 30)]),
                                      elsewhere, start, 1, log=lambda s: None)
    short = with_overrides(cfg, [("adapt.epochs", 10), ("adapt.lr", 1e-3), ("adapt.patience", 5)])
    reply = send(adapt_request(short, received), ADAPT_STUDENT, node)
    assert not reply.has_error(), reply.error
    assert not reply.content.array_records and reply.content["info"]["site"] == "SiteA"
    m = reply.content["metrics"]
    assert m["val_dice_after"] > m["val_dice_before"] + 0.05, m
    assert m["n_cases"] == 2 and m["val_cases"] == 2 and 1 <= m["best_epoch"] <= 10
    assert m["steps"] > 0 and 0 < m["dice_mean_before"] < 1 and 0 < m["dice_mean_after"] < 1
    here = resolve_node(node, {}, cfg)
    kept = adapted_dir(here)
    assert kept == here.state_dir / "adapted_student"
    model, kept_cfg = load_model_dir(kept)
    assert kept_cfg.model.student == cfg.model.student and read_card(kept)["sites"] == ["SiteA"]
    direct = evaluate_cases(model, load_private(cfg, here).test)
    assert direct["dice"]["mean"] == pytest.approx(m["dice_mean_after"], abs=1e-6)
    assert any(not torch.equal(model.net.state_dict()[k], received[k]) for k in received)
    # a fine-tuning that cannot move gains nothing
    frozen = with_overrides(short, [("adapt.lr", 1e-7), ("adapt.epochs", 2)])
    m0 = send(adapt_request(frozen, received), ADAPT_STUDENT, node).content["metrics"]
    assert m0["val_dice_after"] == pytest.approx(m0["val_dice_before"], abs=0.01)
    # a student of another architecture is refused with the cause, and the node keeps serving
    other = FeatureNet(replace(cfg.model.student, channels=[8, 16, 32, 64])).net.state_dict()
    bad = send(adapt_request(cfg, other), ADAPT_STUDENT, node)
    assert bad.has_error() and "student." in bad.error.reason and "shape" in bad.error.reason


def test_consensus_refines_a_copy_of_the_teacher_toward_the_consensus(fed, trained):
    """train.consensus whose consensus is the proxy set's true masks: the refined copy's Dice
    against those masks rises above the teacher's by more than 0.05 (measured 0.47 -> 0.73);
    the same masks sent in another slice order (a refinement that misread the order) give a
    copy 0.05 below that (measured 0.26). The teacher checkpoint is unchanged, a query naming the copy answers with it, a
    repeated message reuses it, and an unknown copy or a malformed stream is refused with the
    cause while the node keeps serving."""
    from common.config import with_overrides
    from common.data import load_proxy
    from common.protocol import (CONSENSUS, TRAIN_CONSENSUS, consensus_id, consensus_request,
                                 encode_consensus)

    root, cfg, node = fed
    here = resolve_node(node, {}, cfg)
    cases = load_proxy(replace(cfg.data, root=str(root)), with_labels=True)
    ids = proxy_slice_ids(cases)
    truth = np.stack([cases[i.rpartition("/")[0]].label[int(i.rpartition("/")[2])]
                      for i in ids]).astype(np.float32)

    def proxy_dice(teacher: str = "") -> float:
        reply = send(query_request(cfg, ids, [], "float32", teacher=teacher), QUERY_PROXY, node)
        assert not reply.has_error(), reply.error
        pred = decode_proxy_reply(reply.content)[0].argmax(axis=1)
        return 2 * float((pred * truth).sum()) / float(pred.sum() + truth.sum())

    before = only_teacher(here).read_bytes()
    stream = encode_consensus(truth[:, None], cfg.reply)
    reply = send(consensus_request(cfg, ids, stream), TRAIN_CONSENSUS, node)
    assert not reply.has_error(), reply.error
    assert not reply.content.array_records and reply.content["info"]["site"] == "SiteA"
    m = reply.content["metrics"]
    assert m["reused"] == 0 and 1 <= m["best_epoch"] <= cfg.consensus.epochs and m["steps"] > 0
    assert m["val_dice_before"] == pytest.approx(trained[0].content["metrics"]["val_dice"])
    refined = consensus_id(stream, cfg)
    assert (here.state_dir / "consensus" / f"{refined}.pt").is_file()
    assert only_teacher(here).read_bytes() == before
    own, copy = proxy_dice(), proxy_dice(refined)
    assert copy > own + 0.05, (own, copy)
    shuffled = encode_consensus(np.roll(truth, len(ids) // 2, axis=0)[:, None], cfg.reply)
    send(consensus_request(cfg, ids, shuffled), TRAIN_CONSENSUS, node)
    assert proxy_dice(consensus_id(shuffled, cfg)) < copy - 0.05
    again = send(consensus_request(cfg, ids, stream), TRAIN_CONSENSUS, node)
    assert again.content["metrics"]["reused"] == 1
    # another refinement setting is another copy; the number of rounds is not a setting of it
    assert consensus_id(stream, with_overrides(cfg, ["consensus.epochs=2"])) != refined
    assert consensus_id(stream, with_overrides(cfg, ["consensus.rounds=2"])) == refined
    # refused with the cause
    unknown = send(query_request(cfg, ids, [], "float32", teacher="c0123"), QUERY_PROXY, node)
    assert unknown.has_error() and "send train.consensus first" in unknown.error.reason
    bad = consensus_request(cfg, ids, stream[:-40])
    reply = send(bad, TRAIN_CONSENSUS, node)
    assert reply.has_error() and reply.error.code == ERR_BAD_MESSAGE
    assert "consensus:" in reply.error.reason
    short = consensus_request(cfg, ids[:-1], stream)
    reply = send(short, TRAIN_CONSENSUS, node)
    assert reply.has_error() and "consensus: stream of shape" in reply.error.reason
    assert "query.slice_ids: empty" in send(consensus_request(cfg, [], stream), TRAIN_CONSENSUS,
                                            node).error.reason
    del short[CONSENSUS]
    assert "missing record 'consensus'" in send(short, TRAIN_CONSENSUS, node).error.reason
    assert not send(query_request(cfg, ids[:2], [], "float32"), QUERY_PROXY, node).has_error()


def test_the_node_keeps_a_record_of_every_reply_it_sent(fed, trained, tmp_path):
    """STATE_DIR/outbox.jsonl: one line per reply, error replies included, with every array's
    name, shape, dtype and bytes and every metric's value, so that a hospital can see at the
    hospital what its node sent (never array contents)."""
    root, cfg, node = fed
    local = {**node, "state-dir": str(tmp_path / "state")}
    shutil.copytree(node["state-dir"], tmp_path / "state",   # the trained teacher, not retrained
                    ignore=shutil.ignore_patterns("outbox.jsonl"))
    proxy = load_proxy_cases(cfg, resolve_node(local, {}))
    ids = proxy_slice_ids(proxy)[:5]
    replies = [send(train_request(cfg), TRAIN_TEACHER, local),
               send(query_request(cfg, ids, ["enc1"], "float16", 3), QUERY_PROXY, local),
               send(query_request(cfg, ["NOPE/Case99/0"], [], "float16", 3), QUERY_PROXY, local)]
    lines = [json.loads(x) for x in (tmp_path / "state" / "outbox.jsonl").read_text().splitlines()]
    assert [r["message_type"] for r in lines] == [TRAIN_TEACHER, QUERY_PROXY, QUERY_PROXY]
    assert not replies[0].has_error() and not replies[1].has_error() and replies[2].has_error()
    assert lines[0]["records"]["metrics"]["val_dice"] == replies[0].content["metrics"]["val_dice"]
    assert lines[0]["arrays"] == [] and lines[0]["site"] == "SiteA"
    sent = {(a["record"], a["name"]): a for a in lines[1]["arrays"]}
    for rec, arrays in replies[1].content.array_records.items():
        for key, arr in arrays.items():
            assert sent.pop((rec, key))["shape"] == list(arr.shape)
    assert sent == {}
    assert lines[1]["bytes"] == sum(len(a.data) for r in replies[1].content.array_records.values()
                                    for a in r.values())
    assert lines[1]["records"]["stats"]["n_slices"] == 5
    assert lines[2]["error"] == replies[2].error.reason and "NOPE" in lines[2]["error"]


def test_a_teacher_is_not_reused_once_the_sites_files_change(fed, tmp_path):
    """The teacher's key holds the content of the site's files: the same case ids with one
    image rewritten (e.g. regenerated data) give another key, so the stale checkpoint is not
    reused."""
    from client.node import site_train_config
    from client.teacher import teacher_key

    root, cfg, node = fed
    site = tmp_path / "SiteA"
    shutil.copytree(root / "SiteA", site)
    local = {**node, "data-path": str(site)}
    n = resolve_node(local, {})
    first = teacher_key(cfg, n, site_train_config(cfg, n), load_private(cfg, n))
    assert teacher_key(cfg, n, site_train_config(cfg, n), load_private(cfg, n)) == first
    img = sorted(site.glob("Case*[0-9].nii.gz"))[0]
    data = bytearray(img.read_bytes())
    data[-1] ^= 1
    img.write_bytes(bytes(data))
    assert teacher_key(cfg, n, site_train_config(cfg, n), load_private(cfg, n)) != first


def test_a_teacher_with_a_public_start_is_not_reused_once_the_public_set_changes(fed, tmp_path):
    """With train.public_init_epochs the key also holds the content of the public sets the
    teacher starts on; without it, a changed public set leaves the key alone."""
    from client.node import site_train_config
    from client.teacher import teacher_key

    root, cfg, node = fed
    proxy = tmp_path / "PROXY"
    shutil.copytree(root / "PROXY", proxy)
    n = resolve_node({**node, "proxy-path": str(proxy)}, {})
    start = replace(cfg, train=replace(cfg.train, public_init_epochs=2))

    def key(c):
        return teacher_key(c, n, site_train_config(c, n), load_private(c, n))

    plain, started = key(cfg), key(start)
    assert started != plain
    img = sorted(proxy.glob("Case*[0-9].nii.gz"))[0]
    data = bytearray(img.read_bytes())
    data[-1] ^= 1
    img.write_bytes(bytes(data))
    assert key(cfg) == plain and key(start) != started


def only_teacher(node) -> Path:
    """The one teacher checkpoint in ``node``'s state folder."""
    (path,) = node.state_dir.glob("teacher-*.pt")
    return path


def fedavg_train_message(cfg):
    """Flower's FedAvg ``train`` request: the student's weights and the run config."""
    from common.protocol import FLWR_ARRAYS, FLWR_CONFIG, RUN_CONFIG_KEY, config_to_text
    from flwr.app import ConfigRecord

    net = FeatureNet(cfg.model.student).net
    return RecordDict({FLWR_ARRAYS: ArrayRecord(net.state_dict()),
                       FLWR_CONFIG: ConfigRecord({"server-round": 1,
                                                  RUN_CONFIG_KEY: config_to_text(cfg)})})


def test_a_hospital_nodes_kd_policy_refuses_weight_sharing_and_test_probing(fed, trained,
                                                                            tmp_path):
    """A node with data-path (a hospital) defaults to the kd policy: Flower's weight-sharing
    ``train`` is refused; the test split answers 2 evaluations a run, then refuses; per-case
    statistics of a split under 5 cases are not sent; error replies carry no local path. The
    same node with policy open answers all of it."""
    from common.protocol import ERR_POLICY

    root, cfg, node = fed
    kd = {k: v for k, v in node.items() if k != "policy"}
    kd["state-dir"] = str(tmp_path / "kd")
    shutil.copytree(node["state-dir"], tmp_path / "kd",
                    ignore=shutil.ignore_patterns("outbox.jsonl", "policy.json"))
    refused = send(fedavg_train_message(cfg), "train", kd)
    assert refused.has_error() and refused.error.code == ERR_POLICY
    assert "allow-weights false" in refused.error.reason
    assert not send(fedavg_train_message(cfg), "train", {**kd, "policy": "open"}).has_error()
    assert not send(fedavg_train_message(cfg), "train", {**kd, "allow-weights": True}).has_error()
    student = FeatureNet(cfg.model.student).net.state_dict()
    replies = [send(evaluate_request(cfg, student), EVALUATE_STUDENT, kd) for _ in range(3)]
    assert [r.has_error() for r in replies] == [False, False, True]
    assert replies[2].error.code == ERR_POLICY and "test-evaluations 2" in replies[2].error.reason
    m = replies[0].content["metrics"]
    n = int(m["n_cases"])
    assert n < 5 and "dice_mean" in m and "hd95_mean" in m
    assert not any(k in m for k in ("dice_min", "dice_max", "dice_std", "dice_median", "hd95_max"))
    val = send(evaluate_request(cfg, student, split="val"), EVALUATE_STUDENT, kd)
    assert not val.has_error()   # validation figures (selection) are not limited
    other_run = send(evaluate_request(cfg, student), EVALUATE_STUDENT, kd, run_id=2)
    assert not other_run.has_error()
    # the open policy: the per-case statistics come too
    m_open = send(evaluate_request(cfg, student), EVALUATE_STUDENT, node).content["metrics"]
    assert "dice_min" in m_open and m_open["dice_mean"] == m["dice_mean"]
    # error replies: the file's name, not the hospital's folders
    broken = {**kd, "data-path": str(tmp_path / "nowhere" / "SiteA")}
    err = send(train_request(cfg), TRAIN_TEACHER, broken)
    assert err.has_error() and str(tmp_path) not in err.error.reason
    assert ".../SiteA" in err.error.reason
    err_open = send(train_request(cfg), TRAIN_TEACHER, {**broken, "policy": "open"})
    assert str(tmp_path / "nowhere") in err_open.error.reason
    bad = send(train_request(cfg), TRAIN_TEACHER, {**kd, "test-evaluations": -1})
    assert bad.error.code == ERR_CONFIG and "node config test-evaluations" in bad.error.reason


@pytest.mark.parametrize("disguise", ["raw", "reshaped-float16", "int8", "coded-4bit",
                                      "among-real-replies"])
def test_the_egress_check_stops_a_reply_that_carries_private_slices(fed, trained, tmp_path,
                                                                     monkeypatch, disguise):
    """A node whose query code was altered to slip preprocessed private slices into its reply,
    plain or disguised (cast, reshaped, int8 with per-slice scales, a 4-bit coded stream, or
    hidden as extra rows of the real foreground map), sends an error instead, and its outbox
    records the refusal. Public proxy slices in a reply are not flagged (no false alarm on
    images as such)."""
    import client.teacher as teacher_ops
    from common.codec import encode_stream, quantize
    from common.protocol import ERR_POLICY, quantize_int8

    root, cfg, node = fed
    local = {**node, "state-dir": str(tmp_path / "s")}
    shutil.copytree(node["state-dir"], tmp_path / "s", ignore=shutil.ignore_patterns("*.jsonl"))
    n = resolve_node(local, {})
    data = load_private(cfg, n)
    private = np.stack([c.image[z] for c in data.test for z in range(c.num_slices)
                        if c.image[z].std() > 0.05][:3])[:, None]        # (3, 1, 64, 64)
    honest = teacher_ops.answer_proxy_query

    def leak(*args, **kwargs):
        logits, feats, stats = honest(*args, **kwargs)
        if disguise == "raw":
            logits["extra"] = private.astype(np.float32)
        elif disguise == "reshaped-float16":
            feats["enc1"] = private.reshape(-1, 64).astype(np.float16)
        elif disguise == "int8":
            q, scale = quantize_int8(private - private.min())
            logits["extra"], logits["extra.scale"] = q, scale
        elif disguise == "coded-4bit":
            codes, scale = quantize(private, 4, fixed_range=False)
            logits["extra"] = encode_stream(codes, scale, 4, "zlib", False)
        else:   # three private slices appended to the honest (N, 2, H, W) logits
            logits["logits"] = np.concatenate(
                [logits["logits"], np.repeat(private, 2, axis=1).astype(logits["logits"].dtype)])
        return logits, feats, stats

    ids = proxy_slice_ids(load_proxy_cases(cfg, n))[:4]
    monkeypatch.setattr(teacher_ops, "answer_proxy_query", leak)
    reply = send(query_request(cfg, ids, ["enc1"], "float16", 2), QUERY_PROXY, local)
    assert reply.has_error() and reply.error.code == ERR_POLICY
    assert "egress check" in reply.error.reason and "carries a private image" in reply.error.reason
    outbox = [json.loads(x) for x in (tmp_path / "s" / "outbox.jsonl").read_text().splitlines()]
    assert outbox[-1]["error"] == reply.error.reason and outbox[-1]["arrays"] == []
    # the same reply with public slices in the leak's place goes out
    proxy = load_proxy_cases(cfg, n)
    public = np.stack([c.image[z] for c in proxy.values() for z in range(c.num_slices)
                       if c.image[z].std() > 0.05][:3])[:, None]
    private[:] = public
    assert not send(query_request(cfg, ids, ["enc1"], "float16", 2), QUERY_PROXY, local).has_error()
