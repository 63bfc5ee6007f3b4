"""The coordinator's round state machine, driven by hand with a fake clock (``now_ms`` integers)."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml.common.spec import JobSpec
from dml.coordinator.records import (
    CANCELLED,
    FAILED,
    FINISHED,
    Forbidden,
    HEARTBEAT_TIMEOUT,
    MAX_JOB_EVENTS,
    PENDING,
    REPLACED,
    ROUND_DEADLINE,
    RUNNING,
    SELF_REPORT,
    SUCCEEDED,
    UNREACHABLE,
    BadReport,
    Changes,
    Eviction,
    Exclusion,
    Job,
    MembershipEpoch,
    NotFound,
    Report,
    Stale,
)
from dml.coordinator.state import MAX_DIGEST_MISMATCHES, ClusterState

TIMEOUT_MS = 1_000


def new_state(timeout_ms: int = TIMEOUT_MS) -> ClusterState:
    return ClusterState(timeout_ms)


def spec(**kw: object) -> JobSpec:
    # One step of 10 samples: with shards of 10, each member is allocated exactly one shard a round.
    base = dict(rounds=5, min_peers=2, num_shards=6, checkpoint_every_rounds=2, local_steps=1, batch_size=10)
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def submit(st_: ClusterState, job_spec: JobSpec, now: int) -> tuple[str, Changes]:
    """Submits a job whose shards hold 10 samples each."""
    return st_.submit(job_spec, [10] * job_spec.num_shards, now)


def rep(digest: str = "d", samples: int = 10, loss: float = 1.0, acc: float | None = None) -> Report:
    return Report(samples=samples, train_loss=loss, digest=digest, test_accuracy=acc,
                  test_loss=None if acc is None else 0.5)


PORTS = itertools.count(5000)  # every registration at an address of its own unless a test says otherwise


def register(st_: ClusterState, n: int, now: int = 0) -> list[str]:
    return [st_.register(f"10.0.0.1:{next(PORTS)}", {"device": "cpu"}, now)[0] for _ in range(n)]


def report_all(st_: ClusterState, job: Job, now: int, digests: list[str] | None = None) -> Changes:
    """Every member reports the current round; returns the last call's changes."""
    members = list(job.members)
    digests = digests or ["d"] * len(members)
    rnd, epoch = job.round, job.epoch
    ch = Changes()
    for m, d in zip(members, digests):
        ch = st_.report(m, job.job_id, rnd, epoch, rep(d, samples=job.allocated(m)), now)
    return ch


def shards_of(job: Job) -> list[int]:
    return sorted(s for v in job.assignment.values() for s in v)


def running(n_peers: int = 2, **kw: object) -> tuple[ClusterState, Job, list[str]]:
    """A job running on ``n_peers`` peers (registered first, so the job takes them all)."""
    s = new_state()
    peers = register(s, n_peers)
    jid, _ = submit(s, spec(**kw), 0)
    job = s.job(jid)
    assert job.state == RUNNING and job.members == peers and job.epoch == 1
    return s, job, peers


# -- starting ---------------------------------------------------------------------------------


def test_job_waits_for_min_peers_then_runs_epoch_one() -> None:
    s = new_state()
    jid, ch = submit(s, spec(min_peers=3), 0)
    assert jid in ch.jobs
    job = s.job(jid)
    assert job.state == PENDING
    assert "waiting for peers" in job.reason and "3 needed" in job.reason
    a, b = register(s, 2, now=10)
    assert job.state == PENDING and job.epoch == 0
    assert "2 idle" in job.reason
    assert s.plan_for(a) is None
    c, ch = s.register("10.0.0.9:1", {}, 20)
    assert jid in ch.jobs and set(ch.peers) >= {a, b, c}
    assert job.state == RUNNING
    assert job.epoch == 1 and job.round == 1 and job.committed_round == 0
    assert job.members == [a, b, c], "registration order"
    assert job.reason == ""
    assert shards_of(job) == list(range(6))
    assert set(job.assignment) == {a, b, c}
    for p in (a, b, c):
        assert s.plan_for(p) is job
        assert s.peers[p].job_id == jid
        assert s.heartbeat(p, 30) == (jid, 1)


def test_submit_fixes_the_shard_sizes_on_the_job() -> None:
    s = new_state()
    sizes = [7, 7, 6, 6, 6, 6]
    jid, _ = s.submit(spec(), sizes, 0)
    sizes[0] = 99  # the caller's list is not kept
    assert s.job(jid).shard_sizes == [7, 7, 6, 6, 6, 6]
    with pytest.raises(ValueError, match="5 shard sizes for a job of 6 shards"):
        s.submit(spec(), [7] * 5, 1)
    assert list(s.jobs) == [jid]


def test_job_takes_at_most_num_shards_peers() -> None:
    s = new_state()
    jid, _ = submit(s, spec(min_peers=1, num_shards=2), 0)
    peers = register(s, 3)
    job = s.job(jid)
    assert job.members == peers[:1]
    # min_peers=1 starts the job at the first registration; the others join at a boundary.
    report_all(s, job, 5)
    assert len(job.members) == 2
    assert s.peers[peers[2]].job_id == ""
    assert s.live_idle() == [peers[2]]


