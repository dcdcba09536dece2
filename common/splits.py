"""Splits by case (or by patient): train / validation / test fractions, or k-fold
cross-validation, and a site's preprocessed cases per split.

A split depends only on ``data.seed``, the site's name and the case ids, so every run, method
and node splits a site the same way. With ``data.folds`` = k >= 2, fold ``data.fold`` of a k-fold
partition is the test split (over the k folds every case is tested once).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from common.config import DataConfig
from common.data import CaseRecord, CaseVolume, DataError, load_case


def _group_of(case_id: str, pattern: Optional[str]) -> str:
    if not pattern:
        return case_id
    m = re.match(pattern, case_id)
    return m.group(1) if m and m.groups() else case_id


def split_cases(records: list[CaseRecord], cfg: DataConfig, group_pattern: Optional[str] = None
                ) -> dict[str, list[CaseRecord]]:
    """Deterministic train/val/test split *by case* (or by patient via ``group_pattern``, a regex
    whose first group is the patient id; default ``cfg.group_pattern``). Depends only on the
    seed, the site and the case ids. With ``cfg.folds`` = k >= 2, fold ``cfg.fold`` of a k-fold
    partition is the test split (:func:`_fold_split`)."""
    group_pattern = group_pattern or cfg.group_pattern
    if not records:
        raise DataError("empty site: no cases to split")
    site = records[0].site
    groups = sorted({_group_of(r.case_id, group_pattern) for r in records})
    rng = np.random.default_rng([cfg.seed, zlib.crc32(site.encode())])
    order = [groups[i] for i in rng.permutation(len(groups))]
    n = len(order)
    frac = cfg.split
    if cfg.folds:
        return _fold_split(records, order, cfg, group_pattern)
    n_test = int(round(n * frac.test))
    n_val = int(round(n * frac.val))
    if frac.test > 0:
        n_test = max(1, n_test)
    if frac.val > 0:
        n_val = max(1, n_val)
    if n - n_test - n_val < 1:
        raise DataError(f"site {site}: {n} case(s) are too few for split train/val/test = "
                        f"{frac.train}/{frac.val}/{frac.test} (each non-zero split needs >= 1)")
    which = {g: "test" if i < n_test else "val" if i < n_test + n_val else "train"
             for i, g in enumerate(order)}
    out: dict[str, list[CaseRecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        out[which[_group_of(r.case_id, group_pattern)]].append(r)
    return out


def _fold_split(records: list[CaseRecord], order: list[str], cfg: DataConfig,
                group_pattern: Optional[str]) -> dict[str, list[CaseRecord]]:
    """k-fold split: the permuted groups ``order`` in ``cfg.folds`` near-equal folds; fold
    ``cfg.fold`` is the test split, the others are divided into val and train by the ratio of
    ``split.val`` to ``split.train`` (val first in permuted order)."""
    site, k, n = records[0].site, cfg.folds, len(order)
    frac = cfg.split
    if n < k + 1 + (frac.val > 0):
        raise DataError(f"site {site}: {n} case(s) are too few for data.folds={k} (each fold "
                        f"needs >= 1 case, and train{'/val' if frac.val > 0 else ''} too)")
    folds = np.array_split(np.arange(n), k)
    test = {order[i] for i in folds[cfg.fold]}
    rest = [g for g in order if g not in test]
    n_val = 0
    if frac.val > 0:
        n_val = min(len(rest) - 1, max(1, int(round(len(rest) * frac.val
                                                    / (frac.train + frac.val)))))
    val = set(rest[:n_val])
    out: dict[str, list[CaseRecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        g = _group_of(r.case_id, group_pattern)
        out["test" if g in test else "val" if g in val else "train"].append(r)
    return out


@dataclass
class SiteData:
    """A site's preprocessed private data, split by case."""

    name: str
    train: list[CaseVolume]
    val: list[CaseVolume]
    test: list[CaseVolume]

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "val", "test")}


def load_site(cfg: DataConfig, records: list[CaseRecord], group_pattern: Optional[str] = None,
              log: Callable[[str], None] = lambda s: None) -> SiteData:
    """Validate, preprocess and split one site's cases."""
    if not records:
        raise DataError("empty site: no cases")
    parts = split_cases(records, cfg, group_pattern)
    vols = {k: [load_case(r, cfg) for r in v] for k, v in parts.items()}
    site = SiteData(records[0].site, vols["train"], vols["val"], vols["test"])
    log(f"[data] {site.name}: {site.counts()} cases, "
        f"{sum(c.num_slices for c in site.train)} train slices")
    return site


def load_unsplit(cfg: DataConfig, records: list[CaseRecord],
                 log: Callable[[str], None] = lambda s: None) -> list[CaseVolume]:
    """Validate and preprocess every case of a site that is only tested (an unseen site): no
    split, so a site of any number of cases, one included, can be tested."""
    if not records:
        raise DataError("empty site: no cases")
    cases = [load_case(r, cfg) for r in records]
    log(f"[data] {records[0].site}: {len(cases)} cases (all tested)")
    return cases
