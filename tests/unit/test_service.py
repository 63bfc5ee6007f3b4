"""The Coordinator facade: what it fixes on a job at submit time, and what it restores."""
from __future__ import annotations

import pathlib
import shutil

import pytest

from dml.common import tasks
from dml.common.spec import JobSpec
from dml.coordinator import service
from dml.coordinator.records import Report
from dml.coordinator.service import Coordinator, CoordinatorConfig, job_shards
from dml.coordinator.servicer import PeerControlServicer
from dml.coordinator.store import MemoryStore, SqliteStore


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
