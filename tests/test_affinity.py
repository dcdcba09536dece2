"""Per-slice affinity and temperature calibration (common.affinity), and their wire format."""
import numpy as np
import pytest
import torch

from common.affinity import AffinityReference, fit_temperature, slice_embedding
from common.protocol import AFFINITY, LOGITS, ProtocolError, decode_affinity


def test_slice_embedding_pools_mean_and_std_per_channel():
    f = torch.zeros(2, 3, 4, 4)
    f[0, 1] = 2.0
    f[1, 2, :2] = 1.0                         # half the map at 1: mean 0.5, std 0.5
    e = slice_embedding(f)
    assert e.shape == (2, 6)
    assert e[0, 1] == pytest.approx(2.0) and e[0, 4] == pytest.approx(0.0)
    assert e[1, 2] == pytest.approx(0.5) and e[1, 5] == pytest.approx(0.5)


def test_distance_is_one_on_own_unseen_data_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    train, val, test = (rng.normal(0, 1, (n, 16)) for n in (200, 60, 60))
    ref = AffinityReference(train, val, k=5)
    assert np.median(ref.distance(val)) == pytest.approx(1.0)
    assert 0.85 < np.median(ref.distance(test)) < 1.15           # same scanner, unseen slices
    shifted = [np.median(ref.distance(test + s)) for s in (0.5, 1.5, 3.0)]
    assert shifted[0] > 1.05 and shifted[1] > 1.6 and shifted[2] > 2.5
    assert shifted == sorted(shifted)
    one = AffinityReference(train[:3], np.empty((0, 16)), k=5)  # no validation: leave-one-out
    assert one.k == 3 and np.isfinite(one.distance(test)).all()
    with pytest.raises(ValueError, match="at least 2"):
        AffinityReference(train[:1], val)


def test_fit_temperature_recovers_the_overconfidence():
    gen = torch.Generator().manual_seed(0)
    true_logit = torch.randn(64, 1, 8, 8, generator=gen) * 2          # calibrated log-odds
    labels = (torch.rand(64, 8, 8, generator=gen) < torch.sigmoid(true_logit[:, 0])).long()
    logits = torch.cat([torch.zeros_like(true_logit), true_logit], dim=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.15)
    assert fit_temperature(logits * 3, labels) == pytest.approx(3.0, rel=0.15)  # overconfident
    assert fit_temperature(logits / 2, labels) == pytest.approx(0.5, rel=0.15)  # underconfident


class _Array:
    def __init__(self, a):
        self.a = a

    def numpy(self):
        return self.a


@pytest.mark.parametrize("bad, why", [
    (np.ones(3, np.float32), "shape"),
    (np.array([1, 2, 3, 4], np.int64), "dtype"),
    (np.array([1.0, np.nan, 1.0, 1.0], np.float32), "NaN"),
    (np.array([1.0, -1.0, 1.0, 1.0], np.float32), "negative"),
])
def test_malformed_affinity_is_refused(bad, why):
    with pytest.raises(ProtocolError, match=why):
        decode_affinity({LOGITS: {AFFINITY: _Array(bad)}}, 4)
    good = np.array([0.5, 1.0, 2.0, 9.0], np.float32)
    assert np.array_equal(decode_affinity({LOGITS: {AFFINITY: _Array(good)}}, 4), good)
    assert decode_affinity({LOGITS: {}}, 4) is None


def test_proxy_coverage_warns_when_no_site_recognises_the_proxy():
    from server.steps import proxy_coverage

    near = proxy_coverage(np.array([0.9, 1.0, 1.1, 1.15, 2.5], np.float32))
    assert near["claimed"] == 0.8 and "warning" not in near
    far = proxy_coverage(np.array([1.1, 1.3, 1.4, 4.0], np.float32))
    assert far["claimed"] == 0.25 and far["median"] == pytest.approx(1.35)
    assert "unlikely to carry the sites' knowledge" in far["warning"]


def test_each_site_claims_a_share_of_each_public_set():
    from types import SimpleNamespace
    from server.steps import claimed_per_set

    proxy = SimpleNamespace(set_names=["RUNMC", "POOL", "EMPTY"],
                            set_index=np.array([0, 0, 0, 0, 1, 1, 1, 1, 1]))
    d = np.array([0.5, 1.0, 1.3, 2.0, 1.2, 1.21, 3.0, 9.0, 0.1], np.float32)
    # within distance 1.2: RUNMC 2 of 4, POOL 2 of 5 (1.2 counts); a set with no slice is left out
    assert claimed_per_set(d, proxy) == {"RUNMC": 0.5, "POOL": 0.4}
