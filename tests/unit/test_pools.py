"""Resource pools in the coordinator's state: a job takes only idle peers of its pool, at most
``max_peers`` of them, jobs on disjoint pools run at once, and ``peer_state`` says what each peer
does; plus the spec's checks of the two fields."""
from __future__ import annotations

import itertools

import pytest

from dml.common.spec import DEFAULT_POOL, InvalidSpec, JobSpec, pool_error, validate
from dml.coordinator.records import PENDING, RUNNING, Report
from dml.coordinator.state import ClusterState

PORTS = itertools.count(7000)


def spec(**kw: object) -> JobSpec:
    base = dict(rounds=3, min_peers=1, num_shards=6, local_steps=1, batch_size=10)
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def register(st: ClusterState, pool: str, n: int, now: int = 0) -> list[str]:
    cap = {"device": "cpu", "pool": pool} if pool else {"device": "cpu"}
    return [st.register(f"10.0.0.2:{next(PORTS)}", dict(cap), now)[0] for _ in range(n)]


def submit(st: ClusterState, now: int = 0, **kw: object) -> str:
    s = spec(**kw)
    return st.submit(s, [10] * s.num_shards, now)[0]


def test_a_job_takes_only_idle_peers_of_its_pool() -> None:
    st = ClusterState(10_000)
    a = register(st, "a", 2)
    b = register(st, "b", 2)
    plain = register(st, "", 1)  # named no pool: the default one
    jid = submit(st, pool="b")
    assert st.job(jid).state == RUNNING and st.job(jid).members == b
    assert all(not st.peers[p].job_id for p in a + plain)
    dflt = submit(st, pool=DEFAULT_POOL)
    assert st.job(dflt).members == plain
    nopool = submit(st)  # no pool: the default one, whose peer is busy; pool a's stay idle
    assert st.job(nopool).state == PENDING and all(not st.peers[p].job_id for p in a)
    assert st.job(nopool).reason == (f"waiting for peers: 0 idle, 1 needed; 1 busy with job {dflt}; a job without "
                                     "--pool runs on pool 'default' only (idle elsewhere: 2 in 'a')")


def test_a_job_whose_pool_has_no_idle_peer_waits_saying_so_and_starts_when_one_registers() -> None:
    st = ClusterState(10_000)
    register(st, "a", 3)
    jid = submit(st, pool="gpu", min_peers=1)
    job = st.job(jid)
    assert job.state == PENDING and job.reason == "waiting for peers in pool 'gpu': 0 idle, 1 needed"
    g = register(st, "gpu", 1, now=5)
    assert job.state == RUNNING and job.members == g


def test_max_peers_caps_the_members_at_start_and_at_round_boundaries() -> None:
    st = ClusterState(10_000)
    peers = register(st, "a", 4)
    jid = submit(st, pool="a", max_peers=2)
    job = st.job(jid)
    assert job.members == peers[:2]
    for m in job.members:  # commit round 1: a boundary where idle peers would join
        st.report(m, jid, job.round, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest="d"), 10)
    assert job.committed_round == 1 and job.members == peers[:2]
    assert st.take_for(peers[2]) is None  # never offered a full job either
    other = submit(st, pool="a", now=20)
    assert st.job(other).members == peers[2:], "the peers the cap left idle serve the next job"


def test_max_peers_holds_even_when_caps_leave_data_unassigned() -> None:
    st = ClusterState(10_000)
    small = [st.register(f"10.0.0.3:{next(PORTS)}", {"device": "cpu", "max_samples": 10}, 0)[0] for _ in range(3)]
    jid = submit(st, max_peers=2, num_shards=3)
    assert st.job(jid).members == small[:2] and not st.peers[small[2]].job_id


def test_jobs_on_disjoint_pools_run_at_the_same_time_and_a_third_waits_for_its_full_pool() -> None:
    st = ClusterState(10_000)
    a = register(st, "a", 2)
    b = register(st, "b", 2)
    ja, jb = submit(st, pool="a", min_peers=2), submit(st, pool="b", min_peers=2)
    jc = submit(st, pool="a", min_peers=1, now=1)
    assert (st.job(ja).state, st.job(jb).state, st.job(jc).state) == (RUNNING, RUNNING, PENDING)
    assert st.job(ja).members == a and st.job(jb).members == b
    assert st.job(jc).reason == f"waiting for peers in pool 'a': 0 idle, 1 needed; 2 busy with job {ja}"
    st.cancel(ja, 2)  # its peers return to pool a and go to the waiting job
    assert st.job(jc).state == RUNNING and st.job(jc).members == a
    assert st.job(jb).members == b


def test_take_offers_a_job_only_to_peers_of_its_pool() -> None:
    st = ClusterState(10_000)
    a = register(st, "a", 1)
    b = register(st, "b", 1)
    jid = st.submit(spec(pool="b"), None, 0)[0]  # needs takes
    assert st.take_for(a[0]) is None
    assert st.take_for(b[0]) is st.job(jid)


