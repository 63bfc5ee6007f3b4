"""Capacity and placement (coordinator/placement.py): shards placed exactly once, sample caps and
free cache space held, shares proportional to capacity within one shard, cached shards kept on a
peer that caches them, and the least data moved when peers leave or join."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dml.coordinator import placement
from dml.coordinator.placement import Board, join, leave, place, shortfall, targets, unassigned, weights

PROPS = settings(max_examples=40, deadline=None, database=None)
TOL = 1e-6


@dataclass
class World:
    """A random cluster: shards (samples, bytes) and peers with capacities, caps and caches."""

    sizes: list[int]
    peers: list[str]
    capacity: dict[str, float]
    caps: dict[str, int]
    cached: dict[str, set[int]]
    shard_bytes: list[int] | None
    cache_free: dict[str, int]

    def limits(self) -> dict:
        return dict(caps=self.caps, cached=self.cached, shard_bytes=self.shard_bytes, cache_free=self.cache_free)

    def board(self, assign: dict[str, list[int]]) -> Board:
        out = {p: list(v) for p, v in assign.items()}
        return Board(out, self.sizes, weights(out, self.capacity), **self.limits())


@st.composite
def worlds(draw: st.DrawFn, capped: bool = True, cache_limits: bool = True, min_peers: int = 1,
           extra: int = 0) -> World:
    """``extra`` more peers than placed at first (joiners), with limits of their own."""
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=16))
    n = draw(st.integers(min_peers, 5)) + extra
    peers = [f"p{i}" for i in range(n)]
    capacity = {p: draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.0])) for p in peers}
    caps = {p: draw(st.sampled_from([0, 0, 30, 80, 200])) for p in peers} if capped else {}
    cached = {p: set(draw(st.lists(st.integers(0, len(sizes) - 1), max_size=len(sizes)))) for p in peers}
    shard_bytes = [s * draw(st.sampled_from([100, 128])) for s in sizes] if cache_limits else None
    cache_free = ({p: draw(st.sampled_from([0, 2_000, 8_000])) for p in peers if draw(st.booleans())}
                  if cache_limits else {})
    return World(sizes, peers, capacity, caps, cached, shard_bytes, cache_free)


def holders(assign: dict[str, list[int]]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for p, v in assign.items():
        for s in v:
            out.setdefault(s, []).append(p)
    return out


def loads(w: World, assign: dict[str, list[int]]) -> tuple[dict[str, int], dict[str, int]]:
    """Each peer's samples, and its cache bytes spent (a shard it caches costs none)."""
    held = {p: sum(w.sizes[s] for s in v) for p, v in assign.items()}
    spent = {p: sum(w.shard_bytes[s] for s in v if s not in w.cached.get(p, ())) if w.shard_bytes else 0
             for p, v in assign.items()}
    return held, spent


def has_room(w: World, assign: dict[str, list[int]], p: str, s: int) -> bool:
    """Whether ``p`` could take ``s`` as well under its cap and its free cache."""
    held, spent = loads(w, assign)
    cost = 0 if not w.shard_bytes or s in w.cached.get(p, ()) else w.shard_bytes[s]
    return (not 0 < w.caps.get(p, 0) < held[p] + w.sizes[s]) and (
        p not in w.cache_free or cost == 0 or spent[p] + cost <= w.cache_free[p])


def check_limits(w: World, assign: dict[str, list[int]]) -> None:
    """Every shard held at most once; no cap nor cache passed; a shard left out fits nowhere."""
    assert all(len(h) == 1 for h in holders(assign).values()), "a shard held twice"
    assert all(s in range(len(w.sizes)) for v in assign.values() for s in v)
    held, spent = loads(w, assign)
    for p in assign:
        assert not 0 < w.caps.get(p, 0) < held[p], f"{p} over its --max-samples cap"
        assert p not in w.cache_free or spent[p] <= w.cache_free[p], f"{p} over its free cache"
    for s in unassigned(assign, len(w.sizes)):
        assert not any(has_room(w, assign, p, s) for p in assign), f"shard {s} left out though a peer has room for it"


