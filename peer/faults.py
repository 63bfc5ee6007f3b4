"""Test-only fault hooks: make this peer a broken one, to show the others stop it.

Off by default. ``dml-peer --fault KIND:ROUND`` (or env ``DML_FAULT=KIND:ROUND``) makes the peer,
from round (or gossip step) ROUND on, overwrite part of its parameters after training (with
``--sync grads``: of its round's first gradient) and skip its own finite check, as a peer with
broken hardware or a bug would:

- ``nan-params``: NaN;
- ``huge-params``: 1e30 (finite in float32, absurd as a parameter);
- ``hold-collective`` (the torch data plane only): at round ROUND alone, once every other member
  has entered the round's collective, log so and never enter it, until the round is cancelled:
  a member a test can kill at a known point, mid-collective;
- ``pause-round``: at the start of round ROUND, once, log so and stop this process with SIGSTOP
  (a test continues it with SIGCONT): a job that cannot move on until the test lets it, however
  fast its rounds are, so a test can restart the coordinator at a known round.

Nothing else changes: the peer then exchanges as usual, and its neighbours must refuse what it
sends. ``kill-worker:ROUND`` instead kills worker 1 of a multi-worker host (``--workers`` /
``--gpus``, peer/workers.py) at the first step of round ROUND, once per peer process: the host
must fail that round like any member that fails, then restart its workers; ``hang-worker:ROUND``
makes that worker stop answering instead (the host's round deadline must catch it). Never set any of
them outside tests and experiments.
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import numpy as np

KINDS = {"nan-params": float("nan"), "huge-params": 1e30}
HOLD = "hold-collective"
PAUSE = "pause-round"  # stop this process (SIGSTOP) at the start of round ROUND, once
KILL_WORKER = "kill-worker"  # a worker of a multi-worker host dies (peer.workers)
HANG_WORKER = "hang-worker"  # ... or stops answering, until the host's deadline stops it
WORKER_FAULTS = (KILL_WORKER, HANG_WORKER)
KILLED_WORKER = 1  # the worker it kills


@dataclass(frozen=True)
class Fault:
    """Which fault to inject, at which round."""

    kind: str
    round: int

    def value(self) -> float:
        """The value written into the parameters."""
        return KINDS[self.kind]


def parse_fault(text: str) -> Fault | None:
    """``KIND:ROUND`` as a :class:`Fault`; None for ""; ValueError saying what is wrong otherwise."""
    if not text:
        return None
    kind, sep, rnd = text.partition(":")
    if kind not in (*KINDS, HOLD, PAUSE, *WORKER_FAULTS) or not sep or not rnd.isdigit() or int(rnd) < 1:
        raise ValueError(f"fault must be KIND:ROUND with KIND one of {', '.join((*KINDS, HOLD, PAUSE, *WORKER_FAULTS))} and "
                         f"ROUND >= 1, got {text!r}")
    return Fault(kind, int(rnd))


def inject(fault: Fault | None, rnd: int, params: np.ndarray) -> bool:
    """Writes the fault's value into the first half of ``params`` from the fault's round on.
    Returns whether it did (the caller then skips its own check, as a broken peer would)."""
    if fault is None or rnd < fault.round or fault.kind not in KINDS:
        return False
    params[: max(1, params.size // 2)] = np.float32(fault.value())
    return True


def pause(fault: Fault | None, rnd: int, tag: str, log: logging.Logger) -> bool:
    """``pause-round``: at round ROUND, logs that this process stops and stops it (SIGSTOP), to
    go on where it stopped when continued (SIGCONT). Returns whether it paused."""
    if fault is None or fault.kind != PAUSE or rnd != fault.round:
        return False
    log.warning("%s: test fault pause-round: stopping this process before the round (continue it with SIGCONT)", tag)
    for h in logging.getLogger().handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGSTOP)
    return True


def holds(fault: Fault | None, rnd: int) -> bool:
    """Whether this member must hold round ``rnd``'s collective (``hold-collective``)."""
    return fault is not None and fault.kind == HOLD and rnd == fault.round
