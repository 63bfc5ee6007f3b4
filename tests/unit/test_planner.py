"""Shard planning: cutting a training set into shards and moving shards between peers."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml.common.sampling import parse_sharding
from dml.coordinator.planner import add_peers, assign_shards, make_shards, remove_peers

PROPS = settings(max_examples=60, deadline=None, database=None)


def labels_strategy(min_size: int = 1, max_size: int = 300) -> st.SearchStrategy[np.ndarray]:
    return st.lists(st.integers(0, 9), min_size=min_size, max_size=max_size).map(lambda v: np.asarray(v, dtype=np.int64))


def sharding_strategy() -> st.SearchStrategy[str]:
    return st.one_of(
        st.just("iid"),
        st.sampled_from([0.01, 0.1, 0.5, 1, 10, 100]).map(lambda a: f"dirichlet:{a}"),
    )


def peers_strategy(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[list[str]]:
    return st.lists(st.integers(0, 50), min_size=min_size, max_size=max_size, unique=True).map(
        lambda v: [f"p{i}" for i in v]
    )


def sizes_strategy(min_size: int = 1, max_size: int = 40) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, 100), min_size=min_size, max_size=max_size)


def all_shards(assign: dict[str, list[int]]) -> list[int]:
    return sorted(s for v in assign.values() for s in v)


def load(assign: dict[str, list[int]], sizes: list[int], peer: str) -> int:
    return sum(sizes[s] for s in assign[peer])


def imbalance(assign: dict[str, list[int]], sizes: list[int]) -> int:
    loads = [load(assign, sizes, p) for p in assign]
    return max(loads) - min(loads)


# -- parse_sharding --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["dirichlet:0", "dirichlet:-1", "foo", "dirichlet:", "dirichlet:0.0", "IID",
                                  "dirichlet", "dirichlet:abc", "", " iid", "dirichlet:1e-400"])
def test_parse_sharding_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="sharding"):
        parse_sharding(text)


@pytest.mark.parametrize("text,want", [("iid", ("iid", 0.0)), ("dirichlet:0.5", ("dirichlet", 0.5)),
                                       ("dirichlet:3", ("dirichlet", 3.0)), ("dirichlet:1e-2", ("dirichlet", 0.01))])
def test_parse_sharding_accepts(text: str, want: tuple[str, float]) -> None:
    assert parse_sharding(text) == want


# -- make_shards -----------------------------------------------------------------------------


@PROPS
@given(labels=labels_strategy(), sharding=sharding_strategy(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_make_shards_covers_every_index_once_and_is_deterministic(
    labels: np.ndarray, sharding: str, seed: int, data: st.DataObject
) -> None:
    n = labels.size
    num = data.draw(st.integers(1, n), label="num_shards")
    shards = make_shards(labels, num, sharding, seed)
    assert len(shards) == num
    flat = np.concatenate(shards)
    assert np.array_equal(np.sort(flat), np.arange(n)), "every index exactly once"
    sizes = [s.size for s in shards]
    assert max(sizes) - min(sizes) <= 1, "shards are of equal size"
    assert all(s.size >= 1 for s in shards)
    again = make_shards(labels, num, sharding, seed)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again)), "deterministic for a seed"


def test_make_shards_seed_changes_the_plan() -> None:
    labels = np.arange(500) % 10
    for sharding in ("iid", "dirichlet:0.5"):
        a = make_shards(labels, 5, sharding, seed=1)
        b = make_shards(labels, 5, sharding, seed=2)
        assert any(not np.array_equal(x, y) for x, y in zip(a, b)), sharding


@pytest.mark.parametrize("num", [0, -1, 11])
def test_make_shards_rejects_bad_counts(num: int) -> None:
    with pytest.raises(ValueError):
        make_shards(np.arange(10) % 3, num, "iid", 0)


def test_make_shards_rejects_bad_sharding() -> None:
    with pytest.raises(ValueError):
        make_shards(np.arange(10) % 3, 2, "dirichlet:0", 0)


def label_skew(labels: np.ndarray, shards: list[np.ndarray]) -> float:
    """Mean over shards of the share of its most common label (1.0: single-class shards)."""
    return float(np.mean([Counter(labels[s].tolist()).most_common(1)[0][1] / s.size for s in shards]))


def test_dirichlet_small_alpha_is_more_label_skewed_than_iid() -> None:
    labels = np.repeat(np.arange(10), 200)  # 2,000 samples, balanced
    def skew(sharding: str) -> list[float]:
        return [label_skew(labels, make_shards(labels, 10, sharding, seed)) for seed in range(3)]

    iid, tiny, one, large = skew("iid"), skew("dirichlet:0.05"), skew("dirichlet:1"), skew("dirichlet:100")
    # iid shards of 200 from 10 balanced classes: the top class is ~13 percent of a shard.
    assert max(iid) < 0.2, iid
    # Equal shard sizes over balanced classes cap the skew (pools run dry), but alpha=0.05 still
    # makes the top class several times its iid share.
    assert min(tiny) > 0.35, tiny
    assert np.mean(tiny) > np.mean(one) > np.mean(large), (tiny, one, large)
    assert np.mean(large) < 0.2, large


# -- assign_shards ---------------------------------------------------------------------------


@PROPS
@given(sizes=sizes_strategy(min_size=0), peers=peers_strategy())
def test_assign_shards_gives_each_shard_to_exactly_one_peer(sizes: list[int], peers: list[str]) -> None:
    a = assign_shards(sizes, peers)
    assert set(a) == set(peers)
    assert all_shards(a) == list(range(len(sizes)))
    # Greedy largest-first: no peer is more than one (largest) shard above another.
    if sizes:
        assert imbalance(a, sizes) <= max(sizes)


def test_assign_shards_equal_sizes_is_even_and_respects_capacity() -> None:
    a = assign_shards([10] * 12, ["a", "b", "c"])
    assert [len(a[p]) for p in "abc"] == [4, 4, 4]
    b = assign_shards([10] * 12, ["a", "b"], capacity={"a": 3.0, "b": 1.0})
    assert (len(b["a"]), len(b["b"])) == (9, 3)


def test_assign_shards_needs_peers() -> None:
    with pytest.raises(ValueError):
        assign_shards([1, 2], [])


# -- remove_peers ----------------------------------------------------------------------------


@PROPS
@given(sizes=sizes_strategy(), peers=peers_strategy(min_size=2), data=st.data())
def test_remove_peers_moves_only_departed_shards(sizes: list[int], peers: list[str], data: st.DataObject) -> None:
    before = assign_shards(sizes, peers)
    gone = set(data.draw(st.lists(st.sampled_from(peers), min_size=1, max_size=len(peers) - 1, unique=True)))
    after = remove_peers(before, gone, sizes)
    assert set(after) == set(peers) - gone
    assert all_shards(after) == list(range(len(sizes))), "no shard lost or duplicated"
    for p, held in after.items():
        assert set(before[p]) <= set(held), f"survivor {p} lost a shard"
    moved = {s for p, held in after.items() for s in set(held) - set(before[p])}
    assert moved == {s for p in gone for s in before[p]}, "only the departed peers' shards move"


def test_remove_peers_gives_orphans_to_the_least_loaded() -> None:
    before = {"a": [0, 1, 2], "b": [3], "c": [4]}
    after = remove_peers(before, {"a"}, [10] * 5)
    # Largest first (ties by id), each to the least-loaded survivor (ties by order).
    assert after == {"b": [0, 2, 3], "c": [1, 4]}
    weighted = remove_peers(before, {"a"}, [10] * 5, capacity={"b": 1.0, "c": 3.0})
    assert weighted == {"b": [2, 3], "c": [0, 1, 4]}  # c counts 3x: loads 10 vs 30/3


def test_remove_all_peers_is_an_error() -> None:
    with pytest.raises(ValueError):
        remove_peers({"a": [0], "b": [1]}, {"a", "b"}, [1, 1])


# -- add_peers -------------------------------------------------------------------------------


@PROPS
@given(sizes=sizes_strategy(), peers=peers_strategy(min_size=1, max_size=5), new_count=st.integers(1, 3))
def test_add_peers_keeps_every_shard_once_and_reduces_imbalance(sizes: list[int], peers: list[str], new_count: int) -> None:
    before = assign_shards(sizes, peers)
    new = [f"new{i}" for i in range(new_count)]
    after = add_peers(before, new, sizes)
    assert set(after) == set(peers) | set(new)
    assert all_shards(after) == list(range(len(sizes))), "no shard lost or duplicated"
    # Padding `before` with the empty joiners gives the imbalance the joiners started from.
    start = imbalance({**before, **{p: [] for p in new}}, sizes)
    end = imbalance(after, sizes)
    assert end <= start
    assert end <= max(sizes), "balanced to within one shard"
    if start > max(sizes):
        assert end < start


@pytest.mark.parametrize("peers,shards,new", [(1, 8, 1), (2, 12, 1), (3, 24, 3), (1, 10, 4)])
def test_add_peers_equal_sizes_balances_to_one_shard(peers: int, shards: int, new: int) -> None:
    sizes = [10] * shards
    names = [f"p{i}" for i in range(peers)]
    after = add_peers(assign_shards(sizes, names), [f"n{i}" for i in range(new)], sizes)
    counts = [len(v) for v in after.values()]
    assert max(counts) - min(counts) <= 1
    assert all(len(after[f"n{i}"]) >= 1 for i in range(new))


def test_add_peers_with_single_shard_owners_moves_nothing() -> None:
    before = {"a": [0], "b": [1]}
    after = add_peers(before, ["c"], [5, 5])
    assert after == {"a": [0], "b": [1], "c": []}
