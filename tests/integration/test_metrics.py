"""The Prometheus endpoints of a real coordinator and real peers in one process, scraped over
HTTP on 127.0.0.1:0: the counters move with what the job did, each process counts its own."""
from __future__ import annotations

import urllib.request

import grpc

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dml.common.metrics import MetricsConfig
from dml.common.spec import JobSpec, spec_to_pb
from dml.coordinator.server import CoordinatorServer, ServerConfig
from dml.peer.runner import Peer, PeerConfig
from dml.v1 import jobs_pb2, types_pb2
from tests.integration.helpers import FAST, coordinator, job_stub, join_token, wait_for

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
    with coordinator(timing=FAST, metrics=ON) as srv:
        ps: list[Peer] = []
        try:
            for _ in range(3):
                p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), exchange_timeout_s=10.0,
                                    plan_wait_s=1.0, metrics=ON)).start()
                p.run_in_thread()
                ps.append(p)
            yield srv, ps
        finally:
            for p in ps:
                p.stop()


def settled(srv, ps: list[Peer], rounds: int | None) -> None:
    """Waits until what the job did is counted everywhere. The job reads SUCCEEDED as the last
    report commits it, under the coordinator's lock; the coordinator counts that call once its
    handler returned, and each peer counts its round after the answer came back and its bytes
    after its link closed, when the round loop is no longer under way."""
    report = "/dml.v1.PeerControl/ReportRound"
    if rounds is not None:  # ring rounds only: 3 reports each
        wait_for(lambda: total(scrape(srv.metrics_port), "dml_rpcs_total", method=report, code="OK") >= 3 * rounds, 10,
                 "the coordinator to count every report")
    wait_for(lambda: all(p._ring.under_way == ("", 0) for p in ps), 10, "every peer to end its last round")


def test_a_job_moves_the_coordinators_and_the_peers_counters(cluster):
    srv, ps = cluster
    stub = job_stub(srv.address)
    jid = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(SPEC)), timeout=10).job_id
    wait_for(lambda: _job(stub, jid).state == types_pb2.JOB_STATE_SUCCEEDED, 90, "the job to succeed")
    committed = _job(stub, jid).round
    settled(srv, ps, committed)

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
        # Heartbeats run on their own clock (every 200 ms here), not the job's: a digits job can
        # finish in under one interval after the last peer registered, so wait for one to be counted.
        wait_for(lambda: total(scrape(p.metrics_port), "dml_peer_heartbeat_latency_seconds_count") > 0, 10,
                 "a heartbeat round trip to be counted")
        assert total(m, "dml_peer_failures_reported_total") == 0
        assert not any(n.startswith("dml_rounds") for n, _ in m)  # the coordinator's counts stay its own
    # Around a ring, what one member sends its successor receives: the totals match.
    sent = sum(total(scrape(p.metrics_port), "dml_peer_exchange_bytes_sent_total") for p in ps)
    received = sum(total(scrape(p.metrics_port), "dml_peer_exchange_bytes_received_total") for p in ps)
    assert sent == received


def test_a_gossip_job_counts_its_exchanges_and_steps(cluster):
    srv, ps = cluster
    stub = job_stub(srv.address)
    spec = JobSpec(task="digits", rounds=4, local_steps=2, batch_size=32, learning_rate=0.1, min_peers=3,
                   aggregation="gossip", gossip_timeout_ms=2000)
    jid = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=10).job_id
    wait_for(lambda: _job(stub, jid).state == types_pb2.JOB_STATE_SUCCEEDED, 90, "the gossip job to succeed")
    settled(srv, ps, None)  # the peers' counts (the coordinator's of gossip steps are not checked)
    assert total(scrape(srv.metrics_port), "dml_rounds_committed_total", job=jid) == spec.rounds
    scraped = [scrape(p.metrics_port) for p in ps]
    # (rounds - 1) x peers steps in all, then one closing ring round each.
    assert sum(total(m, "dml_peer_rounds_reported_total", aggregation="gossip") for m in scraped) == 3 * 3
    assert all(total(m, "dml_peer_rounds_reported_total", aggregation="ring") == 1 for m in scraped)
    sent = sum(total(m, "dml_peer_exchange_bytes_sent_total", aggregation="gossip") for m in scraped)
    received = sum(total(m, "dml_peer_exchange_bytes_received_total", aggregation="gossip") for m in scraped)
    assert sent > 0 and received > 0


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


