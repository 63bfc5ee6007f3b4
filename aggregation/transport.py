"""The transport a ring member uses to talk to its neighbours, and an in-memory one for tests.

A member sends only to its successor and receives only from its predecessor, so a transport is a
pair of one-way links. ``send`` never blocks on the network (it queues); ``recv`` waits up to a
timeout. Errors surface as :class:`ExchangeError` naming the neighbour at fault.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class ExchangeError(Exception):
    """An exchange with a neighbour failed (broken stream, deadline, protocol violation)."""

    def __init__(self, message: str, suspect: str = "") -> None:
        super().__init__(message)
        self.suspect = suspect


@dataclass(frozen=True)
class Chunk:
    """A slice of a sender's flat buffer, tagged with where it belongs in the schedule."""

    phase: int
    step: int
    offset: int
    data: np.ndarray


class RingLink(Protocol):
    """One member's view of the ring: a link to its successor and one from its predecessor."""

    def send(self, chunk: Chunk) -> None:
        """Queues ``chunk`` for the successor. Raises ExchangeError if the link is broken."""

    def recv(self, timeout: float) -> Chunk:
        """Next chunk from the predecessor. Raises ExchangeError on timeout or a broken link."""

    def close(self, timeout: float) -> None:
        """Waits until every queued chunk is delivered. Raises ExchangeError on failure."""


class InMemoryRing:
    """A ring of ``world`` members in one process, joined by queues. Used by unit tests.

    ``drop_from`` makes a member's outgoing link fail, to test failure paths.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self._queues: list[queue.Queue[Chunk]] = [queue.Queue() for _ in range(world)]
        self._broken: set[int] = set()
        self._lock = threading.Lock()

    def break_member(self, rank: int) -> None:
        """Makes every later send from ``rank`` vanish, as if the process died."""
        with self._lock:
            self._broken.add(rank)

    def link(self, rank: int) -> "InMemoryLink":
        """The link ``rank`` uses."""
        return InMemoryLink(self, rank)


class InMemoryLink:
    """A member's link in an :class:`InMemoryRing`."""

    def __init__(self, ring: InMemoryRing, rank: int) -> None:
        self._ring = ring
        self._rank = rank

    def send(self, chunk: Chunk) -> None:
        """Copies the chunk into the successor's queue (a copy, as a real wire would)."""
        with self._ring._lock:
            if self._rank in self._ring._broken:
                return
        succ = (self._rank + 1) % self._ring.world
        self._ring._queues[succ].put(Chunk(chunk.phase, chunk.step, chunk.offset, chunk.data.copy()))

    def recv(self, timeout: float) -> Chunk:
        """Next chunk from the predecessor, or ExchangeError after ``timeout`` seconds."""
        try:
            return self._ring._queues[self._rank].get(timeout=timeout)
        except queue.Empty:
            pred = (self._rank - 1) % self._ring.world
            raise ExchangeError(f"no data from rank {pred} within {timeout:.1f}s", suspect=str(pred)) from None

    def close(self, timeout: float) -> None:
        """Nothing to flush: sends are delivered at once."""
