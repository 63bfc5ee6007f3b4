"""The Prometheus endpoints of a real coordinator and real peers in one process, scraped over
HTTP on 127.0.0.1:0: the counters move with what the job did, each process counts its own."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dml.common.metrics import MetricsConfig
from dml.common.spec import JobSpec, spec_to_pb
from dml.coordinator.server import CoordinatorServer, ServerConfig
from dml.peer.runner import Peer, PeerConfig
from dml.v1 import jobs_pb2, types_pb2
from tests.integration.helpers import FAST, job_stub, wait_for

SPEC = JobSpec(task="digits", rounds=6, local_steps=2, batch_size=32, learning_rate=0.1, min_peers=3,
               checkpoint_every_rounds=3)
ON = MetricsConfig(host="127.0.0.1", port=0)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``http://127.0.0.1:PORT/metrics``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def _job(stub, jid: str) -> jobs_pb2.JobStatus:
    return stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=5).job


@pytest.fixture
def cluster():
    """A coordinator and three peers, each with its metrics endpoint on a port of its own."""
    srv = CoordinatorServer(ServerConfig(host="127.0.0.1", port=0, timing=FAST, metrics=ON)).start()
    ps: list[Peer] = []
    try:
        for _ in range(3):
            p = Peer(PeerConfig(coordinator=srv.address, exchange_timeout_s=10.0, plan_wait_s=1.0, metrics=ON)).start()
            p.run_in_thread()
            ps.append(p)
        yield srv, ps
    finally:
        for p in ps:
            p.stop()
        srv.stop(0.2)


def test_a_job_moves_the_coordinators_and_the_peers_counters(cluster):
    srv, ps = cluster
    stub = job_stub(srv.address)
    jid = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(SPEC)), timeout=10).job_id
    wait_for(lambda: _job(stub, jid).state == types_pb2.JOB_STATE_SUCCEEDED, 90, "the job to succeed")
    committed = _job(stub, jid).round

    c = scrape(srv.metrics_port)
    assert committed == SPEC.rounds
    assert total(c, "dml_rounds_committed_total", job=jid) == committed
    assert total(c, "dml_round_duration_seconds_count") == committed
    assert total(c, "dml_round_exchange_seconds_count") == committed
    assert total(c, "dml_round_duration_seconds_sum") > 0
    assert total(c, "dml_peers_live") == 3
    assert total(c, "dml_jobs_running") == 0  # it finished
    assert total(c, "dml_evictions_total") == 0
    assert total(c, "dml_store_write_errors_total") == 0
    # Every member's report of every round was answered OK, and nobody else's.
    assert total(c, "dml_rpcs_total", method="/dml.v1.PeerControl/ReportRound", code="OK") == 3 * committed
    assert total(c, "dml_rpcs_total", method="/dml.v1.JobService/SubmitJob", code="OK") == 1

    for p in ps:
        m = scrape(p.metrics_port)
        assert total(m, "dml_peer_rounds_reported_total", aggregation="ring") == committed
        assert total(m, "dml_peer_exchange_bytes_sent_total", aggregation="ring") > 0
        assert total(m, "dml_peer_exchange_bytes_received_total", aggregation="ring") > 0
        assert total(m, "dml_peer_exchange_seconds_count", aggregation="ring") == committed
        assert total(m, "dml_peer_train_seconds_count", aggregation="ring") == committed
        assert total(m, "dml_peer_heartbeat_latency_seconds_count") > 0
        assert total(m, "dml_peer_failures_reported_total") == 0
        assert not any(n.startswith("dml_rounds") for n, _ in m)  # the coordinator's counts stay its own
    # Around a ring, what one member sends its successor receives: the totals match.
    sent = sum(total(scrape(p.metrics_port), "dml_peer_exchange_bytes_sent_total") for p in ps)
    received = sum(total(scrape(p.metrics_port), "dml_peer_exchange_bytes_received_total") for p in ps)
    assert sent == received


def test_evictions_are_counted_by_cause(cluster):
    srv, ps = cluster
    stub = job_stub(srv.address)
    spec = JobSpec(task="digits", rounds=10_000, local_steps=1, batch_size=16, learning_rate=0.1, min_peers=2)
    jid = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=10).job_id
    wait_for(lambda: _job(stub, jid).round >= 2, 60, "two committed rounds")
    victim = ps.pop()
    victim.stop()  # its heartbeats stop: the lease expires, or a neighbour reports it first
    wait_for(lambda: _job(stub, jid).evictions_total >= 1, 30, "the stopped peer's eviction")
    status = stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=5).job
    causes = [jobs_pb2.EvictionCause.Name(e.cause).removeprefix("EVICTION_CAUSE_") for e in status.evictions]
    c = scrape(srv.metrics_port)
    assert total(c, "dml_evictions_total", job=jid) == status.evictions_total
    for cause in set(causes):
        assert total(c, "dml_evictions_total", job=jid, cause=cause) == causes.count(cause)
    stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=jid), timeout=5)


def test_off_by_default_and_stopped_with_the_process():
    srv = CoordinatorServer(ServerConfig(host="127.0.0.1", port=0, timing=FAST)).start()
    try:
        assert srv.metrics_port is None
    finally:
        srv.stop(0.2)
    srv = CoordinatorServer(ServerConfig(host="127.0.0.1", port=0, timing=FAST, metrics=ON)).start()
    port = srv.metrics_port
    assert port and scrape(port)
    srv.stop(0.2)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