# -- committing -------------------------------------------------------------------------------


def test_round_commits_only_when_every_member_reported_the_same_digest() -> None:
    s, job, peers = running(3)
    a, b, c = peers
    job.round_started_ms = 100
    # Uneven allocations (as at the end of a data epoch) so the loss must be sample-weighted.
    job.allocation = {a: [[0, 1, 0, 10]], b: [[1, 1, 0, 10], [2, 1, 0, 10], [3, 1, 0, 10]],
                      c: [[4, 1, 0, 10], [5, 1, 0, 10]]}
    with pytest.raises(BadReport):
        s.report(a, job.job_id, 1, 1, rep("d", samples=11), 120)
    assert s.report(a, job.job_id, 1, 1, rep("d", samples=10, loss=1.0), 150).committed == ()
    assert s.report(b, job.job_id, 1, 1, rep("d", samples=30, loss=2.0, acc=0.9), 160).committed == ()
    assert job.committed_round == 0 and set(job.reports) == {a, b}
    ch = s.report(c, job.job_id, 1, 1, rep("d", samples=20, loss=4.0), 400)
    assert ch.committed == ((job.job_id, 1),)
    assert job.committed_round == 1 and job.round == 2 and job.epoch == 1
    assert job.reports == {}
    (rec,) = job.history
    assert (rec.round, rec.epoch, rec.samples, rec.digest) == (1, 1, 60, "d")
    assert rec.train_loss == pytest.approx((10 * 1.0 + 30 * 2.0 + 20 * 4.0) / 60)
    assert rec.test_accuracy == 0.9 and rec.test_loss == 0.5
    assert rec.duration_ms == 300 and rec.committed_ms == 400
    assert rec.members == [a, b, c]
    assert job.samples == 60


def test_digest_mismatch_reruns_the_round_under_a_new_epoch_then_fails() -> None:
    s, job, peers = running(3)
    for i in range(1, MAX_DIGEST_MISMATCHES):
        ch = report_all(s, job, 10 * i, ["x", "x", "y"])
        assert ch.committed == ()
        assert job.state == RUNNING
        assert job.round == 1, "the same round is re-run"
        assert job.epoch == 1 + i
        assert job.reports == {} and job.mismatches == i
    ch = report_all(s, job, 100, ["x", "y", "z"])
    assert job.state == FAILED
    assert "digest" in job.reason
    assert job.committed_round == 0 and job.history == []
    assert job.job_id in ch.jobs
    assert job.members == []
    for p in peers:
        assert s.peers[p].job_id == "" and s.plan_for(p) is None


def test_a_commit_resets_the_mismatch_count() -> None:
    s, job, _ = running(2)
    report_all(s, job, 1, ["x", "y"])
    report_all(s, job, 2, ["x", "y"])
    assert job.mismatches == 2
    report_all(s, job, 3)
    assert job.committed_round == 1 and job.mismatches == 0
    report_all(s, job, 4, ["x", "y"])
    report_all(s, job, 5, ["x", "y"])
    assert job.state == RUNNING and job.mismatches == 2


def test_stale_round_or_epoch_is_rejected() -> None:
    s, job, (a, b) = running(2)
    with pytest.raises(Stale):
        s.report(a, job.job_id, 2, 1, rep(), 1)  # future round
    with pytest.raises(Stale):
        s.report(a, job.job_id, 1, 0, rep(), 1)  # old epoch
    report_all(s, job, 2, ["x", "y"])  # mismatch: epoch 2
    with pytest.raises(Stale):
        s.report(a, job.job_id, 1, 1, rep(), 3)
    report_all(s, job, 4)  # commits round 1 in epoch 2
    with pytest.raises(Stale):
        s.report(a, job.job_id, 1, 2, rep(), 5)  # the committed round
    assert job.reports == {}
    s.report(a, job.job_id, 2, 2, rep(), 6)  # the current one is fine
    assert set(job.reports) == {a}


def test_report_from_non_member_is_forbidden_and_unknowns_are_not_found() -> None:
    s, job, (a, b) = running(2, num_shards=2)
    (c,) = register(s, 1, now=1)  # idle: the job has no room
    with pytest.raises(Forbidden):
        s.report(c, job.job_id, 1, 1, rep(), 2)
    with pytest.raises(NotFound):
        s.report("peer-nobody", job.job_id, 1, 1, rep(), 2)
    with pytest.raises(NotFound):
        s.report(a, "job-nope", 1, 1, rep(), 2)
    with pytest.raises(NotFound):
        s.heartbeat("peer-nobody", 2)
    with pytest.raises(NotFound):
        s.plan_for("peer-nobody")
    with pytest.raises(NotFound):
        s.job("job-nope")
    with pytest.raises(NotFound):
        s.cancel("job-nope", 2)
    with pytest.raises(NotFound):
        s.checkpoint_uploaded("peer-nobody", job.job_id, 1, job.epoch, "d", 2)


# -- leases -----------------------------------------------------------------------------------


