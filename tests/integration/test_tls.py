"""TLS on every port, in one process: the coordinator's and peers' gRPC servers and the TCP data
plane accept only clients holding a certificate of the cluster's CA, peers verify each other by
the cluster name (not the address they dial), a ring round and a whole job run over TLS, and
plain text is refused off loopback. Servers on 127.0.0.1:0."""
from __future__ import annotations

import socket
import ssl
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from dml.v1 import exchange_pb2, exchange_pb2_grpc, types_pb2

from dml.aggregation.allreduce import ring_allreduce
from dml.aggregation.codecs import get_codec
from dml.client.api import ApiError, JobClient
from dml.common import certs, rpc, tls
from dml.common.spec import JobSpec
from dml.coordinator.server import CoordinatorServer, ServerConfig
from dml.peer import dataplane
from dml.peer.link import PeerLink
from tests.integration.helpers import Member, coordinator, operator_token, peers, ring_key, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """Our cluster's CA and certificate, another cluster's, and mixes of the two."""
    root = tmp_path_factory.mktemp("pki")
    ours = certs.make_certs(root / "ours", ["localhost"])[0]
    theirs = certs.make_certs(root / "theirs", ["localhost"])[0]
    return SimpleNamespace(
        ours=tls.load(ours.cert, ours.key, ours.ca),
        theirs=tls.load(theirs.cert, theirs.key, theirs.ca),
        # trusts our servers, but presents a certificate another CA signed
        foreign_cert=tls.load(theirs.cert, theirs.key, ours.ca),
        # trusts our servers, presents no certificate at all
        no_cert=tls.load(None, None, ours.ca),
    )


def _client(address: str, cfg: tls.TlsConfig | None, timeout_s: float = 5.0) -> JobClient:
    """A job client with the operator token of the coordinator at ``address`` (so what refuses
    it, if anything, is TLS) and the TLS config ``cfg``."""
    return JobClient(address, timeout_s, token=operator_token(address), tls=cfg)


def _refused(address: str, cfg: tls.TlsConfig | None) -> str:
    """The error a job client with ``cfg`` gets from the coordinator at ``address``."""
    with _client(address, cfg) as c, pytest.raises(ApiError) as e:
        c.list()
    return str(e.value)


def test_tls_coordinator_serves_cluster_clients_and_refuses_plain_and_foreign_ones(pki):
    with coordinator(tls=pki.ours) as srv:
        with _client(srv.address, pki.ours, 5.0) as c:
            assert c.health() == "SERVING" and c.list() == []
        for cfg in (None, pki.theirs, pki.foreign_cert, pki.no_cert):
            assert "cannot reach coordinator" in _refused(srv.address, cfg)
        # The messages say what to check.
        assert "if it serves TLS, pass --tls-ca, --tls-cert and --tls-key" in _refused(srv.address, None)
        assert "TLS handshake failed (CERTIFICATE_VERIFY_FAILED" in _refused(srv.address, pki.theirs)
        assert "it refused our certificate" in _refused(srv.address, pki.no_cert)
        # The refusal is the handshake's: nothing reached the job service.
        with _client(srv.address, pki.ours, 5.0) as c:
            assert c.list() == []


def test_a_plain_coordinator_is_not_reached_by_a_tls_client(pki):
    with coordinator() as srv:
        assert "cannot reach coordinator" in _refused(srv.address, pki.ours)


def test_dialers_verify_the_cluster_name_not_the_address_they_dial(pki):
    """The certificate names "localhost" and the cluster name, never 127.0.0.1: dialing by that
    IP works because the name checked is the cluster's; checking the dialed host instead fails."""
    with coordinator(tls=pki.ours) as srv:
        files = pki.ours
        by_host = tls.load(files.cert, files.key, files.ca, server_name="")
        assert "does not carry the name checked (--tls-server-name)" in _refused(srv.address, by_host)
        named = tls.load(files.cert, files.key, files.ca, server_name="localhost")
        with _client(srv.address, named, 5.0) as c:
            assert c.list() == []
        other = tls.load(files.cert, files.key, files.ca, server_name="not-the-cluster.internal")
        assert "cannot reach coordinator" in _refused(srv.address, other)


@pytest.fixture
def members(pki):
    made: list[Member] = []

    def make(n: int) -> list[Member]:
        made.extend(Member(tls=pki.ours) for _ in range(n))
        return made[-n:]

    yield make
    for m in made:
        m.close()


def _ring(ms: list[Member], plane: str, bufs: list[np.ndarray]) -> list[PeerLink]:
    n = len(ms)
    key = ring_key()
    links = [PeerLink(ms[r].servicer, key, f"p{r}", f"p{(r - 1) % n}", f"p{(r + 1) % n}",
                      ms[(r + 1) % n].address, 10.0, ms[r].abort, idle_timeout_s=5.0, data_plane=plane,
                      tls=ms[r].tls) for r in range(n)]
    errors: list[BaseException | None] = [None] * n

    def one(r: int) -> None:
        try:
            ring_allreduce(bufs[r], r, n, links[r], 10.0, 1000, get_codec("fp32"), None)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors[r] = e
        finally:
            links[r].shutdown()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a ring member hung"
    assert errors == [None] * n
    return links


