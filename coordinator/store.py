"""Durable coordinator state: an interface with an in-memory and an SQLite implementation.

SQLite runs in WAL mode with every change in one transaction, so ``kill -9`` at any point leaves
the last committed state readable. Jobs and peers are stored as JSON documents; committed rounds
as rows of their own so history grows by appends.

The database carries its schema version in ``PRAGMA user_version``. Version 0 is the first
release's (commit 0e7092d): opening it migrates it in one transaction. A database of a newer
version than :data:`SCHEMA_VERSION` is refused (:class:`SchemaError`), never rewritten; an empty,
truncated or corrupt one is refused (:class:`CorruptStore`), naming the file.

A save that cannot be written (disk full, I/O error) raises :class:`StoreWriteError` and writes
nothing: the transaction is rolled back, so the file still holds the last committed state and
the caller can reload it (see ``dml.coordinator.service``). :meth:`SqliteStore.probe` tells when
writes fit again. Each store carries a cluster id, made once with the state dir.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import sqlite3
import threading
import uuid
from dataclasses import asdict, fields
from typing import Any, Iterable, Protocol

import numpy as np

from dml.common.sampling import labels_digest
from dml.common.spec import JobSpec
from dml.common.tasks import builtin_data
from dml.coordinator import planner
from dml.coordinator.records import (
    BrokenLink,
    Eviction,
    Exclusion,
    GossipPhase,
    GossipWindow,
    Job,
    JobData,
    MembershipEpoch,
    PeerRecord,
    Quarantine,
    Report,
    RoundRecord,
)

log = logging.getLogger(__name__)

# 0: the first release (0e7092d). 1: the gossip phase as one object; shard sizes on the job.
# 2: a ``meta`` table holding the cluster id. 3: takes: each job's data (``JobData``) and the
# peers that took or declined it in its document, its training labels in table ``labels``.
SCHEMA_VERSION = 3
PROBE_MIN_BYTES = 64 << 10  # the least room a recovery probe asks for
MAX_PAGES = 4294967294  # SQLite's largest max_page_count: no cap


class StoreOpenError(Exception):
    """A state dir that cannot be opened: its own message says which file and why."""


class SchemaError(StoreOpenError):
    """A state dir this version of dml cannot open (written by a newer one), or cannot migrate."""


class CorruptStore(StoreOpenError):
    """A database file that is empty, truncated or not a dml database."""


class StoreWriteError(Exception):
    """A save that could not be written (disk full, I/O error); nothing of it was stored.
    ``size_bytes``: about how much it tried to write (a probe asks for room for it)."""

    def __init__(self, message: str, size_bytes: int = 0) -> None:
        super().__init__(message)
        self.size_bytes = size_bytes


def new_cluster_id() -> str:
    """A fresh cluster id: 32 hex digits."""
    return uuid.uuid4().hex


def job_to_dict(job: Job) -> dict[str, Any]:
    """A job without its history (stored separately, and never copied here: this runs on every
    save, and the history grows with every round), as JSON-friendly data. Nor the peers' data
    usage (``Job.data_usage``) or their speeds on it (``Job.speeds``): theirs to say again with
    their next reports, in memory only."""
    d = {f.name: getattr(job, f.name) for f in fields(job) if f.name not in ("history", "data_usage", "speeds")}
    d["spec"] = job.spec.to_dict()
    d["reports"] = {k: asdict(v) for k, v in job.reports.items()}
    d["gossip"] = asdict(job.gossip)
    d["evictions"] = [asdict(e) for e in job.evictions]
    d["epochs"] = [asdict(e) for e in job.epochs]
    d["broken_links"] = [asdict(b) for b in job.broken_links]
    d["held_out"] = [asdict(x) for x in job.held_out]
    d["quarantined"] = [asdict(q) for q in job.quarantined]
    d["data"] = asdict(job.data) if job.data is not None else None
    d["declined"] = [asdict(x) for x in job.declined]
    return d


def job_from_dict(d: dict[str, Any], history: list[RoundRecord]) -> Job:
    """Inverse of :func:`job_to_dict`."""
    d = dict(d)
    d["spec"] = JobSpec.from_dict(d["spec"])
    d["reports"] = {k: Report(**v) for k, v in d.get("reports", {}).items()}
    d["assignment"] = {k: list(v) for k, v in d.get("assignment", {}).items()}
    d["cursors"] = {int(k): (int(v[0]), int(v[1])) for k, v in d.get("cursors", {}).items()}  # JSON keys are strings
    pc = d.get("pending_checkpoint")
    d["pending_checkpoint"] = tuple(pc) if pc else None
    g = dict(d.get("gossip", {}))
    g["window"] = GossipWindow(**g.get("window", {}))
    d["gossip"] = GossipPhase(**g)
    d["evictions"] = [Eviction(**e) for e in d.get("evictions", [])]
    d["epochs"] = [MembershipEpoch(**e) for e in d.get("epochs", [])]
    d["broken_links"] = [BrokenLink(**b) for b in d.get("broken_links", [])]
    d["held_out"] = [Exclusion(**x) for x in d.get("held_out", [])]
    d["quarantined"] = [Quarantine(**q) for q in d.get("quarantined", [])]
    d["data"] = JobData(**d["data"]) if d.get("data") else None
    d["declined"] = [Exclusion(**x) for x in d.get("declined", [])]
    return Job(history=history, **d)


def job_dict_from_v0(d: dict[str, Any], shard_sizes: list[int]) -> dict[str, Any]:
    """A job document of schema 0 (the first release) as schema 1 has it: the gossip phase's
    ``gossip_*`` fields and ``gossip_window`` list become one ``gossip`` object, and the job
    gets the sizes of its shards."""
    d = dict(d)
    d["gossip"] = _gossip_from_flat(d)
    d["shard_sizes"] = list(shard_sizes)
    return d


def _gossip_from_flat(d: dict[str, Any]) -> dict[str, Any]:
    """Takes the gossip phase out of a schema-0 job document (in place), where it was a set of
    ``gossip_*`` fields and a ``gossip_window`` list: [samples, loss sum, bytes, max train ms,
    max exchange ms, max eval ms, start ms, evaluations, test accuracy sum, test loss sum]."""
    w = d.pop("gossip_window", None) or [0, 0.0, 0, 0, 0, 0, 0, 0, 0.0, 0.0]
    window = {"samples": int(w[0]), "loss_sum": float(w[1]), "bytes_sent": int(w[2]), "train_ms": int(w[3]),
              "exchange_ms": int(w[4]), "eval_ms": int(w[5]), "start_ms": int(w[6]), "evaluations": int(w[7]),
              "accuracy_sum": float(w[8]), "test_loss_sum": float(w[9]),
              "consumed": d.pop("gossip_consumed", {})}
    return {"active": d.pop("gossip_phase", False), "peers": d.pop("gossip_peers", 0),
            "steps": d.pop("gossip_steps", 0), "step": d.pop("gossip_next", {}),
            "issued_ms": d.pop("gossip_issued_ms", {}), "eval_step": d.pop("gossip_eval_step", {}),
            "distance": d.pop("gossip_dist", {}), "window": window}


class Store(Protocol):
    """Where the coordinator keeps what must survive a restart."""

    def save(self, jobs: Iterable[Job], peers: Iterable[PeerRecord], removed_peers: Iterable[str],
             rounds: Iterable[tuple[str, RoundRecord]], labels: Iterable[tuple[str, bytes]] = ()) -> None:
        """Writes changed jobs and peers, deletes removed peers, appends committed rounds and
        writes jobs' training labels (int32 little-endian bytes, written once), atomically."""

    def load(self) -> tuple[list[Job], list[PeerRecord]]:
        """Everything saved, jobs with their history (not their labels: :meth:`load_labels`)."""

    def load_labels(self, job_id: str) -> bytes | None:
        """A job's training labels as saved (int32 little-endian bytes; b"" when its task has
        none), None when none were saved for it."""

    @property
    def cluster_id(self) -> str:
        """The cluster this store belongs to, made once with it."""

    def probe(self, size_bytes: int) -> None:
        """Raises StoreWriteError unless a write of about ``size_bytes`` fits now (the
        recovery check after a failed save); stores nothing."""

    def close(self) -> None:
        """Releases resources."""


