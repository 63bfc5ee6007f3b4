"""Wire codecs (aggregation.codecs): round-trip error bounds, payload sizes, error feedback.

The bounds checked are the ones the module docstring documents, per element:

- fp32: exact;  bf16: ``|err| <= 2**-8 |x|``;
- fp16: ``|err| <= 2**-11 |x|`` on ``[2**-14, 65504]``, ``<= 2**-25`` below, saturation beyond;
- int8: ``|err| <= max|x| / 254`` per chunk, plus float32 rounding of the product.

Inputs go through each codec's native form (``wrap``), as the ring uses it, at nonzero offsets
into bigger buffers, so slicing bugs show too.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dml.aggregation.codecs import (
    CODEC_NAMES,
    FP16_MAX,
    codec_name,
    get_codec,
    payload_size,
)

LOSSY = ["bf16", "fp16", "int8"]
F32_EPS = 2.0**-23  # float32 relative spacing at 1 (twice the unit roundoff)
SETTINGS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SENTINEL = 0xA5


def encode(name: str, x: np.ndarray, residual: np.ndarray | None = None, codec=None) -> tuple[np.ndarray, int]:
    """Encodes float32 ``x`` into a sentinel-filled buffer bigger than needed; returns (buf, nbytes)."""
    c = codec or get_codec(name)
    out = np.full(c.payload_bytes(x.size) + 13, SENTINEL, dtype=np.uint8)
    nres = None if residual is None else c.wrap(residual)
    nb = c.encode(c.wrap(x), c.wrap(out), nres)
    return out, nb


def decode(name: str, payload: np.ndarray, n: int, codec=None) -> np.ndarray:
    c = codec or get_codec(name)
    y = np.full(n, np.float32(-7.25), dtype=np.float32)  # garbage that decode_into must overwrite
    c.decode_into(c.wrap(payload), c.wrap(y))
    return y


def values(n: int, seed: int, log10_lo: float, log10_hi: float) -> np.ndarray:
    """``n`` float32 values, random signs, log-uniform magnitudes in [10**lo, 10**hi], with a few
    exact zeros and negative zeros mixed in."""
    rng = np.random.default_rng(seed)
    mag = 10.0 ** rng.uniform(log10_lo, log10_hi, n)
    x = (mag * rng.choice([-1.0, 1.0], n)).astype(np.float32)
    if n:
        k = rng.integers(0, n, max(1, n // 50))
        x[k[::2]] = 0.0
        x[k[1::2]] = -0.0
    return x


def offset_view(x: np.ndarray, offset: int = 3) -> np.ndarray:
    """``x`` copied into a bigger buffer at an element offset: a slice like the ring passes."""
    big = np.full(x.size + offset + 2, np.float32(99.0), dtype=np.float32)
    big[offset : offset + x.size] = x
    return big[offset : offset + x.size]


def bound(name: str, x: np.ndarray, chunk_peak: float | None = None) -> np.ndarray:
    """The documented per-element bound (float64) for encoding ``x`` as one chunk."""
    ax = np.abs(x.astype(np.float64))
    if name == "fp32":
        return np.zeros_like(ax)
    if name == "bf16":
        return 2.0**-8 * ax + 2.0**-134  # + half a bf16 subnormal step, for float32 subnormal inputs
    if name == "fp16":
        return np.where(ax >= 2.0**-14, 2.0**-11 * ax, 2.0**-25)
    if name == "int8":
        peak = float(ax.max(initial=0.0)) if chunk_peak is None else chunk_peak
        # scale/2 with scale's own float32 rounding, plus the rounding of x / scale and q * scale.
        return peak / 254.0 * (1 + 2.0**-22) + 2.0**-22 * ax
    raise AssertionError(name)


# -- round trips -----------------------------------------------------------------------------


def check_round_trip(name: str, x: np.ndarray) -> np.ndarray:
    c = get_codec(name)
    src = offset_view(x)
    before = src.copy()
    out, nb = encode(name, src, codec=c)
    assert nb == c.payload_bytes(x.size) == payload_size(c.id, x.size)
    assert np.all(out[nb:] == SENTINEL), "encode wrote past the payload"
    assert src.tobytes() == before.tobytes(), "encode changed its input"
    y = decode(name, out[:nb], x.size, codec=c)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    b = bound(name, x)
    bad = np.flatnonzero(~(err <= b))
    assert bad.size == 0, (
        f"{name}: {bad.size} of {x.size} elements outside the bound ({c.bound}); first at {bad[0]}: "
        f"x={x[bad[0]]!r} decoded={y[bad[0]]!r} err={err[bad[0]]:.3g} bound={b[bad[0]]:.3g}"
    )
    # decode_add adds exactly what decode_into gives, in float32.
    rng = np.random.default_rng(x.size)
    acc0 = (rng.standard_normal(x.size) * max(1.0, float(np.abs(x).max(initial=0.0)))).astype(np.float32)
    acc = offset_view(acc0, 5)
    c.decode_add(c.wrap(out[:nb]), c.wrap(acc))
    want = np.add(acc0, y, dtype=np.float32)
    assert acc.tobytes() == want.tobytes(), f"{name}: decode_add differs from acc + decode_into"
    return y


@SETTINGS
@given(n=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1), log10_scale=st.floats(-30, 30), spread=st.floats(0, 6))
@pytest.mark.parametrize("name", ["bf16", "int8"])
def test_wide_range_codecs_round_trip_within_bound(name: str, n: int, seed: int, log10_scale: float, spread: float) -> None:
    """bf16 and int8 keep their bound at any scale between 1e-30 and 1e30 (values spread over up
    to six decades within a chunk, so int8's per-chunk scale is exercised)."""
    x = values(n, seed, log10_scale - spread, log10_scale)
    check_round_trip(name, x)


@SETTINGS
@given(n=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1), lo=st.floats(-10, 6), width=st.floats(0, 6))
def test_fp16_round_trip_within_bound_subnormals_and_saturation(n: int, seed: int, lo: float, width: float) -> None:
    """Magnitudes from 1e-10 (below fp16's subnormals) to 1e12 (far beyond 65504)."""
    x = values(n, seed, lo, lo + width)
    big = np.abs(x) > FP16_MAX
    check_round_trip("fp16", np.where(big, 0, x).astype(np.float32))  # the bound, on the in-range part
    out, nb = encode("fp16", x)
    y = decode("fp16", out[:nb], x.size)
    assert np.all(np.isfinite(y)), "fp16 produced inf"
    assert np.array_equal(y[big], np.sign(x[big]) * np.float32(FP16_MAX)), "beyond 65504 must saturate to +-65504"


