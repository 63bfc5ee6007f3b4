"""Finds the :class:`dml.Task` a job names: a built-in task, or ``package.module:NAME``
imported from this peer's own environment."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dml.common.task import Context, Task
from dml.common.tasks import get_task, is_builtin
from dml.peer import outer
from dml.peer.trainer import TaskError, Trainer

if TYPE_CHECKING:
    from dml.v1 import types_pb2

    from dml.peer.runner import Peer


class Declined(Exception):
    """This peer will not run the job (for instance job code it is not allowed to run); the
    message says why, and the coordinator shows it in the job's status."""


def resolve(name: str) -> Task:
    """The task ``name`` refers to. Raises :class:`TaskError` with a message when it cannot be
    found or is not a ``dml.Task``."""
    if is_builtin(name):
        try:
            return get_task(name)
        except ValueError as e:
            raise TaskError(str(e)) from None
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise TaskError(f"task {name!r} is neither a built-in task nor package.module:NAME")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything
        raise TaskError(f"importing {module} raised {type(e).__name__}: {e}") from e
    task = getattr(mod, attr, None)
    if not isinstance(task, Task):
        raise TaskError(f"{module} has no dml.Task named {attr!r}"
                        + (f" (found a {type(task).__name__})" if task is not None else ""))
    return task


def make_trainer(peer: Peer, job_id: str, spec: types_pb2.JobSpec) -> Trainer:
    """The trainer of job ``job_id`` on this peer: its task, seeded by the job, at the job's
    learning rate, on the peer's device, with the job's proximal term and its outer optimizer
    (whose state is then one of the trainer's ``state_parts``). The one place a peer builds a
    job's trainer. With ``--sync grads`` or a proximal term it keeps real gradients (no update
    fused into backward): the ring averages them each step, or the term is added to them."""
    task = resolve(spec.task)
    ctx = Context(seed=spec.seed, job_id=job_id, peer_id=peer.peer_id)
    trainer = Trainer(task, spec.seed, spec.learning_rate, peer.config.device, ctx=ctx,
                      fuse=spec.sync != "grads" and spec.prox_mu == 0, prox_mu=spec.prox_mu)
    trainer.average_state = spec.optimizer_state == "average"
    if spec.outer_optimizer not in ("", "none"):
        trainer.state_parts[outer.PART] = outer.OuterOptimizer(spec.outer_optimizer, spec.outer_lr,
                                                               spec.outer_momentum, trainer.numel)
    return trainer
