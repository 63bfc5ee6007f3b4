"""What the coordinator and the peers share about their Prometheus endpoint: its configuration,
the HTTP(S) server (prometheus_client's WSGI app and threading server, over a registry of the
process's own, so a coordinator and peers in one test process keep their counts apart; TLS
handshakes in each connection's thread, bounded) and a gRPC server interceptor that
counts calls by method and status code. The metrics themselves: ``dml.coordinator.metrics`` and
``dml.peer.metrics``; their names: README, "Metrics"."""
from __future__ import annotations

import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

# Seconds, from a millisecond round trip to a round of minutes (Prometheus' default buckets stop at 10 s).
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, float("inf"))


class MetricsBindError(OSError):
    """The metrics endpoint could not start: its address is taken or not this host's, or its TLS
    files are unusable."""


@dataclass(frozen=True)
class MetricsConfig:
    """Where a process serves ``/metrics``: host and port (0 picks a free one). With ``certfile``
    and ``keyfile`` it serves HTTPS with that certificate; with ``cafile`` too, a scraper must
    present a client certificate that CA signed (mutual TLS, as on the gRPC ports)."""

    host: str = "127.0.0.1"
    port: int = 0
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None

    @property
    def tls(self) -> bool:
        """Whether the endpoint serves HTTPS."""
        return bool(self.certfile and self.keyfile)


# A scraper gets this long to finish its TLS handshake and to send each request; silent ones are dropped.
CLIENT_TIMEOUT_S = 10.0


class _Handler(WSGIRequestHandler):
    """One scrape's connection: bounded by ``CLIENT_TIMEOUT_S`` and not logged per request."""

    timeout = CLIENT_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Logs nothing: scrapes come every few seconds."""


class _Server(ThreadingWSGIServer):
    """prometheus_client's thread-per-connection server, with TLS done in the connection's own
    thread. (prometheus_client wraps the listening socket, so the handshake runs in ``accept``
    and one client that connects and sends nothing stops every scrape after it.)"""

    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Handshakes (bounded by the handler's timeout), then serves the connection."""
        if self.tls is not None:
            request.settimeout(CLIENT_TIMEOUT_S)
            request = self.tls.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that breaks its connection, fails the handshake or times out costs one
        debug line, not a traceback on stderr."""
        log.debug("metrics: connection from %s failed: %s", client_address, sys.exc_info()[1])


def _tls_context(config: MetricsConfig) -> ssl.SSLContext:
    for path in (config.certfile, config.keyfile, config.cafile):
        if path and not os.access(path, os.R_OK):
            raise MetricsBindError(f"cannot serve metrics over TLS: cannot read {path}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.certfile, config.keyfile)  # type: ignore[arg-type]
    if config.cafile:
        ctx.load_verify_locations(cafile=config.cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MetricsServer:
    """A running ``/metrics`` endpoint over one registry; :meth:`stop` ends it."""

    def __init__(self, registry: CollectorRegistry, config: MetricsConfig, what: str) -> None:
        """Listens on ``config``'s address and serves ``registry`` from a daemon thread; raises
        :class:`MetricsBindError` naming the address when it cannot listen there (or its
        certificate files cannot be read)."""
        self.config = config
        where = f"{config.host}:{config.port}"
        try:
            tls = _tls_context(config) if config.tls else None
            family, _, _, _, sockaddr = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
            server_class = type("MetricsHTTPServer", (_Server,), {"address_family": family, "tls": tls})
            self._httpd = make_server(sockaddr[0], config.port, make_wsgi_app(registry), server_class,
                                      handler_class=_Handler)
        except MetricsBindError:
            raise
        except ssl.SSLError as e:
            raise MetricsBindError(f"cannot serve metrics over TLS: {config.certfile} and {config.keyfile} are not "
                                   f"a certificate and its key ({e.reason or e})") from None
        except OSError as e:
            why = f"{e.strerror}: {e.filename}" if e.filename else (e.strerror or str(e))
            raise MetricsBindError(f"cannot serve metrics on {where}: {why}") from None
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"metrics-{self.port}", daemon=True)
        self._thread.start()
        log.info("%s: metrics on %s", what, self.url)

    @property
    def url(self) -> str:
        """The endpoint's address, ``http(s)://host:port/metrics``."""
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{'https' if self.config.tls else 'http'}://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stops serving and closes the listening socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(2)


def serve(registry: CollectorRegistry, config: MetricsConfig | None, what: str) -> MetricsServer | None:
    """Serves ``registry`` as ``config`` says; None (nothing served) when ``config`` is None.
    ``what`` names the process in the log line that gives the address."""
    return MetricsServer(registry, config, what) if config is not None else None


class RpcCounter(grpc.ServerInterceptor):
    """Counts the calls a gRPC server answers, by method and status code, in
    ``dml_rpcs_total{method, code}``. A call's code is read where its handler ends: OK when it
    returns, the code it aborted with (or set) otherwise, UNKNOWN for an uncaught exception, and
    CANCELLED when the client left a response stream early."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter("dml_rpcs", "gRPC calls answered, by method and status code",
                             ["method", "code"], registry=registry)

    def _count(self, method: str, context: grpc.ServicerContext, failed: BaseException | None) -> None:
        code = _code_of(context)
        if code is None:
            if failed is None:
                code = grpc.StatusCode.OK
            elif isinstance(failed, GeneratorExit):  # the client stopped reading the stream
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        self.calls.labels(method, code.name).inc()

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        """Wraps the method's handler so that each call is counted once it ends."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, method))
        return handler

    def _unary(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str
               ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                out = behavior(request, context)
            except BaseException as e:
                self._count(method, context, e)
                raise
            self._count(method, context, None)
            return out
        return wrapped

    def _stream(self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str
                ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behavior(request, context)
            except BaseException as e:
                self._count(method, context, e)
                raise
            self._count(method, context, None)
        return wrapped


def _code_of(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status code a handler set or aborted with, None if it set none."""
    code = context.code()  # every grpcio dml supports (>= 1.66) keeps the StatusCode it was given
    return code if isinstance(code, grpc.StatusCode) else None