def test_rpcs_are_counted_by_method_and_code():
    with coordinator(timing=FAST, metrics=ON) as srv:
        stub = job_stub(srv.address)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetJob(jobs_pb2.GetJobRequest(job_id="no-such-job"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:  # a response stream that fails before its first message
            list(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id="no-such-job"), timeout=5))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        bad = JobSpec(task="digits", rounds=0)
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(bad)), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=5)
        c = scrape(srv.metrics_port)
        assert total(c, "dml_rpcs_total", method="/dml.v1.JobService/GetJob", code="NOT_FOUND") == 1
        assert total(c, "dml_rpcs_total", method="/dml.v1.JobService/WatchJob", code="NOT_FOUND") == 1
        assert total(c, "dml_rpcs_total", method="/dml.v1.JobService/SubmitJob", code="INVALID_ARGUMENT") == 1
        assert total(c, "dml_rpcs_total", method="/dml.v1.JobService/ListJobs", code="OK") == 1
        assert total(c, "dml_rpcs_total", code="OK") == 1


def _self_signed(tmp_path, name: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (also usable as its own CA): (cert, key) files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_with_tls_the_endpoint_is_https_and_with_a_ca_it_wants_a_client_certificate(tmp_path):
    import ssl

    from prometheus_client import CollectorRegistry, Counter

    from dml.common.metrics import MetricsServer

    cert, key = _self_signed(tmp_path, "server")
    client_cert, client_key = _self_signed(tmp_path, "scraper")
    reg = CollectorRegistry()
    Counter("dml_probe", "a probe", registry=reg).inc()
    ctx = ssl.create_default_context(cafile=cert)

    srv = MetricsServer(reg, MetricsConfig("127.0.0.1", 0, certfile=cert, keyfile=key), "test")
    try:
        assert srv.url.startswith("https://")
        with urllib.request.urlopen(srv.url, timeout=10, context=ctx) as r:
            assert b"dml_probe_total 1.0" in r.read()
        with pytest.raises(OSError):  # plain HTTP gets no metrics
            urllib.request.urlopen(srv.url.replace("https", "http"), timeout=5).read()
    finally:
        srv.stop()

    srv = MetricsServer(reg, MetricsConfig("127.0.0.1", 0, certfile=cert, keyfile=key, cafile=client_cert), "test")
    try:
        with pytest.raises(OSError):  # no client certificate
            urllib.request.urlopen(srv.url, timeout=5, context=ctx).read()
        mtls = ssl.create_default_context(cafile=cert)
        mtls.load_cert_chain(client_cert, client_key)
        with urllib.request.urlopen(srv.url, timeout=10, context=mtls) as r:
            assert b"dml_probe_total 1.0" in r.read()
    finally:
        srv.stop()


def test_a_taken_metrics_port_is_a_clear_error_and_holds_nothing():
    import socket

    from dml.common.metrics import MetricsBindError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(MetricsBindError, match=f"127.0.0.1:{taken}"):
            CoordinatorServer(ServerConfig(host="127.0.0.1", port=0, timing=FAST,
                                           metrics=MetricsConfig("127.0.0.1", taken)))


@pytest.mark.parametrize("tls", [False, True])
def test_a_client_that_sends_nothing_blocks_no_scrape(tmp_path, tls):
    import socket
    import ssl

    from prometheus_client import CollectorRegistry

    from dml.common.metrics import MetricsServer

    cert, key = _self_signed(tmp_path, "server")
    config = MetricsConfig("127.0.0.1", 0, certfile=cert, keyfile=key) if tls else ON
    srv = MetricsServer(CollectorRegistry(), config, "test")
    silent = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(3)]
    try:
        ctx = ssl.create_default_context(cafile=cert) if tls else None
        with urllib.request.urlopen(srv.url, timeout=5, context=ctx) as r:
            assert r.status == 200
    finally:
        for s in silent:
            s.close()
        srv.stop()
