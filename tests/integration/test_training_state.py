"""The optimizer state is part of the training state (issue 12, must-show 3), over real gRPC on
127.0.0.1:0 with in-process peers training the built-in ``digits-cnn`` (a CNN with Adam): a
re-issued round re-runs from the committed parameters and optimizer state, so it reproduces the
failure-free run byte for byte; a joiner takes its donor's committed optimizer state; the
checkpoint holds the whole training state (``dml checkpoint``); and a corrupt or oversized
training-state upload is refused with a status and changes nothing."""
from __future__ import annotations

import hashlib
import io
import threading

import grpc
import pytest
import torch
from dml.v1 import control_pb2, types_pb2

from dml.client.api import JobClient
from dml.common.spec import JobSpec
from dml.common.tasks import get_task
from dml.coordinator.checkpoint import MAX_STATE_RATIO
from dml.peer import trainstate
from dml.peer.runner import Peer, PeerConfig
from tests.integration.helpers import HoldReport, coordinator, job_stub, join_token, operator_token, wait_for
from tests.integration.test_cluster import _job, _submit

SUCCEEDED = types_pb2.JOB_STATE_SUCCEEDED


def adam_spec(**kw) -> JobSpec:
    base = dict(task="digits-cnn", rounds=4, local_steps=3, batch_size=16, min_peers=2, num_shards=4, seed=7,
                checkpoint_every_rounds=2)
    base.update(kw)
    return JobSpec(**base)


def start_peer(address: str, cls=Peer, disk_dir=None, **kw) -> Peer:
    p = cls(PeerConfig(coordinator=address, join_token=join_token(address), exchange_timeout_s=10.0,
                       plan_wait_s=1.0, committed_copy_dir=disk_dir), **kw).start()
    p.run_in_thread()
    return p


class MisreportingPeer(Peer):
    """Reports a wrong digest for round ``at_round`` once, after training and averaging it:
    the members disagree, so the coordinator re-issues the round (same members, same samples,
    a new epoch), and every member must restart it from the committed round, optimizer state
    included."""

    def __init__(self, config: PeerConfig, at_round: int) -> None:
        super().__init__(config)
        self.at_round = at_round
        self.done = threading.Event()
        stub, peer = self.client.stub, self

        class Stub:
            def __getattr__(self, name):
                return getattr(stub, name)

            def ReportRound(self, req, **kw):  # noqa: N802 - the gRPC method's name
                if req.round == peer.at_round and not peer.done.is_set():
                    peer.done.set()
                    req.digest = "0" * 64
                return stub.ReportRound(req, **kw)

        self.client.stub = Stub()


def run_job(spec: JobSpec, victim_round: int = 0, disk_dir=None) -> tuple[list[tuple[int, int, str]], list]:
    """Runs ``spec`` on two peers (the second misreporting ``victim_round`` when given; both
    keeping their committed copy in ``disk_dir`` when given): (round, epoch, digest) per
    committed round, and each peer's final optimizer state."""
    with coordinator() as srv:
        ps = [start_peer(srv.address, disk_dir=disk_dir)]
        ps.append(start_peer(srv.address, MisreportingPeer, disk_dir=disk_dir, at_round=victim_round) if victim_round
                  else start_peer(srv.address, disk_dir=disk_dir))
        try:
            stub = job_stub(srv.address)
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 2, 30, "two idle peers")
            jid = _submit(stub, spec)
            wait_for(lambda: _job(stub, jid).job.state == SUCCEEDED, 180, "the job to succeed")
            resp = _job(stub, jid, history=True)
            states = [p.store.trainer_for(jid).capture_state() for p in ps]
        finally:
            for p in ps:
                p.stop()
    return [(r.round, r.epoch, r.digest) for r in resp.history], states


@pytest.mark.parametrize("committed_copy", ["memory", "disk"])
def test_a_reissued_round_reproduces_the_failure_free_result_with_adam(committed_copy, tmp_path):
    """With ``disk`` the re-issued round restarts from the committed copy read back from its
    file (``--committed-copy disk``), and still matches the clean run kept in memory."""
    spec = adam_spec()
    clean, clean_states = run_job(spec)
    failed, failed_states = run_job(spec, victim_round=3, disk_dir=tmp_path if committed_copy == "disk" else None)
    assert [r for r, _, _ in failed] == [1, 2, 3, 4]
    assert failed[2][1] > failed[1][1], "round 3 was re-issued under a new epoch"
    assert clean[2][1] == clean[1][1], "the clean run re-issued nothing"
    # Byte for byte: every round's digest, the re-run one and the ones after it included.
    assert [d for _, _, d in failed] == [d for _, _, d in clean]
    for a, b in zip(clean_states, failed_states):
        assert trainstate.equal(a, b), "the optimizer state differs from the run that did not fail"
    assert clean_states[0]["optimizer"]["state"], "Adam holds state: the test compares something"


