"""dml.peer.advertise: the host a peer gives the coordinator for the others to dial."""
from __future__ import annotations

import socket

import pytest

from dml.peer import advertise


def test_an_explicit_host_wins():
    assert advertise.advertise_host("0.0.0.0", "peer-1", "coordinator:50051") == "peer-1"
    assert advertise.advertise_host("127.0.0.1", "10.1.2.3", "coordinator:50051") == "10.1.2.3"


@pytest.mark.parametrize("advertised", ["", "auto"])
def test_a_peer_bound_to_one_address_advertises_it(advertised, monkeypatch):
    monkeypatch.setattr(advertise, "route_address", pytest.fail)
    assert advertise.advertise_host("127.0.0.1", advertised, "coordinator:50051") == "127.0.0.1"


def test_bound_to_all_it_advertises_its_route_to_the_coordinator(monkeypatch):
    seen = []

    def route(coordinator: str, family: int) -> str:
        seen.append((coordinator, family))
        return "172.18.0.5"

    monkeypatch.setattr(advertise, "route_address", route)
    assert advertise.advertise_host("0.0.0.0", "auto", "coordinator:50051") == "172.18.0.5"
    # A server on 0.0.0.0 takes IPv4 only; one on :: either family.
    assert seen == [("coordinator:50051", socket.AF_INET)]
    monkeypatch.setattr(advertise, "route_address", lambda c, f: "fd00::5")
    assert advertise.advertise_host("::", "", "[fd00::1]:50051") == "[fd00::5]"


def test_loopback_routes_fall_back_to_the_hostnames_address_then_the_hostname(monkeypatch):
    monkeypatch.setattr(advertise, "route_address", lambda c, f: "127.0.0.1")
    monkeypatch.setattr(advertise, "hostname_address", lambda f: "10.0.0.7")
    assert advertise.advertise_host("0.0.0.0", "auto", "127.0.0.1:50051") == "10.0.0.7"
    monkeypatch.setattr(advertise, "hostname_address", lambda f: "127.0.1.1")
    assert advertise.advertise_host("0.0.0.0", "auto", "127.0.0.1:50051") == socket.gethostname()
    monkeypatch.setattr(advertise, "route_address", lambda c, f: None)
    monkeypatch.setattr(advertise, "hostname_address", lambda f: None)
    assert advertise.advertise_host("0.0.0.0", "auto", "nowhere:50051") == socket.gethostname()


def test_route_address_sends_nothing_and_handles_bad_input():
    # A UDP connect to loopback: picks the route, no packet, no listener needed.
    assert advertise.route_address("127.0.0.1:9", socket.AF_INET) == "127.0.0.1"
    assert advertise.route_address("127.0.0.1:notaport") is None
    assert advertise.route_address("no-port-at-all") is None


def test_address_problem_says_why_an_address_does_not_answer():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert advertise.address_problem(f"127.0.0.1:{port}") == ""
        # Bound to 127.0.0.1 only: the same port on 127.0.0.2 refuses.
        assert advertise.address_problem(f"127.0.0.2:{port}", timeout_s=1.0)
    assert advertise.address_problem("127.0.0.1:notaport")
