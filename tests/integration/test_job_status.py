"""What JobStatus says about a job's membership (evictions and epochs), read through GetJob
from a real coordinator with real peers."""
from __future__ import annotations

import dataclasses

from dml.common.spec import JobSpec
from dml.v1 import jobs_pb2, types_pb2
from dml.common.version import PROTOCOL_VERSION
from tests.integration.helpers import FAST, coordinator, job_stub, peers, wait_for
from tests.integration.test_cluster import _job, _submit

# A peer that left: its lease ran out, or the members that then sent to it could not reach it
# (held out: UNREACHABLE; one neighbour's report alone no longer evicts, NEIGHBOUR_REPORT is
# what older records say).
LEFT = (jobs_pb2.EVICTION_CAUSE_HEARTBEAT_TIMEOUT, jobs_pb2.EVICTION_CAUSE_NEIGHBOUR_REPORT,
        jobs_pb2.EVICTION_CAUSE_UNREACHABLE)


def test_get_job_lists_the_eviction_of_a_peer_that_left_and_the_epochs_around_it() -> None:
    with coordinator() as srv, peers(srv.address, 2):
        stub = job_stub(srv.address)
        jid = _submit(stub, JobSpec(rounds=400, local_steps=5, min_peers=2))
        with peers(srv.address, 1) as extra:
            wait_for(lambda: len(_job(stub, jid).job.peers) == 3 and _job(stub, jid).job.round >= 3, 60, "3-peer ring")
        gone = extra[0].peer_id
        wait_for(lambda: gone not in _job(stub, jid).job.peers, 30, "eviction")
        st = _job(stub, jid).job
        stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=jid), timeout=10)
    (ev,) = [e for e in st.evictions if e.peer_id == gone]
    assert ev.cause in LEFT, jobs_pb2.EvictionCause.Name(ev.cause)
    assert (ev.reporter != "") == (ev.cause == jobs_pb2.EVICTION_CAUSE_NEIGHBOUR_REPORT)
    assert ev.detail and ev.unix_ms >= st.created_unix_ms and ev.round >= 3
    assert st.evictions_total == len(st.evictions) >= 1
    assert st.rolled_back_rounds == 0
    # Epochs: numbered from 1 without a gap, the last one is the job's ring now; the epoch the
    # eviction ended had the peer, the next one has not.
    assert [e.epoch for e in st.epochs] == list(range(1, st.epoch + 1))
    assert list(st.epochs[-1].peers) == list(st.peers)
    epochs = {e.epoch: e for e in st.epochs}
    assert gone in epochs[ev.epoch].peers and gone not in epochs[ev.epoch + 1].peers
    assert epochs[ev.epoch + 1].round == ev.round
    assert all(a.started_unix_ms <= b.started_unix_ms and a.round <= b.round for a, b in zip(st.epochs, st.epochs[1:]))
    assert st.state == types_pb2.JOB_STATE_RUNNING


def test_report_failure_kinds_the_held_out_reason_in_heartbeats_and_held_out_in_job_status() -> None:
    import grpc
    import pytest
    from dml.v1 import control_pb2, control_pb2_grpc

    from dml.common import auth, rpc
    from tests.integration.helpers import join_token, take_ready

    import socket

    # Something listens at both addresses, so the coordinator's own connect is no witness and the
    # ring-of-two rule is what holds b out.
    # The hand-made peers send no heartbeats: a long lease, so only the report can evict b.
    with (coordinator(timing=dataclasses.replace(FAST, peer_timeout_ms=120_000)) as srv, rpc.channel(srv.address) as ch,
          socket.socket() as la, socket.socket() as lb):
        for s in (la, lb):
            s.bind(("127.0.0.1", 0))
            s.listen()
        joining = control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(srv.address)))
        regs = [joining.RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address=f"127.0.0.1:{s.getsockname()[1]}"),
                                     timeout=10) for s in (la, lb)]
        a, b = (r.peer_id for r in regs)
        ctl, ctl_b = (control_pb2_grpc.PeerControlStub(auth.with_token(ch, r.peer_token)) for r in regs)  # as a, as b
        stub = job_stub(srv.address)
        jid = _submit(stub, JobSpec(rounds=5, min_peers=2))  # both take it, then it starts with both
        take_ready(ctl, a, jid)
        take_ready(ctl_b, b, jid)
        st = _job(stub, jid).job
        assert list(st.peers) == [a, b]
        fail = control_pb2.ReportFailureRequest(peer_id=a, job_id=jid, round=1, epoch=st.epoch, suspect_peer_id=b,
                                                detail="connect refused", kind=99)
        with pytest.raises(grpc.RpcError) as e:
            ctl.ReportFailure(fail, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "failure kind" in e.value.details()
        fail.kind = control_pb2.FAILURE_KIND_UNREACHABLE
        ctl.ReportFailure(fail, timeout=10)  # a ring of two has no other order: b is held out
        hb = ctl_b.Heartbeat(control_pb2.HeartbeatRequest(peer_id=b), timeout=10)
        assert hb.job_id == "" and hb.held_out_reason.startswith(f"held out of job {jid}: unreachable from {a}")
        assert ctl.Heartbeat(control_pb2.HeartbeatRequest(peer_id=a), timeout=10).held_out_reason == ""
        st = _job(stub, jid).job
        assert list(st.peers) == [a]
        (x,) = st.held_out
        assert (x.peer_id, x.reporters, x.round) == (b, a, 1) and "unreachable from" in x.reason
        assert [(e.peer_id, e.cause) for e in st.evictions] == [(b, jobs_pb2.EVICTION_CAUSE_UNREACHABLE)]
        stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=jid), timeout=10)
        assert ctl_b.Heartbeat(control_pb2.HeartbeatRequest(peer_id=b), timeout=10).held_out_reason == ""
