"""Takes with a real coordinator and real peers over gRPC: a task error (in the take or in a
round) fails the job with the task's own message, a decline and data that differs show in the
job's status, and the labels a take gave survive a coordinator restart."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest
from dml.v1 import control_pb2, control_pb2_grpc, jobs_pb2

from dml.client.api import JobClient, status_dict
from dml.client.cli import exclusion_lines, status_line
from dml.common import auth, rpc
from dml.common.spec import JobSpec
from dml.common.tasks import builtin_data
from dml.common.version import PROTOCOL_VERSION
from tests.integration import take_tasks
from tests.integration.helpers import FAST, coordinator, held_rounds, join_token, operator_token, peers, wait_for

TASKS = "tests.integration.take_tasks"


def spec(task: str, **kw: object) -> JobSpec:
    base: dict[str, object] = dict(task=f"{TASKS}:{task}", rounds=3, local_steps=2, min_peers=2, num_shards=4,
                                   checkpoint_every_rounds=100)
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def finished(client: JobClient, job: str, timeout_s: float = 120) -> jobs_pb2.JobStatus:
    wait_for(lambda: client.status(job).job.state in (3, 4, 5), timeout_s, f"job {job} to finish")
    return client.status(job).job


@pytest.mark.parametrize("task,words", [
    ("raising_data", "train(ctx) raised FileNotFoundError: no such file:"),
    ("raising_model", "model() raised RuntimeError: the model would not build: 3 layers configured, 2 given"),
    ("empty", "train(ctx) returned an empty dataset"),
    ("labels_out_of_range", "loss(output, target) raised IndexError: Target"),
    ("raising_item", "train(ctx)[5] raised ValueError: row 5 of the file is malformed"),
])
def test_a_task_that_fails_ends_its_job_failed_with_the_tasks_own_message(task: str, words: str) -> None:
    with coordinator() as srv, peers(srv.address, 2) as ps, \
            JobClient(srv.address, token=operator_token(srv.address)) as client:
        job = client.submit(spec(task))
        st = finished(client, job)
        d = status_dict(st)
        assert d["state"] == "FAILED", d
        assert d["reason"].startswith("task error on peer peer-") and words in d["reason"], d["reason"]
        if task == "raising_data":  # the innermost frames of the task's own traceback come with it
            assert "take_tasks.py" in d["reason"] and "_no_file" in d["reason"], d["reason"]
        assert words in status_line(st)
        # The peers are free again, and run the next job.
        ok = client.submit(spec("good", rounds=2))
        assert status_dict(finished(client, ok))["state"] == "SUCCEEDED"
        assert {p.peer_id for p in ps} >= set(client.status(ok).job.peers)


def test_a_decline_and_a_peer_whose_data_differs_show_in_the_status_and_the_job_goes_on() -> None:
    take_tasks.reset_shifting(2)  # the first two peers to load the task find the same data, the third not
    slow_leases = dataclasses.replace(FAST, peer_timeout_ms=120_000)  # the hand-made peer sends no heartbeats
    with coordinator(timing=slow_leases) as srv, JobClient(srv.address, token=operator_token(srv.address)) as client:
        # A peer that declines, by hand: it registers and answers the take plan it is given.
        with rpc.channel(srv.address) as ch:
            reg = control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(srv.address))).RegisterPeer(
                control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address="127.0.0.1:9", public_key=bytes(32)), timeout=10)
        with rpc.channel(srv.address) as ch:
            stub = control_pb2_grpc.PeerControlStub(auth.with_token(ch, reg.peer_token))
            job = client.submit(spec("shifting"))
            got = stub.GetPlan(control_pb2.GetPlanRequest(peer_id=reg.peer_id, wait_ms=5000), timeout=10)
            assert got.has_plan and got.plan.take and got.plan.job_id == job and got.plan.spec.task.endswith(":shifting")
            stub.TakeJob(control_pb2.TakeJobRequest(peer_id=reg.peer_id, job_id=job,
                                                    outcome=control_pb2.TAKE_OUTCOME_DECLINED,
                                                    detail="job code is not allowed on this peer"), timeout=10)
            st = client.status(job).job
            assert [(x.peer_id, x.reason) for x in st.declined] == [(reg.peer_id, "job code is not allowed on this peer")]
            assert f"  declined {reg.peer_id}: job code is not allowed on this peer" in exclusion_lines(st)
            assert st.reason == "waiting for peers to take the job: 0 ready, 1 declined, 2 needed"
            again = stub.GetPlan(control_pb2.GetPlanRequest(peer_id=reg.peer_id, wait_ms=300), timeout=10)
            assert not again.has_plan, "a decliner is not offered the job again"
        # The members wait before their first exchange until the third peer's take is judged:
        # three short rounds could otherwise end the job first (the take is then refused as
        # "job ... is SUCCEEDED", and never listed).
        with peers(srv.address, 2) as first, held_rounds(first, job) as hold:
            wait_for(lambda: client.status(job).job.state == 2, 60, "the job to start")  # RUNNING
            hold.all_held(len(first))
            # A third peer takes the running job (it has room) and finds 10 samples fewer: refused.
            with peers(srv.address, 1) as (odd,):
                wait_for(lambda: len(client.status(job).job.declined) == 2, 60, "the peer whose data differs")
                hold.release()
                st = finished(client, job)
            assert status_dict(st)["state"] == "SUCCEEDED", st
            refused = [x for x in st.declined if x.peer_id != reg.peer_id]
            assert [x.peer_id for x in refused] == [odd.peer_id]
            assert "its data differs from the job's: 110 training samples" in refused[0].reason
            assert "where the job has 120" in refused[0].reason
            assert {p for e in st.epochs for p in e.peers} == {p.peer_id for p in first}, "never admitted"


def test_the_labels_of_a_take_survive_a_coordinator_restart(tmp_path: pathlib.Path) -> None:
    """A restored job is planned without any peer: its shards are cut again from the stored labels."""
    state = tmp_path / "state"
    s = JobSpec(task="digits", rounds=1000, local_steps=1, min_peers=2, num_shards=4, sharding="dirichlet:0.3",
                checkpoint_every_rounds=1000)
    with coordinator(state) as srv, peers(srv.address, 2), \
            JobClient(srv.address, token=operator_token(srv.address)) as client:
        job = client.submit(s)
        wait_for(lambda: client.status(job).job.round >= 1, 120, "a committed round")
        assert client.status(job).job.spec.batch_size == 32, "the task's batch size, fixed by the first take"
        labels = srv.coordinator.job_labels(job)
        shards = [x.tolist() for x in srv.coordinator.view(lambda st: srv.coordinator.shard_indices(st.job(job)))]
    assert labels is not None and labels.tolist() == builtin_data("digits").y_train.tolist()
    with coordinator(state) as again, JobClient(again.address, token=operator_token(again.address)) as client:
        c = again.coordinator
        assert client.status(job).job.state == 2  # RUNNING, waiting for its peers
        assert c.job_labels(job).tolist() == labels.tolist()
        assert [x.tolist() for x in c.view(lambda st: c.shard_indices(st.job(job)))] == shards
        assert client.status(job).job.spec.batch_size == 32
