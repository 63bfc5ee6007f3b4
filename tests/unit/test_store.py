"""One test suite for every Store: MemoryStore and SqliteStore must behave the same."""
from __future__ import annotations

import json
import math
import pathlib
import shutil
import sqlite3
from typing import Any, Iterator

import pytest

from dml.common import tasks
from dml.common.spec import JobSpec
from dml.coordinator.ledger import violations
from dml.coordinator.records import (
    FAILED,
    NEIGHBOUR_REPORT,
    RUNNING,
    SUCCEEDED,
    Eviction,
    Job,
    MembershipEpoch,
    PeerRecord,
    Report,
    RoundRecord,
)
from dml.coordinator.store import (
    MAX_PAGES,
    SCHEMA_VERSION,
    CorruptStore,
    MemoryStore,
    SchemaError,
    SqliteStore,
    Store,
    StoreWriteError,
    job_dict_from_v0,
    job_from_dict,
    job_to_dict,
)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Store]:
    s: Any = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "state")
    yield s
    s.close()


def peer(pid: str, job_id: str = "", seen: int = 5) -> PeerRecord:
    return PeerRecord(pid, f"{pid}.local:7000", {"device": "cuda:0", "memory_gb": 78.5, "tags": ["a", "b"]},
                      registered_ms=1, last_seen_ms=seen, job_id=job_id)


def record(rnd: int, members: list[str], acc: float = 0.5) -> RoundRecord:
    return RoundRecord(round=rnd, epoch=2, samples=640, train_loss=0.25 * rnd, test_accuracy=acc, test_loss=1.5,
                       digest=f"{rnd:064x}", duration_ms=1234, members=list(members), committed_ms=10_000 + rnd)


def busy_job(jid: str = "job-1") -> Job:
    """A job with every field away from its default."""
    spec = JobSpec(task="synthetic:500k", rounds=7, local_steps=3, batch_size=16, learning_rate=0.05,
                   min_peers=2, sharding="dirichlet:0.3", seed=9, num_shards=12, checkpoint_every_rounds=2)
    job = Job(jid, spec, created_ms=100, shard_sizes=[42] * 11 + [38], state=RUNNING, updated_ms=300, reason="peer x left",
              committed_round=2, epoch=4, members=["p1", "p2"],
              assignment={"p1": [0, 2, 4, 6, 8, 10], "p2": [1, 3, 5, 7, 9, 11]},
              round_started_ms=250,
              reports={"p1": Report(samples=48, train_loss=0.7, digest="ab" * 32, test_accuracy=0.81, test_loss=0.6),
                       "p2": Report(samples=32, train_loss=0.9, digest="ab" * 32)},
              samples=1280, checkpoint_round=2, checkpoint_digest="cd" * 32,
              pending_checkpoint=(3, "ef" * 32), mismatches=1)
    job.history = [record(1, ["p1", "p2", "p3"]), record(2, ["p1", "p2"])]
    job.rolled_back_rounds = 1
    job.evictions = [Eviction("p3", NEIGHBOUR_REPORT, "p1", 240, 3, 2, "stream broke")]
    job.evictions_total = 5
    job.epochs = [MembershipEpoch(3, ["p1", "p2", "p3"], 200, 2), MembershipEpoch(4, ["p1", "p2"], 240, 2)]
    return job


def save_job(store: Store, job: Job, peers: list[PeerRecord] = ()) -> None:  # type: ignore[assignment]
    store.save(jobs=[job], peers=peers, removed_peers=[], rounds=[(job.job_id, r) for r in job.history])


def by_id(items: list[Any], attr: str) -> dict[str, Any]:
    return {getattr(x, attr): x for x in items}


def test_empty_store_loads_nothing(store: Store) -> None:
    assert store.load() == ([], [])


def test_job_and_peers_round_trip(store: Store) -> None:
    job = busy_job()
    peers = [peer("p1", job.job_id), peer("p2", job.job_id), peer("p3")]
    save_job(store, job, peers)
    jobs, got_peers = store.load()
    assert jobs == [job]
    got = jobs[0]
    assert got is not job
    assert isinstance(got.spec, JobSpec) and got.spec == job.spec
    assert isinstance(got.reports["p1"], Report) and got.reports["p2"].test_accuracy is None
    assert got.pending_checkpoint == (3, "ef" * 32) and isinstance(got.pending_checkpoint, tuple)
    assert all(isinstance(r, RoundRecord) for r in got.history)
    assert isinstance(got.evictions[0], Eviction) and isinstance(got.epochs[0], MembershipEpoch)
    assert by_id(got_peers, "peer_id") == by_id(peers, "peer_id")


