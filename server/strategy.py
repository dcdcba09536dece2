"""Federated knowledge distillation as a Flower Message-API strategy.

:class:`FedKD` has the shape of Flower's ``flwr.serverapp.strategy.FedAvg`` and runs under its
``Strategy.start`` loop, so a Flower user can put it in their own ServerApp::

    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp

    from common.config import load_config
    from server.strategy import FedKD

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = load_config("configs/demo.yaml")
        strategy = FedKD(cfg)
        result = strategy.start(grid, strategy.initial_arrays(), num_rounds=1)
        strategy.save(result, "student.pt")

What a round is (``federation.requery_teachers`` aside):

* before round 1, ``train.teacher`` at every node (each site trains, or reuses, its teacher);
* ``configure_train``: ``query.proxy`` to every node, the public slice ids and the reply
  encoding (no weights leave the server, none come back);
* ``aggregate_train``: each reply is checked and folded into the aggregator as in the
  coordinator (``aggregation.method``), and the student, starting from the round's arrays, is
  distilled on the server's copy of the public slices (``distill``); returns the student's
  arrays and the round's figures (target Dice where the public set has masks, reply bytes);
* ``configure_evaluate`` / ``aggregate_evaluate``: ``evaluate.student`` on every node's
  validation split (``evaluate_split``), the case-weighted Dice.

The ClientApp is the project's (``client/app.py``), unchanged. The coordinator
(server.workflow) runs the same steps with the project's extras (resumable run state,
consensus rounds, capacity search, reports); both call the same aggregation
(server.aggregation) and distillation (server.distill.distill_on_proxy), so with the same run
config they distil the same student.
"""

from __future__ import annotations

import tempfile
import time
from logging import INFO
from pathlib import Path
from typing import Iterable, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from server.aggregation import make_aggregator
from common.config import RunConfig
from common.metrics import case_weighted_mean
from common.models import FeatureNet, build_student, input_channels
from common.protocol import (
    EVALUATE_STUDENT,
    QUERY_PROXY,
    TRAIN_TEACHER,
    ProtocolError,
    evaluate_request,
    query_request,
    read_teacher_reply,
    train_request,
)
from server.distill import distill_on_proxy
from server.proxy import ProxySet, load_proxy_set


