"""A student on disk that ``fedkd predict --model DIR`` can run: ``DIR/student.pt`` (the state
dict) and ``DIR/model_card.json`` (name, formats, parameters, input, sites, metrics and the run
config). Written by the server's export (:mod:`server.export`) and by a site for the student it
adapted to its own data (:func:`client.student.adapt_student`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from common.config import RunConfig, from_dict, to_plain
from common.models import FeatureNet, count_parameters, input_channels

CARD = "model_card.json"
WEIGHTS = "student.pt"


def write_model_dir(out: Path, cfg: RunConfig, net: torch.nn.Module, sites: list[str],
                    metrics: dict, formats: tuple[str, ...] = ("state_dict",),
                    **extra) -> Path:
    """Save ``net`` (the ``model.student`` network of ``cfg``) and its card in ``out``; the
    weights are written atomically (a crash leaves the previous ones)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS + ".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, out / WEIGHTS)
    card = {"name": cfg.name, "formats": list(formats), "parameters": count_parameters(net),
            "input": {"channels": input_channels(cfg.data), "size": cfg.data.size,
                      "spacing_mm": cfg.data.spacing, "context_slices": cfg.data.context_slices,
                      "clip_percentiles": cfg.data.clip_percentiles},
            "sites": sorted(sites), "metrics": metrics, **extra, "config": to_plain(cfg)}
    (out / CARD).write_text(json.dumps(card, indent=1))
    return out


def read_card(model_dir: Path) -> dict:
    path = Path(model_dir) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory ({CARD} missing)")
    return json.loads(path.read_text())


def load_model_dir(model_dir: Path) -> tuple[FeatureNet, RunConfig]:
    """The student and run config of a model directory (an export, or a site's adapted
    student)."""
    card = read_card(model_dir)
    cfg = from_dict(card["config"], str(Path(model_dir) / CARD))
    model = FeatureNet(cfg.model.student, card["input"]["channels"])
    model.net.load_state_dict(torch.load(Path(model_dir) / WEIGHTS))
    model.eval()
    return model, cfg
