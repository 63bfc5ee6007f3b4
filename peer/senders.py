"""The senders of ring frames to a peer's successor: over the raw gRPC method, over TCP, or
through shared memory with headers on TCP (one sender thread for both, a ``_write`` hook apart)."""
from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
from dml.v1 import exchange_pb2

from dml.aggregation.transport import ExchangeError, Header
from dml.peer import dataplane, shm
from dml.peer.dataplane import close_socket, shutdown_socket
from dml.peer.exchange import FRAMES_METHOD
from dml.peer.inbox import POLL_S, Key
from dml.peer.shm import SharedSlots

ABORTED = "round aborted: the membership changed"
CANCEL_JOIN_S = 2.0

log = logging.getLogger(__name__)


class GrpcSender:
    """Frames to the successor over the raw gRPC method: one client stream per all-reduce,
    opened with its first frame (the successor's server cuts a stream that sends nothing for a
    few seconds, and the link is made before this peer trains)."""

    kind = "grpc"

    def __init__(self, channel: grpc.Channel, key: Key, self_id: str, succ_id: str, deadline_s: float,
                 auth_metadata: list[tuple[str, str | bytes]] | None = None) -> None:
        self._succ_id = succ_id
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self._push = channel.stream_unary(FRAMES_METHOD, request_serializer=None,
                                          response_deserializer=exchange_pb2.PushChunksResponse.FromString)
        job, rnd, epoch = key
        self._md = (("dml-job", job), ("dml-round", str(rnd)), ("dml-epoch", str(epoch)), ("dml-sender", self_id),
                    *(auth_metadata or []))
        self._deadline_s = deadline_s
        self.error = ""
        self._done = threading.Event()
        self._seq = 0
        self._call: grpc.Future | None = None

    def _start(self) -> grpc.Future:
        if self._call is None:
            self._call = self._push.future(self._requests(), timeout=self._deadline_s, metadata=self._md)
            self._call.add_done_callback(self._on_done)
        return self._call

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._out.get()
            if item is None:
                return
            yield item

    def _on_done(self, fut: grpc.Future) -> None:
        if not fut.cancelled():
            err = fut.exception()
            if err is not None:
                code = err.code() if isinstance(err, grpc.Call) else None
                details = err.details() if isinstance(err, grpc.Call) else str(err)
                self.error = f"stream to {self._succ_id} failed: {code} {details}"
        self._done.set()

    def send(self, header: Header, payload: np.ndarray) -> int:
        # One copy: the payload goes straight from the caller's buffer into the message, so the
        # frame counts as sent at once.
        self._out.put(b"".join((header.pack(), payload.data)))
        self._start()
        self._seq += 1
        return self._seq

    def wait_sent(self, seq: int, timeout: float, abort: threading.Event) -> None:
        """Frames are copied when queued."""

    def sent_upto(self) -> int:
        return self._seq

    def finish(self, timeout: float, abort: threading.Event) -> None:
        self._out.put(None)
        self._start()
        deadline = time.monotonic() + timeout
        while not self._done.wait(POLL_S):
            if abort.is_set():
                raise ExchangeError(ABORTED)
            if time.monotonic() > deadline:
                raise ExchangeError(f"{self._succ_id} did not acknowledge in time", suspect=self._succ_id)
        if self.error:
            raise ExchangeError(self.error, suspect=self._succ_id)

    def cancel(self) -> None:
        if self._call is not None and not self._call.done():
            self._out.put(None)
            self._call.cancel()