def test_peer_state_names_what_each_peer_does() -> None:
    st = ClusterState(10_000)
    a = register(st, "a", 2)
    b = register(st, "b", 1)
    idle = register(st, "c", 1)
    ja = submit(st, pool="a", min_peers=2)
    jb = st.submit(spec(pool="b"), None, 0)[0]
    assert st.peer_state(a[0]) == ("training", ja)
    assert st.peer_state(b[0]) == ("taking", jb)
    assert st.peer_state(idle[0]) == ("idle", "")
    st.remove_peer(a[1], 5, "HEARTBEAT_TIMEOUT")
    assert st.peer_state(a[0]) == ("waiting", ja)  # below min_peers: no round runs


def test_usage_counts_accepted_reports_of_the_last_minute() -> None:
    st = ClusterState(600_000)
    (p,) = register(st, "a", 1)
    jid = submit(st, rounds=10, pool="a")
    job = st.job(jid)
    now = 100_000
    for _ in range(3):  # a round every 10 s: 4 s training, 1 s exchanging
        now += 10_000
        st.report(p, jid, job.round, job.epoch, Report(samples=job.allocated(p), train_loss=1.0, digest="d",
                                                       train_ms=4_000, exchange_ms=1_000), now)
    u = st.usage(p, now)
    assert (u.training, u.exchanging) == pytest.approx((12 / 60, 3 / 60))
    assert st.usage(p, now + 120_000).idle == 1.0, "a minute later it was all idle"
    st.remove_peer(p, now, "HEARTBEAT_TIMEOUT")
    assert p not in st.activity


@pytest.mark.parametrize("name", ["", "-a", "a/b", "..", "a b", "x" * 65, "a\n", "ü"])
def test_bad_pool_names_are_refused(name: str) -> None:
    assert pool_error(name)
    if name:
        with pytest.raises(InvalidSpec, match="pool name"):
            validate(spec(pool=name))


def test_pool_and_max_peers_validate() -> None:
    validate(spec(pool="gpu.a100-1", max_peers=3))
    assert pool_error("default") == ""
    with pytest.raises(InvalidSpec, match="max_peers"):
        validate(spec(max_peers=-1))
    with pytest.raises(InvalidSpec, match="cannot exceed max_peers"):
        validate(spec(min_peers=3, max_peers=2))


def test_a_peer_reports_its_devices_memory_and_zero_when_unknown() -> None:
    from dml.peer.runner import device_memory

    assert device_memory("cpu") > 1 << 20
    assert device_memory("tpu:0") == 0


def test_a_running_job_at_max_peers_is_offered_to_no_more_takers() -> None:
    from dml.coordinator.records import JobData
    from dml.coordinator.state import READY

    st = ClusterState(10_000)
    first = register(st, "a", 1)
    jid = st.submit(spec(pool="a", max_peers=1, num_shards=4), None, 0)[0]  # needs takes; room for 4 by its shards
    data = JobData(train_samples=40, test_samples=0, num_classes=2, digest="d" * 64, has_labels=True, batch_size=10)
    st.take(first[0], jid, READY, 1, data=data, shard_sizes=[10] * 4)
    assert st.job(jid).state == RUNNING and st.job(jid).members == first
    late = register(st, "a", 1, now=2)
    assert st.take_for(late[0]) is None and st.peer_state(late[0]) == ("idle", "")


def test_peer_state_ready_and_quarantined() -> None:
    from dml.coordinator.records import JobData
    from dml.coordinator.state import READY

    st = ClusterState(10_000)
    a, b = register(st, "a", 2)
    jid = st.submit(spec(pool="a", min_peers=3, num_shards=4), None, 0)[0]
    data = JobData(train_samples=40, num_classes=2, digest="d" * 64, has_labels=True, batch_size=10)
    st.take(a, jid, READY, 1, data=data, shard_sizes=[10] * 4)
    assert st.peer_state(a) == ("ready", jid) and st.peer_state(b) == ("taking", jid)
    st.take(b, jid, READY, 2, data=data, shard_sizes=[10] * 4)
    (c,) = register(st, "a", 1, now=3)
    st.take(c, jid, READY, 4, data=data, shard_sizes=[10] * 4)
    job = st.job(jid)
    assert job.state == RUNNING and st.peer_state(c) == ("training", jid)
    addr = st.peers[c].address
    st.quarantine(job, c, a, "sent NaN", 5)  # evicted; when it registers again, its address is kept out
    back, _ = st.register(addr, {"device": "cpu", "pool": "a"}, 6)
    assert st.peer_state(back) == ("quarantined", jid)


def finish(st: ClusterState, jid: str, now: int) -> int:
    """Reports every round of job ``jid`` from all its members, committing each; the time after."""
    job = st.job(jid)
    while job.state == RUNNING:
        now += 10
        for m in list(job.members):
            st.report(m, jid, job.round, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest="d"), now)
    return now


