"""Sharding for real data: contiguous and classes:K shards, a minimum shard size, and placement
weighted by capacity under each peer's cap (``dml-peer --max-samples``)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml.common.sampling import parse_sharding
from dml.coordinator import planner
from dml.coordinator.planner import add_peers, assign_shards, make_shards, remove_peers, unassigned

PROPS = settings(max_examples=80, deadline=None, database=None)


def peers_strategy(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[list[str]]:
    return st.lists(st.integers(0, 50), min_size=min_size, max_size=max_size, unique=True).map(
        lambda v: [f"p{i}" for i in v])


def sizes_strategy(min_size: int = 1, max_size: int = 40) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, 100), min_size=min_size, max_size=max_size)


def caps_for(peers: list[str], data: st.DataObject) -> dict[str, int]:
    """Some peers capped (0: no cap), some not."""
    return {p: data.draw(st.sampled_from([0, 0, 1, 30, 80, 200, 1000]), label=f"cap {p}") for p in peers}


def capacity_for(peers: list[str], data: st.DataObject) -> dict[str, float]:
    return {p: data.draw(st.sampled_from([0.5, 1.0, 2.0, 3.0, 10.0]), label=f"speed {p}") for p in peers}


def held(assign: dict[str, list[int]], sizes: list[int], p: str) -> int:
    return sum(sizes[s] for s in assign[p])


def check_placement(assign: dict[str, list[int]], sizes: list[int], caps: dict[str, int]) -> None:
    """Every shard at most once; no peer over its cap; a shard left out fits no peer's room."""
    flat = [s for v in assign.values() for s in v]
    assert len(flat) == len(set(flat)), "a shard placed twice"
    assert set(flat) <= set(range(len(sizes)))
    for p in assign:
        if caps.get(p, 0) > 0:
            assert held(assign, sizes, p) <= caps[p], f"{p} over its cap"
    for s in unassigned(assign, len(sizes)):
        room = [caps[p] - held(assign, sizes, p) for p in assign if caps.get(p, 0) > 0]
        assert all(caps.get(p, 0) > 0 for p in assign), "left a shard out beside an uncapped peer"
        assert all(r < sizes[s] for r in room), f"shard {s} left out though a peer had room"


# -- parse_sharding ----------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [("contiguous", ("contiguous", 0.0)), ("classes:2", ("classes", 2.0)),
                                       ("classes:10", ("classes", 10.0))])
def test_parse_sharding_accepts_the_new_schemes(text: str, want: tuple[str, float]) -> None:
    assert parse_sharding(text) == want


@pytest.mark.parametrize("text", ["classes:0", "classes:-1", "classes:", "classes", "classes:1.5", "classes:x",
                                  "Contiguous", "contiguous:2", "classes:01"])
def test_parse_sharding_rejects_bad_new_schemes(text: str) -> None:
    with pytest.raises(ValueError, match="sharding"):
        parse_sharding(text)


# -- contiguous ------------------------------------------------------------------------------


@PROPS
@given(n=st.integers(1, 400), data=st.data())
def test_contiguous_shards_are_consecutive_ranges_in_order(n: int, data: st.DataObject) -> None:
    num = data.draw(st.integers(1, n))
    shards = make_shards(np.zeros(n, dtype=np.int64), num, "contiguous", seed=data.draw(st.integers(0, 99)))
    assert np.array_equal(np.concatenate(shards), np.arange(n)), "the dataset's own order, every index once"
    sizes = [s.size for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(s, np.arange(s[0], s[0] + s.size)) for s in shards)


# -- classes:K -------------------------------------------------------------------------------


@st.composite
def labelled(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """(labels, K, num_shards) that classes:K can cut: every label has samples to spare."""
    c = draw(st.integers(1, 12))
    k = draw(st.integers(1, c))
    groups = -(-c // k)
    num = draw(st.integers(groups, groups * 4))
    counts = draw(st.lists(st.integers(2 * num, 2 * num + 30), min_size=c, max_size=c))
    names = draw(st.lists(st.integers(0, 40), min_size=c, max_size=c, unique=True))
    labels = np.repeat(np.asarray(names, dtype=np.int64), counts)
    order = np.random.default_rng(draw(st.integers(0, 99))).permutation(labels.size)
    return labels[order], k, num


@PROPS
@given(case=labelled(), seed=st.integers(0, 2**31 - 1))
def test_classes_k_every_shard_holds_exactly_k_labels(case: tuple[np.ndarray, int, int], seed: int) -> None:
    labels, k, num = case
    shards = make_shards(labels, num, f"classes:{k}", seed)
    assert len(shards) == num
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(labels.size)), "every index exactly once"
    assert [np.unique(labels[s]).size for s in shards] == [k] * num
    again = make_shards(labels, num, f"classes:{k}", seed)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again)), "deterministic for a seed"


