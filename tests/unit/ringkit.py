"""Helpers shared by the ring tests: every member a thread, joined by an InMemoryRing."""
from __future__ import annotations

import hashlib
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


def differences(a: np.ndarray, b: np.ndarray) -> str:
    """Where two float32 buffers of one shape differ: how many elements, the first and last
    index, and the largest distance in units in the last place. Scattered 1-ulp differences
    point at arithmetic that rounded differently; long runs of large ones at bytes that went
    astray (a chunk sent from or received into the wrong place or at the wrong time)."""
    if a.shape != b.shape:
        return f"shapes {a.shape} and {b.shape}"
    diff = np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))
    if diff.size == 0:
        return "no difference"
    # float32 bits on one monotonic integer line (negatives mirrored), so the distance counts
    # the representable values between the two
    ia, ib = (np.where(u >= 1 << 31, (1 << 31) - u, u) for u in (x.view(np.uint32)[diff].astype(np.int64) for x in (a, b)))
    return (f"{diff.size} of {a.size} elements differ, indices {int(diff[0])}..{int(diff[-1])}, "
            f"up to {int(np.abs(ia - ib).max())} ulps")


def divergence(traces: list[list[tuple[str, str]]]) -> str:
    """The first step at which members' :func:`synced_member` traces part: whether the
    parameters a step started from differed (at step 0: members built different models) or
    the averaged gradient did (the all-reduce gave members different bytes); "" if the traces
    agree throughout (then only the last optimizer step can have diverged)."""
    for step, entries in enumerate(zip(*traces)):
        params, grads = {e[0] for e in entries}, {e[1] for e in entries}
        if len(params) > 1:
            return f"members started step {step} from different parameters"
        if len(grads) > 1:
            return (f"members started step {step} from the same parameters, but the all-reduce gave them "
                    "different averaged gradients")
    return ""


def assert_bit_identical(bufs: list[np.ndarray], traces: list[list[tuple[str, str]]] | None = None) -> None:
    """Every buffer is bit-identical to the first; on a difference the message says where (and,
    with the members' ``traces`` from :func:`synced_member`, at which step they parted)."""
    first = bufs[0].tobytes()
    for r, b in enumerate(bufs[1:], start=1):
        if b.tobytes() != first:
            where = divergence(traces) if traces is not None else ""
            if traces is not None and not where:
                where = "every step started from the same parameters and averaged gradients: an optimizer step diverged"
            raise AssertionError(f"rank {r} differs from rank 0: {differences(bufs[0], b)}" + (f"; {where}" if where else ""))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()



def synced_member(task: Any, rank: int, world: int, link: Any, samples: np.ndarray, batch_size: int, steps: int,
                  seed: int = 0, counts: list[int] | None = None, timeout: float = 10.0,
                  stream_block: int | None = None) -> Any:
    """One ``--sync grads`` member: a trainer of ``task`` that trains ``samples`` in ``steps``
    steps of ``batch_size``, averaging each step's gradient with the others over ``link`` (the
    all-reduce a peer's ring round runs). With ``counts`` (every member's sample count, as the
    plan gives them) each step's chunks are checked by the round's gradient guards, as a peer's
    are; ``timeout`` bounds each all-reduce; ``stream_block`` streams the weights of at least two
    such blocks (:meth:`Trainer.grad_buffer`). Returns the trainer, with ``sync_trace``: per all-reduce (one per
    step unless weights are streamed),
    the digests of the parameters it started from and of the averaged gradient buffer (what
    :func:`assert_bit_identical` reads to say where members parted)."""
    from dml.aggregation.averaging import weighted_ring_average
    from dml.aggregation.guard import GradientGuards, rms
    from dml.peer.trainer import Trainer

    trainer = Trainer(task, seed, 0, fuse=False)
    if stream_block is not None:  # stream every Linear weight of at least two such blocks, in blocks
        trainer.stream_block, trainer.stream_min = stream_block, 2 * stream_block
    parts = trainer.sync_parts
    guards = GradientGuards(str((rank - 1) % world), rank, counts, batch_size) if counts is not None else None

    trace: list[tuple[str, str]] = []

    def allreduce(buf: np.ndarray, n: int, step: int, part: int) -> None:
        start = _digest(trainer.host_buffer())
        guard = guards.for_step(step, rms(buf[:-1]), buf.size - 1) if guards is not None else None
        weighted_ring_average(buf, float(n), rank, world, link, timeout, 1000, guard=guard,
                              collective=step * parts + part, final=step == steps - 1 and part == parts - 1)
        if guards is not None and part == 0:
            guards.averaged(step, buf[:-1])
        trace.append((start, _digest(buf)))

    trainer.train_synced(samples, batch_size, steps, allreduce)
    trainer.sync_trace = trace
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
