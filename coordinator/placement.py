"""Capacity and placement: which live peer holds which shard.

Pure functions, used by :mod:`dml.coordinator.planner` (which also cuts the shards). A peer's
*capacity* is its measured training speed (samples/s, smoothed by the coordinator from the
rounds' reports); its *share* of the samples is proportional to it, water-filled under the
peers' sample caps (``dml-peer --max-samples``): what a capped peer cannot take is shared by
the others in proportion. Two more limits bound where a shard may go:

- ``cache_free``: the bytes a peer's shard cache can still take in (a peer absent from it has
  no such limit), with ``shard_bytes`` the shards' sizes in bytes. A shard the peer already
  caches costs it nothing; one it holds in its assignment but does not cache yet counts
  against the free space (it is still to be fetched).
- ``cached``: the shards each peer already holds in its cache. A shard goes to a peer that
  caches it whenever that keeps the peer within one shard (the largest) of its share, so as
  little data as possible is fetched again.

Every shard is held by at most one peer, and by exactly one unless no peer has room for it under
its limits: such a shard is left *unassigned* until a peer with room joins (never squeezed past a
limit). The least data moves: when peers leave, only their shards move (largest first, each to
the survivor with the most room relative to its capacity, preferring one that caches it); when
peers join, they take shards from the most loaded peers only while a move lowers the weighted
imbalance, and nothing else moves.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

Assignment = dict[str, list[int]]
Capacity = dict[str, float]  # peer -> relative speed (samples/s); absent, zero or not finite: 1
Caps = dict[str, int]  # peer -> the most samples it holds; absent or 0: no cap
Cached = dict[str, set[int]]  # peer -> the shards already in its cache
CacheFree = dict[str, int]  # peer -> bytes its cache can still take in; absent: no limit
EPS = 1e-9  # relative tolerance of the float comparisons (shares, gains)


def weights(peers: Iterable[str], capacity: Capacity | None) -> dict[str, float]:
    """Each peer's weight: its capacity when positive and finite, else 1."""
    cap = capacity or {}
    return {p: cap[p] if cap.get(p, 0) > 0 and math.isfinite(cap[p]) else 1.0 for p in peers}


def targets(total: int, peers: list[str], w: dict[str, float], caps: Caps) -> dict[str, float]:
    """Each peer's share of ``total`` samples, proportional to its weight, capped (water-filling:
    what a capped peer cannot take is shared by the others in proportion)."""
    out: dict[str, float] = {}
    free, left = list(peers), float(total)
    while free:
        lam = left / sum(w[p] for p in free)
        over = [p for p in free if 0 < caps.get(p, 0) < lam * w[p]]
        if not over:
            out.update({p: lam * w[p] for p in free})
            break
        for p in over:
            out[p] = float(caps[p])
            left -= caps[p]
            free.remove(p)
    return out


