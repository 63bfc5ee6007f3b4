"""The coordinator as one object: state machine + lock + store + checkpoints + the real clocks.

Servicers call these methods and translate results to protos; the background reaper calls
:meth:`Coordinator.tick`. Every change is persisted before waiters are woken, so what a peer or
client sees has survived a crash.

Time: every lease, deadline and grace period runs on the monotonic clock (``now_ms``); the wall
clock only stamps what people read (``ClusterState.wall_offset_ms``), so stepping it evicts
nobody. Timers do not survive a restart: a restored state starts them afresh from "now".

A write that fails (disk full, I/O error, a checkpoint that cannot be written) never leaves
memory ahead of disk: the state is reloaded from the store, whose transaction rolled back (as a
restart would), the call fails with :class:`StoreUnavailable`, and the coordinator is *paused*:
it refuses every change (heartbeats and reads go on), reports NOT_SERVING with the reason, and
its reaper re-tries a write of the same size every ``PROBE_EVERY_S``. When one fits, the state
is reloaded once more (every lease and deadline starts afresh, so nobody pays for the pause)
and it serves again. Peers retry UNAVAILABLE as they do across a coordinator restart.
"""
from __future__ import annotations

import logging
import os
import pathlib
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, TypeVar

import numpy as np

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dml.common import auth, rpc, version
from dml.common.sampling import MAX_LABELS as MAX_SENT_LABELS
from dml.common.sampling import labels_digest
from dml.common.spec import MAX_SAMPLES_PER_ROUND, InvalidSpec, JobSpec, task_kind, validate, with_defaults
from dml.coordinator import planner
from dml.coordinator.auth import PeerTokens
from dml.coordinator.checkpoint import BadCheckpoint, verify_checkpoint, verify_training_state
from dml.coordinator.codestore import CodeStore
from dml.coordinator.datastore import DataStore, Dataset
from dml.coordinator.metrics import CoordinatorMetrics
from dml.coordinator.records import (
    BadReport,
    Changes,
    DataUsage,
    Forbidden,
    Job,
    JobData,
    NotFound,
    Report,
    Stale,
    max_samples,
    peer_workers,
    peer_pool,
)
from dml.coordinator.state import DECLINED, READY, ClusterState
from dml.coordinator.store import Store, StoreOpenError, StoreWriteError
from dml.coordinator.utilisation import Shares

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Clock", "Coordinator", "CoordinatorConfig", "NotFound", "ShuttingDown", "Stale", "StoreUnavailable",
           "Unavailable"]

PROBE_EVERY_S = 1.0  # while paused by a failed write, how often the reaper re-tries one



MAX_INDICES_PER_CALL = 1 << 20  # sample indices in one GetShardIndices answer (<= 5 MiB as varints)
WITNESS_TIMEOUT_S = 0.5  # the coordinator's own connect to a suspect's address


def nothing_listens(address: str, timeout_s: float = WITNESS_TIMEOUT_S) -> str:
    """Why nothing listens at ``address`` (host:port) when a TCP connect is refused there, else
    "". Only a refusal counts: the host answered and said no process has the port (a peer killed
    or gone), which no network fault between two members can fake. A timeout or an unreachable
    network says nothing about the peer (the coordinator may sit on another network), so it
    counts as no evidence."""
    try:
        host, port = rpc.parse_address(address)
        with socket.create_connection((host.strip("[]"), port), timeout=timeout_s):
            return ""
    except ConnectionRefusedError:
        return f"nothing listens at {address} (connection refused)"
    except (OSError, ValueError):
        return ""


class Unavailable(Exception):
    """The coordinator cannot serve the call now; clients should retry (UNAVAILABLE)."""


class ShuttingDown(Unavailable):
    """The coordinator is stopping; clients should retry (UNAVAILABLE)."""


class StoreUnavailable(Unavailable):
    """A write failed or would fail (disk full, I/O error): the change was refused, nothing of
    it was kept; retry once the coordinator serves again."""


@dataclass(frozen=True)
class Clock:
    """The coordinator's clocks: ``monotonic`` (seconds) times every lease and deadline, ``wall``
    (Unix seconds) stamps what people read. Tests inject their own."""

    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time


@dataclass
class _Fault:
    """Why the coordinator is paused, and how to tell that it may go on."""

    reason: str
    probe: Callable[[], None]  # raises while writes would still fail
    since: float  # monotonic seconds


@dataclass(frozen=True)
class CoordinatorConfig:
    """Timing of the control plane."""

    heartbeat_interval_ms: int = 500  # how often peers heartbeat
    peer_timeout_ms: int = 2000  # silence after which a peer is evicted (4 missed heartbeats)
    tick_ms: int = 100  # how often the reaper checks leases and deadlines
    round_deadline_ms: int = 120_000  # a round running longer evicts the members that did not report


def labels_array(labels: bytes, train_samples: int) -> np.ndarray:
    """A job's training labels as an int array (zeros when its task has none: the schemes that
    need no labels look only at the count)."""
    if not labels:
        return np.zeros(train_samples, dtype=np.int32)
    return np.frombuffer(labels, dtype="<i4")


