"""Deployment helpers: TLS certificates, SuperNode keys, and the Flower commands a hospital runs.

Everything here writes files or builds command lines for Flower's own processes
(``flower-superlink``, ``flower-supernode``, ``flwr``); nothing replaces them.

Files made by :func:`make_certificates` (``DIR``)::

    ca.crt ca.key          the federation's certificate authority (keep ca.key offline)
    server.crt server.key  the SuperLink's certificate, signed by the CA, for the given hosts

Files made by :func:`make_node_key` (``DIR``)::

    SITE.key               the SuperNode's private key (NIST P-384, OpenSSH PEM; stays at the site)
    SITE.pub               its public key (OpenSSH), registered with ``flwr supernode register``

Flower 1.42 serves its Fleet, Control and runtime APIs over one HTTPS port per SuperLink
(``--host``/``--port``, default 8000); a SuperNode has its own local port (default 9094).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shlex
import sys
from pathlib import Path
from typing import Iterable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import ConfigError

SUPERLINK_PORT = 8000


class DeployError(RuntimeError):
    """A deployment file or setting is missing or wrong (the message names it)."""


def _bin(name: str) -> str:
    """The Flower executable of this environment (next to this Python), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _write_all(files: dict[Path, tuple[bytes, bool]], force: bool) -> None:
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


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "prostate-fedkd"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(out: Path, hosts: Iterable[str] = ("localhost", "127.0.0.1"),
                      days: int = 365, force: bool = False) -> dict[str, Path]:
    """A CA and a SuperLink certificate it signs, valid for ``hosts`` (DNS names or IPs).

    Returns {"ca": ca.crt, "ca_key": ca.key, "cert": server.crt, "key": server.key}."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise DeployError("certificates: at least one host name or IP address is needed")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("prostate-fedkd CA"))
          .issuer_name(_name("prostate-fedkd CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = Path(out)
    pem = serialization.Encoding.PEM
    paths = {"ca": out / "ca.crt", "ca_key": out / "ca.key", "cert": out / "server.crt",
             "key": out / "server.key"}
    _write_all({paths["ca"]: (ca.public_bytes(pem), False),
                paths["ca_key"]: (_pem_key(ca_key), True),
                paths["cert"]: (cert.public_bytes(pem), False),
                paths["key"]: (_pem_key(key), True)}, force)
    return paths


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
    _write_all({paths["key"]: (priv, True), paths["pub"]: (pub + b"\n", False)}, force)
    return paths


def _need(path: Path, what: str) -> str:
    if not Path(path).is_file():
        raise DeployError(f"{path}: {what} not found")
    return str(Path(path).resolve())


def superlink_command(certs: Path, host: str = "0.0.0.0", port: int = SUPERLINK_PORT,
                      database: Optional[Path] = None, log_file: Optional[Path] = None) -> list[str]:
    """``flower-superlink`` with TLS (``certs``: a :func:`make_certificates` folder), SuperNode
    authentication, and no runtime dependency installation (the installed environment runs the
    apps). ``database`` keeps the SuperLink's state across restarts (default: in memory)."""
    certs = Path(certs)
    argv = [_bin("flower-superlink"),
            "--ssl-ca-certfile", _need(certs / "ca.crt", "CA certificate"),
            "--ssl-certfile", _need(certs / "server.crt", "SuperLink certificate"),
            "--ssl-keyfile", _need(certs / "server.key", "SuperLink private key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port)]
    if database:
        argv += ["--database", str(database)]
    if log_file:
        argv += ["--log-file", str(log_file)]
    return argv


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
    argv = [_bin("flower-supernode"), "--superlink", superlink]
    argv += ["--insecure"] if insecure else ["--root-certificates", _need(ca, "CA certificate")]
    argv += ["--auth-supernode-private-key", _need(key, "SuperNode private key"),
             "--node-config", node_config_text(node_config), "--port", str(port)]
    return argv


def flwr_home(path: Optional[Path] = None) -> Path:
    return Path(path or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def add_connection(name: str, address: str, ca: Path, home: Optional[Path] = None) -> Path:
    """Add (or replace) ``[superlink.NAME]`` in ``FLWR_HOME/config.toml`` so that ``flwr run .
    NAME`` and ``flwr supernode register KEY NAME`` reach the SuperLink at ``address`` over TLS.
    Returns the config file."""
    import tomli
    import tomli_w

    path = flwr_home(home) / "config.toml"
    data = tomli.loads(path.read_text()) if path.is_file() else {}
    links = data.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": _need(ca, "CA certificate")}
    links.setdefault("default", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _exec(argv: list[str], print_only: bool) -> int:
    """Print the command; unless ``print_only``, replace this process with it (Flower starts
    ``flower-superexec`` by name, so this environment's bin folder goes first on PATH)."""
    print(shell(argv), flush=True)
    if print_only:
        return 0
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    os.execvpe(argv[0], argv, env)
    return 1  # not reached


def bundle(run_dir: Path, out: Path) -> Path:
    """``out`` (.tar.gz): the finished run's report, figures and exported student, with a
    SHA256SUMS listing, to hand to the sites. DeployError if the run has not finished."""
    import hashlib
    import io
    import tarfile

    run_dir = Path(run_dir)
    if not (run_dir / "report.md").is_file() or not (run_dir / "export").is_dir():
        raise DeployError(f"{run_dir}: no report.md and export/ yet (has the run finished?)")
    files = sorted(p for p in run_dir.iterdir() if p.is_file() and p.suffix in
                   (".md", ".json", ".png", ".yaml") and p.name != "state.json")
    files += sorted(p for p in (run_dir / "export").rglob("*") if p.is_file())
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(run_dir)}\n"
                   for p in files)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for p in files:
            tar.add(p, arcname=f"{run_dir.name}/{p.relative_to(run_dir)}")
        info = tarfile.TarInfo(f"{run_dir.name}/SHA256SUMS")
        info.size = len(sums.encode())
        tar.addfile(info, io.BytesIO(sums.encode()))
    return out


def main(args) -> int:
    """``fedkd deploy ACTION`` (see :func:`add_arguments`)."""
    if args.action == "certs":
        paths = make_certificates(args.out, args.host, args.days, args.force)
        print(f"[deploy] CA {paths['ca']} (give a copy to every site and every `flwr` user)\n"
              f"[deploy] SuperLink certificate {paths['cert']} + key {paths['key']} for "
              f"{', '.join(args.host)} (stay on the SuperLink host)\n"
              f"[deploy] CA key {paths['ca_key']}: keep it offline; it signs new certificates")
    elif args.action == "node-key":
        paths = make_node_key(args.out, args.site, args.force)
        print(f"[deploy] private key {paths['key']} (stays at {args.site})\n"
              f"[deploy] public key {paths['pub']}: send it to the coordinator, who runs\n"
              f"    flwr supernode register {paths['pub'].name} FEDERATION")
    elif args.action == "connect":
        path = add_connection(args.name, args.address, args.ca)
        print(f"[deploy] {path}: SuperLink connection {args.name!r} -> {args.address} (TLS, CA "
              f"{args.ca})\n[deploy] next: flwr supernode register SITE.pub {args.name}; "
              f"flwr run . {args.name} --stream")
    elif args.action == "superlink":
        return _exec(superlink_command(args.certs, args.host, args.port, args.database,
                                       args.log_file), args.print)
    elif args.action == "supernode":
        for flag, path in (("--data-path", args.data_path), ("--proxy-path", args.proxy_path)):
            if not Path(path).expanduser().exists():
                raise DeployError(f"{flag} {path}: not found")
        node = {"data-path": str(Path(args.data_path).expanduser().resolve()),
                "data-layout": args.layout, "site": args.site,
                "proxy-path": str(Path(args.proxy_path).expanduser().resolve()),
                "state-dir": str(Path(args.state_dir).expanduser().resolve())
                if args.state_dir else None, "threads": args.threads}
        return _exec(supernode_command(args.superlink, args.ca, args.key, node, args.port,
                                       args.insecure), args.print)
    elif args.action == "bundle":
        out = bundle(args.run_dir, args.out or Path(f"{Path(args.run_dir).name}.tar.gz"))
        print(f"[deploy] {out}: report, figures and exported student of {args.run_dir}")
    return 0


def add_arguments(parser) -> None:
    """The ``fedkd deploy`` actions (see the README's hospital guide)."""
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("certs", help="make a CA and the SuperLink's TLS certificate")
    p.add_argument("--out", type=Path, required=True, help="folder for ca.* and server.*")
    p.add_argument("--host", nargs="+", default=["localhost", "127.0.0.1"],
                   help="the SuperLink's DNS names / IPs as sites will dial them")
    p.add_argument("--days", type=int, default=365, help="validity (days)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p = sub.add_parser("node-key", help="make a site's SuperNode key pair")
    p.add_argument("--site", required=True, help="site name (file stem)")
    p.add_argument("--out", type=Path, required=True, help="folder for SITE.key and SITE.pub")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p = sub.add_parser("connect", help="add a SuperLink connection to $FLWR_HOME/config.toml "
                       "(for flwr run / flwr supernode register)")
    p.add_argument("--name", required=True, help="connection name (used as FEDERATION)")
    p.add_argument("--address", required=True, help="SuperLink HOST:PORT")
    p.add_argument("--ca", type=Path, required=True, help="the federation's ca.crt")
    p = sub.add_parser("superlink", help="start flower-superlink with TLS and SuperNode auth")
    p.add_argument("--certs", type=Path, required=True, help="folder made by `deploy certs`")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=SUPERLINK_PORT, help="HTTPS port (default 8000)")
    p.add_argument("--database", type=Path, default=None,
                   help="SQLite file for the SuperLink's state (default: in memory)")
    p.add_argument("--log-file", type=Path, default=None, help="SuperLink log file")
    p.add_argument("--print", action="store_true", help="print the command, do not start it")
    p = sub.add_parser("supernode", help="start a site's flower-supernode")
    p.add_argument("--superlink", required=True, help="SuperLink HOST:PORT")
    p.add_argument("--ca", type=Path, help="the federation's ca.crt (required unless --insecure)")
    p.add_argument("--key", type=Path, required=True, help="this site's SITE.key")
    p.add_argument("--data-path", required=True, help="the site's private cases")
    p.add_argument("--layout", default="liu", choices=["liu", "msd", "manifest"])
    p.add_argument("--proxy-path", required=True, help="the public proxy set")
    p.add_argument("--state-dir", default=None, help="teacher checkpoint folder "
                   "(default ~/.fedkd/state/SITE)")
    p.add_argument("--site", default=None, help="site name in reports (default: folder name)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--port", type=int, default=9094, help="the SuperNode's local port")
    p.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
    p.add_argument("--print", action="store_true", help="print the command, do not start it")
    p = sub.add_parser("bundle", help="pack a finished run's report and student (tar.gz)")
    p.add_argument("run_dir", type=Path, help="the run directory on the coordinator")
    p.add_argument("--out", type=Path, default=None, help="archive (default RUN.tar.gz)")
