"""Gossip exchanges between GossipNodes behind real gRPC servers on 127.0.0.1 (ports picked by
the OS): the pairwise average, refusals, and what every kind of failure leaves behind."""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from dml.v1 import exchange_pb2, exchange_pb2_grpc

from dml.aggregation.gossip import merged_weight, pair_average
from dml.common import rpc
from dml.peer.exchange import ExchangeServicer, add_exchange_to_server
from dml.peer.gossip import CHUNK_BYTES, GossipNode, Outcome
from tests.integration.helpers import wait_for

JOB = "job-gossip-1"
BIG = CHUNK_BYTES // 4 + 12_345  # elements: two chunks, the second one partial


class FakeTrainer:
    """What a GossipNode needs of a trainer: a lock, a step counter, numel and a live flat host
    buffer."""

    def __init__(self, values: np.ndarray) -> None:
        self.lock = threading.Lock()
        self.version = 0  # bumped by whatever changes the parameters under the lock, as SGD steps do
        self.numel = int(values.size)
        self._buf = np.zeros(self.numel + 1, dtype=np.float32)
        self._buf[: self.numel] = values

    def host_buffer(self) -> np.ndarray:
        return self._buf

    def load_host_buffer(self, buf: np.ndarray) -> None:
        if not np.shares_memory(buf, self._buf):
            self._buf[:] = buf

    def params(self) -> np.ndarray:
        return self._buf[: self.numel].copy()


def params_of(trainer) -> np.ndarray:
    return trainer.host_buffer()[: trainer.numel].copy()


@dataclass
class Node:
    """A GossipNode served by its own gRPC server."""

    name: str
    node: GossipNode
    trainer: object
    server: grpc.Server
    address: str

    def params(self) -> np.ndarray:
        return params_of(self.trainer)

    def exchange(self, other: Node, timeout_s: float = 10.0, job: str = JOB) -> Outcome:
        return self.node.exchange(job, other.name, other.address, timeout_s)


