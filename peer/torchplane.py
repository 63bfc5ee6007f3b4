"""The torch data plane (``--data-plane torch``): a ring round's average as one torch.distributed
all-reduce, in a process group per membership epoch (gloo; NCCL when every member is on a GPU of its own).

The group of (job, epoch) is formed at the first round a member runs in that epoch (its
``group_round``), ranks in ring order, and reused for the epoch's later rounds until a
collective fails, times out or is cancelled: then it is aborted and never used again. Its
rendezvous store is hosted by the first member and reached only through the signed
``PeerExchange.TorchStore`` call (:class:`StoreHost`, :class:`RemoteStore`), under a prefix of
its own per (job, epoch, group round). A failed member's peers are asked how far they got
(``TorchProbe``) to name a suspect. The protocol and its security: docs/architecture.md ("The
torch data plane"), docs/security.md.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from dml.v1 import exchange_pb2, exchange_pb2_grpc, types_pb2

from dml.aggregation.transport import Cancelled, ExchangeError
from dml.common import rpc
from dml.common.spec import JobSpec
from dml.common.tls import TlsConfig

if TYPE_CHECKING:
    from dml.peer.auth import PeerCredentials

log = logging.getLogger(__name__)

PLANE = "torch"  # the JobSpec.data_plane value
TORCH_STORE = "/dml.v1.PeerExchange/TorchStore"
TORCH_PROBE = "/dml.v1.PeerExchange/TorchProbe"
MAX_GROUPS = 4  # rendezvous stores a host keeps (one per (job, epoch, group round)); older ones go
MAX_KEYS = 1024  # keys in one group's store (gloo sets one per rank, plus ours)
MAX_VALUE_BYTES = 64 << 10  # one value (gloo's address blobs are a few hundred bytes)
MAX_REQUEST_KEYS = 64
MAX_WAIT_MS = 5000  # a GET or WAIT held on the host at most this long; the member asks again
STORE_CALL_S = 10.0  # one TorchStore call's deadline (its wait plus slack)
PROBE_TIMEOUT_S = 2.0  # a TorchProbe's deadline: a member that does not answer within it is dead to us
BACKEND_SLACK_S = 5.0  # gloo's / NCCL's own timeout: our timer's deadline plus this, so ours fires first
POLL_S = 0.05  # how often a waiting collective looks at the abort event (it wakes at once when done)
GroupKey = tuple[str, int, int]  # (job, epoch, group round)


def decline_reason(spec: types_pb2.JobSpec | JobSpec, tls: TlsConfig | None, allowed: bool) -> str:
    """Why this peer must decline a job ("" when it may take it): a torch-plane job's tensors
    travel over gloo's (or NCCL's) own sockets, unencrypted, so a peer running with TLS takes
    one only when started with ``--allow-torch-plane``."""
    if spec.data_plane != PLANE or tls is None or allowed:
        return ""
    return ("the job's --data-plane torch sends tensors over torch.distributed's own sockets, unencrypted and "
            "unauthenticated, and this peer runs with TLS; start it with --allow-torch-plane to accept that")


def prefix(key: GroupKey) -> str:
    """The store prefix of group ``key``: a fresh one per (job, epoch, group round)."""
    job, epoch, rnd = key
    return f"dml/torch/{job}/{epoch}/{rnd}/"


# -- the rendezvous store ----------------------------------------------------------------------
class StoreHost:
    """The first member's side of its groups' rendezvous: one c10d HashStore per group, at most
    :data:`MAX_GROUPS` (the oldest dropped), each bounded in keys and value sizes. Only members
    reach it: calls pass the exchange server's guard (a ticket of the claimed (job, epoch))."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: OrderedDict[GroupKey, tuple[Any, set[str]]] = OrderedDict()

    def store(self, key: GroupKey) -> Any:
        """The HashStore of group ``key``, made when first asked for (by its host or a member)."""
        import torch.distributed as dist

        with self._lock:
            got = self._stores.get(key)
            if got is None:
                for k in [k for k in self._stores if k[0] == key[0] and k[1:] < key[1:]]:
                    del self._stores[k]  # an older group of the job: over
                while len(self._stores) >= MAX_GROUPS:
                    self._stores.popitem(last=False)
                got = self._stores[key] = (dist.HashStore(), set())
            return got[0]

    def groups(self) -> list[GroupKey]:
        """The groups whose stores are held."""
        with self._lock:
            return list(self._stores)

    def op(self, req: exchange_pb2.TorchStoreRequest) -> exchange_pb2.TorchStoreResponse:
        """Runs one member's store operation; ValueError for a malformed one."""
        keys = list(req.keys)
        if not keys or len(keys) > MAX_REQUEST_KEYS:
            raise ValueError(f"a store operation names 1 to {MAX_REQUEST_KEYS} keys, got {len(keys)}")
        if len(req.value) > MAX_VALUE_BYTES:
            raise ValueError(f"a store value is at most {MAX_VALUE_BYTES} bytes, got {len(req.value)}")
        key = (req.job_id, req.epoch, req.group_round)
        store = self.store(key)
        with self._lock:
            seen = self._stores[key][1] if key in self._stores else set()
            new = [k for k in keys if k not in seen]
            if req.op in (exchange_pb2.TORCH_STORE_OP_SET, exchange_pb2.TORCH_STORE_OP_ADD):
                if len(seen) + len(new) > MAX_KEYS:
                    raise ValueError(f"group {key} holds {MAX_KEYS} keys already")
                seen.update(new)
        wait = timedelta(milliseconds=min(req.wait_ms, MAX_WAIT_MS))
        if req.op == exchange_pb2.TORCH_STORE_OP_SET:
            store.set(keys[0], req.value)
            return exchange_pb2.TorchStoreResponse(found=True)
        if req.op == exchange_pb2.TORCH_STORE_OP_ADD:
            return exchange_pb2.TorchStoreResponse(found=True, amount=store.add(keys[0], req.amount))
        if req.op == exchange_pb2.TORCH_STORE_OP_CHECK:
            return exchange_pb2.TorchStoreResponse(found=store.check(keys))
        if req.op in (exchange_pb2.TORCH_STORE_OP_GET, exchange_pb2.TORCH_STORE_OP_WAIT):
            if not store.check(keys):
                try:
                    store.wait(keys, wait)
                except Exception:  # noqa: BLE001 - c10d raises a plain error on its timeout: not there yet
                    return exchange_pb2.TorchStoreResponse(found=False)
            if req.op == exchange_pb2.TORCH_STORE_OP_WAIT:
                return exchange_pb2.TorchStoreResponse(found=True)
            return exchange_pb2.TorchStoreResponse(found=True, value=bytes(store.get(keys[0])))
        raise ValueError(f"unknown store operation {req.op}")


