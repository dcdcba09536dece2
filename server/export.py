"""Export the final student: state dict, a ``torch.export`` program (``student.pt2``; TorchScript
is deprecated in torch 2.13), ONNX (when ``onnx`` is installed) and a model card
(``model_card.json``: config, parameters, sites, metrics) that ``fedkd predict`` reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from common.config import RunConfig, from_dict, to_plain
from common.models import FeatureNet, count_parameters, input_channels

CARD = "model_card.json"


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
    torch.save(model.net.state_dict(), out / "student.pt")
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
    card = {"name": cfg.name, "formats": formats, "parameters": count_parameters(model.net),
            "input": {"channels": in_ch, "size": cfg.data.size, "spacing_mm": cfg.data.spacing,
                      "context_slices": cfg.data.context_slices,
                      "clip_percentiles": cfg.data.clip_percentiles},
            "sites": sorted(report.get("state", {}).get("teachers", {})),
            "metrics": final, "config": to_plain(cfg)}
    (out / CARD).write_text(json.dumps(card, indent=1))
    log(f"[export] student ({card['parameters']:,} parameters) -> {out} ({', '.join(formats)})")
    return out


def load_exported(model_dir: Path) -> tuple[FeatureNet, RunConfig]:
    """The student and run config of an export directory (for ``fedkd predict``)."""
    card_path = model_dir / CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"{model_dir}: not an exported model ({CARD} missing)")
    card = json.loads(card_path.read_text())
    cfg = from_dict(card["config"], str(card_path))
    model = FeatureNet(cfg.model.student, card["input"]["channels"])
    model.net.load_state_dict(torch.load(model_dir / "student.pt"))
    model.eval()
    return model, cfg
