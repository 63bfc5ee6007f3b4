"""Faults injected in-process at exact points (hivemind style: subclass the runner), over real
gRPC on 127.0.0.1:0. The peer timeout is long (20 s) so any quick recovery seen here comes from
the neighbours' reports, not from missed heartbeats."""
from __future__ import annotations

import logging
import threading

import grpc
import numpy as np
import pytest
from dml.v1 import jobs_pb2, types_pb2

from dml.aggregation.transport import Header
from dml.coordinator.service import CoordinatorConfig
from dml.common.spec import JobSpec
from dml.peer.client import Evicted
from dml.peer.link import PeerLink
from dml.peer.runner import Peer, PeerConfig
from tests.integration.helpers import (
    assert_state_dicts_identical,
    coordinator,
    fetch_state,
    job_stub,
    join_token,
    peers,
    wait_for,
)
from tests.integration.test_cluster import _job, _submit

SLOW_HEARTBEAT_EVICTION = CoordinatorConfig(heartbeat_interval_ms=200, peer_timeout_ms=20_000, tick_ms=100)


class Crash(Exception):
    """Raised in the victim's thread when it 'dies'."""


class _DeadStub:
    """The coordinator stub of a process that has died: it sends nothing (every call fails), so
    the crashed peer cannot report its own failure, as a dead process could not."""

    def __getattr__(self, method: str):
        def call(*_args, **_kwargs):
            raise grpc.RpcError(f"{method}: this process is dead")
        return call


class CrashingPeer(Peer):
    """Dies (server gone, heartbeats stop, streams cut) after sending ``after_chunks`` chunks of
    the all-reduce of round ``at_round`` — in the middle of the exchange."""

    def __init__(self, config: PeerConfig, at_round: int, after_chunks: int) -> None:
        super().__init__(config)
        self.at_round, self.after_chunks = at_round, after_chunks
        self.crashed = threading.Event()

    def _make_link(self, plan, rank) -> PeerLink:
        link = super()._make_link(plan, rank)
        if plan.round != self.at_round or self.crashed.is_set():
            return link
        peer, sent = self, [0]
        real_send = link.send

        def send(header: Header, payload: np.ndarray) -> int:
            if sent[0] == peer.after_chunks:
                peer.client.stub = _DeadStub()  # no more calls to the coordinator, reports included
                peer.crashed.set()
                peer.stop_event.set()  # no more heartbeats
                peer._server.stop(0)  # incoming gRPC streams die, the port closes
                peer.servicer.close()  # so do TCP streams and the data-plane port
                link.shutdown()  # the outgoing stream is cut
                raise Crash("crashed mid-exchange")
            sent[0] += 1
            return real_send(header, payload)

        link.send = send  # type: ignore[method-assign]
        return link


@pytest.mark.parametrize("data_plane,codec", [("tcp", "fp32"), ("grpc", "fp32"), ("tcp", "int8")])
def test_peer_dying_mid_exchange_is_evicted_at_once_and_survivors_agree(data_plane, codec):
    spec = JobSpec(rounds=25, local_steps=5, min_peers=2, data_plane=data_plane, codec=codec)
    with coordinator(timing=SLOW_HEARTBEAT_EVICTION) as srv, peers(srv.address, 2) as ps:
        victim = CrashingPeer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0, chunk_elems=512),
                              at_round=5, after_chunks=6).start()
        try:
            victim.run_in_thread()
            stub = job_stub(srv.address)
            assert srv.coordinator.view(lambda st: len(st.live_idle())) == 3
            jid = _submit(stub, spec)
            wait_for(victim.crashed.is_set, 60, "the victim to crash mid-exchange")
            wait_for(lambda: victim.peer_id not in _job(stub, jid).job.peers, 10, "eviction")
            # Evicted by what the survivors reported (its lease of 20 s would have taken longer
            # than this wait), as the eviction's record says.
            (ev,) = [e for e in _job(stub, jid).job.evictions if e.peer_id == victim.peer_id]
            assert ev.cause in (jobs_pb2.EVICTION_CAUSE_NEIGHBOUR_REPORT, jobs_pb2.EVICTION_CAUSE_UNREACHABLE), \
                f"not via the neighbours' report: {jobs_pb2.EvictionCause.Name(ev.cause)} ({ev.detail})"
            wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 90, "job to succeed")
        finally:
            victim.stop()
        resp = _job(stub, jid, history=True)
        assert [r.round for r in resp.history] == list(range(1, 26))
        assert resp.history[4].members == 2, "round 5 was re-run by the survivors"
        got = [fetch_state(p.address, jid, 25, p.peer_id, srv.coordinator.signing_key) for p in ps]
        assert got[0][0] == got[1][0] == resp.history[-1].digest
        assert_state_dicts_identical([g[1] for g in got])
        from dml.client.api import history_dict
        from tests.integration.helpers import ledger_problems

        assert ledger_problems([history_dict(r) for r in resp.history], spec) == []


