"""The peer's client for the coordinator's PeerControl service: every call with a deadline, and
retries with capped exponential backoff on UNAVAILABLE / DEADLINE_EXCEEDED."""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

import grpc
from dml.v1 import control_pb2, control_pb2_grpc

from dml.common import rpc

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CALL_TIMEOUT_S = 10.0
LOG_EVERY_S = 20.0  # while the coordinator is unreachable, one log line this often (retries are faster)


class Evicted(Exception):
    """The coordinator no longer knows this peer (NOT_FOUND): re-register."""


class ControlClient:
    """Thin, retrying wrapper over PeerControlStub."""

    def __init__(self, address: str, stop: threading.Event) -> None:
        self.address = address
        self.channel = rpc.channel(address, fast_reconnect=True)
        self.stub = control_pb2_grpc.PeerControlStub(self.channel)
        self._stop = stop
        self._log_lock = threading.Lock()
        self._failing_since: float | None = None  # monotonic time the coordinator became unreachable
        self._next_log = 0.0  # no "unreachable" line before this (monotonic)

    def call(self, fn: Callable[[], T], what: str, give_up_s: float = 3600.0,
             also_retry: tuple[grpc.StatusCode, ...] = ()) -> T:
        """Runs ``fn`` until it succeeds, retrying transient errors with backoff up to ``give_up_s``.

        Retries stay frequent (at most 0.5 s apart, so a restarted coordinator is found at once),
        but while the coordinator stays unreachable the log says so only every
        ``LOG_EVERY_S``, asking to check the address. NOT_FOUND raises Evicted; codes in
        ``also_retry`` are retried too; other errors propagate."""
        delay, start = 0.1, time.monotonic()
        deadline, attempts = start + give_up_s, 0
        while True:
            try:
                out = fn()
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if code == grpc.StatusCode.NOT_FOUND:
                    raise Evicted(e.details() if isinstance(e, grpc.Call) else str(e)) from None
                if (code not in RETRYABLE and code not in also_retry) or time.monotonic() + delay > deadline or self._stop.is_set():
                    raise
                attempts += 1
                self._note_unreachable(what, code, attempts, start)
                if self._stop.wait(delay):
                    raise
                delay = min(delay * 2, 0.5) * (0.8 + 0.4 * random.random())
                continue
            self._note_reachable(what)
            return out

    def _note_unreachable(self, what: str, code: grpc.StatusCode | None, attempts: int, start: float) -> None:
        """Logs an unreachable coordinator: once when it starts, then every LOG_EVERY_S (DEBUG between)."""
        now = time.monotonic()
        with self._log_lock:
            first = self._failing_since is None
            since = self._failing_since = start if self._failing_since is None else self._failing_since
            due = first or now >= self._next_log
            if due:
                self._next_log = now + LOG_EVERY_S
        name = code.name if code is not None else "?"
        if first:
            log.warning("%s: cannot reach the coordinator at %s (%s); retrying. If this persists, check that a "
                        "coordinator runs there and that --coordinator is its address", what, self.address, name)
        elif due:
            log.warning("%s: still cannot reach the coordinator at %s after %.0fs (%s, %d attempts); check "
                        "--coordinator and that the coordinator is running", what, self.address, now - since,
                        name, attempts)
        else:
            log.debug("%s: coordinator %s unavailable (%s); retrying", what, self.address, name)

    def _note_reachable(self, what: str) -> None:
        if self._failing_since is None:  # the common case, without the lock
            return
        with self._log_lock:
            since, self._failing_since = self._failing_since, None
        if since is not None:
            log.info("%s: the coordinator at %s answers again after %.1fs", what, self.address, time.monotonic() - since)

    def register(self, address: str, device: str, memory_bytes: int) -> control_pb2.RegisterPeerResponse:
        """Registers this peer."""
        req = control_pb2.RegisterPeerRequest(
            address=address, capability=control_pb2.PeerCapability(device=device, memory_bytes=memory_bytes))
        return self.call(lambda: self.stub.RegisterPeer(req, timeout=CALL_TIMEOUT_S), "register")

    def upload_checkpoint(self, peer_id: str, job_id: str, rnd: int, epoch: int, digest: str, f: BinaryIO) -> None:
        """Streams a checkpoint from the file object ``f`` in 1 MiB chunks, read as they go (so
        a checkpoint spilled to disk is never held in memory whole). Each attempt reads it anew."""
        step = 1 << 20
        size = f.seek(0, 2)

        def chunks() -> Iterator[control_pb2.CheckpointChunk]:
            for i in range(0, max(size, 1), step):
                f.seek(i)
                yield control_pb2.CheckpointChunk(peer_id=peer_id, job_id=job_id, round=rnd, epoch=epoch,
                                                  digest=digest, data=f.read(step))
        timeout = CALL_TIMEOUT_S + size / 50e6
        # RESOURCE_EXHAUSTED: the coordinator's long-lived calls are all taken for now (see
        # dml.common.guard); the upload goes through once some end, within the minute.
        self.call(lambda: self.stub.UploadCheckpoint(chunks(), timeout=timeout), "upload checkpoint", give_up_s=60,
                  also_retry=(grpc.StatusCode.RESOURCE_EXHAUSTED,))

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()
