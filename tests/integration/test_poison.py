"""Broken peers over real gRPC on 127.0.0.1:0, in one process: a ring member that writes NaN or
1e30 into its parameters (and skips its own check, peer.faults) is refused by its successor over
every data plane and codec, quarantined, and the job succeeds with a finite model; gossip
partners refuse non-finite or absurd offers and answers, and report their sender."""
from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch
from dml.v1 import exchange_pb2_grpc, types_pb2

from dml.common import rpc
from dml.common.spec import JobSpec
from dml.peer.faults import Fault
from dml.peer.runner import Peer, PeerConfig
from tests.integration.helpers import (
    RoundOneWaits,
    assert_state_dicts_identical,
    coordinator,
    fetch_state,
    job_stub,
    join_token,
    peers,
    wait_for,
)
from tests.integration.test_cluster import _job, _submit
from tests.integration import test_gossip_exchange
from tests.integration.test_gossip_exchange import JOB, fake, finish, offer

cluster = test_gossip_exchange.cluster  # the fixture: GossipNodes behind real gRPC servers

ROUNDS = 12
FAULT_ROUND = 5


@pytest.mark.parametrize("data_plane,codec,kind", [
    ("tcp", "fp32", "nan-params"), ("grpc", "fp32", "huge-params"), ("shm", "fp32", "nan-params"),
    ("tcp", "int8", "huge-params"), ("grpc", "bf16", "nan-params"), ("shm", "fp16", "huge-params"),
])
def test_a_broken_ring_member_is_quarantined_and_the_job_succeeds_finite(data_plane, codec, kind):
    spec = JobSpec(task="digits", rounds=ROUNDS, local_steps=5, batch_size=32, learning_rate=0.1, min_peers=2,
                   data_plane=data_plane, codec=codec, checkpoint_every_rounds=4)
    with coordinator() as srv, peers(srv.address, 2) as ps:
        bad = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0, exchange_timeout_s=10.0,
                              fault=Fault(kind, FAULT_ROUND))).start()
        try:
            bad.run_in_thread()
            bad_id = bad.peer_id
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 3, 10, "three idle peers")
            stub = job_stub(srv.address)
            first = RoundOneWaits(ps[0])  # the broken peer is in the ring before its fault's round
            jid = _submit(stub, spec)
            first.until_in(srv, jid, bad_id)
            # One read per poll: a job that is PENDING (its peers taking it) on one read and
            # RUNNING on the next must not pass for ended.
            wait_for(lambda: _job(stub, jid).job.state not in (types_pb2.JOB_STATE_RUNNING, types_pb2.JOB_STATE_PENDING),
                     120, "the job to end")
            resp = _job(stub, jid, history=True)
            assert resp.job.state == types_pb2.JOB_STATE_SUCCEEDED, resp.job.reason
            (q,) = resp.job.quarantined
            assert q.peer_id == bad_id and q.round == FAULT_ROUND, q
            assert "sent non-finite or absurd values" in q.reason and q.reporters in {p.peer_id for p in ps}
            assert bad_id not in resp.job.peers and bad.peer_id not in resp.job.peers  # nor its new registration
            assert [r.round for r in resp.history] == list(range(1, ROUNDS + 1))
            assert resp.history[FAULT_ROUND - 1].members == 2, "the round was re-run without the broken peer"
            assert all(math.isfinite(r.train_loss) for r in resp.history)
            got = [fetch_state(p.address, jid, ROUNDS, p.peer_id, srv.coordinator.signing_key) for p in ps]
            assert {g[0] for g in got} == {resp.history[-1].digest}
            assert_state_dicts_identical([g[1] for g in got])
            assert all(bool(torch.isfinite(t).all()) for t in got[0][1].values())
        finally:
            bad.stop()


