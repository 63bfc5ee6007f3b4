"""The attacks of issue 11 against a real coordinator and real peers (in one process, over gRPC
on 127.0.0.1:0): forged reports, failures and checkpoints, unauthenticated job control, fake
peers, a peer acting for another, non-members on the exchange. Each is refused with the right
status code, changes nothing committed, and the job goes on."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from dml.v1 import control_pb2, control_pb2_grpc, exchange_pb2, exchange_pb2_grpc, jobs_pb2, jobs_pb2_grpc, types_pb2

from dml.common import auth, rpc
from dml.common.spec import JobSpec, spec_to_pb
from dml.peer.runner import Peer
from dml.common.version import PROTOCOL_VERSION
from tests.integration.helpers import audit_metadata, coordinator, held_rounds, job_stub, join_token, peers, wait_for

# Two shards: a job takes at most two members, so a third peer stays idle (an outsider).
RING = JobSpec(task="digits", rounds=400, local_steps=1, batch_size=16, learning_rate=0.1, min_peers=2,
               checkpoint_every_rounds=2, num_shards=2)
GOSSIP = JobSpec(task="digits", rounds=400, local_steps=1, batch_size=16, learning_rate=0.1, min_peers=2,
                 aggregation="gossip")
UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED


def _job(stub, jid: str) -> jobs_pb2.JobStatus:
    return stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=10).job


def _code(fn) -> grpc.StatusCode:
    """The status code ``fn`` fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


@contextlib.contextmanager
def running(spec: JobSpec, n: int = 2) -> Iterator[tuple[object, list[Peer], str, jobs_pb2_grpc.JobServiceStub]]:
    """A coordinator and ``n`` peers running ``spec`` past its second committed round."""
    with coordinator() as srv, peers(srv.address, n) as ps:
        stub = job_stub(srv.address)
        jid = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=10).job_id
        wait_for(lambda: _job(stub, jid).round >= 2, 60, "two committed rounds")
        yield srv, ps, jid, stub
        stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=jid), timeout=10)


def _goes_on(stub, jid: str, members: set[str]) -> jobs_pb2.JobStatus:
    """The job commits two more rounds with every honest member and evicts nobody."""
    start = _job(stub, jid).round
    wait_for(lambda: _job(stub, jid).round >= start + 2, 60, "two more committed rounds")
    st = _job(stub, jid)
    assert st.state == types_pb2.JOB_STATE_RUNNING and set(st.peers) == members
    assert st.evictions_total == 0, list(st.evictions)
    return st


def _control(address: str, token: str = "") -> control_pb2_grpc.PeerControlStub:
    ch = rpc.channel(address)
    return control_pb2_grpc.PeerControlStub(auth.with_token(ch, token) if token else ch)


# -- job control --------------------------------------------------------------------------------


def test_job_control_without_the_operator_token_is_unauthenticated_and_changes_nothing() -> None:
    with running(RING) as (srv, ps, jid, stub):
        for token in ("", "not-the-token", ps[0].credentials.peer_token):
            ch = rpc.channel(srv.address)
            bad = jobs_pb2_grpc.JobServiceStub(auth.with_token(ch, token) if token else ch)
            want = PERMISSION_DENIED if token == ps[0].credentials.peer_token else UNAUTHENTICATED
            calls = {
                "submit": lambda: bad.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(RING)), timeout=10),
                "cancel": lambda: bad.CancelJob(jobs_pb2.CancelJobRequest(job_id=jid), timeout=10),
                "get": lambda: bad.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=10),
                "list": lambda: bad.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10),
                "watch": lambda: next(iter(bad.WatchJob(jobs_pb2.WatchJobRequest(job_id=jid), timeout=10))),
            }
            for name, call in calls.items():
                assert _code(call) == want, (name, token)
            # A peer may fetch its own job's checkpoint (a joiner catching up), nobody else may.
            download = lambda: list(bad.DownloadModel(jobs_pb2.DownloadModelRequest(job_id=jid), timeout=10))  # noqa: E731
            if token == ps[0].credentials.peer_token:
                wait_for(lambda: _job(stub, jid).checkpoint_round > 0, 60, "a checkpoint")
                assert download()[0].round > 0
            else:
                assert _code(download) == UNAUTHENTICATED
            ch.close()
        assert len(stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs) == 1, "nothing was submitted"
        _goes_on(stub, jid, {p.peer_id for p in ps})


