"""The comparison protocol: selection, early stopping and per-round evaluation read validation
splits only; every site's test split is read once, by the final evaluation of the final model;
the student recipe is the same for distillation and FedAvg."""

from __future__ import annotations

import pytest

import client.site as site_ops
import common.training as training
from client.app import app
from common.config import RunConfig, load_config
from common.protocol import EVALUATE_STUDENT
from common.synthetic import write_dataset
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


def watched_run(fed, run_dir, monkeypatch, extra=()):
    """Run a federation and record every evaluation: (which split the site was asked for, or
    'training' inside training, and the case ids evaluated)."""
    root, state = fed
    cfg = load_config(None, [*SETTINGS, f"data.root={root}", f"output.run_dir={run_dir}",
                             *extra])
    grid = LocalGrid(app, {1: {"partition-id": 0}, 2: {"partition-id": 1}},
                     {"data-root": str(root), "state-root": str(state)})
    calls: list[tuple[str, str, list[str]]] = []
    phase = {"split": "training"}
    real_eval_cases, real_eval_student = training.evaluate_cases, site_ops.evaluate_student

    def eval_cases(model, cases, *a, **k):
        calls.append((phase["split"], cases[0].site, [c.case_id for c in cases]))
        return real_eval_cases(model, cases, *a, **k)

    def eval_student(cfg, node, state_dict, split="test"):
        phase["split"] = split
        try:
            return real_eval_student(cfg, node, state_dict, split)
        finally:
            phase["split"] = "training"

    monkeypatch.setattr(training, "evaluate_cases", eval_cases)
    monkeypatch.setattr(site_ops, "evaluate_cases", eval_cases)
    monkeypatch.setattr(site_ops, "evaluate_student", eval_student)
    run_federation(grid, cfg, lambda s: None)
    test_ids = {}
    for i in (0, 1):
        node = site_ops.resolve_node({"partition-id": i}, {"data-root": str(root)}, cfg)
        data = site_ops.load_private(cfg, node)
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
    assert calls[-2:] == reads  # nothing is evaluated after them
    types = [m.metadata.message_type for m in grid.sent]
    assert types[-2:] == [EVALUATE_STUDENT] * 2 and types.count(EVALUATE_STUDENT) == 2


def test_fedavg_reads_validation_every_round_and_test_once(fed, tmp_path, monkeypatch):
    cfg, grid, calls, test_ids = watched_run(
        fed, tmp_path, monkeypatch, ["federation.strategy=fedavg", "federation.rounds=2"])
    check_test_read_once_at_the_end(grid, calls, test_ids)
    per_round = [c for c in calls if c[0] == "val"]
    assert len(per_round) == 2 * 2  # 2 rounds x 2 sites, on their validation cases
    assert all(set(ids).isdisjoint(test_ids[site]) for _, site, ids in per_round)


def test_distillation_reads_test_once_and_teachers_stop_on_validation(fed, tmp_path, monkeypatch):
    cfg, grid, calls, test_ids = watched_run(fed, tmp_path, monkeypatch)
    check_test_read_once_at_the_end(grid, calls, test_ids)
    early = [c for c in calls if c[0] == "training"]
    assert len(early) == 2 * cfg.train.epochs  # each teacher's epochs on its validation cases
    assert all(set(ids).isdisjoint(test_ids[site]) for _, site, ids in early)


def test_one_student_recipe_for_distillation_and_fedavg():
    cfg = load_config(None, ["student.lr=0.01", "student.batch_size=4", "train.lr=0.5",
                             "student.empty_slice_fraction=0.1", "train.intensity_augment=strong"])
    local = cfg.student_train(epochs=1)
    assert (local.lr, local.batch_size, local.empty_slice_fraction) == (0.01, 4, 0.1)
    assert local.intensity_augment == "standard" and local.augment
    assert RunConfig().student.lr == 0.005
