"""Fault attribution from several reports (coordinator/partitions.py) and what the state machine
does with it: re-formed rings, held-out peers, one eviction per fault."""
from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from dml.coordinator.partitions import judge, link_of, ring_order
from dml.coordinator.records import HEARTBEAT_TIMEOUT, UNREACHABLE, BrokenLink, Exclusion
from dml.coordinator.store import MemoryStore
from tests.unit.test_state import register, report_all, running, spec, submit


def _edges(order: list[str]) -> list[tuple[str, str]]:
    return [(order[i], order[(i + 1) % len(order)]) for i in range(len(order))] if len(order) > 1 else []


def _any_ring(members: list[str], bad: set[tuple[str, str]]) -> bool:
    """Brute force: is there a ring of all members using no bad edge?"""
    if len(members) <= 1:
        return True
    first, rest = members[0], members[1:]
    return any(not set(_edges([first, *p])) & bad for p in itertools.permutations(rest))


NAMES = [f"p{i}" for i in range(7)]


@st.composite
def members_and_bad(draw: st.DrawFn) -> tuple[list[str], set[tuple[str, str]]]:
    n = draw(st.integers(0, 7))
    members = draw(st.permutations(NAMES))[:n]
    pairs = [(a, b) for a in members for b in members if a != b]
    bad = set(draw(st.lists(st.sampled_from(pairs), max_size=12))) if pairs else set()
    return members, bad


@settings(max_examples=400, deadline=None, database=None)
@given(case=members_and_bad())
def test_ring_order_finds_a_ring_avoiding_the_bad_links_exactly_when_one_exists(case) -> None:
    members, bad = case
    got = ring_order(members, bad)
    if got is None:
        assert not _any_ring(members, bad), "a ring exists but none was found"
        return
    assert sorted(got) == sorted(members) and len(set(got)) == len(got)
    assert not set(_edges(got)) & bad
    assert ring_order(members, bad) == got, "deterministic"
    if not set(_edges(members)) & bad:
        assert got == members, "a good order is kept as it is"
    elif members:
        assert got[0] == members[0]


@settings(max_examples=200, deadline=None, database=None)
@given(members=st.permutations(NAMES), data=st.data())
def test_ring_order_with_each_peer_blamed_at_most_once_each_way_always_finds_a_ring_of_four_or_more(members, data) -> None:
    # What the state machine leaves: a peer with two broken links out, or two in, is held out,
    # so the rest have at most one of each. From four members a ring always avoids them.
    n = data.draw(st.integers(4, 7))
    ms = list(members[:n])
    succ = data.draw(st.permutations(ms))
    bad = {(a, b) for a, b in zip(ms, succ) if a != b and data.draw(st.booleans())}
    got = ring_order(ms, bad)
    assert got is not None and not set(_edges(got)) & bad


def test_ring_order_gives_up_within_its_budget() -> None:
    # Every edge into p0 broken: no ring exists; a tiny budget answers None as well, quickly.
    ms = NAMES
    bad = {(a, "p0") for a in ms if a != "p0"}
    assert ring_order(ms, bad) is None
    assert ring_order(ms, {("p0", "p1")}, budget=1) is None
    assert ring_order(["p0", "p1"], {("p0", "p1")}) is None, "a ring of two has one order"
    assert ring_order(["p0"], set()) == ["p0"] and ring_order([], set()) == []


def test_link_of_blames_the_direction_data_flows() -> None:
    ring = ["a", "b", "c"]
    assert link_of(ring, "a", "b") == ("a", "b"), "a sends to its successor b"
    assert link_of(ring, "b", "a") == ("a", "b"), "b receives from its predecessor a"
    assert link_of(["a", "b"], "b", "a") == ("b", "a"), "two members: taken as the sender's"


def _link(reporter: str, suspect: str, ring: list[str]) -> BrokenLink:
    s, r = link_of(ring, reporter, suspect)
    return BrokenLink(reporter, suspect, s, r, 1, 0)


