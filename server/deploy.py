"""The coordinator's deployment files and commands: TLS certificates, the SuperLink command,
the ``flwr`` connection, and the bundle of a finished run for the sites.

Everything here writes files or builds command lines for Flower's own processes
(``flower-superlink``, ``flwr``); nothing replaces them. Files made by :func:`make_certificates`
(``DIR``)::

    ca.crt ca.key          the federation's certificate authority (keep ca.key offline)
    server.crt server.key  the SuperLink's certificate, signed by the CA, for the given hosts

Flower 1.42 serves its Fleet, Control and runtime APIs over one HTTPS port per SuperLink
(``--host``/``--port``, default 8000). A hospital's side is :mod:`client.deploy`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Iterable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.tooling import DeployError, flower_bin, need_file, write_files

SUPERLINK_PORT = 8000


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
    write_files({paths["ca"]: (ca.public_bytes(pem), False),
                paths["ca_key"]: (_pem_key(ca_key), True),
                paths["cert"]: (cert.public_bytes(pem), False),
                paths["key"]: (_pem_key(key), True)}, force)
    return paths


def superlink_command(certs: Path, host: str = "0.0.0.0", port: int = SUPERLINK_PORT,
                      database: Optional[Path] = None, log_file: Optional[Path] = None) -> list[str]:
    """``flower-superlink`` with TLS (``certs``: a :func:`make_certificates` folder), SuperNode
    authentication, and no runtime dependency installation (the installed environment runs the
    apps). ``database`` keeps the SuperLink's state across restarts (default: in memory)."""
    certs = Path(certs)
    argv = [flower_bin("flower-superlink"),
            "--ssl-ca-certfile", need_file(certs / "ca.crt", "CA certificate"),
            "--ssl-certfile", need_file(certs / "server.crt", "SuperLink certificate"),
            "--ssl-keyfile", need_file(certs / "server.key", "SuperLink private key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(port)]
    if database:
        argv += ["--database", str(database)]
    if log_file:
        argv += ["--log-file", str(log_file)]
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
    links[name] = {"address": address, "root-certificates": need_file(ca, "CA certificate")}
    links.setdefault("default", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


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
