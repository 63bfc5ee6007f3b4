"""The Coordinator facade: what it fixes on a job at submit time, and what it restores."""
from __future__ import annotations

import pathlib
import shutil

import pytest

from dataclasses import replace

from dml.common import tasks
from dml.common.spec import JobSpec
from dml.coordinator import store as store_module
from dml.coordinator.records import EVICTION_CAUSES, NEIGHBOUR_REPORT, BadReport, Eviction, Job, MembershipEpoch, Report
from dml.coordinator.service import Clock, Coordinator, CoordinatorConfig, cut_shards
from dml.coordinator.state import READY
from dml.coordinator.servicer import PeerControlServicer, job_to_pb
from dml.coordinator.store import MemoryStore, SqliteStore
from dml.v1 import jobs_pb2
from tests.unit.takekit import builtin_take, take_all


def test_the_first_ready_take_fixes_the_shards_and_a_restored_job_runs_without_loading_data(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStore(tmp_path / "state")
    now = [1000.0]
    first = Coordinator(CoordinatorConfig(), store, tmp_path, clock=Clock(monotonic=lambda: now[0], wall=lambda: now[0]))
    spec = JobSpec(task="digits", num_shards=5, min_peers=2, rounds=2, local_steps=1, batch_size=8,
                   sharding="dirichlet:0.5")
    jid = first.submit(spec)
    assert first.state.job(jid).shard_sizes == [] and first.job_labels(jid) is None, "cut only once a peer took it"
    a, b = first.register("10.0.0.1:1", {})[0], first.register("10.0.0.2:1", {})[0]
    take_all(first, jid, [a])
    data, labels = builtin_take()
    job = first.state.job(jid)
    sizes = job.shard_sizes
    want = cut_shards(job.spec, tasks.builtin_data("digits").y_train)
    assert sizes == [int(s.size) for s in want] and sum(sizes) == data.train_samples
    assert [x.tolist() for x in first.shard_indices(job)] == [x.tolist() for x in want]
    assert first.job_labels(jid).tolist() == tasks.builtin_data("digits").y_train.tolist()
    first.close()
    # A coordinator restored from the store: from here on nothing may load the task's data.

    def no_data(*_: object) -> None:
        raise AssertionError("the coordinator loaded a dataset")

    monkeypatch.setattr(tasks, "builtin_data", no_data)
    monkeypatch.setattr(store_module, "builtin_data", no_data)
    second = Coordinator(CoordinatorConfig(), SqliteStore(tmp_path / "state"), tmp_path,
                         clock=Clock(monotonic=lambda: now[0], wall=lambda: now[0]))
    job = second.state.job(jid)
    assert job.shard_sizes == sizes and job.ready == [a]
    assert [x.tolist() for x in second.shard_indices(job)] == [x.tolist() for x in want]
    assert second.job_labels(jid).tobytes() == labels
    second.take(b, jid, READY, data=data, labels=labels)
    assert job.members == [a, b]
    for rnd in (1, 2):
        for m in (a, b):
            now[0] += 1
            second.report(m, jid, rnd, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest="d"))
    assert job.state == "SUCCEEDED" and job.samples == 2 * 2 * 8
    second.close()


def test_a_take_whose_labels_do_not_add_up_is_refused(tmp_path: pathlib.Path) -> None:
    coord = Coordinator(CoordinatorConfig(), MemoryStore(), tmp_path)
    jid = coord.submit(JobSpec(task="digits", num_shards=4, min_peers=1, rounds=1))
    a = coord.register("10.0.0.1:1", {})[0]
    data, labels = builtin_take()
    for bad, blob, words in (
            (data, labels[:-4], "bytes of labels for"),
            (data, b"\xff\xff\xff\xff" + labels[4:], "must not be negative"),
            (replace(data, digest="0" * 64), labels, "data_digest is not the sha256"),
            (replace(data, digest="nope"), labels, "64 hex digits"),
            (replace(data, train_samples=(1 << 20) + 1), labels, "at most 1,048,576")):
        with pytest.raises(BadReport, match=words):
            coord.take(a, jid, READY, data=bad, labels=blob)
    job = coord.state.job(jid)
    assert job.data is None and job.state == "PENDING" and job.ready == []
    assert [x.peer_id for x in job.declined] == [a], "the first refused take is shown, the peer not offered it again"
    assert job.declined[0].reason.startswith("its description of the data was refused: ") and \
        "bytes of labels for" in job.declined[0].reason
    assert coord.state.take_for(a) is None
    a = coord.register("10.0.0.1:1", {})[0]  # it restarts: a new peer, that describes the data right
    coord.take(a, jid, READY, data=replace(data, num_classes=99), labels=labels)
    assert job.data is not None and job.data.num_classes == 10, "counted from the labels, not taken on trust"
    assert job.state == "RUNNING"


FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "state-0e7092d"


def test_the_running_jobs_of_a_first_release_state_dir_are_planned_again(tmp_path: pathlib.Path) -> None:
    """The state dir of tests/fixtures/README.md, opened by this release: each member of each
    running job gets the plan it had (same round, epoch, samples), with its shards' indices."""
    state = pathlib.Path(shutil.copytree(FIXTURE, tmp_path / "state"))
    coord = Coordinator(CoordinatorConfig(), SqliteStore(state), state / "checkpoints")
    servicer = PeerControlServicer(coord)
    try:
        running = [j for j in coord.jobs() if j.state == "RUNNING"]
        assert sorted(j.spec.aggregation for j in running) == ["gossip", "ring"]
        for job in running:
            for m in job.members:
                plan = coord.wait_plan(m, ("", 0, 0), 0.0, lambda j, m=m: servicer._plan_pb(j, m))
                assert plan is not None and plan.job_id == job.job_id and plan.epoch == job.epoch
                assert plan.gossip == job.gossip.active
                assert plan.round == (job.gossip.step[m] if job.gossip.active else job.committed_round + 1)
                if not job.gossip.active:
                    assert plan.start_digest == job.history[-1].digest
                    assert coord.checkpoint(job.job_id)[2].is_file()
                mine = next(x for x in plan.members if x.peer_id == m)
                assert [[r.shard_id, r.data_epoch, r.start, r.stop] for r in mine.samples] == job.allocation[m]
                assert sum(r.stop - r.start for r in mine.samples) == job.spec.local_steps * job.spec.batch_size
                assert set(plan.shard_indices) == {r.shard_id for r in mine.samples}
                for s, idx in plan.shard_indices.items():
                    assert len(idx.indices) == job.shard_sizes[s]
    finally:
        coord.close()


def test_job_status_carries_every_eviction_cause_the_epochs_and_the_rolled_back_rounds() -> None:
    job = Job("job-1", JobSpec(), created_ms=1, shard_sizes=[1] * JobSpec().num_shards, state="RUNNING", epoch=7,
              rolled_back_rounds=2, evictions_total=9)
    job.evictions = [Eviction(f"p{i}", cause, "p9" if cause == NEIGHBOUR_REPORT else "", 100 + i, 2 + i, 5, f"why {i}")
                     for i, cause in enumerate(EVICTION_CAUSES)]
    job.epochs = [MembershipEpoch(6, ["p8", "p9"], 90, 4), MembershipEpoch(7, ["p9"], 120, 5)]
    st = job_to_pb(job)
    assert st.rolled_back_rounds == 2 and st.evictions_total == 9
    assert [jobs_pb2.EvictionCause.Name(e.cause) for e in st.evictions] == [
        "EVICTION_CAUSE_HEARTBEAT_TIMEOUT", "EVICTION_CAUSE_NEIGHBOUR_REPORT", "EVICTION_CAUSE_SELF_REPORT",
        "EVICTION_CAUSE_ROUND_DEADLINE", "EVICTION_CAUSE_REPLACED", "EVICTION_CAUSE_UNREACHABLE",
        "EVICTION_CAUSE_QUARANTINED", "EVICTION_CAUSE_PROTOCOL_MISMATCH"]
    assert [(e.peer_id, e.reporter, e.unix_ms, e.epoch, e.round, e.detail) for e in st.evictions][:2] == [
        ("p0", "", 100, 2, 5, "why 0"), ("p1", "p9", 101, 3, 5, "why 1")]
    assert [(e.epoch, list(e.peers), e.started_unix_ms, e.round) for e in st.epochs] == [
        (6, ["p8", "p9"], 90, 4), (7, ["p9"], 120, 5)]


