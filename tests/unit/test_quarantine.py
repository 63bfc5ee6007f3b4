"""Poisoned peers at the coordinator: a POISONED report quarantines its suspect for the job (the
reporter itself when it names itself: its own update was not finite), the round is re-run
without it, it never comes back to the job, the quarantine survives a restart; reports' metrics are validated; a checkpoint counts
only when its bytes and its uploader's report match the committed digest."""
from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import pytest

from dml.aggregation.averaging import digest
from dml.coordinator.checkpoint import BadCheckpoint, verify_checkpoint
from dml.coordinator.records import QUARANTINED, SELF_REPORT, BadReport, Forbidden, Report, check_report
from dml.coordinator.state import POISONED
from dml.coordinator.store import MemoryStore, job_from_dict, job_to_dict
from tests.unit.test_state import register, report_all, rep, running


def test_a_poisoned_report_quarantines_the_suspect_and_reruns_the_round_without_it() -> None:
    s, job, (a, b, c) = running(3)
    addr_b = s.peers[b].address
    ch = s.report_failure(c, job.job_id, 1, 1, b, 900, "3 non-finite values", POISONED)
    assert ch.removed_peers == (b,)
    assert job.members == [a, c] and job.epoch == 2 and job.round == 1
    (q,) = job.quarantined
    assert (q.peer_id, q.address, q.round, q.reporters) == (b, addr_b, 1, c)
    assert "sent non-finite or absurd values to" in q.reason and "3 non-finite values" in q.reason
    assert job.evictions[-1].cause == QUARANTINED and job.evictions[-1].reporter == c
    # The same peer restarted (same address, new id) is not let back into the job...
    s.register(addr_b, {"device": "cpu"}, 950)
    report_all(s, job, 1000)
    assert job.committed_round == 1 and job.members == [a, c]
    # ...while a new machine is.
    (d,) = register(s, 1, 1010)
    report_all(s, job, 1100)
    assert job.members == [a, c, d]


def test_a_member_reporting_its_own_update_poisoned_is_quarantined_as_itself_never_by_another() -> None:
    s, job, (a, b, c) = running(3)
    s.report_failure(b, job.job_id, 1, 1, b, 900, "own update not finite", POISONED)
    (q,) = job.quarantined
    assert q.peer_id == b and q.reporters == b and "its own parameters or update were not finite" in q.reason
    assert "sent" not in q.reason
    assert b not in job.members and job.evictions[-1].cause == QUARANTINED


def test_a_local_error_gives_up_the_place_without_quarantine() -> None:
    s, job, (a, b, c) = running(3)
    s.report_failure(b, job.job_id, 1, 1, b, 900, "out of memory", "LOCAL")
    assert job.quarantined == [] and b not in job.members and job.evictions[-1].cause == SELF_REPORT


def test_poison_reports_from_outsiders_or_about_outsiders_are_refused() -> None:
    s, job, (a, b) = running(2)
    (idle,) = register(s, 1, 10)  # registered after the job took its peers: not a member
    with pytest.raises(Forbidden):
        s.report_failure(idle, job.job_id, 1, 1, a, 20, "lies", POISONED)
    with pytest.raises(Forbidden):
        s.report_failure(a, job.job_id, 1, 1, idle, 21, "lies", POISONED)
    assert s.report_failure(a, job.job_id, 1, 5, b, 22, "epoch from the future", POISONED).jobs == ()
    assert job.quarantined == [] and job.members == [a, b]


def test_a_late_poison_report_from_an_older_epoch_still_counts() -> None:
    s, job, (a, b, c) = running(3)
    s.report_failure(a, job.job_id, 1, 1, "", 10)  # epoch 2 for an unrelated reason
    assert job.epoch == 2
    s.report_failure(c, job.job_id, 1, 1, b, 11, "NaN", POISONED)
    assert [q.peer_id for q in job.quarantined] == [b] and job.members == [a, c]


def test_unreachable_reports_never_quarantine() -> None:
    s, job, (a, b, c) = running(3)
    s.report_failure(a, job.job_id, 1, 1, b, 900, "stream broke", "UNREACHABLE")
    assert job.quarantined == []


