"""The ring over real peer links: the TCP data plane (negotiated over gRPC), its fallback to gRPC,
its authentication, and its failure behaviour. Servers on 127.0.0.1:0, members as threads."""
from __future__ import annotations

import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from dml.common import rpc
from dml.v1 import exchange_pb2, exchange_pb2_grpc

from dml.aggregation.allreduce import ring_allreduce
from dml.aggregation.codecs import get_codec
from dml.aggregation.transport import Cancelled, ExchangeError, Header
from dml.peer import dataplane, shm
from dml.peer.link import SHM_MIN_BYTES as PeerLink_SHM_MIN
from dml.peer.link import PeerLink
from tests.integration.helpers import Member, ring_key, wait_for


@pytest.fixture
def members():
    made: list[Member] = []

    def make(n: int, tcp: list[bool] | None = None) -> list[Member]:
        made.extend(Member(t) for t in (tcp or [True] * n))
        return made[-n:]

    yield make
    for m in made:
        m.close()


def links(ms: list[Member], key: tuple[str, int, int], plane: str | list[str], idle_s: float = 5.0,
          payload_bytes: int = 0) -> list[PeerLink]:
    n = len(ms)
    planes = plane if isinstance(plane, list) else [plane] * n
    return [PeerLink(ms[r].servicer, key, f"p{r}", f"p{(r - 1) % n}", f"p{(r + 1) % n}", ms[(r + 1) % n].address,
                     10.0, ms[r].abort, idle_timeout_s=idle_s, data_plane=planes[r], payload_bytes=payload_bytes)
            for r in range(n)]


def our_shm_files() -> list[pathlib.Path]:
    """Shared-memory files this process created (the receiver's side makes them)."""
    return sorted(shm.SHM_DIR.glob(f"dml-{os.getpid()}-*"))