def check_cache_kept(w: World, assign: dict[str, list[int]], shards: set[int]) -> None:
    """Each of ``shards`` placed away from the peers caching it could not have stayed with one of
    them: none has room for it, or it would put that peer past its share by more than one shard."""
    held, _ = loads(w, assign)
    share = targets(sum(w.sizes), list(assign), weights(assign, w.capacity), w.caps)
    for s, (p,) in holders(assign).items():
        if s in shards and s not in w.cached.get(p, ()):
            for q in assign:
                if q != p and s in w.cached.get(q, ()) and has_room(w, assign, q, s):
                    assert held[q] + w.sizes[s] > share[q] + max(w.sizes) - TOL, \
                        f"shard {s} went to {p}, though {q} caches it and has room"


# -- the first placement -----------------------------------------------------------------------
@PROPS
@given(w=worlds())
def test_every_shard_is_placed_once_within_every_limit(w: World) -> None:
    a = place(w.sizes, w.peers, w.capacity, **w.limits())
    assert list(a) == w.peers
    check_limits(w, a)
    check_cache_kept(w, a, set(range(len(w.sizes))))


@PROPS
@given(w=worlds(capped=False, cache_limits=False))
def test_without_limits_every_shard_is_placed_and_shares_follow_capacity_within_one_shard(w: World) -> None:
    a = place(w.sizes, w.peers, w.capacity, cached=w.cached)
    assert sorted(s for v in a.values() for s in v) == list(range(len(w.sizes))), "every shard exactly once"
    b = w.board(a)
    share = targets(sum(w.sizes), w.peers, b.w, {})
    for p in w.peers:
        assert b.held[p] <= share[p] + max(w.sizes) + TOL, f"{p} holds more than its share and one shard"
    plain = w.board(place(w.sizes, w.peers, w.capacity))
    low = min(plain.held[q] / plain.w[q] for q in w.peers)
    for p in w.peers:  # no caches: largest-first to the least loaded, the classic bound
        assert plain.held[p] / plain.w[p] <= low + max(w.sizes) / plain.w[p] + TOL


def test_a_cached_shard_stays_with_the_peer_that_caches_it_when_the_balance_allows() -> None:
    sizes = [10] * 6
    assert place(sizes, ["a", "b"]) == {"a": [0, 2, 4], "b": [1, 3, 5]}
    warm = place(sizes, ["a", "b"], cached={"a": {0, 1, 2}, "b": {3, 4, 5}})
    assert warm == {"a": [0, 1, 2], "b": [3, 4, 5]}, "nothing fetched again"
    # b caches everything, but taking it all would put b far past its share: balance wins.
    greedy = place(sizes, ["a", "b"], cached={"b": set(range(6))})
    assert [len(greedy["a"]), len(greedy["b"])] == [2, 4], "b takes its share and one shard more, no further"


def test_free_cache_space_is_a_cap_in_bytes_and_a_cached_shard_costs_none() -> None:
    sizes, nbytes = [10] * 4, [1000] * 4
    a = place(sizes, ["a", "b"], shard_bytes=nbytes, cache_free={"a": 1000})
    assert a == {"a": [0], "b": [1, 2, 3]}
    full = place(sizes, ["a", "b"], shard_bytes=nbytes, cache_free={"a": 0, "b": 1000}, cached={"a": {2, 3}})
    assert full == {"a": [2, 3], "b": [0]}, "a caches 2 and 3 (free), b has room for one more"
    assert unassigned(full, 4) == [1]
    over = leave({"a": [0, 1], "b": [2], "c": [3]}, {"c"}, sizes, shard_bytes=nbytes, cache_free={"a": -5, "b": 0},
                 cached={"a": {3}})
    assert over == {"a": [0, 1, 3], "b": [2]}, "a cached shard fits a cache already short of space"
    with pytest.raises(ValueError, match="byte sizes"):
        place(sizes, ["a"], shard_bytes=[1, 2])


