"""Durable coordinator state: an interface with an in-memory and an SQLite implementation.

SQLite runs in WAL mode with every change in one transaction, so ``kill -9`` at any point leaves
the last committed state readable. Jobs and peers are stored as JSON documents; committed rounds
as rows of their own so history grows by appends.

The database carries its schema version in ``PRAGMA user_version``. Version 0 is the first
release's (commit 0e7092d): opening it migrates it in one transaction. A database of a newer
version than :data:`SCHEMA_VERSION` is refused (:class:`SchemaError`), never rewritten.
"""
from __future__ import annotations

import json
import logging
import pathlib
import sqlite3
import threading
from dataclasses import asdict, fields
from typing import Any, Iterable, Protocol

from dml.common.spec import JobSpec
from dml.common.tasks import get_task
from dml.coordinator import planner
from dml.coordinator.records import (
    BrokenLink,
    Eviction,
    Exclusion,
    GossipPhase,
    GossipWindow,
    Job,
    MembershipEpoch,
    PeerRecord,
    Report,
    RoundRecord,
)

log = logging.getLogger(__name__)

# 0: the first release (0e7092d). 1: the gossip phase as one object; shard sizes on the job.
SCHEMA_VERSION = 1


class SchemaError(Exception):
    """A state dir this version of dml cannot open (written by a newer one), or cannot migrate."""


def job_to_dict(job: Job) -> dict[str, Any]:
    """A job without its history (stored separately, and never copied here: this runs on every
    save, and the history grows with every round), as JSON-friendly data."""
    d = {f.name: getattr(job, f.name) for f in fields(job) if f.name != "history"}
    d["spec"] = job.spec.to_dict()
    d["reports"] = {k: asdict(v) for k, v in job.reports.items()}
    d["gossip"] = asdict(job.gossip)
    d["evictions"] = [asdict(e) for e in job.evictions]
    d["epochs"] = [asdict(e) for e in job.epochs]
    d["broken_links"] = [asdict(b) for b in job.broken_links]
    d["held_out"] = [asdict(x) for x in job.held_out]
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
             rounds: Iterable[tuple[str, RoundRecord]]) -> None:
        """Writes changed jobs and peers, deletes removed peers, appends committed rounds, atomically."""

    def load(self) -> tuple[list[Job], list[PeerRecord]]:
        """Everything saved, jobs with their history."""

    def close(self) -> None:
        """Releases resources."""


class MemoryStore:
    """A Store in a dict (tests, and coordinators that need no durability)."""

    def __init__(self) -> None:
        self.jobs: dict[str, str] = {}  # JSON documents, as the SQLite store keeps them
        self.peers: dict[str, str] = {}
        self.rounds: dict[str, list[str]] = {}

    def save(self, jobs: Iterable[Job], peers: Iterable[PeerRecord], removed_peers: Iterable[str],
             rounds: Iterable[tuple[str, RoundRecord]]) -> None:
        """See :class:`Store`. Everything is serialised before anything is written, so a save
        that fails part-way writes nothing (as SQLite's rollback does)."""
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
    of an older schema migrates it; one of a newer schema raises :class:`SchemaError`."""

    def __init__(self, state_dir: pathlib.Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "coordinator.db"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA busy_timeout=5000")
            self._check_not_newer(self._version())  # before anything writes to a database it cannot read
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._tx():
                version = self._version()
                self._check_not_newer(version)
                self._db.execute("CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS peers (peer_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS rounds (job_id TEXT NOT NULL, round INTEGER NOT NULL, "
                    "body TEXT NOT NULL, PRIMARY KEY (job_id, round))"
                )
                if version < 1:
                    self._migrate_0_to_1()
                if version < SCHEMA_VERSION:
                    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

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
                    labels[spec.task] = get_task(spec.task).load().y_train
                shards = planner.make_shards(labels[spec.task], spec.num_shards, spec.sharding, spec.seed)
            except ValueError as e:
                raise SchemaError(f"{self.path}: cannot migrate job {jid} from store schema 0: {e}") from e
            new = job_dict_from_v0(d, [int(s.size) for s in shards])
            self._db.execute("UPDATE jobs SET body = ? WHERE job_id = ?", (json.dumps(new), jid))
        if rows:
            log.info("migrated %s from store schema 0 to 1 (%d jobs)", self.path, len(rows))

    def _tx(self) -> "_Tx":
        return _Tx(self._db, self._lock)

    def save(self, jobs: Iterable[Job], peers: Iterable[PeerRecord], removed_peers: Iterable[str],
             rounds: Iterable[tuple[str, RoundRecord]]) -> None:
        """See :class:`Store`."""
        with self._tx():
            for j in jobs:
                self._db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?)", (j.job_id, json.dumps(job_to_dict(j))))
            for p in peers:
                self._db.execute("INSERT OR REPLACE INTO peers VALUES (?, ?)", (p.peer_id, json.dumps(asdict(p))))
            for pid in removed_peers:
                self._db.execute("DELETE FROM peers WHERE peer_id = ?", (pid,))
            for jid, r in rounds:
                self._db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, ?)", (jid, r.round, json.dumps(asdict(r))))

    def load(self) -> tuple[list[Job], list[PeerRecord]]:
        """See :class:`Store`."""
        with self._lock:
            hist: dict[str, list[RoundRecord]] = {}
            for jid, body in self._db.execute("SELECT job_id, body FROM rounds ORDER BY job_id, round"):
                hist.setdefault(jid, []).append(RoundRecord(**json.loads(body)))
            jobs = [job_from_dict(json.loads(b), hist.get(jid, [])) for jid, b in self._db.execute("SELECT job_id, body FROM jobs")]
            for j in jobs:  # rows past a rollback are overwritten as rounds commit again
                j.history = [r for r in j.history if r.round <= j.committed_round]
            peers = [PeerRecord(**json.loads(b)) for (b,) in self._db.execute("SELECT body FROM peers")]
        return jobs, peers

    def close(self) -> None:
        """Closes the database."""
        with self._lock:
            self._db.close()


class _Tx:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> None:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
