import pytest
import torch

from common.config import ConfigError, ModelSpec, RunConfig
from common.architectures import feature_names
from common.models import FeatureNet, build_student, build_teacher, count_parameters
from server.export import export_program


def test_default_teacher_and_student_sizes():
    cfg = RunConfig()
    teacher = build_teacher(cfg.model.teacher)
    student = build_student(cfg.model.student, cfg.model.teacher)
    n_t, n_s = count_parameters(teacher), count_parameters(student)
    assert 1.5e6 < n_t < 1.7e6
    assert n_s <= 0.05 * n_t


def test_student_over_budget_is_a_config_error():
    cfg = RunConfig()
    with pytest.raises(ConfigError, match=r"model.student: .* of the teacher's .* allows 5.0%"):
        build_student(ModelSpec(channels=[16, 32, 64, 128], strides=[2, 2, 2]), cfg.model.teacher)


@pytest.mark.parametrize("spec,in_ch", [
    (ModelSpec(), 1),
    (ModelSpec(channels=[8, 16, 32, 64], strides=[2, 2, 2], num_res_units=1), 3),
    (ModelSpec(arch="basicunet", channels=[8, 8, 16, 32, 64, 8]), 1),
])
def test_every_feature_map_has_the_declared_channels_and_stride(spec, in_ch):
    spec.features = feature_names(spec)
    net = FeatureNet(spec, in_ch)
    x = torch.randn(2, in_ch, 64, 64)
    logits, feats = net(x)
    assert logits.shape == (2, 2, 64, 64)
    assert set(feats) == set(spec.features)
    for name, f in feats.items():
        tap = net.taps[name]
        assert f.shape == (2, tap.channels, 64 // tap.stride, 64 // tap.stride), name
    # names mean the same resolution in every architecture: enc{k} / dec{k} at stride 2**k
    for name, tap in net.taps.items():
        if name != "bottleneck":
            assert tap.stride == 2 ** int(name[3:])


def test_features_are_fresh_each_call_and_net_exports(tmp_path):
    net = build_teacher(ModelSpec(channels=[4, 8, 16], strides=[2, 2], features=["enc1"]))
    _, f1 = net(torch.zeros(1, 1, 32, 32))
    _, f2 = net(torch.ones(1, 1, 32, 32))
    assert not torch.equal(f1["enc1"], f2["enc1"])
    net.eval()
    export_program(net.export_network(), 1, (32, 32), tmp_path / "n.pt2")
    exported = torch.export.load(str(tmp_path / "n.pt2")).module()
    for batch in (1, 3):                     # the batch axis is dynamic
        x = torch.randn(batch, 1, 32, 32)
        assert torch.allclose(exported(x), net(x)[0], atol=1e-5)


def test_site_teachers_may_differ_in_architecture():
    cfg = RunConfig()
    cfg.model.site_teachers["SiteB"] = ModelSpec(arch="basicunet", channels=[8, 8, 16, 32, 64, 8],
                                                 features=["enc2", "dec2"])
    a, b = build_teacher(cfg.teacher_spec("SiteA")), build_teacher(cfg.teacher_spec("SiteB"))
    fa, fb = a(torch.zeros(1, 1, 64, 64))[1], b(torch.zeros(1, 1, 64, 64))[1]
    assert fa["enc2"].shape[-2:] == fb["enc2"].shape[-2:]
    assert fa["enc2"].shape[1] != fb["enc2"].shape[1]


def test_mac_count_of_known_layers_and_profile_fields():
    from torch import nn

    from common.profile import count_macs, profile_network

    conv = nn.Conv2d(1, 4, 3, padding=1)  # 8x8 outputs x 4 channels x (1 x 3 x 3)
    assert count_macs(conv, torch.zeros(2, 1, 8, 8)) == 8 * 8 * 4 * 9
    up = nn.ConvTranspose2d(4, 2, 2, stride=2)  # 4x4 inputs x 4 channels scatter 2 x (2 x 2)
    assert count_macs(up, torch.zeros(1, 4, 4, 4)) == 4 * 4 * 4 * 2 * 4
    cfg = RunConfig()
    p = profile_network(build_student(cfg.model.student, cfg.model.teacher), (64, 64), depth=8,
                        threads=1, repeats=3)
    assert p["parameters"] == 51777 and p["threads"] == 1 and p["depth"] == 8
    assert p["macs_per_slice"] > 0 and 0 < p["slice_ms"] < p["volume_ms"]
    assert p["statistic"] == "median"
    # the capacity search times a candidate by its fastest pass; an unknown statistic is refused
    fast = profile_network(build_student(cfg.model.student, cfg.model.teacher), (64, 64),
                           depth=8, threads=1, repeats=5, statistic="min")
    assert fast["statistic"] == "min" and 0 < fast["slice_ms"] < fast["volume_ms"]
    with pytest.raises(ValueError, match="statistic"):
        profile_network(build_student(cfg.model.student, cfg.model.teacher), (64, 64),
                        depth=8, repeats=1, statistic="mean")
