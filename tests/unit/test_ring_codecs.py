"""Ring all-reduce and delta averaging in every wire codec, over the in-memory transport.

Every member is a thread joined by ``InMemoryRing`` and has its own codec instance (instances
hold scratch space). The error bounds are derived from the codecs' documented per-encoding
bounds: in a ring of N members every element is encoded exactly N times (once by each member:
N - 1 partial sums in reduce-scatter, then the final sum by the member that finishes it), and
each encoding's error is bounded by the codec bound of the value encoded, a partial sum whose
magnitude is at most ``A = sum_i |x_i|`` (plus the errors so far, a few percent at most).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dml.aggregation import ring
from dml.aggregation.allreduce import ring_allreduce
from dml.aggregation.averaging import delta_ring_average
from dml.aggregation.codecs import get_codec
from dml.aggregation.transport import ExchangeError, InMemoryRing
from tests.unit.ringkit import assert_bit_identical, deadline_errors, run_members

LOSSY = ["bf16", "fp16", "int8"]
F32_EPS = 2.0**-23
SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def ring_error_bound(name: str, contribs: list[np.ndarray]) -> np.ndarray:
    """Per-element bound on |ring result - exact sum| for these contributions (float64)."""
    world = len(contribs)
    a = np.sum([np.abs(c.astype(np.float64)) for c in contribs], axis=0)  # bounds every partial sum
    if world == 1 or a.size == 0:
        return np.zeros_like(a)
    grow = 1.1  # partial sums carry the errors of earlier encodings too: (1 + 2^-8)^8 < 1.04
    adds = world * F32_EPS * a * grow  # float32 rounding of the N - 1 additions (and of decoding)
    if name == "bf16":
        return world * 2.0**-8 * grow * a + adds + world * 2.0**-133
    if name == "fp16":
        return world * (2.0**-11 * grow * a + 2.0**-25) + adds
    if name == "int8":
        # Each chunk lies within one ring segment; its scale is at most the segment's peak.
        peak = np.zeros_like(a)
        for seg in ring.segments(a.size, world):
            if seg.size:
                peak[seg.start : seg.stop] = a[seg.start : seg.stop].max()
        return world * grow * peak / 254.0 + world * F32_EPS * grow * peak
    raise AssertionError(name)


def conservation_tol(name: str, contribs: list[np.ndarray]) -> np.ndarray:
    """Tolerance for result + sum(residuals) == exact sum: float32 rounding only (additions,
    and the residual's own rounding), never a whole encoding error."""
    world = len(contribs)
    a = np.sum([np.abs(c.astype(np.float64)) for c in contribs], axis=0)
    mag = a * 1.1
    if name == "int8" and a.size:  # partials of tiny elements carry errors of the chunk's scale
        mag = mag + world * a.max() / 100.0
    return 2 * world * F32_EPS * mag + 2.0**-140


def exact_sum(contribs: list[np.ndarray]) -> np.ndarray:
    return np.sum([c.astype(np.float64) for c in contribs], axis=0)


def run_ring(name: str, bufs: list[np.ndarray], chunks: list[int], residuals: list[np.ndarray] | None,
             timeout: float = 10.0) -> None:
    world = len(bufs)
    codecs = [get_codec(name) for _ in range(world)]
    _, errors = run_members(world, lambda r, link: ring_allreduce(
        bufs[r], r, world, link, timeout, chunks[r], codecs[r], None if residuals is None else residuals[r]))
    assert errors == [None] * world, errors


# -- lossy codecs ----------------------------------------------------------------------------


@st.composite
def ring_cases(draw: Any, name: str) -> tuple[int, int, list[int], int, float]:
    world = draw(st.integers(1, 8))
    n = draw(st.integers(0, 400))
    same = draw(st.booleans())
    chunk = st.one_of(st.integers(1, 16), st.integers(17, 500))
    chunks = [draw(chunk)] * world if same else [draw(chunk) for _ in range(world)]
    seed = draw(st.integers(0, 2**32 - 1))
    log10_scale = draw(st.floats(-3, 3) if name == "fp16" else st.floats(-30, 30))
    return world, n, chunks, seed, log10_scale


def make_contribs(world: int, n: int, seed: int, log10_scale: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(world):
        x = rng.standard_normal(n) * 10.0**log10_scale
        # Some members contribute much less than others: partial sums then span several binades.
        x *= 10.0 ** rng.uniform(-2, 0)
        out.append(x.astype(np.float32))
    return out


def check_lossy_ring(name: str, world: int, n: int, chunks: list[int], seed: int, log10_scale: float) -> None:
    contribs = make_contribs(world, n, seed, log10_scale)
    bufs = [c.copy() for c in contribs]
    rng = np.random.default_rng(seed + 1)
    # Stale residual contents: the ring overwrites them with this call's errors.
    residuals = [(rng.standard_normal(n) * 10.0**log10_scale).astype(np.float32) for _ in range(world)]
    run_ring(name, bufs, chunks, residuals)
    assert_bit_identical(bufs)
    want = exact_sum(contribs)
    got = bufs[0].astype(np.float64)
    err = np.abs(got - want)
    b = ring_error_bound(name, contribs)
    bad = np.flatnonzero(~(err <= b))
    assert bad.size == 0, (
        f"{name} world {world} chunks {chunks}: {bad.size} elements outside the bound; "
        f"first at {bad[0]}: got {got[bad[0]]:.6g}, want {want[bad[0]]:.6g}, err {err[bad[0]]:.3g} > {b[bad[0]]:.3g}"
    )
    # Conservation: error feedback covers every encoding in the ring.
    kept = got + np.sum([r.astype(np.float64) for r in residuals], axis=0)
    miss = np.abs(kept - want) - conservation_tol(name, contribs)
    assert np.all(miss <= 0), f"{name}: result + residuals misses the exact sum by up to {miss.max():.3g}"


@SETTINGS
@given(data=st.data())
@pytest.mark.parametrize("name", LOSSY)
def test_lossy_ring_is_identical_bounded_and_conserves(name: str, data: st.DataObject) -> None:
    world, n, chunks, seed, log10_scale = data.draw(ring_cases(name))
    check_lossy_ring(name, world, n, chunks, seed, log10_scale)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("world", [2, 3, 8])
def test_lossy_ring_fixed_cases(name: str, world: int) -> None:
    """A few deterministic cases, including one chunk per segment and members chunking differently."""
    check_lossy_ring(name, world, 1001, [1000] * world, seed=world, log10_scale=0.0)
    check_lossy_ring(name, world, 257, [1, 7, 64, 1000, 3, 2, 300, 5][:world], seed=world + 1, log10_scale=1.0)


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_ring_actually_rounds(name: str) -> None:
    """Guards the tests above: a lossy ring's result is not the exact sum, yet the residuals
    account for the difference (so the conservation check has something to check)."""
    contribs = make_contribs(4, 300, seed=5, log10_scale=0.0)
    bufs = [c.copy() for c in contribs]
    residuals = [np.zeros(300, np.float32) for _ in range(4)]
    run_ring(name, bufs, [50] * 4, residuals)
    want = exact_sum(contribs)
    assert np.abs(bufs[0] - want).max() > 1e-5, "no rounding at all: is the codec really used?"
    assert all(np.any(r) for r in residuals), "every member encodes, so every residual is nonzero"


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_ring_without_residual(name: str) -> None:
    """The residual is optional: the same result bytes with or without it."""
    contribs = make_contribs(3, 500, seed=9, log10_scale=0.0)
    a = [c.copy() for c in contribs]
    b = [c.copy() for c in contribs]
    run_ring(name, a, [37] * 3, None)
    run_ring(name, b, [37] * 3, [np.zeros(500, np.float32) for _ in range(3)])
    assert_bit_identical(a + b)


def test_int8_ring_scale_is_per_chunk() -> None:
    """A huge value in one chunk must not wash out the small values of other chunks."""
    world, n = 2, 64
    contribs = [np.full(n, 1e-3, np.float32) for _ in range(world)]
    contribs[0][0] = 1e6
    bufs = [c.copy() for c in contribs]
    run_ring("int8", bufs, [4] * world, None)
    want = exact_sum(contribs)
    assert np.allclose(bufs[0][8:], want[8:], rtol=0.02), bufs[0][8:]


# -- fp32 ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=st.integers(1, 8), n=st.integers(0, 1500), chunks=st.lists(st.integers(1, 400), min_size=8, max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_fp32_ring_is_exact(world: int, n: int, chunks: list[int], seed: int) -> None:
    """Small integers sum exactly in float32, so the fp32 ring must equal the float64 sum cast
    to float32, bit for bit, on every member (members chunk differently)."""
    rng = np.random.default_rng(seed)
    contribs = [rng.integers(-1000, 1001, n).astype(np.float32) for _ in range(world)]
    bufs = [c.copy() for c in contribs]
    run_ring("fp32", bufs, chunks[:world], None)
    want = exact_sum(contribs).astype(np.float32)
    for r, b in enumerate(bufs):
        assert b.tobytes() == want.tobytes(), f"rank {r}"


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_fp32_ring_overwrites_residual_with_zeros(world: int) -> None:
    """Documented: ``residual`` is overwritten with this member's encoding errors (zeros when
    nothing was encoded). fp32 is exact, so stale residual contents must not survive."""
    n = 50
    rng = np.random.default_rng(world)
    bufs = [rng.integers(-9, 10, n).astype(np.float32) for _ in range(world)]
    want = exact_sum(bufs).astype(np.float32)
    residuals = [np.full(n, 0.25, np.float32) for _ in range(world)]
    run_ring("fp32", bufs, [7] * world, residuals)
    assert all(b.tobytes() == want.tobytes() for b in bufs)
    stale = [r for r in range(world) if np.any(residuals[r])]
    assert not stale, f"ranks {stale} kept their stale residual"


# -- codec mismatch --------------------------------------------------------------------------


@pytest.mark.parametrize("world,odd,odd_codec,others", [
    (2, 0, "bf16", "fp32"),
    (3, 1, "bf16", "fp32"),
    (5, 2, "bf16", "fp32"),
    (4, 3, "int8", "fp32"),
    (3, 0, "fp32", "int8"),
    (4, 1, "fp16", "bf16"),  # same payload size: only the header's codec id tells them apart
])
def test_codec_mismatch_fails_every_member(world: int, odd: int, odd_codec: str, others: str) -> None:
    """One member on a different codec: its successor and itself see 'codec mismatch'; the rest
    time out (ExchangeError) instead of hanging or summing garbage."""
    n, timeout = 100, 0.3
    bufs = [np.ones(n, np.float32) for _ in range(world)]
    names = [odd_codec if r == odd else others for r in range(world)]
    codecs = [get_codec(nm) for nm in names]
    _, errors = run_members(world, lambda r, link: ring_allreduce(bufs[r], r, world, link, timeout, 16, codecs[r]))
    assert all(isinstance(e, ExchangeError) for e in errors), errors
    succ = (odd + 1) % world
    for r in {odd, succ}:
        msg = str(errors[r])
        assert "codec mismatch" in msg, f"rank {r}: {msg}"
        assert names[r] in msg and names[(r - 1) % world] in msg, f"rank {r} should name both codecs: {msg}"
    rest = [e for r, e in enumerate(errors) if r not in {odd, succ}]
    assert not deadline_errors(rest, timeout), f"not ended by the {timeout}s deadline: {rest}"
    # Nobody finished with a "sum": no buffer equals the world-sized sum of ones.
    assert not any(np.array_equal(b, np.full(n, world, np.float32)) for b in bufs)


# -- delta averaging -------------------------------------------------------------------------


def run_delta(name: str, params: list[np.ndarray], base: np.ndarray, shares: list[float],
              residuals: list[np.ndarray], chunks: list[int]) -> None:
    world = len(params)
    codecs = [get_codec(name) for _ in range(world)]
    _, errors = run_members(world, lambda r, link: delta_ring_average(
        params[r], base, shares[r], r, world, link, 10.0, codecs[r], residuals[r], chunks[r]))
    assert errors == [None] * world, errors


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=st.integers(1, 8), n=st.integers(0, 300), chunks=st.lists(st.integers(1, 300), min_size=8, max_size=8),
       seed=st.integers(0, 2**32 - 1))
@pytest.mark.parametrize("name", ["fp32", *LOSSY])
def test_delta_ring_average_is_base_plus_weighted_mean_delta(name: str, world: int, n: int, chunks: list[int],
                                                              seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(n) * 3).astype(np.float32)
    params = [(base + rng.standard_normal(n) * 0.05).astype(np.float32) for _ in range(world)]
    weights = rng.integers(1, 100, world).astype(np.float64)
    shares = [float(w / weights.sum()) for w in weights]
    residuals = [(rng.standard_normal(n) * 1e-3).astype(np.float32) for _ in range(world)]  # last round's errors
    before_p = [p.copy() for p in params]
    before_r = [r.copy() for r in residuals]
    base_copy = base.copy()
    run_delta(name, params, base, shares, residuals, chunks[:world])
    assert base.tobytes() == base_copy.tobytes(), "base must not change"
    assert_bit_identical(params)
    b64 = base.astype(np.float64)
    # base + weighted mean of the deltas, plus the residuals fed back from last round (float64).
    want = b64 + np.sum([s * (p.astype(np.float64) - b64) + r for s, p, r in zip(shares, before_p, before_r)], axis=0)
    # What each member puts on the ring, for the codec bound (float32, as the member computes it).
    contribs = [((p - base) * np.float32(s) + r).astype(np.float32) for p, s, r in zip(before_p, shares, before_r)]
    a = np.sum([np.abs(c.astype(np.float64)) for c in contribs], axis=0)
    # Float32 rounding of p - base, of the scaling, of + residual, and of the final + base.
    slack = 4 * F32_EPS * (np.abs(b64) + a + np.abs(want - b64)) + 2.0**-140
    tol = (world * F32_EPS * a if name == "fp32" else ring_error_bound(name, contribs)) + slack
    got = params[0].astype(np.float64)
    err = np.abs(got - want)
    assert np.all(err <= tol), f"{name}: max excess {np.max(err - tol, initial=0):.3g}"
    if name == "fp32":
        return  # exact: its residual contract is checked in test_delta_ring_average_fp32_zeroes_residual
    # Conservation: result - base + new residuals == every contribution, up to float32 rounding.
    kept = got - b64 + np.sum([r.astype(np.float64) for r in residuals], axis=0)
    miss = np.abs(kept - (want - b64)) - (conservation_tol(name, contribs) + slack)
    assert np.all(miss <= 0), f"{name}: residuals do not account for the encoding errors ({np.max(miss, initial=0):.3g})"


@pytest.mark.parametrize("name", ["fp32", *LOSSY])
def test_delta_ring_average_equals_weighted_mean(name: str) -> None:
    """Concrete case: zero residuals, shares 0.5/0.25/0.25 of deltas +-0.01: the result is base +
    the weighted mean delta within the codec bound."""
    n, world = 200, 3
    rng = np.random.default_rng(1)
    base = rng.standard_normal(n).astype(np.float32)
    deltas = [np.full(n, 0.01, np.float32), np.full(n, -0.01, np.float32), rng.uniform(-0.01, 0.01, n).astype(np.float32)]
    params = [base + d for d in deltas]
    shares = [0.5, 0.25, 0.25]
    residuals = [np.zeros(n, np.float32) for _ in range(world)]
    run_delta(name, params, base, shares, residuals, [16] * world)
    assert_bit_identical(params)
    mean = np.sum([s * (p.astype(np.float64) - base) for s, p in zip(shares, [base + d for d in deltas])], axis=0)
    want = base.astype(np.float64) + mean
    contribs = [np.abs(mean).astype(np.float32) + 0.01 for _ in range(world)]  # each |share * delta| <= 0.005
    tol = (ring_error_bound(name, contribs) if name != "fp32" else 0.0) + 4 * F32_EPS * (np.abs(base) + 0.1)
    assert np.all(np.abs(params[0] - want) <= tol), np.abs(params[0] - want).max()
    if name == "fp32":
        assert not any(np.any(r) for r in residuals)


def test_delta_ring_average_error_feedback_over_rounds() -> None:
    """Members keep proposing the same small change for many rounds, each round committing the
    result as the next base. With int8 the change (below half a step next to an outlier) would
    be lost every round; error feedback makes the base track the true cumulative change."""
    n, world, rounds = 32, 2, 300
    base = np.zeros(n, np.float32)
    delta = np.full(n, 1e-3, np.float32)
    delta[0] = 1.0  # the outlier sets the chunk's scale: 1/127 per step, 1e-3 is below half a step
    residuals = [np.zeros(n, np.float32) for _ in range(world)]
    for _ in range(rounds):
        params = [base + delta for _ in range(world)]
        run_delta("int8", params, base, [0.5, 0.5], residuals, [n] * world)
        assert_bit_identical(params)
        base = params[0].copy()
    want = rounds * delta.astype(np.float64)
    err = np.abs(base - want)
    assert err[1:].max() < 2 * world / 127 + rounds * 1e-6, err.max()  # bounded, not rounds * 1e-3 = 0.3


def test_delta_ring_average_fp32_zeroes_residual() -> None:
    """Documented: the residual is 'overwritten with this round's encoding errors'; fp32 makes
    none, so after the call it must be zeros, or next round adds last round's residual again."""
    n, world = 8, 2
    base = np.zeros(n, np.float32)
    params = [np.full(n, 1.0, np.float32), np.full(n, 3.0, np.float32)]
    residuals = [np.full(n, 0.5, np.float32) for _ in range(world)]
    run_delta("fp32", params, base, [0.5, 0.5], residuals, [4] * world)
    assert np.all(params[0] == 3.0)  # 0.5 * 1 + 0.5 * 3 + 0.5 + 0.5: the residuals fed in once
    assert not any(np.any(r) for r in residuals), f"stale residuals: {[r.tolist() for r in residuals]}"


@pytest.mark.parametrize("share", [-0.01, 1.0001, 2.0, float("nan"), float("inf"), -float("inf")])
def test_delta_ring_average_rejects_share_outside_unit_interval(share: float) -> None:
    params, base, res = np.ones(4, np.float32), np.zeros(4, np.float32), np.full(4, 0.5, np.float32)
    with pytest.raises(ValueError, match="share"):
        delta_ring_average(params, base, share, 0, 1, InMemoryRing(1).link(0), 1.0, get_codec("bf16"), res)
    assert np.all(params == 1) and np.all(res == 0.5), "a rejected call must not touch its inputs"


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_delta_ring_average_accepts_share_bounds(share: float) -> None:
    params, base, res = np.full(4, 2.0, np.float32), np.ones(4, np.float32), np.zeros(4, np.float32)
    delta_ring_average(params, base, share, 0, 1, InMemoryRing(1).link(0), 1.0, get_codec("bf16"), res)
    assert np.all(params == 1.0 + share)


@pytest.mark.parametrize("pshape,bshape,rshape", [
    ((6,), (5,), (6,)),
    ((6,), (6,), (5,)),
    ((6,), (6, 1), (6,)),
    ((6,), (6,), (2, 3)),
    ((6,), (7,), (7,)),
])
def test_delta_ring_average_rejects_shape_mismatch(pshape: tuple, bshape: tuple, rshape: tuple) -> None:
    params, base, res = np.ones(pshape, np.float32), np.zeros(bshape, np.float32), np.full(rshape, 0.5, np.float32)
    with pytest.raises(ValueError, match="shape"):
        delta_ring_average(params, base, 0.5, 0, 2, InMemoryRing(2).link(0), 1.0, get_codec("int8"), res)
    assert np.all(params == 1) and np.all(res == 0.5), "a rejected call must not touch its inputs"


def test_delta_ring_average_bad_residual_dtype_leaves_inputs_alone() -> None:
    params, base, res = np.arange(4, dtype=np.float32), np.ones(4, np.float32), np.full(4, 0.5, np.float64)
    with pytest.raises(ValueError):
        delta_ring_average(params, base, 0.5, 0, 1, InMemoryRing(1).link(0), 1.0, get_codec("bf16"), res)
    assert params.tolist() == [0.0, 1.0, 2.0, 3.0], f"params changed to {params.tolist()}"
