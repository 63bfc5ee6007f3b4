"""Jobs with an outer optimizer (DiLoCo) or FedProx's proximal term on a real coordinator and three
real peers in one process: they train, commit on equal digests, the members end bit-identical,
and a re-issued round reproduces the failure-free result (the outer momentum is training state)."""
from __future__ import annotations

import contextlib
import io
import itertools
import threading
from dataclasses import replace

import numpy as np
import torch
from dml.v1 import jobs_pb2, types_pb2

from dml.common.spec import JobSpec, spec_to_pb
from dml.peer.outer import PART
from tests.integration.helpers import (HoldReport, assert_state_dicts_identical, coordinator, fetch_state, job_stub, peers,
                                       wait_for)

BASE = JobSpec(task="digits", rounds=4, local_steps=5, batch_size=32, learning_rate=0.1, min_peers=3,
               checkpoint_every_rounds=2, seed=3)
NESTEROV = replace(BASE, outer_optimizer="nesterov", outer_lr=0.7, outer_momentum=0.9)


def _run(stub, spec: JobSpec) -> tuple[str, jobs_pb2.GetJobResponse]:
    jid = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=10).job_id

    def done() -> bool:
        return stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=5).job.state in (
            types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED)

    wait_for(done, 90, f"job {jid} to end")
    resp = stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid, include_history=True), timeout=5)
    assert resp.job.state == types_pb2.JOB_STATE_SUCCEEDED, resp.job.reason
    assert [r.round for r in resp.history] == list(range(1, spec.rounds + 1))
    return jid, resp


def _identical(ps, srv, jid: str, resp: jobs_pb2.GetJobResponse) -> None:
    """Every member holds the last committed parameters bit for bit, with that digest."""
    last = resp.history[-1]
    got = [fetch_state(p.address, jid, last.round, p.peer_id, srv.coordinator.signing_key) for p in ps]
    assert {g[0] for g in got} == {last.digest}
    assert_state_dicts_identical([g[1] for g in got])


def _momenta(ps, jid: str) -> set[bytes]:
    out = set()
    for p in ps:
        trainer = p.store.trainer_for(jid)
        assert trainer is not None
        m = trainer.state_parts[PART].momentum()
        assert m is not None and np.isfinite(m).all() and m.any()
        out.add(m.tobytes())
    return out


@contextlib.contextmanager
def _cluster(tmp_path, n: int = 3):
    """A fresh coordinator and ``n`` fresh peers, all registered: shards are placed by measured
    capacity, so jobs compared digest for digest each get a cluster that has measured nothing."""
    with coordinator(tmp_path / f"state-{next(_COUNT)}") as srv, peers(srv.address, n) as ps:
        wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == n, 30, f"{n} idle peers")
        yield srv, ps, job_stub(srv.address)


_COUNT = itertools.count()


def _job(tmp_path, spec: JobSpec, outer: bool = False) -> tuple[jobs_pb2.GetJobResponse, dict | None]:
    """Runs ``spec`` on a fresh cluster; checks the members end bit-identical (and, with
    ``outer``, hold one outer momentum); returns the history and the job's checkpoint."""
    with _cluster(tmp_path) as (srv, ps, stub):
        jid, resp = _run(stub, spec)
        _identical(ps, srv, jid, resp)
        if not outer:
            return resp, None
        momenta = _momenta(ps, jid)
        assert len(momenta) == 1, "every member holds the same outer momentum"
        chunks = list(stub.DownloadCheckpoint(jobs_pb2.DownloadModelRequest(job_id=jid), timeout=10))
        assert chunks[0].round == spec.rounds
        doc = torch.load(io.BytesIO(b"".join(c.data for c in chunks)), weights_only=True)
        assert doc[PART]["state"][0]["momentum_buffer"].numpy().tobytes() == momenta.pop()
        return resp, doc


