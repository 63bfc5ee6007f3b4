"""A peer's data usage of a job (peer/datausage.py) and its translation at the coordinator
(servicer.usage_from_pb, peer_shards_pb): the counters a job adds up, the shards it caches
(every one of a store dataset assembled whole, none of local data), the cache's free bytes, and
what the coordinator refuses before it builds anything."""
from __future__ import annotations

import io
import types

import numpy as np
import pytest
from dml.v1 import control_pb2, types_pb2

from dml.common.datasets import FileEntry, chunk_digest, manifest_digest
from dml.common.task import Context
from dml.coordinator.records import BadReport, DataUsage
from dml.coordinator.service import PeerShardView
from dml.coordinator.servicer import peer_shards_pb, usage_from_pb
from dml.peer import datausage
from dml.peer.datacache import ChunkCache, Counters, Manifest, StoreSource


def test_a_store_job_assembled_whole_caches_every_shard_and_a_local_one_none() -> None:
    job = datausage.JobUsage(datausage.STORE, 4)
    assert datausage.cached_shards(job) == [], "not there yet"
    job.whole = True
    job.add(Counters(chunks_fetched=2, bytes_fetched=300, hits=1, damaged=1))
    job.add(Counters(hits=2))
    assert datausage.cached_shards(job) == [0, 1, 2, 3]
    u = datausage.usage(job)
    assert u.source == control_pb2.DATA_SOURCE_STORE and list(u.cached_shard_ids) == [0, 1, 2, 3]
    assert (u.chunks_fetched, u.bytes_fetched, u.cache_hits, u.damaged_refetched) == (2, 300, 3, 1)
    local = datausage.local(4)
    local.whole = True  # whatever a reader says, local data caches nothing
    assert datausage.cached_shards(local) == [] and datausage.usage(local).source == control_pb2.DATA_SOURCE_LOCAL


def test_free_cache_bytes_are_the_limit_minus_what_the_cache_holds(tmp_path) -> None:
    assert datausage.cache_free(ChunkCache(tmp_path / "a")) is None, "no limit"
    cache = ChunkCache(tmp_path / "b", max_bytes=1000)
    assert datausage.cache_free(cache) == 1000
    data = b"x" * 300
    files = (FileEntry("f", 300, (chunk_digest(data),)),)
    StoreSource(cache.open(Manifest("d", manifest_digest(list(files)), files), lambda d: data)).path("f")
    assert datausage.cache_free(cache) == 700


def _array_dataset() -> tuple[Manifest, dict[str, bytes]]:
    """A 200-row array of 16-byte rows (``x.npy``) as a store dataset in 256-byte chunks: its
    manifest and its chunks by digest."""
    buf = io.BytesIO()
    np.save(buf, np.arange(800, dtype=np.float32).reshape(200, 4))
    raw = buf.getvalue()
    parts = [raw[i : i + 256] for i in range(0, len(raw), 256)]
    files = (FileEntry("x.npy", len(raw), tuple(chunk_digest(p) for p in parts)),)
    return Manifest("d", manifest_digest(list(files)), files), {chunk_digest(p): p for p in parts}


def test_a_store_job_caches_the_shards_it_was_given_once_their_rows_are_present(tmp_path) -> None:
    """Rows 0-99 of a 200-row array in 16-byte rows, 256-byte chunks: shard 0 (rows 0-49) and
    shard 1 (rows 150-199) of the plan; only shard 0's rows are fetched."""
    manifest, chunks = _array_dataset()
    src = StoreSource(ChunkCache(tmp_path, chunk_bytes=256).open(manifest, chunks.__getitem__))
    job = datausage.JobUsage(datausage.STORE, 3, counters=src.counters, store=src, rows=200)
    plan = types_pb2.Plan()
    plan.shard_indices[0].indices.extend(range(50))
    plan.shard_indices[1].indices.extend(range(150, 200))
    datausage.note_plan(job, plan)
    assert datausage.cached_shards(job) == [], "no training array opened yet"
    arr = Context(data_dir=src.root, source=src).array("x.npy")  # a training array
    assert datausage.cached_shards(job) == []
    arr[np.arange(50)]
    assert datausage.cached_shards(job) == [0]
    assert datausage.usage(job).bytes_fetched == src.counters.bytes_fetched > 0  # the source's own counters
    np.asarray(arr)  # every row: every shard, those never given too
    assert datausage.cached_shards(job) == [0, 1, 2]


