"""``dml peers`` and resource pools against a real coordinator with real in-process peers of two
pools: a job on pool a (capped at two of its three peers) and one on pool b run at the same time;
``dml peers --json`` shows each peer's pool, state, job and utilisation."""
from __future__ import annotations

import json

import grpc
import pytest

from dml.client import cli
from dml.common import auth, rpc
from dml.common.spec import JobSpec, spec_to_pb
from dml.v1 import control_pb2, control_pb2_grpc, jobs_pb2, jobs_pb2_grpc, types_pb2
from dml.common.version import PROTOCOL_VERSION
from tests.integration.helpers import coordinator, job_stub, join_token, operator_token, peers, wait_for

# Twenty steps a round: milliseconds of training that the reports' whole milliseconds count.
SHORT = JobSpec(rounds=2, min_peers=2, max_peers=2, num_shards=4, local_steps=20, pool="a")
LONG = JobSpec(rounds=100_000, min_peers=1, num_shards=2, local_steps=1, pool="b")  # runs until cancelled


def _submit(stub, spec: JobSpec) -> str:
    return stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=10).job_id


def _job(stub, jid: str) -> jobs_pb2.JobStatus:
    return stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=5).job


def test_dml_peers_shows_pools_jobs_states_and_utilisation(tmp_path, capsys) -> None:
    token = tmp_path / "operator.token"
    with coordinator() as srv, peers(srv.address, 3, pool="a") as pa, peers(srv.address, 1, pool="b") as pb:
        token.write_text(operator_token(srv.address) + "\n")
        token.chmod(0o600)
        stub = job_stub(srv.address)
        wait_for(lambda: all(p.peer_id for p in pa + pb), 30, "four peers registered")
        short, long_ = _submit(stub, SHORT), _submit(stub, LONG)
        wait_for(lambda: _job(stub, short).state == types_pb2.JOB_STATE_SUCCEEDED, 60, "the pool-a job to succeed")
        wait_for(lambda: _job(stub, long_).round >= 1, 60, "the pool-b job to commit a round")
        ran_short = set(_job(stub, short).epochs[-1].peers)
        short_ended, long_started = _job(stub, short).updated_unix_ms, _job(stub, long_).epochs[0].started_unix_ms
        long_state = _job(stub, long_).state
        code = cli.run(["peers", "--json", "--coordinator", srv.address, "--token-file", str(token)])
        out, err = capsys.readouterr()
        table_code = cli.run(["peers", "--coordinator", srv.address, "--token-file", str(token)])
        table, _ = capsys.readouterr()
        with rpc.channel(srv.address) as ch:  # a peer's join token lists nothing
            with pytest.raises(grpc.RpcError) as denied:
                jobs_pb2_grpc.JobServiceStub(auth.with_token(ch, join_token(srv.address))).ListPeers(
                    jobs_pb2.ListPeersRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as bad_pool:  # a hostile pool name is refused at registration
                control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(srv.address))).RegisterPeer(
                    control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address="127.0.0.1:9", capability=control_pb2.PeerCapability(
                        device="cpu", pool="../etc")), timeout=10)
        with pytest.raises(grpc.RpcError) as bad_spec:
            _submit(stub, JobSpec(pool="a b"))
        stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=long_), timeout=10)
        a_ids, (b_id,) = [p.peer_id for p in pa], [p.peer_id for p in pb]

    assert (code, err) == (0, ""), err
    rows = [json.loads(line) for line in out.splitlines()]
    by_id = {r["peer_id"]: r for r in rows}
    assert set(by_id) == set(a_ids) | {b_id} and len(rows) == 4
    assert {r["pool"] for r in rows if r["peer_id"] in a_ids} == {"a"}
    assert by_id[b_id]["pool"] == "b"
    assert len(ran_short) == 2 and ran_short <= set(a_ids), "pool a's job took two of its three peers"
    assert long_state == types_pb2.JOB_STATE_RUNNING and long_started <= short_ended, "the two jobs ran at once"
    for pid in a_ids:  # the job ended: its peers are back in their pool, idle
        assert (by_id[pid]["state"], by_id[pid]["job_id"]) == ("idle", "")
    assert (by_id[b_id]["state"], by_id[b_id]["job_id"]) == ("training", long_)
    (spare,) = set(a_ids) - ran_short  # it took the job but the cap kept it out: it trained nothing
    assert by_id[spare]["utilisation"] == {"training": 0.0, "exchanging": 0.0, "idle": 1.0}
    for pid in ran_short:  # they reported rounds within the last minute
        u = by_id[pid]["utilisation"]
        assert u["training"] > 0 and u["training"] + u["exchanging"] + u["idle"] == pytest.approx(1.0)
    for pid in ran_short | {b_id}:
        assert by_id[pid]["samples_per_s"] > 0 and by_id[pid]["device"] == "cpu" and by_id[pid]["memory_bytes"] > 0
    assert table_code == 0 and "4 peers" in table and long_ in table and " b " in table
    assert denied.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    assert bad_pool.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pool name" in bad_pool.value.details()
    assert bad_spec.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pool name" in bad_spec.value.details()