# -- durability and time -----------------------------------------------------------------------


class FakeClock:
    """Monotonic and wall clocks a test moves apart."""

    def __init__(self, mono: float = 1000.0, wall: float = 1.7e9) -> None:
        self.mono, self.wall = mono, wall

    def clock(self) -> Clock:
        return Clock(monotonic=lambda: self.mono, wall=lambda: self.wall)

    def advance(self, s: float) -> None:
        self.mono += s
        self.wall += s


def two_peer_job(coord: Coordinator, rounds: int = 50) -> tuple[str, str, str]:
    a, b = coord.register("10.0.0.1:1", {})[0], coord.register("10.0.0.2:1", {})[0]
    jid = coord.submit(JobSpec(task="digits", num_shards=4, min_peers=2, rounds=rounds, local_steps=1, batch_size=8))
    take_all(coord, jid, [a, b])
    return jid, a, b


def run_round(coord: Coordinator, clk: FakeClock, jid: str, members: list[str], digest: str = "") -> None:
    """Every member heartbeats and reports the current round (same digest)."""
    job = coord.state.job(jid)
    rnd, epoch = job.round, job.epoch
    for m in members:
        clk.advance(0.1)
        coord.heartbeat(m)
        coord.report(m, jid, rnd, epoch, Report(samples=job.allocated(m), train_loss=1.0,
                                                digest=digest or f"{rnd:064x}"))


def comparable(job: Job) -> dict:
    """A job's stored fields without its timers (a restore starts those afresh)."""
    from dml.coordinator.store import job_to_dict

    d = job_to_dict(job)
    for k in ("round_started_ms", "waiting_since_ms", "gossip"):
        d.pop(k)
    d["history"] = [r.__dict__ for r in job.history]
    return d


def test_a_full_disk_mid_job_refuses_the_change_pauses_and_the_job_resumes_when_space_returns(
        tmp_path: pathlib.Path) -> None:
    """SQLite's max_page_count: a real SQLITE_FULL. The refused change leaves memory equal to
    disk, the call fails (UNAVAILABLE) and health turns NOT_SERVING with the reason; changes are
    refused while paused, heartbeats go on; once a probe write fits the coordinator serves
    again with fresh leases and the job finishes with no committed round lost."""
    from dml.coordinator.service import PROBE_EVERY_S, StoreUnavailable
    from dml.coordinator.store import MAX_PAGES

    clk = FakeClock()
    store = SqliteStore(tmp_path / "state")
    coord = Coordinator(CoordinatorConfig(), store, tmp_path / "state" / "checkpoints", clock=clk.clock())
    health: list[tuple[bool, str]] = []
    coord.on_health = lambda ok, why: health.append((ok, why))
    try:
        jid, a, b = two_peer_job(coord)
        for _ in range(3):
            run_round(coord, clk, jid, [a, b])
        store.set_max_pages()
        refused = None
        for _ in range(40):  # each commit appends a round row: the pages run out within a few
            try:
                run_round(coord, clk, jid, [a, b])
            except StoreUnavailable as e:
                refused = e
                break
        assert refused is not None and "database or disk is full" in str(refused)
        (disk_job,), disk_peers = store.load()
        mem_job = coord.state.job(jid)
        assert comparable(mem_job) == comparable(disk_job)  # memory went back to what disk holds
        assert sorted(coord.state.peers) == sorted(p.peer_id for p in disk_peers)
        committed = [(r.round, r.digest) for r in disk_job.history]
        assert len(committed) >= 3
        assert health and health[-1][0] is False and "database or disk is full" in health[-1][1]
        reason = coord.pause_reason
        assert "database or disk is full" in reason
        assert reason in job_to_pb(mem_job, reason).reason
        with pytest.raises(StoreUnavailable, match="paused"):
            coord.submit(JobSpec(task="digits", num_shards=4, min_peers=2, rounds=2))
        with pytest.raises(StoreUnavailable):
            run_round(coord, clk, jid, [a, b])
        for _ in range(20):  # a long pause: heartbeats go on, the reaper only probes
            clk.advance(PROBE_EVERY_S)
            coord.heartbeat(a)
            coord.tick()
        assert coord.pause_reason and health[-1][0] is False
        clk.advance(30)  # well past the peer timeout without a heartbeat: nobody pays for the pause
        store.set_max_pages(MAX_PAGES)
        coord.tick()
        assert coord.pause_reason == "" and health[-1] == (True, "")
        coord.tick()
        job = coord.state.job(jid)
        assert job.members == [a, b] and job.evictions_total == 0
        assert [(r.round, r.digest) for r in job.history[: len(committed)]] == committed
        while job.state == "RUNNING":
            run_round(coord, clk, jid, [a, b])
            job = coord.state.job(jid)
        assert job.state == "SUCCEEDED" and job.rolled_back_rounds == 0
        assert [r.round for r in job.history] == list(range(1, 51))
        assert [(r.round, r.digest) for r in store.load()[0][0].history] == [(r.round, r.digest) for r in job.history]
    finally:
        coord.close()