@pytest.mark.parametrize("plane", ["tcp", "shm", "grpc"])
def test_ring_round_is_exact_over_tls(members, plane):
    ms = members(3)
    rng = np.random.default_rng(0)
    bufs = [rng.integers(-100, 100, 50_003).astype(np.float32) for _ in ms]
    want = np.sum(np.stack(bufs).astype(np.float64), axis=0)
    links = _ring(ms, plane, bufs)
    for b in bufs:
        assert np.array_equal(b.astype(np.float64), want)
    # Over tcp and shm the stream (the frames, or the headers beside shared memory) is TLS:
    # these data planes take nothing else (test_data_plane_refuses_plain_and_foreign_streams...).
    assert [link.sender_kind for link in links] == [plane] * 3


def _offer(m: Member, cfg: tls.TlsConfig, key: tuple[str, int, int]) -> exchange_pb2.OpenDataPlaneResponse:
    with rpc.channel(m.address, tls=cfg) as ch:
        return exchange_pb2_grpc.PeerExchangeStub(ch).OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(
            job_id=key[0], round=key[1], epoch=key[2], sender_id="p0"), timeout=5)


def _drained(sock: socket.socket) -> None:
    """Reads until the data plane closes the connection (it refused it)."""
    sock.settimeout(5.0)
    try:
        while sock.recv(4096):
            pass
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock.close()


def test_data_plane_refuses_plain_and_foreign_streams_even_with_a_valid_token(members, pki):
    (m,) = members(1)
    key = ("j", 2, 1)
    offer = _offer(m, pki.ours, key)
    box = m.servicer.inbox(key)
    # Plain text with the right token: the listener wants a TLS handshake and drops it.
    _drained(dataplane.connect("127.0.0.1", offer.port, offer.token, 5.0))
    # Our CA trusted, but a certificate another CA signed: the handshake fails at the listener.
    try:
        _drained(dataplane.connect("127.0.0.1", offer.port, offer.token, 5.0, tls=pki.foreign_cert))
    except ssl.SSLError:
        pass
    # Another cluster altogether: our listener's certificate fails its check.
    with pytest.raises(ssl.SSLError):
        dataplane.connect("127.0.0.1", offer.port, offer.token, 5.0, tls=pki.theirs)
    assert not box.arrived.is_set() and box.conn is None, "a stream outside the cluster reached the inbox"
    # The token was good all along: the cluster's own certificate gets in with it.
    sock = dataplane.connect("127.0.0.1", offer.port, offer.token, 5.0, tls=pki.ours)
    try:
        wait_for(box.arrived.is_set, 10, "the TLS stream to attach")
        assert isinstance(box.conn, ssl.SSLSocket)
    finally:
        sock.close()


def test_peer_grpc_port_refuses_a_plain_caller(members):
    (m,) = members(1)
    with rpc.channel(m.address) as ch, pytest.raises(grpc.RpcError) as e:
        exchange_pb2_grpc.PeerExchangeStub(ch).OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(
            job_id="j", round=1, epoch=1, sender_id="p0"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_job_runs_over_tls_end_to_end_with_the_tcp_data_plane(pki):
    """Coordinator, peers, their exchange servers and TCP data planes all over mutual TLS: a
    data_plane=tcp job (which fails its round rather than fall back) succeeds in one epoch."""
    with coordinator(tls=pki.ours) as srv, peers(srv.address, 2, tls=pki.ours):
        with _client(srv.address, pki.ours, 10.0) as c:
            job = c.submit(JobSpec(rounds=2, local_steps=2, min_peers=2, data_plane="tcp"))
            deadline = time.monotonic() + 120
            st = c.status(job).job
            while st.state not in (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED) and time.monotonic() < deadline:
                time.sleep(0.1)
                st = c.status(job).job
            assert st.state == types_pb2.JOB_STATE_SUCCEEDED, st
            assert st.epoch == 1, f"the ring was re-formed: {st.reason}"


def test_plain_text_off_loopback_is_refused_with_exit_2(capsys):
    from dml.coordinator import cli as coord_cli
    from dml.peer import cli as peer_cli

    with pytest.raises(SystemExit) as e:
        coord_cli.main(["--host", "0.0.0.0", "--port", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dml-coordinator: refusing to serve plain text on 0.0.0.0"), err
    assert "--tls-cert" in err[0] and "--tls-key" in err[0] and "--tls-ca" in err[0]
    with pytest.raises(SystemExit) as e:
        peer_cli.main(["--coordinator", "127.0.0.1:1", "--host", "0.0.0.0", "--port", "0", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dml-peer: refusing to serve plain text on 0.0.0.0") and "--tls-cert" in err[0], err


def test_with_tls_a_server_may_listen_on_every_interface(pki):
    srv = CoordinatorServer(ServerConfig(host="0.0.0.0", port=0, tls=pki.ours)).start()
    try:
        with JobClient(f"127.0.0.1:{srv.port}", 5.0, token=srv.secrets.operator_token, tls=pki.ours) as c:
            assert c.health() == "SERVING"
    finally:
        srv.stop(0.2)