def test_fp16_edges() -> None:
    x = np.array(
        [FP16_MAX, -FP16_MAX, 65505.0, 65519.0, 65520.0, -65520.0, 1e6, 3.4028235e38, -3.4028235e38,
         2.0**-14, -(2.0**-14), 2.0**-14 * 0.999, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-30, 0.0, -0.0],
        dtype=np.float32,
    )
    out, nb = encode("fp16", x)
    y = decode("fp16", out[:nb], x.size)
    assert np.all(np.isfinite(y))
    assert list(y[:9]) == [FP16_MAX, -FP16_MAX, FP16_MAX, FP16_MAX, FP16_MAX, -FP16_MAX, FP16_MAX, FP16_MAX, -FP16_MAX]
    assert y[9] == 2.0**-14 and y[10] == -(2.0**-14)  # smallest normal: exact
    assert y[12] == 2.0**-24  # smallest subnormal: exact
    assert y[13] == 0.0  # half the smallest subnormal: ties to even (0)
    assert y[14] == 2.0**-24  # 0.75 of it rounds up
    small = np.abs(x.astype(np.float64)) < 2.0**-14
    assert np.all(np.abs(y[small].astype(np.float64) - x[small]) <= 2.0**-25)
    assert np.signbit(y[-1]) and not np.signbit(y[-2]), "signed zeros survive"


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_codecs_keep_nan_and_signed_zero(name: str) -> None:
    """bf16/fp16 keep NaN as NaN; every codec keeps zeros zero."""
    x = np.array([0.0, -0.0, 1.0, -2.5], np.float32)
    y = check_round_trip(name, x)
    assert y[0] == 0 and y[1] == 0
    if name != "int8":
        assert np.signbit(y[1])
        out, nb = encode(name, np.array([np.nan, 1.0], np.float32))
        assert np.isnan(decode(name, out[:nb], 2)[0])


