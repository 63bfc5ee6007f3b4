"""The one way dml makes gRPC channels and servers.

Every client and server in the code goes through :func:`channel` and :func:`server` (then
:func:`bind`), so message limits, keepalive, reconnect backoff, credentials and interceptors are
set in one place. TLS plugs in here: ``tls=`` on :func:`channel` and :func:`bind` (a
:class:`~dml.common.tls.TlsConfig`, None for plain text, which :func:`bind` allows on loopback only).
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures
from typing import Any

import logging

import grpc

from dml.common import guard
from dml.common.tls import TlsConfig, check_listen

log = logging.getLogger(__name__)

# Message limits, by what travels. Control messages are small; checkpoints travel in chunks well
# under the control limit; exchange frames are one chunk of a flat parameter buffer.
CONTROL_MESSAGE_BYTES = 8 << 20
EXCHANGE_MESSAGE_BYTES = 8 << 20

# Keepalive: a silent connection is probed every 20 s and dropped when a probe goes unanswered
# for 10 s, so a half-open TCP connection (a peer that vanished with its host) is noticed.
KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Reconnect quickly after a restart (gRPC's default backoff starts at 1 s and grows to 120 s).
FAST_RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class BindError(OSError):
    """A server could not listen on the address it was given (in use, or not this host's)."""


def parse_address(address: str) -> tuple[str, int]:
    """Splits a dialable ``HOST:PORT`` (``[V6]:PORT`` for an IPv6 literal) into host and port.

    Raises ValueError with a one-line message when there is no host, no port, or a port that is
    not 1..65535."""
    want = f"HOST:PORT with a port in 1..65535, got {address!r}"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"address must be {want}")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        if not inner or not all(c in "0123456789abcdefABCDEF:." for c in inner):
            raise ValueError(f"address must be {want}")
    elif ":" in host or any(c.isspace() or c in "/[]@" for c in host):
        raise ValueError(f"address must be {want} (write an IPv6 host in brackets: [::1]:50051)")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"address must be {want}")
    return host, int(port)


def _limits(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def channel(address: str, *, tls: TlsConfig | None = None, max_message_bytes: int = CONTROL_MESSAGE_BYTES,
            fast_reconnect: bool = False, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to ``address`` (host:port) with dml's limits and keepalive, over TLS with
    ``tls`` (the server verified against its CA and name, our certificate presented), else plain.

    ``fast_reconnect`` for long-lived channels to a server that may restart (a peer's channel to
    the coordinator); ``options`` adds or overrides gRPC channel arguments."""
    opts = dict(_limits(max_message_bytes) + KEEPALIVE_OPTIONS + (FAST_RECONNECT_OPTIONS if fast_reconnect else []))
    if tls is not None:
        opts.update(tls.channel_options())
    opts.update(options)
    if tls is not None:
        return grpc.secure_channel(address, tls.channel_credentials, options=list(opts.items()))
    return grpc.insecure_channel(address, options=list(opts.items()))


def server(*, workers: int, max_message_bytes: int = CONTROL_MESSAGE_BYTES,
           interceptors: Sequence[grpc.ServerInterceptor] = (), limits: guard.Limits | None = None) -> grpc.Server:
    """A thread-pool server with dml's limits and keepalive policy. Bind it with :func:`bind`.

    Every call first passes the call guard (:mod:`dml.common.guard`: per-client and long-lived
    call limits, idle calls cut), sized from ``workers`` unless ``limits`` is given, then
    ``interceptors`` in order."""
    opts = _limits(max_message_bytes) + [
        # One server per port: without this, gRPC sets SO_REUSEPORT and a second process binds the
        # same port silently, and clients get answers from either.
        ("grpc.so_reuseport", 0),
        # Accept the clients' keepalive pings (the default policy rejects pings more often than 5 min).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    call_guard = guard.GuardInterceptor(limits or guard.Limits.for_pool(workers))
    return grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=opts,
                       interceptors=[call_guard, *interceptors])


def bind(srv: grpc.Server, host: str, port: int, tls: TlsConfig | None = None) -> int:
    """Listens on host:port (0 picks a free port) and returns the port bound: over TLS with
    ``tls`` (client certificates required when it has a CA), else plain text, on loopback only.

    Raises :class:`~dml.common.tls.PlaintextRefused` for plain text on another address (before
    listening), :class:`BindError` naming the address when it is taken or not this host's."""
    check_listen(host, tls)
    address = f"{host}:{port}"
    try:
        bound = srv.add_secure_port(address, tls.server_credentials) if tls is not None else srv.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise BindError(f"cannot listen on {host}:{port}: the address is in use or not this host's")
    return bound


def log_transport(what: str, address: str, tls: TlsConfig | None) -> None:
    """The start-up line saying how ``what`` at ``address`` is served: TLS (mutual or not), or
    plain text, loopback only (a warning: nothing protects it but the host)."""
    if tls is None:
        log.warning("%s on %s serves plain text, loopback only (pass --tls-cert, --tls-key and --tls-ca for TLS)",
                    what, address)
    else:
        log.info("%s on %s serves TLS (%s)", what, address,
                 "mutual: client certificates of the cluster's CA required" if tls.mutual else "no client certificates asked")
