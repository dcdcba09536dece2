"""Shared fixtures: a tiny synthetic federation and the real-data folder beside the repository."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("FEDKD_REAL_DATA", REPO.parent / "shared" / "data" / "real-prostate"))


# Flower reports deprecated features through its logger ("DEPRECATED FEATURE: ..."), not as
# DeprecationWarning, so pyproject's warning filters cannot see them. Every test fails on one,
# except the deprecations kept on purpose (each with its reason where the call is made).
KEPT_DEPRECATIONS = (
    "The `run_simulation` function is deprecated",   # simulations/simulate.py says why
)


class _Deprecations(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "DEPRECATED FEATURE" in text and not any(k in text for k in KEPT_DEPRECATIONS):
            self.seen.append(" ".join(text.split())[:300])


@pytest.fixture(autouse=True)
def no_flower_deprecations():
    handler = _Deprecations()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    try:
        yield handler
    finally:
        flwr_logger.removeHandler(handler)
    assert not handler.seen, f"Flower logged a deprecated feature: {handler.seen[0]}"


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """2 sites x 5 cases + 3 proxy cases, seed 0."""
    from simulations.synthetic import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, n_sites=2, n_cases=5, n_proxy=3, seed=0, log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "PROMISE12").is_dir():
        pytest.skip(f"real prostate samples not found at {REAL_DATA} (they live in "
                    f"../shared/data/real-prostate beside the repository; set FEDKD_REAL_DATA "
                    f"to point elsewhere)")
    return REAL_DATA


def tiny_sim_config(tmp_path: Path, **sections) -> Path:
    """A YAML run config for a fast Simulation Engine run: 2 synthetic sites x 5 cases at
    64 x 64, small teacher and student, 2 epochs each; ``sections`` are merged on top."""
    import yaml

    cfg = {
        "data": {"root": str(tmp_path / "data"), "size": [64, 64], "spacing": [2.0, 2.0]},
        "synth": {"sites": 2, "cases": 5, "proxy_cases": 2, "seed": 1},
        "model": {"teacher": {"channels": [8, 16, 32, 64], "strides": [2, 2, 2],
                              "num_res_units": 1},
                  "student": {"channels": [4, 8, 16, 32], "num_res_units": 0},
                  "max_student_fraction": 0.25},
        "train": {"epochs": 2}, "distill": {"epochs": 2},
    }
    cfg.update(sections)
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
