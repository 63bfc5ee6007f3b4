"""Gossip exchanges over gRPC: one peer's side of pairwise push-pull averaging.

A :class:`GossipNode` holds what a peer exchanges in a gossip job: the trainer whose parameters
are averaged, the averaging weight (samples trained, merged at every exchange) and the exchange
slot (:class:`aggregation.gossip.Exchanger`), which makes every exchange touching this peer,
whether it started it or serves it, one at a time. Both roles run the same two-phase exchange:

1. initiator A: takes its slot, sends an offer (job, exchange id, size, weight) and its
   parameters on a ``PeerExchange.Gossip`` stream with a deadline;
2. partner B: refuses at once with RESOURCE_EXHAUSTED when its slot is taken (A then tries
   another candidate); else it receives A's parameters into a separate buffer, copies its own
   between two SGD steps (under its trainer's lock, held only for the copy) and answers with
   that copy;
3. A, holding both, averages (:func:`aggregation.gossip.pair_average`, the same coefficients on
   both sides) and sends ``commit``; B averages on ``commit`` and confirms.

Nothing is applied before the other side's whole copy has arrived, so a partner that dies or
stalls mid-exchange costs the other one deadline and leaves its parameters untouched. The one
window no protocol closes (two generals) is after A's commit: if B never sees ``commit`` it
aborts on its deadline, A has averaged and B has not. Both are still sane models (A's is a
convex combination); the node counts such exchanges as ``one_sided``.

B keeps training while its copy travels. If it took no SGD step in between, it applies the
same symmetric formula as A and the two end bit-identical; if it did, it adds A's share of the
difference to its moved-on parameters (:func:`aggregation.gossip.pair_apply`), so neither its
own progress nor A's contribution is lost or counted twice.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from dml.v1 import exchange_pb2, exchange_pb2_grpc

from dml.aggregation.gossip import Exchanger, ExchangeStateError, Snapshot
from dml.aggregation.guard import offer_problem, rms, update_norm
from dml.common import rpc
from dml.common.tls import TlsConfig
from dml.peer.auth import GOSSIP, PeerCredentials

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
LOCK_POLL_S = 0.05


class GossipRefused(Exception):
    """The partner cannot exchange now (busy, another job, not reachable)."""


class GossipPoisoned(GossipRefused):
    """The other side's parameters or weight are non-finite or absurd (aggregation.guard)."""


@dataclass
class Outcome:
    """How one attempt to exchange with a partner ended."""

    partner: str
    ok: bool
    busy: bool = False  # alive but could not take part now (busy, or not gossiping in the job yet)
    serving: bool = False  # not tried: this peer is itself being averaged by another right now
    distance: float = float("nan")  # ||mine - theirs|| before averaging
    bytes_sent: int = 0
    detail: str = ""
    poisoned: bool = False  # the partner answered with non-finite or absurd parameters or weight


def _chunks(buf: np.ndarray) -> Iterator[bytes]:
    view = buf.view(np.uint8)
    for start in range(0, view.size, CHUNK_BYTES):
        yield view[start : start + CHUNK_BYTES].tobytes()


def _fill(out: np.ndarray, pos: int, data: bytes) -> int:
    """Copies ``data`` into ``out``'s bytes at byte ``pos``; ValueError on overflow."""
    view = out.view(np.uint8)
    end = pos + len(data)
    if end > view.size:
        raise ValueError(f"more parameter bytes than announced ({end} > {view.size})")
    view[pos:end] = np.frombuffer(data, dtype=np.uint8)
    return end


