import dataclasses

import numpy as np
import pytest

from server.aggregation import (StreamingAggregator, aggregate, entropy, pixel_weights, sharpen,
                                softmax)
from common.config import AggregationConfig


def random_probs(seed, n=3, h=8, w=8, sharp=1.0):
    rng = np.random.default_rng(seed)
    return softmax(rng.normal(0, sharp, (n, 2, h, w)).astype(np.float32))


@pytest.mark.parametrize("method", ["mean", "era", "adaptive"])
def test_weights_and_targets_are_distributions(method):
    cfg = AggregationConfig(method=method)
    probs = {f"S{i}": random_probs(i) for i in range(4)}
    rel = {f"S{i}": 0.5 + 0.1 * i for i in range(4)}
    w = pixel_weights(cfg, probs, rel)
    assert np.allclose(sum(w.values()), 1.0, atol=1e-6)
    t = aggregate(cfg, probs, rel)
    assert t.probs.shape == (3, 2, 8, 8) and np.allclose(t.probs.sum(axis=1), 1.0, atol=1e-5)
    assert sum(t.site_weights.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["mean", "adaptive"])
def test_identical_teachers_give_that_teacher(method):
    p = random_probs(0)
    t = aggregate(AggregationConfig(method=method), {"A": p, "B": p.copy(), "C": p.copy()},
                  {"A": 0.9, "B": 0.3, "C": 0.6})
    assert np.allclose(t.probs, p, atol=1e-6)


def test_era_sharpens_the_mean_at_its_default():
    probs = {"A": random_probs(1), "B": random_probs(2)}
    mean = aggregate(AggregationConfig(method="mean"), probs, {"A": 1, "B": 1}).probs
    era = aggregate(AggregationConfig(method="era"), probs, {"A": 1, "B": 1}).probs
    assert AggregationConfig().era_temperature == 0.5
    # p_c^(1/T) renormalised: 0.3 / 0.7 becomes 0.09 / 0.49 -> 0.155 / 0.845 at T = 0.5
    assert np.allclose(sharpen(np.array([[0.3, 0.7]]), 0.5), [[0.09 / 0.58, 0.49 / 0.58]])
    assert np.allclose(era, sharpen(mean, 0.5), atol=1e-6)
    assert entropy(era).mean() < entropy(mean).mean() - 0.1   # DS-FL's form: +0.01 (softer)
    assert (era.argmax(axis=1) == mean.argmax(axis=1)).all()
    assert (np.abs(era[:, 1] - 0.5) >= np.abs(mean[:, 1] - 0.5) - 1e-6).all()


def test_adaptive_follows_the_confident_reliable_teacher():
    n, h, w = 2, 6, 6
    truth = np.zeros((n, h, w), np.int64); truth[:, 2:4, 2:4] = 1
    onehot = np.stack([truth == 0, truth == 1], axis=1).astype(np.float32)
    good = 0.97 * onehot + 0.015                      # confident and right
    bad = 0.55 * (1 - onehot) + 0.45 * onehot          # unsure and wrong
    cfg = AggregationConfig(method="adaptive", confidence_temperature=0.2)
    t = aggregate(cfg, {"good": good, "bad": bad}, {"good": 0.9, "bad": 0.4})
    assert (t.probs.argmax(axis=1) == truth).all()
    assert t.site_weights["good"] > 0.8
    mean = aggregate(AggregationConfig(method="mean"), {"good": good, "bad": bad}, {"good": 0.9, "bad": 0.4})
    assert np.abs(t.probs - good).mean() < np.abs(mean.probs - good).mean()
    # a confident but unreliable teacher loses to a reliable one of equal confidence
    t2 = aggregate(cfg, {"A": good, "B": 1 - good}, {"A": 0.9, "B": 0.05})
    assert (t2.probs.argmax(axis=1) == truth).all()


def test_agreement_downweights_the_outlier(tmp_path):
    truth = random_probs(5, sharp=4.0)
    probs = {"A": truth, "B": truth.copy(), "C": 1 - truth}
    cfg = AggregationConfig(method="adaptive", use_agreement=True)
    t = aggregate(cfg, probs, {"A": 0.8, "B": 0.8, "C": 0.8}, spill_dir=tmp_path / "spill")
    assert t.agreement["A"] == pytest.approx(1.0) and t.agreement["C"] < 0.2
    assert t.site_weights["C"] < 0.1
    assert not list((tmp_path / "spill").glob("[0-9]*.npy"))  # spilled replies are removed


