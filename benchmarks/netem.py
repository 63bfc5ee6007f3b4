"""An emulated LAN on one Linux machine, for benchmarks: a network namespace per rank, each with a
veth pair into one bridge in the root namespace, every link shaped to R Mbit/s with ``tbf``.

Layout for a run of process ``PID`` with ``N`` ranks (names carry the pid, so concurrent runs do
not collide and leftovers of dead runs can be found):

- bridge ``dmlbPID`` in the root namespace, up, bridge netfilter off (best effort); no address,
  unless the LAN is built with ``bridge_addr`` (e.g. :data:`BRIDGE_ADDR`, 10.213.0.254/24): then
  processes of the root namespace (a coordinator, the benchmark itself) are reachable from every
  rank there, over the rank's shaped link. Only one such LAN at a time (the root namespace gets a
  route to the subnet);
- where ``iptables`` is installed, one rule of its own at the head of the root namespace's
  FORWARD chain, ``-i dmlbPID -o dmlbPID -j ACCEPT``, deleted with the LAN. With the
  ``br_netfilter`` module loaded (``dockerd`` loads it) bridged IPv4 packets traverse iptables'
  FORWARD chain whatever the bridge's own ``nf_call_iptables`` says (the global sysctl wins), and
  ``dockerd`` sets that chain's policy to DROP: without the rule every packet between two ranks
  is dropped and the benchmark times out. The LAN depends on no one's policy: it brings its own
  rule, and never changes the policy, which others (Docker) rely on;
- per rank r: namespace ``dmlb-PID-r``; a veth pair whose root end ``dmlbPIDrR`` is a port of the
  bridge and whose other end is ``eth0`` inside the namespace, with address 10.213.0.(r+1)/24;
  ``lo`` up in the namespace;
- shaping: ``tbf rate R mbit burst B latency 50ms`` on ``eth0`` inside each namespace (what the
  rank sends) and, unless ``egress_only``, the same on the bridge end (what it receives): a NIC
  is full duplex, R each way. B = max(64 KiB, 1 ms of line rate): tbf's watchdog is a
  high-resolution timer, so it needs no HZ-sized bucket, and 1 ms keeps bursts far below a
  round's time while letting GSO super-packets through whole (tbf splits a packet larger than
  B into segments). 50 ms of queue at most (rate x 50 ms + B bytes), above what TCP's small-queue
  limit leaves in the qdisc.

A process joins a rank's network with :func:`enter_netns` before it creates any socket or
thread. Everything is torn down by :meth:`Lan.close` (deleting a namespace deletes its veth;
the root end is deleted too in case a process still holds the namespace), and :func:`leftovers`
finds what runs that died left behind, FORWARD rules included. Needs root and iproute2 (``ip``,
``tc``).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from typing import Any

PREFIX = "dmlb"
SUBNET = "10.213.0"
IFACE = "eth0"  # a rank's end of its veth, inside its namespace
LATENCY_MS = 50
MIN_BURST = 64 * 1024
MAX_RANKS = 253  # 10.213.0.1 .. 10.213.0.253
BRIDGE_ADDR = f"{SUBNET}.254"  # the root namespace's address on the bridge, when it has one
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
_NS_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)$")
_LINK_RE = re.compile(rf"^{PREFIX}(\d+)(?:r(\d+))?$")
_RULE_RE = re.compile(rf"^-A FORWARD -i {PREFIX}(\d+) -o {PREFIX}(\d+) -j ACCEPT$")


class NetemError(RuntimeError):
    """The emulated network cannot be built here (not root, no iproute2, a command failed)."""


# -- names and the commands (pure) -----------------------------------------------------------------
def ns_name(pid: int, rank: int) -> str:
    return f"{PREFIX}-{pid}-{rank}"


def bridge_name(pid: int) -> str:
    return f"{PREFIX}{pid}"


def veth_name(pid: int, rank: int) -> str:
    """The root end of rank ``rank``'s veth (an interface name: at most 15 characters)."""
    return f"{PREFIX}{pid}r{rank}"


def rank_addr(rank: int) -> str:
    return f"{SUBNET}.{rank + 1}"