class FedKD(Strategy):
    """Federated knowledge distillation (only the teachers' answers on public slices leave a
    site) as a Flower strategy.

    Parameters
    ----------
    cfg : RunConfig
        One config for the run: data (the public sets: ``data.proxy``), models, aggregation,
        reply encoding, distillation; sent to every node with each message.
    work_dir : Path, optional
        Where the server keeps its memory-mapped copy of the public slices and the running
        sums (default: a temporary folder).
    evaluate_split : str
        The sites' split of the per-round evaluation: ``val`` (default; read the test split
        once, at the end, with :meth:`evaluate_test`).
    """

    def __init__(self, cfg: RunConfig, work_dir: Optional[Path] = None,
                 evaluate_split: str = "val") -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.runtime.threads)   # the server's own torch work
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="fedkd-"))
        self.evaluate_split = evaluate_split
        self._proxy: Optional[ProxySet] = None
        self.teachers: dict[str, dict] = {}

    # ---------------------------------------------------------------- the public slices
    @property
    def proxy(self) -> ProxySet:
        if self._proxy is None:
            self._proxy = load_proxy_set(self.cfg.data, self.work_dir / "proxy_cache")
        return self._proxy

    def new_student(self) -> FeatureNet:
        torch.manual_seed(self.cfg.runtime.seed)
        return build_student(self.cfg.model.student, self.cfg.model.teacher,
                             input_channels(self.cfg.data), self.cfg.model.max_student_fraction)

    def initial_arrays(self) -> ArrayRecord:
        """A fresh student (seeded by ``runtime.seed``) as Flower arrays."""
        return ArrayRecord(self.new_student().net.state_dict())

    def summary(self) -> None:
        c = self.cfg
        log(INFO, "\t├──> FedKD: public sets %s, aggregation %s, reply %s %d-bit",
            c.data.proxy, c.aggregation.method, c.reply.output, c.reply.bits)
        log(INFO, "\t└──> distillation: %d epochs%s, student %s", c.distill.epochs,
            f" x {c.distill.steps_per_epoch} steps" if c.distill.steps_per_epoch else "",
            c.model.student.channels)

    # ---------------------------------------------------------------- teachers
    def train_teachers(self, grid: Grid, timeout: float) -> None:
        """``train.teacher`` at every node; the sites' figures in :attr:`teachers`."""
        msgs = [Message(train_request(self.cfg), dst_node_id=n, message_type=TRAIN_TEACHER)
                for n in grid.get_node_ids()]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            if reply.has_error():
                log(INFO, "teacher training failed: %s", reply.error.reason)
                continue
            site = str(reply.content["info"]["site"])
            self.teachers[site] = dict(reply.content["metrics"])
            log(INFO, "\t├──> teacher of %s: val Dice %.4f", site,
                self.teachers[site].get("val_dice", float("nan")))

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 1,
              timeout: float = 3600, train_config: Optional[ConfigRecord] = None,
              evaluate_config: Optional[ConfigRecord] = None, evaluate_fn=None) -> Result:
        """Train the teachers, then Flower's round loop (``Strategy.start``)."""
        self.train_teachers(grid, timeout)
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                             evaluate_config, evaluate_fn)

    # ---------------------------------------------------------------- a round
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._arrays = arrays
        features = self._features()
        content = query_request(self.cfg, self.proxy.ids, features, self.cfg.federation.precision)
        return [Message(content, dst_node_id=n, message_type=QUERY_PROXY)
                for n in grid.get_node_ids()]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        proxy, features = self.proxy, self._features()
        agg = make_aggregator(self.cfg.aggregation, self.work_dir / f"spill_r{server_round}")
        reply_bytes = 0
        for reply in replies:
            if reply.has_error():
                log(INFO, "a site is left out: %s", reply.error.reason)
                continue
            site = str(reply.content["info"]["site"])
            try:
                probs, feats, affinity, style = read_teacher_reply(
                    reply.content, self.cfg, len(proxy), proxy.images.shape[-2:], features)
            except (ProtocolError, ValueError, TypeError) as exc:
                log(INFO, "%s is left out: malformed reply: %s", site, exc)
                continue
            stats = reply.content["stats"]
            reply_bytes += int(stats["reply_bytes"])
            agg.add(site, probs, float(stats.get("val_dice", 1.0)), feats, affinity, style)
        if not agg.sites:
            return None, None
        auto = self.cfg.aggregation.method == "auto" and proxy.labels is not None
        targets = agg.finalize(proxy.target_dice) if auto else agg.finalize()
        student = FeatureNet(self.cfg.model.student, input_channels(self.cfg.data))
        student.net.load_state_dict(self._arrays.to_torch_state_dict())
        t0 = time.perf_counter()
        distill_on_proxy(student, proxy, targets, self.cfg, lambda s: log(INFO, "\t%s", s),
                         tag=f"distill r{server_round}")
        metrics = {"sites": len(agg.sites), "reply_bytes": reply_bytes,
                   "distill_seconds": time.perf_counter() - t0}
        if proxy.labels is not None:
            metrics["target_dice"] = float(proxy.target_dice(targets.probs))
        return ArrayRecord(student.net.state_dict()), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        content = evaluate_request(self.cfg, arrays.to_torch_state_dict(), self.evaluate_split)
        return [Message(content, dst_node_id=n, message_type=EVALUATE_STUDENT)
                for n in grid.get_node_ids()]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> Optional[MetricRecord]:
        sites = {str(r.content["info"]["site"]): dict(r.content["metrics"])
                 for r in replies if not r.has_error()}
        if not sites:
            return None
        return MetricRecord({"dice": case_weighted_mean(sites),
                             "n_cases": int(sum(m["n_cases"] for m in sites.values()))})

    # ---------------------------------------------------------------- after the rounds
    def evaluate_test(self, grid: Grid, arrays: ArrayRecord, timeout: float = 3600
                      ) -> dict[str, dict]:
        """Every site's figures of ``arrays`` on its test split (read once, at the end)."""
        content = evaluate_request(self.cfg, arrays.to_torch_state_dict(), "test")
        msgs = [Message(content, dst_node_id=n, message_type=EVALUATE_STUDENT)
                for n in grid.get_node_ids()]
        return {str(r.content["info"]["site"]): dict(r.content["metrics"])
                for r in grid.send_and_receive(msgs, timeout=timeout) if not r.has_error()}

    @staticmethod
    def save(result: Result, path: str | Path) -> None:
        """The final student's state dict (``torch.load``-able)."""
        torch.save(result.arrays.to_torch_state_dict(), path)

    def _features(self) -> list[str]:
        return list(self.cfg.model.student.features) if self.cfg.distill.w_feature > 0 else []
