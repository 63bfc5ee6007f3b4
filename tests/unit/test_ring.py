"""The ring schedule, ring all-reduce and weighted averaging over the in-memory transport.

No sockets: every member of the ring is a thread in this process joined by ``InMemoryRing``.
Threads are always joined with a timeout, so a hang fails the test instead of stalling it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dml.aggregation import ring
from dml.aggregation.allreduce import ring_allreduce
from dml.aggregation.averaging import digest, weighted_mean, weighted_ring_average
from dml.aggregation.transport import FRAME, ExchangeError, Header, InMemoryRing
from tests.unit.ringkit import assert_bit_identical, deadline_errors, run_members

WORLDS = list(range(1, 9))


def allreduce_all(bufs: list[np.ndarray], chunk_elems: int, timeout: float = 10.0) -> None:
    """All-reduces ``bufs`` (one per rank) in place; fails the test if any member raised."""
    world = len(bufs)
    _, errors = run_members(world, lambda r, link: ring_allreduce(bufs[r], r, world, link, timeout, chunk_elems))
    assert errors == [None] * world, errors


def random_bufs(world: int, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(world)]


# -- the schedule ----------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 13, 100, 1001])
def test_segments_are_contiguous_cover_and_balanced(world: int, n: int) -> None:
    segs = ring.segments(n, world)
    assert len(segs) == world
    assert segs[0].start == 0 and segs[-1].stop == n
    for a, b in zip(segs, segs[1:]):
        assert a.stop == b.start
    sizes = [s.size for s in segs]
    assert all(s >= 0 for s in sizes)
    assert sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("start,stop,chunk", [(0, 0, 3), (5, 5, 1), (0, 10, 3), (7, 20, 13), (7, 20, 100), (3, 4, 1)])
def test_chunks_cover_span_in_order(start: int, stop: int, chunk: int) -> None:
    span = ring.Span(start, stop)
    parts = ring.chunks(span, chunk)
    if span.size == 0:
        assert parts == []
        return
    assert parts[0].start == start and parts[-1].stop == stop
    for a, b in zip(parts, parts[1:]):
        assert a.stop == b.start
    assert all(1 <= p.size <= chunk for p in parts)
    assert all(p.size == chunk for p in parts[:-1])


def test_schedule_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        ring.segments(10, 0)
    with pytest.raises(ValueError):
        ring.chunks(ring.Span(0, 10), 0)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("phase", [ring.REDUCE_SCATTER, ring.ALL_GATHER])
def test_each_segment_sent_exactly_once_per_step(world: int, phase: int) -> None:
    for step in range(world - 1):
        sent = [ring.send_segment(phase, r, step, world) for r in range(world)]
        assert sorted(sent) == list(range(world)), f"step {step}: {sent}"
        for r in range(world):
            # What r receives is exactly what its predecessor sends at the same step.
            assert ring.recv_segment(phase, r, step, world) == ring.send_segment(phase, (r - 1) % world, step, world)


@pytest.mark.parametrize("world", WORLDS)
def test_schedule_reduces_then_gathers_every_contribution(world: int) -> None:
    """Symbolic run of the schedule: track which ranks' contributions each copy holds."""
    held = [[frozenset({r}) for _ in range(world)] for r in range(world)]  # held[rank][segment]
    for step in range(world - 1):
        msgs = [(r, ring.send_segment(ring.REDUCE_SCATTER, r, step, world)) for r in range(world)]
        payload = [held[r][s] for r, s in msgs]  # everyone sends before anyone adds
        for (r, s), data in zip(msgs, payload):
            dst = (r + 1) % world
            assert ring.recv_segment(ring.REDUCE_SCATTER, dst, step, world) == s
            assert not (held[dst][s] & data), "a contribution would be added twice"
            held[dst][s] = held[dst][s] | data
    everyone = frozenset(range(world))
    owned = [ring.owned_segment(r, world) for r in range(world)]
    assert sorted(owned) == list(range(world)), "after reduce-scatter each rank owns a distinct segment"
    for r in range(world):
        assert held[r][owned[r]] == everyone, f"rank {r}'s owned segment is not fully reduced"
    for step in range(world - 1):
        msgs = [(r, ring.send_segment(ring.ALL_GATHER, r, step, world)) for r in range(world)]
        payload = [held[r][s] for r, s in msgs]
        for (r, s), data in zip(msgs, payload):
            assert data == everyone, f"all-gather step {step}: rank {r} forwards a partial segment {s}"
            dst = (r + 1) % world
            assert ring.recv_segment(ring.ALL_GATHER, dst, step, world) == s
            held[dst][s] = data
    for r in range(world):
        assert all(h == everyone for h in held[r]), f"rank {r} misses a reduced segment"


