"""Server-side distillation (server.distill): the student learns its targets, and the recipe's
options do what they say."""
import numpy as np
import pytest
import torch

from server.aggregation import Targets
from common.config import DistillConfig, ModelSpec, StudentConfig
from common.losses import kd_kl_loss
from common.metrics import dice_score
from common.models import FeatureNet
from server.distill import distill_student


def blobs(n=48, size=32, seed=0):
    """Images (n, 1, size, size) of a brighter ellipse on noise, and its mask (n, size, size);
    a third of the slices hold no gland."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = rng.normal(0.3, 0.05, (n, 1, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.int64)
    for i in range(n):
        if i % 3 == 0:
            continue
        cy, cx = rng.uniform(10, size - 10, 2)
        ry, rx = rng.uniform(3, 7, 2)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        masks[i] = m
        images[i, 0][m] += 0.35
    return images.clip(0, 1), masks


def soft_targets(masks, confidence=0.85):
    fg = np.where(masks == 1, confidence, 1 - confidence).astype(np.float32)
    return np.stack([1 - fg, fg], axis=1)


def student():
    torch.manual_seed(0)
    return FeatureNet(ModelSpec(channels=[8, 16, 32], strides=[2, 2], num_res_units=0,
                                features=[]), 1)


def test_distilled_student_reaches_a_floor_set_by_its_targets():
    """Targets as good as the truth (argmax Dice 1, soft 0.85/0.15): a working recipe gets the
    student within reach of them; a broken one (no gradient from the targets, a flipped target,
    background collapse) stays far below."""
    images, masks = blobs()
    targets = Targets(soft_targets(masks))
    net = student()
    hist = distill_student(net, images, targets, DistillConfig(epochs=10, w_feature=0,
                                                               soft_dice=True,
                                                               kl_foreground_weight=2.0),
                           StudentConfig(augment=False, empty_slice_fraction=1.0),
                           log=lambda s: None)
    with torch.no_grad():
        pred = net(torch.from_numpy(images))[0].argmax(dim=1).numpy()
    target_dice = dice_score(targets.probs.argmax(axis=1), masks)
    assert target_dice == 1.0
    assert dice_score(pred, masks) >= 0.8 * target_dice
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    assert hist[0]["slices"] == len(images) and hist[0]["steps"] == 6


def test_slices_that_no_site_claims_are_left_out():
    images, masks = blobs(n=12)
    claim = np.array([1.0, 1.2, 5.0, 0.9, 4.0, 1.1, 1.0, 9.0, 1.3, 1.0, 1.0, 2.5], np.float32)
    targets = Targets(soft_targets(masks), claim=claim)
    cfg = DistillConfig(epochs=1, w_feature=0, max_claim_distance=2.0)
    logs = []
    hist = distill_student(student(), images, targets, cfg,
                           StudentConfig(augment=False, empty_slice_fraction=1.0),
                           log=logs.append)
    assert hist[0]["slices"] == int((claim <= 2.0).sum()) == 8
    assert any("4 of 12 proxy slices left out" in line for line in logs)
    with pytest.raises(ValueError, match="no proxy slice within"):
        distill_student(student(), images, Targets(soft_targets(masks), claim=claim + 10), cfg,
                        log=lambda s: None)


def test_foreground_weighted_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    assert float(kd_kl_loss(s, t, 2.0, torch.ones(2, 4, 4))) == pytest.approx(
        float(kd_kl_loss(s, t, 2.0)), rel=1e-6)
    one = torch.zeros(2, 4, 4)
    one[1, 2, 3] = 5.0                     # all the weight on one pixel: that pixel's KL
    ps, pt = s[1:, :, 2:3, 3:4], t[1:, :, 2:3, 3:4]
    assert float(kd_kl_loss(s, t, 1.0, one)) == pytest.approx(float(kd_kl_loss(ps, pt, 1.0)),
                                                             rel=1e-5)


def test_proxy_pretraining_learns_the_public_masks_and_needs_them(tiny_synth, tmp_path):
    """student.proxy_pretrain_epochs: the server's starting student is trained on the public
    proxy set's own masks (for distillation and FedAvg alike); a proxy without masks is a
    ConfigError naming the folder."""
    import shutil

    from common.config import ConfigError, with_overrides, RunConfig
    from common.data import load_proxy
    from common.training import evaluate_cases
    from server.distill import pretrain_on_proxy

    cfg = with_overrides(RunConfig(), [f"data.root={tiny_synth}", "data.size=[64,64]",
                                       "data.spacing=[2.0,2.0]", "student.proxy_pretrain_epochs=20",
                                       "student.intensity_augment=standard"])
    proxy = list(load_proxy(cfg.data, with_labels=True).values())
    net = FeatureNet(cfg.model.student, 1)
    before = evaluate_cases(net, proxy, with_hd95=False)["dice"]["mean"]
    record = pretrain_on_proxy(net, cfg, log=lambda s: None)
    after = evaluate_cases(net, proxy, with_hd95=False)["dice"]["mean"]
    assert record["cases"] == len(proxy) and record["epochs"] == 20 and record["steps"] > 0
    # measured 0.04 -> 0.57-0.66 over four initialisations (an all-background student: 0.0)
    assert after >= 0.45 and after > before + 0.3, (before, after)

    bare = tmp_path / "bare"
    shutil.copytree(tiny_synth / "PROXY", bare)
    for f in bare.glob("*_segmentation*"):
        f.unlink()
    with pytest.raises(ConfigError, match=r"proxy_pretrain_epochs.*bare"):
        pretrain_on_proxy(net, with_overrides(cfg, [f"data.proxy={bare}"]), log=lambda s: None)
    # the coordinator says so before any work (no site is contacted: the grid is never used)
    from server.workflow import run_federation

    for setting, named in (("student.proxy_pretrain_epochs=2", "student.proxy_pretrain_epochs"),
                           ("distill.proxy_label_weight=0.5", "distill.proxy_label_weight")):
        bad = with_overrides(cfg, [f"data.proxy={bare}", "student.proxy_pretrain_epochs=0",
                                   setting, f"output.run_dir={tmp_path / 'run'}"])
        with pytest.raises(ConfigError, match=rf"{named} needs the public "
                                              rf"proxy set's masks.*bare"):
            run_federation(None, bad, log=lambda s: None)


def test_proxy_masks_mixed_into_the_targets():
    from server.distill import mix_labels

    _, masks = blobs(n=6, size=32)
    teachers = Targets(np.full((6, 2, 32, 32), 0.5, np.float32), claim=np.arange(6.0))
    for w in (0.0, 0.25, 1.0):
        mixed = mix_labels(teachers, masks, w)
        assert np.allclose(mixed.probs.sum(axis=1), 1.0) and mixed.probs.dtype == np.float32
        assert np.allclose(mixed.probs[:, 1], 0.5 * (1 - w) + w * masks)
        assert mixed.claim is teachers.claim
    with pytest.raises(ValueError, match="proxy masks of shape"):
        mix_labels(teachers, masks[:, :8], 0.5)
