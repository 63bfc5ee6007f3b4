"""What a job's data costs this peer, as the coordinator is told with every TakeJob and
ReportRound (``DataUsage``): where the data comes from (``local``: the peer's own files or a
shared volume; ``store``: fetched from the coordinator's dataset store into ``--cache-dir``),
what fetching it cost for this job (chunks and bytes fetched, chunks found in the cache, damaged
cache files fetched again), the job's shards whose rows the peer holds in its cache, and how
many bytes the cache can still take in (``--cache-max-gb`` minus what it holds). The coordinator
places shards by the last two (``coordinator/placement.py``) and shows it all in ``dml shards``.

The counters are per job: :class:`JobUsage`, built when the job's trainer is (``peer/taskload.py``)
and kept on that trainer (:func:`attach`, :func:`of`); for a store dataset they are the job's
:class:`~dml.peer.datacache.StoreSource` counters, which every read of its rows adds to, and the
shards it caches are those of the shards it was given (:func:`note_plan`) whose rows are all
present (``StoreSource.holds``). Counts are totals since the peer took the job, never deltas: a report the coordinator
lost costs nothing. The indices of the shards it was given are also kept beside the dataset in
the cache (:func:`save_shards`, :func:`load_shards`), so a peer restarted on the same
``--cache-dir`` tells the coordinator at its take which of the job's shards it still holds, and
is given those back rather than shards it would have to fetch.
"""
from __future__ import annotations

import hashlib
import io
import logging
import pathlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from dml.v1 import control_pb2

from dml.common.files import write_atomic
from dml.peer.datacache import ChunkCache, Counters, StoreSource

if TYPE_CHECKING:
    from dml.v1 import types_pb2

    from dml.peer.runner import Peer
    from dml.peer.trainer import Trainer

log = logging.getLogger(__name__)
LOCAL, STORE = "local", "store"
SOURCES = {LOCAL: control_pb2.DATA_SOURCE_LOCAL, STORE: control_pb2.DATA_SOURCE_STORE}
ATTRIBUTE = "data_usage"  # the trainer attribute holding its job's JobUsage


@dataclass
class JobUsage:
    """One job's data on this peer: its ``source`` (LOCAL or STORE), the cache counters it added
    (chunks and bytes fetched, hits, damaged chunks fetched again: the ``store`` source's own),
    whether every shard's rows are known to be there (``whole``), the store dataset the job reads
    (``store``, None for local data) and the sample indices of the shards this peer was given
    (``shards``, by id, from its plans)."""

    source: str
    num_shards: int
    counters: Counters = field(default_factory=Counters)
    whole: bool = False
    store: StoreSource | None = field(default=None, repr=False, compare=False)
    shards: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)
    rows: int = 0  # the training samples (the rows the training arrays must have)
    job_id: str = ""  # names the file its shards' indices are kept in (save_shards)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, got: Counters) -> None:
        """Adds what one read of the job's data cost (a :meth:`Counters.minus` delta)."""
        with self.lock:
            c = self.counters
            c.chunks_fetched += got.chunks_fetched
            c.bytes_fetched += got.bytes_fetched
            c.hits += got.hits
            c.damaged += got.damaged
            c.evicted += got.evicted

    def snapshot(self) -> Counters:
        """The counts so far (a copy)."""
        with self.lock:
            return Counters(**{k: getattr(self.counters, k) for k in Counters.__dataclass_fields__})


def local(num_shards: int) -> JobUsage:
    """A job on local data (``--data-dir`` or a shared volume): nothing fetched, nothing cached."""
    return JobUsage(LOCAL, num_shards)


def note_plan(job: JobUsage, plan: types_pb2.Plan) -> None:
    """Remembers the sample indices of the shards ``plan`` gives this peer (a shard keeps its
    indices for the job's life), so their presence can be reported."""
    if job.source != STORE:
        return
    note_indices(job, {sid: np.asarray(s.indices, dtype=np.int64) for sid, s in plan.shard_indices.items()
                       if sid not in job.shards})


def note_indices(job: JobUsage, indices: dict[int, np.ndarray]) -> None:
    """Remembers (and keeps, :func:`save_shards`) the sample indices of shards given to this
    peer: a plan's, or those the prefetch asked the coordinator for (GetShardIndices)."""
    if job.source != STORE:
        return
    with job.lock:
        new = [sid for sid in indices if sid not in job.shards]
        for sid in new:
            job.shards[sid] = indices[sid]
    if new:
        save_shards(job)


