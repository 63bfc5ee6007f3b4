"""Ring all-reduce (sum) over a flat float32 buffer, reduced in place.

Chunks are pipelined: as soon as a chunk is reduced it is forwarded, so every link carries data
while the member waits for the next chunk. The schedule comes from :mod:`aggregation.ring`; the
wire from a :class:`aggregation.transport.RingLink`.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from aggregation import ring
from aggregation.transport import Chunk, ExchangeError, RingLink

DEFAULT_CHUNK_ELEMS = 256 * 1024  # 1 MiB of float32, well under gRPC's 4 MiB message cap


def ring_allreduce(
    buf: np.ndarray,
    rank: int,
    world: int,
    link: RingLink,
    timeout: float,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> None:
    """Replaces ``buf`` (1-D float32) with the element-wise sum of every member's ``buf``.

    Every member ends with bit-identical contents: each segment is reduced by one member and
    copied verbatim to the others. ``timeout`` bounds the whole call in seconds. Raises
    ExchangeError if a neighbour fails or the deadline passes; ``buf`` is then undefined and the
    caller must restore it.
    """
    if buf.ndim != 1 or buf.dtype != np.float32:
        raise ValueError("ring_allreduce needs a 1-D float32 buffer")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    if world == 1:
        return
    deadline = time.monotonic() + timeout
    segs = ring.segments(buf.size, world)

    def send(phase: int, step: int, span: ring.Span) -> None:
        link.send(Chunk(phase, step, span.start, buf[span.start : span.stop]))

    def receive(phase: int, step: int, seg: ring.Span) -> Iterator[tuple[ring.Span, np.ndarray]]:
        """The chunks that tile ``seg``, in order. The sender's chunk size is its own business:
        a receiver only needs the pieces to arrive contiguously, so members may differ in it."""
        pos = seg.start
        while pos < seg.stop:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExchangeError(f"all-reduce deadline of {timeout:.1f}s passed")
            got = link.recv(left)
            size = got.data.size
            if (got.phase, got.step, got.offset) != (phase, step, pos) or not 0 < size <= seg.stop - pos:
                raise ExchangeError(
                    f"out-of-order chunk: got phase {got.phase} step {got.step} offset {got.offset} size {size}, "
                    f"expected phase {phase} step {step} offset {pos} (segment ends at {seg.stop})"
                )
            yield ring.Span(pos, pos + size), got.data
            pos += size

    last = world - 2
    for span in ring.chunks(segs[ring.send_segment(ring.REDUCE_SCATTER, rank, 0, world)], chunk_elems):
        send(ring.REDUCE_SCATTER, 0, span)
    for step in range(world - 1):
        seg = segs[ring.recv_segment(ring.REDUCE_SCATTER, rank, step, world)]
        for span, data in receive(ring.REDUCE_SCATTER, step, seg):
            view = buf[span.start : span.stop]
            np.add(view, data, out=view)
            if step < last:
                send(ring.REDUCE_SCATTER, step + 1, span)
            else:  # fully reduced: start the all-gather with it at once
                send(ring.ALL_GATHER, 0, span)
    for step in range(world - 1):
        seg = segs[ring.recv_segment(ring.ALL_GATHER, rank, step, world)]
        for span, data in receive(ring.ALL_GATHER, step, seg):
            buf[span.start : span.stop] = data
            if step < last:
                send(ring.ALL_GATHER, step + 1, span)
    link.close(max(0.0, deadline - time.monotonic()))