def cut_shards(spec: JobSpec, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """The shards of a job's training set as sample indices, for the peers' plans: deterministic
    from the spec and the labels, so never stored (their sizes are, on the Job). ValueError
    when they cannot be cut (the message says why)."""
    return tuple(planner.make_shards(labels, spec.num_shards, spec.sharding, spec.seed, spec.min_shard_samples))


def check_take_data(data: JobData, labels: bytes) -> JobData:
    """A READY take's description of the data as the coordinator accepts it: sizes in bounds,
    labels (int32 little-endian, one per training sample, at most MAX_SENT_LABELS of them, none
    negative) hashing to the digest; the class count is recomputed from them. BadReport says
    what is wrong: the bytes come from the network."""
    if data.batch_size > MAX_SAMPLES_PER_ROUND:
        raise BadReport(f"batch_size {data.batch_size} is over {MAX_SAMPLES_PER_ROUND:,}")
    if len(data.digest) != 64 or any(c not in "0123456789abcdef" for c in data.digest):
        raise BadReport("data_digest must be 64 hex digits (sha256)")
    if not labels:
        return replace(data, num_classes=0, has_labels=False)
    if data.train_samples > MAX_SENT_LABELS:
        raise BadReport(f"labels are sent for at most {MAX_SENT_LABELS:,} training samples, not {data.train_samples:,}")
    if len(labels) != 4 * data.train_samples:
        raise BadReport(f"{len(labels)} bytes of labels for {data.train_samples} training samples "
                        "(one int32 each, little-endian)")
    arr = np.frombuffer(labels, dtype="<i4")
    if arr.size and int(arr.min()) < 0:
        raise BadReport(f"labels must not be negative (found {int(arr.min())})")
    if labels_digest(data.train_samples, labels) != data.digest:
        raise BadReport("data_digest is not the sha256 of the sample count and the labels sent")
    return replace(data, num_classes=int(arr.max()) + 1 if arr.size else 0, has_labels=True)


MAX_LABELS = 1 << 16  # label counts are shown for labels 0..MAX_LABELS-1 (a count per label per peer)


@dataclass(frozen=True)
class PeerShardView:
    """One member's part of a job's data, for ``dml shards``."""

    peer_id: str
    shard_ids: list[int]
    samples: int
    label_counts: list[int] | None  # samples per label (index = label); None: labels unknown
    usage: DataUsage | None = None  # its last word on the job's data (None: none since this coordinator started)


@dataclass(frozen=True)
class PeerView:
    """A registered peer, for ``dml peers``."""

    peer_id: str
    address: str
    pool: str
    device: str
    memory_bytes: int
    samples_per_s: float
    state: str  # ClusterState.peer_state
    job_id: str
    shares: Shares  # of the last minute: training, exchanging, idle
    registered_ms: int  # Unix ms
    max_samples: int
    local_datasets: list[str]  # the names of the local datasets it offers (dml-peer --data)
    workers: int = 1  # its training workers (dml-peer --workers / --gpus)
    worker_devices: list[str] = field(default_factory=list)  # their devices ("cuda:N"; none on CPU)


def peer_views(state: ClusterState, now_ms: int) -> list[PeerView]:
    """Every registered peer of ``state`` in registration order, with what it does and its
    utilisation over the last minute. Pure (read under the caller's lock)."""
    out = []
    for p in sorted(state.peers.values(), key=lambda p: (p.registered_ms, p.peer_id)):
        what, job = state.peer_state(p.peer_id)
        mem = p.capability.get("memory_bytes", 0)
        out.append(PeerView(p.peer_id, p.address, peer_pool(p), str(p.capability.get("device", "")),
                            mem if isinstance(mem, int) and mem > 0 else 0, p.samples_per_s, what, job,
                            state.usage(p.peer_id, now_ms), p.registered_ms, max_samples(p),
                            list(p.capability.get("local_datasets", [])), peer_workers(p),
                            [str(d) for d in p.capability.get("worker_devices", [])]))
    return out


@dataclass(frozen=True)
class ShardsView:
    """Where a job's data is: each member's shards, and those no member holds."""

    job_id: str
    peers: list[PeerShardView]
    num_classes: int  # 0 when the labels are unknown
    train_samples: int
    unassigned: list[int]


def shards_view(job: Job, labels: np.ndarray | None, shards: list[np.ndarray] | None) -> ShardsView:
    """Each member's shards (ring order), samples and label counts (from ``labels`` and the
    shards' indices; None for both when unknown), and what its data cost it as it last reported. A
    finished job has no members: its last placement is shown. Pure."""
    sizes = job.shard_sizes
    if job.local:
        return _local_shards_view(job)
    if labels is not None and labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < MAX_LABELS:
        log.warning("job %s: labels outside 0..%d; shard label counts not shown", job.job_id, MAX_LABELS - 1)
        labels = None
    classes = int(labels.max()) + 1 if labels is not None and labels.size else 0
    peers = []
    for m in list(dict.fromkeys(job.members + list(job.assignment))):
        ids = sorted(job.assignment.get(m, []))
        counts = None
        if labels is not None and shards is not None:
            mine = np.concatenate([shards[s] for s in ids]) if ids else np.zeros(0, dtype=np.int64)
            counts = np.bincount(labels[mine].astype(np.int64), minlength=classes).tolist()
        peers.append(PeerShardView(m, ids, sum(sizes[s] for s in ids), counts, job.data_usage.get(m)))
    return ShardsView(job.job_id, peers, classes, sum(sizes), planner.unassigned(job.assignment, len(sizes)))


def _local_shards_view(job: Job) -> ShardsView:
    """A ``--placement local`` job's data for ``dml shards``: each member's own shard, with the
    label counts it reported (never its labels); a departed peer's data is listed as unassigned."""
    counts = job.local_label_counts
    classes = max((len(c) for c in counts), default=0)
    peers = []
    for m in list(dict.fromkeys(job.members + list(job.assignment))):  # a finished job: its last placement
        ids = sorted(job.assignment.get(m, []))
        mine = [counts[s] for s in ids if s < len(counts)]
        label_counts = ([sum(c[i] for c in mine if i < len(c)) for i in range(classes)]
                        if mine and all(mine) else None)
        peers.append(PeerShardView(m, ids, sum(job.shard_sizes[s] for s in ids), label_counts, job.data_usage.get(m)))
    return ShardsView(job.job_id, peers, classes, sum(job.shard_sizes),
                      planner.unassigned(job.assignment, len(job.shard_sizes)))


class Coordinator:
    """Thread-safe facade over :class:`ClusterState`."""

    def __init__(self, config: CoordinatorConfig, store: Store, checkpoint_dir: pathlib.Path,
                 clock: Clock = Clock(), metrics: CoordinatorMetrics | None = None,
                 signing_key: Ed25519PrivateKey | None = None, code: CodeStore | None = None,
                 data: DataStore | None = None) -> None:
        self.config = config
        # The dataset store (the server keeps it in STATE_DIR/data); jobs name its datasets.
        self.data = data if data is not None else DataStore(checkpoint_dir / "data")
        # Task code sent with jobs, by sha256 (the server keeps it in STATE_DIR/code).
        self.code = code if code is not None else CodeStore(checkpoint_dir / "task-code")
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        # Signs the membership tickets in plans; kept in the state dir by the server (a restart
        # keeps the tickets it issued valid), made fresh here otherwise.
        self.signing_key = signing_key if signing_key is not None else auth.new_private_key()
        self.public_key = auth.public_bytes(self.signing_key)
        self.tokens = PeerTokens()  # credentials issued to peers, by hash
        self._store = store
        self._ckpt_dir = checkpoint_dir
        self._clock = clock
        self._cond = threading.Condition()
        self._closed = False
        self._stopping = False  # set by begin_shutdown: long polls answer at once
        self._fault: _Fault | None = None  # set while paused by a failed write
        self._stale = False  # memory may be ahead of disk (a reload failed): serve nothing
        self._next_probe = 0.0
        self._last_tick_ms: int | None = None  # when the reaper last ran (now_ms), to tell a stall
        # Told (serving, reason) when the coordinator pauses and when it serves again; the server
        # sets its health service from it. Called with the lock held: it must not call back.
        self.on_health: Callable[[bool, str], None] | None = None
        self.state = ClusterState(config.peer_timeout_ms, config.round_deadline_ms)
        self.cluster_id = store.cluster_id
        self._shards: dict[str, tuple[np.ndarray, ...]] = {}  # job -> its shards' sample indices
        with self._cond:
            jobs, peers = store.load()
            self.state.restore(jobs, peers, self.now_ms())
            try:  # peers registered with another release's protocol (a restart on another release)
                self._apply(self.state.evict_other_protocols(version.PROTOCOL_VERSION, self.now_ms()))
            except StoreUnavailable as e:  # paused, memory reloaded; their credentials stay unknown (below)
                log.error("could not store the eviction of peers of another release: %s", e)
        for j in jobs:
            if j.state in ("PENDING", "RUNNING") and j.data is not None and not j.local:
                self._shards[j.job_id] = self._cut(j)  # now, not under the lock at the first plan
        for p in self.state.peers.values():  # credentials survive a restart, but not into another release
            if p.protocol_version == version.PROTOCOL_VERSION:
                self.tokens.add(p.token_hash, p.peer_id)
        if jobs or peers:
            log.info("restored %d jobs and %d peers from the store (cluster %s)", len(jobs), len(peers), self.cluster_id)
        self.metrics.restored(jobs)
        self.metrics.watch(self._peek)

    def _cut(self, job: Job) -> tuple[np.ndarray, ...]:
        """Cuts a job's shards from its stored labels (a restored job: no peer needed)."""
        assert job.data is not None
        labels = self._store.load_labels(job.job_id)
        if labels is None:
            raise StoreOpenError(f"job {job.job_id} has its data but no labels in the store")
        shards = cut_shards(job.spec, labels_array(labels, job.data.train_samples))
        if [int(s.size) for s in shards] != job.shard_sizes:
            raise StoreOpenError(f"job {job.job_id}: its shards cut again from the stored labels differ from the "
                                 "sizes it was planned with")
        return shards

    def shard_indices(self, job: Job) -> tuple[np.ndarray, ...]:
        """A job's shards as sample indices (cut when its data was fixed, or at start-up). Call
        with the lock held."""
        if job.local:
            return ()  # each member indexes its own data: no indices are sent
        shards = self._shards.get(job.job_id)
        if shards is None:
            raise Stale(f"job {job.job_id} has no shards yet: no peer has taken it")
        return shards

    def assigned_indices(self, peer_id: str, job_id: str, shard_ids: list[int]) -> dict[int, np.ndarray]:
        """The sample indices of those of ``shard_ids`` the running job ``job_id`` assigns to
        peer ``peer_id`` (others are left out: its assignment moved on), whole shards in the
        order asked until :data:`MAX_INDICES_PER_CALL` (always the first one). BadReport for ids
        that are out of range or repeated, NotFound for an unknown peer or job, Stale for a job
        that is not running or has no shards."""
        with self._cond:
            self._check_readable()
            if peer_id not in self.state.peers:
                raise NotFound(f"unknown peer {peer_id}; register again")
            job = self.state.job(job_id)
            n = len(job.shard_sizes)
            if len(shard_ids) > max(n, 1) or len(set(shard_ids)) != len(shard_ids) or \
                    any(not 0 <= s < n for s in shard_ids):
                raise BadReport(f"shard ids must be distinct and below the job's {n} shards, "
                                f"got {len(shard_ids)} ids ({sorted(shard_ids)[:8]}...)")
            if job.state != "RUNNING":
                raise Stale(f"job {job_id} is {job.state}: its shards are not served")
            shards = self.shard_indices(job)
            mine = set(job.assignment.get(peer_id, ()))
            out: dict[int, np.ndarray] = {}
            total = 0
            for s in shard_ids:
                if s not in mine or not shards:
                    continue
                if out and total + shards[s].size > MAX_INDICES_PER_CALL:
                    break
                out[s] = shards[s]
                total += int(shards[s].size)
            return out

    def job_labels(self, job_id: str) -> np.ndarray | None:
        """A job's training labels as the first peer to take it found them (one per sample),
        None when its task has none or no peer has taken it yet. Read from the store."""
        with self._cond:
            self._check_readable()
            job = self.state.job(job_id)
            if job.data is None or not job.data.has_labels:
                return None
        labels = self._store.load_labels(job_id)
        return np.frombuffer(labels, dtype="<i4").copy() if labels else None

    @property
    def store(self) -> Store:
        """Where the state is kept."""
        return self._store

    def _peek(self, fn: Callable[[ClusterState], T]) -> T:
        """Runs ``fn`` on the state under the lock, even while it may be stale (metrics)."""
        with self._cond:
            return fn(self.state)

    def now_ms(self) -> int:
        """The monotonic clock in milliseconds, for leases and deadlines; also tells the state
        how far the wall clock is from it, for the timestamps it shows. Call with the lock held."""
        now = int(self._clock.monotonic() * 1000)
        self.state.wall_offset_ms = int(self._clock.wall() * 1000) - now
        return now

    @property
    def pause_reason(self) -> str:
        """Why the coordinator refuses changes ("" while it serves)."""
        with self._cond:
            return self._pause_reason()

    def _pause_reason(self) -> str:
        if self._fault is None:
            return ""
        return f"coordinator paused: {self._fault.reason}; changes are refused until it can write again"

    def _check_writable(self) -> None:
        """Raises ShuttingDown or StoreUnavailable unless a change may be made now. Lock held."""
        if self._closed:
            raise ShuttingDown("the coordinator is shutting down; retry against the restarted one")
        if self._fault is not None:
            raise StoreUnavailable(self._pause_reason())

    def _check_readable(self) -> None:
        """Raises StoreUnavailable while memory may disagree with disk. Lock held."""
        if self._stale:
            raise StoreUnavailable(self._pause_reason() or "coordinator state is being reloaded")

    def _apply(self, changes: Changes, labels: dict[str, bytes] | None = None) -> None:
        """Persists what changed (with ``labels``, job -> int32 bytes, for the jobs whose data
        the change fixed) and wakes waiters. Call with the condition held. A write that fails
        rolls memory back to the store and raises StoreUnavailable (see the module)."""
        if self._closed:
            raise ShuttingDown("the coordinator is shutting down; retry against the restarted one")
        st = self.state
        if changes.jobs or changes.peers or changes.removed_peers or changes.committed:
            try:
                self._store.save(
                    jobs=[st.jobs[j] for j in changes.jobs if j in st.jobs],
                    peers=[st.peers[p] for p in changes.peers if p in st.peers],
                    removed_peers=changes.removed_peers,
                    rounds=[(j, st.jobs[j].history[r - 1]) for j, r in changes.committed],
                    labels=[(j, (labels or {}).get(j, b"")) for j in changes.data],
                )
            except Exception as e:  # StoreWriteError, or anything else that kept it from being stored
                self.metrics.record_store_write_error()
                size = e.size_bytes if isinstance(e, StoreWriteError) else 0
                self._write_failed(str(e), lambda: self._store.probe(size), reload=True)
                raise StoreUnavailable(f"change refused: {e}") from e
            self.metrics.changed([st.jobs[j] for j in changes.jobs if j in st.jobs],
                                 [(st.jobs[j], r) for j, r in changes.committed if j in st.jobs])
            self._cond.notify_all()

    def _write_failed(self, reason: str, probe: Callable[[], None], reload: bool) -> None:
        """Pauses the coordinator after a failed write; with ``reload``, memory (ahead of disk by
        the refused change) is read back from the store. Lock held."""
        log.error("%s; refusing changes (NOT_SERVING) until a write succeeds again", reason)
        self._fault = _Fault(reason, probe, self._clock.monotonic())
        self._next_probe = self._fault.since + PROBE_EVERY_S
        if reload:
            self._reload()
        if self.on_health is not None:
            self.on_health(False, self._pause_reason())
        self._cond.notify_all()  # watchers show the pause

    def _reload(self) -> None:
        """Replaces memory with what the store holds, timers started afresh. Lock held."""
        try:
            jobs, peers = self._store.load()
        except (StoreOpenError, OSError) as e:
            log.error("cannot reload the coordinator state from the store (%s); serving nothing until it can", e)
            self._stale = True
            return
        self.state.restore(jobs, peers, self.now_ms())
        self._stale = False

    def _retry_write(self) -> None:
        """While paused: re-tries a write (at most every PROBE_EVERY_S); when it fits, reloads
        the state with fresh timers and serves again. Lock held."""
        fault = self._fault
        now = self._clock.monotonic()
        if fault is None or now < self._next_probe:
            return
        self._next_probe = now + PROBE_EVERY_S
        try:
            fault.probe()
        except (StoreWriteError, OSError) as e:
            log.debug("write still failing: %s", e)
            return
        self._reload()
        if self._stale:
            return
        self._fault = None
        log.warning("writes succeed again after %.1fs (%s); serving", now - fault.since, fault.reason)
        if self.on_health is not None:
            self.on_health(True, "")
        self._cond.notify_all()

    # -- peers ------------------------------------------------------------------------------
    def register(self, address: str, capability: dict[str, Any], public_key: bytes = b"",
                 protocol_version: int = version.PROTOCOL_VERSION) -> tuple[str, str]:
        """Registers a peer (with its Ed25519 public key and the protocol version it speaks);
        returns its id and the credential issued to it, of which only the hash is kept
        (persisted with the peer)."""
        token = auth.new_token()
        with self._cond:
            self._check_writable()
            pid, ch = self.state.register(address, capability, self.now_ms(), token_hash=auth.token_hash(token),
                                          public_key=public_key.hex(), protocol_version=protocol_version)
            self._apply(ch)
            self.tokens.add(auth.token_hash(token), pid)
            self.tokens.keep_only(set(self.state.peers))
        log.info("peer %s registered at %s (%s)", pid, address, capability.get("device", "?"))
        return pid, token

    def member_of(self, peer_id: str, job_id: str) -> bool:
        """Whether a registered peer is (or was, in a recorded epoch) a member of the job."""
        with self._cond:
            job = self.state.jobs.get(job_id)
            if job is None or peer_id not in self.state.peers:
                return False
            try:
                self.state.check_member(job, peer_id)
            except Forbidden:
                return False
            return True

    def ticket(self, job_id: str, epoch: int, peer_id: str) -> bytes:
        """The signed membership ticket of ``peer_id`` in (``job_id``, ``epoch``), for its plan.
        Call with the lock held (plans are built under it)."""
        p = self.state.peers.get(peer_id)
        key = bytes.fromhex(p.public_key) if p is not None and p.public_key else b""
        return auth.issue_ticket(self.signing_key, job_id, epoch, peer_id, key)

    def heartbeat(self, peer_id: str) -> tuple[str, int, str]:
        """Renews a peer's lease (in memory: leases are not stored, and go on while paused);
        returns its job, the job's epoch and why a job holds it out of its rings ("" when none
        does)."""
        with self._cond:
            self._check_readable()
            job_id, epoch = self.state.heartbeat(peer_id, self.now_ms())
            return job_id, epoch, self.state.held_out_reason(peer_id)

    def view(self, fn: Callable[[ClusterState], T]) -> T:
        """Runs ``fn`` on the state under the lock (to read a consistent snapshot)."""
        with self._cond:
            self._check_readable()
            return fn(self.state)

    def tick(self, interval_ms: int = 0) -> None:
        """Evicts expired peers; while paused, re-tries a write instead (leases and deadlines
        wait). Called by the reaper thread, every ``interval_ms`` (0: not on a schedule, as in
        tests that move the clock by hand). A tick that comes more than a heartbeat interval
        later than its schedule says the coordinator itself did not run meanwhile (the process
        descheduled on a loaded machine, the GIL, a long hold of this lock): it heard no
        heartbeat in that time, so every lease is first extended by the delay. Without that, the
        first tick after a stall evicted every live peer whose heartbeat was still queued."""
        with self._cond:
            if self._closed:
                return
            now = self.now_ms()
            last, self._last_tick_ms = self._last_tick_ms, now
            stalled = now - last - interval_ms if interval_ms and last is not None else 0
            if stalled >= self.config.heartbeat_interval_ms:
                log.warning("the coordinator did not run for %d ms (its reaper ran that late): extending every "
                            "peer's lease by as much", stalled)
                self.state.extend_leases(stalled, now)
            if self._fault is not None:
                self._retry_write()
                return
            self._apply(self.state.expire(now))

    def report_failure(self, peer_id: str, job_id: str, rnd: int, epoch: int, suspect: str, detail: str,
                       kind: str = "") -> None:
        """A member reports that its exchange of (round, epoch) failed, naming a suspect if any
        (``kind``: a FailureKind name without its prefix, "" for unspecified)."""
        refused = ""
        if suspect and suspect != peer_id and kind in ("", "UNREACHABLE"):
            address = self.view(lambda st: st.peers[suspect].address if suspect in st.peers else "")
            refused = nothing_listens(address) if address else ""
        with self._cond:
            self._check_writable()
            log.warning("peer %s job %s round %d epoch %d: exchange failed (suspect %s, %s): %s",
                        peer_id, job_id, rnd, epoch, suspect or "none", kind or "unspecified", detail)
            job = self.state.jobs.get(job_id)
            before = len(job.quarantined) if job is not None else 0
            self._apply(self.state.report_failure(peer_id, job_id, rnd, epoch, suspect, self.now_ms(), detail, kind,
                                                  refused=refused))
            if job is not None and len(job.quarantined) > before:
                self.metrics.record_quarantine(job_id)

    def wait_plan(self, peer_id: str, last: tuple[str, int, int], timeout_s: float,
                  build: Callable[[Job], T], build_take: Callable[[Job], T] | None = None) -> T | None:
        """Blocks until the peer has an active plan other than ``last`` (job, round, epoch), or,
        with ``build_take``, an idle peer has a job to take; returns ``build(job)`` (or
        ``build_take(job)``), run under the lock so the plan is consistent."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._check_readable()
                job = self.state.plan_for(peer_id)
                if job is not None and self.state.plan_key(job, peer_id) != last:
                    return build(job)
                taken = self.state.take_for(peer_id) if build_take is not None and job is None else None
                if taken is not None and build_take is not None:
                    return build_take(taken)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if self._stopping:
                    raise ShuttingDown("the coordinator is stopping; retry against the restarted one")
                self._cond.wait(left)

    def report(self, peer_id: str, job_id: str, rnd: int, epoch: int, rep: Report,
               build_next: Callable[[Job], T] | None = None, usage: DataUsage | None = None) -> tuple[bool, T | None]:
        """Records a round report (with the member's ``usage`` of the job's data, when it sent
        one); returns whether it committed the round and (when ``build_next`` is given)
        ``build_next(job)`` for the member's next plan, built under the lock, so it need not ask
        for it: a gossip step's next step, or, for the report that committed a ring round, the
        next round (the member that reports last is the one the next round waits for: a GetPlan
        fewer on its way there)."""
        with self._cond:
            self._check_writable()
            gossip = self.state.job(job_id).gossip.active
            ch = self.state.report(peer_id, job_id, rnd, epoch, rep, self.now_ms(), usage=usage)
            self._apply(ch)
            if ch.committed:
                j = self.state.jobs[job_id]
                r = j.history[-1]
                if gossip:
                    log.info("job %s: gossip round %d (%d steps, %d members, acc %.4f, consensus distance %.3g, %d ms)",
                             job_id, r.round, j.gossip.steps, len(r.members), r.test_accuracy, r.consensus_distance,
                             r.duration_ms)
                else:
                    log.info("job %s: round %d committed (epoch %d, %d members, %d samples, acc %.4f, %d ms)",
                             job_id, r.round, r.epoch, len(r.members), r.samples, r.test_accuracy, r.duration_ms)
                    self._prune_checkpoints(j)
            nxt = None
            if build_next is not None and (gossip or ch.committed):
                job = self.state.plan_for(peer_id)
                if job is not None and job.job_id == job_id and (
                        job.gossip.active if gossip else self.state.plan_key(job, peer_id) != (job_id, rnd, epoch)):
                    nxt = build_next(job)
            return bool(ch.committed), nxt

    def take(self, peer_id: str, job_id: str, outcome: str, detail: str = "", data: JobData | None = None,
             labels: bytes = b"", usage: DataUsage | None = None, label_counts: list[int] | None = None) -> None:
        """A peer's answer to a take plan (:meth:`ClusterState.take`). A READY take's data is
        checked first (:func:`check_take_data`: BadReport, and the peer is refused the job, as
        for a decline); the first one's shards are cut
        here, outside the lock, from its labels, and its labels stored with the job. A
        ``--placement local`` job's take carries no labels (BadReport if it does), only their
        counts (``label_counts``), and cuts nothing."""
        cut: tuple[np.ndarray, ...] | None = None
        cut_error = ""
        with self._cond:
            self._check_readable()
            local = self.state.job(job_id).local
        if outcome == READY and data is not None:
            try:
                if local and labels:
                    raise BadReport("a --placement local job's take carries the label counts only, never the labels")
                if not local and label_counts:
                    raise BadReport("label_counts are for --placement local jobs; this job's take sends the labels")
                data = check_take_data(data, labels)
            except BadReport as e:  # refused, and not offered again: it would only describe the same
                with self._cond:
                    self._check_writable()
                    job = self.state.job(job_id)
                    if job.needs_take and job.state in ("PENDING", "RUNNING") and not job.declined_by(peer_id) \
                            and peer_id in self.state.peers and self.state.peers[peer_id].job_id != job_id:
                        self._apply(self.state.take(peer_id, job_id, DECLINED, self.now_ms(),
                                                    detail=f"its description of the data was refused: {e}"))
                raise
            with self._cond:
                self._check_readable()
                job = self.state.job(job_id)
                fresh, spec = job.needs_take and job.data is None, job.spec
            if fresh and not local and not planner.data_problem(spec, data.train_samples, data.has_labels):
                try:
                    cut = cut_shards(spec, labels_array(labels, data.train_samples))
                except ValueError as e:  # e.g. classes:K with fewer labels, or shards below their minimum
                    cut_error = str(e)
        with self._cond:
            self._check_writable()
            ch = self.state.take(peer_id, job_id, outcome, self.now_ms(), detail=detail, data=data,
                                 shard_sizes=[int(s.size) for s in cut] if cut is not None else None,
                                 cut_error=cut_error, usage=usage, label_counts=label_counts)
            self._apply(ch, labels={job_id: labels})
            if job_id in ch.data and cut is not None:
                self._shards[job_id] = cut

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self, job_id: str, rnd: int) -> pathlib.Path:
        """Where round ``rnd``'s checkpoint of a job lives."""
        return self._ckpt_dir / job_id / f"round-{rnd:06d}.pt"

    def training_state_path(self, job_id: str, rnd: int) -> pathlib.Path:
        """Where round ``rnd``'s training state (``dml checkpoint``) lives, beside its checkpoint."""
        return self._ckpt_dir / job_id / f"state-{rnd:06d}.pt"

    def check_checkpoint(self, peer_id: str, job_id: str, rnd: int, epoch: int) -> None:
        """Raises NotFound/Stale unless the upload is for the current round of a member."""
        with self._cond:
            self._check_writable()
            self.state.check_checkpoint(peer_id, job_id, rnd, epoch)

    def store_checkpoint(self, peer_id: str, job_id: str, rnd: int, epoch: int, digest: str, data: bytes,
                         state: bytes | None = None, state_sha256: str = "") -> None:
        """Writes a checkpoint (and the training ``state`` uploaded with it) to private temp
        files, then (if the round is still current) renames them into place and records them;
        they count once their round commits with ``digest`` reported by its uploader too.
        BadCheckpoint unless the bytes hold that digest's parameters and the state passes
        ``checkpoint.verify_training_state``; nothing is written then. A file that cannot be
        written (disk full, a file-size limit, a read-only folder) pauses the coordinator and
        raises StoreUnavailable; nothing is recorded."""
        self.check_checkpoint(peer_id, job_id, rnd, epoch)
        with self._cond:
            average = self.state.job(job_id).spec.optimizer_state == "average"
        if state is not None:
            verify_training_state(state, state_sha256, len(data))
        elif average:
            raise BadCheckpoint("a checkpoint of an --optimizer-state average job must hold its training state")
        verify_checkpoint(data, digest, state if average else None)
        path, state_path = self.checkpoint_path(job_id, rnd), self.training_state_path(job_id, rnd)
        files = [(path, data)] + ([(state_path, state)] if state is not None else [])
        tmps = [(p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp"), p, d) for p, d in files]
        try:
            for tmp, final, d in tmps:
                try:
                    _write_file(tmp, d)
                except OSError as e:
                    self.metrics.record_store_write_error()
                    self._checkpoint_write_failed(final, len(d), e)
            with self._cond:
                self._check_writable()
                self.state.check_checkpoint(peer_id, job_id, rnd, epoch)  # still current: may replace the files
                try:
                    # The state first: the model file is what the record then points at, and a
                    # state left by an earlier upload of this round must not pass for this one's.
                    if state is None:
                        state_path.unlink(missing_ok=True)
                    for tmp, final, _ in reversed(tmps):
                        os.replace(tmp, final)
                except OSError as e:
                    self.metrics.record_store_write_error()
                    self._checkpoint_write_failed(path, len(data), e)
                self.state.checkpoint_uploaded(peer_id, job_id, rnd, epoch, digest, self.now_ms(),
                                               state_digest=state_sha256 if state is not None else "")
                self._apply(Changes(jobs=(job_id,)))
        finally:
            for tmp, _, _ in tmps:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError as e:
                    log.warning("cannot remove %s: %s", tmp, e)

    def _checkpoint_write_failed(self, path: pathlib.Path, size: int, err: OSError) -> None:
        """Pauses the coordinator (see the module) and raises StoreUnavailable. Memory is as it
        was: the upload is recorded only after its file is in place. The probe writes a file of
        the same size beside it."""
        reason = f"cannot write checkpoint {path}: {err.strerror or err}"

        def probe() -> None:
            tmp = path.with_name(f".probe-{uuid.uuid4().hex}.tmp")
            try:
                _write_file(tmp, bytes(size))
            finally:
                tmp.unlink(missing_ok=True)

        with self._cond:
            if self._fault is None:
                self._write_failed(reason, probe, reload=False)
        raise StoreUnavailable(f"checkpoint refused: {reason}") from err

    def _prune_checkpoints(self, job: Job) -> None:
        keep = {self.checkpoint_path(job.job_id, job.checkpoint_round).name,
                self.training_state_path(job.job_id, job.checkpoint_round).name} if job.checkpoint_round else set()
        folder = self._ckpt_dir / job.job_id
        if folder.is_dir():
            for f in folder.iterdir():
                if f.name not in keep and f.suffix == ".pt" and int(f.stem.split("-")[1]) < job.committed_round:
                    f.unlink(missing_ok=True)

    def checkpoint(self, job_id: str) -> tuple[int, str, pathlib.Path]:
        """The job's last committed checkpoint: round, digest, file. NotFound if none."""
        with self._cond:
            self._check_readable()
            job = self.state.job(job_id)
            if not job.checkpoint_round:
                raise NotFound(f"job {job_id} has no checkpoint yet (state {job.state}, round {job.committed_round})")
            return job.checkpoint_round, job.checkpoint_digest, self.checkpoint_path(job_id, job.checkpoint_round)

    def training_state(self, job_id: str) -> tuple[int, str, pathlib.Path]:
        """The training state of the job's last committed checkpoint: round, sha256, file.
        NotFound if there is none."""
        with self._cond:
            self._check_readable()
            job = self.state.job(job_id)
            if not job.checkpoint_round:
                raise NotFound(f"job {job_id} has no checkpoint yet (state {job.state}, round {job.committed_round})")
            if not job.checkpoint_state_digest:
                raise NotFound(f"job {job_id}'s checkpoint of round {job.checkpoint_round} holds no training state")
            return (job.checkpoint_round, job.checkpoint_state_digest,
                    self.training_state_path(job_id, job.checkpoint_round))

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, task_code: bytes = b"") -> str:
        """Validates (InvalidSpec) and queues a job. A code task's bundle (``task_code``, the zip
        whose sha256 is ``spec.task_digest``) is checked and kept first (OverLimit over the size
        limit, InvalidSpec for a wrong digest or a malformed bundle, StoreUnavailable when it
        cannot be written); it may be left out when this coordinator keeps that digest already."""
        spec = with_defaults(spec)
        validate(spec)
        self._keep_code(spec, task_code)
        with self._cond:  # its shards are cut when the first peer takes it and describes its data
            self._check_writable()
            if spec.dataset and not self.data.has(spec.dataset):  # under the lock: remove_dataset holds it too
                raise NotFound(f"job names dataset {spec.dataset}, but this coordinator's store has none by "
                               f"that name (dml data put {spec.dataset} FILE...; dml data ls)")
            size = self.data.get(spec.dataset).bytes if spec.dataset else 0  # sizes its shards in bytes
            jid, ch = self.state.submit(spec, None, self.now_ms(), dataset_bytes=size)
            self._apply(ch)
        log.info("job %s submitted: %s", jid, spec)
        return jid

    def shards(self, job_id: str) -> ShardsView:
        """Where a job's data is now (NotFound for an unknown job). The labels are the stored
        ones (read outside the lock), the indices those cut when the data was fixed (cut again
        from the labels for a job finished before this coordinator started)."""
        labels = self.job_labels(job_id)
        with self._cond:
            self._check_readable()
            job = self.state.job(job_id)
            shards = self._shards.get(job_id)
            spec, sizes = job.spec, list(job.shard_sizes)
        if labels is not None and shards is None:
            try:
                shards = cut_shards(spec, labels)
            except ValueError:
                shards = None
            if shards is not None and [int(x.size) for x in shards] != sizes:
                shards = None  # not the shards it was planned with: show no label counts
        with self._cond:
            self._check_readable()
            job = self.state.job(job_id)
            return shards_view(job, labels if shards is not None else None,
                               list(shards) if shards is not None else None)

    def _keep_code(self, spec: JobSpec, task_code: bytes) -> None:
        """Checks and stores a submitted job's task code (see :meth:`submit`)."""
        if task_kind(spec.task, spec.task_digest) != "code":
            if task_code:
                raise InvalidSpec(f"task code came with the job, but its task {spec.task!r} is not a task file")
            return
        if not task_code:
            if not self.code.has(spec.task_digest):
                raise InvalidSpec(f"job names task code {spec.task_digest[:12]} for {spec.task!r}, but none came "
                                  "with it (send the bundle in task_code)")
            return
        self.code.check(task_code, spec.task_digest, spec.task)
        with self._cond:
            self._check_writable()
        try:
            self.code.put(task_code, spec.task_digest)
        except OSError as e:
            self.metrics.record_store_write_error()
            raise StoreUnavailable(f"cannot store task code {spec.task_digest[:12]}: {e.strerror or e}") from e

    def remove_dataset(self, name: str) -> tuple[Dataset, int]:
        """Removes a dataset of the store and its chunks no other dataset names (see
        :meth:`DataStore.remove`); Stale while a pending or running job names it, so no job
        is submitted on it meanwhile (submit checks under the same lock)."""
        with self._cond:
            self._check_writable()
            users = sorted(j.job_id for j in self.state.jobs.values()
                           if j.spec.dataset == name and j.state in ("PENDING", "RUNNING"))
            if users:
                raise Stale(f"dataset {name} is in use by {len(users)} pending or running jobs "
                            f"({', '.join(users[:5])}); cancel them or wait for them to end")
            try:
                return self.data.remove(name)
            except OSError as e:
                self.metrics.record_store_write_error()
                raise StoreUnavailable(f"cannot remove dataset {name}: {e.strerror or e}") from e

    def task_code(self, peer_id: str, job_id: str, digest: str) -> bytes:
        """The bundle ``digest`` of job ``job_id``, for registered peer ``peer_id``. Any peer of
        the cluster may fetch the code of a job that is pending or running (each may be offered
        it); NotFound for an unknown peer or job, or a digest the job does not name (or that is
        not kept); Stale for a job that has ended."""
        with self._cond:
            self._check_readable()
            if peer_id not in self.state.peers:
                raise NotFound(f"unknown peer {peer_id}; register again")
            job = self.state.job(job_id)
            if not job.spec.task_digest or job.spec.task_digest != digest:
                raise NotFound(f"job {job_id} has no task code {digest[:64]}")
            if job.state not in ("PENDING", "RUNNING"):
                raise Stale(f"job {job_id} is {job.state}: its task code is no longer served")
        try:
            return self.code.get(digest)
        except KeyError:
            raise NotFound(f"task code {digest[:12]} of job {job_id} is not kept on this coordinator "
                           f"(damaged or removed from its state dir)") from None
        except OSError as e:
            raise StoreUnavailable(f"cannot read task code {digest[:12]}: {e.strerror or e}") from e

    def cancel(self, job_id: str) -> str:
        """Cancels a job; returns its state."""
        with self._cond:
            self._check_writable()
            self._apply(self.state.cancel(job_id, self.now_ms()))
            return self.state.job(job_id).state

    def peers(self) -> list[PeerView]:
        """Every registered peer, registration order (``dml peers``)."""
        with self._cond:
            self._check_readable()
            return peer_views(self.state, self.now_ms())

    def jobs(self) -> list[Job]:
        """All jobs, newest first."""
        with self._cond:
            self._check_readable()
            return sorted(self.state.jobs.values(), key=lambda j: (j.created_ms, j.job_id), reverse=True)

    def wait_job_change(self, job_id: str, seen: tuple[int, int, str, str] | None, timeout_s: float,
                        build: Callable[[Job], T]) -> tuple[tuple[int, int, str, str], T]:
        """Blocks until the job's (updated, round, state, pause reason) differs from ``seen``, or
        the timeout. Returns the new key and ``build(job)``, built under the lock."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._check_readable()
                job = self.state.job(job_id)
                key = (job.updated_ms, job.committed_round, job.state, self._pause_reason())
                left = deadline - time.monotonic()
                if key != seen or left <= 0:
                    return key, build(job)
                if self._stopping:
                    raise ShuttingDown("the coordinator is stopping; retry against the restarted one")
                self._cond.wait(left)

    def begin_shutdown(self) -> None:
        """Ends every long poll now: a peer waiting for its plan gets ShuttingDown (UNAVAILABLE:
        it retries, against the restarted coordinator), and so does a status watch with nothing new. The
        server's grace then covers only real work in flight; otherwise each waiting handler
        held the process's exit for its whole poll (interpreter exit joins the gRPC pool's
        threads), ~5 s for every stop of a coordinator with peers."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def close(self) -> None:
        """Closes the store; later changes fail with ShuttingDown."""
        with self._cond:
            self._closed = True
            self._store.close()


def _write_file(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to a new file and syncs it (its folder made if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
