"""A multi-worker host (``dml-peer --workers N`` on CPU, ``--gpus 0,1,...`` one worker per
device): the peer process stays the host's one member of the ring, a supervisor that holds the
job's trainer (its flat buffer is what the ring averages, its state what snapshots, joiners and
checkpoints carry), and its N worker processes (peer/worker.py) train each round with
``DistributedDataParallel`` over a local process group. The host's allocation is N members'
(the coordinator scales it by the worker count it registered), split across the workers step by
step (peer/worksplit.py); its report's samples are the sum of theirs.

A worker that dies, fails or outlasts the round deadline fails the round: every worker is
stopped, and the peer reports a local failure (so the round is re-issued without it); it then
re-registers, takes the job again, and starts fresh workers (a take that cannot start them
declines the job: the host leaves cleanly).
"""
from __future__ import annotations

import io
import logging
import mmap
import os
import multiprocessing
import pathlib
import secrets
import shutil
import tempfile
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dml.common import taskcode
from dml.common.spec import task_kind
from dml.peer import faults, shm, trainstate, worker
from dml.peer.outer import PART as OUTER
from dml.peer.torchplane import PLANE as TORCH_PLANE
from dml.peer.trainer import StepResult, TaskError, Trainer
from dml.peer.worksplit import loss_scales, split_steps

if TYPE_CHECKING:
    from dml.v1 import types_pb2

    from dml.peer.faults import Fault

log = logging.getLogger(__name__)
START_TIMEOUT_S = 180.0  # a worker's start: torch's import, the task's data, the process group
STOP_TIMEOUT_S = 5.0
DEATH_GRACE_S = 2.0  # how long a failed worker's fellows may take to show that one of them died first


class WorkersFailed(Exception):
    """A worker died, failed or hung: the round cannot finish on this host."""


def unsupported(spec: types_pb2.JobSpec) -> str:
    """Why a multi-worker host declines a job ("" when it runs it)."""
    if spec.aggregation == "gossip":
        return "a multi-worker peer does not run gossip jobs yet (--aggregation ring only)"
    if spec.sync == "grads":
        return "a multi-worker peer does not run --sync grads yet (its workers would need the ring every step)"
    if spec.dataset:
        return "a multi-worker peer does not read datasets of the coordinator's store yet (--dataset)"
    if spec.prox_mu > 0:
        return "a multi-worker peer does not run a proximal term yet (--prox-mu)"
    if spec.data_plane == TORCH_PLANE:
        return "a multi-worker peer does not run --data-plane torch yet (its workers hold a process group already)"
    return ""


def _worker_parts(trainer: Trainer) -> dict[str, Any]:
    """The state parts the workers train (the optimizer, fp16's scaler); the outer optimizer
    stays the peer's, which applies it to the ring's average."""
    return {k: v for k, v in trainer.state_parts.items() if k != OUTER}


def _backend(devices: tuple[str, ...] | list[str]) -> str:
    """NCCL among workers each on a GPU of its own; gloo on CPU or where workers share a GPU
    (NCCL refuses two ranks on one device)."""
    cuda = bool(devices) and all(d.startswith("cuda") for d in devices)
    return "nccl" if cuda and len(set(devices)) == len(devices) else "gloo"


