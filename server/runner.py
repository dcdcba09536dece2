"""The coordinator: a step runner over a Flower ``Grid`` (Message API).

A method (:mod:`server.workflow`: KD, FedAvg / FedProx, FedDF) is a subclass whose ``run()``
names its steps; the steps that talk to the sites are in :mod:`server.steps`. This base holds
what every step needs:

* the run state (``RUN_DIR/state.json``, :mod:`server.state`): a step is done once, recorded
  with its time, and skipped when a restarted server finds it done (:meth:`_pending`,
  :meth:`_done`); a site that fails a step is excluded from it with its reason (:meth:`_exclude`);
* one broadcast helper (:meth:`_broadcast`): a message to every site, error replies and silent
  nodes excluded, the other replies handled as they arrive;
* the server's copy of the public proxy set, the student's architecture, the report and export.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common.config import ConfigError, RunConfig, dump_config
from common.logs import get_logger
from common.models import FeatureNet, build_student, count_parameters, input_channels
from common.provenance import provenance
from server import capacity
from server.aggregation import Targets
from server.audit import AuditGrid
from server.distill import pretrain_on_proxy
from server.messaging import exchange, wait_for_nodes
from server.proxy import ProxySet, load_proxy_set
from server.state import RunState, config_digest

LOG = get_logger("fedkd.server")


def save_targets(targets: Targets, folder: Path) -> None:
    """``folder/probs.npy`` (N, 2, H, W), ``claim.npy`` (N,) and ``styles.npy`` (S, k, k) if
    any, ``feat@NAME@C.npy``."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"probs": targets.probs, "claim": targets.claim, "styles": targets.styles,
              **{f"feat@{k}": v for k, v in targets.features.items()}}
    for name, arr in arrays.items():
        if arr is not None:
            np.save(folder / f"{name}.npy", arr)


def load_targets(folder: Path) -> Targets:
    """The targets :func:`save_targets` wrote, memory-mapped (rows are read as used)."""
    probs = np.load(folder / "probs.npy", mmap_mode="r")
    claim, styles = (np.load(folder / f"{n}.npy") if (folder / f"{n}.npy").is_file() else None
                     for n in ("claim", "styles"))
    feats = {p.stem[5:]: np.load(p, mmap_mode="r") for p in sorted(folder.glob("feat@*.npy"))}
    return Targets(probs, feats, claim=claim, styles=styles)


def reply_site(label: str, reply: Message) -> str:
    """The site a reply names in its ``info`` record (else the node's label)."""
    return str(reply.content["info"]["site"]) if "info" in reply.content else label


def method_round(cfg: RunConfig) -> int:
    """The round of the method's own last student: ``federation.rounds``; with ``feddf`` the
    distillation after the FedAvg rounds is one round more."""
    rounds = cfg.federation.rounds
    return rounds + 1 if cfg.federation.strategy == "feddf" else rounds


def final_round(cfg: RunConfig) -> int:
    """The round of a run's final student: :func:`method_round`, and one more with
    ``federation.self_train`` (the server's self-training on the proxy set)."""
    return method_round(cfg) + int(cfg.federation.self_train)


