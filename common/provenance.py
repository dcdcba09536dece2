"""Which code and which data made a figure: the stamp every run report carries.

``code_version()``: the git commit of the checkout that holds this package, and whether its
tracked files had uncommitted changes (``dirty``); ``None`` outside a git checkout.
``data_fingerprint(folders)``: a sha256 over every file under the named folders (relative path,
size and content), so that regenerated or edited data never passes for the data of an earlier
table. A folder that does not exist here (a site's private folder, seen from a deployed server)
enters as absent.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path
from typing import Iterable, Optional

REPO = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version(repo: Path = REPO) -> dict:
    """``{"commit": 40-hex or None, "dirty": bool}`` of the checkout ``repo`` (default: the one
    this code runs from; a dirty checkout's figures belong to no commit)."""
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status)}


def version_label(stamp: dict) -> str:
    """A short name of a stamp's code version: ``abc1234``, ``abc1234+dirty`` or ``unknown``."""
    commit = (stamp or {}).get("commit")
    if not commit:
        return "unknown"
    return commit[:7] + ("+dirty" if stamp.get("dirty") else "")


@functools.lru_cache(maxsize=100_000)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's content, cached per (path, size, mtime) for the process."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(folders: Iterable[Path]) -> str:
    """16 hex digits over the files under ``folders`` (each: its name, then every file's path
    relative to it, size and content digest, in sorted order); hidden files and folders are
    left out. Content digests are cached per (path, size, mtime) for the process."""
    h = hashlib.sha256()
    for folder in sorted({Path(f) for f in folders}, key=str):
        h.update(f"[{folder.name}]".encode())
        if not folder.is_dir():
            h.update(b"absent")
            continue
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            st = p.stat()
            h.update(f"{rel}:{st.st_size}:{_file_digest(str(p), st.st_size, st.st_mtime_ns)}\n"
                     .encode())
    return h.hexdigest()[:16]


def run_folders(cfg) -> list[Path]:
    """The data folders a run reads: its sites, public sets and unseen sites (``cfg``: a
    RunConfig; a manifest-layout run: the manifest's folder)."""
    from common.config import proxy_set_paths

    root = Path(cfg.data.root)
    names = list(cfg.data.sites) + list(cfg.experiment.unseen_sites)
    folders = [Path(n) if Path(n).is_absolute() else root / n for n in names]
    if not cfg.data.sites:
        folders.append(root)   # every site folder under the root
    if cfg.data.manifest:
        folders.append(Path(cfg.data.manifest).parent)
    return folders + proxy_set_paths(cfg.data)


def provenance(cfg) -> dict:
    """The stamp of a run: code version and data fingerprint."""
    return {**code_version(), "data": data_fingerprint(run_folders(cfg))}
