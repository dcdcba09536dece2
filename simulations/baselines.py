"""Baselines that read several sites' data in one process (simulation only).

``federation.strategy`` selects one, a small class each (:data:`BASELINES`):

* ``local``            every site's own teacher (the KD runs' teacher checkpoints, reused), tested
                       on every site's test split: the cross-site matrix. The headline figure of
                       site k is its own teacher's Dice there.
* ``central``          one teacher-architecture network trained on the pooled train splits of all
                       sites (model selection on the pooled validation splits): an upper bound.
* ``central-student``  the same with the student architecture.
* ``central-kd``       single-teacher KD: the student distilled on the proxy set from the
                       ``central`` teacher (same distillation code and settings as the federated
                       runs).

The pooled networks start where the federated runs start: a teacher from ``train.
public_init_epochs`` on the public masks, a student from ``student.proxy_pretrain_epochs``.

Each writes the same ``report.json`` / ``report.md`` as a federated run (the per-site figures
under ``state.rounds["1"].evaluate``), and its final network to ``RUN_DIR/model.pt`` together
with ``RUN_DIR/model.json`` (which architecture). :func:`evaluate_unseen` tests any final
network on sites outside the federation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from client.node import Node, load_private, load_unsplit_cases, resolve_node
from client.teacher import load_teacher, train_teacher
from server.aggregation import StreamingAggregator
from server.report import write_report
from common.config import ModelSpec, RunConfig, dump_config, proxy_set_paths
from common.data import CaseVolume, discover_sites
from common.provenance import data_fingerprint, provenance
from common.models import FeatureNet, build_student, count_parameters, input_channels
from common.metrics import case_weighted_mean
from common.training import evaluate_cases, load_checkpoint, summary_metrics, train_segmenter


def site_nodes(cfg: RunConfig) -> list[Node]:
    """The federation's sites as the Simulation Engine's partitions see them."""
    return [resolve_node({"partition-id": i}, {}, cfg) for i in range(len(discover_sites(cfg.data)))]


def unseen_nodes(cfg: RunConfig) -> list[Node]:
    """The ``experiment.unseen_sites`` folders (relative to ``data.root``; named after the
    folder)."""
    root = Path(cfg.data.root)
    return [Node(Path(s).name, root / s, "liu", tuple(proxy_set_paths(cfg.data)),
                 Path(cfg.output.state_root) / Path(s).name, None)
            for s in cfg.experiment.unseen_sites]


def test_metrics(model: torch.nn.Module, cases: list[CaseVolume], cfg: RunConfig) -> dict:
    return summary_metrics(evaluate_cases(model, cases, cfg.data.context_slices))


def evaluate_unseen(cfg: RunConfig, model: torch.nn.Module) -> dict[str, dict]:
    """Dice / HD95 of ``model`` on every case of each ``experiment.unseen_sites`` site."""
    out = {}
    for node in unseen_nodes(cfg):
        out[node.site] = test_metrics(model, load_unsplit_cases(cfg, node), cfg)
    return out


def _pooled(cfg: RunConfig, nodes: list[Node]) -> tuple[list[CaseVolume], list[CaseVolume]]:
    datas = [load_private(cfg, n) for n in nodes]
    return [c for d in datas for c in d.train], [c for d in datas for c in d.val]


def train_central(cfg: RunConfig, spec: ModelSpec, kind: str, log: Callable[[str], None]
                  ) -> tuple[FeatureNet, dict]:
    """A network of ``spec`` trained on the pooled splits; its checkpoint lives in
    ``output.state_root/central-KIND/seed_S`` and is reused by runs with the same settings."""
    nodes = site_nodes(cfg)
    train, val = _pooled(cfg, nodes)
    torch.manual_seed(cfg.runtime.seed)
    model = FeatureNet(spec, input_channels(cfg.data))
    # the recipe, and the start the federated runs give the same architecture: a teacher's
    # train.public_init_epochs, a student's student.proxy_pretrain_epochs (on the public masks)
    if kind == "teacher":
        tcfg, start, named = cfg.train, cfg.train.public_init_epochs, "train.public_init_epochs"
    else:
        tcfg, start = cfg.student_train(public_init_epochs=0), cfg.student.proxy_pretrain_epochs
        named = "student.proxy_pretrain_epochs"
    setting = {"spec": asdict(spec), "train": tcfg.fingerprint(), "seed": cfg.runtime.seed,
               "data": [cfg.data.spacing, cfg.data.size, cfg.data.context_slices],
               "files": data_fingerprint([n.data_folder for n in nodes]),
               "cases": [c.case_id for c in train + val]}
    if start:   # where it starts: the public sets' content (and a student's start epochs)
        setting["public"] = data_fingerprint(proxy_set_paths(cfg.data))
        if kind == "student":
            setting["proxy_pretrain_epochs"] = start
    key = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()
    path = Path(cfg.output.state_root) / f"central-{kind}" / f"seed_{cfg.runtime.seed}" / "model.pt"
    if start and load_checkpoint(path, key) is None:    # a fresh network (else the checkpoint's)
        from server.distill import train_on_public_masks
        train_on_public_masks(model, cfg, dataclasses.replace(tcfg, epochs=start, patience=start),
                              named, log, tag=f"central {kind}, public start")
    res = train_segmenter(model, train, val, tcfg, cfg.data.context_slices,
                          cfg.runtime.seed, log=log, tag=f"central {kind}",
                          checkpoint=path, checkpoint_key=key)
    info = {"val_dice": res.best_val_dice, "train_cases": len(train), "val_cases": len(val),
            "public_start_epochs": start,
            "epochs_run": res.epochs_run, "seconds": res.seconds, "reused": int(res.reused),
            "history": res.history}
    return model, info


@torch.no_grad()
def proxy_outputs(model: FeatureNet, images: np.ndarray, batch: int = 32
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Probabilities (N, 2, H, W) and feature maps {name: (N, C, h, w)} on the proxy images."""
    model.eval()
    probs, feats = [], {}
    for start in range(0, len(images), batch):
        logits, f = model(torch.from_numpy(np.array(images[start:start + batch], np.float32)))
        probs.append(logits.softmax(dim=1).numpy())
        for k, v in f.items():
            feats.setdefault(k, []).append(v.numpy())
    return np.concatenate(probs), {k: np.concatenate(v) for k, v in feats.items()}


