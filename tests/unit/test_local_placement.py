"""``--placement local`` (federated, peer-local data) in the coordinator's state: a job is offered
only to peers offering its dataset, each member's own data is its own shard and the plan
allocates it only that, the ledger counts each peer's samples exactly once per pass in committed
rounds, a dead member's data leaves with it (nothing moves) and is no longer "present", a joiner
(a restarted peer included) brings its data at the next round boundary; and the spec's checks."""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from dml.common.spec import InvalidSpec, JobSpec, validate, with_defaults
from dml.coordinator import ledger
from dml.coordinator.records import RUNNING, SUCCEEDED, JobData, Report
from dml.coordinator.state import READY, ClusterState

PORTS = itertools.count(9000)
NAME = "clinic"


def local_spec(**kw: object) -> JobSpec:
    base: dict[str, object] = dict(rounds=50, min_peers=1, local_steps=2, batch_size=5, placement="local",
                                   local_data=NAME, num_shards=0)
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def register(st: ClusterState, names: list[str] | None = None, now: int = 0, address: str = "") -> str:
    cap = {"device": "cpu", "local_datasets": list([NAME] if names is None else names)}
    return st.register(address or f"10.0.0.9:{next(PORTS)}", cap, now)[0]


def data(n: int, params: int = 100, seed: str = "") -> JobData:
    digest = hashlib.sha256(f"{n}/{seed}".encode()).hexdigest()
    return JobData(train_samples=n, test_samples=10, batch_size=5, num_params=params, digest=digest)