def test_heartbeat_keeps_a_peer_alive_and_expire_evicts_a_silent_one() -> None:
    s, job, (a, b, c) = running(3, min_peers=2)
    report_all(s, job, 100)  # round 1 committed
    before = {p: list(v) for p, v in job.assignment.items()}
    epoch = job.epoch
    s.report(a, job.job_id, 2, epoch, rep(), 200)  # round 2 under way
    for t in (500, 1000, 1500):
        assert s.heartbeat(a, t)[1] == epoch
        assert s.heartbeat(b, t)[1] == epoch
    # c was last seen at 100 (its report): silent for exactly the timeout, the lease still holds.
    assert s.expire(1100) == Changes()
    assert c in s.peers
    ch = s.expire(1101)
    assert ch.removed_peers == (c,)
    assert job.job_id in ch.jobs
    assert c not in s.peers and a in s.peers and b in s.peers
    with pytest.raises(NotFound):
        s.heartbeat(c, 1600)
    assert job.epoch == epoch + 1
    assert job.round == 2, "the interrupted round is re-issued, not skipped"
    assert job.reports == {}, "reports of the cancelled attempt are dropped"
    assert job.members == [a, b]
    assert job.round_started_ms == 1101
    assert set(job.assignment) == {a, b}
    assert shards_of(job) == list(range(6))
    for p in (a, b):
        assert set(before[p]) <= set(job.assignment[p]), f"survivor {p} lost a shard"
    moved = set(job.assignment[a]) - set(before[a]) | set(job.assignment[b]) - set(before[b])
    assert moved == set(before[c]), "only the departed peer's shards move"
    with pytest.raises(Stale):
        s.report(a, job.job_id, 2, epoch, rep(), 1600)
    report_all(s, job, 1700)
    assert job.committed_round == 2 and job.history[-1].members == [a, b]


def test_expire_evicts_idle_peers_too() -> None:
    s = new_state()
    (a,) = register(s, 1, now=0)
    ch = s.expire(TIMEOUT_MS + 1)
    assert ch.removed_peers == (a,) and s.peers == {}


def test_below_min_peers_the_job_waits_then_resumes_when_a_peer_registers() -> None:
    s, job, (a, b) = running(2, min_peers=2)
    report_all(s, job, 100)
    s.heartbeat(a, 1500)
    s.expire(1500)
    assert job.members == [a]
    assert job.state == RUNNING
    assert s.plan_for(a) is None
    assert "waiting" in job.reason and "2 needed" in job.reason
    assert not s.active(job)
    waiting_epoch = job.epoch
    (c,) = register(s, 1, now=1600)
    assert job.members == [a, c]
    assert job.epoch == waiting_epoch + 1
    assert job.round == 2
    assert job.reason == ""
    assert s.plan_for(a) is job and s.plan_for(c) is job
    assert shards_of(job) == list(range(6)) and job.assignment[c]
    report_all(s, job, 1700)
    assert job.committed_round == 2


def test_job_that_lost_every_holder_rolls_back_to_its_checkpoint() -> None:
    """Nobody alive holds round 1 and there is no checkpoint of it: fresh peers restart from the
    last checkpoint (here the seeded initial model), the lost round is counted, the ledger rewound."""
    s, job, (a, b) = running(2, min_peers=1)
    report_all(s, job, 10)
    assert job.holders == [a, b] and job.cursors
    s.expire(5000)
    assert job.state == RUNNING and job.members == [] and job.assignment == {}
    assert "waiting" in job.reason
    (c,) = register(s, 1, now=5001)
    assert job.members == [c] and job.round == 1 and job.committed_round == 0
    assert job.rolled_back_rounds == 1 and job.history == [] and job.samples == 0 and job.cursors == {}
    assert job.start_digest == ""
    assert job.assignment == {c: list(range(6))}
    assert s.plan_for(c) is job


def test_job_that_lost_every_holder_resumes_from_a_checkpoint_of_the_committed_round() -> None:
    s, job, (a, b) = running(2, min_peers=1, checkpoint_every_rounds=1)
    s.checkpoint_uploaded(a, job.job_id, 1, job.epoch, "d", 5)
    report_all(s, job, 10)
    assert job.checkpoint_round == 1
    s.expire(5000)
    (c,) = register(s, 1, now=5001)
    assert job.round == 2 and job.rolled_back_rounds == 0
    assert job.start_digest == "d", "the joiner fetches round 1 from the coordinator's checkpoint"


def test_a_peer_registering_mid_round_joins_at_the_next_boundary() -> None:
    s, job, (a, b) = running(2)
    epoch = job.epoch
    s.report(a, job.job_id, 1, epoch, rep(), 10)
    (c,) = register(s, 1, now=20)
    assert job.members == [a, b] and job.epoch == epoch, "no change mid-round"
    assert s.peers[c].job_id == ""
    assert s.plan_for(c) is None
    ch = s.report(b, job.job_id, 1, epoch, rep(), 30)  # the in-flight round still commits
    assert ch.committed == ((job.job_id, 1),)
    assert job.members == [a, b, c]
    assert job.epoch == epoch + 1 and job.round == 2
    assert c in ch.peers
    assert s.peers[c].job_id == job.job_id
    assert s.plan_for(c) is job
    assert shards_of(job) == list(range(6)) and len(job.assignment[c]) == 2