_REMOTE: list[type] = []  # the DmlRemoteStore class, made once torch is loaded


def _store_base() -> type:
    import torch.distributed as dist

    return dist.Store


class RemoteStore:
    """A c10d Store (made by :func:`remote_store`) whose operations are signed ``TorchStore``
    calls to the group's host. Blocking reads are held on the host up to
    :data:`MAX_WAIT_MS` at a time and asked again until ``deadline_s`` from the store's making;
    past it, or once ``abort`` is set, they raise (gloo then fails the group's construction)."""

    def __init__(self, stub: exchange_pb2_grpc.PeerExchangeStub, key: GroupKey, me: str,
                 sign: Callable[[str], list[tuple[str, str | bytes]]], deadline_s: float,
                 abort: threading.Event) -> None:
        self._stub, self._key, self._me, self._sign = stub, key, me, sign
        self._until = time.monotonic() + deadline_s
        self._abort = abort

    def _call(self, op: int, keys: list[str], value: bytes = b"", amount: int = 0,
              wait_ms: int = 0) -> exchange_pb2.TorchStoreResponse:
        job, epoch, rnd = self._key
        req = exchange_pb2.TorchStoreRequest(job_id=job, epoch=epoch, group_round=rnd, sender_id=self._me, op=op,
                                             keys=keys, value=value, amount=amount, wait_ms=wait_ms)
        return self._stub.TorchStore(req, timeout=STORE_CALL_S, metadata=self._sign(TORCH_STORE))

    def _until_found(self, op: int, keys: list[str]) -> exchange_pb2.TorchStoreResponse:
        while True:
            left = self._until - time.monotonic()
            if left <= 0 or self._abort.is_set():
                raise RuntimeError(f"rendezvous of group {self._key}: keys {keys} not set in time"
                                   if left <= 0 else f"rendezvous of group {self._key}: cancelled")
            got = self._call(op, keys, wait_ms=int(min(left, MAX_WAIT_MS / 1000) * 1000))
            if got.found:
                return got

    # The c10d Store interface (the operations gloo's rendezvous and ProcessGroupGloo use).
    def set(self, key: str, value: bytes | str) -> None:
        """Sets ``key``."""
        self._call(exchange_pb2.TORCH_STORE_OP_SET, [key], value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: str) -> bytes:
        """``key``'s value, waiting for it."""
        return self._until_found(exchange_pb2.TORCH_STORE_OP_GET, [key]).value

    def add(self, key: str, amount: int) -> int:
        """Adds to a counter; its new value."""
        return self._call(exchange_pb2.TORCH_STORE_OP_ADD, [key], amount=int(amount)).amount

    def check(self, keys: list[str]) -> bool:
        """Whether every key is set."""
        return self._call(exchange_pb2.TORCH_STORE_OP_CHECK, list(keys)).found

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        """Waits for every key to be set."""
        self._until_found(exchange_pb2.TORCH_STORE_OP_WAIT, list(keys))


