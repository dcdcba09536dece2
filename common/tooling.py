"""Helpers shared by the deployment commands of both sides (``server.deploy`` for the
coordinator, ``client.deploy`` for a hospital): the error type, Flower's executables of this
environment, writing key files without overwriting, and running a command in place of this
process.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


class DeployError(RuntimeError):
    """A deployment file or setting is missing or wrong (the message names it)."""


def flower_bin(name: str) -> str:
    """The Flower executable of this environment (next to this Python), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def write_files(files: dict[Path, tuple[bytes, bool]], force: bool) -> None:
    """Write ``{path: (data, private)}``; private files get mode 0600. Nothing is written if
    any path exists, unless ``force``."""
    for path in files:
        if path.exists() and not force:
            raise DeployError(f"{path}: exists; refusing to overwrite (pass --force to replace it)")
    for path, (data, private) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if private:
            path.chmod(0o600)


def need_file(path: Path, what: str) -> str:
    """The resolved path of an input file; DeployError naming it if it is missing."""
    if not Path(path).is_file():
        raise DeployError(f"{path}: {what} not found")
    return str(Path(path).resolve())


def shell(argv: list[str]) -> str:
    """The command as one shell-quoted line."""
    return " ".join(shlex.quote(a) for a in argv)


def exec_command(argv: list[str], print_only: bool) -> int:
    """Print the command; unless ``print_only``, replace this process with it (Flower starts
    ``flower-superexec`` by name, so this environment's bin folder goes first on PATH)."""
    print(shell(argv), flush=True)
    if print_only:
        return 0
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    os.execvpe(argv[0], argv, env)
    return 1  # not reached