def test_job_succeeds_after_its_rounds_and_frees_its_peers() -> None:
    s, job, peers = running(2, rounds=3)
    nxt, _ = submit(s, spec(min_peers=2), 5)
    assert s.job(nxt).state == PENDING
    for r in range(1, 4):
        assert job.round == r
        ch = report_all(s, job, 10 * r)
        assert (job.job_id, r) in ch.committed
    assert job.state == SUCCEEDED and job.committed_round == 3
    assert [h.round for h in job.history] == [1, 2, 3]
    assert job.members == []
    assert job.reason == "3 rounds committed"
    with pytest.raises(Stale):
        s.report(peers[0], job.job_id, 4, job.epoch, rep(), 40)
    # The freed peers went straight to the next job.
    assert s.job(nxt).state == RUNNING and s.job(nxt).members == peers
    assert all(s.plan_for(p) is s.job(nxt) for p in peers)


def test_cancel_frees_peers_and_is_a_no_op_once_finished() -> None:
    s, job, (a, b) = running(2)
    ch = s.cancel(job.job_id, 50)
    assert job.state == CANCELLED and job.reason == "cancelled by user" and job.updated_ms == 50
    assert set(ch.peers) >= {a, b} and job.job_id in ch.jobs
    assert s.live_idle() == [a, b]
    with pytest.raises(Stale):
        s.report(a, job.job_id, 1, 1, rep(), 60)
    snapshot = dataclasses.replace(job)
    assert s.cancel(job.job_id, 70) == Changes()
    assert job == snapshot and job.updated_ms == 50

    done, _, _ = running(2, rounds=1)
    finished = next(iter(done.jobs.values()))
    report_all(done, finished, 1)
    assert finished.state == SUCCEEDED
    assert done.cancel(finished.job_id, 2) == Changes()
    assert finished.state == SUCCEEDED


def test_cancel_pending_job() -> None:
    s = new_state()
    jid, _ = submit(s, spec(min_peers=2), 0)
    s.cancel(jid, 1)
    assert s.job(jid).state == CANCELLED
    register(s, 2, now=2)
    assert s.job(jid).state == CANCELLED, "a cancelled job never starts"
    assert len(s.live_idle()) == 2


def test_one_report_re_forms_the_ring_and_a_second_reporter_holds_the_suspect_out() -> None:
    s, job, (a, b, c) = running(3)
    before = {p: list(v) for p, v in job.assignment.items()}
    # a cannot reach b: one report says nothing of who is broken; the ring is re-formed so that
    # a no longer sends to b, and nobody is evicted.
    ch = s.report_failure(a, job.job_id, 1, 1, b, 900, "cannot reach b")
    assert ch.removed_peers == () and job.job_id in ch.jobs
    assert job.members == [a, c, b] and job.epoch == 2 and job.round == 1
    assert job.evictions == [] and job.held_out == []
    assert s.peers[a].last_seen_ms == 900
    # c, b's predecessor now, cannot reach it either: nobody can. b is held out of the job (not
    # forgotten: it stays registered, and its heartbeats say why).
    ch = s.report_failure(c, job.job_id, 1, 2, b, 910, "cannot reach b")
    assert ch.removed_peers == () and b in s.peers and b in ch.peers
    assert job.members == [a, c] and job.epoch == 3 and job.round == 1
    assert job.evictions == [Eviction(b, UNREACHABLE, "", 910, 2, 1, f"unreachable: {a}, {c} could not reach it")]
    assert job.held_out == [Exclusion(b, 1, f"unreachable: {a}, {c} could not reach it", 910, [a, c], 120_910)]
    assert s.held_out_reason(b) == f"held out of job {job.job_id}: unreachable: {a}, {c} could not reach it"
    assert s.held_out_reason(a) == ""
    for p in (a, c):
        assert set(before[p]) <= set(job.assignment[p])
    assert shards_of(job) == list(range(6))
    assert job.broken_links == [], "links of a peer no longer in the ring are forgotten"
    # It is not admitted again at a round boundary, nor is a report of it acted on.
    s.heartbeat(b, 915)
    report_all(s, job, 920)
    assert job.committed_round == 1 and job.members == [a, c] and s.peers[b].job_id == ""
    assert s.report_failure(b, job.job_id, 2, 3, a, 921) == Changes()
    assert job.members == [a, c]


def test_report_failure_for_a_stale_round_or_epoch_is_ignored() -> None:
    s, job, (a, b, c) = running(3)
    assert s.report_failure(a, job.job_id, 1, 0, b, 10) == Changes()
    assert s.report_failure(a, job.job_id, 2, 1, b, 11) == Changes()
    assert s.report_failure(a, "job-nope", 1, 1, b, 12) == Changes()
    assert b in s.peers and job.epoch == 1 and job.broken_links == []
    s.report_failure(a, job.job_id, 1, 1, b, 13)  # re-forms the ring around a -> b: epoch 2
    # c's report of the same broken exchange arrives late, naming a: it must count for nothing.
    assert s.report_failure(c, job.job_id, 1, 1, a, 14) == Changes()
    assert a in s.peers and job.members == [a, c, b] and job.epoch == 2
    assert [(lk.reporter, lk.suspect) for lk in job.broken_links] == [(a, b)]


