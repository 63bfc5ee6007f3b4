"""A job on a dataset of the coordinator's store, with an in-process coordinator and peers: the
data lives only in the store (`dml data put`), the task file reads it through ``ctx`` (``ctx.array``
for the rows, ``ctx.path`` for a whole CSV), two peers with empty data dirs train it to
SUCCEEDED, each fetching about its own shard's share of the array rather than all of it (the
job's counters say so); a tampered chunk in a peer's cache is found when the dataset is opened
again and fetched again. ``dml shards`` shows what the job's data cost each peer (source, bytes
fetched, the shards it caches), and the coordinator refuses data usage that cannot be true."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from dml.client import cli
from dml.common.datasets import CHUNK_BYTES
from dml.peer.datacache import ChunkCache, StoreSource, manifest_of
from dml.peer.runner import Peer, PeerConfig
from dml.common import auth, rpc
from dml.common.version import PROTOCOL_VERSION
from dml.v1 import control_pb2, control_pb2_grpc, jobs_pb2, types_pb2
from tests.integration.helpers import FAST, coordinator, job_stub, join_token, operator_token, take_ready, wait_for

FINISHED = (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED)

TASK = '''import numpy as np, torch
import dml


def train(ctx):
    x = ctx.array("arrays", "x.npy")  # rows fetched as batches read them
    y = np.loadtxt(ctx.path("labels.csv"), delimiter=",", skiprows=1, dtype=np.int64)  # fetched whole
    return dml.ArrayDataset(x, torch.from_numpy(y))


task = dml.Task(model=lambda: torch.nn.Linear(FEATURES, 2), train=train, name="stored")
'''
ROWS, FEATURES = 32768, 256  # x.npy: 32 MiB and its header, nine chunks


def _dml(capsys: pytest.CaptureFixture[str], address: str, token: pathlib.Path, *args: str) -> str:
    capsys.readouterr()
    code = cli.run([*args, "--coordinator", address, "--token-file", str(token)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip()


def _peer(address: str, root: pathlib.Path) -> Peer:
    (root / "data").mkdir(parents=True)  # empty: the data comes from the store
    p = Peer(PeerConfig(coordinator=address, join_token=join_token(address), allow_job_code=True, plan_wait_s=1.0,
                        exchange_timeout_s=10.0, data_dir=root / "data", code_cache_dir=root / "code",
                        cache_dir=root / "cache")).start()
    p.run_in_thread()
    return p


def _finishes(address: str, jid: str) -> None:
    """Waits for job ``jid`` to finish, and checks that it succeeded (saying why not)."""
    def job() -> jobs_pb2.JobStatus:
        return job_stub(address).GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=10).job

    wait_for(lambda: job().state in FINISHED, 60, f"job {jid} to finish")
    got = job()
    assert got.state == types_pb2.JOB_STATE_SUCCEEDED, (types_pb2.JobState.Name(got.state), got.reason)


def test_a_job_on_a_stored_dataset_fetches_each_peers_share(tmp_path: pathlib.Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "arrays").mkdir(parents=True)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, ROWS)
    x = rng.standard_normal((ROWS, FEATURES), dtype=np.float32)
    x[:, 0] += 2 * y
    np.save(src / "arrays" / "x.npy", x)
    (src / "labels.csv").write_text("label\n" + "".join(f"{v}\n" for v in y))
    task = tmp_path / "submitter" / "stored_task.py"
    task.parent.mkdir()
    task.write_text(TASK.replace("FEATURES", str(FEATURES)))
    with coordinator(tmp_path / "state") as srv:
        token = tmp_path / "operator.token"
        token.write_text(operator_token(srv.address) + "\n")
        token.chmod(0o600)
        _dml(capsys, srv.address, token, "data", "put", "tab", str(src))
        submit = ("submit", "--task", str(task), "--dataset", "tab", "--rounds", "2", "--local-steps", "1",
                  "--batch-size", "8", "--min-peers", "2", "--sharding", "contiguous", "--num-shards", "2")
        members = [_peer(srv.address, tmp_path / f"peer{i}") for i in range(2)]
        try:
            jid = _dml(capsys, srv.address, token, *submit)
            _finishes(srv.address, jid)
            manifest = manifest_of(members[0].client.fetch_manifest("tab"))
            sizes = {f.path: f.size for f in manifest.files}
            x_bytes = sizes["arrays/x.npy"]
            for p in members:
                assert p.prefetch.wait_done(1, 30)  # the plan's rows (cancelled, perhaps, when the job ended)
                trainer = p.store.trainer_for(jid)
                assert trainer is not None and trainer.ctx.source is not None
                c = trainer.ctx.source.counters  # the job's own
                x_fetched = c.bytes_fetched - sizes["labels.csv"]
                # Its shard is half of x's rows: at most half of x's bytes, the chunk a shard boundary
                # cuts and the header's chunk (3/4 of x here); never all of it.
                share = x_bytes // 2 + 2 * CHUNK_BYTES
                assert 0 < x_fetched <= share, (p.peer_id, c)
                assert c.damaged == 0
                folder = p.data_cache.dataset_dir(manifest.digest)
                assert (folder / "labels.csv").read_bytes() == (src / "labels.csv").read_bytes()
                on_disk = (folder / "arrays" / "x.npy").stat()
                assert on_disk.st_size == x_bytes and on_disk.st_blocks * 512 <= share + 4096  # sparse
                assert list((p.config.data_dir or tmp_path).iterdir()) == []
            shards = json.loads(_dml(capsys, srv.address, token, "shards", jid, "--json"))
            assert {p["peer_id"] for p in shards["peers"]} == {p.peer_id for p in members}
            for got in shards["peers"]:  # as each last reported: its own share fetched, only its shards cached
                d = got["data"]
                assert d["source"] == "store" and d["label"] == "store: fetched", got
                assert 0 < d["bytes_fetched"] <= share + sizes["labels.csv"] and d["damaged_refetched"] == 0, got
                assert set(d["cached_shards"]) <= set(got["shards"]), got
            # A tampered chunk in a cache is found when the dataset is opened again (a restarted peer).
            p = members.pop(0)
            ds = p.data_cache.open(manifest, p.client.fetch_chunk)
            fi = ds.index["arrays/x.npy"]
            chunk = min(c for i, c in ds.present() if i == fi)
            off, _ = ds.chunk_span(fi, chunk)
            with open(ds.file_path(fi), "r+b") as f:
                f.seek(off + 100)
                f.write(b"tampered")
            p.stop()  # releases its cache folder
            fresh = ChunkCache(p.config.cache_dir)
            source = StoreSource(fresh.open(manifest, members[0].client.fetch_chunk))
            assert fresh.counters.damaged == 1
            rows = source.array("arrays/x.npy")
            r = max(0, (off - rows.offset) // rows.row_bytes + 1)
            assert np.array_equal(rows[r], x[r]) and fresh.counters.chunks_fetched == 1
            fresh.close()
        finally:
            for p in members:
                p.stop()


@contextlib.contextmanager
def _tiny_store(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[Any, pathlib.Path]]:
    """A coordinator whose store holds dataset ``tiny`` (one 100-byte file), and the file
    holding its operator token."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 100)
    # The tests' hand-made peers send no heartbeats: a lease FAST's 1.5 s would let a stalled
    # machine evict them between two calls.
    with coordinator(tmp_path / "state", timing=dataclasses.replace(FAST, peer_timeout_ms=120_000)) as srv:
        token = tmp_path / "operator.token"
        token.write_text(operator_token(srv.address) + "\n")
        token.chmod(0o600)
        _dml(capsys, srv.address, token, "data", "put", "tiny", str(src))
        yield srv, token


