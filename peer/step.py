"""What a ring round and a gossip step share: the member's samples of a plan, training on them,
averaging, and the report to the coordinator (:func:`train_and_report`)."""
from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from dml.v1 import control_pb2, types_pb2

from dml.aggregation.guard import update_norm
from dml.common.sampling import shard_order
from dml.peer import datausage
from dml.peer.client import CALL_TIMEOUT_S, Evicted

if TYPE_CHECKING:
    from dml.peer.runner import Peer
    from dml.peer.trainer import StepResult, Trainer

log = logging.getLogger(__name__)


def superseded(e: BaseException) -> bool:
    """The coordinator refused a report or upload as stale: the plan moved on without us."""
    return isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.FAILED_PRECONDITION


def sample_indices(plan: types_pb2.Plan, rank: int, own_samples: int = 0) -> np.ndarray:
    """The training-set indices this member trains on, in order, as the plan allocates them. A
    ``--placement local`` job's plan sends no indices: the member's shard is its own data, all
    ``own_samples`` of it (``0..own_samples-1``)."""
    local = plan.spec.placement == "local"
    parts = []
    for r in plan.members[rank].samples:
        if local:
            if r.stop > own_samples:
                raise ValueError(f"the plan allocates samples {r.start}..{r.stop} of shard {r.shard_id}, and this "
                                 f"peer's own data has {own_samples}")
            indices = np.arange(own_samples, dtype=np.int64)
        else:
            indices = np.asarray(plan.shard_indices[r.shard_id].indices, dtype=np.int64)
        parts.append(shard_order(indices, plan.spec.seed, r.data_epoch, r.shard_id)[r.start : r.stop])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


MAX_TASK_ERROR_CHARS = 1800  # of a task's error sent to the coordinator
TRACEBACK_FRAMES = 3  # the innermost frames of the task's traceback, where its own code raised


def task_error_detail(e: BaseException) -> str:
    """A task's error as the coordinator shows it: the message, then (unless the message holds
    them already) the innermost frames of the traceback of what the task raised, bounded in
    length."""
    text = str(e)
    cause = e.__cause__ or e
    if "\n  File " not in text and cause.__traceback__ is not None:
        frames = traceback.format_tb(cause.__traceback__)[-TRACEBACK_FRAMES:]
        text = f"{text}\n" + "".join(frames).rstrip() if frames else text
    return text if len(text) <= MAX_TASK_ERROR_CHARS else text[: MAX_TASK_ERROR_CHARS - 3] + "..."


class NotFinite(Exception):
    """This member's own parameters or update are not finite: it must not exchange them."""


def check_own(params: np.ndarray, base: Any, what: str) -> float:
    """This member's check of its own result before it exchanges: returns the update's norm
    (``||params - base||``; with no ``base``, the parameters' norm) and raises
    :class:`NotFinite` when it is not finite (a NaN or infinity anywhere, or an overflow)."""
    norm = update_norm(params, base)
    if not math.isfinite(norm):
        bad = int(np.count_nonzero(~np.isfinite(params)))
        why = f"{bad} non-finite parameters" if bad else "every parameter finite, but absurd: a square overflows float32"
        raise NotFinite(f"{what}: own {'update' if base is not None else 'parameters'} not finite "
                        f"(norm {norm}, {why})")
    return norm


def report_failure(peer: Peer, plan: types_pb2.Plan, suspect: str, detail: str, kind: int | None = None) -> None:
    """Tells the coordinator this round failed, naming ``suspect``; gives up after a while.
    ``kind`` POISONED: ``suspect`` holds non-finite or absurd values (sent them to this member,
    or, when it is this member, found them in its own update); TASK: the task's own code failed
    here (``detail``: :func:`task_error_detail`), which fails the job. By default LOCAL when this
    member names itself (an error), UNREACHABLE when it names another."""
    if kind is None:
        kind = (control_pb2.FAILURE_KIND_LOCAL if suspect == peer.peer_id else
                control_pb2.FAILURE_KIND_UNREACHABLE if suspect else control_pb2.FAILURE_KIND_UNSPECIFIED)
    fail = control_pb2.ReportFailureRequest(peer_id=peer.peer_id, job_id=plan.job_id, round=plan.round,
                                            epoch=plan.epoch, suspect_peer_id=suspect, detail=detail, kind=kind)
    try:
        peer.client.call(lambda: peer.client.stub.ReportFailure(fail, timeout=CALL_TIMEOUT_S),
                         "report failure", give_up_s=30)
        peer.metrics.failure_reported(fail.kind)
    except (grpc.RpcError, Evicted) as e:
        log.warning("peer %s: could not report the failure: %s", peer.peer_id, e)