# -- ring all-reduce -------------------------------------------------------------------------

SIZES = [0, 1, 2, 3, 5, 7, 9, 17, 64, 101, 1000, 1001]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", SIZES)
def test_allreduce_equals_exact_sum(world: int, n: int) -> None:
    bufs = random_bufs(world, n, seed=world * 10_000 + n)
    want = np.sum([b.astype(np.float64) for b in bufs], axis=0) if n else np.zeros(0)
    allreduce_all(bufs, chunk_elems=3)
    for r, b in enumerate(bufs):
        assert b.dtype == np.float32 and b.shape == (n,)
        assert np.allclose(b, want, rtol=1e-5, atol=1e-5), f"rank {r}: max err {np.abs(b - want).max() if n else 0}"
    assert_bit_identical(bufs)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n,chunk", [(3, 1), (13, 2), (257, 7), (999, 64), (1000, 1_000_000)])
def test_allreduce_of_small_integers_is_exact(world: int, n: int, chunk: int) -> None:
    """Integer-valued float32 sums are exact, so any misplaced or doubled chunk shows."""
    rng = np.random.default_rng(n + world)
    bufs = [rng.integers(-1000, 1000, n).astype(np.float32) for _ in range(world)]
    want = np.sum([b.astype(np.int64) for b in bufs], axis=0)
    allreduce_all(bufs, chunk_elems=chunk)
    for b in bufs:
        assert np.array_equal(b.astype(np.int64), want)


def test_allreduce_sum_of_rank_markers_has_no_double_counting() -> None:
    """Rank r contributes 2**r, so the result says exactly which ranks were summed."""
    world, n = 8, 45
    bufs = [np.full(n, 2.0**r, dtype=np.float32) for r in range(world)]
    allreduce_all(bufs, chunk_elems=4)
    for b in bufs:
        assert np.all(b == 2.0**world - 1)


class CountingLink:
    """Wraps a link, counting what it sends."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.elems = 0
        self.phases: list[tuple[int, int]] = []

    def send(self, header: Header, payload: np.ndarray) -> int:
        self.elems += header.count
        self.phases.append((header.phase, header.step))
        return self.inner.send(header, payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("world", [2, 3, 5, 8])
@pytest.mark.parametrize("n", [1, 10, 1003])
def test_allreduce_traffic_is_bandwidth_optimal(world: int, n: int) -> None:
    """Each rank sends every segment but its owned one in reduce-scatter, and every segment but
    its successor's owned one in all-gather: 2 n (world - 1) / world elements, give or take."""
    links: dict[int, CountingLink] = {}

    def wrap(rank: int, link: Any) -> CountingLink:
        links[rank] = CountingLink(link)
        return links[rank]

    bufs = random_bufs(world, n, seed=1)
    _, errors = run_members(world, lambda r, link: ring_allreduce(bufs[r], r, world, link, 10.0, 2), link_wrap=wrap)
    assert errors == [None] * world
    segs = ring.segments(n, world)
    for r in range(world):
        skip_rs = segs[ring.owned_segment(r, world)].size
        skip_ag = segs[ring.owned_segment((r + 1) % world, world)].size
        assert links[r].elems == 2 * n - skip_rs - skip_ag, f"rank {r}"
        # Sends go strictly forward through the schedule: (phase, step) never decreases.
        assert links[r].phases == sorted(links[r].phases)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=st.integers(1, 8), n=st.integers(0, 2000), chunk=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_allreduce_property(world: int, n: int, chunk: int, seed: int) -> None:
    bufs = random_bufs(world, n, seed)
    want = np.sum([b.astype(np.float64) for b in bufs], axis=0) if n else np.zeros(0)
    allreduce_all(bufs, chunk_elems=chunk)
    assert np.allclose(bufs[0], want, rtol=1e-5, atol=1e-5)
    assert_bit_identical(bufs)


