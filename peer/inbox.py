"""The inbox of one all-reduce: the frames a peer's ring predecessor sends it, queued (gRPC) or
as a stream (TCP, shared memory), keyed by (job, round, epoch). See docs/architecture.md."""
from __future__ import annotations

import queue
import socket
import threading
import time

from dml.aggregation.transport import Header
from dml.peer.dataplane import close_socket
from dml.peer.shm import SharedSlots

Key = tuple[str, int, int]  # (job_id, round, epoch)
INBOX_CHUNKS = 64
POLL_S = 0.05
Frame = tuple[Header, memoryview]


class Broken:
    """Queued when the predecessor's gRPC stream breaks: the receiver fails with ``reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Inbox:
    """Frames from the predecessor for one all-reduce: queued gRPC frames, or a TCP stream."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.created = time.monotonic()
        self.q: queue.Queue[Frame | Broken] = queue.Queue(maxsize=INBOX_CHUNKS)
        self.closed = threading.Event()
        self.arrived = threading.Event()  # set by the first gRPC frame or the TCP stream
        self.conn: socket.socket | None = None
        self.shm: SharedSlots | None = None  # payloads come through these slots (headers on conn)
        self.sender = ""

    def close(self) -> None:
        """Marks the inbox dead and drops its stream, if any."""
        self.closed.set()
        self.arrived.set()
        if self.conn is not None:
            close_socket(self.conn)
        if self.shm is not None:
            self.shm.close()

    def put_broken(self, reason: str) -> None:
        """Tells the receiver the stream broke (dropped if the inbox stays full for a second)."""
        try:
            self.q.put(Broken(reason), timeout=1.0)
            self.arrived.set()
        except queue.Full:
            pass
