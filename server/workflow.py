"""The methods the coordinator runs over a Flower ``Grid``: one small class per method, each a
:class:`~server.runner.Coordinator` whose ``run()`` names its steps (:mod:`server.steps`).

* :class:`KD` (``federation.strategy: kd``): wait for ``federation.min_sites`` nodes ->
  ``train.teacher`` at every site -> for each round: ``query.proxy`` (round 1, and later rounds
  with ``federation.requery_teachers``) folded into the streaming aggregator as replies arrive
  -> with ``consensus.rounds``, ``train.consensus`` and a query of the refined teachers ->
  distil the student on the public slices -> ``evaluate.student`` at every site -> with
  ``federation.self_train`` the server's self-training round -> with ``adapt.enabled``,
  ``train.adapt`` (every site fine-tunes the final student and keeps it) -> report and export.
  Only the teachers' answers on public slices leave a site.
* :class:`WeightSharing` (``fedavg`` / ``fedprox``): Flower's built-in ``FedAvg`` /
  ``FedProx`` trains the student architecture for ``federation.rounds`` rounds of
  ``federation.local_epochs`` site epochs; then the same test evaluation (and self-training,
  adaptation) as KD. Student weights trained on private data leave the sites every round.
* :class:`FedDF` (``feddf``, Lin et al. 2020): those FedAvg rounds, then one KD round (round
  ``federation.rounds + 1``) that starts from the FedAvg student.

The pooled-data baselines (``local``, ``central*``) exist only in simulation
(:mod:`simulations.baselines`). A restarted server with the same run directory skips the steps
it finds done; sites keep their teacher checkpoints, so a repeated ``train.teacher`` only
confirms them. Add a method: a subclass here (or in its own module) and a ``METHODS`` entry.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.config import SIMULATION_ONLY, RunConfig
from common.protocol import RUN_CONFIG_KEY, config_to_text
from server import capacity
from server.aggregation import Targets
from server.runner import LOG, Coordinator, final_round, method_round
from server.state import FederationError
from server.steps import FederationSteps

__all__ = ["KD", "WeightSharing", "FedDF", "METHODS", "Coordinator", "final_round",
           "run_federation"]


class KD(FederationSteps):
    """Federated distillation: teachers at the sites, their answers on the public slices
    aggregated, the student distilled on the server."""

    def run(self) -> dict:
        nodes = self.wait_for_sites()
        self.ensure_teachers(nodes)
        self.kd_rounds(1, method_round(self.cfg))
        if self.cfg.capacity.enabled:   # the capacity search evaluated its choice
            return self.finish()
        return self.finish_rounds(self.final_round)

    def kd_rounds(self, first: int, last: int) -> None:
        """Rounds ``first``..``last``: query (and consensus), distil, and evaluate every round
        but the last (the last is tested by :meth:`finish_rounds`)."""
        targets: Optional[Targets] = None
        for rnd in range(first, last + 1):
            q = rnd if self.cfg.federation.requery_teachers else first
            tag = f"r{q}"   # the query whose targets are in ``targets`` (None: on disk)
            if self._pending(f"query_r{q}"):
                targets = self.query_and_aggregate(q)
            for c in range(1, self.cfg.consensus.rounds + 1):   # kd, one round (config check)
                if self._pending(f"consensus_c{c}"):
                    self.consensus(q, c, targets or self.load_targets(tag))
                targets = None
                if self._pending(f"query_c{c}"):
                    targets = self.query_and_aggregate(q, consensus=c)
                tag = f"c{c}"
            if self.cfg.capacity.enabled:  # one round (checked by the config)
                if self._pending("capacity"):
                    capacity.search(self, targets or self.load_targets(tag))
                continue
            if self._pending(f"distill_r{rnd}"):
                self.distill(rnd, targets or self.load_targets(tag))
            if rnd < last and self._pending(f"evaluate_r{rnd}"):
                self.evaluate(rnd)


class WeightSharing(FederationSteps):
    """FedAvg / FedProx of the student architecture (Flower's built-in strategies)."""

    def run(self) -> dict:
        nodes = self.wait_for_sites()
        if self._pending("weights"):
            self.weight_sharing(nodes)
        return self.finish_rounds(self.final_round, {n: f"node {n}" for n in nodes})

    def weight_sharing(self, nodes: list[int]) -> None:
        """Step ``weights``: ``federation.rounds`` rounds of Flower's FedAvg / FedProx; the
        student (with ``federation.select_round``, the round the sites' validation Dice picks)
        becomes ``student_r{rounds}.pt``."""
        from server.strategies import OrderedFedAvg, OrderedFedProx

        t0 = time.perf_counter()
        fed = self.cfg.federation
        n = max(fed.min_sites, 1)
        kwargs = {"min_train_nodes": n, "min_evaluate_nodes": n, "min_available_nodes": n}
        strategy = (OrderedFedProx(proximal_mu=fed.proximal_mu, **kwargs)
                    if fed.strategy == "fedprox"
                    else OrderedFedAvg(**kwargs))   # fedavg, and feddf's first stage
        strategy_name = "FedProx" if fed.strategy == "fedprox" else "FedAvg"
        student = self.initial_student()
        conf = ConfigRecord({RUN_CONFIG_KEY: config_to_text(self.cfg)})
        self.log(f"[server] {strategy_name} of the student: {fed.rounds} round(s) of "
                 f"{fed.local_epochs} local epoch(s) on {len(nodes)} site(s)")
        # select_round: each round's global model, spilled to the run directory (not held in
        # memory), the chosen one loaded at the end and the others deleted
        models: dict[int, Path] = {}

        def keep(rnd: int, arrays: ArrayRecord) -> None:
            if fed.select_round and rnd > 0:
                models[rnd] = self.run_dir / f"candidate_round_{rnd}.pt"
                torch.save(arrays.to_torch_state_dict(), models[rnd])

        result = strategy.start(self.grid, ArrayRecord(student.net.state_dict()), fed.rounds,
                                self.timeout * 10 + 3600, train_config=conf,
                                evaluate_config=conf, evaluate_fn=keep)
        if not result.arrays:
            raise FederationError(f"{strategy_name}: no round produced a model (no "
                                  f"site replied; see the log)")
        state = result.arrays.to_torch_state_dict()
        upload = int(sum(v.numel() * v.element_size() for v in state.values()))
        # per-round validation figures of the sites, and the mean optimizer steps a site took
        train = {int(r): m for r, m in result.train_metrics_clientapp.items()}
        evaluate = {int(r): m for r, m in result.evaluate_metrics_clientapp.items()}
        history = [{"round": r, "split": "val", "steps": float(train.get(r, {}).get("steps", 0)),
                    **{k: float(v) for k, v in evaluate.get(r, {}).items()}}
                   for r in sorted(set(train) | set(evaluate))]
        for h in history:   # DP-SGD: the epsilon the sites had spent by that round
            if "dp_epsilon_so_far" in train.get(h["round"], {}):
                h["dp_epsilon"] = float(train[h["round"]]["dp_epsilon_so_far"])
        record = {"strategy": strategy_name, "history": history,
                  "bytes_per_site_round": upload, "sites": len(nodes)}
        val = {h["round"]: h["dice"] for h in history if h["round"] in models and "dice" in h}
        if val:
            best = max(val, key=lambda r: (val[r], r))
            state = torch.load(models[best], weights_only=True)
            record["selection"] = {"round": best, "val_dice": {str(r): v for r, v in val.items()}}
            self.log(f"[server] {strategy_name}: round {best} of {fed.rounds} chosen on "
                     f"the sites' validation Dice ({val[best]:.4f}; the last round "
                     f"{val.get(fed.rounds, float('nan')):.4f})")
        elif fed.select_round:
            self.log("[server] federation.select_round: no round was evaluated by the sites; "
                     "the last round's model is kept")
        torch.save(state, self.run_dir / f"student_r{fed.rounds}.pt")
        for path in models.values():
            path.unlink(missing_ok=True)
        self.state.rounds.setdefault(str(fed.rounds), {})["weights"] = record
        self._done("weights", time.perf_counter() - t0)


class FedDF(KD, WeightSharing):
    """FedAvg rounds, then one round of ensemble distillation from the sites' teachers."""

    def run(self) -> dict:
        nodes = self.wait_for_sites()
        if self._pending("weights"):
            self.weight_sharing(nodes)   # FedAvg rounds first: student weights leave the sites
        self.ensure_teachers(nodes)
        last = method_round(self.cfg)
        self.kd_rounds(last, last)
        return self.finish_rounds(self.final_round)


METHODS: dict[str, type[Coordinator]] = {"kd": KD, "fedavg": WeightSharing,
                                         "fedprox": WeightSharing, "feddf": FedDF}


def method_class(cfg: RunConfig) -> type[Coordinator]:
    """The class that runs ``federation.strategy``."""
    strategy = cfg.federation.strategy
    if strategy in SIMULATION_ONLY:
        raise FederationError(f"federation.strategy={strategy!r} is a baseline on pooled "
                              f"data: it runs only in `fedkd simulate` / `fedkd experiment`")
    return METHODS[strategy]


def run_federation(grid: Grid, cfg: RunConfig, log: Callable[[str], None] = LOG.info) -> dict:
    """Run ``cfg``'s method over ``grid``; returns its report."""
    return method_class(cfg)(grid, cfg, log).run()