def test_single_member_leaves_buffer_untouched() -> None:
    buf = np.arange(5, dtype=np.float32)
    before = buf.copy()
    ring_allreduce(buf, 0, 1, InMemoryRing(1).link(0), timeout=0.1, chunk_elems=2)
    assert np.array_equal(buf, before)


# -- weighted averaging ----------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("n", [0, 1, 6, 33, 1000])
def test_weighted_ring_average_matches_weighted_mean(world: int, n: int) -> None:
    rng = np.random.default_rng(world * 31 + n)
    params = [rng.standard_normal(n).astype(np.float32) for _ in range(world)]
    weights = [float(w) for w in rng.integers(1, 500, world)]
    bufs = [np.concatenate([p, np.zeros(1, np.float32)]) for p in params]
    totals, errors = run_members(
        world, lambda r, link: weighted_ring_average(bufs[r], weights[r], r, world, link, 10.0, chunk_elems=5)
    )
    assert errors == [None] * world
    assert totals == [pytest.approx(sum(weights))] * world
    if n:
        want = weighted_mean(params, weights)
        for b in bufs:
            assert np.allclose(b[:-1], want, rtol=1e-5, atol=1e-6)
    assert_bit_identical(bufs)
    assert len({digest(b[:-1]) for b in bufs}) == 1


def test_weighted_ring_average_weights_matter() -> None:
    """With weights 3 and 1, the average of 0s and 4s is 3, not the unweighted 2."""
    bufs = [np.array([0.0, 0.0, 0.0], np.float32), np.array([4.0, 4.0, 0.0], np.float32)]
    totals, errors = run_members(2, lambda r, link: weighted_ring_average(bufs[r], [1.0, 3.0][r], r, 2, link, 5.0, 1))
    assert errors == [None, None]
    assert totals == [4.0, 4.0]
    for b in bufs:
        assert np.array_equal(b[:-1], np.array([3.0, 3.0], np.float32))


@pytest.mark.parametrize("weight", [0.0, -1.0])
def test_weighted_ring_average_rejects_non_positive_weight(weight: float) -> None:
    buf = np.zeros(4, np.float32)
    with pytest.raises(ValueError):
        weighted_ring_average(buf, weight, 0, 1, InMemoryRing(1).link(0), 1.0)


def test_weighted_mean_reference() -> None:
    got = weighted_mean([np.array([1.0, 2.0], np.float32), np.array([3.0, 6.0], np.float32)], [1.0, 3.0])
    assert got.dtype == np.float64
    assert np.allclose(got, [2.5, 5.0])
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError):
        weighted_mean([np.zeros(2)], [1.0, 2.0])


def test_digest_is_blake3_of_bytes_and_sensitive_to_one_bit() -> None:
    """A digest is "b3:" and the BLAKE3 hash of the float32 bytes (the reference: blake3 on
    those bytes, one thread), whatever the threads; a legacy sha256 digest is recomputed as
    sha256 when it is the one compared with (like=)."""
    import hashlib

    from blake3 import blake3

    from dml.aggregation import digests

    a = np.linspace(-1, 1, 100, dtype=np.float32)
    assert digest(a) == "b3:" + blake3(a.tobytes()).hexdigest()
    big = np.random.default_rng(0).standard_normal(3_000_001).astype(np.float32)  # many chunks: threads share it
    assert digest(big) == "b3:" + blake3(big.tobytes()).hexdigest()
    assert digest(a) == digest(a.copy())
    b = a.copy()
    b.view(np.uint32)[37] ^= 1
    assert digest(b) != digest(a)
    # A non-contiguous view hashes its own values, not the base buffer.
    assert digest(a[::2]) == "b3:" + blake3(a[::2].copy().tobytes()).hexdigest()
    legacy = hashlib.sha256(a.tobytes()).hexdigest()
    assert digests.is_legacy(legacy) and not digests.is_legacy(digest(a))
    assert digest(a, like=legacy) == legacy and digest(a, like=digest(a)) == digest(a)
    assert digest(b, like=legacy) != legacy
    # Incremental hashing (checkpoints, a state after the parameters) equals hashing the whole.
    h = digests.new_hash()
    h.update(a[:40])
    g = h.copy()
    h.update(a[40:])
    assert h.hexdigest() == digest(a)
    g.update(a[40:].view(np.uint8).data)
    assert g.hexdigest() == digest(a)


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("world,broken", [(2, 0), (3, 1), (4, 1), (8, 5)])
def test_broken_member_makes_the_others_fail_fast(world: int, broken: int) -> None:
    net = InMemoryRing(world)
    net.break_member(broken)
    bufs = random_bufs(world, 100, seed=0)
    timeout = 0.5
    _, errors = run_members(world, lambda r, link: ring_allreduce(bufs[r], r, world, link, timeout, 7), net=net)
    for r in range(world):
        if r != broken:
            assert isinstance(errors[r], ExchangeError), f"rank {r} got {errors[r]!r}"
    others = [e for r, e in enumerate(errors) if r != broken]
    assert not deadline_errors(others, timeout), f"not ended by the {timeout}s deadline: {others}"
    # The broken member's successor hears nothing at all and names it.
    succ = (broken + 1) % world
    assert errors[succ].suspect == str(broken)  # type: ignore[union-attr]