def test_outer_optimizer_and_prox_jobs_commit_with_members_bit_identical(tmp_path):
    plain, _ = _job(tmp_path, BASE)
    plain_digests = [r.digest for r in plain.history]

    outer, doc = _job(tmp_path, NESTEROV, outer=True)
    # The checkpoint (dml checkpoint) holds the outer momentum beside the model and the inner optimizer.
    assert doc[PART]["param_groups"][0]["nesterov"] and doc[PART]["param_groups"][0]["lr"] == 0.7
    digests = [r.digest for r in outer.history]
    # Round 1 has no committed digest to prove a common start: it takes the plain average.
    assert digests[0] == plain_digests[0]
    # From round 2 the outer step moves the parameters elsewhere than the average.
    assert all(a != b for a, b in zip(digests[1:], plain_digests[1:]))
    assert outer.history[-1].test_accuracy > outer.history[0].test_accuracy

    # Lossy codecs average changes against the committed base; the outer step follows.
    _job(tmp_path, replace(NESTEROV, codec="int8"), outer=True)

    prox, _ = _job(tmp_path, replace(BASE, prox_mu=0.5))
    # The proximal term changes local training from the first step on.
    assert all(a != b for a, b in zip([r.digest for r in prox.history], plain_digests))
    assert prox.history[-1].test_accuracy > prox.history[0].test_accuracy

    both, _ = _job(tmp_path, replace(NESTEROV, prox_mu=0.5), outer=True)  # FedProx inside, DiLoCo outside
    assert both.history[1].digest not in (outer.history[1].digest, prox.history[1].digest)


class _WrongDigestOnce:
    """A peer's control stub whose first report of round ``rnd`` carries a wrong digest: the
    members then disagree and the coordinator re-issues the round (a new epoch, same members)."""

    def __init__(self, stub, rnd: int) -> None:
        self._stub, self._rnd = stub, rnd
        self.fired = ""  # the job it fired in

    def __getattr__(self, name):
        return getattr(self._stub, name)

    def ReportRound(self, req, **kw):  # noqa: N802 - the stub's method name
        if req.round == self._rnd and not self.fired:
            self.fired = req.job_id
            req.digest = "0" * 64
        return self._stub.ReportRound(req, **kw)


def test_a_reissued_round_with_the_outer_optimizer_reproduces_the_failure_free_result(tmp_path):
    spec = replace(NESTEROV, rounds=5)
    clean, _ = _job(tmp_path, spec, outer=True)
    with _cluster(tmp_path) as (srv, ps, stub):
        wrong = _WrongDigestOnce(ps[1].client.stub, rnd=3)
        ps[1].client.stub = wrong
        jid, again = _run(stub, spec)
        assert wrong.fired == jid
        assert [e.round for e in again.job.epochs] == [1, 3], "round 3 was re-issued under a new epoch"
        # Round 3 ran twice; each member's outer momentum was restored with the committed round
        # 2, so the re-run and everything after it is the failure-free run, bit for bit.
        assert [r.digest for r in again.history] == [r.digest for r in clean.history]
        _identical(ps, srv, jid, again)


def test_a_joiner_takes_the_outer_momentum_and_the_ring_stays_bit_identical(tmp_path):
    spec = replace(NESTEROV, rounds=6, min_peers=2, checkpoint_every_rounds=100)
    gate = threading.Event()
    with _cluster(tmp_path, 2) as (srv, ps, stub):
        ps[0].client.stub = HoldReport(ps[0].client.stub, 3, gate)
        jid = stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec_to_pb(spec)), timeout=10).job_id
        wait_for(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=5).job.round >= 2, 60, "round 2 to commit")
        with peers(srv.address, 1) as late:  # ready before round 3 can commit: it joins at round 4
            wait_for(lambda: srv.coordinator.view(lambda st: late[0].peer_id in st.job(jid).ready), 60,
                     "the joiner to take the job")
            gate.set()
            wait_for(lambda: stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=5).job.state in (
                types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED), 90, "the job to end")
            resp = stub.GetJob(jobs_pb2.GetJobRequest(job_id=jid, include_history=True), timeout=5)
            assert resp.job.state == types_pb2.JOB_STATE_SUCCEEDED, resp.job.reason
            assert [r.members for r in resp.history] == [2, 2, 2, 3, 3, 3]
            everyone = ps + late
            # Its outer steps agree with the others' only if it took the donor's momentum.
            _identical(everyone, srv, jid, resp)
            assert len(_momenta(everyone, jid)) == 1
