"""``--sync grads`` over the real ring: members on real peer links (every data plane) match one
process with the N-times batch; a job of real peers commits with them bit-identical; a member
killed mid-round re-runs the round from the committed parameters and optimizer state."""
from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import pytest
import torch
from dml.v1 import types_pb2

from dml.client.api import history_dict
from dml.common.spec import JobSpec
from dml.common.tasks import get_task
from dml.peer.link import PeerLink
from dml.peer import dataplane
from dml.peer import link as link_module
from dml.peer.faults import Fault
from dml.peer.diskcopy import DiskCopy
from dml.peer.runner import Peer, PeerConfig
from tests.integration.helpers import (
    Member,
    RoundOneWaits,
    assert_state_dicts_identical,
    coordinator,
    fetch_state,
    job_stub,
    join_token,
    ledger_problems,
    peers,
    ring_key,
    wait_for,
)
from tests.integration.test_cluster import _job, _submit
from tests.integration.test_faults import SLOW_HEARTBEAT_EVICTION, CrashingPeer
from tests.unit.ringkit import assert_bit_identical, reference_trainer, synced_member


def _momentum(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _plain_sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05)


TASKS = {"mlp-sgd-momentum": dataclasses.replace(get_task("digits"), optimizer=_momentum),
         "cnn-adam": get_task("digits-cnn"),
         # plain SGD: the MLP's two 8192-element weights streamed in blocks of 1024 (17 all-reduces a step)
         "mlp-sgd-streamed": dataclasses.replace(get_task("digits"), optimizer=_plain_sgd)}


@pytest.fixture
def members():
    made: list[Member] = []

    def make(n: int) -> list[Member]:
        made.extend(Member() for _ in range(n))
        return made[-n:]

    yield make
    for m in made:
        m.close()


@pytest.mark.parametrize("plane,name", [("tcp", "cnn-adam"), ("tcp", "mlp-sgd-momentum"), ("shm", "cnn-adam"),
                                        ("grpc", "mlp-sgd-momentum"), ("tcp", "mlp-sgd-streamed"),
                                        ("shm", "mlp-sgd-streamed")])
