"""The peer's exchange server (PeerExchange) and the gRPC ring link the all-reduce runs over.

Incoming chunks land in an inbox keyed by (job, round, epoch), created by whichever side comes
first (a fast predecessor may start sending before this peer is ready). Inboxes are bounded, so a
slow receiver pushes back through gRPC flow control. A broken incoming stream marks the inbox
broken, so the receiver fails at once and names the predecessor.
"""
from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from typing import Callable, Iterable, Iterator

import grpc
import numpy as np

from aggregation.transport import Chunk, ExchangeError
from dml.v1 import exchange_pb2, exchange_pb2_grpc

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (job_id, round, epoch)
INBOX_CHUNKS = 64
POLL_S = 0.05
CHUNK_BYTES = 1 << 20
STALE_INBOX_S = 600.0

# The hot path bypasses protobuf: PushChunks wraps every chunk in a TensorChunk, which costs three
# copies per byte (tobytes, the message, serialisation) and one more to read it back. Frames on
# this raw method are a 12-byte header (phase u8, pad, step u16, offset u64, little-endian) then
# the float32 payload; the (job, round, epoch, sender) key travels once, as call metadata. The
# sender copies the payload once into the frame; the receiver views it in place.
FRAMES_SERVICE = "dml.v1.PeerFrames"
FRAMES_METHOD = f"/{FRAMES_SERVICE}/Push"
FRAME_HEADER = struct.Struct("<BxHQ")
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


class _Broken:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Inbox:
    """Chunks from the predecessor for one all-reduce."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.created = time.monotonic()
        self.q: queue.Queue[Chunk | _Broken] = queue.Queue(maxsize=INBOX_CHUNKS)
        self.closed = threading.Event()
        self.sender = ""


ParamsSource = Callable[[str, int], "tuple[int, str, bytes] | None"]


class ExchangeServicer(exchange_pb2_grpc.PeerExchangeServicer):
    """Receives ring chunks into inboxes and serves committed parameters."""

    def __init__(self, params_source: ParamsSource, recv_timeout_s: float = 60.0) -> None:
        self._lock = threading.Lock()
        self._inboxes: dict[Key, Inbox] = {}
        self._params_source = params_source
        self._recv_timeout_s = recv_timeout_s

    def inbox(self, key: Key) -> Inbox:
        """The inbox for ``key``, created if needed. Older exchanges of the same job are dropped,
        and those of other jobs once they are older than any exchange can last."""
        now = time.monotonic()
        with self._lock:
            for k, old in list(self._inboxes.items()):
                if k != key and ((k[0] == key[0] and k[1:] < key[1:]) or now - old.created > STALE_INBOX_S):
                    self._inboxes.pop(k).closed.set()
            if key not in self._inboxes:
                self._inboxes[key] = Inbox(key)
            return self._inboxes[key]

    def release(self, key: Key) -> None:
        """Drops the inbox of a finished or abandoned exchange."""
        with self._lock:
            box = self._inboxes.pop(key, None)
        if box:
            box.closed.set()

    def PushChunks(self, request_iterator: Iterator[exchange_pb2.TensorChunk], context: grpc.ServicerContext) -> exchange_pb2.PushChunksResponse:
        """The protobuf form of the exchange (portable; the ring itself uses :meth:`push_frames`)."""
        first = next(request_iterator, None)
        if first is None:
            return exchange_pb2.PushChunksResponse(chunks=0)

        def chunks() -> Iterator[Chunk]:
            for msg in _chain(first, request_iterator):
                if len(msg.data) % 4:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chunk data is not a whole number of float32")
                yield Chunk(int(msg.phase), msg.step, msg.offset_elems, np.frombuffer(msg.data, dtype=np.float32))

        n = self._receive(chunks(), (first.job_id, first.round, first.epoch), first.sender_id, context)
        return exchange_pb2.PushChunksResponse(chunks=n)

    def push_frames(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> exchange_pb2.PushChunksResponse:
        """The raw-frame form of PushChunks (see FRAME_HEADER); the key is in the call metadata."""
        md = dict(context.invocation_metadata())
        try:
            key = (str(md["dml-job"]), int(md["dml-round"]), int(md["dml-epoch"]))
            sender = str(md["dml-sender"])
        except (KeyError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "frames need dml-job, dml-round, dml-epoch, dml-sender metadata")

        def chunks() -> Iterator[Chunk]:
            for frame in request_iterator:
                if len(frame) < FRAME_HEADER.size or (len(frame) - FRAME_HEADER.size) % 4:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed frame")
                phase, step, offset = FRAME_HEADER.unpack_from(frame)
                yield Chunk(phase, step, offset, np.frombuffer(frame, dtype=np.float32, offset=FRAME_HEADER.size))

        n = self._receive(chunks(), key, sender, context)
        return exchange_pb2.PushChunksResponse(chunks=n)

    def frames_handler(self) -> grpc.GenericRpcHandler:
        """Registers :meth:`push_frames` (bytes in, no protobuf) on a server."""
        return grpc.method_handlers_generic_handler(FRAMES_SERVICE, {
            "Push": grpc.stream_unary_rpc_method_handler(
                self.push_frames, request_deserializer=None,
                response_serializer=exchange_pb2.PushChunksResponse.SerializeToString),
        })

    def _receive(self, chunks: Iterator[Chunk], key: Key, sender: str, context: grpc.ServicerContext) -> int:
        """Moves a stream's chunks into the inbox of ``key``; marks it broken if the stream breaks."""
        box = self.inbox(key)
        box.sender = sender
        n = 0
        try:
            for chunk in chunks:
                deadline = time.monotonic() + self._recv_timeout_s
                while not box.closed.is_set():
                    try:
                        box.q.put(chunk, timeout=POLL_S)
                        break
                    except queue.Full:
                        if time.monotonic() > deadline or not context.is_active():
                            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "receiver did not drain its inbox in time")
                n += 1
        except grpc.RpcError as e:  # the sender went away mid-stream
            if not box.closed.is_set():
                self._put_broken(box, f"stream from {box.sender} broke: {e.code() if hasattr(e, 'code') else e}")
            raise
        if not context.is_active():
            self._put_broken(box, f"stream from {box.sender} was cancelled")
        return n

    @staticmethod
    def _put_broken(box: Inbox, reason: str) -> None:
        try:
            box.q.put(_Broken(reason), timeout=1.0)
        except queue.Full:
            pass

    def FetchParameters(self, request: exchange_pb2.FetchParametersRequest, context: grpc.ServicerContext) -> Iterator[exchange_pb2.ParameterChunk]:
        got = self._params_source(request.job_id, request.round)
        if got is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no committed parameters for job {request.job_id} round {request.round or 'latest'}")
        assert got is not None
        rnd, digest, data = got
        for i in range(0, max(len(data), 1), CHUNK_BYTES):
            yield exchange_pb2.ParameterChunk(round=rnd if i == 0 else 0, digest=digest if i == 0 else "",
                                              data=data[i : i + CHUNK_BYTES])


