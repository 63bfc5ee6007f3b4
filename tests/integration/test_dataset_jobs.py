"""A job on a dataset of the coordinator's store, with an in-process coordinator and peers: the
data lives only in the store (`dml data put`), the task file reads ``ctx.data_dir``, two peers
with empty data dirs fetch it into their caches and train it to SUCCEEDED; a second job on the
same dataset fetches nothing; a tampered cache chunk is fetched again. ``dml shards`` shows what
each job's data cost each peer (bytes fetched on the first job, cache hits on the second, the
shards cached), and the coordinator refuses data usage that cannot be true."""
from __future__ import annotations

import pathlib

import json

import grpc
import numpy as np
import pytest

from dml.client import cli
from dml.peer.datacache import manifest_of
from dml.peer.runner import Peer, PeerConfig
from dml.common import auth, rpc
from dml.v1 import control_pb2, control_pb2_grpc, jobs_pb2, types_pb2
from tests.integration.helpers import coordinator, job_stub, join_token, operator_token, take_ready, wait_for

FINISHED = (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED)

TASK = '''import numpy as np, torch
import dml


def train(ctx):
    x = np.load(ctx.path("arrays", "x.npy"))
    y = np.loadtxt(ctx.path("labels.csv"), delimiter=",", skiprows=1, dtype=np.int64)
    return dml.ArrayDataset(torch.from_numpy(x), torch.from_numpy(y))


task = dml.Task(model=lambda: torch.nn.Linear(4, 2), train=train, name="stored")
'''


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


def test_a_job_on_a_stored_dataset_trains_from_the_peers_caches(tmp_path: pathlib.Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "arrays").mkdir(parents=True)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    np.save(src / "arrays" / "x.npy", (rng.standard_normal((64, 4)) + y[:, None]).astype(np.float32))
    (src / "labels.csv").write_text("label\n" + "".join(f"{v}\n" for v in y))
    task = tmp_path / "submitter" / "stored_task.py"
    task.parent.mkdir()
    task.write_text(TASK)
    with coordinator(tmp_path / "state") as srv:
        token = tmp_path / "operator.token"
        token.write_text(operator_token(srv.address) + "\n")
        token.chmod(0o600)
        _dml(capsys, srv.address, token, "data", "put", "tab", str(src))
        submit = ("submit", "--task", str(task), "--dataset", "tab", "--rounds", "2", "--local-steps", "1",
                  "--batch-size", "8", "--min-peers", "2")
        members = [_peer(srv.address, tmp_path / f"peer{i}") for i in range(2)]
        try:
            jid = _dml(capsys, srv.address, token, *submit)
            _finishes(srv.address, jid)
            manifest = manifest_of(members[0].client.fetch_manifest("tab"))
            size = sum(f.size for f in manifest.files)
            shards = json.loads(_dml(capsys, srv.address, token, "shards", jid, "--json"))
            assert {p["peer_id"] for p in shards["peers"]} == {p.peer_id for p in members}
            for p in shards["peers"]:  # each fetched the whole dataset (materialised whole: every shard cached)
                assert p["data"]["source"] == "store" and p["data"]["label"] == "store: fetched", p
                assert (p["data"]["bytes_fetched"], p["data"]["chunks_fetched"], p["data"]["cache_hits"]) == (size, 2, 0)
                assert p["data"]["cached_shards"] == list(range(24)) and p["data"]["cache_free_bytes"] is None
            for p in members:
                c = p.data_cache.counters
                assert c.chunks_fetched == 2 and c.hits == 0 and c.bytes_fetched == sum(f.size for f in manifest.files)
                folder = p.data_cache.dataset_dir(manifest.digest)
                assert (folder / "labels.csv").read_bytes() == (src / "labels.csv").read_bytes()
                assert (folder / "arrays" / "x.npy").read_bytes() == (src / "arrays" / "x.npy").read_bytes()
                assert list((p.config.data_dir or tmp_path).iterdir()) == []

            jid2 = _dml(capsys, srv.address, token, *submit)
            _finishes(srv.address, jid2)
            for p in members:
                assert p.data_cache.counters.chunks_fetched == 2, "the second job fetched nothing"
            shards = json.loads(_dml(capsys, srv.address, token, "shards", jid2, "--json"))
            for p in shards["peers"]:  # its own counters: nothing fetched, both chunks found in the cache
                assert (p["data"]["label"], p["data"]["bytes_fetched"], p["data"]["cache_hits"]) == ("store: cache", 0, 2)
                assert p["data"]["cached_shards"] == list(range(24))
            table = _dml(capsys, srv.address, token, "shards", jid2).splitlines()
            assert "DATA" in table[0] and "HITS" in table[0]
            assert all(" store: cache " in line and " 0 B " in line for line in table[1:3]), table

            # A tampered chunk in a cache is found when the dataset is assembled again.
            cache = members[0].data_cache
            chunk = cache.chunk_path(manifest.files[0].chunks[0])
            chunk.write_bytes(b"tampered" + chunk.read_bytes()[8:])
            dataset = cache.dataset_dir(manifest.digest)
            (dataset / manifest.files[0].path).unlink()
            assert cache.materialise(manifest, members[0].client.fetch_chunk) == dataset
            assert (cache.counters.damaged, cache.counters.chunks_fetched, cache.counters.hits) == (1, 3, 1)
            assert (dataset / "labels.csv").read_bytes() == (src / "labels.csv").read_bytes()
        finally:
            for p in members:
                p.stop()


def test_the_coordinator_refuses_data_usage_that_cannot_be_true(tmp_path: pathlib.Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-made peer takes a job on a store dataset: unknown shard ids, more ids than the job
    has shards, a source other than the job's, an unknown source and a huge free cache are each
    INVALID_ARGUMENT with a message, and nothing is recorded; a true usage is shown."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 100)
    with coordinator(tmp_path / "state") as srv:
        token = tmp_path / "operator.token"
        token.write_text(operator_token(srv.address) + "\n")
        token.chmod(0o600)
        _dml(capsys, srv.address, token, "data", "put", "tiny", str(src))
        with rpc.channel(srv.address) as ch:
            joiner = control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(srv.address)))
            with pytest.raises(grpc.RpcError) as e:
                joiner.RegisterPeer(control_pb2.RegisterPeerRequest(
                    address="127.0.0.1:9", public_key=bytes(32),
                    capability=control_pb2.PeerCapability(has_cache_free=True, cache_free_bytes=1 << 62)), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_free_bytes" in e.value.details()
            reg = joiner.RegisterPeer(control_pb2.RegisterPeerRequest(address="127.0.0.1:9", public_key=bytes(32)),
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