class TcpSender:
    """Frames to the successor over an authenticated TCP stream, written by a sender thread with
    ``sendmsg`` straight from the caller's buffers (zero copies in user space)."""

    kind = "tcp"

    def __init__(self, sock: socket.socket, succ_id: str, idle_s: float) -> None:
        self._sock = sock
        self._succ_id = succ_id
        self._idle_s = idle_s
        sock.settimeout(idle_s)  # a successor that stops reading for this long is dead
        self._out: queue.Queue[tuple[bytes, np.ndarray, int] | None] = queue.Queue()
        self._cond = threading.Condition()
        self._sent = 0
        self._seq = 0
        self.error = ""
        self._finished = False  # the last all-reduce ended with the successor's acknowledgement
        self._thread = threading.Thread(target=self._loop, name=f"send-{succ_id}", daemon=True)
        self._thread.start()

    def reusable(self) -> bool:
        """Whether this sender may carry another all-reduce (see :mod:`peer.kept`): its last one
        was acknowledged, nothing failed, and the stream is still open and idle."""
        return (self._finished and not self.error and not self._thread.is_alive()
                and dataplane.stream_idle(self._sock))

    def begin(self, rnd: int, epoch: int) -> None:
        """Starts the next all-reduce on a kept stream: its round preamble first (the receiver
        refuses one of another epoch or an older round), then frames as on a new stream."""
        if not self._finished:
            raise RuntimeError("a sender is reused only after an acknowledged all-reduce")
        self._finished = False
        self._sock.settimeout(self._idle_s)
        self._sock.sendall(dataplane.round_preamble(rnd, epoch))  # 20 bytes: never waits on an idle stream
        self._restart()
        self._thread = threading.Thread(target=self._loop, name=f"send-{self._succ_id}", daemon=True)
        self._thread.start()

    def _restart(self) -> None:
        """Per-all-reduce state a subclass resets when a kept stream starts again."""

    def _loop(self) -> None:
        while True:
            item = self._out.get()
            if item is None:
                return
            header, payload, seq = item
            try:
                self._write(header, payload.data.cast("B"))
            except (OSError, ValueError) as e:
                with self._cond:
                    self.error = f"stream to {self._succ_id} failed: {e!r}"
                    self._cond.notify_all()
                return
            with self._cond:
                self._sent = seq
                self._cond.notify_all()

    def _write(self, header: bytes, payload: memoryview) -> None:
        """Puts one frame on its way (called on the sender thread, in order)."""
        _sendmsg_all(self._sock, header, payload)

    def send(self, header: Header, payload: np.ndarray) -> int:
        self._seq += 1
        self._out.put((header.pack(), payload, self._seq))
        return self._seq

    def wait_sent(self, seq: int, timeout: float, abort: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._sent < seq:
                if self.error:
                    raise ExchangeError(self.error, suspect=self._succ_id)
                if abort.is_set():
                    raise ExchangeError(ABORTED)
                if time.monotonic() > deadline:
                    raise ExchangeError(f"sending to {self._succ_id} made no progress in time", suspect=self._succ_id)
                self._cond.wait(POLL_S)

    def sent_upto(self) -> int:
        return self._sent

    def finish(self, timeout: float, abort: threading.Event) -> None:
        """Waits for every frame to leave, then for the successor's one-byte acknowledgement."""
        self._out.put(None)
        self.wait_sent(self._seq, timeout, abort)
        deadline = time.monotonic() + timeout
        self._sock.settimeout(POLL_S)
        while True:
            try:
                got = self._sock.recv(64)
            except TimeoutError:
                if abort.is_set():
                    raise ExchangeError(ABORTED) from None
                if time.monotonic() > deadline:
                    raise ExchangeError(f"{self._succ_id} did not acknowledge in time", suspect=self._succ_id) from None
                continue
            except OSError as e:
                raise ExchangeError(f"stream to {self._succ_id} failed: {e!r}", suspect=self._succ_id) from None
            if not got:
                raise ExchangeError(f"{self._succ_id} closed the stream without acknowledging", suspect=self._succ_id)
            if self._acknowledged(got):
                self._thread.join(CANCEL_JOIN_S)  # it took the end marker after the last frame
                self._finished = True
                return

    def _acknowledged(self, got: bytes) -> bool:
        """Whether ``got`` (bytes from the successor after the last frame) is its acknowledgement
        (which is the last thing it sends in an all-reduce)."""
        if got != dataplane.ACK:
            raise ExchangeError(f"{self._succ_id} closed the stream without acknowledging", suspect=self._succ_id)
        return True

    def cancel(self) -> None:
        """Ends the stream: shut down first, which wakes the sender thread (its write fails at
        once), and closed only once that thread is out of it, so no write of ours can land on a
        descriptor number the next connection has been given meanwhile."""
        self._out.put(None)
        shutdown_socket(self._sock)
        self._thread.join(CANCEL_JOIN_S)
        if self._thread.is_alive():  # cannot happen short of a wedged kernel: leave the fd to the GC
            log.warning("sender to %s did not stop; leaving its socket to be collected", self._succ_id)
            return
        close_socket(self._sock)


class ShmSender(TcpSender):
    """Frames to a successor on this host: each payload is copied into a shared-memory slot and
    only its header goes on the TCP stream; the successor returns one credit byte per slot it
    has read, and a slot is written again only after its credit (so at most ``shm.SLOTS``
    frames are in flight). Everything else, failures and the closing acknowledgement included,
    is the TCP sender's."""

    kind = "shm"

    def __init__(self, sock: socket.socket, slots: SharedSlots, succ_id: str, idle_s: float) -> None:
        self._slots = slots
        self._credits = shm.SLOTS  # slots free to write
        self._frame = 0
        super().__init__(sock, succ_id, idle_s)

    def reusable(self) -> bool:
        """As for TCP, and every slot's credit is back (the receiver read them all)."""
        return self._credits == shm.SLOTS and super().reusable()

    def _restart(self) -> None:
        self._frame = 0  # the receiver's next link counts slots from 0 too

    def _take_credit(self) -> None:
        while self._credits == 0:
            got = self._sock.recv(64)  # the socket's idle timeout bounds the wait
            if not got:
                raise ConnectionError("closed by the successor")
            if got.strip(shm.CREDIT):
                raise ConnectionError(f"unexpected bytes {got[:8]!r} from the successor")
            self._credits += len(got)

    def _write(self, header: bytes, payload: memoryview) -> None:
        self._take_credit()
        self._slots.slot(self._frame, len(payload))[:] = payload
        self._credits -= 1
        self._frame += 1
        self._sock.sendall(header)

    def _acknowledged(self, got: bytes) -> bool:
        rest = got.lstrip(shm.CREDIT)  # credits for the last slots may precede the acknowledgement
        self._credits += len(got) - len(rest)
        if not rest:
            return False
        if rest != dataplane.ACK or self._credits > shm.SLOTS:
            raise ExchangeError(f"{self._succ_id} closed the stream without acknowledging", suspect=self._succ_id)
        return True


def _sendmsg_all(sock: socket.socket, header: bytes, payload: memoryview) -> None:
    """Writes header then payload with as few system calls as the kernel allows (inside TLS,
    which has no ``sendmsg``: two writes, the payload still straight from the caller's buffer)."""
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(header)
        sock.sendall(payload)
        return
    sent = sock.sendmsg([header, payload])
    if sent < len(header):
        sock.sendall(memoryview(header)[sent:])
        sent = len(header)
    if sent - len(header) < len(payload):
        sock.sendall(payload[sent - len(header):])