def test_a_joiner_takes_its_donors_committed_optimizer_state():
    spec = adam_spec(rounds=6, checkpoint_every_rounds=100)
    committed: dict[tuple[str, int], dict] = {}  # (peer, round) -> its committed state at the round's start
    fetched: dict[int, dict] = {}

    def record_begin(p: Peer) -> None:
        real = p.store.begin

        def begin(start, want):
            got = real(start, want)
            snap = p.store.committed
            if snap is not None and snap.state is not None:
                committed[(p.peer_id, snap.round)] = trainstate._copy(snap.state, None)
            return got
        p.store.begin = begin

    with coordinator() as srv:
        ps = [start_peer(srv.address), start_peer(srv.address)]
        for p in ps:
            record_begin(p)
        stub = job_stub(srv.address)
        joiner = None
        gate = threading.Event()  # round 3 commits only once the joiner took the job: it joins at round 4
        ps[0].client.stub = HoldReport(ps[0].client.stub, 3, gate)
        try:
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 2, 30, "two idle peers")
            jid = _submit(stub, spec)
            wait_for(lambda: srv.coordinator.view(lambda st: st.job(jid).committed_round) >= 2, 120, "round 2 to commit")
            joiner = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address),
                                     exchange_timeout_s=10.0, plan_wait_s=1.0))
            real_fetch = joiner._ring._fetch

            def fetch(plan, rnd, trainer):
                real_fetch(plan, rnd, trainer)
                fetched[rnd] = trainer.capture_state()
                fetched[rnd]["_donor"] = plan.members[0].peer_id
            joiner._ring._fetch = fetch
            joiner.start()
            joiner.run_in_thread()
            wait_for(lambda: srv.coordinator.view(lambda st: joiner.peer_id in st.job(jid).ready), 60,
                     "the joiner to take the job")
            gate.set()
            wait_for(lambda: _job(stub, jid).job.state == SUCCEEDED, 180, "the job to succeed")
            resp = _job(stub, jid, history=True)
        finally:
            gate.set()
            for p in ps + ([joiner] if joiner is not None else []):
                p.stop()
    assert resp.history[-1].members == 3, "the joiner took part"
    assert len(fetched) == 1, f"the joiner fetched once: {sorted(fetched)}"
    (rnd, got), = fetched.items()
    donor = got.pop("_donor")
    assert donor in {p.peer_id for p in ps}
    want = committed[(donor, rnd)]
    other = committed[next((p.peer_id, rnd) for p in ps if p.peer_id != donor)]
    assert want["optimizer"]["state"], "Adam holds state by then"
    assert trainstate.equal(got, want), "the joiner's optimizer state is its donor's committed one"
    assert not trainstate.equal(want, other), "local optimizer states differ: the comparison means something"


def test_dml_checkpoint_gives_the_whole_training_state():
    spec = adam_spec(rounds=3)
    with coordinator() as srv:
        ps = [start_peer(srv.address), start_peer(srv.address)]
        try:
            stub = job_stub(srv.address)
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 2, 30, "two idle peers")
            jid = _submit(stub, spec)
            wait_for(lambda: _job(stub, jid).job.state == SUCCEEDED, 120, "the job to succeed")
            final = _job(stub, jid, history=True).history[-1]
            import tempfile, pathlib

            with tempfile.TemporaryDirectory() as d, JobClient(srv.address, 10, token=operator_token(srv.address)) as c:
                rnd, sha = c.download_checkpoint(jid, pathlib.Path(d) / "state.pt")
                raw = (pathlib.Path(d) / "state.pt").read_bytes()
                mrnd, mdig = c.download(jid, pathlib.Path(d) / "model.pt")
                model_sd = torch.load(pathlib.Path(d) / "model.pt", weights_only=True)
        finally:
            for p in ps:
                p.stop()
    assert rnd == mrnd == 3 and mdig == final.digest and sha == hashlib.sha256(raw).hexdigest()
    doc = torch.load(io.BytesIO(raw), weights_only=True)
    assert isinstance(doc, dict) and doc["format"] == 1 and doc["job_id"] == jid and doc["round"] == 3
    assert doc["spec"]["task"] == "digits-cnn" and set(doc["model"]) == set(model_sd)
    assert all(torch.equal(doc["model"][k], model_sd[k]) for k in model_sd)  # dml model: the same state_dict
    task = get_task("digits-cnn")
    model = task.model()
    model.load_state_dict(doc["model"])
    opt = task.optimizer(model.parameters())
    opt.load_state_dict(doc["optimizer"])  # a fresh optimizer takes it
    assert isinstance(opt, torch.optim.Adam)
    st = opt.state_dict()["state"]
    assert st and all("exp_avg" in s and "exp_avg_sq" in s for s in st.values())
    assert all(float(s["step"]) == float(next(iter(st.values()))["step"]) > 0 for s in st.values())


