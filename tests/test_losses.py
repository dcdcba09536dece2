import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.losses import (FeatureDistillLoss, dice_loss, kd_kl_loss, lovasz_softmax,
                           probs_to_logits)


def jaccard_set_loss(mispredicted: np.ndarray, fg: np.ndarray) -> float:
    """Delta_J(M) = |M| / |Y u M| (Berman et al.), M the mispredicted pixels, Y the class."""
    union = np.logical_or(fg, mispredicted).sum()
    return mispredicted.sum() / union if union else 0.0


def lovasz_extension_brute_force(errors: np.ndarray, fg: np.ndarray) -> float:
    """Lovasz extension as the integral over thresholds t of Delta({i : errors_i >= t}), t in
    [0, 1], evaluated exactly on the piecewise-constant pieces. Independent of sorting tricks."""
    knots = np.unique(np.concatenate([[0.0], errors]))
    total = 0.0
    for lo, hi in zip(knots[:-1], knots[1:]):
        total += (hi - lo) * jaccard_set_loss(errors >= hi, fg)
    return total


def reference_lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor) -> float:
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).numpy()
    y = labels.reshape(-1).numpy()
    per_class = []
    for c in range(probs.shape[1]):
        fg = y == c
        if not fg.any():
            continue
        per_class.append(lovasz_extension_brute_force(np.abs(fg - probs[:, c]), fg))
    return float(np.mean(per_class))


@pytest.mark.parametrize("seed", range(8))
def test_lovasz_softmax_equals_brute_force_lovasz_extension(seed):
    g = torch.Generator().manual_seed(seed)
    k = 2 + seed % 2
    logits = torch.randn(1, k, 2, 3, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, k, (1, 2, 3), generator=g)
    ours = float(lovasz_softmax(logits, labels))
    assert ours == pytest.approx(reference_lovasz_softmax(logits, labels), abs=1e-9)


def test_lovasz_on_binary_vertices_is_the_jaccard_loss():
    # with hard (0/1) probabilities the extension equals the set function itself
    labels = torch.tensor([[[1, 1, 0, 0, 1]]])
    for pred in itertools.product([0, 1], repeat=5):
        p = torch.tensor(pred, dtype=torch.float64)
        probs = torch.stack([1 - p, p])[None, :, None, :]  # (1, 2, 1, 5)
        logits = torch.log(probs.clamp_min(1e-30))
        expected = []
        for c in (0, 1):
            fg = labels.numpy().ravel() == c
            predicted = np.array(pred) == c
            inter, union = (fg & predicted).sum(), (fg | predicted).sum()
            expected.append(1 - inter / union)
        assert float(lovasz_softmax(logits, labels)) == pytest.approx(np.mean(expected), abs=1e-6)


def test_lovasz_gradient_points_towards_the_labels():
    labels = torch.randint(0, 2, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(2, 2, 8, 8, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=5.0)
    start = lovasz_softmax(logits, labels).item()
    for _ in range(30):
        opt.zero_grad()
        lovasz_softmax(logits, labels).backward()
        opt.step()
    assert lovasz_softmax(logits, labels).item() < 0.8 * start
    assert torch.equal(logits.argmax(1), labels)  # every pixel moved to its label's side


def test_kl_is_zero_for_equal_inputs_and_scales_with_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    assert float(kd_kl_loss(s, s, 3.0)) == pytest.approx(0.0, abs=1e-7)
    for temp in (1.0, 2.0, 4.0):
        p, q = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
        manual = (p * (p.log() - q.log())).sum(1).mean() * temp ** 2
        assert float(kd_kl_loss(s, t, temp)) == pytest.approx(float(manual), rel=1e-5)
    probs = F.softmax(t, 1)
    assert float(kd_kl_loss(s, probs_to_logits(probs), 1.0)) == pytest.approx(
        float(kd_kl_loss(s, t, 1.0)), rel=1e-4)


def test_dice_loss_hard_and_one_hot_targets_agree():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    labels = torch.randint(0, 2, (2, 1, 8, 8), generator=g)
    onehot = F.one_hot(labels[:, 0], 2).permute(0, 3, 1, 2).float()
    loss = dice_loss()
    assert float(loss(logits, labels)) == pytest.approx(float(loss(logits, onehot)), rel=1e-5)
    assert float(loss(logits, labels[:, 0])) == pytest.approx(float(loss(logits, labels)), rel=1e-6)
    perfect = onehot * 40 - 20
    assert float(loss(perfect, labels)) < 1e-3 < float(loss(-perfect, labels))


@pytest.mark.parametrize("mode", ["mse", "attention"])
def test_feature_loss_trains_adapter_and_handles_resolution(mode):
    g = torch.Generator().manual_seed(0)
    teacher = {"enc2": torch.randn(2, 32, 16, 16, generator=g),
               "bottleneck": torch.randn(2, 64, 4, 4, generator=g)}
    student = {"enc2": torch.randn(2, 8, 16, 16, generator=g, requires_grad=True),
               "bottleneck": torch.randn(2, 16, 8, 8, generator=g, requires_grad=True),
               "dec1": torch.randn(2, 8, 32, 32, generator=g)}
    loss_fn = FeatureDistillLoss({k: v.shape[1] for k, v in student.items()},
                                 {k: v.shape[1] for k, v in teacher.items()}, mode)
    assert loss_fn.names == ["enc2", "bottleneck"]
    params = [student["enc2"], student["bottleneck"], *loss_fn.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    start = loss_fn(student, teacher).item()
    for _ in range(100):
        opt.zero_grad()
        loss_fn(student, teacher).backward()
        opt.step()
    assert loss_fn(student, teacher).item() < 0.5 * start
    with pytest.raises(ValueError, match="no feature maps in common"):
        FeatureDistillLoss({"dec1": 8}, {"enc2": 32}, mode)