class WorkerPool:
    """The N worker processes of one job: started with :meth:`start`, one :meth:`train` per
    round, :meth:`close` to stop them (also on any failure)."""

    def __init__(self, job_id: str, trainer: Trainer, setup: dict[str, Any], count: int,
                 gpus: tuple[int, ...], peer_id: str) -> None:
        self.job_id, self.count, self.gpus = job_id, count, gpus
        self._trainer = trainer
        self._tag = f"peer {peer_id} job {job_id}"
        self._dir = tempfile.mkdtemp(prefix="dml-workers-")
        # The shared buffer: a file named as peer/shm.py names its files (dml-PID-RANDOM), so a
        # peer killed before it unlinks it has it removed at its next start; unlinked once every
        # worker has mapped it.
        folder = shm.SHM_DIR if shm.SHM_DIR.is_dir() else pathlib.Path(self._dir)
        self._path: pathlib.Path | None = folder / f"dml-{os.getpid()}-{secrets.token_hex(12)}"
        size = 4 * (trainer.numel + 1)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.shared = np.frombuffer(self._map, dtype=np.float32)
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._setup = setup
        self.broken = ""  # why it can no longer train ("" while it can)

    def start(self, stop: threading.Event) -> None:
        """Starts the workers and waits until each built its task and joined the process group;
        WorkersFailed (every worker stopped) when one cannot."""
        store = os.path.join(self._dir, "store")
        ctx = _context()
        level = logging.getLogger().getEffectiveLevel()
        for rank in range(self.count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker.run, name=f"dml-worker-{rank}", daemon=True,
                               args=(child, str(self._path), self.gpus[rank] if self.gpus else None, level))
            try:
                proc.start()
            except OSError as e:
                parent.close()
                child.close()
                self._fail(f"cannot start worker {rank}: {e}")
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
            parent.send({**self._setup, "rank": rank, "world": self.count, "store": store,
                         "device": "cuda:0" if self.gpus else "cpu"})
        self._gather("start", START_TIMEOUT_S, stop, want="ready")
        self._unlink()
        log.info("%s: %d workers started (%s, %s)", self._tag, self.count,
                 f"GPUs {','.join(map(str, self.gpus))}" if self.gpus else "CPU", _backend(self._devices()))

    def _unlink(self) -> None:
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None

    def _devices(self) -> tuple[str, ...]:
        return tuple(f"cuda:{g}" for g in self.gpus)

    def _gather(self, what: str, timeout_s: float, stop: threading.Event, want: str) -> list[dict[str, Any]]:
        """Every worker's answer, in rank order, within ``timeout_s``; on a death, an error, the
        deadline or ``stop``, stops every worker and raises WorkersFailed saying which."""
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        index = {id(c): i for i, c in enumerate(self._conns)}
        while len(got) < self.count:
            left = deadline - time.monotonic()
            if left <= 0:
                late = [str(i) for i in range(self.count) if i not in got]
                self._fail(f"worker{'s' if len(late) > 1 else ''} {', '.join(late)} did not finish "
                           f"{'their' if len(late) > 1 else 'its'} {what} within {timeout_s:.0f} s")
            if stop.is_set():
                self._fail(f"the peer stopped during the workers' {what}")
            ready = wait([c for i, c in enumerate(self._conns) if i not in got], timeout=min(left, 0.5))
            for c in ready:
                i = index[id(c)]
                try:
                    msg = c.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    self._procs[i].join(STOP_TIMEOUT_S)
                    code = self._procs[i].exitcode
                    self._fail(f"worker {i} died during its {what} (exit code {code})")
                if msg.get("op") != want and msg.get("task"):  # the task's own code failed: a task error
                    self.broken = f"worker {i}: {msg.get('error')}"
                    self.close()
                    raise TaskError(f"on worker {i} of this host: {msg.get('error')}")
                if msg.get("op") != want:
                    # A worker whose collective broke because another died says so first (gloo's
                    # "connection closed by peer" comes back before the dead one's exit is seen):
                    # name the death, the cause, when one follows within a short grace.
                    dead = self._dead_worker(DEATH_GRACE_S, but=i)
                    if dead is not None:
                        self._fail(f"worker {dead[0]} died during its {what} (exit code {dead[1]}); "
                                   f"worker {i} then failed: {msg.get('error', msg.get('op'))}")
                    self._fail(f"worker {i} failed its {what}: {msg.get('error', msg.get('op'))}")
                got[i] = msg
        return [got[i] for i in range(self.count)]

    def _dead_worker(self, grace_s: float, but: int) -> tuple[int, int | None] | None:
        """The first worker other than ``but`` whose process has exited, or exits within
        ``grace_s``: (its rank, its exit code); None if all of them live on."""
        others = {proc.sentinel: i for i, proc in enumerate(self._procs) if i != but}
        for sentinel in wait(list(others), timeout=grace_s):  # a sentinel is ready when its process ends
            i = others[sentinel]  # type: ignore[index]
            self._procs[i].join(STOP_TIMEOUT_S)
            return i, self._procs[i].exitcode
        return None

    def _fail(self, why: str) -> None:
        self.broken = why
        log.error("%s: %s; stopping its workers", self._tag, why)
        self.close()
        raise WorkersFailed(why)

    def train(self, samples: np.ndarray, batch_size: int, rnd: int, deadline_s: float, stop: threading.Event,
              fault: Fault | None = None) -> StepResult:
        """One round on the workers: from the trainer's parameters and training state, each
        worker trains its part of every step of ``samples``; the trainer then holds worker 0's
        parameters and state (identical on every worker: DDP). WorkersFailed on any failure."""
        if self.broken:
            raise WorkersFailed(self.broken)
        trainer = self._trainer
        steps = split_steps(samples, batch_size, self.count)
        if not steps:
            return StepResult(samples=0, loss=0.0)
        n = trainer.numel
        self.shared[:n] = trainer.flat[:n].detach().cpu().numpy()
        state = io.BytesIO()
        torch.save({name: part.state_dict() for name, part in _worker_parts(trainer).items()}, state)
        blob = state.getvalue()
        hit = fault is not None and fault.kind in faults.WORKER_FAULTS and rnd >= fault.round
        for w, conn in enumerate(self._conns):
            msg = {"op": "round", "round": rnd, "steps": [s[w] for s in steps],
                   "scales": [loss_scales(s)[w] for s in steps], "state": blob,
                   "fault": fault.kind if hit and fault is not None and w == faults.KILLED_WORKER % self.count
                   else None}
            try:
                conn.send(msg)
            except OSError as e:
                self._fail(f"worker {w} is gone ({e})")
        done = self._gather(f"round {rnd}", deadline_s, stop, want="done")
        with trainer.lock:
            trainer.flat[:n].copy_(torch.from_numpy(self.shared[:n].copy()))
            trainstate.restore(_worker_parts(trainer),
                               torch.load(io.BytesIO(done[0]["state"]), map_location="cpu", weights_only=True))
            trainer.version += 1
        total = sum(int(d["samples"]) for d in done)
        return StepResult(samples=total, loss=sum(float(d["loss_sum"]) for d in done) / max(total, 1))

    def close(self) -> None:
        """Stops every worker (asked: its pipe closes; then killed) and frees the shared buffer."""
        for conn in self._conns:
            conn.close()
        for p in self._procs:
            p.join(STOP_TIMEOUT_S if not self.broken else 0.1)
            if p.is_alive():
                p.kill()
                p.join(STOP_TIMEOUT_S)
        self._conns, self._procs = [], []
        self._unlink()
        shutil.rmtree(self._dir, ignore_errors=True)


