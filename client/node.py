"""A hospital node's identity and data: the node config, its private cases and its copy of the
public proxy set, its policy. The site's work is in :mod:`client.teacher` and
:mod:`client.student`; ``client/app.py`` maps Flower messages onto them.

Node configuration (``flower-supernode --node-config "..."``):

=================  ==============================================================================
key                meaning
=================  ==============================================================================
``data-path``      this site's private cases: a Liu-layout site folder (``CaseXX.nii.gz`` +
                   ``CaseXX_segmentation.nii.gz``), an MSD task folder, or a manifest file
``data-layout``    ``liu`` (default), ``msd`` or ``manifest``
``site``           the site's name in reports (default: the folder name)
``proxy-path``     the public proxy set: a Liu-layout folder, or several separated by ``:``
                   (``;`` on Windows), named as the run's ``data.proxy`` names them (labels
                   not needed)
``state-dir``      where the teacher checkpoint is kept (default ``~/.fedkd/state/SITE``)
``threads``        torch threads (default: the run config's ``runtime.threads``)
``train.KEY``      a site override of a ``train`` setting, e.g. ``train.batch_size=4``
=================  ==============================================================================

In a simulation the node config has only ``partition-id``: partition *i* is the *i*-th site
folder (sorted, the proxy folders excluded) under the Flower run config's ``data-root`` (default:
the YAML run config's ``data.root``), the proxy set is ``data.proxy`` there and the state directory is
``state-root/SITE``. ``data.sites`` (if set) lists the simulated sites' folders, relative to the root, in partition order (``state-root`` from the Flower run config, default ``output.state_root``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from client.egress import private_signatures
from client.policy import NodePolicy
from common.config import ConfigError, RunConfig, TrainConfig, proxy_set_paths
from common.typedconfig import build_section
from common.data import (
    CaseVolume,
    DataError,
    discover_liu_site,
    discover_manifest,
    discover_msd,
    load_proxy,
    site_folders,
)
from common.splits import SiteData, load_site, load_unsplit
from common.logs import get_logger

LOG = get_logger("fedkd.client")


@dataclass(frozen=True)
class Node:
    """Where a site's files are. Built from the Flower node config by :func:`resolve_node`."""

    site: str
    data_path: Path
    layout: str
    proxy_paths: tuple[Path, ...]   # the public sets' folders (empty: none configured)
    state_dir: Path
    threads: Optional[int]
    train_overrides: tuple[tuple[str, Any], ...] = ()
    policy: NodePolicy = NodePolicy.from_node_config({}, simulation=True)

    @property
    def data_folder(self) -> Path:
        """The folder of the site's data files (a manifest's folder for the manifest layout)."""
        return self.data_path if self.data_path.is_dir() else self.data_path.parent

    def teacher_checkpoint(self, key: str) -> Path:
        """Where the teacher of checkpoint key ``key`` (client.teacher.teacher_key) is kept: one
        file per key, so that teachers of other settings (another row of a grid, DP-SGD) never
        overwrite each other and each stays loadable (``fedkd mia`` audits them)."""
        return self.state_dir / f"teacher-{key[:16]}.pt"


def resolve_node(node_config: dict, run_config: dict, cfg: Optional[RunConfig] = None) -> Node:
    """Read the node config (see the module docstring). ConfigError names the bad key.

    In a simulation the data root and state root default to the run config's ``data.root`` and
    ``output.state_root`` (``cfg``, as the server sent it)."""
    cfg = cfg or RunConfig()
    nc = dict(node_config)
    overrides = tuple(sorted((k[len("train."):], v) for k, v in nc.items() if k.startswith("train.")))
    threads = nc.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"node config threads: expected a positive integer, got {threads!r}")
    if "data-path" in nc:
        data_path = Path(str(nc["data-path"])).expanduser()
        layout = str(nc.get("data-layout", "liu"))
        if layout not in ("liu", "msd", "manifest"):
            raise ConfigError(f"node config data-layout: expected liu, msd or manifest, "
                              f"got {layout!r}")
        site = str(nc.get("site") or (data_path.stem if layout == "manifest" else data_path.name))
        proxy = tuple(Path(p).expanduser() for p in str(nc.get("proxy-path") or "").split(
            os.pathsep) if p)
        state = Path(str(nc.get("state-dir") or Path.home() / ".fedkd" / "state" / site))
        return Node(site, data_path, layout, proxy, state.expanduser(), threads, overrides,
                    NodePolicy.from_node_config(nc, simulation=False))
    if "partition-id" in nc:
        root = Path(str(run_config.get("data-root") or cfg.data.root))
        if not root.is_dir():
            raise DataError(f"{root}: simulation data root not found (run `fedkd synth --out "
                            f"{root}`)")
        dcfg = replace(cfg.data, root=str(root))
        sites = site_folders(dcfg)
        pid = int(nc["partition-id"])
        if not 0 <= pid < len(sites):
            raise ConfigError(f"node config partition-id: {pid} but {root} has {len(sites)} "
                              f"site folders")
        state_root = Path(str(run_config.get("state-root") or cfg.output.state_root))
        return Node(sites[pid].name, sites[pid], "liu", tuple(proxy_set_paths(dcfg)),
                    state_root / sites[pid].name, threads, overrides,
                    NodePolicy.from_node_config(nc, simulation=True))
    raise ConfigError("node config: needs data-path (a hospital node) or partition-id "
                      "(a simulation)")


