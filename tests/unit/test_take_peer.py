"""The peer's side of a take: what it tells the coordinator of a task's data (counts, labels
from ``labels=`` or the dataset's integer targets, the digest), and what it answers when the
task fails or the labels are wrong."""
from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from dml.v1 import control_pb2, types_pb2

import dml
from dml.common.sampling import MAX_LABELS, labels_digest
from dml.common.spec import JobSpec, spec_to_pb
from dml.common.task import ArrayDataset
from dml.common.tasks import builtin_data
from dml.peer.datacache import ChunkCache
from dml.peer.params import ParamStore
from dml.peer.workers import WorkerHost
from dml.peer.take import describe, label_problem, prepare, training_labels
from dml.peer.trainer import TaskError, Trainer

X = np.random.default_rng(0).standard_normal((30, 3)).astype(np.float32)
Y = np.arange(30) % 3


def trainer(**kw: object) -> Trainer:
    fields: dict[str, object] = dict(model=lambda: torch.nn.Linear(3, 3), train=lambda ctx: ArrayDataset(X, Y))
    fields.update(kw)
    return Trainer(dml.Task(**fields), seed=0, lr=0.1)  # type: ignore[arg-type]


def test_labels_are_the_tasks_own_else_the_integer_targets_of_an_array_dataset_else_none() -> None:
    assert training_labels(trainer()).tolist() == Y.tolist()
    own = (np.arange(30) % 2).tolist()
    assert training_labels(trainer(labels=lambda ctx: own)).tolist() == own
    floats = trainer(train=lambda ctx: ArrayDataset(X, Y.astype(np.float32)), loss=lambda o, y: o.sum() * 0)
    assert training_labels(floats) is None, "regression targets are no labels"

    class Items:
        def __len__(self) -> int:
            return 30

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.from_numpy(X[i]), int(Y[i])

    assert training_labels(trainer(train=lambda ctx: Items())) is None, "an item dataset's labels need labels="


@pytest.mark.parametrize("labels,words", [
    (lambda ctx: [0] * 29, "29 labels for 30 training samples"),
    (lambda ctx: [-1] + [0] * 29, "must not be negative"),
    (lambda ctx: np.zeros((30, 2), np.int64), "1-D"),
    (lambda ctx: np.zeros(30, np.float32), "integers"),
    (lambda ctx: 1 / 0, "labels(ctx) raised ZeroDivisionError"),
])
def test_labels_that_are_not_one_int_per_sample_are_the_tasks_error(labels: object, words: str) -> None:
    with pytest.raises(TaskError, match=re.escape(words)):
        training_labels(trainer(labels=labels))


def test_the_description_carries_counts_labels_and_their_digest() -> None:
    t = trainer(test=lambda ctx: ArrayDataset(X[:7], Y[:7]), batch_size=5)
    d = describe(t)
    blob = Y.astype("<i4").tobytes()
    assert (d.train_samples, d.test_samples, d.num_classes, d.batch_size, d.num_params) == (30, 7, 3, 5, 12)
    assert d.labels == blob and d.data_digest == labels_digest(30, blob)
    assert label_problem(np.zeros(MAX_LABELS + 1, np.int32), MAX_LABELS + 1) == ""
    unlabelled = describe(trainer(train=lambda ctx: ArrayDataset(X, Y.astype(np.float32)), loss=lambda o, y: o.sum()))
    assert unlabelled.labels == b"" and unlabelled.num_classes == 0 and unlabelled.data_digest == labels_digest(30, b"")


def fake_peer(cache_max_bytes: int = 0) -> types.SimpleNamespace:
    return types.SimpleNamespace(peer_id="peer-1", store=ParamStore(), config=types.SimpleNamespace(device="cpu", data_dir=None),
                                 data_cache=ChunkCache(max_bytes=cache_max_bytes), workers=WorkerHost(1))


def plan(task: str, aggregation: str = "ring") -> types_pb2.Plan:
    return types_pb2.Plan(job_id="job-1", take=True, spec=spec_to_pb(JobSpec(task=task, aggregation=aggregation)))


def test_a_ready_take_keeps_the_trainer_for_the_jobs_rounds() -> None:
    peer = fake_peer()
    req = prepare(peer, plan("digits"))  # type: ignore[arg-type]
    assert req.outcome == control_pb2.TAKE_OUTCOME_READY
    assert req.data.train_samples == builtin_data("digits").y_train.size
    held = peer.store.trainer_for("job-1")
    assert held is not None and peer.store.committed is not None and peer.store.committed.round == 0
    again = prepare(peer, plan("digits"))  # type: ignore[arg-type]
    assert again.data == req.data and peer.store.trainer_for("job-1") is held, "loaded once"