def test_job_with_defaults_round_trips(store: Store) -> None:
    job = Job("job-2", JobSpec(), created_ms=5)
    save_job(store, job)
    assert store.load()[0] == [job]
    assert store.load()[0][0].pending_checkpoint is None


def test_saving_again_replaces_and_history_grows_by_appends(store: Store) -> None:
    job = busy_job()
    save_job(store, job)
    job.state, job.committed_round, job.reports, job.pending_checkpoint = SUCCEEDED, 3, {}, None
    job.members, job.assignment = [], {}
    job.history.append(record(3, ["p1"]))
    store.save(jobs=[job], peers=[], removed_peers=[], rounds=[(job.job_id, job.history[-1])])
    (got,), _ = store.load()
    assert got == job
    assert [r.round for r in got.history] == [1, 2, 3]


def test_rounds_stay_with_their_job(store: Store) -> None:
    a, b = busy_job("job-a"), busy_job("job-b")
    b.history = [record(1, ["q"], acc=0.1)]
    save_job(store, a)
    save_job(store, b)
    jobs = by_id(store.load()[0], "job_id")
    assert jobs["job-a"].history == a.history
    assert jobs["job-b"].history == b.history


def test_peers_update_and_removed_peers_disappear(store: Store) -> None:
    store.save(jobs=[], peers=[peer("p1"), peer("p2"), peer("p3")], removed_peers=[], rounds=[])
    store.save(jobs=[], peers=[peer("p1", "job-1", seen=99)], removed_peers=["p2", "never-saved"], rounds=[])
    _, peers = store.load()
    got = by_id(peers, "peer_id")
    assert set(got) == {"p1", "p3"}
    assert got["p1"] == peer("p1", "job-1", seen=99)
    # Saved and removed in one call: the removal wins.
    store.save(jobs=[], peers=[peer("p4")], removed_peers=["p4"], rounds=[])
    assert "p4" not in by_id(store.load()[1], "peer_id")


def test_nan_metrics_survive(store: Store) -> None:
    job = busy_job()
    job.history = [record(1, ["p1"], acc=float("nan"))]
    save_job(store, job)
    (got,), _ = store.load()
    assert math.isnan(got.history[0].test_accuracy)


def test_loaded_state_is_a_copy(store: Store) -> None:
    """The coordinator mutates what it loads; that must not rewrite the store behind its back."""
    job = busy_job()
    save_job(store, job, [peer("p1")])
    job.members.append("later")  # mutating the saved object after save must not leak
    (got,), (p,) = store.load()
    got.members.append("intruder")
    got.history[0].members.append("intruder")
    got.reports.clear()
    p.capability["device"] = "changed"
    (again,), (p2,) = store.load()
    assert again.members == ["p1", "p2"]
    assert again.history[0].members == ["p1", "p2", "p3"]
    assert set(again.reports) == {"p1", "p2"}
    assert p2.capability["device"] == "cuda:0"


def failing(items: list[Any]) -> Iterator[Any]:
    """Yields ``items`` then fails, as a save that breaks half way."""
    yield from items
    raise RuntimeError("disk on fire")


def test_failed_save_writes_nothing(store: Store) -> None:
    save_job(store, busy_job("job-old"))
    with pytest.raises(RuntimeError):
        store.save(jobs=failing([busy_job("job-new")]), peers=[peer("p9")], removed_peers=[], rounds=[])
    jobs, peers = store.load()
    assert [j.job_id for j in jobs] == ["job-old"]
    assert peers == []


def test_job_dict_round_trip_without_a_store() -> None:
    job = busy_job()
    d = job_to_dict(job)
    assert "history" not in d
    assert isinstance(d["spec"], dict)
    assert job_from_dict(d, job.history) == job


# -- SQLite only -----------------------------------------------------------------------------


