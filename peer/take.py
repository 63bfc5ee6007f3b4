"""The take step on a peer: before it joins a job's ring, an idle peer loads the job's task and
tells the coordinator what it found of the data (``TakeJob(READY)``: sample counts, the training
labels, the task's batch size, a digest every peer must match), that it will not run the job
(``DECLINED``), or the task's own error (``TASK_ERROR``). The coordinator cuts the job's shards
from that, never importing the task itself. The trainer built here is kept for the job's rounds,
so the data is not loaded twice."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from dml.v1 import control_pb2, types_pb2

from dml.aggregation.averaging import digest
from dml.common.sampling import MAX_LABELS, labels_digest
from dml.peer import datausage, torchplane
from dml.peer.client import CALL_TIMEOUT_S, Evicted
from dml.peer.params import Snapshot
from dml.peer.step import task_error_detail
from dml.peer.taskload import Declined, make_trainer
from dml.peer.trainer import TaskError, Trainer
from dml.peer.workers import WorkersFailed, unsupported

if TYPE_CHECKING:
    from dml.peer.runner import Peer

log = logging.getLogger(__name__)
MAX_LABEL = (1 << 31) - 1  # labels travel as int32
MAX_LABEL_COUNTS = 4096  # a --placement local take's label counts (coordinator.planner.MAX_LABEL_COUNTS)


def label_problem(labels: np.ndarray, samples: int) -> str:
    """Why ``labels`` are not the labels of a training set of ``samples`` samples ("" when they
    are): one non-negative int per sample, each fitting an int32."""
    if labels.ndim != 1:
        return f"labels must be one int per sample (1-D), got shape {labels.shape}"
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        return f"labels must be integers, got {labels.dtype}"
    if labels.size != samples:
        return f"{labels.size} labels for {samples} training samples"
    if labels.size and int(labels.min()) < 0:
        return f"labels must not be negative (found {int(labels.min())})"
    if labels.size and int(labels.max()) > MAX_LABEL:
        return f"labels must be below 2^31 (found {int(labels.max())})"
    return ""


def _as_numpy(x: Any) -> np.ndarray:
    """Labels as a numpy array, from a torch tensor (on any device), an array or a sequence."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def training_labels(trainer: Trainer) -> np.ndarray | None:
    """The task's training labels: ``task.labels(ctx)`` when it gives them (TaskError when
    they raise or are not one non-negative int per sample), else the dataset's targets when it
    is array-backed and they are such labels, else None (the task has none)."""
    n = trainer.train_data.size
    task = trainer.task
    if task.labels is not None:
        try:
            got = _as_numpy(task.labels(trainer.ctx))
        except Exception as e:  # noqa: BLE001 - the user's code may raise anything
            raise TaskError(f"labels(ctx) raised {type(e).__name__}: {e}") from e
        problem = label_problem(got, n)
        if problem:
            raise TaskError(f"labels(ctx): {problem}")
        return got
    arrays = trainer.train_data.arrays
    if arrays is None:
        return None
    targets = _as_numpy(arrays[1])
    if label_problem(targets, n):
        return None  # targets that are not class labels (regression, one-hot, ...): no labels
    return targets


def describe(trainer: Trainer, local: bool = False) -> control_pb2.DataInfo:
    """What this peer found of the job's data, as the coordinator plans from it. Labels are sent
    for at most MAX_LABELS samples (the digest covers them all the same). For a ``--placement
    local`` job (``local``) the labels never leave: only their counts (samples per label, for
    at most MAX_LABEL_COUNTS labels, else none) and the digest, by which the coordinator knows
    this data again when this peer comes back."""
    labels = training_labels(trainer)
    n = trainer.train_data.size
    blob = np.ascontiguousarray(labels, dtype="<i4").tobytes() if labels is not None else b""
    if local:
        counts = np.bincount(labels.astype(np.int64)).tolist() if labels is not None and labels.size else []
        return control_pb2.DataInfo(
            train_samples=n, test_samples=trainer.test_data.size if trainer.test_data is not None else 0,
            label_counts=counts if len(counts) <= MAX_LABEL_COUNTS else [], num_classes=len(counts),
            batch_size=trainer.task.batch_size or 0, num_params=trainer.numel, data_digest=labels_digest(n, blob))
    return control_pb2.DataInfo(
        train_samples=n, test_samples=trainer.test_data.size if trainer.test_data is not None else 0,
        labels=blob if len(blob) <= 4 * MAX_LABELS else b"",
        num_classes=int(labels.max()) + 1 if labels is not None and labels.size else 0,
        batch_size=trainer.task.batch_size or 0, num_params=trainer.numel, data_digest=labels_digest(n, blob))