class Board:
    """A placement being built: what each peer holds, against its share and its limits.

    ``out`` is changed in place. ``total`` is the sample count the shares divide (every shard's,
    placed or not)."""

    def __init__(self, out: Assignment, sizes: list[int], w: dict[str, float], caps: Caps | None = None,
                 cached: Cached | None = None, shard_bytes: list[int] | None = None,
                 cache_free: CacheFree | None = None) -> None:
        if shard_bytes is not None and len(shard_bytes) != len(sizes):
            raise ValueError(f"{len(shard_bytes)} shard byte sizes for {len(sizes)} shards")
        self.out, self.sizes, self.w = out, sizes, w
        self.caps = caps or {}
        self.cached = cached or {}
        self.shard_bytes = shard_bytes
        self.cache_free = {p: max(0, int(v)) for p, v in (cache_free or {}).items()}
        self.peers = list(out)
        self.rank = {p: i for i, p in enumerate(self.peers)}
        self.held = {p: sum(sizes[s] for s in v) for p, v in out.items()}
        self.used = {p: sum(self.cost(p, s) for s in v) for p, v in out.items()}
        self.share = targets(sum(sizes), self.peers, w, self.caps)
        self.slack = max(sizes, default=0)  # "within one shard": the largest shard's samples

    def caches(self, peer: str, shard: int) -> bool:
        """Whether ``peer`` reported ``shard`` in its cache."""
        return shard in self.cached.get(peer, ())

    def cost(self, peer: str, shard: int) -> int:
        """Cache bytes ``peer`` spends to hold ``shard``: 0 when it caches it already."""
        if self.shard_bytes is None or self.caches(peer, shard):
            return 0
        return self.shard_bytes[shard]

    def fits(self, peer: str, shard: int) -> bool:
        """Whether ``peer`` has room for ``shard`` under its sample cap and its free cache (a shard
        it caches always fits the cache, even one already short of space)."""
        cap = self.caps.get(peer, 0)
        if 0 < cap < self.held[peer] + self.sizes[shard]:
            return False
        if peer not in self.cache_free:
            return True
        cost = self.cost(peer, shard)
        return cost == 0 or self.used[peer] + cost <= self.cache_free[peer]

    def room(self, peer: str) -> float:
        """How far ``peer`` is below its share, relative to its capacity (negative: above)."""
        return (self.share[peer] - self.held[peer]) / self.w[peer]

    def warm(self, peer: str, shard: int) -> bool:
        """Whether ``peer`` caches ``shard`` and taking it keeps the peer within one shard of its share."""
        near = self.share[peer] + self.slack + EPS * max(1.0, self.share[peer])
        return self.caches(peer, shard) and self.held[peer] + self.sizes[shard] <= near

    def give(self, peer: str, shard: int) -> None:
        """Adds ``shard`` to what ``peer`` holds."""
        self.out[peer].append(shard)
        self.held[peer] += self.sizes[shard]
        self.used[peer] += self.cost(peer, shard)

    def take(self, peer: str, shard: int) -> None:
        """Removes ``shard`` from what ``peer`` holds."""
        self.out[peer].remove(shard)
        self.held[peer] -= self.sizes[shard]
        self.used[peer] -= self.cost(peer, shard)

    def best(self, shard: int, among: list[str]) -> str | None:
        """The peer in ``among`` to give ``shard``: one with room that caches it, if taking it keeps
        that peer within one shard of its share; else the one with room most below its share
        (relative to capacity; ties in peer order). None when no peer has room."""
        fits = [p for p in among if self.fits(p, shard)] if self.caps or self.cache_free else among
        if not fits:
            return None
        pool = ([p for p in fits if self.warm(p, shard)] if self.cached else []) or fits
        share, held, w, rank = self.share, self.held, self.w, self.rank
        return max(pool, key=lambda p: ((share[p] - held[p]) / w[p], -rank[p]))

    def place(self, shards: Iterable[int], among: list[str]) -> None:
        """Places ``shards``, largest first (ties by id), each with :meth:`best`; a shard that fits
        nowhere stays unassigned."""
        for s in sorted(shards, key=lambda i: (-self.sizes[i], i)):
            p = self.best(s, among)
            if p is not None:
                self.give(p, s)

    def gain(self, donor: str, taker: str, shard: int) -> float:
        """How much moving ``shard`` from ``donor`` to ``taker`` lowers the weighted imbalance
        ``sum(held**2 / capacity)`` (negative: it raises it)."""
        s, hd, ht, wd, wt = self.sizes[shard], self.held[donor], self.held[taker], self.w[donor], self.w[taker]
        return s * (2 * (hd / wd - ht / wt) - s * (1 / wd + 1 / wt))

    def worth(self, donor: str, taker: str, shard: int) -> bool:
        """Whether the move both fits and lowers the imbalance by more than rounding."""
        floor = EPS * max(1.0, self.held[donor] / self.w[donor]) * max(1, self.sizes[shard])
        return self.fits(taker, shard) and self.gain(donor, taker, shard) > floor

    def next_move(self, donors: list[str], takers: list[str]) -> tuple[str, int, str] | None:
        """The next shard a taker takes: from the most loaded donor (relative to capacity) that
        has a move worth making and keeps at least one shard, the shard a taker caches if one is
        worth moving to it, else the largest (ties by id); it goes to the taker with the most
        room among those it fits, preferring one that caches it. None when no move lowers the
        imbalance."""
        for d in sorted(donors, key=lambda p: (-self.held[p] / self.w[p], self.rank[p])):
            if len(self.out[d]) <= 1:
                continue
            others = [t for t in takers if t != d]
            if not others:
                continue
            # A move lowers the imbalance only for a shard below this size (see gain).
            below = max(2 * (self.held[d] / self.w[d] - self.held[t] / self.w[t]) / (1 / self.w[d] + 1 / self.w[t])
                        for t in others)
            order = sorted((s for s in self.out[d] if self.sizes[s] < below), key=lambda i: (-self.sizes[i], i))
            theirs = set().union(*(self.cached.get(t, ()) for t in others))
            warm = [s for s in order if s in theirs]
            for group, cached_only in ((warm, True), (order, False)):
                for s in group:
                    ok = [t for t in others if self.worth(d, t, s) and (self.caches(t, s) or not cached_only)]
                    if ok:
                        pool = [t for t in ok if self.caches(t, s)] or ok
                        return d, s, max(pool, key=lambda p: (self.room(p), -self.rank[p]))
        return None


def unassigned(assign: Assignment, num_shards: int) -> list[int]:
    """Shards no peer holds (no peer had room for them), ascending."""
    taken = {s for v in assign.values() for s in v}
    return [s for s in range(num_shards) if s not in taken]


