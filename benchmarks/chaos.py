"""Chaos benchmark: the default job on a local cluster while peers and the coordinator fail.

    python benchmarks/chaos.py [--peers 4] [--duration-s 180] [--every-s 15] [--seed 0] [--json]

Runs the default task (``JobSpec`` defaults, rounds set very high, min_peers 2) on a local
cluster (``dml.client.cluster.LocalCluster``: a coordinator with a state dir, restartable on the
same port, and N ``dml-peer`` processes on 127.0.0.1), and injects one failure every
``--every-s`` seconds, kinds cycling through a seeded permutation of:

- ``sigkill``: SIGKILL a random member peer, start a fresh peer process in its place at once;
- ``sigstop``: SIGSTOP a random member peer, SIGCONT it after ``--stop-s`` (longer than the peer
  timeout, so it is evicted and must re-register by itself);
- ``coordinator``: SIGKILL the coordinator, start the same command on the same state dir and port.

Then it cancels the job and runs the same job for the same duration without failures on a fresh
cluster, and prints one table comparing the two runs (``--json``: one JSON object instead).
Progress and per-failure details go to stderr; logs and state stay under ``--work-dir``.

Everything it reports about the job comes from the job API. ``GetJob`` with the history at the
end of a run gives the commits (``RoundMetrics.committed_unix_ms``, digests, samples, the sample
ledger, accuracy), the evictions with their causes and times (``JobStatus.evictions``), the
membership epochs (``JobStatus.epochs``) and ``rolled_back_rounds``. A thread polls ``GetJob``
every ~50 ms meanwhile: the rounds and digests seen committed (checked against the final history),
when a restarted coordinator answers again, and the current members (to pick a victim). So:
detection is an eviction's ``unix_ms`` minus the injection time; recovery runs from detection to
the next commit; a peer is back when the first membership epoch listing it began.

Two facts only the peers know come from each peer process's own log: which peer id a process
registered as (the coordinator issues ids; to map a victim process to its id, and to find the id
a restarted or woken peer came back with), and, after a coordinator kill, when each member's
heartbeat succeeded again (part of that failure's detection). The process logs are also scanned
for tracebacks, which no API reports. All times are Unix wall-clock times on this host, the
coordinator's and this script's alike (they share the machine's clock). Every wait has a deadline
and every process started is reaped (SIGCONT, SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Children are exec'd right after fork and never use this process's gRPC state, so gRPC's fork
# handlers (and their "skipping fork() handlers" notice while the monitor polls) are not wanted.
_FORK_ENV = "GRPC_ENABLE_FORK_SUPPORT"
_SET_FORK_ENV = _FORK_ENV not in os.environ
if _SET_FORK_ENV:
    os.environ[_FORK_ENV] = "false"

import grpc
from dml.v1 import jobs_pb2, jobs_pb2_grpc

from dml.client import api as jobapi
from dml.client.cluster import ClusterError, LocalCluster, Proc, log_lines, log_time, registrations
from dml.common import auth, rpc
from dml.common.tls import TlsConfig
from dml.common.spec import MAX_ROUNDS, JobSpec, with_defaults
from dml.coordinator.ledger import violations
from dml.common.tasks import builtin_data
from dml.coordinator.service import CoordinatorConfig, cut_shards
from dml.peer import diskcopy

KINDS = ("sigkill", "sigstop", "coordinator")
POLL_S = 0.05
HORIZON_S = 60.0  # a failure not detected and recovered from within this long is "not measured"
TARGETS = {"rounds_lost": 0, "ledger_violations": 0, "detection_p95_s": 3.0, "recovery_p95_s": 5.0,
           "goodput_ratio": 0.80}
# A peer's own log (peer/runner.py) around a coordinator outage.
HB_FAIL_RE = re.compile(r": heartbeat failed \(")
HB_OK_RE = re.compile(r": coordinator reachable again|: evicted by the coordinator")
# Process log lines that no API reports (counted, a few excerpts kept).
FINDINGS = {"traceback": re.compile(r"Traceback"), "critical": re.compile(r" CRITICAL ")}
# A poller reconnects to a restarted coordinator within ~0.2 s (rpc's fast reconnect is up to 1 s).
POLL_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                        ("grpc.max_reconnect_backoff_ms", 200)]
HISTORY_BYTES = 256 << 20  # a long run's history with its sample ledger


class BenchError(Exception):
    """The benchmark could not go on (a process did not start, a deadline passed)."""


def _s(unix_ms: int) -> float:
    return unix_ms / 1000.0


# -- what the job API says -------------------------------------------------------------------
def cause_text(e: jobs_pb2.Eviction) -> str:
    """How the coordinator learnt of it: ``heartbeat timeout (no heartbeat for 2150 ms)``,
    ``neighbour report by peer-3``, ..."""
    name = jobs_pb2.EvictionCause.Name(e.cause).removeprefix("EVICTION_CAUSE_").lower().replace("_", " ")
    if e.reporter:
        name += f" by {e.reporter}"
    return f"{name} ({e.detail})" if e.detail else name


def evictions_between(job: jobs_pb2.JobStatus, t0: float, t1: float) -> list[jobs_pb2.Eviction]:
    """The job's evictions decided in [t0, t1) (Unix seconds), oldest first."""
    return sorted((e for e in job.evictions if t0 <= _s(e.unix_ms) < t1), key=lambda e: e.unix_ms)


def eviction_of(job: jobs_pb2.JobStatus, peer_id: str, after: float) -> jobs_pb2.Eviction | None:
    """The first eviction of ``peer_id`` at or after ``after`` (Unix seconds; the coordinator's
    times are whole milliseconds, so one millisecond before counts)."""
    got = evictions_between(job, after - 0.001, math.inf)
    return next((e for e in got if e.peer_id == peer_id), None)