def test_health_and_reflection_stay_open() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with coordinator() as srv:
        resp = health_pb2_grpc.HealthStub(rpc.channel(srv.address)).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


# -- joining ------------------------------------------------------------------------------------


def test_registering_without_the_join_token_is_unauthenticated() -> None:
    with running(RING) as (srv, ps, jid, stub):
        req = control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address="127.0.0.1:9", public_key=b"k" * 32)
        for token in ("", "wrong", ps[0].credentials.peer_token, srv.secrets.operator_token):
            assert _code(lambda: _control(srv.address, token).RegisterPeer(req, timeout=10)) == UNAUTHENTICATED  # noqa: B023
        assert len(srv.coordinator.state.peers) == 2, "no fake peer registered"
        ok = _control(srv.address, join_token(srv.address)).RegisterPeer(req, timeout=10)
        assert ok.peer_token and ok.coordinator_public_key == srv.coordinator.public_key
        assert ok.peer_token not in str(srv.coordinator.state.peers[ok.peer_id]), "only a hash is kept"


# -- a peer acting for another, forged reports, failures and checkpoints ------------------------


def test_every_peer_call_needs_a_credential_and_is_bound_to_its_peer() -> None:
    with running(RING) as (srv, ps, jid, stub):
        a, b = ps
        st = _job(stub, jid)
        rnd, epoch = st.round + 1, st.epoch
        forged = {
            "heartbeat": lambda s, who: s.Heartbeat(control_pb2.HeartbeatRequest(peer_id=who), timeout=10),
            "plan": lambda s, who: s.GetPlan(control_pb2.GetPlanRequest(peer_id=who, wait_ms=0), timeout=10),
            "report": lambda s, who: s.ReportRound(control_pb2.ReportRoundRequest(
                peer_id=who, job_id=jid, round=rnd, epoch=epoch, samples=16, digest="0" * 64), timeout=10),
            "failure": lambda s, who: s.ReportFailure(control_pb2.ReportFailureRequest(
                peer_id=who, job_id=jid, round=rnd, epoch=epoch, suspect_peer_id=a.peer_id if who != a.peer_id else b.peer_id,
                detail="forged"), timeout=10),
            "checkpoint": lambda s, who: s.UploadCheckpoint(iter([control_pb2.CheckpointChunk(
                peer_id=who, job_id=jid, round=rnd, epoch=epoch, digest="0" * 64, data=b"\0" * 1024)]), timeout=10),
        }
        for name, call in forged.items():
            for token in ("", "made-up"):  # no credential, or one nobody issued
                assert _code(lambda: call(_control(srv.address, token), a.peer_id)) == UNAUTHENTICATED, name  # noqa: B023
            # b's own credential, used for a: the call is b's, not a's
            assert _code(lambda: call(_control(srv.address, b.credentials.peer_token), a.peer_id)) == PERMISSION_DENIED, name  # noqa: B023
        after = _goes_on(stub, jid, {a.peer_id, b.peer_id})
        assert after.checkpoint_round == 0 or after.checkpoint_round > st.round, "no forged checkpoint counted"