def tbf_burst_bytes(mbit: float) -> int:
    """Bucket size: 1 ms of line rate, at least 64 KiB."""
    return max(MIN_BURST, int(mbit * 1e6 / 8 / 1000))


def tbf_args(mbit: float) -> list[str]:
    rate = f"{mbit:g}mbit"
    return ["tbf", "rate", rate, "burst", str(tbf_burst_bytes(mbit)), "latency", f"{LATENCY_MS}ms"]


def ring_floor_s(world: int, wire_bytes: float, mbit: float) -> float:
    """The least time a ring all-reduce of ``wire_bytes`` (the buffer as its codec puts it on the
    wire) can take when every rank sends at ``mbit`` Mbit/s: each rank sends 2(N-1)/N of it."""
    if mbit <= 0:
        raise ValueError("the link rate must be positive")
    return 2 * (world - 1) / world * wire_bytes * 8 / (mbit * 1e6)


def setup_commands(pid: int, world: int, mbit: float, egress_only: bool = False,
                   bridge_addr: str | None = None) -> list[list[str]]:
    """The ``ip``/``tc`` argv lists that build the LAN for ``world`` ranks, in order; with
    ``bridge_addr`` the bridge gets that address (/24) in the root namespace."""
    if not 1 <= world <= MAX_RANKS:
        raise ValueError(f"1..{MAX_RANKS} ranks, got {world}")
    if len(veth_name(pid, world - 1)) > 15:
        raise ValueError(f"pid {pid} makes interface names longer than 15 characters")
    br = bridge_name(pid)
    cmds = [["ip", "link", "add", br, "type", "bridge"], ["ip", "link", "set", br, "up"]]
    if bridge_addr is not None:
        if bridge_addr in {rank_addr(r) for r in range(world)} or not bridge_addr.startswith(SUBNET + "."):
            raise ValueError(f"bridge address {bridge_addr}: not in {SUBNET}.0/24, or a rank's")
        cmds.append(["ip", "addr", "add", f"{bridge_addr}/24", "dev", br])
    for r in range(world):
        ns, veth = ns_name(pid, r), veth_name(pid, r)
        cmds += [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", veth, "type", "veth", "peer", "name", IFACE, "netns", ns],
            ["ip", "link", "set", veth, "master", br],
            ["ip", "link", "set", veth, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "addr", "add", f"{rank_addr(r)}/24", "dev", IFACE],
            ["ip", "-n", ns, "link", "set", IFACE, "up"],
            ["tc", "-n", ns, "qdisc", "add", "dev", IFACE, "root", *tbf_args(mbit)],
        ]
        if not egress_only:
            cmds.append(["tc", "qdisc", "add", "dev", veth, "root", *tbf_args(mbit)])
    return cmds


def optional_commands(pid: int) -> list[list[str]]:
    """Best effort after setup: keep the bridged packets out of iptables (br_netfilter). Not enough
    where the global ``net.bridge.bridge-nf-call-iptables`` is on (it wins): :func:`forward_commands`."""
    return [["ip", "link", "set", "dev", bridge_name(pid), "type", "bridge",
             "nf_call_iptables", "0", "nf_call_ip6tables", "0", "nf_call_arptables", "0"]]


def forward_rule(pid: int) -> list[str]:
    """The FORWARD rule that lets the LAN's bridged packets through (after the chain name)."""
    br = bridge_name(pid)
    return ["-i", br, "-o", br, "-j", "ACCEPT"]


def forward_commands(pid: int) -> list[list[str]]:
    """Inserts :func:`forward_rule` at the head of FORWARD (``-w``: wait for the xtables lock)."""
    return [["iptables", "-w", "10", "-I", "FORWARD", "1", *forward_rule(pid)]]


def forward_teardown_commands(pid: int) -> list[list[str]]:
    """Deletes the rule :func:`forward_commands` inserted."""
    return [["iptables", "-w", "10", "-D", "FORWARD", *forward_rule(pid)]]


