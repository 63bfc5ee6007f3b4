"""Gossip averaging: the pairwise push-pull step, one peer's exchange slot, consensus distance.

In gossip mode (D-PSGD / AD-PSGD, Lian et al. 2017, 2018) there is no global barrier: after its
local steps a peer picks a partner (:mod:`aggregation.topology`) and the two replace their
parameters by their weighted mean. Each peer also carries a weight (samples processed, or 1);
an exchange gives both sides the weighted mean of the parameters and the plain mean of the
weights, so the *mass* ``sum_i w_i x_i`` and the total weight ``sum_i w_i`` are conserved by
every exchange (up to float rounding), and repeated exchanges over a connected topology drive
every peer to the weighted mean of the starting parameters.

An exchange is two-phase, seen from each side by its :class:`Exchanger`:

1. ``try_begin(partner)``: the peer's slot goes from idle to busy. A peer is idle or in exactly
   one exchange; a busy peer refuses (``False``) and the initiator tries its next candidate.
2. ``stage(partner, theirs)``: the partner's copy (a :class:`Snapshot`) has arrived. Nothing
   is applied yet.
3. ``commit(partner, mine, w_mine)`` applies the staged copy (:func:`pair_average`) and frees
   the slot; ``abort(partner)`` frees it and drops the copy, leaving ``mine`` untouched.

A driver commits only once *both* sides have staged, and aborts both on any failure before
that, so an exchange is applied by both sides or by neither; the in-memory driver in
:mod:`aggregation.gossip_sim` does exactly this. Over a network the two commits are separate
messages and a crash between them cannot be ruled out (the two generals' problem): the wiring
should keep that window to one message (B stages A's copy and replies with its own; A stages,
commits and acknowledges; B commits on the acknowledgement and aborts on its deadline). A lost
acknowledgement then leaves a one-sided update: still a convex combination for A, so the
parameters stay sane, but the mass moves; it should be logged as such.

While its slot is busy a peer must not change the parameters it sent: the copy the partner
averages with and the ``mine`` this side commits must be the same bytes, or the two sides'
results differ. No clock, no network, no torch: flat float32 numpy buffers only.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

SCRATCH_ELEMS = 1 << 16  # pair_average works through the buffer in pieces this size


class ExchangeStateError(RuntimeError):
    """An exchange call out of order: staging or committing without a matching begin, twice, or
    for another partner (a stale or duplicated message, or a driver bug)."""


@dataclass(frozen=True)
class Snapshot:
    """What one side sends the other: a copy of its flat parameters and its weight."""

    params: np.ndarray
    weight: float


def snapshot(params: np.ndarray, weight: float) -> Snapshot:
    """A :class:`Snapshot` holding a *copy* of ``params`` (as a wire would), after validation."""
    _check_buffer(params, "params")
    _check_weight(weight, "weight")
    return Snapshot(params.copy(), float(weight))


def pair_weights(w_mine: float, w_theirs: float) -> tuple[np.float32, np.float32]:
    """The float32 coefficients ``(p_mine, p_theirs)`` of :func:`pair_average`.

    ``p_x = float32(w_x / (w_mine + w_theirs))``, the quotient taken in float64. The sum is
    commutative in IEEE arithmetic, so the other side computes the same two numbers, swapped.
    Raises ValueError for a negative or non-finite weight, or when both are 0.
    """
    _check_weight(w_mine, "w_mine")
    _check_weight(w_theirs, "w_theirs")
    total = float(w_mine) + float(w_theirs)
    if total <= 0:
        raise ValueError("both weights are 0: nothing to average")
    return np.float32(float(w_mine) / total), np.float32(float(w_theirs) / total)


def pair_average(mine: np.ndarray, theirs: np.ndarray, w_mine: float, w_theirs: float) -> None:
    """Replaces ``mine`` in place by the weighted mean of ``mine`` and ``theirs``.

    Formula, per element, all in float32 with one rounding per operation (separate numpy
    multiply and add, so no fused multiply-add)::

        mine = (p_mine * mine) + (p_theirs * theirs)      # p from pair_weights()

    Symmetric: the other side computes ``(p_theirs * theirs) + (p_mine * mine)`` with the very
    same coefficients (see :func:`pair_weights`), each product is the same rounded number on
    both sides, and IEEE addition is commutative, so both sides end with bit-identical buffers.
    (A form like ``mine + p_theirs * (theirs - mine)`` would not be.) With equal weights the
    coefficients are exactly 0.5. Works through the buffer in pieces with a small scratch
    array: no model-sized temporary.

    Both buffers must be 1-D float32 of the same length and must not overlap. Raises ValueError
    (leaving ``mine`` untouched) for bad buffers or weights.
    """
    _check_buffer(mine, "mine")
    _check_buffer(theirs, "theirs")
    if mine.shape != theirs.shape:
        raise ValueError(f"buffers differ in length: {mine.shape[0]} vs {theirs.shape[0]}")
    if not mine.flags.writeable:
        raise ValueError("mine must be writeable")
    if np.shares_memory(mine, theirs):
        raise ValueError("mine and theirs overlap: theirs must be a received copy")
    p_mine, p_theirs = pair_weights(w_mine, w_theirs)
    n = mine.shape[0]
    scratch = np.empty(min(n, SCRATCH_ELEMS), dtype=np.float32)
    for start in range(0, n, SCRATCH_ELEMS):
        stop = min(start + SCRATCH_ELEMS, n)
        tmp = scratch[: stop - start]
        part = mine[start:stop]
        np.multiply(theirs[start:stop], p_theirs, out=tmp)
        np.multiply(part, p_mine, out=part)
        np.add(part, tmp, out=part)


def pair_apply(live: np.ndarray, sent: np.ndarray, theirs: np.ndarray, w_sent: float, w_theirs: float) -> None:
    """The averaging for a side whose parameters moved on after it sent ``sent`` (it kept
    training while its copy travelled): ``live += p_theirs * (theirs - sent)``, with the
    coefficients of :func:`pair_weights`. That is :func:`pair_average` of ``sent`` plus the
    side's own progress ``live - sent``, which is kept whole; the partner's contribution is
    counted exactly once. Equal to :func:`pair_average` up to rounding when ``live == sent``
    (use that one then: it is bit-identical to the partner's result). Works in pieces, no
    model-sized temporary; raises ValueError (``live`` untouched) for bad buffers or weights.
    """
    for buf, what in ((live, "live"), (sent, "sent"), (theirs, "theirs")):
        _check_buffer(buf, what)
    if not live.shape == sent.shape == theirs.shape:
        raise ValueError(f"buffers differ in length: {live.shape[0]}, {sent.shape[0]}, {theirs.shape[0]}")
    if not live.flags.writeable:
        raise ValueError("live must be writeable")
    if np.shares_memory(live, theirs) or np.shares_memory(live, sent):
        raise ValueError("live must not overlap sent or theirs")
    _, p_theirs = pair_weights(w_sent, w_theirs)
    n = live.shape[0]
    scratch = np.empty(min(n, SCRATCH_ELEMS), dtype=np.float32)
    for start in range(0, n, SCRATCH_ELEMS):
        stop = min(start + SCRATCH_ELEMS, n)
        tmp = scratch[: stop - start]
        np.subtract(theirs[start:stop], sent[start:stop], out=tmp)
        np.multiply(tmp, p_theirs, out=tmp)
        np.add(live[start:stop], tmp, out=live[start:stop])


def merged_weight(w_mine: float, w_theirs: float) -> float:
    """The weight both sides hold after an exchange: ``(w_mine + w_theirs) / 2`` (symmetric)."""
    _check_weight(w_mine, "w_mine")
    _check_weight(w_theirs, "w_theirs")
    return (float(w_mine) + float(w_theirs)) / 2.0


def consensus_distance(buffers: Sequence[np.ndarray]) -> float:
    """Unnormalised consensus distance ``sqrt(mean_i ||x_i - xbar||^2)``, ``xbar`` the plain mean.

    Accumulated in float64 (two passes, one float64 vector of scratch). 0 exactly when every
    buffer holds the same values. Unnormalised because peers that start from zero-mean random
    vectors have ``||xbar||`` near 0; divide by the value at step 0 for a relative figure.
    Raises ValueError for no buffers or buffers of different lengths.
    """
    if len(buffers) == 0:
        raise ValueError("need at least one buffer")
    first = np.asarray(buffers[0])
    if first.ndim != 1:
        raise ValueError("buffers must be 1-D")
    total = np.zeros(first.shape[0], dtype=np.float64)
    for b in buffers:
        if np.ndim(b) != 1 or len(b) != first.shape[0]:
            raise ValueError("buffers must be 1-D and of the same length")
        total += b
    total /= len(buffers)
    acc = 0.0
    for b in buffers:
        diff = np.asarray(b, dtype=np.float64) - total
        acc += float(np.dot(diff, diff))
    return math.sqrt(acc / len(buffers))


class Exchanger:
    """One peer's exchange slot: idle, or in exactly one exchange with one partner.

    Thread-safe; no call blocks on another exchange (the lock guards a few fields only, and the
    averaging in :meth:`commit` runs outside it). ``partner`` is any hashable key: a peer id, or
    ``(peer_id, exchange_id)`` so that a late message of an earlier exchange with the same peer
    cannot touch the current one. Counts its commits, aborts and refusals.
    """

    def __init__(self, name: Hashable = None) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._partner: Hashable = None
        self._staged: Snapshot | None = None
        self._committing = False
        self._commits = 0
        self._aborts = 0
        self._refusals = 0

    def __repr__(self) -> str:
        return f"Exchanger({self.name!r}, partner={self._partner!r})"

    @property
    def busy(self) -> bool:
        """Whether the slot is taken by an exchange."""
        with self._lock:
            return self._partner is not None

    @property
    def partner(self) -> Hashable:
        """The current exchange's partner key, or None when idle."""
        with self._lock:
            return self._partner

    @property
    def staged(self) -> bool:
        """Whether the current exchange holds the partner's copy."""
        with self._lock:
            return self._staged is not None

    @property
    def commits(self) -> int:
        """Exchanges this side applied."""
        with self._lock:
            return self._commits

    @property
    def aborts(self) -> int:
        """Exchanges this side began and dropped."""
        with self._lock:
            return self._aborts

    @property
    def refusals(self) -> int:
        """Calls to :meth:`try_begin` refused because the slot was busy."""
        with self._lock:
            return self._refusals

    def try_begin(self, partner: Hashable) -> bool:
        """Takes the slot for an exchange with ``partner``; False (and no change) if it is busy.

        Raises ValueError for a None partner or the peer's own name.
        """
        if partner is None:
            raise ValueError("partner must not be None")
        if self.name is not None and partner == self.name:
            raise ValueError(f"peer {self.name!r} cannot exchange with itself")
        with self._lock:
            if self._partner is not None:
                self._refusals += 1
                return False
            self._partner = partner
            self._staged = None
            return True

    def stage(self, partner: Hashable, theirs: Snapshot) -> None:
        """Phase 1: keeps ``partner``'s copy for the commit. Applies nothing.

        Raises ExchangeStateError unless the slot is in an exchange with ``partner`` that has
        nothing staged yet.
        """
        _check_buffer(theirs.params, "theirs.params")
        _check_weight(theirs.weight, "theirs.weight")
        with self._lock:
            self._expect(partner, "stage")
            if self._staged is not None:
                raise ExchangeStateError(f"{self.name!r}: a copy from {partner!r} is already staged")
            self._staged = theirs

    def commit(self, partner: Hashable, mine: np.ndarray, w_mine: float, sent: np.ndarray | None = None) -> float:
        """Phase 2: averages the staged copy into ``mine`` and frees the slot.

        ``sent``: the copy this side sent, when ``mine`` has changed since (then
        :func:`pair_apply`, keeping that change; else :func:`pair_average`).

        Returns the weight this side now holds (:func:`merged_weight`). Raises
        ExchangeStateError unless an exchange with ``partner`` has a copy staged; raises
        ValueError for a copy that does not fit ``mine`` or bad weights, after freeing the slot
        with ``mine`` untouched (counted as an abort).
        """
        with self._lock:
            self._expect(partner, "commit")
            theirs = self._staged
            if theirs is None:
                raise ExchangeStateError(f"{self.name!r}: commit with {partner!r} before its copy was staged")
            self._committing = True
        try:
            if sent is None:
                pair_average(mine, theirs.params, w_mine, theirs.weight)
            else:
                pair_apply(mine, sent, theirs.params, w_mine, theirs.weight)
            weight = merged_weight(w_mine, theirs.weight)
        except BaseException:
            self._release(committed=False)
            raise
        self._release(committed=True)
        return weight

    def abort(self, partner: Hashable) -> bool:
        """Drops the exchange with ``partner`` (and any staged copy); ``mine`` stays untouched.

        Returns False, changing nothing, if the slot is not in an exchange with ``partner`` (it
        is idle, or already serves another exchange), so a late abort is harmless. An exchange
        already committing cannot be aborted (False).
        """
        with self._lock:
            if self._partner is None or self._partner != partner or self._committing:
                return False
            self._partner = None
            self._staged = None
            self._aborts += 1
            return True

    def _expect(self, partner: Hashable, what: str) -> None:
        if self._partner is None:
            raise ExchangeStateError(f"{self.name!r}: {what} with {partner!r} but no exchange is open")
        if self._partner != partner:
            raise ExchangeStateError(f"{self.name!r}: {what} with {partner!r} but the exchange is with {self._partner!r}")
        if self._committing:
            raise ExchangeStateError(f"{self.name!r}: {what} with {partner!r} while committing")

    def _release(self, committed: bool) -> None:
        with self._lock:
            self._partner = None
            self._staged = None
            self._committing = False
            if committed:
                self._commits += 1
            else:
                self._aborts += 1


def _check_buffer(buf: np.ndarray, what: str) -> None:
    if not isinstance(buf, np.ndarray) or buf.ndim != 1 or buf.dtype != np.float32:
        raise ValueError(f"{what} must be a 1-D float32 numpy array")


def _check_weight(w: float, what: str) -> None:
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number, got {w!r}")  # noqa: TRY004 - one error type for bad input
    if not math.isfinite(float(w)) or w < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {w}")