@pytest.mark.parametrize("k,peers,per_peer", [(2, 5, 2), (2, 10, 4), (5, 2, 3), (5, 4, 2), (1, 10, 2), (10, 3, 2)])
def test_classes_k_gives_each_peer_k_labels_when_the_peer_count_allows(k: int, peers: int, per_peer: int) -> None:
    """10 balanced labels, peers a multiple of the ceil(10/K) label groups, num_shards = peers x
    per_peer: the first (ordered) placement gives every peer exactly K labels."""
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 120))
    shards = make_shards(labels, peers * per_peer, f"classes:{k}", seed=3)
    sizes = [s.size for s in shards]
    names = [f"p{i}" for i in range(peers)]
    a = assign_shards(sizes, names, ordered=planner.ordered_sharding(f"classes:{k}"))
    seen = [np.unique(labels[np.concatenate([shards[s] for s in a[p]])]).size for p in names]
    assert seen == [k] * peers


def test_classes_k_with_fewer_peers_than_groups_covers_every_label_with_few_each() -> None:
    """4 peers, classes:2 over 10 labels: 8 label slots cannot cover 10 labels, so some peers
    see more than 2, but no peer sees all of them and every label is held."""
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 100))
    shards = make_shards(labels, 20, "classes:2", seed=0)
    a = assign_shards([s.size for s in shards], ["a", "b", "c", "d"], ordered=True)
    seen = [set(labels[np.concatenate([shards[s] for s in a[p]])].tolist()) for p in "abcd"]
    assert set().union(*seen) == set(range(10))
    assert all(2 <= len(x) <= 4 for x in seen), seen