@pytest.mark.parametrize("method", ["mean", "era", "adaptive"])
def test_streaming_equals_batch_and_is_order_free(method):
    cfg = AggregationConfig(method=method)
    probs = {f"S{i}": random_probs(10 + i) for i in range(5)}
    rel = {f"S{i}": 0.2 * (i + 1) for i in range(5)}
    # batch reference written out from the formulas
    w = pixel_weights(cfg, probs, rel)
    ref = sum(w[s][:, None] * probs[s] for s in probs)
    if method == "era":
        ref = sharpen(ref, cfg.era_temperature)
    forward = aggregate(cfg, probs, rel).probs
    backward = aggregate(cfg, dict(reversed(list(probs.items()))), rel).probs
    assert np.allclose(forward, ref, atol=1e-5) and np.allclose(backward, ref, atol=1e-5)


@pytest.mark.parametrize("method", ["affinity", "adaptive", "era"])
def test_targets_are_bitwise_independent_of_arrival_order(method):
    """Replies are folded in as sites answer; two runs must distil from identical targets."""
    import itertools
    rng = np.random.default_rng(3)
    sites = [f"S{i}" for i in range(4)]
    probs = {s: random_probs(20 + i, n=6, h=16, w=16, sharp=4.0) for i, s in enumerate(sites)}
    feats = {s: rng.random((6, 1, 8, 8)).astype(np.float32) for s in sites}
    aff = {s: rng.uniform(0.5, 40.0, 6).astype(np.float32) for s in sites}
    results = []
    for order in itertools.permutations(sites):
        agg = StreamingAggregator(AggregationConfig(method=method, affinity_temperature=0.1))
        for s in order:
            agg.add(s, probs[s], 0.3 + 0.1 * int(s[1]), {"enc2": feats[s]}, aff[s])
        assert agg.sites == sites
        results.append(agg.finalize())
    first = results[0]
    assert first.probs.dtype == np.float32 and first.features["enc2@1"].dtype == np.float32
    for t in results[1:]:
        assert np.array_equal(t.probs, first.probs)
        assert np.array_equal(t.features["enc2@1"], first.features["enc2@1"])
        assert list(t.site_weights.items()) == list(first.site_weights.items())


def test_streaming_state_does_not_grow_with_sites():
    agg = StreamingAggregator(AggregationConfig())
    sizes = []
    for i in range(12):
        agg.add(f"S{i}", random_probs(i, n=4, h=16, w=16), 0.5,
                {"enc2": np.ones((4, 8, 4, 4), np.float32)})
        sizes.append(agg.num.nbytes + agg.den.nbytes + sum(v.nbytes for v in agg.feat_num.values()))
    assert len(set(sizes)) == 1


def test_features_grouped_by_channels_and_single_takes_one():
    agg = StreamingAggregator(AggregationConfig(method="mean"))
    agg.add("A", random_probs(0), 1.0, {"enc2": np.full((3, 8, 2, 2), 1.0, np.float32)})
    agg.add("B", random_probs(1), 3.0, {"enc2": np.full((3, 8, 2, 2), 5.0, np.float32)})
    agg.add("C", random_probs(2), 1.0, {"enc2": np.full((3, 16, 2, 2), 2.0, np.float32)})
    t = agg.finalize()
    assert set(t.features) == {"enc2@8", "enc2@16"}
    assert np.allclose(t.features["enc2@8"], 3.0)  # mean: (1 + 5) / 2, reliability ignored
    single = StreamingAggregator(AggregationConfig(method="single"))
    p = random_probs(3)
    single.add("A", p, 0.9)
    assert np.allclose(single.finalize().probs, p)
    with pytest.raises(ValueError, match="takes one teacher"):
        single.add("B", p, 0.9)


