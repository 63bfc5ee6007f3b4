"""The inbox of one all-reduce: the frames a peer's ring predecessor sends it, queued (gRPC) or
as a stream (TCP, shared memory), keyed by (job, round, epoch). See docs/architecture.md.

An inbox is *claimed* once this peer's own plan asks for it (its ring link); before that it is
only what a sender said, so the exchange server bounds unclaimed inboxes tightly and drops them
when no plan claims them within :data:`UNCLAIMED_TTL_S`."""
from __future__ import annotations

import queue
import socket
import threading
import time
from collections import deque
from typing import Any

from dml.aggregation.transport import Header
from dml.peer.dataplane import close_socket, shutdown_socket
from dml.peer.shm import SharedSlots

Key = tuple[str, int, int]  # (job_id, round, epoch)
INBOX_CHUNKS = 64
POLL_S = 0.05
UNCLAIMED_TTL_S = 10.0  # an inbox no plan of this peer claims is dropped this long after it was made
Frame = tuple[Header, memoryview]


class Broken:
    """Queued when the predecessor's gRPC stream breaks: the receiver fails with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _nbytes(item: Any) -> int:
    return len(item[1]) if isinstance(item, tuple) else 0


class FrameQueue(queue.Queue):  # type: ignore[type-arg]
    """A bounded queue of frames that also counts the payload bytes it holds (``nbytes``)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.nbytes = 0

    def _init(self, maxsize: int) -> None:
        self.queue: deque[Any] = deque()

    def _put(self, item: Any) -> None:
        self.queue.append(item)
        self.nbytes += _nbytes(item)

    def _get(self) -> Any:
        item = self.queue.popleft()
        self.nbytes -= _nbytes(item)
        return item

    def drain(self) -> None:
        """Drops everything queued (the memory goes with it)."""
        with self.mutex:
            self.queue.clear()
            self.nbytes = 0
            self.not_full.notify_all()


class Inbox:
    """Frames from the predecessor for one all-reduce: queued gRPC frames, or a TCP stream.

    The stream belongs to the one link that reads it once it has taken it (:meth:`take_stream`): another
    thread dropping the inbox (a newer round's inbox opened, the peer stopping) only shuts it
    down, which wakes the reader, and the reader closes it (:meth:`close` with ``reader``).
    Closing a socket under a thread blocked on it would hand that thread EBADF, or worse, a
    descriptor number already reused by the next connection."""

    def __init__(self, key: Key, sender: str = "", claimed: bool = False, now: float | None = None) -> None:
        self.key = key
        self.created = time.monotonic() if now is None else now
        self.q: FrameQueue = FrameQueue(INBOX_CHUNKS)
        self.closed = threading.Event()
        self.arrived = threading.Event()  # set by the first gRPC frame or the TCP stream
        self.conn: socket.socket | None = None
        self.shm: SharedSlots | None = None  # payloads come through these slots (headers on conn)
        self.sender = sender
        self.claimed = claimed  # a plan of this peer asked for it (else: only a sender did)
        self.dropped = ""  # why the exchange server dropped it ("" unless it did)
        self._lock = threading.Lock()
        self._reading = False  # a link took the stream to read it: from then on only that link closes it

    def attach(self, conn: socket.socket, sender: str, shm: SharedSlots | None) -> bool:
        """Binds the predecessor's TCP stream (one per inbox); False if closed or taken."""
        with self._lock:
            if self.closed.is_set() or self.conn is not None:
                return False
            self.conn, self.sender, self.shm = conn, sender, shm
        self.arrived.set()
        return True

    def take_stream(self) -> socket.socket | None:
        """The stream, for the link that reads it (None once the inbox is closed): from now on
        only that link closes it."""
        with self._lock:
            if self.closed.is_set():
                return None
            self._reading = True
            return self.conn

    def detach_stream(self) -> tuple[socket.socket, SharedSlots | None] | None:
        """Hands the stream (and its slots) over to be kept for the next round, for the link
        that reads it, once its all-reduce ended cleanly; None if closed or not a stream. The
        inbox no longer closes them."""
        with self._lock:
            if self.closed.is_set() or self.conn is None:
                return None
            conn, slots = self.conn, self.shm
            self.conn, self.shm = None, None
            return conn, slots

    def close(self, reason: str = "", reader: bool = False) -> None:
        """Marks the inbox dead and drops its stream and queued frames, if any. The stream is
        closed, or, when a link reads it and this is not that link (``reader``), shut down for
        the link to close. ``reason``: why the exchange server dropped it."""
        with self._lock:
            if reason and not self.dropped:
                self.dropped = reason
            self.closed.set()
            conn, someone_reads, slots = self.conn, self._reading and not reader, self.shm
        self.arrived.set()
        if conn is not None:
            if someone_reads:
                shutdown_socket(conn)
            else:
                close_socket(conn)
        if slots is not None:
            slots.close()
        self.q.drain()

    def put_broken(self, reason: str) -> None:
        """Tells the receiver the stream broke (dropped if the inbox stays full for a second)."""
        try:
            self.q.put(Broken(reason), timeout=1.0)
            self.arrived.set()
        except queue.Full:
            pass
