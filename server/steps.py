"""The steps a method runs with the sites and on the server (a :class:`Coordinator` mixin).

Site steps send one message type to every site (:meth:`~server.runner.Coordinator._broadcast`)
and record the replies in the run state: ``train.teacher`` (:meth:`FederationSteps.train_teachers`),
``query.proxy`` folded into the streaming aggregator as replies arrive
(:meth:`~FederationSteps.query_and_aggregate`), ``train.consensus``, ``evaluate.student``,
``train.adapt`` (Flower's FedAvg / FedProx rounds are
:class:`server.workflow.WeightSharing`'s step).
Server steps read no site data: :meth:`~FederationSteps.distill` (the student on the public
slices, :func:`server.distill.distill_on_proxy`) and :meth:`~FederationSteps.self_train`.

A site that fails (error reply, no reply before the timeout, malformed arrays: wrong shape or
dtype, NaN) is excluded from that step with a logged reason, which the report names.
"""

from __future__ import annotations

import shutil
import time
from typing import Optional

import numpy as np
import torch
from flwr.app import Message

from common.config import RunConfig
from common.metrics import case_weighted_mean
from common.privacy import epsilon
from common.protocol import (
    ADAPT_STUDENT,
    EVALUATE_STUDENT,
    QUERY_PROXY,
    TRAIN_CONSENSUS,
    TRAIN_TEACHER,
    ProtocolError,
    adapt_request,
    consensus_id,
    consensus_request,
    encode_consensus,
    evaluate_request,
    query_request,
    read_teacher_reply,
    reply_encoding,
    train_request,
)
from server.aggregation import Targets, make_aggregator
from server.distill import distill_on_proxy, model_probs
from server.runner import Coordinator, load_targets, reply_site, save_targets
from server.state import FederationError

# A proxy slice within COVERAGE_DISTANCE of some site's own data is "claimed"; the report warns
# when fewer than COVERAGE_WARNING of the slices are. Calibrated on the real federations (3 folds
# each): with RUNMC as the public set 86-98 % of the slices are claimed and the student matches
# FedAvg; with ucl-mr-proxy 18-55 % are and distillation fails (README, real tables).
COVERAGE_DISTANCE = 1.2
COVERAGE_WARNING = 0.7


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


def claimed_per_set(affinity: np.ndarray, proxy) -> dict[str, float]:
    """The share of each public set's slices that one site claims: ``affinity`` (N,) that
    site's distances, ``proxy`` the ProxySet (its ``set_index`` (N,) and ``set_names``)."""
    near = affinity <= COVERAGE_DISTANCE
    return {name: float(near[rows].mean()) for i, name in enumerate(proxy.set_names)
            if (rows := proxy.set_index == i).any()}


class FederationSteps(Coordinator):
    """The steps (see the module docstring); a method's ``run()`` calls them in its order."""

    def train_teachers(self, nodes: list[int]) -> None:
        t0 = time.perf_counter()
        self.state.nodes = {}
        names = {n: f"node {n}" for n in nodes}

        def on_reply(_label: str, reply: Message) -> None:
            site = str(reply.content["info"]["site"])
            self.state.nodes[str(reply.metadata.src_node_id)] = site
            self.state.teachers[site] = m = dict(reply.content["metrics"])
            how = "reused" if m["reused"] else f"{int(m['epochs_run'])} epochs"
            quality = (f"val Dice {m['val_dice']:.4f}" if "val_dice" in m
                       else f"DP-SGD epsilon {m.get('dp_epsilon', float('nan')):.2f}")
            self.log(f"[server] teacher {site}: {quality} ({how})")

        self._broadcast("train", names, train_request(self.cfg), TRAIN_TEACHER,
                        self.timeout * 10 + 3600, on_reply)
        if len(self.state.nodes) < self.cfg.federation.min_sites:
            raise FederationError(f"only {len(self.state.nodes)} site(s) trained a teacher; "
                                  f"federation.min_sites={self.cfg.federation.min_sites}")
        self._done("train", time.perf_counter() - t0)

    def ensure_teachers(self, nodes: list[int]) -> None:
        """Step ``train``, unless a restarted run finds it done by the nodes connected now."""
        if "train" in self.state.completed and set(self.state.nodes) <= {str(n) for n in nodes}:
            self.log("[server] skipping step train (done)")
            return
        if "train" in self.state.completed:
            self.state.completed.remove("train")
        self.train_teachers(nodes)

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
            # reliability: the teacher's validation Dice, 1 where the site withholds it (DP-SGD)
            agg.add(site, probs, stats.get("val_dice", 1.0), feats, affinity, style)
            figures[site] = {"reply_bytes": stats["reply_bytes"], "val_dice": stats.get("val_dice"),
                             "proxy_entropy": stats["proxy_entropy"],
                             "temperature": stats.get("temperature", 1.0),
                             "query_seconds": stats.get("seconds")}
            if affinity is not None:
                figures[site]["affinity_median"] = float(np.median(affinity))
                figures[site]["claimed"] = claimed_per_set(affinity, proxy)
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