class GrpcRingLink:
    """A ring member's link: a client stream to the successor, the inbox from the predecessor.

    ``abort`` is an event the owner sets when the round is cancelled (membership changed); a
    waiting ``recv`` then fails promptly.
    """

    def __init__(self, servicer: ExchangeServicer, key: Key, self_id: str, pred_id: str,
                 succ_id: str, succ_address: str, deadline_s: float, abort: threading.Event,
                 idle_timeout_s: float = 30.0) -> None:
        self._key = key
        self._self_id, self._pred_id, self._succ_id = self_id, pred_id, succ_id
        self._inbox = servicer.inbox(key)
        self._servicer = servicer
        self._abort = abort
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self._channel = grpc.insecure_channel(succ_address, options=GRPC_OPTIONS)
        self._push = self._channel.stream_unary(
            FRAMES_METHOD, request_serializer=None, response_deserializer=exchange_pb2.PushChunksResponse.FromString)
        self._deadline_s = deadline_s
        self._idle_s = idle_timeout_s
        self._call: grpc.Future | None = None
        self._send_error: str = ""
        self._done = threading.Event()

    def _requests(self) -> Iterator[bytes]:
        while True:
            item = self._out.get()
            if item is None:
                return
            yield item

    def _on_done(self, fut: grpc.Future) -> None:
        if not fut.cancelled():
            err = fut.exception()
            if err is not None:
                code = err.code() if isinstance(err, grpc.Call) else None
                details = err.details() if isinstance(err, grpc.Call) else str(err)
                self._send_error = f"stream to {self._succ_id} failed: {code} {details}"
        self._done.set()

    def send(self, chunk: Chunk) -> None:
        """Queues a chunk for the successor (serialised on gRPC's thread)."""
        if self._send_error:
            raise ExchangeError(self._send_error, suspect=self._succ_id)
        if self._call is None:
            job, rnd, epoch = self._key
            md = (("dml-job", job), ("dml-round", str(rnd)), ("dml-epoch", str(epoch)), ("dml-sender", self._self_id))
            self._call = self._push.future(self._requests(), timeout=self._deadline_s, metadata=md)
            self._call.add_done_callback(self._on_done)
        # One copy: the payload goes straight from the flat buffer into the frame.
        self._out.put(b"".join((FRAME_HEADER.pack(chunk.phase, chunk.step, chunk.offset), chunk.data.data)))

    def recv(self, timeout: float) -> Chunk:
        """Next chunk from the predecessor; fails fast on abort or a broken stream, and after
        ``idle_timeout_s`` without a chunk (progress-based, so a slow ring is not a dead one)."""
        deadline = time.monotonic() + min(timeout, self._idle_s)
        while True:
            if self._abort.is_set():
                raise ExchangeError("round aborted: the membership changed")
            if self._send_error:
                raise ExchangeError(self._send_error, suspect=self._succ_id)
            try:
                item = self._inbox.q.get(timeout=min(POLL_S, max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise ExchangeError(f"no data from {self._pred_id} for {min(timeout, self._idle_s):.1f}s") from None
                continue
            if isinstance(item, _Broken):
                raise ExchangeError(item.reason, suspect=self._pred_id)
            return item

    def close(self, timeout: float) -> None:
        """Ends the outgoing stream and waits for the successor to acknowledge it."""
        self._out.put(None)
        try:
            if self._call is not None:
                deadline = time.monotonic() + timeout
                while not self._done.wait(POLL_S):
                    if self._abort.is_set():
                        raise ExchangeError("round aborted: the membership changed")
                    if time.monotonic() > deadline:
                        raise ExchangeError(f"{self._succ_id} did not acknowledge in time")
                if self._send_error:
                    raise ExchangeError(self._send_error, suspect=self._succ_id)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Cancels the stream if still open and frees the inbox and channel."""
        if self._call is not None and not self._call.done():
            self._out.put(None)
            self._call.cancel()
        self._servicer.release(self._key)
        self._channel.close()


def _chain(first: exchange_pb2.TensorChunk, rest: Iterable[exchange_pb2.TensorChunk]) -> Iterator[exchange_pb2.TensorChunk]:
    yield first
    yield from rest


def add_exchange_to_server(servicer: ExchangeServicer, server: grpc.Server) -> None:
    """Serves both forms of the exchange (protobuf PeerExchange and raw frames) on ``server``."""
    exchange_pb2_grpc.add_PeerExchangeServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((servicer.frames_handler(),))
