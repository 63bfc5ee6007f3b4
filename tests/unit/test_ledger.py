"""Sample allocation per round and the ledger that checks it (each sample once per pass)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dml.coordinator import planner
from dml.coordinator.ledger import violations


def test_every_round_is_full_and_passes_wrap_per_shard() -> None:
    sizes = [7, 5, 9]
    assign = {"a": [0, 1], "b": [2]}
    cursors: dict[int, tuple[int, int]] = {}
    rounds = []
    for _ in range(10):
        alloc = planner.allocate(assign, sizes, cursors, budget=4)
        assert {p: sum(b - a for _, _, a, b in rs) for p, rs in alloc.items()} == {"a": 4, "b": 4}
        for rs in alloc.values():
            planner.advance(cursors, rs, sizes)
        rounds.append([r for p in sorted(alloc) for r in alloc[p]])
    assert violations(rounds, sizes) == []
    # b read shard 2 (size 9) 40 times: four full passes and 4 into the fifth.
    assert cursors[2] == (5, 4)
    # a alternates its shards by pass, so both advance evenly.
    assert abs(cursors[0][0] - cursors[1][0]) <= 1
    assert planner.data_epoch(cursors, 3) == min(c[0] for c in cursors.values())


def test_violations_name_reuse_gaps_and_bad_ranges() -> None:
    sizes = [10, 10]
    assert violations([[(0, 1, 0, 10)], [(0, 2, 0, 3)]], sizes) == []
    reuse = violations([[(0, 1, 0, 6)], [(0, 1, 4, 8)]], sizes)
    assert len(reuse) == 1 and "used again" in reuse[0]
    gap = violations([[(0, 1, 0, 6)], [(0, 1, 7, 9)]], sizes)
    assert len(gap) == 1 and "skipped" in gap[0]
    unfinished_pass = violations([[(0, 1, 0, 6)], [(0, 2, 0, 3)]], sizes)
    assert len(unfinished_pass) == 1 and "skipped" in unfinished_pass[0]
    assert "outside" in violations([[(1, 1, 0, 11)]], sizes)[0]
    assert "unknown shard" in violations([[(5, 1, 0, 1)]], sizes)[0]


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=2, max_size=12),
    budget=st.integers(1, 50),
    events=st.lists(st.sampled_from(["commit", "commit", "commit", "abort", "leave", "join"]), max_size=60),
)
def test_committed_rounds_keep_the_ledger_whatever_fails(sizes, budget, events) -> None:
    """Allocating from committed cursors, committing some rounds and abandoning others while
    peers leave (their shards move) and join, never uses a sample twice or skips one in a pass."""
    peers = ["p0", "p1"]
    assign = planner.assign_shards(sizes, peers)
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
            gone = sorted(assign)[0]
            assign = planner.remove_peers(assign, {gone}, sizes)
        elif ev == "join":
            assign = planner.add_peers(assign, [f"p{n}"], sizes)
            n += 1
        # "abort": the allocation is simply dropped, as a re-issued round does
    assert violations(committed, sizes) == []


def test_a_round_is_read_in_pass_order_whatever_order_its_members_list_it() -> None:
    """A gossip window lists ranges member by member; a shard that moved between two members
    within one window may be listed later part first. That is no gap, and a range used again
    does not move the ledger back (which would report later rounds as gaps)."""
    sizes = [100]
    # B read 50..100 after A read 0..50 of pass 1, but B's report is listed first.
    assert violations([[(0, 1, 50, 100), (0, 1, 0, 50)], [(0, 2, 0, 10)]], sizes) == []
    # Used again (A's stale step re-reads 0..30 after 0..60): reported once, and the next
    # round continuing at 60 is not a gap.
    got = violations([[(0, 1, 0, 60), (0, 1, 0, 30)], [(0, 1, 60, 100)]], sizes)
    assert len(got) == 1 and "used again" in got[0], got
    # A real gap is still one, in any order.
    got = violations([[(0, 1, 60, 100), (0, 1, 0, 50)]], sizes)
    assert len(got) == 1 and "skipped from pass 1 position 50 to pass 1 position 60" in got[0], got
