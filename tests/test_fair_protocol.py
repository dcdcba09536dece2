"""The comparison protocol: selection, early stopping and per-round evaluation read validation
splits only; every site's test split is read once, by the final evaluation of the final model;
the student recipe is the same for distillation and FedAvg."""

from __future__ import annotations

import json

import pytest

import client.node as node_ops
import client.student as student_ops
import common.training as training
from client.app import app
from common.config import RunConfig, load_config
from common.protocol import EVALUATE_STUDENT
from simulations.synthetic import write_dataset
from server.workflow import run_federation
from simulations.local_grid import LocalGrid

SETTINGS = ["data.size=[64,64]", "data.spacing=[2.0,2.0]",
            "model.teacher.channels=[8,16,32,64]", "model.teacher.strides=[2,2,2]",
            "model.teacher.num_res_units=1", "model.student.channels=[4,8,16,32]",
            "model.student.num_res_units=0", "model.max_student_fraction=0.25",
            "train.epochs=2", "distill.epochs=2", "federation.wait_timeout_s=2"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fair")
    write_dataset(root, n_sites=2, n_cases=6, n_proxy=2, seed=3, log=lambda s: None)
    return root, tmp_path_factory.mktemp("state")


def watched_run(fed, run_dir, monkeypatch, extra=(), tamper=None, students=None):
    """Run a federation and record every evaluation: (which split the site was asked for, or
    'training' inside training, and the case ids evaluated); ``students`` (a list) also gets
    (split, weights) of every student a site evaluates."""
    root, state = fed
    cfg = load_config(None, [*SETTINGS, f"data.root={root}", f"output.run_dir={run_dir}",
                             *extra])
    grid = LocalGrid(app, {1: {"partition-id": 0}, 2: {"partition-id": 1}},
                     {"data-root": str(root), "state-root": str(state)}, tamper=tamper)
    calls: list[tuple[str, str, list[str]]] = []
    phase = {"split": "training"}
    real_eval_cases, real_eval_student = training.evaluate_cases, student_ops.evaluate_student

    def eval_cases(model, cases, *a, **k):
        calls.append((phase["split"], cases[0].site, [c.case_id for c in cases]))
        return real_eval_cases(model, cases, *a, **k)

    def eval_student(cfg, node, state_dict, split="test"):
        phase["split"] = split
        if students is not None:
            students.append((split, {k: v.clone() for k, v in state_dict.items()}))
        try:
            return real_eval_student(cfg, node, state_dict, split)
        finally:
            phase["split"] = "training"

    monkeypatch.setattr(training, "evaluate_cases", eval_cases)
    monkeypatch.setattr(student_ops, "evaluate_cases", eval_cases)
    monkeypatch.setattr(student_ops, "evaluate_student", eval_student)
    run_federation(grid, cfg, lambda s: None)
    test_ids = {}
    for i in (0, 1):
        node = node_ops.resolve_node({"partition-id": i}, {"data-root": str(root)}, cfg)
        data = node_ops.load_private(cfg, node)
        test_ids[node.site] = {c.case_id for c in data.test}
        assert test_ids[node.site].isdisjoint({c.case_id for c in data.train + data.val})
    return cfg, grid, calls, test_ids


def check_test_read_once_at_the_end(grid, calls, test_ids):
    reads = [(split, site, ids) for split, site, ids in calls if set(ids) & test_ids[site]]
    # every read of a test case is the final evaluation, once per site, on exactly its test split
    assert [split for split, _, _ in reads] == ["test", "test"]
    assert sorted(site for _, site, _ in reads) == sorted(test_ids)
    for _, site, ids in reads:
        assert set(ids) == test_ids[site]
    # the final evaluation reads each site's validation cases (for a learning-rate search's
    # choice), then its test cases; nothing else is evaluated then or after
    final = calls[-4:]
    assert [split for split, _, _ in final] == ["val", "test", "val", "test"]
    assert all(set(ids).isdisjoint(test_ids[site]) for split, site, ids in final if split == "val")
    types = [m.metadata.message_type for m in grid.sent]
    assert types[-2:] == [EVALUATE_STUDENT] * 2 and types.count(EVALUATE_STUDENT) == 2


def test_fedavg_reads_validation_every_round_and_test_once(fed, tmp_path, monkeypatch):
    cfg, grid, calls, test_ids = watched_run(
        fed, tmp_path, monkeypatch, ["federation.strategy=fedavg", "federation.rounds=2"])
    check_test_read_once_at_the_end(grid, calls, test_ids)
    per_round = [c for c in calls[:-4] if c[0] == "val"]
    assert len(per_round) == 2 * 2  # 2 rounds x 2 sites, on their validation cases
    assert all(set(ids).isdisjoint(test_ids[site]) for _, site, ids in per_round)


def test_fedavg_round_selection_reads_validation_only_and_keeps_that_round(fed, tmp_path,
                                                                           monkeypatch):
    """federation.select_round: the round with the best sites' validation Dice is the model
    the sites test (once, at the end), not the last round. The sites' round-1 validation
    replies are raised to 0.9 (the others to 0.1), so the choice must be round 1."""
    import torch
    from flwr.app import MetricRecord

    evaluated = {"n": 0}

    def favour_round_1(node, reply):
        if reply.metadata.message_type == "evaluate" and reply.has_content():
            evaluated["n"] += 1
            m = reply.content["metrics"]
            reply.content["metrics"] = MetricRecord(
                {**dict(m), "dice": 0.9 if evaluated["n"] <= 2 else 0.1})
        return reply

    students: list = []
    cfg, grid, calls, test_ids = watched_run(
        fed, tmp_path, monkeypatch, ["federation.strategy=fedavg", "federation.rounds=3",
                                     "federation.select_round=true"],
        tamper=favour_round_1, students=students)
    check_test_read_once_at_the_end(grid, calls, test_ids)
    weights = json.loads((tmp_path / "report.json").read_text())["state"]["rounds"]["3"]["weights"]
    assert weights["selection"] == {"round": 1, "val_dice": {"1": 0.9, "2": 0.1, "3": 0.1}}
    per_round = [w for split, w in students[:6]]   # 3 rounds x 2 sites, validation
    assert [split for split, _ in students] == ["val"] * 6 + ["val", "test"] * 2
    final = students[-1][1]
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)   # noqa: E731
    assert same(final, per_round[0]) and not same(final, per_round[-1])
    assert same(final, torch.load(tmp_path / "student_r3.pt"))
    assert "Round 1 kept" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("candidate_round_*.pt"))   # the rounds' spills are removed


