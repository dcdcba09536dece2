import math

import numpy as np
import pytest

from common.metrics import dice_score, hd95, summarize


def box(shape, lo, hi):
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


def test_dice_of_overlapping_boxes():
    a = box((4, 20, 20), (0, 0, 0), (4, 10, 10))     # 400 voxels
    b = box((4, 20, 20), (0, 5, 0), (4, 15, 10))     # 400 voxels, 200 shared
    assert dice_score(a, b) == pytest.approx(0.5)
    assert dice_score(a, a) == pytest.approx(1.0)
    assert dice_score(np.zeros_like(a), a) == 0.0
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_hd95_of_a_shifted_box_uses_anisotropic_spacing():
    a = box((6, 30, 30), (1, 5, 5), (5, 15, 15))
    b = box((6, 30, 30), (1, 8, 5), (5, 18, 15))  # shifted by 3 voxels along H (x)
    assert hd95(a, b, (0.5, 1.0, 3.0)) == pytest.approx(1.5, abs=1e-6)
    assert hd95(a, b, (2.0, 1.0, 3.0)) == pytest.approx(6.0, abs=1e-6)
    c = box((6, 30, 30), (2, 5, 5), (6, 15, 15))  # shifted by one slice (D)
    assert hd95(a, c, (1.0, 1.0, 3.0)) == pytest.approx(3.0, abs=1e-6)


def test_hd95_of_empty_prediction_is_the_volume_diagonal():
    gt = box((10, 20, 30), (2, 2, 2), (5, 5, 5))
    diag = math.sqrt((20 * 1.0) ** 2 + (30 * 2.0) ** 2 + (10 * 3.0) ** 2)
    assert hd95(np.zeros_like(gt), gt, (1.0, 2.0, 3.0)) == pytest.approx(diag)
    assert hd95(np.zeros_like(gt), np.zeros_like(gt), (1.0, 1.0, 1.0)) == 0.0


def test_summarize():
    s = summarize([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["median"] == pytest.approx(0.7)
    assert s["min"] == 0.5 and s["max"] == 0.9 and s["n"] == 3
    assert summarize([]) == {}
