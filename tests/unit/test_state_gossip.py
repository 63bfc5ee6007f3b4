"""The gossip phase of the coordinator's state machine, driven by hand with a fake clock.

A gossip job (``aggregation="gossip"``, two rounds or more) has no barrier until its last round:
every member runs its own numbered steps, a report advances only that member, every
``gossip.peers`` steps close a virtual round, and round ``rounds`` is a normal ring round.
"""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml.aggregation.gossip import consensus_distance
from dml.coordinator.ledger import violations
from dml.common.spec import JobSpec
from dml.coordinator.records import (
    HEARTBEAT_TIMEOUT,
    REPLACED,
    ROUND_DEADLINE,
    RUNNING,
    SELF_REPORT,
    SUCCEEDED,
    BadReport,
    Changes,
    Eviction,
    Job,
    MembershipEpoch,
    NotFound,
    Report,
    Stale,
)
from dml.coordinator.state import ClusterState
from dml.coordinator.store import MemoryStore, SqliteStore, job_from_dict, job_to_dict

TIMEOUT_MS = 1_000
DEADLINE_MS = 5_000
SHARD = 10  # samples per shard
BUDGET = 7  # samples per step (local_steps x batch_size): steps straddle shard boundaries


def new_state(deadline_ms: int = DEADLINE_MS) -> ClusterState:
    return ClusterState(TIMEOUT_MS, round_deadline_ms=deadline_ms)


def spec(**kw: object) -> JobSpec:
    base: dict[str, object] = {"rounds": 4, "min_peers": 2, "num_shards": 6, "checkpoint_every_rounds": 100,
                               "local_steps": 1, "batch_size": BUDGET, "aggregation": "gossip"}
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def submit(s: ClusterState, job_spec: JobSpec, now: int) -> tuple[str, Changes]:
    """Submits a job whose shards hold ``SHARD`` samples each."""
    return s.submit(job_spec, [SHARD] * job_spec.num_shards, now)


PORTS = itertools.count(5000)  # every registration at an address of its own


def register(s: ClusterState, n: int, now: int = 0) -> list[str]:
    return [s.register(f"10.0.0.1:{next(PORTS)}", {"device": "cpu"}, now)[0] for _ in range(n)]


def running(n: int = 3, deadline_ms: int = DEADLINE_MS, **kw: object) -> tuple[ClusterState, Job, list[str]]:
    s = new_state(deadline_ms)
    peers = register(s, n)
    jid, _ = submit(s, spec(**kw), 0)
    job = s.job(jid)
    assert job.state == RUNNING and job.members == peers
    return s, job, peers


def step(s: ClusterState, job: Job, pid: str, now: int = 0, *, loss: float = 1.0, acc: float | None = None,
         dist: float | None = None, sent: int = 0, samples: int | None = None, rnd: int | None = None):
    """``pid`` reports the step it runs now (or ``rnd``), with the samples it was allocated."""
    r = Report(samples=job.allocated(pid) if samples is None else samples, train_loss=loss, digest="",
               test_accuracy=acc, test_loss=None if acc is None else 1.0 - acc, pair_distance=dist, bytes_sent=sent)
    return s.report(pid, job.job_id, job.gossip.step[pid] if rnd is None else rnd, job.epoch, r, now)


def frozen(job: Job, pid: str) -> tuple:
    """What a member's current step is: its number, its samples, when it was issued."""
    return job.gossip.step[pid], [list(r) for r in job.allocation[pid]], job.gossip.issued_ms[pid]


def ledger(job: Job) -> list[list[tuple[int, int, int, int]]]:
    return [[tuple(x) for m in sorted(r.consumed) for x in r.consumed[m]] for r in job.history]  # type: ignore[misc]


# -- entering the phase -------------------------------------------------------------------------


@pytest.mark.parametrize(("aggregation", "rounds", "gossip"), [
    ("gossip", 2, True), ("gossip", 4, True), ("gossip", 1, False), ("ring", 4, False)])
def test_gossip_phase_starts_only_for_gossip_jobs_of_two_rounds_or_more(aggregation: str, rounds: int, gossip: bool) -> None:
    _, job, peers = running(3, aggregation=aggregation, rounds=rounds)
    assert job.gossip.active is gossip
    if gossip:
        assert job.gossip.peers == 3 and job.gossip.steps == 0
        assert job.gossip.step == {p: 1 for p in peers}
        assert job.gossip.issued_ms == {p: 0 for p in peers}
    else:
        assert job.gossip.step == {}
    # Either way each member starts with one step's (or round's) samples from its own shards.
    for p in peers:
        assert job.allocated(p) == BUDGET
        assert {r[0] for r in job.allocation[p]} <= set(job.assignment[p])


