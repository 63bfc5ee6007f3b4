"""Wire codecs for the ring: how a float32 chunk travels, and the error that costs.

Every codec encodes a float32 chunk into a byte buffer the caller owns (no allocation per chunk)
and decodes it back into, or onto, a float32 slice; accumulation is always float32. The error
bounds below are per element, for round-to-nearest encoding of a chunk ``x``:

- ``fp32``: exact (the bytes are the values).
- ``bf16``: ``|err| <= 2**-8 * |x|`` (8 significant bits) for normal values; values beyond
  bf16's largest (about 3.39e38) become infinite.
- ``fp16``: ``|err| <= 2**-11 * |x|`` for ``2**-14 <= |x| <= 65504``; ``|err| <= 2**-25`` below
  that (subnormals); values beyond 65504 saturate to +-65504 rather than becoming infinite.
- ``int8``: one float32 scale per chunk, ``scale = max|x| / 127``, ``q = round(x / scale)``;
  ``|err| <= scale / 2 = max|x| / 254`` (plus float32 rounding of the product).

**Error feedback.** ``encode`` can write its own error (``x - decode(encode(x))``) into a
residual slice. A peer that adds its residual into its next contribution sends, over rounds,
exactly what it meant to send: compression error is carried forward instead of lost, so it does not
accumulate (Seide et al. 2014; Karimireddy et al. 2019). Decoding is a pure function of the
bytes, so every member that decodes the same bytes gets bit-identical float32 values.

The lossy codecs use torch's vectorised casts (one pass each, the GIL released); fp32 needs only
numpy. int8's scale is the float32 value the receiver reads, so sender and receivers decode alike;
non-finite input gives a non-finite scale and decodes to NaN, as fp32 would carry it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

FP16_MAX = 65504.0


class Codec:
    """A wire format for float32 chunks. Subclasses fill in the methods.

    Codecs work on their *native* arrays: :meth:`wrap` turns a numpy array into one (numpy itself
    for fp32, a torch tensor sharing its memory for the lossy codecs). Wrap whole buffers once and
    slice the wrapped form: wrapping per chunk would cost more than encoding it.
    """

    name = ""
    id = 0
    bound = ""  # the documented error bound, for messages and docs
    exact = False  # decoding gives back exactly what was encoded

    def wrap(self, a: np.ndarray) -> Any:
        """The native form of ``a`` (same memory)."""
        raise NotImplementedError

    @staticmethod
    def payload_bytes(n: int) -> int:
        """Bytes on the wire for ``n`` elements."""
        raise NotImplementedError

    def encode(self, src: Any, out: Any, residual: Any = None) -> int:
        """Writes the wire form of float32 ``src`` into the start of uint8 ``out``; returns the
        bytes written. With ``residual`` (float32, same size as ``src``), writes the encoding
        error ``src - decode(...)`` into it (overwriting it: one pass, not two)."""
        raise NotImplementedError

    def decode_into(self, payload: Any, out: Any) -> None:
        """``out[:] = decode(payload)`` for a float32 slice ``out``."""
        raise NotImplementedError

    def decode_add(self, payload: Any, out: Any) -> None:
        """``out += decode(payload)`` in float32."""
        raise NotImplementedError


class Fp32(Codec):
    """The identity: float32 little-endian. The sender can put its buffer on the wire as is."""

    name, id, bound, exact = "fp32", 1, "exact", True

    def wrap(self, a: np.ndarray) -> np.ndarray:
        return a

    @staticmethod
    def payload_bytes(n: int) -> int:
        return 4 * n

    def encode(self, src: np.ndarray, out: np.ndarray, residual: Any = None) -> int:
        out[: 4 * src.size].view(np.float32)[:] = src
        if residual is not None:
            residual.fill(0.0)
        return 4 * src.size

    def decode_into(self, payload: np.ndarray, out: np.ndarray) -> None:
        out[:] = payload[: 4 * out.size].view(np.float32)

    def decode_add(self, payload: np.ndarray, out: np.ndarray) -> None:
        np.add(out, payload[: 4 * out.size].view(np.float32), out=out)


class _Torch(Codec):
    """A lossy codec computed with torch's vectorised kernels (the GIL released)."""

    def __init__(self) -> None:
        import torch

        self._torch = torch

    def wrap(self, a: np.ndarray) -> torch.Tensor:
        return self._torch.from_numpy(a)


