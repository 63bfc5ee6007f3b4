"""The peer's parameter store: committed and tentative snapshots, promotion, digest checks and
what it serves to joiners. No sockets, no torch: a fake trainer holds a flat numpy buffer."""
from __future__ import annotations

import numpy as np

from dml.aggregation.averaging import digest
from dml.peer.params import ParamStore, Served, Snapshot, Start


class FakeTrainer:
    """What the store uses of a Trainer: a flat buffer, copies of it, its serialised form, and a
    training state (one counter)."""

    def __init__(self, n: int = 6, value: float = 1.0) -> None:
        self.flat = np.full(n, value, dtype=np.float32)
        self.steps = 0

    def params(self) -> np.ndarray:
        return self.flat.copy()

    def state_dict_bytes(self, params: np.ndarray | None = None) -> memoryview:
        return memoryview((self.flat if params is None else params).tobytes())

    def capture_state(self, into: dict | None = None) -> dict:
        return {"optimizer": {"steps": self.steps}}

    def round_digest(self, params: np.ndarray, state: dict | None, like: str = "") -> str:
        return digest(params)

    def set_params(self, params) -> None:
        self.flat[:] = np.asarray(params)

    def params_view(self) -> tuple[np.ndarray, bool]:
        return self.flat, True

    def state_bytes(self, state: dict, **meta) -> bytes:
        return repr((state, sorted(meta.items()))).encode()


def served(got: Served | None) -> tuple | None:
    """What :meth:`ParamStore.serve` gave, as (round, digest, model bytes)."""
    return None if got is None else (got.round, got.digest, bytes(got.model))


def started(value: float = 1.0) -> tuple[ParamStore, FakeTrainer, Snapshot]:
    """A store for job "j" whose committed round 0 is the trainer's initial parameters."""
    store, trainer = ParamStore(), FakeTrainer(value=value)
    init = trainer.params()
    snap = Snapshot("j", 0, init, digest(init))
    store.start("j", trainer, snap)  # type: ignore[arg-type]
    return store, trainer, snap


def finish_round(trainer: FakeTrainer, store: ParamStore, rnd: int, value: float) -> str:
    """Trains (sets the live buffer to ``value``) and records round ``rnd``'s result, as a peer does."""
    trainer.flat[:] = value
    dig = digest(trainer.flat)
    store.set_tentative(Snapshot("j", rnd, trainer.flat, dig, live=True))
    return dig


def test_a_new_job_serves_its_initial_parameters() -> None:
    store, trainer, init = started()
    assert store.trainer_for("j") is trainer and store.trainer_for("k") is None
    assert store.committed is init
    assert served(store.serve("j", 0)) == (0, init.digest, init.params.tobytes())
    assert store.serve("j", 1) is None
    assert store.serve("k", 0) is None


def test_nothing_is_served_without_a_trainer() -> None:
    assert ParamStore().serve("j", 0) is None
    store, _, _ = started()
    store.clear()
    assert store.serve("j", 0) is None
    assert store.committed is None and store.trainer_for("j") is None and store.trainer_for("") is None


def test_the_tentative_result_is_served_as_the_latest_and_by_its_round() -> None:
    store, trainer, init = started()
    dig = finish_round(trainer, store, 1, 2.0)
    assert served(store.serve("j", 0)) == (1, dig, np.full(6, 2.0, np.float32).tobytes())
    assert served(store.serve("j", 1)) == served(store.serve("j", 0))
    assert store.serve("j", 2) is None


def test_the_next_round_promotes_the_tentative_result_into_the_committed_array() -> None:
    store, trainer, init = started()
    base = init.params
    dig = finish_round(trainer, store, 1, 2.0)
    assert store.begin(1, dig) == Start(ready=True, in_place=True, dropped=False, promoted=True)
    got = store.committed
    assert got is not None and (got.job_id, got.round, got.digest, got.live) == ("j", 1, dig, False)
    assert got.params is base  # copied into the old committed array, no new allocation
    assert not np.shares_memory(got.params, trainer.flat)
    trainer.flat[:] = 3.0  # the next round trains: the committed copy stays
    assert np.array_equal(got.params, np.full(6, 2.0, np.float32)) and digest(got.params) == dig
    assert served(store.serve("j", 0)) == (1, dig, got.params.tobytes())


def test_promotion_copies_when_no_committed_array_fits() -> None:
    store, trainer = ParamStore(), FakeTrainer()
    store.start("j", trainer, None)  # type: ignore[arg-type]  # a gossip job: nothing committed yet
    dig = finish_round(trainer, store, 4, 5.0)
    assert store.begin(4, dig).ready
    got = store.committed
    assert got is not None and got.round == 4 and not np.shares_memory(got.params, trainer.flat)
    assert np.array_equal(got.params, trainer.flat)


def test_a_tentative_copy_is_promoted_as_it_is() -> None:
    store, _, _ = started()
    params = np.full(6, 7.0, np.float32)
    snap = Snapshot("j", 1, params, digest(params), live=False)  # an accelerator's host copy
    store.set_tentative(snap)
    assert store.begin(1, snap.digest) == Start(ready=True, in_place=False, dropped=False, promoted=True)
    assert store.committed is snap


def test_a_reissued_round_drops_the_tentative_result_and_restarts_from_committed() -> None:
    store, trainer, init = started()
    finish_round(trainer, store, 1, 2.0)
    assert store.begin(0, init.digest) == Start(ready=True, in_place=False, dropped=True)  # round 1 again
    assert store.committed is init and np.array_equal(init.params, np.ones(6, np.float32))
    assert store.serve("j", 1) is None


