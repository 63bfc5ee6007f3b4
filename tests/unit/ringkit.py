"""Helpers shared by the ring tests: every member a thread, joined by an InMemoryRing."""
from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from dml.aggregation.transport import InMemoryRing

JOIN_S = 20.0  # generous upper bound for a thread; a correct run takes milliseconds


def run_members(world: int, body: Callable[[int, Any], Any], net: InMemoryRing | None = None,
                link_wrap: Callable[[int, Any], Any] | None = None,
                abort_on_error: bool = False) -> tuple[list[Any], list[BaseException | None]]:
    """Runs ``body(rank, link)`` on one thread per rank; returns (results, errors) per rank.
    With ``abort_on_error`` the first member to fail aborts the ring (what the coordinator's
    new epoch does to a failed round), so the others stop waiting as soon as they have read
    every frame already sent to them, rather than at their deadline."""
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
            if abort_on_error:
                net.abort()

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



def synced_member(task: Any, rank: int, world: int, link: Any, samples: np.ndarray, batch_size: int, steps: int,
                  seed: int = 0, counts: list[int] | None = None, timeout: float = 10.0) -> Any:
    """One ``--sync grads`` member: a trainer of ``task`` that trains ``samples`` in ``steps``
    steps of ``batch_size``, averaging each step's gradient with the others over ``link`` (the
    all-reduce a peer's ring round runs). With ``counts`` (every member's sample count, as the
    plan gives them) each step's chunks are checked by the round's gradient guards, as a peer's
    are; ``timeout`` bounds each all-reduce. Returns the trainer."""
    from dml.aggregation.averaging import weighted_ring_average
    from dml.aggregation.guard import GradientGuards, rms
    from dml.peer.trainer import Trainer

    trainer = Trainer(task, seed, 0, fuse=False)
    guards = GradientGuards(str((rank - 1) % world), rank, counts, batch_size) if counts is not None else None

    def allreduce(buf: np.ndarray, n: int, step: int) -> None:
        guard = guards.for_step(step, rms(buf[:-1]), buf.size - 1) if guards is not None else None
        weighted_ring_average(buf, float(n), rank, world, link, timeout, 1000, guard=guard,
                              collective=step, final=step == steps - 1)
        if guards is not None:
            guards.averaged(step, buf[:-1])

    trainer.train_synced(samples, batch_size, steps, allreduce)
    return trainer


def reference_trainer(task: Any, member_samples: list[np.ndarray], batch_size: int, steps: int, seed: int = 0) -> Any:
    """One process doing what ``--sync grads`` members together do: step ``s`` on the union of
    every member's step-``s`` batch (the N-times batch). Returns the trainer."""
    from dml.peer.trainer import Trainer

    trainer = Trainer(task, seed, 0, fuse=False)
    for s in range(steps):
        batch = np.concatenate([m[s * batch_size : (s + 1) * batch_size] for m in member_samples])
        if batch.size:
            trainer.train_on(batch, batch.size)
    return trainer


def deadline_errors(errors: list[BaseException | None], timeout: float) -> list[str]:
    """Each error that is not the ring's own deadline (the all-reduce deadline, or a receive
    given what was left of it) as the code reports it: "fail fast" means ending by that deadline,
    which how long the run took on a shared machine cannot show."""
    bad = []
    for e in errors:
        m = re.fullmatch(r"no data from rank \d+ within (\d+\.\d)s", str(e))
        if not (str(e) == f"all-reduce deadline of {timeout:.1f}s passed" or (m and float(m.group(1)) <= timeout)):
            bad.append(str(e))
    return bad