def take(st: ClusterState, pid: str, jid: str, n: int, now: int = 0, **kw: object) -> None:
    st.take(pid, jid, READY, now, data=data(n, **kw), label_counts=[n - n // 2, n // 2])  # type: ignore[arg-type]


def commit(st: ClusterState, jid: str, now: int) -> None:
    job = st.job(jid)
    for m in list(job.members):
        st.report(m, jid, job.round, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest="d"), now)


def consumed(st: ClusterState, jid: str) -> list[list[tuple[int, int, int, int]]]:
    return [[tuple(r) for rs in rec.consumed.values() for r in rs] for rec in st.job(jid).history]  # type: ignore[misc]


# -- the spec ------------------------------------------------------------------------------------
def test_the_spec_refuses_sharding_flags_for_local_jobs_and_local_data_for_shared_ones() -> None:
    validate(with_defaults(local_spec()))
    assert with_defaults(local_spec()).num_shards == 0, "a local job has no shard count to default"
    assert with_defaults(JobSpec(placement="local", local_data=NAME)).num_shards == 0, "nor the dataclass's"
    for bad, word in ((dict(sharding="classes:2"), "--sharding"), (dict(num_shards=4), "--num-shards"),
                      (dict(dataset="store-set"), "--dataset"), (dict(min_shard_samples=5), "--min-shard-samples"),
                      (dict(aggregation="gossip"), "gossip"), (dict(local_data=""), "--local-data"),
                      (dict(local_data="../etc"), "not allowed"), (dict(placement="nfs"), "unknown placement")):
        with pytest.raises(InvalidSpec, match=word):
            validate(with_defaults(local_spec(**bad)))
    with pytest.raises(InvalidSpec, match="local_data"):
        validate(with_defaults(JobSpec(local_data=NAME)))
    validate(with_defaults(JobSpec()))  # shared, the default, as before


# -- offers and takes ----------------------------------------------------------------------------
def test_a_local_job_is_offered_only_to_peers_offering_its_dataset() -> None:
    st = ClusterState(10_000)
    other = register(st, ["elsewhere"])
    none = register(st, [])
    mine = register(st)
    jid = st.submit(local_spec(), None, 0)[0]
    assert st.take_for(other) is None and st.take_for(none) is None
    assert st.take_for(mine) is not None and st.take_for(mine).job_id == jid  # type: ignore[union-attr]


def test_each_member_is_allocated_only_its_own_samples() -> None:
    st = ClusterState(10_000)
    peers = [register(st) for _ in range(3)]
    jid = st.submit(local_spec(min_peers=3), None, 0)[0]
    for p, n in zip(peers, (7, 30, 12)):
        take(st, p, jid, n)
    job = st.job(jid)
    assert job.state == RUNNING and job.members == peers
    own = {p: job.local_shard[p] for p in peers}
    assert job.shard_sizes == [7, 30, 12] and len(set(own.values())) == 3
    for rnd in range(6):
        assert job.assignment == {p: [own[p]] for p in peers}
        for p in peers:
            ranges = job.allocation[p]
            assert ranges and {r[0] for r in ranges} == {own[p]}, "a member trains its own data only"
            assert all(0 <= r[2] < r[3] <= job.shard_sizes[own[p]] for r in ranges)
            assert job.allocated(p) == 10  # local_steps x batch_size, wrapping into its next pass
        commit(st, jid, 10 + rnd)
    assert ledger.violations(consumed(st, jid), job.shard_sizes) == []
    assert job.cursors[own[peers[0]]][0] > job.cursors[own[peers[1]]][0], "a small shard passes more often"


def test_a_take_with_labels_of_bad_counts_or_another_model_is_refused_the_job() -> None:
    st = ClusterState(10_000)
    a, b, c, d = (register(st) for _ in range(4))
    jid = st.submit(local_spec(min_peers=2), None, 0)[0]
    take(st, a, jid, 20)
    st.take(b, jid, READY, 1, data=data(20, seed="b"), label_counts=[3, 3])  # counts that do not sum to 20
    take(st, c, jid, 20, params=99, seed="c")  # another model
    st.take(d, jid, READY, 1, data=data(0, seed="d"), label_counts=[])  # nothing to train
    e = register(st)
    st.take(e, jid, READY, 1, data=data(1 << 32, seed="e"), label_counts=[])  # past what a plan can address
    job = st.job(jid)
    reasons = {x.peer_id: x.reason for x in job.declined}
    assert set(reasons) == {b, c, d, e} and job.ready == [a]
    assert "at most 4,294,967,295" in reasons[e]
    assert "label counts" in reasons[b] and "99 parameters" in reasons[c] and "empty" in reasons[d]
    assert job.shard_sizes == [20], "no refused take left a shard behind"


# -- failures and joiners ------------------------------------------------------------------------
def test_a_dead_member_takes_its_data_with_it_and_nothing_moves() -> None:
    st = ClusterState(10_000)
    peers = [register(st) for _ in range(4)]
    jid = st.submit(local_spec(min_peers=2), None, 0)[0]
    for p, n in zip(peers, (10, 20, 30, 40)):
        take(st, p, jid, n)
    job = st.job(jid)
    commit(st, jid, 5)
    before = {p: list(v) for p, v in job.assignment.items()}
    assert job.data_present() == (100, 100, 4, 4) and job.reason == ""
    st.remove_peer(peers[1], 6, "HEARTBEAT_TIMEOUT")
    assert job.members == [peers[0], peers[2], peers[3]]
    assert job.assignment == {p: before[p] for p in job.members}, "only the dead peer's shard is gone; none moved"
    assert before[peers[1]][0] not in {s for v in job.assignment.values() for s in v}
    assert job.data_present() == (80, 100, 3, 4)
    assert "data present: 80 of 100 samples (80%), 3 of 4" in job.reason
    for t in range(7, 12):
        commit(st, jid, t)
    assert job.state == RUNNING and job.committed_round == 6
    assert ledger.violations(consumed(st, jid), job.shard_sizes) == []


def test_a_joiner_brings_its_data_at_the_next_round_boundary_and_a_restarted_peer_its_own_again() -> None:
    st = ClusterState(10_000)
    a, b = register(st), register(st, address="10.0.0.8:1")
    jid = st.submit(local_spec(min_peers=1), None, 0)[0]
    take(st, a, jid, 10)
    take(st, b, jid, 25)
    job = st.job(jid)
    commit(st, jid, 1)
    commit(st, jid, 2)
    shard_b, cursor_b = job.local_shard[b], job.cursors[job.local_shard[b]]
    st.remove_peer(b, 3, "HEARTBEAT_TIMEOUT")
    commit(st, jid, 4)
    assert job.members == [a] and job.cursors[shard_b] == cursor_b, "absent data does not advance"
    b2 = register(st, address="10.0.0.8:1", now=5)  # the same peer, restarted: a new id, the same data
    c = register(st, now=5)
    take(st, b2, jid, 25, now=6)
    take(st, c, jid, 5, now=6, seed="c")
    assert job.members == [a], "joiners wait for the round boundary"
    assert job.local_shard[b2] == shard_b and len(job.shard_sizes) == 3
    round_before = job.round
    commit(st, jid, 7)
    assert job.members == [a, b2, c] and job.round == round_before + 1
    assert job.assignment[b2] == [shard_b] and job.allocation[b2][0][1:3] == list(cursor_b), \
        "the restarted peer goes on from its data's committed cursor"
    assert job.data_present() == (40, 40, 3, 3)
    for t in range(8, 14):
        commit(st, jid, t)
    assert ledger.violations(consumed(st, jid), job.shard_sizes) == []


def test_the_same_data_from_the_same_address_is_refused_while_its_holder_lives() -> None:
    st = ClusterState(10_000)
    a = register(st, address="10.0.0.7:1")
    jid = st.submit(local_spec(), None, 0)[0]
    take(st, a, jid, 10)
    job = st.job(jid)
    job.local_sources[0] = job.local_sources[0].replace("10.0.0.7:1", "10.0.0.7:2")  # as if a came from :2
    b = register(st, address="10.0.0.7:2")
    take(st, b, jid, 10)
    assert job.declined_by(b) and "in the job already" in job.declined[-1].reason


def test_a_finished_local_job_shows_the_data_it_ended_with() -> None:
    st = ClusterState(10_000)
    a, b = register(st), register(st)
    jid = st.submit(local_spec(rounds=2, min_peers=2), None, 0)[0]
    take(st, a, jid, 10)
    take(st, b, jid, 30)
    commit(st, jid, 1)
    st.remove_peer(a, 2, "HEARTBEAT_TIMEOUT")
    commit(st, jid, 3)
    job = st.job(jid)
    assert job.state == SUCCEEDED and job.data_present() == (30, 40, 1, 2)


# -- the ledger under any failures ---------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(sizes=st_.lists(st_.integers(1, 40), min_size=2, max_size=5),
       ops=st_.lists(st_.tuples(st_.sampled_from(["commit", "kill", "restart", "fail"]), st_.integers(0, 4)),
                     max_size=30))
