"""Deployment files and commands (server/deploy.py, client/deploy.py, ``fedkd deploy``) without
starting Flower."""

from __future__ import annotations

import hashlib
import ipaddress
import stat
import tarfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from simulations.cli import main
from client.deploy import make_node_key, node_config_text, supernode_command
from common.tooling import DeployError
from server.deploy import add_connection, bundle, make_certificates, superlink_command


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    paths = make_certificates(tmp_path, ["localhost", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    other = x509.load_pem_x509_certificate(make_certificates(tmp_path / "b")["ca"].read_bytes())
    with pytest.raises(Exception):
        cert.verify_directly_issued_by(other)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in ("ca_key", "key"):
        assert stat.S_IMODE(paths[key].stat().st_mode) == 0o600
    with pytest.raises(DeployError, match="ca.crt: exists"):
        make_certificates(tmp_path)
    old = paths["ca"].read_bytes()
    assert make_certificates(tmp_path, ["h"], force=True)["ca"].read_bytes() != old


def test_node_key_pair_is_what_flower_loads(tmp_path):
    paths = make_node_key(tmp_path, "SiteA")
    priv = load_ssh_private_key(paths["key"].read_bytes(), password=None)
    pub = load_ssh_public_key(paths["pub"].read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert stat.S_IMODE(paths["key"].stat().st_mode) == 0o600
    with pytest.raises(DeployError, match="SiteA.key: exists"):
        make_node_key(tmp_path, "SiteA")
    with pytest.raises(DeployError, match="site name"):
        make_node_key(tmp_path, "a/b")


def test_node_config_round_trips_through_flowers_parser():
    items = {"data-path": '/data/my site/"x"', "proxy-path": "/p", "threads": 2,
             "train.batch_size": 4, "state-dir": None}
    assert parse_config_args([node_config_text(items)]) == {
        "data-path": '/data/my site/"x"', "proxy-path": "/p", "threads": 2,
        "train.batch_size": 4}
    assert parse_config_args([node_config_text({"data-path": "/it's"})]) == {
        "data-path": "/it's"}
    with pytest.raises(DeployError, match="data-path"):
        node_config_text({"data-path": "/a'b\"c"})


def test_commands_name_missing_files(tmp_path):
    with pytest.raises(DeployError, match="ca.crt: CA certificate not found"):
        superlink_command(tmp_path)
    paths = make_certificates(tmp_path)
    argv = superlink_command(tmp_path, port=9999, database=tmp_path / "db")
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert argv[argv.index("--ssl-certfile") + 1] == str(paths["cert"].resolve())
    key = make_node_key(tmp_path, "S")["key"]
    node = {"data-path": "/d", "proxy-path": "/p"}
    argv = supernode_command("h:1", paths["ca"], key, node)
    assert argv[argv.index("--root-certificates") + 1] == str(paths["ca"].resolve())
    assert parse_config_args([argv[argv.index("--node-config") + 1]]) == node
    with pytest.raises(DeployError, match="--ca"):
        supernode_command("h:1", None, key, node)
    with pytest.raises(DeployError, match="nokey: SuperNode private key not found"):
        supernode_command("h:1", paths["ca"], tmp_path / "nokey", node)


def test_connection_is_added_to_the_flower_config(tmp_path):
    ca = make_certificates(tmp_path / "c")["ca"]
    home = tmp_path / "home"
    (home).mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      'address = ":local:"\n')
    import tomli

    add_connection("fed", "1.2.3.4:8000", ca, home=home)
    data = tomli.loads((home / "config.toml").read_text())
    assert data["superlink"]["default"] == "local"
    assert data["superlink"]["local"] == {"address": ":local:"}
    assert data["superlink"]["fed"] == {"address": "1.2.3.4:8000",
                                        "root-certificates": str(ca.resolve())}


def test_bundle_packs_report_and_student_with_checksums(tmp_path):
    run = tmp_path / "run1"
    with pytest.raises(DeployError, match="has the run finished"):
        bundle(run, tmp_path / "b.tar.gz")
    (run / "export").mkdir(parents=True)
    (run / "report.md").write_text("# report\n")
    (run / "state.json").write_text("{}")
    (run / "export" / "student.pt").write_bytes(b"weights")
    out = bundle(run, tmp_path / "b.tar.gz")
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
        sums = tar.extractfile("run1/SHA256SUMS").read().decode()
    assert names == ["run1/SHA256SUMS", "run1/export/student.pt", "run1/report.md"]
    assert f"{hashlib.sha256(b'weights').hexdigest()}  export/student.pt" in sums


def test_cli_deploy_errors_are_one_line(tmp_path, capsys):
    assert main(["deploy", "certs", "--out", str(tmp_path)]) == 0
    assert main(["deploy", "certs", "--out", str(tmp_path)]) == 2
    assert "ca.crt: exists; refusing to overwrite" in capsys.readouterr().err
    assert main(["deploy", "node-key", "--site", "SiteA", "--out", str(tmp_path)]) == 0
    assert "flwr supernode register SiteA.pub" in capsys.readouterr().out
    args = ["deploy", "supernode", "--superlink", "h:1", "--ca", str(tmp_path / "ca.crt"),
            "--key", str(tmp_path / "SiteA.key"), "--proxy-path", str(tmp_path), "--print"]
    assert main(args + ["--data-path", str(tmp_path / "missing")]) == 2
    assert "--data-path" in capsys.readouterr().err
    assert main(args + ["--data-path", str(tmp_path)]) == 0
    assert "flower-supernode --superlink h:1" in capsys.readouterr().out