def train_and_report(peer: Peer, plan: types_pb2.Plan, rank: int, tag: str, what: str, *,
                     prepare: Callable[[], Trainer],
                     average: Callable[[Trainer, int], object],
                     results: Callable[[Trainer, control_pb2.ReportRoundRequest], None],
                     evaluate: bool,
                     trained: Callable[[int], None] | None = None,
                     train: Callable[[Trainer, np.ndarray], StepResult] | None = None) -> control_pb2.ReportRoundResponse:
    """Trains on this member's samples of ``plan``, averages, then reports the round.

    ``prepare`` gives the trainer holding the starting parameters; ``train(trainer, samples)``
    trains on them (default: :meth:`Trainer.train_on`, one local step per batch; ``--sync
    grads`` averages inside its steps, and their exchange time counts as exchange); ``trained(samples)`` runs
    after training; ``average(trainer, samples)`` averages with the other members; ``results``
    adds what the exchange left to the report, which also carries the job's data usage
    (:mod:`dml.peer.datausage`); with ``evaluate`` the report carries test metrics.
    ``what`` names the report in the client's retry logs. Returns the coordinator's answer."""
    t0 = time.monotonic()
    trainer = prepare()
    samples = sample_indices(plan, rank, trainer.train_data.size)
    t_train = time.monotonic()
    res = train(trainer, samples) if train is not None else trainer.train_on(samples, plan.spec.batch_size)
    t_done = time.monotonic()
    if peer.config.slowdown > 1:  # --slowdown: idle (slowdown - 1) x the training time just spent
        peer.stop_event.wait((peer.config.slowdown - 1) * (t_done - t_train))
    if trained is not None:
        trained(res.samples)
    t1, w1 = time.monotonic(), time.time()
    average(trainer, res.samples)
    t2, w2 = time.monotonic(), time.time()
    req = control_pb2.ReportRoundRequest(
        peer_id=peer.peer_id, job_id=plan.job_id, round=plan.round, epoch=plan.epoch, samples=res.samples,
        train_loss=res.loss, train_ms=int((t1 - t0 - res.exchange_s) * 1000),
        exchange_ms=int((t2 - t1 + res.exchange_s) * 1000),
        train_samples_per_s=res.samples / (t1 - t_train - res.exchange_s)
        if res.samples and t1 > t_train + res.exchange_s else 0.0)  # throttle included
    results(trainer, req)
    datausage.fill(req, trainer, peer)  # cheap: a few counters, the cached shard ids
    if evaluate:
        t_eval = time.monotonic()
        with trainer.lock:  # a partner's averaging must not land mid-evaluation
            ev = trainer.evaluate()
        req.has_test_metrics, req.test_accuracy, req.test_loss = True, ev.accuracy, ev.loss
        req.test_metrics.update(ev.metrics)
        req.eval_ms = int((time.monotonic() - t_eval) * 1000)
    resp: control_pb2.ReportRoundResponse = peer.client.call(
        lambda: peer.client.stub.ReportRound(req, timeout=CALL_TIMEOUT_S), what, give_up_s=60)
    peer.metrics.reported("gossip" if plan.gossip else "ring", t1 - t0 - res.exchange_s, t2 - t1 + res.exchange_s)
    log.debug("%s: train %.3fs exchange %.3fs report %.3fs", tag, t1 - t0 - res.exchange_s, t2 - t1 + res.exchange_s,
              time.monotonic() - t2)
    if log.isEnabledFor(logging.DEBUG):
        # Each all-reduce's (enter, leave) in wall-clock time: set beside the other members'
        # (benchmarks/round_overhead.py), the last member's entry splits the wait for the
        # slowest (training, in truth) from the all-reduce itself, which one member cannot tell.
        log.debug("%s: all-reduce windows %s", tag,
                  " ".join(f"{a:.6f}:{b:.6f}" for a, b in (res.windows or [(w1, w2)])))
    return resp