def test_each_member_gets_its_own_step_in_its_plan_key() -> None:
    s, job, (a, b, c) = running(3)
    assert [s.plan_key(job, p) for p in (a, b, c)] == [(job.job_id, 1, 1)] * 3
    step(s, job, a, 10)
    step(s, job, a, 20)
    step(s, job, b, 30)
    assert s.plan_key(job, a) == (job.job_id, 3, 1)
    assert s.plan_key(job, b) == (job.job_id, 2, 1)
    assert s.plan_key(job, c) == (job.job_id, 1, 1)
    assert all(s.plan_for(p) is job for p in (a, b, c))


def test_a_report_advances_only_its_member_and_nobody_waits() -> None:
    s, job, (a, b, c) = running(3, rounds=10)
    before = {p: frozen(job, p) for p in (b, c)}
    cursors_of_others = {sh: job.cursors.get(sh) for p in (b, c) for sh in job.assignment[p]}
    first = [list(r) for r in job.allocation[a]]
    for i in range(5):  # a runs ahead: no barrier, b and c never report
        step(s, job, a, 100 * (i + 1))
    assert job.gossip.step[a] == 6 and job.gossip.steps == 5
    assert job.gossip.issued_ms[a] == 500
    assert {p: frozen(job, p) for p in (b, c)} == before
    assert {sh: job.cursors.get(sh) for p in (b, c) for sh in job.assignment[p]} == cursors_of_others
    # a's steps continued each other through its own shards.
    consumed = [tuple(r) for rec in job.history for r in rec.consumed.get(a, [])] + \
               [tuple(r) for r in job.gossip.window.consumed.get(a, [])]
    assert consumed[0] == tuple(first[0])
    assert sum(stop - start for _, _, start, stop in consumed) == 5 * BUDGET
    assert {r[0] for r in consumed} <= set(job.assignment[a])
    assert job.samples == 5 * BUDGET


def test_stale_step_or_outsider_is_stale_and_wrong_samples_is_bad_and_nothing_changes() -> None:
    s, job, (a, b, _) = running(3)
    step(s, job, a, 10)
    snap = job_to_dict(job)
    with pytest.raises(Stale):
        step(s, job, a, 20, rnd=1)  # already reported
    with pytest.raises(Stale):
        step(s, job, a, 20, rnd=3)  # not issued yet
    with pytest.raises(BadReport):
        step(s, job, b, 20, samples=BUDGET - 1)
    with pytest.raises(BadReport):
        step(s, job, b, 20, samples=BUDGET + 1)
    assert job_to_dict(job) == snap, "a refused report changes nothing"
    outsider = register(s, 1, 30)[0]  # admitted at once: a member now, at step 1
    assert job.gossip.step[outsider] == 1
    s.remove_peer(outsider, 40, HEARTBEAT_TIMEOUT)
    snap = job_to_dict(job)
    with pytest.raises(NotFound):  # evicted
        s.report(outsider, job.job_id, 1, job.epoch, Report(BUDGET, 1.0, ""), 50)
    assert job_to_dict(job) == snap
    # The epoch is not checked in the phase: a member whose step survived a membership change
    # reports it under the epoch it was planned in.
    old_epoch = 1
    assert job.epoch > old_epoch
    s.report(b, job.job_id, 1, old_epoch, Report(job.allocated(b), 1.0, ""), 60)
    assert job.gossip.step[b] == 2


