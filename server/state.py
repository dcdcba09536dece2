"""What a coordinator's run has done, persisted so that a restarted server goes on.

:class:`RunState` is ``RUN_DIR/state.json``: completed steps, the sites' node ids, the teachers'
figures, excluded sites with reasons, per-round figures, timings and the seconds worked so far
(a resumed run keeps its true wall time). A run directory is bound to
its config by :func:`config_digest`; another config there is refused (:class:`FederationError`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from common.config import RunConfig, from_dict


class FederationError(RuntimeError):
    """The run cannot go on (too few sites, a different run in the run directory, ...)."""


@dataclass
class RunState:
    """What has been done, persisted as ``state.json`` after every step."""

    config_digest: str
    completed: list[str] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)        # node id -> site
    teachers: dict[str, dict] = field(default_factory=dict)    # site -> train metrics
    excluded: dict[str, str] = field(default_factory=dict)     # "step/site" -> reason
    rounds: dict[str, dict] = field(default_factory=dict)      # round -> figures
    timings: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0   # seconds of work so far, over every process that ran this run

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        tmp.replace(run_dir / "state.json")

    @classmethod
    def load(cls, run_dir: Path, digest: str) -> "RunState":
        """The state in ``run_dir`` (or a fresh one); FederationError if it was made with a
        config of another digest."""
        path = run_dir / "state.json"
        if not path.is_file():
            return cls(digest)
        data = json.loads(path.read_text())
        if data.get("config_digest") != digest:
            raise FederationError(f"{run_dir}: holds a run with a different config; choose a "
                                  f"new output.run_dir (or delete {path} to start over)")
        return cls(**data)


# Settings that do not change what a run computes: a resumed run may change them.
NOT_IN_DIGEST = {"name": None, "experiment": None, "bench": None,
                 "output": ("audit", "export"), "federation": ("wait_timeout_s",),
                 "runtime": ("threads", "client_threads")}


# Settings added after runs were made, with the value that reproduces those runs: left out of
# the digest at that value, so that the earlier run directories stay resumable.
ADDED_LATER = {"student": {"proxy_pretrain_epochs": 0}, "distill": {"proxy_label_weight": 0.0},
               "train": {"public_init_epochs": 0},
               "privacy": {"dp_sgd_epsilon": 0.0, "dp_sgd_max_grad_norm": 1.0,
                           "dp_sgd_batch_size": 16, "dp_sgd_lr": 5e-4},
               "federation": {"select_round": False, "self_train": False},
               "aggregation": {"affinity_margin": 0.0, "auto_candidates": ["affinity", "mean"]}}


# The strategies that aggregate teacher outputs (the others never read ``aggregation``).
AGGREGATING = ("kd", "feddf")


def stored_config(data: dict, source: str) -> RunConfig:
    """The RunConfig of a stored ``config`` (a run's ``report.json``). A setting of
    :data:`ADDED_LATER` that the stored config lacks is read at the value that made the run,
    not at today's default."""
    data = copy.deepcopy(data)
    for section, keys in ADDED_LATER.items():
        for k, old in keys.items():
            if isinstance(data.get(section), dict):
                data[section].setdefault(k, copy.deepcopy(old))
    return from_dict(data, source)


def config_digest(cfg: RunConfig) -> str:
    """Digest of every setting that defines a run, defaults included (without
    :data:`NOT_IN_DIGEST`, and :data:`ADDED_LATER` at its old value): a run directory made when
    a default had another value is not resumed as if it were this run."""
    plain = cfg.to_dict()
    # the settings of a step that does not run define nothing
    if not cfg.adapt.enabled:
        plain.pop("adapt")
    if not cfg.consensus.rounds:
        plain.pop("consensus")
    agg = cfg.aggregation
    if cfg.federation.strategy not in AGGREGATING:
        plain.pop("aggregation")
    else:
        if agg.method != "auto":
            plain["aggregation"].pop("auto_candidates")
        if not agg.uses("affinity"):
            plain["aggregation"].pop("affinity_margin")
    for section, keys in ADDED_LATER.items():
        for k, old in keys.items():
            if plain.get(section, {}).get(k) == old:
                plain[section].pop(k)
    for section, keys in NOT_IN_DIGEST.items():
        if keys is None:
            plain.pop(section, None)
        else:
            for k in keys:
                plain.get(section, {}).pop(k, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
