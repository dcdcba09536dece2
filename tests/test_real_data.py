"""The real-data configs against ../shared/data (skipped, with the reason, where it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_config
from common.config import proxy_set_paths
from common.data import discover_liu_site, discover_sites
from common.splits import load_unsplit, split_cases
from conftest import REPO
from simulations.experiment import method_configs

SHARED = REPO.parent / "shared" / "data"
CONFIGS = ["configs/real_runmc_proxy.yaml", "configs/real_ucl_proxy.yaml",
           "configs/real_runmc_pool.yaml", "configs/real_ucl_pool.yaml",
           "configs/cross_site_real.yaml", "configs/privacy_real.yaml"]


@pytest.fixture(scope="module")
def shared():
    if not (SHARED / "promise12" / "BIDMC").is_dir():
        pytest.skip(f"real multi-site data not found at {SHARED} (../shared/data beside the "
                    f"repository; a fresh clone does not have it)")
    return SHARED


@pytest.mark.parametrize("name", CONFIGS)
def test_real_configs_find_their_sites_and_test_every_case_once(shared, name, monkeypatch):
    monkeypatch.chdir(REPO)  # data.root is ../shared/data, relative to the repository
    cfg = load_config(name)
    records = discover_sites(cfg.data)
    assert len(records) == 3 and all(p.is_dir() for p in proxy_set_paths(cfg.data))
    assert not set(records) & {p.name for p in proxy_set_paths(cfg.data)}  # the proxy is no site
    if not cfg.experiment.folds:
        return
    runs = method_configs(cfg)
    folds = sorted({c.data.fold for _, _, c in runs})
    assert folds == list(range(cfg.experiment.folds)) and len(runs) == 3 * len(cfg.experiment.methods)
    for site, recs in records.items():
        tested = []
        for f in folds:
            c = next(c for _, _, c in runs if c.data.fold == f)
            parts = split_cases(recs, c.data)
            assert parts["train"] and parts["val"] and parts["test"], (site, f)
            tested += [r.case_id for r in parts["test"]]
        assert sorted(tested) == sorted(r.case_id for r in recs), site  # each case once
    # unseen sites are tested on all their cases, the single PROMISE12 case included
    for s in cfg.experiment.unseen_sites:
        folder = Path(cfg.data.root) / s
        cases = load_unsplit(cfg.data, discover_liu_site(folder)) if s.endswith("PROMISE12") \
            else discover_liu_site(folder)
        assert len(cases) >= 1
