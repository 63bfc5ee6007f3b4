"""Peers and the coordinator of different dml releases refuse each other at registration
(common.version) instead of joining rings whose digests can never agree: over real gRPC on
127.0.0.1:0, a registration without a version or with another is refused with
FAILED_PRECONDITION naming both and registers nothing; a Peer refuses a coordinator that answers
with another version (or none, an older release); and dml-peer exits 2 with the message."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import types
from collections.abc import Iterator

import grpc
import pytest
from dml.v1 import control_pb2, control_pb2_grpc, jobs_pb2

from dml.common import auth, rpc, version
from dml.client.api import JobClient
from dml.common.spec import JobSpec
from dml.coordinator import service, servicer
from dml.coordinator.server import CoordinatorServer, ServerConfig
from dml.peer import client as peer_client
from dml.peer.client import VersionMismatch
from dml.peer.runner import Peer, PeerConfig
from tests.integration.helpers import FAST, coordinator, join_token, operator_token, track, wait_for


def _register(address: str, v: int) -> control_pb2.RegisterPeerResponse:
    with rpc.channel(address) as ch:
        stub = control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(address)))
        return stub.RegisterPeer(control_pb2.RegisterPeerRequest(address="127.0.0.1:9", public_key=bytes(32),
                                                                 protocol_version=v), timeout=10)


@pytest.mark.parametrize("v", [0, version.PROTOCOL_VERSION + 1])
def test_a_registration_of_another_protocol_version_is_refused_and_registers_nothing(v) -> None:
    with coordinator() as srv:
        with pytest.raises(grpc.RpcError) as e:
            _register(srv.address, v)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert version.describe(v) in e.value.details() and f"protocol {version.PROTOCOL_VERSION}" in e.value.details()
        assert srv.coordinator.view(lambda st: len(st.peers)) == 0
        ok = _register(srv.address, version.PROTOCOL_VERSION)  # the same release joins
        assert ok.peer_id and ok.protocol_version == version.PROTOCOL_VERSION


def test_a_peer_refuses_a_coordinator_of_another_release(monkeypatch) -> None:
    # An older coordinator: takes any registration and answers with no version.
    monkeypatch.setattr(servicer, "version", types.SimpleNamespace(PROTOCOL_VERSION=0, mismatch=lambda *a: ""))
    with coordinator() as srv:
        p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0))
        try:
            with pytest.raises(VersionMismatch, match="the coordinator speaks a protocol from before versions"):
                p.start()
        finally:
            p.stop()


def test_a_peer_the_coordinator_refuses_gets_its_reason(monkeypatch) -> None:
    newer = types.SimpleNamespace(PROTOCOL_VERSION=version.PROTOCOL_VERSION + 1, mismatch=version.mismatch)
    monkeypatch.setattr(peer_client, "version", newer)
    with coordinator() as srv:
        p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0))
        try:
            with pytest.raises(VersionMismatch, match=f"the peer speaks protocol {version.PROTOCOL_VERSION + 1}"):
                p.start()
        finally:
            p.stop()


def test_dml_peer_exits_2_naming_both_versions(monkeypatch, tmp_path) -> None:
    older = types.SimpleNamespace(PROTOCOL_VERSION=version.PROTOCOL_VERSION - 1, mismatch=version.mismatch,
                                  describe=version.describe)
    monkeypatch.setattr(servicer, "version", older)
    with coordinator() as srv:
        token = tmp_path / "join.token"
        token.write_text(join_token(srv.address))
        try:
            p = subprocess.run([sys.executable, "-m", "dml.peer.cli", "--coordinator", srv.address, "--device", "cpu",
                                "--join-token-file", str(token)], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"dml-peer did not exit: {e.stderr!r}") from None
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"this coordinator speaks protocol {version.PROTOCOL_VERSION - 1}" in p.stderr
    assert f"the peer speaks protocol {version.PROTOCOL_VERSION}" in p.stderr
    assert "Traceback" not in p.stderr


@contextlib.contextmanager
def _running_peer() -> Iterator[Peer]:
    """A coordinator and one peer running its loop in a thread; both stopped on exit."""
    with coordinator() as srv:
        p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0)).start()
        try:
            p.run_in_thread()
            yield p
        finally:
            p.stop()


def test_a_running_peer_stops_for_good_when_its_registration_again_is_refused(monkeypatch) -> None:
    """The coordinator is upgraded under a running peer: its next registration (here forced
    as an eviction forces it) is refused, and the peer stops with the reason (dml-peer then
    exits 2 with it) rather than retrying a registration no retry can mend. Only registration
    refuses here (heartbeats still carry the peer's version), so the path under test is the one
    taken."""
    refusing = types.SimpleNamespace(PROTOCOL_VERSION=version.PROTOCOL_VERSION,
                                     mismatch=lambda ours, *rest: version.mismatch(ours + 1, *rest))
    with _running_peer() as p:
        monkeypatch.setattr(servicer, "version", refusing)
        p._evicted.set()
        assert p.stop_event.wait(30), "the peer went on"
        assert f"this coordinator speaks protocol {version.PROTOCOL_VERSION + 1}" in p.fatal, p.fatal
        assert p.config.coordinator in p.fatal


def test_a_running_peer_stops_when_a_heartbeat_says_its_coordinator_is_another_release(monkeypatch) -> None:
    """No registration again: the coordinator kept this peer's registration (as a restart on
    the same state dir does) but speaks another protocol, which its next heartbeat's answer says."""
    with _running_peer() as p:
        monkeypatch.setattr(servicer, "version", types.SimpleNamespace(
            PROTOCOL_VERSION=version.PROTOCOL_VERSION + 1, mismatch=version.mismatch))
        assert p.stop_event.wait(30), "the peer went on"
        assert f"the coordinator speaks protocol {version.PROTOCOL_VERSION + 1}" in p.fatal, p.fatal
        assert not p._evicted.is_set(), "it stopped on the heartbeat, not on a registration"


