"""A private certificate authority for one dml cluster and its per-host certificates
(``dml certs``, and the certificates ``dml local`` and :class:`~dml.client.cluster.LocalCluster`
make in their work dir), with the ``cryptography`` package.

``DIR/ca.pem`` and ``DIR/ca-key.pem`` are the CA; each host ``H`` gets ``DIR/H.pem`` and
``DIR/H-key.pem``, usable as a server's and as a client's certificate (peers are both). Every
certificate names its host and the cluster-wide name (:data:`dml.common.tls.CLUSTER_NAME`), which
dialers verify, so one certificate serves a peer whatever address it advertises. Keys are ECDSA
P-256, written mode 0600.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dml.common.tls import CLUSTER_NAME

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
DEFAULT_DAYS = 3650


@dataclass(frozen=True)
class HostFiles:
    """One host's certificate and key files (and the CA that signed them)."""

    host: str
    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path


def _check_host(host: str) -> str:
    h = host.strip()
    if not h or len(h) > 253 or not all(c.isalnum() or c in ".-_:" for c in h):
        raise ValueError(f"not a host name or IP address: {host!r}")
    return h


def _write(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Writes ``data`` atomically with ``mode`` set from the start (a key is never readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dml"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def _san(host: str, cluster_name: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
    except ValueError:
        names.append(x509.DNSName(host))
    if cluster_name and cluster_name != host:
        names.append(x509.DNSName(cluster_name))
    return x509.SubjectAlternativeName(names)


def make_ca(out: pathlib.Path, days: int = DEFAULT_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Writes a fresh CA (``ca.pem``, ``ca-key.pem`` 0600) to ``out``; returns it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(_name("dml cluster CA")).issuer_name(_name("dml cluster CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    _write(out / CA_KEY, _key_pem(key), 0o600)
    _write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def load_ca(out: pathlib.Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA already in ``out``; ValueError if its files are missing or not a CA pair."""
    try:
        cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{out} holds no usable CA ({CA_CERT}, {CA_KEY}): {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out / CA_KEY} is not an ECDSA key")
    return cert, key


def make_host(out: pathlib.Path, host: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
              cluster_name: str = CLUSTER_NAME, days: int = DEFAULT_DAYS) -> HostFiles:
    """Writes ``host``'s certificate (server and client use; names ``host`` and ``cluster_name``)
    and key (0600), signed by the CA."""
    host = _check_host(host)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(host)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(_san(host, cluster_name), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    safe = host.replace(":", "_")
    files = HostFiles(host, out / f"{safe}.pem", out / f"{safe}-key.pem", out / CA_CERT)
    _write(files.key, _key_pem(key), 0o600)
    _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


def make_certs(out: pathlib.Path, hosts: Sequence[str], cluster_name: str = CLUSTER_NAME,
               days: int = DEFAULT_DAYS, reuse_ca: bool = False) -> list[HostFiles]:
    """A CA (the one already in ``out`` with ``reuse_ca``, else a fresh one) and a certificate
    per host in ``out`` (created mode 0700); returns the hosts' files."""
    if not hosts:
        raise ValueError("no hosts to make certificates for")
    checked = [_check_host(h) for h in hosts]
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_cert, ca_key = load_ca(out) if reuse_ca else make_ca(out, days)
    return [make_host(out, h, ca_cert, ca_key, cluster_name, days) for h in checked]