def test_a_total_cap_below_the_data_is_a_clear_error() -> None:
    sizes = [10] * 6
    assert shortfall(sizes, ["a", "b"], caps={"a": 20}) == "", "an uncapped peer holds the rest"
    assert shortfall(sizes, ["a", "b"], caps={"a": 30, "b": 30}) == ""
    msg = shortfall(sizes, ["a", "b"], caps={"a": 20, "b": 25})
    assert msg == "the peers' --max-samples caps hold at most 45 of the 60 training samples"
    nbytes = [100] * 6
    assert shortfall(sizes, ["a"], shard_bytes=nbytes, cache_free={"a": 500}, cached={"a": {0}}) == ""
    msg = shortfall(sizes, ["a", "b"], shard_bytes=nbytes, cache_free={"a": 200, "b": 100}, cached={"b": {5}})
    assert "300 bytes free for the 500 bytes" in msg and "--cache-max-gb" in msg


@PROPS
@given(w=worlds())
def test_a_shortfall_always_leaves_data_out_and_none_means_an_uncapped_peer_takes_it_all(w: World) -> None:
    a = place(w.sizes, w.peers, w.capacity, **w.limits())
    why = shortfall(w.sizes, w.peers, w.caps, w.cached, w.shard_bytes, w.cache_free)
    if why:
        assert unassigned(a, len(w.sizes)), why
    free = [p for p in w.peers if w.caps.get(p, 0) <= 0 and p not in w.cache_free]
    if free:
        assert unassigned(a, len(w.sizes)) == [], "a peer without limits takes whatever the others cannot"


# -- a peer leaves -------------------------------------------------------------------------------
@PROPS
@given(w=worlds(min_peers=2), data=st.data())
def test_a_leave_moves_exactly_the_leavers_shards(w: World, data: st.DataObject) -> None:
    before = place(w.sizes, w.peers, w.capacity, **w.limits())
    gone = set(data.draw(st.lists(st.sampled_from(w.peers), min_size=1, max_size=len(w.peers) - 1, unique=True)))
    after = leave(before, gone, w.sizes, w.capacity, **w.limits())
    assert list(after) == [p for p in w.peers if p not in gone]
    orphans = {s for p in gone for s in before[p]}
    for p, v in after.items():
        assert set(before[p]) <= set(v), f"survivor {p} lost a shard"
        assert set(v) - set(before[p]) <= orphans, f"{p} took a shard that was not the leavers'"
    check_limits(w, after)
    assert set(unassigned(after, len(w.sizes))) - set(unassigned(before, len(w.sizes))) <= orphans
    check_cache_kept(w, after, orphans)


@PROPS
@given(w=worlds(capped=False, cache_limits=False, min_peers=2), data=st.data())
def test_after_a_leave_every_survivor_stays_within_one_shard_of_its_share(w: World, data: st.DataObject) -> None:
    before = place(w.sizes, w.peers, w.capacity, cached=w.cached)
    gone = {data.draw(st.sampled_from(w.peers))}
    after = leave(before, gone, w.sizes, w.capacity, cached=w.cached)
    assert sorted(s for v in after.values() for s in v) == list(range(len(w.sizes)))
    b = w.board(after)
    for p in after:
        assert b.held[p] <= b.share[p] + max(w.sizes) + TOL


def test_a_leavers_shard_goes_to_the_survivor_that_caches_it() -> None:
    sizes = [10] * 7
    before = {"a": [0, 1, 2], "b": [3, 4], "c": [5, 6]}
    assert leave(before, {"a"}, sizes) == {"b": [0, 2, 3, 4], "c": [1, 5, 6]}
    assert leave(before, {"a"}, sizes, cached={"c": {0, 1, 2}}) == {"b": [2, 3, 4], "c": [0, 1, 5, 6]}, \
        "c caches all three, but the third would put it past its share (35) by more than one shard"
    assert leave(before, {"a"}, sizes, capacity={"b": 1.0, "c": 2.0}, cached={"c": {0, 1, 2}}) == \
        {"b": [3, 4], "c": [0, 1, 2, 5, 6]}, "twice as fast, c has room for all three"


# -- a peer joins -------------------------------------------------------------------------------
# Found by a CI run: shard 10 fits nowhere until the joiner takes shard 9 off p1; placed there
# after the moves had stopped, it left p1 loaded enough that giving the joiner shard 0 (which it
# caches) lowered the imbalance, and that move was never made.
MISSED_MOVE = World(sizes=[1, 1, 1, 1, 1, 1, 1, 1, 17, 16, 15], peers=["p0", "p1", "p2"],
                    capacity={"p0": 0.5, "p1": 0.5, "p2": 0.5}, caps={"p0": 30, "p1": 30, "p2": 0},
                    cached={"p0": set(), "p1": set(), "p2": {0, 9}},
                    shard_bytes=[100] * 8 + [1700, 1600, 1500], cache_free={"p2": 0})


