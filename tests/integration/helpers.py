"""In-process cluster for integration tests: a real coordinator and real peers over gRPC on
127.0.0.1 with ports picked by the OS, authenticated: :func:`coordinator` remembers the tokens it
was started with, by address, so :func:`peers` join and :func:`job_stub` operates with them."""
from __future__ import annotations

import contextlib
import io
import threading
import time
import uuid
from typing import Callable, Iterator

import torch

from dml.common import auth, rpc
from dml.common.spec import DEFAULT_POOL
from dml.coordinator.server import CoordinatorServer, ServerConfig
from dml.coordinator.service import CoordinatorConfig
from dml.v1 import exchange_pb2, exchange_pb2_grpc, jobs_pb2_grpc
from dml.common.tls import TlsConfig
from dml.peer.exchange import ExchangeServicer, add_exchange_to_server
from dml.peer.runner import Peer, PeerConfig

FAST = CoordinatorConfig(heartbeat_interval_ms=200, peer_timeout_ms=1500, tick_ms=100)
_SERVERS: dict[str, CoordinatorServer] = {}  # address -> the coordinator started there


@contextlib.contextmanager
def coordinator(state_dir=None, timing: CoordinatorConfig = FAST, **config) -> Iterator[CoordinatorServer]:
    """A started coordinator on 127.0.0.1:0 with authentication on (``config``: more
    ServerConfig fields), stopped on exit."""
    srv = CoordinatorServer(ServerConfig(host="127.0.0.1", port=0, state_dir=state_dir, timing=timing, **config)).start()
    _SERVERS[srv.address] = srv
    try:
        yield srv
    finally:
        srv.stop(0.2)
        _SERVERS.pop(srv.address, None)


def track(srv: CoordinatorServer) -> CoordinatorServer:
    """Remembers a coordinator started by hand, so :func:`peers` and :func:`job_stub` use its tokens."""
    _SERVERS[srv.address] = srv
    return srv


def join_token(address: str) -> str:
    """The join token of the coordinator :func:`coordinator` started at ``address``."""
    return _SERVERS[address].secrets.join_token


def operator_token(address: str) -> str:
    """The operator token of the coordinator :func:`coordinator` started at ``address``."""
    return _SERVERS[address].secrets.operator_token


@contextlib.contextmanager
def peers(address: str, n: int, exchange_timeout_s: float = 10.0, tls=None, pool: str = DEFAULT_POOL,
          committed_copy_dir=None) -> Iterator[list[Peer]]:
    """``n`` started peers of ``pool`` running their round loops in threads (plain text, or over
    ``tls``; keeping their committed copies in ``committed_copy_dir`` when given), stopped on exit."""
    started: list[Peer] = []
    try:
        for _ in range(n):
            p = Peer(PeerConfig(coordinator=address, join_token=join_token(address),
                                exchange_timeout_s=exchange_timeout_s, plan_wait_s=1.0, tls=tls, pool=pool,
                                committed_copy_dir=committed_copy_dir)).start()
            p.run_in_thread()
            started.append(p)
        yield started
    finally:
        for p in started:
            p.stop()


class RoundHold:
    """Ring members held before their exchange (see :func:`held_rounds`); ``held`` maps each
    held member to the (round, epoch) it waits in."""

    def __init__(self, job_id: str, after: int) -> None:
        self.job_id, self.after = job_id, after
        self.released = threading.Event()
        self.held: dict[str, tuple[int, int]] = {}

    def release(self) -> None:
        """Lets the held members go on (and no round is held any more)."""
        self.released.set()

    def all_held(self, n: int, timeout_s: float = 60) -> tuple[int, int]:
        """Waits until ``n`` members wait in one (round, epoch), and returns it."""
        wait_for(lambda: len(self.held) == n and len(set(self.held.values())) == 1, timeout_s,
                 f"{n} members held in one round")
        return next(iter(self.held.values()))