def leftover_forward_commands(rules: list[str], alive: Any) -> list[list[str]]:
    """Commands deleting the FORWARD rules (lines of ``iptables -S FORWARD``) of dead runs."""
    cmds: list[list[str]] = []
    for line in rules:
        m = _RULE_RE.match(line.strip())
        if m and m.group(1) == m.group(2) and not alive(int(m.group(1))):
            cmds.append(["iptables", "-w", "10", "-D", "FORWARD", *forward_rule(int(m.group(1)))])
    return cmds


def teardown_commands(pid: int, world: int, bridge_addr: str | None = None) -> list[list[str]]:
    """Every command is run even if earlier ones fail (a half-built LAN is torn down the same way).
    The bridge's address goes with the bridge; it is deleted first all the same, so the root
    namespace stops routing the subnet even if the bridge cannot be deleted."""
    cmds = [["ip", "netns", "del", ns_name(pid, r)] for r in range(world)]
    cmds += [["ip", "link", "del", veth_name(pid, r)] for r in range(world)]
    if bridge_addr is not None:
        cmds.append(["ip", "addr", "del", f"{bridge_addr}/24", "dev", bridge_name(pid)])
    cmds.append(["ip", "link", "del", bridge_name(pid)])
    return cmds


def leftover_commands(netns: list[str], links: list[str], alive: Any) -> list[list[str]]:
    """Commands deleting namespaces and links of this prefix whose run (pid) is gone; ``alive(pid)``
    says whether a pid is running."""
    cmds: list[list[str]] = []
    for ns in netns:
        m = _NS_RE.match(ns)
        if m and not alive(int(m.group(1))):
            cmds.append(["ip", "netns", "del", ns])
    dead = [(ln, m) for ln in links if (m := _LINK_RE.match(ln)) and not alive(int(m.group(1)))]
    cmds += [["ip", "link", "del", ln] for ln, m in dead if m.group(2) is not None]  # veths first
    cmds += [["ip", "link", "del", ln] for ln, m in dead if m.group(2) is None]  # then bridges
    return cmds


# -- running them ----------------------------------------------------------------------------------
def check_prereqs() -> str | None:
    """Why the LAN cannot be built here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "--link-mbit builds network namespaces and needs root (run it as root)"
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        return f"--link-mbit needs iproute2: {' and '.join(missing)} not found on PATH"
    return None


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetemError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers() -> list[list[str]]:
    """Commands removing what dead runs left behind (namespaces, veths, bridges of this prefix, and
    their FORWARD rules)."""
    ns = _run(["ip", "netns", "list"], check=False).stdout.split("\n")
    netns = [line.split()[0] for line in ns if line.strip()]
    out = _run(["ip", "-o", "link", "show"], check=False).stdout.split("\n")
    links = [parts[1].split("@")[0].rstrip(":") for line in out if len(parts := line.split()) > 1]
    rules = _run(["iptables", "-w", "10", "-S", "FORWARD"], check=False).stdout.split("\n") if _has_iptables() else []
    return leftover_commands(netns, links, _pid_alive) + leftover_forward_commands(rules, _pid_alive)


def _has_iptables() -> bool:
    return shutil.which("iptables") is not None


def _open_forward(pid: int) -> bool:
    """Inserts the LAN's FORWARD rule; True if it did (so close() deletes it). Without iptables, or
    where iptables cannot even list FORWARD (no netfilter tables in this kernel), nothing filters
    the bridge and nothing is needed; a FORWARD chain that exists but refuses the rule is an error."""
    if not _has_iptables():
        return False
    try:
        for cmd in forward_commands(pid):
            _run(cmd)
        return True
    except NetemError:
        if _run(["iptables", "-w", "10", "-S", "FORWARD"], check=False).returncode != 0:
            return False
        raise


def clean_leftovers() -> int:
    cmds = leftovers()
    for cmd in cmds:
        _run(cmd, check=False)
    return len(cmds)


class Lan:
    """The emulated LAN for ``world`` ranks: :meth:`open` builds it, :meth:`close` deletes it. ``names[r]`` is rank r's namespace,
    ``addrs[r]`` its address; with ``bridge_addr`` (e.g. :data:`BRIDGE_ADDR`) the root namespace
    has that address on the bridge, reachable from every rank."""

    def __init__(self, world: int, mbit: float, egress_only: bool = False, pid: int | None = None,
                 bridge_addr: str | None = None) -> None:
        self.world, self.mbit, self.egress_only, self.bridge_addr = world, mbit, egress_only, bridge_addr
        self.pid = os.getpid() if pid is None else pid
        self.names = [ns_name(self.pid, r) for r in range(world)]
        self.addrs = [rank_addr(r) for r in range(world)]
        self.built = False
        self.forwarding = False  # our FORWARD rule is in

    def open(self) -> Lan:
        clean_leftovers()
        self.built = True  # from the first command on, close() has something to undo
        try:
            for cmd in setup_commands(self.pid, self.world, self.mbit, self.egress_only, self.bridge_addr):
                _run(cmd)
            for cmd in optional_commands(self.pid):
                _run(cmd, check=False)
            self.forwarding = _open_forward(self.pid)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Deletes everything; SIGINT/SIGTERM wait until it is done."""
        if not self.built:
            return
        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            cmds = teardown_commands(self.pid, self.world, self.bridge_addr)
            if self.forwarding:
                cmds += forward_teardown_commands(self.pid)
            for cmd in cmds:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    _run(cmd, check=False)
            self.built = self.forwarding = False
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def describe(self) -> str:
        both = "egress only" if self.egress_only else "each direction"
        return (f"emulated LAN: {self.world} network namespaces {self.names[0]}..{self.names[-1]} on bridge "
                f"{bridge_name(self.pid)}, veth + tbf {self.mbit:g} Mbit/s {both} (burst "
                f"{tbf_burst_bytes(self.mbit)} B, latency {LATENCY_MS} ms), addresses {self.addrs[0]}..{self.addrs[-1]}"
                + (f", root namespace {self.bridge_addr} on the bridge" if self.bridge_addr else ""))