def test_members_on_real_links_match_one_process_with_the_n_times_batch(members, monkeypatch, plane, name):
    """3 members, 6 steps of 16 each, all over one link per member (one connection for every
    step's all-reduce), end where one process with batches of 48 ends, and bit-identical."""
    world, bs, steps = 3, 16, 6
    connects = []
    real_connect = dataplane.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        connects.append(args[:2])
        return real_connect(*args, **kwargs)

    monkeypatch.setattr(dataplane, "connect", connect)
    streams = []

    class CountedGrpcSender(link_module.GrpcSender):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            streams.append(args[3])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(link_module, "GrpcSender", CountedGrpcSender)
    task = TASKS[name]
    order = np.random.default_rng(3).permutation(1400).astype(np.int64)
    samples = [order[r * bs * steps : (r + 1) * bs * steps] for r in range(world)]
    ms = members(world)
    key = ring_key()
    links = [PeerLink(ms[r].servicer, key, f"p{r}", f"p{(r - 1) % world}", f"p{(r + 1) % world}",
                      ms[(r + 1) % world].address, 30.0, ms[r].abort, idle_timeout_s=10.0, data_plane=plane)
             for r in range(world)]
    trainers: list[Any] = [None] * world
    errors: list[BaseException | None] = [None] * world

    def one(r: int) -> None:
        try:
            trainers[r] = synced_member(task, r, world, links[r], samples[r], bs, steps,
                                        stream_block=1024 if name.endswith("streamed") else None)
        except BaseException as e:  # noqa: BLE001 - collected for the assertions
            errors[r] = e
        finally:
            links[r].shutdown()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a member hung"
    assert errors == [None] * world
    assert [link.sender_kind for link in links] == [plane] * world
    # One connection (TCP, or a gRPC stream) per member carried every step's all-reduce.
    assert (len(connects), len(streams)) == ((0, world) if plane == "grpc" else (world, 0))
    assert_bit_identical([t.host_buffer() for t in trainers], [t.sync_trace for t in trainers])
    assert trainers[0].sync_parts == (17 if name.endswith("streamed") else 1)
    want = reference_trainer(task, samples, bs, steps).params()
    assert np.abs(trainers[0].params() - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


GRADS_JOB = JobSpec(task="digits-cnn", rounds=5, local_steps=4, batch_size=16, min_peers=3, sync="grads",
                    checkpoint_every_rounds=5)


def _optimizer_steps(trainer: Any) -> set[int]:
    """The step counts Adam holds for each parameter (one value when every parameter stepped alike)."""
    return {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}


def test_a_grads_job_commits_with_identical_parameters_and_optimizer_state(tmp_path):
    with coordinator(tmp_path / "state") as srv, peers(srv.address, 3) as ps:
        stub = job_stub(srv.address)
        jid = _submit(stub, GRADS_JOB)
        wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 120, "job to succeed")
        resp = _job(stub, jid, history=True)
        assert [r.members for r in resp.history] == [3] * GRADS_JOB.rounds
        got = [fetch_state(p.address, jid, GRADS_JOB.rounds, p.peer_id, srv.coordinator.signing_key) for p in ps]
        assert {g[0] for g in got} == {resp.history[-1].digest}
        assert_state_dicts_identical([g[1] for g in got])
        trainers = [p.store.trainer_for(jid) for p in ps]
        # One Adam step per step of the round, the same on every member.
        assert [_optimizer_steps(t) for t in trainers] == [{GRADS_JOB.rounds * GRADS_JOB.local_steps}] * 3
        for t in trainers[1:]:
            for k, v in t.optimizer.state_dict()["state"].items():
                mine = trainers[0].optimizer.state_dict()["state"][k]
                assert all(torch.equal(v[n], mine[n]) for n in ("exp_avg", "exp_avg_sq"))
        assert resp.history[-1].test_accuracy > resp.history[0].test_accuracy


def test_a_grads_job_streaming_its_weights_commits_identical_and_learns(tmp_path, monkeypatch):
    """Real peers, plain SGD, the weights streamed in row blocks (the blocks made small, so the
    digits MLP streams its two 8192-element weights as a 10M model streams its first): every
    round commits with every member's digest equal, and the model learns."""
    from dml.peer import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "STREAM_BLOCK_ELEMS", 1024)
    monkeypatch.setattr(trainer_module, "STREAM_MIN_ELEMS", 2048)
    spec = JobSpec(task="digits", rounds=4, local_steps=4, batch_size=16, min_peers=3, sync="grads", learning_rate=0.1,
                   checkpoint_every_rounds=4)
    with coordinator(tmp_path / "state") as srv, peers(srv.address, 3) as ps:
        stub = job_stub(srv.address)
        jid = _submit(stub, spec)
        wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 120, "job to succeed")
        resp = _job(stub, jid, history=True)
        assert [r.members for r in resp.history] == [3] * spec.rounds
        trainers = [p.store.trainer_for(jid) for p in ps]
        assert [t.sync_parts for t in trainers] == [17] * 3
        got = [fetch_state(p.address, jid, spec.rounds, p.peer_id, srv.coordinator.signing_key) for p in ps]
        assert {g[0] for g in got} == {resp.history[-1].digest}
        assert resp.history[-1].test_accuracy > resp.history[0].test_accuracy


