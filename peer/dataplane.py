"""The fast data plane: plain TCP streams between ring neighbours, negotiated over gRPC.

A gRPC stream tops out near 1.65 GB/s here and costs a copy per chunk each way; a TCP socket moves
about 4.4 GB/s, and ``sendmsg`` / ``recv_into`` move bytes straight between the flat parameter
buffer and the kernel. So for each all-reduce the sender asks its successor over gRPC
(``OpenDataPlane``) for a port and a single-use token, connects, presents the token, and then
writes the very frames the raw gRPC method carries. The successor binds the connection to that
all-reduce's inbox. Nothing reaches an inbox without a token its owner issued over gRPC for that
(job, round, epoch) and sender.

With TLS on (the peer's :class:`~dml.common.tls.TlsConfig`) both ends wrap the stream in TLS,
mutual when the config has a CA, as on the gRPC port; plain text is for a loopback listener only.

Failure semantics match the gRPC path: a closed or reset connection is a broken stream naming the
neighbour; progress is bounded by the exchange idle timeout; at the end the receiver
acknowledges with one byte, so a sender knows its successor got everything.

A connection is kept for the membership epoch it was opened in (issue 14: a new connection,
token and shared-memory mapping per all-reduce cost 10-20% at 64 MB). After an all-reduce that
ended without error the receiver hands the stream back (:meth:`DataPlane.keep`): it stays bound
to the (job, epoch, sender) of the token that opened it, and the sender starts each later
all-reduce on it with a *round preamble* (:data:`ROUND`: magic, round, epoch). A preamble of
another epoch, or of a round not newer than the stream's last one, closes the stream; otherwise
the stream is attached to that round's inbox exactly as a fresh connection would be. Kept
streams are closed at an epoch change of their job (:meth:`DataPlane.drop_kept`), when the peer
leaves the job or is evicted, after :data:`KEPT_IDLE_S` without a round, and on any error.
"""
from __future__ import annotations

import logging
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

from dml.common.tls import TlsConfig, check_listen
from dml.peer import shm
from dml.peer.shm import SharedSlots

log = logging.getLogger(__name__)

MAGIC = b"DMLT"
MAGIC_SHM = b"DMLS"  # the sender mapped the offered shared-memory slots: payloads go there
TOKEN_BYTES = 16
HELLO_BYTES = len(MAGIC) + TOKEN_BYTES
ACK = b"\x06"
TOKEN_TTL_S = 10.0  # a sender connects right after its OpenDataPlane; an offer unused this long is dropped
MAX_TOKENS = 64  # open offers in all
SENDER_TOKENS = 4  # open offers per sender (as it names itself); a ring needs one per all-reduce
MAX_SHM_OFFERS = 4  # open offers holding a shared-memory file (each up to 64 MiB of /dev/shm)
HANDSHAKE_S = 5.0
ROUND = struct.Struct("!4sQQ")  # a kept stream's next all-reduce: magic, round, epoch
MAGIC_ROUND = b"DMLR"
KEPT_IDLE_S = 600.0  # a kept stream no round uses for this long is closed
MAX_KEPT = 16  # kept streams in all
SENDER_KEPT = 2  # kept streams per sender (a ring needs one)
SOCKET_BUFFER_BYTES = 4 << 20

Key = tuple[str, int, int]  # (job_id, round, epoch)
Attach = Callable[[Key, str, socket.socket, "SharedSlots | None"], bool]


def round_preamble(rnd: int, epoch: int) -> bytes:
    """What a sender writes on a kept stream before the frames of round ``rnd``."""
    return ROUND.pack(MAGIC_ROUND, rnd, epoch)


class Kept:
    """A stream an all-reduce ended cleanly on, waiting (on its own thread, which alone closes
    it) for the round preamble of the next all-reduce of its (job, epoch, sender)."""

    def __init__(self, conn: socket.socket, job: str, epoch: int, sender: str, last_round: int,
                 slots: SharedSlots | None) -> None:
        self.conn, self.job, self.epoch, self.sender = conn, job, epoch, sender
        self.last_round = last_round
        self.slots = slots
        self.dropped = ""  # why it was dropped ("" while kept)
        self.thread: threading.Thread | None = None


