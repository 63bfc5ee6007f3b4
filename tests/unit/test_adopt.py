"""Every way a peer adopts downloaded parameters (from a member's FetchParameters or the
coordinator's checkpoint) goes through the same two checks: the claim must match the plan's
start digest (``ring_round.acceptable``), and the bytes must hash to it (``RingRound._adopt``),
checked before the trainer is touched."""
from __future__ import annotations

import threading
import types

import numpy as np
import pytest
from dml.v1 import types_pb2

from dml.aggregation.averaging import digest
from dml.common.tasks import get_task
from dml.peer.params import ParamStore, Snapshot
from dml.peer.ring_round import RingRound, acceptable
from dml.peer.trainer import Trainer


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    return Trainer(get_task("digits"), seed=0, lr=0.1)


def _round(trainer: Trainer) -> tuple[RingRound, ParamStore]:
    store = ParamStore()
    init = trainer.params()
    store.start("job-1", trainer, Snapshot("job-1", 0, init, digest(init)))
    peer = types.SimpleNamespace(peer_id="peer-1", store=store)
    return RingRound(peer, threading.Event(), lambda plan, rank: None, None), store  # type: ignore[arg-type]


def test_a_claim_must_match_the_plans_start_digest_and_round() -> None:
    plan = types_pb2.Plan(job_id="job-1", round=6, start_digest="abc")
    assert acceptable(plan, 5, 5, "abc")
    assert not acceptable(plan, 5, 5, "abd"), "another digest than the committed one"
    assert not acceptable(plan, 5, 4, "abc"), "another round"
    gossip_close = types_pb2.Plan(job_id="job-1", round=6, start_digest="")
    assert acceptable(gossip_close, 5, 5, "abd") and not acceptable(gossip_close, 5, 5, "")


def test_bytes_that_do_not_hash_to_the_claim_are_refused_and_leave_the_trainer_alone(trainer: Trainer) -> None:
    rr, store = _round(trainer)
    before = trainer.params()
    other = np.full(trainer.numel, 0.25, dtype=np.float32)
    data = bytes(trainer.state_dict_bytes(other))
    assert not rr._adopt("job-1", 5, trainer, digest(before), data, "a liar")
    assert trainer.params().tobytes() == before.tobytes() and store.committed.round == 0
    assert not rr._adopt("job-1", 5, trainer, digest(other), b"garbage", "a broken source")
    assert trainer.params().tobytes() == before.tobytes()
    assert rr._adopt("job-1", 5, trainer, digest(other), data, "an honest member")
    assert trainer.params().tobytes() == other.tobytes() and store.committed.round == 5
    assert store.committed.digest == digest(other)