def test_virtual_round_every_gossip_peers_steps_with_its_samples_bytes_metrics_and_consensus() -> None:
    s, job, (a, b, c) = running(3, rounds=10)
    rng = np.random.default_rng(0)
    x = {p: rng.normal(size=50).astype(np.float32) for p in (a, b, c)}
    d = {a: float(np.linalg.norm(x[a] - x[b])), b: float(np.linalg.norm(x[b] - x[c])),
         c: float(np.linalg.norm(x[c] - x[a]))}
    ch = step(s, job, a, 100, loss=2.0, acc=0.5, dist=d[a], sent=1000)
    ch2 = step(s, job, b, 150, loss=1.0, dist=d[b], sent=300)
    assert job.history == [] and not ch.committed and not ch2.committed
    ch3 = step(s, job, c, 400, loss=3.0, acc=0.7, dist=d[c], sent=5)
    assert ch3.committed == ((job.job_id, 1),)
    (r1,) = job.history
    assert (r1.round, r1.epoch, r1.digest, r1.members) == (1, 1, "", [a, b, c])
    assert r1.samples == 3 * BUDGET and job.committed_round == 1
    assert r1.train_loss == pytest.approx(2.0)  # equal samples: the plain mean
    assert r1.bytes_sent == 1305
    assert r1.test_accuracy == pytest.approx(0.6) and r1.test_loss == pytest.approx(0.4)
    assert r1.test_evaluated
    assert r1.duration_ms == 400 and r1.committed_ms == 400
    # Every pair reported once: the estimate is exactly the consensus distance of the three.
    assert r1.consensus_distance == pytest.approx(consensus_distance(list(x.values())), rel=1e-6)
    n = 3
    want = math.sqrt(sum(v * v for v in d.values()) / 3 * (n - 1) / (2 * n))
    assert r1.consensus_distance == pytest.approx(want)
    assert sorted(r1.consumed) == [a, b, c] and all(len(v) >= 1 for v in r1.consumed.values())
    # The next window: one member three times, no evaluation; the test metrics carry the
    # members' latest evaluations, and the estimate uses each member's latest distance.
    for i in range(2):
        assert not step(s, job, a, 500 + i, loss=4.0, dist=1.0).committed
    ch = step(s, job, a, 700, loss=4.0, dist=1.0, sent=7)
    assert ch.committed == ((job.job_id, 2),)
    r2 = job.history[-1]
    assert r2.round == 2 and r2.samples == 3 * BUDGET and r2.train_loss == pytest.approx(4.0)
    assert not r2.test_evaluated and r2.test_accuracy == pytest.approx(0.6)
    assert r2.bytes_sent == 7 and r2.duration_ms == 300
    assert r2.consumed.keys() == {a}
    assert r2.consensus_distance == pytest.approx(math.sqrt((1 + d[b] ** 2 + d[c] ** 2) / 3 * (n - 1) / (2 * n)))
    assert job.samples == sum(r.samples for r in job.history)


def test_after_rounds_minus_one_times_n_steps_the_last_round_is_a_ring_round_that_succeeds() -> None:
    s, job, (a, b, c) = running(3, rounds=4)
    order = [a, a, b, c, a, b, b, a, c]  # 9 = (4 - 1) * 3 steps, members at different speeds
    for i, p in enumerate(order):
        assert job.gossip.active
        step(s, job, p, 10 * (i + 1), acc=0.5)
    assert not job.gossip.active
    assert [r.round for r in job.history] == [1, 2, 3] and all(r.digest == "" for r in job.history)
    assert job.gossip.steps == 9 and job.round == 4 and job.epoch == 2
    assert job.gossip.step == {} and job.gossip.issued_ms == {}
    assert all(s.plan_key(job, p) == (job.job_id, 4, 2) for p in (a, b, c))
    assert all(job.allocated(p) == BUDGET for p in (a, b, c))
    # A member still in its gossip step when the phase ended is stale (the epoch moved on).
    with pytest.raises(Stale):
        s.report(c, job.job_id, job.round, 1, Report(BUDGET, 1.0, ""), 200)
    # Not committed on different digests ...
    for p, dg in zip((a, b, c), ("x", "x", "y")):
        s.report(p, job.job_id, 4, job.epoch, Report(job.allocated(p), 1.0, dg), 300)
    assert job.state == RUNNING and job.committed_round == 3
    # ... committed and SUCCEEDED on equal ones.
    for p in (a, b, c):
        s.report(p, job.job_id, 4, job.epoch, Report(job.allocated(p), 1.0, "final", test_accuracy=0.9,
                                                     test_loss=0.1), 400)
    assert job.state == SUCCEEDED
    assert job.history[-1].round == 4 and job.history[-1].digest == "final"
    assert job.history[-1].test_accuracy == pytest.approx(0.9)
    assert violations(ledger(job), [SHARD] * 6) == []
    assert all(s.peers[p].job_id == "" for p in (a, b, c))


def test_silent_member_is_evicted_only_its_shards_move_and_the_others_keep_their_steps() -> None:
    s, job, (a, b, c) = running(3)
    step(s, job, a, 100)
    step(s, job, a, 200)
    step(s, job, b, 300)
    before = {p: frozen(job, p) for p in (a, b)}
    shards = {p: list(job.assignment[p]) for p in (a, b, c)}
    cursors = dict(job.cursors)
    for p in (a, b):
        s.heartbeat(p, 900)
    ch = s.expire(1200)  # c silent since 0
    assert c in ch.removed_peers and c not in s.peers
    assert job.members == [a, b] and job.gossip.active and job.epoch == 2
    assert {p: frozen(job, p) for p in (a, b)} == before
    for p in (a, b):
        assert set(shards[p]) <= set(job.assignment[p])
    assert sorted(job.assignment[a] + job.assignment[b]) == list(range(6))
    assert set(job.assignment[a] + job.assignment[b]) - set(shards[a] + shards[b]) == set(shards[c])
    assert c not in job.gossip.step and c not in job.allocation and c not in job.gossip.issued_ms
    assert job.cursors == cursors  # c's unreported step consumed nothing
    assert job.gossip.peers == 3  # steps per virtual round stay as at the start
    step(s, job, a, 1300)  # the survivors go on with their steps
    assert job.gossip.step[a] == 4


