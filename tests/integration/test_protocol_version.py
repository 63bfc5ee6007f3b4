"""Peers and the coordinator of different dml releases refuse each other at registration
(common.version) instead of joining rings whose digests can never agree: over real gRPC on
127.0.0.1:0, a registration without a version or with another is refused with
FAILED_PRECONDITION naming both and registers nothing; a Peer refuses a coordinator that answers
with another version (or none, an older release); and dml-peer exits 2 with the message."""
from __future__ import annotations

import subprocess
import sys
import types

import grpc
import pytest
from dml.v1 import control_pb2, control_pb2_grpc

from dml.common import auth, rpc, version
from dml.coordinator import servicer
from dml.peer import client as peer_client
from dml.peer.client import VersionMismatch
from dml.peer.runner import Peer, PeerConfig
from tests.integration.helpers import coordinator, join_token


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


def test_a_running_peer_stops_for_good_when_its_coordinator_comes_back_on_another_release(monkeypatch) -> None:
    """The coordinator is upgraded under a running peer: its next registration (here forced
    as an eviction forces it) is refused, and the peer stops with the reason (dml-peer then
    exits 2 with it) rather than retrying a registration no retry can mend."""
    with coordinator() as srv:
        p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0)).start()
        try:
            p.run_in_thread()
            monkeypatch.setattr(servicer, "version", types.SimpleNamespace(
                PROTOCOL_VERSION=version.PROTOCOL_VERSION + 1, mismatch=version.mismatch))
            p._evicted.set()
            assert p.stop_event.wait(30), "the peer went on"
            assert "this coordinator speaks protocol" in p.fatal and srv.address in p.fatal
        finally:
            p.stop()
