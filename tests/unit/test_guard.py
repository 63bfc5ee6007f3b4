"""The ring's checks on what a member receives (aggregation.guard), for every codec: a NaN or
absurd contribution is refused by the first honest member downstream, naming its sender, and
honest rounds pass untouched."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dml.aggregation.averaging import delta_ring_average, weighted_ring_average
from dml.aggregation.codecs import CODEC_NAMES, get_codec
from dml.aggregation.guard import PIECE, RATIO, Poisoned, RingGuard, update_norm
from dml.aggregation.ring import ALL_GATHER, REDUCE_SCATTER, Span
from tests.unit.ringkit import assert_bit_identical, run_members

N = 3000
SAMPLES = [64.0, 64.0, 32.0, 64.0]


TIMEOUT_S = 10.0  # the all-reduce deadline; a poisoned round aborts the ring instead (run_members)


def _params(world: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A shared base and each member's parameters after an honest round (small updates)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.1, N).astype(np.float32)
    return base, [base + rng.normal(0, 1e-3, N).astype(np.float32) for _ in range(world)]


def _fp32_round(world: int, bad: int | None, poison: float, chunk: int = 256, weight: float | None = None):
    """An fp32 weighted average where member ``bad`` (if any) poisons its parameters."""
    _, params = _params(world)
    weights = SAMPLES[:world]
    bufs = []
    for r, p in enumerate(params):
        buf = np.zeros(N + 1, dtype=np.float32)
        buf[:-1] = p
        if r == bad:
            buf[: N // 2] = poison
        bufs.append(buf)

    def body(rank: int, link) -> float:
        guard = None if rank == bad else RingGuard(f"m{(rank - 1) % world}", rank, weights, floor=1e-3,
                                                   weight_index=N, max_weight=sum(weights))
        w = weights[rank] if weight is None or rank != bad else weight
        return weighted_ring_average(bufs[rank], w, rank, world, link, TIMEOUT_S, chunk, guard=guard)

    return bufs, run_members(world, body, abort_on_error=True)


def _delta_round(name: str, world: int, bad: int | None, poison: float, chunk: int = 256):
    base, params = _params(world)
    total = sum(SAMPLES[:world])
    shares = [w / total for w in SAMPLES[:world]]
    for r in range(world):
        if r == bad:
            params[r][: N // 3] = poison

    def body(rank: int, link) -> None:
        guard = None if rank == bad else RingGuard(f"m{(rank - 1) % world}", rank, shares, floor=1e-4)
        residual = np.zeros(N, dtype=np.float32)
        delta_ring_average(params[rank], base, shares[rank], rank, world, link, TIMEOUT_S, get_codec(name), residual,
                           chunk, guard=guard)

    return params, run_members(world, body, abort_on_error=True)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_honest_fp32_rounds_pass_every_check_and_stay_identical(world: int) -> None:
    bufs, (_, errors) = _fp32_round(world, None, 0.0)
    assert errors == [None] * world
    assert_bit_identical(bufs)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_honest_delta_rounds_pass_every_check(name: str, world: int) -> None:
    params, (_, errors) = _delta_round(name, world, None, 0.0)
    assert errors == [None] * world
    assert_bit_identical(params)


@pytest.mark.parametrize("poison", [math.nan, math.inf, 1e30])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_fp32_poisoned_contribution_is_refused_by_the_successor_naming_the_sender(world: int, poison: float) -> None:
    bad = 1
    _, (_, errors) = _fp32_round(world, bad, poison)
    succ = (bad + 1) % world
    assert isinstance(errors[succ], Poisoned), errors
    assert errors[succ].suspect == f"m{bad}"
    # Nobody else blames anybody for poison: the successor stopped it before forwarding.
    assert all(not isinstance(e, Poisoned) for r, e in enumerate(errors) if r != succ)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("poison", [math.nan, 1e30])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_delta_poisoned_update_is_refused_for_every_codec(name: str, world: int, poison: float) -> None:
    bad = 0
    _, (_, errors) = _delta_round(name, world, bad, poison)
    succ = (bad + 1) % world
    assert isinstance(errors[succ], Poisoned), (name, errors)
    assert errors[succ].suspect == f"m{bad}"
    assert all(not isinstance(e, Poisoned) for r, e in enumerate(errors) if r != succ)


def test_a_lying_fp32_weight_is_refused() -> None:
    # Parameters times a claimed weight of 1e6 (64 samples planned): absurd, whatever the params.
    _, (_, errors) = _fp32_round(3, 1, 0.0, weight=1e6)
    assert isinstance(errors[2], Poisoned) and errors[2].suspect == "m1"


def test_the_weight_slot_must_stay_in_the_plans_range() -> None:
    g = RingGuard("p", 1, [10.0, 10.0], floor=1e-3, weight_index=3, max_weight=20.0)
    own = np.array([10.0, 10.0, 10.0, 10.0], dtype=np.float32)
    g.check(REDUCE_SCATTER, 0, Span(0, 4), np.array([10, 10, 10, 10], dtype=np.float32), own)
    with pytest.raises(Poisoned, match="weight 25"):
        g.check(REDUCE_SCATTER, 0, Span(0, 4), np.array([10, 10, 10, 25], dtype=np.float32), own)
    with pytest.raises(Poisoned, match="weight -1"):
        g.check(REDUCE_SCATTER, 0, Span(0, 4), np.array([10, 10, 10, -1], dtype=np.float32), own)


def test_scale_rule_limits() -> None:
    g = RingGuard("p", 0, [1.0, 1.0, 1.0], floor=1e-6)
    own = np.full(100, 1e-3, dtype=np.float32)
    g.begin(own)
    assert g.own_rms == 0.0, "nothing measured before the reduce-scatter"
    ok = np.full(100, 0.99e-3 * RATIO, dtype=np.float32)
    g.check(REDUCE_SCATTER, 0, Span(0, 100), ok, own)
    with pytest.raises(Poisoned, match="RMS"):
        g.check(REDUCE_SCATTER, 0, Span(0, 100), ok * 1.1, own)
    # A partial sum of two contributions may be twice as large; the all-gather's sum of three, thrice.
    g.check(REDUCE_SCATTER, 1, Span(0, 100), ok * 2, own)
    assert g.own_rms == pytest.approx(1e-3)  # measured on the way, for the all-gather
    g.check(ALL_GATHER, 0, Span(0, 100), ok * 3, None)
    with pytest.raises(Poisoned):
        g.check(ALL_GATHER, 0, Span(0, 100), ok * 3.3, None)


def test_a_receiver_with_nothing_of_its_own_falls_back_to_the_floor() -> None:
    g = RingGuard("p", 1, [10.0, 0.0], floor=1e-3)  # weight 0 this round: its own buffer is all zeros
    zeros = np.zeros(50, dtype=np.float32)
    g.begin(zeros)
    g.check(REDUCE_SCATTER, 0, Span(0, 50), np.full(50, 5.0, dtype=np.float32), zeros)  # 10 x params of 0.5
    with pytest.raises(Poisoned):
        g.check(REDUCE_SCATTER, 0, Span(0, 50), np.full(50, 1e30, dtype=np.float32), zeros)


def test_non_finite_values_are_named() -> None:
    g = RingGuard("peer-7", 0, [1.0, 1.0], floor=1e-3)
    x = np.ones(10, dtype=np.float32)
    x[4] = np.nan
    with pytest.raises(Poisoned, match=r"peer-7.*1 non-finite values.*element 24"):
        g.check(REDUCE_SCATTER, 0, Span(20, 30), x, np.ones(10, dtype=np.float32))
    huge = np.full(10, 3e38, dtype=np.float32)  # finite, but its square is not
    with pytest.raises(Poisoned):
        g.check(REDUCE_SCATTER, 0, Span(20, 30), huge, np.ones(10, dtype=np.float32))


def test_guard_rejects_nonsense_configuration() -> None:
    with pytest.raises(ValueError):
        RingGuard("p", 0, [1.0], floor=0.0)
    with pytest.raises(ValueError):
        RingGuard("p", 2, [1.0, 1.0], floor=1e-3)
    with pytest.raises(ValueError):
        RingGuard("p", 0, [1.0, math.nan], floor=1e-3)


def test_update_norm_is_the_members_own_check() -> None:
    base = np.zeros(5, dtype=np.float32)
    assert update_norm(np.array([3, 4, 0, 0, 0], dtype=np.float32), base) == pytest.approx(5.0)
    for bad in (math.nan, math.inf, -math.inf):
        p = np.zeros(5, dtype=np.float32)
        p[2] = bad
        assert not math.isfinite(update_norm(p, base))
    with pytest.raises(ValueError):
        update_norm(np.zeros(4, dtype=np.float32), base)
    # No base: the parameters' own norm, without a model-sized array of zeros.
    assert update_norm(np.array([0, 3, 4], dtype=np.float32), None) == pytest.approx(5.0)
    # An absurd update (its square overflows float32) is not finite, as a gradient's is (rms).
    assert not math.isfinite(update_norm(np.array([3e19, 0, 0, 0, 0], dtype=np.float32), base))


def test_update_norm_matches_float64_across_pieces() -> None:
    """Float32 per piece, float64 across them: within 1e-6 of the exact norm of a model-sized
    update (several pieces and a ragged tail), also when the update is tiny beside the weights."""
    rng = np.random.default_rng(3)
    n = 5 * PIECE + 123
    base = rng.standard_normal(n).astype(np.float32)
    for scale in (1.0, 1e-4):
        params = (base + scale * rng.standard_normal(n)).astype(np.float32)
        exact = float(np.sqrt(np.sum((params.astype(np.float64) - base.astype(np.float64)) ** 2)))
        assert update_norm(params, base) == pytest.approx(exact, rel=1e-6)
    assert update_norm(base, base) == 0.0
