"""The peers' data usage in the state machine: what a take or a report says of a job's data is
checked (source, counts, shard ids), kept per (job, peer), and fed to placement for a job on a
store dataset (cached shards, free cache bytes, shard bytes from the dataset's size), never for
local data; ``dml shards`` shows it."""
from __future__ import annotations

import itertools

import pytest

from dml.common.spec import JobSpec
from dml.coordinator.records import (
    HEARTBEAT_TIMEOUT,
    LOCAL_DATA,
    RUNNING,
    STORE_DATA,
    BadReport,
    DataUsage,
    JobData,
    Report,
    check_usage,
)
from dml.coordinator.service import shards_view
from dml.coordinator.state import READY, ClusterState, shard_bytes
from dml.coordinator.store import job_from_dict, job_to_dict

PORTS = itertools.count(7100)
DATA = JobData(train_samples=60, digest="d" * 64)
SHARD_BYTES = 1000  # 6 shards of 10 samples over a 6000-byte dataset


def register(s: ClusterState, cache_free: int | None = None) -> str:
    cap = {"device": "cpu", "max_samples": 0, "cache_free_bytes": cache_free}
    return s.register(f"10.0.0.3:{next(PORTS)}", cap, 0)[0]


def submit(s: ClusterState, dataset: str = "tab", **kw: object) -> str:
    base = dict(rounds=5, min_peers=2, num_shards=6, local_steps=1, batch_size=10, dataset=dataset)
    base.update(kw)
    jid, _ = s.submit(JobSpec(**base), None, 0, dataset_bytes=6 * SHARD_BYTES)  # type: ignore[arg-type]
    return jid


def take(s: ClusterState, jid: str, peer: str, usage: DataUsage | None) -> None:
    s.take(peer, jid, READY, 1, data=DATA, shard_sizes=[10] * 6, usage=usage)


def store(cached: tuple[int, ...] = (), free: int | None = None, fetched: int = 0) -> DataUsage:
    return DataUsage(STORE_DATA, chunks_fetched=fetched // 100, bytes_fetched=fetched, cached_shards=cached,
                     cache_free=free)


def report(s: ClusterState, jid: str, peer: str, usage: DataUsage | None = None, digest: str = "p") -> None:
    job = s.job(jid)
    s.report(peer, jid, job.round, job.epoch, Report(samples=job.allocated(peer), train_loss=1.0, digest=digest),
             2, usage=usage)


def test_a_dead_peers_shards_go_to_the_survivor_that_reported_caching_them() -> None:
    s = ClusterState(1000)
    a, b, c = register(s), register(s), register(s)
    jid = submit(s, min_peers=3)
    for p in (a, b, c):
        take(s, jid, p, store())
    job = s.job(jid)
    assert job.state == RUNNING and sorted(len(job.assignment[p]) for p in (a, b, c)) == [2, 2, 2]
    theirs = tuple(job.assignment[b])
    report(s, jid, c, store(cached=tuple(job.assignment[c]) + theirs))  # c caches b's shards too
    assert job.data_usage[c].cached_shards == tuple(job.assignment[c]) + theirs
    s.remove_peer(b, 3, HEARTBEAT_TIMEOUT)
    assert set(theirs) <= set(job.assignment[c]), "both to the survivor caching them, none to a"
    assert len(job.assignment[a]) == 2


def test_a_joiner_that_reports_a_cached_shard_takes_it() -> None:
    s = ClusterState(1000)
    a, b = register(s), register(s)
    jid = submit(s)
    take(s, jid, a, store())
    take(s, jid, b, store())
    job = s.job(jid)
    assert sorted(len(job.assignment[p]) for p in (a, b)) == [3, 3]
    wanted = max(job.assignment[a])  # not the shard a joiner takes by default (the lowest id)
    c = register(s)
    take(s, jid, c, store(cached=(wanted,)))
    assert c not in job.members, "it joins at the round boundary"
    report(s, jid, a)
    report(s, jid, b)
    assert c in job.members and wanted in job.assignment[c] and len(job.assignment[c]) == 2


def test_a_peer_whose_free_cache_cannot_hold_a_shard_is_not_given_it() -> None:
    s = ClusterState(1000)
    a, b = register(s), register(s)
    jid = submit(s)
    take(s, jid, a, store(free=SHARD_BYTES - 1))
    take(s, jid, b, store())
    job = s.job(jid)
    assert job.assignment[a] == [] and sorted(job.assignment[b]) == list(range(6))
    assert job.reason == "" and s.plan_for(b) is job