def test_report_failure_without_a_suspect_reissues_the_round() -> None:
    s, job, (a, b, c) = running(3)
    s.report(a, job.job_id, 1, 1, rep(), 5)
    ch = s.report_failure(a, job.job_id, 1, 1, "", 10)
    assert job.job_id in ch.jobs and ch.removed_peers == ()
    assert job.epoch == 2 and job.round == 1 and job.reports == {}
    assert job.members == [a, b, c]
    # A peer already gone evicts nobody; naming itself, a peer gives up its place (local failure).
    assert s.report_failure(a, job.job_id, 1, 2, "peer-gone", 11).removed_peers == ()
    assert set(s.peers) == {a, b, c}
    assert s.report_failure(a, job.job_id, 1, 2, a, 12).removed_peers == (a,)
    assert job.members == [b, c] and job.epoch == 3


# -- evictions and epochs, as JobStatus shows them ---------------------------------------------


def test_a_heartbeat_timeout_is_recorded_with_the_epoch_it_ended_and_the_round_under_way() -> None:
    s, job, (a, b, c) = running(3)
    report_all(s, job, 100)  # round 1 committed in epoch 1; round 2 under way
    for p in (a, b):
        s.heartbeat(p, 1100)
    s.expire(1101)  # c silent since 100
    assert job.evictions == [Eviction(c, HEARTBEAT_TIMEOUT, "", 1101, 1, 2, "no heartbeat for 1001 ms")]
    assert job.evictions_total == 1
    assert job.epochs == [MembershipEpoch(1, [a, b, c], 0, 1), MembershipEpoch(2, [a, b], 1101, 2)]
    assert job.epochs[-1].epoch == job.epoch and job.epochs[-1].peers == job.members


def test_neighbour_and_self_reports_are_recorded_with_their_reporter_and_detail() -> None:
    s, job, (a, b, c, d) = running(4)
    s.report_failure(a, job.job_id, 1, 1, b, 900, "stream to b broke")  # ring re-formed: a -> c -> b -> d
    s.report_failure(c, job.job_id, 1, 2, b, 905, "cannot reach b")  # a second reporter: b held out
    s.report_failure(c, job.job_id, 1, 3, c, 950, "CUDA out of memory")
    why = f"unreachable: {a}, {c} could not reach it"
    assert job.evictions == [Eviction(b, UNREACHABLE, "", 905, 2, 1, why),
                             Eviction(c, SELF_REPORT, "", 950, 3, 1, "CUDA out of memory")]
    assert [lk.detail for lk in job.broken_links] == []
    assert [(e.epoch, e.peers, e.round) for e in job.epochs] == [
        (1, [a, b, c, d], 1), (2, [a, c, b, d], 1), (3, [a, c, d], 1), (4, [a, d], 1)]
    # Stale or suspect-less reports evict nobody; a re-issued round is an epoch of its own.
    s.report_failure(a, job.job_id, 1, 1, d, 960)
    s.report_failure(a, job.job_id, 1, 4, "", 970)
    assert len(job.evictions) == job.evictions_total == 2
    assert job.epochs[-1] == MembershipEpoch(5, [a, d], 970, 1)


def test_members_that_missed_the_round_deadline_are_recorded_as_such() -> None:
    s, job, (a, b, c) = running(3)
    report_all(s, job, 10)
    s.report(a, job.job_id, 2, 1, rep(), 20)
    for p in (a, b, c):
        s.heartbeat(p, 120_010)
    s.expire(120_011)  # round 2 started at 10: past the default deadline of 120 s
    why = "had not reported round 2 when its deadline of 120000 ms passed"
    assert job.evictions == [Eviction(b, ROUND_DEADLINE, "", 120_011, 1, 2, why),
                             Eviction(c, ROUND_DEADLINE, "", 120_011, 2, 2, why)]
    assert job.members == [a] and job.epochs[-1] == MembershipEpoch(3, [a], 120_011, 2)


def test_only_members_evictions_are_recorded_and_a_cancel_is_none() -> None:
    s, job, peers = running(2, num_shards=2)
    (idle,) = register(s, 1, now=5)
    s.heartbeat(peers[0], 900)
    s.heartbeat(peers[1], 900)
    s.expire(1006)  # the idle peer is evicted: it was nobody's member
    assert idle not in s.peers and job.evictions == [] and job.evictions_total == 0
    s.cancel(job.job_id, 1010)
    assert job.evictions == [] and len(job.epochs) == 1


def test_a_job_keeps_its_most_recent_evictions_and_epochs_and_counts_them_all() -> None:
    s = new_state()
    jid, _ = submit(s, spec(min_peers=1, num_shards=1, rounds=10), 0)
    job = s.job(jid)
    gone = []
    for i in range(MAX_JOB_EVENTS + 44):
        (p,) = register(s, 1, now=i)  # joins the waiting job
        s.report_failure(p, jid, job.round, job.epoch, p, i)  # and gives up its place
        gone.append(p)
    assert job.evictions_total == MAX_JOB_EVENTS + 44
    assert [e.peer_id for e in job.evictions] == gone[-MAX_JOB_EVENTS:]
    assert len(job.epochs) == MAX_JOB_EVENTS and job.epochs[-1].epoch == job.epoch == 2 * (MAX_JOB_EVENTS + 44)