class OfferRefused(Exception):
    """Too many data-plane offers are open (in all or for this sender): RESOURCE_EXHAUSTED."""


def tune(sock: socket.socket) -> None:
    """No Nagle delay on the last frame, and buffers that hold a few chunks."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        except OSError:  # capped by the system: the default still works
            pass


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def shutdown_socket(sock: socket.socket) -> None:
    """Shuts a socket down, waking any thread blocked on it (which then sees the stream end),
    but leaves its descriptor to whoever reads it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def stream_idle(sock: socket.socket) -> bool:
    """Whether a kept stream is still open with nothing unread: a successor that closed it (or
    sent anything between rounds) makes it unusable. Never blocks; restores no timeout (the
    caller sets its own)."""
    try:
        sock.settimeout(0.0)
        sock.recv(1)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return True  # nothing to read: open and idle (TLS may have consumed a session ticket)
    except OSError:
        return False
    return False  # the stream ended (b"") or carried bytes nobody asked for


def close_socket(sock: socket.socket) -> None:
    """Shuts a socket down (waking any thread blocked on it) and closes it. Only for a socket no
    other thread reads (see :class:`peer.inbox.Inbox`): :func:`shutdown_socket` otherwise."""
    shutdown_socket(sock)
    sock.close()


class DataPlane:
    """A TCP listener that accepts only connections holding a token it issued (inside TLS with
    ``tls``; plain text only on a loopback ``host``).

    ``attach(key, sender, sock)`` hands an authenticated connection to the exchange; it returns
    False (and the connection is closed) if nothing wants it any more.
    """

    def __init__(self, host: str, attach: Attach, tls: TlsConfig | None = None) -> None:
        check_listen(host, tls, "data plane")
        self._attach = attach
        self._tls = tls
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._tokens: dict[bytes, tuple[Key, str, float, SharedSlots | None]] = {}
        self._kept: list[Kept] = []
        self.opened = 0  # connections that presented a valid token (a new stream each)
        self.reused = 0  # rounds a kept stream carried
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"dataplane-{self.port}", daemon=True)
        self._thread.start()

    def offer(self, key: Key, sender: str, shm_slot_bytes: int = 0) -> tuple[bytes, SharedSlots | None]:
        """A fresh token for ``sender`` to stream ``key``'s frames to this peer, and, when
        ``shm_slot_bytes`` asks for them and fewer than MAX_SHM_OFFERS are open, shared-memory
        slots of that size (the token owns them until the sender connects). Raises
        :class:`OfferRefused` past MAX_TOKENS open offers, or SENDER_TOKENS for ``sender``."""
        token = secrets.token_bytes(TOKEN_BYTES)
        now = time.monotonic()
        slots = None
        with self._lock:
            dropped = self._expire_locked(now)
            try:
                if len(self._tokens) >= MAX_TOKENS:
                    raise OfferRefused(f"{MAX_TOKENS} data-plane offers are open already")
                if sum(e[1] == sender for e in self._tokens.values()) >= SENDER_TOKENS:
                    raise OfferRefused(f"sender {sender!r} has {SENDER_TOKENS} data-plane offers open already")
                if shm_slot_bytes and shm.available():
                    if sum(e[3] is not None for e in self._tokens.values()) >= MAX_SHM_OFFERS:
                        log.info("data plane %d: %d shared-memory offers open; offering %s TCP only",
                                 self.port, MAX_SHM_OFFERS, sender)
                    else:
                        try:
                            slots = SharedSlots.create(min(shm_slot_bytes, shm.MAX_SLOT_BYTES))
                        except OSError as e:
                            log.info("data plane %d: no shared-memory slots for %s: %s", self.port, sender, e)
                self._tokens[token] = (key, sender, now + TOKEN_TTL_S, slots)
            finally:
                self._close_all(dropped)
        return token, slots

    def open_offers(self) -> tuple[int, int]:
        """Offers open now: in all, and those holding a shared-memory file."""
        with self._lock:
            return len(self._tokens), sum(e[3] is not None for e in self._tokens.values())

    def expire(self, now: float | None = None) -> int:
        """Drops offers unused past their time (and their shared-memory files); returns how many."""
        with self._lock:
            dropped = self._expire_locked(time.monotonic() if now is None else now)
        self._close_all(dropped)
        return len(dropped)

    def _expire_locked(self, now: float) -> list[SharedSlots | None]:
        gone = [t for t, entry in self._tokens.items() if entry[2] < now]
        return [self._tokens.pop(t)[3] for t in gone]

    @staticmethod
    def _close_all(dropped: list[SharedSlots | None]) -> None:
        for slots in dropped:
            if slots is not None:
                slots.close()

    def forget(self, key: Key) -> None:
        """Drops the unused tokens of an exchange that ended (and their shared-memory files)."""
        with self._lock:
            gone = [t for t, entry in self._tokens.items() if entry[0] == key]
            dropped = [self._tokens.pop(t)[3] for t in gone]
        for slots in dropped:
            if slots is not None:
                slots.close()

    # -- kept streams -------------------------------------------------------------------------
    def keep(self, conn: socket.socket, key: Key, sender: str, slots: SharedSlots | None) -> bool:
        """Keeps ``conn`` (the stream of ``key``'s all-reduce from ``sender``, which ended without
        error) for the next round of the same (job, epoch). False (the caller closes it) when
        this data plane is closed or holds MAX_KEPT streams, or SENDER_KEPT of ``sender``."""
        job, rnd, epoch = key
        kept = Kept(conn, job, epoch, sender, rnd, slots)
        with self._lock:
            if self._closed.is_set() or len(self._kept) >= MAX_KEPT \
                    or sum(k.sender == sender for k in self._kept) >= SENDER_KEPT:
                return False
            self._kept.append(kept)
            kept.thread = threading.Thread(target=self._await_round, args=(kept,), name=f"kept-{sender}", daemon=True)
            kept.thread.start()
        return True

    def kept(self) -> list[tuple[str, int, str]]:
        """The kept streams: (job, epoch, sender) each."""
        with self._lock:
            return [(k.job, k.epoch, k.sender) for k in self._kept]

    def drop_kept(self, job: str | None = None, below_epoch: int | None = None, reason: str = "dropped") -> int:
        """Closes the kept streams of ``job`` (every job: None) older than ``below_epoch`` (every
        epoch: None); returns how many. Each is shut down here and closed by its own thread."""
        with self._lock:
            gone = [k for k in self._kept if (job is None or k.job == job)
                    and (below_epoch is None or k.epoch < below_epoch)]
            for k in gone:
                self._kept.remove(k)
                k.dropped = reason
        for k in gone:
            shutdown_socket(k.conn)
        return len(gone)

    def _join_kept(self, threads: list[threading.Thread], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _await_round(self, kept: Kept) -> None:
        """A kept stream's thread: reads the next round's preamble within KEPT_IDLE_S and attaches
        the stream to that round's inbox, or closes it."""
        conn = kept.conn
        buf = bytearray(ROUND.size)
        view, got = memoryview(buf), 0
        deadline = time.monotonic() + KEPT_IDLE_S
        why = ""
        try:
            conn.settimeout(0.5)
            while got < ROUND.size:
                if kept.dropped or self._closed.is_set():
                    why = kept.dropped or "data plane closed"
                    break
                if time.monotonic() > deadline:
                    why = f"no round for {KEPT_IDLE_S:.0f}s"
                    break
                try:
                    n = conn.recv_into(view[got:])
                except TimeoutError:
                    continue
                if n == 0:
                    why = kept.dropped or "closed by the sender"
                    break
                got += n
        except OSError as e:
            why = f"broke: {e!r}"
        with self._lock:
            if kept in self._kept:
                self._kept.remove(kept)
        if not why:
            magic, rnd, epoch = ROUND.unpack(buf)
            if magic != MAGIC_ROUND:
                why = "not a round preamble"
            elif epoch != kept.epoch:
                why = f"a preamble for epoch {epoch} on a stream of epoch {kept.epoch}"
            elif rnd <= kept.last_round:
                why = f"a preamble for round {rnd}, not after the stream's round {kept.last_round}"
            elif kept.dropped or self._closed.is_set():
                why = kept.dropped or "data plane closed"
            else:
                key = (kept.job, rnd, kept.epoch)
                try:
                    if self._attach(key, kept.sender, conn, kept.slots):
                        with self._lock:
                            self.reused += 1
                        log.debug("data plane %d: kept stream from %s carries %s", self.port, kept.sender, key)
                        return
                except Exception:  # noqa: BLE001 - logged; the stream is closed below
                    log.exception("data plane %d: attaching a kept stream failed", self.port)
                why = f"no exchange wants {key} any more"
        log.info("data plane %d: kept stream from %s (job %s epoch %d) closed: %s",
                 self.port, kept.sender, kept.job, kept.epoch, why)
        if kept.slots is not None:
            kept.slots.close()
        close_socket(conn)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)
                continue
            threading.Thread(target=self._handshake, args=(conn,), name="dataplane-hello", daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(HANDSHAKE_S)
            if self._tls is not None:  # the TLS handshake, bounded by the same deadline
                conn = self._tls.server_context.wrap_socket(conn, server_side=True)
            hello = bytearray(HELLO_BYTES)
            view, got = memoryview(hello), 0
            while got < HELLO_BYTES:
                n = conn.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("closed during the handshake")
                got += n
            magic = bytes(hello[: len(MAGIC)])
            if magic not in (MAGIC, MAGIC_SHM):
                raise ConnectionError("not a dml data-plane hello")
            with self._lock:
                entry = self._tokens.pop(bytes(hello[len(MAGIC):]), None)
                if entry is not None:
                    self.opened += 1
            if entry is None or entry[2] < time.monotonic():
                if entry is not None and entry[3] is not None:
                    entry[3].close()
                raise ConnectionError("unknown or expired token")
            key, sender, _, slots = entry
            if slots is not None and magic != MAGIC_SHM:  # the sender could not map them: plain TCP
                slots.close()
                slots = None
            elif slots is None and magic == MAGIC_SHM:
                raise ConnectionError("shared memory was not offered for this token")
            if slots is not None:
                slots.unlink()  # both sides have it mapped: its name is no longer needed
            tune(conn)
            if self._attach(key, sender, conn, slots):
                return
            if slots is not None:
                slots.close()
            raise ConnectionError(f"no exchange wants {key} any more")
        except (OSError, ConnectionError) as e:
            log.info("data plane %d: refused a connection: %s", self.port, e)
        conn.close()

    def close(self) -> None:
        """Stops accepting; connections already attached belong to their exchanges."""
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(2)
        with self._lock:
            threads = [k.thread for k in self._kept if k.thread is not None]
        self.drop_kept(reason="data plane closed")
        self._join_kept(threads, 2.0)  # each closes its stream
        with self._lock:
            entries, self._tokens = list(self._tokens.values()), {}
        for entry in entries:
            if entry[3] is not None:
                entry[3].close()


def connect(host: str, port: int, token: bytes, timeout: float, shm: bool = False,
            tls: TlsConfig | None = None) -> socket.socket:
    """Opens an authenticated stream to a peer's data plane (saying whether the sender mapped
    the shared-memory slots it was offered), inside TLS with ``tls``: the peer's certificate
    verified against the CA and the cluster name, ours presented."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        tune(sock)
        if tls is not None:
            sock = tls.client_context.wrap_socket(sock, server_hostname=tls.hostname_for(host))
        sock.sendall((MAGIC_SHM if shm else MAGIC) + token)
    except OSError:
        sock.close()
        raise
    return sock
