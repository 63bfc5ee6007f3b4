"""peer.watch against a real gRPC server on 127.0.0.1:0: which endings of the watch call say the
successor went away (the connection broke, or its server cancelled the call, as a stopping
server may) and which do not (our own close, also through a kept channel's close)."""
from __future__ import annotations

import threading

import grpc

from dml.common import rpc
from dml.peer import watch
from dml.peer.kept import KeptChannel
from tests.integration.helpers import wait_for


def _server(serve) -> tuple[grpc.Server, str]:
    srv = rpc.server(workers=4)
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(watch.WATCH_SERVICE, {
        "Watch": grpc.unary_stream_rpc_method_handler(serve, request_deserializer=None, response_serializer=None)}),))
    port = rpc.bind(srv, "127.0.0.1", 0)
    srv.start()
    return srv, f"127.0.0.1:{port}"


def test_a_watch_its_server_cancels_says_the_successor_went_away():
    def cancelled(request, context):  # what a stopping server sometimes does to an open call
        context.cancel()
        return iter(())

    srv, address = _server(cancelled)
    ch = rpc.channel(address)
    try:
        w = watch.SuccessorWatch(ch, ("j", 1, 1), "p1", owns_channel=False)
        reported: list[str] = []
        w.on_lost(reported.append)
        wait_for(lambda: reported != [], 10, "the watch to report p1")
        assert w.lost == reported[0] == "p1 went away: its server cancelled the watch"
        assert not w.active()
    finally:
        ch.close()
        srv.stop(0).wait(5)


def test_a_watch_we_close_or_whose_kept_channel_we_close_reports_nothing():
    entered = threading.Semaphore(0)

    def serve(request, context):  # the real one, which holds the call until the caller cancels
        entered.release()
        return watch._serve(request, context)  # noqa: SLF001

    srv, address = _server(serve)
    try:
        for how in ("watch", "kept channel"):
            ch = rpc.channel(address)
            w = watch.SuccessorWatch(ch, ("j", 1, 1), "p1", owns_channel=False)
            reported = threading.Event()
            w.on_lost(lambda lost: reported.set())
            assert entered.acquire(timeout=10), "the call never reached the server"
            assert w.active()
            if how == "watch":
                w.close()
                ch.close()
            else:
                KeptChannel(ch, w).cancel()  # an epoch change empties the cache
            assert not reported.wait(1.0), f"closing the {how} read as the successor going away"
            assert w.lost == "" and not w.active()
    finally:
        srv.stop(0).wait(5)
