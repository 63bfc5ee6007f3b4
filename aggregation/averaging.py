"""Weighted parameter averaging over a ring, and parameter digests.

Exact (fp32): the weight travels as one extra element at the end of the flat buffer; each member
scales its parameters by its weight, the ring sums both, and each member divides by the summed
weight. Compressed (bf16, fp16, int8): each member sends its *change* since the committed
parameters every member shares, scaled by its share of the total weight, plus its error-feedback
residual; the ring sums the changes and each member adds the sum to the shared base. Changes are
small and centred, which is what lossy codecs encode well, and the residual carries every
encoding error into the next round instead of dropping it. Either way every member runs the same
float operations on the same bytes, so results stay bit-identical.
"""
from __future__ import annotations

import numpy as np

from dml.aggregation.allreduce import DEFAULT_CHUNK_ELEMS, ring_allreduce
from dml.aggregation.codecs import Codec
from dml.aggregation.digests import digest  # noqa: F401 - re-exported: the members' parameter digest
from dml.aggregation.guard import RingGuard
from dml.aggregation.transport import RingLink


def weighted_ring_average(
    buf: np.ndarray, weight: float, rank: int, world: int, link: RingLink, timeout: float,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS, guard: RingGuard | None = None, collective: int = 0,
    final: bool = True,
) -> float:
    """Averages ``buf[:-1]`` across the ring, weighted; ``buf[-1]`` is scratch for the weight.

    Returns the total weight. ``weight`` is the samples this member processed; 0 is allowed (a
    member with no data this round keeps the others' average) as long as some member has more.
    Raises ValueError if every weight is 0. ``guard`` checks every received chunk
    (:mod:`aggregation.guard`); give it the members' weights as samples. ``buf`` may as well
    hold gradients (``--sync grads`` averages each step's); ``collective`` and ``final`` are
    :func:`~aggregation.allreduce.ring_allreduce`'s, for several averages over one link.
    """
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    params = buf[:-1]
    params *= np.float32(weight)
    buf[-1] = np.float32(weight)
    ring_allreduce(buf, rank, world, link, timeout, chunk_elems, guard=guard, collective=collective, final=final)
    total = float(buf[-1])
    if total <= 0:
        raise ValueError("every member had weight 0: nothing to average")
    params /= np.float32(total)
    return total


def delta_ring_average(
    params: np.ndarray, base: np.ndarray, share: float, rank: int, world: int, link: RingLink,
    timeout: float, codec: Codec, residual: np.ndarray, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    guard: RingGuard | None = None,
) -> None:
    """Replaces ``params`` by ``base + sum_i share_i * (params_i - base)`` over the ring.

    ``base`` must be the same bytes on every member (the committed parameters the round started
    from); ``share`` is this member's weight over the total (the plan fixes both, so no weight
    travels). Works in place on ``params``: no model-sized temporary. ``residual`` (float32, like
    ``params``) is the error-feedback state: added into this round's contribution, then
    overwritten with this round's encoding errors. On ExchangeError ``params`` and ``residual`` are undefined;
    the caller restores the parameters and should zero the residual. ``guard`` checks every
    received chunk (:mod:`aggregation.guard`); give it the members' shares as weights.
    """
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if base.shape != params.shape or residual.shape != params.shape or params.ndim != 1:
        raise ValueError("params, base and residual must be 1-D and of the same shape")
    if not params.dtype == base.dtype == residual.dtype == np.float32:
        raise ValueError("params, base and residual must be float32")
    np.subtract(params, base, out=params)
    params *= np.float32(share)
    params += residual
    ring_allreduce(params, rank, world, link, timeout, chunk_elems, codec, residual, guard)
    params += base


def weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Reference weighted mean in float64 (for tests and single-process baselines)."""
    if len(arrays) != len(weights) or not arrays:
        raise ValueError("need one weight per array and at least one array")
    w = np.asarray(weights, dtype=np.float64)
    return (np.stack([a.astype(np.float64) for a in arrays]) * w[:, None]).sum(0) / w.sum()
