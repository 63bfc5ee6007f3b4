"""Bounded resources over real gRPC on 127.0.0.1: the call guard (idle calls cut, limits refused
with RESOURCE_EXHAUSTED while short calls still find a thread), the peer's inbox and data-plane
offer limits and their expiry, and the length limits on requests' strings."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dml.common import guard, rpc
from dml.coordinator.server import CoordinatorServer, ServerConfig
from dml.peer import dataplane, inbox
from dml.peer.exchange import FRAMES_METHOD, ExchangeServicer, add_exchange_to_server, call_policies
from dml.peer.runner import EXCHANGE_WORKERS
from dml.v1 import control_pb2, control_pb2_grpc, exchange_pb2, exchange_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from dml.common.version import PROTOCOL_VERSION
from tests.integration.helpers import wait_for

SLOW = "/t.Limits/Slow"  # unary: blocks until released
UP = "/t.Limits/Up"  # client stream: counts messages
IDLE = guard.Policy(first_s=0.3, idle_s=0.3, long=True)


def idle_requests(release: threading.Event, first: object = None) -> Iterator[object]:
    """Sends ``first`` (if any), then nothing until ``release``."""
    if first is not None:
        yield first
    release.wait(30)


class Toy:
    """A guarded server with two methods, for the guard's own tests."""

    def __init__(self, limits: guard.Limits, workers: int = 8) -> None:
        self.release = threading.Event()
        self.server = rpc.server(workers=workers, limits=limits)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Limits", {
            "Slow": grpc.unary_unary_rpc_method_handler(self._slow),
            "Up": grpc.stream_unary_rpc_method_handler(lambda it, ctx: b"%d" % sum(1 for _ in it)),
        }),))
        port = rpc.bind(self.server, "127.0.0.1", 0)
        self.server.start()
        self.channel = rpc.channel(f"127.0.0.1:{port}")
        self.guard: guard.GuardInterceptor = self.server._state.interceptor_pipeline.interceptors[0]

    def _slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.release.wait(30)
        return b"done"

    def close(self) -> None:
        self.release.set()
        self.channel.close()
        self.server.stop(0).wait(5)


@pytest.fixture
def toy():
    made: list[Toy] = []

    def make(limits: guard.Limits, workers: int = 8) -> Toy:
        made.append(Toy(limits, workers))
        return made[-1]

    yield make
    for t in made:
        t.close()


def code_of(fut: grpc.Future, timeout: float = 20) -> grpc.StatusCode:
    try:
        fut.result(timeout=timeout)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


# -- the call guard --------------------------------------------------------------------------
def test_a_stream_that_sends_nothing_is_cut(toy):
    t = toy(guard.Limits(per_key=6, long_total=6, long_per_key=6, policies={UP: IDLE}))
    release = threading.Event()
    fut = t.channel.stream_unary(UP).future(idle_requests(release), timeout=20)
    assert code_of(fut) == grpc.StatusCode.CANCELLED  # without the guard: open until its own deadline
    release.set()
    assert t.guard.stats["cut"] == 1
    # the client hears of the cut first; the handler then wakes and lets its slot go
    wait_for(lambda: t.guard.in_flight() == {"long": 0}, 10, "the cut call's slot freed")
    assert t.channel.stream_unary(UP)(iter([b"a", b"b"]), timeout=5) == b"2"  # a live stream is untouched


def test_a_stream_that_goes_quiet_after_its_first_message_is_cut(toy):
    t = toy(guard.Limits(per_key=6, long_total=6, long_per_key=6, policies={UP: IDLE}))
    release = threading.Event()
    fut = t.channel.stream_unary(UP).future(idle_requests(release, b"x"), timeout=20)
    assert code_of(fut) == grpc.StatusCode.CANCELLED
    release.set()
    assert t.guard.stats["cut"] == 1


def test_a_unary_call_whose_message_never_comes_is_cut(toy):
    t = toy(guard.Limits(per_key=6, long_total=6, long_per_key=6, default=guard.Policy(first_s=0.3)))
    release = threading.Event()
    # The same method called as a client stream that never sends: the server waits for its message.
    fut = t.channel.stream_unary(SLOW).future(idle_requests(release), timeout=20)
    assert code_of(fut) == grpc.StatusCode.CANCELLED
    release.set()
    assert t.guard.stats["cut"] == 1


