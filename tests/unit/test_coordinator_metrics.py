"""The coordinator's metrics, counted by the service from what each call changed (fake clock, an
in-memory store, no sockets): commits, evictions by cause once each (a restored job's past ones
not again), store write errors, live peers and running jobs read when collected."""
from __future__ import annotations

import pathlib

import pytest

from dml.common.spec import JobSpec
from dml.coordinator.metrics import CoordinatorMetrics
from dml.coordinator.records import Report
from dml.coordinator.service import Clock, Coordinator, CoordinatorConfig, StoreUnavailable
from dml.coordinator.store import MemoryStore
from tests.unit.takekit import take_all

SPEC = JobSpec(task="digits", num_shards=4, min_peers=2, rounds=3, local_steps=1, batch_size=8)


def value(m: CoordinatorMetrics, name: str, **labels: str) -> float:
    """A sample's value (0 when absent)."""
    got = m.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def _coordinator(store: MemoryStore, tmp_path: pathlib.Path, now: list[float]) -> Coordinator:
    return Coordinator(CoordinatorConfig(), store, tmp_path, clock=Clock(monotonic=lambda: now[0], wall=lambda: now[0]))


def test_commits_evictions_and_gauges(tmp_path: pathlib.Path) -> None:
    store, now = MemoryStore(), [1000.0]
    c = _coordinator(store, tmp_path, now)
    jid = c.submit(SPEC)
    a, b, d = (c.register(f"10.0.0.{i}:1", {})[0] for i in (1, 2, 3))
    take_all(c, jid, [a, b, d])
    m = c.metrics
    assert value(m, "dml_peers_live") == 3 and value(m, "dml_jobs_running") == 1
    job = c.state.job(jid)
    for member in job.members:
        now[0] += 0.5
        c.report(member, jid, 1, job.epoch, Report(samples=job.allocated(member), train_loss=1.0, digest="x",
                                                   train_ms=300, exchange_ms=40))
    assert value(m, "dml_rounds_committed_total", job=jid) == 1
    assert value(m, "dml_round_duration_seconds_count") == 1
    assert value(m, "dml_round_duration_seconds_sum") == pytest.approx(now[0] - 1000.0, abs=0.01)
    assert value(m, "dml_round_train_seconds_sum") == pytest.approx(0.3)
    assert value(m, "dml_round_exchange_seconds_sum") == pytest.approx(0.04)

    first, second, third = job.members
    c.report_failure(first, jid, job.round, job.epoch, second, "stream broke")  # the ring re-forms around the link
    assert value(m, "dml_evictions_total", job=jid, cause="UNREACHABLE") == 0
    c.report_failure(third, jid, job.round, job.epoch, second, "cannot reach it")  # a second reporter: held out
    assert value(m, "dml_evictions_total", job=jid, cause="UNREACHABLE") == 1
    c.register("10.0.0.1:1", {})  # peer a restarts at its address: its old registration is replaced
    now[0] += 10  # every lease but the new peer's runs out
    c.tick()
    evicted = {e.cause: 0 for e in job.evictions}
    for e in job.evictions:
        evicted[e.cause] += 1
    assert sum(evicted.values()) == job.evictions_total >= 2
    for cause, n in evicted.items():
        assert value(m, "dml_evictions_total", job=jid, cause=cause) == n
    assert value(m, "dml_peers_live") == len(c.state.peers)
    assert {a, b, d} - set(c.state.peers)

    # A coordinator restored from the store counts only what happens from then on.
    again = _coordinator(store, tmp_path, now)
    assert value(again.metrics, "dml_evictions_total", job=jid, cause="UNREACHABLE") == 0
    assert value(again.metrics, "dml_rounds_committed_total", job=jid) == 0


class BrokenStore(MemoryStore):
    """A store whose writes fail (a full disk) once ``broken`` is set."""

    broken = False

    def save(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        if self.broken:
            raise OSError(28, "No space left on device")
        super().save(*args, **kwargs)  # type: ignore[arg-type]


def test_a_failed_write_is_counted(tmp_path: pathlib.Path) -> None:
    store, now = BrokenStore(), [1000.0]
    c = _coordinator(store, tmp_path, now)
    c.submit(SPEC)
    assert value(c.metrics, "dml_store_write_errors_total") == 0
    store.broken = True
    with pytest.raises(StoreUnavailable, match="No space left on device"):  # the change is refused (UNAVAILABLE)
        c.register("10.0.0.9:1", {})
    assert value(c.metrics, "dml_store_write_errors_total") == 1
    assert c.state.peers == {} and "No space left on device" in c.pause_reason  # memory as the store has it


def test_record_quarantine_counts_per_job() -> None:
    m = CoordinatorMetrics()
    m.record_quarantine("job-1")
    m.record_quarantine("job-1")
    m.record_quarantine("job-2")
    assert value(m, "dml_quarantines_total", job="job-1") == 2
    assert value(m, "dml_quarantines_total", job="job-2") == 1