def test_a_tentative_result_with_another_digest_does_not_commit() -> None:
    store, trainer, init = started()
    finish_round(trainer, store, 1, 2.0)
    assert store.begin(1, "f" * 64) == Start(ready=False, in_place=False, dropped=True)
    assert store.committed is init  # the caller fetches round 1 from a member instead


def test_a_plan_without_a_digest_takes_the_tentative_result_of_its_round() -> None:
    store, trainer, _ = started()
    dig = finish_round(trainer, store, 1, 2.0)
    assert store.begin(1, "") == Start(ready=True, in_place=True, dropped=False, promoted=True)
    got = store.committed
    assert got is not None and got.digest == dig


def test_an_older_committed_round_is_not_a_starting_point() -> None:
    store, _, _ = started()
    assert store.begin(3, "") == Start(ready=False, in_place=False, dropped=False)  # a joiner fetches


def test_adopt_commits_only_parameters_with_the_wanted_digest() -> None:
    store, _, init = started()
    params = np.arange(6, dtype=np.float32)
    assert not store.adopt("j", 5, params, init.digest)
    assert store.committed is init
    assert store.adopt("j", 5, params, digest(params))
    got = store.committed
    assert got is not None and (got.round, got.digest) == (5, digest(params)) and got.params is params
    assert store.begin(5, digest(params)).ready


def test_keep_own_commits_the_trainers_parameters_unless_the_round_is_held() -> None:
    store, trainer = ParamStore(), FakeTrainer(value=4.0)
    store.keep_own("j", 7)  # no trainer: nothing to keep
    assert store.committed is None
    store.start("j", trainer, None)  # type: ignore[arg-type]
    store.keep_own("j", 7)
    got = store.committed
    assert got is not None and (got.job_id, got.round, got.digest) == ("j", 7, digest(trainer.flat))
    assert not np.shares_memory(got.params, trainer.flat)
    trainer.flat[:] = 9.0
    store.keep_own("j", 7)  # a re-issued closing round starts from the same parameters again
    assert store.committed is got
    store.keep_own("j", 8)  # another round is not held: kept anew
    got8 = store.committed
    assert got8 is not None and got8.round == 8 and np.array_equal(got8.params, trainer.flat)


def test_keep_own_leaves_a_tentative_result_alone() -> None:
    store, trainer, init = started()
    finish_round(trainer, store, 1, 2.0)
    store.keep_own("j", 1)
    assert store.committed is init


def test_a_new_job_replaces_the_old_one() -> None:
    store, trainer, _ = started()
    finish_round(trainer, store, 1, 2.0)
    other = FakeTrainer(value=8.0)
    store.start("k", other, None)  # type: ignore[arg-type]
    assert store.trainer_for("j") is None and store.trainer_for("k") is other
    assert store.serve("j", 0) is None and store.serve("k", 0) is None and store.committed is None


def finish_with_state(trainer: FakeTrainer, store: ParamStore, rnd: int, value: float, steps: int) -> tuple[str, dict]:
    """Like :func:`finish_round`, with a training state (``steps``) captured into a spare."""
    trainer.flat[:] = value
    dig = digest(trainer.flat)
    state = {"optimizer": {"steps": steps}}
    store.set_tentative(Snapshot("j", rnd, trainer.flat, dig, live=True, state=state))
    return dig, state


def test_the_training_state_moves_with_its_parameters() -> None:
    store, trainer = ParamStore(), FakeTrainer()
    init_state = {"optimizer": {"steps": 0}}
    store.start("j", trainer, Snapshot("j", 0, trainer.params(), digest(trainer.flat), state=init_state))  # type: ignore[arg-type]
    dig, state1 = finish_with_state(trainer, store, 1, 2.0, steps=5)
    assert store.begin(1, dig).promoted
    got = store.committed
    assert got is not None and got.state is state1
    assert store.spare_state() is init_state  # the old committed state: the next capture goes into it
    assert store.spare_state() is None  # taken once
    _, state2 = finish_with_state(trainer, store, 2, 3.0, steps=10)
    start = store.begin(1, dig)  # round 2 re-issued: from round 1 again
    assert start.dropped and not start.promoted and store.committed is got and got.state is state1
    assert store.spare_state() is state2  # the dropped result's state is free again


def test_serve_sends_the_training_state_only_when_asked_and_held() -> None:
    store, trainer = ParamStore(), FakeTrainer()
    store.start("j", trainer, Snapshot("j", 0, trainer.params(), digest(trainer.flat)))  # type: ignore[arg-type]
    plain = store.serve("j", 0)
    assert plain is not None and plain.state is None
    assert store.serve("j", 0, training_state=True) is None  # held without a state: not served as if it had one
    dig, state = finish_with_state(trainer, store, 1, 2.0, steps=5)
    got = store.serve("j", 1, training_state=True)
    assert got is not None and (got.round, got.digest) == (1, dig)
    assert got.state == trainer.state_bytes(state, job_id="j", round=1)
    import hashlib

    assert got.state_sha256 == hashlib.sha256(got.state).hexdigest()


def test_adopt_keeps_the_downloaded_state_and_a_digest_computed_by_the_caller() -> None:
    store, _, init = started()
    params = np.arange(6, dtype=np.float32)
    state = {"optimizer": {"steps": 3}}
    assert not store.adopt("j", 5, params, "a" * 64, state=state, got="b" * 64)
    assert store.committed is init
    assert store.adopt("j", 5, params, "a" * 64, state=state, got="a" * 64)
    got = store.committed
    assert got is not None and got.state is state and got.digest == "a" * 64
