"""``fedkd bench NAME``: the figures a user would pick this system on, measured in one run.

* ``comm``      bytes each site moves (up and down) and the Dice it buys: KD with every reply
                encoding (float32 / float16 / int8 logits and features; compact foreground
                streams of 8 / 4 / 2 bits, zlib or lzma, downsampled, with pooled features) vs
                FedAvg of the student and of the teacher, and the bytes per site to reach the
                FedAvg student's Dice. The federation runs in this process over
                :class:`simulations.local_grid.LocalGrid` (the same ServerApp workflow and
                ClientApp as a deployment); with a real config it runs on real sites.
* ``compress``  teacher vs student: parameters, MACs, CPU latency per slice and per volume
                (eager PyTorch, a torch.export program, ONNX Runtime when installed), peak memory of a
                volume's inference (measured in a fresh process).
* ``scale``     server decoding + aggregation time and peak memory (tracemalloc) for
                ``bench.scale_sites`` simulated teacher replies of realistic size, in today's
                float16 encoding and the compact one, and the Simulation Engine's wall time for
                ``bench.engine_sites`` sites.

Each writes ``RUN_DIR/bench_NAME.json`` and ``RUN_DIR/bench_NAME.png`` and prints a table.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.config import RunConfig, to_plain, with_overrides
from common.plotting import pyplot, save
from common.models import FeatureNet, build_teacher, input_channels
from common.profile import latency_ms, profile_network
from server.export import export_program

# reply encodings: today's logits + full feature maps, and the compact streams (common.codec)
FULL = [("reply.output", "logits"), ("reply.features", "full"), ("distill.feature_loss", "mse")]
COMPACT = [("reply.output", "foreground"), ("reply.features", "pooled"),
           ("distill.feature_loss", "attention")]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _finish(cfg: RunConfig, name: str, result: dict, table: str, fig) -> dict:
    root = Path(cfg.output.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    result = {"bench": name, "machine": _machine(), "config": to_plain(cfg), **result}
    (root / f"bench_{name}.json").write_text(json.dumps(result, indent=1))
    save(fig, root / f"bench_{name}.png")
    print(table)
    print(f"[bench] {name}: {root / f'bench_{name}.json'}, {root / f'bench_{name}.png'}")
    return result


def _machine() -> dict:
    from simulations.experiment import machine

    return machine()


# --------------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------------
_PEAK = """
import json, os, sys, threading, time, torch
from common.config import ModelSpec
from common.models import FeatureNet
spec, ch, size, depth, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
net = FeatureNet(ModelSpec(**spec), ch).export_network().eval()
x = torch.rand(depth, ch, *size)
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * page
base, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
t = threading.Thread(target=sample)
t.start()
with torch.inference_mode():
    for _ in range(3):
        for b in x.split(32):
            net(b)
