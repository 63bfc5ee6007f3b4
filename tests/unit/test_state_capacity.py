"""Capacity in the state machine: shards weighted by measured samples/s and capped by each
peer's ``--max-samples``, held when a job starts, when a peer leaves and when one joins; data
the caps cannot hold is left unassigned and the job says so."""
from __future__ import annotations

import itertools

from dml.common.spec import JobSpec
from dml.coordinator import planner
from dml.coordinator.records import HEARTBEAT_TIMEOUT, RUNNING, Report, max_samples
from dml.coordinator.state import ClusterState

PORTS = itertools.count(7000)


def register(s: ClusterState, cap: int = 0, now: int = 0) -> str:
    return s.register(f"10.0.0.2:{next(PORTS)}", {"device": "cpu", "max_samples": cap}, now)[0]


def spec(**kw: object) -> JobSpec:
    base = dict(rounds=5, min_peers=2, num_shards=6, local_steps=1, batch_size=10)
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def held(s: ClusterState, jid: str, peer: str) -> int:
    job = s.job(jid)
    return sum(job.shard_sizes[i] for i in job.assignment.get(peer, []))


def test_caps_are_held_at_start_and_the_rest_is_unassigned_with_a_reason() -> None:
    s = ClusterState(1000)
    a, b = register(s, cap=20), register(s, cap=0)
    jid, _ = s.submit(spec(), [10] * 6, 0)
    job = s.job(jid)
    assert job.state == RUNNING and held(s, jid, a) == 20 and held(s, jid, b) == 40
    assert job.reason == "" and s.plan_for(a) is job

    s2 = ClusterState(1000)
    c, d = register(s2, cap=20), register(s2, cap=15)
    jid2, _ = s2.submit(spec(), [10] * 6, 0)
    job2 = s2.job(jid2)
    assert held(s2, jid2, c) == 20 and held(s2, jid2, d) == 10
    assert "3 of 6 shards (30 of 60 samples) unassigned" in job2.reason and "--max-samples" in job2.reason
    assert s2.plan_for(c) is job2, "what fits is trained on"


def test_a_job_whose_members_hold_nothing_waits_for_room_and_takes_a_peer_that_has_it() -> None:
    s = ClusterState(1000)
    a, b = register(s, cap=5), register(s, cap=5)
    jid, _ = s.submit(spec(), [10] * 6, 0)
    job = s.job(jid)
    assert job.state == RUNNING and job.reason.startswith("waiting for room")
    assert s.plan_for(a) is None and s.plan_for(b) is None, "no round that trains nothing"
    c = register(s, cap=0, now=5)
    assert c in job.members and held(s, jid, c) == 60
    assert job.reason == "" and s.plan_for(c) is job


def test_a_dead_peers_shards_move_only_where_the_caps_have_room() -> None:
    s = ClusterState(1000)
    a, b, c = register(s, cap=30), register(s, cap=0), register(s, cap=0)
    jid, _ = s.submit(spec(num_shards=9), [10] * 9, 0)
    job = s.job(jid)
    assert held(s, jid, a) == 30
    before = {p: list(v) for p, v in job.assignment.items()}
    s.remove_peer(b, 10, HEARTBEAT_TIMEOUT)
    assert held(s, jid, a) == 30, "a full peer takes nothing more"
    assert set(job.assignment[c]) == set(before[c]) | set(before[b])
    assert planner.unassigned(job.assignment, 9) == []


def test_a_dead_peers_shards_go_to_the_faster_survivor() -> None:
    s = ClusterState(1000)
    a, b, c = register(s), register(s), register(s)
    jid, _ = s.submit(spec(num_shards=12, min_peers=2), [10] * 12, 0)
    job = s.job(jid)
    assert [held(s, jid, p) for p in (a, b, c)] == [40, 40, 40], "unmeasured peers count alike"
    speed = {a: 100.0, b: 100.0, c: 300.0}
    for m in job.members:
        s.report(m, jid, job.round, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest="d",
                                                      samples_per_s=speed[m]), 10)
    assert job.committed_round == 1
    s.remove_peer(a, 20, HEARTBEAT_TIMEOUT)
    # By load per samples/s: b holds 40/100, c 40/300, so all four of a's shards fit c better.
    assert (held(s, jid, b), held(s, jid, c)) == (40, 80)


