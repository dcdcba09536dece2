"""DP-SGD (common.dp, Opacus): the accounting, a DP teacher and DP FedAvg rounds at a site, and
the settings refused because they would leave the guarantee."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, RunConfig, load_config, with_overrides
from common.dp import dp_plan, noise_multiplier, spent_epsilon

pytest.importorskip("opacus")


def test_the_noise_spends_exactly_the_target_epsilon_by_the_opacus_accountant():
    from opacus.accountants import RDPAccountant

    q, steps, delta = 32 / 640, 400, 1e-5
    for target in (1.0, 4.0, 8.0):
        sigma = noise_multiplier(target, delta, q, steps)
        acc = RDPAccountant()
        for _ in range(steps):                       # step by step, as Opacus records them
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert acc.get_epsilon(delta) == pytest.approx(target, abs=0.02)
        assert spent_epsilon(sigma, q, steps, delta) == pytest.approx(acc.get_epsilon(delta),
                                                                      rel=1e-9)
    # more noise for a smaller epsilon; the plan counts ceil(n / batch) steps an epoch
    assert noise_multiplier(1.0, delta, q, steps) > noise_multiplier(8.0, delta, q, steps) > 0.3
    cfg = with_overrides(RunConfig(), ["privacy.dp_sgd_epsilon=4", "privacy.dp_sgd_batch_size=32",
                                       "reply.calibrate=false"])
    plan = dp_plan(650, cfg.privacy, epochs_in_run=20)
    assert plan["dp_steps_in_run"] == 20 * 21 and plan["dp_sample_rate"] == pytest.approx(1 / 21)
    assert plan["dp_epsilon"] == pytest.approx(4.0, abs=0.02) and plan["dp_unit"] == "slice"


@pytest.fixture(scope="module")
def site(tiny_synth, tmp_path_factory):
    from client.node import resolve_node

    state = tmp_path_factory.mktemp("dp_state")
    cfg = with_overrides(RunConfig(), [
        ("data.root", str(tiny_synth)), ("data.size", [64, 64]), ("data.spacing", [2.0, 2.0]),
        "privacy.dp_sgd_epsilon=8", "privacy.dp_sgd_batch_size=16", "reply.calibrate=false",
        "train.epochs=3", "federation.rounds=2", "runtime.threads=2"])
    node = resolve_node({"partition-id": 0},
                        {"data-root": str(tiny_synth), "state-root": str(state)}, cfg)
    return cfg, node


def test_a_dp_teacher_reports_its_epsilon_and_withholds_what_dp_does_not_cover(site):
    from client.node import load_proxy_cases
    from client.teacher import answer_proxy_query, train_teacher
    from common.slices import proxy_slice_ids

    cfg, node = site
    m = train_teacher(cfg, node, log=lambda s: None)
    assert "val_dice" not in m and m["epochs_run"] == 3 and not m["reused"]
    assert m["dp_epsilon"] == pytest.approx(8.0, abs=0.05)
    # the figure reported is what Opacus's accountant recorded for the steps it took
    assert m["dp_epsilon_this_call"] == pytest.approx(m["dp_epsilon_opacus"], rel=1e-6)
    assert m["dp_steps"] == m["dp_steps_in_run"] > 0
    again = train_teacher(cfg, node, log=lambda s: None)          # the checkpoint is reused
    assert again["reused"] and again["dp_epsilon"] == m["dp_epsilon"]
    # a DP teacher is another teacher: the non-DP settings do not reuse it
    from client.teacher import teacher_key
    from client.node import load_private, site_train_config

    plain = with_overrides(cfg, ["privacy.dp_sgd_epsilon=0"])
    data = load_private(cfg, node)
    assert teacher_key(cfg, node, site_train_config(cfg, node), data) != \
        teacher_key(plain, node, site_train_config(plain, node), data)
    ids = proxy_slice_ids(load_proxy_cases(cfg, node))[:8]
    logits, feats, stats = answer_proxy_query(cfg, node, ids, [], "float32")
    assert "val_dice" not in stats and stats["temperature"] == 1.0
    assert "affinity" not in logits and stats["n_slices"] == 8


def test_dp_fedavg_rounds_spend_the_budget_over_the_run(site):
    from client.student import train_student_local
    from common.models import build_student, input_channels

    cfg, node = site
    torch.manual_seed(0)
    student = build_student(cfg.model.student, cfg.model.teacher, input_channels(cfg.data),
                            cfg.model.max_student_fraction)
    state = student.net.state_dict()
    seen = []
    for rnd in (1, 2):
        state, m = train_student_local(cfg, node, state, rnd)
        seen.append(m["dp_epsilon_so_far"])
        assert m["dp_epsilon"] == pytest.approx(8.0, abs=0.05) and m["steps"] > 0
    assert 0 < seen[0] < seen[1] == pytest.approx(8.0, abs=0.05)   # round 2 of 2: all of it
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize("setting, needle", [
    (["federation.strategy=feddf"], "not 'feddf'"),
    (["reply.calibrate=true"], "reply.calibrate fits a temperature"),
    (["reply.calibrate=false", "consensus.rounds=1"], "consensus.rounds refines"),
    (["reply.calibrate=false", "privacy.noise_multiplier=0.1"], "choose one mechanism"),
    (["federation.strategy=fedavg", "federation.select_round=true"], "select_round needs"),
])
def test_settings_outside_the_guarantee_are_refused(setting, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle):
        with_overrides(RunConfig(), ["privacy.dp_sgd_epsilon=4", *setting])
    assert load_config(None).privacy.dp_sgd_epsilon == 0.0     # off by default


def test_a_public_start_is_what_lets_dp_sgd_learn(site, tmp_path):
    """From random weights DP-SGD on a site's few slices learns little; from a teacher trained
    on the public masks (no privacy cost) it keeps and refines what those taught."""
    from client.node import load_private, resolve_node
    from client.teacher import load_teacher, train_teacher
    from common.training import evaluate_cases

    cfg, node = site
    train_teacher(cfg, node, log=lambda s: None)     # the random start (reused if trained)
    started = with_overrides(cfg, ["train.public_init_epochs=6"])
    node2 = resolve_node({"partition-id": 0}, {"data-root": str(cfg.data.root),
                                               "state-root": str(tmp_path)}, started)
    m = train_teacher(started, node2, log=lambda s: None)
    assert m["dp_epsilon"] == pytest.approx(8.0, abs=0.05)
    val = load_private(cfg, node).val
    dice = {name: evaluate_cases(load_teacher(c, n)[0], val, with_hd95=False)["dice"]["mean"]
            for name, c, n in (("random", cfg, node), ("public", started, node2))}
    assert dice["public"] > dice["random"] + 0.2 and dice["public"] > 0.4, dice