def _per_site(cfg: RunConfig, model: torch.nn.Module, nodes: list[Node]) -> dict[str, dict]:
    """Every site's test figures, with its validation Dice (``val_dice_mean``, ``val_n_cases``)
    as a federated run's final evaluation reports them."""
    out = {}
    for n in nodes:
        data = load_private(cfg, n)
        out[n.site] = test_metrics(model, data.test, cfg)
        if data.val:
            val = summary_metrics(evaluate_cases(model, data.val, cfg.data.context_slices,
                                                 with_hd95=False))
            out[n.site].update(val_dice_mean=val["dice_mean"], val_n_cases=val["n_cases"])
    return out


def final_model(cfg: RunConfig) -> FeatureNet:
    """The final network of a finished run of ``cfg``: ``RUN_DIR/model.pt`` of a pooled-data
    baseline (architecture in ``model.json``), else the federation's ``student_rR.pt`` (for a
    capacity search, the chosen candidate's architecture)."""
    from server.capacity import chosen_spec
    from server.workflow import final_round

    run_dir = Path(cfg.output.run_dir)
    weights = run_dir / "model.pt"
    if weights.is_file():
        arch = json.loads((run_dir / "model.json").read_text())["arch"]
        spec = cfg.model.teacher if arch == "teacher" else cfg.model.student
    else:
        weights = run_dir / f"student_r{final_round(cfg)}.pt"
        rounds = json.loads((run_dir / "state.json").read_text())["rounds"]
        spec = chosen_spec(rounds) or cfg.model.student
    model = FeatureNet(spec, input_channels(cfg.data))
    model.net.load_state_dict(torch.load(weights))
    model.eval()
    return model


def _save(run_dir: Path, model: FeatureNet, arch: str) -> None:
    torch.save(model.net.state_dict(), run_dir / "model.pt")
    (run_dir / "model.json").write_text(json.dumps({"arch": arch}))