# -- in a process ----------------------------------------------------------------------------------
def enter_netns(name: str) -> None:
    """Moves the calling thread (call it first thing, from the main thread of a fresh process, before
    any socket or thread exists: both inherit it) into the network namespace ``name``."""
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python 3.12+
            os.setns(fd, CLONE_NEWNET)
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


PROBE_PORT = 29400


def _probe_rank(name: str, addr: str, succ_addr: str, seconds: float, barrier: Any, out: Any, rank: int) -> None:
    import socket
    import threading

    enter_netns(name)
    lst = socket.create_server((addr, PROBE_PORT))
    barrier.wait(30)
    snd = socket.create_connection((succ_addr, PROBE_PORT), timeout=30)
    rcv, _ = lst.accept()
    lst.close()
    block = b"\0" * (1 << 20)

    def send() -> None:
        end = time.perf_counter() + seconds
        with contextlib.suppress(OSError):
            while time.perf_counter() < end:
                snd.sendall(block)
        snd.shutdown(socket.SHUT_WR)

    th = threading.Thread(target=send, daemon=True)
    th.start()
    buf = bytearray(1 << 20)
    rcv.settimeout(seconds + 30)
    got, t0 = rcv.recv_into(buf), time.perf_counter()  # from the first byte on
    while k := rcv.recv_into(buf):
        got += k
    t1 = time.perf_counter()
    th.join(30)
    out.put((rank, got * 8 / (t1 - t0) / 1e6))


def probe_ring(ctx: Any, lan: Lan, world: int, seconds: float = 1.0) -> list[float]:
    """Every rank of ``world`` sends to its successor for ``seconds`` at once (the ring all-reduce's
    pattern, plain sockets); returns the Mbit/s each one received, by rank."""
    barrier, out = ctx.Barrier(world), ctx.Queue()
    procs = [ctx.Process(target=_probe_rank, daemon=True,
                         args=(lan.names[r], lan.addrs[r], lan.addrs[(r + 1) % world], seconds, barrier, out, r))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = dict(out.get(timeout=seconds + 30) for _ in range(world))
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(3)
    return [got[r] for r in range(world)]

