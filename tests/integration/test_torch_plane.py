"""The torch data plane (``--data-plane torch``) with real gloo groups in one process: jobs of
in-process peers commit bit-identical; a group is formed once per epoch, aborted on failure
and never reused; a member that stalls in a collective is named by its peers' probes; a
stranger is refused at the rendezvous; the spec refuses what the plane does not carry."""
from __future__ import annotations

import dataclasses
import threading

import grpc
import numpy as np
import pytest
import torch.distributed as dist
from dml.v1 import exchange_pb2, exchange_pb2_grpc, jobs_pb2, types_pb2

from dml.aggregation.transport import Cancelled, ExchangeError
from dml.common import rpc
from dml.common.spec import InvalidSpec, JobSpec, spec_to_pb, validate
from dml.peer import torchplane
from dml.peer.torchplane import TORCH_STORE, TorchLink, make_group, prefix
from tests.integration.helpers import (
    assert_state_dicts_identical,
    coordinator,
    fetch_state,
    job_stub,
    peers,
    wait_for,
)
from tests.integration.test_cluster import _job, _submit

SPEC = JobSpec(task="digits", rounds=6, local_steps=3, batch_size=32, learning_rate=0.1, min_peers=3,
               checkpoint_every_rounds=3, data_plane="torch")


def _history_ok(stub, jid: str, rounds: int) -> jobs_pb2.GetJobResponse:
    wait_for(lambda: _job(stub, jid).job.state in (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED), 120,
             "the job to end")
    resp = _job(stub, jid, history=True)
    assert resp.job.state == types_pb2.JOB_STATE_SUCCEEDED, resp.job
    assert [r.round for r in resp.history] == list(range(1, rounds + 1))
    return resp


@pytest.mark.parametrize("sync", ["params", "grads"])
def test_a_torch_job_commits_bit_identical_with_one_group_per_epoch(sync):
    spec = dataclasses.replace(SPEC, sync=sync)
    with coordinator() as srv, peers(srv.address, 3) as ps:
        stub = job_stub(srv.address)
        jid = _submit(stub, spec)
        resp = _history_ok(stub, jid, spec.rounds)
        assert all(r.members == 3 for r in resp.history)
        got = [fetch_state(p.address, jid, spec.rounds, p.peer_id, srv.coordinator.signing_key) for p in ps]
        assert {g[0] for g in got} == {resp.history[-1].digest}
        assert_state_dicts_identical([g[1] for g in got])
        # No failure, one epoch: one group each, formed at the first round and reused after.
        assert [p.torch.formed for p in ps] == [1, 1, 1]
        assert len({p.torch.group.key for p in ps}) == 1
        assert all(p.torch.group.progress.done == spec.rounds * (spec.local_steps if sync == "grads" else 1)
                   for p in ps)