def place(sizes: list[int], peers: list[str], capacity: Capacity | None = None, caps: Caps | None = None,
          cached: Cached | None = None, shard_bytes: list[int] | None = None,
          cache_free: CacheFree | None = None) -> Assignment:
    """First placement of shards ``0..len(sizes)-1`` on ``peers``: largest first, each to a peer
    that caches it when that keeps the peer within one shard of its share, else to the peer with
    room most below its share. Without caps every peer ends within the largest shard of its
    share. A shard no peer has room for is left out."""
    if not peers:
        raise ValueError("cannot assign shards to no peers")
    out: Assignment = {p: [] for p in dict.fromkeys(peers)}
    board = Board(out, sizes, weights(out, capacity), caps, cached, shard_bytes, cache_free)
    board.place(range(len(sizes)), board.peers)
    return {p: sorted(v) for p, v in out.items()}


def leave(assign: Assignment, gone: set[str], sizes: list[int], capacity: Capacity | None = None,
          caps: Caps | None = None, cached: Cached | None = None, shard_bytes: list[int] | None = None,
          cache_free: CacheFree | None = None) -> Assignment:
    """Peers ``gone`` leave: only their shards move, largest first, each to the survivor with room
    that caches it (if that keeps it within one shard of its share), else to the survivor with room
    most below its share. A shard no survivor has room for becomes unassigned."""
    survivors = [p for p in assign if p not in gone]
    if not survivors:
        raise ValueError("no surviving peers to take the shards")
    out: Assignment = {p: list(assign[p]) for p in survivors}
    board = Board(out, sizes, weights(survivors, capacity), caps, cached, shard_bytes, cache_free)
    board.place([s for p in assign if p in gone for s in assign[p]], survivors)
    return {p: sorted(v) for p, v in out.items()}


def join(assign: Assignment, new: list[str], sizes: list[int], capacity: Capacity | None = None,
         caps: Caps | None = None, cached: Cached | None = None, shard_bytes: list[int] | None = None,
         cache_free: CacheFree | None = None) -> Assignment:
    """Peers ``new`` join: the unassigned shards are placed first (as :func:`place` would, on any
    peer with room); then the joiners take shards from the most loaded peers, one at a time, while
    a move lowers the weighted imbalance (``sum(held**2 / capacity)``), preferring shards they
    cache. A donor keeps at least one shard, and no shard moves between the peers that were there
    before. Shards a move frees room for are placed next; a shard placed so can make another move
    worth it (a donor with more load again), so moving and placing repeat until neither changes
    anything: each round of it places a shard, so it ends."""
    out: Assignment = {p: list(v) for p, v in assign.items()}
    joiners = [p for p in dict.fromkeys(new) if p not in assign]
    for p in joiners:
        out[p] = []
    old = [p for p in out if p not in joiners]
    board = Board(out, sizes, weights(out, capacity), caps, cached, shard_bytes, cache_free)
    board.place(unassigned(out, len(sizes)), board.peers)
    for _ in range(len(sizes) + 1):  # each pass but the last places a shard
        for _ in range(len(sizes) * max(1, len(board.peers)) + 1):  # each move lowers the imbalance; bounded anyway
            move = board.next_move(old, joiners)
            if move is None:
                break
            donor, shard, taker = move
            board.take(donor, shard)
            board.give(taker, shard)
        left = unassigned(out, len(sizes))
        board.place(left, board.peers)
        if len(unassigned(out, len(sizes))) == len(left):  # nothing placed: no move can have become worth it
            break
    return {p: sorted(v) for p, v in out.items()}


def shortfall(sizes: list[int], peers: list[str], caps: Caps | None = None, cached: Cached | None = None,
              shard_bytes: list[int] | None = None, cache_free: CacheFree | None = None) -> str:
    """Why ``peers`` cannot hold all the data whatever the placement ("" when their limits add up
    to enough): every peer capped and the caps together below the samples, or every peer's cache
    limited and the free bytes together below the bytes of the shards none of them caches."""
    caps, cache_free = caps or {}, cache_free or {}
    total = sum(sizes)
    if peers and all(caps.get(p, 0) > 0 for p in peers):
        room = sum(caps[p] for p in peers)
        if room < total:
            return f"the peers' --max-samples caps hold at most {room:,} of the {total:,} training samples"
    if peers and shard_bytes is not None and all(p in cache_free for p in peers):
        have = {s for p in peers for s in (cached or {}).get(p, ())}
        need = sum(b for s, b in enumerate(shard_bytes) if s not in have)
        free = sum(max(0, cache_free[p]) for p in peers)
        if free < need:
            return (f"the peers' caches have {free:,} bytes free for the {need:,} bytes of shards none of them "
                    "caches: raise --cache-max-gb or add a peer")
    return ""
