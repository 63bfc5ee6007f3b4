"""A real coordinator and three real peers in one process, over gRPC on 127.0.0.1:0."""
from __future__ import annotations

import io

import grpc
import pytest
import torch
from dml.common import rpc
from dml.v1 import jobs_pb2, types_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dml.common.spec import spec_to_pb
from dml.common.spec import JobSpec
from tests.integration.helpers import (
    assert_state_dicts_identical,
    coordinator,
    fetch_state,
    job_stub,
    peers,
    wait_for,
)

SMALL = JobSpec(task="digits", rounds=12, local_steps=5, batch_size=32, learning_rate=0.1, min_peers=3,
                checkpoint_every_rounds=5)


def _submit(stub, spec: JobSpec) -> str:
    return stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=10).job_id


def _job(stub, jid: str, history: bool = False) -> jobs_pb2.GetJobResponse:
    return stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid, include_history=history), timeout=5)


def test_three_peers_train_commit_and_agree_bit_for_bit(tmp_path):
    with coordinator(tmp_path / "state") as srv, peers(srv.address, 3) as ps:
        stub = job_stub(srv.address)
        jid = _submit(stub, SMALL)
        wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 60, "job to succeed")
        resp = _job(stub, jid, history=True)
        assert resp.job.round == SMALL.rounds
        assert [r.round for r in resp.history] == list(range(1, SMALL.rounds + 1))
        assert all(r.members == 3 for r in resp.history)
        assert resp.history[-1].test_accuracy > resp.history[0].test_accuracy
        # Every peer holds the committed parameters, bit for bit, and they match the digest.
        got = [fetch_state(p.address, jid, SMALL.rounds, p.peer_id, srv.coordinator.signing_key) for p in ps]
        assert {g[0] for g in got} == {resp.history[-1].digest}
        assert_state_dicts_identical([g[1] for g in got])
        # The coordinator's checkpoint (what `dml model` downloads) is the same model.
        chunks = list(stub.DownloadModel(jobs_pb2.DownloadModelRequest(job_id=jid), timeout=10))
        assert chunks[0].round == SMALL.rounds and chunks[0].digest == resp.history[-1].digest
        model = torch.load(io.BytesIO(b"".join(c.data for c in chunks)), weights_only=True)
        assert_state_dicts_identical([got[0][1], model])


def test_invalid_jobs_are_invalid_argument_with_a_message():
    with coordinator() as srv:
        stub = job_stub(srv.address)
        for spec, words in [
            (JobSpec(rounds=0), "rounds"),
            (JobSpec(task="imagenet"), "unknown task"),
            (JobSpec(sharding="dirichlet:-1"), "sharding"),
            (JobSpec(aggregation="allgather"), "aggregation"),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                _submit(stub, spec)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            _job(stub, "job-nope")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection_are_served():
    with coordinator() as srv:
        ch = rpc.channel(srv.address)
        for name in ("", "dml.v1.JobService", "dml.v1.PeerControl"):
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        out = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in out[0].list_services_response.service}
        assert {"dml.v1.JobService", "dml.v1.PeerControl", "grpc.health.v1.Health"} <= names


def test_job_waits_for_min_peers_and_says_why():
    with coordinator() as srv:
        stub = job_stub(srv.address)
        jid = _submit(stub, JobSpec(rounds=3, local_steps=2, min_peers=2))
        with peers(srv.address, 1):
            wait_for(lambda: "1 ready, 0 declined, 2 needed" in _job(stub, jid).job.reason, 10, "waiting reason")
            assert _job(stub, jid).job.state == types_pb2.JOB_STATE_PENDING
            with peers(srv.address, 1):
                wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 60, "job to succeed")


def test_peer_that_leaves_between_rounds_is_evicted_and_the_job_succeeds():
    with coordinator() as srv, peers(srv.address, 2) as ps:
        stub = job_stub(srv.address)
        jid = _submit(stub, JobSpec(rounds=400, local_steps=5, min_peers=2))
        with peers(srv.address, 1) as extra:
            wait_for(lambda: len(_job(stub, jid).job.peers) == 3 and _job(stub, jid).job.round >= 5, 30, "3-peer ring")
        # `extra` stopped: it no longer heartbeats nor serves; the survivors carry on.
        gone = extra[0].peer_id
        wait_for(lambda: gone not in _job(stub, jid).job.peers, 10, "eviction")
        wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 120, "job to succeed")
        resp = _job(stub, jid, history=True)
        assert resp.history[-1].members == 2
        shards = [r for r in resp.history if r.members == 2]
        assert shards, "rounds after the eviction ran with the survivors"
        got = [fetch_state(p.address, jid, 400, p.peer_id, srv.coordinator.signing_key) for p in ps]
        assert_state_dicts_identical([g[1] for g in got])


def test_checkpoints_follow_their_own_schedule_when_evaluation_is_sparser():
    """eval_every_rounds must not thin out checkpoints (it once did: uploads only happened on
    rounds that were also evaluated)."""
    spec = JobSpec(rounds=8, local_steps=2, min_peers=2, checkpoint_every_rounds=2, eval_every_rounds=3)
    with coordinator() as srv, peers(srv.address, 2) as ps:
        uploads: list[int] = []
        for p in ps:
            real = p.client.upload_checkpoint

            def spy(peer_id, job_id, rnd, *rest, _real=real):
                uploads.append(rnd)
                return _real(peer_id, job_id, rnd, *rest)

            p.client.upload_checkpoint = spy  # type: ignore[method-assign]
        stub = job_stub(srv.address)
        jid = _submit(stub, spec)
        wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 60, "job to succeed")
        hist = _job(stub, jid, history=True).history
    assert sorted(set(uploads)) == [2, 4, 6, 8]
    assert [r.round for r in hist if r.test_evaluated] == [3, 6, 8]
    assert [r.test_accuracy for r in hist][3] == hist[2].test_accuracy  # round 4 carries round 3's