CHECKPOINT_LIMIT_SCRIPT = r"""
import io, pathlib, resource, sys, tempfile
import numpy as np, torch
from dml.aggregation.averaging import digest
from dml.common.spec import JobSpec
from dml.coordinator.service import PROBE_EVERY_S, Clock, Coordinator, CoordinatorConfig, StoreUnavailable
from dml.coordinator.store import MemoryStore
from tests.unit.takekit import take_all

t = [1000.0]
coord = Coordinator(CoordinatorConfig(), MemoryStore(), pathlib.Path(tempfile.mkdtemp()),
                    clock=Clock(monotonic=lambda: t[0], wall=lambda: t[0]))
health = []
coord.on_health = lambda ok, why: health.append((ok, why))
a, b = coord.register("10.0.0.1:1", {})[0], coord.register("10.0.0.2:1", {})[0]
jid = coord.submit(JobSpec(task="digits", num_shards=4, min_peers=2, rounds=3, local_steps=1, batch_size=8))
take_all(coord, jid, [a, b])
epoch = coord.state.job(jid).epoch
flat = np.arange(64 << 10, dtype=np.float32)  # a real 256 KiB state_dict: the coordinator checks its digest
f = io.BytesIO()
torch.save({"w": torch.from_numpy(flat)}, f)
data, dig = f.getvalue(), digest(flat)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
try:
    coord.store_checkpoint(a, jid, 1, epoch, dig, data)
    sys.exit("a checkpoint past the file-size limit was stored")
except StoreUnavailable as e:
    assert "File too large" in str(e), e
job = coord.state.job(jid)
assert job.pending_checkpoint is None, job.pending_checkpoint
assert health == [(False, coord.pause_reason)] and "cannot write checkpoint" in coord.pause_reason, health
assert not list(coord.checkpoint_path(jid, 1).parent.glob("*.tmp"))  # no half-written file left
try:
    coord.check_checkpoint(a, jid, 1, epoch)
    sys.exit("a paused coordinator accepted an upload")
except StoreUnavailable:
    pass
t[0] += PROBE_EVERY_S
coord.tick()
assert coord.pause_reason, "the probe succeeded under the limit"
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space returns
t[0] += PROBE_EVERY_S
coord.tick()
assert coord.pause_reason == "" and health[-1] == (True, ""), health
coord.store_checkpoint(a, jid, 1, epoch, dig, data)
assert coord.state.job(jid).pending_checkpoint == (1, dig)
assert coord.checkpoint_path(jid, 1).stat().st_size == len(data) > 256 << 10
print("OK")
"""


