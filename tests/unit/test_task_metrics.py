"""A task's own test metrics: computed by the trainer over the whole test set, validated and
kept by the coordinator on its round records (ring and gossip), persisted, and shown by the
client (status JSON, the progress line, the history table)."""
from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch

from dml.client.api import history_dict, status_dict
from dml.client.cli import history_table, status_line
from dml.common.task import MAX_METRICS, ArrayDataset, Task
from dml.coordinator.records import Report
from dml.coordinator.servicer import job_to_pb, round_to_pb
from dml.coordinator.store import MemoryStore, SqliteStore, job_from_dict, job_to_dict
from dml.peer.trainer import TaskError, Trainer, add_metrics
from tests.unit import test_state as ring
from tests.unit import test_state_gossip as gossip


# -- the trainer -----------------------------------------------------------------------------
def test_a_number_is_a_batch_mean_and_a_pair_a_ratio_of_sums() -> None:
    sums: dict = {}
    add_metrics(sums, {"mean": 0.5, "ratio": (1, 4), "t": torch.tensor(2.0)}, 10)
    add_metrics(sums, {"mean": 1.0, "ratio": (3, 4), "t": np.float32(4.0)}, 30)
    got = {k: num / den for k, (_, num, den) in sums.items()}
    assert got == {"mean": pytest.approx((0.5 * 10 + 1.0 * 30) / 40), "ratio": 0.5, "t": pytest.approx(3.5)}


@pytest.mark.parametrize("metrics,match", [
    ([("a", 1.0)], "must return a dict"),
    ({"a": "high"}, "'a' must be a number or a pair"),
    ({"a": (1, 2, 3)}, "a pair \\(numerator, denominator\\), got 3 values"),
    ({"a": math.inf}, "'a' is inf"),
    ({"a": (1, -math.inf)}, "'a' is -inf"),
    ({"": 1.0}, "a metric's name must be a string of 1 to 64"),
    ({"x" * 65: 1.0}, "a metric's name must be a string of 1 to 64"),
    ({3: 1.0}, "a metric's name must be a string"),
    ({f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}, "at most 16 metrics"),
])
def test_bad_metrics_are_the_tasks_error(metrics: object, match: str) -> None:
    with pytest.raises(TaskError, match=match):
        add_metrics({}, metrics, 4)


def test_a_metric_may_not_switch_between_a_number_and_a_pair() -> None:
    sums: dict = {}
    add_metrics(sums, {"a": 1.0}, 4)
    with pytest.raises(TaskError, match="a number in some batches and a pair in others"):
        add_metrics(sums, {"a": (1, 2)}, 4)


def linear_task(metrics: object) -> Task:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    data = ArrayDataset(x, y)
    return Task(model=lambda: torch.nn.Linear(4, 2), train=lambda ctx: data, test=lambda ctx: data,
                metrics=metrics)  # type: ignore[arg-type]


def test_evaluate_gives_the_whole_test_sets_ratio_and_nan_for_an_empty_one() -> None:
    def metrics(out: torch.Tensor, y: torch.Tensor) -> dict:
        hit = out.argmax(1) == y
        return {"hits_of_class_1": (int((hit & (y == 1)).sum()), int((y == 1).sum())),
                "never": (0, 0), "mean_hit": hit.float().mean()}

    tr = Trainer(linear_task(metrics), seed=0, lr=0.1)
    ev = tr.evaluate(batch_size=7)
    x, y = tr.test_data.get(np.arange(50))
    with torch.no_grad():
        hit = tr.model(x).argmax(1) == y
    assert ev.metrics["hits_of_class_1"] == pytest.approx(float(hit[y == 1].float().mean()))
    assert math.isnan(ev.metrics["never"])
    assert ev.metrics["mean_hit"] == pytest.approx(float(hit.float().mean())) == pytest.approx(ev.accuracy)


def test_an_accuracy_metric_replaces_dmls_and_must_be_a_fraction() -> None:
    ev = Trainer(linear_task(lambda out, y: {"accuracy": 0.25}), seed=0, lr=0.1).evaluate()
    assert ev.accuracy == 0.25 and "accuracy" not in ev.metrics
    with pytest.raises(TaskError, match=r"accuracy must be in \[0, 1\], got 25"):
        Trainer(linear_task(lambda out, y: {"accuracy": 25}), seed=0, lr=0.1).evaluate()


