"""Ring all-reduce (sum) over a flat float32 buffer, reduced in place, in any wire codec.

Chunks are pipelined: as soon as a chunk is reduced it is forwarded, so every link carries data
while the member waits for the next chunk. The schedule comes from :mod:`aggregation.ring`, the
wire from a :class:`aggregation.transport.RingLink`, the encoding from :mod:`aggregation.codecs`.

No copy the algorithm can avoid is made. In fp32 a member sends views of ``buf`` itself, receives
all-gather chunks straight into ``buf`` and reduce-scatter chunks into one reused scratch buffer,
and adds in place. (Sending a view of ``buf`` is safe: the only later write to a sent range is its
all-gather value, which cannot arrive before the successor has consumed what was sent.) A lossy
codec encodes into a small pool of reused staging buffers, recycled once the link says the frame
left; all-gather frames are forwarded as received, without re-encoding, and the member that
finishes a segment keeps the decoded value of what it sent, so every member decodes the same
bytes and ends bit-identical.

With ``residual`` (error feedback) every encoding this member does writes its error there. A
member encodes each of the N segments exactly once (its own contribution to one, a partial sum
to N - 2 others as it forwards them, the final sum of the segment it finishes), so after the call
the residual holds exactly this round's errors, with no separate pass to clear it. The caller
adds it into its next contribution, so over rounds nothing is lost.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from dml.aggregation import ring
from dml.aggregation.codecs import Codec, Fp32, codec_name
from dml.aggregation.transport import ExchangeError, Header, RingLink

if TYPE_CHECKING:
    from dml.aggregation.guard import RingGuard

DEFAULT_CHUNK_ELEMS = 256 * 1024  # 1 MiB of float32: the fastest over gRPC streams (docs/performance.md)
TCP_CHUNK_ELEMS = 1024 * 1024  # 4 MiB of float32: fewer frames, 10-15% faster over the TCP data plane
# 1 MiB of float32 where frames may go through shared memory ("shm", and "auto", which takes it on
# one host): a frame then stays in cache from the sender's write to the receiver's add, and a
# stream's four slots hold 4 MiB instead of 16 (measured, issue 15: N=2 and 4 at 64 and 256 MB,
# 0.59-0.75x gloo against 0.63-0.81x with 4 MiB frames; over TCP on loopback the same or better).
SHM_CHUNK_ELEMS = 256 * 1024
MAX_CHUNK_ELEMS = 1 << 20  # 4 MiB frames at most (what a peer's --chunk-elems allows)


def chunk_elems_for(data_plane: str) -> int:
    """The measured best chunk size for a job's data plane ("grpc", "tcp", "shm" or "auto")."""
    if data_plane == "grpc":
        return DEFAULT_CHUNK_ELEMS
    return TCP_CHUNK_ELEMS if data_plane == "tcp" else SHM_CHUNK_ELEMS


class _Staging:
    """Reused encode/forward buffers. A buffer goes back to the free list once the link reports
    the frame that used it as sent; when none is free a new one is made. Taking a buffer never
    waits: a member that blocked on its own sends while its neighbours blocked on theirs would
    stop reading, and the ring would deadlock. What the pool can grow to is bounded by the frames
    in flight, at most the bytes this member sends in one all-reduce."""

    def __init__(self, link: RingLink, codec: Codec, slot_bytes: int) -> None:
        self._link = link
        self._codec = codec
        self._slot_bytes = slot_bytes
        self._free: list[tuple[np.ndarray, Any]] = []
        self._busy: deque[tuple[int, np.ndarray, Any]] = deque()

    def take(self, nbytes: int) -> tuple[np.ndarray, Any]:
        """A buffer of at least ``nbytes`` (numpy, and the codec's native view of it)."""
        done = self._link.sent_upto()
        while self._busy and self._busy[0][0] <= done:
            _, buf, native = self._busy.popleft()
            self._free.append((buf, native))
        for i in range(len(self._free) - 1, -1, -1):
            if self._free[i][0].size >= nbytes:
                return self._free.pop(i)
        buf = np.empty(max(nbytes, self._slot_bytes), dtype=np.uint8)
        return buf, self._codec.wrap(buf)

    def put_back(self, slot: tuple[np.ndarray, Any]) -> None:
        """Returns a buffer that was never sent."""
        self._free.append(slot)

    def sent(self, slot: tuple[np.ndarray, Any], seq: int) -> None:
        """Records that ``slot`` is on the wire as frame ``seq``."""
        self._busy.append((seq, slot[0], slot[1]))