class HeldPeer(Peer):
    """Stops before training round ``at_round`` until ``release`` is set, so that round stays current."""

    def __init__(self, config: PeerConfig, at_round: int, release: threading.Event) -> None:
        super().__init__(config)
        self.at_round, self.release = at_round, release
        self.held = threading.Event()

    def _make_link(self, plan, rank):
        if plan.round == self.at_round and not self.release.is_set():
            self.held.set()
            self.release.wait(60)
        return super()._make_link(plan, rank)


def test_a_corrupt_or_oversized_training_state_upload_is_refused_and_changes_nothing():
    spec = adam_spec(rounds=3, checkpoint_every_rounds=100)
    release = threading.Event()
    with coordinator() as srv:
        ps = [start_peer(srv.address, HeldPeer, at_round=2, release=release) for _ in range(2)]
        try:
            stub = job_stub(srv.address)
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 2, 30, "two idle peers")
            jid = _submit(stub, spec)
            wait_for(lambda: all(p.held.is_set() for p in ps), 120, "both peers held at round 2")
            job = srv.coordinator.view(lambda st: st.job(jid))
            epoch, up = job.epoch, ps[0]
            trainer = up.store.trainer_for(jid)
            params = trainer.params()
            model = io.BytesIO()
            trainer.save_state_dict(model, params)
            dig = trainer.round_digest(params, None)
            good_state = trainer.state_bytes(trainer.capture_state(), job_id=jid, round=2)

            def upload(state: bytes, sha: str, model_bytes: bytes | None = None) -> grpc.RpcError:
                mb = model.getvalue() if model_bytes is None else model_bytes
                chunks = [control_pb2.CheckpointChunk(peer_id=up.peer_id, job_id=jid, round=2, epoch=epoch, digest=dig,
                                                      data=mb, kind=control_pb2.CHECKPOINT_KIND_MODEL)]
                step = 1 << 20
                for i in range(0, max(len(state), 1), step):
                    chunks.append(control_pb2.CheckpointChunk(digest=sha if i == 0 else "", data=state[i : i + step],
                                                              kind=control_pb2.CHECKPOINT_KIND_TRAINING_STATE))
                with pytest.raises(grpc.RpcError) as e:
                    up.client.stub.UploadCheckpoint(iter(chunks), timeout=30)
                return e.value

            bad = bytearray(good_state)
            bad[len(bad) // 2] ^= 0xFF
            e1 = upload(bytes(bad), hashlib.sha256(good_state).hexdigest())  # corrupted on the way
            assert e1.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in e1.details()
            junk = b"not a torch archive" * 10
            e2 = upload(junk, hashlib.sha256(junk).hexdigest())
            assert e2.code() == grpc.StatusCode.INVALID_ARGUMENT and "torch archive" in e2.details()
            e3 = upload(good_state, "")
            assert e3.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in e3.details()
            huge = bytes(MAX_STATE_RATIO * len(model.getvalue()) + (2 << 20))
            e4 = upload(huge, hashlib.sha256(huge).hexdigest())
            assert e4.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "over" in e4.details()
            after = srv.coordinator.view(lambda st: st.job(jid))
            assert after.pending_checkpoint is None and after.pending_checkpoint_state == ""
            folder = srv.coordinator.checkpoint_path(jid, 2).parent
            assert not folder.exists() or not [f for f in folder.iterdir() if "000002" in f.name or f.suffix == ".tmp"]
            release.set()
            wait_for(lambda: _job(stub, jid).job.state == SUCCEEDED, 120, "the job to succeed")
        finally:
            release.set()
            for p in ps:
                p.stop()


def fetch_training_state(address: str, job_id: str, rnd: int, peer_id: str, signing_key) -> tuple[str, dict, dict]:
    """A peer's round ``rnd`` as an auditor: (digest, model state_dict, training state parts)."""
    from dml.common import rpc
    from dml.v1 import exchange_pb2, exchange_pb2_grpc

    from tests.integration.helpers import audit_metadata

    md = audit_metadata(signing_key, job_id, rnd, peer_id)
    with rpc.channel(address) as ch:
        parts = list(exchange_pb2_grpc.PeerExchangeStub(ch).FetchParameters(
            exchange_pb2.FetchParametersRequest(job_id=job_id, round=rnd, training_state=True), timeout=10, metadata=md))
    model = [p for p in parts if p.part == 0]
    state = [p for p in parts if p.part == 1]
    raw = b"".join(p.data for p in state)
    assert state and state[0].digest == hashlib.sha256(raw).hexdigest() and state[0].round == rnd
    doc = torch.load(io.BytesIO(raw), weights_only=True)
    assert doc["format"] == 1 and doc["job_id"] == job_id and doc["round"] == rnd
    return model[0].digest, torch.load(io.BytesIO(b"".join(p.data for p in model)), weights_only=True), doc


def test_averaged_optimizer_state_is_bit_identical_on_every_member_and_under_the_digest():
    spec = adam_spec(rounds=3, optimizer_state="average", checkpoint_every_rounds=2)
    with coordinator() as srv:
        ps = [start_peer(srv.address) for _ in range(3)]
        try:
            stub = job_stub(srv.address)
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 3, 30, "three idle peers")
            jid = _submit(stub, spec)
            wait_for(lambda: _job(stub, jid).job.state == SUCCEEDED, 120, "the job to succeed")
            resp = _job(stub, jid, history=True)
            got = [fetch_training_state(p.address, jid, 3, p.peer_id, srv.coordinator.signing_key) for p in ps]
            trainer = ps[0].store.trainer_for(jid)
            with JobClient(srv.address, 10, token=operator_token(srv.address)) as c:
                import pathlib
                import tempfile

                with tempfile.TemporaryDirectory() as d:
                    rnd, _ = c.download_checkpoint(jid, pathlib.Path(d) / "state.pt")
        finally:
            for p in ps:
                p.stop()
    assert rnd == 3, "the checkpoint of the last round passed the coordinator's check of the combined digest"
    assert {g[0] for g in got} == {resp.history[-1].digest}
    opts = [g[2]["optimizer"] for g in got]
    shapes = trainer.averaged_shapes
    assert shapes is not None
    tensors = [list(trainstate.averaged(o, shapes)) for o in opts]
    assert tensors[0] and len(tensors[0]) == 2 * len(shapes), "Adam's two moments per parameter are averaged"
    for other in tensors[1:]:
        assert all(torch.equal(a, b) for a, b in zip(tensors[0], other))
    params = trainer.params_from_state_dict(got[0][1])
    assert trainstate.hash_with(params, iter(tensors[0])) == resp.history[-1].digest, "the digest covers the state"


