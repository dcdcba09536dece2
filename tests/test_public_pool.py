"""Several public sets in one proxy: labelled and unlabelled sets mixed, overlap with a site
refused, and a distillation budget counted in optimiser steps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from server.aggregation import Targets
from common.config import (ConfigError, DistillConfig, ModelSpec, RunConfig, StudentConfig,
                           load_config, with_overrides)
from common.models import FeatureNet
from server.distill import distill_student, draw_odds, mix_labels
from server.proxy import load_proxy_set

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_sets(tiny_synth, tmp_path_factory) -> Path:
    """The synthetic root with a second public set, POOL: the proxy's images without masks."""
    root = tmp_path_factory.mktemp("pool")
    for site in ("SiteA", "SiteB", "PROXY"):
        shutil.copytree(tiny_synth / site, root / site)
    (root / "POOL").mkdir()
    for f in sorted((tiny_synth / "PROXY").glob("Case0[01].nii.gz")):
        shutil.copy(f, root / "POOL" / f.name)
    return root


def pool_cfg(root: Path, *extra: str) -> RunConfig:
    return with_overrides(RunConfig(), [f"data.root={root}", "data.proxy=[PROXY, POOL]",
                                        "data.size=[64,64]", "data.spacing=[2.0,2.0]", *extra])


def test_a_mixed_proxy_uses_masks_only_where_a_set_has_them(two_sets):
    cfg = pool_cfg(two_sets)
    proxy = load_proxy_set(cfg.data)
    assert proxy.set_names == ["PROXY", "POOL"]
    per_set = proxy.slices_per_set()
    # 3 labelled PROXY volumes and 2 unlabelled POOL copies of the first two
    assert per_set["PROXY"] > per_set["POOL"] > 0 and len(proxy) == sum(per_set.values())
    assert all(i.startswith(("PROXY/Case", "POOL/Case")) for i in proxy.ids)
    assert proxy.labelled.tolist() == [i.startswith("PROXY/") for i in proxy.ids]
    assert proxy.n_labelled == per_set["PROXY"]
    assert proxy.labels[~proxy.labelled].max() == 0 and proxy.labels[proxy.labelled].max() == 1

    # target Dice reads the labelled cases only: perfect targets there, nonsense on the pool
    probs = np.zeros((len(proxy), 2, 64, 64), np.float32)
    probs[:, 1] = proxy.labels
    probs[:, 0] = 1 - probs[:, 1]
    probs[~proxy.labelled, 1] = 1.0
    probs[~proxy.labelled, 0] = 0.0
    assert proxy.target_dice(probs) == pytest.approx(1.0)

    # the masks are mixed into the labelled slices' targets, the pool's stay the teachers'
    flat = Targets(np.full_like(probs, 0.5), {})
    mixed = mix_labels(flat, proxy.labels, 0.5, proxy.labelled).probs
    assert np.allclose(mixed[~proxy.labelled], 0.5)
    gland = proxy.labels[proxy.labelled] == 1
    assert np.allclose(mixed[proxy.labelled][:, 1][gland], 0.75)
    assert np.allclose(mixed[proxy.labelled][:, 1][~gland], 0.25)


def test_an_unlabelled_proxy_is_no_error_and_masks_are_not_invented(two_sets):
    proxy = load_proxy_set(with_overrides(pool_cfg(two_sets), ["data.proxy=POOL"]).data)
    assert proxy.labels is None and proxy.n_labelled == 0
    assert proxy.ids[0] == "Case00/0"   # one set: the slice ids are the case ids, unprefixed
    with pytest.raises(ValueError, match="no proxy slice has a mask"):
        proxy.target_dice(np.zeros((len(proxy), 2, 64, 64), np.float32))


def test_blank_slices_of_a_public_scan_are_not_queried(two_sets, tmp_path):
    """A cropped public scan may end in zero-filled slices; a teacher would answer them with a
    gland (it did, on all 113 of the pool's), so the server never queries them."""
    import nibabel as nib

    src = nib.load(two_sets / "PROXY" / "Case00.nii.gz")
    data = np.asarray(src.dataobj).copy()
    axis = int(np.argmax([abs(src.affine[2, i]) for i in range(3)]))   # the slice axis
    zero = [slice(None)] * 3
    zero[axis] = slice(0, 2)
    data[tuple(zero)] = 0
    (tmp_path / "ENDS").mkdir()
    nib.save(nib.Nifti1Image(data, src.affine), tmp_path / "ENDS" / "Case00.nii.gz")
    cfg = with_overrides(pool_cfg(two_sets), [f"data.proxy={tmp_path / 'ENDS'}"])
    proxy = load_proxy_set(cfg.data)
    depth = data.shape[axis]
    # the outer zero slice stays constant through preprocessing (the inner one picks up a
    # little of its neighbour in the resampling): left out; every queried slice has signal
    assert proxy.blank >= 1 and len(proxy) + proxy.blank == depth
    flat = np.asarray(proxy.images).reshape(len(proxy), -1)
    assert (flat.max(axis=1) > flat.min(axis=1)).all()
    kept = {int(i.rpartition("/")[2]) for i in proxy.ids}
    assert 0 not in kept or depth - 1 not in kept   # RAS may turn the slice order around
    assert load_proxy_set(pool_cfg(two_sets).data).blank == 0   # the synthetic scans have none


