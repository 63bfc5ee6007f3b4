"""The ring all-reduce schedule: which segment each rank sends and receives at each step.

Pure index arithmetic over a flat buffer of ``n`` elements cut into ``world`` contiguous
segments. Reduce-scatter runs ``world - 1`` steps; after it rank ``r`` owns the fully reduced
segment ``(r + 1) % world``. All-gather then runs ``world - 1`` steps copying owned segments
around the ring. Every element crosses each link 2 (world - 1) / world times in total, which is
bandwidth-optimal (Patarasuk and Yuan 2009).
"""
from __future__ import annotations

from dataclasses import dataclass

REDUCE_SCATTER = 1
ALL_GATHER = 2


@dataclass(frozen=True)
class Span:
    """A half-open element range ``[start, stop)`` of the flat buffer."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        """Number of elements in the span."""
        return self.stop - self.start


def segments(n: int, world: int) -> list[Span]:
    """Splits ``n`` elements into ``world`` contiguous segments differing in size by at most one."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    base, extra = divmod(n, world)
    spans, start = [], 0
    for i in range(world):
        stop = start + base + (1 if i < extra else 0)
        spans.append(Span(start, stop))
        start = stop
    return spans


def chunks(span: Span, chunk_elems: int) -> list[Span]:
    """Cuts a segment into chunks of at most ``chunk_elems`` elements (an empty span gives none)."""
    if chunk_elems < 1:
        raise ValueError(f"chunk size must be >= 1 element, got {chunk_elems}")
    return [Span(s, min(s + chunk_elems, span.stop)) for s in range(span.start, span.stop, chunk_elems)]


def send_segment(phase: int, rank: int, step: int, world: int) -> int:
    """Index of the segment ``rank`` sends to its successor at ``step`` of ``phase``."""
    if phase == REDUCE_SCATTER:
        return (rank - step) % world
    return (rank + 1 - step) % world


def recv_segment(phase: int, rank: int, step: int, world: int) -> int:
    """Index of the segment ``rank`` receives from its predecessor at ``step`` of ``phase``."""
    return send_segment(phase, (rank - 1) % world, step, world)


def owned_segment(rank: int, world: int) -> int:
    """Segment that ``rank`` holds fully reduced after reduce-scatter."""
    return (rank + 1) % world
