"""PeerLink: a ring member's link for one all-reduce, frames to the successor through a sender
and frames from the predecessor out of this peer's inbox (the all-reduce's RingLink)."""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
from dml.v1 import exchange_pb2, exchange_pb2_grpc

from dml.aggregation.allreduce import MAX_CHUNK_ELEMS, TCP_CHUNK_ELEMS
from dml.aggregation.transport import FRAME, Cancelled, ExchangeError, Header
from dml.common import rpc
from dml.common.tls import TlsConfig
from dml.peer import dataplane, shm
from dml.peer.auth import OPEN_DATA_PLANE, PeerCredentials
from dml.peer.exchange import FRAMES_METHOD, ExchangeServicer
from dml.peer.inbox import POLL_S, Broken, Key
from dml.peer.kept import ChannelKey, KeptChannel, SenderKey
from dml.peer.senders import ABORTED, GrpcSender, ShmSender, TcpSender
from dml.peer.shm import SharedSlots
from dml.peer.watch import WATCH_METHOD, SuccessorWatch

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 5.0
DATA_PLANES = ("auto", "shm", "tcp", "grpc")
SLOT_SLACK = 64  # a shared-memory slot holds a chunk's float32 payload plus room for a codec's scale
SHM_MIN_BYTES = 8 << 20  # "auto" uses shared memory from this buffer size on
SUPERSEDED = "exchange superseded by a newer round"