# -- the coordinator: ring rounds ------------------------------------------------------------
def report(job, m: str, acc: float | None = None, metrics: dict | None = None) -> Report:  # type: ignore[no-untyped-def]
    return Report(samples=job.allocated(m), train_loss=1.0, digest="d", test_accuracy=acc,
                  test_loss=None if acc is None else 0.5, test_metrics=metrics or {})


def test_a_ring_round_keeps_the_evaluators_metrics_and_carries_them_to_unevaluated_rounds() -> None:
    s, job, (a, b) = ring.running(2)
    s.report(a, job.job_id, 1, job.epoch, report(job, a, 0.8, {"f1": 0.7, "nll": -2.0}), 10)
    s.report(b, job.job_id, 1, job.epoch, report(job, b), 10)
    r1 = job.history[-1]
    assert r1.test_evaluated and r1.test_metrics == {"f1": 0.7, "nll": -2.0}
    for m in (a, b):
        s.report(m, job.job_id, 2, job.epoch, report(job, m), 20)
    r2 = job.history[-1]
    assert r2.round == 2 and not r2.test_evaluated and r2.test_metrics == {"f1": 0.7, "nll": -2.0}
    r2.test_metrics["f1"] = 0.0
    assert r1.test_metrics["f1"] == 0.7  # a copy, not the same dict


def test_gossip_virtual_rounds_average_each_metric_over_the_steps_that_reported_it() -> None:
    s, job, (a, b, c) = gossip.running(3, rounds=10)
    for p, acc, metrics in ((a, 0.5, {"f1": 0.2, "only_a": 1.0}), (b, None, None), (c, 0.7, {"f1": 0.6})):
        r = Report(samples=job.allocated(p), train_loss=1.0, digest="", test_accuracy=acc,
                   test_loss=None if acc is None else 0.5, test_metrics=metrics or {})
        s.report(p, job.job_id, job.gossip.step[p], job.epoch, r, 100)
    (r1,) = job.history
    assert r1.test_metrics == {"f1": pytest.approx(0.4), "only_a": 1.0}
    for _ in range(3):
        gossip.step(s, job, a, 200)
    r2 = job.history[-1]
    assert r2.round == 2 and not r2.test_evaluated and r2.test_metrics == r1.test_metrics


def test_metrics_survive_the_store(tmp_path: pathlib.Path) -> None:
    s, job, (a, b) = ring.running(2)
    s.report(a, job.job_id, 1, job.epoch, report(job, a, 0.8, {"f1": 0.7}), 10)
    s.report(b, job.job_id, 1, job.epoch, report(job, b), 10)
    s.report(a, job.job_id, 2, job.epoch, report(job, a, 0.9, {"f1": 0.75}), 20)  # pending: on the job
    back = job_from_dict(job_to_dict(job), list(job.history))
    assert back.reports[a].test_metrics == {"f1": 0.75}
    for store in (MemoryStore(), SqliteStore(tmp_path / "state")):
        store.save([job], [], [], [(job.job_id, r) for r in job.history])
        (j,) = [x for x in store.load()[0] if x.job_id == job.job_id]
        assert j.history[0].test_metrics == {"f1": 0.7} and j.reports[a].test_metrics == {"f1": 0.75}
        store.close()


# -- the wire and the client -----------------------------------------------------------------
def test_status_json_progress_line_and_history_show_the_tasks_metrics() -> None:
    s, job, (a, b) = ring.running(2)
    s.report(a, job.job_id, 1, job.epoch, report(job, a, 0.8, {"recall": 0.93, "f1": math.nan}), 10)
    s.report(b, job.job_id, 1, job.epoch, report(job, b), 10)
    for m in (a, b):
        s.report(m, job.job_id, 2, job.epoch, report(job, m), 20)
    pb = job_to_pb(job)
    d = status_dict(pb)
    assert d["metrics"]["test_metrics"]["recall"] == pytest.approx(0.93) and math.isnan(d["metrics"]["test_metrics"]["f1"])
    assert list(d["metrics"]["test_metrics"]) == ["f1", "recall"]
    assert "acc 0.8000 f1 NaN recall 0.9300" in status_line(pb)
    hist = [round_to_pb(r) for r in job.history]
    assert history_dict(hist[0])["test_metrics"]["recall"] == pytest.approx(0.93)
    head, r1, r2 = history_table(hist)
    assert head.split()[-2:] == ["F1", "RECALL"]
    assert r1.split()[-2:] == ["NaN", "0.9300"]
    assert r2.split()[-2:] == ["-", "-"]  # not evaluated in round 2: shown as not measured