def test_a_ready_take_of_local_data_says_so_and_caches_no_shard() -> None:
    """A local job's take carries its data usage: source local, nothing fetched, no shard cached;
    the cache's free bytes go with it when the cache is limited, and not when it is not."""
    peer = fake_peer(cache_max_bytes=1000)
    try:
        req = prepare(peer, plan("digits"))  # type: ignore[arg-type]
    finally:
        peer.data_cache.close()
    assert req.outcome == control_pb2.TAKE_OUTCOME_READY and req.HasField("data_usage")
    u = req.data_usage
    assert u.source == control_pb2.DATA_SOURCE_LOCAL and list(u.cached_shard_ids) == []
    assert (u.chunks_fetched, u.bytes_fetched, u.cache_hits, u.damaged_refetched) == (0, 0, 0, 0)
    assert req.has_cache_free and req.cache_free_bytes == 1000
    unlimited = prepare(fake_peer(), plan("digits"))  # type: ignore[arg-type]
    assert unlimited.HasField("data_usage") and not unlimited.has_cache_free


def test_a_task_that_cannot_be_loaded_is_a_task_error_with_its_message() -> None:
    peer = fake_peer()
    req = prepare(peer, plan("no_such_module_here:task"))  # type: ignore[arg-type]
    assert req.outcome == control_pb2.TAKE_OUTCOME_TASK_ERROR
    assert req.detail.startswith("importing no_such_module_here raised ModuleNotFoundError")
    assert peer.store.trainer_for("job-1") is None


def test_a_task_errors_detail_is_its_message_with_the_innermost_frames_bounded() -> None:
    from dml.peer.step import MAX_TASK_ERROR_CHARS, task_error_detail

    def users_code() -> None:
        raise KeyError("x" * 10)

    try:
        try:
            users_code()
        except KeyError as inner:
            raise TaskError(f"train(ctx) raised KeyError: {inner}") from inner
    except TaskError as e:
        detail = task_error_detail(e)
    first, *frames = detail.split("\n")
    assert first == "train(ctx) raised KeyError: 'xxxxxxxxxx'"
    assert "in users_code" in detail and 'raise KeyError("x" * 10)' in detail
    already = TaskError('train(ctx) raised KeyError: 1\n  File "t.py", line 2, in f: raise KeyError(1)')
    assert task_error_detail(already) == str(already), "frames the message carries are not repeated"
    assert len(task_error_detail(TaskError("y" * 5000))) == MAX_TASK_ERROR_CHARS


def test_a_local_jobs_take_sends_label_counts_and_never_the_labels() -> None:
    from dml.peer.take import MAX_LABEL_COUNTS

    d = describe(trainer(), local=True)
    assert d.labels == b"" and list(d.label_counts) == [10, 10, 10] and d.num_classes == 3
    assert d.train_samples == 30 and d.data_digest == labels_digest(30, np.asarray(Y, dtype="<i4").tobytes())
    wide = trainer(train=lambda ctx: ArrayDataset(X, np.full(30, MAX_LABEL_COUNTS)), loss=lambda o, y: o.sum() * 0)
    assert list(describe(wide, local=True).label_counts) == [] and describe(wide, local=True).labels == b""
    assert describe(trainer()).labels, "a shared job's take still sends the labels"


def test_a_local_plans_samples_index_the_members_own_data() -> None:
    from dml.common.sampling import shard_order
    from dml.peer.step import sample_indices

    plan = types_pb2.Plan(spec=types_pb2.JobSpec(placement="local", local_data="c", seed=3), members=[
        types_pb2.Member(peer_id="p", shard_ids=[5], samples=[types_pb2.SampleRange(shard_id=5, start=4, stop=9,
                                                                                  data_epoch=2)])])
    got = sample_indices(plan, 0, own_samples=12)
    assert got.tolist() == shard_order(np.arange(12), 3, 2, 5)[4:9].tolist()
    with pytest.raises(ValueError, match="own data has 8"):
        sample_indices(plan, 0, own_samples=8)


def test_a_tls_peer_declines_a_torch_plane_job_unless_started_to_allow_it() -> None:
    torch_plan = types_pb2.Plan(job_id="job-1", take=True, spec=spec_to_pb(JobSpec(data_plane="torch")))
    for allowed, outcome in ((False, control_pb2.TAKE_OUTCOME_DECLINED), (True, control_pb2.TAKE_OUTCOME_READY)):
        peer = fake_peer()
        peer.config.tls, peer.config.allow_torch_plane = object(), allowed
        req = prepare(peer, torch_plan)  # type: ignore[arg-type]
        assert req.outcome == outcome, req
    assert "--allow-torch-plane" in prepare(  # type: ignore[arg-type]
        types.SimpleNamespace(**{**vars(fake_peer()), "config": types.SimpleNamespace(
            device="cpu", data_dir=None, tls=object(), allow_torch_plane=False)}), torch_plan).detail
