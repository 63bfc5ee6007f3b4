"""How a ring round ends when its exchange fails: a cancelled or superseded exchange (our own
side dropped it) is not reported, a neighbour's fault names it, and a local error names us."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from dml.v1 import types_pb2

from dml.aggregation.transport import Cancelled, ExchangeError
from dml.peer import ring_round
from dml.peer.ring_round import RingRound


class _Link:
    bytes_sent = bytes_received = 0

    def open_early(self) -> None:
        pass

    def shutdown(self) -> None:
        self.shut = True


@pytest.mark.parametrize("error,reported", [
    (Cancelled("exchange superseded by a newer round"), None),
    (ExchangeError("stream from p1 broke", suspect="p1"), "p1"),
    (OSError(9, "Bad file descriptor"), "p0"),  # a local failure: this peer gives up its place
])
def test_only_real_failures_are_reported(monkeypatch, error, reported):
    reports: list[str] = []
    monkeypatch.setattr(ring_round, "report_failure", lambda peer, plan, suspect, detail: reports.append(suspect))
    peer = SimpleNamespace(peer_id="p0", metrics=SimpleNamespace(exchanged=lambda kind, sent, received: None),
                           config=SimpleNamespace(fault=None))
    rr = RingRound(peer, threading.Event(), lambda plan, rank: _Link(), gossip=None)  # type: ignore[arg-type]

    def fail(*_a: object) -> None:
        raise error

    monkeypatch.setattr(rr, "_train_and_average", fail)
    plan = types_pb2.Plan(job_id="j", round=3, epoch=2, members=[types_pb2.Member(peer_id="p0"), types_pb2.Member(peer_id="p1")])
    rr.run(plan)
    assert reports == ([] if reported is None else [reported])
    assert rr.under_way == ("", 0)