class MemoryStore:
    """A Store in a dict (tests, and coordinators that need no durability). Its cluster id is
    the process's: a coordinator without a state dir is a new cluster every time it starts."""

    def __init__(self) -> None:
        self.jobs: dict[str, str] = {}  # JSON documents, as the SQLite store keeps them
        self.peers: dict[str, str] = {}
        self.rounds: dict[str, list[str]] = {}
        self.labels: dict[str, bytes] = {}
        self._cluster_id = new_cluster_id()

    @property
    def cluster_id(self) -> str:
        """See :class:`Store`."""
        return self._cluster_id

    def probe(self, size_bytes: int) -> None:
        """See :class:`Store`: memory always has room."""

    def save(self, jobs: Iterable[Job], peers: Iterable[PeerRecord], removed_peers: Iterable[str],
             rounds: Iterable[tuple[str, RoundRecord]], labels: Iterable[tuple[str, bytes]] = ()) -> None:
        """See :class:`Store`. Everything is serialised before anything is written, so a save
        that fails part-way writes nothing (as SQLite's rollback does)."""
        new_labels = {jid: bytes(b) for jid, b in labels}
        new_jobs = {j.job_id: json.dumps(job_to_dict(j)) for j in jobs}
        new_peers = {p.peer_id: json.dumps(asdict(p)) for p in peers}
        gone = list(removed_peers)
        new_rounds = [(jid, json.dumps(asdict(r))) for jid, r in rounds]
        self.jobs.update(new_jobs)
        self.peers.update(new_peers)
        for pid in gone:
            self.peers.pop(pid, None)
        for jid, r in new_rounds:
            self.rounds.setdefault(jid, []).append(r)
        self.labels.update(new_labels)

    def load_labels(self, job_id: str) -> bytes | None:
        """See :class:`Store`."""
        return self.labels.get(job_id)

    def load(self) -> tuple[list[Job], list[PeerRecord]]:
        """See :class:`Store`. Returns fresh objects that share nothing with the store."""
        jobs = []
        for jid, d in self.jobs.items():
            job = job_from_dict(json.loads(d), [])
            rounds = {r.round: r for r in (RoundRecord(**json.loads(x)) for x in self.rounds.get(jid, []))}
            job.history = [rounds[n] for n in sorted(rounds) if n <= job.committed_round]
            jobs.append(job)
        return jobs, [PeerRecord(**json.loads(p)) for p in self.peers.values()]

    def close(self) -> None:
        """Nothing to release."""


