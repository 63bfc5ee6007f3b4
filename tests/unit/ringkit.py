"""Helpers shared by the ring tests: every member a thread, joined by an InMemoryRing."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from dml.aggregation.transport import InMemoryRing

JOIN_S = 20.0  # generous upper bound for a thread; a correct run takes milliseconds


def run_members(world: int, body: Callable[[int, Any], Any], net: InMemoryRing | None = None,
                link_wrap: Callable[[int, Any], Any] | None = None) -> tuple[list[Any], list[BaseException | None]]:
    """Runs ``body(rank, link)`` on one thread per rank; returns (results, errors) per rank."""
    net = net or InMemoryRing(world)
    results: list[Any] = [None] * world
    errors: list[BaseException | None] = [None] * world

    def target(rank: int) -> None:
        link = net.link(rank)
        if link_wrap is not None:
            link = link_wrap(rank, link)
        try:
            results[rank] = body(rank, link)
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            errors[rank] = e

    threads = [threading.Thread(target=target, args=(r,), daemon=True, name=f"rank-{r}") for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"ring members still running after {JOIN_S}s: {alive}"
    return results, errors


def assert_bit_identical(bufs: list[np.ndarray]) -> None:
    first = bufs[0].tobytes()
    for r, b in enumerate(bufs[1:], start=1):
        assert b.tobytes() == first, f"rank {r} differs from rank 0"