class DyingAfterExchangePeer(Peer):
    """Dies (server gone, heartbeats stop) right after its part of the all-reduce of round
    ``at_round`` is done, before it evaluates or reports: its neighbours' streams have all
    ended cleanly, and the round waits for a report that never comes."""

    def __init__(self, config: PeerConfig, at_round: int) -> None:
        super().__init__(config)
        self.at_round = at_round
        self.crashed = threading.Event()
        self.released = threading.Event()  # set by the test: the 'dead' thread may return

    def _make_link(self, plan, rank) -> PeerLink:
        link = super()._make_link(plan, rank)
        if plan.round != self.at_round or self.crashed.is_set():
            return link
        peer, real_close = self, link.close

        def close(timeout: float) -> None:
            real_close(timeout)
            peer.crashed.set()
            peer.stop_event.set()  # no more heartbeats
            peer._server.stop(0)  # its connections drop, its port closes
            peer.servicer.close()
            peer.released.wait(60)
            raise Evicted("dead")  # leaves the round loop without reporting anything

        link.close = close  # type: ignore[method-assign]
        return link


@pytest.mark.parametrize("data_plane", ["tcp", "grpc"])
def test_peer_dying_after_its_exchange_is_reported_by_its_predecessor(data_plane, caplog):
    # Killed between its all-reduce and its report, the victim holds no stream to anyone: its
    # predecessor's watch on it must notice (the lease, 20 s here, must not be what evicts it).
    caplog.set_level(logging.WARNING, logger="dml.coordinator.state")
    spec = JobSpec(rounds=12, local_steps=5, min_peers=2, data_plane=data_plane)
    with coordinator(timing=SLOW_HEARTBEAT_EVICTION) as srv, peers(srv.address, 2) as ps:
        victim = DyingAfterExchangePeer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0), at_round=5).start()
        try:
            victim.run_in_thread()
            stub = job_stub(srv.address)
            assert srv.coordinator.view(lambda st: len(st.live_idle())) == 3
            jid = _submit(stub, spec)
            wait_for(victim.crashed.is_set, 60, "the victim to die after its exchange")
            wait_for(lambda: victim.peer_id not in _job(stub, jid).job.peers, 10, "eviction")
            assert f"peer {victim.peer_id} reported by" in caplog.text, caplog.text
            assert f"peer {victim.peer_id}: no heartbeat" not in caplog.text
            wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 90, "job to succeed")
        finally:
            victim.released.set()
            victim.stop()
        resp = _job(stub, jid, history=True)
        assert [r.round for r in resp.history] == list(range(1, 13))
        assert resp.history[4].members == 2, "round 5 was re-run by the survivors"
        got = [fetch_state(p.address, jid, 12, p.peer_id, srv.coordinator.signing_key) for p in ps]
        assert got[0][0] == got[1][0] == resp.history[-1].digest
