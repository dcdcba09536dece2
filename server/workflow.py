"""The coordinator's workflow over a Flower ``Grid`` (Message API).

wait for >= ``federation.min_sites`` nodes -> ``train.teacher`` at every site -> for each round:
``query.proxy`` (round 1, and later rounds if ``federation.requery_teachers``) folded into the
streaming aggregator as replies arrive -> distil the student on the proxy images ->
``evaluate.student`` at every site -> report and export.

Checkpoints: after each completed step the state goes to ``RUN_DIR/state.json`` (+ targets and
student files). A restarted server with the same run directory skips completed steps; sites keep
their teacher checkpoints, so a repeated ``train.teacher`` only confirms them.

With ``federation.strategy: fedavg | fedprox`` the same server runs the weight-sharing baseline
instead: Flower's built-in ``FedAvg`` / ``FedProx`` strategy trains the student architecture
for ``federation.rounds`` rounds of ``federation.local_epochs`` site epochs, then every site
evaluates the result exactly as it evaluates a distilled student. The pooled-data baselines
(``local``, ``central*``) exist only in simulation (:mod:`simulations.baselines`).

A site that fails (error reply, no reply before the timeout, malformed arrays: wrong shape or
dtype, NaN) is excluded from that step with a logged reason, which the report names.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.aggregation import StreamingAggregator, Targets
from common.config import RunConfig, dump_config
from common.data import DataError, load_proxy, proxy_slice_ids, slice_stack
from common.logs import get_logger
from common.metrics import dice_score
from common.privacy import epsilon
from common.models import (
    FeatureNet,
    build_student,
    build_teacher,
    count_parameters,
    input_channels,
)
from common.protocol import (
    EVALUATE_STUDENT,
    RUN_CONFIG_KEY,
    QUERY_PROXY,
    TRAIN_TEACHER,
    ProtocolError,
    config_to_text,
    decode_proxy_reply,
    evaluate_request,
    parse_slice_ids,
    query_request,
    train_request,
)
from server.audit import AuditGrid
from server.distill import distill_student

LOG = get_logger("fedkd.server")


class FederationError(RuntimeError):
    """The run cannot go on (too few sites, a different run in the run directory, ...)."""


SIMULATION_ONLY = ("local", "central", "central-student", "central-kd")


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

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        tmp.replace(run_dir / "state.json")

    @classmethod
    def load(cls, run_dir: Path, digest: str, accepted: tuple[str, ...] = ()) -> "RunState":
        """The state in ``run_dir`` (or a fresh one); FederationError if it was made with a
        config whose digest is neither ``digest`` nor one of ``accepted``."""
        path = run_dir / "state.json"
        if not path.is_file():
            return cls(digest)
        data = json.loads(path.read_text())
        if data.get("config_digest") not in (digest, *accepted):
            raise FederationError(f"{run_dir}: holds a run with a different config; choose a "
                                  f"new output.run_dir (or delete {path} to start over)")
        data["config_digest"] = digest
        return cls(**data)


# Settings that do not change what a run computes: a resumed run may change them.
NOT_IN_DIGEST = {"name": None, "experiment": None, "bench": None,
                 "output": ("audit",), "federation": ("wait_timeout_s",),
                 "runtime": ("threads", "client_threads")}


def _changed(value, default):
    """The parts of ``value`` (plain nested dicts) that differ from ``default``."""
    if isinstance(value, dict) and isinstance(default, dict):
        out = {k: _changed(v, default.get(k)) for k, v in value.items()
               if k not in default or v != default[k]}
        return out
    return value


def config_digest(cfg: RunConfig) -> str:
    """Digest of the settings that define a run: only those that differ from the defaults (so
    a new config key, added with its default, leaves old run directories resumable), without
    :data:`NOT_IN_DIGEST`."""
    plain = cfg.to_dict()
    for section, keys in NOT_IN_DIGEST.items():
        if keys is None:
            plain.pop(section, None)
        else:
            for k in keys:
                plain.get(section, {}).pop(k, None)
    changed = _changed(plain, RunConfig().to_dict())
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:16]


def legacy_digest(cfg: RunConfig) -> str:
    """The digest of versions before 2026-11-29 (over the whole config text)."""
    return hashlib.sha256(config_to_text(cfg).encode()).hexdigest()[:16]


def wait_for_nodes(grid: Grid, min_sites: int, timeout: float,
                   log: Callable[[str], None]) -> list[int]:
    t0 = time.perf_counter()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_sites:
            log(f"[server] {len(nodes)} site node(s) connected")
            return nodes
        if time.perf_counter() - t0 > timeout:
            raise FederationError(f"only {len(nodes)} of federation.min_sites={min_sites} site "
                                  f"nodes connected within {timeout:.0f} s")
        time.sleep(1.0)


def exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, group: str,
             timeout: float, on_reply: Callable[[int, Message], None]) -> list[int]:
    """Send one message per node and hand each reply to ``on_reply`` as it arrives (so replies
    can be folded without holding them all). Returns the nodes that did not reply in time."""
    msgs = [Message(content, dst_node_id=node, message_type=message_type, group_id=group)
            for node, content in contents.items()]
    ids = list(grid.push_messages(msgs))
    pending = {mid: node for mid, node in zip(ids, contents) if mid}
    deadline = time.perf_counter() + timeout
    while pending and time.perf_counter() < deadline:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                on_reply(node, reply)
        if pending:
            time.sleep(0.2)
    return list(pending.values())


def check_proxy_arrays(logits: np.ndarray, feats: dict[str, np.ndarray], n: int, hw: tuple,
                       features: list[str]) -> None:
    """ProtocolError unless the decoded proxy reply has the requested shapes and finite values."""
    if logits.shape != (n, 2, *hw):
        raise ProtocolError(f"logits of shape {logits.shape}, expected {(n, 2, *hw)}")
    if not np.isfinite(logits).all():
        raise ProtocolError("logits contain NaN/inf")
    missing = [f for f in features if f not in feats]
    if missing:
        raise ProtocolError(f"feature {missing[0]!r} missing from the reply")
    for name, f in feats.items():
        if f.ndim != 4 or f.shape[0] != n:
            raise ProtocolError(f"feature {name!r} of shape {f.shape}, expected (N={n}, C, h, w)")
        if not np.isfinite(f).all():
            raise ProtocolError(f"feature {name!r} contains NaN/inf")


class Coordinator:
    """Runs the workflow for one run config over one grid (see the module docstring)."""

    def __init__(self, grid: Grid, cfg: RunConfig, log: Callable[[str], None] = LOG.info):
        self.grid, self.cfg, self.log = grid, cfg, log
        torch.set_num_threads(cfg.runtime.threads)  # the server's own torch work (distillation)
        self.run_dir = Path(cfg.output.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.output.audit and grid is not None and not isinstance(grid, AuditGrid):
            self.grid = AuditGrid(grid, self.run_dir / "audit.jsonl")
        self.state = RunState.load(self.run_dir, config_digest(cfg), (legacy_digest(cfg),))
        dump_config(cfg, self.run_dir / "config.yaml")
        self.timeout = cfg.federation.wait_timeout_s
        self.in_channels = input_channels(cfg.data)
        self._proxy = None
        self.new_student()  # a student over its size budget is a config error before any work

    # ---------------------------------------------------------------- helpers
    def new_student(self):
        torch.manual_seed(self.cfg.runtime.seed)
        return build_student(self.cfg.model.student, self.cfg.model.teacher, self.in_channels,
                             self.cfg.model.max_student_fraction)

    def _done(self, step: str, seconds: float) -> None:
        self.state.completed.append(step)
        self.state.timings[step] = seconds
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

    def proxy(self):
        """The server's copy of the public proxy set: (slice ids, images (N, C, H, W), labels
        (N, H, W) or None). Labels are used only to report how good the targets are."""
        if self._proxy is None:
            try:
                vols = load_proxy(self.cfg.data, with_labels=True)
            except DataError:
                vols = load_proxy(self.cfg.data)
            cases = {c.case_id: c for c in vols}
            ids = proxy_slice_ids(cases, self.cfg.data.proxy_slice_step)
            where = [(cases[c], z) for c, z in parse_slice_ids(ids, cases)]
            images = np.stack([slice_stack(c.image, z, self.cfg.data.context_slices)
                               for c, z in where]).astype(np.float32)
            labels = None
            if all(c.label is not None for c in cases.values()):
                labels = np.stack([c.label[z] for c, z in where])
            self._proxy = (ids, images, labels)
        return self._proxy

    @staticmethod
    def target_dice(ids: list[str], probs: np.ndarray, labels: np.ndarray) -> float:
        """Mean over proxy cases of the 3D Dice between the targets' argmax and the truth."""
        pred = probs.argmax(axis=1)
        cases = [i.rpartition("/")[0] for i in ids]
        scores = []
        for case in dict.fromkeys(cases):
            rows = [k for k, c in enumerate(cases) if c == case]
            scores.append(dice_score(pred[rows], labels[rows]))
        return float(np.mean(scores))

    def site_nodes(self) -> dict[int, str]:
        return {int(n): s for n, s in self.state.nodes.items()}

    # ---------------------------------------------------------------- steps
    def train_teachers(self, nodes: list[int]) -> None:
        t0 = time.perf_counter()
        self.state.nodes = {}
        names = {n: f"node {n}" for n in nodes}

        def on_reply(_label: str, reply: Message) -> None:
            site = str(reply.content["info"]["site"])
            self.state.nodes[str(reply.metadata.src_node_id)] = site
            self.state.teachers[site] = m = dict(reply.content["metrics"])
            how = "reused" if m["reused"] else f"{int(m['epochs_run'])} epochs"
            self.log(f"[server] teacher {site}: val Dice {m['val_dice']:.4f} ({how})")

        self._broadcast("train", names, train_request(self.cfg), TRAIN_TEACHER,
                        self.timeout * 10 + 3600, on_reply)
        if len(self.state.nodes) < self.cfg.federation.min_sites:
            raise FederationError(f"only {len(self.state.nodes)} site(s) trained a teacher; "
                                  f"federation.min_sites={self.cfg.federation.min_sites}")
        self._done("train", time.perf_counter() - t0)

    def teachers_to_query(self) -> dict[int, str]:
        nodes = self.site_nodes()
        if self.cfg.aggregation.method != "single":
            return nodes
        wanted = self.cfg.aggregation.single_site or max(
            nodes.values(), key=lambda s: self.state.teachers[s]["val_dice"])
        chosen = {n: s for n, s in nodes.items() if s == wanted}
        if not chosen:
            raise FederationError(f"aggregation.single_site: no connected site {wanted!r} "
                                  f"(sites: {', '.join(nodes.values())})")
        self.log(f"[server] single-teacher distillation from {wanted}")
        return chosen

    def query_and_aggregate(self, rnd: int) -> Targets:
        t0 = time.perf_counter()
        ids, images, labels = self.proxy()
        features = list(self.cfg.model.student.features) if self.cfg.distill.w_feature > 0 else []
        precision = self.cfg.federation.precision
        agg = StreamingAggregator(self.cfg.aggregation, self.run_dir / f"spill_r{rnd}")
        content = query_request(self.cfg, ids, features, precision)
        figures: dict[str, dict] = {}

        def on_reply(site: str, reply: Message) -> None:
            try:
                logits, feats = decode_proxy_reply(reply.content)
                check_proxy_arrays(logits, feats, len(ids), images.shape[-2:], features)
            except (ProtocolError, ValueError, TypeError) as exc:
                self._exclude(f"query_r{rnd}", site, f"malformed reply: {exc}")
                return
            stats = dict(reply.content["stats"])
            probs = torch.from_numpy(logits).softmax(dim=1).numpy()
            agg.add(site, probs, stats["val_dice"], feats)
            figures[site] = {"reply_bytes": stats["reply_bytes"], "val_dice": stats["val_dice"],
                             "proxy_entropy": stats["proxy_entropy"]}
            if "dp_epsilon" in stats:  # rounds of re-queries compose
                figures[site]["epsilon"] = epsilon(stats["dp_noise_multiplier"], len(ids),
                                                   stats["dp_delta"], releases=rnd)
                figures[site]["delta"] = stats["dp_delta"]
            self.log(f"[server] proxy reply from {site}: {stats['reply_bytes'] / 1e6:.2f} MB, "
                     f"entropy {stats['proxy_entropy']:.4f}")

        self._broadcast(f"query_r{rnd}", self.teachers_to_query(), content, QUERY_PROXY,
                        self.timeout * 10 + 600, on_reply)
        if not agg.sites:
            raise FederationError(f"round {rnd}: no usable teacher reply")
        targets = agg.finalize()
        np.savez(self.run_dir / f"targets_r{rnd}.npz", probs=targets.probs,
                 **{f"feat:{k}": v for k, v in targets.features.items()})
        query = {"sites": figures, "site_weights": targets.site_weights,
                 "agreement": targets.agreement, "n_slices": len(ids), "precision": precision}
        if labels is not None:  # synthetic proxy sets ship masks: how good are the targets?
            query["target_dice"] = self.target_dice(ids, targets.probs, labels)
            self.log(f"[server] aggregated targets vs proxy ground truth: Dice "
                     f"{query['target_dice']:.4f}")
        self.state.rounds.setdefault(str(rnd), {})["query"] = query
        self._done(f"query_r{rnd}", time.perf_counter() - t0)
        return targets

    def load_targets(self, rnd: int) -> Targets:
        data = np.load(self.run_dir / f"targets_r{rnd}.npz")
        feats = {k[5:]: data[k] for k in data.files if k.startswith("feat:")}
        return Targets(data["probs"], feats)

    def distill(self, rnd: int, targets: Targets):
        t0 = time.perf_counter()
        student = self.new_student()
        if rnd > 1:
            student.net.load_state_dict(torch.load(self.run_dir / f"student_r{rnd - 1}.pt"))
        _, images, _ = self.proxy()
        history = distill_student(student, images, targets, self.cfg.distill,
                                  self.cfg.student, self.cfg.runtime.seed, self.log,
                                  tag=f"distill r{rnd}")
        torch.save(student.net.state_dict(), self.run_dir / f"student_r{rnd}.pt")
        self.state.rounds.setdefault(str(rnd), {})["distill"] = {"history": history}
        self._done(f"distill_r{rnd}", time.perf_counter() - t0)

    def site_metrics(self, cfg: RunConfig, weights: dict, split: str, step: str,
                     nodes: Optional[dict[int, str]] = None, with_val: bool = False) -> dict:
        """Every site's Dice / HD95 of the student ``weights`` (architecture
        ``cfg.model.student``) on its private ``split``: ``{"sites": {site: metrics},
        "dice_mean": case-weighted mean}`` (``with_val``: and ``val_dice_mean``, the
        case-weighted validation Dice)."""
        content = evaluate_request(cfg, weights, split, with_val)
        results: dict[str, dict] = {}

        def on_reply(label: str, reply: Message) -> None:
            site = str(reply.content["info"]["site"]) if "info" in reply.content else label
            results[site] = dict(reply.content["metrics"])
            self.log(f"[server] {step} at {site}: Dice {results[site]['dice_mean']:.4f} "
                     f"HD95 {results[site]['hd95_mean']:.1f} mm ({split})")

        self._broadcast(step, nodes or self.site_nodes(), content, EVALUATE_STUDENT,
                        self.timeout * 10 + 600, on_reply)
        n = sum(r["n_cases"] for r in results.values())
        out = {"sites": results,
               "dice_mean": sum(r["dice_mean"] * r["n_cases"] for r in results.values()) / n
               if n else float("nan")}
        if with_val:
            nv = sum(r.get("val_n_cases", 0) for r in results.values())
            out["val_dice_mean"] = sum(r["val_dice_mean"] * r["val_n_cases"] for r in
                                       results.values() if "val_n_cases" in r) / nv if nv \
                else float("nan")
        return out

    def evaluate(self, rnd: int, nodes: Optional[dict[int, str]] = None) -> None:
        t0 = time.perf_counter()
        weights = torch.load(self.run_dir / f"student_r{rnd}.pt")
        summary = self.site_metrics(self.cfg, weights, "test", f"evaluate_r{rnd}", nodes,
                                    with_val=True)
        self.state.rounds.setdefault(str(rnd), {})["evaluate"] = summary
        self._done(f"evaluate_r{rnd}", time.perf_counter() - t0)

    def capacity_search(self, targets: Targets) -> None:
        """Distil the candidate students from ``targets``, smallest first (server.capacity)."""
        from common.profile import profile_network
        from server import capacity as cap

        t0 = time.perf_counter()
        c = self.cfg.capacity
        result = self.state.rounds.setdefault("1", {}).setdefault("capacity", {"candidates": {}})
        result.update(dice_target=cap.dice_target(self.cfg, self.state.teachers),
                      max_slice_ms=c.max_slice_ms, max_volume_ms=c.max_volume_ms,
                      volume_slices=c.volume_slices, threads=self.cfg.runtime.threads,
                      sites=sorted(set(self.site_nodes().values())))
        rows = result["candidates"]
        budget = self.cfg.model.max_student_fraction * count_parameters(
            build_teacher(self.cfg.model.teacher, self.in_channels))
        _, images, _ = self.proxy()
        self.log(f"[server] capacity: Dice target {result['dice_target']:.4f}; candidates "
                 + ", ".join(f"{n} ({p:,})" for n, _, p in cap.candidate_specs(self.cfg)))
        for name, spec, params in cap.candidate_specs(self.cfg):
            row = rows.get(name, {})
            if not ("val_dice" in row or "skipped" in row):  # not done before a restart
                row = {"parameters": params, "channels": list(spec.channels)}
                if params > budget:
                    row["skipped"] = "over model.max_student_fraction"
                else:
                    student = cap.new_candidate(self.cfg, spec)
                    history = distill_student(student, images, targets, self.cfg.distill,
                                              self.cfg.student, self.cfg.runtime.seed, self.log,
                                              tag=f"distill {name}")
                    weights = student.net.state_dict()
                    path = self.run_dir / f"capacity_{len(rows)}.pt"
                    torch.save(weights, path)
                    ccfg = cap.student_config(self.cfg, spec)
                    val = self.site_metrics(ccfg, weights, "val", f"capacity/{name}/val")
                    test = self.site_metrics(ccfg, weights, "test", f"capacity/{name}/test")
                    prof = profile_network(student, tuple(self.cfg.data.size), c.volume_slices,
                                           self.cfg.runtime.threads)
                    ok = cap.within_budget(self.cfg, prof)
                    row.update(spec=asdict(spec), weights=path.name, val_dice=val["dice_mean"],
                               test_dice=test["dice_mean"], test=test,
                               site_test_dice={s: m["dice_mean"] for s, m in test["sites"].items()},
                               macs_per_slice=prof["macs_per_slice"], slice_ms=prof["slice_ms"],
                               volume_ms=prof["volume_ms"], within_budget=ok,
                               meets=ok and val["dice_mean"] >= result["dice_target"],
                               distill_loss=history[-1]["loss"])
                    self.log(f"[server] capacity: {name}: val Dice {val['dice_mean']:.4f}, "
                             f"{prof['slice_ms']:.1f} ms/slice, "
                             f"{'meets' if row['meets'] else 'misses'} the target")
                rows[name] = row
                self.state.save(self.run_dir)
            if row.get("meets") and not c.map_all:
                break
        if not any("val_dice" in r for r in rows.values()):
            raise FederationError("capacity: every candidate is over model.max_student_fraction")
        chosen, met = cap.choose(self.cfg, rows)
        result.update(chosen=chosen, met=met)
        shutil.copyfile(self.run_dir / rows[chosen]["weights"], self.run_dir / "student_r1.pt")
        self.state.rounds["1"]["evaluate"] = rows[chosen]["test"]
        cap.capacity_plot(result, self.run_dir / "capacity.png")
        self.log(f"[server] capacity: chose {chosen} ({rows[chosen]['parameters']:,} parameters)"
                 + ("" if met else ": NO candidate meets the target; exporting the best one"))
        self._done("capacity", time.perf_counter() - t0)

    def export_config(self) -> RunConfig:
        """The run config describing the exported student (the chosen capacity candidate)."""
        from server.capacity import chosen_spec, student_config

        spec = chosen_spec(self.state.rounds)
        return self.cfg if spec is None else student_config(self.cfg, spec)

    def weight_sharing(self, nodes: list[int]) -> None:
        """FedAvg / FedProx of the student architecture with Flower's built-in strategies."""
        from flwr.serverapp.strategy import FedAvg, FedProx

        t0 = time.perf_counter()
        fed = self.cfg.federation
        n = max(fed.min_sites, 1)
        kwargs = {"min_train_nodes": n, "min_evaluate_nodes": n, "min_available_nodes": n}
        strategy = (FedProx(proximal_mu=fed.proximal_mu, **kwargs) if fed.strategy == "fedprox"
                    else FedAvg(**kwargs))
        student = self.new_student()
        conf = ConfigRecord({RUN_CONFIG_KEY: config_to_text(self.cfg)})
        self.log(f"[server] {type(strategy).__name__} of the student: {fed.rounds} round(s) of "
                 f"{fed.local_epochs} local epoch(s) on {len(nodes)} site(s)")
        result = strategy.start(self.grid, ArrayRecord(student.net.state_dict()), fed.rounds,
                                self.timeout * 10 + 3600, train_config=conf,
                                evaluate_config=conf)
        if not result.arrays:
            raise FederationError(f"{type(strategy).__name__}: no round produced a model (no "
                                  f"site replied; see the log)")
        state = result.arrays.to_torch_state_dict()
        torch.save(state, self.run_dir / f"student_r{fed.rounds}.pt")
        upload = int(sum(v.numel() * v.element_size() for v in state.values()))
        # per-round validation figures of the sites, and the mean optimizer steps a site took
        steps = {int(r): float(m.get("steps", 0)) for r, m in result.train_metrics_clientapp.items()}
        history = [{"round": int(r), "split": "val", "steps": steps.get(int(r), 0.0),
                    **{k: float(v) for k, v in m.items()}}
                   for r, m in sorted(result.evaluate_metrics_clientapp.items())]
        self.state.rounds.setdefault(str(fed.rounds), {})["weights"] = {
            "strategy": type(strategy).__name__, "history": history,
            "bytes_per_site_round": upload, "sites": len(nodes)}
        self._done("weights", time.perf_counter() - t0)

    # ---------------------------------------------------------------- the run
    def run(self) -> dict:
        t0 = time.perf_counter()
        strategy = self.cfg.federation.strategy
        if strategy in SIMULATION_ONLY:
            raise FederationError(f"federation.strategy={strategy!r} is a baseline on pooled "
                                  f"data: it runs only in `fedkd simulate` / `fedkd experiment`")
        nodes = wait_for_nodes(self.grid, self.cfg.federation.min_sites, self.timeout, self.log)
        if strategy in ("fedavg", "fedprox"):
            rounds = self.cfg.federation.rounds
            if self._pending("weights"):
                self.weight_sharing(nodes)
            if self._pending(f"evaluate_r{rounds}"):
                self.evaluate(rounds, {n: f"node {n}" for n in nodes})
            return self.finish(t0)
        known = set(self.state.nodes)
        if "train" in self.state.completed and known <= {str(n) for n in nodes}:
            self.log("[server] skipping step train (done)")
        else:
            if "train" in self.state.completed:
                self.state.completed.remove("train")
            self.train_teachers(nodes)
        targets: Optional[Targets] = None
        for rnd in range(1, self.cfg.federation.rounds + 1):
            q = rnd if self.cfg.federation.requery_teachers else 1
            if self._pending(f"query_r{q}"):
                targets = self.query_and_aggregate(q)
            if self.cfg.capacity.enabled:  # one round (checked by the config)
                if self._pending("capacity"):
                    self.capacity_search(targets or self.load_targets(q))
                continue
            if self._pending(f"distill_r{rnd}"):
                self.distill(rnd, targets or self.load_targets(q))
            if self._pending(f"evaluate_r{rnd}"):
                self.evaluate(rnd)
        return self.finish(t0)

    def finish(self, t0: float) -> dict:
        """Write the report and export the final student."""
        report = self.report(time.perf_counter() - t0)
        from server.export import export_student

        export_student(self.export_config(), self.run_dir / f"student_r{self.cfg.federation.rounds}.pt",
                       self.run_dir / "export", report, self.log)
        return report

    def report(self, seconds: float) -> dict:
        from server.report import write_report

        student = FeatureNet(self.export_config().model.student, self.in_channels)
        report = {"name": self.cfg.name, "config": self.cfg.to_dict(), "state": self.state.__dict__,
                  "student_parameters": count_parameters(student), "wall_seconds": seconds}
        write_report(report, self.run_dir, self.log)
        return report


def run_federation(grid: Grid, cfg: RunConfig, log: Callable[[str], None] = LOG.info) -> dict:
    return Coordinator(grid, cfg, log).run()