def test_a_peer_registering_at_a_members_address_replaces_it_and_takes_its_place_at_the_boundary() -> None:
    s, job, (a, b, c) = running(3)
    before = {p: list(v) for p, v in job.assignment.items()}
    s.report(a, job.job_id, 1, 1, rep(), 5)
    addr = s.peers[c].address
    d, ch = s.register(addr, {"device": "cpu"}, 10)
    assert c in ch.removed_peers and d in ch.peers and job.job_id in ch.jobs
    assert c not in s.peers and s.peers[d].address == addr
    with pytest.raises(NotFound):
        s.heartbeat(c, 11)
    assert job.evictions == [Eviction(c, REPLACED, "", 10, 1, 1, f"a new peer registered at {addr}")]
    assert job.members == [a, b] and job.epoch == 2 and job.round == 1 and job.reports == {}
    for p in (a, b):
        assert set(before[p]) <= set(job.assignment[p]), "only the replaced peer's shards move"
    assert s.peers[d].job_id == "", "the new registration joins at the next boundary, like any peer"
    report_all(s, job, 20)
    assert job.members == [a, b, d] and s.plan_for(d) is job


def test_a_peer_registering_at_an_idle_peers_address_replaces_it() -> None:
    s, job, _ = running(2, num_shards=2)
    (idle,) = register(s, 1, now=5)
    new, ch = s.register(s.peers[idle].address, {}, 6)
    assert ch.removed_peers == (idle,) and set(s.peers) == set(job.members) | {new}
    assert s.live_idle() == [new] and job.evictions == [] and job.epoch == 1


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_counts_only_when_its_round_commits_with_the_same_digest() -> None:
    s, job, (a, b) = running(2, rounds=6, checkpoint_every_rounds=2)
    assert [r for r in range(1, 7) if job.wants_checkpoint(r)] == [2, 4, 6]
    report_all(s, job, 1)  # round 1
    with pytest.raises(Stale):
        s.checkpoint_uploaded(a, job.job_id, 3, job.epoch, "d", 2)
    s.checkpoint_uploaded(a, job.job_id, 2, job.epoch, "d", 2)
    assert job.pending_checkpoint == (2, "d")
    assert job.checkpoint_round == 0, "not before the round commits"
    report_all(s, job, 3)  # round 2 commits with digest d
    assert (job.checkpoint_round, job.checkpoint_digest) == (2, "d")
    assert job.pending_checkpoint is None

    report_all(s, job, 4)  # round 3
    s.checkpoint_uploaded(a, job.job_id, 4, job.epoch, "other", 5)
    report_all(s, job, 6)  # round 4 commits with digest d, not the uploaded one
    assert job.committed_round == 4
    assert (job.checkpoint_round, job.checkpoint_digest) == (2, "d")

    report_all(s, job, 7)  # round 5
    s.checkpoint_uploaded(a, job.job_id, 6, job.epoch, "d", 8)
    report_all(s, job, 9, ["d", "e"])  # mismatch drops the pending checkpoint
    assert job.pending_checkpoint is None
    report_all(s, job, 10)  # round 6 commits, but its checkpoint must be re-uploaded
    assert job.state == SUCCEEDED
    assert job.checkpoint_round == 2
    # A late upload for a finished job is refused and changes nothing.
    with pytest.raises(Stale):
        s.checkpoint_uploaded(a, job.job_id, 6, job.epoch, "d", 11)
    assert job.checkpoint_round == 2


def test_membership_change_drops_the_pending_checkpoint() -> None:
    s, job, (a, b, c) = running(3, checkpoint_every_rounds=1)
    s.checkpoint_uploaded(a, job.job_id, 1, job.epoch, "d", 1)
    s.report_failure(a, job.job_id, 1, 1, c, 2)
    assert job.pending_checkpoint is None
    report_all(s, job, 3)
    assert job.committed_round == 1 and job.checkpoint_round == 0


# -- Changes ----------------------------------------------------------------------------------


def test_changes_union_dedupes_but_keeps_every_commit() -> None:
    x = Changes(jobs=("j1",), peers=("p1", "p2"), committed=(("j1", 1),))
    y = Changes(jobs=("j1", "j2"), peers=("p2",), removed_peers=("p3",), committed=(("j1", 2),))
    z = x | y
    assert z.jobs == ("j1", "j2") and z.peers == ("p1", "p2") and z.removed_peers == ("p3",)
    assert z.committed == (("j1", 1), ("j1", 2))
    assert (Changes() | Changes()) == Changes()


# -- invariants under random operation sequences ----------------------------------------------

# Weighted by repetition: commits and registrations are common, cancels rare.
OP_NAMES = ["register"] * 3 + ["advance"] * 2 + ["heartbeat"] * 3 + ["expire"] * 2 + ["commit"] * 6 + \
    ["mismatch", "fail", "submit", "cancel", "reregister"]
OPS = st.lists(st.tuples(st.sampled_from(OP_NAMES), st.integers(0, 1000)), max_size=80)