_CTX: Any = None
_CTX_LOCK = threading.Lock()


def _context() -> Any:
    """The multiprocessing context workers start from: a fork server (single-threaded, started
    once per peer process) that imported torch and the worker module, so a worker starts in a
    fork rather than a fresh interpreter that imports torch again (seconds on a busy host)."""
    global _CTX
    with _CTX_LOCK:
        if _CTX is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["dml.peer.worker"])
            _CTX = ctx
        return _CTX


class WorkerHost:
    """A peer's workers: ``count`` of them (``--workers``; ``gpus``: one per listed device),
    one pool at a time, for the job the peer trains. ``fault``: tests only (peer.faults
    ``kill-worker:ROUND``, ``hang-worker:ROUND``), fired once per peer process."""

    def __init__(self, count: int, gpus: tuple[int, ...] = (), fault: Fault | None = None) -> None:
        self.count = len(gpus) if gpus else count
        self.gpus = gpus
        self._fault = fault if fault is not None and fault.kind in faults.WORKER_FAULTS else None
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()

    @property
    def multi(self) -> bool:
        """Whether this peer trains on workers (more than one, or any GPU list)."""
        return self.count > 1 or bool(self.gpus)

    @property
    def devices(self) -> list[str]:
        """The workers' devices as the capability record lists them ("cuda:N"; none on CPU)."""
        return [f"cuda:{g}" for g in self.gpus]

    def start(self, peer_id: str, job_id: str, spec: types_pb2.JobSpec, trainer: Trainer,
              code_root: str, stop: threading.Event) -> None:
        """Starts the workers of ``job_id`` (stopping any other job's first)."""
        self.close()
        kind = task_kind(spec.task, spec.task_digest)
        if kind == "code":
            taskcode.parse_ref(spec.task)  # the peer imported it already; the workers import the same copy
        setup = {"task": spec.task, "task_digest": spec.task_digest, "code_root": code_root if kind == "code" else "",
                 "seed": spec.seed, "lr": spec.learning_rate, "precision": spec.precision or "fp32",
                 "data_dir": str(trainer.ctx.data_dir), "job_id": job_id, "peer_id": peer_id,
                 "numel": trainer.numel, "backend": _backend(self.devices), "timeout_s": START_TIMEOUT_S,
                 "threads": 1}
        pool = WorkerPool(job_id, trainer, setup, self.count, self.gpus, peer_id)
        pool.start(stop)
        with self._lock:
            self._pool = pool

    def pool_for(self, job_id: str, trainer: Trainer) -> WorkerPool | None:
        """The live pool of ``job_id`` training ``trainer`` (None: none, or a broken one)."""
        pool = self._pool
        if pool is None or pool.job_id != job_id or pool.broken or pool._trainer is not trainer:  # noqa: SLF001
            return None
        return pool

    def train(self, job_id: str, trainer: Trainer, samples: np.ndarray, batch_size: int, rnd: int,
              deadline_s: float, stop: threading.Event) -> StepResult:
        """A round of ``job_id`` on the workers (WorkersFailed when they have none to run it)."""
        pool = self.pool_for(job_id, trainer)
        if pool is None:
            raise WorkersFailed(f"no live workers for job {job_id} (they failed, or the job was not taken here)")
        fault = self._fault
        if fault is not None and rnd >= fault.round:
            self._fault = None  # once: the restarted workers run the re-issued round
        return pool.train(samples, batch_size, rnd, deadline_s, stop, fault)

    def close(self) -> None:
        """Stops the workers, if any run."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
