"""Multi-worker peers (``dml-peer --workers N``) and ``--precision`` on a real coordinator and real
peers in one process (a multi-worker peer's workers are child processes it starts and stops).

- A 2-worker host and a single-worker peer train a job; the model equals, to float tolerance,
  what three single-worker peers make of the same samples.
- Worker 1 of the host dies in round 2 (the ``kill-worker`` fault): the host reports a local
  failure, the round is re-issued, the host re-registers, restarts its workers and rejoins, and
  the job succeeds with every sample once per pass.
- ``--precision bf16`` / ``fp16`` train digits on a mixed ring; invalid precisions are refused.
"""
from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Iterator
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from dml.v1 import control_pb2, control_pb2_grpc, jobs_pb2, types_pb2

from dml.common import auth, rpc
from dml.common.sampling import shard_order
from dml.common.spec import JobSpec, spec_to_pb
from dml.common.tasks import get_task
from dml.common.version import PROTOCOL_VERSION
from dml.coordinator import ledger
from dml.coordinator.records import SELF_REPORT
from dml.peer.faults import KILL_WORKER, Fault
from dml.peer.runner import Peer, PeerConfig
from dml.peer.trainer import Trainer
from dml.peer.worksplit import split_steps
from tests.integration.helpers import (assert_state_dicts_identical, coordinator, fetch_state, job_stub, join_token,
                                       wait_for)

_COUNT = itertools.count()


@contextlib.contextmanager
def _cluster(tmp_path, workers: list[int], fault: Fault | None = None,
             **config: object) -> Iterator[tuple[object, list[Peer], object]]:
    """A coordinator and one peer per entry of ``workers`` (its worker count; the first gets
    ``fault``), registered in that order; all stopped (workers too) on exit."""
    with coordinator(tmp_path / f"state-{next(_COUNT)}") as srv:
        started: list[Peer] = []
        try:
            for i, n in enumerate(workers):
                p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0,
                                    exchange_timeout_s=20.0, workers=n, fault=fault if i == 0 else None,
                                    **config)).start()  # type: ignore[arg-type]
                p.run_in_thread()
                started.append(p)
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == len(workers), 30, "idle peers")
            yield srv, started, job_stub(srv.address)
        finally:
            for p in started:
                p.stop()


def _run(stub, spec: JobSpec, timeout_s: float = 120) -> tuple[str, jobs_pb2.GetJobResponse]:
    jid = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=10).job_id

    def done() -> bool:
        return stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=5).job.state in (
            types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED)

    wait_for(done, timeout_s, f"job {jid} to end")
    resp = stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid, include_history=True), timeout=5)
    assert resp.job.state == types_pb2.JOB_STATE_SUCCEEDED, resp.job.reason
    assert [r.round for r in resp.history] == list(range(1, spec.rounds + 1))
    return jid, resp


def _final_params(stub, jid: str, trainer: Trainer) -> np.ndarray:
    """The job's last checkpoint (uploaded after the last round) as flat parameters."""
    chunks = list(stub.DownloadModel(jobs_pb2.DownloadModelRequest(job_id=jid), timeout=10))
    sd = torch.load(io.BytesIO(b"".join(c.data for c in chunks)), weights_only=True)
    return trainer.params_from_state_dict(sd)


def _indices(shards: tuple[np.ndarray, ...], seed: int, ranges: list[list[int]]) -> np.ndarray:
    """A member's samples of a round, in the order it trained them (peer.step.sample_indices)."""
    parts = [shard_order(shards[s], seed, e, s)[a:b] for s, e, a, b in ranges]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


SPEC = JobSpec(task="digits", rounds=3, local_steps=1, batch_size=32, learning_rate=0.1, min_peers=2, num_shards=4,
               checkpoint_every_rounds=1, seed=5)