def test_long_lived_calls_past_the_cap_are_refused_and_short_calls_still_answer(toy):
    # 4 workers: long-lived calls get 3 in all and 2 per client, so a unary call always has a thread.
    limits = guard.Limits.for_pool(4, {UP: guard.Policy(first_s=None, long=True)})
    assert (limits.per_key, limits.long_total, limits.long_per_key) == (3, 3, 2)
    t = toy(limits, workers=4)
    release = threading.Event()
    held = [t.channel.stream_unary(UP).future(idle_requests(release), timeout=20) for _ in range(2)]
    wait_for(lambda: t.guard.in_flight().get("long") == 2, 10, "two streams admitted")
    with pytest.raises(grpc.RpcError) as e:
        t.channel.stream_unary(UP)(idle_requests(release), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "long-lived" in e.value.details()
    # another client (its own credential) has its own per-client share, within the server's cap
    other = t.channel.stream_unary(UP).future(idle_requests(release), timeout=20,
                                              metadata=(("authorization", "Bearer other"),))
    wait_for(lambda: t.guard.in_flight().get("long") == 3, 10, "the other client's stream admitted")
    t.release.set()
    assert t.channel.unary_unary(SLOW)(b"", timeout=5) == b"done"
    release.set()
    assert [code_of(f) for f in [*held, other]] == [grpc.StatusCode.OK] * 3


def test_calls_in_flight_past_the_per_client_limit_are_refused(toy):
    t = toy(guard.Limits(per_key=2, long_total=2, long_per_key=2))
    slow = t.channel.unary_unary(SLOW)
    held = [slow.future(b"", timeout=20) for _ in range(2)]
    wait_for(lambda: t.guard.in_flight().get("ip:127.0.0.1") == 2, 10, "two calls in flight")
    with pytest.raises(grpc.RpcError) as e:
        slow(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight from this client" in e.value.details()
    t.release.set()
    assert [f.result(timeout=10) for f in held] == [b"done", b"done"]


# -- the coordinator -------------------------------------------------------------------------
@pytest.fixture
def coord():
    # Limits apart from authentication (tests/integration/test_auth.py): every call here reaches
    # the limits it probes without credentials, as on a loopback --no-auth coordinator.
    srv = CoordinatorServer(ServerConfig(host="127.0.0.1", port=0, workers=8, auth=False)).start()
    channel = rpc.channel(srv.address)
    try:
        yield srv, channel
    finally:
        channel.close()
        srv.stop(0.2)


def test_idle_uploads_cannot_take_the_coordinators_pool(coord):
    srv, channel = coord
    stub = control_pb2_grpc.PeerControlStub(channel)
    release = threading.Event()
    # 8 workers: 4 long-lived calls per client, 6 in all.
    futs = [stub.UploadCheckpoint.future(idle_requests(release), timeout=30) for _ in range(6)]
    wait_for(lambda: sum(f.done() for f in futs) >= 2, 10, "the uploads past the cap refused")
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    peer_id = stub.RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address="127.0.0.1:5999"), timeout=5).peer_id
    stub.Heartbeat(control_pb2.HeartbeatRequest(peer_id=peer_id), timeout=5)
    codes = sorted(code_of(f, 30).name for f in futs)  # the admitted ones: cut after 5 s without a message
    release.set()
    assert codes == ["CANCELLED"] * 4 + ["RESOURCE_EXHAUSTED"] * 2


@pytest.mark.parametrize("address", [
    "0.0.0.0:5000", "[::]:5000", "host:0", "host:65536", "-bad-:1", "a..b:1", "x" * 300 + ":1", "host", "1.2.3.999:1",
    "239.1.1.1:1",
])
def test_registration_refuses_addresses_nobody_can_dial(coord, address):
    _, channel = coord
    with pytest.raises(grpc.RpcError) as e:
        control_pb2_grpc.PeerControlStub(channel).RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address=address),
                                                                timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "address" in e.value.details()


@pytest.mark.parametrize("address", ["127.0.0.1:5000", "[::1]:5000", "peer-3.dml.svc:5000", "worker7:1"])
def test_registration_takes_dialable_addresses(coord, address):
    _, channel = coord
    assert control_pb2_grpc.PeerControlStub(channel).RegisterPeer(
        control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address=address), timeout=5).peer_id


