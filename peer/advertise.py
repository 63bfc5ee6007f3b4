"""The host a peer advertises: the one the coordinator hands to the other peers to dial.

A peer bound to every interface (``--host 0.0.0.0`` or ``::``) has no single address of its own to
give, so ``auto`` (the default) works one out. That is what lets replicas of one compose service
(``docker compose up --scale peer=4``) each advertise their own container address with one command.
"""
from __future__ import annotations

import ipaddress
import logging
import socket

log = logging.getLogger(__name__)

AUTO = "auto"
WILDCARDS = ("0.0.0.0", "::", "")


def advertise_host(bind_host: str, advertise: str, coordinator: str) -> str:
    """The host part of this peer's address, ready for ``f"{host}:{port}"`` (IPv6 in brackets).

    An explicit ``advertise`` other than ``auto`` wins; a peer bound to one address advertises
    that one. Bound to every interface, it advertises the first that is not loopback of: the
    local address of its route to ``coordinator`` (in a container, the container's own IP), the
    address this machine's hostname resolves to (Docker maps a container's hostname to its IP in
    /etc/hosts), and failing both the hostname itself."""
    if advertise and advertise != AUTO:
        return advertise
    if bind_host not in WILDCARDS:
        return bind_host
    # A server on 0.0.0.0 listens on IPv4 only: an IPv6 route would be an address nobody can dial.
    family = socket.AF_INET if bind_host == "0.0.0.0" else socket.AF_UNSPEC
    for how, ip in (("route to the coordinator", route_address(coordinator, family)),
                    ("hostname", hostname_address(family))):
        if ip and not ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback:
            log.debug("advertising %s (bound to %r; from the %s)", ip, bind_host, how)
            return f"[{ip}]" if ":" in ip else ip
    name = socket.gethostname()
    log.debug("advertising the hostname %s: no address but loopback found", name)
    return name


def address_problem(address: str, timeout_s: float = 1.0) -> str:
    """Why a TCP connection to ``address`` (``host:port`` or ``[v6]:port``) fails within
    ``timeout_s``, or "" when it is accepted. A peer checks its own advertised address with it at
    start-up: what it cannot reach, the other peers usually cannot either (it proves nothing the
    other way: a route from here is not one from everywhere)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return ""
    except (OSError, ValueError) as e:
        return str(e) or type(e).__name__


def route_address(coordinator: str, family: int = socket.AF_UNSPEC) -> str | None:
    """The local address this machine sends from to reach ``coordinator`` (``host:port`` or
    ``[v6]:port``), or None if it does not resolve or has no route. A UDP ``connect`` only
    picks the route: no packet leaves."""
    host, _, port = coordinator.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), family, socket.SOCK_DGRAM)
    except (OSError, ValueError):
        return None
    for fam, kind, proto, _, sockaddr in infos:
        with socket.socket(fam, kind, proto) as s:
            try:
                s.connect(sockaddr)
                return str(s.getsockname()[0])
            except OSError:
                continue
    return None


def hostname_address(family: int = socket.AF_UNSPEC) -> str | None:
    """The first address this machine's hostname resolves to, or None."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None
