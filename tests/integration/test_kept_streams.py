"""Data-plane streams kept for a membership epoch (issue 14): reused by the next round, closed at
an epoch change and when the job ends, a preamble of a stale round or another epoch refused,
and a kept stream that broke reported and replaced the round after. Servers on 127.0.0.1:0,
members as threads."""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import numpy as np
import pytest

from dml.aggregation.transport import ExchangeError
from dml.peer import dataplane
from dml.peer.link import PeerLink
from dml.peer.watch import SuccessorWatch
from dml.common.spec import JobSpec, spec_to_pb
from dml.v1 import jobs_pb2, types_pb2
from tests.integration.helpers import Member, coordinator, job_stub, peers, ring_key, wait_for
from tests.integration.test_dataplane import int_bufs, our_shm_files, run_ring


@pytest.fixture
def ring():
    made: list[Member] = []

    def make(n: int) -> list[Member]:
        made.extend(Member() for _ in range(n))
        return made[-n:]

    yield make
    for m in made:
        m.close()


def links(ms: list[Member], key: tuple[str, int, int], plane: str,
          keep_watch: list[Callable[[SuccessorWatch], None]] | None = None) -> list[PeerLink]:
    n = len(ms)
    return [PeerLink(ms[r].servicer, key, f"p{r}", f"p{(r - 1) % n}", f"p{(r + 1) % n}", ms[(r + 1) % n].address,
                     10.0, ms[r].abort, idle_timeout_s=5.0, data_plane=plane,
                     keep_watch=keep_watch[r] if keep_watch else None) for r in range(n)]


def one_round(ms: list[Member], key: tuple[str, int, int], plane: str, seed: int = 0,
              made: list[PeerLink] | None = None, keep_watch=None) -> list[BaseException | None]:
    """Runs one all-reduce on fresh links for ``key`` (put in ``made``); checks the sum where
    every member succeeded."""
    bufs = int_bufs(len(ms), 20_011, seed)
    want = np.sum(np.stack(bufs).astype(np.float64), axis=0)
    ls = links(ms, key, plane, keep_watch)
    if made is not None:
        made[:] = ls
    errors = run_ring(ls, bufs)
    if errors == [None] * len(ms):
        for b in bufs:
            assert np.array_equal(b.astype(np.float64), want)
        assert [link.sender_kind for link in ls] == [plane] * len(ms)
        assert [link.receiver_kind for link in ls] == [plane] * len(ms)
    return errors


def opened(ms: list[Member]) -> list[int]:
    return [m.servicer.data_plane.opened for m in ms]


def kept_everywhere(ms: list[Member], n: int) -> None:
    """Waits until every member keeps ``n`` streams each way (the receiving side parks its
    stream once its link closed, which may be just after the sender's acknowledgement)."""
    wait_for(lambda: all(len(m.servicer.data_plane.kept()) == n and len(m.servicer.kept_senders.keys()) == n
                         for m in ms), 10.0, f"{n} kept streams each way on every member")


@pytest.mark.parametrize("plane", ["tcp", "shm"])
@pytest.mark.parametrize("world", [2, 3])
def test_rounds_of_an_epoch_reuse_the_stream_of_the_first(ring, plane, world):
    ms = ring(world)
    job, _, epoch = ring_key()
    assert one_round(ms, (job, 1, epoch), plane) == [None] * world
    assert opened(ms) == [1] * world
    kept_everywhere(ms, 1)
    for rnd in (2, 3, 5):  # a skipped round number is still a newer round
        assert one_round(ms, (job, rnd, epoch), plane, seed=rnd) == [None] * world
    assert opened(ms) == [1] * world, "a later round of the same epoch opened a new stream"
    assert [m.servicer.data_plane.reused for m in ms] == [3] * world
    assert our_shm_files() == [], "a kept stream's shared-memory file is still named in /dev/shm"


@pytest.mark.parametrize("plane", ["tcp", "shm"])
def test_an_epoch_change_and_the_end_of_the_job_close_the_kept_streams(ring, plane):
    ms = ring(2)
    job, _, epoch = ring_key()
    assert one_round(ms, (job, 1, epoch), plane) == [None] * 2
    kept_everywhere(ms, 1)
    ls = links(ms, (job, 2, epoch + 1), plane)  # the new epoch's links claim their inboxes
    kept_everywhere(ms, 0)
    bufs = int_bufs(2, 1000)
    assert run_ring(ls, bufs) == [None] * 2
    assert opened(ms) == [2, 2], "the new epoch must open new streams"
    kept_everywhere(ms, 1)
    for m in ms:  # the coordinator's heartbeat names another job (this one ended)
        m.servicer.keep_only("another-job", 1)
    kept_everywhere(ms, 0)


