"""TLS for every port: the ``--tls-cert --tls-key --tls-ca`` files of a process as one
:class:`TlsConfig`, and what each transport builds from it (gRPC channel and server credentials,
``ssl.SSLContext`` for the TCP data plane), plus the rule that plain text is for loopback only.

The rules (docs/security.md, "TLS"):

- A server serves TLS with ``--tls-cert`` and ``--tls-key``; with ``--tls-ca`` as well it
  requires a client certificate signed by that CA (mutual TLS).
- A dialer verifies the server's chain against ``--tls-ca`` (the system's roots without it) and
  presents its own certificate when it has one. It checks the certificate names
  ``server_name`` (``--tls-server-name``, default :data:`CLUSTER_NAME`, a name every
  certificate ``dml certs`` makes carries) rather than the host it dials: peers dial each other
  by advertised IP addresses no certificate made in advance can list. An empty server name
  checks the host dialed instead.
- Without TLS a server may only listen on a loopback address (:func:`check_listen`).
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import pathlib
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

import grpc

log = logging.getLogger(__name__)

CLUSTER_NAME = "dml.internal"  # the name dialers verify; every certificate `dml certs` makes carries it
FLAGS_HINT = "--tls-cert, --tls-key and --tls-ca (make them with `dml certs --out DIR`)"


class TlsError(ValueError):
    """A TLS setting that cannot work: a missing, unreadable or malformed file, a key that does
    not match its certificate, a server without a certificate. The message is one line."""


class PlaintextRefused(TlsError):
    """A server asked to listen on a non-loopback address without TLS."""


@dataclass(frozen=True)
class TlsConfig:
    """One process's TLS material, read and checked by :func:`load`.

    ``cert``/``key`` (PEM files, both or neither) are this process's identity, required to serve;
    ``ca`` (PEM file) is the cluster's CA: dialers verify servers against it, and a server that
    has it requires and verifies client certificates (mutual TLS). ``server_name`` is the name
    dialers verify in a server's certificate ("" for the host dialed)."""

    cert: pathlib.Path | None = None
    key: pathlib.Path | None = None
    ca: pathlib.Path | None = None
    server_name: str = CLUSTER_NAME
    cert_pem: bytes | None = field(default=None, repr=False)
    key_pem: bytes | None = field(default=None, repr=False)
    ca_pem: bytes | None = field(default=None, repr=False)

    @property
    def can_serve(self) -> bool:
        """Whether this config holds a certificate and key to serve with."""
        return self.cert_pem is not None and self.key_pem is not None

    @property
    def mutual(self) -> bool:
        """Whether a server with this config requires client certificates (``--tls-ca`` given)."""
        return self.ca_pem is not None

    def args(self) -> list[str]:
        """The command line flags that give a child process this config."""
        out: list[str] = []
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path is not None:
                out += [flag, str(path)]
        return out + ["--tls-server-name", self.server_name]

    # -- gRPC ---------------------------------------------------------------------------------
    @functools.cached_property
    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a gRPC channel: verify the server against the CA, present our certificate."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=self.key_pem,
                                            certificate_chain=self.cert_pem)

    def channel_options(self) -> list[tuple[str, Any]]:
        """gRPC channel arguments: the name to verify in the server's certificate."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    @functools.cached_property
    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a gRPC server port; with a CA, client certificates are required."""
        self._need_identity()
        assert self.key_pem is not None and self.cert_pem is not None
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem,
                                           require_client_auth=self.mutual)

    # -- the TCP data plane -------------------------------------------------------------------
    @functools.cached_property
    def server_context(self) -> ssl.SSLContext:
        """An SSLContext for accepting data-plane connections (client certificates required
        and verified against the CA when there is one, as on the gRPC port)."""
        self._need_identity()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cert), str(self.key))
        if self.ca_pem is not None:
            ctx.load_verify_locations(cadata=self.ca_pem.decode())
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    @functools.cached_property
    def client_context(self) -> ssl.SSLContext:
        """An SSLContext for dialing a data plane: the chain verified against the CA, the name
        checked (:meth:`hostname_for`), our certificate presented when we have one."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.ca_pem is not None:
            ctx.load_verify_locations(cadata=self.ca_pem.decode())
        else:
            ctx.load_default_certs()
        if self.cert is not None and self.key is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx

    def hostname_for(self, host: str) -> str:
        """The name to verify in the certificate of the server at ``host``."""
        return self.server_name or host

    def _need_identity(self) -> None:
        if not self.can_serve:
            raise TlsError("serving TLS needs --tls-cert and --tls-key")


def _read(flag: str, path: pathlib.Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TlsError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    if not data.strip():
        raise TlsError(f"{flag} {path}: the file is empty")
    return data


def load(cert: str | pathlib.Path | None, key: str | pathlib.Path | None, ca: str | pathlib.Path | None,
         server_name: str = CLUSTER_NAME) -> TlsConfig | None:
    """Reads and checks the PEM files; None when none is given (plain text). Raises
    :class:`TlsError` with a one-line message naming the flag and file at fault."""
    if not (cert or key or ca):
        return None
    if bool(cert) != bool(key):
        raise TlsError("--tls-cert and --tls-key go together: pass both or neither")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_path = pathlib.Path(cert) if cert else None
    key_path = pathlib.Path(key) if key else None
    ca_path = pathlib.Path(ca) if ca else None
    cert_pem = key_pem = ca_pem = None
    if cert_path is not None and key_path is not None:
        cert_pem, key_pem = _read("--tls-cert", cert_path), _read("--tls-key", key_path)
        try:
            leaf = x509.load_pem_x509_certificates(cert_pem)[0]
        except ValueError:
            raise TlsError(f"--tls-cert {cert_path}: not a PEM certificate") from None
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            why = "it is encrypted (dml needs an unencrypted key, mode 0600)" if isinstance(e, TypeError) else "not a PEM private key"
            raise TlsError(f"--tls-key {key_path}: {why}") from None
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if (private.public_key().public_bytes(serialization.Encoding.DER, public)
                != leaf.public_key().public_bytes(serialization.Encoding.DER, public)):
            raise TlsError(f"--tls-key {key_path} is not the key of --tls-cert {cert_path}")
    if ca_path is not None:
        ca_pem = _read("--tls-ca", ca_path)
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise TlsError(f"--tls-ca {ca_path}: not a PEM certificate") from None
    if server_name and not all(c.isalnum() or c in ".-_*" for c in server_name):
        raise TlsError(f"--tls-server-name {server_name!r}: not a DNS name")
    return TlsConfig(cert_path, key_path, ca_path, server_name, cert_pem, key_pem, ca_pem)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal, ``[v6]``, or a name) is only this machine's loopback.
    A name counts when every address it resolves to is loopback; one that does not resolve does not."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(h, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def check_listen(host: str, tls: TlsConfig | None, what: str = "server") -> None:
    """The rule for every listener: without TLS only a loopback ``host``. Raises
    :class:`PlaintextRefused` (naming the flags to pass) otherwise; a server without TLS is
    logged as plain text, loopback only; a TLS config without a certificate raises TlsError."""
    if tls is not None:
        if not tls.can_serve:
            raise TlsError(f"a {what} on {host} needs --tls-cert and --tls-key to serve TLS")
        return
    if not is_loopback(host):
        raise PlaintextRefused(f"refusing to serve plain text on {host}, which is not a loopback address: "
                               f"pass {FLAGS_HINT}, or listen on 127.0.0.1")
