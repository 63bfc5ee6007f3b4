"""Shard planning: cutting a training set into shards and giving shards to peers.

Pure functions. Shards are index sets over the task's training split. An assignment maps each
live peer to shard ids; every shard is held by exactly one peer. When a peer leaves, only its
shards move (to the least-loaded survivors, by capacity); when one joins, shards move to it from
the most-loaded peers until the load is even.
"""
from __future__ import annotations

import numpy as np

from dml.common.sampling import parse_sharding

Assignment = dict[str, list[int]]


def make_shards(labels: np.ndarray, num_shards: int, sharding: str, seed: int) -> list[np.ndarray]:
    """Cuts ``len(labels)`` samples into ``num_shards`` shards.

    ``iid`` shuffles and splits evenly. ``dirichlet:ALPHA`` gives each shard a class mix drawn
    from Dirichlet(ALPHA) (small ALPHA: each shard dominated by few classes), then fills shards
    to equal sizes. Every sample lands in exactly one shard.
    """
    kind, alpha = parse_sharding(sharding)
    n = int(labels.size)
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards must be between 1 and {n}, got {num_shards}")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_shards)]
    classes = np.unique(labels)
    mix = rng.dirichlet([alpha] * classes.size, size=num_shards)  # shard x class preference
    pools = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    sizes = [len(s) for s in np.array_split(np.arange(n), num_shards)]
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    # Fill shards in rounds, one sample at a time per shard, drawing a class from its mix among
    # the classes that still have samples. Deterministic for a seed.
    for _ in range(max(sizes)):
        for s in range(num_shards):
            if len(shards[s]) >= sizes[s]:
                continue
            live = [i for i, c in enumerate(classes) if pools[int(c)]]
            p = mix[s, live]
            p = p / p.sum() if p.sum() > 0 else np.full(len(live), 1.0 / len(live))
            c = int(classes[live[int(rng.choice(len(live), p=p))]])
            shards[s].append(int(pools[c].pop()))
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def _load(assign: Assignment, sizes: list[int], peer: str, capacity: dict[str, float]) -> float:
    return sum(sizes[s] for s in assign[peer]) / capacity.get(peer, 1.0)


def assign_shards(sizes: list[int], peers: list[str], capacity: dict[str, float] | None = None) -> Assignment:
    """Initial assignment: largest shards first, each to the least-loaded peer (by capacity)."""
    if not peers:
        raise ValueError("cannot assign shards to no peers")
    cap = capacity or {}
    out: Assignment = {p: [] for p in peers}
    for s in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(peers, key=lambda p: (_load(out, sizes, p, cap), peers.index(p)))
        out[target].append(s)
    return {p: sorted(v) for p, v in out.items()}


def remove_peers(assign: Assignment, gone: set[str], sizes: list[int], capacity: dict[str, float] | None = None) -> Assignment:
    """Moves only the departed peers' shards to the survivors, least-loaded first."""
    cap = capacity or {}
    survivors = [p for p in assign if p not in gone]
    if not survivors:
        raise ValueError("no surviving peers to take the shards")
    out: Assignment = {p: list(assign[p]) for p in survivors}
    orphans = sorted((s for p in assign if p in gone for s in assign[p]), key=lambda i: (-sizes[i], i))
    for s in orphans:
        target = min(survivors, key=lambda p: (_load(out, sizes, p, cap), survivors.index(p)))
        out[target].append(s)
    return {p: sorted(v) for p, v in out.items()}


def add_peers(assign: Assignment, new: list[str], sizes: list[int]) -> Assignment:
    """Gives joiners shards taken from the most-loaded peers while that lowers the imbalance."""
    out: Assignment = {p: list(v) for p, v in assign.items()}
    for p in new:
        out.setdefault(p, [])
    peers = list(out)
    while True:
        donor = max(peers, key=lambda p: (sum(sizes[s] for s in out[p]), -peers.index(p)))
        taker = min(peers, key=lambda p: (sum(sizes[s] for s in out[p]), peers.index(p)))
        gap = sum(sizes[s] for s in out[donor]) - sum(sizes[s] for s in out[taker])
        movable = [s for s in out[donor] if sizes[s] < gap]
        if donor == taker or not movable or len(out[donor]) <= 1:
            break
        s = max(movable, key=lambda i: (sizes[i], -i))
        out[donor].remove(s)
        out[taker].append(s)
    return {p: sorted(v) for p, v in out.items()}


# -- sample allocation: which samples each member trains on in a round -------------------------
# Each shard is read in passes (its own data epochs); pass e visits the shard in the order
# shard_order(..., e, shard). A cursor (pass, position) says where the committed rounds stopped.
Range = tuple[int, int, int, int]  # (shard id, pass, start, stop) in that pass's order
Cursor = tuple[int, int]  # (pass, position); a shard not yet read is at (1, 0)


def advance(cursors: dict[int, Cursor], ranges: list[Range], sizes: list[int]) -> None:
    """Moves the cursors past ``ranges`` (in order); a finished pass starts the next one."""
    for shard, epoch, _, stop in ranges:
        cursors[shard] = (epoch + 1, 0) if stop >= sizes[shard] else (epoch, stop)


def allocate(assign: Assignment, sizes: list[int], cursors: dict[int, Cursor], budget: int) -> dict[str, list[Range]]:
    """Gives each member ``budget`` samples from its own shards, continuing where the committed
    cursors stand: always from its least-read shard (lowest pass, then lowest id), starting the
    shard's next pass when one ends, so every round is full and shards advance evenly."""
    out: dict[str, list[Range]] = {}
    for peer, shards in assign.items():
        live = [s for s in shards if sizes[s] > 0]
        cur = {s: cursors.get(s, (1, 0)) for s in live}
        left, ranges = budget, []
        while left > 0 and live:
            s = min(live, key=lambda x: (cur[x][0], x))
            epoch, pos = cur[s]
            take = min(left, sizes[s] - pos)
            ranges.append((s, epoch, pos, pos + take))
            left -= take
            cur[s] = (epoch + 1, 0) if pos + take >= sizes[s] else (epoch, pos + take)
        out[peer] = ranges
    return out


def data_epoch(cursors: dict[int, Cursor], num_shards: int) -> int:
    """The pass every shard has reached (1 until each shard was read through once)."""
    return min((cursors.get(s, (1, 0))[0] for s in range(num_shards)), default=1)