def test_a_kept_stream_refuses_a_preamble_of_a_stale_round_or_another_epoch():
    """The receiving end alone: a stream kept after round 5 of epoch 3 is closed, attached to
    nothing, when its next preamble names round 5 again, an older round, or another epoch; the
    right preamble attaches it to that round's inbox."""
    attached: list[tuple] = []

    def attach(key, sender, conn, slots) -> bool:
        attached.append((key, sender))
        return True

    dp = dataplane.DataPlane("127.0.0.1", attach)
    try:
        for bad in (dataplane.round_preamble(5, 3), dataplane.round_preamble(4, 3),
                    dataplane.round_preamble(6, 2), dataplane.round_preamble(6, 4), b"GET / HTTP/1.1\r\n\r\n\0\0"):
            a, b = socket.socketpair()
            try:
                assert dp.keep(b, ("j", 5, 3), "p0", None)
                assert dp.kept() == [("j", 3, "p0")]
                a.sendall(bad)
                a.settimeout(10.0)
                assert a.recv(1) == b"", "the stream should be closed"
                wait_for(lambda: dp.kept() == [], 5.0, "the refused stream to be forgotten")
            finally:
                a.close()
        assert attached == []
        a, b = socket.socketpair()
        try:
            assert dp.keep(b, ("j", 5, 3), "p0", None)
            a.sendall(dataplane.round_preamble(6, 3))
            wait_for(lambda: attached != [], 5.0, "the kept stream to be attached")
            assert attached == [(("j", 6, 3), "p0")]
            assert dp.reused == 1 and dp.kept() == []
        finally:
            a.close()
            b.close()
    finally:
        dp.close()


def test_kept_streams_are_bounded_per_sender_and_closed_with_the_data_plane():
    dp = dataplane.DataPlane("127.0.0.1", lambda *a: True)
    pairs = [socket.socketpair() for _ in range(dataplane.SENDER_KEPT + 1)]
    try:
        got = [dp.keep(b, ("j", 1, 1), "p0", None) for _, b in pairs]
        assert got == [True] * dataplane.SENDER_KEPT + [False]
        dp.close()
        for a, _ in pairs[: dataplane.SENDER_KEPT]:
            a.settimeout(10.0)
            assert a.recv(1) == b""
        assert dp.kept() == []
    finally:
        for a, b in pairs:
            a.close()
            b.close()


@pytest.mark.parametrize("plane", ["tcp", "shm"])
def test_a_kept_stream_the_successor_closed_is_replaced_by_a_new_one(ring, plane):
    ms = ring(2)
    job, _, epoch = ring_key()
    assert one_round(ms, (job, 1, epoch), plane) == [None] * 2
    kept_everywhere(ms, 1)
    (key,) = ms[0].servicer.kept_senders.keys()
    sock = ms[0].servicer.kept_senders._kept[key]._sock  # noqa: SLF001 - p0's end of the kept stream
    ms[1].servicer.data_plane.drop_kept()  # p1 closes the stream from p0 between rounds
    wait_for(lambda: not dataplane.stream_idle(sock), 10.0, "p0's end to see the stream closed")
    assert one_round(ms, (job, 2, epoch), plane, seed=2) == [None] * 2
    assert opened(ms) == [1, 2], "p0 should have opened a new stream to p1, p1 reused its own to p0"


@pytest.mark.parametrize("plane", ["tcp", "shm"])
def test_a_kept_stream_that_breaks_in_use_is_reported_naming_the_neighbour_and_never_reused(ring, plane, monkeypatch):
    """p1 closes the kept stream from p0 just as p0 reuses it (p0's check that it is still open
    passes): the round fails naming a neighbour, as a fresh stream that broke would, and the
    next round runs on new streams."""
    ms = ring(2)
    job, _, epoch = ring_key()
    assert one_round(ms, (job, 1, epoch), plane) == [None] * 2
    kept_everywhere(ms, 1)
    real_begin = dataplane.round_preamble
    closed = threading.Event()

    def preamble_after_close(rnd: int, ep: int) -> bytes:
        if not closed.is_set():
            closed.set()
            ms[1].servicer.data_plane.drop_kept()
            wait_for(lambda: ms[1].servicer.data_plane.kept() == [], 5.0, "p1 to close the kept stream")
        return real_begin(rnd, ep)

    monkeypatch.setattr(dataplane, "round_preamble", preamble_after_close)
    monkeypatch.setattr(dataplane, "stream_idle", lambda sock: True)
    errors = one_round(ms, (job, 2, epoch), plane, seed=2)
    assert closed.is_set()
    assert any(errors), "a round over a stream that broke cannot succeed"
    for e in errors:
        if e is not None:
            assert isinstance(e, ExchangeError) and e.suspect in ("p0", "p1"), repr(e)
    monkeypatch.undo()
    before = opened(ms)
    ls: list[PeerLink] = []
    assert one_round(ms, (job, 3, epoch), plane, seed=3, made=ls) == [None] * 2
    after = opened(ms)
    assert after[1] == before[1] + 1, "the stream that broke must be replaced, not reused"
    for r, e in enumerate(errors):
        if e is not None:
            assert not ls[r].channel_reused, f"p{r}'s round failed: its channel must not carry the next"


