"""Gossip partner choice: whom a peer asks to average with, first choice first.

A topology is a policy over the ordered membership list (indices ``0 .. n-1``):

- ``uniform``: every other member, in a random order drawn from the caller's seeded
  ``numpy.random.Generator`` (the complete graph; deterministic given the seed);
- ``ring``: the two ring neighbours ``me + 1`` and ``me - 1`` (mod n); by default the first
  choice alternates with the step (+1 on even steps, -1 on odd ones);
- ``exponential``: the one-peer exponential graph of SGP (Assran et al. 2019) made undirected:
  the members at distance ``2**k < n`` ahead of and behind ``me`` (mod n). There are
  ``K = ceil(log2 n)`` distances, so at most ``2K - 1`` neighbours (``me + n/2`` and ``me - n/2``
  coincide for even n). At step ``t`` the first choice is ``me + 2**(t mod K)``, the first
  fallback ``me - 2**(t mod K)`` (the member whose own first choice was ``me``), then the next
  distances of the cycle, ahead before behind.

:func:`partners` returns the whole candidate list: an initiator asks the first, and moves to the
next when a candidate is busy (already in an exchange) or dead, so no coordinator is needed to
route around a failure. A sparse topology's list is short on purpose: when both ring neighbours
are busy the peer sits the step out instead of averaging with a stranger. Exchanges are
symmetric (push-pull), which is why the exponential graph is used undirected: with the directed
graph (ahead only) a step's exchanges pair up far less often along its distance; in the
32-peer simulation the distance then falls by 0.78 per step instead of 0.69.

No clock and no network: the step and the generator are passed in.
"""
from __future__ import annotations

import enum
from collections.abc import Hashable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T", bound=Hashable)


class Topology(enum.Enum):
    """A partner-selection policy (the value is the name used on flags and in configs)."""

    UNIFORM = "uniform"
    RING = "ring"
    EXPONENTIAL = "exponential"


TOPOLOGY_NAMES = tuple(t.value for t in Topology)


def parse_topology(name: str | Topology) -> Topology:
    """The :class:`Topology` called ``name`` (case and surrounding blanks ignored).

    Raises ValueError naming the valid choices for anything else.
    """
    if isinstance(name, Topology):
        return name
    if not isinstance(name, str):
        raise ValueError(f"topology must be a name, got {name!r}")  # noqa: TRY004 - one error type for bad input
    key = name.strip().lower()
    for t in Topology:
        if t.value == key:
            return t
    raise ValueError(f"unknown topology {name!r}: expected one of {', '.join(TOPOLOGY_NAMES)}")


def exponential_distances(n: int) -> list[int]:
    """The exponential graph's hop distances for ``n`` members: ``2**k`` for every ``2**k < n``."""
    _check_n(n)
    out, d = [], 1
    while d < n:
        out.append(d)
        d *= 2
    return out


def neighbours(topology: str | Topology, me: int, n: int) -> list[int]:
    """The members ``me`` may ask, in the topology's fixed order (no step, no randomness).

    ``uniform``: every other member ascending; ``ring``: ``me + 1``, then ``me - 1``;
    ``exponential``: ``me + 2**k``, then ``me - 2**k``, for ascending ``k``. Never contains ``me``,
    no duplicates (with ``n == 2`` the ring has one neighbour; with ``n == 1`` every list is empty).
    """
    t = parse_topology(topology)
    _check_member(me, n)
    if t is Topology.UNIFORM:
        return [j for j in range(n) if j != me]
    if t is Topology.RING:
        return _dedup([(me + 1) % n, (me - 1) % n], me)
    return _around(me, n, exponential_distances(n))


def partners(
    topology: str | Topology, me: int, n: int, step: int, rng: np.random.Generator | None = None,
    shuffle: bool = False,
) -> list[int]:
    """Candidate partners for member ``me`` of ``n`` at gossip ``step``: first choice first.

    The initiator asks them in order and skips any that is busy or unreachable. ``uniform``
    draws a random permutation of the others from ``rng`` (required); ``ring`` and
    ``exponential`` cycle through their neighbours with ``step`` (``rng`` unused) unless
    ``shuffle`` is set, in which case their neighbours come in a random order from ``rng``.
    Every index is in ``[0, n)``, none is ``me``, none repeats.

    Raises ValueError for an unknown topology, ``n < 1``, ``me`` outside ``[0, n)``, a negative
    step, or a random order asked for without a generator.
    """
    t = parse_topology(topology)
    _check_member(me, n)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if (t is Topology.UNIFORM or shuffle) and rng is None:
        raise ValueError(f"topology {t.value} with a random order needs a numpy Generator")
    base = neighbours(t, me, n)
    if not base:
        return []
    if t is Topology.UNIFORM or shuffle:
        assert rng is not None
        return [base[int(i)] for i in rng.permutation(len(base))]
    if t is Topology.RING:  # alternate the first choice with the step
        k = step % len(base)
        return base[k:] + base[:k]
    # Exponential: the distance 2**(step mod K) first, then the rest of the cycle.
    dists = exponential_distances(n)
    k = step % len(dists)
    return _around(me, n, dists[k:] + dists[:k])


def partner_ids(
    topology: str | Topology, members: Sequence[T], me: T, step: int, rng: np.random.Generator | None = None,
    shuffle: bool = False,
) -> list[T]:
    """:func:`partners` over a membership list of peer ids: candidate ids, first choice first.

    ``members`` is the ordered membership every peer agrees on (for instance the coordinator's
    current epoch); ``me`` must be in it exactly once. Raises ValueError otherwise.
    """
    members = list(members)
    if len(set(members)) != len(members):
        raise ValueError("membership list has duplicate ids")
    try:
        index = members.index(me)
    except ValueError:
        raise ValueError(f"peer {me!r} is not in the membership list") from None
    return [members[j] for j in partners(topology, index, len(members), step, rng, shuffle)]


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"member count must be an int, got {n!r}")  # noqa: TRY004 - one error type for bad input
    if n < 1:
        raise ValueError(f"member count must be >= 1, got {n}")


def _check_member(me: int, n: int) -> None:
    _check_n(n)
    if isinstance(me, bool) or not isinstance(me, (int, np.integer)) or not 0 <= me < n:
        raise ValueError(f"member index must be an int in [0, {n}), got {me!r}")


def _around(me: int, n: int, dists: list[int]) -> list[int]:
    return _dedup([j for d in dists for j in ((me + d) % n, (me - d) % n)], me)


def _dedup(items: list[int], me: int) -> list[int]:
    seen: set[int] = set()
    out = []
    for i in items:
        if i != me and i not in seen:
            seen.add(i)
            out.append(i)
    return out