@contextlib.contextmanager
def held_rounds(members: list[Peer], job_id: str, after: int = 0) -> Iterator[RoundHold]:
    """Holds ``members`` before their exchange of every round of ring job ``job_id`` past
    ``after``, until the block ends. Nobody exchanges, so the round they wait in stays the
    job's current one: it neither commits nor re-forms (the members keep heartbeating; end the
    block well before the coordinator's round deadline)."""
    hold = RoundHold(job_id, after)
    real = {p.peer_id: p._ring._make_link for p in members}  # noqa: SLF001 (the peer's seam for faults)

    def holding(p: Peer) -> Callable[[object, int], object]:
        def make_link(plan, rank: int):  # type: ignore[no-untyped-def]
            if plan.job_id == job_id and plan.round > after and not hold.released.is_set():
                hold.held[p.peer_id] = (plan.round, plan.epoch)
                hold.released.wait(60)
            return real[p.peer_id](plan, rank)
        return make_link

    for p in members:
        p._ring._make_link = holding(p)  # noqa: SLF001
    try:
        yield hold
    finally:
        hold.release()
        for p in members:
            p._ring._make_link = real[p.peer_id]  # noqa: SLF001


def ring_key() -> tuple[str, int, int]:
    """A (job, round, epoch) key no other test's ring uses: a link or sender left over from an
    earlier test that reaches a member on a reused port then names another job, so its frames are
    refused instead of read as this ring's (test rings once all shared ``("j", 1, 1)``)."""
    return (f"j-{uuid.uuid4().hex[:12]}", 1, 1)


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Polls ``pred`` every 50 ms until true; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def job_stub(address: str) -> jobs_pb2_grpc.JobServiceStub:
    """A JobService client with the operator token."""
    return jobs_pb2_grpc.JobServiceStub(auth.with_token(rpc.channel(address), operator_token(address)))


AUDITOR = "auditor"
AUDIT_EPOCH = 2**62  # newer than any epoch a peer holds


def audit_metadata(signing_key, job_id: str, rnd: int, receiver: str) -> list:
    """Metadata for a FetchParameters call to peer ``receiver`` from an auditor holding the
    coordinator's signing key (in-process: ``srv.coordinator.signing_key``; a process's:
    STATE_DIR/secrets/coordinator.key): it mints itself a ticket, as only the coordinator can."""
    key = auth.new_private_key()
    ticket = auth.issue_ticket(signing_key, job_id, AUDIT_EPOCH, AUDITOR, auth.public_bytes(key))
    return auth.sign_call(key, ticket, auth.CallClaims("/dml.v1.PeerExchange/FetchParameters", job_id, AUDIT_EPOCH,
                                                       str(rnd), AUDITOR, receiver))


def coordinator_key(state_dir):
    """The signing key a coordinator process keeps in ``state_dir``."""
    return auth.ensure_private_key(state_dir / "secrets" / "coordinator.key")[0]


def fetch_state(address: str, job_id: str, rnd: int, peer_id: str, signing_key,
                tls=None) -> tuple[str, dict[str, torch.Tensor], bytes]:
    """Downloads peer ``peer_id``'s parameters of a round as an auditor (see
    :func:`audit_metadata`), over ``tls`` if the peer serves it: (digest, state_dict, raw bytes)."""
    md = audit_metadata(signing_key, job_id, rnd, peer_id)
    with rpc.channel(address, tls=tls) as ch:
        parts = list(exchange_pb2_grpc.PeerExchangeStub(ch).FetchParameters(
            exchange_pb2.FetchParametersRequest(job_id=job_id, round=rnd), timeout=10, metadata=md))
    raw = b"".join(p.data for p in parts)
    return parts[0].digest, torch.load(io.BytesIO(raw), weights_only=True), raw


def assert_state_dicts_identical(states: list[dict[str, torch.Tensor]]) -> None:
    """Every state dict has the same keys and bit-identical tensors."""
    first = states[0]
    for other in states[1:]:
        assert other.keys() == first.keys()
        for k in first:
            assert other[k].dtype == first[k].dtype and other[k].shape == first[k].shape
            assert other[k].numpy().tobytes() == first[k].numpy().tobytes(), f"tensor {k} differs"