def test_long_strings_are_invalid_argument(coord):
    _, channel = coord
    ctl, jobs = control_pb2_grpc.PeerControlStub(channel), jobs_pb2_grpc.JobServiceStub(channel)
    peer_id = ctl.RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address="127.0.0.1:5998"), timeout=5).peer_id
    calls = [
        lambda: ctl.Heartbeat(control_pb2.HeartbeatRequest(peer_id="p" * 257), timeout=5),
        lambda: ctl.ReportFailure(control_pb2.ReportFailureRequest(peer_id=peer_id, job_id="j", detail="d" * 5000),
                                  timeout=5),
        lambda: ctl.ReportRound(control_pb2.ReportRoundRequest(peer_id=peer_id, job_id="j", digest="f" * 1000),
                                timeout=5),
        lambda: ctl.GetPlan(control_pb2.GetPlanRequest(peer_id=peer_id, last_job_id="j" * 300), timeout=5),
        lambda: ctl.UploadCheckpoint(iter([control_pb2.CheckpointChunk(peer_id=peer_id, job_id="j" * 300)]),
                                     timeout=5),
        lambda: ctl.RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address="127.0.0.1:1", cluster_id="c" * 300),
                                 timeout=5),
        lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id="j" * 300), timeout=5),
        lambda: jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id="j" * 300), timeout=5),
        lambda: list(jobs.DownloadModel(jobs_pb2.DownloadModelRequest(job_id="j" * 300), timeout=5)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in e.value.details()
    # a detail of 4 KiB is within its limit (a report for no job of the peer's is ignored)
    ctl.ReportFailure(control_pb2.ReportFailureRequest(peer_id=peer_id, job_id="j", detail="d" * 4096), timeout=5)


# -- the peer's exchange server --------------------------------------------------------------
class Exchange:
    """An exchange servicer on a guarded server like a peer's."""

    def __init__(self) -> None:
        self.servicer = ExchangeServicer(lambda job, rnd: None, recv_timeout_s=30, data_plane_host="127.0.0.1")
        self.server = rpc.server(workers=EXCHANGE_WORKERS, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES,
                                 limits=guard.Limits.for_pool(EXCHANGE_WORKERS, call_policies(30.0)))
        add_exchange_to_server(self.servicer, self.server)
        port = rpc.bind(self.server, "127.0.0.1", 0)
        self.server.start()
        self.channel = rpc.channel(f"127.0.0.1:{port}", max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
        self.stub = exchange_pb2_grpc.PeerExchangeStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0).wait(5)
        self.servicer.close()


@pytest.fixture
def ex():
    e = Exchange()
    yield e
    e.close()


MIB = 1 << 20


def chunks(job: str, sender: str, n: int, rnd: int = 1, elems: int = MIB // 4) -> Iterator[exchange_pb2.TensorChunk]:
    data = bytes(4 * elems)
    for s in range(n):
        yield exchange_pb2.TensorChunk(job_id=job, round=rnd, epoch=1, sender_id=sender, phase=1, step=s,
                                       count=elems, codec=1, data=data)


def test_unclaimed_inboxes_are_bounded_in_all_and_per_sender(ex):
    for i in range(inbox_limit := 8):
        assert ex.stub.PushChunks(chunks(f"made-up-{i}", f"s{i % 4}", 1), timeout=10).chunks == 1
    assert len(ex.servicer.unclaimed()) == inbox_limit
    with pytest.raises(grpc.RpcError) as e:
        ex.stub.PushChunks(chunks("made-up-x", "s9", 1), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "no plan" in e.value.details()
    ex.servicer.sweep(time.monotonic() + inbox.UNCLAIMED_TTL_S + 1)
    assert ex.servicer.unclaimed() == [] and ex.servicer.queued_bytes() == 0 and ex.servicer.dropped == inbox_limit
    for i in range(2):
        ex.stub.PushChunks(chunks(f"again-{i}", "s0", 1), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        ex.stub.PushChunks(chunks("again-2", "s0", 1), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'s0'" in e.value.details()


def test_a_flood_of_made_up_exchanges_leaves_room_for_the_next_round_of_this_peers_job(ex):
    ex.servicer.release(ex.servicer.inbox(("real", 1, 1)).key)  # this peer ran round 1 of job "real"
    for i in range(8):
        ex.stub.PushChunks(chunks(f"made-up-{i}", f"s{i}", 1), timeout=10)
    # the predecessor's frames of round 2, before this peer's plan claims them: room is made
    assert ex.stub.PushChunks(chunks("real", "pred", 1, rnd=2), timeout=10).chunks == 1
    keys = {b.key for b in ex.servicer.unclaimed()}
    assert ("real", 2, 1) in keys and ("made-up-0", 1, 1) not in keys and len(keys) == 8
    assert ex.servicer.inbox(("real", 2, 1)).q.qsize() == 1


def test_unclaimed_frames_are_bounded_and_their_memory_freed_when_no_plan_claims_them(ex):
    got: list[grpc.StatusCode] = []

    def push() -> None:
        try:
            ex.stub.PushChunks(chunks("made-up", "s1", 100), timeout=30)
            got.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            got.append(e.code())

    t = threading.Thread(target=push)
    t.start()
    wait_for(lambda: ex.servicer.queued_bytes() >= 64 * MIB, 20, "the unclaimed bound reached")
    assert ex.servicer.queued_bytes() == 64 * MIB  # without the bound: up to 64 chunks of 8 MiB, kept
    ex.servicer.sweep(time.monotonic() + inbox.UNCLAIMED_TTL_S + 1)
    t.join(20)
    assert got == [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert ex.servicer.queued_bytes() == 0 and ex.servicer.unclaimed() == []


def test_a_claimed_inbox_takes_frames_and_survives_senders_of_made_up_rounds(ex):
    box = ex.servicer.inbox(("j", 3, 1))
    ex.stub.PushChunks(chunks("j", "s1", 1, rnd=9), timeout=10)  # used to drop ("j", 3, 1)
    assert not box.closed.is_set()
    assert ex.stub.PushChunks(chunks("j", "pred", 2, rnd=3), timeout=10).chunks == 2
    assert box.q.qsize() == 2 and box.q.nbytes == 2 * MIB
    ex.servicer.sweep(time.monotonic() + inbox.UNCLAIMED_TTL_S + 1)
    assert not box.closed.is_set() and box.q.nbytes == 2 * MIB  # only the made-up round's inbox went
    assert [b.key for b in ex.servicer.unclaimed()] == []


def our_shm_files() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"dml-{os.getpid()}-")]


def test_data_plane_offers_are_capped_and_unused_ones_expire_with_their_files(ex):
    before = our_shm_files()
    shm_paths = []
    for i in range(6):
        r = ex.stub.OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(job_id=f"j{i}", round=1, epoch=1,
                                                                    sender_id=f"s{i}", shm_slot_bytes=MIB), timeout=5)
        assert r.token
        shm_paths.append(r.shm_path)
    assert sum(bool(p) for p in shm_paths) == dataplane.MAX_SHM_OFFERS  # the rest: TCP only
    assert len(our_shm_files()) - len(before) == dataplane.MAX_SHM_OFFERS
    for i in range(dataplane.SENDER_TOKENS - 1):
        ex.stub.OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(job_id=f"k{i}", round=1, epoch=1, sender_id="s0"),
                              timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        ex.stub.OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(job_id="k9", round=1, epoch=1, sender_id="s0"),
                              timeout=5)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'s0'" in e.value.details()
    dp = ex.servicer.data_plane
    assert dp is not None and dp.open_offers() == (6 + dataplane.SENDER_TOKENS - 1, dataplane.MAX_SHM_OFFERS)
    ex.servicer.sweep(time.monotonic() + dataplane.TOKEN_TTL_S + 1)
    assert dp.open_offers() == (0, 0) and our_shm_files() == before


def test_an_idle_push_stream_is_cut_and_the_peer_still_answers(ex):
    release = threading.Event()
    futs = [ex.stub.PushChunks.future(idle_requests(release), timeout=30) for _ in range(20)]
    r = ex.stub.OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(job_id="j", round=1, epoch=1, sender_id="s"),
                              timeout=5)
    assert r.token  # 20 idle streams used to take the whole pool of 16
    codes = {code_of(f, 30) for f in futs}
    release.set()
    assert codes == {grpc.StatusCode.CANCELLED}  # cut after 5 s without a first message


def test_exchange_strings_are_length_limited(ex):
    long = "j" * 300
    calls = [
        lambda: ex.stub.OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(job_id=long, sender_id="s"), timeout=5),
        lambda: ex.stub.PushChunks(chunks("j", "s" * 300, 1), timeout=5),
        lambda: list(ex.stub.FetchParameters(exchange_pb2.FetchParametersRequest(job_id=long), timeout=5)),
        lambda: ex.channel.stream_unary(FRAMES_METHOD, request_serializer=None)(
            iter([b""]), metadata=(("dml-job", long), ("dml-round", "1"), ("dml-epoch", "1"), ("dml-sender", "s")),
            timeout=5),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in e.value.details()
