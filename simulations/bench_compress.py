"""``fedkd bench compress``: teacher vs student: parameters, MACs, CPU latency per slice and per
volume (eager PyTorch, a torch.export program, ONNX Runtime when installed), peak memory of a
volume's inference (measured in a fresh process)."""


from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig
from common.plotting import pyplot
from common.models import FeatureNet, build_teacher, input_channels
from common.profile import latency_ms, profile_network
from server.export import export_program
from simulations.bench_kit import finish, markdown_table


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
    table = markdown_table(["model", "parameters", "MMACs/slice", "eager ms/slice",
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
    return finish(cfg, "compress", out, table, fig)
