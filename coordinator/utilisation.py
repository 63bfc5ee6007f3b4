"""Each peer's utilisation over a recent window: the share of it spent training, exchanging and
idle, from the times the peer reports with each round or gossip step.

Pure: a report at monotonic time ``end_ms`` that says it trained for ``train_ms``, exchanged for
``exchange_ms`` and evaluated for ``eval_ms`` is laid out as the peer ran it (``peer.step``):
training, then the exchange, then evaluation, the last ending when the report arrived.
Evaluation counts as training (the peer's compute on the task). What no report covers is idle;
where reports overlap (a clock's jitter, a report's rounding) a moment is counted once, training
before exchange.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_MS = 60_000  # the window `dml peers` shows: the last minute
MAX_ACTIVITIES = 1024  # reports kept per peer (a peer reporting faster than this per minute is rare)


@dataclass(frozen=True)
class Activity:
    """What one report says a peer did, ending at ``end_ms`` (monotonic)."""

    end_ms: int
    train_ms: int
    exchange_ms: int
    eval_ms: int = 0


@dataclass(frozen=True)
class Shares:
    """Fractions of a window, summing to 1."""

    training: float
    exchanging: float
    idle: float


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(spans: list[tuple[int, int]], lo: int, hi: int) -> int:
    return sum(max(0, min(b, hi) - max(a, lo)) for a, b in spans)


def _minus(spans: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` (merged) without the parts ``cut`` (merged) covers."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        for c, d in cut:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


def shares(activities: list[Activity] | deque[Activity], now_ms: int, window_ms: int = WINDOW_MS) -> Shares:
    """The shares of ``[now_ms - window_ms, now_ms]`` the activities spent training, exchanging
    and idle. Negative times count as none; what lies outside the window is not counted."""
    if window_ms <= 0:
        raise ValueError(f"window_ms must be positive, got {window_ms}")
    lo, hi = now_ms - window_ms, now_ms
    train: list[tuple[int, int]] = []
    exchange: list[tuple[int, int]] = []
    for a in activities:
        t, x, e = max(a.train_ms, 0), max(a.exchange_ms, 0), max(a.eval_ms, 0)
        end = a.end_ms
        train.append((end - e, end))
        exchange.append((end - e - x, end - e))
        train.append((end - e - x - t, end - e - x))
    busy_train = _merge(train)
    busy_exchange = _minus(_merge(exchange), busy_train)
    tr = _length(busy_train, lo, hi) / window_ms
    ex = _length(busy_exchange, lo, hi) / window_ms
    return Shares(tr, ex, max(0.0, 1.0 - tr - ex))


def note(log: deque[Activity], activity: Activity, now_ms: int, window_ms: int = WINDOW_MS) -> None:
    """Appends ``activity`` to a peer's ``log`` and drops what ended before the window (and the
    oldest past ``MAX_ACTIVITIES``)."""
    log.append(activity)
    while log and (log[0].end_ms <= now_ms - window_ms or len(log) > MAX_ACTIVITIES):
        log.popleft()
