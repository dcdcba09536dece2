"""The coordinator's workflow over a Flower ``Grid`` (Message API).

wait for >= ``federation.min_sites`` nodes -> ``train.teacher`` at every site -> for each round:
``query.proxy`` (round 1, and later rounds if ``federation.requery_teachers``) folded into the
streaming aggregator as replies arrive -> with ``consensus.rounds``, that many times:
``train.consensus`` (the targets back to the sites, which refine a copy of their teacher on them)
and ``query.proxy`` of the refined teachers -> distil the student on the proxy images ->
``evaluate.student`` at every site -> with ``adapt.enabled``, ``train.adapt``: every site
fine-tunes the final student on its private data and keeps it (metrics return) -> report and
export (of the federation's student; the adapted ones never leave their sites).

Checkpoints: after each completed step the state goes to ``RUN_DIR/state.json``
(:mod:`server.state`; + targets and student files). A restarted server with the same run directory skips completed steps; sites keep
their teacher checkpoints, so a repeated ``train.teacher`` only confirms them.

With ``federation.strategy: fedavg | fedprox`` the same server runs the weight-sharing baseline
instead: Flower's built-in ``FedAvg`` / ``FedProx`` strategy trains the student architecture
for ``federation.rounds`` rounds of ``federation.local_epochs`` site epochs, then every site
evaluates the result exactly as it evaluates a distilled student. ``feddf`` (FedDF, Lin et al.
2020) runs those FedAvg rounds, then one distillation round (round ``federation.rounds + 1``)
that starts from the FedAvg student: a separate method, because its student weights leave the
sites, unlike ``kd`` where only proxy outputs do. The pooled-data baselines
(``local``, ``central*``) exist only in simulation (:mod:`simulations.baselines`).

A site that fails (error reply, no reply before the timeout, malformed arrays: wrong shape or
dtype, NaN) is excluded from that step with a logged reason, which the report names.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.aggregation import Targets, make_aggregator
from common.config import SIMULATION_ONLY, ConfigError, RunConfig, dump_config
from common.logs import get_logger
from common.metrics import case_weighted_mean
from common.models import FeatureNet, build_student, count_parameters, input_channels
from common.privacy import epsilon
from common.provenance import provenance
from common.protocol import (
    ADAPT_STUDENT,
    EVALUATE_STUDENT,
    QUERY_PROXY,
    RUN_CONFIG_KEY,
    TRAIN_CONSENSUS,
    TRAIN_TEACHER,
    ProtocolError,
    adapt_request,
    config_to_text,
    consensus_id,
    consensus_request,
    encode_consensus,
    evaluate_request,
    query_request,
    read_teacher_reply,
    reply_encoding,
    train_request,
)
from server import capacity
from server.audit import AuditGrid
from server.distill import distill_on_proxy, model_probs, pretrain_on_proxy
from server.messaging import exchange, wait_for_nodes
from server.proxy import ProxySet, load_proxy_set
from server.state import FederationError, RunState, config_digest

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

# A proxy slice within COVERAGE_DISTANCE of some site's own data is "claimed"; the report warns
# when fewer than COVERAGE_WARNING of the slices are. Calibrated on the real federations (3 folds
# each): with RUNMC as the public set 86-98 % of the slices are claimed and the student matches
# FedAvg; with ucl-mr-proxy 18-55 % are and distillation fails (README, real tables).
COVERAGE_DISTANCE = 1.2
COVERAGE_WARNING = 0.7


def method_round(cfg: RunConfig) -> int:
    """The round of the method's own last student: ``federation.rounds``; with ``feddf`` the
    distillation after the FedAvg rounds is one round more."""
    rounds = cfg.federation.rounds
    return rounds + 1 if cfg.federation.strategy == "feddf" else rounds


def final_round(cfg: RunConfig) -> int:
    """The round of a run's final student: :func:`method_round`, and one more with
    ``federation.self_train`` (the server's self-training on the proxy set)."""
    return method_round(cfg) + int(cfg.federation.self_train)


def proxy_coverage(claim: np.ndarray) -> dict:
    """How much of the proxy set the sites recognise as like their own data: ``claim`` (N,) is
    each slice's smallest site affinity distance (1 ~ a site's own unseen slices). A proxy set
    that no site claims cannot carry the sites' knowledge to the student (the report says so)."""
    claimed = float((claim <= COVERAGE_DISTANCE).mean())
    out = {"claimed": claimed, "median": float(np.median(claim)), "threshold": COVERAGE_DISTANCE}
    if claimed < COVERAGE_WARNING:
        out["warning"] = (f"only {claimed:.0%} of the proxy slices look like any site's data: "
                          f"this proxy set is unlikely to carry the sites' knowledge; choose a "
                          f"public set closer to the sites' scanners")
    return out


class Coordinator:
    """Runs the workflow for one run config over one grid (see the module docstring)."""

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

    # ---------------------------------------------------------------- helpers
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

    def query_and_aggregate(self, rnd: int, consensus: int = 0) -> Targets:
        """Step ``query_r{rnd}`` (``consensus`` c > 0: ``query_c{c}``, the answer of the
        teachers refined in consensus round c): query every teacher, fold the replies, keep the
        targets (``RUN_DIR/targets_{tag}/``, memory-mapped) and the figures."""
        t0 = time.perf_counter()
        tag = f"c{consensus}" if consensus else f"r{rnd}"
        record = self.state.rounds.setdefault(str(rnd), {})
        teacher = record["consensus"][str(consensus)]["id"] if consensus else ""
        proxy = self.proxy()
        ids, images, labels = proxy.ids, proxy.images, proxy.labels
        features = list(self.cfg.model.student.features) if self.cfg.distill.w_feature > 0 else []
        precision = self.cfg.federation.precision
        auto = self.cfg.aggregation.method == "auto"
        spill = self.run_dir / f"spill_{tag}"   # the running sums, on disk (memory-mapped)
        agg = make_aggregator(self.cfg.aggregation, spill)
        content = query_request(self.cfg, ids, features, precision, teacher=teacher)
        figures: dict[str, dict] = {}

        def on_reply(site: str, reply: Message) -> None:
            try:
                probs, feats, affinity, style = read_teacher_reply(
                    reply.content, self.cfg, len(ids), images.shape[-2:], features)
            except (ProtocolError, ValueError, TypeError) as exc:
                self._exclude(f"query_{tag}", site, f"malformed reply: {exc}")
                return
            stats = dict(reply.content["stats"])
            agg.add(site, probs, stats["val_dice"], feats, affinity, style)
            figures[site] = {"reply_bytes": stats["reply_bytes"], "val_dice": stats["val_dice"],
                             "proxy_entropy": stats["proxy_entropy"],
                             "temperature": stats.get("temperature", 1.0),
                             "query_seconds": stats.get("seconds")}
            if affinity is not None:
                figures[site]["affinity_median"] = float(np.median(affinity))
            if "dp_epsilon" in stats:  # rounds of re-queries (and consensus answers) compose
                figures[site]["epsilon"] = epsilon(stats["dp_noise_multiplier"], len(ids),
                                                   stats["dp_delta"], releases=rnd + consensus,
                                                   parts=int(stats.get("dp_parts", 1)))
                figures[site]["delta"] = stats["dp_delta"]
            self.log(f"[server] proxy reply from {site}: {stats['reply_bytes'] / 1e6:.2f} MB, "
                     f"entropy {stats['proxy_entropy']:.4f}")

        self._broadcast(f"query_{tag}", self.teachers_to_query(), content, QUERY_PROXY,
                        self.timeout * 10 + 600, on_reply)
        if not agg.sites:
            raise FederationError(f"query_{tag}: no usable teacher reply")
        if auto and labels is None:   # nothing to choose by: the first candidate
            targets = agg.finalize()
            self.log(f"[server] aggregation auto: the proxy set has no masks to choose by; "
                     f"using the first candidate, {agg.chosen}")
        elif auto:   # the candidate whose targets agree best with the public masks
            targets = agg.finalize(proxy.target_dice)
            self.log("[server] aggregation auto: targets vs the proxy masks " + ", ".join(
                f"{m} {d:.4f}" for m, d in agg.scores.items()) + f"; using {agg.chosen}")
        else:
            targets = agg.finalize()
        query = {"sites": figures, "site_weights": targets.site_weights,
                 "agreement": targets.agreement, "n_slices": len(ids),
                 "slices_per_set": proxy.slices_per_set(), "n_labelled": proxy.n_labelled,
                 "blank_slices": proxy.blank, "precision": precision,
                 "encoding": reply_encoding(self.cfg, precision, bool(features))}
        if auto:
            query["auto"] = {"scores": agg.scores, "chosen": agg.chosen}
        if targets.claim is not None:
            query["coverage"] = proxy_coverage(targets.claim)
            self.log(f"[server] proxy coverage: {query['coverage']['claimed']:.0%} of the slices "
                     f"within distance {COVERAGE_DISTANCE:g} of some site "
                     f"(median {query['coverage']['median']:.2f})")
            if "warning" in query["coverage"]:
                self.log(f"[server] WARNING: {query['coverage']['warning']}")
        if labels is not None:  # synthetic proxy sets ship masks: how good are the targets?
            query["target_dice"] = (agg.scores[agg.chosen] if auto   # scored when chosen
                                    else proxy.target_dice(targets.probs))
            self.log(f"[server] aggregated targets vs proxy ground truth: Dice "
                     f"{query['target_dice']:.4f} ({proxy.n_labelled} slices with masks)")
        if consensus:
            record["consensus"][str(consensus)]["query"] = query
        else:
            record["query"] = query
        save_targets(targets, self.run_dir / f"targets_{tag}")
        del targets, agg
        shutil.rmtree(spill, ignore_errors=True)
        self._done(f"query_{tag}", time.perf_counter() - t0)
        return self.load_targets(tag)

    def consensus(self, rnd: int, c: int, targets: Targets) -> None:
        """Step ``consensus_c{c}`` of round ``rnd``: ``train.consensus`` with ``targets``' gland
        probability on the proxy slices; every queried site refines a copy of its teacher on it
        (metrics return; ``rounds[rnd]["consensus"][c]``)."""
        t0 = time.perf_counter()
        ids = self.proxy().ids
        stream = encode_consensus(targets.probs[:, 1:2], self.cfg.reply)
        results: dict[str, dict] = {}

        def on_reply(label: str, reply: Message) -> None:
            site = reply_site(label, reply)
            m = results[site] = dict(reply.content["metrics"])
            self.log(f"[server] consensus_c{c} at {site}: teacher val Dice "
                     f"{m['val_dice_before']:.4f} -> {m['val_dice_after']:.4f} "
                     f"(epoch {int(m['best_epoch'])})")

        self.log(f"[server] consensus round {c}: the targets ({stream.nbytes / 1e6:.2f} MB) to "
                 f"every site; each refines a copy of its teacher for {self.cfg.consensus.epochs} "
                 f"epoch(s)")
        self._broadcast(f"consensus_c{c}", self.teachers_to_query(),
                        consensus_request(self.cfg, ids, stream), TRAIN_CONSENSUS,
                        self.timeout * 10 + 3600, on_reply)
        if not results:
            raise FederationError(f"consensus round {c}: no site refined its teacher")
        self.state.rounds.setdefault(str(rnd), {}).setdefault("consensus", {})[str(c)] = {
            "id": consensus_id(stream, self.cfg), "bytes": int(stream.nbytes), "sites": results}
        self._done(f"consensus_c{c}", time.perf_counter() - t0)

    def load_targets(self, tag: str) -> Targets:
        """The targets a query step kept (``tag``: r{round} or c{consensus round}),
        memory-mapped."""
        return load_targets(self.run_dir / f"targets_{tag}")

    def distill(self, rnd: int, targets: Targets):
        t0 = time.perf_counter()
        if rnd > 1:
            student = self.new_student()
            student.net.load_state_dict(torch.load(self.run_dir / f"student_r{rnd - 1}.pt"))
        else:
            student = self.initial_student()
        proxy = self.proxy()
        every, epochs = self.cfg.distill.select_every, self.cfg.distill.epochs
        candidates: dict[int, dict] = {}
        if every and rnd > 1:   # a refinement may also keep the weights it started from
            candidates[0] = {k: v.clone() for k, v in student.net.state_dict().items()}

        def keep(epoch: int, net) -> None:
            if every and (epoch % every == 0 or epoch == epochs):
                candidates[epoch] = {k: v.clone() for k, v in net.net.state_dict().items()}

        history = distill_on_proxy(student, proxy, targets, self.cfg, self.log,
                                   tag=f"distill r{rnd}", on_epoch=keep)
        record: dict = {"history": history}
        weights = student.net.state_dict()
        if candidates:
            val = {e: self.site_metrics(self.cfg, w, "val", f"select_r{rnd}/epoch_{e}")["dice_mean"]
                   for e, w in candidates.items()}
            best = max(val, key=lambda e: (val[e], e))
            weights = candidates[best]
            record["selection"] = {"val_dice": {str(e): v for e, v in val.items()}, "epoch": best}
            self.log(f"[server] distillation r{rnd}: epoch {best} chosen on the sites' "
                     f"validation Dice ({val[best]:.4f}; candidates "
                     + ", ".join(f"{e}: {v:.4f}" for e, v in val.items()) + ")")
        torch.save(weights, self.run_dir / f"student_r{rnd}.pt")
        self.state.rounds.setdefault(str(rnd), {})["distill"] = record
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
            site = reply_site(label, reply)
            results[site] = dict(reply.content["metrics"])
            self.log(f"[server] {step} at {site}: Dice {results[site]['dice_mean']:.4f} "
                     f"HD95 {results[site]['hd95_mean']:.1f} mm ({split})")

        self._broadcast(step, nodes or self.site_nodes(), content, EVALUATE_STUDENT,
                        self.timeout * 10 + 600, on_reply)
        out = {"sites": results, "dice_mean": case_weighted_mean(results)}
        if with_val:
            out["val_dice_mean"] = case_weighted_mean(results, "val_dice_mean", "val_n_cases")
        return out

    def evaluate(self, rnd: int, nodes: Optional[dict[int, str]] = None) -> None:
        t0 = time.perf_counter()
        weights = torch.load(self.run_dir / f"student_r{rnd}.pt")
        summary = self.site_metrics(self.cfg, weights, "test", f"evaluate_r{rnd}", nodes,
                                    with_val=True)
        self.state.rounds.setdefault(str(rnd), {})["evaluate"] = summary
        self._done(f"evaluate_r{rnd}", time.perf_counter() - t0)

    def adapt(self, rnd: int, nodes: Optional[dict[int, str]] = None) -> None:
        """``train.adapt``: every site fine-tunes the final student on its private data and keeps
        it; the sites' metrics (Dice before / after on validation and test) are recorded as
        ``rounds[rnd]["adapt"]``."""
        t0 = time.perf_counter()
        cfg = self.export_config()
        weights = torch.load(self.run_dir / f"student_r{rnd}.pt")
        results: dict[str, dict] = {}

        def on_reply(label: str, reply: Message) -> None:
            site = reply_site(label, reply)
            m = results[site] = dict(reply.content["metrics"])
            test = (f", test {m['dice_mean_before']:.4f} -> {m['dice_mean_after']:.4f}"
                    if "dice_mean_after" in m else "")
            self.log(f"[server] adapt_r{rnd} at {site}: val Dice {m['val_dice_before']:.4f} -> "
                     f"{m['val_dice_after']:.4f} (epoch {m['best_epoch']}){test}")

        self.log(f"[server] site adaptation: {cfg.adapt.epochs} epoch(s) at every site; the "
                 f"adapted students stay at the sites")
        self._broadcast(f"adapt_r{rnd}", nodes or self.site_nodes(), adapt_request(cfg, weights),
                        ADAPT_STUDENT, self.timeout * 10 + 3600, on_reply)
        tested = {s: m for s, m in results.items() if "dice_mean_after" in m}
        self.state.rounds.setdefault(str(rnd), {})["adapt"] = {
            "sites": results,
            "dice_mean_before": case_weighted_mean(tested, "dice_mean_before"),
            "dice_mean": case_weighted_mean(tested, "dice_mean_after"),
            "val_dice_mean": case_weighted_mean(results, "val_dice_after", "val_cases")}
        self._done(f"adapt_r{rnd}", time.perf_counter() - t0)

    def export_config(self) -> RunConfig:
        """The run config describing the exported student (the chosen capacity candidate)."""
        spec = capacity.chosen_spec(self.state.rounds)
        return self.cfg if spec is None else capacity.student_config(self.cfg, spec)

    @property
    def final_round(self) -> int:
        return final_round(self.cfg)

    def weight_sharing(self, nodes: list[int]) -> None:
        """FedAvg / FedProx of the student architecture with Flower's built-in strategies."""
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
        steps = {int(r): float(m.get("steps", 0)) for r, m in result.train_metrics_clientapp.items()}
        history = [{"round": int(r), "split": "val", "steps": steps.get(int(r), 0.0),
                    **{k: float(v) for k, v in m.items()}}
                   for r, m in sorted(result.evaluate_metrics_clientapp.items())]
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

    # ---------------------------------------------------------------- the run
    def run(self) -> dict:
        strategy = self.cfg.federation.strategy
        if strategy in SIMULATION_ONLY:
            raise FederationError(f"federation.strategy={strategy!r} is a baseline on pooled "
                                  f"data: it runs only in `fedkd simulate` / `fedkd experiment`")
        self.check_proxy_masks()
        nodes = wait_for_nodes(self.grid, self.cfg.federation.min_sites, self.timeout, self.log)
        final, labels = self.final_round, {n: f"node {n}" for n in nodes}
        if strategy in ("fedavg", "fedprox"):
            if self._pending("weights"):
                self.weight_sharing(nodes)
            return self.finish_rounds(final, labels)
        if strategy == "feddf" and self._pending("weights"):
            self.weight_sharing(nodes)   # FedAvg rounds first: student weights leave the sites
        known = set(self.state.nodes)
        if "train" in self.state.completed and known <= {str(n) for n in nodes}:
            self.log("[server] skipping step train (done)")
        else:
            if "train" in self.state.completed:
                self.state.completed.remove("train")
            self.train_teachers(nodes)
        targets: Optional[Targets] = None
        last = method_round(self.cfg)
        first = last if strategy == "feddf" else 1
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
            if rnd < last and self._pending(f"evaluate_r{rnd}"):   # per round, before the last
                self.evaluate(rnd)
        if self.cfg.capacity.enabled:
            return self.finish()
        return self.finish_rounds(final)

    def finish_rounds(self, final: int, nodes: Optional[dict[int, str]] = None
                      ) -> dict:
        """After the method's rounds: with ``federation.self_train`` the self-training round
        ``final``; the test evaluation of the final student; site adaptation; the report."""
        if self.cfg.federation.self_train and self._pending(f"distill_r{final}"):
            self.self_train(final)
        if self._pending(f"evaluate_r{final}"):
            self.evaluate(final, nodes)
        if self.cfg.adapt.enabled and self._pending(f"adapt_r{final}"):
            self.adapt(final, nodes)
        return self.finish()

    def self_train(self, rnd: int) -> None:
        """``federation.self_train``: the server labels the public proxy set with the method's
        final student (its own softmax, ``RUN_DIR/targets_self/``) and distils that student
        toward its labels, starting from itself (step ``distill_r{rnd}``: the ``distill``
        recipe and budget, no feature targets). No site data is read and nothing is sent: for
        FedAvg, what its user can do with the same unlabelled public data."""
        student = self.new_student()
        student.net.load_state_dict(torch.load(self.run_dir / f"student_r{rnd - 1}.pt"))
        folder = self.run_dir / "targets_self"
        model_probs(student, self.proxy().images, folder)   # folder/probs.npy
        self.log(f"[server] self-training: the student labelled {len(self.proxy())} proxy slices")
        targets = load_targets(folder)
        shared = sorted(self.run_dir.glob("targets_[rc]*/styles.npy"))   # the sites' styles
        targets.styles = np.load(shared[-1]) if shared else None
        self.distill(rnd, targets)

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


def run_federation(grid: Grid, cfg: RunConfig, log: Callable[[str], None] = LOG.info) -> dict:
    return Coordinator(grid, cfg, log).run()
