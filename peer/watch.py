"""A ring member's watch on its successor, from the opening of its link to its next plan.

A member learns that a ring neighbour died from the exchange: a stream breaks, a port refuses.
Two moments have nothing to break. During the all-reduce, a successor killed after accepting our
stream leaves our first frames in the kernel's buffer, and if we then only wait for our own
predecessor (which itself waits for the dead peer's stream, never opened) nobody's write or read
fails. After our all-reduce we hold no stream at all, yet the round commits only when every member
has reported, and a successor killed before its report never reports. Either way only its lease
would tell, and the ring would stall for the peer timeout.

So once the link to the successor is open, the member holds one call open on the link's gRPC
channel, ``PeerWatch/Watch``: the successor's server sends nothing and ends it only when the
caller cancels. If the successor dies or stops, the call breaks at once with UNAVAILABLE. During
the exchange the link then fails naming the successor; after it, the peer keeps the watch until
its next plan and reports the successor itself. A report for a round that has meanwhile committed
or been re-formed is stale and the coordinator ignores it, so a watch that fires late is harmless.

The method is raw (no protobuf), like the frames of :mod:`peer.exchange`: nothing travels.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import grpc

WATCH_SERVICE = "dml.v1.PeerWatch"
WATCH_METHOD = f"/{WATCH_SERVICE}/Watch"
WATCH_MAX_S = 600.0  # a watch outliving this ends quietly (no peer waits this long for a plan)

Key = tuple[str, int, int]  # (job_id, round, epoch)


def _serve(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    """Holds the call open, sending nothing, until the caller cancels it (or WATCH_MAX_S)."""
    ended = threading.Event()
    if context.add_callback(ended.set):  # False: the call is already over
        ended.wait(WATCH_MAX_S)
    return iter(())


def handler() -> grpc.GenericRpcHandler:
    """The server side of the watch, for a peer's exchange server."""
    return grpc.method_handlers_generic_handler(WATCH_SERVICE, {
        "Watch": grpc.unary_stream_rpc_method_handler(_serve, request_deserializer=None, response_serializer=None),
    })


class SuccessorWatch:
    """The watch call to ring successor ``succ_id`` on ``channel``, for the exchange of ``key``
    (``metadata``: the call's signature, :mod:`peer.auth`).
    ``lost`` says why the successor went away ("" while it is there). The watch closes
    ``channel`` when it is closed if it ``owns_channel``; a channel kept for the epoch
    (:mod:`peer.kept`) belongs to the cache, and the watch then only cancels its call."""

    def __init__(self, channel: grpc.Channel, key: Key, succ_id: str,
                 metadata: list[tuple[str, str | bytes]] | None = None, owns_channel: bool = True) -> None:
        self.job_id, self.round, self.epoch = key
        self.succ_id = succ_id
        self.lost = ""
        self._channel = channel
        self._owns_channel = owns_channel
        self._lock = threading.Lock()
        self._closed = False
        self._ended_first = False  # the call had ended (not by us) when we closed the watch
        self._report: Callable[[str], None] | None = None
        watch = channel.unary_stream(WATCH_METHOD, request_serializer=None, response_deserializer=None)
        self._call = watch(b"", timeout=WATCH_MAX_S, metadata=metadata or None)
        self._call.add_done_callback(self._on_done)  # type: ignore[attr-defined]

    def _on_done(self, call: grpc.Call) -> None:
        # UNAVAILABLE: the connection broke. CANCELLED not of our doing: the successor's server
        # cancelled the call, as a server stopping does (about 1 stop in 50 ends the call so
        # rather than with UNAVAILABLE). Our own CANCELLED comes after close() set _closed:
        # whoever closes a channel closes the watches on it first (peer.link, peer.kept).
        # DEADLINE_EXCEEDED is a watch that outlived WATCH_MAX_S, UNIMPLEMENTED a successor
        # without the method: neither says it went away.
        code = call.code()
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return
        with self._lock:
            if self._closed:
                return
            why = call.details() if code == grpc.StatusCode.UNAVAILABLE else "its server cancelled the watch"
            self.lost = f"{self.succ_id} went away: {why}"
            report = self._report
        if report is not None:
            self._fire(report)

    def on_lost(self, report: Callable[[str], None]) -> None:
        """Calls ``report(lost)`` once, on a thread of its own, when the successor goes away (at
        once if it already has), unless the watch is closed first."""
        with self._lock:
            if self._closed:
                return
            self._report = report
            lost = self.lost
        if lost:
            self._fire(report)

    def _fire(self, report: Callable[[str], None]) -> None:
        def run() -> None:  # off gRPC's thread: a report retries while the coordinator is away
            try:
                if not self._closed:
                    report(self.lost)
            finally:
                self.close()

        threading.Thread(target=run, name=f"watch-{self.succ_id}", daemon=True).start()

    def active(self) -> bool:
        """Whether the call is still open: not closed here, and not ended by the successor or
        the connection under it (which is then not fit for another round either)."""
        return not self._closed and not self._call.done()  # type: ignore[attr-defined]

    def held(self) -> bool:
        """Whether the call stayed open until now, or until we closed it: what a kept channel's
        probe asks (the round loop closes the watch when the next plan comes, just before the
        next round's link takes the channel)."""
        with self._lock:
            if self.lost:
                return False
            if self._closed:
                return not self._ended_first
        return not self._call.done()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Cancels the call and closes the channel if it owns it (idempotent, from any thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ended_first = self._call.done()  # type: ignore[attr-defined]
        self._call.cancel()  # type: ignore[attr-defined]
        if self._owns_channel:
            self._channel.close()