@pytest.mark.parametrize("committed_copy", ["memory", "disk"])
def test_a_member_killed_mid_round_reruns_it_from_the_committed_parameters_and_optimizer_state(committed_copy, tmp_path):
    """The victim dies in round 3's third step (it sends 50 frames of 512 elements a step here):
    the survivors have taken two optimizer steps of a round that never commits. The re-issued
    round starts from round 2's parameters and optimizer state, so once the job ends every
    survivor has taken exactly one Adam step per committed step. With ``disk`` the survivors
    restart from committed copies read back from their files (``--committed-copy disk``)."""
    spec = dataclasses.replace(GRADS_JOB, rounds=6, min_peers=2, data_plane="tcp")
    disk = tmp_path if committed_copy == "disk" else None
    with coordinator(timing=SLOW_HEARTBEAT_EVICTION) as srv, peers(srv.address, 2, committed_copy_dir=disk) as ps:
        victim = CrashingPeer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0,
                                         chunk_elems=512), at_round=3, after_chunks=120).start()
        try:
            victim.run_in_thread()
            stub = job_stub(srv.address)
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 3, 10, "three idle peers")
            first = RoundOneWaits(ps[0])  # the victim is in the ring before round 3, where it crashes
            jid = _submit(stub, spec)
            first.until_in(srv, jid, victim.peer_id)
            wait_for(victim.crashed.is_set, 90, "the victim to crash mid-round")
            wait_for(lambda: _job(stub, jid).job.state == types_pb2.JOB_STATE_SUCCEEDED, 120, "job to succeed")
        finally:
            victim.stop()
        resp = _job(stub, jid, history=True)
        assert [r.round for r in resp.history] == list(range(1, spec.rounds + 1))
        assert resp.history[2].members == 2, "round 3 was re-run by the survivors"
        got = [fetch_state(p.address, jid, spec.rounds, p.peer_id, srv.coordinator.signing_key) for p in ps]
        assert got[0][0] == got[1][0] == resp.history[-1].digest
        assert_state_dicts_identical([g[1] for g in got])
        assert [_optimizer_steps(p.store.trainer_for(jid)) for p in ps] == [{spec.rounds * spec.local_steps}] * 2
        assert all(isinstance(p.store.committed.params, DiskCopy) == (disk is not None) for p in ps)
        assert ledger_problems([history_dict(r) for r in resp.history], spec) == []


@pytest.mark.parametrize("kind", ["nan-params", "huge-params"])
def test_a_member_sending_a_broken_gradient_is_quarantined_and_the_job_succeeds_finite(kind):
    """With --sync grads the fault lands in the member's first gradient of the round (and it
    skips its own check): its successor's guard refuses it, and the round re-runs without it."""
    rounds, at = 6, 3
    spec = JobSpec(task="digits", rounds=rounds, local_steps=3, batch_size=32, learning_rate=0.1, min_peers=2,
                   sync="grads", data_plane="tcp")
    with coordinator() as srv, peers(srv.address, 2) as ps:
        bad = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0,
                              exchange_timeout_s=10.0, fault=Fault(kind, at))).start()
        try:
            bad.run_in_thread()
            bad_id = bad.peer_id  # once quarantined it registers again under a new id
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 3, 10, "three idle peers")
            stub = job_stub(srv.address)
            first = RoundOneWaits(ps[0])  # the broken peer is in the ring before its fault's round
            jid = _submit(stub, spec)
            first.until_in(srv, jid, bad_id)
            wait_for(lambda: _job(stub, jid).job.state not in (types_pb2.JOB_STATE_RUNNING, types_pb2.JOB_STATE_PENDING),
                     120, "the job to end")
            resp = _job(stub, jid, history=True)
            assert resp.job.state == types_pb2.JOB_STATE_SUCCEEDED, resp.job.reason
            (q,) = resp.job.quarantined
            assert q.peer_id == bad_id and q.round == at, q
            assert "sent non-finite or absurd values" in q.reason and q.reporters in {p.peer_id for p in ps}
            assert resp.history[at - 1].members == 2, "the round was re-run without the broken peer"
            got = [fetch_state(p.address, jid, rounds, p.peer_id, srv.coordinator.signing_key) for p in ps]
            assert {g[0] for g in got} == {resp.history[-1].digest}
            assert all(bool(torch.isfinite(t).all()) for t in got[0][1].values())
        finally:
            bad.stop()