class Watches:
    """What a peer's round loop does with the watch each clean round hands over: keeps it
    (ring_round.RingRound._keep_watch), and ends it when the next plan comes, before that
    round's link is made (runner.Peer.run: ``unwatch``)."""

    def __init__(self) -> None:
        self.kept: SuccessorWatch | None = None
        self.ended: list[SuccessorWatch] = []

    def next_plan(self) -> None:
        if self.kept is not None:
            self.kept.close()
            self.ended.append(self.kept)
            self.kept = None

    def __call__(self, watch: SuccessorWatch) -> None:
        self.next_plan()
        self.kept = watch


@pytest.mark.parametrize("plane", ["tcp", "grpc"])
def test_rounds_of_an_epoch_reuse_the_channel_of_the_first_and_a_new_epoch_opens_one(ring, plane):
    """One gRPC channel per successor per epoch (a new one each round cost about 1.1 ms of CPU,
    3.1 ms over TLS, against 0.5-0.8 ms): the later rounds' watch calls, and on "grpc" their frames, go over the channel
    the first round opened, though each round ends the previous round's watch."""
    ms = ring(3)
    watches = [Watches() for _ in ms]
    job, _, epoch = ring_key()
    for rnd in (1, 2, 3):
        for w in watches:
            w.next_plan()
        ls: list[PeerLink] = []
        assert one_round(ms, (job, rnd, epoch), plane, seed=rnd, made=ls, keep_watch=watches) == [None] * 3
        assert [link.channel_reused for link in ls] == [rnd > 1] * 3, f"round {rnd}"
        assert all(w.kept is not None and w.kept.active() for w in watches), "the kept watch is open"
    assert all(len(w.ended) == 2 and not w.ended[-1].active() for w in watches)
    assert [len(m.servicer.kept_channels.keys()) for m in ms] == [1] * 3
    ls = []
    assert one_round(ms, (job, 4, epoch + 1), plane, seed=4, made=ls, keep_watch=watches) == [None] * 3
    assert [link.channel_reused for link in ls] == [False] * 3, "a new epoch must open new channels"
    assert [m.servicer.kept_channels.keys() for m in ms] == [[(job, epoch + 1, f"p{(r + 1) % 3}", ms[(r + 1) % 3].address)]
                                                             for r in range(3)]
    for m in ms:  # the coordinator's heartbeat names another job (this one ended)
        m.servicer.keep_only("another-job", 1)
    assert [m.servicer.kept_channels.keys() for m in ms] == [[]] * 3
    assert all(not w.kept.active() for w in watches), "closing a kept channel ends the watch on it"


def test_a_channel_whose_kept_watch_ended_is_not_reused(ring):
    """The watch a clean round leaves on the channel is its probe: the successor's server went
    away between rounds, so the watch broke, and the next round opens a new channel."""
    ms = ring(2)
    watches = [Watches() for _ in ms]
    job, _, epoch = ring_key()
    assert one_round(ms, (job, 1, epoch), "tcp", made=[], keep_watch=watches) == [None] * 2
    ms[1].server.stop(0).wait(5)
    wait_for(lambda: watches[0].kept.lost != "", 10.0, "p0's watch on p1 to break")
    ls = links(ms, (job, 2, epoch), "tcp")
    try:
        assert not ls[0].channel_reused
        assert ms[0].servicer.kept_channels.keys() == [], "the broken channel is closed, not kept"
    finally:
        for link in ls:
            link.shutdown()


def test_a_real_peers_rounds_reuse_one_channel_per_epoch(monkeypatch):
    """The same through real peers' round loops (which end the last round's watch when the next
    plan comes, before the next link takes the channel): a job of one epoch opens one channel
    per member, in its first round."""
    made: list[tuple[str, int, int, bool]] = []
    real_init = PeerLink.__init__

    def init(self, servicer, key, self_id, *args, **kw):
        real_init(self, servicer, key, self_id, *args, **kw)
        made.append((self_id, key[1], key[2], self.channel_reused))

    monkeypatch.setattr(PeerLink, "__init__", init)
    spec = JobSpec(task="digits", rounds=5, local_steps=1, batch_size=32, learning_rate=0.1, min_peers=3)
    with coordinator() as srv, peers(srv.address, 3) as ps:
        wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 3, 30, "three idle peers")
        stub = job_stub(srv.address)
        jid = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=10).job_id
        wait_for(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=5).job.state == types_pb2.JOB_STATE_SUCCEEDED,
                 90, "the job to succeed")
        ids = {p.peer_id for p in ps}
    ours = [m for m in made if m[0] in ids]
    assert len({m[2] for m in ours}) == 1, f"the job changed epochs, so the test shows nothing: {ours}"
    assert sorted((pid, rnd) for pid, rnd, _, _ in ours) == sorted((pid, r) for pid in ids for r in range(1, 6))
    assert all(reused == (rnd > 1) for _, rnd, _, reused in ours), ours
