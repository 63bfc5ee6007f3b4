"""The peer's exchange server (PeerExchange) and the ring link the all-reduce runs over.

Incoming frames land in an inbox keyed by (job, round, epoch), created by whichever side comes
first (a fast predecessor may start sending before this peer is ready). Frames arrive one of
three ways: the raw gRPC method (bytes, no protobuf), the protobuf PushChunks, or a TCP stream of
the fast data plane (:mod:`peer.dataplane`) attached to the inbox. gRPC inboxes are bounded, so a
slow receiver pushes back through flow control; a TCP stream is read straight into the caller's
buffer and pushes back through the kernel's. A broken incoming stream marks the inbox broken, so
the receiver fails at once and names the predecessor.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
import numpy as np
from dml.v1 import exchange_pb2, exchange_pb2_grpc

from dml.aggregation.codecs import payload_size
from dml.common import rpc
from dml.aggregation.transport import FRAME, ExchangeError, Header
from dml.peer import dataplane, shm
from dml.peer.gossip import GossipNode
from dml.peer.shm import SharedSlots

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (job_id, round, epoch)
INBOX_CHUNKS = 64
POLL_S = 0.05
CHUNK_BYTES = 1 << 20
STALE_INBOX_S = 600.0
OPEN_TIMEOUT_S = 5.0
DATA_PLANES = ("auto", "shm", "tcp", "grpc")
SHM_SLOT_BYTES = (1 << 22) + 64  # the largest chunk (1M float32) plus room for a codec's scale
SHM_MIN_BYTES = 8 << 20  # "auto" uses shared memory from this buffer size on
ABORTED = "round aborted: the membership changed"

# The hot path bypasses protobuf: PushChunks wraps every chunk in a TensorChunk, which costs three
# copies per byte (tobytes, the message, serialisation) and one more to read it back. Frames on
# this raw method are a 16-byte header (aggregation.transport.FRAME) then the payload; the
# (job, round, epoch, sender) key travels once, as call metadata. The TCP data plane carries the
# same frames.
FRAMES_SERVICE = "dml.v1.PeerFrames"
FRAMES_METHOD = f"/{FRAMES_SERVICE}/Push"


Frame = tuple[Header, memoryview]


class _Broken:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Inbox:
    """Frames from the predecessor for one all-reduce: queued gRPC frames, or a TCP stream."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.created = time.monotonic()
        self.q: queue.Queue[Frame | _Broken] = queue.Queue(maxsize=INBOX_CHUNKS)
        self.closed = threading.Event()
        self.arrived = threading.Event()  # set by the first gRPC frame or the TCP stream
        self.conn: socket.socket | None = None
        self.shm: SharedSlots | None = None  # payloads come through these slots (headers on conn)
        self.sender = ""

    def close(self) -> None:
        """Marks the inbox dead and drops its stream, if any."""
        self.closed.set()
        self.arrived.set()
        if self.conn is not None:
            _close_socket(self.conn)
        if self.shm is not None:
            self.shm.close()


ParamsSource = Callable[[str, int], "tuple[int, str, bytes | memoryview] | None"]


def _check_payload(header: Header, nbytes: int) -> None:
    """ValueError unless ``nbytes`` is exactly ``header.count`` elements in ``header.codec``."""
    if nbytes != payload_size(header.codec, header.count):  # ValueError for an unknown codec too
        raise ValueError(f"payload of {nbytes} bytes is not {header.count} elements in codec {header.codec}")


def _parse_frame(frame: bytes) -> Frame:
    """Splits a raw frame into its header and payload view; ValueError if malformed."""
    if len(frame) < FRAME.size:
        raise ValueError("frame shorter than its header")
    header = Header.unpack(frame)
    _check_payload(header, len(frame) - FRAME.size)
    return header, memoryview(frame)[FRAME.size:]


