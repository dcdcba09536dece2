"""Export the final student: state dict, a ``torch.export`` program (``student.pt2``; TorchScript
is deprecated in torch 2.13), ONNX (when ``onnx`` is installed) and a model card
(``model_card.json``: config, parameters, sites, metrics; :mod:`common.modelcard`) that
``fedkd predict`` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from common.config import RunConfig
from common.modelcard import write_model_dir
from common.models import FeatureNet, count_parameters, input_channels


def export_onnx(net: torch.nn.Module, in_channels: int, size: tuple[int, int], path: Path) -> None:
    """``net`` (logits only) as ONNX with input ``image`` (B, C, H, W) and output ``logits``, the
    batch axis dynamic. Needs the ``onnx`` extra."""
    from torch.export import Dim

    torch.onnx.export(net, (torch.zeros(2, in_channels, *size),), str(path),
                      input_names=["image"], output_names=["logits"],
                      dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}})


def export_program(net: torch.nn.Module, in_channels: int, size: tuple[int, int],
                   path: Path) -> None:
    """``net`` (logits only) as a ``torch.export`` program with a dynamic batch axis; load it
    with ``torch.export.load(path).module()``: (B, C, H, W) -> logits (B, 2, H, W)."""
    from torch.export import Dim, export, save

    program = export(net, (torch.zeros(2, in_channels, *size),),
                     dynamic_shapes={"x": {0: Dim("batch", min=1, max=4096)}}, strict=False)
    save(program, str(path))


def export_student(cfg: RunConfig, weights: Path, out: Path, report: dict,
                   log: Callable[[str], None] = print) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    in_ch = input_channels(cfg.data)
    model = FeatureNet(cfg.model.student, in_ch)
    model.net.load_state_dict(torch.load(weights))
    model.eval()
    net = model.export_network().eval()
    export_program(net, in_ch, tuple(cfg.data.size), out / "student.pt2")
    formats = ["state_dict", "torch.export"]
    try:
        import onnx  # noqa: F401

        export_onnx(net, in_ch, tuple(cfg.data.size), out / "student.onnx")
        formats.append("onnx")
    except ImportError:
        log("[export] onnx is not installed: skipping the ONNX export")
    except Exception as exc:  # the exporter's own dependencies may be missing
        log(f"[export] ONNX export failed ({type(exc).__name__}: {exc}); skipping it")
    last = report.get("state", {}).get("rounds", {})
    final = last[max(last, key=int)].get("evaluate", {}) if last else {}
    write_model_dir(out, cfg, model.net, list(report.get("state", {}).get("teachers", {})),
                    final, tuple(formats))
    log(f"[export] student ({count_parameters(model.net):,} parameters) -> {out} "
        f"({', '.join(formats)})")
    return out
