"""The sample ledger: which samples each committed round consumed, and its invariant.

Each shard is read in passes (data epochs); pass ``e`` visits it in one fixed order
(``dml.common.sampling.shard_order``), and each committed round consumes contiguous ranges of those orders.
The invariant, whatever failed: every pass of every shard uses each of its samples exactly once in
committed rounds, i.e. per shard the committed ranges tile pass 1 from 0 to the shard's size, then
pass 2, and so on, in order, with no overlap and no gap (only the current pass may stop short).
"""
from __future__ import annotations

from typing import Iterable

Range = tuple[int, int, int, int]  # (shard id, pass, start, stop)


def violations(rounds: Iterable[Iterable[Range]], sizes: list[int]) -> list[str]:
    """Checks committed rounds, oldest first, each given as the ranges it consumed.

    Returns one message per violation (an empty list when the ledger holds).
    """
    cursor: dict[int, tuple[int, int]] = {}
    problems: list[str] = []
    for n, ranges in enumerate(rounds, start=1):
        # A round's ranges in the order they were read: each shard by pass and position. The
        # order they are listed in (member by member) is not that when a shard moved between
        # members within one round (a gossip window), and must not read as a gap.
        for shard, epoch, start, stop in sorted(ranges, key=lambda r: (r[0], r[1], r[2])):
            if not 0 <= shard < len(sizes):
                problems.append(f"round #{n}: unknown shard {shard}")
                continue
            at = cursor.get(shard, (1, 0))
            if (epoch, start) < at:
                problems.append(f"round #{n}: shard {shard} pass {epoch} samples from {start} used again "
                                f"(the ledger was at pass {at[0]} position {at[1]})")
            elif (epoch, start) > at:
                problems.append(f"round #{n}: shard {shard} skipped from pass {at[0]} position {at[1]} "
                                f"to pass {epoch} position {start}")
            if not start < stop <= sizes[shard]:
                problems.append(f"round #{n}: shard {shard} range {start}..{stop} outside 0..{sizes[shard]}")
            end = (epoch + 1, 0) if stop >= sizes[shard] else (epoch, stop)
            cursor[shard] = max(at, end)  # a range used again does not move the ledger back
    return problems
