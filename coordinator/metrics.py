"""The coordinator's Prometheus metrics, in a registry of its own. The service counts what its
calls changed (:meth:`CoordinatorMetrics.changed`: rounds committed, evictions by cause) from
the records the state machine left, so the rules in ``state.py`` stay free of metrics; live
peers and running jobs are read from the state when scraped."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dml.common.metrics import SECONDS_BUCKETS, RpcCounter
from dml.coordinator.records import RUNNING, Job

if TYPE_CHECKING:
    from dml.coordinator.state import ClusterState


class _Live(Collector):
    """``dml_peers_live`` and ``dml_jobs_running``, read from the state (under the service's
    lock) each time the endpoint is scraped."""

    def __init__(self, view: Callable[[Callable[[ClusterState], tuple[int, int]]], tuple[int, int]]) -> None:
        self._view = view

    def collect(self) -> Iterator[GaugeMetricFamily]:
        peers, running = self._view(lambda st: (len(st.peers), sum(j.state == RUNNING for j in st.jobs.values())))
        yield GaugeMetricFamily("dml_peers_live", "Registered peers whose lease has not expired", value=peers)
        yield GaugeMetricFamily("dml_jobs_running", "Jobs in state RUNNING", value=running)


class CoordinatorMetrics:
    """The coordinator's counters and histograms (names ``dml_*``), in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rounds_committed = Counter("dml_rounds_committed", "Rounds committed (gossip: virtual rounds)",
                                        ["job"], registry=r)
        self.round_seconds = Histogram("dml_round_duration_seconds", "Time from a round's plan to its commit",
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.round_train_seconds = Histogram("dml_round_train_seconds",
                                             "The slowest member's preparation and training in a committed round",
                                             buckets=SECONDS_BUCKETS, registry=r)
        self.round_exchange_seconds = Histogram("dml_round_exchange_seconds",
                                                "The slowest member's exchange (all-reduce) in a committed round",
                                                buckets=SECONDS_BUCKETS, registry=r)
        self.evictions = Counter("dml_evictions", "Members removed from a job, by cause (dml.v1.EvictionCause)",
                                 ["job", "cause"], registry=r)
        self.quarantines = Counter("dml_quarantines", "Members quarantined for a job (non-finite or absurd updates)",
                                   ["job"], registry=r)
        self.store_write_errors = Counter("dml_store_write_errors",
                                          "Writes of the state store or of a checkpoint that failed", registry=r)
        self.rpcs = RpcCounter(r)
        self._evictions_seen: dict[str, int] = {}  # job -> its evictions_total already counted
        self._live: _Live | None = None

    def watch(self, view: Callable[[Callable[[ClusterState], tuple[int, int]]], tuple[int, int]]) -> None:
        """Exposes live peers and running jobs, read through ``view`` (the service's locked read)."""
        if self._live is None:
            self._live = _Live(view)
            self.registry.register(self._live)

    def restored(self, jobs: Iterable[Job]) -> None:
        """Jobs loaded from the store: their past evictions were counted by an earlier process."""
        for j in jobs:
            self._evictions_seen[j.job_id] = j.evictions_total

    def changed(self, jobs: Iterable[Job], committed: Iterable[tuple[Job, int]]) -> None:
        """Counts what one call changed: ``jobs`` it touched (new evictions since the last call
        are counted by cause) and the rounds it ``committed`` as (job, round number)."""
        for job in jobs:
            seen = self._evictions_seen.get(job.job_id, 0)
            new = job.evictions_total - seen
            if new <= 0:
                continue
            self._evictions_seen[job.job_id] = job.evictions_total
            for ev in job.evictions[-new:]:  # the list keeps the most recent MAX_JOB_EVENTS
                self.evictions.labels(job.job_id, ev.cause).inc()
        for job, rnd in committed:
            if not 0 < rnd <= len(job.history):
                continue
            rec = job.history[rnd - 1]
            self.rounds_committed.labels(job.job_id).inc()
            self.round_seconds.observe(max(rec.duration_ms, 0) / 1000.0)
            self.round_train_seconds.observe(max(rec.train_ms, 0) / 1000.0)
            self.round_exchange_seconds.observe(max(rec.exchange_ms, 0) / 1000.0)

    def record_quarantine(self, job: str) -> None:
        """One member quarantined for ``job`` (whoever quarantines calls this once per peer; the
        eviction that may come with it counts in ``dml_evictions_total`` by itself)."""
        self.quarantines.labels(job).inc()

    def record_store_write_error(self) -> None:
        """One write to the store (or of a checkpoint file) failed."""
        self.store_write_errors.inc()