def builtin_shard_sizes(spec=None) -> list[int]:
    """The shard sizes a job of a built-in task gets (its peers' takes describe the task's
    training set, from which the coordinator cuts them), computed here from the task's data."""
    from dml.common.spec import JobSpec, with_defaults
    from dml.common.tasks import builtin_data
    from dml.coordinator.service import cut_shards

    spec = with_defaults(spec or JobSpec())
    return [int(s.size) for s in cut_shards(spec, builtin_data(spec.task).y_train)]


def take_ready(ctl, peer_id: str, job_id: str, task: str = "digits") -> None:
    """A hand-made peer (``ctl``: a PeerControl stub with its token) takes a built-in task's job,
    describing the data as a real peer (dml.peer.take) would."""
    import numpy as np
    from dml.v1 import control_pb2

    from dml.common.sampling import labels_digest
    from dml.common.tasks import builtin_data

    y = builtin_data(task).y_train
    blob = np.ascontiguousarray(y, dtype="<i4").tobytes()
    data = control_pb2.DataInfo(train_samples=y.size, labels=blob, num_classes=int(y.max()) + 1, batch_size=32,
                                data_digest=labels_digest(y.size, blob))
    ctl.TakeJob(control_pb2.TakeJobRequest(peer_id=peer_id, job_id=job_id, outcome=control_pb2.TAKE_OUTCOME_READY,
                                           data=data), timeout=10)


def ledger_problems(history: list[dict], spec=None) -> list[str]:
    """Sample-ledger violations of a job's history (as `dml status --json --history` prints it)."""
    from dml.coordinator.ledger import violations

    sizes = builtin_shard_sizes(spec)
    rounds = [[tuple(x) for m in sorted(r["consumed"]) for x in r["consumed"][m]] for r in history]
    return violations(rounds, sizes)


class Member:
    """One ring member: an exchange server (with or without the TCP data plane), over TLS when
    ``tls`` is given."""

    def __init__(self, tcp: bool = True, tls: TlsConfig | None = None) -> None:
        self.tls = tls
        self.servicer = ExchangeServicer(lambda job, rnd: None, recv_timeout_s=5,
                                         data_plane_host="127.0.0.1" if tcp else None, tls=tls)
        self.server = rpc.server(workers=8, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
        add_exchange_to_server(self.servicer, self.server)
        self.port = rpc.bind(self.server, "127.0.0.1", 0, tls=tls)
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.abort = threading.Event()

    def close(self) -> None:
        self.server.stop(0).wait(5)
        self.servicer.close()


class HoldReport:
    """A peer's control stub that holds its report of round ``rnd`` until ``gate`` is set (at
    most ``wait_s``): the round cannot commit before then, so a joiner that took the job
    meanwhile joins at ``rnd + 1`` however fast the job runs."""

    def __init__(self, stub, rnd: int, gate: threading.Event, wait_s: float = 60.0) -> None:
        self._stub, self._rnd, self._gate, self._wait_s = stub, rnd, gate, wait_s

    def __getattr__(self, name):
        return getattr(self._stub, name)

    def ReportRound(self, req, **kw):  # noqa: N802 - the stub's method name
        if req.round == self._rnd:
            assert self._gate.wait(self._wait_s), "the joiner never took the job"
        return self._stub.ReportRound(req, **kw)


class RoundOneWaits:
    """Holds ``holder``'s report of round 1 until :meth:`until_in` sees another peer take the
    job. A job starts with its first ``min_peers`` takers and admits later ones at a round's
    commit, so a peer the test needs in the ring by round N (a fault at an exact round) would
    otherwise join whenever its take happened to land: with this it is in by round 2."""

    def __init__(self, holder: Peer) -> None:
        self.gate = threading.Event()
        holder.client.stub = HoldReport(holder.client.stub, 1, self.gate)

    def until_in(self, srv: CoordinatorServer, job_id: str, peer_id: str, timeout_s: float = 60.0) -> None:
        """Waits until ``peer_id`` is a member of ``job_id`` or waits to be admitted, then lets
        round 1 commit (also when the wait fails)."""
        try:
            wait_for(lambda: srv.coordinator.view(lambda st: peer_id in st.job(job_id).ready
                                                  or peer_id in st.job(job_id).members), timeout_s,
                     f"{peer_id} to take job {job_id}")
        finally:
            self.gate.set()
