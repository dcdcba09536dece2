"""The membership-inference audit (simulations.mia): it separates members from non-members of a
deliberately overfit model, and does not for an untrained one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.config import RunConfig, with_overrides
from simulations.mia import attack_metrics, case_losses, lira_scores, write_mia

pytest.importorskip("sklearn")


def test_the_metrics_read_separated_and_identical_scores():
    rng = np.random.default_rng(0)
    sep = attack_metrics(rng.normal(5, 1, 50), rng.normal(0, 1, 50), bootstrap=200)
    assert sep["auc"] > 0.99 and sep["tpr_at_1pct_fpr"] > 0.8 and sep["auc_ci"][0] > 0.95
    same = attack_metrics(rng.normal(0, 1, 50), rng.normal(0, 1, 50), bootstrap=200)
    assert same["auc_ci"][0] < 0.5 < same["auc_ci"][1] and same["members"] == 50
    # LiRA: a case the target fits better than the shadows that never saw it scores higher
    shadow = np.array([[1.0, 1.0, 2.0], [1.2, 0.8, 2.2], [0.9, 1.1, 1.8]])   # (K=3, 3 cases)
    inside = np.array([[False, True, False], [False, False, True], [True, False, False]])
    s = lira_scores(np.array([0.2, 1.0, 2.0]), shadow, inside)
    assert s[0] > 1 and abs(s[1]) < 1 and s[0] > s[2]


def test_an_audit_of_some_methods_keeps_the_earlier_rows_of_the_others(tmp_path):
    def row(method, fold, auc):
        m = {"auc": auc, "auc_ci": [auc - 0.1, auc + 0.1], "tpr_at_1pct_fpr": 0.0,
             "tpr_ci": [0.0, 0.1], "members": 4, "non_members": 3}
        return {"method": method, "seed": 0, "fold": fold, "loss": m}

    write_mia(tmp_path, [row("kd", 0, 0.5), row("fedavg", 0, 0.6)], shadows=4)
    write_mia(tmp_path, [row("kd", 0, 0.7), row("local", 0, 0.8)], shadows=4)
    rows = json.loads((tmp_path / "mia.json").read_text())["rows"]
    assert [(r["method"], r["loss"]["auc"]) for r in rows] == [
        ("fedavg", 0.6), ("kd", 0.7), ("local", 0.8)]
    assert "| local | 1 | 4 / 3 | 0.800 ([0.70, 0.90]) |" in (tmp_path / "mia.md").read_text()
    write_mia(tmp_path, [row("kd", 0, 0.1)], shadows=2)   # other shadows: a new audit
    assert [r["method"] for r in json.loads((tmp_path / "mia.json").read_text())["rows"]] == ["kd"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from common.data import discover_sites, load_case
    from simulations.synthetic import write_dataset

    root = tmp_path_factory.mktemp("mia")
    write_dataset(root, n_sites=1, n_cases=24, n_proxy=1, seed=3, log=lambda s: None)
    cfg = with_overrides(RunConfig(), [("data.root", str(root)), ("data.size", [64, 64]),
                                       ("data.spacing", [2.0, 2.0])])
    (site, records), = discover_sites(cfg.data).items()
    cases = [load_case(r, cfg.data) for r in records]
    return cfg, cases[:12], cases[12:]


def student(cfg):
    from common.models import build_student, input_channels

    torch.manual_seed(0)
    return build_student(cfg.model.student, cfg.model.teacher, input_channels(cfg.data),
                         cfg.model.max_student_fraction)


def test_the_loss_attack_finds_the_members_of_an_overfit_model_and_not_of_an_untrained_one(split):
    from common.training import train_segmenter

    cfg, members, non = split
    untrained = student(cfg)
    blind = attack_metrics(-case_losses(untrained, members), -case_losses(untrained, non),
                           bootstrap=300)
    assert blind["auc_ci"][0] < 0.5 < blind["auc_ci"][1], blind     # nothing to find
    overfit = student(cfg)
    recipe = with_overrides(cfg, ["train.epochs=40", "train.augment=false",
                                  "train.empty_slice_fraction=1.0", "train.lr=0.003"]).train
    train_segmenter(overfit, members, [], recipe, log=lambda s: None)
    found = attack_metrics(-case_losses(overfit, members), -case_losses(overfit, non),
                           bootstrap=300)
    assert found["auc"] > 0.9, found