@SETTINGS
@given(n=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_fp32_is_bitwise_exact(n: int, seed: int) -> None:
    """Any bit pattern, including NaN payloads, negative zero, infinities and subnormals."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    specials = np.array([0x80000000, 0x7FC00001, 0xFFBFFFFF, 0x7F800000, 0xFF800000, 0x00000001, 0x7F7FFFFF], np.uint32)
    x = np.concatenate([x, specials.view(np.float32)])
    c = get_codec("fp32")
    src = offset_view(x)
    out, nb = encode("fp32", src, codec=c)
    assert nb == 4 * x.size and np.all(out[nb:] == SENTINEL)
    assert out[:nb].tobytes() == x.tobytes(), "fp32 wire bytes are the values, little-endian"
    y = decode("fp32", out[:nb], x.size, codec=c)
    assert y.view(np.uint32).tolist() == x.view(np.uint32).tolist()
    # decode_add on finite values: plain float32 addition.
    fin = rng.standard_normal(max(n, 1)).astype(np.float32)[:n]
    out, nb = encode("fp32", fin)
    acc0 = rng.standard_normal(n).astype(np.float32)
    acc = acc0.copy()
    c.decode_add(c.wrap(out[:nb]), c.wrap(acc))
    assert acc.tobytes() == (acc0 + fin).tobytes()


def test_int8_uses_one_scale_per_chunk() -> None:
    """The bound is relative to the chunk's peak, and the scale travels in the first 4 bytes."""
    x = np.array([127.0, 0.4, -0.6, 63.5, -127.0, 1.0], np.float32)
    out, nb = encode("int8", x)
    assert nb == 4 + x.size
    assert out[:4].view(np.float32)[0] == np.float32(1.0)
    q = out[4:nb].view(np.int8).tolist()
    assert q == [127, 0, -1, 64, -127, 1]  # round half to even: 63.5 -> 64
    assert decode("int8", out[:nb], x.size).tolist() == [127.0, 0.0, -1.0, 64.0, -127.0, 1.0]


def test_int8_all_zero_chunk_decodes_to_zero() -> None:
    x = np.zeros(17, np.float32)
    out, nb = encode("int8", x)
    assert np.array_equal(decode("int8", out[:nb], x.size), x)


def test_int8_nan_input_decodes_to_nan() -> None:
    """Module docstring: 'non-finite input gives a non-finite scale and decodes to NaN'."""
    x = np.array([np.nan, 1.0, 0.5, 0.25], np.float32)
    out, nb = encode("int8", x)
    y = decode("int8", out[:nb], x.size)
    assert not np.isfinite(out[:4].view(np.float32)[0]), f"scale is {out[:4].view(np.float32)[0]}"
    assert np.isnan(y[0]), f"NaN decoded as {y[0]}"


def test_int8_inf_input_decodes_to_nan() -> None:
    x = np.array([np.inf, 1.0, 0.5], np.float32)
    out, nb = encode("int8", x)
    assert not np.isfinite(out[:4].view(np.float32)[0])
    assert np.all(np.isnan(decode("int8", out[:nb], x.size)))


def test_int8_bound_holds_for_tiny_chunks() -> None:
    x = np.array([1e-37, 5e-38, -2e-38, 0.0], np.float32)
    out, nb = encode("int8", x)
    y = decode("int8", out[:nb], x.size)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= bound("int8", x)), f"decoded {y.tolist()} for {x.tolist()}"


# -- sizes and names -------------------------------------------------------------------------


@pytest.mark.parametrize("name,per_elem,fixed", [("fp32", 4, 0), ("bf16", 2, 0), ("fp16", 2, 0), ("int8", 1, 4)])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 1000, 4097])
def test_payload_sizes_agree(name: str, per_elem: int, fixed: int, n: int) -> None:
    c = get_codec(name)
    assert c.name == name and codec_name(c.id) == name
    want = fixed + per_elem * n
    assert c.payload_bytes(n) == want
    assert payload_size(c.id, n) == want
    x = np.linspace(-3, 3, n, dtype=np.float32)
    _, nb = encode(name, x, codec=c)
    assert nb == want


def test_codec_ids_are_distinct_and_names_complete() -> None:
    ids = [get_codec(n).id for n in CODEC_NAMES]
    assert len(set(ids)) == len(ids)
    assert set(CODEC_NAMES) == {"fp32", "bf16", "fp16", "int8"}
    assert get_codec("").name == "fp32", "an empty name means the default, fp32"
    assert get_codec("int8") is not get_codec("int8"), "instances hold scratch: one per ring member"


@pytest.mark.parametrize("bad", ["FP32", "float32", "int4", "bf16 ", "nope"])
def test_unknown_codec_name_is_value_error(bad: str) -> None:
    with pytest.raises(ValueError) as ei:
        get_codec(bad)
    msg = str(ei.value)
    assert repr(bad) in msg
    for name in CODEC_NAMES:
        assert name in msg, f"message should list the choices: {msg}"


@pytest.mark.parametrize("bad", [0, 5, 99, 255, -1])
def test_unknown_codec_id(bad: int) -> None:
    with pytest.raises(ValueError, match=f"unknown codec id {bad}"):
        payload_size(bad, 10)
    assert codec_name(bad) == f"?{bad}"