def check_invariants(s: ClusterState, last: dict[str, tuple[int, int]]) -> None:
    owner: dict[str, str] = {}
    for job in s.jobs.values():
        prev_epoch, prev_round = last.get(job.job_id, (0, 0))
        # Committed rounds only go back by an explicit, counted rollback to the checkpoint.
        progress = job.committed_round + job.rolled_back_rounds
        assert job.epoch >= prev_epoch and progress >= prev_round
        if job.rolled_back_rounds:
            assert job.committed_round >= job.checkpoint_round
        last[job.job_id] = (job.epoch, progress)
        assert [h.round for h in job.history] == list(range(1, job.committed_round + 1))
        if job.state in FINISHED or job.state == PENDING:
            assert job.members == []
            continue
        assert job.state == RUNNING and job.epoch >= 1
        assert len(set(job.members)) == len(job.members) <= job.spec.num_shards
        assert set(job.reports) <= set(job.members)
        if job.members:
            assert set(job.assignment) == set(job.members)
            assert shards_of(job) == list(range(job.spec.num_shards))
        for m in job.members:
            assert m in s.peers, f"member {m} of {job.job_id} is not registered"
            assert s.peers[m].job_id == job.job_id
            assert m not in owner
            owner[m] = job.job_id
        assert s.active(job) == (len(job.members) >= job.spec.min_peers)
        # JobStatus's membership history: the last epoch recorded is the ring now.
        assert job.epochs[-1].epoch == job.epoch and job.epochs[-1].peers == job.members
    for job in s.jobs.values():
        assert len(job.evictions) == min(job.evictions_total, MAX_JOB_EVENTS)
        assert [e.epoch for e in job.epochs] == list(range(job.epoch - len(job.epochs) + 1, job.epoch + 1))
        assert all(e.epoch < job.epoch for e in job.evictions), "an eviction ends its epoch"
    for pid, p in s.peers.items():
        assert (p.job_id != "") == (pid in owner), f"peer {pid} job_id {p.job_id!r}"
    assert len({p.address for p in s.peers.values()}) == len(s.peers), "one registration per address"