def test_sqlite_reopened_sees_everything(tmp_path: pathlib.Path) -> None:
    state_dir = tmp_path / "nested" / "state"
    first = SqliteStore(state_dir)
    job, other = busy_job("job-1"), busy_job("job-2")
    other.state, other.members, other.assignment = FAILED, [], {}
    save_job(first, job, [peer("p1", "job-1"), peer("p2", "job-1"), peer("gone")])
    save_job(first, other)
    first.save(jobs=[], peers=[], removed_peers=["gone"], rounds=[])
    # A second connection sees the committed state while the first is still open (crash-like).
    concurrent = SqliteStore(state_dir)
    want_jobs = by_id([job, other], "job_id")
    assert by_id(concurrent.load()[0], "job_id") == want_jobs
    concurrent.close()
    first.close()
    reopened = SqliteStore(state_dir)
    try:
        jobs, peers = reopened.load()
        assert by_id(jobs, "job_id") == want_jobs
        assert set(by_id(peers, "peer_id")) == {"p1", "p2"}
    finally:
        reopened.close()


def test_sqlite_uses_wal_journal_mode(tmp_path: pathlib.Path) -> None:
    s = SqliteStore(tmp_path)
    try:
        assert s.path == tmp_path / "coordinator.db"
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        s.close()
    # WAL is a property of the database file: a plain connection sees it too.
    con = sqlite3.connect(tmp_path / "coordinator.db")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        con.close()


def test_sqlite_tables_are_plain_json(tmp_path: pathlib.Path) -> None:
    """History is stored as rows of its own, not inside the job document."""
    s = SqliteStore(tmp_path)
    save_job(s, busy_job())
    s.close()
    con = sqlite3.connect(tmp_path / "coordinator.db")
    try:
        assert con.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 2
        (body,) = con.execute("SELECT body FROM jobs").fetchone()
        assert '"history"' not in body
    finally:
        con.close()


def test_a_job_document_of_schema_0_gets_its_gossip_window_in_named_fields_and_its_shard_sizes() -> None:
    """The first release kept the gossip phase as flat ``gossip_*`` fields and a list of slots."""
    d = job_to_dict(busy_job())
    del d["gossip"], d["shard_sizes"]
    d.update(gossip_phase=True, gossip_peers=3, gossip_steps=5, gossip_next={"p1": 3, "p2": 2},
             gossip_issued_ms={"p1": 400, "p2": 300}, gossip_eval_step={"p1": 3}, gossip_dist={"p1": 0.5},
             gossip_window=[14, 21.0, 700, 12, 8, 3, 250, 1, 0.75, 0.5],
             gossip_consumed={"p1": [[0, 1, 0, 7]], "p2": [[1, 1, 0, 7]]})
    job = job_from_dict(job_dict_from_v0(d, [5] * 12), [])
    assert job.shard_sizes == [5] * 12
    g = job.gossip
    assert (g.active, g.peers, g.steps) == (True, 3, 5)
    assert g.step == {"p1": 3, "p2": 2} and g.issued_ms == {"p1": 400, "p2": 300}
    assert g.eval_step == {"p1": 3} and g.distance == {"p1": 0.5}
    w = g.window
    assert (w.samples, w.loss_sum, w.bytes_sent, w.train_ms, w.exchange_ms, w.eval_ms) == (14, 21.0, 700, 12, 8, 3)
    assert (w.start_ms, w.evaluations, w.accuracy_sum, w.test_loss_sum) == (250, 1, 0.75, 0.5)
    assert w.consumed == {"p1": [[0, 1, 0, 7]], "p2": [[1, 1, 0, 7]]}


# -- schema versions -------------------------------------------------------------------------

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "state-0e7092d"


def old_state_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the first release's state dir (tests/fixtures/README.md says how it was made)."""
    return pathlib.Path(shutil.copytree(FIXTURE, tmp_path / "state"))


def raw_jobs(db: pathlib.Path) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {jid: json.loads(body) for jid, body in con.execute("SELECT job_id, body FROM jobs")}
    finally:
        con.close()


