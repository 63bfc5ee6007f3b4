"""One training worker of a multi-worker host (``dml-peer --workers N`` / ``--gpus``): a child
process the peer started (peer/workers.py: :func:`run`, from a fork server that imported torch
once), talking to the peer over a private pipe. It builds the job's task like the peer did (a built-in task,
``package.module:NAME``, or the task code the peer already fetched, verified and extracted),
joins the host's local process group (gloo on CPU, NCCL on CUDA, a FileStore the peer made) and
trains with ``DistributedDataParallel``. Each round the peer puts the starting parameters in a
shared buffer and sends each worker its samples per step (peer/worksplit.py) and the training
state; worker 0 writes the parameters after the round back into the buffer and returns the
training state. Its end of the socket closing (the peer died) ends it.
"""
from __future__ import annotations

import datetime
import io
import logging
import mmap
import os
import pathlib
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dml.common.task import Context, Task
from dml.peer import faults, trainstate
from dml.peer.outer import PART as OUTER
from dml.peer.taskload import bundled_task, resolve
from dml.peer.trainer import TaskError, Trainer

log = logging.getLogger(__name__)
HANG_S = 600.0  # the hang-worker test fault's silence (the host kills it long before)


def state_bytes(trainer: Trainer) -> bytes:
    """The trainer's training state (every state part's state_dict) torch.save'd."""
    out = io.BytesIO()
    torch.save({name: part.state_dict() for name, part in trainer.state_parts.items() if name != OUTER}, out)
    return out.getvalue()


def load_state(trainer: Trainer, data: bytes) -> None:
    """Loads :func:`state_bytes` into the trainer's state parts (weights only)."""
    parts = {k: v for k, v in trainer.state_parts.items() if k != OUTER}
    trainstate.restore(parts, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def _task(setup: dict[str, Any]) -> Task:
    if setup["code_root"]:  # the peer verified and extracted it: import that copy
        return bundled_task(setup["task"], setup["task_digest"], pathlib.Path(setup["code_root"]))
    return resolve(setup["task"])


class Worker:
    """The worker's trainer, its DDP wrapper and its view of the host's shared buffer."""

    def __init__(self, setup: dict[str, Any], shared: np.ndarray) -> None:
        self.rank, self.world = int(setup["rank"]), int(setup["world"])
        device = setup["device"]
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        torch.set_num_threads(max(1, int(setup.get("threads", 1))))
        ctx = Context(data_dir=pathlib.Path(setup["data_dir"]), seed=setup["seed"], job_id=setup["job_id"],
                      peer_id=setup["peer_id"])
        # Real gradients (DDP averages them), the same seeded model as the peer's.
        self.trainer = Trainer(_task(setup), setup["seed"], setup["lr"], device, ctx=ctx, fuse=False,
                               precision=setup["precision"])
        if self.trainer.numel != int(setup["numel"]):
            raise RuntimeError(f"the task's model has {self.trainer.numel} parameters here, "
                               f"{setup['numel']} in the peer")
        self.shared = shared
        store = dist.FileStore(setup["store"], self.world)
        timeout = datetime.timedelta(seconds=float(setup["timeout_s"]))
        dist.init_process_group(setup["backend"], store=store, rank=self.rank, world_size=self.world, timeout=timeout)
        ids = [torch.device(device).index or 0] if device.startswith("cuda") else None
        self.ddp = DistributedDataParallel(self.trainer.model, device_ids=ids)

    def round(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Trains one round: the parameters from the shared buffer, the state sent, then one DDP
        step per entry of ``msg["steps"]`` (this worker's samples), each loss scaled as
        peer/worksplit.py says. Worker 0 writes the result back."""
        t = self.trainer
        n = t.numel
        t.flat[:n].copy_(torch.from_numpy(self.shared[:n]))
        if msg.get("state") is not None:
            load_state(t, msg["state"])
        self.ddp.train()
        total, loss_sum = 0, 0.0
        for s, (idx, scale) in enumerate(zip(msg["steps"], msg["scales"])):
            if s == 0 and msg.get("fault") == faults.KILL_WORKER:
                log.warning("worker %d: test fault %s: exiting", self.rank, faults.KILL_WORKER)
                os._exit(17)
            if s == 0 and msg.get("fault") == faults.HANG_WORKER:
                log.warning("worker %d: test fault %s: not answering", self.rank, faults.HANG_WORKER)
                time.sleep(HANG_S)  # the host stops it at its deadline
            idx = np.ascontiguousarray(idx, dtype=np.int64)
            x, y = t.train_data.get(idx)
            t.optimizer.zero_grad(set_to_none=True)
            with t.autocast():
                loss = t._loss(self.ddp(x), y)  # noqa: SLF001 - the trainer's checked loss
            t.backward_and_step(loss * scale if scale != 1.0 else loss)
            total += int(idx.size)
            loss_sum += float(loss.detach()) * int(idx.size)
        t.optimizer.zero_grad(set_to_none=True)
        out: dict[str, Any] = {"op": "done", "samples": total, "loss_sum": loss_sum}
        if self.rank == 0:
            self.shared[:n] = t.flat[:n].detach().cpu().numpy()
            out["state"] = state_bytes(t)
        return out

    def close(self) -> None:
        """Leaves the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()


def serve(conn: Connection, shared_path: str) -> None:
    """The worker's loop: set up from the first message, then a round per message until
    ``stop`` or the peer's end closes."""
    setup = conn.recv()
    size = 4 * (int(setup["numel"]) + 1)
    with open(shared_path, "r+b") as f:
        mem = mmap.mmap(f.fileno(), size)
    shared = np.frombuffer(mem, dtype=np.float32)
    try:
        worker = Worker(setup, shared)
    except Exception as e:  # noqa: BLE001 - whatever failed, the peer must hear it
        log.warning("worker %s: cannot start: %s", setup.get("rank"), e)
        try:
            conn.send({"op": "error", "error": f"{type(e).__name__}: {e}"[:2000]})
        except OSError:
            pass
        return
    conn.send({"op": "ready"})
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return  # the peer is gone
            if msg.get("op") != "round":
                return
            try:
                out = worker.round(msg)
            except Exception as e:  # noqa: BLE001 - a peer worker died (gloo says so), the task failed, ...
                log.warning("worker %d: round %s failed: %s", worker.rank, msg.get("round"), e)
                out = {"op": "error", "error": f"{type(e).__name__}: {e}"[:2000], "task": isinstance(e, TaskError)}
            try:
                conn.send(out)
            except OSError:
                return  # the peer stopped listening (it stops every worker when one fails)
            if out["op"] == "error":
                return
    finally:
        worker.close()


def run(conn: Connection, shared_path: str, gpu: int | None, log_level: int) -> None:
    """A worker process's body (started by peer/workers.py from its fork server, where torch is
    imported already): ``gpu`` is made the only CUDA device this process sees
    (``CUDA_VISIBLE_DEVICES``) before anything touches CUDA."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s worker %(process)d %(name)s: %(message)s")
    try:
        serve(conn, shared_path)
    finally:
        conn.close()