def epoch_with(job: jobs_pb2.JobStatus, peer_id: str, after: float) -> jobs_pb2.MembershipEpoch | None:
    """The first membership epoch begun at or after ``after`` whose ring includes ``peer_id``."""
    for ep in sorted(job.epochs, key=lambda x: x.epoch):
        if _s(ep.started_unix_ms) >= after - 0.001 and peer_id in ep.peers:
            return ep
    return None


def epoch_at(job: jobs_pb2.JobStatus, t: float) -> jobs_pb2.MembershipEpoch | None:
    """The membership epoch current at ``t``: the last one begun by then."""
    best = None
    for ep in sorted(job.epochs, key=lambda x: x.epoch):
        if _s(ep.started_unix_ms) <= t:
            best = ep
    return best


def commit_after(history: Sequence[Any], t: float) -> Any | None:
    """The first round of the history committed after ``t`` (Unix seconds)."""
    later = [h for h in history if _s(h.committed_unix_ms) > t]
    return min(later, key=lambda h: h.committed_unix_ms) if later else None


def fetch_job(address: str, job_id: str, timeout_s: float, token: str,
              tls: TlsConfig | None = None) -> jobs_pb2.GetJobResponse:
    """GetJob with the history (with the operator ``token``, over ``tls``: the cluster's),
    retried until ``timeout_s`` (the coordinator may just have been restarted)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        with rpc.channel(address, tls=tls, max_message_bytes=HISTORY_BYTES, options=POLL_CHANNEL_OPTIONS) as ch:
            try:
                return jobs_pb2_grpc.JobServiceStub(auth.with_token(ch, token)).GetJob(
                    jobs_pb2.GetJobRequest(job_id=job_id, include_history=True),
                    timeout=max(1.0, deadline - time.monotonic()))
            except grpc.RpcError as e:
                last = e.code().name if isinstance(e, grpc.Call) else str(e)
        time.sleep(0.5)
    raise BenchError(f"could not read job {job_id} from {address} within {timeout_s:.0f}s ({last})")


# -- what only the peers know (their own logs) -----------------------------------------------
def current_member_slots(cluster: LocalCluster, members: Sequence[str]) -> dict[int, str]:
    """Peer slots (alive, not paused) whose process is registered as one of ``members``: slot ->
    peer id (the process's latest registration, from its log)."""
    out = {}
    for slot, p in sorted(cluster.peers.items()):
        if p.paused or not p.alive:
            continue
        ids = [r.peer_id for r in registrations(p.log) if r.peer_id in members]
        if ids:
            out[slot] = ids[-1]
    return out


def wait_registered(procs: Sequence[Proc], timeout_s: float) -> None:
    """Waits until each peer process has registered (its log says so)."""
    deadline = time.monotonic() + timeout_s
    left = list(procs)
    while left and time.monotonic() < deadline:
        for p in list(left):
            if not p.alive:
                raise BenchError(f"{p.name} exited with {p.popen.returncode} (see {p.log})")
            if registrations(p.log):
                left.remove(p)
        time.sleep(0.05)
    if left:
        raise BenchError(f"peers did not register within {timeout_s:.0f}s: {[p.name for p in left]}")


def heartbeat_back(path: pathlib.Path, after: float, fail_by: float) -> tuple[bool, float | None]:
    """From a peer's log, after ``after``: did its heartbeat fail during this outage (by
    ``fail_by``; a later failure belongs to a later outage), and when did one succeed again?"""
    failed = False
    for line in log_lines(path):
        w = log_time(line)
        if w is None or w < after - 0.002:
            continue
        if not failed and w <= fail_by and HB_FAIL_RE.search(line):
            failed = True
        elif failed and HB_OK_RE.search(line):
            return True, w
    return failed, None


def scan_logs(logs: pathlib.Path, until: float) -> dict[str, Any]:
    """Counts tracebacks and CRITICAL lines in every log of a run, with a few excerpts; lines
    logged after ``until`` (the job was cancelled, the cluster is being stopped) are left out."""
    out: dict[str, Any] = {}
    for path in sorted(logs.glob("*.log")):
        for line in log_lines(path):
            w = log_time(line)
            if w is not None and w > until:
                continue
            for name, rx in FINDINGS.items():
                if rx.search(line):
                    e = out.setdefault(name, {"count": 0, "excerpts": []})
                    e["count"] += 1
                    if len(e["excerpts"]) < 4:
                        e["excerpts"].append(f"{path.name}: {line[:400]}")
    return out


# -- the GetJob timeline ---------------------------------------------------------------------
@dataclass
class Obs:
    """One GetJob poll: when it answered (Unix seconds) and what it said (ok False: no answer)."""

    t: float
    ok: bool
    round: int = 0
    epoch: int = 0
    peers: tuple[str, ...] = ()
    samples: int = 0
    state: str = ""
    digest: str = ""
    commit_ms: int = 0  # when the round it shows committed (the coordinator's clock)
    error: str = ""
    latency: float = 0.0  # how long the poll took


def obs_of(j: jobs_pb2.JobStatus, t: float) -> Obs:
    """A poll's view of a JobStatus."""
    last = j.last if j.HasField("last") else None
    return Obs(t, True, j.round, j.epoch, tuple(j.peers), j.samples, jobapi.STATE_NAMES[j.state],
               last.digest if last else "", last.committed_unix_ms if last else 0)


class Monitor(threading.Thread):
    """Polls GetJob every ~50 ms into ``obs`` (a fresh channel after each failed poll, so a
    restarted coordinator is seen as soon as it answers)."""

    def __init__(self, address: str, job_id: str, token: str, tls: TlsConfig | None = None) -> None:
        super().__init__(name="monitor", daemon=True)
        self.address, self.job_id, self.token, self.tls = address, job_id, token, tls
        self.obs: list[Obs] = []
        self.halt = threading.Event()

    def run(self) -> None:
        ch: grpc.Channel | None = None
        stub = None
        req = jobs_pb2.GetJobRequest(job_id=self.job_id)
        while not self.halt.is_set():
            t0 = time.monotonic()
            if stub is None:
                ch = rpc.channel(self.address, tls=self.tls, options=POLL_CHANNEL_OPTIONS)
                stub = jobs_pb2_grpc.JobServiceStub(auth.with_token(ch, self.token))
            try:
                o = obs_of(stub.GetJob(req, timeout=2.0).job, time.time())
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                o = Obs(time.time(), False, error=code.name if code else str(e))
                if ch is not None:
                    ch.close()
                ch, stub = None, None
            o.latency = time.monotonic() - t0
            self.obs.append(o)
            self.halt.wait(max(0.0, POLL_S - (time.monotonic() - t0)))
        if ch is not None:
            ch.close()

    def latest(self) -> Obs | None:
        """The last poll that answered."""
        for o in reversed(self.obs):
            if o.ok:
                return o
        return None


def first(obs: list[Obs], t_from: float, pred: Any, t_to: float = math.inf) -> Obs | None:
    """The first answered poll in [t_from, t_to) that satisfies ``pred``."""
    for o in obs:
        if t_from <= o.t < t_to and o.ok and pred(o):
            return o
    return None


# -- failures --------------------------------------------------------------------------------
@dataclass
class Event:
    """One injected failure and what was measured about it (Unix seconds; durations in s)."""

    kind: str
    t: float  # injection
    victim: str = ""  # peer slot name or "coordinator"
    victim_id: str = ""
    log: str = ""  # the victim peer's log (sigstop) or the replacement's log (sigkill)
    round_before: int = 0
    digest_before: str = ""
    members: dict[str, str] = field(default_factory=dict)  # coordinator kill: member slot -> its log
    t_cont: float | None = None  # sigstop: SIGCONT sent
    t_restarted: float | None = None  # coordinator listening again / peer replacement spawned
    # measured
    detection_s: float | None = None
    recovery_s: float | None = None
    rejoin_s: float | None = None
    answer_s: float | None = None  # coordinator: until the restarted one answered GetJob
    reattach_s: float | None = None  # coordinator: until the last member's heartbeat succeeded again
    slowest_poll_s: float | None = None  # coordinator: slowest GetJob between the answer and the next commit
    how: str = ""  # peer: the eviction's cause, as GetJob gives it
    new_id: str = ""  # peer: the id the slot's process registered as after the failure
    collateral: list[str] = field(default_factory=list)  # other peers evicted soon after
    round_after_restart: int | None = None
    note: str = ""

    def summary(self, t0: float) -> str:
        f = (lambda x: "-" if x is None else f"{x:.2f}s")
        s = f"  +{self.t - t0:6.1f}s {self.kind:<11} {self.victim:<11} {self.victim_id:<20} detect {f(self.detection_s):>7} "
        s += f"recover {f(self.recovery_s):>7}"
        if self.kind == "coordinator":
            s += (f"  answered {f(self.answer_s)}, heartbeats back {f(self.reattach_s)}, slowest poll after "
                  f"{f(self.slowest_poll_s)}; round {self.round_before} before, {self.round_after_restart} after restart")
        else:
            s += f"  rejoined {f(self.rejoin_s)}  evicted by: {self.how or '?'}"
        if self.collateral:
            s += f"\n{'':12}ALSO EVICTED: {'; '.join(self.collateral)}"
        return s + (f"  [{self.note}]" if self.note else "")


def kinds_forever(rng: random.Random, allowed: list[str]) -> Iterator[str]:
    """Seeded permutations of the allowed kinds, one after another."""
    while True:
        perm = list(allowed)
        rng.shuffle(perm)
        yield from perm


def analyse(ev: Event, obs: list[Obs], resp: jobs_pb2.GetJobResponse, until: float = math.inf) -> None:
    """Fills the event's measurements from GetJob (``resp``: evictions, epochs, the history's
    commit times), the poll timeline ``obs`` and, for the peer-side facts, the peers' logs;
    ``until``: when the next failure was injected (collateral evictions are looked for before it)."""
    job = resp.job
    ev.collateral = [f"{e.peer_id} ({cause_text(e)}) at +{_s(e.unix_ms) - ev.t:.2f}s"
                     for e in evictions_between(job, ev.t, min(until, ev.t + 10.0))
                     if not ev.victim_id or e.peer_id != ev.victim_id]
    horizon = ev.t + HORIZON_S
    t_det: float | None = None
    if ev.kind in ("sigkill", "sigstop"):
        e = eviction_of(job, ev.victim_id, ev.t) if ev.victim_id else None
        if e is not None and _s(e.unix_ms) < horizon:
            t_det = _s(e.unix_ms)
            ev.detection_s = max(0.0, t_det - ev.t)
            ev.how = cause_text(e)
        regs = registrations(pathlib.Path(ev.log)) if ev.log else []
        if ev.kind == "sigkill":
            ev.new_id = regs[0].peer_id if regs else ""
            since: float | None = ev.t
        else:
            later = [r.peer_id for r in regs if r.wall > ev.t]
            ev.new_id = later[0] if later else ""
            since = ev.t_cont
        if ev.new_id and since is not None:
            ep = epoch_with(job, ev.new_id, since)
            if ep is not None and _s(ep.started_unix_ms) < horizon:
                ev.rejoin_s = max(0.0, _s(ep.started_unix_ms) - since)
    else:
        if ev.t_restarted is None:
            return
        ans = first(obs, ev.t_restarted - 0.001, lambda o: True, horizon)
        if ans is None:
            return
        ev.answer_s = ans.t - ev.t
        ev.round_after_restart = ans.round
        t_det = ans.t
        missing = []
        for slot, log in ev.members.items():
            # A heartbeat can only fail while the coordinator is down (plus one heartbeat call's
            # deadline): a member silent about this outage must not be matched to the next one.
            failed, w = heartbeat_back(pathlib.Path(log), ev.t, ev.t + ev.answer_s + 2.0)
            if failed and w is None:
                missing.append(slot)
            elif w is not None:
                t_det = max(t_det, w)
        if missing:
            ev.note = f"no heartbeat back yet from {missing}"
            return
        ev.note = ""
        ev.detection_s = ev.reattach_s = t_det - ev.t
    if t_det is None:
        return
    nxt = commit_after(resp.history, t_det)
    if nxt is not None and _s(nxt.committed_unix_ms) < horizon:
        ev.recovery_s = _s(nxt.committed_unix_ms) - t_det
        if ev.kind == "coordinator" and ev.t_restarted is not None:
            lats = [o.latency for o in obs if ev.t_restarted <= o.t <= _s(nxt.committed_unix_ms) + POLL_S]
            ev.slowest_poll_s = max(lats) if lats else None


def measured(ev: Event) -> bool:
    """Detection and recovery known (and, for a peer, its return to the ring)."""
    return ev.recovery_s is not None and (ev.kind == "coordinator" or ev.rejoin_s is not None)


def inject(kind: str, cluster: LocalCluster, mon: Monitor, rng: random.Random, stop_s: float,
           pending: list[tuple[float, Proc, Event]]) -> Event | None:
    """Injects one failure; None if there is no member to pick (try again shortly)."""
    latest = mon.latest()
    if latest is None:
        return None
    if kind in ("sigkill", "sigstop"):
        slots = current_member_slots(cluster, latest.peers)
        if not slots:
            return None
        slot = rng.choice(sorted(slots))
        proc = cluster.peers[slot]
        ev = Event(kind, time.time(), victim=f"peer-{slot}", victim_id=slots[slot],
                   round_before=latest.round, digest_before=latest.digest)
        if kind == "sigkill":
            new = cluster.restart_peer(slot)  # SIGKILL, reap, start a fresh process in the slot
            ev.t_restarted, ev.log = time.time(), str(new.log)
        else:
            cluster.pause(proc)
            ev.log = str(proc.log)
            pending.append((ev.t + stop_s, proc, ev))
        return ev
    members = current_member_slots(cluster, latest.peers)
    ev = Event(kind, time.time(), victim="coordinator", round_before=latest.round, digest_before=latest.digest,
               members={f"peer-{s}": str(cluster.peers[s].log) for s in members})
    cluster.kill_coordinator()
    cluster.start_coordinator()
    ev.t_restarted = time.time()
    return ev


# -- one run ---------------------------------------------------------------------------------
def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no data)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(name: str, a: argparse.Namespace, work: pathlib.Path, chaos: bool) -> dict[str, Any]:
    """One run: cluster, job, (failures), measurements."""
    root = work / name
    coord_args: list[str] = []
    for flag, v in (("--heartbeat-interval-ms", a.heartbeat_interval_ms), ("--peer-timeout-ms", a.peer_timeout_ms),
                    ("--round-deadline-ms", a.round_deadline_ms)):
        if v is not None:
            coord_args += [flag, str(v)]
    spec = JobSpec(rounds=MAX_ROUNDS, min_peers=2, seed=a.job_seed)
    env = {k: v for k, v in os.environ.items() if not (_SET_FORK_ENV and k == _FORK_ENV)}
    if a.committed_copy == "disk":  # rounds re-run after each failure restart from the files
        (root / "committed").mkdir(parents=True, exist_ok=True)
        env.update(DML_COMMITTED_COPY="disk", DML_COMMITTED_COPY_DIR=str(diskcopy.usable_dir(root / "committed")))
    cluster = LocalCluster(root / "state", root / "logs", coordinator_args=coord_args, env=env, cwd=ROOT)
    mon: Monitor | None = None
    events: list[Event] = []
    anomalies: list[str] = []
    kind_rng, victim_rng = random.Random(a.seed), random.Random(a.seed + 1)
    kinds = kinds_forever(kind_rng, a.kinds)
    pending: list[tuple[float, Proc, Event]] = []
    load0 = os.getloadavg()
    try:
        cluster.start_coordinator()
        wait_registered([cluster.start_peer(i) for i in range(a.peers)], 120)
        token = cluster.operator_token()  # authentication is on, as everywhere LocalCluster runs
        with cluster.client(timeout_s=30) as client:
            job_id = client.submit(spec)
        _say(f"[{name}] coordinator {cluster.address}, {a.peers} peers, job {job_id}; logs in {cluster.log_dir}")
        mon = Monitor(cluster.address, job_id, token, cluster.tls)
        mon.start()
        # min_peers is 2, so the job may start before every peer has asked for work; the rest
        # join at a round boundary. The window opens once every peer is in the ring.
        deadline = time.monotonic() + 120
        whole = lambda o: o.round >= 1 and len(o.peers) == a.peers
        while time.monotonic() < deadline and not ((o := mon.latest()) and whole(o)):
            time.sleep(0.05)
        first_commit = first(mon.obs, 0, whole)
        if first_commit is None:
            seen = first(mon.obs, 0, lambda o: o.round >= 1)
            raise BenchError(f"no round committed with all {a.peers} peers in the ring within 120 s "
                             f"({'none committed' if seen is None else f'round {seen.round} with {len(seen.peers)}'}; "
                             f"see {cluster.log_dir})")
        # The window opens at that commit (the first with every peer), on the coordinator's clock.
        t_start = _s(first_commit.commit_ms)
        t_end = t_start + a.duration_s
        next_at = t_start + a.every_s
        next_kind = next(kinds)
        last_print = t_start
        while True:
            now = time.time()
            for item in [x for x in pending if x[0] <= now]:
                pending.remove(item)
                _, proc, ev = item
                cluster.resume(proc)
                ev.t_cont = time.time()
            if now >= t_end and not pending:
                break
            latest = mon.latest()
            if latest is not None and latest.state in jobapi.FINISHED:
                anomalies.append(f"job ended {latest.state} at +{latest.t - t_start:.1f}s (round {latest.round})")
                break
            for slot, p in list(cluster.peers.items()):
                if not p.alive:
                    anomalies.append(f"{p.name} exited by itself with {p.popen.returncode} at +{now - t_start:.1f}s "
                                     f"(log {p.log.name}); started a fresh one")
                    cluster.start_peer(slot)
            if cluster.coordinator is not None and not cluster.coordinator.alive:
                anomalies.append(f"coordinator exited by itself with {cluster.coordinator.popen.returncode} at "
                                 f"+{now - t_start:.1f}s; restarted it")
                cluster.start_coordinator()
            if chaos and next_at <= now < t_end and not pending:
                got = inject(next_kind, cluster, mon, victim_rng, a.stop_s, pending)
                if got is None:
                    next_at = now + 0.5  # no member to pick right now
                else:
                    ev = got
                    events.append(ev)
                    _say(f"[{name}] +{ev.t - t_start:6.1f}s injected {ev.kind} on {ev.victim} {ev.victim_id} "
                         f"(round {ev.round_before})")
                    next_at += a.every_s
                    next_kind = next(kinds)
            if now - last_print >= 15 and latest is not None:
                _say(f"[{name}] +{now - t_start:6.1f}s round {latest.round} epoch {latest.epoch} "
                     f"peers {len(latest.peers)} {latest.state}")
                last_print = now
            time.sleep(POLL_S)
        # Let the last failures finish recovering (measured), then stop.
        settle = time.monotonic() + a.settle_s
        while chaos and events and time.monotonic() < settle:
            resp = fetch_job(cluster.address, job_id, 30, token, cluster.tls)
            obs = list(mon.obs)
            for i, ev in enumerate(events):
                analyse(ev, obs, resp, events[i + 1].t if i + 1 < len(events) else math.inf)
            if all(measured(ev) for ev in events):
                break
            time.sleep(1.0)
        mon.halt.set()
        mon.join(5)
        obs = list(mon.obs)
        cancel_at = time.time()
        with contextlib.suppress(jobapi.ApiError), cluster.client(timeout_s=10) as client:
            client.cancel(job_id)
        resp = fetch_job(cluster.address, job_id, 30, token, cluster.tls)
        for i, ev in enumerate(events):
            analyse(ev, obs, resp, events[i + 1].t if i + 1 < len(events) else cancel_at)
    finally:
        if mon is not None:
            mon.halt.set()
        cluster.close()
    early = evictions_between(resp.job, 0.0, t_start)
    if early:  # a peer lost before any failure was injected
        anomalies.append(f"before the window (no failure injected yet): evictions "
                         f"{[f'{e.peer_id} ({cause_text(e)})' for e in early]}; the window opened at round "
                         f"{first_commit.round} (membership epoch {first_commit.epoch})")
    sizes = [int(s.size) for s in cut_shards(with_defaults(spec), builtin_data(spec.task).y_train)]
    res = measure(name, events, obs, resp, t_start, t_end, anomalies, sizes)
    res["logs"] = str(cluster.log_dir)
    res["log_findings"] = scan_logs(cluster.log_dir, cancel_at)
    res["load_1min_start_end"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    return res


def measure(name: str, events: list[Event], obs: list[Obs], resp: jobs_pb2.GetJobResponse, t_start: float,
            t_end: float, anomalies: list[str], sizes: list[int]) -> dict[str, Any]:
    """The numbers of one run, from the final GetJob (``resp``, with the history), the poll
    timeline and the analysed events; ``sizes``: the job's shard sizes (for the sample ledger)."""
    job = resp.job
    hist = list(resp.history)
    nums = [h.round for h in hist]
    by_round = {h.round: h for h in hist}
    n = max(nums) if nums else 0
    dupes = sorted({r for r in nums if nums.count(r) > 1})
    gaps = sorted(set(range(1, n + 1)) - set(nums))
    order_ok = nums == list(range(1, n + 1))
    # Every (round, digest) the job reported as committed must be in the final history, unchanged.
    seen: dict[int, str] = {}
    for o in obs:
        if o.ok and o.round >= 1 and o.digest:
            seen.setdefault(o.round, o.digest)
    rewritten = sorted(r for r, d in seen.items() if r not in by_round or by_round[r].digest != d)
    regressions = []
    top = 0
    for o in obs:
        if o.ok:
            if o.round < top:
                regressions.append(f"committed round went back from {top} to {o.round} at +{o.t - t_start:.2f}s")
            top = max(top, o.round)
    kill_checks = []
    for ev in events:
        if ev.kind != "coordinator":
            continue
        r, d = ev.round_before, ev.digest_before
        kept = r == 0 or (r in by_round and by_round[r].digest == d)
        after_ok = ev.round_after_restart is not None and ev.round_after_restart >= r
        kill_checks.append({"round_before_kill": r, "in_final_history_same_digest": kept,
                            "round_after_restart": ev.round_after_restart, "not_behind_after_restart": after_ok})
    lost_rounds = set(rewritten) | set(gaps) | set(dupes)
    lost_rounds |= {c["round_before_kill"] for c in kill_checks if not c["in_final_history_same_digest"]}
    rounds_lost = len(lost_rounds) + sum(1 for c in kill_checks if not c["not_behind_after_restart"])
    ledger = violations([[(x.shard_id, x.data_epoch, x.start, x.stop)
                          for m in sorted(h.consumed, key=lambda m: m.peer_id) for x in m.ranges]
                         for h in hist], sizes)
    # The window, on the coordinator's commit times: rounds committed in (t_start, t_end].
    span = t_end - t_start
    window = sorted((h for h in hist if t_start < _s(h.committed_unix_ms) <= t_end), key=lambda h: h.committed_unix_ms)
    window_samples = sum(h.samples for h in window)
    commits = [_s(h.committed_unix_ms) for h in window]
    gaps_s = [b - a_ for a_, b in zip([t_start] + commits, commits + [t_end])]
    before_end = [h for h in hist if _s(h.committed_unix_ms) <= t_end]
    r1 = max((h.round for h in before_end), default=0)
    down = [o for o in obs if not o.ok and t_start <= o.t <= t_end]
    det = [e.detection_s for e in events if e.detection_s is not None]
    rec = [e.recovery_s for e in events if e.recovery_s is not None]
    rej = [e.rejoin_s for e in events if e.rejoin_s is not None]
    out_s = [e.detection_s + e.recovery_s for e in events if e.detection_s is not None and e.recovery_s is not None]
    per_kind = {}
    for k in KINDS:
        ks = [e for e in events if e.kind == k]
        if ks:
            kd = [e.detection_s for e in ks if e.detection_s is not None]
            kr = [e.recovery_s for e in ks if e.recovery_s is not None]
            per_kind[k] = {"count": len(ks), "detection_p50_s": percentile(kd, 50), "detection_p95_s": percentile(kd, 95),
                           "recovery_p50_s": percentile(kr, 50), "recovery_p95_s": percentile(kr, 95),
                           "unmeasured": sum(1 for e in ks if e.detection_s is None or e.recovery_s is None)}
    final_acc = by_round[r1].test_accuracy if r1 in by_round else None
    edge = min(30.0, span / 3)

    def rate(t0: float, t1: float) -> float | None:
        return sum(1 for c in commits if t0 < c <= t1) / (t1 - t0) if t1 > t0 else None
    ep_end = epoch_at(job, t_end)
    in_window = evictions_between(job, t_start, t_end)
    return {
        "run": name,
        "job_id": job.job_id,
        "final_state": jobapi.STATE_NAMES[job.state],
        "window_s": span,
        "failures": len(events),
        "failures_by_kind": {k: sum(1 for e in events if e.kind == k) for k in KINDS},
        "detection_p50_s": percentile(det, 50), "detection_p95_s": percentile(det, 95),
        "recovery_p50_s": percentile(rec, 50), "recovery_p95_s": percentile(rec, 95),
        "rejoin_p50_s": percentile(rej, 50), "rejoin_p95_s": percentile(rej, 95),
        "outage_p50_s": percentile(out_s, 50), "outage_p95_s": percentile(out_s, 95),
        "other_peers_evicted": sum(len(e.collateral) for e in events),
        "unmeasured_failures": sum(1 for e in events if e.detection_s is None or e.recovery_s is None),
        "per_kind": per_kind,
        "rounds_committed_in_window": len(window),
        "rounds_committed_total": n,
        "rounds_lost": rounds_lost,
        "round_numbers_ok": order_ok,
        "round_gaps": gaps[:50], "round_duplicates": dupes[:50], "rounds_rewritten": rewritten[:50],
        "round_regressions": regressions[:20],
        "rolled_back_rounds": job.rolled_back_rounds,
        "coordinator_kill_checks": kill_checks,
        "ledger_violations": len(ledger), "ledger_excerpt": ledger[:10],
        "data_epochs": hist[-1].data_epoch if hist else 0,
        "window_samples": window_samples,
        "goodput_samples_per_s": window_samples / span if span > 0 else None,
        "final_test_accuracy": final_acc,
        "final_round": r1,
        "rounds_per_s_first_last": [rate(t_start, t_start + edge), rate(t_end - edge, t_end)],
        "rate_edge_s": edge,
        "longest_commit_gap_s": max(gaps_s) if gaps_s else None,
        "monitor_unanswered_polls": len(down),
        "membership_epochs": ep_end.epoch if ep_end is not None else 0,
        "membership_epochs_begun_in_window": sum(1 for ep in job.epochs if t_start < _s(ep.started_unix_ms) <= t_end),
        "evictions_in_window": [f"+{_s(e.unix_ms) - t_start:.2f}s {e.peer_id} ({cause_text(e)})" for e in in_window],
        "evictions_total": job.evictions_total,
        "anomalies": anomalies,
        "events": [{"at_s": round(e.t - t_start, 3), "kind": e.kind, "victim": e.victim, "victim_id": e.victim_id,
                    "round_before": e.round_before, "detection_s": e.detection_s, "recovery_s": e.recovery_s,
                    "rejoin_s": e.rejoin_s, "coordinator_answer_s": e.answer_s, "heartbeats_back_s": e.reattach_s,
                    "slowest_poll_after_restart_s": e.slowest_poll_s, "evicted_by": e.how, "new_id": e.new_id,
                    "other_peers_evicted": e.collateral,
                    "round_after_restart": e.round_after_restart, "note": e.note} for e in events],
        "_t_start": t_start,
        "_events": events,
    }


# -- report ----------------------------------------------------------------------------------
def _f(x: Any, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def table(c: dict[str, Any], b: dict[str, Any], a: argparse.Namespace, t: dict[str, Any]) -> str:
    """The comparison table (and its definitions)."""
    hb = a.heartbeat_interval_ms or CoordinatorConfig().heartbeat_interval_ms
    pt = a.peer_timeout_ms or CoordinatorConfig().peer_timeout_ms
    lines = [(f"dml chaos benchmark: task digits (JobSpec defaults, min_peers 2), {a.peers} peers, {a.duration_s:.0f} s "
              f"per run, one failure every {a.every_s:.0f} s (seed {a.seed}, kinds {','.join(a.kinds)}); coordinator "
              f"heartbeat {hb} ms, peer timeout {pt} ms; SIGSTOP held {a.stop_s:.1f} s"), ""]
    w = 44
    lines.append(f"{'':<{w}} {'chaos':>22} {'failure-free':>14}   target")

    def row(label: str, cv: str, bv: str, target: str = "") -> None:
        lines.append(f"{label:<{w}} {cv:>22} {bv:>14}   {target}")

    def ok(key: str) -> str:
        return "" if key not in t else ("ok" if t[key] else "MISSED")

    row("failures injected", str(c["failures"]), str(b["failures"]))
    row(f"  {' / '.join(KINDS)}", " / ".join(str(c["failures_by_kind"][k]) for k in KINDS), "-")
    row("detection p50 / p95 (s)", f"{_f(c['detection_p50_s'])} / {_f(c['detection_p95_s'])}", "-",
        f"p95 < {TARGETS['detection_p95_s']:.0f} s {ok('detection')}")
    for k, v in c["per_kind"].items():
        row(f"  {k} (n={v['count']})", f"{_f(v['detection_p50_s'])} / {_f(v['detection_p95_s'])}", "-")
    row("detection -> next commit p50 / p95 (s)", f"{_f(c['recovery_p50_s'])} / {_f(c['recovery_p95_s'])}", "-",
        f"p95 < {TARGETS['recovery_p95_s']:.0f} s {ok('recovery')}")
    for k, v in c["per_kind"].items():
        row(f"  {k}", f"{_f(v['recovery_p50_s'])} / {_f(v['recovery_p95_s'])}", "-")
    row("injection -> next commit p50 / p95 (s)", f"{_f(c['outage_p50_s'])} / {_f(c['outage_p95_s'])}", "-")
    row("peer back in the ring p50 / p95 (s)", f"{_f(c['rejoin_p50_s'])} / {_f(c['rejoin_p95_s'])}", "-")
    row("evictions in the window (of all in the job)", f"{len(c['evictions_in_window'])} ({_f(c['evictions_total'])})",
        f"{len(b.get('evictions_in_window') or [])} ({_f(b.get('evictions_total'))})")
    row("other (healthy) peers evicted after a failure", str(c["other_peers_evicted"]), "-")
    row(f"failures not measured (deadline {HORIZON_S:.0f} s)", str(c["unmeasured_failures"]), "-")
    row("rounds committed in the window", str(c["rounds_committed_in_window"]), str(b["rounds_committed_in_window"]))
    row("committed rounds lost", str(c["rounds_lost"]), str(b["rounds_lost"]), f"0 {ok('rounds_lost')}")
    row("  numbering 1..N, no gap, no repeat", "yes" if c["round_numbers_ok"] else "NO",
        "yes" if b["round_numbers_ok"] else "NO")
    row("  rounds changed after being seen committed", str(len(c["rounds_rewritten"])), str(len(b["rounds_rewritten"])))
    kc = c["coordinator_kill_checks"]
    row("  pre-kill round kept after restart", f"{sum(x['in_final_history_same_digest'] and x['not_behind_after_restart'] for x in kc)}/{len(kc)}", "-")
    row("  rolled_back_rounds", _f(c["rolled_back_rounds"]), _f(b["rolled_back_rounds"]))
    row("ledger violations", str(c["ledger_violations"]), str(b["ledger_violations"]), f"0 {ok('ledger')}")
    row("goodput (committed samples/s)", _f(c["goodput_samples_per_s"], ".0f"), _f(b["goodput_samples_per_s"], ".0f"),
        f">= {TARGETS['goodput_ratio']:.0%} of failure-free: {_f(t['goodput_ratio'], '.1%')} {ok('goodput')}")
    fl_c, fl_b = c["rounds_per_s_first_last"], b.get("rounds_per_s_first_last") or [None, None]
    row(f"rounds/s, first / last {c['rate_edge_s']:.0f} s of the window", f"{_f(fl_c[0], '.1f')} / {_f(fl_c[1], '.1f')}",
        f"{_f(fl_b[0], '.1f')} / {_f(fl_b[1], '.1f')}")
    row("longest gap between commits (s)", _f(c["longest_commit_gap_s"]), _f(b["longest_commit_gap_s"]))
    row("final test accuracy (last round in window)", _f(c["final_test_accuracy"], ".4f"), _f(b["final_test_accuracy"], ".4f"))
    row("data epochs / membership epochs (at the end)", f"{c['data_epochs']} / {c['membership_epochs']}",
        f"{b['data_epochs']} / {b['membership_epochs']}")
    row("membership epochs begun in the window", _f(c["membership_epochs_begun_in_window"]),
        _f(b.get("membership_epochs_begun_in_window")))
    lines += ["",
              "window: from the commit of the first round seen with every peer in the ring, for --duration-s (the job",
              "  may start on min_peers 2, the rest joining at a round boundary); goodput = samples of the rounds",
              "  committed in the window / window length. Times are GetJob's (commit, eviction and epoch times; the",
              "  coordinator's clock, this machine's) and this script's (injections; GetJob polled every 50 ms);",
              "  nearest-rank percentiles.",
              "detection: sigkill/sigstop: from the signal until the coordinator evicted the peer (GetJob evictions);",
              "  coordinator: from kill -9 until the restarted coordinator answers GetJob AND every ring member whose",
              "  heartbeat failed has logged a successful heartbeat again (peer log 'coordinator reachable again').",
              "recovery: from detection until the next round committed (GetJob history's commit times).",
              "peer back in the ring: sigkill: from the kill until a membership epoch with the replacement began;",
              "  sigstop: from SIGCONT until one with the peer's re-registered id began (ids from the peers' logs).",
              "rounds lost: round numbers missing or repeated in the final history, rounds seen committed whose",
              "  digest differs in (or is missing from) the final history, and pre-kill rounds not kept.",
              (f"machine load (1-min average, start/end of run): chaos {c.get('load_1min_start_end')}, "
              f"failure-free {b.get('load_1min_start_end')}; {os.cpu_count()} CPUs"),
              f"logs: chaos {c['logs']}, failure-free {b['logs']}"]
    return "\n".join(lines)


def targets(c: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Whether the chaos run met the issue's targets."""
    ratio = (c["goodput_samples_per_s"] / b["goodput_samples_per_s"]
             if c["goodput_samples_per_s"] is not None and b["goodput_samples_per_s"] else None)
    return {
        "rounds_lost": c["rounds_lost"] == TARGETS["rounds_lost"],
        "ledger": c["ledger_violations"] == TARGETS["ledger_violations"],
        "detection": c["detection_p95_s"] is not None and c["detection_p95_s"] < TARGETS["detection_p95_s"]
        and c["unmeasured_failures"] == 0,
        "recovery": c["recovery_p95_s"] is not None and c["recovery_p95_s"] < TARGETS["recovery_p95_s"]
        and c["unmeasured_failures"] == 0,
        "goodput": ratio is not None and ratio >= TARGETS["goodput_ratio"],
        "goodput_ratio": ratio,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (bad ones exit 2)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=4, help="peer processes (default 4)")
    p.add_argument("--duration-s", type=float, default=180.0, help="length of each run (default 180)")
    p.add_argument("--every-s", type=float, default=15.0, help="one failure this often (default 15)")
    p.add_argument("--seed", type=int, default=0, help="seeds the failure kinds and victims (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--json-out", type=pathlib.Path, default=None, help="also write the JSON object to this file")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"failure kinds to use (default {','.join(KINDS)})")
    p.add_argument("--stop-s", type=float, default=None,
                   help="how long a SIGSTOPped peer stays stopped (default: peer timeout + 2 s)")
    p.add_argument("--heartbeat-interval-ms", type=int, default=None,
                   help="passed to dml-coordinator (default: its own)")
    p.add_argument("--peer-timeout-ms", type=int, default=None, help="passed to dml-coordinator (default: its own)")
    p.add_argument("--round-deadline-ms", type=int, default=None, help="passed to dml-coordinator (default: its own)")
    p.add_argument("--job-seed", type=int, default=JobSpec().seed, help="the job's seed (default JobSpec's)")
    p.add_argument("--settle-s", type=float, default=30.0,
                   help="after the window, wait up to this long for the last failure's recovery to be measured "
                        "(default 30)")
    p.add_argument("--committed-copy", choices=("memory", "disk"), default="memory",
                   help="dml-peer --committed-copy of every peer (disk: in the run's work dir; default memory)")
    p.add_argument("--skip-baseline", action="store_true", help="run only the chaos run (development)")
    p.add_argument("--work-dir", type=pathlib.Path, default=None, help="logs and state (default: a new temp dir, kept)")
    a = p.parse_args(argv)
    a.kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    if not a.kinds or any(k not in KINDS for k in a.kinds):
        p.error(f"--kinds must name some of {', '.join(KINDS)}")
    if a.peers < 2:
        p.error("--peers must be at least 2 (the job needs 2)")
    if not (a.duration_s > 0 and a.every_s > 0):
        p.error("--duration-s and --every-s must be positive")
    if a.stop_s is not None and not a.stop_s > 0:
        p.error("--stop-s must be positive")
    if a.settle_s < 0:
        p.error("--settle-s must be at least 0")
    if a.stop_s is None:
        a.stop_s = (a.peer_timeout_ms or CoordinatorConfig().peer_timeout_ms) / 1000 + 2.0
    return a


def skipped_baseline(c: dict[str, Any]) -> dict[str, Any]:
    """Stands in for the failure-free run under --skip-baseline: the table shows "-"."""
    b = {k: (None if not isinstance(v, (list, dict, str, bool)) else v) for k, v in c.items()}
    b.update(run="failure-free (skipped)", failures=0, rounds_lost="-", ledger_violations="-", round_numbers_ok=True,
             rounds_rewritten=[], logs="-", data_epochs="-", membership_epochs="-", evictions_in_window=[],
             rounds_per_s_first_last=[None, None], load_1min_start_end=None)
    return b


def report(c: dict[str, Any], b: dict[str, Any], a: argparse.Namespace, work: pathlib.Path) -> dict[str, Any]:
    """The JSON object of --json: the config, both runs' numbers and whether the targets were met."""
    return {"config": {"peers": a.peers, "duration_s": a.duration_s, "every_s": a.every_s, "seed": a.seed,
                       "kinds": a.kinds, "stop_s": a.stop_s, "work_dir": str(work),
                       "heartbeat_interval_ms": a.heartbeat_interval_ms or CoordinatorConfig().heartbeat_interval_ms,
                       "peer_timeout_ms": a.peer_timeout_ms or CoordinatorConfig().peer_timeout_ms},
            "chaos": {k: v for k, v in c.items() if not k.startswith("_")},
            "failure_free": {k: v for k, v in b.items() if not k.startswith("_")},
            "targets": TARGETS, "met": targets(c, b)}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    a = parse_args(argv)
    work = a.work_dir or pathlib.Path(tempfile.mkdtemp(prefix="dml-chaos-"))
    work.mkdir(parents=True, exist_ok=True)

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        c = run("chaos", a, work, chaos=True)
        _say("[chaos] failures (time from the first commit):")
        for e in c["_events"]:
            _say(e.summary(c["_t_start"]))
        for x in c["anomalies"]:
            _say(f"[chaos] ANOMALY: {x}")
        b = run("failure-free", a, work, chaos=False) if not a.skip_baseline else None
        for x in b["anomalies"] if b is not None else []:
            _say(f"[failure-free] ANOMALY: {x}")
    except (BenchError, ClusterError, jobapi.ApiError) as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nchaos: interrupted", file=sys.stderr)
        return 130
    for r in (c, b):
        if r is not None:
            for name, v in r["log_findings"].items():
                _say(f"[{r['run']}] log lines '{name}': {v['count']}" + "".join(f"\n    {x}" for x in v["excerpts"]))
    if b is None:
        b = skipped_baseline(c)
    out = report(c, b, a, work)
    if a.json_out is not None:
        a.json_out.write_text(json.dumps(out, default=str, indent=1))
    if a.json:
        print(json.dumps(out, default=str))
    else:
        print(table(c, b, a, out["met"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