def test_a_two_worker_host_equals_two_single_worker_members(tmp_path) -> None:
    """With plain SGD and one local step per round, a 2-worker host (one DDP step on 2 x 32
    samples, weighted 64) and a member (32) average to what three single-worker members
    (32 each) make of the same samples: w - lr x mean of the three batches' gradients."""
    with _cluster(tmp_path, [2, 1]) as (srv, ps, stub):
        host, single = ps
        listed = {p.peer_id: p for p in stub.ListPeers(jobs_pb2.ListPeersRequest(), timeout=5).peers}
        assert (listed[host.peer_id].workers, listed[single.peer_id].workers) == (2, 1), "dml peers shows them"
        assert list(listed[host.peer_id].worker_devices) == []
        jid, _ = _run(stub, SPEC)
        job = srv.coordinator.view(lambda st: st.jobs[jid])
        shards = srv.coordinator.view(lambda st: srv.coordinator.shard_indices(job))
        rounds = [r.consumed for r in job.history]
        sizes = job.shard_sizes
        assert all(sum(b - a for _, _, a, b in r[host.peer_id]) == 64 for r in rounds), "2 members' samples"
        assert all(sum(b - a for _, _, a, b in r[single.peer_id]) == 32 for r in rounds)
        final = _final_params(stub, jid, host.store.trainer_for(jid) or single.store.trainer_for(jid))
    assert ledger.violations([[tuple(x) for rs in r.values() for x in rs] for r in rounds], sizes) == []
    # Three single-worker members trained on the host's two worker batches and the member's batch.
    ref = Trainer(get_task("digits"), SPEC.seed, SPEC.learning_rate, "cpu")
    w = init = ref.params()
    for consumed in rounds:
        batches = [part for step in split_steps(_indices(shards, SPEC.seed, consumed[host.peer_id]), 32, 2)
                   for part in step] + [_indices(shards, SPEC.seed, consumed[single.peer_id])]
        assert [b.size for b in batches] == [32, 32, 32]
        results = []
        for b in batches:
            ref.set_params(w)
            ref.train_on(b, 32)
            results.append(ref.params().astype(np.float64))
        w = np.mean(results, axis=0).astype(np.float32)
    diff = float(np.abs(final - w).max())
    print(f"max abs difference to three single-worker members: {diff:.3g}")
    assert diff < 1e-5
    assert float(np.abs(final - init).max()) > 1e-3, "it trained"


def test_a_dead_worker_fails_its_hosts_round_and_the_host_restarts_its_workers(tmp_path) -> None:
    """Worker 1 of the 2-worker host exits at the first step of round 2 (the kill-worker
    fault). The host reports its own failure and is evicted, the round is re-issued, and the
    job (min_peers 2) waits until the host has re-registered, taken the job again with fresh
    workers and rejoined: every round commits with both members, every sample once per pass."""
    # A package.module:NAME task from the peers' own environment, which the workers import too.
    spec = replace(SPEC, task="tests.integration.take_tasks:good", rounds=4, checkpoint_every_rounds=5)
    with _cluster(tmp_path, [2, 1], fault=Fault(KILL_WORKER, 2)) as (srv, ps, stub):
        host, single = ps
        first = host.peer_id
        jid, resp = _run(stub, spec)
        job = srv.coordinator.view(lambda st: st.jobs[jid])
        evictions = list(job.evictions)
        history = list(job.history)
        sizes = job.shard_sizes
        again = host.peer_id
        pools = host.workers.pool_for(jid, host.store.trainer_for(jid)) if host.store.trainer_for(jid) else None
    assert [(e.peer_id, e.cause, e.round) for e in evictions] == [(first, SELF_REPORT, 2)], evictions
    assert "worker 1 died" in evictions[0].detail, evictions[0].detail
    assert again != first, "the host registered again after giving up its place"
    assert [len(r.members) for r in history] == [2, 2, 2, 2]
    assert all(again in r.members and single.peer_id in r.members for r in history[1:])
    assert all(r.samples == 96 for r in history), "the host trained 2 members' samples in every round"
    assert ledger.violations([[tuple(x) for rs in r.consumed.values() for x in rs] for r in history], sizes) == []
    assert pools is not None, "the host runs fresh workers"


@pytest.mark.parametrize("precision,workers", [("bf16", [1, 1]), ("fp16", [2, 1])])
def test_mixed_precision_trains_digits_with_members_bit_identical(tmp_path, precision: str, workers: list[int]) -> None:
    """--precision autocasts the forward passes (fp16 through a GradScaler, whose scale is
    training state, carried to and from a host's workers); parameters and the exchange stay
    fp32, so the members end bit-identical: bf16 on two single-process peers, fp16 on a
    2-worker host and a single-process peer."""
    spec = replace(SPEC, rounds=8, local_steps=20, learning_rate=0.3, precision=precision, checkpoint_every_rounds=8)
    with _cluster(tmp_path, workers) as (srv, ps, stub):
        jid, resp = _run(stub, spec)
        trainers = [p.store.trainer_for(jid) for p in ps]
        assert all(t is not None and t.precision == precision for t in trainers)
        assert all((t.scaler is not None) == (precision == "fp16") for t in trainers)
        last = resp.history[-1]
        got = [fetch_state(p.address, jid, last.round, p.peer_id, srv.coordinator.signing_key) for p in ps]
    assert {g[0] for g in got} == {last.digest}
    assert_state_dicts_identical([g[1] for g in got])
    print(f"{precision}: test accuracy {last.test_accuracy:.3f} after {spec.rounds} rounds")
    assert last.test_accuracy > 0.85