def test_member_holding_its_step_past_the_deadline_is_evicted() -> None:
    s, job, (a, b, c) = running(3, deadline_ms=5_000, rounds=50)
    for t in range(500, 5_000, 500):  # everybody heartbeats; a and b keep reporting, c does not
        for p in (a, b, c):
            s.heartbeat(p, t)
        step(s, job, a, t)
        step(s, job, b, t)
    assert s.expire(5_000).removed_peers == ()
    under_way = job.round
    ch = s.expire(5_001)
    assert ch.removed_peers == (c,)
    assert job.members == [a, b] and job.gossip.active and job.state == RUNNING
    assert job.evictions == [Eviction(c, ROUND_DEADLINE, "", 5_001, 1, under_way,
                                      "held gossip step 1 past the deadline of 5000 ms")]
    assert job.epochs[-1] == MembershipEpoch(2, [a, b], 5_001, under_way)


def test_in_the_phase_only_a_member_giving_up_its_place_is_evicted_and_recorded() -> None:
    s, job, (a, b, c) = running(3)
    step(s, job, a, 10)
    s.report_failure(a, job.job_id, 2, 1, b, 20, "partner b refused")  # routed around: nobody evicted
    assert job.members == [a, b, c] and job.evictions == []
    s.report_failure(b, job.job_id, 1, 1, b, 30, "local failure")
    assert job.evictions == [Eviction(b, SELF_REPORT, "", 30, 1, 1, "local failure")]
    (d,) = register(s, 1, 40)  # admitted at once: an epoch of its own
    assert [(e.epoch, e.peers, e.started_ms) for e in job.epochs] == [
        (1, [a, b, c], 0), (2, [a, c], 30), (3, [a, c, d], 40)]


def test_a_member_waiting_for_peers_is_not_evicted_as_stuck_when_the_job_resumes() -> None:
    """Below min_peers the job is not active and nobody gets a plan; a member that waited longer
    than the round deadline did not hold its step, so a joiner's arrival must not evict it."""
    s, job, (a, _) = running(2, deadline_ms=5_000, rounds=50)
    step(s, job, a, 100)
    for t in range(200, 1_000, 200):
        s.heartbeat(a, t)
    s.expire(1_200)  # b silent: evicted; a alone, below min_peers 2
    assert job.members == [a] and not s.active(job)
    for t in range(1_400, 8_000, 400):  # a waits, heartbeating, past the round deadline
        s.heartbeat(a, t)
        s.expire(t)
    assert job.members == [a] and job.state == RUNNING
    (d,) = register(s, 1, 8_000)  # a peer joins: the job runs again
    assert job.members == [a, d] and s.active(job)
    for p in (a, d):
        s.heartbeat(p, 8_100)
    assert s.expire(8_100).removed_peers == ()
    assert job.members == [a, d]


def test_idle_peer_registering_mid_phase_is_admitted_at_once_with_step_one() -> None:
    s, job, (a, b, c) = running(3)
    step(s, job, a, 100)
    step(s, job, b, 200)
    before = {p: frozen(job, p) for p in (a, b, c)}
    (d,) = register(s, 1, 300)
    assert job.members == [a, b, c, d] and job.gossip.active
    assert job.gossip.step[d] == 1 and job.allocated(d) == BUDGET and job.gossip.issued_ms[d] == 300
    assert job.assignment[d], "the joiner took shards"
    assert {r[0] for r in job.allocation[d]} <= set(job.assignment[d])
    assert s.plan_key(job, d) == (job.job_id, 1, job.epoch) and s.plan_for(d) is job
    # The others keep their steps; their allocations are theirs still (maybe from a shard that
    # just moved, which the joiner is given again from the same cursor: at least once).
    assert {p: frozen(job, p)[0] for p in (a, b, c)} == {p: v[0] for p, v in before.items()}
    assert job.gossip.peers == 3
    step(s, job, d, 400)
    assert job.gossip.step[d] == 2


