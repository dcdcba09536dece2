"""Size and speed of a network on this machine's CPU: parameters, MACs, latency.

MACs count the multiply-accumulates of convolutions, transposed convolutions and linear layers
for one slice (normalisation and activations are left out, as is customary). Latency is the
median (or, ``statistic="min"``, the fastest) wall time of ``torch.inference_mode`` forward
passes with ``threads`` torch threads: one slice (batch 1), and one volume of ``depth`` slices
in batches of 32 (how :func:`common.training.predict_volume` segments a case). Other work on
the machine only ever slows a pass down, so the fastest of the repeats is the figure a shared
machine disturbs least (the capacity search's budget check uses it; the benchmark tables
report the median).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from common.models import FeatureNet, count_parameters


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``x`` (B, C, H, W), divided by B."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.ConvTranspose2d):  # every input pixel scatters a kernel
            k = module.kernel_size[0] * module.kernel_size[1]
            total += inputs[0].numel() * module.out_channels // module.groups * k
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * k
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    try:
        with torch.inference_mode():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total // x.shape[0]


STATISTICS = ("median", "min")


def _seconds(fn, repeats: int, statistic: str = "median", warmup: int = 3) -> float:
    if statistic not in STATISTICS:
        raise ValueError(f"statistic: expected one of {', '.join(STATISTICS)}, got {statistic!r}")
    for _ in range(warmup):  # allocations, oneDNN kernel selection, thread pool start-up
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0] if statistic == "min" else times[len(times) // 2]


def latency_ms(run, in_channels: int, size: tuple[int, int], depth: int, repeats: int,
               to_input=lambda t: t, statistic: str = "median") -> tuple[float, float]:
    """Milliseconds of ``run(batch)`` for one slice and for a ``depth``-slice volume in batches
    of 32: the median of ``repeats`` passes (of max(3, repeats // 3) for the volume), or the
    fastest of ``repeats`` passes each. ``to_input`` converts the (B, C, H, W) float tensor
    (e.g. to numpy)."""
    one = to_input(torch.rand(1, in_channels, *size))
    vol = [to_input(b) for b in torch.rand(depth, in_channels, *size).split(32)]

    def run_volume():
        for b in vol:
            run(b)

    # a volume's median needs fewer passes than the fastest does under load
    volume_repeats = repeats if statistic == "min" else max(3, repeats // 3)
    return (1000 * _seconds(lambda: run(one), repeats, statistic),
            1000 * _seconds(run_volume, volume_repeats, statistic))


def profile_network(model: FeatureNet, size: tuple[int, int], depth: int = 24, threads: int = 1,
                    repeats: int = 10, statistic: str = "median") -> dict:
    """``{"parameters", "macs_per_slice", "slice_ms", "volume_ms", "statistic", "threads",
    "depth", "size"}`` of ``model`` (eager PyTorch) on (1, C, H, W) slices and a
    ``depth``-slice volume (``statistic`` of the repeated timings: median or min)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = model.export_network().eval()

        def run(x):
            with torch.inference_mode():
                net(x)

        slice_ms, volume_ms = latency_ms(run, model.in_channels, size, depth, repeats,
                                         statistic=statistic)
        macs = count_macs(net, torch.zeros(1, model.in_channels, *size))
        return {"parameters": count_parameters(model), "macs_per_slice": macs,
                "slice_ms": slice_ms, "volume_ms": volume_ms, "statistic": statistic,
                "threads": threads, "depth": depth, "size": list(size)}
    finally:
        torch.set_num_threads(old)
