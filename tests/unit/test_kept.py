"""peer.kept: the cache of outgoing data-plane streams and gRPC channels between the rounds of an epoch."""
from __future__ import annotations

from dml.peer import kept
from dml.peer.kept import KeptCache, KeptChannel


class FakeStream:
    """Stands in for a sender: whether its stream is still open, and whether it was closed."""

    def __init__(self, open_: bool = True) -> None:
        self.open = open_
        self.cancelled = False

    def reusable(self) -> bool:
        return self.open and not self.cancelled

    def cancel(self) -> None:
        self.cancelled = True


def key(job: str = "j", epoch: int = 1, succ: str = "p1") -> kept.SenderKey:
    return (job, epoch, succ, "127.0.0.1:1", False)


def test_a_kept_sender_is_taken_once_and_only_for_its_own_key():
    cache = KeptCache()
    s = FakeStream()
    cache.put(key(), s)
    assert cache.take(key(epoch=2)) is None
    assert cache.take(key(succ="p2")) is None
    assert cache.take(key()) is s
    assert cache.take(key()) is None  # one link at a time: it comes back only after a clean end
    assert not s.cancelled


def test_a_kept_sender_whose_stream_closed_is_closed_not_handed_out():
    cache = KeptCache()
    s = FakeStream(open_=False)
    cache.put(key(), s)
    assert cache.take(key()) is None
    assert s.cancelled and cache.keys() == []


def test_drop_closes_older_epochs_or_whole_jobs_and_the_cache_is_bounded():
    cache = KeptCache()
    old, new, other = FakeStream(), FakeStream(), FakeStream()
    cache.put(key(epoch=1), old)
    cache.put(key(epoch=2), new)
    cache.put(key(job="k"), other)
    assert cache.drop("j", below_epoch=2) == 1
    assert old.cancelled and not new.cancelled and not other.cancelled
    assert cache.drop("k") == 1 and other.cancelled
    replaced = FakeStream()
    cache.put(key(epoch=2), replaced)  # a second sender for the same key replaces (closes) the first
    assert new.cancelled
    many = [FakeStream() for _ in range(kept.MAX_KEPT + 2)]
    for i, s in enumerate(many):
        cache.put(key(succ=f"s{i}"), s)
    assert len(cache.keys()) == kept.MAX_KEPT
    assert replaced.cancelled and many[0].cancelled and not many[-1].cancelled  # the oldest go first
    assert cache.drop() == kept.MAX_KEPT and all(s.cancelled for s in many)


class FakeWatch:
    def __init__(self, held: bool) -> None:
        self._held = held
        self.closed = False

    def held(self) -> bool:
        return self._held

    def close(self) -> None:
        self.closed = True


class FakeChannel:
    def __init__(self) -> None:
        self.closed = False
        self.watch_open_at_close: bool | None = None
        self.watch: FakeWatch | None = None

    def close(self) -> None:
        self.closed = True
        if self.watch is not None:
            self.watch_open_at_close = not self.watch.closed


def _kept(held: bool | None) -> KeptChannel:
    ch = FakeChannel()
    ch.watch = FakeWatch(held) if held is not None else None
    return KeptChannel(ch, ch.watch)


def test_a_kept_channel_is_reused_only_while_the_watch_on_it_is_open_and_closing_it_closes_the_channel():
    cache = KeptCache("channel")
    ckey = ("j", 1, "p1", "127.0.0.1:1")
    alive, broken, unwatched = _kept(True), _kept(False), _kept(None)
    cache.put(ckey, alive)
    assert cache.take(ckey) is alive and not alive.channel.closed
    cache.put(ckey, broken)  # its watch ended: the successor or the connection went away
    assert cache.take(ckey) is None and broken.channel.closed and cache.keys() == []
    cache.put(ckey, unwatched)  # a link that kept no watch has no probe: the channel is trusted
    assert cache.take(ckey) is unwatched
    cache.put(ckey, alive)
    assert cache.drop("j", below_epoch=2) == 1 and alive.channel.closed
    assert alive.watch.closed and alive.channel.watch_open_at_close is False, (
        "the watch is closed before its channel (else the channel's close would read as the successor's cancel)")
    cache.close()  # the server stops: what a late link puts back is closed, not kept
    late = _kept(True)
    cache.put(ckey, late)
    assert late.channel.closed and cache.keys() == []