def remote_store(*args: Any, **kwargs: Any) -> Any:
    """A :class:`RemoteStore` that is also a ``torch.distributed.Store`` (gloo takes only those)."""
    if not _REMOTE:
        _REMOTE.append(type("DmlRemoteStore", (RemoteStore, _store_base()), {"__init__": _remote_init}))
    return _REMOTE[0](*args, **kwargs)


def _remote_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _store_base().__init__(self)
    RemoteStore.__init__(self, *args, **kwargs)


# -- the group --------------------------------------------------------------------------------
@dataclass
class Progress:
    """How far this member got in a group's collectives (what ``TorchProbe`` answers)."""

    entered: int = 0
    done: int = 0
    broken: bool = False


@dataclass
class TorchGroup:
    """One formed process group: (job, epoch, group round), this member's rank, the members in
    rank order, the backend and the c10d object. Once :attr:`progress` says broken it is aborted
    and never used again."""

    key: GroupKey
    rank: int
    members: tuple[str, ...]
    backend: str
    pg: Any
    device: str = "cpu"
    progress: Progress = field(default_factory=Progress)
    channel: grpc.Channel | None = None  # to the store's host: NCCL reads the store at its first collective

    def allreduce(self, buf: np.ndarray, deadline_s: float, abort: threading.Event) -> None:
        """Sums ``buf`` (1-D float32) over the group in place, one collective. Waits at most
        ``deadline_s`` (a timer around the wait, and gloo's own timeout behind it); on any
        failure, timeout or abort the group is aborted and the error raised (:class:`Cancelled`
        for an abort, else :class:`ExchangeError` without a suspect: the caller names one)."""
        import torch
        import torch.distributed as dist

        if self.progress.broken:
            raise ExchangeError(f"process group {self.key} failed before: it is never reused")
        self.progress.entered += 1
        done = threading.Event()
        try:
            tensor = torch.from_numpy(buf)  # shares buf's memory
            if self.device != "cpu":
                tensor = tensor.to(self.device)
            work = self.pg.allreduce([tensor], dist.AllreduceOptions())
            fut = work.get_future()
            fut.add_done_callback(lambda _f: done.set())
            until = time.monotonic() + deadline_s
            while not done.wait(POLL_S):
                if abort.is_set():
                    raise Cancelled(f"collective {self.progress.entered} of group {self.key} cancelled")
                if time.monotonic() > until:
                    raise ExchangeError(f"collective {self.progress.entered} of group {self.key} did not finish "
                                        f"within {deadline_s:.1f}s")
            work.wait()  # raises the collective's own error, if it failed
            if self.device != "cpu":
                buf[:] = tensor.cpu().numpy()
        except ExchangeError:
            self.abort()
            raise
        except Exception as e:  # noqa: BLE001 - gloo and NCCL raise RuntimeError (or DistBackendError) of any kind
            self.abort()
            raise ExchangeError(f"collective {self.progress.entered} of group {self.key} failed: {e}") from None
        self.progress.done += 1

    def abort(self) -> None:
        """Marks the group broken and aborts it (its sockets closed; pending work fails)."""
        if self.progress.broken:
            return
        self.progress.broken = True
        try:
            self.pg.abort()
        except Exception as e:  # noqa: BLE001 - an abort that fails leaves a group we never use anyway
            log.info("process group %s: abort failed: %s", self.key, e)
        if self.channel is not None:
            self.channel.close()


def device_tag(device: str) -> str:
    """What a member tells its group about its device: ``cpu``, or ``cuda:`` and the GPU's UUID
    (the host and index where torch does not give one), so the group can tell two members
    sharing one GPU (NCCL refuses two ranks on one device) from members on distinct GPUs."""
    if not device.startswith("cuda"):
        return "cpu"
    import socket

    import torch

    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    uuid = getattr(torch.cuda.get_device_properties(idx), "uuid", None)
    return f"cuda:{uuid}" if uuid is not None else f"cuda:{socket.gethostname()}/{idx}"


