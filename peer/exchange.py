"""The peer's exchange server (PeerExchange): receives ring frames into this peer's inboxes
(raw gRPC frames, protobuf PushChunks, or a stream of the TCP data plane), serves gossip
exchanges and committed parameters. The protocol: docs/architecture.md, "Data plane"."""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from dml.v1 import exchange_pb2, exchange_pb2_grpc

from dml.aggregation.codecs import payload_size
from dml.aggregation.transport import FRAME, Header
from dml.common import guard, limits
from dml.common.tls import TlsConfig
from dml.peer import dataplane, torchplane, watch
from dml.peer.auth import FETCH_PARAMETERS, GOSSIP, OPEN_DATA_PLANE, PUSH_CHUNKS, check_body
from dml.peer.gossip import GossipNode
from dml.peer.inbox import POLL_S, UNCLAIMED_TTL_S, Frame, Inbox, Key
from dml.peer.kept import KeptCache
from dml.peer.shm import SharedSlots

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK_BYTES = 1 << 20
STALE_INBOX_S = 600.0
# The hot path bypasses protobuf: PushChunks wraps every chunk in a TensorChunk, which costs three
# copies per byte (tobytes, the message, serialisation) and one more to read it back. Frames on
# this raw method are a 20-byte header (aggregation.transport.FRAME) then the payload; the
# (job, round, epoch, sender) key travels once, as call metadata. The TCP data plane carries the
# same frames.
FRAMES_SERVICE = "dml.v1.PeerFrames"
FRAMES_METHOD = f"/{FRAMES_SERVICE}/Push"

STREAM_MAX_S = 900.0  # no exchange stream lasts longer (rounds have a deadline of their own)
GOSSIP_IDLE_S = 30.0  # the initiator's commit follows our parameters at once


def call_policies(idle_s: float) -> dict[str, guard.Policy]:
    """The exchange server's long-lived calls and how long their clients may leave them waiting:
    ring streams ``idle_s`` between frames (the peer's exchange timeout: its own read gives up
    then anyway), a parameter download as long for the client to take each chunk."""
    ring = guard.Policy(idle_s=idle_s, max_s=STREAM_MAX_S, long=True)
    return {
        FRAMES_METHOD: ring,
        "/dml.v1.PeerExchange/PushChunks": ring,
        "/dml.v1.PeerExchange/Gossip": guard.Policy(idle_s=GOSSIP_IDLE_S, max_s=STREAM_MAX_S, long=True),
        "/dml.v1.PeerExchange/FetchParameters": guard.Policy(idle_s=idle_s, max_s=STREAM_MAX_S, long=True,
                                                             response_idle=True),
        watch.WATCH_METHOD: guard.Policy(long=True, max_s=watch.WATCH_MAX_S + 5.0),  # sends nothing, by design
    }


# (job, round, training_state=...) -> peer.params.Served or None (ParamStore.serve)
ParamsSource = Callable[..., Any]


def _check_payload(header: Header, nbytes: int) -> None:
    """ValueError unless ``nbytes`` is exactly ``header.count`` elements in ``header.codec``."""
    if nbytes != payload_size(header.codec, header.count):  # ValueError for an unknown codec too
        raise ValueError(f"payload of {nbytes} bytes is not {header.count} elements in codec {header.codec}")