def egress_signatures(cfg: RunConfig, node: Node) -> np.ndarray:
    """The site's private slices (every split; the centre channel as preprocessed), centred and
    of unit norm for the egress check (client.egress); cached per split."""
    data = load_private(cfg, node)
    key = json.dumps(["egress", str(node.data_path), preprocessing_key(cfg),
                      [c.case_id for c in data.train + data.val + data.test]])
    if key not in CACHE:
        CACHE[key] = private_signatures(c.image[z] for c in data.train + data.val + data.test
                                         for z in range(c.num_slices))
    return CACHE[key]


def node_policy(node_config: dict) -> NodePolicy:
    """The node's policy before the rest of the node is resolved (for an early error reply):
    the node config's, or the strict ``kd`` preset if that config is itself invalid."""
    try:
        return NodePolicy.from_node_config(node_config, simulation="data-path" not in node_config)
    except ConfigError:
        return NodePolicy.from_node_config({"policy": "kd"}, simulation=False)


def declared_state_dir(node_config: dict) -> Optional[Path]:
    """The node config's ``state-dir`` (None if it names none), known before anything else
    about the node is resolved: where even an early error reply is recorded."""
    value = node_config.get("state-dir")
    return Path(str(value)).expanduser() if value else None


def site_label(node_config: dict, node_id: int) -> str:
    """A name for error messages before the node config is fully resolved."""
    if node_config.get("site"):
        return str(node_config["site"])
    if node_config.get("data-path"):
        path = Path(str(node_config["data-path"]))
        return path.stem if node_config.get("data-layout") == "manifest" else path.name
    if "partition-id" in node_config:
        return f"partition {node_config['partition-id']}"
    return f"node {node_id}"


def site_train_config(cfg: RunConfig, node: Node) -> TrainConfig:
    """The server's training settings with this site's ``train.*`` node overrides applied."""
    data = asdict(cfg.train)
    for key, value in node.train_overrides:
        if key not in data:
            raise ConfigError(f"node config train.{key}: unknown key (valid: {', '.join(data)})")
        data[key] = value
    return build_section(TrainConfig, data, "node config train")


# --------------------------------------------------------------------------------------------
# Data (CACHE: per process, a node answers several messages in a run)
# --------------------------------------------------------------------------------------------
CACHE: dict[str, Any] = {}


def preprocessing_key(cfg: RunConfig) -> dict:
    d = cfg.data
    return {"spacing": d.spacing, "size": d.size, "context": d.context_slices,
            "clip": d.clip_percentiles, "label_mode": d.label_mode, "msd_channel": d.msd_channel}


def _site_data_config(cfg: RunConfig, node: Node):
    if node.layout == "liu":
        return replace(cfg.data, root=str(node.data_path.parent), layout="liu",
                       sites=[node.data_path.name])
    if node.layout == "msd":
        return replace(cfg.data, root=str(node.data_path), layout="msd", sites=[])
    return replace(cfg.data, root=str(node.data_path.parent), layout="manifest",
                   manifest=str(node.data_path), sites=[])


def _records(node: Node) -> list:
    """The site's cases on disk (its layout's discovery; a manifest is filtered to the site)."""
    if node.layout == "liu":
        return discover_liu_site(node.data_path)
    if node.layout == "msd":
        return discover_msd(node.data_path)
    listed = discover_manifest(node.data_path)
    sites = sorted({r.site for r in listed})
    records = [r for r in listed if r.site == node.site]
    if not records and len(sites) == 1:  # a one-site manifest needs no site name
        records = listed
    if not records:
        raise ConfigError(f"node config site: {node.site!r} is not in "
                          f"{node.data_path} (sites: {', '.join(sites)})")
    return records


def load_private(cfg: RunConfig, node: Node) -> SiteData:
    """This site's private data, split by case, preprocessed as the run config says."""
    key = json.dumps(["private", str(node.data_path), node.layout, preprocessing_key(cfg),
                      asdict(cfg.data.split), cfg.data.seed, cfg.data.group_pattern,
                      cfg.data.folds, cfg.data.fold],
                     sort_keys=True)
    if key not in CACHE:
        CACHE[key] = load_site(_site_data_config(cfg, node), _records(node), log=LOG.info)
    return CACHE[key]


def load_unsplit_cases(cfg: RunConfig, node: Node) -> list[CaseVolume]:
    """Every case of a site that is only tested (an unseen site: not split, so one case is
    enough), preprocessed as the run config says; cached like :func:`load_private`, whatever
    the split settings."""
    key = json.dumps(["unsplit", str(node.data_path), node.layout, preprocessing_key(cfg)],
                     sort_keys=True)
    if key not in CACHE:
        CACHE[key] = load_unsplit(_site_data_config(cfg, node), _records(node), log=LOG.info)
    return CACHE[key]


def load_proxy_cases(cfg: RunConfig, node: Node) -> dict[str, CaseVolume]:
    """The public proxy set held by this site, ``{case_id: volume}`` (no labels)."""
    if not node.proxy_paths:
        raise ConfigError("node config proxy-path: not set (needed to answer proxy queries)")
    key = json.dumps(["proxy", [str(p) for p in node.proxy_paths], preprocessing_key(cfg),
                      cfg.data.proxy_pad], sort_keys=True)
    if key not in CACHE:
        CACHE[key] = load_proxy(replace(cfg.data, layout="liu"), folders=list(node.proxy_paths))
    return CACHE[key]


# --------------------------------------------------------------------------------------------
# 1. Train the teacher
# --------------------------------------------------------------------------------------------