def test_distillation_reads_test_once_and_teachers_stop_on_validation(fed, tmp_path, monkeypatch):
    cfg, grid, calls, test_ids = watched_run(fed, tmp_path, monkeypatch)
    check_test_read_once_at_the_end(grid, calls, test_ids)
    ev = json.loads((tmp_path / "report.json").read_text())["state"]["rounds"]["1"]["evaluate"]
    assert 0 <= ev["val_dice_mean"] <= 1 and all("val_n_cases" in m for m in ev["sites"].values())
    early = [c for c in calls if c[0] == "training"]
    assert len(early) == 2 * cfg.train.epochs  # each teacher's epochs on its validation cases
    assert all(set(ids).isdisjoint(test_ids[site]) for _, site, ids in early)


def test_one_student_recipe_for_distillation_and_fedavg():
    cfg = load_config(None, ["student.lr=0.01", "student.batch_size=4", "train.lr=0.5",
                             "student.empty_slice_fraction=0.1", "train.intensity_augment=strong"])
    local = cfg.student_train(epochs=1)
    assert (local.lr, local.batch_size, local.empty_slice_fraction) == (0.01, 4, 0.1)
    assert local.intensity_augment == "scanner" and local.augment   # the student's, not train's
    assert RunConfig().student.lr == 0.005