class SqliteStore:
    """A Store in ``DIR/coordinator.db`` (WAL mode, one transaction per save). Opening a database
    of an older schema migrates it; one of a newer schema raises :class:`SchemaError`, an empty,
    truncated or corrupt one :class:`CorruptStore`. A new database is made under a temporary
    name and renamed into place once initialised, so a ``coordinator.db`` that exists but is
    empty was damaged, never merely new."""

    def __init__(self, state_dir: pathlib.Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "coordinator.db"
        self._lock = threading.Lock()
        if not self.path.exists():
            self._create()
        elif self.path.stat().st_size == 0:
            raise CorruptStore(f"{self.path} is empty (0 bytes): the state was lost or truncated; restore the file "
                               f"from a backup, or move it away to start a new cluster in this state dir")
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as e:
            raise CorruptStore(f"{self.path}: cannot open the database: {e}") from e
        try:
            self._open()
        except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
            self._db.close()
            raise CorruptStore(f"{self.path} is not a readable dml database ({e}); restore it from a backup, "
                               f"or move it away to start a new cluster in this state dir") from e
        except BaseException:
            self._db.close()
            raise

    def _create(self) -> None:
        """Makes a new, initialised database under a temporary name and renames it into place."""
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.new")
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with _Tx(db, self._lock):
                _create_tables(db)
                db.execute("INSERT INTO meta VALUES ('cluster_id', ?)", (new_cluster_id(),))
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            for suffix in ("", "-wal", "-shm"):
                pathlib.Path(f"{tmp}{suffix}").unlink(missing_ok=True)
            raise
        db.close()  # the last connection checkpoints the WAL into the file and removes it
        os.replace(tmp, self.path)

    def _open(self) -> None:
        self._db.execute("PRAGMA busy_timeout=5000")
        self._check_not_newer(self._version())  # before anything writes to a database it cannot read
        problems = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(str(p) for p in problems[:3]))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._tx():
            version = self._version()
            self._check_not_newer(version)
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version >= 1 and not {"jobs", "peers", "rounds"} <= tables:
                raise sqlite3.DatabaseError(f"schema version {version} but tables {sorted(tables)}")
            _create_tables(self._db)
            if version < 1:
                self._migrate_0_to_1()
            if version < 2:
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('cluster_id', ?)", (new_cluster_id(),))
            if version < 3:
                self._migrate_2_to_3()
            if version < SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'cluster_id'").fetchone()
            if row is None or not isinstance(row[0], str) or not row[0]:
                raise sqlite3.DatabaseError("no cluster id in table meta")
            self._cluster_id: str = row[0]

    @property
    def cluster_id(self) -> str:
        """See :class:`Store`."""
        return self._cluster_id

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _check_not_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"{self.path} has store schema version {version}, newer than this dml knows ({SCHEMA_VERSION}): "
                f"it was written by a newer dml; run that one, or give this one another state dir")

    def _migrate_0_to_1(self) -> None:
        """Schema 0 to 1, inside the opening transaction: every job gets its shard sizes (the
        task's training set, cut as at submit time) and its gossip phase as one object."""
        rows = self._db.execute("SELECT job_id, body FROM jobs").fetchall()
        labels: dict[str, Any] = {}
        for jid, body in rows:
            d = json.loads(body)
            spec = JobSpec.from_dict(d["spec"])
            try:
                if spec.task not in labels:
                    labels[spec.task] = builtin_data(spec.task).y_train
                shards = planner.make_shards(labels[spec.task], spec.num_shards, spec.sharding, spec.seed)
            except ValueError as e:
                raise SchemaError(f"{self.path}: cannot migrate job {jid} from store schema 0: {e}") from e
            new = job_dict_from_v0(d, [int(s.size) for s in shards])
            self._db.execute("UPDATE jobs SET body = ? WHERE job_id = ?", (json.dumps(new), jid))
        if rows:
            log.info("migrated %s from store schema 0 to 1 (%d jobs)", self.path, len(rows))

    def _migrate_2_to_3(self) -> None:
        """Schema 2 to 3, inside the opening transaction: every job (all of them of built-in
        tasks, the only ones schema 2 could run) gets its data and labels from the built-in
        task's training set, as a first READY take would have given them, and its members count
        as having taken it (they are running it)."""
        rows = self._db.execute("SELECT job_id, body FROM jobs").fetchall()
        cache: dict[str, tuple[JobData, bytes]] = {}
        for jid, body in rows:
            d = json.loads(body)
            task = JobSpec.from_dict(d["spec"]).task
            try:
                if task not in cache:
                    y = builtin_data(task).y_train
                    blob = np.ascontiguousarray(y, dtype="<i4").tobytes()
                    cache[task] = (JobData(train_samples=int(y.size), num_classes=int(y.max()) + 1,
                                           digest=labels_digest(int(y.size), blob), has_labels=True), blob)
            except ValueError as e:
                raise SchemaError(f"{self.path}: cannot migrate job {jid} from store schema 2: {e}") from e
            data, blob = cache[task]
            d.update(needs_take=True, data=asdict(data), ready=list(d.get("members", [])), declined=[])
            self._db.execute("UPDATE jobs SET body = ? WHERE job_id = ?", (json.dumps(d), jid))
            self._db.execute("INSERT OR REPLACE INTO labels VALUES (?, ?)", (jid, blob))
        if rows:
            log.info("migrated %s from store schema 2 to 3 (%d jobs)", self.path, len(rows))

    def _tx(self) -> "_Tx":
        return _Tx(self._db, self._lock)

    def save(self, jobs: Iterable[Job], peers: Iterable[PeerRecord], removed_peers: Iterable[str],
             rounds: Iterable[tuple[str, RoundRecord]], labels: Iterable[tuple[str, bytes]] = ()) -> None:
        """See :class:`Store`. Everything is serialised first, then written in one transaction;
        a write that fails (disk full, I/O error) is rolled back and raises StoreWriteError."""
        label_rows = [(jid, bytes(b)) for jid, b in labels]
        job_rows = [(j.job_id, json.dumps(job_to_dict(j))) for j in jobs]
        peer_rows = [(p.peer_id, json.dumps(asdict(p))) for p in peers]
        gone = [(pid,) for pid in removed_peers]
        round_rows = [(jid, r.round, json.dumps(asdict(r))) for jid, r in rounds]
        size = sum(len(b) for _, b in job_rows) + sum(len(b) for _, b in peer_rows) + sum(len(b) for *_, b in round_rows) \
            + sum(len(b) for _, b in label_rows)
        try:
            with self._tx():
                self._db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?)", job_rows)
                self._db.executemany("INSERT OR REPLACE INTO peers VALUES (?, ?)", peer_rows)
                self._db.executemany("DELETE FROM peers WHERE peer_id = ?", gone)
                self._db.executemany("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?)", round_rows)
                self._db.executemany("INSERT OR REPLACE INTO labels VALUES (?, ?)", label_rows)
        except (sqlite3.Error, OSError) as e:
            raise StoreWriteError(f"cannot write {self.path}: {e}", size) from e

    def probe(self, size_bytes: int) -> None:
        """See :class:`Store`: writes a blob of ``size_bytes`` (at least PROBE_MIN_BYTES) into
        table meta and commits it, so the file and its WAL really grow, then deletes it."""
        n = max(int(size_bytes), PROBE_MIN_BYTES)
        try:
            with self._tx():
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('probe', zeroblob(?))", (n,))
            with self._tx():
                self._db.execute("DELETE FROM meta WHERE key = 'probe'")
        except (sqlite3.Error, OSError) as e:
            raise StoreWriteError(f"cannot write {self.path}: {e}", n) from e

    def set_max_pages(self, pages: int | None = None) -> int:
        """Caps the database at ``pages`` pages (``None``: the pages it has now), for tests and
        drills of a full disk: a write past the cap fails with SQLite's real SQLITE_FULL
        ("database or disk is full"). :data:`MAX_PAGES` lifts the cap. Returns the cap."""
        with self._lock:
            if pages is None:
                pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
            return int(self._db.execute(f"PRAGMA max_page_count={int(pages)}").fetchone()[0])

    def load(self) -> tuple[list[Job], list[PeerRecord]]:
        """See :class:`Store`. A row that does not decode raises CorruptStore."""
        with self._lock:
            try:
                hist: dict[str, list[RoundRecord]] = {}
                for jid, body in self._db.execute("SELECT job_id, body FROM rounds ORDER BY job_id, round"):
                    hist.setdefault(jid, []).append(RoundRecord(**json.loads(body)))
                jobs = [job_from_dict(json.loads(b), hist.get(jid, []))
                        for jid, b in self._db.execute("SELECT job_id, body FROM jobs")]
                for j in jobs:  # rows past a rollback are overwritten as rounds commit again
                    j.history = [r for r in j.history if r.round <= j.committed_round]
                peers = [PeerRecord(**json.loads(b)) for (b,) in self._db.execute("SELECT body FROM peers")]
            except sqlite3.DatabaseError as e:
                raise CorruptStore(f"{self.path} is not a readable dml database ({e})") from e
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSON, or fields that do not fit
                raise CorruptStore(f"{self.path} holds a record this dml cannot read ({type(e).__name__}: {e})") from e
        return jobs, peers

    def load_labels(self, job_id: str) -> bytes | None:
        """See :class:`Store`. CorruptStore when the row is not bytes."""
        with self._lock:
            try:
                row = self._db.execute("SELECT body FROM labels WHERE job_id = ?", (job_id,)).fetchone()
            except sqlite3.DatabaseError as e:
                raise CorruptStore(f"{self.path} is not a readable dml database ({e})") from e
        if row is None:
            return None
        if not isinstance(row[0], bytes):
            raise CorruptStore(f"{self.path}: the labels of job {job_id} are not a blob")
        return row[0]

    def close(self) -> None:
        """Closes the database."""
        with self._lock:
            self._db.close()


def _create_tables(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS peers (peer_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS rounds (job_id TEXT NOT NULL, round INTEGER NOT NULL, "
               "body TEXT NOT NULL, PRIMARY KEY (job_id, round))")
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS labels (job_id TEXT PRIMARY KEY, body BLOB NOT NULL)")


class _Tx:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> None:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                self._db.execute("COMMIT")
        except BaseException:
            self._rollback()  # a COMMIT that failed (disk full) may leave the transaction open
            raise
        else:
            if exc_type is not None:
                self._rollback()
        finally:
            self._lock.release()

    def _rollback(self) -> None:
        """Ends the transaction, if SQLite has not already (it rolls back by itself on
        SQLITE_FULL and some I/O errors; a ROLLBACK then would fail and hide the error)."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as e:
                log.error("rollback failed: %s", e)