def test_a_checkpoint_that_cannot_be_written_is_refused_and_the_coordinator_pauses_until_it_can() -> None:
    """A real write failure: RLIMIT_FSIZE in a subprocess makes the checkpoint write fail with
    EFBIG ("File too large") as a full disk fails one with ENOSPC."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CHECKPOINT_LIMIT_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


@pytest.mark.parametrize("step_s", [300.0, -300.0])
def test_a_wall_clock_step_evicts_nobody_and_rolls_nothing_back(tmp_path: pathlib.Path, step_s: float) -> None:
    """Leases and deadlines run on the monotonic clock; the wall clock only stamps what people read."""
    clk = FakeClock()
    coord = Coordinator(CoordinatorConfig(), MemoryStore(), tmp_path, clock=clk.clock())
    try:
        jid, a, b = two_peer_job(coord, rounds=10)
        for _ in range(3):
            run_round(coord, clk, jid, [a, b])
        job = coord.state.job(jid)
        before = (job.committed_round, job.epoch, list(job.members), job.evictions_total)
        clk.wall += step_s
        for _ in range(5):
            clk.mono += 0.1
            coord.tick()
        assert (job.committed_round, job.epoch, list(job.members), job.evictions_total) == before
        assert job.rolled_back_rounds == 0 and job.state == "RUNNING"
        run_round(coord, clk, jid, [a, b])
        assert job.committed_round == 4
        assert job.history[-1].committed_ms == int(clk.wall * 1000)  # shown times follow the wall clock
        assert 0 <= job.history[-1].duration_ms < 1000
        clk.mono += 2.5  # the monotonic clock does count: silence past the peer timeout evicts
        coord.tick()
        assert job.evictions_total == 2 and not job.members
    finally:
        coord.close()


def test_a_restart_gives_every_lease_and_deadline_a_fresh_start(tmp_path: pathlib.Path) -> None:
    """Stored timers are another process's monotonic times (after a reboot, from another
    origin): a restored coordinator starts them all from its own now."""
    clk = FakeClock(mono=1e6)
    store = SqliteStore(tmp_path / "state")
    first = Coordinator(CoordinatorConfig(), store, tmp_path / "ckpt", clock=clk.clock())
    jid, a, b = two_peer_job(first, rounds=10)
    for _ in range(2):
        run_round(first, clk, jid, [a, b])
    first.close()
    clk2 = FakeClock(mono=5.0, wall=clk.wall + 300)  # rebooted, and the wall clock stepped
    second = Coordinator(CoordinatorConfig(), SqliteStore(tmp_path / "state"), tmp_path / "ckpt", clock=clk2.clock())
    try:
        assert second.cluster_id == store.cluster_id
        clk2.mono += 3.0  # less than two peer timeouts since the restart
        second.tick()
        job = second.state.job(jid)
        assert job.members == [a, b] and job.committed_round == 2 and job.state == "RUNNING"
        run_round(second, clk2, jid, [a, b])
        assert job.committed_round == 3 and 0 <= job.history[-1].duration_ms < 5000
        clk2.mono += 2.5
        second.tick()
        assert job.evictions_total == 2
    finally:
        second.close()


def test_a_job_whose_shards_cannot_be_cut_from_the_data_a_take_found_fails_saying_why(tmp_path: pathlib.Path) -> None:
    coord = Coordinator(CoordinatorConfig(), MemoryStore(), tmp_path)
    jid = coord.submit(JobSpec(task="digits", num_shards=4, min_peers=1, rounds=1, sharding="classes:11"))
    a = coord.register("10.0.0.1:1", {})[0]
    take_all(coord, jid, [a])
    job = coord.state.job(jid)
    assert job.state == "FAILED" and job.data is None and job.members == []
    with pytest.raises(ValueError) as cut:  # the planner's own message, as the job shows it
        cut_shards(job.spec, tasks.builtin_data("digits").y_train)
    assert job.reason == str(cut.value) and "11" in job.reason


def test_a_stall_of_the_coordinator_itself_is_no_peer_s_silence_but_silence_after_it_is(tmp_path: pathlib.Path) -> None:
    """The reaper ticks every ``tick_ms``. One that comes seconds late means the coordinator
    did not run (a process frozen or descheduled on a loaded machine): no heartbeat could be
    heard, and its first tick used to evict every live peer (a SIGSTOP of 3 s evicted all three
    idle peers of a LocalCluster). The leases are extended by the stall; a peer that stays
    silent afterwards is evicted one peer timeout later all the same. A tick off the schedule
    (``interval_ms`` 0, a test moving the clock) excuses nothing."""
    cfg = CoordinatorConfig(heartbeat_interval_ms=200, peer_timeout_ms=1500, tick_ms=100)
    clk = FakeClock()
    coord = Coordinator(cfg, MemoryStore(), tmp_path, clock=clk.clock())
    a, b = coord.register("10.0.0.1:1", {})[0], coord.register("10.0.0.2:1", {})[0]
    coord.tick(cfg.tick_ms)
    clk.advance(3.0)  # frozen for twice the peer timeout
    coord.tick(cfg.tick_ms)
    assert sorted(coord.state.peers) == sorted([a, b]), "evicted for the coordinator's own stall"
    for _ in range(10):  # 1 s on schedule: a heartbeats, b stays silent
        clk.advance(0.1)
        coord.heartbeat(a)
        coord.tick(cfg.tick_ms)
    assert b in coord.state.peers
    for _ in range(6):
        clk.advance(0.1)
        coord.heartbeat(a)
        coord.tick(cfg.tick_ms)
    assert list(coord.state.peers) == [a], "silent for longer than the peer timeout after the stall"
    clk.advance(3.0)
    coord.tick()  # off the schedule: the time is a's silence
    assert a not in coord.state.peers


def test_a_stopping_coordinator_ends_every_long_poll_at_once(tmp_path: pathlib.Path) -> None:
    """A peer's plan poll and a status watch with nothing new end with ShuttingDown (UNAVAILABLE)
    when the coordinator begins to stop, not at their timeout: each waiting handler otherwise
    held the process's exit for its whole poll."""
    import threading

    from dml.coordinator.service import ShuttingDown

    coord = Coordinator(CoordinatorConfig(), MemoryStore(), tmp_path)
    peer = coord.register("10.0.0.1:1", {})[0]
    jid = coord.submit(JobSpec(task="digits", num_shards=4, min_peers=2, rounds=1))
    key, _ = coord.wait_job_change(jid, None, 0.0, lambda j: j)
    got: dict[str, BaseException | object] = {}

    def poll(name: str, fn) -> None:
        try:
            got[name] = fn()
        except BaseException as e:  # noqa: BLE001 - the test reads it
            got[name] = e

    threads = [threading.Thread(target=poll, args=("plan", lambda: coord.wait_plan(peer, ("", 0, 0), 600.0, lambda j: j))),
               threading.Thread(target=poll, args=("watch", lambda: coord.wait_job_change(jid, key, 600.0, lambda j: j)))]
    for t in threads:
        t.start()
    threads[0].join(0.5)
    assert all(t.is_alive() for t in threads), got  # both are waiting: nothing changed
    coord.begin_shutdown()
    for t in threads:
        t.join(60)  # a deadline for the test, ten times shorter than the polls
    assert not any(t.is_alive() for t in threads)
    assert isinstance(got["plan"], ShuttingDown) and isinstance(got["watch"], ShuttingDown), got
    coord.close()