def test_lone_in_domain_teacher_leads_at_the_default_affinity_temperature():
    """One teacher whose site says a slice looks like its data (d = 1) and two confident, wrong
    teachers far from their data (d = 3): the target follows the in-domain one, not the vote."""
    n, h, w = 4, 6, 6
    truth = np.zeros((n, h, w), np.int64); truth[:, 2:5, 1:4] = 1
    onehot = np.stack([truth == 0, truth == 1], axis=1).astype(np.float32)
    inside = 0.3 * onehot + 0.35                      # p(gland) = 0.65 on the gland: unsure, right
    wrong = np.stack([np.full((n, h, w), 0.99), np.full((n, h, w), 0.01)], 1).astype(np.float32)
    probs = {"in": inside, "far1": wrong, "far2": wrong.copy()}
    aff = {"in": np.ones(n, np.float32), "far1": np.full(n, 3.0, np.float32),
           "far2": np.full(n, 3.0, np.float32)}
    rel = {"in": 0.5, "far1": 0.9, "far2": 0.9}     # home Dice says nothing about the proxy
    cfg = AggregationConfig(method="affinity")
    t = aggregate(cfg, probs, rel, affinity=aff)
    assert (t.probs.argmax(axis=1) == truth).all()
    assert t.site_weights["in"] > 0.9
    assert np.allclose(t.claim, 1.0)
    for other in ("mean", "adaptive"):  # what the old defaults did with it: all background
        assert aggregate(AggregationConfig(method=other), probs, rel).probs.argmax(axis=1).sum() == 0


def test_affinity_weights_per_slice_and_without_affinity_counts_as_one():
    a, b = random_probs(0, sharp=3.0), random_probs(1, sharp=3.0)
    aff = {"A": np.array([1.0, 5.0, 1.0], np.float32), "B": np.array([5.0, 1.0, 1.0], np.float32)}
    cfg = AggregationConfig(method="affinity", affinity_temperature=0.25)
    feats = {"A": np.zeros((3, 4, 2, 2), np.float32), "B": np.ones((3, 4, 2, 2), np.float32)}
    agg = StreamingAggregator(cfg)
    for s, p in (("A", a), ("B", b)):
        agg.add(s, p, 0.5, {"enc2": feats[s]}, aff[s])
    t = agg.finalize()
    assert np.allclose(t.probs[0], a[0], atol=1e-6) and np.allclose(t.probs[1], b[1], atol=1e-6)
    assert np.allclose(t.probs[2], (a[2] + b[2]) / 2, atol=1e-6)
    f = t.features["enc2@4"][:, 0, 0, 0]     # feature targets carry the same per-slice weights
    assert f[0] < 1e-6 and f[1] > 1 - 1e-6 and f[2] == pytest.approx(0.5)
    assert np.allclose(t.claim, [1.0, 1.0, 1.0])
    plain = aggregate(cfg, {"A": a, "B": b}, {"A": 0.9, "B": 0.1})  # no affinity: uniform
    assert np.allclose(plain.probs, (a + b) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="affinity of shape"):
        StreamingAggregator(cfg).add("A", a, 0.5, affinity=np.ones(5, np.float32))


def test_affinity_margin_averages_the_sites_that_claim_a_slice():
    """With aggregation.affinity_margin = 1.2, two sites that both claim a slice (d = 0.9 and
    1.15) weigh equally on it (the margin-free weights favour the nearer one by e^2.5), while a
    site far from its data (d = 3) is still left out; the claim keeps the raw distances."""
    a, b, c = (random_probs(s, n=2, sharp=3.0) for s in (0, 1, 2))
    aff = {"A": np.array([0.9, 0.9], np.float32), "B": np.array([1.15, 3.0], np.float32),
           "C": np.array([3.0, 3.0], np.float32)}
    probs, rel = {"A": a, "B": b, "C": c}, {"A": 0.5, "B": 0.5, "C": 0.5}
    margin = aggregate(AggregationConfig(method="affinity", affinity_margin=1.2), probs, rel,
                       affinity=aff)
    assert np.allclose(margin.probs[0], (a[0] + b[0]) / 2, atol=1e-3)   # C: weight e^-18
    assert np.allclose(margin.probs[1], a[1], atol=1e-3)                 # only A claims slice 1
    assert np.allclose(margin.claim, [0.9, 0.9])
    plain = aggregate(AggregationConfig(method="affinity", affinity_margin=0.0), probs, rel,
                      affinity=aff)
    w_a = 1 / (1 + np.exp(-2.5))                                          # exp(-0.9/.1) vs exp(-1.15/.1)
    assert np.allclose(plain.probs[0], w_a * a[0] + (1 - w_a) * b[0], atol=1e-3)