def test_recv_times_out_with_exchange_error_naming_predecessor() -> None:
    link = InMemoryRing(3).link(0)
    with pytest.raises(ExchangeError) as ei:
        link.recv_header(0.05)
    assert str(ei.value) == "no data from rank 2 within 0.1s"  # its own deadline ended the wait (0.05 s, shown to 0.1)
    assert ei.value.suspect == "2"


def test_in_memory_link_copies_data_like_a_wire() -> None:
    net = InMemoryRing(2)
    data = np.ones(3, np.float32)
    net.link(0).send(Header(1, 1, 0, 0, 3), data.view(np.uint8))
    data[:] = 5
    rx = net.link(1)
    got = rx.recv_header(1.0)
    out = np.zeros(3, np.float32)
    rx.recv_payload(out.view(np.uint8), 1.0)
    assert np.array_equal(out, np.ones(3, np.float32))
    assert (got.phase, got.codec, got.step, got.offset, got.count) == (1, 1, 0, 0, 3)
    assert net.sent_bytes == [12 + FRAME.size, 0]


class ScramblingLink:
    """Delivers a wrong offset on the first chunk: a protocol violation."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.first = True

    def send(self, header: Header, payload: np.ndarray) -> int:
        if self.first:
            self.first = False
            header = Header(header.phase, header.codec, header.step, header.offset + 1, header.count)
        return self.inner.send(header, payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_out_of_order_chunk_is_an_exchange_error() -> None:
    world = 3
    bufs = random_bufs(world, 30, seed=3)
    _, errors = run_members(
        world, lambda r, link: ring_allreduce(bufs[r], r, world, link, 0.5, 4),
        link_wrap=lambda r, link: ScramblingLink(link) if r == 0 else link,
    )
    assert isinstance(errors[1], ExchangeError)
    assert "out-of-order" in str(errors[1])
    assert all(isinstance(e, ExchangeError) for e in errors)


# -- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "buf,rank,world",
    [
        (np.zeros((2, 3), np.float32), 0, 2),
        (np.zeros(6, np.float64), 0, 2),
        (np.zeros(6, np.float16), 0, 2),
        (np.zeros(6, np.float32), 2, 2),
        (np.zeros(6, np.float32), -1, 2),
        (np.zeros(6, np.float32), 0, 0),
        (np.zeros((2, 3), np.float32), 0, 1),
        (np.zeros(6, np.float64), 0, 1),
    ],
)
def test_bad_inputs_raise_value_error(buf: np.ndarray, rank: int, world: int) -> None:
    link = InMemoryRing(max(world, 1)).link(0)
    with pytest.raises(ValueError):
        ring_allreduce(buf, rank, world, link, timeout=0.1)


@pytest.mark.parametrize("world", [2, 3, 5])
def test_members_may_use_different_chunk_sizes(world: int) -> None:
    """Chunking is each sender's choice: receivers only need contiguous pieces, so a ring whose
    members cut chunks differently still sums exactly and ends bit-identical."""
    rng = np.random.default_rng(world)
    bufs = [rng.integers(-50, 50, 1001).astype(np.float32) for _ in range(world)]
    want = np.sum(np.stack(bufs).astype(np.float64), axis=0)
    sizes = [1, 7, 64, 1000, 3][:world]
    _, errors = run_members(world, lambda r, link: ring_allreduce(bufs[r], r, world, link, 5.0, sizes[r]))
    assert errors == [None] * world
    for b in bufs:
        assert np.array_equal(b.astype(np.float64), want)
        assert b.tobytes() == bufs[0].tobytes()

