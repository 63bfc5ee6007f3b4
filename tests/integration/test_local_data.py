"""``--placement local`` on the wire, with a real coordinator: a peer registers the names of its
local datasets (never paths: a path-like name is refused) and ``ListPeers`` shows them; the
coordinator refuses a local job's take that carries labels, or too many label counts, and a
shared job's take that carries counts; a spec with sharding flags is INVALID_ARGUMENT; the job is
offered only to a peer offering its dataset, which then trains it in process."""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import grpc
import pytest
from dml.v1 import control_pb2, control_pb2_grpc

from dml.client.api import ApiError, JobClient
from dml.common import auth, rpc
from dml.common.spec import JobSpec
from dml.peer.runner import Peer, PeerConfig
from dml.common.version import PROTOCOL_VERSION
from tests.integration.helpers import FAST, coordinator, join_token, operator_token, wait_for

TASK = str(pathlib.Path(__file__).resolve().parents[2] / "examples" / "digits_csv.py")


def _register(address: str, port: int, names: list[str]) -> control_pb2.RegisterPeerResponse:
    with rpc.channel(address) as ch:
        return control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(address))).RegisterPeer(
            control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address=f"127.0.0.1:{port}", public_key=bytes(32),
                                            capability=control_pb2.PeerCapability(local_datasets=names)), timeout=10)


def test_registration_names_and_takes_are_checked_on_the_wire() -> None:
    slow = dataclasses.replace(FAST, peer_timeout_ms=120_000)  # the hand-made peers send no heartbeats
    with coordinator(timing=slow) as srv, JobClient(srv.address, token=operator_token(srv.address)) as client:
        for bad in (["../etc"], ["a/b"], ["x"] * 2, [f"d{i}" for i in range(65)]):
            with pytest.raises(grpc.RpcError) as e:
                _register(srv.address, 9, bad)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        reg = _register(srv.address, 9, ["clinic"])
        assert [list(p.local_datasets) for p in client.peers()] == [["clinic"]]
        with pytest.raises(ApiError, match="--sharding"):
            client.submit(JobSpec(task=TASK, placement="local", local_data="clinic", sharding="classes:2"))
        with pytest.raises(ApiError, match="--dataset"):
            client.submit(JobSpec(task="digits", placement="local", local_data="clinic", dataset="x"))
        local = client.submit(JobSpec(task="digits", placement="local", local_data="clinic", rounds=2))
        digest = hashlib.sha256(b"x").hexdigest()
        with rpc.channel(srv.address) as ch:
            stub = control_pb2_grpc.PeerControlStub(auth.with_token(ch, reg.peer_token))
            plan = stub.GetPlan(control_pb2.GetPlanRequest(peer_id=reg.peer_id, wait_ms=5000), timeout=10)
            assert plan.has_plan and plan.plan.take and plan.plan.job_id == local

            def take(job: str, **data: object) -> grpc.StatusCode:
                req = control_pb2.TakeJobRequest(peer_id=reg.peer_id, job_id=job,
                                                 outcome=control_pb2.TAKE_OUTCOME_READY,
                                                 data=control_pb2.DataInfo(train_samples=4, num_params=10,
                                                                           data_digest=digest, **data))
                try:
                    stub.TakeJob(req, timeout=10)
                except grpc.RpcError as e:
                    assert "label" in e.details()
                    return e.code()
                return grpc.StatusCode.OK

            assert take(local, label_counts=[1] * 4097) == grpc.StatusCode.INVALID_ARGUMENT
            assert take(local, labels=bytes(16)) == grpc.StatusCode.INVALID_ARGUMENT, "labels never come"
            assert [x.peer_id for x in client.status(local).job.declined] == [reg.peer_id], \
                "a peer that sent its labels is refused the job"
            shared = client.submit(JobSpec(task="digits", rounds=2, num_shards=2))
            assert take(shared, label_counts=[2, 2]) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_local_job_runs_only_on_the_peer_offering_its_data(tmp_path: pathlib.Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dml_example_digits_csv", TASK)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    folder = mod.write_split(tmp_path, 2)[0]
    with coordinator() as srv, JobClient(srv.address, token=operator_token(srv.address)) as client:
        def start(**kw: object) -> Peer:
            p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0,
                                allow_job_code=True, **kw)).start()  # type: ignore[arg-type]
            p.run_in_thread()
            return p

        other, mine = start(), start(local_data=(("digits-csv", folder),))
        try:
            from dml.client.api import pack_task

            job_spec, code = pack_task(JobSpec(task=TASK, placement="local", local_data="digits-csv", rounds=3,
                                               local_steps=2, checkpoint_every_rounds=10))
            job = client.submit(job_spec, code)
            wait_for(lambda: client.status(job).job.state in (3, 4, 5), 120, "the local job to end")
            st = client.status(job).job
            assert st.state == 3, st  # SUCCEEDED
            assert {p for e in st.epochs for p in e.peers} == {mine.peer_id}
            assert not st.declined, "the peer without the data was never offered the job"
            rows = sum(1 for _ in open(folder / "train.csv")) - 1
            assert (st.data_present_samples, st.data_seen_samples, st.data_sources_present) == (rows, rows, 1)
            shards = client.shards(job)
            assert [(p.peer_id, p.samples) for p in shards.peers] == [(mine.peer_id, rows)]
            assert sum(shards.peers[0].label_counts) == rows
        finally:
            other.stop()
            mine.stop()


def test_a_restarted_coordinator_keeps_a_local_jobs_peers_data_and_plans_it(tmp_path: pathlib.Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dml_example_digits_csv", TASK)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    folder = mod.write_split(tmp_path / "data", 2)[1]
    from dml.client.api import pack_task

    job_spec, code = pack_task(JobSpec(task=TASK, placement="local", local_data="digits-csv", rounds=1000,
                                       local_steps=1, checkpoint_every_rounds=1000))
    state = tmp_path / "state"
    with coordinator(state) as srv, JobClient(srv.address, token=operator_token(srv.address)) as client:
        p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0,
                            allow_job_code=True, local_data=(("digits-csv", folder),))).start()
        p.run_in_thread()
        try:
            job = client.submit(job_spec, code)
            wait_for(lambda: client.status(job).job.round >= 2, 120, "two committed rounds")
        finally:
            p.stop()
        before = srv.coordinator.view(lambda st: (st.job(job).local_sources, st.job(job).shard_sizes,
                                                  st.job(job).local_label_counts))
    with coordinator(state) as again, JobClient(again.address, token=operator_token(again.address)) as client:
        c = again.coordinator
        st = client.status(job).job
        assert st.state == 2 and st.data_seen_samples == before[1][0]  # RUNNING, its data remembered
        assert c.view(lambda s: (s.job(job).local_sources, s.job(job).shard_sizes,
                                 s.job(job).local_label_counts)) == before
        assert c.view(lambda s: c.shard_indices(s.job(job))) == (), "a local job's plans send no indices"
        assert c.job_labels(job) is None, "the coordinator holds no labels of a local job"
