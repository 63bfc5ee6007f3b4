"""The Coordinator facade: what it fixes on a job at submit time, and what it restores."""
from __future__ import annotations

import pathlib
import shutil

import pytest

from dml.common import tasks
from dml.common.spec import JobSpec
from dml.coordinator import service
from dml.coordinator.records import EVICTION_CAUSES, NEIGHBOUR_REPORT, Eviction, Job, MembershipEpoch, Report
from dml.coordinator.service import Coordinator, CoordinatorConfig, job_shards
from dml.coordinator.servicer import PeerControlServicer, job_to_pb
from dml.coordinator.store import MemoryStore, SqliteStore
from dml.v1 import jobs_pb2


def test_submit_fixes_the_shard_sizes_and_a_restored_job_runs_without_loading_data(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    now = [1000.0]
    first = Coordinator(CoordinatorConfig(), store, tmp_path, clock=lambda: now[0])
    spec = JobSpec(task="digits", num_shards=5, min_peers=2, rounds=2, local_steps=1, batch_size=8)
    jid = first.submit(spec)
    sizes = first.state.job(jid).shard_sizes
    assert sizes == [int(s.size) for s in job_shards(first.state.job(jid).spec)]
    assert sum(sizes) == tasks.get_task("digits").load().y_train.size
    # A coordinator restored from the store: from here on nothing may load the task.
    second = Coordinator(CoordinatorConfig(), store, tmp_path, clock=lambda: now[0])
    assert second.state.job(jid).shard_sizes == sizes

    def no_data(*_: object) -> None:
        raise AssertionError("the state machine loaded a dataset")

    monkeypatch.setattr(service, "get_task", no_data)
    service._shards.cache_clear()
    a, b = second.register("10.0.0.1:1", {}), second.register("10.0.0.2:1", {})
    job = second.state.job(jid)
    assert job.members == [a, b]
    for rnd in (1, 2):
        for m in (a, b):
            now[0] += 1
            second.report(m, jid, rnd, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest="d"))
    assert job.state == "SUCCEEDED" and job.samples == 2 * 2 * 8


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
        "EVICTION_CAUSE_ROUND_DEADLINE", "EVICTION_CAUSE_REPLACED", "EVICTION_CAUSE_UNREACHABLE"]
    assert [(e.peer_id, e.reporter, e.unix_ms, e.epoch, e.round, e.detail) for e in st.evictions][:2] == [
        ("p0", "", 100, 2, 5, "why 0"), ("p1", "p9", 101, 3, 5, "why 1")]
    assert [(e.epoch, list(e.peers), e.started_unix_ms, e.round) for e in st.epochs] == [
        (6, ["p8", "p9"], 90, 4), (7, ["p9"], 120, 5)]