def test_auto_aggregator_keeps_the_best_scored_candidate_and_the_claim():
    from server.aggregation import AutoAggregator

    a, b = random_probs(0, n=2, sharp=3.0), random_probs(1, n=2, sharp=3.0)
    aff = {"A": np.array([1.0, 5.0], np.float32), "B": np.array([5.0, 1.0], np.float32)}
    cfg = AggregationConfig(method="auto", affinity_temperature=0.25,
                            auto_candidates=["affinity", "mean"])
    agg = AutoAggregator(cfg)
    for s, p in (("A", a), ("B", b)):
        agg.add(s, p, 0.5, affinity=aff[s])
    assert agg.sites == ["A", "B"]
    mean = (a + b) / 2
    # a score that prefers the plain mean: the mean's targets come back, with the claim
    t = agg.finalize(lambda probs: -float(np.abs(probs - mean).max()))
    assert agg.chosen == "mean" and np.allclose(t.probs, mean, atol=1e-6)
    assert np.allclose(t.claim, [1.0, 1.0]) and set(agg.scores) == {"affinity", "mean"}
    agg2 = AutoAggregator(cfg)
    for s, p in (("A", a), ("B", b)):
        agg2.add(s, p, 0.5, affinity=aff[s])
    t2 = agg2.finalize(lambda probs: 0.0)           # a tie: the first candidate (affinity)
    assert agg2.chosen == "affinity" and not np.allclose(t2.probs, mean, atol=1e-3)
    agg3 = AutoAggregator(dataclasses.replace(cfg, auto_candidates=["mean", "affinity"]))
    for s, p in (("A", a), ("B", b)):
        agg3.add(s, p, 0.5, affinity=aff[s])
    t3 = agg3.finalize()                            # nothing to score by: the first candidate
    assert agg3.chosen == "mean" and agg3.scores == {} and np.allclose(t3.probs, mean, atol=1e-6)
    assert np.allclose(t3.claim, [1.0, 1.0])


def test_auto_aggregator_shares_the_mean_sums_with_era_and_releases_them():
    """era reads the sums of mean (one set of sums fewer) and gives exactly the targets of its
    own aggregator; every candidate's targets equal its standalone aggregation bit for bit; the
    sums are dropped once finalised."""
    from server.aggregation import AutoAggregator

    probs = {s: random_probs(k, n=3, sharp=2.0) for k, s in enumerate("ABC")}
    aff = {s: np.array([0.8, 1.5, 3.0], np.float32) * (k + 1) for k, s in enumerate("ABC")}
    feats = {s: np.full((3, 4, 2, 2), k, np.float32) for k, s in enumerate("ABC")}
    cfg = AggregationConfig(method="auto")          # affinity, mean, adaptive, era
    agg = AutoAggregator(cfg)
    assert set(agg.members) == {"affinity", "mean", "adaptive"}
    for s in "ABC":
        agg.add(s, probs[s], 0.7, {"enc2": feats[s]}, aff[s])
    for m in cfg.auto_candidates:     # a score that picks m: m's own targets come back
        auto = AutoAggregator(cfg)
        for s in "ABC":
            auto.add(s, probs[s], 0.7, {"enc2": feats[s]}, aff[s])
        alone = StreamingAggregator(dataclasses.replace(cfg, method=m))
        for s in "ABC":
            alone.add(s, probs[s], 0.7, {"enc2": feats[s]}, aff[s])
        want = alone.finalize()
        t = auto.finalize(lambda p, want=want: -float(np.abs(p - want.probs).max()))
        assert auto.chosen == m and np.array_equal(t.probs, want.probs), m
        assert np.array_equal(t.features["enc2@4"], want.features["enc2@4"])
        assert all(a.num is None and not a.feat_num for a in auto.members.values())
    with pytest.raises(ValueError, match="do not give"):
        agg.members["adaptive"].finalize(as_method="era")


def test_auto_candidates_are_checked_with_the_config():
    from common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="aggregation.auto_candidates.*single"):
        load_config(None, ["aggregation.auto_candidates=[affinity,single]"])
    agg = load_config(None, []).aggregation        # the default: auto over all four
    assert agg.method == "auto" and agg.auto_candidates == ["affinity", "mean", "adaptive", "era"]
    assert agg.affinity_margin == 1.2 and agg.uses("era") and not agg.uses("single")
