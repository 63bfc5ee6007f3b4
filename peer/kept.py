"""The sender side of kept data-plane streams: a peer's outgoing TCP / shared-memory senders
whose all-reduce ended cleanly, kept for the next round to the same successor in the same
membership epoch (see :mod:`peer.dataplane` for the receiving side and the round preamble).

A sender is taken out to be used (by one link at a time) and put back only after a clean end;
a link that fails cancels its sender instead, so nothing is reused after an error. Entries are
closed at an epoch change of their job, when the peer leaves the job or is evicted, when the
server stops, and when more than :data:`MAX_KEPT` are held (the oldest goes first).
"""
from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)

MAX_KEPT = 8  # kept senders in all (a ring member needs one per job it runs)

# (job, epoch, successor id, successor address, shared memory asked for)
SenderKey = tuple[str, int, str, str, bool]


class Reusable(Protocol):
    """What the cache holds: a sender that can say whether its stream still looks open, and be
    cancelled (closed)."""

    def reusable(self) -> bool:
        """Whether the stream is still open and idle (nothing unexpected from the successor)."""

    def cancel(self) -> None:
        """Closes the stream."""


class KeptSenders:
    """Senders kept between rounds, by (job, epoch, successor, address, shared memory)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[SenderKey, Reusable] = {}  # in insertion order: the oldest first

    def take(self, key: SenderKey) -> Reusable | None:
        """The sender kept for ``key``, removed from the cache, if its stream still looks open
        (one that does not is closed here)."""
        with self._lock:
            sender = self._kept.pop(key, None)
        if sender is None:
            return None
        if sender.reusable():
            return sender
        log.info("kept stream to %s (job %s epoch %d) was closed by the successor; opening a new one",
                 key[2], key[0], key[1])
        sender.cancel()
        return None

    def put(self, key: SenderKey, sender: Reusable) -> None:
        """Keeps ``sender`` for the next round of ``key`` (replacing and closing any other)."""
        with self._lock:
            old = self._kept.pop(key, None)
            self._kept[key] = sender
            evicted = []
            while len(self._kept) > MAX_KEPT:
                evicted.append(self._kept.pop(next(iter(self._kept))))
        for s in ([old] if old is not None else []) + evicted:
            s.cancel()

    def drop(self, job: str | None = None, below_epoch: int | None = None) -> int:
        """Closes the senders of ``job`` (every job: None) of epochs before ``below_epoch``
        (every epoch: None); returns how many."""
        with self._lock:
            gone = [k for k in self._kept if (job is None or k[0] == job)
                    and (below_epoch is None or k[1] < below_epoch)]
            senders = [self._kept.pop(k) for k in gone]
        for s in senders:
            s.cancel()
        return len(senders)

    def keys(self) -> list[SenderKey]:
        """What is kept now."""
        with self._lock:
            return list(self._kept)