def nccl_possible(devices: list[str]) -> bool:
    """NCCL when every member is on CUDA, each on a GPU of its own; gloo otherwise (members that
    share a GPU, as on a one-GPU machine, or any CPU member: their buffers are on the host)."""
    return all(d.startswith("cuda:") for d in devices) and len(set(devices)) == len(devices)


def make_group(store: Any, key: GroupKey, rank: int, members: tuple[str, ...], host: str, timeout_s: float,
               device: str = "cpu") -> TorchGroup:
    """Forms group ``key`` over ``store`` (wrapped in the group's own prefix): gloo for CPU
    tensors, NCCL when every member says it is on a CUDA device of its own (each member's
    :func:`device_tag` goes through the store first). Created directly, never through ``init_process_group`` (process-global)."""
    import torch.distributed as dist

    pstore = dist.PrefixStore(prefix(key), store)
    pstore.set(f"dml-device/{rank}", device_tag(device))
    devices = [bytes(pstore.get(f"dml-device/{r}")).decode() for r in range(len(members))]
    timeout = timedelta(seconds=timeout_s + BACKEND_SLACK_S)  # our timer is the one that fires (TorchGroup.allreduce)
    if nccl_possible(devices) and hasattr(dist, "ProcessGroupNCCL"):
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        opts.config.blocking = False  # non-blocking communicators: their init and collectives can be aborted
        pg = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", pstore), rank, len(members), opts)
        return TorchGroup(key, rank, members, "nccl", pg, device=device)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    pg = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", pstore), rank, len(members), opts)
    return TorchGroup(key, rank, members, "gloo", pg)


def weighted_average(group: TorchGroup, buf: np.ndarray, weight: float, deadline_s: float,
                     abort: threading.Event) -> float:
    """:func:`aggregation.averaging.weighted_ring_average`'s arithmetic over one collective:
    ``buf[:-1]`` scaled by ``weight``, the weight in ``buf[-1]``, summed, divided by the summed
    weight. Returns that total; ValueError when every weight is 0."""
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    params = buf[:-1]
    params *= np.float32(weight)
    buf[-1] = np.float32(weight)
    group.allreduce(buf, deadline_s, abort)
    total = float(buf[-1])
    if total <= 0:
        raise ValueError("every member had weight 0: nothing to average")
    params /= np.float32(total)
    if not np.isfinite(params).all():
        raise ExchangeError("the all-reduced parameters are not finite (a member sent non-finite values)")
    return total


