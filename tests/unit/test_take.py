"""Takes: the coordinator's rules for peers that load a job's task before joining its rings
(ready, declined, the task's error, data that differs, restarts), with a fake clock."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml.common.sampling import labels_digest
from dml.common.spec import JobSpec
from dml.coordinator.records import FAILED, FINISHED, PENDING, RUNNING, Job, JobData, Report, Stale
from dml.coordinator.state import DECLINED, MAX_TASK_ERROR_CHARS, READY, TASK_ERROR, ClusterState
from tests.unit.test_state import check_invariants

PORTS = itertools.count(7000)


def spec(**kw: object) -> JobSpec:
    base: dict[str, object] = dict(rounds=4, min_peers=2, num_shards=4, local_steps=1, batch_size=10,
                                   checkpoint_every_rounds=100)
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def data(n: int = 40, digest: str = "", labels: bool = True, batch: int = 0) -> JobData:
    return JobData(train_samples=n, num_classes=4 if labels else 0, batch_size=batch,
                   digest=digest or labels_digest(n, b"x" if labels else b""), has_labels=labels)


def register(s: ClusterState, n: int, now: int = 0) -> list[str]:
    return [s.register(f"10.0.0.2:{next(PORTS)}", {}, now)[0] for _ in range(n)]


def ready(s: ClusterState, peer: str, job: Job, now: int = 0, d: JobData | None = None) -> None:
    d = d or data()
    sizes = [d.train_samples // job.spec.num_shards] * job.spec.num_shards
    sizes[0] += d.train_samples - sum(sizes)
    s.take(peer, job.job_id, READY, now, data=d, shard_sizes=sizes)


def pending(s: ClusterState, **kw: object) -> Job:
    jid, _ = s.submit(spec(**kw), None, 0)
    return s.job(jid)


def test_only_peers_that_took_the_job_are_admitted_and_the_first_ready_take_fixes_its_data() -> None:
    s = ClusterState(1000)
    a, b, c = register(s, 3)
    job = pending(s, batch_size=0)
    assert job.state == PENDING and job.needs_take and job.data is None and job.shard_sizes == []
    assert job.reason == "waiting for peers to take the job: 0 ready, 0 declined, 2 needed"
    assert all(s.take_for(p) is job for p in (a, b, c)), "each idle peer is offered the job"
    assert s.plan_for(a) is None
    ready(s, a, job, 1, data(batch=16))
    assert job.state == PENDING and s.take_for(a) is None and s.take_for(b) is job
    assert job.data == data(batch=16) and job.shard_sizes == [10, 10, 10, 10]
    assert job.spec.batch_size == 16, "the task's batch size, since the job gave none"
    assert job.reason == "waiting for peers to take the job: 1 ready, 0 declined, 2 needed"
    ready(s, c, job, 2, data(batch=16))
    assert job.state == RUNNING and job.members == [a, c], "b never took it: it is not admitted"
    assert s.peers[b].job_id == "" and s.take_for(b) is job, "a running job with room is still offered"
    ready(s, b, job, 3, data(batch=16))
    assert job.members == [a, c], "a ready peer joins at the round boundary"
    for m in job.members:
        s.report(m, job.job_id, job.round, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest="d"), 4)
    assert job.members == [a, c, b] and job.committed_round == 1


def test_a_job_without_a_batch_size_whose_task_gives_none_gets_dmls_default() -> None:
    s = ClusterState(1000)
    (a,) = register(s, 1)
    job = pending(s, batch_size=0, min_peers=1)
    ready(s, a, job, 1, data(batch=0))
    assert job.spec.batch_size == 32 and job.state == RUNNING
    job2 = pending(s, batch_size=5, min_peers=1)
    (b,) = register(s, 1, 2)
    ready(s, b, job2, 3, data(batch=64))
    assert job2.spec.batch_size == 5, "the job's own batch size wins"


def test_a_decline_is_shown_and_the_peer_is_not_offered_the_job_again_until_it_registers_again() -> None:
    s = ClusterState(1000)
    a, b = register(s, 2)
    job = pending(s)
    s.take(a, job.job_id, DECLINED, 1, detail="job code is not allowed here (dml-peer --allow-job-code)")
    assert [(x.peer_id, x.reason) for x in job.declined] == [
        (a, "job code is not allowed here (dml-peer --allow-job-code)")]
    assert s.take_for(a) is None and s.take_for(b) is job
    assert job.reason == "waiting for peers to take the job: 0 ready, 1 declined, 2 needed"
    with pytest.raises(Stale, match="declined job"):
        ready(s, a, job, 1)
    ready(s, b, job, 2)
    assert job.state == PENDING, "a decliner is never admitted"
    # It restarts (registers again at its address): a new peer, offered the job again.
    a2, _ = s.register(s.peers[a].address, {}, 3)
    assert s.take_for(a2) is job
    ready(s, a2, job, 4)
    assert job.state == RUNNING and job.members == [b, a2]


def test_a_task_error_fails_the_job_with_the_tasks_message_bounded() -> None:
    s = ClusterState(1000)
    a, b = register(s, 2)
    job = pending(s)
    ready(s, b, job, 1)
    trace = "train(ctx) raised FileNotFoundError: no such file: data.csv\n" + "x" * 5000
    s.take(a, job.job_id, TASK_ERROR, 2, detail=trace)
    assert job.state == FAILED
    assert job.reason.startswith(f"task error on peer {a}: train(ctx) raised FileNotFoundError: no such file")
    assert len(job.reason) <= MAX_TASK_ERROR_CHARS + len(f"task error on peer {a}: ") and job.reason.endswith("...")
    assert s.take_for(a) is None and s.peers[b].job_id == ""
    with pytest.raises(Stale, match="FAILED"):
        ready(s, b, job, 3)


def test_a_peer_whose_data_differs_is_refused_the_job_and_the_job_goes_on_without_it() -> None:
    s = ClusterState(1000)
    a, b, c = register(s, 3)
    job = pending(s)
    ready(s, a, job, 1)
    ready(s, b, job, 2, data(n=41))
    assert [x.peer_id for x in job.declined] == [b]
    assert "its data differs from the job's: 41 training samples" in job.declined[0].reason
    assert "where the job has 40" in job.declined[0].reason
    assert job.data == data() and job.shard_sizes == [10] * 4, "the first take's data stands"
    ready(s, c, job, 3)
    assert job.state == RUNNING and job.members == [a, c]
    assert s.take_for(b) is None


def test_a_job_its_data_cannot_shard_fails_with_the_reason() -> None:
    s = ClusterState(1000)
    (a,) = register(s, 1)
    job = pending(s, num_shards=50, min_peers=1)
    ready(s, a, job, 1, data(n=40))  # sizes are not looked at: the job fails first
    assert job.state == FAILED
    assert job.reason == "num_shards must be between 1 and 40 (the training set size), got 50"
    job2 = pending(s, sharding="dirichlet:0.5", min_peers=1)
    s.take(a, job2.job_id, READY, 2, data=data(labels=False), shard_sizes=[10] * 4)
    assert job2.state == FAILED and "needs the training labels, and the task gives none: set labels=" in job2.reason
    job3 = pending(s, min_peers=1)
    s.take(a, job3.job_id, READY, 3, data=data(n=0), shard_sizes=[0] * 4)
    assert job3.state == FAILED and job3.reason == "the task's training set is empty"


def test_a_task_error_during_a_round_fails_the_job() -> None:
    s = ClusterState(1000)
    a, b = register(s, 2)
    job = pending(s)
    ready(s, a, job, 1)
    ready(s, b, job, 1)
    assert job.state == RUNNING
    s.report_failure(b, job.job_id, job.round, job.epoch, b, 2, "loss(output, target) raised IndexError: "
                     "Target 12 is out of bounds.", kind="TASK")
    assert job.state == FAILED
    assert job.reason == f"task error on peer {b}: loss(output, target) raised IndexError: Target 12 is out of bounds."
    assert s.peers[a].job_id == s.peers[b].job_id == ""


def test_a_peer_that_leaves_forgets_its_takes_and_restored_members_need_not_take_again() -> None:
    s = ClusterState(1000)
    a, b, c = register(s, 3)
    job = pending(s, num_shards=2)
    for p in (a, b, c):
        ready(s, p, job, 1)
    assert job.members == [a, b] and job.ready == [a, b, c]
    s.remove_peer(c, 2, "HEARTBEAT_TIMEOUT")
    assert job.ready == [a, b]
    # A coordinator restart: the stored job and peers come back, with the members' takes.
    s2 = ClusterState(1000)
    s2.restore([job], list(s.peers.values()), 10)
    job2 = s2.job(job.job_id)
    assert job2.members == [a, b] and s2.plan_for(a) is job2 and s2.take_for(a) is None


def test_dml_status_shows_a_tasks_error_on_its_line_and_its_traceback_under_it_and_each_decline() -> None:
    from dml.client.cli import exclusion_lines, reason_lines, status_line
    from dml.coordinator.servicer import job_to_pb

    s = ClusterState(1000)
    a, b = register(s, 2)
    job = pending(s)
    s.take(b, job.job_id, DECLINED, 1, detail="job code is not allowed here")
    s.take(a, job.job_id, TASK_ERROR, 2, detail='train(ctx) raised KeyError: \'x\'\n  File "task.py", line 3, in train\n'
                                                "    return d['x']")
    st = job_to_pb(job)
    line = status_line(st)
    assert line.endswith(f"FAILED (task error on peer {a}: train(ctx) raised KeyError: 'x')"), line
    assert "\n" not in line
    assert reason_lines(st) == ['    File "task.py", line 3, in train', "      return d['x']"]
    assert exclusion_lines(st) == [f"  declined {b}: job code is not allowed here"]


TAKE_OPS = st.lists(st.tuples(st.sampled_from(("register", "reregister", "advance", "heartbeat", "expire", "commit",
                                                "ready", "decline", "differ", "submit", "cancel")),
                              st.integers(0, 1000)), max_size=80)


@settings(max_examples=200, deadline=None, database=None)
@given(ops=TAKE_OPS)
def test_only_peers_that_took_a_job_with_its_data_are_ever_its_members(ops: list[tuple[str, int]]) -> None:
    """The state machine's invariants (tests/unit/test_state.py) hold with takes, and a job that
    needs takes has as members only live peers that took it READY with its data, never one that
    declined it."""
    s = ClusterState(1000)
    now, last = 0, {}  # type: ignore[var-annotated]
    register(s, 3, now)
    pending(s)
    for op, arg in ops:
        peers, jobs = sorted(s.peers), sorted(s.jobs)
        job = s.jobs[jobs[arg % len(jobs)]] if jobs else None
        peer = peers[arg % len(peers)] if peers else ""
        if op == "register":
            register(s, 1, now)
        elif op == "reregister" and peer:
            s.register(s.peers[peer].address, {}, now)
        elif op == "advance":
            now += arg % 900 + 1
        elif op == "heartbeat":
            for p in peers[: arg % (len(peers) + 1)]:
                s.heartbeat(p, now)
        elif op == "expire":
            s.expire(now)
        elif op == "commit" and job is not None and s.active(job):
            for m in list(job.members):
                s.report(m, job.job_id, job.round, job.epoch, Report(samples=job.allocated(m), train_loss=1.0,
                                                                     digest="d"), now)
        elif op in ("ready", "decline", "differ") and job is not None and peer and job.state in (PENDING, RUNNING):
            if s.peers[peer].job_id == job.job_id or job.declined_by(peer):  # its take stands, or its decline
                with pytest.raises(Stale, match="is a member of job|declined job"):
                    s.take(peer, job.job_id, READY, now, data=data())
            elif op == "decline":
                s.take(peer, job.job_id, DECLINED, now, detail="no")
            else:
                ready(s, peer, job, now, data(n=40 if op == "ready" else 44))
        elif op == "submit":
            pending(s, min_peers=arg % 3 + 1)
        elif op == "cancel" and job is not None:
            s.cancel(job.job_id, now)
        check_invariants(s, last)
        for j in s.jobs.values():
            assert j.state in FINISHED or set(j.ready) <= set(s.peers), "a peer that left has taken nothing"
            for m in j.members:
                assert m in j.ready and not j.declined_by(m), m
            if j.data is not None:
                assert sum(j.shard_sizes) == j.data.train_samples