# -- error feedback --------------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1), log10_scale=st.floats(-3, 3), rscale=st.floats(0, 1))
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_residual_receives_exactly_the_encoding_error(name: str, n: int, seed: int, log10_scale: float, rscale: float) -> None:
    """``encode`` writes its error into the residual, overwriting what was there:
    ``src == decode(encode(src)) + residual_after`` up to float32 rounding, whatever
    ``residual_before`` held (fp32: the residual becomes zeros)."""
    rng = np.random.default_rng(seed)
    src = (rng.standard_normal(n) * 10.0**log10_scale).astype(np.float32)
    r0 = (rng.standard_normal(n) * 10.0**log10_scale * rscale).astype(np.float32)  # stale state
    res = offset_view(r0, 1)
    out, nb = encode(name, offset_view(src), residual=res)
    y = decode(name, out[:nb], n)
    err = src.astype(np.float64) - (y.astype(np.float64) + res)
    tol = F32_EPS / 2 * np.abs(src - y.astype(np.float64))  # one float32 rounding of the difference
    worst = np.abs(err) - tol
    assert np.all(worst <= 0), f"{name}: residual misses the encoding error by up to {worst.max():.3g}"
    assert np.all(np.abs(res) <= bound(name, src)), f"{name}: residual exceeds the codec bound"
    assert res.base is not None and np.all(res.base[[0, -1]] == 99.0), "encode wrote outside the residual slice"
    if name == "fp32":
        assert not np.any(res), "fp32 is exact: its residual is zero"


def test_encoding_without_residual_leaves_no_trace() -> None:
    """Same bytes with or without a residual: error feedback does not change the encoding."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(777).astype(np.float32)
    for name in LOSSY:
        a, na = encode(name, x)
        b, nb = encode(name, x, residual=np.zeros_like(x))
        assert na == nb and a[:na].tobytes() == b[:nb].tobytes(), name


# Signals a codec loses entirely each round when sent alone: int8 values below half a step next
# to a peak of 1, bf16/fp16 a relative offset below half an ulp of 1.
DRIFT_CASES = {
    "int8": (np.array([1.0] + [1e-3, -2e-3, 3e-3, 1.5e-3] * 4, np.float32), 1.0 / 127),
    "bf16": (np.full(16, 1 + 2.0**-10, np.float32), 2.0**-7),
    "fp16": (np.full(16, 1 + 2.0**-13, np.float32), 2.0**-10),
}


@pytest.mark.parametrize("name", LOSSY)
def test_error_feedback_keeps_cumulative_error_bounded(name: str) -> None:
    """Sending a fixed signal for many rounds, each round adding the residual in and letting
    encode overwrite it with the new error (as delta_ring_average does): the cumulative decoded sum stays within about half a quantisation
    step of the cumulative true sum at every round. Without the residual it drifts linearly."""
    signal, step = DRIFT_CASES[name]
    rounds = 1500
    c = get_codec(name)
    out = np.zeros(c.payload_bytes(signal.size), np.uint8)
    res = np.zeros_like(signal)
    dec = np.zeros_like(signal)
    cum_fb = np.zeros(signal.size)
    cum_plain = np.zeros(signal.size)
    true = signal.astype(np.float64)
    limit = step / 2 * 1.01 + rounds * F32_EPS * 2  # half a step, plus float32 rounding of src + res
    worst_fb = 0.0
    for k in range(1, rounds + 1):
        src = signal + res  # as delta_ring_average: add the residual in, encode overwrites it
        nb = c.encode(c.wrap(src), c.wrap(out), c.wrap(res))
        c.decode_into(c.wrap(out[:nb]), c.wrap(dec))
        cum_fb += dec
        worst_fb = max(worst_fb, float(np.abs(cum_fb - k * true).max()))
        nb = c.encode(c.wrap(signal.copy()), c.wrap(out))
        c.decode_into(c.wrap(out[:nb]), c.wrap(dec))
        cum_plain += dec
    assert worst_fb <= limit, f"{name}: with error feedback the cumulative error reached {worst_fb:.3g} > {limit:.3g}"
    drift = float(np.abs(cum_plain - rounds * true).max())
    assert drift > 20 * limit, f"{name}: the case should drift without feedback (drift {drift:.3g})"
    # Drift without feedback grows with the rounds: it is the per-round loss times the rounds.
    per_round = np.abs(dec.astype(np.float64) - true).max()
    assert drift == pytest.approx(per_round * rounds, rel=1e-3)