class Coordinator:
    """Runs one method's steps for one run config over one grid; subclasses define ``run()``."""

    def __init__(self, grid: Grid, cfg: RunConfig, log: Callable[[str], None] = LOG.info):
        self.grid, self.cfg, self.log = grid, cfg, log
        torch.set_num_threads(cfg.runtime.threads)  # the server's own torch work (distillation)
        self.run_dir = Path(cfg.output.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.output.audit and grid is not None and not isinstance(grid, AuditGrid):
            self.grid = AuditGrid(grid, self.run_dir / "audit.jsonl")
        self.state = RunState.load(self.run_dir, config_digest(cfg))
        self._started, self._worked = time.perf_counter(), self.state.elapsed
        dump_config(cfg, self.run_dir / "config.yaml")
        self.timeout = cfg.federation.wait_timeout_s
        self.in_channels = input_channels(cfg.data)
        self._proxy = None
        self.new_student()  # a student over its size budget is a config error before any work

    def new_student(self):
        torch.manual_seed(self.cfg.runtime.seed)
        return build_student(self.cfg.model.student, self.cfg.model.teacher, self.in_channels,
                             self.cfg.model.max_student_fraction)

    def check_proxy_masks(self) -> None:
        """ConfigError before any work if a setting needs the proxy set's masks and it has none."""
        needs = [k for k, v in (("student.proxy_pretrain_epochs",
                                 self.cfg.student.proxy_pretrain_epochs),
                                ("distill.proxy_label_weight", self.cfg.distill.proxy_label_weight))
                 if v]
        if needs and self.proxy().labels is None:
            raise ConfigError(f"{needs[0]} needs the public proxy set's masks, and no set of "
                              f"data.proxy ({self.cfg.data.proxy}) has any")

    def initial_student(self) -> FeatureNet:
        """Where the student starts, for distillation and FedAvg / FedProx alike: a fresh
        network, or with ``student.proxy_pretrain_epochs`` one trained first on the public
        proxy set's masks (step ``pretrain``; kept in ``RUN_DIR/student_init.pt``)."""
        student = self.new_student()
        if not self.cfg.student.proxy_pretrain_epochs:
            return student
        path = self.run_dir / "student_init.pt"
        if "pretrain" in self.state.completed and path.is_file():
            student.net.load_state_dict(torch.load(path))
            return student
        t0 = time.perf_counter()
        record = pretrain_on_proxy(student, self.cfg, self.log)
        torch.save(student.net.state_dict(), path)
        self.state.rounds.setdefault("0", {})["pretrain"] = record
        self.log(f"[server] student pretrained on the proxy set's masks: {record['steps']} steps "
                 f"on {record['cases']} volumes")
        if "pretrain" in self.state.completed:
            self.state.completed.remove("pretrain")
        self._done("pretrain", time.perf_counter() - t0)
        return student

    def elapsed(self) -> float:
        """Seconds of work on this run: earlier processes' (a resumed run) and this one's."""
        return self._worked + time.perf_counter() - self._started

    def _done(self, step: str, seconds: float) -> None:
        self.state.completed.append(step)
        self.state.timings[step] = seconds
        self.state.elapsed = self.elapsed()
        self.state.save(self.run_dir)
        self.log(f"[server] step {step} done ({seconds:.1f}s)")

    def _pending(self, step: str) -> bool:
        if step in self.state.completed:
            self.log(f"[server] skipping step {step} (done)")
            return False
        return True

    def _exclude(self, step: str, site: str, reason: str) -> None:
        self.state.excluded[f"{step}/{site}"] = reason
        self.log(f"[server] {step}: excluding {site}: {reason}")

    def _broadcast(self, step: str, nodes: dict[int, str], content: RecordDict,
                   message_type: str, timeout: float,
                   handle: Callable[[str, Message], None]) -> None:
        """Send ``content`` to ``nodes`` ({node id: site}); error replies and silent nodes are
        excluded from ``step`` with their reason; ``handle(site, reply)`` gets the others as
        they arrive."""
        def on_reply(node: int, reply: Message) -> None:
            if reply.has_error():
                self._exclude(step, nodes[node], reply.error.reason)
            else:
                handle(nodes[node], reply)

        missing = exchange(self.grid, {n: content for n in nodes}, message_type, step, timeout,
                           on_reply)
        for node in missing:
            self._exclude(step, nodes[node], "no reply before the timeout")

    def proxy(self) -> ProxySet:
        """The server's copy of the public proxy set (every set of ``data.proxy``; masks where
        a set has them: they score ``auto``'s candidates, report how good the targets are, and
        are mixed into them with ``distill.proxy_label_weight``)."""
        if self._proxy is None:
            self._proxy = load_proxy_set(self.cfg.data, self.run_dir / "proxy_cache")
            p = self._proxy
            self.log(f"[server] proxy set: {len(p)} slices ("
                     + ", ".join(f"{k} {v}" for k, v in p.slices_per_set().items())
                     + f"); {p.n_labelled} with masks; {p.blank} blank slices left out")
        return self._proxy

    def site_nodes(self) -> dict[int, str]:
        return {int(n): s for n, s in self.state.nodes.items()}

    def load_targets(self, tag: str) -> Targets:
        """The targets a query step kept (``tag``: r{round} or c{consensus round}),
        memory-mapped."""
        return load_targets(self.run_dir / f"targets_{tag}")

    def export_config(self) -> RunConfig:
        """The run config describing the exported student (the chosen capacity candidate)."""
        spec = capacity.chosen_spec(self.state.rounds)
        return self.cfg if spec is None else capacity.student_config(self.cfg, spec)

    @property
    def final_round(self) -> int:
        return final_round(self.cfg)

    def finish(self) -> dict:
        """Write the report and export the final student."""
        report = self.report(self.elapsed())   # a resumed run: its earlier processes too
        if not self.cfg.output.export:
            return report
        from server.export import export_student

        export_student(self.export_config(), self.run_dir / f"student_r{self.final_round}.pt",
                       self.run_dir / "export", report, self.log)
        return report

    def report(self, seconds: float) -> dict:
        from server.report import write_report

        student = FeatureNet(self.export_config().model.student, self.in_channels)
        report = {"name": self.cfg.name, "config": self.cfg.to_dict(), "state": self.state.__dict__,
                  "student_parameters": count_parameters(student), "wall_seconds": seconds,
                  "provenance": provenance(self.cfg)}
        write_report(report, self.run_dir, self.log)
        return report

    def wait_for_sites(self) -> list[int]:
        """Before any work: the settings that need the public masks are checked, then the run
        waits for ``federation.min_sites`` nodes (their ids)."""
        self.check_proxy_masks()
        return wait_for_nodes(self.grid, self.cfg.federation.min_sites, self.timeout, self.log)

    def run(self) -> dict:
        """The method's steps, then :meth:`finish` (its report)."""
        raise NotImplementedError(f"{type(self).__name__}: a method defines run()")