def test_a_job_without_a_pool_leaves_named_pools_to_their_jobs() -> None:
    """The starvation found before this rule: a job with no pool took every idle peer of every
    pool, so a pool job submitted after it waited for it to end."""
    st = ClusterState(10_000)
    gpu = register(st, "gpu", 2)
    plain = register(st, "", 2)
    first = submit(st, min_peers=1)  # no --pool
    assert st.job(first).members == plain
    later = submit(st, pool="gpu", min_peers=2, now=1)
    assert st.job(later).state == RUNNING and st.job(later).members == gpu


def test_a_job_without_a_pool_waits_for_default_peers_saying_where_idle_ones_are() -> None:
    st = ClusterState(10_000)
    register(st, "gpu", 2)
    register(st, "cpu", 1)
    jid = st.submit(spec(min_peers=1), None, 0)[0]  # needs takes
    job = st.job(jid)
    assert job.state == PENDING and job.reason == (
        "waiting for peers to take the job: 0 ready, 0 declined, 1 needed; a job without --pool runs on pool "
        "'default' only (idle elsewhere: 1 in 'cpu', 2 in 'gpu')")
    assert all(st.take_for(p) is None for p in st.peers)
    (d,) = register(st, "", 1, now=1)
    assert st.take_for(d) is job


def test_within_a_pool_idle_peers_go_to_waiting_jobs_in_submission_order() -> None:
    st = ClusterState(10_000)
    a = register(st, "a", 3)
    other = register(st, "b", 1)
    j0 = submit(st, pool="a", min_peers=3)
    j1 = submit(st, pool="a", min_peers=2, max_peers=2, now=1)
    j2 = submit(st, pool="a", min_peers=1, max_peers=2, now=2)
    j3 = submit(st, pool="b", min_peers=2, now=3)  # another pool's job: never given pool a's peers
    assert st.job(j0).members == a and [st.job(j).state for j in (j1, j2, j3)] == [PENDING] * 3
    finish(st, j0, 10)  # three peers idle at once: the oldest waiting job first, up to its max_peers
    assert st.job(j1).members == a[:2] and st.job(j2).members == a[2:]
    assert st.job(j3).state == PENDING and not st.peers[other[0]].job_id


def test_a_job_that_cannot_start_with_the_idle_peers_holds_none_of_them_back() -> None:
    st = ClusterState(10_000)
    j1 = submit(st, pool="a", min_peers=2)
    j2 = submit(st, pool="a", min_peers=1, now=1)
    first = register(st, "a", 1, now=2)  # too few for j1: j2, younger, starts with it
    assert st.job(j2).members == first and st.job(j1).state == PENDING
    assert st.job(j1).reason == f"waiting for peers in pool 'a': 0 idle, 2 needed; 1 busy with job {j2}"
    more = register(st, "a", 2, now=3)
    assert st.job(j1).members == more


def test_a_peer_returns_to_its_pool_when_its_job_ends_and_serves_the_next_job_there() -> None:
    st = ClusterState(10_000)
    a = register(st, "a", 2)
    b = register(st, "b", 1)
    ja = submit(st, pool="a", min_peers=2)
    waiting_a = submit(st, pool="a", min_peers=2, now=1)
    waiting_b = submit(st, pool="b", min_peers=2, now=2)  # pool b has one peer: waits throughout
    assert st.job(waiting_a).reason == f"waiting for peers in pool 'a': 0 idle, 2 needed; 2 busy with job {ja}"
    now = finish(st, ja, 10)
    assert st.job(ja).state == "SUCCEEDED"
    assert st.job(waiting_a).state == RUNNING and st.job(waiting_a).members == a, "they went back to pool a"
    assert st.job(waiting_b).state == PENDING and all(st.peers[p].job_id != waiting_b for p in a)
    finish(st, waiting_a, now)
    assert all(st.peer_state(p) == ("idle", "") for p in a) and st.job(waiting_b).members == []
    assert st.job(waiting_b).reason == "waiting for peers in pool 'b': 1 idle, 2 needed"
    assert not st.peers[b[0]].job_id


def test_a_job_needing_takes_on_a_full_pool_names_the_busy_jobs_and_is_offered_when_a_peer_frees() -> None:
    st = ClusterState(10_000)
    a = register(st, "a", 2)
    first = submit(st, pool="a", min_peers=1, max_peers=1)
    second = submit(st, pool="a", min_peers=1, max_peers=1, now=1)
    assert st.job(first).members == a[:1] and st.job(second).members == a[1:]
    third = st.submit(spec(pool="a", min_peers=1), None, 2)[0]
    assert st.job(third).reason == (f"waiting for peers in pool 'a' to take the job: 0 ready, 0 declined, 1 needed; "
                                    f"1 busy with job {first}, 1 with job {second}")
    assert st.take_for(a[0]) is None
    finish(st, second, 10)
    assert st.job(third).reason.endswith(f"1 needed; 1 busy with job {first}")
    assert st.take_for(a[1]) is st.job(third) and st.take_for(a[0]) is None
