"""TLS settings without sockets: loading and checking the PEM files, the loopback-only rule for
plain text, `dml certs`' files (modes, names, usages, chain), and the flags' one-line errors."""
from __future__ import annotations

import pathlib
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from dml.common import certs, tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[pathlib.Path, list[certs.HostFiles]]:
    out = tmp_path_factory.mktemp("pki") / "certs"
    return out, certs.make_certs(out, ["localhost", "10.0.0.5", "peer"])


def test_no_files_is_plain_text_and_good_files_load(pki):
    assert tls.load(None, None, None) is None
    _, made = pki
    cfg = tls.load(made[0].cert, made[0].key, made[0].ca)
    assert cfg is not None and cfg.can_serve and cfg.mutual and cfg.server_name == tls.CLUSTER_NAME
    assert cfg.args() == ["--tls-cert", str(made[0].cert), "--tls-key", str(made[0].key), "--tls-ca", str(made[0].ca),
                          "--tls-server-name", tls.CLUSTER_NAME]
    client = tls.load(None, None, made[0].ca)
    assert client is not None and not client.can_serve


def test_bad_files_are_one_line_errors_naming_the_flag_and_file(pki, tmp_path):
    _, made = pki
    a, b = made[0], made[1]
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    encrypted = tmp_path / "enc-key.pem"
    key = serialization.load_pem_private_key(a.key.read_bytes(), password=None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pw")))
    cases = [
        ((a.cert, None, None), "--tls-cert and --tls-key go together"),
        ((None, a.key, a.ca), "--tls-cert and --tls-key go together"),
        ((tmp_path / "nope.pem", a.key, None), f"--tls-cert {tmp_path / 'nope.pem'}: cannot read it"),
        ((empty, a.key, None), "is empty"),
        ((a.key, a.key, None), "not a PEM certificate"),
        ((a.cert, a.cert, None), "not a PEM private key"),
        ((a.cert, encrypted, None), "it is encrypted"),
        ((a.cert, b.key, None), f"--tls-key {b.key} is not the key of --tls-cert {a.cert}"),
        ((None, None, a.key), f"--tls-ca {a.key}: not a PEM certificate"),
    ]
    for files, words in cases:
        with pytest.raises(tls.TlsError) as e:
            tls.load(*files)
        assert words in str(e.value) and "\n" not in str(e.value), (files, str(e.value))
    with pytest.raises(tls.TlsError, match="not a DNS name"):
        tls.load(a.cert, a.key, a.ca, server_name="bad name/")


def test_plain_text_only_on_loopback(pki):
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert tls.is_loopback(host), host
        tls.check_listen(host, None)
    for host in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.1"):
        assert not tls.is_loopback(host), host
        with pytest.raises(tls.PlaintextRefused) as e:
            tls.check_listen(host, None)
        assert f"plain text on {host}" in str(e.value) and "--tls-cert, --tls-key and --tls-ca" in str(e.value)
    _, made = pki
    tls.check_listen("0.0.0.0", tls.load(made[0].cert, made[0].key, made[0].ca))
    with pytest.raises(tls.TlsError, match="needs --tls-cert and --tls-key"):
        tls.check_listen("127.0.0.1", tls.load(None, None, made[0].ca))


def test_dml_certs_files_modes_names_usages_and_chain(pki):
    out, made = pki
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / certs.CA_KEY).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((out / certs.CA_CERT).read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = {}
    for f in made:
        assert stat.S_IMODE(f.key.stat().st_mode) == 0o600, f.key
        assert stat.S_IMODE(f.cert.stat().st_mode) == 0o644
        cert = x509.load_pem_x509_certificate(f.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names[f.host] = ({str(n) for n in san.get_values_for_type(x509.DNSName)},
                         {str(n) for n in san.get_values_for_type(x509.IPAddress)})
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert names["localhost"] == ({"localhost", tls.CLUSTER_NAME}, set())
    assert names["10.0.0.5"] == ({tls.CLUSTER_NAME}, {"10.0.0.5"})
    assert names["peer"] == ({"peer", tls.CLUSTER_NAME}, set())
    with pytest.raises(ValueError, match="not a host name"):
        certs.make_certs(out / "x", ["bad/host"])


def _dml(capsys, *argv: str) -> tuple[int, str, str]:
    from dml.client import cli

    code = cli.run(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dml_certs_command_refuses_to_replace_a_ca_unless_told(tmp_path, capsys):
    out = tmp_path / "c"
    code, stdout, _ = _dml(capsys, "certs", "--out", str(out), "--hosts", "coordinator,peer")
    assert code == 0 and f"--tls-cert {out / 'peer.pem'}" in stdout
    ca = (out / certs.CA_CERT).read_bytes()
    code, _, err = _dml(capsys, "certs", "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and "exists: pass --force" in err
    code, _, err = _dml(capsys, "certs", "--out", str(out), "--if-missing")
    assert code == 0 and (out / certs.CA_CERT).read_bytes() == ca and not (out / "localhost.pem").exists()
    code, _, _ = _dml(capsys, "certs", "--out", str(out), "--add", "--hosts", "client")
    assert code == 0 and (out / certs.CA_CERT).read_bytes() == ca
    ca_cert = x509.load_pem_x509_certificate(ca)
    x509.load_pem_x509_certificate((out / "client.pem").read_bytes()).verify_directly_issued_by(ca_cert)
    code, _, _ = _dml(capsys, "certs", "--out", str(out), "--force")
    assert code == 0 and (out / certs.CA_CERT).read_bytes() != ca


def _exit(capsys, main, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code), capsys.readouterr().err


def test_every_command_reads_the_tls_flags_and_refuses_bad_ones_in_one_line(pki, tmp_path, capsys, monkeypatch):
    from dml.client import cli as jobctl
    from dml.coordinator import cli as coord_cli
    from dml.peer import cli as peer_cli

    _, made = pki
    f = made[0]
    good = ["--tls-cert", str(f.cert), "--tls-key", str(f.key), "--tls-ca", str(f.ca)]
    assert coord_cli.build_config(["--port", "0", *good]).tls == tls.load(f.cert, f.key, f.ca)
    pc, _ = peer_cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu", *good])
    assert pc.tls is not None and pc.tls.mutual
    monkeypatch.setenv("DML_TLS_CERT", str(f.cert))
    monkeypatch.setenv("DML_TLS_KEY", str(f.key))
    monkeypatch.setenv("DML_TLS_CA", str(f.ca))
    assert coord_cli.build_config(["--port", "0"]).tls == tls.load(f.cert, f.key, f.ca), "env defaults"
    for name in ("DML_TLS_CERT", "DML_TLS_KEY", "DML_TLS_CA"):
        monkeypatch.delenv(name)
    missing = str(tmp_path / "missing.pem")
    for prog, main, argv in [
        ("dml-coordinator", coord_cli.build_config, ["--tls-cert", missing, "--tls-key", str(f.key)]),
        ("dml-coordinator", coord_cli.build_config, ["--tls-ca", str(f.ca)]),
        ("dml-peer", peer_cli.build_config, ["--coordinator", "127.0.0.1:1", "--device", "cpu", "--tls-cert", str(f.cert)]),
        ("dml", jobctl.run, ["status", "--tls-cert", str(f.cert), "--tls-key", str(made[1].key)]),
    ]:
        code, err = _exit(capsys, main, argv)
        assert code == 2 and err.startswith(f"{prog}: error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err