def _restart(port: int, state) -> CoordinatorServer:
    return track(CoordinatorServer(ServerConfig(host="127.0.0.1", port=port, state_dir=state, timing=FAST)).start())


@pytest.mark.parametrize("upgraded", [False, True])
def test_a_coordinator_restarted_on_another_release_evicts_the_peers_it_restored(monkeypatch, tmp_path, upgraded) -> None:
    """A restart on the same state dir restores the peers' registrations (they carry on, with no
    registration again). On another release it evicts those of another version instead, as
    PROTOCOL_MISMATCH in their job, so they are told (registering again is refused) and stop;
    on the same release it keeps them (the control: the version is stored with each peer)."""
    state = tmp_path / "state"
    with coordinator(state) as srv:
        port = srv.port
        p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0)).start()
        try:  # the peer outlives its first coordinator; stopped below, or here if this part fails
            p.run_in_thread()
            with JobClient(srv.address, token=operator_token(srv.address)) as client:
                job = client.submit(JobSpec(task="digits", rounds=100_000, min_peers=1, local_steps=1))
                wait_for(lambda: client.status(job).job.round >= 1, 60, "a committed round")
            pid = p.peer_id
        except BaseException:
            p.stop()
            raise
    try:
        if upgraded:
            newer = types.SimpleNamespace(PROTOCOL_VERSION=version.PROTOCOL_VERSION + 1, mismatch=version.mismatch,
                                          describe=version.describe)
            monkeypatch.setattr(service, "version", newer)
            monkeypatch.setattr(servicer, "version", newer)
        again = _restart(port, state)
        try:
            kept = again.coordinator.view(lambda st: list(st.peers))
            with JobClient(again.address, token=operator_token(again.address)) as client:
                evictions = [(e.peer_id, e.cause) for e in client.status(job).job.evictions]
                if not upgraded:
                    assert kept == [pid] and evictions == []
                    at = client.status(job).job.round
                    wait_for(lambda: client.status(job).job.round > at, 60, "a round committed after the restart")
                    assert not p.stop_event.is_set() and p.peer_id == pid, "the peer carried on under its id"
                    return
            assert kept == [], "a peer of another release was restored"
            assert evictions == [(pid, jobs_pb2.EVICTION_CAUSE_PROTOCOL_MISMATCH)]
            assert p.stop_event.wait(30), "the peer of the other release went on"
            assert f"speaks protocol {version.PROTOCOL_VERSION + 1}" in p.fatal, p.fatal
            assert again.coordinator.view(lambda st: list(st.peers)) == [], "it registered again"
        finally:
            again.stop(0.2)
    finally:
        p.stop()
