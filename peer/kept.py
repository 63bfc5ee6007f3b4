"""The sender side of what a ring member keeps for a membership epoch: its outgoing TCP /
shared-memory senders whose all-reduce ended cleanly, and its gRPC channel to the successor,
kept for the next round to the same successor in the same epoch (see :mod:`peer.dataplane` for
the receiving side and the round preamble).

A new channel and its watch call cost about 1.1 ms of CPU per round (3.1 ms over TLS: a
handshake), both ends counted, against 0.5-0.8 ms for the watch call on a kept one, on every
member every round (``benchmarks/channel_setup.py --tls``, loopback; docs/performance.md). The round's watch call (:mod:`peer.watch`)
stays one per round.

An entry is taken out to be used (by one link at a time) and put back only after a clean end;
a link that fails closes it instead, so nothing is reused after an error. Entries are closed at
an epoch change of their job, when the peer leaves the job or is evicted, when the server stops,
and when more than :data:`MAX_KEPT` are held (the oldest goes first).
"""
from __future__ import annotations

import logging
import threading
from typing import Protocol

import grpc

from dml.peer.watch import SuccessorWatch

log = logging.getLogger(__name__)

MAX_KEPT = 8  # kept entries of a kind in all (a ring member needs one per job it runs)

# (job, epoch, successor id, successor address, shared memory asked for)
SenderKey = tuple[str, int, str, str, bool]
# (job, epoch, successor id, successor address)
ChannelKey = tuple[str, int, str, str]
Key = SenderKey | ChannelKey  # what drop() reads: [0] the job, [1] the epoch


class Reusable(Protocol):
    """What a cache holds: a sender or channel that can say whether it still looks open, and
    be cancelled (closed)."""

    def reusable(self) -> bool:
        """Whether it is still open and idle (nothing unexpected from the successor)."""

    def cancel(self) -> None:
        """Closes it."""


class KeptChannel:
    """A link's gRPC channel to its successor after a clean round, with the watch call the
    round left on it (None where the link kept no watch): the watch is the channel's probe, so
    a channel whose watch ended (the successor or the connection went away) is not reused."""

    def __init__(self, channel: grpc.Channel, watch: SuccessorWatch | None) -> None:
        self.channel = channel
        self.watch = watch

    def reusable(self) -> bool:
        return self.watch is None or self.watch.held()

    def cancel(self) -> None:
        if self.watch is not None:
            self.watch.close()  # first: a call the channel's close cancels would read as the successor's doing
        self.channel.close()


class KeptCache:
    """Senders or channels kept between rounds, by a key that starts (job, epoch, successor,
    address)."""

    def __init__(self, what: str = "stream") -> None:
        self._what = what  # for the log
        self._lock = threading.Lock()
        self._kept: dict[Key, Reusable] = {}  # in insertion order: the oldest first
        self._closed = False  # the server stopped: what a late link puts back is closed at once

    def take(self, key: Key) -> Reusable | None:
        """The entry kept for ``key``, removed from the cache, if it still looks open (one that
        does not is closed here)."""
        with self._lock:
            entry = self._kept.pop(key, None)
        if entry is None:
            return None
        if entry.reusable():
            return entry
        log.info("kept %s to %s (job %s epoch %d) was closed by the successor; opening a new one",
                 self._what, key[2], key[0], key[1])
        entry.cancel()
        return None

    def put(self, key: Key, entry: Reusable) -> None:
        """Keeps ``entry`` for the next round of ``key`` (replacing and closing any other)."""
        with self._lock:
            if self._closed:
                old = entry  # nothing would ever close it here
            else:
                old = self._kept.pop(key, None)
                self._kept[key] = entry
            evicted = []
            while len(self._kept) > MAX_KEPT:
                evicted.append(self._kept.pop(next(iter(self._kept))))
        for s in ([old] if old is not None else []) + evicted:
            s.cancel()

    def drop(self, job: str | None = None, below_epoch: int | None = None) -> int:
        """Closes the entries of ``job`` (every job: None) of epochs before ``below_epoch``
        (every epoch: None); returns how many."""
        with self._lock:
            gone = [k for k in self._kept if (job is None or k[0] == job)
                    and (below_epoch is None or k[1] < below_epoch)]
            entries = [self._kept.pop(k) for k in gone]
        for e in entries:
            e.cancel()
        return len(entries)

    def close(self) -> None:
        """Closes every entry, and every one put back from now on (the server stops)."""
        with self._lock:
            self._closed = True
        self.drop()

    def keys(self) -> list[Key]:
        """What is kept now."""
        with self._lock:
            return list(self._kept)