def test_an_outsider_may_not_report_upload_or_fail_for_a_job_it_is_not_in() -> None:
    """A real registered peer, with its own credential, idle: the job has no room for it."""
    with running(RING) as (srv, ps, jid, stub), peers(srv.address, 1) as (idle,):
        a, b = ps
        wait_for(lambda: idle.peer_id in srv.coordinator.state.peers, 10, "the third peer to register")
        out, me = _control(srv.address, idle.credentials.peer_token), idle.peer_id
        st = _job(stub, jid)
        assert me not in st.peers
        rnd, epoch = st.round + 1, st.epoch
        calls = {
            "report": lambda: out.ReportRound(control_pb2.ReportRoundRequest(
                peer_id=me, job_id=jid, round=rnd, epoch=epoch, samples=16, digest="0" * 64), timeout=10),
            "checkpoint": lambda: out.UploadCheckpoint(iter([control_pb2.CheckpointChunk(
                peer_id=me, job_id=jid, round=rnd, epoch=epoch, digest="0" * 64, data=b"\0" * 64)]), timeout=10),
            "failure": lambda: out.ReportFailure(control_pb2.ReportFailureRequest(
                peer_id=me, job_id=jid, round=rnd, epoch=epoch, suspect_peer_id=a.peer_id, detail="forged"), timeout=10),
            "download": lambda: list(jobs_pb2_grpc.JobServiceStub(auth.with_token(rpc.channel(srv.address), idle.credentials.peer_token))
                                     .DownloadModel(jobs_pb2.DownloadModelRequest(job_id=jid), timeout=10)),
        }
        codes = {name: _code(call) for name, call in calls.items()}
        assert codes == {name: PERMISSION_DENIED for name in calls}, codes
        _goes_on(stub, jid, {a.peer_id, b.peer_id})


def test_a_member_may_not_name_a_suspect_outside_its_epoch() -> None:
    with running(RING) as (srv, ps, jid, stub), peers(srv.address, 1) as (idle,):
        a, b = ps
        wait_for(lambda: idle.peer_id in srv.coordinator.state.peers, 10, "the third peer to register")
        member = _control(srv.address, a.credentials.peer_token)
        # The refusal is for the current round only (a report naming any other is stale, and
        # ignored): the members are held so that no commit can make the forged round stale.
        after = srv.coordinator.view(lambda st: st.job(jid).round)  # under way, or just committed
        with held_rounds(ps, jid, after) as hold:
            rnd, epoch = hold.all_held(len(ps))
            assert srv.coordinator.view(lambda st: (st.job(jid).round, st.job(jid).epoch)) == (rnd, epoch)
            code = _code(lambda: member.ReportFailure(control_pb2.ReportFailureRequest(
                peer_id=a.peer_id, job_id=jid, round=rnd, epoch=epoch, suspect_peer_id=idle.peer_id,
                detail="forged"), timeout=10))
            assert code == PERMISSION_DENIED
            assert srv.coordinator.view(lambda st: (st.job(jid).round, st.job(jid).epoch)) == (rnd, epoch)
        assert idle.peer_id in srv.coordinator.state.peers, "the outsider was not evicted"
        _goes_on(stub, jid, {a.peer_id, b.peer_id})


# -- peer to peer -------------------------------------------------------------------------------


def _outsider_metadata(method: str, jid: str, epoch: int, ref: str, receiver: str, sender: str = "peer-outsider"):
    """A ticket the outsider signed itself (not the coordinator) and a valid signature over it."""
    key = auth.new_private_key()
    ticket = auth.issue_ticket(key, jid, epoch, sender, auth.public_bytes(key))
    return auth.sign_call(key, ticket, auth.CallClaims(method, jid, epoch, ref, sender, receiver))


def _stolen_ticket_metadata(member: Peer, jid: str, epoch: int, method: str, ref: str, receiver: str, sender: str):
    """A member's real ticket, presented for another sender with the thief's own signature."""
    ticket = member.credentials._tickets[(jid, epoch)]  # noqa: SLF001 (what a thief would replay)
    key = auth.new_private_key()
    return auth.sign_call(key, ticket, auth.CallClaims(method, jid, epoch, ref, sender, receiver))