def _groups(world: int, key, timeout_s: float = 10.0) -> list[torchplane.TorchGroup]:
    """``world`` gloo groups of ``key`` over one HashStore, formed in threads."""
    store = dist.HashStore()
    out: dict[int, torchplane.TorchGroup] = {}
    members = tuple(f"m{r}" for r in range(world))

    def form(r: int) -> None:
        out[r] = make_group(store, key, r, members, "127.0.0.1", timeout_s)

    threads = [threading.Thread(target=form, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(out) == list(range(world))
    return [out[r] for r in range(world)]


def _all(groups, bufs, abort=None, deadline_s=10.0) -> dict[int, BaseException | None]:
    errors: dict[int, BaseException | None] = {}
    abort = abort or threading.Event()

    def run(i: int) -> None:
        try:
            groups[i].allreduce(bufs[i], deadline_s, abort)
            errors[i] = None
        except BaseException as e:  # noqa: BLE001 - collected for the test to look at
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bufs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_a_group_sums_then_a_timeout_aborts_it_for_good():
    key = ("job", 3, 7)
    groups = _groups(3, key)
    bufs = [np.full(1000, r + 1, dtype=np.float32) for r in range(3)]
    assert _all(groups, bufs) == {0: None, 1: None, 2: None}
    assert all((b == 6).all() for b in bufs)
    assert all(g.progress.entered == g.progress.done == 1 for g in groups)
    # Rank 2 never enters the second collective: the others' wait ends at their deadline, and
    # their groups are aborted, then refuse any further use.
    errors = _all(groups[:2], bufs[:2], deadline_s=1.0)
    assert all(isinstance(errors[i], ExchangeError) and "did not finish" in str(errors[i]) for i in (0, 1)), errors
    assert groups[0].progress.broken and groups[1].progress.broken and not groups[2].progress.broken
    with pytest.raises(ExchangeError, match="never reused"):
        groups[0].allreduce(bufs[0], 1.0, threading.Event())
    for g in groups:
        g.abort()


def test_an_abort_cancels_a_waiting_collective():
    groups = _groups(2, ("job", 1, 1))
    abort = threading.Event()
    abort.set()
    errors = _all(groups[:1], [np.ones(10, dtype=np.float32)], abort=abort)
    assert isinstance(errors[0], Cancelled)
    assert groups[0].progress.broken
    for g in groups:
        g.abort()


def test_a_stranger_is_refused_at_the_rendezvous_and_the_probe():
    with coordinator() as srv, peers(srv.address, 2) as ps:
        stub = job_stub(srv.address)
        jid = _submit(stub, dataclasses.replace(SPEC, min_peers=2, rounds=2))
        _history_ok(stub, jid, 2)
        host = ps[0] if ps[0].torch.store_host.groups() else ps[1]
        (key,) = [k for k in host.torch.store_host.groups() if k[0] == jid]
        req = exchange_pb2.TorchStoreRequest(job_id=jid, epoch=key[1], group_round=key[2], sender_id="stranger",
                                             op=exchange_pb2.TORCH_STORE_OP_GET, keys=[prefix(key) + "gloo/0"])
        with rpc.channel(host.address) as ch:
            stub_x = exchange_pb2_grpc.PeerExchangeStub(ch)
            for call, msg in ((lambda: stub_x.TorchStore(req, timeout=5), req),
                              (lambda: stub_x.TorchProbe(exchange_pb2.TorchProbeRequest(
                                  job_id=jid, epoch=key[1], group_round=key[2], sender_id="stranger"), timeout=5), None)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
            # A member's signature over another sender's name, or another group, is refused too.
            other = ps[1] if host is ps[0] else ps[0]
            md = other.credentials.sign(TORCH_STORE, jid, key[1], str(key[2]), host.peer_id)
            forged = exchange_pb2.TorchStoreRequest(job_id=jid, epoch=key[1], group_round=key[2] + 1,
                                                    sender_id=other.peer_id, op=exchange_pb2.TORCH_STORE_OP_GET,
                                                    keys=["k"])
            with pytest.raises(grpc.RpcError) as e:
                stub_x.TorchStore(forged, timeout=5, metadata=md)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value


class _Stalling(TorchLink):
    """A member that never enters its collective at round ``at`` (alive, its server answering),
    until its round is cancelled."""

    at = 3

    def average(self, buf, weight):  # noqa: ANN001, ANN201 - the test's seam
        if self._plan.round == self.at and not getattr(_Stalling, "done", False):
            _Stalling.done = True
            self._ready()
            self._abort.wait(60)
            raise Cancelled("stalled member cancelled")
        return super().average(buf, weight)


def test_a_member_stalled_in_a_collective_is_named_and_the_group_reformed(caplog):
    caplog.set_level("INFO")
    spec = dataclasses.replace(SPEC, rounds=6)
    with coordinator() as srv, peers(srv.address, 3, exchange_timeout_s=3.0) as ps:
        victim = ps[2]
        victim._ring.torch_link = lambda plan, rank: _Stalling(  # type: ignore[method-assign]
            victim.torch, plan, rank, victim.config.exchange_timeout_s, victim._ring._abort)
        stub = job_stub(srv.address)
        jid = _submit(stub, spec)
        resp = _history_ok(stub, jid, spec.rounds)
        reported = [r.getMessage() for r in caplog.records if "reported by" in r.getMessage()]
        assert reported and all(f"peer {victim.peer_id} reported by" in m for m in reported), reported
        assert resp.job.epoch > 1
        # The survivors' group of the stalled round broke and was replaced by a new epoch's.
        assert all(p.torch.formed >= 2 for p in ps if p is not victim)
        assert any("did not finish" in r.getMessage() and f"suspect {victim.peer_id}" in r.getMessage()
                   for r in caplog.records)


def test_the_spec_refuses_lossy_codecs_and_gossip_on_the_torch_plane():
    with pytest.raises(InvalidSpec, match="--data-plane torch all-reduces in fp32"):
        validate(JobSpec(data_plane="torch", codec="int8"))
    with pytest.raises(InvalidSpec, match="--data-plane torch carries ring rounds"):
        validate(JobSpec(data_plane="torch", aggregation="gossip"))
    validate(JobSpec(data_plane="torch", sync="grads"))
    with coordinator() as srv:
        with pytest.raises(grpc.RpcError) as e:
            job_stub(srv.address).SubmitJob(jobs_pb2.SubmitJobRequest(
                spec=spec_to_pb(JobSpec(data_plane="torch", codec="bf16"))), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fp32" in e.value.details()