def ring_allreduce(
    buf: np.ndarray,
    rank: int,
    world: int,
    link: RingLink,
    timeout: float,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    codec: Codec | None = None,
    residual: np.ndarray | None = None,
    guard: RingGuard | None = None,
    collective: int = 0,
    final: bool = True,
) -> None:
    """Replaces ``buf`` (1-D float32) with the element-wise sum of every member's ``buf``.

    Every member ends with bit-identical contents: each segment is reduced by one member and
    copied verbatim to the others. ``codec`` (default fp32, exact) is the wire format; every
    member must use the same one. ``residual`` (float32, like ``buf``) is overwritten with this
    member's encoding errors (zeros when nothing was encoded). ``timeout`` bounds the whole call
    in seconds. Raises ExchangeError if a neighbour fails or the deadline passes; ``buf`` (and
    ``residual``) are then undefined and the caller must restore them. With ``guard`` every
    received chunk is checked, decoded, before it is added or forwarded
    (:mod:`aggregation.guard`); a bad one raises its :class:`~aggregation.guard.Poisoned`.

    One link may carry several all-reduces in a row (one per training step with ``--sync
    grads``): ``collective`` numbers this one (every frame carries it, and a frame of another is
    refused), and all but the ``final`` one end by waiting until every frame this member sent has left
    it (``buf`` may then change) instead of closing the link.
    """
    codec = codec or Fp32()
    if buf.ndim != 1 or buf.dtype != np.float32:
        raise ValueError("ring_allreduce needs a 1-D float32 buffer")
    if residual is not None and (residual.shape != buf.shape or residual.dtype != np.float32):
        raise ValueError("residual must be a float32 buffer shaped like buf")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    if chunk_elems < 1:
        raise ValueError(f"chunk size must be >= 1 element, got {chunk_elems}")
    raw = isinstance(codec, Fp32)  # fp32 goes on the wire straight from buf
    if residual is not None and (raw or world == 1):
        residual.fill(0.0)  # nothing will be encoded lossily: no error to carry
    if world == 1:
        return
    if not 0 <= collective <= 0xFFFFFFFF:
        raise ValueError(f"collective {collective} does not fit a frame header")
    if guard is not None:
        guard.begin(buf)
    deadline = time.monotonic() + timeout
    segs = ring.segments(buf.size, world)
    staging_elems = min(chunk_elems, buf.size)
    staging_bytes = codec.payload_bytes(staging_elems)
    # Receivers accept any chunking (members may differ in chunk size), so the scratch grows to
    # the largest chunk seen.
    scratch = np.empty(staging_bytes, dtype=np.uint8)
    scratch_native = codec.wrap(scratch)
    staging = _Staging(link, codec, staging_bytes)
    u8 = buf.view(np.uint8)
    nbuf = codec.wrap(buf)  # the codec's view of buf and residual, made once: slicing is cheap
    nres = None if residual is None else codec.wrap(residual)

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ExchangeError(f"all-reduce deadline of {timeout:.1f}s passed")
        return remaining

    sent = 0  # the number of the last frame this member sent

    def put(header: Header, payload: np.ndarray) -> int:
        nonlocal sent
        sent = link.send(header, payload)
        return sent

    def send_raw(phase: int, step: int, span: ring.Span) -> None:
        put(Header(phase, codec.id, step, span.start, span.size, collective), u8[4 * span.start : 4 * span.stop])

    def send_encoded(phase: int, step: int, span: ring.Span, own: bool = False) -> None:
        """Encodes ``buf[span]`` (with error feedback) and sends it; ``own`` also replaces it by
        the decoded value, so the member that finished the segment matches everyone else."""
        for a in range(span.start, span.stop, staging_elems):
            b = min(a + staging_elems, span.stop)
            slot = staging.take(codec.payload_bytes(b - a))
            out, native = slot
            nb = codec.encode(nbuf[a:b], native, None if nres is None else nres[a:b])
            if own:
                codec.decode_into(native[:nb], nbuf[a:b])
            staging.sent(slot, put(Header(phase, codec.id, step, a, b - a, collective), out[:nb]))

    def send(phase: int, step: int, span: ring.Span, own: bool = False) -> None:
        if raw:
            send_raw(phase, step, span)
        else:
            send_encoded(phase, step, span, own)

    def receive(phase: int, step: int, seg: ring.Span) -> Iterator[tuple[ring.Span, int]]:
        """The frames that tile ``seg``, in order: yields each one's span and payload size after
        its header is read; the caller then reads the payload."""
        pos = seg.start
        while pos < seg.stop:
            got = link.recv_header(left())
            if got.codec != codec.id:
                raise ExchangeError(f"codec mismatch: predecessor sends {codec_name(got.codec)}, this member uses {codec.name}")
            if (got.collective, got.phase, got.step, got.offset) != (collective, phase, step, pos) \
                    or not 0 < got.count <= seg.stop - pos:
                raise ExchangeError(
                    f"out-of-order chunk: got collective {got.collective} phase {got.phase} step {got.step} "
                    f"offset {got.offset} size {got.count}, expected collective {collective} phase {phase} "
                    f"step {step} offset {pos} (segment ends at {seg.stop})"
                )
            yield ring.Span(pos, pos + got.count), codec.payload_bytes(got.count)
            pos += got.count

    partial = np.empty(0, dtype=np.float32)
    partial_native = codec.wrap(partial)

    def decoded(native: Any, span: ring.Span) -> tuple[np.ndarray, Any]:
        """``decode(native)`` in a reused float32 buffer (numpy, and the codec's view of it)."""
        nonlocal partial, partial_native
        if partial.size < span.size:
            partial = np.empty(span.size, dtype=np.float32)
            partial_native = codec.wrap(partial)
        acc = partial_native[: span.size]
        codec.decode_into(native, acc)
        return partial[: span.size], acc

    def send_partial(step: int, span: ring.Span, native: Any) -> None:
        """Encodes and sends ``buf[span] + decode(native)`` without writing it into ``buf``: the
        all-gather overwrites that range anyway, so the sum never needs to reach main memory."""
        values, acc = decoded(native, span)
        if guard is not None:
            guard.check(ring.REDUCE_SCATTER, step - 1, span, values, buf[span.start : span.stop])
        acc += nbuf[span.start : span.stop]
        slot = staging.take(codec.payload_bytes(span.size))
        out, wire = slot
        nb = codec.encode(acc, wire, None if nres is None else nres[span.start : span.stop])
        staging.sent(slot, put(Header(ring.REDUCE_SCATTER, codec.id, step, span.start, span.size, collective), out[:nb]))

    def scratch_for(nbytes: int) -> tuple[np.ndarray, Any]:
        nonlocal scratch, scratch_native
        if scratch.size < nbytes:
            scratch = np.empty(nbytes, dtype=np.uint8)
            scratch_native = codec.wrap(scratch)
        return scratch[:nbytes], scratch_native[:nbytes]

    last = world - 2
    for span in ring.chunks(segs[ring.send_segment(ring.REDUCE_SCATTER, rank, 0, world)], chunk_elems):
        send(ring.REDUCE_SCATTER, 0, span)
    # A link whose payloads sit in shared memory lends them in place (peer.link.PeerLink
    # .recv_slot): fp32 reduce-scatter chunks are then added straight from the slot, no copy.
    # Not with a guard: the sender could change a slot between the check and the add.
    recv_slot = getattr(link, "recv_slot", None) if raw and guard is None else None
    for step in range(world - 1):
        seg = segs[ring.recv_segment(ring.REDUCE_SCATTER, rank, step, world)]
        for span, nbytes in receive(ring.REDUCE_SCATTER, step, seg):
            lent = recv_slot(nbytes, left()) if recv_slot is not None else None
            if lent is not None:
                payload = np.frombuffer(lent, dtype=np.uint8)
                native = codec.wrap(payload)
            else:
                payload, native = scratch_for(nbytes)
                link.recv_payload(payload, left())
            if guard is not None and raw:
                guard.check(ring.REDUCE_SCATTER, step, span, payload.view(np.float32), buf[span.start : span.stop])
            if step == last:  # fully reduced: keep it, and start the all-gather with it at once
                if guard is not None and not raw:  # decode once, check, then add what was checked
                    values, acc = decoded(native, span)
                    guard.check(ring.REDUCE_SCATTER, step, span, values, buf[span.start : span.stop])
                    nbuf[span.start : span.stop] += acc
                else:
                    codec.decode_add(native, nbuf[span.start : span.stop])
                send(ring.ALL_GATHER, 0, span, own=True)
            elif raw:  # reduce in place and forward straight from buf
                codec.decode_add(native, nbuf[span.start : span.stop])
                if lent is not None:
                    link.release_slot()  # type: ignore[attr-defined]
                    lent = None
                send_raw(ring.REDUCE_SCATTER, step + 1, span)
            else:  # a partial sum only passes through: sum it in a small cache-resident buffer
                send_partial(step + 1, span, native)
            if lent is not None:
                link.release_slot()  # type: ignore[attr-defined]
    for step in range(world - 1):
        seg = segs[ring.recv_segment(ring.ALL_GATHER, rank, step, world)]
        for span, nbytes in receive(ring.ALL_GATHER, step, seg):
            if raw:  # straight into place, then forward the same bytes
                link.recv_payload(u8[4 * span.start : 4 * span.stop], left())
                if guard is not None:
                    guard.check(ring.ALL_GATHER, step, span, buf[span.start : span.stop], None)
                if step < last:
                    send_raw(ring.ALL_GATHER, step + 1, span)
                continue
            slot = staging.take(nbytes)
            out, native = slot
            link.recv_payload(out[:nbytes], left())
            codec.decode_into(native[:nbytes], nbuf[span.start : span.stop])
            if guard is not None:
                guard.check(ring.ALL_GATHER, step, span, buf[span.start : span.stop], None)
            if step < last:  # forward verbatim: no second rounding
                staging.sent(slot, put(Header(ring.ALL_GATHER, codec.id, step + 1, span.start, span.size, collective),
                                       out[:nbytes]))
            else:
                staging.put_back(slot)
    if final:
        link.close(max(0.0, deadline - time.monotonic()))
    elif sent:  # the link stays open for the next all-reduce; what we sent must be off buf first
        link.wait_sent(sent, left())

