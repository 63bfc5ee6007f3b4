"""Why a server could not listen: names what holds the address, for the one-line CLI message.

After :func:`dml.common.rpc.bind` raised :class:`~dml.common.rpc.BindError`, :func:`bind_failure`
tells an address in use from one that is not this host's, and probes a holder with the standard
gRPC health check (short deadline): a dml coordinator answers for ``dml.v1.JobService``. The
probe speaks TLS with the process's own config (then plain text, for a plain holder).
"""
from __future__ import annotations

import errno
import logging
import os
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dml.common import rpc
from dml.common.tls import TlsConfig

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
COORDINATOR_SERVICE = "dml.v1.JobService"  # a dml coordinator reports this service's health


def _bind_errno(host: str, port: int) -> int:
    """The errno a plain bind of host:port gets now, as gRPC binds (SO_REUSEADDR); 0 if it works."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            return e.errno or errno.EADDRINUSE
    return 0


def _dial_address(host: str, port: int) -> str:
    """Where to reach whatever listens on host:port (a wildcard host is dialled on loopback)."""
    bare = host.strip("[]")
    if bare in ("", "0.0.0.0"):
        bare = "127.0.0.1"
    elif bare == "::":
        bare = "::1"
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def holder(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S, tls: TlsConfig | None = None) -> str:
    """What listens on host:port: ``another dml coordinator (serving)``, ``another gRPC server``
    or ``another program``, by the gRPC health check (over TLS with ``tls``, then plain)."""
    seen = _probe(host, port, timeout_s, tls)
    if tls is not None and seen == "another program":
        seen = _probe(host, port, timeout_s, None)  # a holder that speaks plain text
    return seen


def _probe(host: str, port: int, timeout_s: float, tls: TlsConfig | None) -> str:
    ch = rpc.channel(_dial_address(host, port), tls=tls)
    try:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=COORDINATOR_SERVICE),
                                                    timeout=timeout_s)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status).lower().replace("_", " ")
        return f"another dml coordinator ({status})"
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        log.debug("health probe of %s:%s: %s", host, port, code)
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
            return "another gRPC server (not a dml coordinator)"
        return "another program"
    finally:
        ch.close()


def bind_failure(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S, tls: TlsConfig | None = None) -> str:
    """One line saying why host:port could not be listened on, naming the holder when in use
    (probed over TLS with ``tls``, the process's own config)."""
    err = _bind_errno(host, port)
    if err == errno.EADDRINUSE:
        return f"{host}:{port} is in use by {holder(host, port, timeout_s, tls)}"
    if err == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}:{port}: not an address of this host"
    if err:
        return f"cannot listen on {host}:{port}: {os.strerror(err)}"
    return f"cannot listen on {host}:{port} (it was in use, and is free now: try again)"
