"""The node's policy: what a hospital's node answers, decided by the hospital, not the coordinator.

The policy comes from the node config (``flower-supernode --node-config``), never from a
message. Keys:

=====================  =========================================================================
``policy``             ``kd`` (default for a hospital node: one with ``data-path``) or ``open``
                       (default for a simulation partition): the preset of the keys below
``allow-weights``      answer weight-sharing training (Flower ``train``: FedAvg, FedProx, FedDF's
                       rounds), which sends weights trained on private data (kd: false)
``test-evaluations``   ``evaluate.student`` on the test split (and ``train.adapt``, which reports
                       test figures) allowed per run; 0: no limit (kd: 2). A coordinator cannot
                       probe the test cases with many models
``min-cases``          per-case statistics (std, median, min, max, quartiles) are sent only for a
                       split of at least this many cases: with fewer, a min or max is one
                       patient's score (kd: 5; mean and count are always sent)
``redact-paths``       error replies name files by their base name, not their local path
                       (kd: true)
=====================  =========================================================================

A refused request gets an error reply (code ``ERR_POLICY``) that says which key refused it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError

PRESETS = {
    "kd": {"allow-weights": False, "test-evaluations": 2, "min-cases": 5, "redact-paths": True},
    "open": {"allow-weights": True, "test-evaluations": 0, "min-cases": 0,
             "redact-paths": False},
}
PER_CASE = ("std", "median", "min", "max", "p25", "p75")


class PolicyError(PermissionError):
    """A request the node's policy refuses (the reason names the node config key)."""


@dataclass(frozen=True)
class NodePolicy:
    name: str
    allow_weights: bool
    test_evaluations: int
    min_cases: int
    redact_paths: bool

    @classmethod
    def from_node_config(cls, nc: dict, simulation: bool) -> "NodePolicy":
        """The policy of a node config (``simulation``: a partition of the Simulation Engine,
        whose default preset is ``open``). ConfigError names a bad key."""
        name = str(nc.get("policy", "open" if simulation else "kd"))
        if name not in PRESETS:
            raise ConfigError(f"node config policy: expected kd or open, got {name!r}")
        values = dict(PRESETS[name])
        for key in values:
            if key in nc:
                v = nc[key]
                if isinstance(values[key], bool):
                    if isinstance(v, str) and v.lower() in ("true", "false"):
                        v = v.lower() == "true"
                    if not isinstance(v, bool):
                        raise ConfigError(f"node config {key}: expected true or false, got {v!r}")
                elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise ConfigError(f"node config {key}: expected an integer >= 0, got {v!r}")
                values[key] = v
        return cls(name, values["allow-weights"], values["test-evaluations"],
                   values["min-cases"], values["redact-paths"])

    def check_weights(self) -> None:
        if not self.allow_weights:
            raise PolicyError(f"refused by the node's policy ({self.name}: allow-weights false): "
                              f"weight-sharing training would send weights trained on private "
                              f"data; the hospital can allow it in its node config")

    def count_test_evaluation(self, state_dir: Path, run_id: int) -> None:
        """Count one use of the test split for ``run_id`` (kept in ``STATE_DIR/policy.json``);
        PolicyError once the budget is spent."""
        if self.test_evaluations == 0:
            return
        path = state_dir / "policy.json"
        counts = json.loads(path.read_text()) if path.is_file() else {}
        used = int(counts.get(str(run_id), 0))
        if used >= self.test_evaluations:
            raise PolicyError(f"refused by the node's policy ({self.name}: test-evaluations "
                              f"{self.test_evaluations}): run {run_id} has used the test split "
                              f"{used} times")
        counts[str(run_id)] = used + 1
        state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(counts))

    def filter_metrics(self, metrics: dict, n_key: str = "n_cases", suffix: str = "") -> dict:
        """``metrics`` without per-case statistics (``{metric}_{stat}{suffix}``) when the split
        behind them (``metrics[n_key]``) has fewer than ``min-cases`` cases."""
        if self.min_cases == 0 or int(metrics.get(n_key, 0)) >= self.min_cases:
            return metrics
        drop = {f"{m}_{s}{suffix}" for m in ("dice", "hd95") for s in PER_CASE}
        return {k: v for k, v in metrics.items() if k not in drop}

    def redact(self, reason: str) -> str:
        """``reason`` with every absolute path cut to its base name (``.../name``)."""
        if not self.redact_paths:
            return reason
        return re.sub(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\:'\",()]+)+[/\\]([^\s/\\:'\",()]+)",
                      r".../\1", reason)
