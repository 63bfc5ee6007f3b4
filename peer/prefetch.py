"""Fetching a plan's rows before the batches ask for them: when a plan reaches a peer whose job
reads a dataset of the coordinator's store, a background thread (one at a time, for one job)
fetches the rows of all the peer's shards in every training array the task opened
(:meth:`dml.peer.datacache.StoreSource.prefetch`). So when shards move (a peer died, the round
is planned again) the survivors fetch what they were given while the ring re-forms. The batches
still fetch their own rows: prefetch only saves them the wait, and being late or cancelled is
harmless."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from dml.peer.datacache import StoreSource

if TYPE_CHECKING:
    from dml.v1 import types_pb2

log = logging.getLogger(__name__)
IDLE_WAIT_S = 1.0  # how long the thread waits for work before it checks whether it was cancelled
IDLE_EXIT_S = 60.0  # a thread with no work for this long ends (the next plan starts another)


@dataclass
class _Work:
    job_id: str
    source: StoreSource
    indices: np.ndarray | Callable[[], np.ndarray]  # or what finds them, called on the thread
    rows: int


def plan_indices(plan: types_pb2.Plan) -> np.ndarray:
    """The sample indices of every shard ``plan`` gives its receiver, sorted and unique."""
    parts = [np.asarray(s.indices, dtype=np.int64) for s in plan.shard_indices.values()]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


class Prefetcher:
    """At most one prefetch thread, for one job: :meth:`submit` gives it a plan's rows (the
    latest replaces any not yet started), :meth:`cancel` stops it (between chunks)."""

    def __init__(self, name: str = "prefetch") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._job = ""
        self._pending: _Work | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: int | None = None  # the hash of the indices last submitted for this job
        self._source: StoreSource | None = None
        self.done = 0  # prefetches finished (tests wait on it)
        self.failed = ""  # the last prefetch's error ("" when it worked)

    @property
    def job_id(self) -> str:
        """The job being prefetched for ("" when none)."""
        with self._lock:
            return self._job

    def submit(self, job_id: str, source: StoreSource, indices: np.ndarray | Callable[[], np.ndarray], rows: int,
               key: object = None) -> None:
        """Fetches rows ``indices`` of ``source``'s training arrays of ``rows`` rows in the
        background, for job ``job_id``; another job's prefetch is cancelled first. ``indices``
        may be a function the thread calls to find them (it may ask the coordinator); ``key``
        then tells the same work from new (by default the indices' own hash)."""
        if key is None:
            assert not callable(indices), "a function of indices needs a key"
            key = hash(np.asarray(indices, dtype=np.int64).tobytes())
        with self._lock:
            if self._job != job_id:
                self._stop_locked()
                self._job = job_id
            elif key == self._last and source is self._source:
                return  # the same shards as the last plan: nothing new to fetch
            self._last, self._source = key, source
            self._pending = _Work(job_id, source, indices, rows)
            if self._thread is None or not self._thread.is_alive():
                self._cancel = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._cancel,), name=self.name, daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def cancel(self, job_id: str | None = None) -> None:
        """Stops prefetching (for ``job_id`` only, when given): the job ended."""
        with self._lock:
            if job_id is None or job_id == self._job:
                self._stop_locked()
                self._job = ""

    def _stop_locked(self) -> None:
        self._cancel.set()
        self._pending = None
        self._last, self._source = None, None
        self._thread = None  # it ends at its next check; a new one gets its own event
        self._wake.notify_all()

    def join(self, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` for the thread to end; True when it has."""
        with self._lock:
            t = self._thread
        if t is not None:
            t.join(timeout_s)
            return not t.is_alive()
        return True

    def wait_done(self, count: int, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` until ``count`` prefetches have finished (tests)."""
        with self._wake:
            return self._wake.wait_for(lambda: self.done >= count, timeout_s)

    def _run(self, cancelled: threading.Event) -> None:
        idle = 0.0
        while not cancelled.is_set():
            with self._wake:
                work = self._pending
                if work is None:
                    self._wake.wait(IDLE_WAIT_S)
                    work = self._pending
                self._pending = None
                if work is None:
                    idle += IDLE_WAIT_S
                    if idle >= IDLE_EXIT_S:
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return
                    continue
            idle = 0.0
            before = work.source.counters.chunks_fetched, work.source.counters.bytes_fetched
            indices = np.zeros(0, dtype=np.int64)
            try:
                indices = work.indices() if callable(work.indices) else work.indices
                work.source.prefetch(indices, work.rows, cancelled)
                err = ""
            except Exception as e:  # noqa: BLE001 - a fetch that fails here fails again in the batch, which reports it
                err = f"{type(e).__name__}: {e}"
                log.warning("job %s: prefetching the plan's rows failed (the batches fetch them): %s", work.job_id, err)
            c = work.source.counters
            if not err:
                log.info("job %s: prefetched the rows of %d samples: %d chunks (%d bytes) fetched%s", work.job_id,
                         indices.size, c.chunks_fetched - before[0], c.bytes_fetched - before[1],
                         " (cancelled)" if cancelled.is_set() else "")
            with self._wake:
                self.failed = err
                self.done += 1
                self._wake.notify_all()