class PooledBaseline:
    """One pooled-data baseline run (simulation only): ``run()`` trains and tests it and writes
    the same report as a federated run; a subclass per ``federation.strategy``."""

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.run_dir = Path(cfg.output.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        torch.set_num_threads(cfg.runtime.threads)
        self.nodes = site_nodes(cfg)
        self.teachers: dict = {}
        self.record: dict = {}   # the report's state.rounds["1"]

    def train(self) -> tuple[torch.nn.Module, dict[str, dict]]:
        """The baseline's final network and every site's test figures."""
        raise NotImplementedError

    def run(self) -> dict:
        t0 = time.perf_counter()
        model, sites = self.train()
        self.record["evaluate"] = {
            "sites": sites, "dice_mean": case_weighted_mean(sites),
            "val_dice_mean": case_weighted_mean(sites, "val_dice_mean", "val_n_cases")}
        strategy = self.cfg.federation.strategy
        report = {"name": self.cfg.name, "config": self.cfg.to_dict(),
                  "state": {"completed": [strategy], "nodes": {}, "teachers": self.teachers,
                            "excluded": {}, "rounds": {"1": self.record}, "timings": {}},
                  "student_parameters": count_parameters(model),
                  "wall_seconds": time.perf_counter() - t0, "provenance": provenance(self.cfg)}
        write_report(report, self.run_dir, self.log)
        return report


class Local(PooledBaseline):
    """``local``: every site's own teacher, tested on every site (the cross-site matrix) and
    on the unseen sites; a site's headline figure is its own teacher's on its own test split."""

    def train(self):
        cfg, matrix, unseen = self.cfg, {}, {}
        for node in self.nodes:
            self.teachers[node.site] = train_teacher(cfg, node, log=self.log)
            model, _ = load_teacher(cfg, node)
            matrix[node.site] = _per_site(cfg, model, self.nodes)
            unseen[node.site] = evaluate_unseen(cfg, model)
            self.log(f"[local] teacher {node.site}: " + ", ".join(
                f"{s} {m['dice_mean']:.3f}" for s, m in matrix[node.site].items()))
        self.record["local"] = {
            "matrix": {t: {s: m["dice_mean"] for s, m in row.items()} for t, row in matrix.items()},
            "unseen": {t: {s: m["dice_mean"] for s, m in row.items()} for t, row in unseen.items()}}
        self.record["unseen"] = {
            s: {"dice_mean": float(np.mean([unseen[t][s]["dice_mean"] for t in unseen])),
                "hd95_mean": float(np.mean([unseen[t][s]["hd95_mean"] for t in unseen])),
                "n_cases": next(iter(unseen.values()))[s]["n_cases"]}
            for s in (n.site for n in unseen_nodes(cfg))}
        return model, {s: matrix[s][s] for s in matrix}


class Central(PooledBaseline):
    """``central`` (teacher architecture) / ``central-student``: one network on the pooled
    train splits, selected on the pooled validation splits."""

    def pooled(self) -> tuple[FeatureNet, dict]:
        cfg = self.cfg
        if cfg.federation.strategy in ("central", "central-kd"):
            model, info = train_central(cfg, cfg.model.teacher, "teacher", self.log)
        else:
            student = build_student(cfg.model.student, cfg.model.teacher, input_channels(cfg.data),
                                    cfg.model.max_student_fraction)
            model, info = train_central(cfg, student.spec, "student", self.log)
        self.teachers["central"] = {k: v for k, v in info.items() if k != "history"}
        self.record["central"] = {"history": info["history"]}
        return model, info

    def train(self):
        model, _ = self.pooled()
        return self.finish(model, "teacher" if self.cfg.federation.strategy == "central"
                           else "student")

    def finish(self, model: FeatureNet, arch: str):
        """Test ``model`` at every site and on the unseen sites; keep it as ``model.pt``."""
        sites = _per_site(self.cfg, model, self.nodes)
        self.record["unseen"] = evaluate_unseen(self.cfg, model)
        _save(self.run_dir, model, arch)
        return model, sites


class CentralKD(Central):
    """``central-kd``, the ceiling of the distillation: the ``central`` teacher's targets on the
    same public slices, distilled by the federated runs' code (``distill_on_proxy``)."""

    def train(self):
        from server.distill import distill_on_proxy
        from server.proxy import load_proxy_set

        cfg = self.cfg
        teacher, info = self.pooled()
        proxy = load_proxy_set(cfg.data, self.run_dir / "proxy_cache")
        probs, feats = proxy_outputs(teacher, proxy.images)
        # one teacher: nothing to weigh (every method gives its probabilities)
        agg = StreamingAggregator(dataclasses.replace(cfg.aggregation, method="mean"))
        agg.add("central", probs, info["val_dice"],
                {k: feats[k] for k in cfg.model.student.features if k in feats}
                if cfg.distill.w_feature > 0 else {})
        targets = agg.finalize()
        query = {"sites": {}, "site_weights": targets.site_weights,
                 "agreement": targets.agreement, "n_slices": len(proxy),
                 "slices_per_set": proxy.slices_per_set(), "n_labelled": proxy.n_labelled,
                 "precision": "float32"}
        if proxy.labels is not None:
            query["target_dice"] = proxy.target_dice(targets.probs)
        torch.manual_seed(cfg.runtime.seed)   # the coordinator's student, as in kd
        student = build_student(cfg.model.student, cfg.model.teacher, input_channels(cfg.data),
                                cfg.model.max_student_fraction)
        if cfg.student.proxy_pretrain_epochs:     # and the same start (server.distill)
            from server.distill import pretrain_on_proxy
            self.record["pretrain"] = pretrain_on_proxy(student, cfg, self.log)
        history = distill_on_proxy(student, proxy, targets, cfg, self.log,
                                   tag="central-kd distill")
        self.record.update(query=query, distill={"history": history})
        return self.finish(student, "student")


BASELINES: dict[str, type[PooledBaseline]] = {
    "local": Local, "central": Central, "central-student": Central, "central-kd": CentralKD}


def run_baseline(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    """Run the pooled-data baseline ``federation.strategy``; returns the run report."""
    return BASELINES[cfg.federation.strategy](cfg, log).run()
