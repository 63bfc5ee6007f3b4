"""The sample ledger: which samples each committed round consumed, and its invariant.

Within a data epoch every shard is visited in one fixed order (``planner.shard_order``); each
committed round consumes contiguous ranges of that order. The invariant, whatever failed: in
every data epoch each sample is used exactly once in committed rounds, i.e. per shard the
committed ranges tile ``[0, size)`` in order, with no overlap and no gap (the last, unfinished
data epoch may stop short).
"""
from __future__ import annotations

from typing import Iterable

Range = tuple[int, int, int]  # (shard id, start, stop)


def violations(rounds: Iterable[tuple[int, Iterable[Range]]], sizes: list[int]) -> list[str]:
    """Checks committed rounds, oldest first, each given as (data epoch, ranges consumed).

    Returns one message per violation (an empty list when the ledger holds).
    """
    cursor: dict[tuple[int, int], int] = {}
    epochs: list[int] = []
    problems: list[str] = []
    for n, (data_epoch, ranges) in enumerate(rounds, start=1):
        if epochs and data_epoch < epochs[-1]:
            problems.append(f"round #{n}: data epoch went back from {epochs[-1]} to {data_epoch}")
        if not epochs or data_epoch != epochs[-1]:
            epochs.append(data_epoch)
        for shard, start, stop in ranges:
            if not 0 <= shard < len(sizes):
                problems.append(f"round #{n}: unknown shard {shard}")
                continue
            at = cursor.get((data_epoch, shard), 0)
            if start < at:
                problems.append(f"round #{n}: shard {shard} samples {start}..{min(stop, at)} used twice in data epoch {data_epoch}")
            elif start > at:
                problems.append(f"round #{n}: shard {shard} samples {at}..{start} skipped in data epoch {data_epoch}")
            if stop > sizes[shard] or stop < start:
                problems.append(f"round #{n}: shard {shard} range {start}..{stop} outside 0..{sizes[shard]}")
            cursor[(data_epoch, shard)] = max(at, stop)
    for e in epochs[:-1]:  # finished data epochs must have covered everything
        for shard, size in enumerate(sizes):
            got = cursor.get((e, shard), 0)
            if got != size:
                problems.append(f"data epoch {e}: shard {shard} used {got} of {size} samples")
    return problems