class ExchangeServicer(exchange_pb2_grpc.PeerExchangeServicer):
    """Receives ring frames into inboxes, offers the TCP data plane and serves committed
    parameters. ``data_plane_host`` (the host to listen on) enables TCP; None serves gRPC only."""

    def __init__(self, params_source: ParamsSource, recv_timeout_s: float = 60.0,
                 data_plane_host: str | None = None) -> None:
        self._lock = threading.Lock()
        self._inboxes: dict[Key, Inbox] = {}
        self._params_source = params_source
        self._recv_timeout_s = recv_timeout_s
        self.gossip: GossipNode | None = None  # set by the peer: serves PeerExchange.Gossip
        self.data_plane = dataplane.DataPlane(data_plane_host, self._attach) if data_plane_host is not None else None

    def close(self) -> None:
        """Stops the data plane and drops every inbox."""
        if self.data_plane is not None:
            self.data_plane.close()
        with self._lock:
            boxes, self._inboxes = list(self._inboxes.values()), {}
        for box in boxes:
            box.close()

    def inbox(self, key: Key) -> Inbox:
        """The inbox for ``key``, created if needed. Older exchanges of the same job are dropped,
        and those of other jobs once they are older than any exchange can last."""
        now = time.monotonic()
        with self._lock:
            for k, old in list(self._inboxes.items()):
                if k != key and ((k[0] == key[0] and k[1:] < key[1:]) or now - old.created > STALE_INBOX_S):
                    self._inboxes.pop(k).close()
            if key not in self._inboxes:
                self._inboxes[key] = Inbox(key)
            return self._inboxes[key]

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
        box = self.inbox(key)
        with self._lock:
            if box.closed.is_set() or box.conn is not None or self._inboxes.get(key) is not box:
                return False
            box.conn, box.sender, box.shm = conn, sender, shm
        box.arrived.set()
        return True

    def OpenDataPlane(self, request: exchange_pb2.OpenDataPlaneRequest, context: grpc.ServicerContext) -> exchange_pb2.OpenDataPlaneResponse:
        """Issues a port and single-use token for a TCP stream of one all-reduce."""
        if self.data_plane is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this peer serves no TCP data plane (started with --no-tcp)")
        assert self.data_plane is not None
        if not request.job_id or not request.sender_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id and sender_id are required")
        slots = None
        if request.shm_slot_bytes and shm.available():
            try:
                slots = SharedSlots.create(min(request.shm_slot_bytes, shm.MAX_SLOT_BYTES))
            except OSError as e:
                log.info("no shared-memory slots for %s: %s", request.sender_id, e)
        token = self.data_plane.offer((request.job_id, request.round, request.epoch), request.sender_id, slots)
        if slots is None:
            return exchange_pb2.OpenDataPlaneResponse(port=self.data_plane.port, token=token)
        return exchange_pb2.OpenDataPlaneResponse(port=self.data_plane.port, token=token, shm_path=str(slots.path),
                                                  shm_nonce=slots.nonce, shm_slot_bytes=slots.slot_bytes)

    def PushChunks(self, request_iterator: Iterator[exchange_pb2.TensorChunk], context: grpc.ServicerContext) -> exchange_pb2.PushChunksResponse:
        """The protobuf form of the exchange (portable; the ring itself uses :meth:`push_frames`)."""
        first = next(request_iterator, None)
        if first is None:
            return exchange_pb2.PushChunksResponse(chunks=0)

        def frames() -> Iterator[Frame]:
            for msg in _chain(first, request_iterator):
                codec = msg.codec or 1
                count = msg.count if msg.count or codec != 1 else len(msg.data) // 4
                header = Header(int(msg.phase), codec, msg.step, msg.offset_elems, count)
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
        box = self.inbox(key)
        box.sender = sender
        n = 0
        try:
            for frame in frames:
                deadline = time.monotonic() + self._recv_timeout_s
                while not box.closed.is_set():
                    try:
                        box.q.put(frame, timeout=POLL_S)
                        box.arrived.set()
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
            box.arrived.set()
        except queue.Full:
            pass

    def Gossip(self, request_iterator: Iterator[exchange_pb2.GossipMessage], context: grpc.ServicerContext) -> Iterator[exchange_pb2.GossipMessage]:
        """One pairwise gossip exchange, served by the peer's :class:`peer.gossip.GossipNode`."""
        node = self.gossip
        if node is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this peer does not gossip")
            return
        yield from node.serve(request_iterator, context)

    def FetchParameters(self, request: exchange_pb2.FetchParametersRequest, context: grpc.ServicerContext) -> Iterator[exchange_pb2.ParameterChunk]:
        got = self._params_source(request.job_id, request.round)
        if got is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no committed parameters for job {request.job_id} round {request.round or 'latest'}")
        assert got is not None
        rnd, digest, data = got
        for i in range(0, max(len(data), 1), CHUNK_BYTES):
            yield exchange_pb2.ParameterChunk(round=rnd if i == 0 else 0, digest=digest if i == 0 else "",
                                              data=bytes(data[i : i + CHUNK_BYTES]))