def test_a_broken_proxy_mask_is_an_error_not_an_unlabelled_set(two_sets, tmp_path):
    from common.data import DataError

    bad = tmp_path / "BAD"
    shutil.copytree(two_sets / "PROXY", bad)
    (bad / "Case01_segmentation.nii.gz").write_bytes(b"not a nifti")
    cfg = with_overrides(pool_cfg(two_sets), [f"data.proxy={bad}"])
    with pytest.raises(DataError, match="Case01_segmentation.nii.gz"):
        load_proxy_set(cfg.data)


@pytest.mark.parametrize("key,value,match", [
    ("data.sites", "[SiteA, PROXY]", "data.proxy: .*PROXY overlaps data.sites entry 'PROXY'"),
    ("experiment.unseen_sites", "[POOL]", "overlaps experiment.unseen_sites entry 'POOL'"),
])
def test_a_proxy_that_is_also_a_site_is_a_config_error(two_sets, key, value, match):
    items = [f"{key}={value}"]
    if key == "experiment.unseen_sites":
        items.append("data.sites=[SiteA, SiteB]")
    with pytest.raises(ConfigError, match=match):
        pool_cfg(two_sets, *items)


def test_proxy_sets_need_distinct_names_and_shares_need_known_sets(two_sets, tmp_path):
    with pytest.raises(ConfigError, match="two public sets named 'PROXY'"):
        pool_cfg(two_sets, f"data.proxy=[PROXY, {tmp_path / 'PROXY'}]")
    with pytest.raises(ConfigError, match="distill.set_weights.RUNMC: not a set of data.proxy"):
        pool_cfg(two_sets, "distill.steps_per_epoch=5", "distill.set_weights={RUNMC: 1}")
    with pytest.raises(ConfigError, match="set_weights: needs distill.steps_per_epoch > 0"):
        pool_cfg(two_sets, "distill.set_weights={POOL: 1}")
    with pytest.raises(ConfigError, match="proxy_slice_step.RUNMC: not a set of data.proxy"):
        pool_cfg(two_sets, "data.proxy_slice_step={RUNMC: 2}")
    with pytest.raises(ConfigError, match="data.proxy: expected a string or a list of a string"):
        pool_cfg(two_sets, "data.proxy=3")


def test_draw_odds_give_each_set_its_share_and_keep_the_empty_slice_policy():
    has_gland = np.array([1, 1, 0, 0, 1, 1, 1, 1, 1, 0], bool)
    set_index = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    usable = np.ones(10, bool)
    plain = draw_odds(has_gland, usable, 0.5)
    assert plain.sum() == pytest.approx(1.0)
    assert plain[2] == pytest.approx(plain[0] / 2)     # an empty slice at half the odds
    odds = draw_odds(has_gland, usable, 0.5, set_index, ["A", "B"], {"A": 3, "B": 1})
    assert odds[set_index == 0].sum() == pytest.approx(0.75)
    assert odds[set_index == 1].sum() == pytest.approx(0.25)
    assert odds[2] == pytest.approx(odds[0] / 2)
    only_a = draw_odds(has_gland, usable, 0.0, set_index, ["A", "B"], {"A": 1})
    assert only_a[set_index == 1].sum() == 0 and only_a[[2, 3]].sum() == 0
    with pytest.raises(ValueError, match="set_weights.B: the set has no usable slice"):
        draw_odds(has_gland, set_index == 0, 0.5, set_index, ["A", "B"], {"A": 1, "B": 1})


def toy_targets(n: int, seed: int = 0) -> tuple[np.ndarray, Targets]:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, 32, 32), dtype=np.float32)
    probs = np.zeros((n, 2, 32, 32), np.float32)
    probs[:, 1, 10:22, 10:22] = 0.9
    probs[:, 0] = 1 - probs[:, 1]
    return images, Targets(probs, {})


