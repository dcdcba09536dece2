"""``fedkd bench scale``: server decoding + aggregation time and peak memory (tracemalloc) for
``bench.scale_sites`` simulated teacher replies of realistic size, in the float16 encoding and
the compact one, and the Simulation Engine's wall time for ``bench.engine_sites`` sites."""


from __future__ import annotations

import gc
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig, with_overrides
from common.plotting import pyplot
from common.models import build_teacher, input_channels
from simulations.bench_kit import COMPACT, FULL, finish, markdown_table


def feature_taps(cfg: RunConfig) -> dict[str, tuple[int, int]]:
    """{feature name: (channels, stride)} of the teacher's maps the student distils from."""
    teacher = build_teacher(cfg.model.teacher, input_channels(cfg.data))
    return {n: (t.channels, t.stride) for n, t in teacher.taps.items()
            if n in cfg.model.student.features}


def simulated_reply(cfg: RunConfig, slices: int, rng: np.random.Generator,
                    taps: dict[str, tuple[int, int]]):
    """One teacher reply of realistic size and shape, encoded by the site's own encoder
    (common.protocol.release_maps, ReplyEncoder) as ``cfg`` (reply section, federation.precision)
    puts it on the wire: gland-like logits (a soft disc on confident
    background per slice, plus noise) and random feature maps of the teacher's ``taps``.
    Returns (RecordDict content, feature names, (H, W))."""
    from flwr.app import Array, ArrayRecord, RecordDict

    from common.protocol import FEATURES, LOGITS, ReplyEncoder, release_maps

    h, w = cfg.bench.image_size
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    centre = rng.uniform(0.35, 0.65, (slices, 2)) * [h, w]
    radius = rng.uniform(0.0, 0.15, slices) * h
    dist = np.hypot(yy - centre[:, 0, None, None], xx - centre[:, 1, None, None])
    margin = (radius[:, None, None] - dist) * 0.8 + rng.normal(0, 0.3, (slices, h, w))
    logits = np.stack([-margin / 2, margin / 2], axis=1).astype(np.float32)
    feats = {n: rng.standard_normal((slices, c, h // st, w // st), dtype=np.float32)
             for n, (c, st) in taps.items()}
    encoder = ReplyEncoder(cfg.reply, cfg.federation.precision, slices, list(feats))
    encoder.add(slice(0, slices), *release_maps(torch.from_numpy(logits),
                                                [torch.from_numpy(f) for f in feats.values()],
                                                cfg.reply))
    lrec, frec = encoder.records()
    content = RecordDict({LOGITS: ArrayRecord({k: Array(v) for k, v in lrec.items()}),
                          FEATURES: ArrayRecord({k: Array(v) for k, v in frec.items()})})
    return content, list(feats), (h, w)


def aggregation_cost(cfg: RunConfig, sites: int, slices: int) -> dict:
    """What the server does with ``sites`` replies of ``slices`` proxy slices, encoded as ``cfg``
    says (:func:`simulated_reply`): decode and check each one (common.protocol.read_proxy_reply)
    and fold it into the server's aggregator (its running sums memory-mapped in a temporary
    folder, as the server's are; ``auto``: every candidate, then the choice by a
    Dice against simulated proxy masks). Seconds (decoding and aggregation; the replies are
    made before the clock starts, after one untimed warm-up decode) and the tracemalloc peak (MB)
    of the server's part: each reply held, decoded and folded in (making it is the site's work
    and is not counted; cyclic garbage is collected before each reply is measured)."""
    from server.aggregation import make_aggregator
    from common.metrics import dice_score
    from common.protocol import read_proxy_reply

    rng = np.random.default_rng(0)
    taps = feature_taps(cfg)
    spill = Path(tempfile.mkdtemp(prefix="bench_spill_"))   # as the server: sums on disk
    agg = make_aggregator(cfg.aggregation, spill)
    content, names, hw = simulated_reply(cfg, slices, rng, taps)   # warm-up: lazy imports
    read_proxy_reply(content, cfg, slices, hw, names)
    tracemalloc.start()
    seconds, reply_mb, peak = 0.0, 0.0, 0
    for k in range(sites):
        content, names, hw = simulated_reply(cfg, slices, rng, taps)
        gc.collect()   # np.load's header parser leaves reference cycles: garbage, not held
        reply_mb = sum(len(a.data) for rec in content.array_records.values()
                       for a in rec.values()) / 1e6
        peak = max(peak, tracemalloc.get_traced_memory()[0])   # the server holds the reply
        tracemalloc.reset_peak()   # making it is the site's work, not the server's
        t0 = time.perf_counter()
        probs, feats = read_proxy_reply(content, cfg, slices, hw, names)
        agg.add(f"site{k}", probs, 0.5 + 0.4 * rng.random(), feats)
        seconds += time.perf_counter() - t0
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        del content, probs, feats
    t0 = time.perf_counter()
    if cfg.aggregation.method == "auto":   # each candidate scored against the proxy's masks
        masks = rng.random((slices, *hw)) < 0.05
        agg.finalize(lambda probs: float(dice_score(probs.argmax(1) == 1, masks)))
    else:
        agg.finalize()
    seconds += time.perf_counter() - t0
    peak = max(peak, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    del agg
    shutil.rmtree(spill, ignore_errors=True)
    return {"sites": sites, "seconds": seconds, "peak_mb": peak / 1e6, "reply_mb": reply_mb}


def engine_wall_time(cfg: RunConfig, sites: int) -> dict:
    """Wall time of a whole ``fedkd simulate`` run of ``sites`` synthetic sites (teachers,
    query, distillation, evaluation; data generation excluded)."""
    from simulations.simulate import ensure_data, simulate

    root = Path(cfg.output.run_dir) / "engine"
    run = with_overrides(cfg, [
        ("synth.sites", sites), ("data.root", str(root / f"data_{sites}")), ("data.sites", []),
        ("output.run_dir", str(root / f"run_{sites}")),
        ("output.state_root", str(root / f"state_{sites}")), ("experiment.unseen_sites", [])],
        "bench scale")
    ensure_data(run)  # data generation is not part of the timed run
    t0 = time.perf_counter()
    report = simulate(run)
    return {"sites": sites, "seconds": time.perf_counter() - t0,
            "dice_mean": report["state"]["rounds"]["1"]["evaluate"]["dice_mean"]}


SCALE_ENCODINGS = [("logits float16 + features", [*FULL, ("federation.precision", "float16")]),
                   ("foreground 4-bit + pooled", [*COMPACT, ("reply.bits", 4)])]


def bench_scale(cfg: RunConfig) -> dict:
    b = cfg.bench
    agg = []
    for label, items in SCALE_ENCODINGS:
        enc = with_overrides(cfg, items, f"bench scale {label}")
        for k in b.scale_sites:
            agg.append({"encoding": label, **aggregation_cost(enc, k, b.proxy_slices)})
            print(f"[bench] scale: {label}: {k} sites decoded and aggregated in "
                  f"{agg[-1]['seconds']:.1f} s, peak {agg[-1]['peak_mb']:.0f} MB", flush=True)
    engine = [engine_wall_time(cfg, k) for k in b.engine_sites]
    for a in agg:   # against the fewest sites of the same encoding
        base = next(x for x in agg if x["encoding"] == a["encoding"])
        a["memory_ratio"] = a["peak_mb"] / base["peak_mb"]
        a["time_ratio"] = a["seconds"] / base["seconds"]
        today = next(x for x in agg if x["sites"] == a["sites"])
        a["time_vs_float16"] = a["seconds"] / today["seconds"]
    for e in engine:
        e["time_ratio"] = e["seconds"] / engine[0]["seconds"]
    out = {"aggregation": agg, "engine": engine, "proxy_slices": b.proxy_slices,
           "memory_within_1_5x": all(a["memory_ratio"] <= 1.5 for a in agg)}
    table = markdown_table(["reply encoding", "sites", "decode + aggregation s", "time ratio",
                    "x float16 time", "peak MB", "memory ratio", "reply MB"],
                   [[a["encoding"], a["sites"], f"{a['seconds']:.1f}", f"{a['time_ratio']:.1f}x",
                     f"{a['time_vs_float16']:.2f}x", f"{a['peak_mb']:.0f}",
                     f"{a['memory_ratio']:.2f}x", f"{a['reply_mb']:.2f}"] for a in agg])
    table += "\n\n" + markdown_table(["sites (Simulation Engine)", "wall s", "ratio", "student Dice"],
                             [[e["sites"], f"{e['seconds']:.0f}", f"{e['time_ratio']:.1f}x",
                               f"{e['dice_mean']:.3f}"] for e in engine])
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ax2 = axes[0].twinx()
    for i, (label, _) in enumerate(SCALE_ENCODINGS):
        sub = [a for a in agg if a["encoding"] == label]
        x = [a["sites"] for a in sub]
        axes[0].plot(x, [a["seconds"] for a in sub], "o-", color=f"C{2 * i}", label=label)
        ax2.plot(x, [a["peak_mb"] for a in sub], "s--", color=f"C{2 * i + 1}")
    axes[0].legend(fontsize=6)
    axes[0].set_xlabel("sites (server aggregation)")
    axes[0].set_ylabel("seconds")
    ax2.set_ylabel("peak MB")
    ax2.set_ylim(0, max(a["peak_mb"] for a in agg) * 1.6)
    axes[1].plot([e["sites"] for e in engine], [e["seconds"] for e in engine], "o-")
    axes[1].set_xlabel("sites (Simulation Engine run)")
    axes[1].set_ylabel("wall seconds")
    return finish(cfg, "scale", out, table, fig)