def test_every_peers_own_samples_are_used_exactly_once_per_pass_whatever_fails(sizes: list[int],
                                                                               ops: list[tuple[str, int]]) -> None:
    st = ClusterState(10_000)
    addresses = [f"10.0.1.{i}:1" for i in range(len(sizes))]
    jid = st.submit(local_spec(rounds=1000, min_peers=1, local_steps=1, batch_size=7), None, 0)[0]
    ids = {}
    for i, n in enumerate(sizes):
        ids[i] = register(st, address=addresses[i])
        take(st, ids[i], jid, n, seed=str(i))
    job = st.job(jid)
    now = 1
    for op, k in ops:
        now += 1
        i = k % len(sizes)
        if op == "commit" and job.members:
            commit(st, jid, now)
        elif op == "kill" and ids[i] in st.peers:
            st.remove_peer(ids[i], now, "HEARTBEAT_TIMEOUT")
        elif op == "restart":
            ids[i] = register(st, address=addresses[i], now=now)
            take(st, ids[i], jid, sizes[i], now=now, seed=str(i))
        elif op == "fail" and job.members:  # a member reports half the round, then the ring breaks
            m = job.members[0]
            st.report(m, jid, job.round, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest="d"), now)
            st.report_failure(m, jid, job.round, job.epoch, "", now)
        for m in job.members:  # the plan never hands a member anything but its own data
            assert job.assignment[m] == [job.local_shard[m]]
            assert {r[0] for r in job.allocation.get(m, [])} <= {job.local_shard[m]}
    assert len(job.shard_sizes) == len(sizes), "a restarted peer's data is the shard it had"
    assert ledger.violations(consumed(st, jid), job.shard_sizes) == []
    present = {job.local_shard[m] for m in job.members}
    assert job.data_present()[0] == sum(job.shard_sizes[s] for s in present)


def test_a_take_of_a_shared_job_still_cuts_shards_as_before() -> None:
    st = ClusterState(10_000)
    a = register(st)
    jid = st.submit(JobSpec(rounds=2, num_shards=2, local_steps=1, batch_size=5), None, 0)[0]
    st.take(a, jid, READY, 0, data=replace(data(20), has_labels=False), shard_sizes=[10, 10])
    job = st.job(jid)
    assert job.shard_sizes == [10, 10] and not job.local_sources and job.data_present() == (0, 0, 0, 0)
