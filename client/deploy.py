"""A hospital's deployment files and commands: its SuperNode key pair and the
``flower-supernode`` command with the site's paths in the node config.

Files made by :func:`make_node_key` (``DIR``)::

    SITE.key               the SuperNode's private key (NIST P-384, OpenSSH PEM; stays at the site)
    SITE.pub               its public key (OpenSSH), registered with ``flwr supernode register``

A SuperNode has its own local port (default 9094). The coordinator's side is
:mod:`server.deploy`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.config import ConfigError
from common.tooling import DeployError, flower_bin, need_file, write_files


def make_node_key(out: Path, site: str, force: bool = False) -> dict[str, Path]:
    """A SuperNode key pair (NIST P-384, OpenSSH formats). Returns {"key": SITE.key,
    "pub": SITE.pub}."""
    if not site or any(c in site for c in "/\\ "):
        raise DeployError(f"node key: site name {site!r} must be non-empty, without '/' or spaces")
    key = ec.generate_private_key(ec.SECP384R1())
    out = Path(out)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    paths = {"key": out / f"{site}.key", "pub": out / f"{site}.pub"}
    write_files({paths["key"]: (priv, True), paths["pub"]: (pub + b"\n", False)}, force)
    return paths


def node_config_text(items: dict[str, object]) -> str:
    """Flower's ``--node-config`` syntax, ``key='string' key=number ...`` (TOML literal strings,
    so backslashes stay as they are; Flower's parser allows no quote inside a quoted value)."""
    parts = []
    for k, v in items.items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = str(v).lower()
        elif not isinstance(v, (int, float)):
            v = str(v)
            if "'" not in v:
                v = f"'{v}'"
            elif '"' not in v and "\\" not in v:
                v = f'"{v}"'
            else:
                raise DeployError(f"node config {k}: {v!r} holds both quote characters (or a "
                                  f"quote and a backslash), which Flower's --node-config cannot "
                                  f"carry; rename the folder")
        parts.append(f"{k}={v}")
    return " ".join(parts)


def supernode_command(superlink: str, ca: Optional[Path], key: Path, node_config: dict,
                      port: int = 9094, insecure: bool = False) -> list[str]:
    """``flower-supernode`` for one site: TLS against ``ca`` (the federation's CA certificate),
    authenticated with ``key`` (its registered private key), the site's paths in node config."""
    for k in ("data-path", "proxy-path"):
        if not node_config.get(k):
            raise ConfigError(f"node config {k}: required for a hospital SuperNode")
    if not insecure and not ca:
        raise DeployError("supernode: the federation's CA certificate (--ca) is required "
                          "unless --insecure")
    argv = [flower_bin("flower-supernode"), "--superlink", superlink]
    argv += ["--insecure"] if insecure else ["--root-certificates", need_file(ca, "CA certificate")]
    argv += ["--auth-supernode-private-key", need_file(key, "SuperNode private key"),
             "--node-config", node_config_text(node_config), "--port", str(port)]
    return argv