@pytest.mark.parametrize("n", [12, 120])
def test_a_steps_budget_is_the_same_for_a_small_and_a_large_proxy(n):
    torch.manual_seed(0)
    student = FeatureNet(ModelSpec(channels=[4, 8], strides=[2], num_res_units=0, features=[]))
    images, targets = toy_targets(n)
    cfg = DistillConfig(epochs=2, steps_per_epoch=3, w_feature=0)
    history = distill_student(student, images, targets, cfg, StudentConfig(batch_size=4),
                              log=lambda s: None)
    assert [h["steps"] for h in history] == [3, 3]
    # one pass (steps_per_epoch 0) grows with the proxy set: 3 batches of 4 for 12 slices
    passes = distill_student(student, images, targets, DistillConfig(epochs=1, w_feature=0),
                             StudentConfig(batch_size=4), log=lambda s: None)
    assert passes[0]["steps"] == n // 4


@pytest.mark.parametrize("name", ["configs/real_runmc_pool.yaml", "configs/real_ucl_pool.yaml"])
def test_every_distillation_of_a_pool_grid_has_the_same_steps_budget(monkeypatch, name):
    """The pool grids compare proxy sets of 300-416 and 6,000+ slices: "same budget" must mean
    the same optimiser steps for every distillation (KD, self-training, FedDF, central-kd), and
    FedAvg gets the rounds at which the budget study found it still rising (30) and twice that."""
    from simulations.experiment import method_configs

    monkeypatch.chdir(REPO)
    cfg = load_config(name)
    runs = [(m, c) for m, _, c in method_configs(cfg) if c.data.fold == 0]
    steps = {m: c.distill.steps_per_epoch * c.distill.epochs for m, c in runs
             if c.federation.strategy in ("kd", "feddf", "central-kd") or c.federation.self_train}
    assert len(steps) >= 4 and set(steps.values()) == {800}, steps
    rounds = [c.federation.rounds for _, c in runs if c.federation.strategy == "fedavg"]
    assert rounds and min(rounds) >= 30 and max(rounds) >= 60


def test_a_node_reads_several_public_folders_from_its_node_config(tmp_path):
    from client.node import resolve_node

    a, b = tmp_path / "RUNMC", tmp_path / "public-pool"
    node = resolve_node({"data-path": str(tmp_path / "BIDMC"),
                         "proxy-path": os.pathsep.join([str(a), str(b)])}, {})
    assert node.proxy_paths == (a, b)


def test_the_proxy_cache_on_disk_holds_what_ram_holds(two_sets, tmp_path):
    cfg = pool_cfg(two_sets)
    ram, disk = load_proxy_set(cfg.data), load_proxy_set(cfg.data, tmp_path / "cache")
    assert isinstance(disk.images, np.memmap) and isinstance(disk.labels, np.memmap)
    assert disk.ids == ram.ids and np.array_equal(disk.images, ram.images)
    assert np.array_equal(disk.labels, ram.labels) and np.array_equal(disk.labelled, ram.labelled)


def test_aggregating_a_10000_slice_proxy_keeps_server_memory_bounded(tmp_path):
    """Three sites' replies on 10,000 proxy slices through `auto` (three sets of float64 sums:
    about 0.5 GB in RAM). With a spill directory the sums and the targets are memory-mapped
    and replies are folded 256 slices at a time: the aggregator's own allocations stay under
    40 MB (measured: 17-23 MB; 830 MB without the spill directory)."""
    import tracemalloc

    from server.aggregation import make_aggregator
    from common.config import AggregationConfig

    n, hw = 10_000, 32
    replies = []
    for k in range(3):   # the decoded replies, memory-mapped like the server's inputs
        p = np.lib.format.open_memmap(tmp_path / f"reply{k}.npy", "w+", np.float32, (n, 2, hw, hw))
        rng = np.random.default_rng(k)
        for start in range(0, n, 1000):
            fg = rng.random((min(1000, n - start), hw, hw), dtype=np.float32)
            p[start:start + 1000, 1], p[start:start + 1000, 0] = fg, 1 - fg
        replies.append(p)
    labels = (np.asarray(replies[0][:50, 1]) > 0.5).astype(np.uint8)

    def score(probs):
        return float((np.asarray(probs[:50]).argmax(axis=1) == labels).mean())

    agg = make_aggregator(AggregationConfig(), tmp_path / "spill")
    tracemalloc.start()
    for k, p in enumerate(replies):
        agg.add(f"S{k}", p, 0.7, affinity=np.full(n, 1.0 + k, np.float32))
    targets = agg.finalize(score)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert targets.probs.shape == (n, 2, hw, hw) and isinstance(targets.probs, np.memmap)
    assert np.allclose(np.asarray(targets.probs[:100]).sum(axis=1), 1.0, atol=1e-5)
    assert set(agg.scores) == {"affinity", "mean", "adaptive", "era"}
    assert peak < 40e6, f"aggregation allocated {peak / 1e6:.0f} MB"