def trim_heap() -> None:
    """Returns the C heap's free pages to the OS (glibc's ``malloc_trim``; elsewhere nothing).
    gRPC reassembles messages from small slices, so the frames of a dropped flood leave the
    heap fragmented and resident otherwise."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _check(context: grpc.ServicerContext, request: object) -> None:
    """INVALID_ARGUMENT when a string in ``request`` is over its length limit (common.limits)."""
    err = limits.message_error(request)  # type: ignore[arg-type]
    if err:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)


def _parse_frame(frame: bytes) -> Frame:
    """Splits a raw frame into its header and payload view; ValueError if malformed."""
    if len(frame) < FRAME.size:
        raise ValueError("frame shorter than its header")
    header = Header.unpack(frame)
    _check_payload(header, len(frame) - FRAME.size)
    return header, memoryview(frame)[FRAME.size:]


# What senders may queue here, in payload bytes of frames waiting in inboxes. A claimed inbox
# holds at most INBOX_CHUNKS frames (64 MiB of 1 MiB gRPC chunks; more only with a larger
# --chunk-elems) and pushes back through flow control when full.
INBOX_BYTES = 512 << 20  # all inboxes together
SENDER_BYTES = 256 << 20  # the inboxes of one sender (as it names itself)
UNCLAIMED_BYTES = 64 << 20  # inboxes no plan of this peer has claimed yet
MAX_UNCLAIMED = 8  # unclaimed inboxes in all (a healthy ring makes at most one: a fast predecessor's)
SENDER_UNCLAIMED = 2  # unclaimed inboxes one sender may open
SWEEP_S = 1.0


class ExchangeServicer(exchange_pb2_grpc.PeerExchangeServicer):
    """Receives ring frames into inboxes, offers the TCP data plane and serves committed
    parameters. ``data_plane_host`` (the host to listen on) enables TCP; None serves gRPC only.

    What senders queue is bounded (bytes in all, per sender and in unclaimed inboxes; unclaimed
    inboxes in all and per sender); a sender over a bound waits (flow control) or, for an inbox
    no plan claims, is refused with RESOURCE_EXHAUSTED. A sweeper thread drops unclaimed inboxes
    after :data:`~dml.peer.inbox.UNCLAIMED_TTL_S` and unused data-plane offers after theirs.
    ``tls`` is the peer's TLS config: its data plane runs inside TLS (None: plain, loopback only)."""

    def __init__(self, params_source: ParamsSource, recv_timeout_s: float = 60.0,
                 data_plane_host: str | None = None, tls: TlsConfig | None = None) -> None:
        self._lock = threading.Lock()
        self._inboxes: dict[Key, Inbox] = {}
        self._params_source = params_source
        self._recv_timeout_s = recv_timeout_s
        self.gossip: GossipNode | None = None  # set by the peer: serves PeerExchange.Gossip
        self.torch: torchplane.TorchPlane | None = None  # set by the peer: serves TorchStore and TorchProbe
        # Set by a peer whose server runs peer.auth.ExchangeGuard: every request's body must then
        # name the (job, round, epoch, sender) its call was signed for.
        self.guarded = False
        self.tls = tls
        self.data_plane = (dataplane.DataPlane(data_plane_host, self._attach, tls)
                           if data_plane_host is not None else None)
        # This peer's outgoing data-plane streams kept between the rounds of an epoch (the
        # incoming ones are kept by the data plane), and its gRPC channels to its successors.
        self.kept_senders = KeptCache("stream")
        self.kept_channels = KeptCache("channel")
        self.dropped = 0  # unclaimed inboxes dropped (by the sweeper, or to make room)
        self._trimmed = 0  # self.dropped when the heap was last trimmed
        self._jobs: dict[str, float] = {}  # jobs this peer has claimed inboxes of -> when it last did
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="inbox-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """Stops the data plane and the sweeper and drops every inbox and kept stream."""
        self._stop.set()
        self.kept_senders.close()
        self.kept_channels.close()
        if self.data_plane is not None:
            self.data_plane.close()
        with self._lock:
            boxes, self._inboxes = list(self._inboxes.values()), {}
        for box in boxes:
            box.close()

    def inbox(self, key: Key) -> Inbox:
        """Claims the inbox for ``key`` (this peer's plan asks for it), created if needed. Older
        exchanges of the same job are dropped, and those of other jobs once they are older than
        any exchange can last."""
        now = time.monotonic()
        self.kept_senders.drop(key[0], below_epoch=key[2])  # a new epoch: a new ring, new streams
        self.kept_channels.drop(key[0], below_epoch=key[2])
        if self.data_plane is not None:
            self.data_plane.drop_kept(key[0], below_epoch=key[2], reason=f"epoch {key[2]} began")
        with self._lock:
            for k, old in list(self._inboxes.items()):
                if k != key and ((k[0] == key[0] and k[1:] < key[1:]) or now - old.created > STALE_INBOX_S):
                    self._inboxes.pop(k).close()
            box = self._inboxes.get(key)
            if box is None:
                box = self._inboxes[key] = Inbox(key, claimed=True, now=now)
            box.claimed = True
            self._jobs[key[0]] = now
            for job in [j for j, t in self._jobs.items() if now - t > STALE_INBOX_S]:
                del self._jobs[job]
            return box

    def forget_job(self, job: str | None = None) -> None:
        """Closes the data-plane streams kept for ``job`` (every job: None), both ways, and the
        channels to its successors: the peer left the job, or was evicted."""
        n = self.kept_senders.drop(job)
        self.kept_channels.drop(job)
        if self.data_plane is not None:
            n += self.data_plane.drop_kept(job, reason="the peer left the job")
        if n:
            log.info("closed %d kept data-plane streams of %s", n, f"job {job}" if job else "every job")

    def keep_only(self, job: str, epoch: int) -> None:
        """Closes the kept streams of every job but ``job`` ("" : every job) and of its epochs
        before ``epoch`` (the coordinator's word, each heartbeat: a job that ended, a new epoch)."""
        kept = self.kept_senders.keys() + self.kept_channels.keys()
        for k in {k[0] for k in kept} | {k[0] for k in self._kept_receivers()}:
            if k != job:
                self.forget_job(k)
        if job:
            self.kept_senders.drop(job, below_epoch=epoch)
            self.kept_channels.drop(job, below_epoch=epoch)
            if self.data_plane is not None:
                self.data_plane.drop_kept(job, below_epoch=epoch, reason=f"epoch {epoch} began")

    def _kept_receivers(self) -> list[tuple[str, int, str]]:
        return self.data_plane.kept() if self.data_plane is not None else []

    def unclaimed(self) -> list[Inbox]:
        """The inboxes senders opened that no plan of this peer has claimed (yet)."""
        with self._lock:
            return [b for b in self._inboxes.values() if not b.claimed]

    def queued_bytes(self) -> int:
        """Payload bytes waiting in all inboxes."""
        with self._lock:
            return sum(b.q.nbytes for b in self._inboxes.values())

    def _arrival(self, key: Key, sender: str) -> Inbox | str:
        """The inbox a sender's frames for ``key`` go to: the claimed one, or a new unclaimed one
        if the limits allow (else the reason it is refused)."""
        with self._lock:
            box = self._inboxes.get(key)
            if box is not None:
                if not box.sender:
                    box.sender = sender
                return box
            waiting = [b for b in self._inboxes.values() if not b.claimed]
            if sum(b.sender == sender for b in waiting) >= SENDER_UNCLAIMED:
                return f"sender {sender!r} has {SENDER_UNCLAIMED} exchanges open that no plan of this peer claims"
            evicted = None
            if len(waiting) >= MAX_UNCLAIMED:
                # Make room by dropping the oldest inbox of a job this peer has no plan in: a
                # ring neighbour's early frames are claimed within moments, a flood's never.
                expected = key[0] in self._jobs
                spare = sorted((b for b in waiting if b.key[0] not in self._jobs), key=lambda b: b.created)
                if not spare or not expected and spare[0].created > time.monotonic() - UNCLAIMED_TTL_S / 2:
                    return f"{MAX_UNCLAIMED} exchanges no plan of this peer claims are open already"
                evicted = self._inboxes.pop(spare[0].key)
                self.dropped += 1
            box = self._inboxes[key] = Inbox(key, sender=sender)
        if evicted is not None:
            evicted.close(f"dropped to make room: {MAX_UNCLAIMED} exchanges no plan of this peer claims were open")
        return box

    def _try_put(self, box: Inbox, frame: Frame) -> bool:
        """Queues ``frame`` in ``box`` if it is full by no bound; False to wait and try again."""
        n = len(frame[1])
        with self._lock:
            if self._inboxes.get(box.key) is not box:
                return False
            boxes = self._inboxes.values()
            total = sum(b.q.nbytes for b in boxes)
            if not box.claimed:
                if sum(b.q.nbytes for b in boxes if not b.claimed) + n > UNCLAIMED_BYTES:
                    return False
            elif not box.q.empty() and total + n > INBOX_BYTES:  # an empty claimed inbox takes one
                return False
            if not box.q.empty() and sum(b.q.nbytes for b in boxes if b.sender == box.sender) + n > SENDER_BYTES:
                return False
            try:
                box.q.put_nowait(frame)
            except queue.Full:
                return False
            return True

    def sweep(self, now: float | None = None) -> int:
        """Drops unclaimed inboxes older than UNCLAIMED_TTL_S and unused data-plane offers past
        their time; returns how many inboxes it dropped (the sweeper thread calls it each second)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [k for k, b in self._inboxes.items() if not b.claimed and now - b.created > UNCLAIMED_TTL_S]
            boxes = [self._inboxes.pop(k) for k in gone]
            self.dropped += len(boxes)
        for box in boxes:
            log.info("exchange %s from %r: no plan of this peer claimed it within %.0fs; dropped",
                     box.key, box.sender, UNCLAIMED_TTL_S)
            box.close(f"no plan of this peer claims exchange {box.key} (dropped after {UNCLAIMED_TTL_S:.0f}s)")
        if self.data_plane is not None:
            self.data_plane.expire(now)
        if self.dropped != self._trimmed:  # a flood's frames went: give their memory back
            self._trimmed = self.dropped
            trim_heap()
        return len(boxes)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(SWEEP_S):
            try:
                self.sweep()
            except Exception:  # the sweeper must outlive a bad sweep; the error is logged
                log.exception("inbox sweep failed")

    def release(self, key: Key) -> None:
        """Drops the inbox of a finished or abandoned exchange."""
        with self._lock:
            box = self._inboxes.pop(key, None)
        if box:
            box.close()
        if self.data_plane is not None:
            self.data_plane.forget(key)

    def _attach(self, key: Key, sender: str, conn: socket.socket, shm: SharedSlots | None = None) -> bool:
        """Binds an authenticated TCP stream (and its shared-memory slots, if the sender mapped
        them) to ``key``'s inbox (one stream per inbox)."""
        box = self._arrival(key, sender)
        if isinstance(box, str):
            log.info("data plane: refused a stream for %s: %s", key, box)
            return False
        with self._lock:
            if self._inboxes.get(key) is not box:
                return False
            return box.attach(conn, sender, shm)

    def OpenDataPlane(self, request: exchange_pb2.OpenDataPlaneRequest, context: grpc.ServicerContext) -> exchange_pb2.OpenDataPlaneResponse:
        """Issues a port and single-use token for a TCP stream of one all-reduce."""
        if self.data_plane is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this peer serves no TCP data plane (started with --no-tcp)")
        assert self.data_plane is not None
        _check(context, request)
        if not request.job_id or not request.sender_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id and sender_id are required")
        if self.guarded:
            check_body(context, OPEN_DATA_PLANE, request.job_id, request.sender_id, request.epoch, str(request.round))
        try:
            token, slots = self.data_plane.offer((request.job_id, request.round, request.epoch), request.sender_id,
                                                 request.shm_slot_bytes)
        except dataplane.OfferRefused as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        if slots is None:
            return exchange_pb2.OpenDataPlaneResponse(port=self.data_plane.port, token=token)
        return exchange_pb2.OpenDataPlaneResponse(port=self.data_plane.port, token=token, shm_path=str(slots.path),
                                                  shm_nonce=slots.nonce, shm_slot_bytes=slots.slot_bytes)

    def PushChunks(self, request_iterator: Iterator[exchange_pb2.TensorChunk], context: grpc.ServicerContext) -> exchange_pb2.PushChunksResponse:
        """The protobuf form of the exchange (portable; the ring itself uses :meth:`push_frames`)."""
        first = next(request_iterator, None)
        if first is None:
            return exchange_pb2.PushChunksResponse(chunks=0)
        _check(context, first)
        if self.guarded:
            check_body(context, PUSH_CHUNKS, first.job_id, first.sender_id, first.epoch, str(first.round))

        def frames() -> Iterator[Frame]:
            for msg in _chain(first, request_iterator):
                codec = msg.codec or 1
                count = msg.count if msg.count or codec != 1 else len(msg.data) // 4
                header = Header(int(msg.phase), codec, msg.step, msg.offset_elems, count, msg.collective)
                try:
                    _check_payload(header, len(msg.data))
                except ValueError as e:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed chunk: {e}")
                yield header, memoryview(msg.data)

        n = self._receive(frames(), (first.job_id, first.round, first.epoch), first.sender_id, context)
        return exchange_pb2.PushChunksResponse(chunks=n)

    def push_frames(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> exchange_pb2.PushChunksResponse:
        """The raw-frame form of PushChunks (see :data:`FRAME`); the key is in the call metadata."""
        md = dict(context.invocation_metadata())
        try:
            key = (str(md["dml-job"]), int(md["dml-round"]), int(md["dml-epoch"]))
            sender = str(md["dml-sender"])
        except (KeyError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "frames need dml-job, dml-round, dml-epoch, dml-sender metadata")
        err = limits.string_error("dml-job", key[0]) or limits.string_error("dml-sender", sender)
        if err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, err)
        if self.guarded:
            check_body(context, FRAMES_METHOD, key[0], sender, key[2], str(key[1]))

        def frames() -> Iterator[Frame]:
            for frame in request_iterator:
                try:
                    yield _parse_frame(frame)
                except ValueError as e:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed frame: {e}")

        n = self._receive(frames(), key, sender, context)
        return exchange_pb2.PushChunksResponse(chunks=n)

    def frames_handler(self) -> grpc.GenericRpcHandler:
        """Registers :meth:`push_frames` (bytes in, no protobuf) on a server."""
        return grpc.method_handlers_generic_handler(FRAMES_SERVICE, {
            "Push": grpc.stream_unary_rpc_method_handler(
                self.push_frames, request_deserializer=None,
                response_serializer=exchange_pb2.PushChunksResponse.SerializeToString),
        })

    def _receive(self, frames: Iterator[Frame], key: Key, sender: str, context: grpc.ServicerContext) -> int:
        """Moves a stream's frames into the inbox of ``key``; marks it broken if the stream breaks."""
        box = self._arrival(key, sender)
        if isinstance(box, str):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, box)
        assert isinstance(box, Inbox)
        box.sender = sender
        n = 0
        try:
            for frame in frames:
                deadline = time.monotonic() + self._recv_timeout_s
                while not box.closed.is_set():
                    if self._try_put(box, frame):
                        box.arrived.set()
                        break
                    now = time.monotonic()
                    if not box.claimed and now - box.created > UNCLAIMED_TTL_S:
                        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"no plan of this peer claims exchange {key} within {UNCLAIMED_TTL_S:.0f}s")
                    if now > deadline or not context.is_active():
                        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "receiver did not drain its inbox in time")
                    with box.q.not_full:
                        box.q.not_full.wait(POLL_S)
                if box.dropped:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, box.dropped)
                n += 1
        except grpc.RpcError as e:  # the sender went away mid-stream
            if not box.closed.is_set():
                box.put_broken(f"stream from {box.sender} broke: {e.code() if hasattr(e, 'code') else e}")
            raise
        if not context.is_active():
            box.put_broken(f"stream from {box.sender} was cancelled")
        return n

    def Gossip(self, request_iterator: Iterator[exchange_pb2.GossipMessage], context: grpc.ServicerContext) -> Iterator[exchange_pb2.GossipMessage]:
        """One pairwise gossip exchange, served by the peer's :class:`peer.gossip.GossipNode`."""
        node = self.gossip
        if node is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this peer does not gossip")
            return
        if self.guarded:  # a non-member's offer is refused before anything of ours is sent
            first = next(request_iterator, None)
            if first is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty gossip stream")
                return
            _check(context, first)
            check_body(context, GOSSIP, first.job_id, first.sender_id, ref=first.exchange_id)
            request_iterator = _chain(first, request_iterator)
        yield from node.serve(_checked_first(request_iterator, context), context)

    def TorchStore(self, request: exchange_pb2.TorchStoreRequest, context: grpc.ServicerContext) -> exchange_pb2.TorchStoreResponse:
        """One operation on the rendezvous store of a torch-plane group this peer hosts."""
        _check(context, request)
        if self.torch is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this peer serves no torch data plane")
        assert self.torch is not None
        if self.guarded:
            check_body(context, torchplane.TORCH_STORE, request.job_id, request.sender_id, request.epoch,
                       str(request.group_round))
        try:
            return self.torch.store_host.op(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # not reached: abort raises

    def TorchProbe(self, request: exchange_pb2.TorchProbeRequest, context: grpc.ServicerContext) -> exchange_pb2.TorchProbeResponse:
        """How far this member got in a torch-plane group's collectives."""
        _check(context, request)
        if self.guarded:
            check_body(context, torchplane.TORCH_PROBE, request.job_id, request.sender_id, request.epoch,
                       str(request.group_round))
        return torchplane.probe_answer(self.torch, request)

    def FetchParameters(self, request: exchange_pb2.FetchParametersRequest, context: grpc.ServicerContext) -> Iterator[exchange_pb2.ParameterChunk]:
        _check(context, request)
        if self.guarded:
            check_body(context, FETCH_PARAMETERS, request.job_id, None, ref=str(request.round))
        got = self._params_source(request.job_id, request.round, training_state=request.training_state)
        if got is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no committed parameters{' and training state' if request.training_state else ''} "
                          f"for job {request.job_id} round {request.round or 'latest'}")
        assert got is not None
        # Part 0, the parameters, carries the round's digest in its first chunk; part 1, the
        # training state, the sha256 of its bytes (the joiner refuses a mismatch).
        parts = [(0, got.digest, got.model)] + ([(1, got.state_sha256, got.state)] if got.state is not None else [])
        for part, digest, data in parts:
            for i in range(0, max(len(data), 1), CHUNK_BYTES):
                yield exchange_pb2.ParameterChunk(round=got.round if i == 0 else 0, digest=digest if i == 0 else "",
                                                  data=bytes(data[i : i + CHUNK_BYTES]), part=part)


def _checked_first(requests: Iterator[exchange_pb2.GossipMessage], context: grpc.ServicerContext) -> Iterator[exchange_pb2.GossipMessage]:
    """``requests``, the first (the offer) checked for its strings' lengths."""
    first = next(requests, None)
    if first is None:
        return
    _check(context, first)
    yield first
    yield from requests


def _chain(first: T, rest: Iterable[T]) -> Iterator[T]:
    yield first
    yield from rest


def guarded_method(method: str) -> bool:
    """The exchange server's methods only members may call (all but health): the protobuf
    exchange, the raw frames and the successor watch."""
    return method.startswith("/dml.v1.PeerExchange/") or method in (FRAMES_METHOD, watch.WATCH_METHOD)


def add_exchange_to_server(servicer: ExchangeServicer, server: grpc.Server) -> None:
    """Serves both forms of the exchange (protobuf PeerExchange and raw frames), and the
    predecessor's watch (:mod:`peer.watch`), on ``server``."""
    exchange_pb2_grpc.add_PeerExchangeServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((servicer.frames_handler(), watch.handler()))