def test_a_joiner_no_member_can_serve_takes_the_training_state_from_the_checkpoint():
    spec = adam_spec(rounds=5, checkpoint_every_rounds=1)  # every committed round has its checkpoint
    committed: dict[tuple[str, int], dict] = {}
    fetched: dict[int, dict] = {}
    with coordinator() as srv:
        ps = [start_peer(srv.address), start_peer(srv.address)]
        for p in ps:
            real = p.store.begin

            def begin(start, want, p=p, real=real):
                got = real(start, want)
                snap = p.store.committed
                if snap is not None and snap.state is not None:
                    committed[(p.peer_id, snap.round)] = trainstate._copy(snap.state, None)
                return got
            p.store.begin = begin
        stub = job_stub(srv.address)
        joiner = None
        gate = threading.Event()  # round 3 commits only once the joiner took the job: it joins at round 4
        ps[0].client.stub = HoldReport(ps[0].client.stub, 3, gate)
        try:
            wait_for(lambda: srv.coordinator.view(lambda st: len(st.live_idle())) == 2, 30, "two idle peers")
            jid = _submit(stub, spec)
            wait_for(lambda: srv.coordinator.view(lambda st: st.job(jid).committed_round) >= 2, 120, "round 2")
            joiner = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address),
                                     exchange_timeout_s=10.0, plan_wait_s=1.0))
            joiner._ring._from_members = lambda plan, rnd, trainer: False  # no member serves it
            real_ckpt = joiner._ring._from_checkpoint

            def from_checkpoint(plan, rnd, trainer):
                ok = real_ckpt(plan, rnd, trainer)
                if ok:
                    fetched[rnd] = trainer.capture_state()
                return ok
            joiner._ring._from_checkpoint = from_checkpoint
            joiner.start()
            joiner.run_in_thread()
            wait_for(lambda: srv.coordinator.view(lambda st: joiner.peer_id in st.job(jid).ready), 60,
                     "the joiner to take the job")
            gate.set()
            wait_for(lambda: _job(stub, jid).job.state == SUCCEEDED, 180, "the job to succeed")
            resp = _job(stub, jid, history=True)
        finally:
            gate.set()
            for p in ps + ([joiner] if joiner is not None else []):
                p.stop()
    assert resp.history[-1].members == 3, "the joiner took part"
    assert len(fetched) == 1
    (rnd, got), = fetched.items()
    uploader = resp.history[rnd - 1]  # the round the checkpoint is of: its first member uploaded it
    states = [committed[(p.peer_id, rnd)] for p in ps]
    assert got["optimizer"]["state"], "Adam's moments came with the checkpoint"
    assert not trainstate.equal(states[0], states[1])
    assert any(trainstate.equal(got, s) for s in states), "the joiner's state is the uploader's committed one"
    assert uploader.round == rnd
