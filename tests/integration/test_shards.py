"""GetShards and ``dml shards`` / ``dml plot --shards`` against a real coordinator: peers
registered over gRPC (one with a --max-samples cap), a job placed on them, its shards read back."""
from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from dml.common import auth, rpc
from dml.common.spec import JobSpec
from dml.common.tasks import builtin_data
from dml.client import cli
from dml.coordinator.planner import make_shards
from dml.v1 import control_pb2, control_pb2_grpc, jobs_pb2, types_pb2
from dml.coordinator.service import CoordinatorConfig
from dml.common.version import PROTOCOL_VERSION
from tests.integration.helpers import coordinator, job_stub, join_token, operator_token, take_ready
from tests.integration.test_cluster import _submit

SPEC = JobSpec(rounds=3, min_peers=2, num_shards=10, sharding="classes:2", seed=5)
CAP = 150  # about one shard of digits' 1,438 training samples cut in 10
# The registered peers never heartbeat: a lease long enough that none is evicted mid-test.
SLOW_LEASE = CoordinatorConfig(heartbeat_interval_ms=200, peer_timeout_ms=600_000, tick_ms=100)


TOKENS: dict[str, str] = {}  # peer id -> the token it was issued


def register(address: str, n_port: int, max_samples: int = 0) -> str:
    """Registers a peer that never trains (the job is only placed on it)."""
    with rpc.channel(address) as ch:
        stub = control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(address)))
        req = control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address=f"127.0.0.1:{n_port}",
                                              capability=control_pb2.PeerCapability(device="cpu",
                                                                                    max_samples=max_samples))
        resp = stub.RegisterPeer(req, timeout=10)
        TOKENS[resp.peer_id] = resp.peer_token
        return resp.peer_id


def take(address: str, peer_id: str, job_id: str) -> None:
    """The registered peer takes the job as a real one would (finding digits' data)."""
    with rpc.channel(address) as ch:
        take_ready(control_pb2_grpc.PeerControlStub(auth.with_token(ch, TOKENS[peer_id])), peer_id, job_id)


def cli_run(capsys: pytest.CaptureFixture[str], address: str, token_file, *args: str) -> tuple[int, str, str]:
    code = cli.run([*args, "--coordinator", address, "--token-file", str(token_file)])
    out, err = capsys.readouterr()
    return code, out, err


def test_get_shards_reports_each_members_shards_samples_and_label_counts(tmp_path, capsys) -> None:
    labels = builtin_data("digits").y_train
    shards = make_shards(labels, SPEC.num_shards, SPEC.sharding, SPEC.seed)
    with coordinator(timing=SLOW_LEASE) as srv:
        capped = register(srv.address, 1, max_samples=CAP)
        free = register(srv.address, 2)
        stub = job_stub(srv.address)
        jid = _submit(stub, SPEC)
        for pid in (capped, free):
            take(srv.address, pid, jid)
        resp = stub.GetShards(jobs_pb2.GetShardsRequest(job_id=jid), timeout=10)
        token = tmp_path / "operator.token"
        token.write_text(operator_token(srv.address) + "\n")
        token.chmod(0o600)
        code, out, err = cli_run(capsys, srv.address, token, "shards", jid, "--json")
        assert (code, err) == (0, ""), err
        table_code, table, _ = cli_run(capsys, srv.address, token, "shards", jid)
        png = tmp_path / "mix.png"
        plot_code, plot_out, plot_err = cli_run(capsys, srv.address, token, "plot", "--shards", jid, "-o", str(png))
        with pytest.raises(grpc.RpcError) as e:
            stub.GetShards(jobs_pb2.GetShardsRequest(job_id="job-nope"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "job-nope" in e.value.details()
        with rpc.channel(srv.address) as ch:
            with pytest.raises(grpc.RpcError) as e:  # a peer's join token is not the operator's
                from dml.v1 import jobs_pb2_grpc
                jobs_pb2_grpc.JobServiceStub(auth.with_token(ch, join_token(srv.address))).GetShards(
                    jobs_pb2.GetShardsRequest(job_id=jid), timeout=10)
            assert e.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        bad, _, bad_err = cli_run(capsys, srv.address, token, "shards", "job-nope")
    assert [p.peer_id for p in resp.peers] == [capped, free]
    by_peer = {p.peer_id: p for p in resp.peers}
    assert by_peer[capped].samples <= CAP, "the cap is held"
    assert resp.train_samples == labels.size and resp.num_classes == 10
    placed = sorted(s for p in resp.peers for s in p.shard_ids) + list(resp.unassigned)
    assert sorted(placed) == list(range(SPEC.num_shards)), "every shard once, placed or listed unassigned"
    for p in resp.peers:
        mine = np.concatenate([shards[s] for s in p.shard_ids])
        assert p.samples == mine.size
        assert list(p.label_counts) == np.bincount(labels[mine], minlength=10).tolist()
    unplaced = sum(shards[s].size for s in resp.unassigned)
    assert sum(p.samples for p in resp.peers) + unplaced == labels.size

    d = json.loads(out)
    assert d["job_id"] == jid and d["num_classes"] == 10 and d["unassigned"] == list(resp.unassigned)
    assert [(p["peer_id"], p["shards"], p["samples"], p["label_counts"]) for p in d["peers"]] == [
        (p.peer_id, list(p.shard_ids), p.samples, list(p.label_counts)) for p in resp.peers]
    assert table_code == 0 and capped in table and free in table and "of 1438 training samples" in table
    assert plot_code == 0 and "2 peers" in plot_out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot_err
    assert bad == 2 and "job-nope" in bad_err and "Traceback" not in bad_err and len(bad_err.strip().splitlines()) == 1


def test_a_plan_that_cannot_be_cut_fails_its_job_when_a_peer_takes_it(tmp_path) -> None:
    """The coordinator cuts shards from the data the first take describes (it loads none
    itself): a cut that cannot be made fails the job, saying why."""
    with coordinator(timing=SLOW_LEASE) as srv:
        stub = job_stub(srv.address)
        peer = register(srv.address, 3)
        for spec, words in ((JobSpec(num_shards=10, sharding="classes:11"), "only 10"),
                            (JobSpec(num_shards=100, min_shard_samples=20), "min_shard_samples"),
                            (JobSpec(num_shards=3, sharding="classes:2"), "at least 5 shards")):
            jid = _submit(stub, spec)
            take(srv.address, peer, jid)
            job = stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=10).job
            assert job.state == types_pb2.JOB_STATE_FAILED and words in job.reason, job.reason


def test_a_peers_max_samples_reaches_its_record_and_the_store(tmp_path) -> None:
    from dml.coordinator.records import max_samples
    from dml.peer.runner import Peer, PeerConfig

    with coordinator(tmp_path / "state") as srv:
        p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), max_samples=321)).start()
        try:
            rec = srv.coordinator.view(lambda st: st.peers[p.peer_id])
            assert max_samples(rec) == 321
            _, stored = srv.coordinator.store.load()
            assert [max_samples(r) for r in stored if r.peer_id == p.peer_id] == [321]
        finally:
            p.stop()