def test_non_members_cannot_gossip_and_get_nothing_back() -> None:
    with running(GOSSIP) as (srv, ps, jid, stub):
        a, b = ps
        victim = a
        epoch = _job(stub, jid).epoch
        trainer = victim.store.trainer_for(jid)
        n = trainer.numel
        poison = np.full(n, np.nan, dtype=np.float32).tobytes()

        def offer(md) -> tuple[grpc.StatusCode, int]:
            msgs = [exchange_pb2.GossipMessage(job_id=jid, sender_id="peer-outsider", exchange_id="x1", elems=n,
                                               weight=1e6, data=poison[i:i + (1 << 20)])
                    for i in range(0, len(poison), 1 << 20)]
            with rpc.channel(victim.address, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES) as ch:
                call = exchange_pb2_grpc.PeerExchangeStub(ch).Gossip(iter(msgs), timeout=10, metadata=md)
                got = 0
                with pytest.raises(grpc.RpcError) as e:
                    for _ in call:
                        got += 1
                return e.value.code(), got

        method = "/dml.v1.PeerExchange/Gossip"
        assert offer([]) == (UNAUTHENTICATED, 0)
        assert offer(_outsider_metadata(method, jid, epoch, "x1", victim.peer_id)) == (PERMISSION_DENIED, 0)
        stolen = _stolen_ticket_metadata(b, jid, epoch, method, "x1", victim.peer_id, b.peer_id)
        assert offer(stolen) == (PERMISSION_DENIED, 0), "b's ticket with someone else's signature"
        with trainer.lock:
            assert all(math.isfinite(float(x)) for x in trainer.params()[:: max(1, n // 997)]), "no NaN reached the model"
        _goes_on(stub, jid, {a.peer_id, b.peer_id})


def test_non_members_cannot_open_push_or_fetch_and_signatures_bind_the_receiver() -> None:
    with running(RING) as (srv, ps, jid, stub):
        a, b = ps
        st = _job(stub, jid)
        epoch, rnd = st.epoch, st.round + 1
        ch = rpc.channel(a.address, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
        ex = exchange_pb2_grpc.PeerExchangeStub(ch)
        open_req = exchange_pb2.OpenDataPlaneRequest(job_id=jid, round=rnd, epoch=epoch, sender_id=b.peer_id)
        fetch_req = exchange_pb2.FetchParametersRequest(job_id=jid, round=0)  # the latest it holds
        chunk = exchange_pb2.TensorChunk(job_id=jid, round=rnd, epoch=epoch, sender_id=b.peer_id,
                                         phase=exchange_pb2.RING_PHASE_REDUCE_SCATTER, data=b"\0" * 64)
        calls = {
            "OpenDataPlane": (lambda md: ex.OpenDataPlane(open_req, timeout=10, metadata=md), str(rnd)),
            "FetchParameters": (lambda md: list(ex.FetchParameters(fetch_req, timeout=10, metadata=md)), "0"),
            "PushChunks": (lambda md: ex.PushChunks(iter([chunk]), timeout=10, metadata=md), str(rnd)),
        }
        for name, (call, ref) in calls.items():
            method = f"/dml.v1.PeerExchange/{name}"
            assert _code(lambda: call([])) == UNAUTHENTICATED, name  # noqa: B023
            assert _code(lambda: call(_outsider_metadata(method, jid, epoch, ref, a.peer_id))) == PERMISSION_DENIED, name  # noqa: B023
            # b's genuine signature for a call to itself (or to any other member) does not open a.
            md = b.credentials.sign(method, jid, epoch, ref, b.peer_id)
            assert _code(lambda: call(md)) == PERMISSION_DENIED, name  # noqa: B023
        # A genuine call from b whose body names another exchange than it was signed for.
        md = b.credentials.sign("/dml.v1.PeerExchange/OpenDataPlane", jid, epoch, str(rnd + 7), a.peer_id)
        assert _code(lambda: ex.OpenDataPlane(open_req, timeout=10, metadata=md)) == PERMISSION_DENIED
        # The coordinator's key holder (an audit) may fetch: the check admits what it should.
        md = audit_metadata(srv.coordinator.signing_key, jid, 0, a.peer_id)
        assert list(ex.FetchParameters(fetch_req, timeout=10, metadata=md))[0].round >= st.round
        ch.close()
        _goes_on(stub, jid, {a.peer_id, b.peer_id})
