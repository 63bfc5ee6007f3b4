"""The Coordinator facade: what it fixes on a job at submit time, and what it restores."""
from __future__ import annotations

import pathlib

import pytest

from dml.common import tasks
from dml.common.spec import JobSpec
from dml.coordinator import service
from dml.coordinator.records import Report
from dml.coordinator.service import Coordinator, CoordinatorConfig, job_shards
from dml.coordinator.store import MemoryStore


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