class _Half(_Torch):
    """A 16-bit float format (bf16 or fp16), round-to-nearest-even by torch's cast."""

    clamp: float | None = None
    dtype_name = ""

    def __init__(self) -> None:
        super().__init__()
        self._dtype = getattr(self._torch, self.dtype_name)

    @staticmethod
    def payload_bytes(n: int) -> int:
        return 2 * n

    def encode(self, src: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> int:
        n = src.numel()
        wire = out[: 2 * n].view(self._dtype)
        if self.clamp is not None:
            wire.copy_(self._torch.clamp(src, -self.clamp, self.clamp))
        else:
            wire.copy_(src)
        if residual is not None:
            self._torch.sub(src, wire, out=residual)
        return 2 * n

    def decode_into(self, payload: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(payload[: 2 * out.numel()].view(self._dtype))

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor) -> None:
        out.add_(payload[: 2 * out.numel()].view(self._dtype))


class Bf16(_Half):
    """bfloat16: float32's range, 8 significant bits. Half the bytes of fp32."""

    name, id, bound, dtype_name = "bf16", 2, "|err| <= 2^-8 |x|", "bfloat16"


class Fp16(_Half):
    """IEEE half: 11 significant bits, range +-65504 (saturated)."""

    name, id, bound, dtype_name = "fp16", 3, "|err| <= 2^-11 |x| (|x| >= 2^-14), 2^-25 below; saturates at 65504", "float16"
    clamp = FP16_MAX


class Int8(_Torch):
    """Symmetric int8 with one float32 scale per chunk: 4 + n bytes for n elements."""

    name, id, bound = "int8", 4, "|err| <= max|x| / 254 per chunk"

    def __init__(self) -> None:
        super().__init__()
        self._tmp = self._torch.empty(0, dtype=self._torch.float32)  # reused between calls

    @staticmethod
    def payload_bytes(n: int) -> int:
        return 4 + n

    def _scratch(self, n: int) -> torch.Tensor:
        if self._tmp.numel() < n:
            self._tmp = self._torch.empty(n, dtype=self._torch.float32)
        return self._tmp[:n]

    def encode(self, src: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> int:
        torch = self._torch
        n = src.numel()
        peak = 0.0
        if n:
            lo, hi = torch.aminmax(src)
            peak = max(-float(lo), float(hi)) if not (math.isnan(lo) or math.isnan(hi)) else math.nan
        if not math.isfinite(peak):
            scale = math.nan  # NaN or infinity in the chunk: it decodes to NaN, as fp32 would carry it
        else:
            scale = float(np.float32(peak / 127.0)) if peak > 0 else 1.0  # what the receiver reads back
        out[:4].view(torch.float32).fill_(scale)
        tmp = self._scratch(n)
        torch.div(src, scale, out=tmp)  # not a multiply by 1/scale: that overflows for tiny chunks
        tmp.round_().clamp_(-127.0, 127.0)
        out[4 : 4 + n].view(torch.int8).copy_(tmp)
        if residual is not None:
            torch.sub(src, tmp.mul_(scale), out=residual)  # tmp now holds the decoded values
        return 4 + n

    def decode_into(self, payload: torch.Tensor, out: torch.Tensor) -> None:
        scale = float(payload[:4].view(self._torch.float32))
        out.copy_(payload[4 : 4 + out.numel()].view(self._torch.int8))
        out.mul_(scale)

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor) -> None:
        tmp = self._scratch(out.numel())
        self.decode_into(payload, tmp)
        out.add_(tmp)


_CODECS: tuple[type[Codec], ...] = (Fp32, Bf16, Fp16, Int8)
_BY_NAME = {c.name: c for c in _CODECS}
_BY_ID = {c.id: c for c in _CODECS}
CODEC_NAMES = tuple(_BY_NAME)


def get_codec(name: str) -> Codec:
    """A fresh codec instance by name (instances hold scratch space: one per ring member)."""
    try:
        return _BY_NAME[name or "fp32"]()
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}") from None


def codec_name(codec_id: int) -> str:
    """The name of a codec id as it appears on the wire (``"?N"`` if unknown)."""
    cls = _BY_ID.get(codec_id)
    return cls.name if cls else f"?{codec_id}"


def payload_size(codec_id: int, count: int) -> int:
    """Wire bytes of ``count`` elements in codec ``codec_id``; ValueError for an unknown id."""
    if codec_id not in _BY_ID:
        raise ValueError(f"unknown codec id {codec_id}")
    return _BY_ID[codec_id].payload_bytes(count)
