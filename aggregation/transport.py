"""The transport a ring member uses to talk to its neighbours, and an in-memory one for tests.

A member sends only to its successor and receives only from its predecessor, so a transport is a
pair of one-way links carrying *frames*: a 20-byte :data:`FRAME` header, then the payload (the
chunk in the job's wire codec). One link may carry several all-reduces in a row (``--sync grads``
runs one per training step over the same connections); the header's ``collective`` numbers them. Sends are zero-copy where the transport allows: ``send`` hands
over a view and returns a sequence number, and the caller must not change those bytes until
the frame has left (``sent_upto`` reaches its number; ``wait_sent`` blocks for it). Receives are two calls, so the payload can land straight in
its final place: ``recv_header``, then ``recv_payload`` into a buffer the caller picks. Errors
surface as :class:`ExchangeError` naming the neighbour at fault.
"""
from __future__ import annotations

import queue
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# phase u8, codec u8, step u16, offset u64 (elements), count u32 (elements), collective u32 (which
# all-reduce of the exchange, from 0); little-endian.
FRAME = struct.Struct("<BBHQII")
ABORT_POLL_S = 0.02  # how often a waiting in-memory member looks for an abort


class ExchangeError(Exception):
    """An exchange with a neighbour failed (broken stream, deadline, protocol violation)."""

    def __init__(self, message: str, suspect: str = "") -> None:
        super().__init__(message)
        self.suspect = suspect


class Cancelled(ExchangeError):
    """This member's own side ended the exchange (the round was cancelled, or superseded by a
    newer one): nobody is at fault and there is nothing to report."""

    def __init__(self, message: str) -> None:
        super().__init__(message, suspect="")


@dataclass(frozen=True)
class Header:
    """Where a frame's chunk belongs in the schedule, and how it is encoded."""

    phase: int
    codec: int
    step: int
    offset: int
    count: int
    collective: int = 0  # which all-reduce of the exchange (one per training step with --sync grads)

    def pack(self) -> bytes:
        """The 20 wire bytes."""
        return FRAME.pack(self.phase, self.codec, self.step, self.offset, self.count, self.collective)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """Parses the first :data:`FRAME` ``.size`` bytes of ``data``."""
        return cls(*FRAME.unpack_from(data))


class RingLink(Protocol):
    """One member's view of the ring: a link to its successor and one from its predecessor."""

    def send(self, header: Header, payload: np.ndarray) -> int:
        """Queues a frame for the successor; returns its sequence number (from 1). The payload
        (a contiguous uint8 array) must stay unchanged until :meth:`wait_sent` for that number returns. Raises
        ExchangeError if the link is broken."""

    def wait_sent(self, seq: int, timeout: float) -> None:
        """Blocks until frame ``seq`` has left this process (its payload may be reused)."""

    def sent_upto(self) -> int:
        """The highest sequence number that has left this process (frames leave in order)."""

    def recv_header(self, timeout: float) -> Header:
        """Header of the next frame from the predecessor. Raises ExchangeError on timeout or a
        broken link."""

    def recv_payload(self, out: np.ndarray, timeout: float) -> None:
        """Fills ``out`` (a contiguous uint8 array) with the payload of the frame whose header
        was just read; ``out.nbytes`` must be its exact size."""

    def close(self, timeout: float) -> None:
        """Waits until every queued frame is delivered. Raises ExchangeError on failure."""


class InMemoryRing:
    """A ring of ``world`` members in one process, joined by queues. Used by unit tests.

    ``break_member`` makes a member's outgoing link go silent, to test failure paths;
    ``abort`` ends the wait of every member once the frames already delivered are read, as a
    real ring's new epoch aborts the members a failed round left waiting.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self._queues: list[queue.Queue[tuple[Header, bytes]]] = [queue.Queue() for _ in range(world)]
        self._broken: set[int] = set()
        self._lock = threading.Lock()
        self._aborted = threading.Event()
        self.sent_bytes = [0] * world

    def abort(self) -> None:
        """Makes every member's wait for a frame that is not already queued end at once with
        :class:`Cancelled` (what was delivered before is still read, in order)."""
        self._aborted.set()

    def break_member(self, rank: int) -> None:
        """Makes every later send from ``rank`` vanish, as if the process died."""
        with self._lock:
            self._broken.add(rank)

    def link(self, rank: int) -> InMemoryLink:
        """The link ``rank`` uses."""
        return InMemoryLink(self, rank)


class InMemoryLink:
    """A member's link in an :class:`InMemoryRing`."""

    def __init__(self, ring: InMemoryRing, rank: int) -> None:
        self._ring = ring
        self._rank = rank
        self._seq = 0
        self._payload = b""

    def send(self, header: Header, payload: np.ndarray) -> int:
        """Copies the frame into the successor's queue (a copy, as a real wire would)."""
        self._seq += 1
        with self._ring._lock:
            if self._rank in self._ring._broken:
                return self._seq
            self._ring.sent_bytes[self._rank] += payload.nbytes + FRAME.size
        succ = (self._rank + 1) % self._ring.world
        self._ring._queues[succ].put((header, bytes(payload)))
        return self._seq

    def wait_sent(self, seq: int, timeout: float) -> None:
        """Sends complete at once."""

    def sent_upto(self) -> int:
        """Every frame has left: sends copy at once."""
        return self._seq

    def recv_header(self, timeout: float) -> Header:
        """Next header from the predecessor; ExchangeError after ``timeout`` seconds, Cancelled
        once the ring is aborted and nothing is left queued."""
        deadline = time.monotonic() + timeout
        box = self._ring._queues[self._rank]
        while True:
            try:
                header, self._payload = box.get(timeout=max(0.0, min(ABORT_POLL_S, deadline - time.monotonic())))
                return header
            except queue.Empty:
                pass
            if self._ring._aborted.is_set() and box.empty():
                raise Cancelled("the ring was aborted")
            if time.monotonic() >= deadline:
                pred = (self._rank - 1) % self._ring.world
                raise ExchangeError(f"no data from rank {pred} within {timeout:.1f}s", suspect=str(pred))

    def recv_payload(self, out: np.ndarray, timeout: float) -> None:
        """Copies the pending payload into ``out``."""
        if out.nbytes != len(self._payload):
            raise ExchangeError(f"payload of {len(self._payload)} bytes, expected {out.nbytes}")
        out.view(np.uint8)[:] = np.frombuffer(self._payload, dtype=np.uint8)

    def close(self, timeout: float) -> None:
        """Nothing to flush: sends are delivered at once."""