def test_judge_holds_out_whom_two_reports_agree_on_and_otherwise_re_forms_the_ring() -> None:
    ring = ["a", "b", "c", "d"]
    one = [_link("a", "b", ring)]
    v = judge(ring, one, "a", "b")
    assert not v.hold_out and v.ring == ("a", "c", "b", "d")
    # Named by two reporters: nobody can reach it.
    two = one + [_link("c", "b", list(v.ring))]
    v = judge(ring, two, "c", "b")
    assert (v.hold_out, v.witnesses) == ("b", ("a", "c")) and "a, c could not reach it" in v.reason
    # One reporter failing with two peers: it is the one that reaches nobody.
    v = judge(ring, one + [_link("a", "c", ["a", "c", "b", "d"])], "a", "c")
    assert (v.hold_out, v.witnesses) == ("a", ("a",)) and "could not reach b nor c" in v.reason
    # Links of peers no longer members count for nothing.
    v = judge(["a", "c", "d"], two, "c", "d")
    assert not v.hold_out
    # Two members have no other order: the suspect is held out on the one report.
    v = judge(["a", "b"], [_link("a", "b", ["a", "b"])], "a", "b")
    assert v.hold_out == "b" and "no ring" in v.reason


# -- the state machine ------------------------------------------------------------------------


def test_a_one_way_fault_costs_a_re_formed_ring_and_no_eviction_for_the_rest_of_the_job() -> None:
    s, job, (x, a, b) = running(3, rounds=4)
    # b cannot reach x, which everyone else reaches (and x reaches everyone).
    assert job.members == [x, a, b]
    s.report_failure(b, job.job_id, 1, 1, x, 10, "connect refused")
    assert job.members == [x, b, a] and job.epoch == 2 and job.evictions == []
    for t in (20, 30, 40, 50):
        report_all(s, job, t)
        if job.state == "RUNNING":
            assert job.members.index(x) != (job.members.index(b) + 1) % 3, "b never sends to x again"
    assert job.state == "SUCCEEDED" and job.evictions == [] and job.held_out == []


def test_joiners_are_placed_so_the_ring_avoids_known_broken_links() -> None:
    s, job, (a, b, c) = running(3, num_shards=6)
    s.report_failure(a, job.job_id, 1, 1, b, 10)
    assert job.members == [a, c, b]
    (d,) = register(s, 1, 11)
    report_all(s, job, 12)  # round boundary: d joins
    assert set(job.members) == {a, b, c, d}
    i = job.members.index(a)
    assert job.members[(i + 1) % 4] != b
    assert job.epochs[-1].peers == job.members


def test_a_member_that_reaches_nobody_is_the_one_held_out() -> None:
    s, job, (a, b, c, d) = running(4)
    s.report_failure(a, job.job_id, 1, 1, b, 10)  # a -> b broken: ring a, c, b, d
    assert job.members == [a, c, b, d]
    s.report_failure(a, job.job_id, 1, 2, c, 11)  # a -> c broken too: a is the broken side
    assert a not in job.members and job.held_out[-1].peer_id == a
    assert [(e.peer_id, e.cause) for e in job.evictions] == [(a, UNREACHABLE)]
    assert s.held_out_reason(a).endswith(f"it could not reach {b} nor {c}, which others reach")


def test_a_dead_peer_costs_one_eviction_its_lease_ending_only_its_registration() -> None:
    s, job, (a, b, c) = running(3)
    s.report_failure(a, job.job_id, 1, 1, b, 10)
    s.report_failure(c, job.job_id, 1, 2, b, 11)  # held out
    for p in (a, c):
        s.heartbeat(p, 2000)
    ch = s.expire(2000)  # b never heartbeats again
    assert ch.removed_peers == (b,) and b not in s.peers
    assert [(e.peer_id, e.cause) for e in job.evictions] == [(b, UNREACHABLE)]
    assert HEARTBEAT_TIMEOUT not in [e.cause for e in job.evictions]


def test_a_held_out_peer_comes_back_by_registering_again_or_in_another_job() -> None:
    s, job, (a, b) = running(2, min_peers=1, rounds=3)
    s.report_failure(a, job.job_id, 1, 1, b, 10)  # two members: b is held out at once
    assert job.members == [a] and s.peers[b].job_id == "" and s.held_out_reason(b)
    other, _ = submit(s, spec(min_peers=1), 11)
    assert s.job(other).members == [b], "held out of one job, free for the next"
    assert s.held_out_reason(b) == ""
    # A restart at the same address replaces it: a new peer, not held out.
    s2, job2, (a2, b2) = running(2, min_peers=1, rounds=3)
    s2.report_failure(a2, job2.job_id, 1, 1, b2, 10)
    new, _ = s2.register(s2.peers[b2].address, {}, 20)
    report_all(s2, job2, 21)
    assert new in job2.members and not s2.held_out_reason(new)