def test_an_unknown_precision_and_hostile_worker_records_are_refused(tmp_path) -> None:
    """A precision the peers do not know is INVALID_ARGUMENT at submit; so is a registration
    claiming more workers than any host runs (each would multiply its allocation) or worker
    devices that are not cuda:N, or fewer devices than workers."""
    hostile = [control_pb2.PeerCapability(device="cpu", workers=10_000),
               control_pb2.PeerCapability(device="cpu", workers=2, worker_devices=["cuda:0", "/etc/passwd"]),
               control_pb2.PeerCapability(device="cpu", workers=3, worker_devices=["cuda:0"])]
    with coordinator(tmp_path / "state") as srv:
        stub = job_stub(srv.address)
        with pytest.raises(grpc.RpcError) as e:
            stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(replace(SPEC, precision="fp8"))), timeout=10)
        codes = []
        with rpc.channel(srv.address) as ch:
            control = control_pb2_grpc.PeerControlStub(auth.with_token(ch, join_token(srv.address)))
            for cap in hostile:
                with pytest.raises(grpc.RpcError) as bad:
                    control.RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address="127.0.0.1:9", capability=cap),
                                         timeout=10)
                codes.append((bad.value.code(), "worker" in bad.value.details()))
        assert srv.coordinator.view(lambda st: len(st.peers)) == 0
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "precision" in e.value.details()
    assert codes == [(grpc.StatusCode.INVALID_ARGUMENT, True)] * 3


TASK_CODE = """import numpy as np, torch, dml
from dml.common.task import ArrayDataset

def data(n):
    rng = np.random.default_rng(3)
    return ArrayDataset(rng.standard_normal((n, 5)).astype(np.float32), (np.arange(n) % 3).astype(np.int64))

task = dml.Task(model=lambda: torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
                train=lambda ctx: data(96), test=lambda ctx: data(30), batch_size=8,
                optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
"""


def test_workers_run_the_task_code_the_peer_verified_and_decline_gossip(tmp_path) -> None:
    """A 2-worker host (with --allow-job-code) runs a task file sent with the job (the workers
    import the copy the peer fetched and checked), with Adam (its state travels to and from the
    workers); it declines a gossip job, saying why. (The worker-death test runs a
    ``package.module:NAME`` task.)"""
    from dml.client.api import JobClient, pack_task
    from tests.integration.helpers import operator_token

    src = tmp_path / "submitter"
    src.mkdir()
    (src / "worker_task.py").write_text(TASK_CODE)
    with _cluster(tmp_path, [2, 1], allow_job_code=True, code_cache_dir=tmp_path / "code") as (srv, ps, stub):
        spec, code = pack_task(replace(SPEC, task=str(src / "worker_task.py"), rounds=3, local_steps=2, batch_size=0,
                                       num_shards=4))
        with JobClient(srv.address, token=operator_token(srv.address)) as c:
            code_jid = c.submit(spec, code)
        wait_for(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=code_jid), timeout=5).job.state
                 in (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED), 120, "the task-code job")
        code_resp = stub.GetJob(jobs_pb2.GetJobRequest(job_id=code_jid, include_history=True), timeout=5)
        host_state = ps[0].store.trainer_for(code_jid).optimizer.state_dict()["state"]
        gossip = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(replace(
            SPEC, aggregation="gossip", min_peers=1, rounds=2))), timeout=10).job_id
        wait_for(lambda: any(d.peer_id == ps[0].peer_id for d in
                             stub.GetJob(jobs_pb2.GetJobRequest(job_id=gossip), timeout=5).job.declined), 60,
                 "the host to decline the gossip job")
        declined = [d.reason for d in stub.GetJob(jobs_pb2.GetJobRequest(job_id=gossip), timeout=5).job.declined
                    if d.peer_id == ps[0].peer_id]
    assert code_resp.job.state == types_pb2.JOB_STATE_SUCCEEDED, code_resp.job.reason
    assert all(r.members == 2 for r in code_resp.history) and len(code_resp.history) == 3
    assert host_state and all(int(v["step"]) == 6 for v in host_state.values()), "Adam's steps came back from the workers"
    assert declined and "gossip" in declined[0]


def test_a_worker_that_stops_answering_is_stopped_at_the_deadline() -> None:
    """Worker 1 of a host stops answering in its round (the hang-worker fault): the round fails
    at the deadline the host gives it and every worker is stopped (restarts: the test above)."""
    import threading

    from dml.peer.faults import HANG_WORKER
    from dml.peer.workers import WorkerHost, WorkersFailed

    pb = spec_to_pb(SPEC)
    trainer = Trainer(get_task("digits"), SPEC.seed, SPEC.learning_rate, "cpu")
    host = WorkerHost(2, fault=Fault(HANG_WORKER, 1))
    stop = threading.Event()
    try:
        host.start("p", "j", pb, trainer, "", stop)
        pool = host.pool_for("j", trainer)
        assert pool is not None
        procs = list(pool._procs)  # noqa: SLF001
        with pytest.raises(WorkersFailed, match=r"workers? (0, )?1 did not finish (its|their) round 1 within 3 s"):
            host.train("j", trainer, np.arange(128), 32, 1, 3.0, stop)
        assert all(not p.is_alive() for p in procs), "every worker was stopped"
        assert host.pool_for("j", trainer) is None
        with pytest.raises(WorkersFailed, match="no live workers"):
            host.train("j", trainer, np.arange(128), 32, 1, 3.0, stop)
    finally:
        host.close()