def user_version(db: pathlib.Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(con.execute("PRAGMA user_version").fetchone()[0])
    finally:
        con.close()


def test_a_state_dir_of_the_first_release_opens_migrated_with_its_jobs_rounds_and_ledger(tmp_path: pathlib.Path) -> None:
    state = old_state_dir(tmp_path)
    db = state / "coordinator.db"
    assert user_version(db) == 0
    old = raw_jobs(db)
    store = SqliteStore(state)
    try:
        jobs, peers = store.load()
    finally:
        store.close()
    assert user_version(db) == SCHEMA_VERSION
    by = by_id(jobs, "job_id")
    assert set(by) == set(old)
    states = sorted((j.state, j.spec.aggregation) for j in jobs)
    assert states == [("PENDING", "ring"), ("RUNNING", "gossip"), ("RUNNING", "ring"),
                      ("SUCCEEDED", "gossip"), ("SUCCEEDED", "ring")]
    train = tasks.builtin_data("digits").y_train.size
    for jid, job in by.items():
        o = old[jid]
        assert (job.committed_round, job.epoch, job.members, job.samples) == (
            o["committed_round"], o["epoch"], o["members"], o["samples"])
        assert job.cursors == {int(k): tuple(v) for k, v in o["cursors"].items()}
        assert len(job.shard_sizes) == job.spec.num_shards and sum(job.shard_sizes) == train
        assert [r.round for r in job.history] == list(range(1, job.committed_round + 1))
        assert sum(r.samples for r in job.history) + job.gossip.window.samples == job.samples
        ranges = [[tuple(x) for m in sorted(r.consumed) for x in r.consumed[m]] for r in job.history]
        assert violations(ranges, job.shard_sizes) == [], jid
    running = [j for j in jobs if j.state == "RUNNING"]
    assert all(j.committed_round > 2 and len(j.members) == 2 for j in running)
    ring = next(j for j in running if j.spec.aggregation == "ring")
    assert ring.checkpoint_round and (state / "checkpoints" / ring.job_id / f"round-{ring.checkpoint_round:06d}.pt").is_file()
    gossip = next(j for j in running if j.spec.aggregation == "gossip")
    o = old[gossip.job_id]
    g, w = gossip.gossip, gossip.gossip.window
    assert g.active and (g.peers, g.steps, g.step, g.issued_ms) == (
        o["gossip_peers"], o["gossip_steps"], o["gossip_next"], o["gossip_issued_ms"])
    assert [w.samples, w.loss_sum, w.bytes_sent, w.train_ms, w.exchange_ms, w.eval_ms, w.start_ms, w.evaluations,
            w.accuracy_sum, w.test_loss_sum] == o["gossip_window"]
    assert w.samples > 0 and w.consumed == o["gossip_consumed"]
    assert {p.peer_id for p in peers} == {m for j in running for m in j.members}
    # Opened again, the store is at the current schema and migrates nothing twice.
    migrated = raw_jobs(db)
    SqliteStore(state).close()
    assert raw_jobs(db) == migrated


def test_a_state_dir_of_a_newer_schema_is_refused_and_left_as_it_is(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    SqliteStore(state).close()
    db = state / "coordinator.db"
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    before = db.read_bytes()
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this dml knows"):
        SqliteStore(state)
    assert db.read_bytes() == before and user_version(db) == SCHEMA_VERSION + 1


def test_a_migration_that_fails_leaves_the_old_schema_untouched(tmp_path: pathlib.Path) -> None:
    state = old_state_dir(tmp_path)
    db = state / "coordinator.db"
    con = sqlite3.connect(db)
    (jid, body), *_ = con.execute("SELECT job_id, body FROM jobs").fetchall()
    d = json.loads(body)
    d["spec"]["task"] = "retired-task"
    con.execute("UPDATE jobs SET body = ? WHERE job_id = ?", (json.dumps(d), jid))
    con.commit()
    con.close()
    old = raw_jobs(db)
    with pytest.raises(SchemaError, match=f"cannot migrate job {jid} from store schema 0: unknown built-in task 'retired-task'"):
        SqliteStore(state)
    assert user_version(db) == 0 and raw_jobs(db) == old


# -- durability: cluster id, a full disk, damaged files --------------------------------------


def test_a_state_dir_keeps_the_cluster_id_it_was_made_with(tmp_path: pathlib.Path) -> None:
    first = SqliteStore(tmp_path / "a")
    cid = first.cluster_id
    first.close()
    again = SqliteStore(tmp_path / "a")
    other = SqliteStore(tmp_path / "b")
    try:
        assert again.cluster_id == cid and len(cid) == 32 and int(cid, 16) >= 0
        assert other.cluster_id != cid
    finally:
        again.close()
        other.close()
    assert MemoryStore().cluster_id != MemoryStore().cluster_id  # no state dir: a new cluster each start


def test_a_migrated_state_dir_gets_a_cluster_id_once(tmp_path: pathlib.Path) -> None:
    state = old_state_dir(tmp_path)
    s = SqliteStore(state)
    cid = s.cluster_id
    s.close()
    s = SqliteStore(state)
    try:
        assert s.cluster_id == cid and user_version(state / "coordinator.db") == SCHEMA_VERSION
    finally:
        s.close()


def test_a_full_database_refuses_the_whole_save_and_writes_again_once_there_is_room(tmp_path: pathlib.Path) -> None:
    """SQLite's max_page_count gives a real SQLITE_FULL. The save fails as a whole with
    StoreWriteError, the file holds what it held, the connection stays usable (SQLite rolls a
    full transaction back by itself: a ROLLBACK then must not hide the error), and the probe
    tells when a write of that size fits again."""
    s = SqliteStore(tmp_path)
    try:
        old = busy_job("job-old")
        save_job(s, old, [peer("p1", "job-old")])
        before = s.load()
        s.set_max_pages()
        big = busy_job("job-big")
        big.reason = "x" * 200_000
        with pytest.raises(StoreWriteError, match="database or disk is full") as err:
            s.save(jobs=[big, old], peers=[peer("p9")], removed_peers=["p1"], rounds=[("job-big", record(1, ["p9"]))])
        assert err.value.size_bytes > 200_000
        assert s.load() == before
        with pytest.raises(StoreWriteError, match="database or disk is full"):
            s.probe(err.value.size_bytes)
        assert s.load() == before
        s.set_max_pages(MAX_PAGES)
        s.probe(err.value.size_bytes)
        s.save(jobs=[big], peers=[peer("p9")], removed_peers=["p1"], rounds=[("job-big", record(1, ["p9"]))])
        jobs, peers = s.load()
        assert {j.job_id for j in jobs} == {"job-old", "job-big"} and [p.peer_id for p in peers] == ["p9"]
    finally:
        s.close()


def test_the_probe_leaves_nothing_behind(tmp_path: pathlib.Path) -> None:
    s = SqliteStore(tmp_path)
    try:
        s.probe(1 << 20)
        assert s.load() == ([], [])
        assert s._db.execute("SELECT COUNT(*) FROM meta WHERE key = 'probe'").fetchone()[0] == 0
    finally:
        s.close()


def damaged_db(tmp_path: pathlib.Path, how: str) -> pathlib.Path:
    """A state dir whose coordinator.db is empty, truncated, or not a database at all."""
    good = tmp_path / "good"
    s = SqliteStore(good)
    for i in range(40):
        j = busy_job(f"job-{i}")
        j.reason = "r" * 3000
        save_job(s, j)
    s.close()
    data = (good / "coordinator.db").read_bytes()
    assert len(data) > 64 << 10
    state = tmp_path / how
    state.mkdir()
    content = {"empty": b"", "truncated": data[: len(data) // 2], "header-only": data[:100],
               "garbage": bytes(range(256)) * 32}[how]
    (state / "coordinator.db").write_bytes(content)
    return state


@pytest.mark.parametrize("how", ["empty", "truncated", "header-only", "garbage"])
def test_an_empty_truncated_or_corrupt_database_is_refused_naming_the_file(tmp_path: pathlib.Path, how: str) -> None:
    state = damaged_db(tmp_path, how)
    before = (state / "coordinator.db").read_bytes()
    with pytest.raises(CorruptStore) as err:
        SqliteStore(state)
    msg = str(err.value)
    assert str(state / "coordinator.db") in msg and "\n" not in msg
    assert ("empty" if how == "empty" else "not a readable dml database") in msg
    assert (state / "coordinator.db").read_bytes() == before  # refused, never rewritten


def test_a_record_that_does_not_decode_is_refused_naming_the_file(tmp_path: pathlib.Path) -> None:
    s = SqliteStore(tmp_path)
    save_job(s, busy_job())
    s.close()
    con = sqlite3.connect(tmp_path / "coordinator.db")
    con.execute("UPDATE jobs SET body = '{\"job_id\": 1'")
    con.commit()
    con.close()
    s = SqliteStore(tmp_path)
    try:
        with pytest.raises(CorruptStore, match="coordinator.db holds a record this dml cannot read"):
            s.load()
    finally:
        s.close()


def test_a_new_database_appears_only_initialised(tmp_path: pathlib.Path) -> None:
    """A new coordinator.db is made under another name and renamed once written: an existing
    empty one was damaged, never merely new."""
    s = SqliteStore(tmp_path)
    s.close()
    assert sorted(p.name for p in tmp_path.iterdir() if "coordinator.db" in p.name and not p.name.endswith(("-wal", "-shm"))) == ["coordinator.db"]
    assert user_version(tmp_path / "coordinator.db") == SCHEMA_VERSION


def test_a_state_dir_of_schema_2_gets_each_jobs_data_and_labels_and_its_members_count_as_having_taken_it(
        tmp_path: pathlib.Path) -> None:
    """Schema 2 (before takes) knew only built-in tasks: a job's data and labels come from its
    task's training set, as a take would give them, and its running members need not take again."""
    from dml.common.sampling import labels_digest
    from dml.coordinator.records import Job

    state = tmp_path / "state"
    s = SqliteStore(state)
    running = Job("job-1", JobSpec(task="digits", num_shards=4, batch_size=8), created_ms=1, state="RUNNING",
                  members=["peer-a", "peer-b"], shard_sizes=[360, 359, 359, 359])
    s.save(jobs=[running, Job("job-2", JobSpec(task="synthetic:10k"), created_ms=2)], peers=[], removed_peers=[],
           rounds=[])
    s.close()
    db = state / "coordinator.db"
    con = sqlite3.connect(db, isolation_level=None)  # as schema 2 had it: no labels, no takes
    for jid, body in con.execute("SELECT job_id, body FROM jobs").fetchall():
        d = json.loads(body)
        for k in ("needs_take", "data", "ready", "declined"):
            d.pop(k)
        con.execute("UPDATE jobs SET body = ? WHERE job_id = ?", (json.dumps(d), jid))
    con.execute("DROP TABLE labels")
    con.execute("PRAGMA user_version=2")
    con.close()
    store = SqliteStore(state)
    try:
        by = {j.job_id: j for j in store.load()[0]}
        assert user_version(db) == SCHEMA_VERSION
        for jid, task in (("job-1", "digits"), ("job-2", "synthetic:10k")):
            y = tasks.builtin_data(task).y_train
            blob = y.astype("<i4").tobytes()
            job = by[jid]
            assert job.needs_take and job.data is not None and job.data.has_labels
            assert (job.data.train_samples, job.data.num_classes) == (y.size, 10)
            assert job.data.digest == labels_digest(y.size, blob)
            assert store.load_labels(jid) == blob
        assert by["job-1"].ready == ["peer-a", "peer-b"] and by["job-2"].ready == []
        assert by["job-1"].shard_sizes == [360, 359, 359, 359], "the sizes it was planned with stay"
    finally:
        store.close()


def test_a_peers_pool_and_a_jobs_pool_and_cap_survive_a_restart(tmp_path: pathlib.Path) -> None:
    from dml.coordinator.state import ClusterState

    st = ClusterState(10_000)
    pid, _ = st.register("10.0.0.9:1", {"device": "cpu", "pool": "gpu", "memory_bytes": 1 << 30}, 0)
    st.submit(JobSpec(pool="gpu", max_peers=1, min_peers=1, num_shards=2), [5, 5], 0)
    s = SqliteStore(tmp_path / "state")
    s.save(jobs=list(st.jobs.values()), peers=list(st.peers.values()), removed_peers=[], rounds=[])
    s.close()
    s = SqliteStore(tmp_path / "state")
    jobs, peers = s.load()
    s.close()
    assert (jobs[0].spec.pool, jobs[0].spec.max_peers) == ("gpu", 1)
    assert peers[0].capability["pool"] == "gpu" and jobs[0].members == [pid]