# -- the member's side ------------------------------------------------------------------------
class TorchPlane:
    """A peer's torch data plane: its current group (at most one), the store it hosts for the
    groups it is first in, and the answers to probes. ``channel`` makes a gRPC channel to a
    member's address; ``credentials`` sign every call."""

    def __init__(self, peer_id: Callable[[], str], credentials: PeerCredentials | None, host: str,
                 tls: TlsConfig | None = None, device: str = "cpu") -> None:
        self._peer_id = peer_id
        self._creds = credentials
        self._host = host
        self._tls = tls
        self._device = device
        self.store_host = StoreHost()
        self._lock = threading.Lock()
        self.group: TorchGroup | None = None
        self._forming: dict[GroupKey, Progress] = {}
        self.formed = 0  # groups formed (tests count them)

    def _sign(self, key: GroupKey, receiver: str) -> Callable[[str], list[tuple[str, str | bytes]]]:
        def sign(method: str) -> list[tuple[str, str | bytes]]:
            if self._creds is None:
                return []
            return self._creds.sign(method, key[0], key[1], str(key[2]), receiver)

        return sign

    def progress(self, key: GroupKey) -> Progress | None:
        """This member's progress in group ``key`` (None when it neither holds nor forms it)."""
        with self._lock:
            g = self.group
            if g is not None and g.key == key:
                return g.progress
            return self._forming.get(key)

    def drop(self, why: str) -> None:
        """Aborts and forgets the current group (a new epoch, the job over, the peer stopping)."""
        with self._lock:
            g, self.group = self.group, None
        if g is not None:
            log.info("peer %s: process group %s dropped: %s", self._peer_id(), g.key, why)
            g.abort()

    def group_for(self, plan: types_pb2.Plan, rank: int, deadline_s: float, abort: threading.Event) -> TorchGroup:
        """The group of ``plan``'s (job, epoch): the one held, when it is of that epoch and
        sound, else a new one formed now, the old one aborted. ExchangeError naming the host when
        the rendezvous fails."""
        members = tuple(m.peer_id for m in plan.members)
        with self._lock:
            g = self.group
            if (g is not None and g.key[:2] == (plan.job_id, plan.epoch) and not g.progress.broken
                    and g.members == members and g.rank == rank):
                return g
        self.drop(f"plan of job {plan.job_id} round {plan.round} epoch {plan.epoch}")
        key: GroupKey = (plan.job_id, plan.epoch, plan.round)
        first = plan.members[0]
        forming = Progress()
        with self._lock:
            self._forming = {key: forming}
        ch: grpc.Channel | None = None
        try:
            if rank == 0:
                store: Any = self.store_host.store(key)
                store.set_timeout(timedelta(seconds=deadline_s))  # gloo's reads of it wait no longer
            else:
                ch = rpc.channel(first.address, tls=self._tls, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
                store = remote_store(exchange_pb2_grpc.PeerExchangeStub(ch), key, self._peer_id(),
                                     self._sign(key, first.peer_id), deadline_s, abort)
            g = make_group(store, key, rank, members, self._host, deadline_s, self._device)
        except Exception as e:  # noqa: BLE001 - gloo reports a failed rendezvous as RuntimeError
            if ch is not None:
                ch.close()
            with self._lock:
                self._forming = {}
            if abort.is_set():
                raise Cancelled(f"forming process group {key}: cancelled") from None
            raise ExchangeError(f"forming process group {key} failed: {e}", suspect="") from None
        g.progress, g.channel = forming, ch
        with self._lock:
            self._forming = {}
            self.group = g
            self.formed += 1
        log.info("peer %s job %s round %d epoch %d: process group formed (%s, rank %d of %d)", self._peer_id(),
                 plan.job_id, plan.round, plan.epoch, g.backend, rank, len(members))
        return g

    def probe(self, plan: types_pb2.Plan, key: GroupKey, m: types_pb2.Member) -> int:
        """How many collectives of group ``key`` member ``m`` entered (-1: it holds no such
        group, or does not answer)."""
        req = exchange_pb2.TorchProbeRequest(job_id=key[0], epoch=key[1], group_round=key[2], sender_id=self._peer_id())
        try:
            with rpc.channel(m.address, tls=self._tls) as ch:
                got = exchange_pb2_grpc.PeerExchangeStub(ch).TorchProbe(
                    req, timeout=PROBE_TIMEOUT_S, metadata=self._sign(key, m.peer_id)(TORCH_PROBE))
        except grpc.RpcError:
            return -1
        return got.entered if got.in_group else -1

    def suspect(self, plan: types_pb2.Plan, key: GroupKey, mine: Progress, skip: Callable[[str], str]) -> str:
        """Names the member at fault for a failed collective or rendezvous of group ``key``: the
        first (in ring order) whose exchange server does not answer a probe within
        :data:`PROBE_TIMEOUT_S` (dead, or unreachable), else the one that got least far (entered
        fewer collectives than this member, or holds no such group), else "" (nobody to blame:
        the coordinator re-issues the round under a new epoch). ``skip(address)`` is the
        peer's injected fault for an address ("" for none)."""
        me = self._peer_id()
        behind: list[tuple[int, str]] = []
        for m in plan.members:
            if m.peer_id == me:
                continue
            if skip(m.address):
                return m.peer_id
            req = exchange_pb2.TorchProbeRequest(job_id=key[0], epoch=key[1], group_round=key[2], sender_id=me)
            try:
                with rpc.channel(m.address, tls=self._tls) as ch:
                    got = exchange_pb2_grpc.PeerExchangeStub(ch).TorchProbe(
                        req, timeout=PROBE_TIMEOUT_S, metadata=self._sign(key, m.peer_id)(TORCH_PROBE))
            except grpc.RpcError as e:
                log.info("peer %s: probe of %s for group %s failed: %s", me, m.peer_id, key,
                         e.code() if isinstance(e, grpc.Call) else e)
                return m.peer_id
            if not got.in_group or got.entered < mine.entered:
                behind.append((got.entered if got.in_group else -1, m.peer_id))
        return min(behind)[1] if behind else ""


def probe_answer(plane: TorchPlane | None, req: exchange_pb2.TorchProbeRequest) -> exchange_pb2.TorchProbeResponse:
    """What this member answers a ``TorchProbe`` for a group."""
    got = plane.progress((req.job_id, req.epoch, req.group_round)) if plane is not None else None
    if got is None:
        return exchange_pb2.TorchProbeResponse(in_group=False)
    return exchange_pb2.TorchProbeResponse(in_group=True, entered=got.entered, done=got.done, broken=got.broken)


class TorchLink:
    """A ring round's stand-in for :class:`peer.link.PeerLink` on the torch plane: the group is
    formed (or the epoch's group taken) in the background while the member trains
    (:meth:`open_early`), then every average of the round is one collective over it
    (:meth:`average`). A failure names its suspect from probes (:meth:`TorchPlane.suspect`)."""

    def __init__(self, plane: TorchPlane, plan: types_pb2.Plan, rank: int, deadline_s: float,
                 abort: threading.Event, skip: Callable[[str], str] = lambda _a: "", hold: bool = False) -> None:
        self._plane, self._plan, self._rank = plane, plan, rank
        self._hold = hold  # tests only (peer.faults, hold-collective): never enter this round's collective
        self._deadline_s = deadline_s
        self._abort = abort
        self._skip = skip
        self._group: TorchGroup | None = None
        self._error: BaseException | None = None
        self._opening: threading.Thread | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def open_early(self) -> None:
        """Forms or takes the group in a background thread."""
        def run() -> None:
            try:
                self._group = self._plane.group_for(self._plan, self._rank, self._deadline_s, self._abort)
            except BaseException as e:  # noqa: BLE001 - raised by the first average
                self._error = e

        self._opening = threading.Thread(target=run, name=f"torch-group-{self._plan.job_id}", daemon=True)
        self._opening.start()

    def _ready(self) -> TorchGroup:
        if self._opening is None:
            self.open_early()
        assert self._opening is not None
        self._opening.join(self._deadline_s + STORE_CALL_S)  # the rendezvous is bounded by the deadline itself
        if self._opening.is_alive():
            self._error = ExchangeError(f"forming the process group of job {self._plan.job_id} epoch "
                                        f"{self._plan.epoch} did not end in time")
        if self._error is not None:
            raise self._blame(self._error, Progress())
        assert self._group is not None
        return self._group

    def _blame(self, e: BaseException, mine: Progress) -> BaseException:
        if isinstance(e, Cancelled) or not isinstance(e, ExchangeError) or e.suspect:
            return e
        key = self._group.key if self._group is not None else (self._plan.job_id, self._plan.epoch, self._plan.round)
        who = self._plane.suspect(self._plan, key, mine, self._skip)
        return ExchangeError(f"{e}{f'; suspect {who}' if who else ''}", suspect=who)

    def average(self, buf: np.ndarray, weight: float) -> float:
        """One weighted average of ``buf`` (parameters or gradients, then the weight slot) over
        the group (:func:`weighted_average`)."""
        group = self._ready()
        n = len(group.members)
        if self._hold:
            self._hold_forever(group)
        try:
            total = weighted_average(group, buf, weight, self._deadline_s, self._abort)
        except ExchangeError as e:
            raise self._blame(e, group.progress) from None
        moved = int(buf.nbytes * (n - 1) / n)  # a ring all-reduce's share each way
        self.bytes_sent += 2 * moved
        self.bytes_received += 2 * moved
        return total

    def _hold_forever(self, group: TorchGroup) -> None:
        """Tests only: waits until every other member has entered the collective this member is
        about to (their probes say so; 30 s at most), logs it, then waits to be cancelled (or
        killed) without entering."""
        want = group.progress.entered + 1
        until = time.monotonic() + 30.0
        others = [m for m in self._plan.members if m.peer_id != self._plane._peer_id()]
        while time.monotonic() < until and not self._abort.is_set():
            if all(self._plane.probe(self._plan, group.key, m) >= want for m in others):
                break
            self._abort.wait(0.1)
        log.warning("peer %s job %s round %d epoch %d: test fault hold-collective: every other member is in "
                    "collective %d; holding it", self._plane._peer_id(), self._plan.job_id, self._plan.round,
                    self._plan.epoch, want)
        self._abort.wait(120.0)
        raise Cancelled("test fault hold-collective: the held round was cancelled")

    def shutdown(self) -> None:
        """Nothing to close: the group outlives the round (it is dropped when it breaks or the
        epoch changes)."""
        if self._opening is not None and self._opening.is_alive():
            self._opening.join(0)