def test_a_restarted_peer_knows_the_shards_it_was_given_and_still_holds(tmp_path) -> None:
    """The shards' indices are kept beside the dataset in the cache: a second run of the peer on
    the same cache (a new JobUsage, a new source) reports the shard it fetched before as cached at
    its take, before any plan; another job's run knows nothing; a damaged or lying file is ignored."""
    manifest, chunks = _array_dataset()

    def run(job_id: str) -> tuple[datausage.JobUsage, object]:
        cache = ChunkCache(tmp_path, chunk_bytes=256)
        src = StoreSource(cache.open(manifest, chunks.__getitem__))
        job = datausage.JobUsage(datausage.STORE, 3, counters=src.counters, store=src, rows=200, job_id=job_id)
        return job, (cache, Context(data_dir=src.root, source=src).array("x.npy"))

    job, (cache, arr) = run("job-1")
    plan = types_pb2.Plan()
    plan.shard_indices[1].indices.extend(range(150, 200))
    datausage.note_plan(job, plan)
    arr[np.arange(150, 200)]
    assert datausage.cached_shards(job) == [1]
    cache.close()

    again, (cache, _) = run("job-1")
    assert datausage.cached_shards(again) == [], "nothing known before the kept indices are read"
    assert datausage.load_shards(again) == 1 and datausage.cached_shards(again) == [1]
    cache.close()
    other, (cache, _) = run("job-2")
    assert other.store is not None and other.store.root == again.store.root  # the same dataset folder
    assert datausage.load_shards(other) == 0 and datausage.cached_shards(other) == []
    cache.close()

    path = datausage.shards_file(again)
    assert path is not None
    for damage in (b"not an npz", None):
        if damage is None:  # a shard id past the job's shards
            b = io.BytesIO()
            np.savez(b, **{"7": np.arange(3)})
            damage = b.getvalue()
        path.write_bytes(damage)
        fresh, (cache, _) = run("job-1")
        assert datausage.load_shards(fresh) == 0 and datausage.cached_shards(fresh) == []
        cache.close()


def test_fill_adds_the_trainers_usage_and_nothing_for_a_trainer_without_one(tmp_path) -> None:
    peer = types.SimpleNamespace(data_cache=ChunkCache(tmp_path, max_bytes=10))
    trainer = types.SimpleNamespace()
    req = control_pb2.ReportRoundRequest()
    datausage.fill(req, trainer, peer)  # type: ignore[arg-type]
    assert not req.HasField("data_usage") and not req.has_cache_free
    datausage.attach(trainer, datausage.local(2))  # type: ignore[arg-type]
    datausage.fill(req, trainer, peer)  # type: ignore[arg-type]
    assert req.HasField("data_usage") and req.has_cache_free and req.cache_free_bytes == 10


def test_the_coordinator_reads_a_usage_and_refuses_an_unknown_source() -> None:
    assert usage_from_pb(control_pb2.ReportRoundRequest()) is None, "an older peer: nothing recorded"
    req = control_pb2.TakeJobRequest(data_usage=control_pb2.DataUsage(
        source=control_pb2.DATA_SOURCE_STORE, chunks_fetched=1, bytes_fetched=2, cache_hits=3, damaged_refetched=4,
        cached_shard_ids=[5, 0]), has_cache_free=True, cache_free_bytes=6)
    assert usage_from_pb(req) == DataUsage("store", 1, 2, 3, 4, (5, 0), 6)
    req.has_cache_free = False
    assert usage_from_pb(req).cache_free is None  # type: ignore[union-attr]
    for source in (control_pb2.DATA_SOURCE_UNSPECIFIED, 9):
        with pytest.raises(BadReport, match="source must be LOCAL or STORE"):
            usage_from_pb(control_pb2.TakeJobRequest(data_usage=control_pb2.DataUsage(source=source)))


def test_get_shards_carries_the_usage_and_says_nothing_for_a_peer_that_sent_none() -> None:
    pb = peer_shards_pb(PeerShardView("p", [0], 10, None, DataUsage("store", 1, 2, 3, 0, (1, 0), None)))
    assert (pb.data_source, pb.chunks_fetched, pb.bytes_fetched, pb.cache_hits) == ("store", 1, 2, 3)
    assert list(pb.cached_shard_ids) == [0, 1] and not pb.has_cache_free
    none = peer_shards_pb(PeerShardView("q", [1], 10, None))
    assert none.data_source == "" and not none.cached_shard_ids