def test_the_coordinator_refuses_data_usage_that_cannot_be_true(tmp_path: pathlib.Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-made peer takes a job on a store dataset: unknown shard ids, more ids than the job
    has shards, a source other than the job's, an unknown source and a huge free cache are each
    INVALID_ARGUMENT with a message, and nothing is recorded; a true usage is shown."""
    with _tiny_store(tmp_path, capsys) as (srv, token):
        with rpc.channel(srv.address) as ch:
            joiner = control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(srv.address)))
            with pytest.raises(grpc.RpcError) as e:
                joiner.RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION,
                    address="127.0.0.1:9", public_key=bytes(32),
                    capability=control_pb2.PeerCapability(has_cache_free=True, cache_free_bytes=1 << 62)), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_free_bytes" in e.value.details()
            reg = joiner.RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address="127.0.0.1:9", public_key=bytes(32)),
                                      timeout=10)
        jid = _dml(capsys, srv.address, token, "submit", "--task", "digits", "--dataset", "tiny", "--num-shards", "4",
                   "--min-peers", "2")
        with rpc.channel(srv.address) as ch:
            stub = control_pb2_grpc.PeerControlStub(auth.with_token(ch, reg.peer_token))
            store = control_pb2.DATA_SOURCE_STORE
            for usage, words in [
                (control_pb2.DataUsage(source=store, cached_shard_ids=[4]), "unknown shard id 4"),
                (control_pb2.DataUsage(source=store, cached_shard_ids=list(range(5))), "5 cached shard ids for a job of 4"),
                (control_pb2.DataUsage(source=control_pb2.DATA_SOURCE_LOCAL), "source local, but the job's data is store"),
                (control_pb2.DataUsage(source=7), "source must be LOCAL or STORE"),
                (control_pb2.DataUsage(source=store, bytes_fetched=1 << 63), "bytes_fetched must be in"),
            ]:
                with pytest.raises(grpc.RpcError) as e:
                    _take(stub, reg.peer_id, jid, usage)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), e.value.details()
            shards = json.loads(_dml(capsys, srv.address, token, "shards", jid, "--json"))
            assert shards["peers"] == [], "nothing recorded, the peer not taken"
            _take(stub, reg.peer_id, jid, control_pb2.DataUsage(source=store, chunks_fetched=1, bytes_fetched=100,
                                                                 cached_shard_ids=[3, 1]), free=5)
        job = srv.coordinator.state.job(jid)
        assert job.data_usage[reg.peer_id].cached_shards == (3, 1) and job.data_usage[reg.peer_id].cache_free == 5


def _take(stub: control_pb2_grpc.PeerControlStub, peer_id: str, jid: str, usage: control_pb2.DataUsage,
          free: int | None = None) -> None:
    """A READY take of the digits task's data, carrying ``usage`` (and ``free`` cache bytes)."""
    take_ready(_WithUsage(stub, usage, free), peer_id, jid)


class _WithUsage:
    """A PeerControl stub whose TakeJob requests carry a given data usage."""

    def __init__(self, stub: control_pb2_grpc.PeerControlStub, usage: control_pb2.DataUsage, free: int | None) -> None:
        self.stub, self.usage, self.free = stub, usage, free

    def TakeJob(self, req: control_pb2.TakeJobRequest, timeout: float) -> control_pb2.TakeJobResponse:  # noqa: N802
        req.data_usage.CopyFrom(self.usage)
        if self.free is not None:
            req.has_cache_free, req.cache_free_bytes = True, self.free
        return self.stub.TakeJob(req, timeout=timeout)



def test_a_member_gets_the_indices_of_its_own_shards_and_nothing_else(tmp_path: pathlib.Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """GetShardIndices (what a peer's prefetch asks for the shards its plan names): a member gets
    the indices of the shards the job assigns to it, whole, in the order asked; shards of another
    member are left out; ids out of range, repeated or too many are INVALID_ARGUMENT, another
    peer's id PERMISSION_DENIED, no credential UNAUTHENTICATED, an unknown job NOT_FOUND."""
    with _tiny_store(tmp_path, capsys) as (srv, token):
        with rpc.channel(srv.address) as ch:
            joiner = control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(srv.address)))
            regs = [joiner.RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address=f"127.0.0.1:{9 + i}",
                                                                         public_key=bytes(32)), timeout=10)
                    for i in range(2)]
        jid = _dml(capsys, srv.address, token, "submit", "--task", "digits", "--dataset", "tiny", "--num-shards", "4",
                   "--min-peers", "2")
        with rpc.channel(srv.address) as ch:
            a, b = (control_pb2_grpc.PeerControlStub(auth.with_token(ch, r.peer_token)) for r in regs)
            for stub, r in ((a, regs[0]), (b, regs[1])):
                take_ready(stub, r.peer_id, jid)
            job = srv.coordinator.state.job(jid)
            assert job.state == "RUNNING"
            mine, theirs = (sorted(job.assignment[r.peer_id]) for r in regs)
            with srv.coordinator._cond:
                want = srv.coordinator.shard_indices(job)

            def ask(stub, shard_ids, peer_id=regs[0].peer_id, job_id=jid):
                return stub.GetShardIndices(control_pb2.GetShardIndicesRequest(
                    peer_id=peer_id, job_id=job_id, shard_ids=shard_ids), timeout=10)

            got = ask(a, mine[::-1] + theirs)
            assert sorted(got.shard_indices) == mine, "its own shards only"
            for s in mine:
                assert list(got.shard_indices[s].indices) == want[s].tolist()
            assert not ask(a, theirs).shard_indices
            for ids, words in (([4], "below the job's 4 shards"), ([mine[0], mine[0]], "distinct"),
                               ([0, 1, 2, 3, 0], "distinct")):
                with pytest.raises(grpc.RpcError) as e:
                    ask(a, ids)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details(), ids
            with pytest.raises(grpc.RpcError) as e:
                ask(a, mine, peer_id=regs[1].peer_id)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as e:
                ask(a, mine, job_id="job-nope")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e:
                ask(control_pb2_grpc.PeerControlStub(ch), mine)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