def test_free_cache_space_known_from_registration_counts_and_a_cached_shard_costs_none() -> None:
    s = ClusterState(1000)
    a, b = register(s, cache_free=0), register(s)
    jid = submit(s)
    take(s, jid, a, store(cached=(2,)))  # no free bytes of its own in the usage: its registration's
    take(s, jid, b, store())
    job = s.job(jid)
    assert job.assignment[a] == [2], "only the shard it caches already"
    assert sorted(job.assignment[b]) == [0, 1, 3, 4, 5]


def test_local_data_places_as_before_whatever_the_peers_say_of_their_caches() -> None:
    s = ClusterState(1000)
    a, b = register(s, cache_free=0), register(s, cache_free=0)
    jid = submit(s, dataset="")
    assert shard_bytes(s.job(jid)) is None
    take(s, jid, a, DataUsage(LOCAL_DATA, cache_free=0))
    take(s, jid, b, DataUsage(LOCAL_DATA, cache_free=0))
    job = s.job(jid)
    assert sorted(len(job.assignment[p]) for p in (a, b)) == [3, 3]
    assert job.data_usage[a].source == LOCAL_DATA


def test_shard_bytes_are_the_datasets_bytes_by_each_shards_share_of_samples() -> None:
    s = ClusterState(1000)
    jid = submit(s)
    job = s.job(jid)
    assert shard_bytes(job) is None, "no shards before the first take"
    job.shard_sizes = [10, 20, 30, 0, 0, 0]
    assert shard_bytes(job) == [1000, 2000, 3000, 0, 0, 0]


@pytest.mark.parametrize("usage, on_store, message", [
    (DataUsage("nfs"), True, "unknown source"),
    (DataUsage(LOCAL_DATA), True, "source local, but the job's data is store"),
    (DataUsage(STORE_DATA), False, "source store, but the job's data is local"),
    (DataUsage(STORE_DATA, bytes_fetched=1 << 60), True, "bytes_fetched must be in"),
    (DataUsage(STORE_DATA, chunks_fetched=-1), True, "chunks_fetched must be in"),
    (DataUsage(STORE_DATA, cache_free=1 << 60), True, "cache free bytes"),
    (DataUsage(LOCAL_DATA, cached_shards=(0,)), False, "cached shards reported for local data"),
    (DataUsage(STORE_DATA, cached_shards=tuple(range(7))), True, "7 cached shard ids for a job of 6 shards"),
    (DataUsage(STORE_DATA, cached_shards=(6,)), True, "unknown shard id 6"),
    (DataUsage(STORE_DATA, cached_shards=(1, 1)), True, "listed twice"),
])
def test_a_usage_that_cannot_be_true_of_the_job_is_refused_with_a_message(usage: DataUsage, on_store: bool,
                                                                           message: str) -> None:
    with pytest.raises(BadReport, match=message):
        check_usage(usage, 6, on_store)


def test_a_bad_usage_in_a_take_or_a_report_records_nothing() -> None:
    s = ClusterState(1000)
    a, b = register(s), register(s)
    jid = submit(s)
    with pytest.raises(BadReport, match="unknown shard id 9"):
        take(s, jid, a, store(cached=(9,)))
    job = s.job(jid)
    assert a not in job.ready and a not in job.data_usage
    take(s, jid, a, store(fetched=600))
    take(s, jid, b, store())
    before = s.job(jid).allocation[a]
    with pytest.raises(BadReport, match="cached shard ids for a job of 6 shards"):
        report(s, jid, a, store(cached=tuple(range(100))))
    assert job.data_usage[a].bytes_fetched == 600 and a not in job.reports and job.allocation[a] == before


def test_usage_is_shown_per_member_and_kept_out_of_the_store() -> None:
    s = ClusterState(1000)
    a, b = register(s), register(s)
    jid = submit(s)
    take(s, jid, a, store(fetched=3000, free=50))
    take(s, jid, b, None)  # an older peer says nothing
    job = s.job(jid)
    view = {p.peer_id: p for p in shards_view(job, None, None).peers}
    assert view[a].usage == store(fetched=3000, free=50) and view[b].usage is None
    d = job_to_dict(job)
    assert "data_usage" not in d and job_from_dict(d, []).data_usage == {}, "memory only"
    assert job_from_dict(d, []).dataset_bytes == 6 * SHARD_BYTES