def test_quarantine_in_a_gossip_job() -> None:
    s, job, (a, b, c) = running(3, aggregation="gossip")
    assert job.gossip.active
    s.report_failure(a, job.job_id, 1, job.epoch, b, 10, "NaN offer", POISONED)
    assert [q.peer_id for q in job.quarantined] == [b] and job.members == [a, c]


def test_quarantines_survive_a_restart() -> None:
    s, job, (a, b, c) = running(3)
    s.report_failure(c, job.job_id, 1, 1, b, 900, "NaN", POISONED)
    store = MemoryStore()
    store.save([job], [], [], [])
    (back,), _ = store.load()
    assert back.quarantined == job.quarantined
    d = job_to_dict(job)
    del d["quarantined"]  # a job saved before quarantines existed
    assert job_from_dict(d, []).quarantined == []


@pytest.mark.parametrize("field,value", [
    ("test_accuracy", 1.5), ("test_accuracy", -0.1), ("test_accuracy", math.inf),
    ("train_loss", math.inf), ("train_loss", -math.inf), ("test_loss", -math.inf), ("test_loss", math.inf),
    ("samples_per_s", -5.0), ("samples_per_s", math.inf), ("pair_distance", math.inf),
    ("update_norm", math.nan), ("update_norm", math.inf), ("update_norm", -1.0),
    ("train_ms", 10**15), ("bytes_sent", 1 << 60),
])
def test_out_of_range_metrics_are_refused(field: str, value: float) -> None:
    r = Report(samples=10, train_loss=1.0, digest="d", test_accuracy=0.5, test_loss=0.5)
    setattr(r, field, value)
    with pytest.raises(BadReport, match=field if field != "samples_per_s" else "train_samples_per_s"):
        check_report(r)
    s, job, (a, b) = running(2)
    with pytest.raises(BadReport):
        s.report(a, job.job_id, 1, 1, r, 10)
    assert a not in job.reports


def test_a_users_loss_may_be_negative() -> None:
    """A task's own loss (a log-likelihood, a contrastive loss) can be below zero."""
    check_report(Report(samples=10, train_loss=-3.5, digest="d", test_accuracy=0.5, test_loss=-1e6))


@pytest.mark.parametrize("metrics,match", [
    ({"f1": math.inf}, "test metric 'f1'"), ({"f1": -math.inf}, "test metric 'f1'"),
    ({"": 0.5}, "1 to 64 characters"), ({"x" * 65: 0.5}, "1 to 64 characters"),
    ({f"m{i}": 0.5 for i in range(17)}, "at most 16 test metrics"),
])
def test_bad_task_metrics_are_refused(metrics: dict[str, float], match: str) -> None:
    r = Report(samples=10, train_loss=1.0, digest="d", test_accuracy=0.5, test_loss=0.5, test_metrics=metrics)
    with pytest.raises(BadReport, match=match):
        check_report(r)


def test_task_metrics_may_be_any_finite_number_or_nan() -> None:
    check_report(Report(samples=10, train_loss=1.0, digest="d", test_accuracy=0.5, test_loss=0.5,
                        test_metrics={"f1": 0.9, "log_lik": -12.5, "perplexity": 1e9, "auc": math.nan,
                                      "x" * 64: 0.0, **{f"m{i}": 1.0 for i in range(11)}}))


def test_nan_metrics_are_allowed_and_kept() -> None:
    check_report(Report(samples=10, train_loss=math.nan, digest="d", test_accuracy=math.nan, test_loss=math.nan,
                        samples_per_s=math.nan, pair_distance=math.nan))
    s, job, (a, b) = running(2)
    for m in (a, b):
        s.report(m, job.job_id, 1, 1, Report(samples=job.allocated(m), train_loss=math.nan, digest="d"), 10)
    assert job.committed_round == 1 and math.isnan(job.history[-1].train_loss)


def test_nan_loss_reaches_status_as_nan_not_zero() -> None:
    from dml.client.api import status_dict
    from dml.client.cli import fmt_metric
    from dml.coordinator.servicer import job_to_pb, round_to_pb

    s, job, (a, b) = running(2)
    for m in (a, b):
        s.report(m, job.job_id, 1, 1, Report(samples=job.allocated(m), train_loss=math.nan, digest="d",
                                             test_accuracy=0.5 if m == a else None,
                                             test_loss=math.nan if m == a else None), 10)
    assert math.isnan(round_to_pb(job.history[-1]).train_loss)
    d = status_dict(job_to_pb(job))
    assert math.isnan(d["metrics"]["train_loss"]) and math.isnan(d["metrics"]["test_loss"])
    assert fmt_metric(d["metrics"]["train_loss"]) == "NaN" and fmt_metric(None) == "-"


