"""The training state beside the parameters (peer.trainstate, Trainer's state methods): copies
made into older ones, restores that never alias the snapshot, a round re-run from a restored
state reproducing itself byte for byte, the serialised form, and the optimizer tensors that
``--optimizer-state average`` averages. Torch on CPU, no sockets."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch

from dml.aggregation.digests import digest
from dml.common.tasks import get_task
from dml.coordinator.checkpoint import BadCheckpoint, max_training_state_bytes, verify_checkpoint, verify_training_state
from dml.peer import trainstate
from dml.peer.trainer import Trainer

SAMPLES = np.arange(96, dtype=np.int64)


def adam_trainer(average: bool = False) -> Trainer:
    t = Trainer(get_task("digits-cnn"), seed=3, lr=None)
    t.average_state = average
    return t


def test_a_capture_is_a_copy_made_into_the_older_one() -> None:
    t = adam_trainer()
    t.train_on(SAMPLES, 16)
    first = t.capture_state()
    live = t.optimizer.state_dict()["state"][0]["exp_avg"]
    kept = first["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(kept, live) and kept.data_ptr() != live.data_ptr()
    t.train_on(SAMPLES, 16)
    assert not torch.equal(kept, t.optimizer.state_dict()["state"][0]["exp_avg"]), "training moved the state"
    second = t.capture_state(first)  # into the old copy: no new tensors
    assert second["optimizer"]["state"][0]["exp_avg"].data_ptr() == kept.data_ptr()
    assert trainstate.equal(second, t.capture_state())


def test_plain_sgd_has_no_state_to_copy() -> None:
    t = Trainer(get_task("digits"), seed=3, lr=0.1)
    assert t.fused_sgd
    t.train_on(SAMPLES, 16)
    state = t.capture_state()
    assert state["optimizer"]["state"] == {}


def test_a_restored_round_reproduces_itself_byte_for_byte_and_leaves_the_snapshot_alone() -> None:
    t = adam_trainer()
    t.train_on(SAMPLES, 16)  # Adam has moments now
    params, state = t.params(), t.capture_state()
    frozen = trainstate._copy(state, None)
    t.train_on(SAMPLES[::-1].copy(), 16)
    after = t.params()
    t.set_params(params)
    t.restore_state(state)
    t.train_on(SAMPLES[::-1].copy(), 16)
    assert t.params().tobytes() == after.tobytes(), "the re-run from the restored state is the same round"
    assert trainstate.equal(state, frozen), "training after a restore must not write into the snapshot"
    t.set_params(params)  # without the state (Adam's moments left where the round ended) it is not
    t.train_on(SAMPLES[::-1].copy(), 16)
    assert t.params().tobytes() != after.tobytes()


def test_restore_refuses_a_state_that_does_not_fit() -> None:
    t = adam_trainer()
    with pytest.raises(ValueError, match="no 'optimizer'"):
        t.restore_state({})
    with pytest.raises(ValueError, match="does not load"):
        t.restore_state({"optimizer": {"state": {}, "param_groups": []}})


def test_the_serialised_state_round_trips_through_a_weights_only_load() -> None:
    t = adam_trainer()
    t.train_on(SAMPLES, 16)
    state = t.capture_state()
    data = t.state_bytes(state, job_id="j", round=4)
    parts, doc = trainstate.load(data, t.state_parts)
    assert doc["format"] == 1 and doc["job_id"] == "j" and doc["round"] == 4
    assert trainstate.equal(parts, state)
    fresh = adam_trainer()
    fresh.restore_state(parts)
    assert trainstate.equal(fresh.capture_state(), state)
    with pytest.raises(ValueError, match="not a training state"):
        trainstate.load(b"junk", t.state_parts)
    buf = io.BytesIO()
    torch.save({"format": 2}, buf)
    with pytest.raises(ValueError, match="format 1"):
        trainstate.load(buf.getvalue(), t.state_parts)
    with pytest.raises(ValueError, match="may not be called"):
        trainstate.to_bytes({"model": {}})


def test_averaged_tensors_are_the_moments_not_the_step_counters() -> None:
    t = adam_trainer(average=True)
    t.train_on(SAMPLES, 16)
    sd = t.optimizer.state_dict()
    shapes = t.averaged_shapes
    assert shapes is not None
    got = list(trainstate.averaged(sd, shapes))
    assert len(got) == 2 * len(shapes)  # exp_avg and exp_avg_sq of every parameter
    assert all(g.shape == s for g, s in zip(got[::2], shapes))
    momentum = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    momentum.param_groups[0]["params"][0].grad = torch.ones(3)
    momentum.step()
    assert [tuple(x.shape) for x in trainstate.averaged(momentum.state_dict(), [(3,)])] == [(3,)]


def test_the_exchange_buffer_carries_the_averaged_state_after_the_parameters() -> None:
    t = adam_trainer(average=True)
    t.train_on(SAMPLES, 16)
    buf = t.exchange_buffer()
    shapes = t.averaged_shapes
    assert shapes is not None
    n = sum(x.numel() for x in trainstate.averaged(t.optimizer.state_dict(), shapes))
    assert buf.size == t.numel + n + 1
    assert np.array_equal(buf[: t.numel], t.params())
    assert trainstate.hash_with(t.params(), trainstate.averaged(t.optimizer.state_dict(), shapes)) == \
        digest(buf[:-1]) == t.round_digest(t.params(), t.capture_state())
    buf[:-1] *= 0.5  # what an average writes back
    t.load_exchange_buffer(buf)
    assert np.array_equal(t.params(), buf[: t.numel])
    assert np.array_equal(np.concatenate([x.reshape(-1).numpy() for x in trainstate.averaged(t.optimizer.state_dict(), shapes)]),
                          buf[t.numel : -1])
    plain = adam_trainer()
    plain.train_on(SAMPLES, 16)
    assert plain.exchange_buffer().size == plain.numel + 1  # local state: the parameters only


def _model_and_state(average: bool) -> tuple[bytes, bytes, str]:
    t = adam_trainer(average=average)
    t.train_on(SAMPLES, 16)
    params, state = t.params(), t.capture_state()
    model = io.BytesIO()
    t.save_state_dict(model, params)
    return model.getvalue(), t.state_bytes(state, job_id="j", round=1), t.round_digest(params, state)


def test_the_coordinator_checks_a_training_state_without_torch() -> None:
    model, state, dig = _model_and_state(average=False)
    sha = hashlib.sha256(state).hexdigest()
    verify_training_state(state, sha, len(model))
    verify_checkpoint(model, dig)
    with pytest.raises(BadCheckpoint, match="declared sha256"):
        verify_training_state(state[:-1] + bytes([state[-1] ^ 1]), sha, len(model))
    with pytest.raises(BadCheckpoint, match="declares no sha256"):
        verify_training_state(state, "", len(model))
    junk = b"x" * 100
    with pytest.raises(BadCheckpoint, match="not a torch archive"):
        verify_training_state(junk, hashlib.sha256(junk).hexdigest(), len(model))
    big = bytes(max_training_state_bytes(len(model)) + 1)
    with pytest.raises(BadCheckpoint, match="over the limit"):
        verify_training_state(big, hashlib.sha256(big).hexdigest(), len(model))


def test_with_averaged_state_the_digest_covers_the_model_and_the_state_storages() -> None:
    model, state, dig = _model_and_state(average=True)
    verify_checkpoint(model, dig, state)
    with pytest.raises(BadCheckpoint, match="hashes? to its claimed"):
        verify_checkpoint(model, dig)  # the parameters alone are not the round's digest
    _, other_state, _ = _model_and_state(average=False)  # the same moments, not stored as one storage
    with pytest.raises(BadCheckpoint):
        verify_checkpoint(model, dig, other_state)


def test_the_job_flag_and_its_refusals() -> None:
    from dml.client.cli import build_parser, spec_from_args
    from dml.common.spec import InvalidSpec, JobSpec, validate

    a = build_parser().parse_args(["submit", "--optimizer-state", "average"])
    assert spec_from_args(a).optimizer_state == "average"
    assert spec_from_args(build_parser().parse_args(["submit"])).optimizer_state == "local"
    validate(JobSpec(optimizer_state="average"))
    with pytest.raises(InvalidSpec, match="fp32"):
        validate(JobSpec(optimizer_state="average", codec="int8"))
    c = build_parser().parse_args(["checkpoint", "job-1", "-o", "state.pt"])
    assert (c.job, str(c.output)) == ("job-1", "state.pt")


def test_the_coordinator_stores_the_training_state_beside_its_checkpoint_and_prunes_both(tmp_path) -> None:
    from dml.common.spec import JobSpec
    from dml.coordinator.records import Report
    from dml.coordinator.service import Clock, Coordinator, CoordinatorConfig
    from dml.coordinator.records import NotFound
    from dml.coordinator.store import MemoryStore
    from tests.unit.takekit import take_all

    now = [1000.0]
    coord = Coordinator(CoordinatorConfig(), MemoryStore(), tmp_path, clock=Clock(monotonic=lambda: now[0], wall=lambda: now[0]))
    a, b = coord.register("10.0.0.1:1", {})[0], coord.register("10.0.0.2:1", {})[0]
    jid = coord.submit(JobSpec(task="digits", num_shards=4, min_peers=2, rounds=3, local_steps=1, batch_size=8))
    take_all(coord, jid, [a, b])
    model, state, dig = _model_and_state(average=False)
    sha = hashlib.sha256(state).hexdigest()

    def commit(rnd: int, with_state: bool) -> None:
        job = coord.state.job(jid)
        coord.store_checkpoint(a, jid, rnd, job.epoch, dig, model, state if with_state else None, sha if with_state else "")
        for m in (a, b):
            now[0] += 0.1
            coord.report(m, jid, rnd, job.epoch, Report(samples=job.allocated(m), train_loss=1.0, digest=dig))

    with pytest.raises(NotFound, match="no checkpoint"):
        coord.training_state(jid)
    commit(1, with_state=True)
    rnd, got_sha, path = coord.training_state(jid)
    assert (rnd, got_sha) == (1, sha) and path.read_bytes() == state and path.parent == coord.checkpoint_path(jid, 1).parent
    commit(2, with_state=True)
    assert coord.training_state(jid)[0] == 2
    assert sorted(f.name for f in path.parent.iterdir()) == ["round-000002.pt", "state-000002.pt"]  # round 1's pruned
    commit(3, with_state=False)  # an upload without one: the checkpoint holds no training state
    with pytest.raises(NotFound, match="holds no training state"):
        coord.training_state(jid)
    assert coord.checkpoint(jid)[0] == 3