def pair_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| in float64 (:func:`dml.aggregation.guard.update_norm`: small pieces, no
    model-sized temporary, plain ufuncs rather than a BLAS call whose worker threads would spin
    on a gossip peer sharing cores with others)."""
    return update_norm(a, b)


class GossipNode:
    """One peer's gossip state; thread-safe. ``attach`` it to a job's trainer before exchanging."""

    def __init__(self, peer_id: str, credentials: PeerCredentials | None = None) -> None:
        self.peer_id = peer_id
        self.credentials = credentials  # signs the exchanges this peer starts (None: unsigned)
        self.slot = Exchanger(peer_id)
        self._lock = threading.Lock()
        self.job_id = ""
        self.trainer: Any = None
        self.weight = 0.0  # guarded by the trainer's lock
        self.bytes_sent = 0
        self.bytes_received = 0
        self.on_bytes: Callable[[int, int], None] | None = None  # told (sent, received) after each exchange
        self.one_sided = 0
        self.served = 0  # exchanges applied as the partner (another peer started them)
        self.last_distance = float("nan")  # ||mine - theirs|| of the last exchange applied, either role
        self.max_weight = float("inf")  # the most samples the job can have trained (set by attach)
        # Called with (job, sender, what is wrong) when this peer, as the partner, refuses a
        # poisoned offer: the peer reports the sender to the coordinator.
        self.on_poisoned: Callable[[str, str, str], None] | None = None

    def _count(self, sent: int, received: int) -> None:
        """Adds one exchange's parameter bytes, each way, to the totals (and tells ``on_bytes``)."""
        self.bytes_received += received
        hook = self.on_bytes
        if hook is not None:
            hook(sent, received)

    # -- membership of a job ----------------------------------------------------------------
    def attach(self, job_id: str, trainer: Any, max_weight: float = float("inf")) -> None:
        """Exchanges from now on average ``trainer``'s parameters for ``job_id``; an offer whose
        weight exceeds ``max_weight`` (the samples the job can have trained) is refused."""
        with self._lock:
            self.max_weight = max_weight
            if self.job_id == job_id and self.trainer is trainer:
                return
            self.job_id, self.trainer, self.weight = job_id, trainer, 0.0

    def detach(self) -> None:
        """Stops serving exchanges; returns once none can still change the parameters."""
        with self._lock:
            trainer, self.job_id, self.trainer = self.trainer, "", None
        if trainer is not None:
            with trainer.lock:  # an exchange committing now holds it; later ones see job_id ""
                pass

    def add_samples(self, n: int) -> None:
        """Training added ``n`` samples to this peer's weight."""
        trainer = self.trainer
        if trainer is not None:
            with trainer.lock:
                self.weight += n

    def _vet(self, trainer: Any, theirs: np.ndarray, weight: float, sender: str) -> None:
        """Raises :class:`GossipPoisoned` unless the other side's copy and weight are sane. Our
        own scale is read without the trainer's lock: an estimate is all the rule needs."""
        n = trainer.numel
        problem = offer_problem(theirs, weight, rms(trainer.host_buffer()[:n]), self.max_weight)
        if problem:
            raise GossipPoisoned(f"refused the parameters of {sender}: {problem}")

    def _current(self, job_id: str) -> Any:
        with self._lock:
            return self.trainer if self.job_id == job_id and self.trainer is not None else None

    # -- the partner's side (the Gossip RPC) ---------------------------------------------------
    def serve(self, requests: Iterator[exchange_pb2.GossipMessage], context: grpc.ServicerContext
              ) -> Iterator[exchange_pb2.GossipMessage]:
        """Serves one exchange started by another peer (PeerExchange.Gossip)."""
        left = context.time_remaining()
        if left is None or left > 3600:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a gossip exchange must carry a deadline (at most 1 h)")
        deadline = time.monotonic() + left
        first = next(requests, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty gossip stream")
        assert first is not None
        trainer = self._current(first.job_id)
        if trainer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"peer {self.peer_id} is not gossiping in job {first.job_id!r} now")
        n = trainer.numel
        if first.elems != n or not first.exchange_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"bad offer: {first.elems} elements (model has {n}), exchange id {first.exchange_id!r}")
        if not (math.isfinite(first.weight) and 0 <= first.weight <= self.max_weight):
            why = f"refused the offer of {first.sender_id}: weight {first.weight:.6g} outside [0, {self.max_weight:.6g}]"
            log.error("peer %s job %s: %s", self.peer_id, first.job_id, why)
            if self.on_poisoned is not None:
                self.on_poisoned(first.job_id, first.sender_id, why)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"poisoned offer: {why}")
        key = (first.sender_id, first.exchange_id)
        if not self.slot.try_begin(key):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"peer {self.peer_id} is busy in another exchange")
        locked = False
        committed = False
        pos = sent_n = 0
        try:
            theirs = np.empty(n, dtype=np.float32)
            pos = _fill(theirs, 0, first.data)
            while pos < theirs.nbytes:
                msg = next(requests, None)
                if msg is None:
                    raise GossipRefused("the initiator closed the stream before sending all its parameters")
                pos = _fill(theirs, pos, msg.data)
            self._vet(trainer, theirs, float(first.weight), first.sender_id)
            self.slot.stage(key, Snapshot(theirs, float(first.weight)))
            # Our copy is taken between two SGD steps; training goes on while it travels.
            locked = self._lock_trainer(trainer, deadline, context)
            if self._current(first.job_id) is not trainer:
                raise GossipRefused("the job ended")
            sent, w_mine, version = trainer.host_buffer()[:n].copy(), self.weight, trainer.version
            locked = False
            trainer.lock.release()
            yield exchange_pb2.GossipMessage(job_id=first.job_id, sender_id=self.peer_id,
                                             exchange_id=first.exchange_id, elems=n, weight=w_mine)
            for data in _chunks(sent):
                yield exchange_pb2.GossipMessage(data=data)
                self.bytes_sent += len(data)
                sent_n += len(data)
            msg = next(requests, None)
            if msg is None or not msg.commit:
                raise GossipRefused("the initiator did not commit")
            dist = pair_distance(sent, theirs)
            locked = self._lock_trainer(trainer, deadline, context)
            if self._current(first.job_id) is not trainer:
                raise GossipRefused("the job ended")
            buf = trainer.host_buffer()
            moved = trainer.version != version  # trained since: keep that progress (pair_apply)
            gained = self.weight - w_mine  # samples trained since
            self.weight = self.slot.commit(key, buf[:n], w_mine, sent=sent if moved else None) + gained
            self.served += 1
            self.last_distance = dist
            committed = True
            trainer.load_host_buffer(buf)
            locked = False
            trainer.lock.release()
            yield exchange_pb2.GossipMessage(commit=True)
        except GossipPoisoned as e:
            log.error("peer %s job %s: gossip exchange %s: %s", self.peer_id, first.job_id, first.exchange_id, e)
            if self.on_poisoned is not None:  # the report is counted by kind (PeerMetrics.failure_reported)
                self.on_poisoned(first.job_id, first.sender_id, str(e))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"poisoned offer: {e}")
        except (GossipRefused, ValueError, ExchangeStateError, grpc.RpcError) as e:
            log.info("peer %s: gossip exchange %s from %s dropped: %s", self.peer_id, first.exchange_id,
                     first.sender_id, e)
            context.abort(grpc.StatusCode.ABORTED, f"exchange dropped: {e}")
        finally:
            self._count(sent_n, pos)
            if locked:
                trainer.lock.release()
            if not committed:
                self.slot.abort(key)

    @staticmethod
    def _lock_trainer(trainer: Any, deadline: float, context: grpc.ServicerContext) -> bool:
        """Takes the trainer's lock (free between two SGD steps) before the call's deadline."""
        while not trainer.lock.acquire(timeout=LOCK_POLL_S):
            if time.monotonic() > deadline or not context.is_active():
                raise GossipRefused("deadline passed waiting for the training step")
        return True

    # -- the initiator's side ---------------------------------------------------------------------
    def exchange(self, job_id: str, partner_id: str, address: str, timeout_s: float,
                 channel: grpc.Channel | None = None, epoch: int = 0, tls: TlsConfig | None = None) -> Outcome:
        """Runs one exchange with ``partner_id`` at ``address`` as a member of ``job_id``'s
        ``epoch`` (a channel of our own over ``tls`` when none is given); never raises for the
        partner's failures (the Outcome says what happened). Parameters change only on success."""
        trainer = self._current(job_id)
        if trainer is None:
            return Outcome(partner_id, False, detail="not attached to the job")
        xid = uuid.uuid4().hex[:16]
        key = (partner_id, xid)
        if not self.slot.try_begin(key):
            return Outcome(partner_id, False, busy=True, serving=True, detail="this peer is serving another exchange")
        own = channel is None
        ch = channel or rpc.channel(address, tls=tls, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
        out: queue.Queue[exchange_pb2.GossipMessage | None] = queue.Queue()
        sent = [0]
        n = trainer.numel
        buf = trainer.host_buffer()
        mine = buf[:n]
        w_mine = self.weight
        committed = False
        call = None
        pos = 0

        def requests() -> Iterator[exchange_pb2.GossipMessage]:
            yield exchange_pb2.GossipMessage(job_id=job_id, sender_id=self.peer_id, exchange_id=xid,
                                             elems=n, weight=w_mine)
            for data in _chunks(mine):
                yield exchange_pb2.GossipMessage(data=data)
                sent[0] += len(data)
            # The commit, or None to end: exchange() puts one before it returns. A stalled
            # exchange is ended by the call's own deadline (DEADLINE_EXCEEDED); this wait only
            # backs it up, longer than the deadline so the two never race, and it ends the stream
            # rather than raising (gRPC would log a traceback and report UNKNOWN instead).
            try:
                msg = out.get(timeout=2 * timeout_s + 1.0)
            except queue.Empty:
                return
            if msg is not None:
                yield msg

        try:
            stub = exchange_pb2_grpc.PeerExchangeStub(ch)
            md = self.credentials.sign(GOSSIP, job_id, epoch, xid, partner_id) if self.credentials else []
            call = stub.Gossip(requests(), timeout=timeout_s, metadata=md)
            first = next(call)
            if first.elems != n or not math.isfinite(first.weight) or first.weight < 0:
                raise GossipRefused(f"bad answer: {first.elems} elements, weight {first.weight}")
            theirs = np.empty(n, dtype=np.float32)
            pos = _fill(theirs, 0, first.data)
            while pos < theirs.nbytes:
                pos = _fill(theirs, pos, next(call).data)
            self._vet(trainer, theirs, float(first.weight), partner_id)
            self.slot.stage(key, Snapshot(theirs, float(first.weight)))
            dist = pair_distance(mine, theirs)
            with trainer.lock:
                self.weight = self.slot.commit(key, mine, w_mine)
                committed = True
                trainer.load_host_buffer(buf)
            self.last_distance = dist
            out.put(exchange_pb2.GossipMessage(commit=True))
            try:
                confirm = next(call)
                if not confirm.commit:
                    raise GossipRefused("no confirmation")
            except (grpc.RpcError, StopIteration, GossipRefused) as e:
                self.one_sided += 1
                log.warning("peer %s: exchange %s with %s applied here only (the partner did not confirm: %s)",
                            self.peer_id, xid, partner_id, e)
            return Outcome(partner_id, True, distance=dist, bytes_sent=sent[0])
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            detail = e.details() if isinstance(e, grpc.Call) else str(e)
            # Busy, or alive but not (yet, or no longer) gossiping in this job, or holding a newer
            # epoch than our plan's (PERMISSION_DENIED): not a failure of the partner.
            busy = code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
                            grpc.StatusCode.PERMISSION_DENIED)
            return Outcome(partner_id, False, busy=busy,
                           bytes_sent=sent[0], detail=f"{code.name if code else 'error'}: {detail}")
        except GossipPoisoned as e:
            log.error("peer %s job %s: gossip exchange %s: %s", self.peer_id, job_id, xid, e)
            return Outcome(partner_id, False, bytes_sent=sent[0], detail=str(e), poisoned=True)
        except (GossipRefused, ValueError, StopIteration, ExchangeStateError) as e:
            return Outcome(partner_id, False, bytes_sent=sent[0], detail=str(e) or type(e).__name__)
        finally:
            self.bytes_sent += sent[0]
            self._count(sent[0], pos)
            if not committed:
                self.slot.abort(key)
                out.put(None)
                if call is not None:
                    call.cancel()
            if own:
                ch.close()