def test_a_peers_speed_on_one_job_does_not_place_the_shards_of_another() -> None:
    """c ran a job whose task is 30 times faster than the next job's: on the next job it is
    unmeasured, so it counts as the others' average there, not as 30 times faster."""
    s = ClusterState(1000)
    a, b, c = register(s), register(s), register(s)
    first, _ = s.submit(spec(num_shards=3, min_peers=1, max_peers=1, rounds=1), [10] * 3, 0)
    fast = s.job(first)
    (only,) = fast.members
    s.report(only, first, fast.round, fast.epoch, Report(samples=fast.allocated(only), train_loss=1.0, digest="d",
                                                          samples_per_s=3000.0), 5)
    assert fast.state != RUNNING and s.peers[only].samples_per_s == 3000.0
    others = [p for p in (a, b, c) if p != only]
    jid, _ = s.submit(spec(num_shards=12, min_peers=3), [10] * 12, 10)
    job = s.job(jid)
    assert sorted(job.members) == sorted([a, b, c])
    for m in others:
        s.report(m, jid, job.round, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest="d",
                                                      samples_per_s=100.0), 20)
    s.report(only, jid, job.round, job.epoch, Report(samples=job.allocated(only), train_loss=1.0, digest="d"), 20)
    assert job.committed_round == 1
    s.remove_peer(others[0], 30, HEARTBEAT_TIMEOUT)
    # Unmeasured on this job, `only` counts as 100/s like the survivor: a's 40 samples split
    # evenly (by its 3000/s from the other job it would have taken all four shards).
    assert (held(s, jid, only), held(s, jid, others[1])) == (60, 60)


def test_max_samples_is_read_from_the_capability_and_survives_as_plain_data() -> None:
    s = ClusterState(1000)
    a = register(s, cap=123)
    assert max_samples(s.peers[a]) == 123
    s.peers[a].capability["max_samples"] = "junk"
    assert max_samples(s.peers[a]) == 0


def test_a_job_as_wide_as_its_shards_still_takes_a_peer_with_room_for_what_was_left_out() -> None:
    s = ClusterState(1000)
    a, b = register(s, cap=5), register(s, cap=5)
    jid, _ = s.submit(spec(num_shards=2), [10, 10], 0)
    job = s.job(jid)
    assert job.members == [a, b] and s.plan_for(a) is None
    c = register(s, cap=10, now=5)
    assert c in job.members and held(s, jid, c) == 10 and s.plan_for(c) is job
    assert "1 of 2 shards (10 of 20 samples) unassigned" in job.reason


def test_shards_view_counts_labels_per_member_and_keeps_a_finished_jobs_last_placement() -> None:
    import numpy as np

    from dml.coordinator.records import Job
    from dml.coordinator.service import shards_view

    labels = np.array([0, 0, 1, 2, 2, 2])
    shards = [np.array([0, 2]), np.array([1, 3]), np.array([4, 5])]
    job = Job("j", spec(num_shards=3), 0, shard_sizes=[2, 2, 2], members=["b", "a"],
              assignment={"a": [0], "b": [1]})
    v = shards_view(job, labels, shards)
    assert [(p.peer_id, p.shard_ids, p.samples, p.label_counts) for p in v.peers] == [
        ("b", [1], 2, [1, 0, 1]), ("a", [0], 2, [1, 1, 0])]
    assert (v.num_classes, v.train_samples, v.unassigned) == (3, 6, [2])
    job.members = []  # finished: the members are freed, the placement stays
    assert [p.peer_id for p in shards_view(job, labels, shards).peers] == ["a", "b"]
    unknown = shards_view(job, None, None)
    assert unknown.num_classes == 0 and all(p.label_counts is None for p in unknown.peers)


def test_shards_view_shows_no_counts_for_labels_out_of_range() -> None:
    import numpy as np

    from dml.coordinator.records import Job
    from dml.coordinator.service import MAX_LABELS, shards_view

    job = Job("j", spec(num_shards=2), 0, shard_sizes=[1, 1], members=["a"], assignment={"a": [0, 1]})
    shards = [np.array([0]), np.array([1])]
    for bad in (np.array([0, -1]), np.array([0, MAX_LABELS])):
        v = shards_view(job, bad, shards)
        assert v.num_classes == 0 and v.peers[0].label_counts is None and v.peers[0].samples == 2


def test_the_reason_says_when_the_members_caps_together_hold_less_than_the_data() -> None:
    s = ClusterState(1000)
    register(s, cap=20), register(s, cap=15)
    jid, _ = s.submit(spec(), [10] * 6, 0)
    assert s.job(jid).reason == ("3 of 6 shards (30 of 60 samples) unassigned: the peers' --max-samples caps hold "
                                 "at most 35 of the 60 training samples; they are placed when a peer with room joins")
    s2 = ClusterState(1000)
    register(s2, cap=25), register(s2, cap=45)
    jid2, _ = s2.submit(spec(), [10] * 6, 0)
    assert planner.unassigned(s2.job(jid2).assignment, 6) == []