@pytest.mark.parametrize("labels,num,sharding,msg", [
    (np.arange(30) % 3, 3, "classes:4", "only 3"),
    (np.arange(40) % 4, 1, "classes:2", "at least 2 shards"),
    (np.r_[np.zeros(20), np.ones(2)].astype(np.int64), 6, "classes:1", "fewer than"),
])
def test_classes_k_refuses_what_it_cannot_cut(labels: np.ndarray, num: int, sharding: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        make_shards(labels, num, sharding, 0)


# -- minimum shard size ----------------------------------------------------------------------


@pytest.mark.parametrize("sharding", ["iid", "contiguous", "dirichlet:0.5", "classes:2"])
def test_minimum_shard_size_is_held_or_refused(sharding: str) -> None:
    labels = np.arange(100) % 4
    shards = make_shards(labels, 10, sharding, 0, min_samples=10)
    assert min(s.size for s in shards) >= 10
    with pytest.raises(ValueError, match="min_shard_samples"):
        make_shards(labels, 10, sharding, 0, min_samples=11)


def test_minimum_refuses_uneven_classes_shards() -> None:
    # classes:2 over 3 labels: groups {0,1} and {2,0}; label 2 alone makes group 1's shards smaller.
    labels = np.r_[np.zeros(60), np.ones(60), np.full(12, 2)].astype(np.int64)
    shards = make_shards(labels, 4, "classes:2", 0)
    smallest = min(s.size for s in shards)
    assert make_shards(labels, 4, "classes:2", 0, min_samples=smallest)
    with pytest.raises(ValueError, match="below the minimum"):
        make_shards(labels, 4, "classes:2", 0, min_samples=smallest + 1)


# -- placement under caps and capacity -------------------------------------------------------


@PROPS
@given(sizes=sizes_strategy(min_size=0), peers=peers_strategy(), ordered=st.booleans(), data=st.data())
def test_assign_holds_caps_and_leaves_out_only_what_fits_nowhere(sizes: list[int], peers: list[str],
                                                                 ordered: bool, data: st.DataObject) -> None:
    caps, speed = caps_for(peers, data), capacity_for(peers, data)
    a = assign_shards(sizes, peers, speed, caps, ordered=ordered)
    assert set(a) == set(peers)
    check_placement(a, sizes, caps)


@PROPS
@given(sizes=sizes_strategy(min_size=0), peers=peers_strategy(), data=st.data())
def test_ordered_assign_gives_runs_in_peer_order_within_a_shard_of_the_share(sizes: list[int], peers: list[str],
                                                                            data: st.DataObject) -> None:
    speed = capacity_for(peers, data)
    a = assign_shards(sizes, peers, speed, ordered=True)
    assert [s for p in peers for s in a[p]] == list(range(len(sizes))), "consecutive runs, in peer order"
    for p in peers:
        share = len(sizes) * speed[p] / sum(speed.values())
        assert abs(len(a[p]) - share) <= 1 + 1e-9, (p, len(a[p]), share)


def test_assign_weights_by_capacity_in_both_modes() -> None:
    for ordered in (False, True):
        a = assign_shards([10] * 12, ["a", "b"], capacity={"a": 3.0, "b": 1.0}, ordered=ordered)
        assert (len(a["a"]), len(a["b"])) == (9, 3), ordered


def test_caps_too_small_leave_shards_unassigned_rather_than_overfill() -> None:
    a = assign_shards([10] * 6, ["a", "b"], caps={"a": 20, "b": 25})
    assert [len(a["a"]), len(a["b"])] == [2, 2]
    assert unassigned(a, 6) == [4, 5]
    assert assign_shards([10] * 6, ["a"], caps={"a": 5}) == {"a": []}


def test_a_capped_peer_shares_its_excess_with_the_others() -> None:
    a = assign_shards([10] * 12, ["a", "b", "c"], caps={"a": 20}, ordered=True)
    assert held(a, [10] * 12, "a") == 20
    assert sorted(len(a[p]) for p in "bc") == [5, 5]
    assert unassigned(a, 12) == []


@PROPS
@given(sizes=sizes_strategy(), peers=peers_strategy(min_size=2), ordered=st.booleans(), data=st.data())
def test_remove_peers_under_caps_moves_only_the_departed_shards(sizes: list[int], peers: list[str], ordered: bool,
                                                                data: st.DataObject) -> None:
    caps, speed = caps_for(peers, data), capacity_for(peers, data)
    before = assign_shards(sizes, peers, speed, caps, ordered=ordered)
    gone = set(data.draw(st.lists(st.sampled_from(peers), min_size=1, max_size=len(peers) - 1, unique=True)))
    after = remove_peers(before, gone, sizes, speed, caps)
    assert set(after) == set(peers) - gone
    check_placement(after, sizes, caps)
    for p, v in after.items():
        assert set(before[p]) <= set(v), f"survivor {p} lost a shard"
    moved = {s for p, v in after.items() for s in set(v) - set(before[p])}
    orphans = {s for p in gone for s in before[p]}
    assert moved <= orphans, "only the departed peers' shards move"
    assert set(unassigned(after, len(sizes))) == set(unassigned(before, len(sizes))) | (orphans - moved)


@PROPS
@given(sizes=sizes_strategy(), peers=peers_strategy(min_size=1, max_size=5), new_count=st.integers(1, 3),
       data=st.data())
def test_add_peers_under_caps_places_what_now_fits_and_holds_every_cap(sizes: list[int], peers: list[str],
                                                                        new_count: int, data: st.DataObject) -> None:
    new = [f"new{i}" for i in range(new_count)]
    caps, speed = caps_for(peers + new, data), capacity_for(peers + new, data)
    before = assign_shards(sizes, peers, speed, caps)
    after = add_peers(before, new, sizes, speed, caps)
    assert set(after) == set(peers) | set(new)
    check_placement(after, sizes, caps)
    assert set(unassigned(after, len(sizes))) <= set(unassigned(before, len(sizes))), "a placed shard was dropped"


def test_add_peers_places_unassigned_shards_first_and_weights_by_capacity() -> None:
    sizes = [10] * 8
    before = assign_shards(sizes, ["a"], caps={"a": 20})
    assert unassigned(before, 8) == [2, 3, 4, 5, 6, 7]
    after = add_peers(before, ["b"], sizes, capacity={"a": 1.0, "b": 1.0}, caps={"a": 20})
    assert unassigned(after, 8) == [] and len(after["a"]) == 2 and len(after["b"]) == 6
    fast = add_peers(assign_shards(sizes, ["a"]), ["b"], sizes, capacity={"a": 1.0, "b": 3.0})
    assert (len(fast["a"]), len(fast["b"])) == (2, 6), "a joiner three times as fast takes three quarters"


@settings(max_examples=100, deadline=None, database=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=2, max_size=12),
    budget=st.integers(1, 50),
    caps=st.lists(st.sampled_from([0, 0, 10, 40, 100]), min_size=8, max_size=8),
    ordered=st.booleans(),
    events=st.lists(st.sampled_from(["commit", "commit", "commit", "abort", "leave", "join"]), max_size=50),
)
def test_the_ledger_holds_under_caps_while_peers_leave_and_join(sizes, budget, caps, ordered, events) -> None:
    """With caps leaving some shards unassigned now and then, committed rounds still never use a
    sample twice or skip one in a pass, and no peer ever holds more than its cap."""
    from dml.coordinator.ledger import violations

    cap_of = {f"p{i}": c for i, c in enumerate(caps)}
    assign = assign_shards(sizes, ["p0", "p1"], caps=cap_of, ordered=ordered)
    cursors: dict[int, tuple[int, int]] = {}
    committed = []
    n = 2
    for ev in events:
        alloc = planner.allocate(assign, sizes, cursors, budget)
        if ev == "commit":
            for p in sorted(alloc):
                planner.advance(cursors, alloc[p], sizes)
            committed.append([r for p in sorted(alloc) for r in alloc[p]])
        elif ev == "leave" and len(assign) > 1:
            assign = remove_peers(assign, {sorted(assign)[0]}, sizes, caps=cap_of)
        elif ev == "join" and n < len(caps):
            assign = add_peers(assign, [f"p{n}"], sizes, caps=cap_of)
            n += 1
        check_placement(assign, sizes, cap_of)
    assert violations(committed, sizes) == []