@PROPS
@given(w=worlds(extra=2), k=st.integers(1, 2))
@example(w=MISSED_MOVE, k=1)
def test_a_join_moves_only_what_the_joiners_take_until_no_move_helps(w: World, k: int) -> None:
    old, new = w.peers[:-k], w.peers[-k:]
    before = place(w.sizes, old, w.capacity, **w.limits())
    after = join(before, new, w.sizes, w.capacity, **w.limits())
    assert list(after) == old + new
    check_limits(w, after)
    left = set(unassigned(before, len(w.sizes)))
    assert set(unassigned(after, len(w.sizes))) <= left, "a placed shard was dropped"
    was = {s: p for p, v in before.items() for s in v}
    for p, v in after.items():
        for s in v:
            assert s in left or was[s] == p or p in new, f"shard {s} moved from {was[s]} to {p}, not a joiner"
    b = w.board(after)
    for d in old:
        if len(after[d]) > 1:
            assert not any(b.worth(d, j, s) for s in after[d] for j in new), "a move was left that lowers the imbalance"


@PROPS
@given(w=worlds(capped=False, cache_limits=False, extra=1))
def test_a_join_without_limits_moves_at_most_what_balances(w: World) -> None:
    old, new = w.peers[:-1], w.peers[-1]
    before = place(w.sizes, old, w.capacity)
    after = join(before, [new], w.sizes, w.capacity)
    assert sorted(s for v in after.values() for s in v) == list(range(len(w.sizes)))
    b = w.board(after)
    assert b.held[new] <= b.share[new] + max(w.sizes) + TOL, "the joiner takes its share and at most one shard more"


def test_a_joiner_takes_the_shards_it_caches_and_nothing_moves_between_the_others() -> None:
    sizes = [10] * 8
    before = {"a": [0, 1, 2, 3, 4, 5], "b": [6, 7]}
    after = join(before, ["c"], sizes)
    assert after["b"] == [6, 7] and len(after["c"]) == 3 and len(after["a"]) == 3, "only from the most loaded"
    warm = join(before, ["c"], sizes, cached={"c": {1, 4, 7}})
    assert warm == {"a": [2, 3, 5], "b": [6, 7], "c": [0, 1, 4]}, \
        "the cached shards first (7 stays: b is below its share), then the largest, lowest id"


def test_a_joiner_places_the_unassigned_shards_first() -> None:
    sizes = [10] * 8
    before = place(sizes, ["a"], caps={"a": 20})
    assert unassigned(before, 8) == [2, 3, 4, 5, 6, 7]
    after = join(before, ["b"], sizes, caps={"a": 20})
    assert after == {"a": [0, 1], "b": [2, 3, 4, 5, 6, 7]}
    assert placement.join({"a": [0], "b": [1]}, ["c"], [5, 5]) == {"a": [0], "b": [1], "c": []}, \
        "a donor keeps one shard"


def test_ordered_runs_hand_on_what_passes_a_free_cache_through_the_planner() -> None:
    from dml.coordinator.planner import assign_shards

    sizes, nbytes = [10] * 6, [100] * 6
    assert assign_shards(sizes, ["a", "b"], ordered=True) == {"a": [0, 1, 2], "b": [3, 4, 5]}
    runs = assign_shards(sizes, ["a", "b"], ordered=True, shard_bytes=nbytes, cache_free={"a": 200})
    assert runs == {"a": [0, 1], "b": [2, 3, 4, 5]}, "a's run stops where its cache is full; b takes the rest"
    warm = assign_shards(sizes, ["a", "b"], ordered=True, shard_bytes=nbytes, cache_free={"a": 0},
                         cached={"a": {0, 1, 2}})
    assert warm == {"a": [0, 1, 2], "b": [3, 4, 5]}, "shards a caches cost it no free space"
