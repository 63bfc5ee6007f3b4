"""In one process: a coordinator refuses a held state dir and a taken port, holding nothing after;
``portcheck`` names what holds a port."""
from __future__ import annotations

import socket

import pytest

from dml.common import portcheck, rpc
from dml.coordinator.lock import LOCK_NAME, StateDirLocked, read_holder
from dml.coordinator.server import CoordinatorServer, ServerConfig
from tests.integration.helpers import FAST, coordinator


def test_held_state_dir_and_taken_port_are_refused_and_a_failed_start_lets_the_lock_go(tmp_path):
    with coordinator(tmp_path / "a") as first:
        assert read_holder(tmp_path / "a" / LOCK_NAME).address == first.address
        with pytest.raises(StateDirLocked, match=f"address {first.address}"):
            CoordinatorServer(ServerConfig(port=0, state_dir=tmp_path / "a", timing=FAST))
        with pytest.raises(rpc.BindError):
            CoordinatorServer(ServerConfig(port=first.port, state_dir=tmp_path / "b", timing=FAST))
        assert portcheck.bind_failure("127.0.0.1", first.port) == \
            f"127.0.0.1:{first.port} is in use by another dml coordinator (serving)"
        with coordinator(tmp_path / "b"):  # the failed one released state dir b
            pass
    with coordinator(tmp_path / "a"):  # and a stopped one released a
        pass


def test_portcheck_names_a_grpc_server_that_is_not_a_coordinator_and_a_foreign_address():
    srv = rpc.server(workers=1)  # serves no health service, as a dml-peer's exchange server
    port = rpc.bind(srv, "127.0.0.1", 0)
    srv.start()
    try:
        assert portcheck.bind_failure("127.0.0.1", port) == \
            f"127.0.0.1:{port} is in use by another gRPC server (not a dml coordinator)"
        assert portcheck.bind_failure("0.0.0.0", port).startswith(f"0.0.0.0:{port} is in use by another gRPC server")
    finally:
        srv.stop(0).wait(5)
    assert portcheck.bind_failure("192.0.2.1", 0) == "cannot listen on 192.0.2.1:0: not an address of this host"


def test_a_port_freed_meanwhile_is_said_to_be_free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "is free now" in portcheck.bind_failure("127.0.0.1", port)