def _close_socket(sock: socket.socket) -> None:
    """Shuts a socket down (waking any thread blocked on it) and closes it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _GrpcSender:
    """Frames to the successor over the raw gRPC method: one client stream per all-reduce."""

    kind = "grpc"

    def __init__(self, channel: grpc.Channel, key: Key, self_id: str, succ_id: str, deadline_s: float) -> None:
        self._succ_id = succ_id
        self._out: queue.Queue[bytes | None] = queue.Queue()
        push = channel.stream_unary(FRAMES_METHOD, request_serializer=None,
                                    response_deserializer=exchange_pb2.PushChunksResponse.FromString)
        job, rnd, epoch = key
        md = (("dml-job", job), ("dml-round", str(rnd)), ("dml-epoch", str(epoch)), ("dml-sender", self_id))
        self.error = ""
        self._done = threading.Event()
        self._seq = 0
        self._call = push.future(self._requests(), timeout=deadline_s, metadata=md)
        self._call.add_done_callback(self._on_done)

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
                self.error = f"stream to {self._succ_id} failed: {code} {details}"
        self._done.set()

    def send(self, header: Header, payload: np.ndarray) -> int:
        # One copy: the payload goes straight from the caller's buffer into the message, so the
        # frame counts as sent at once.
        self._out.put(b"".join((header.pack(), payload.data)))
        self._seq += 1
        return self._seq

    def wait_sent(self, seq: int, timeout: float, abort: threading.Event) -> None:
        """Frames are copied when queued."""

    def sent_upto(self) -> int:
        return self._seq

    def finish(self, timeout: float, abort: threading.Event) -> None:
        self._out.put(None)
        deadline = time.monotonic() + timeout
        while not self._done.wait(POLL_S):
            if abort.is_set():
                raise ExchangeError(ABORTED)
            if time.monotonic() > deadline:
                raise ExchangeError(f"{self._succ_id} did not acknowledge in time", suspect=self._succ_id)
        if self.error:
            raise ExchangeError(self.error, suspect=self._succ_id)

    def cancel(self) -> None:
        if not self._call.done():
            self._out.put(None)
            self._call.cancel()


class _TcpSender:
    """Frames to the successor over an authenticated TCP stream, written by a sender thread with
    ``sendmsg`` straight from the caller's buffers (zero copies in user space)."""

    kind = "tcp"

    def __init__(self, sock: socket.socket, succ_id: str, idle_s: float) -> None:
        self._sock = sock
        self._succ_id = succ_id
        self._idle_s = idle_s
        sock.settimeout(idle_s)  # a successor that stops reading for this long is dead
        self._out: queue.Queue[tuple[bytes, np.ndarray, int] | None] = queue.Queue()
        self._cond = threading.Condition()
        self._sent = 0
        self._seq = 0
        self.error = ""
        self._thread = threading.Thread(target=self._loop, name=f"send-{succ_id}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._out.get()
            if item is None:
                return
            header, payload, seq = item
            try:
                self._write(header, payload.data.cast("B"))
            except (OSError, ValueError) as e:
                with self._cond:
                    self.error = f"stream to {self._succ_id} failed: {e!r}"
                    self._cond.notify_all()
                return
            with self._cond:
                self._sent = seq
                self._cond.notify_all()

    def _write(self, header: bytes, payload: memoryview) -> None:
        """Puts one frame on its way (called on the sender thread, in order)."""
        _sendmsg_all(self._sock, header, payload)

    def send(self, header: Header, payload: np.ndarray) -> int:
        self._seq += 1
        self._out.put((header.pack(), payload, self._seq))
        return self._seq

    def wait_sent(self, seq: int, timeout: float, abort: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._sent < seq:
                if self.error:
                    raise ExchangeError(self.error, suspect=self._succ_id)
                if abort.is_set():
                    raise ExchangeError(ABORTED)
                if time.monotonic() > deadline:
                    raise ExchangeError(f"sending to {self._succ_id} made no progress in time", suspect=self._succ_id)
                self._cond.wait(POLL_S)

    def sent_upto(self) -> int:
        return self._sent

    def finish(self, timeout: float, abort: threading.Event) -> None:
        """Waits for every frame to leave, then for the successor's one-byte acknowledgement."""
        self._out.put(None)
        self.wait_sent(self._seq, timeout, abort)
        deadline = time.monotonic() + timeout
        self._sock.settimeout(POLL_S)
        while True:
            try:
                got = self._sock.recv(64)
            except TimeoutError:
                if abort.is_set():
                    raise ExchangeError(ABORTED) from None
                if time.monotonic() > deadline:
                    raise ExchangeError(f"{self._succ_id} did not acknowledge in time", suspect=self._succ_id) from None
                continue
            except OSError as e:
                raise ExchangeError(f"stream to {self._succ_id} failed: {e!r}", suspect=self._succ_id) from None
            if not got:
                raise ExchangeError(f"{self._succ_id} closed the stream without acknowledging", suspect=self._succ_id)
            if self._acknowledged(got):
                return

    def _acknowledged(self, got: bytes) -> bool:
        """Whether ``got`` (bytes from the successor after the last frame) is its acknowledgement."""
        if got != dataplane.ACK:
            raise ExchangeError(f"{self._succ_id} closed the stream without acknowledging", suspect=self._succ_id)
        return True

    def cancel(self) -> None:
        self._out.put(None)
        _close_socket(self._sock)


class _ShmSender(_TcpSender):
    """Frames to a successor on this host: each payload is copied into a shared-memory slot and
    only its header goes on the TCP stream; the successor returns one credit byte per slot it
    has read, and a slot is written again only after its credit (so at most ``shm.SLOTS``
    frames are in flight). Everything else, failures and the closing acknowledgement included,
    is the TCP sender's."""

    kind = "shm"

    def __init__(self, sock: socket.socket, slots: SharedSlots, succ_id: str, idle_s: float) -> None:
        self._slots = slots
        self._credits = shm.SLOTS  # slots free to write
        self._frame = 0
        super().__init__(sock, succ_id, idle_s)

    def _take_credit(self) -> None:
        while self._credits == 0:
            got = self._sock.recv(64)  # the socket's idle timeout bounds the wait
            if not got:
                raise ConnectionError("closed by the successor")
            if got.strip(shm.CREDIT):
                raise ConnectionError(f"unexpected bytes {got[:8]!r} from the successor")
            self._credits += len(got)

    def _write(self, header: bytes, payload: memoryview) -> None:
        self._take_credit()
        self._slots.slot(self._frame, len(payload))[:] = payload
        self._credits -= 1
        self._frame += 1
        self._sock.sendall(header)

    def _acknowledged(self, got: bytes) -> bool:
        rest = got.lstrip(shm.CREDIT)  # credits for the last slots may precede the acknowledgement
        if not rest:
            return False
        if rest[:1] != dataplane.ACK:
            raise ExchangeError(f"{self._succ_id} closed the stream without acknowledging", suspect=self._succ_id)
        return True


def _sendmsg_all(sock: socket.socket, header: bytes, payload: memoryview) -> None:
    """Writes header then payload with as few system calls as the kernel allows."""
    sent = sock.sendmsg([header, payload])
    if sent < len(header):
        sock.sendall(memoryview(header)[sent:])
        sent = len(header)
    if sent - len(header) < len(payload):
        sock.sendall(payload[sent - len(header):])


class PeerLink:
    """A ring member's link: frames to the successor over TCP or gRPC, frames from the
    predecessor from the inbox (whichever way the predecessor chose to send them).

    ``data_plane`` is the job's choice: "tcp" streams over the fast data plane or fails, "grpc"
    uses the raw gRPC method, "auto" tries TCP and falls back to gRPC when the successor offers
    no data plane or its port cannot be reached. ``abort`` is an event the owner sets when the
    round is cancelled (membership changed); a waiting call then fails promptly.
    """

    def __init__(self, servicer: ExchangeServicer, key: Key, self_id: str, pred_id: str,
                 succ_id: str, succ_address: str, deadline_s: float, abort: threading.Event,
                 idle_timeout_s: float = 30.0, data_plane: str = "auto", payload_bytes: int = 0) -> None:
        if data_plane not in DATA_PLANES:
            raise ValueError(f"unknown data plane {data_plane!r}")
        # "auto" asks for shared memory only where it pays: it costs a fixed ~2 ms per
        # all-reduce (measured at 1 MB, N=2: 4.9 ms against TCP's 2.8) and saves a fifth of the
        # time at 64 MB, N=4. payload_bytes: the buffer's size, 0 when not known yet.
        self._want_shm = data_plane == "shm" or (data_plane == "auto" and payload_bytes >= SHM_MIN_BYTES)
        self._key = key
        self._self_id, self._pred_id, self._succ_id = self_id, pred_id, succ_id
        self._succ_address = succ_address
        self._inbox = servicer.inbox(key)
        self._servicer = servicer
        self._abort = abort
        self.bytes_sent = 0  # frames queued for the successor, headers included
        self._deadline_s = deadline_s
        self._idle_s = idle_timeout_s
        self._mode = data_plane
        self._channel = rpc.channel(succ_address, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES)
        self._sender: _GrpcSender | _TcpSender | None = None
        self._opening: threading.Thread | None = None
        self._open_error: BaseException | None = None
        self._pending: memoryview | None = None  # payload of the last gRPC frame read
        self._hdr = bytearray(FRAME.size)
        self._frames = 0  # frames read from shared-memory slots

    @property
    def sender_kind(self) -> str:
        """How frames go to the successor: "shm", "tcp", "grpc", or "" before the first send."""
        return self._sender.kind if self._sender else ""

    @property
    def receiver_kind(self) -> str:
        """How frames come from the predecessor: "shm", "tcp", "grpc", or "" before the first one."""
        if not self._inbox.arrived.is_set():
            return ""
        if self._inbox.conn is None:
            return "grpc"
        return "shm" if self._inbox.shm is not None else "tcp"

    # -- sending ------------------------------------------------------------------------------
    def _open(self) -> _GrpcSender | _TcpSender:
        if self._mode != "grpc":
            try:
                return self._open_tcp()  # ExchangeError (successor unreachable) propagates: no fallback
            except (grpc.RpcError, OSError, ValueError) as e:
                if self._mode in ("tcp", "shm"):
                    raise ExchangeError(f"cannot open a TCP stream to {self._succ_id}: {_describe(e)}",
                                        suspect=self._succ_id) from None
                log.info("exchange %s: no TCP stream to %s (%s); using gRPC", self._key, self._succ_id, _describe(e))
        return _GrpcSender(self._channel, self._key, self._self_id, self._succ_id, self._deadline_s)

    def open_early(self) -> None:
        """Negotiates the outgoing stream in the background (peers call this before training,
        so the round trip and connect overlap local work); the first send waits for it and
        raises whatever it raised."""
        if self._opening is None and self._sender is None:
            def run() -> None:
                try:
                    self._sender = self._open()
                except BaseException as e:  # noqa: BLE001 - re-raised by the first send
                    self._open_error = e

            self._opening = threading.Thread(target=run, name=f"open-{self._succ_id}", daemon=True)
            self._opening.start()

    def _await_open(self) -> None:
        if self._opening is None:
            return
        deadline = time.monotonic() + 2 * OPEN_TIMEOUT_S + 1.0  # the RPC and the connect, each bounded
        while self._opening.is_alive():
            if self._abort.is_set():
                raise ExchangeError(ABORTED)
            if time.monotonic() > deadline:
                raise ExchangeError(f"opening a stream to {self._succ_id} did not finish", suspect=self._succ_id)
            self._opening.join(POLL_S)
        self._opening = None
        if self._open_error is not None:
            err, self._open_error = self._open_error, None
            raise err

    def _open_tcp(self) -> _TcpSender:
        if self._abort.is_set():
            raise ExchangeError(ABORTED)
        job, rnd, epoch = self._key
        stub = exchange_pb2_grpc.PeerExchangeStub(self._channel)
        timeout = min(OPEN_TIMEOUT_S, self._idle_s)
        try:
            offer = stub.OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(
                job_id=job, round=rnd, epoch=epoch, sender_id=self._self_id,
                shm_slot_bytes=SHM_SLOT_BYTES if self._want_shm else 0), timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                raise  # no data plane there: "auto" falls back
            # Unreachable or broken: the same failure the gRPC path would hit, named.
            raise ExchangeError(f"cannot reach {self._succ_id}: {_describe(e)}", suspect=self._succ_id) from None
        if self._abort.is_set():
            raise ExchangeError(ABORTED)
        host, _ = dataplane.split_host_port(self._succ_address)
        slots = None
        if offer.shm_path:  # offered only when we asked: a successor on this host can take them
            try:
                slots = SharedSlots.attach(offer.shm_path, offer.shm_nonce, offer.shm_slot_bytes)
            except (OSError, ValueError) as e:
                log.info("exchange %s: %s's shared memory is not ours to map (%s); streaming over TCP",
                         self._key, self._succ_id, e)
        if self._mode == "shm" and slots is None:
            raise ExchangeError(f"{self._succ_id} offered no shared memory this peer can map "
                                f"(data plane 'shm' needs both on one host)", suspect=self._succ_id)
        sock = dataplane.connect(host, offer.port, offer.token, timeout, shm=slots is not None)
        if slots is not None:
            return _ShmSender(sock, slots, self._succ_id, self._idle_s)
        return _TcpSender(sock, self._succ_id, self._idle_s)

    def send(self, header: Header, payload: np.ndarray) -> int:
        """Queues a frame for the successor; see :class:`aggregation.transport.RingLink`."""
        if self._sender is None:
            self._await_open()
        if self._sender is None:
            self._sender = self._open()
        if self._sender.error:
            raise ExchangeError(self._sender.error, suspect=self._succ_id)
        seq = self._sender.send(header, payload)
        self.bytes_sent += FRAME.size + payload.nbytes
        return seq

    def wait_sent(self, seq: int, timeout: float) -> None:
        """Blocks until frame ``seq`` has left (its payload may then be reused)."""
        if self._sender is not None:
            self._sender.wait_sent(seq, min(timeout, self._idle_s), self._abort)

    def sent_upto(self) -> int:
        """The highest frame number that has left (frames leave in order)."""
        return self._sender.sent_upto() if self._sender is not None else 0

    # -- receiving ----------------------------------------------------------------------------
    def _check(self, deadline: float, waited: float) -> None:
        if self._abort.is_set():
            raise ExchangeError(ABORTED)
        if self._sender is not None and self._sender.error:
            raise ExchangeError(self._sender.error, suspect=self._succ_id)
        if self._inbox.closed.is_set():
            raise ExchangeError("exchange superseded by a newer round")
        if time.monotonic() >= deadline:
            raise ExchangeError(f"no data from {self._pred_id} for {waited:.1f}s", suspect=self._pred_id)

    def _recv_exact(self, conn: socket.socket, view: memoryview, timeout: float) -> None:
        waited = min(timeout, self._idle_s)
        deadline = time.monotonic() + waited
        got = 0
        while got < len(view):
            try:
                n = conn.recv_into(view[got:])
            except TimeoutError:
                self._check(deadline, waited)
                continue
            except OSError as e:
                self._check(time.monotonic() + 1.0, waited)
                raise ExchangeError(f"stream from {self._pred_id} broke: {e!r}", suspect=self._pred_id) from None
            if n == 0:
                self._check(time.monotonic() + 1.0, waited)
                raise ExchangeError(f"stream from {self._pred_id} closed early", suspect=self._pred_id)
            got += n
            deadline = time.monotonic() + waited  # progress-based: a slow ring is not a dead one

    def recv_header(self, timeout: float) -> Header:
        """Header of the next frame from the predecessor; fails fast on abort or a broken
        stream, and after ``idle_timeout_s`` without data."""
        waited = min(timeout, self._idle_s)
        deadline = time.monotonic() + waited
        box = self._inbox
        while not box.arrived.is_set():
            self._check(deadline, waited)
            box.arrived.wait(POLL_S)
        if box.conn is not None:
            if box.conn.gettimeout() != POLL_S:
                box.conn.settimeout(POLL_S)
            self._recv_exact(box.conn, memoryview(self._hdr), timeout)
            return Header.unpack(self._hdr)
        while True:
            self._check(deadline, waited)
            try:
                item = box.q.get(timeout=min(POLL_S, max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                continue
            if isinstance(item, _Broken):
                raise ExchangeError(item.reason, suspect=self._pred_id)
            header, self._pending = item
            return header

    def recv_payload(self, out: np.ndarray, timeout: float) -> None:
        """Reads the last header's payload into ``out`` (straight from the socket on TCP)."""
        view = out.data.cast("B")
        box = self._inbox
        if box.shm is not None and box.conn is not None:
            try:
                view[:] = box.shm.slot(self._frames, len(view))
                box.conn.sendall(shm.CREDIT)  # the slot may be written again
            except ValueError as e:
                raise ExchangeError(f"frame from {self._pred_id} does not fit its slot: {e}", suspect=self._pred_id) from None
            except OSError as e:
                self._check(time.monotonic() + 1.0, timeout)
                raise ExchangeError(f"stream from {self._pred_id} broke: {e!r}", suspect=self._pred_id) from None
            self._frames += 1
            return
        if box.conn is not None:
            self._recv_exact(box.conn, view, timeout)
            return
        if self._pending is None or len(self._pending) != len(view):
            raise ExchangeError(f"payload of {0 if self._pending is None else len(self._pending)} bytes, "
                                f"expected {len(view)}", suspect=self._pred_id)
        view[:] = self._pending
        self._pending = None

    # -- the end ------------------------------------------------------------------------------
    def close(self, timeout: float) -> None:
        """Acknowledges the predecessor's stream, then waits for every frame to reach the
        successor (and, on TCP, for its acknowledgement)."""
        conn = self._inbox.conn
        try:
            if conn is not None:  # first, or every member would wait on its successor in a cycle
                try:
                    conn.sendall(dataplane.ACK)
                except OSError as e:
                    raise ExchangeError(f"stream from {self._pred_id} broke: {e!r}", suspect=self._pred_id) from None
            if self._sender is not None:
                self._sender.finish(timeout, self._abort)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Cancels the outgoing stream if still open and frees the inbox and channel."""
        if self._opening is not None:
            self._opening.join(2 * OPEN_TIMEOUT_S + 1.0)  # bounded: it must not outlive the link
        if self._sender is not None:
            self._sender.cancel()
        self._servicer.release(self._key)
        self._channel.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.Call):
        return f"{e.code()} {e.details()}"
    return repr(e)


def _chain(first: exchange_pb2.TensorChunk, rest: Iterable[exchange_pb2.TensorChunk]) -> Iterator[exchange_pb2.TensorChunk]:
    yield first
    yield from rest


def add_exchange_to_server(servicer: ExchangeServicer, server: grpc.Server) -> None:
    """Serves both forms of the exchange (protobuf PeerExchange and raw frames) on ``server``."""
    exchange_pb2_grpc.add_PeerExchangeServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((servicer.frames_handler(),))