def run_ring(ls: list[PeerLink], bufs: list[np.ndarray], codec: str = "fp32",
             body: Callable[[int, PeerLink], None] | None = None) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * len(ls)

    def one(r: int) -> None:
        try:
            if body is not None:
                body(r, ls[r])
            else:
                ring_allreduce(bufs[r], r, len(ls), ls[r], 10.0, 1000, get_codec(codec),
                               None if codec == "fp32" else np.zeros_like(bufs[r]))
        except BaseException as e:  # noqa: BLE001 - collected for the assertions
            errors[r] = e
        finally:
            ls[r].shutdown()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(len(ls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a ring member hung"
    return errors


def int_bufs(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-100, 100, size).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("plane", ["shm", "tcp", "grpc", "auto"])
@pytest.mark.parametrize("world", [2, 3])
def test_ring_is_exact_over_every_data_plane(members, plane, world):
    ms = members(world)
    bufs = int_bufs(world, 10_007)
    want = np.sum(np.stack(bufs).astype(np.float64), axis=0)
    ls = links(ms, ring_key(), plane)
    assert run_ring(ls, bufs) == [None] * world
    for b in bufs:
        assert np.array_equal(b.astype(np.float64), want)
    expect = {"grpc": "grpc", "shm": "shm"}.get(plane, "tcp")  # auto: small buffers stay on TCP
    assert [link.sender_kind for link in ls] == [expect] * world
    assert [link.receiver_kind for link in ls] == [expect] * world
    assert our_shm_files() == [], "a shared-memory file outlived its exchange"


def test_auto_takes_shared_memory_for_large_buffers(members):
    ms = members(2)
    bufs = int_bufs(2, 4_000)
    ls = links(ms, ring_key(), "auto", payload_bytes=PeerLink_SHM_MIN)
    assert run_ring(ls, bufs) == [None] * 2
    assert [link.sender_kind for link in ls] == ["shm", "shm"]


def test_shared_memory_slots_are_sized_for_the_links_chunks(members, monkeypatch):
    """A stream maps SLOTS slots on both sides every round: they hold the link's chunk (plus a
    codec's scale), not the largest chunk any link could send."""
    made: list[int] = []
    create = dataplane.SharedSlots.create
    monkeypatch.setattr(dataplane.SharedSlots, "create", lambda n: made.append(n) or create(n))
    ms = members(2)
    bufs = int_bufs(2, 4_000)
    want = np.sum(np.stack(bufs).astype(np.float64), axis=0)
    n, key = 2, ring_key()
    ls = [PeerLink(ms[r].servicer, key, f"p{r}", f"p{(r - 1) % n}", f"p{(r + 1) % n}", ms[(r + 1) % n].address,
                   10.0, ms[r].abort, idle_timeout_s=5.0, data_plane="shm", chunk_elems=1000) for r in range(n)]
    assert run_ring(ls, bufs) == [None] * 2  # run_ring sends 1000-element chunks
    assert [link.sender_kind for link in ls] == ["shm", "shm"]
    assert made == [4 * 1000 + 64] * 2
    assert np.array_equal(bufs[0].astype(np.float64), want)
    with pytest.raises(ValueError, match="chunk_elems"):
        PeerLink(ms[0].servicer, ring_key(), "p0", "p1", "p1", ms[1].address, 10.0, ms[0].abort, chunk_elems=0)


def test_shared_memory_that_cannot_be_mapped_falls_back_to_tcp_or_fails_clearly(members, monkeypatch):
    """A successor on another host (or with its own /dev/shm) offers a file the sender cannot
    map: "auto" streams over TCP, "shm" fails naming it, and the offered file is removed."""
    def elsewhere(*_: object) -> shm.SharedSlots:
        raise FileNotFoundError("no such file on this host")

    monkeypatch.setattr(shm.SharedSlots, "attach", staticmethod(elsewhere))
    ms = members(2)
    bufs = int_bufs(2, 4_000)
    want = np.sum(np.stack(bufs).astype(np.float64), axis=0)
    ls = links(ms, ring_key(), "auto", payload_bytes=PeerLink_SHM_MIN)
    assert run_ring(ls, bufs) == [None] * 2
    assert np.array_equal(bufs[0].astype(np.float64), want)
    assert [link.sender_kind for link in ls] == ["tcp", "tcp"]
    errors = run_ring(links(ms, ("j", 2, 1), ["shm", "tcp"]), int_bufs(2, 100))
    assert isinstance(errors[0], ExchangeError) and "shared memory" in str(errors[0]) and errors[0].suspect == "p1"
    assert our_shm_files() == [], "an offer nobody mapped must go when its exchange ends"


@pytest.mark.parametrize("plane", ["tcp", "shm"])
@pytest.mark.parametrize("codec", ["bf16", "fp16", "int8"])
def test_lossy_codecs_end_bit_identical(members, codec, plane):
    ms = members(3)
    bufs = [b / 7 for b in int_bufs(3, 5_003, seed=1)]
    want = np.sum(np.stack(bufs).astype(np.float64), axis=0)
    assert run_ring(links(ms, ring_key(), plane), bufs, codec) == [None] * 3
    assert bufs[0].tobytes() == bufs[1].tobytes() == bufs[2].tobytes()
    assert np.abs(bufs[0] - want).max() < 0.05 * np.abs(want).max()


def test_auto_falls_back_to_grpc_where_no_data_plane_is_served(members):
    ms = members(3, tcp=[True, False, True])  # p1 serves no TCP: p0 -> p1 goes over gRPC
    bufs = int_bufs(3, 3000)
    want = np.sum(np.stack(bufs).astype(np.float64), axis=0)
    ls = links(ms, ring_key(), "auto")
    assert run_ring(ls, bufs) == [None] * 3
    assert np.array_equal(bufs[2].astype(np.float64), want)
    assert [link.sender_kind for link in ls] == ["grpc", "tcp", "tcp"]
    assert [link.receiver_kind for link in ls] == ["tcp", "grpc", "tcp"]


def test_tcp_only_job_fails_clearly_where_no_data_plane_is_served(members):
    ms = members(2, tcp=[True, False])
    ls = links(ms, ring_key(), "tcp")
    errors = run_ring(ls, int_bufs(2, 100))
    assert isinstance(errors[0], ExchangeError) and "TCP" in str(errors[0]) and errors[0].suspect == "p1"
    assert isinstance(errors[1], ExchangeError)  # its predecessor never sent: it times out


def hung_up(s: socket.socket) -> bool:
    """True when the other side closes the connection (cleanly or with a reset) within 5 s."""
    s.settimeout(5)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_data_plane_refuses_connections_without_a_valid_token(members):
    (m,) = members(1)
    dp = m.servicer.data_plane
    assert dp is not None
    key = ring_key()
    box = m.servicer.inbox(key)
    for hello in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", dataplane.MAGIC + b"\x00" * dataplane.TOKEN_BYTES):
        with socket.create_connection(("127.0.0.1", dp.port), timeout=5) as s:
            s.sendall(hello)
            assert hung_up(s), "the data plane must hang up on a bad hello"
    assert box.conn is None
    token, _ = dp.offer(key, "p9")
    with dataplane.connect("127.0.0.1", dp.port, token, 5) as s:
        deadline = time.monotonic() + 5
        while box.conn is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert box.conn is not None and box.sender == "p9"
    with socket.create_connection(("127.0.0.1", dp.port), timeout=5) as s:  # tokens are single-use
        s.sendall(dataplane.MAGIC + token)
        assert hung_up(s)


def test_open_data_plane_rpc_validates_and_reports_absence(members):
    with_tcp, without = members(2, tcp=[True, False])
    for m, code in ((without, grpc.StatusCode.FAILED_PRECONDITION), (with_tcp, grpc.StatusCode.INVALID_ARGUMENT)):
        with rpc.channel(m.address) as ch:
            stub = exchange_pb2_grpc.PeerExchangeStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(job_id="", round=1, epoch=1), timeout=5)
            assert e.value.code() == code


@pytest.mark.parametrize("plane", ["tcp", "shm"])
def test_predecessor_dying_mid_stream_fails_the_receiver_fast_naming_it(members, plane):
    ms = members(2)
    ls = links(ms, ring_key(), plane, idle_s=20.0)
    payload = np.zeros(1000, np.float32)

    def body(r: int, link: PeerLink) -> None:
        if r == 0:  # sends one frame of three, then dies
            link.send(Header(1, 1, 0, 0, 1000), payload.view(np.uint8))
            link.wait_sent(1, 5)
            link.shutdown()
            return
        for _ in range(3):
            link.recv_header(10)
            link.recv_payload(payload.copy().view(np.uint8), 10)

    errors = run_ring(ls, [], body=body)
    assert errors[0] is None
    assert isinstance(errors[1], ExchangeError) and errors[1].suspect == "p0"
    # A closed stream fails at once, not after the idle timeout: the error is the stream's end,
    # not the "no data from p0 for 10.0s" of a timeout.
    assert not str(errors[1]).startswith("no data from"), errors[1]


@pytest.mark.parametrize("plane", ["tcp", "shm"])
def test_successor_dying_after_taking_our_frames_is_named_while_we_wait_for_our_predecessor(members, plane):
    # p0's frames all sit in the kernel's buffers when p1 dies, so no write of p0 fails, and
    # p2 (p0's predecessor) waits for p1's stream, which never comes: nothing p0 reads or
    # writes breaks. p0's watch on p1 must name p1, not, after the idle timeout, p2.
    ms = members(3)
    ls = links(ms, ring_key(), plane, idle_s=20.0)
    payload = np.zeros(300, np.float32)
    killed, done = threading.Event(), threading.Event()

    def body(r: int, link: PeerLink) -> None:
        if r == 0:
            for i in range(3):
                link.send(Header(1, 1, 0, 100 * i, 100), payload[100 * i : 100 * (i + 1)].view(np.uint8))
            link.wait_sent(3, 5)
            ms[1].close()  # p1 dies with our frames unread
            killed.set()
            try:
                link.recv_header(25)
            finally:
                done.set()
        elif r == 1:
            killed.wait(25)  # holds its inbox (our stream) until it dies
        else:
            done.wait(25)  # p1 never sends: p2 has nothing to forward

    errors = run_ring(ls, [], body=body)
    assert isinstance(errors[0], ExchangeError) and errors[0].suspect == "p1", errors[0]


def test_abort_stops_a_waiting_receiver_promptly(members):
    ms = members(2)
    ls = links(ms, ring_key(), "tcp", idle_s=20.0)
    waited = threading.Event()  # p1's wait ended (by the abort, we check): p0 may close its stream

    def body(r: int, link: PeerLink) -> None:
        if r == 0:
            link.send(Header(1, 1, 0, 0, 10), np.zeros(10, np.float32).view(np.uint8))
            link.wait_sent(1, 5)
            waited.wait(15)  # keep the stream open, send nothing more, until p1's wait is over
            return
        try:
            link.recv_header(10)
            link.recv_payload(np.zeros(10, np.float32).view(np.uint8), 10)
            threading.Timer(0.2, ms[1].abort.set).start()
            link.recv_header(10)
        finally:
            waited.set()

    errors = run_ring(ls, [], body=body)
    assert isinstance(errors[1], ExchangeError) and "aborted" in str(errors[1])
    # The abort ended the wait (a cancellation, nobody's fault), not its 10 s timeout.
    assert isinstance(errors[1], Cancelled) and errors[1].suspect == "", errors[1]


@pytest.mark.parametrize("plane", ["tcp", "shm"])
def test_lossy_ring_much_larger_than_socket_buffers_does_not_deadlock(members, monkeypatch, plane):
    """Every member first queues its whole reduce-scatter segment: if encoding waited for buffer
    space while neighbours did the same, nobody would read and the ring would stall (it did, with
    a fixed pool of 16 staging buffers, at 256 MB). Frames here far outnumber any fixed pool and
    the segments exceed the socket buffers (kept small here)."""
    monkeypatch.setattr(dataplane, "SOCKET_BUFFER_BYTES", 32 * 1024)
    ms = members(3)
    bufs = [np.full(600_000, float(r + 1), np.float32) for r in range(3)]
    ls = links(ms, ring_key(), plane, idle_s=10.0)  # shm: 4 slots in flight, far fewer than frames
    errors: list[BaseException | None] = [None] * 3

    def one(r: int) -> None:
        try:
            ring_allreduce(bufs[r], r, 3, ls[r], 20.0, 4096, get_codec("bf16"), np.zeros_like(bufs[r]))
        except BaseException as e:  # noqa: BLE001
            errors[r] = e
        finally:
            ls[r].shutdown()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "the ring deadlocked"
    assert errors == [None] * 3
    assert all(np.all(b == 6.0) for b in bufs)


def _attached_link(m: Member, key: tuple[str, int, int]) -> tuple[PeerLink, socket.socket]:
    """A member's link whose predecessor's TCP stream has arrived (the far end is returned)."""
    link = PeerLink(m.servicer, key, "p0", "p1", "p1", m.address, 10.0, m.abort, idle_timeout_s=5.0, data_plane="tcp")
    ours, theirs = socket.socketpair()
    ours.settimeout(dataplane.HANDSHAKE_S)  # as the data plane's handshake leaves it
    assert m.servicer._attach(key, "p1", ours)
    return link, theirs


def test_a_stream_dropped_by_a_rapid_reissue_cancels_the_read_not_a_local_failure(members):
    """A re-issue opens the next epoch's inbox (the predecessor got there first), which drops this
    one while its reader is about to read: the reader gets a cancelled exchange, naming nobody;
    before, its socket was closed under it and ``settimeout`` raised EBADF, an OSError that made
    the peer report a local failure and give up its place."""
    (m,) = members(1)
    link, theirs = _attached_link(m, ("j", 4, 1))
    try:
        m.servicer.inbox(("j", 4, 2))  # the newer epoch's inbox, opened from another thread
        with pytest.raises(Cancelled) as e:
            link.recv_header(5.0)
        assert e.value.suspect == ""
    finally:
        link.shutdown()
        theirs.close()


def test_a_reader_blocked_on_a_superseded_stream_is_woken_and_its_socket_stays_its_own(members):
    """Another thread drops the inbox while the reader waits in ``recv_into``: the socket is only
    shut down (the reader wakes at once), never closed under it, so its descriptor cannot be
    reused by a new connection mid-read; the reader closes it when its link shuts down."""
    (m,) = members(1)
    link, theirs = _attached_link(m, ("j", 5, 1))
    got: list[BaseException] = []

    def read() -> None:
        try:
            link.recv_header(30.0)
        except BaseException as e:  # noqa: BLE001 - checked below
            got.append(e)

    t = threading.Thread(target=read)
    t.start()
    try:
        box = m.servicer.inbox(("j", 5, 1))
        wait_for(lambda: box.conn is not None and box.conn.gettimeout() == 0.05, 10, "the reader to wait on its stream")
        conn = box.conn
        m.servicer.inbox(("j", 5, 2))  # supersedes it, from this thread
        assert conn.fileno() != -1, "the stream was closed under its reader"
        t.join(10)
        assert not t.is_alive() and len(got) == 1 and isinstance(got[0], Cancelled), got
    finally:
        link.shutdown()
        theirs.close()
    assert conn.fileno() == -1, "the reader's link did not close its stream"