def test_learning_rate_search_selects_on_validation_only(tmp_path):
    from simulations.experiment import method_configs, select_by_validation

    cfg = load_config(None, [f"output.run_dir={tmp_path}", "experiment.folds=2",
                             "experiment.student_lrs=[0.001,0.01]",
                             "experiment.methods={kd: [], fedavg: [federation.strategy=fedavg], "
                             "local: [federation.strategy=local]}"])
    runs = method_configs(cfg)
    names = [n for n, _, c in runs if c.data.fold == 0]
    assert names == ["kd@lr=0.001", "kd@lr=0.01", "fedavg@lr=0.001", "fedavg@lr=0.01", "local"]
    assert runs[1][2].student.lr == 0.01 and runs[1][2].output.run_dir.endswith("kd/lr_0.01/seed_0/fold_0")
    # per (method, seed, fold) the best validation Dice wins, whatever the test Dice says
    rows = [{"method": "kd", "seed": 0, "fold": f, "lr": lr, "val_dice": v, "dice_mean": t}
            for f, lr, v, t in [(0, 0.001, 0.6, 0.1), (0, 0.01, 0.5, 0.9),
                                (1, 0.001, 0.4, 0.8), (1, 0.01, 0.7, 0.2)]]
    rows.append({"method": "local", "seed": 0, "fold": 0, "lr": None, "val_dice": None,
                 "dice_mean": 0.5})
    chosen = select_by_validation(rows)
    assert [(r["fold"], r["lr"]) for r in chosen if r["method"] == "kd"] == [(0, 0.001), (1, 0.01)]
    assert rows[-1] in chosen


def test_consensus_refinement_selects_on_validation_and_test_is_read_once(fed, tmp_path,
                                                                        monkeypatch):
    """A consensus round refines each teacher choosing its epoch on the site's validation
    cases; the test split is still read once, at the end."""
    cfg, grid, calls, test_ids = watched_run(fed, tmp_path, monkeypatch,
                                             ["consensus.rounds=1", "consensus.epochs=2"])
    check_test_read_once_at_the_end(grid, calls, test_ids)
    early = [c for c in calls if c[0] == "training"]
    # each teacher's epochs (reused from the previous test's state: none) and its refinement's
    assert len(early) in (2 * cfg.consensus.epochs, 2 * (cfg.train.epochs + cfg.consensus.epochs))
    assert all(set(ids).isdisjoint(test_ids[site]) for _, site, ids in early)


def test_central_baselines_start_where_the_federated_runs_start(fed, tmp_path, monkeypatch):
    """central-kd with the public start: its pooled teacher first trains train.public_init_epochs
    on the public masks (as every site's teacher does), and its student starts from student.
    proxy_pretrain_epochs on them (as the kd and FedAvg students do); without them, neither."""
    from simulations import baselines

    root, _ = fed
    seen = []
    real = training.train_segmenter

    def watch(model, train, val, tcfg, *a, tag="", **k):
        seen.append((tag, tcfg.epochs, len(train), len(val)))
        return real(model, train, val, tcfg, *a, tag=tag, **k)

    monkeypatch.setattr(baselines, "train_segmenter", watch)
    monkeypatch.setattr(training, "train_segmenter", watch)   # server.distill's pretraining
    for start in (0, 3):
        seen.clear()
        cfg = load_config(None, [*SETTINGS, f"data.root={root}", "federation.strategy=central-kd",
                                 f"train.public_init_epochs={start}",
                                 f"student.proxy_pretrain_epochs={start}",
                                 f"output.run_dir={tmp_path}/run{start}",
                                 f"output.state_root={tmp_path}/state{start}"])
        baselines.run_baseline(cfg)
        publics = [s for s in seen if s[3] == 0]           # no validation: the public masks
        if not start:
            assert publics == [] and [s[0] for s in seen] == ["central teacher"]
            continue
        assert publics == [("central teacher, public start", 3, 2, 0), ("proxy pretrain", 3, 2, 0)]
        assert seen[1][0] == "central teacher" and seen[1][3] > 0    # then the pooled splits
        report = json.loads((tmp_path / "run3" / "report.json").read_text())
        assert report["state"]["teachers"]["central"]["public_start_epochs"] == 3
        assert report["state"]["rounds"]["1"]["pretrain"]["epochs"] == 3