def test_when_the_job_ends_its_held_out_peers_are_no_longer_told_so() -> None:
    s, job, (a, b) = running(2, min_peers=1, rounds=1)
    s.report_failure(a, job.job_id, 1, 1, b, 10)
    assert s.held_out_reason(b)
    report_all(s, job, 20)
    assert job.state == "SUCCEEDED" and s.held_out_reason(b) == "" and s.peers[b].held_out_job == ""
    assert job.held_out[0].peer_id == b, "the record stays for status"


def test_broken_links_and_held_out_peers_survive_a_store_round_trip() -> None:
    s, job, (a, b, c, d) = running(4)
    s.report_failure(a, job.job_id, 1, 1, b, 10, "refused")
    s.report_failure(c, job.job_id, 1, 2, d, 11, "refused")
    s.report_failure(a, job.job_id, 1, 3, c, 12, "refused")
    store = MemoryStore()
    store.save([job], s.peers.values(), [], [])
    (j,), peers = store.load()
    assert j.broken_links == job.broken_links and j.held_out == job.held_out
    assert all(isinstance(x, Exclusion) for x in j.held_out) and all(isinstance(x, BrokenLink) for x in j.broken_links)
    got = {p.peer_id: p for p in peers}
    assert all(got[p].held_out_reason == s.peers[p].held_out_reason for p in s.peers)


def test_a_job_short_of_peers_tries_a_held_out_peer_again_after_a_growing_wait() -> None:
    from dml.coordinator.state import HOLD_OUT_RETRY_MS

    s, job, (a, b) = running(2, min_peers=2, rounds=3)
    s.report_failure(a, job.job_id, 1, 1, b, 10)  # a transient fault, say: b held out, the job waits
    assert job.members == [a] and job.reason.startswith("waiting for peers")
    for t in (1_000, HOLD_OUT_RETRY_MS):
        for p in (a, b):
            s.heartbeat(p, t)
        s.expire(t)
        assert job.members == [a], "not before its retry time"
    for p in (a, b):
        s.heartbeat(p, HOLD_OUT_RETRY_MS + 11)
    s.expire(HOLD_OUT_RETRY_MS + 11)
    assert job.members == [a, b] and s.held_out_reason(b) == "" and not job.reason
    # Held out again: the next try waits twice as long.
    s.report_failure(a, job.job_id, 1, job.epoch, b, HOLD_OUT_RETRY_MS + 20)
    assert job.held_out[-1].retry_ms == HOLD_OUT_RETRY_MS + 20 + 2 * HOLD_OUT_RETRY_MS
    assert [e.cause for e in job.evictions] == [UNREACHABLE, UNREACHABLE]


def test_a_job_with_enough_peers_does_not_try_a_held_out_peer_again() -> None:
    from dml.coordinator.state import HOLD_OUT_RETRY_MS

    s, job, (a, b, c) = running(3, min_peers=2, rounds=50)
    s.report_failure(a, job.job_id, 1, 1, b, 10)
    s.report_failure(c, job.job_id, 1, 2, b, 11)
    t = 2 * HOLD_OUT_RETRY_MS
    for p in (a, b, c):
        s.heartbeat(p, t)
    s.expire(t)
    report_all(s, job, t + 1)  # a round boundary, where idle peers join
    assert job.members == [a, c] and s.held_out_reason(b)


# -- the coordinator as a second witness --------------------------------------------------------


def test_a_refused_connect_at_the_suspects_address_holds_it_out_on_the_first_report() -> None:
    s, job, (x, a, b) = running(3, rounds=4)
    s.report_failure(b, job.job_id, 1, 1, x, 10, "connect refused", refused="nothing listens at h:1 (connection refused)")
    assert x not in job.members and [e.peer_id for e in job.held_out] == [x]
    assert job.evictions_total == 1 and job.held_out[0].reporters == [b]
    assert "nothing listens" in job.held_out[0].reason
    # Without the coordinator's evidence the same report only re-forms the ring.
    s2, job2, (x2, _, b2) = running(3, rounds=4)
    s2.report_failure(b2, job2.job_id, 1, 1, x2, 10, "connect refused")
    assert x2 in job2.members and job2.held_out == [] and job2.evictions_total == 0


def test_nothing_listens_counts_only_a_refusal_as_evidence() -> None:
    import socket

    from dml.coordinator.service import nothing_listens

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert nothing_listens(f"127.0.0.1:{port}") == ""
    # The port is closed now: the host refuses.
    assert "connection refused" in nothing_listens(f"127.0.0.1:{port}")
    assert nothing_listens("not an address") == ""  # no evidence, not an error