done.set()
t.join()
print(json.dumps(max(0, peak[0] - base) / 1e6))
"""


def peak_inference_mb(model: FeatureNet, size: tuple[int, int], depth: int, threads: int) -> float:
    """Extra peak resident memory (MB) of a volume's inference over the memory after loading the
    network and the volume, sampled every 0.5 ms from /proc/self/statm in a fresh interpreter
    (Linux)."""
    from dataclasses import asdict

    arg = json.dumps([asdict(model.spec), model.in_channels, list(size), depth, threads])
    out = subprocess.run([sys.executable, "-c", _PEAK, arg], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _onnx_runner(net: torch.nn.Module, in_ch: int, size: tuple[int, int], threads: int,
                 path: Path):
    """An ONNX Runtime session's run function, or the reason there is none."""
    from server.export import export_onnx

    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime not installed"
    try:
        export_onnx(net, in_ch, size, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # the exporter's own dependencies may be missing
        return None, f"export failed: {type(exc).__name__}: {exc}"
    return (lambda x: sess.run(None, {"image": x})), ""


def bench_compress(cfg: RunConfig) -> dict:
    from common.models import build_student

    b, threads, size = cfg.bench, cfg.runtime.threads, tuple(cfg.bench.image_size)
    ch = input_channels(cfg.data)
    models = {"teacher": build_teacher(cfg.model.teacher, ch),
              "student": build_student(cfg.model.student, cfg.model.teacher, ch,
                                       cfg.model.max_student_fraction)}
    out: dict = {"threads": threads, "size": list(size), "volume_slices": b.volume_slices,
                 "models": {}}
    Path(cfg.output.run_dir).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    for name, model in models.items():
        p = profile_network(model, size, b.volume_slices, threads, b.repeats)
        net = model.export_network().eval()
        export_program(net, ch, size, Path(cfg.output.run_dir) / f"bench_{name}.pt2")
        exported = torch.export.load(str(Path(cfg.output.run_dir) / f"bench_{name}.pt2")).module()

        def run_ts(x, m=exported):
            with torch.inference_mode():
                m(x)

        ts = latency_ms(run_ts, ch, size, b.volume_slices, b.repeats)
        ort_run, why = _onnx_runner(net, ch, size, threads,
                                    Path(cfg.output.run_dir) / f"bench_{name}.onnx")
        ort = (latency_ms(ort_run, ch, size, b.volume_slices, b.repeats,
                          to_input=lambda t: t.numpy()) if ort_run else None)
        out["models"][name] = {
            **p, "export_slice_ms": ts[0], "export_volume_ms": ts[1],
            "onnxruntime_slice_ms": ort[0] if ort else None,
            "onnxruntime_volume_ms": ort[1] if ort else None, "onnxruntime_note": why,
            "peak_mb": peak_inference_mb(model, size, b.volume_slices, threads)}
        print(f"[bench] compress: {name} done", flush=True)
    t, s = out["models"]["teacher"], out["models"]["student"]
    out["ratios"] = {"parameters": t["parameters"] / s["parameters"],
                     "macs": t["macs_per_slice"] / s["macs_per_slice"],
                     "slice_ms": t["slice_ms"] / s["slice_ms"],
                     "volume_ms": t["volume_ms"] / s["volume_ms"],
                     "peak_mb": t["peak_mb"] / max(s["peak_mb"], 1e-9),
                     "export_volume_ms": t["export_volume_ms"] / s["export_volume_ms"]}
    if s["onnxruntime_volume_ms"]:
        out["ratios"]["onnxruntime_volume_ms"] = (t["onnxruntime_volume_ms"]
                                                  / s["onnxruntime_volume_ms"])

    def ms(x):
        return "-" if x is None else f"{x:.1f}"

    rows = [[n, f"{m['parameters']:,}", f"{m['macs_per_slice'] / 1e6:.1f}", ms(m["slice_ms"]),
             ms(m["volume_ms"]), ms(m["export_slice_ms"]), ms(m["export_volume_ms"]),
             ms(m["onnxruntime_slice_ms"]), ms(m["onnxruntime_volume_ms"]), f"{m['peak_mb']:.0f}"]
            for n, m in out["models"].items()]
    r = out["ratios"]
    ort_ratio = r.get("onnxruntime_volume_ms")
    rows.append(["teacher / student", f"{r['parameters']:.1f}x", f"{r['macs']:.1f}x",
                 f"{r['slice_ms']:.1f}x", f"{r['volume_ms']:.1f}x", "",
                 f"{r['export_volume_ms']:.1f}x", "",
                 f"{ort_ratio:.1f}x" if ort_ratio else "", f"{r['peak_mb']:.1f}x"])
    table = _table(["model", "parameters", "MMACs/slice", "eager ms/slice",
                    f"eager ms/volume ({b.volume_slices})", "torch.export ms/slice",
                    "torch.export ms/volume", "ONNX RT ms/slice", "ONNX RT ms/volume",
                    "peak MB (volume)"], rows)
    if not s["onnxruntime_slice_ms"]:
        table += f"\n\nONNX Runtime: {s['onnxruntime_note']}."
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    kinds = [("eager", "volume_ms"), ("torch.export", "export_volume_ms"),
             ("ONNX Runtime", "onnxruntime_volume_ms")]
    for k, (label, key) in enumerate(kinds):
        vals = [out["models"][n][key] or 0 for n in ("teacher", "student")]
        ax.bar(np.arange(2) + 0.27 * k, vals, 0.27, label=label)
    ax.set_xticks(np.arange(2) + 0.27, ["teacher", "student"])
    ax.set_ylabel(f"ms per {b.volume_slices}-slice volume ({threads} threads)")
    ax.legend(fontsize=8)
    return _finish(cfg, "compress", out, table, fig)


# --------------------------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------------------------
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
    table = _table(["reply encoding", "sites", "decode + aggregation s", "time ratio",
                    "x float16 time", "peak MB", "memory ratio", "reply MB"],
                   [[a["encoding"], a["sites"], f"{a['seconds']:.1f}", f"{a['time_ratio']:.1f}x",
                     f"{a['time_vs_float16']:.2f}x", f"{a['peak_mb']:.0f}",
                     f"{a['memory_ratio']:.2f}x", f"{a['reply_mb']:.2f}"] for a in agg])
    table += "\n\n" + _table(["sites (Simulation Engine)", "wall s", "ratio", "student Dice"],
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
    return _finish(cfg, "scale", out, table, fig)


# --------------------------------------------------------------------------------------------
# comm
# --------------------------------------------------------------------------------------------
def _federate(cfg: RunConfig, log: Callable[[str], None]) -> dict:
    """One federation of ``data.sites`` in this process (LocalGrid), as a deployment runs it."""
    from client.app import app
    from common.data import discover_sites
    from server.workflow import run_federation
    from simulations.local_grid import LocalGrid

    sites = list(discover_sites(cfg.data))
    grid = LocalGrid(app, {i + 1: {"partition-id": i} for i in range(len(sites))},
                     {"data-root": cfg.data.root, "state-root": cfg.output.state_root})
    return run_federation(grid, cfg, log)


# (name, overrides) of every reply encoding bench comm compares (common.codec); "+ features"
# sends the student's feature maps (full channels, or their channel RMS map when pooled)
ENCODINGS = [
    ("KD float32 + features", [*FULL, ("federation.precision", "float32")]),
    ("KD float16 + features", [*FULL, ("federation.precision", "float16")]),
    ("KD int8 + features", [*FULL, ("federation.precision", "int8")]),
    ("KD float16", [*FULL, ("federation.precision", "float16"), ("distill.w_feature", 0.0)]),
    ("KD 8-bit + pooled", [*COMPACT, ("reply.bits", 8)]),
    ("KD 4-bit + pooled", [*COMPACT, ("reply.bits", 4)]),
    ("KD 4-bit lzma + pooled", [*COMPACT, ("reply.bits", 4), ("reply.codec", "lzma")]),
    ("KD 4-bit /2 + pooled", [*COMPACT, ("reply.bits", 4), ("reply.downsample", 2)]),
    ("KD 2-bit + pooled", [*COMPACT, ("reply.bits", 2)]),
    ("KD 4-bit", [*COMPACT, ("reply.bits", 4), ("distill.w_feature", 0.0)]),
]


def bench_comm(cfg: RunConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Bytes each site moves and the Dice it buys: every reply encoding of KD (ENCODINGS, one
    query round each) vs FedAvg of the student and of the teacher (``bench.rounds`` rounds).

    A KD site sends its reply and receives the distilled student once; a FedAvg site sends and
    receives the model every round. Reported: bytes per site (up, down, total), final Dice
    (sites' test splits), and the bytes per site to reach the FedAvg student's final Dice: a
    method's total if its final Dice reaches it, else "not reached" (FedAvg's per-round figures
    are validation Dice, so its whole run counts)."""
    from simulations.simulate import ensure_data

    ensure_data(cfg)
    root = Path(cfg.output.run_dir) / "comm"
    b = cfg.bench
    common = [("output.state_root", str(root / "state"))]
    variants = list(ENCODINGS)
    variants += [("FedAvg student", [("federation.strategy", "fedavg"), ("federation.rounds", b.rounds)]),
                 ("FedAvg teacher", [("federation.strategy", "fedavg"), ("federation.rounds", b.rounds),
                                     ("model.student", to_plain(cfg)["model"]["teacher"]),
                                     ("model.max_student_fraction", 1.0)])]
    rows = []
    torch.set_num_threads(cfg.runtime.threads)
    for name, items in variants:
        run = with_overrides(cfg, [*common, *items, ("output.run_dir", str(root / name.replace(" ", "_").replace("/", "x")))],
                             f"bench comm {name}")
        t0 = time.perf_counter()
        report = _federate(run, log)
        last = report["state"]["rounds"][str(run.federation.rounds)]
        model_bytes = 4 * report["student_parameters"]
        if "weights" in last:
            w = last["weights"]
            rounds = len(w["history"])
            up = down = w["bytes_per_site_round"] * rounds
            encoding = "float32 weights"
        else:
            q = report["state"]["rounds"]["1"]["query"]
            up = float(np.mean([s["reply_bytes"] for s in q["sites"].values()]))
            down, rounds, encoding = model_bytes, 1, q["encoding"]
        rows.append({"method": name, "encoding": encoding, "up_bytes": up, "down_bytes": down,
                     "site_bytes": up + down, "rounds": rounds,
                     "sites": len(last["evaluate"]["sites"]),
                     "dice_final": last["evaluate"]["dice_mean"],
                     "seconds": time.perf_counter() - t0})
        print(f"[bench] comm: {name}: {(up + down) / 1e6:.3f} MB per site, Dice "
              f"{rows[-1]['dice_final']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    fedavg = next(r for r in rows if r["method"] == "FedAvg student")
    for r in rows:
        r["ratio_to_fedavg_student"] = r["site_bytes"] / fedavg["site_bytes"]
        r["reaches_fedavg"] = r["dice_final"] >= fedavg["dice_final"]
        r["bytes_to_fedavg_dice"] = r["site_bytes"] if r["reaches_fedavg"] else None
    out = {"fedavg_dice": fedavg["dice_final"], "rounds": b.rounds, "methods": rows}

    def mb(x):
        return "not reached" if x is None else f"{x / 1e6:.3f}"

    table = _table(["method", "encoding", "MB up per site", "MB down per site",
                    "MB per site", "x FedAvg student", "final Dice",
                    f"MB per site to FedAvg's Dice {fedavg['dice_final']:.3f}"],
                   [[r["method"], r["encoding"], f"{r['up_bytes'] / 1e6:.3f}",
                     f"{r['down_bytes'] / 1e6:.3f}", f"{r['site_bytes'] / 1e6:.3f}",
                     f"{r['ratio_to_fedavg_student']:.2f}x", f"{r['dice_final']:.3f}",
                     mb(r["bytes_to_fedavg_dice"])] for r in rows])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.plot([r["site_bytes"] / 1e6], [r["dice_final"]], "s" if "FedAvg" in r["method"] else "o",
                label=r["method"])
    ax.axhline(fedavg["dice_final"], color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("MB moved per site (up + down, whole run)")
    ax.set_ylabel("Dice (sites' test splits)")
    ax.legend(fontsize=6)
    return _finish(cfg, "comm", out, table, fig)


BENCHES = {"comm": bench_comm, "compress": bench_compress, "scale": bench_scale}


def run_bench(name: str, cfg: RunConfig) -> dict:
    return BENCHES[name](cfg)
