"""The windowed training / exchanging / idle shares of a peer's last minute (pure)."""
from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dml.coordinator.utilisation import MAX_ACTIVITIES, Activity, Shares, note, shares


def test_no_reports_is_all_idle() -> None:
    assert shares([], 60_000) == Shares(0.0, 0.0, 1.0)


def test_a_report_is_laid_out_training_then_exchange_then_eval_ending_at_its_arrival() -> None:
    s = shares([Activity(end_ms=60_000, train_ms=20_000, exchange_ms=10_000, eval_ms=6_000)], 60_000)
    assert (s.training, s.exchanging, s.idle) == pytest.approx((26 / 60, 10 / 60, 24 / 60))


def test_only_the_window_counts() -> None:
    # Ended 50 s ago after 20 s of training: 10 s of it lies in the window.
    s = shares([Activity(end_ms=10_000, train_ms=20_000, exchange_ms=0)], 60_000, window_ms=60_000)
    assert s.training == pytest.approx(10 / 60)
    assert shares([Activity(end_ms=0, train_ms=5_000, exchange_ms=5_000)], 60_000).idle == 1.0


def test_overlapping_reports_count_each_moment_once_training_first() -> None:
    acts = [Activity(40_000, 30_000, 0), Activity(45_000, 0, 20_000)]  # train 10-40 s; exchange 25-45 s
    s = shares(acts, 60_000)
    assert (s.training, s.exchanging) == pytest.approx((30 / 60, 5 / 60))


def test_negative_times_count_as_none_and_a_bad_window_is_refused() -> None:
    assert shares([Activity(60_000, -5, -5, -5)], 60_000).idle == 1.0
    with pytest.raises(ValueError):
        shares([], 0, window_ms=0)


@given(st.lists(st.tuples(st.integers(-10**6, 10**6), st.integers(-10**5, 10**6), st.integers(-10**5, 10**6),
                          st.integers(-10**5, 10**5)), max_size=30),
       st.integers(-10**6, 10**6), st.integers(1, 10**6))
def test_shares_are_fractions_that_sum_to_one(raw, now, window) -> None:
    s = shares([Activity(*r) for r in raw], now, window)
    assert 0 <= s.training <= 1 and 0 <= s.exchanging <= 1 and 0 <= s.idle <= 1
    assert s.training + s.exchanging + s.idle == pytest.approx(1.0)


def test_note_keeps_the_window_and_at_most_max_activities() -> None:
    log: deque[Activity] = deque()
    note(log, Activity(1_000, 1, 1), 1_000)
    note(log, Activity(70_000, 1, 1), 70_000)
    assert [a.end_ms for a in log] == [70_000], "what ended before the window is dropped"
    for i in range(MAX_ACTIVITIES + 5):
        note(log, Activity(70_001 + i, 0, 0), 70_001 + i)
    assert len(log) == MAX_ACTIVITIES and log[-1].end_ms == 70_000 + MAX_ACTIVITIES + 5