def test_a_step_that_reads_a_shard_into_its_next_pass_advances_its_cursor_past_both_ranges() -> None:
    # One shard of 10 per member and 7 samples a step: step 2 reads 7..10 of pass 1, then 0..4
    # of pass 2 of the same shard; step 3 must go on from pass 2 position 4.
    s, job, (a, _) = running(2, num_shards=2, rounds=50)
    (sh,) = job.assignment[a]
    step(s, job, a, 10)
    assert job.allocation[a] == [[sh, 1, 7, 10], [sh, 2, 0, 4]]
    step(s, job, a, 20)
    assert job.cursors[sh] == (2, 4)
    assert job.allocation[a] == [[sh, 2, 4, 10], [sh, 3, 0, 1]]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.integers(2, 6))
def test_ledger_holds_across_the_phase_and_the_last_round_when_nobody_fails(seed: int, n: int, rounds: int) -> None:
    s, job, peers = running(n, rounds=rounds, min_peers=n)
    rng = random.Random(seed)
    weights = [rng.random() + 0.1 for _ in peers]  # members run at different speeds
    t = 0
    while job.gossip.active:
        t += 10
        step(s, job, rng.choices(peers, weights)[0], t)
    assert job.committed_round == rounds - 1 and job.gossip.steps == (rounds - 1) * n
    for p in peers:
        s.report(p, job.job_id, job.round, job.epoch, Report(job.allocated(p), 1.0, "z"), t + 10)
    assert job.state == SUCCEEDED
    assert violations(ledger(job), [SHARD] * 6) == []
    hist = job.history
    assert [r.round for r in hist] == list(range(1, rounds + 1))
    assert all(r.samples == sum(stop - start for rs in r.consumed.values() for _, _, start, stop in rs) for r in hist)
    assert sum(r.samples for r in hist) == job.samples == ((rounds - 1) * n + n) * BUDGET
    assert all(r.samples == n * BUDGET for r in hist)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_job_survives_a_store_round_trip_mid_phase_and_the_phase_goes_on(kind: str, tmp_path) -> None:
    s, job, (a, b, c) = running(3, rounds=3)
    for i, p in enumerate([a, a, b, c, b]):  # one virtual round closed, two steps into the next
        step(s, job, p, 100 * (i + 1), acc=0.5, dist=0.25 * (i + 1), sent=10)
    assert job.committed_round == 1 and job.gossip.steps == 5
    store = MemoryStore() if kind == "memory" else SqliteStore(tmp_path / "state")
    store.save([job], list(s.peers.values()), [], [(job.job_id, r) for r in job.history])
    jobs, peers = store.load()
    store.close()
    (loaded,) = jobs
    assert job_to_dict(loaded) == job_to_dict(job)
    assert job_to_dict(job_from_dict(job_to_dict(job), [])) == job_to_dict(job)
    assert loaded.history == job.history
    # A restarted coordinator on the loaded state carries on with the same steps.
    s2 = new_state()
    s2.jobs[loaded.job_id] = loaded
    for p in peers:
        s2.peers[p.peer_id] = p
    assert [s2.plan_key(loaded, p) for p in (a, b, c)] == [s.plan_key(job, p) for p in (a, b, c)]
    with pytest.raises(Stale):
        step(s2, loaded, a, 600, rnd=2)
    while loaded.gossip.active:
        p = min((a, b, c), key=lambda m: loaded.gossip.step[m])
        step(s2, loaded, p, 700)
    assert loaded.committed_round == 2 and loaded.history[-1].round == 2
    for p in (a, b, c):
        s2.report(p, loaded.job_id, 3, loaded.epoch, Report(loaded.allocated(p), 1.0, "f"), 800)
    assert loaded.state == SUCCEEDED
    assert violations(ledger(loaded), [SHARD] * 6) == []


def test_a_member_that_restarts_at_its_address_is_replaced_and_the_new_one_joins_at_once() -> None:
    s, job, (a, b, c) = running(3)
    step(s, job, c, 10)
    shards_c = list(job.assignment[c])
    d, ch = s.register(s.peers[c].address, {}, 20)
    assert ch.removed_peers == (c,) and c not in s.peers
    assert job.evictions == [Eviction(c, REPLACED, "", 20, 1, 1, f"a new peer registered at {s.peers[d].address}")]
    # Evicted (a new epoch without c), then the new registration admitted at once (another).
    assert [(e.epoch, e.peers) for e in job.epochs] == [(1, [a, b, c]), (2, [a, b]), (3, [a, b, d])]
    assert job.gossip.step[d] == 1 and c not in job.gossip.step and job.assignment[d]
    assert sorted(sum(job.assignment.values(), [])) == list(range(6)) and set(shards_c) <= set(
        job.assignment[a] + job.assignment[b] + job.assignment[d])