def test_the_report_that_commits_a_ring_round_answers_with_the_next_round(tmp_path: pathlib.Path) -> None:
    """The member whose report completes a round gets its next plan in the answer (the same plan
    GetPlan would give it: one call fewer for the member the next round waits for); a report
    that does not commit gets none, nor does the one that commits a job's last round."""
    coord = Coordinator(CoordinatorConfig(), MemoryStore(), tmp_path)
    jid, a, b = two_peer_job(coord, rounds=2)
    job = coord.state.job(jid)
    rnd, epoch = job.round, job.epoch
    plan_of = lambda j: (j.job_id, coord.state.plan_key(j, b))  # noqa: E731 - what build_next is handed
    first = coord.report(a, jid, rnd, epoch, Report(samples=job.allocated(a), train_loss=1.0, digest=f"{rnd:064x}"),
                         plan_of)
    assert first == (False, None)
    committed, nxt = coord.report(b, jid, rnd, epoch, Report(samples=job.allocated(b), train_loss=1.0,
                                                             digest=f"{rnd:064x}"), plan_of)
    assert committed and nxt == (jid, (jid, rnd + 1, epoch))
    assert nxt == coord.wait_plan(b, (jid, rnd, epoch), 0.0, plan_of)  # what it would have asked for
    job = coord.state.job(jid)
    coord.report(a, jid, job.round, job.epoch, Report(samples=job.allocated(a), train_loss=1.0, digest="f" * 64), plan_of)
    last = coord.report(b, jid, job.round, job.epoch, Report(samples=job.allocated(b), train_loss=1.0,
                                                             digest="f" * 64), plan_of)
    assert last == (True, None) and coord.state.job(jid).state == "SUCCEEDED"