def test_status_lists_quarantined_peers_with_their_reasons() -> None:
    from dml.client.api import status_dict
    from dml.client.cli import quarantine_lines, status_line
    from dml.coordinator.servicer import job_to_pb

    s, job, (a, b, c) = running(3)
    s.report_failure(c, job.job_id, 1, 1, b, 900, "RMS 1e+30", POISONED)
    st = job_to_pb(job)
    d = status_dict(st)
    assert [(q["peer_id"], q["round"], q["reporters"]) for q in d["quarantined"]] == [(b, 1, c)]
    (line,) = quarantine_lines(st)
    assert b in line and "RMS 1e+30" in line and c in line
    assert f"quarantined {b}" in status_line(st)


# -- checkpoints --------------------------------------------------------------------------------
def _state_dict_bytes(flat: np.ndarray) -> bytes:
    import torch

    base = torch.from_numpy(flat)
    sd = {"w": base[:6].view(2, 3), "b": base[6:], "steps": torch.tensor(3)}
    f = io.BytesIO()
    torch.save(sd, f)
    return f.getvalue()


def test_checkpoint_bytes_must_hold_the_claimed_digest() -> None:
    flat = np.arange(10, dtype=np.float32)
    data = _state_dict_bytes(flat)
    verify_checkpoint(data, digest(flat))
    with pytest.raises(BadCheckpoint, match="hashes to its claimed digest"):
        verify_checkpoint(data, digest(np.zeros(10, dtype=np.float32)))  # an all-zero model's digest
    with pytest.raises(BadCheckpoint, match="not a torch state_dict"):
        verify_checkpoint(b"not a zip at all", digest(flat))
    with pytest.raises(BadCheckpoint):
        verify_checkpoint(_state_dict_bytes(np.zeros(10, dtype=np.float32)), digest(flat))
    # A round committed before digests were BLAKE3 (a persisted sha256 one) still verifies, and
    # still only for its own bytes; a large model's storage hashes across many read blocks.
    legacy = hashlib.sha256(flat.tobytes()).hexdigest()
    verify_checkpoint(data, legacy)
    with pytest.raises(BadCheckpoint, match="hashes to its claimed digest"):
        verify_checkpoint(data, hashlib.sha256(np.zeros(10, dtype=np.float32).tobytes()).hexdigest())
    big = np.random.default_rng(0).standard_normal(5_000_000).astype(np.float32)  # 20 MB: 3 blocks
    verify_checkpoint(_state_dict_bytes(big), digest(big))


def test_a_checkpoint_counts_only_if_its_uploader_reported_the_committed_digest() -> None:
    s, job, (a, b) = running(2, checkpoint_every_rounds=1)
    s.checkpoint_uploaded(a, job.job_id, 1, 1, "good", 5)
    report_all(s, job, 10, ["good", "good"])
    assert job.checkpoint_round == 1 and job.checkpoint_digest == "good"
    # Round 2: the uploader claims the digest the others commit, but reported another itself.
    s.checkpoint_uploaded(a, job.job_id, 2, job.epoch, "other", 15)
    s.report(a, job.job_id, 2, job.epoch, rep("mine", samples=job.allocated(a)), 16)
    s.report(b, job.job_id, 2, job.epoch, rep("other", samples=job.allocated(b)), 17)
    assert job.committed_round == 1, "digests disagree: no commit"
    s.checkpoint_uploaded(b, job.job_id, 2, job.epoch, "agreed", 18)
    s.report(a, job.job_id, 2, job.epoch, rep("agreed", samples=job.allocated(a)), 19)
    s.report(b, job.job_id, 2, job.epoch, rep("agreed", samples=job.allocated(b)), 20)
    assert job.committed_round == 2 and job.checkpoint_round == 2 and job.checkpoint_digest == "agreed"