def known_indices(job: JobUsage, shard_ids: list[int]) -> tuple[np.ndarray, list[int]]:
    """The sample indices (sorted, unique) of those of ``shard_ids`` whose indices this peer
    knows, and the ids it does not know."""
    with job.lock:
        parts = [job.shards[s] for s in shard_ids if s in job.shards]
        missing = [s for s in shard_ids if s not in job.shards]
    return (np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)), missing


def shards_file(job: JobUsage) -> pathlib.Path | None:
    """Where the indices of ``job``'s shards given to this peer are kept: beside its dataset's
    folder in the cache, one file per job (named by the job id's sha256); None for local data."""
    if job.store is None or not job.job_id:
        return None
    root = job.store.root
    return root.parent / f"{root.name}.jobs" / f"{hashlib.sha256(job.job_id.encode()).hexdigest()[:32]}.npz"


def save_shards(job: JobUsage) -> None:
    """Writes the indices of the shards ``job`` was given (atomically; a failure is logged:
    it only costs a restarted peer a fetch)."""
    path = shards_file(job)
    if path is None:
        return
    with job.lock:
        arrays = {str(sid): idx for sid, idx in job.shards.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buf.getvalue())
    except OSError as e:
        log.warning("job %s: cannot keep its shards' indices at %s: %s", job.job_id, path, e)


def load_shards(job: JobUsage) -> int:
    """Reads what :func:`save_shards` kept for ``job`` (a previous run of this peer on the same
    cache) into ``job.shards``: shard ids below its shard count, indices below its rows (when
    known), anything else ignored, a damaged file logged and ignored. Returns the shards read."""
    path = shards_file(job)
    if path is None or not path.is_file():
        return 0
    try:
        with np.load(path, allow_pickle=False) as z:
            got = {}
            for key in z.files:
                sid, idx = int(key), np.asarray(z[key], dtype=np.int64)
                if not 0 <= sid < job.num_shards or idx.ndim != 1 or (idx.size and idx.min() < 0) or \
                        (job.rows and idx.size and idx.max() >= job.rows):
                    raise ValueError(f"shard {key} does not fit the job")
                got[sid] = idx
    except (OSError, ValueError, KeyError) as e:
        log.warning("job %s: ignoring the shards' indices kept at %s: %s", job.job_id, path, e)
        return 0
    with job.lock:
        for sid, idx in got.items():
            job.shards.setdefault(sid, idx)
    return len(got)


def cached_shards(job: JobUsage) -> list[int]:
    """The job's shard ids whose rows this peer holds in its cache: every shard when ``whole``
    or when every training array is present whole; else those of the shards it was given whose
    rows are all present in every training array (none before the task opened any); none for
    local data."""
    if job.source != STORE:
        return []
    if job.whole:
        return list(range(job.num_shards))
    if job.store is None:
        return []
    arrays = job.store.train_arrays(job.rows) if job.rows else []
    if arrays and all(a.holds(slice(None)) for a in arrays):
        return list(range(job.num_shards))
    with job.lock:
        shards = sorted(job.shards.items())
    return [sid for sid, idx in shards if job.store.holds(idx, job.rows or None)]


def cache_free(cache: ChunkCache) -> int | None:
    """Bytes the cache can still take in (``--cache-max-gb`` minus the chunks it holds, never
    negative); None when it has no limit."""
    if not cache.max_bytes:
        return None
    return max(0, cache.max_bytes - cache.stored_bytes)


def usage(job: JobUsage) -> control_pb2.DataUsage:
    """``job``'s data usage as the coordinator is told it."""
    c = job.snapshot()
    return control_pb2.DataUsage(source=SOURCES[job.source], chunks_fetched=c.chunks_fetched,
                                 bytes_fetched=c.bytes_fetched, cache_hits=c.hits, damaged_refetched=c.damaged,
                                 cached_shard_ids=cached_shards(job))


def attach(trainer: Trainer, job: JobUsage) -> None:
    """Keeps ``job`` on its trainer, where the job's data readers and its reports reach it."""
    setattr(trainer, ATTRIBUTE, job)


def of(trainer: Trainer) -> JobUsage | None:
    """The JobUsage kept on ``trainer`` (None for a trainer built elsewhere, e.g. in a test)."""
    got = getattr(trainer, ATTRIBUTE, None)
    return got if isinstance(got, JobUsage) else None


def fill(req: control_pb2.ReportRoundRequest | control_pb2.TakeJobRequest, trainer: Trainer, peer: Peer) -> None:
    """Adds the trainer's job's data usage and the free bytes of ``peer``'s cache to a report or
    take (nothing when the trainer carries no JobUsage)."""
    job = of(trainer)
    if job is None:
        return
    req.data_usage.CopyFrom(usage(job))
    free = cache_free(peer.data_cache)
    if free is not None:
        req.has_cache_free, req.cache_free_bytes = True, free