def test_a_member_whose_own_update_is_not_finite_reports_itself_and_is_quarantined(monkeypatch):
    """The fault writes NaN but does not skip the member's own check: its training went NaN,
    and the check catches it before anything is sent (POISONED, naming itself)."""
    from dml.peer import faults

    real = faults.inject
    monkeypatch.setattr(faults, "inject", lambda fault, rnd, params: real(fault, rnd, params) and False)
    spec = JobSpec(task="digits", rounds=8, local_steps=5, batch_size=32, learning_rate=0.1, min_peers=2)
    with coordinator() as srv, peers(srv.address, 2) as ps:
        bad = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0, exchange_timeout_s=10.0,
                              fault=Fault("nan-params", 3))).start()
        try:
            bad.run_in_thread()
            bad_id = bad.peer_id
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 3, 10, "three idle peers")
            stub = job_stub(srv.address)
            first = RoundOneWaits(ps[0])  # the broken peer is in the ring before its fault's round
            jid = _submit(stub, spec)
            first.until_in(srv, jid, bad_id)
            wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 120, "the job to succeed")
            (q,) = _job(stub, jid).job.quarantined
            assert q.peer_id == bad_id and q.reporters == bad_id and q.round == 3
            assert "its own parameters or update were not finite" in q.reason
            got = [fetch_state(p.address, jid, 8, p.peer_id, srv.coordinator.signing_key) for p in ps]
            assert all(bool(torch.isfinite(t).all()) for t in got[0][1].values())
        finally:
            bad.stop()


# -- gossip ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["nan", "inf", "huge", "heavy"])
def test_a_partner_refuses_a_poisoned_offer_reports_its_sender_and_changes_nothing(cluster, case) -> None:
    b = cluster("peer-b", fake(2), samples=3)
    b.node.max_weight = 1000.0
    reported: list[tuple[str, str, str]] = []
    b.node.on_poisoned = lambda job, sender, detail: reported.append((job, sender, detail))
    xb = b.params()
    n = b.trainer.numel
    values = np.ones(n, dtype=np.float32)
    weight = 1.0
    if case == "nan":
        values[7] = np.nan
    elif case == "inf":
        values[:] = np.inf
    elif case == "huge":
        values[:] = 1e30
    else:
        weight = 1e6  # a weight no member of this job can have
    with rpc.channel(b.address) as ch:
        call = exchange_pb2_grpc.PeerExchangeStub(ch).Gossip(iter([offer(n, weight=weight, data=values.tobytes())]),
                                                             timeout=10)
        got = finish(call)
    assert got == grpc.StatusCode.INVALID_ARGUMENT, case
    assert [(j, s) for j, s, _ in reported] == [(JOB, "peer-x")]
    assert b.params().tobytes() == xb.tobytes() and b.node.weight == 3 and b.node.slot.commits == 0


def test_an_initiator_refuses_a_poisoned_answer_and_changes_nothing(cluster) -> None:
    bad = fake(3)
    bad.host_buffer()[:10] = np.nan  # a broken partner: it answers with what it holds
    b = cluster("peer-b", bad, samples=3)
    a = cluster("peer-a", fake(1), samples=5)
    xa = a.params()
    out = a.exchange(b)
    assert not out.ok and out.poisoned and "peer-b" in out.detail and "non-finite" in out.detail
    assert a.params().tobytes() == xa.tobytes() and a.node.weight == 5


@pytest.mark.parametrize("kind", ["nan-params", "huge-params"])
def test_a_broken_gossip_member_is_quarantined_and_the_job_succeeds_finite(kind):
    spec = JobSpec(task="digits", rounds=6, local_steps=5, batch_size=32, learning_rate=0.1, min_peers=2,
                   aggregation="gossip", gossip_timeout_ms=5000)
    with coordinator() as srv, peers(srv.address, 2) as ps:
        bad = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0, exchange_timeout_s=10.0,
                              fault=Fault(kind, 3))).start()
        try:
            bad.run_in_thread()
            bad_id = bad.peer_id
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 3, 10, "three idle peers")
            stub = job_stub(srv.address)
            jid = _submit(stub, spec)
            wait_for(lambda: _job(stub, jid).job.state not in (types_pb2.JOB_STATE_RUNNING, types_pb2.JOB_STATE_PENDING),
                     120, "the job to end")
            resp = _job(stub, jid, history=True)
            assert resp.job.state == types_pb2.JOB_STATE_SUCCEEDED, resp.job.reason
            assert [q.peer_id for q in resp.job.quarantined] == [bad_id], resp.job.quarantined
            assert "sent non-finite or absurd values" in resp.job.quarantined[0].reason
            got = [fetch_state(p.address, jid, spec.rounds, p.peer_id, srv.coordinator.signing_key) for p in ps]
            assert {g[0] for g in got} == {resp.history[-1].digest}
            assert all(bool(torch.isfinite(t).all()) for t in got[0][1].values())
        finally:
            bad.stop()
