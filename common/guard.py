"""Call limits for every dml server: a server interceptor (``rpc.server`` installs it first, so
it wraps every other) that keeps a thread-pool server from being exhausted by idle or piled-up
calls.

The sync gRPC server runs each call on one thread of its pool from the moment its headers
arrive, and a handler blocked in ``next(request_iterator)`` (or a unary call whose message never
comes, which the server waits for on a pool thread before the handler even starts) holds that
thread until the client sends or goes away. The public API offers one way to end such a wait from
outside: ``context.cancel()``, which wakes the blocked read (measured on grpcio 1.85; the client
sees CANCELLED). So the guard

- runs every handler as a request-streaming one (gRPC's wire does not tell unary from streaming),
  so the handler starts at once and the first message is read through the guard;
- admits a call only under its limits, else RESOURCE_EXHAUSTED with a message: in-flight calls
  per client key (a hash of the ``authorization`` metadata when present, else the peer's IP), and
  long-lived calls (the streams and long holds a :class:`Policy` marks ``long``) in all and per
  key, so unary control calls (heartbeats, reports) always find a thread;
- cuts a call (``context.cancel()``) whose client leaves the handler waiting: no first message
  within ``first_s``, no next message within ``idle_s``, a response not taken by the client
  within ``idle_s`` (``response_idle``), or a call older than ``max_s``. Time counts only while
  the handler waits on the client, never while it works or waits on its own.

Limits are sized from the pool (:meth:`Limits.for_pool`); ``GuardInterceptor.stats`` counts what
was admitted, refused and cut.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

log = logging.getLogger(__name__)

FIRST_MESSAGE_S = 5.0  # a client sends its first message with its headers; a few seconds is generous
TICK_S = 0.1  # how often the watchdog looks
LOG_EVERY_S = 10.0  # refusals and cuts are logged in one summary line at most this often


@dataclass(frozen=True)
class Policy:
    """How long one method's client may leave its handler waiting, and whether it is long-lived.

    ``first_s``: for the first request message; ``idle_s``: for each further one (and, with
    ``response_idle``, for the client to take each response); ``max_s``: for the whole call.
    None: no limit."""

    first_s: float | None = FIRST_MESSAGE_S
    idle_s: float | None = None
    max_s: float | None = None
    long: bool = False
    response_idle: bool = False


@dataclass(frozen=True)
class Limits:
    """A server's limits: in-flight calls per client key, long-lived calls in all and per key,
    and the methods' policies (full names, ``/package.Service/Method``)."""

    per_key: int
    long_total: int
    long_per_key: int
    policies: Mapping[str, Policy] = field(default_factory=dict)
    default: Policy = Policy()

    @staticmethod
    def for_pool(workers: int, policies: Mapping[str, Policy] | None = None) -> Limits:
        """Limits for a pool of ``workers`` threads: long-lived calls take at most three quarters
        of it (so a quarter always serves unary calls) and one key at most half; one key's calls
        of any kind at most three quarters (each at least one: a pool of one or two threads
        cannot keep any for unary calls)."""
        if workers < 1:
            raise ValueError(f"a server needs at least one worker, got {workers}")
        return Limits(per_key=max(1, workers * 3 // 4), long_total=max(1, workers * 3 // 4),
                      long_per_key=max(1, workers // 2), policies=dict(policies or {}))

    def policy(self, method: str) -> Policy:
        """The policy of ``method`` (the default for methods not named)."""
        return self.policies.get(method, self.default)


class CallCut(grpc.RpcError):
    """Raised in a handler from a read the guard cut (the client left it waiting too long)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def code(self) -> grpc.StatusCode:
        """DEADLINE_EXCEEDED: what the handler should think of it (the client sees CANCELLED)."""
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        """Why the call was cut."""
        return self.reason


def client_key(context: grpc.ServicerContext) -> str:
    """Whom a call counts against: a hash of its ``authorization`` metadata when present (one
    key per credential), else the caller's IP address (the port dropped)."""
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            raw = v.encode() if isinstance(v, str) else bytes(v)
            return "auth:" + hashlib.sha256(raw).hexdigest()[:16]
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, sep, port = rest.rpartition(":")
        return f"ip:{host if sep and port.isdigit() else rest}"
    return f"peer:{kind}"


class _Watch:
    """One admitted call as the watchdog sees it."""

    __slots__ = ("context", "method", "policy", "started", "waiting_since", "wait_limit", "wait_what", "cut")

    def __init__(self, context: grpc.ServicerContext, method: str, policy: Policy, now: float) -> None:
        self.context = context
        self.method = method
        self.policy = policy
        self.started = now
        self.waiting_since: float | None = None
        self.wait_limit: float | None = None
        self.wait_what = ""
        self.cut = ""  # why the watchdog cut it ("" while not)

    def expired(self, now: float) -> str:
        """Why this call should be cut now ("" if it should not)."""
        p = self.policy
        if p.max_s is not None and now - self.started > p.max_s:
            return f"{self.method} ran past its cap of {p.max_s:.0f}s"
        since, limit = self.waiting_since, self.wait_limit
        if since is not None and limit is not None and now - since > limit:
            return f"{self.method}: no {self.wait_what} from the client for {limit:.1f}s"
        return ""


class GuardInterceptor(grpc.ServerInterceptor):
    """The limiter and idle-call watchdog of one server (see the module docstring)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._long: Counter[str] = Counter()
        self._long_total = 0
        self._watches: dict[int, _Watch] = {}
        self._ids = itertools.count()
        self.stats: Counter[str] = Counter()  # admitted, refused, cut
        self._unlogged: Counter[str] = Counter()
        self._next_log = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the watchdog ---------------------------------------------------------------------
    def _ensure_watchdog(self) -> None:
        """Starts the watchdog thread unless it runs (it ends when no call is left to watch)."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._watch_loop, name="rpc-guard", daemon=True)
                self._thread.start()

    def _watch_loop(self) -> None:
        while not self._stop.wait(TICK_S):
            self.sweep()
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return

    def sweep(self) -> int:
        """Cuts every call past a limit now; returns how many (the watchdog calls it each tick)."""
        now = self._clock()
        with self._lock:
            due = [(w, why) for w in self._watches.values() if not w.cut and (why := w.expired(now))]
            for w, why in due:
                w.cut = why
        for w, why in due:
            self._note("cut", why)
            w.context.cancel()  # wakes a handler blocked on the client; the client sees CANCELLED
        return len(due)

    def close(self) -> None:
        """Stops the watchdog thread (the server is going away)."""
        self._stop.set()

    # -- admission ------------------------------------------------------------------------
    def in_flight(self) -> dict[str, int]:
        """Calls in flight per key, and long-lived ones in all (for tests and metrics)."""
        with self._lock:
            return {**self._in_flight, "long": self._long_total}

    def _admit(self, context: grpc.ServicerContext, method: str, policy: Policy) -> tuple[int, str]:
        key = client_key(context)
        lim = self.limits
        with self._lock:
            refused = ""
            if self._in_flight[key] >= lim.per_key:
                refused = f"more than {lim.per_key} calls in flight from this client"
            elif policy.long and self._long_total >= lim.long_total:
                refused = f"more than {lim.long_total} long-lived calls in flight on this server"
            elif policy.long and self._long[key] >= lim.long_per_key:
                refused = f"more than {lim.long_per_key} long-lived calls in flight from this client"
            if not refused:
                self._in_flight[key] += 1
                if policy.long:
                    self._long[key] += 1
                    self._long_total += 1
                wid = next(self._ids)
                self._watches[wid] = _Watch(context, method, policy, self._clock())
                self.stats["admitted"] += 1
        if refused:
            self._note("refused", f"{method} from {key}: {refused}")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{method}: {refused}; retry later")
        self._ensure_watchdog()
        return wid, key

    def _release(self, wid: int, key: str, policy: Policy) -> None:
        with self._lock:
            self._watches.pop(wid, None)
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]
            if policy.long:
                self._long[key] -= 1
                self._long_total -= 1
                if self._long[key] <= 0:
                    del self._long[key]

    def _note(self, what: str, detail: str) -> None:
        now = self._clock()
        with self._lock:
            self.stats[what] += 1
            self._unlogged[what] += 1
            due = now >= self._next_log
            if due:
                self._next_log = now + LOG_EVERY_S
                counts, self._unlogged = dict(self._unlogged), Counter()
        if due:
            log.warning("rpc limits: %s (e.g. %s)", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), detail)

    # -- waiting on the client --------------------------------------------------------------
    def _waiting(self, wid: int, what: str, limit: float | None) -> None:
        with self._lock:
            w = self._watches.get(wid)
            if w is not None:
                w.waiting_since, w.wait_limit, w.wait_what = self._clock(), limit, what

    def _done_waiting(self, wid: int) -> str:
        with self._lock:
            w = self._watches.get(wid)
            if w is None:
                return ""
            w.waiting_since = w.wait_limit = None
            return w.cut

    def _requests(self, wid: int, it: Iterator[Any], policy: Policy) -> Iterator[Any]:
        """The request iterator, read under the watchdog; raises :class:`CallCut` once cut."""
        first = True
        while True:
            self._waiting(wid, "first message" if first else "message", policy.first_s if first else policy.idle_s)
            try:
                msg = next(it)
            except StopIteration:
                cut = self._done_waiting(wid)
                if cut:
                    raise CallCut(cut) from None
                return
            except grpc.RpcError:
                cut = self._done_waiting(wid)
                if cut:
                    raise CallCut(cut) from None
                raise
            cut = self._done_waiting(wid)
            if cut:
                raise CallCut(cut)
            first = False
            yield msg

    def _responses(self, wid: int, it: Iterator[Any], policy: Policy) -> Iterator[Any]:
        """The handler's responses; with ``response_idle`` the time until the server asks for the
        next one (it has sent the last: the client took it) counts as waiting on the client."""
        limit = policy.idle_s if policy.response_idle else None
        for resp in it:
            yield resp
            cut = self._done_waiting(wid)
            if cut:
                raise CallCut(cut)
            if limit is not None:
                self._waiting(wid, "read of a response", limit)
        cut = self._done_waiting(wid)
        if cut:
            raise CallCut(cut)

    # -- the interceptor ------------------------------------------------------------------
    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """Wraps the method's handler (see the module docstring)."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        policy = self.limits.policy(method)
        guard = self

        def one(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            """Reads the single request of a unary-request method through the guard."""
            request = next(request_iterator, _NONE)
            if request is _NONE:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} requires exactly one request message")
            return request

        def stream_unary(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            wid, key = guard._admit(context, method, policy)
            try:
                requests = guard._requests(wid, request_iterator, policy)
                if handler.request_streaming:
                    return handler.stream_unary(requests, context)
                return handler.unary_unary(one(requests, context), context)
            except CallCut as e:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, e.reason)
            finally:
                guard._release(wid, key, policy)

        def stream_stream(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            wid, key = guard._admit(context, method, policy)
            try:
                requests = guard._requests(wid, request_iterator, policy)
                if handler.request_streaming:
                    responses = handler.stream_stream(requests, context)
                else:
                    responses = handler.unary_stream(one(requests, context), context)
                yield from guard._responses(wid, iter(responses), policy)
            except CallCut as e:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, e.reason)
            finally:
                guard._release(wid, key, policy)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


_NONE = object()