class PeerLink:
    """A ring member's link: frames to the successor over TCP or gRPC, frames from the
    predecessor from the inbox (whichever way the predecessor chose to send them).

    ``data_plane`` is the job's choice: "tcp" streams over the fast data plane or fails, "grpc"
    uses the raw gRPC method, "auto" tries TCP and falls back to gRPC when the successor offers
    no data plane or its port cannot be reached. ``abort`` is an event the owner sets when the
    round is cancelled (membership changed); a waiting call then fails promptly.

    Once the outgoing stream is open the link watches the successor (:mod:`peer.watch`): if it
    goes away, a waiting call fails naming it even when no stream of this link has broken.
    ``keep_watch``, if given, takes that watch over once this member's part of the exchange is
    done; otherwise the link closes it. The gRPC channel to the successor is kept for the next
    round of the epoch after a clean end (:mod:`peer.kept`), with the kept watch as its probe,
    and closed after a failure. ``tls`` (the peer's config) puts the gRPC channel and the TCP
    stream to the successor inside TLS.
    """

    def __init__(self, servicer: ExchangeServicer, key: Key, self_id: str, pred_id: str,
                 succ_id: str, succ_address: str, deadline_s: float, abort: threading.Event,
                 idle_timeout_s: float = 30.0, data_plane: str = "auto", payload_bytes: int = 0,
                 keep_watch: Callable[[SuccessorWatch], None] | None = None, injected_fault: str = "",
                 credentials: PeerCredentials | None = None, tls: TlsConfig | None = None,
                 chunk_elems: int = TCP_CHUNK_ELEMS) -> None:
        if data_plane not in DATA_PLANES:
            raise ValueError(f"unknown data plane {data_plane!r}")
        if not 0 < chunk_elems <= MAX_CHUNK_ELEMS:
            raise ValueError(f"chunk_elems must be 1..{MAX_CHUNK_ELEMS}, got {chunk_elems}")
        # Shared-memory slots sized for the chunks this link carries (a frame never exceeds
        # one): each stream maps SLOTS of them on both sides, memory every round holds.
        self._slot_bytes = 4 * chunk_elems + SLOT_SLACK
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
        self.bytes_received = 0  # frames read from the predecessor, headers included
        self._deadline_s = deadline_s
        self._idle_s = idle_timeout_s
        self._mode = data_plane
        self._injected_fault = injected_fault  # tests only: fail to reach the successor, saying this
        self._creds = credentials  # signs our calls to the successor (None: unsigned)
        self._tls = tls
        # The channel the last clean round of this epoch left to the same successor, else a new one.
        kept = servicer.kept_channels.take(self._channel_key())
        self._channel: grpc.Channel = (kept.channel if isinstance(kept, KeptChannel) else
                                       rpc.channel(succ_address, tls=tls, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES))
        self.channel_reused = isinstance(kept, KeptChannel)
        # The last round's watch, on that channel until the round loop ends it (closed before the
        # channel, where this link closes it: see peer.watch).
        self._prev_watch = kept.watch if isinstance(kept, KeptChannel) else None
        self._channel_kept = False  # handed back to the servicer's cache (then not ours to close)
        self._sender: GrpcSender | TcpSender | None = None
        self._watch: SuccessorWatch | None = None
        self._keep_watch = keep_watch
        self._watch_kept = False
        self._opening: threading.Thread | None = None
        self._open_error: BaseException | None = None
        self._pending: memoryview | None = None  # payload of the last gRPC frame read
        self._conn: socket.socket | None = None  # the predecessor's TCP stream, once claimed (ours to close)
        self._hdr = bytearray(FRAME.size)
        self._frames = 0  # frames read from shared-memory slots
        self._recv_kind = ""  # how frames came from the predecessor, once they did
        self._sent_kind = ""  # how frames went to the successor, once its sender was kept
        self._slot_out = -1  # bytes of a payload read in place in its slot (credit owed); -1: none

    @property
    def sender_kind(self) -> str:
        """How frames go to the successor: "shm", "tcp", "grpc", or "" before the first send."""
        return self._sender.kind if self._sender else self._sent_kind

    @property
    def receiver_kind(self) -> str:
        """How frames come from the predecessor: "shm", "tcp", "grpc", or "" before the first one."""
        if self._recv_kind:
            return self._recv_kind
        if not self._inbox.arrived.is_set():
            return ""
        if self._inbox.conn is None:
            return "grpc"
        return "shm" if self._inbox.shm is not None else "tcp"

    # -- sending ------------------------------------------------------------------------------
    def _signed(self, method: str) -> list[tuple[str, str | bytes]]:
        """The signature metadata of a call to the successor for this link's exchange."""
        if self._creds is None:
            return []
        job, rnd, epoch = self._key
        return self._creds.sign(method, job, epoch, str(rnd), self._succ_id)

    def _open(self) -> GrpcSender | TcpSender:
        sender = self._open_sender()
        # The channel is the link's (or the cache's once kept), never the watch's: a kept watch
        # only cancels its call, and the channel may carry the next round.
        self._watch = SuccessorWatch(self._channel, self._key, self._succ_id, self._signed(WATCH_METHOD),
                                     owns_channel=False)
        return sender

    def _open_sender(self) -> GrpcSender | TcpSender:
        if self._injected_fault:
            raise ExchangeError(f"cannot reach {self._succ_id} at {self._succ_address}: {self._injected_fault}",
                                suspect=self._succ_id)
        if self._mode != "grpc":
            kept = self._take_kept()
            if kept is not None:
                return kept
            try:
                return self._open_tcp()  # ExchangeError (successor unreachable) propagates: no fallback
            except (grpc.RpcError, OSError, ValueError) as e:
                if self._mode in ("tcp", "shm"):
                    raise ExchangeError(f"cannot open a TCP stream to {self._succ_id}: {_describe(e)}",
                                        suspect=self._succ_id) from None
                log.info("exchange %s: no TCP stream to %s (%s); using gRPC", self._key, self._succ_id, _describe(e))
        return GrpcSender(self._channel, self._key, self._self_id, self._succ_id, self._deadline_s,
                          self._signed(FRAMES_METHOD))

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

    def _kept_key(self) -> SenderKey:
        job, _, epoch = self._key
        return job, epoch, self._succ_id, self._succ_address, self._want_shm

    def _channel_key(self) -> ChannelKey:
        job, _, epoch = self._key
        return job, epoch, self._succ_id, self._succ_address

    def _take_kept(self) -> TcpSender | None:
        """The stream the last round of this epoch to the same successor ended cleanly on, its
        round preamble written (None: there is none, or it is no longer usable)."""
        sender = self._servicer.kept_senders.take(self._kept_key())
        if not isinstance(sender, TcpSender):
            return None
        job, rnd, epoch = self._key
        try:
            sender.begin(rnd, epoch)
        except (OSError, RuntimeError) as e:
            log.info("exchange %s: the kept stream to %s is unusable (%r); opening a new one", self._key, self._succ_id, e)
            sender.cancel()
            return None
        log.debug("exchange %s: reusing the kept %s stream to %s", self._key, sender.kind, self._succ_id)
        return sender

    def _open_tcp(self) -> TcpSender:
        if self._abort.is_set():
            raise ExchangeError(ABORTED)
        job, rnd, epoch = self._key
        stub = exchange_pb2_grpc.PeerExchangeStub(self._channel)
        timeout = min(OPEN_TIMEOUT_S, self._idle_s)
        try:
            offer = stub.OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(
                job_id=job, round=rnd, epoch=epoch, sender_id=self._self_id,
                shm_slot_bytes=self._slot_bytes if self._want_shm else 0), timeout=timeout,
                metadata=self._signed(OPEN_DATA_PLANE))
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
        sock = dataplane.connect(host, offer.port, offer.token, timeout, shm=slots is not None, tls=self._tls)
        if slots is not None:
            return ShmSender(sock, slots, self._succ_id, self._idle_s)
        return TcpSender(sock, self._succ_id, self._idle_s)

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
            raise Cancelled(ABORTED)
        if self._sender is not None and self._sender.error:
            raise ExchangeError(self._sender.error, suspect=self._succ_id)
        if self._watch is not None and self._watch.lost:
            raise ExchangeError(self._watch.lost, suspect=self._succ_id)
        if self._inbox.closed.is_set():  # dropped by us (a newer round's inbox opened): no one's fault
            raise Cancelled(self._inbox.dropped or SUPERSEDED)
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

    def _stream(self) -> socket.socket | None:
        """The predecessor's TCP stream (None while frames come over gRPC), claimed from the
        inbox on first use so that from then on only this link closes it (another thread
        dropping the inbox just shuts it down, waking us). Cancelled if the inbox was dropped."""
        if self._conn is None and self._inbox.conn is not None:
            conn = self._inbox.take_stream()
            if conn is None:
                raise Cancelled(SUPERSEDED)
            conn.settimeout(POLL_S)
            self._conn = conn
            self._recv_kind = "shm" if self._inbox.shm is not None else "tcp"
        return self._conn

    def recv_header(self, timeout: float) -> Header:
        """Header of the next frame from the predecessor; fails fast on abort or a broken
        stream, and after ``idle_timeout_s`` without data."""
        waited = min(timeout, self._idle_s)
        deadline = time.monotonic() + waited
        box = self._inbox
        while not box.arrived.is_set():
            self._check(deadline, waited)
            box.arrived.wait(POLL_S)
        conn = self._stream()
        if conn is not None:
            self._recv_exact(conn, memoryview(self._hdr), timeout)
            self.bytes_received += FRAME.size
            return Header.unpack(self._hdr)
        while True:
            self._check(deadline, waited)
            try:
                item = box.q.get(timeout=min(POLL_S, max(deadline - time.monotonic(), 0.001)))
            except queue.Empty:
                continue
            if isinstance(item, Broken):
                raise ExchangeError(item.reason, suspect=self._pred_id)
            header, self._pending = item
            self.bytes_received += FRAME.size
            return header

    def recv_payload(self, out: np.ndarray, timeout: float) -> None:
        """Reads the last header's payload into ``out`` (straight from the socket on TCP)."""
        view = out.data.cast("B")
        box = self._inbox
        conn = self._stream()
        if box.shm is not None and conn is not None:
            try:
                view[:] = box.shm.slot(self._frames, len(view))
                conn.sendall(shm.CREDIT)  # the slot may be written again
            except ValueError as e:
                raise ExchangeError(f"frame from {self._pred_id} does not fit its slot: {e}", suspect=self._pred_id) from None
            except OSError as e:
                self._check(time.monotonic() + 1.0, timeout)
                raise ExchangeError(f"stream from {self._pred_id} broke: {e!r}", suspect=self._pred_id) from None
            self._frames += 1
            self.bytes_received += len(view)
            return
        if conn is not None:
            self._recv_exact(conn, view, timeout)
            self.bytes_received += len(view)
            return
        if self._pending is None or len(self._pending) != len(view):
            raise ExchangeError(f"payload of {0 if self._pending is None else len(self._pending)} bytes, "
                                f"expected {len(view)}", suspect=self._pred_id)
        view[:] = self._pending
        self._pending = None
        self.bytes_received += len(view)

    def recv_slot(self, nbytes: int, timeout: float) -> memoryview | None:
        """The last header's payload in place in its shared-memory slot, to reduce straight
        from (one copy fewer); :meth:`release_slot` once done with it. None when the payload is
        not in a slot (TCP, gRPC): read it with :meth:`recv_payload` then."""
        box = self._inbox
        conn = self._stream()
        if box.shm is None or conn is None:
            return None
        try:
            view = box.shm.slot(self._frames, nbytes)
        except ValueError as e:
            raise ExchangeError(f"frame from {self._pred_id} does not fit its slot: {e}", suspect=self._pred_id) from None
        self._slot_out = nbytes
        return view

    def release_slot(self) -> None:
        """Gives the slot :meth:`recv_slot` lent back to the predecessor (its credit)."""
        nbytes, self._slot_out = self._slot_out, -1
        if nbytes < 0:
            return
        conn = self._conn
        assert conn is not None
        try:
            conn.sendall(shm.CREDIT)
        except OSError as e:
            self._check(time.monotonic() + 1.0, self._idle_s)
            raise ExchangeError(f"stream from {self._pred_id} broke: {e!r}", suspect=self._pred_id) from None
        self._frames += 1
        self.bytes_received += nbytes

    # -- the end ------------------------------------------------------------------------------
    def close(self, timeout: float) -> None:
        """Acknowledges the predecessor's stream, then waits for every frame to reach the
        successor (and, on TCP, for its acknowledgement)."""
        try:
            conn = self._stream()
            if conn is not None:  # first, or every member would wait on its successor in a cycle
                try:
                    conn.sendall(dataplane.ACK)
                except OSError as e:
                    raise ExchangeError(f"stream from {self._pred_id} broke: {e!r}", suspect=self._pred_id) from None
            if self._sender is not None:
                self._sender.finish(timeout, self._abort)
            kept_watch = None
            if self._keep_watch is not None and self._watch is not None:  # our part is done
                self._keep_watch(self._watch)
                self._watch_kept = True
                kept_watch = self._watch
            # The channel stays for the next round, the kept watch on it as its probe.
            self._servicer.kept_channels.put(self._channel_key(), KeptChannel(self._channel, kept_watch))
            self._channel_kept = True
            self._keep_streams()
        finally:
            self.shutdown()

    def _keep_streams(self) -> None:
        """After a clean end: the predecessor's stream back to the data plane and our sender to
        the servicer's cache, for the next round of this epoch (:mod:`peer.kept`)."""
        plane = self._servicer.data_plane
        if self._conn is not None and plane is not None:
            got = self._inbox.detach_stream()
            if got is not None:
                conn, slots = got
                self._conn = None
                if not plane.keep(conn, self._key, self._inbox.sender, slots):
                    if slots is not None:
                        slots.close()
                    dataplane.close_socket(conn)
        sender = self._sender
        if isinstance(sender, TcpSender) and sender.reusable():
            self._sender, self._sent_kind = None, sender.kind
            self._servicer.kept_senders.put(self._kept_key(), sender)

    def shutdown(self) -> None:
        """Cancels the outgoing stream if still open and frees the inbox, the watch (unless kept)
        and the channel (unless kept for the next round)."""
        if self._opening is not None:
            self._opening.join(2 * OPEN_TIMEOUT_S + 1.0)  # bounded: it must not outlive the link
        if self._sender is not None:
            self._sender.cancel()
        self._inbox.close(reader=True)  # our stream, if we claimed it: closed here, by its reader
        self._servicer.release(self._key)
        if not self._watch_kept and self._watch is not None:
            self._watch.close()
        if not self._channel_kept:
            if self._prev_watch is not None:
                self._prev_watch.close()
            self._channel.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.Call):
        return f"{e.code()} {e.details()}"
    return repr(e)