def start_workers(peer: Peer, job_id: str, spec: types_pb2.JobSpec, trainer: Trainer) -> None:
    """Starts the workers of a multi-worker host for the job (peer.workers); Declined when they
    cannot start, so the host leaves the job cleanly rather than failing its rounds."""
    root = str(peer.code_cache.folder / spec.task_digest) if spec.task_digest else ""
    try:
        peer.workers.start(peer.peer_id, job_id, spec, trainer, root, peer.stop_event)
    except WorkersFailed as e:
        raise Declined(f"cannot start this peer's {peer.workers.count} workers: {e}") from None


def prepare(peer: Peer, plan: types_pb2.Plan) -> control_pb2.TakeJobRequest:
    """Loads the task of ``plan``'s job (or reuses the trainer this peer holds for it) and says
    what came of it, as the TakeJob request (READY: with what its data cost, and the cache's
    free bytes: :func:`datausage.fill`). A new trainer is kept in the peer's ParamStore,
    starting from the seeded model."""
    req = control_pb2.TakeJobRequest(peer_id=peer.peer_id, job_id=plan.job_id)
    try:
        if plan.spec.data_plane == torchplane.PLANE:  # its tensors travel unencrypted
            why = torchplane.decline_reason(plan.spec, peer.config.tls, peer.config.allow_torch_plane)
            if why:
                raise Declined(why)
        if peer.workers.multi and (why := unsupported(plan.spec)):
            raise Declined(why)
        trainer = peer.store.trainer_for(plan.job_id)
        fresh = trainer is None
        if trainer is None:
            trainer = make_trainer(peer, plan.job_id, plan.spec)
        if peer.workers.multi and peer.workers.pool_for(plan.job_id, trainer) is None:
            start_workers(peer, plan.job_id, plan.spec, trainer)
        req.data.CopyFrom(describe(trainer, local=plan.spec.placement == "local"))
        datausage.fill(req, trainer, peer)
    except Declined as e:
        req.outcome, req.detail = control_pb2.TAKE_OUTCOME_DECLINED, str(e)
        return req
    except TaskError as e:
        req.outcome, req.detail = control_pb2.TAKE_OUTCOME_TASK_ERROR, task_error_detail(e)
        return req
    except Exception as e:  # noqa: BLE001 - not the task's fault (memory, a device): this peer cannot run it
        log.exception("peer %s job %s: cannot load the task here", peer.peer_id, plan.job_id)
        req.outcome, req.detail = control_pb2.TAKE_OUTCOME_DECLINED, f"cannot load the task here: {e!r}"[:1000]
        return req
    if fresh:
        init = trainer.params()
        committed = None if plan.spec.aggregation == "gossip" else Snapshot(plan.job_id, 0, init, digest(init))
        peer.store.start(plan.job_id, trainer, committed)
    req.outcome = control_pb2.TAKE_OUTCOME_READY
    return req


def take(peer: Peer, plan: types_pb2.Plan) -> None:
    """Takes ``plan``'s job: loads its task and answers TakeJob. A refusal of the answer (the job
    finished meanwhile, or the coordinator found the description wrong) is logged; Evicted is
    raised."""
    req = prepare(peer, plan)
    outcome = control_pb2.TakeOutcome.Name(req.outcome).removeprefix("TAKE_OUTCOME_")
    tag = f"peer {peer.peer_id} job {plan.job_id}"
    if req.outcome == control_pb2.TAKE_OUTCOME_READY:
        d = req.data
        log.info("%s: took the job: %d training samples (%s), %d test samples, %d parameters", tag, d.train_samples,
                 f"{d.num_classes} classes" if d.num_classes else "no labels", d.test_samples, d.num_params)
    else:
        log.warning("%s: %s: %s", tag, outcome.lower().replace("_", " "), req.detail)
    try:
        peer.client.call(lambda: peer.client.stub.TakeJob(req, timeout=CALL_TIMEOUT_S), "take job", give_up_s=60)
    except Evicted:
        raise
    except grpc.RpcError as e:
        log.warning("%s: the coordinator refused the take (%s): %s", tag,
                    e.code() if isinstance(e, grpc.Call) else "?", e.details() if isinstance(e, grpc.Call) else e)