@pytest.fixture
def cluster() -> Iterator[Callable]:
    """Factory: ``start(name, trainer, samples)`` gives a Node attached to JOB with that weight;
    ``start(name, servicer=...)`` serves a hand-written PeerExchange servicer instead."""
    servers: list[grpc.Server] = []

    def start(name: str, trainer=None, samples: int = 0, servicer=None) -> Node:
        node = GossipNode(name)
        if servicer is None:
            servicer = ExchangeServicer(lambda job_id, rnd: None)
            servicer.gossip = node
            if trainer is not None:
                node.attach(JOB, trainer)
                node.add_samples(samples)
            server = rpc.server(workers=8, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
            add_exchange_to_server(servicer, server)
        else:
            server = rpc.server(workers=8, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
            exchange_pb2_grpc.add_PeerExchangeServicer_to_server(servicer, server)
        port = rpc.bind(server, "127.0.0.1", 0)
        assert port, "no port"
        server.start()
        servers.append(server)
        return Node(name, node, trainer, server, f"127.0.0.1:{port}")

    yield start
    for s in servers:
        s.stop(0).wait(5)


def fake(seed: int, n: int = 257) -> FakeTrainer:
    return FakeTrainer(np.random.default_rng(seed).normal(size=n).astype(np.float32))


def assert_idle(*nodes: Node) -> None:
    """Every slot is free again (the partner's side frees it when its handler ends) and no
    trainer lock is left held."""
    wait_for(lambda: not any(n.node.slot.busy for n in nodes), 10, "every exchange slot to be free")
    for n in nodes:
        assert n.trainer.lock.acquire(timeout=5), f"{n.name}'s trainer lock is still held"
        n.trainer.lock.release()


# -- a completed exchange ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["trainer", "big"])
def test_completed_exchange_leaves_both_bit_identical_at_the_weighted_mean(cluster, kind: str) -> None:
    if kind == "trainer":
        from dml.common.tasks import get_task
        from dml.peer.trainer import Trainer

        ta, tb = Trainer(get_task("digits"), 1, 0.1), Trainer(get_task("digits"), 2, 0.1)
    else:
        ta, tb = fake(1, BIG), fake(2, BIG)
    a, b = cluster("peer-a", ta, samples=30), cluster("peer-b", tb, samples=10)
    xa, xb = a.params(), b.params()
    assert not np.array_equal(xa, xb)
    want = xa.copy()
    pair_average(want, xb.copy(), 30.0, 10.0)
    out = a.exchange(b)
    assert out.ok and not out.busy, out.detail
    assert out.partner == "peer-b"
    assert out.distance == pytest.approx(float(np.linalg.norm(xa.astype(np.float64) - xb)), rel=1e-6)
    assert out.bytes_sent == xa.nbytes == a.node.bytes_sent
    assert b.node.bytes_sent == xb.nbytes
    assert a.params().tobytes() == b.params().tobytes() == want.tobytes()
    assert a.node.weight == b.node.weight == merged_weight(30, 10) == 20.0
    assert (a.node.slot.commits, b.node.slot.commits) == (1, 1)
    assert a.node.one_sided == b.node.one_sided == 0
    assert_idle(a, b)
    # And back the other way: equal weights now, so the average is the same bytes again.
    out = b.exchange(a)
    assert out.ok and out.distance == 0.0
    assert a.params().tobytes() == b.params().tobytes() == want.tobytes()


def test_a_joiner_with_weight_zero_takes_on_its_partners_parameters(cluster) -> None:
    a, b = cluster("peer-a", fake(1), samples=0), cluster("peer-b", fake(2), samples=64)
    xb = b.params()
    assert a.exchange(b).ok
    assert a.params().tobytes() == b.params().tobytes() == xb.tobytes()
    assert a.node.weight == b.node.weight == 32.0


# -- refusals -----------------------------------------------------------------------------------


def test_busy_partner_refuses_at_once_and_nobody_changes(cluster) -> None:
    a, b = cluster("peer-a", fake(1), samples=5), cluster("peer-b", fake(2), samples=7)
    xa, xb = a.params(), b.params()
    assert b.node.slot.try_begin(("peer-c", "x1"))  # b is in another exchange
    out = a.exchange(b, timeout_s=20.0)
    assert not out.ok and out.busy, out
    # The partner's refusal ended it, not the exchange's deadline (how long it took is no measure
    # on a shared machine: the deadline would only show as DEADLINE_EXCEEDED).
    assert out.detail.startswith("RESOURCE_EXHAUSTED"), out.detail
    assert a.params().tobytes() == xa.tobytes() and b.params().tobytes() == xb.tobytes()
    assert (a.node.weight, b.node.weight) == (5, 7)
    assert not a.node.slot.busy and b.node.slot.partner == ("peer-c", "x1")
    assert b.node.slot.abort(("peer-c", "x1"))
    # An initiator that is itself being averaged does not start another exchange.
    assert a.node.slot.try_begin(("peer-c", "x2"))
    out = a.exchange(b)
    assert not out.ok and out.busy and "serving" in out.detail
    assert a.node.slot.abort(("peer-c", "x2"))
    assert a.exchange(b).ok


def finish(call, timeout_s: float = 10.0) -> grpc.StatusCode:
    """Reads a raw Gossip call to its end (cancelled after ``timeout_s`` whatever happens)."""
    timer = threading.Timer(timeout_s, call.cancel)
    timer.start()
    try:
        for _ in call:
            pass
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        timer.cancel()


def offer(n: int, **kw) -> exchange_pb2.GossipMessage:
    base = {"job_id": JOB, "sender_id": "peer-x", "exchange_id": "e1", "elems": n, "weight": 1.0}
    base.update(kw)
    return exchange_pb2.GossipMessage(**base)


@pytest.mark.parametrize(("case", "code"), [
    ("wrong size", grpc.StatusCode.INVALID_ARGUMENT),
    ("too much data", grpc.StatusCode.ABORTED),
    ("no deadline", grpc.StatusCode.INVALID_ARGUMENT),
    ("another job", grpc.StatusCode.FAILED_PRECONDITION),
    ("negative weight", grpc.StatusCode.INVALID_ARGUMENT),
    ("nan weight", grpc.StatusCode.INVALID_ARGUMENT),
    ("no exchange id", grpc.StatusCode.INVALID_ARGUMENT),
    ("empty stream", grpc.StatusCode.INVALID_ARGUMENT),
    ("detached", grpc.StatusCode.FAILED_PRECONDITION),
])
def test_bad_offers_are_refused_with_their_status_and_change_nothing(cluster, case: str, code: grpc.StatusCode) -> None:
    b = cluster("peer-b", fake(2), samples=3)
    xb = b.params()
    n = b.trainer.numel
    data = np.ones(n, dtype=np.float32).tobytes()
    msgs = {
        "wrong size": [offer(n + 1, data=data)],
        "too much data": [offer(n, data=data + b"\0\0\0\0")],
        "no deadline": [offer(n, data=data)],
        "another job": [offer(n, job_id="job-other", data=data)],
        "negative weight": [offer(n, weight=-1.0, data=data)],
        "nan weight": [offer(n, weight=float("nan"), data=data)],
        "no exchange id": [offer(n, exchange_id="", data=data)],
        "empty stream": [],
        "detached": [offer(n, data=data)],
    }[case]
    if case == "detached":
        b.node.detach()
    with rpc.channel(b.address) as ch:
        stub = exchange_pb2_grpc.PeerExchangeStub(ch)
        call = stub.Gossip(iter(msgs)) if case == "no deadline" else stub.Gossip(iter(msgs), timeout=10)
        got = finish(call)
    assert got == code, f"{case}: {got}"
    assert b.params().tobytes() == xb.tobytes() and b.node.weight == 3
    assert b.node.slot.commits == 0
    assert_idle(b)


def test_a_peer_that_does_not_gossip_refuses(cluster) -> None:
    servicer = ExchangeServicer(lambda job_id, rnd: None)  # gossip not set
    b = cluster("peer-b", servicer=servicer)
    with rpc.channel(b.address) as ch:
        call = exchange_pb2_grpc.PeerExchangeStub(ch).Gossip(iter([offer(4)]), timeout=10)
        assert finish(call) == grpc.StatusCode.FAILED_PRECONDITION


# -- failures -----------------------------------------------------------------------------------


class Silent(exchange_pb2_grpc.PeerExchangeServicer):
    """Reads the offer and never answers."""

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.calls = 0

    def Gossip(self, request_iterator, context):
        self.calls += 1
        try:
            for _ in request_iterator:
                pass
            while context.is_active():
                time.sleep(0.02)
        except grpc.RpcError:
            pass
        finally:
            self.ended.set()
        return
        yield  # a generator, like the real handler


@pytest.mark.parametrize("how", ["silent partner", "partner's trainer busy"])
def test_a_stalled_partner_costs_one_timeout_and_changes_nothing(cluster, how: str) -> None:
    timeout_s = 1.5
    a = cluster("peer-a", fake(1), samples=4)
    if how == "silent partner":
        silent = Silent()
        b = cluster("peer-b", servicer=silent)
    else:
        b = cluster("peer-b", fake(2), samples=4)
        xb = b.params()
        assert b.trainer.lock.acquire(timeout=5)  # mid-step, and it never ends
    xa = a.params()
    try:
        out = a.exchange(b, timeout_s=timeout_s)
    finally:
        if how != "silent partner":
            b.trainer.lock.release()
    assert not out.ok and not out.busy, out
    # One timeout: the exchange's own deadline ended it (not an early failure, nor a wait the
    # deadline did not bound), and it was one call, not retried.
    assert out.detail.startswith("DEADLINE_EXCEEDED"), out.detail
    assert a.params().tobytes() == xa.tobytes() and a.node.weight == 4
    assert a.node.slot.commits == 0 and not a.node.slot.busy
    if how == "silent partner":
        assert silent.ended.wait(10), "the stalled handler never saw the cancellation"
        assert silent.calls == 1
    else:
        assert_idle(a, b)
        assert b.params().tobytes() == xb.tobytes() and b.node.weight == 4
        assert b.node.slot.commits == 0
    assert a.node.one_sided == 0


class Dying(exchange_pb2_grpc.PeerExchangeServicer):
    """Reads the whole offer, answers with a header and one chunk of data, then either aborts
    the call or hangs until its server is stopped under it."""

    def __init__(self, n: int, abort: bool) -> None:
        self.n, self.abort = n, abort
        self.sending = threading.Event()

    def Gossip(self, request_iterator, context):
        first = next(request_iterator)
        got = len(first.data)
        while got < 4 * self.n:
            got += len(next(request_iterator).data)
        yield exchange_pb2.GossipMessage(job_id=first.job_id, sender_id="peer-b", exchange_id=first.exchange_id,
                                         elems=self.n, weight=1.0)
        yield exchange_pb2.GossipMessage(data=b"\1" * CHUNK_BYTES)
        self.sending.set()
        if self.abort:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the partner's machine went away")
        while context.is_active():
            time.sleep(0.02)


@pytest.mark.parametrize("how", ["aborts mid-answer", "server stopped mid-answer"])
def test_a_partner_dying_mid_exchange_leaves_the_initiator_untouched(cluster, how: str) -> None:
    a = cluster("peer-a", fake(1, BIG), samples=4)
    dying = Dying(BIG, abort=how == "aborts mid-answer")
    b = cluster("peer-b", servicer=dying)
    xa = a.params()
    result: list[Outcome] = []
    t = threading.Thread(target=lambda: result.append(a.exchange(b, timeout_s=30.0)))
    t.start()
    assert dying.sending.wait(10), "the partner never started answering"
    if how == "server stopped mid-answer":
        b.server.stop(0)
    t.join(20)
    assert not t.is_alive(), "the initiator waited past the partner's death"
    (out,) = result
    assert not out.ok and not out.busy, out
    assert a.params().tobytes() == xa.tobytes() and a.node.weight == 4
    assert a.node.slot.commits == 0 and not a.node.slot.busy and a.node.one_sided == 0


def _raw_offer(node: Node, gate: threading.Event, stop_after_half: bool) -> Iterator[exchange_pb2.GossipMessage]:
    """An initiator's messages: the offer, then (all or half of) its parameters, then it waits."""
    n = node.trainer.numel
    data = np.full(n, 7.0, dtype=np.float32).tobytes()
    half = (len(data) // 2) // 4 * 4
    yield offer(n, data=data[:half])
    if not stop_after_half:
        yield exchange_pb2.GossipMessage(data=data[half:])
    gate.wait(20)


@pytest.mark.parametrize("when", ["mid-offer", "after the answer", "closes without commit"])
def test_an_initiator_dying_mid_exchange_leaves_the_partner_untouched_and_free(cluster, when: str) -> None:
    b = cluster("peer-b", fake(2, BIG), samples=6)
    xb = b.params()
    gate = threading.Event()
    with rpc.channel(b.address, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES) as ch:
        call = exchange_pb2_grpc.PeerExchangeStub(ch).Gossip(
            _raw_offer(b, gate, stop_after_half=when == "mid-offer"), timeout=30)
        try:
            if when == "mid-offer":
                wait_for(lambda: b.node.slot.busy, 10, "the partner to take the offer")
            else:
                first = next(call)
                assert first.elems == b.trainer.numel and first.weight == 6
                got = len(first.data)
                while got < 4 * first.elems:
                    got += len(next(call).data)
                # The partner waits for the commit with its trainer's lock free: it may train meanwhile.
                assert b.trainer.lock.acquire(blocking=False)
                b.trainer.lock.release()
                if when == "closes without commit":
                    gate.set()  # the request stream ends: no commit
                    assert finish(call) == grpc.StatusCode.ABORTED
        finally:
            call.cancel()  # what the partner sees of a dead process
            gate.set()
    assert_idle(b)
    assert b.params().tobytes() == xb.tobytes() and b.node.weight == 6
    assert b.node.slot.commits == 0 and b.node.slot.aborts == 1
    # And it exchanges normally afterwards.
    a = cluster("peer-a", fake(1, BIG), samples=6)
    assert a.exchange(b).ok
    assert a.params().tobytes() == b.params().tobytes()


# -- many exchanges at once ---------------------------------------------------------------------


def mass(nodes: list[Node]) -> np.ndarray:
    return sum(n.node.weight * n.params().astype(np.float64) for n in nodes)  # type: ignore[return-value]


def test_concurrent_exchanges_are_serialised_and_conserve_the_mass(cluster) -> None:
    rng = np.random.default_rng(7)
    nodes = [cluster(f"peer-{i}", FakeTrainer(rng.normal(i, 1.0, size=2048).astype(np.float32)), samples=10 * (i + 1))
             for i in range(4)]
    m0, w0 = mass(nodes), sum(n.node.weight for n in nodes)
    lo, hi = min(n.params().min() for n in nodes), max(n.params().max() for n in nodes)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        r = random.Random(i)
        try:
            for _ in range(40):
                other = nodes[r.choice([j for j in range(len(nodes)) if j != i])]
                out = nodes[i].exchange(other, timeout_s=10.0)
                with lock:
                    outcomes.append(out)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "exchanges still running after 60 s"
    assert errors == []
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok and not o.busy]
    assert failed == [], failed[:3]
    assert ok, "no exchange went through"
    print(f"{len(ok)} exchanges applied, {len(outcomes) - len(ok)} refused busy")
    assert_idle(*nodes)
    # Every completed exchange was applied exactly once on each of its two sides ...
    assert sum(n.node.slot.commits for n in nodes) == 2 * len(ok)
    assert sum(n.node.one_sided for n in nodes) == 0
    # ... so the mass and the total weight are what they were, up to float32 rounding.
    assert sum(n.node.weight for n in nodes) == pytest.approx(w0, rel=1e-12)
    np.testing.assert_allclose(mass(nodes), m0, rtol=1e-4, atol=1e-3)
    for n in nodes:  # every peer holds a convex combination of the starting points
        p = n.params()
        assert np.isfinite(p).all() and p.min() >= lo - 1e-5 and p.max() <= hi + 1e-5


def test_a_partner_that_trains_while_its_copy_travels_keeps_its_step_and_counts_ours_once(cluster) -> None:
    """The partner's lock is free between its answer and the commit; an SGD step taken there
    is kept whole, and the initiator's share is added to the moved-on parameters once."""
    from dml.aggregation.gossip import pair_average

    b = cluster("peer-b", fake(2, BIG), samples=6)
    sent = b.params()
    gate = threading.Event()
    mine = np.full(BIG, 7.0, dtype=np.float32)  # what _raw_offer sends, weight 1
    with rpc.channel(b.address, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES) as ch:
        def requests():
            yield from _raw_offer(b, gate, stop_after_half=False)
            yield exchange_pb2.GossipMessage(commit=True)
        call = exchange_pb2_grpc.PeerExchangeStub(ch).Gossip(requests(), timeout=30)
        first = next(call)
        got = bytearray(first.data)
        while len(got) < 4 * first.elems:
            got += next(call).data
        assert np.frombuffer(bytes(got), dtype=np.float32).tobytes() == sent.tobytes()
        with b.trainer.lock:  # one "SGD step" while the copy is out
            b.trainer.host_buffer()[:BIG] += 0.5
            b.trainer.version += 1
        b.node.add_samples(2)
        gate.set()  # now the commit goes
        assert next(call).commit
        assert finish(call) == grpc.StatusCode.OK
    expected = sent.copy()
    pair_average(expected, mine, 6, 1)  # what the initiator computed
    np.testing.assert_allclose(b.params(), expected + np.float32(0.5), rtol=0, atol=1e-5)
    assert b.node.weight == (6 + 1) / 2 + 2  # merged, plus the samples trained meanwhile
    assert b.node.slot.commits == 1
    assert_idle(b)