@settings(max_examples=300, deadline=None, database=None)
@given(ops=OPS)
def test_state_machine_invariants_hold_under_random_operations(ops: list[tuple[str, int]]) -> None:
    s = new_state()
    now = 0
    last: dict[str, tuple[int, int]] = {}
    register(s, 3, now)
    submit(s, spec(min_peers=2, num_shards=4, rounds=4), now)
    for op, arg in ops:
        peers = sorted(s.peers)
        jobs = sorted(s.jobs)
        if op == "register":
            s.register(f"h:{next(PORTS)}", {}, now)
        elif op == "reregister" and peers:  # a peer restarts at its address
            s.register(s.peers[peers[arg % len(peers)]].address, {}, now)
        elif op == "advance":
            now += arg % 900 + 1
        elif op == "heartbeat":
            for p in peers[: arg % (len(peers) + 1)]:
                s.heartbeat(p, now)
        elif op == "expire":
            s.expire(now)
        elif op in ("commit", "mismatch") and jobs:
            job = s.jobs[jobs[arg % len(jobs)]]
            if s.active(job):
                digests = ["d"] * len(job.members)
                if op == "mismatch" and len(digests) > 1:
                    digests[-1] = "e"
                rnd, epoch = job.round, job.epoch
                ch = report_all(s, job, now, digests)
                if len(set(digests)) == 1:
                    assert ch.committed == ((job.job_id, rnd),) and job.committed_round == rnd
                else:
                    assert ch.committed == () and job.committed_round == rnd - 1
                    assert job.state == FAILED or (job.epoch == epoch + 1 and job.round == rnd)
        elif op == "fail" and len(peers) >= 2:
            reporter = peers[arg % len(peers)]
            job = s.jobs.get(s.peers[reporter].job_id)
            suspect = "" if arg % 5 == 0 else peers[(arg // 7) % len(peers)]
            if job is not None:
                outsider = (suspect and suspect != reporter and suspect in s.peers and suspect not in job.members
                            and job.state == RUNNING and not job.gossip.active)
                if outsider:  # a member may not evict a peer outside its epoch
                    with pytest.raises(Forbidden):
                        s.report_failure(reporter, job.job_id, job.round, job.epoch, suspect, now)
                else:
                    s.report_failure(reporter, job.job_id, job.round, job.epoch, suspect, now)
        elif op == "submit":
            submit(s, spec(min_peers=arg % 3 + 1, num_shards=4, rounds=3), now)
        elif op == "cancel" and jobs:
            s.cancel(jobs[arg % len(jobs)], now)
        check_invariants(s, last)


def test_rounds_without_evaluation_carry_the_last_test_metrics_forward() -> None:
    s, job, peers = running(2, rounds=4)
    for rnd, acc in ((1, 0.5), (2, None), (3, 0.75)):
        for i, m in enumerate(job.members):
            r = rep(samples=job.allocated(m), acc=acc if i == 0 else None)
            r.train_ms, r.exchange_ms, r.eval_ms = 10 * (i + 1), 5 * (i + 1), 7 if acc is not None and i == 0 else 0
            s.report(m, job.job_id, rnd, job.epoch, r, rnd * 100)
    h = job.history
    assert [r.test_evaluated for r in h] == [True, False, True]
    assert [r.test_accuracy for r in h] == [0.5, 0.5, 0.75]
    assert [r.eval_ms for r in h] == [7, 0, 7]
    assert h[0].train_ms == 20 and h[0].exchange_ms == 10, "the slowest member's times"


def test_restore_starts_every_timer_afresh_and_keeps_wall_times() -> None:
    """Stored timers are another process's monotonic times: restore() counts every lease,
    deadline, grace period and hold-out wait from its own now; the wall-clock stamps people
    read stay as stored."""
    from dml.coordinator.records import Changes, Exclusion, Job, PeerRecord
    from dml.coordinator.state import HOLD_OUT_RETRY_MS, MAX_HOLD_OUT_RETRY_MS

    spec = JobSpec(task="digits", num_shards=4, min_peers=2, rounds=5)
    job = Job("job-1", spec, created_ms=1_700_000_000_000, state="RUNNING", members=["a", "b"],
              round_started_ms=9_000_000, waiting_since_ms=8_000_000, updated_ms=1_700_000_000_500)
    job.gossip.issued_ms = {"a": 9_000_001}
    job.held_out = [Exclusion("x", 1, "unreachable", 1_700_000_000_100, [], 9_100_000),
                    Exclusion("x", 2, "unreachable", 1_700_000_000_200, [], 9_200_000),
                    Exclusion("y", 2, "unreachable", 1_700_000_000_300, [], 9_300_000)]
    done = Job("job-0", spec, created_ms=1_600_000_000_000, state="SUCCEEDED", round_started_ms=123)
    peers = [PeerRecord("a", "h:1", {}, 1_700_000_000_000, 9_000_000, "job-1"),
             PeerRecord("b", "h:2", {}, 1_700_000_000_000, 9_000_000, "job-1"),
             PeerRecord("z", "h:3", {}, 1_700_000_000_000, 9_000_000, "job-0")]
    s = ClusterState(peer_timeout_ms=2000)
    s.restore([job, done], peers, 5_000)  # after a reboot the monotonic clock starts low
    assert (job.round_started_ms, job.waiting_since_ms, job.gossip.issued_ms) == (5_000, 5_000, {"a": 7_000})
    assert [x.retry_ms for x in job.held_out] == [5_000 + HOLD_OUT_RETRY_MS, 5_000 + min(2 * HOLD_OUT_RETRY_MS, MAX_HOLD_OUT_RETRY_MS),
                                                  5_000 + HOLD_OUT_RETRY_MS]
    assert {p.peer_id: (p.last_seen_ms, p.job_id) for p in s.peers.values()} == {
        "a": (7_000, "job-1"), "b": (7_000, "job-1"), "z": (7_000, "")}
    assert (job.created_ms, job.updated_ms, done.round_started_ms) == (1_700_000_000_000, 1_700_000_000_500, 123)
    assert s.expire(5_000 + 2_000) == Changes()  # nobody evicted, nothing failed


def test_a_member_that_joined_and_reported_holds_the_committed_round_when_the_last_holder_leaves() -> None:
    """The job of the brief's bug: b joins at round 2's boundary (fetching round 2 from a, the
    one recorded holder) and reports round 3; then a reports a local failure. b, left alone,
    holds round 2: the job must go on from it, not roll back to the last checkpoint (here the
    seeded init, checkpoint_every_rounds=5), which b no longer holds and nobody can serve (it
    looped on "neither a member nor the coordinator could provide round 0 parameters")."""
    s, job, (a,) = running(1, min_peers=1, checkpoint_every_rounds=5)
    report_all(s, job, 10)
    (b,) = register(s, 1, now=11)
    report_all(s, job, 20)
    assert job.members == [a, b] and job.committed_round == 2 and job.holders == [a]
    s.report(b, job.job_id, 3, job.epoch, rep(samples=job.allocated(b)), 30)
    s.report_failure(a, job.job_id, 3, job.epoch, a, 31, detail="local failure: the host's workers failed",
                     kind="LOCAL")
    assert job.members == [b] and job.round == 3 and job.committed_round == 2
    assert job.rolled_back_rounds == 0 and job.start_digest == job.history[-1].digest
    assert job.evictions[-1].peer_id == a and job.evictions[-1].cause == SELF_REPORT
    report_all(s, job, 40)
    assert job.committed_round == 3 and job.holders == [b]


def test_a_job_no_live_member_holds_rolls_back_to_round_0_which_peers_rebuild_from_the_seed() -> None:
    """b joined at the boundary but failed before reporting anything: nobody is known to hold
    round 2, so the job rolls back to round 0 (no checkpoint yet), whose plan names no start
    digest: peers rebuild the seeded init (peer.ring_round, Trainer.initial_params)."""
    s, job, (a,) = running(1, min_peers=1, checkpoint_every_rounds=5)
    report_all(s, job, 10)
    (b,) = register(s, 1, now=11)
    report_all(s, job, 20)
    s.report_failure(a, job.job_id, 3, job.epoch, a, 31, detail="local failure", kind="LOCAL")
    assert job.members == [b] and job.round == 1 and job.committed_round == 0 and job.rolled_back_rounds == 2
    assert job.start_digest == ""
