"""Chaos benchmark: the default job on a local cluster while peers and the coordinator fail.

    python benchmarks/chaos.py [--peers 4] [--duration-s 180] [--every-s 15] [--seed 0] [--json]

Runs the default task (``JobSpec`` defaults, rounds set very high, min_peers 2) on a coordinator
process (fixed free port, a state dir, so it can be restarted) and N ``dml-peer`` processes on
127.0.0.1, and injects one failure every ``--every-s`` seconds, kinds cycling through a seeded
permutation of:

- ``sigkill``: SIGKILL a random member peer, start a fresh peer process in its place at once;
- ``sigstop``: SIGSTOP a random member peer, SIGCONT it after ``--stop-s`` (longer than the peer
  timeout, so it is evicted and must re-register by itself);
- ``coordinator``: SIGKILL the coordinator, start the same command on the same state dir and port.

Then it cancels the job and runs the same job for the same duration without failures on a fresh
cluster, and prints one table comparing the two runs (``--json``: one JSON object instead).
Progress and per-failure details go to stderr; logs and state stay under ``--work-dir``.

A separate thread polls GetJob every ~50 ms; all timings come from that timeline (monotonic
clock) or, for peers re-attaching to a restarted coordinator, from the peers' log timestamps.
Every wait has a deadline and every process started is reaped (SIGCONT, SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
from dml.coordinator.ledger import violations
from dml.client.local import die_with_parent, reap
from dml.coordinator.service import CoordinatorConfig, job_shards
from dml.common.spec import MAX_ROUNDS, JobSpec, with_defaults

KINDS = ("sigkill", "sigstop", "coordinator")
FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}
POLL_S = 0.05
TARGETS = {"rounds_lost": 0, "ledger_violations": 0, "detection_p95_s": 3.0, "recovery_p95_s": 5.0,
           "goodput_ratio": 0.80}
TS_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
REG_RE = re.compile(r"peer (peer-[\w-]+): registered at ")
HB_FAIL_RE = re.compile(r": heartbeat failed \(")
HB_OK_RE = re.compile(r": coordinator reachable again|: evicted by the coordinator")
# Lines worth a look after a run (counted per pattern, a few excerpts kept).
FINDINGS = {
    "traceback": re.compile(r"Traceback"),
    "rollback": re.compile(r"rolling back"),
    "digest_mismatch": re.compile(r"disagree on parameters"),
    "round_deadline": re.compile(r"deadline of \d+ ms passed"),
    "job_finished": re.compile(r"job \S+: (FAILED|SUCCEEDED)"),
    "local_failure": re.compile(r"local failure"),
    "could_not_report": re.compile(r"could not report"),
    "critical": re.compile(r" CRITICAL "),
    "no_parameters": re.compile(r"could provide round"),
    "bad_report": re.compile(r"were allocated"),
}


class BenchError(Exception):
    """The benchmark could not go on (a process did not start, a deadline passed)."""


# -- processes -------------------------------------------------------------------------------
def free_port() -> int:
    """A port free right now on 127.0.0.1 (the coordinator keeps it across restarts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """One child process and its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: pathlib.Path
    started: float
    stopped: bool = False


class Cluster:
    """A coordinator and peers as processes; every process ever started is reaped by close()."""

    def __init__(self, root: pathlib.Path, coord_args: list[str]) -> None:
        self.state = root / "state"
        self.logs = root / "logs"
        self.state.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.port_file = self.state / "coordinator.port"
        self.coord_cmd = [sys.executable, "-m", "dml.coordinator.cli", "--host", "127.0.0.1", "--port", str(self.port),
                          "--state-dir", str(self.state), "--port-file", str(self.port_file), *coord_args]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if _SET_FORK_ENV:
            self.env.pop(_FORK_ENV, None)
        self.everything: list[Proc] = []
        self.coord: Proc | None = None
        self.peers: dict[int, Proc] = {}
        self.generations: dict[int, int] = {}

    def _spawn(self, name: str, cmd: list[str], log: pathlib.Path) -> Proc:
        with open(log, "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                 preexec_fn=die_with_parent)  # noqa: PLW1509 (one ctypes call, no locks)
        proc = Proc(name, p, log, time.monotonic())
        self.everything.append(proc)
        return proc

    def start_coordinator(self, timeout_s: float = 60.0) -> float:
        """Starts the coordinator (same command every time); returns when it listens."""
        self.port_file.unlink(missing_ok=True)
        gen = sum(1 for p in self.everything if p.name == "coordinator") + 1
        self.coord = self._spawn("coordinator", self.coord_cmd, self.logs / f"coordinator-{gen}.log")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.port_file.exists():
                return time.monotonic()
            if self.coord.popen.poll() is not None:
                raise BenchError(f"coordinator exited with {self.coord.popen.returncode} (see {self.coord.log})")
            time.sleep(0.01)
        raise BenchError(f"coordinator did not listen within {timeout_s:.0f}s (see {self.coord.log})")

    def start_peer(self, slot: int) -> Proc:
        """Starts a fresh peer process in ``slot`` (log peer-SLOT.GEN.log)."""
        gen = self.generations.get(slot, -1) + 1
        self.generations[slot] = gen
        cmd = [sys.executable, "-m", "dml.peer.cli", "--coordinator", self.address, "--host", "127.0.0.1",
               "--port", "0", "--device", "cpu"]
        self.peers[slot] = self._spawn(f"peer-{slot}", cmd, self.logs / f"peer-{slot}.{gen}.log")
        return self.peers[slot]

    def wait_registered(self, procs: list[Proc], timeout_s: float) -> None:
        """Waits until each peer has registered (its log says so)."""
        deadline = time.monotonic() + timeout_s
        left = list(procs)
        while left and time.monotonic() < deadline:
            for p in list(left):
                if p.popen.poll() is not None:
                    raise BenchError(f"{p.name} exited with {p.popen.returncode} (see {p.log})")
                if peer_ids(p.log):
                    left.remove(p)
            time.sleep(0.05)
        if left:
            raise BenchError(f"peers did not register within {timeout_s:.0f}s: {[p.name for p in left]}")

    def kill(self, proc: Proc) -> None:
        """SIGKILL and reap."""
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(10)

    def close(self) -> None:
        """Resumes stopped children, then SIGTERM / SIGKILL every process ever started."""
        for p in self.everything:
            if p.stopped and p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGCONT)
                p.stopped = False
        reap([p.popen for p in self.everything])


# -- logs ------------------------------------------------------------------------------------
def _wall(line: str) -> float | None:
    m = TS_RE.match(line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time, as logged


def _lines(path: pathlib.Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def peer_ids(path: pathlib.Path) -> list[tuple[float, str]]:
    """(wall time, peer id) of each registration in a peer's log, oldest first."""
    out = []
    for line in _lines(path):
        m = REG_RE.search(line)
        if m:
            out.append((_wall(line) or 0.0, m.group(1)))
    return out


def reattach_wall(path: pathlib.Path, after_wall: float, fail_by_wall: float) -> tuple[bool, float | None]:
    """After ``after_wall``: did the peer's heartbeat fail during this outage (by
    ``fail_by_wall``; a later failure belongs to a later outage), and when did one succeed again?"""
    failed = False
    for line in _lines(path):
        w = _wall(line)
        if w is None or w < after_wall - 0.002:
            continue
        if not failed and w <= fail_by_wall and HB_FAIL_RE.search(line):
            failed = True
        elif failed and HB_OK_RE.search(line):
            return True, w
    return failed, None


def eviction_cause(logs: pathlib.Path, peer_id: str, after_wall: float) -> str:
    """How the coordinator's log says a peer was removed (first such line after ``after_wall``)."""
    pid = re.escape(peer_id)
    causes = ((re.compile(rf"peer {pid}: no heartbeat for (\d+) ms"), "heartbeat timeout ({} ms)"),
              (re.compile(rf"peer {pid} reported by (\S+) as failed mid-exchange"), "neighbour report ({})"),
              (re.compile(rf"peer {pid} gives up its place()"), "its own report{}"),
              (re.compile(rf"evicting \[?[^\n]*{pid}[^\n]*which did not report()"), "round deadline{}"))
    for path in sorted(logs.glob("coordinator-*.log")):
        for line in _lines(path):
            if peer_id not in line or (_wall(line) or 0.0) < after_wall - 0.002:
                continue
            for rx, fmt in causes:
                m = rx.search(line)
                if m:
                    return fmt.format(m.group(1))
    return ""


EVICT_RE = re.compile(r"peer (peer-[\w-]+): no heartbeat for (\d+) ms|peer (peer-[\w-]+) reported by (\S+) as failed"
                      r"|peer (peer-[\w-]+) gives up its place|evicting (\[[^\]]*\]), which did not report")


def evictions(logs: pathlib.Path, from_wall: float, to_wall: float) -> list[tuple[float, str, str]]:
    """(wall time, peer id(s), cause) of each eviction the coordinator logged in the interval."""
    out = []
    for path in sorted(logs.glob("coordinator-*.log")):
        for line in _lines(path):
            w = _wall(line)
            if w is None or not from_wall - 0.002 <= w < to_wall:
                continue
            m = EVICT_RE.search(line)
            if not m:
                continue
            if m.group(1):
                out.append((w, m.group(1), f"heartbeat timeout {m.group(2)} ms"))
            elif m.group(3):
                out.append((w, m.group(3), f"reported by {m.group(4)}"))
            elif m.group(5):
                out.append((w, m.group(5), "gave up its place"))
            else:
                out.append((w, m.group(6), "round deadline"))
    return sorted(out)


def scan_logs(logs: pathlib.Path, until_wall: float) -> dict[str, Any]:
    """Counts lines of interest in every log of a run, with a few excerpts; timestamped lines
    after ``until_wall`` (the job was cancelled, the cluster is being stopped) are left out."""
    out: dict[str, Any] = {}
    for path in sorted(logs.glob("*.log")):
        for line in _lines(path):
            w = _wall(line)
            if w is not None and w > until_wall:
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
    """One GetJob poll: when it answered (monotonic) and what it said (ok False: no answer)."""

    t: float
    ok: bool
    round: int = 0
    epoch: int = 0
    peers: tuple[str, ...] = ()
    samples: int = 0
    state: str = ""
    digest: str = ""
    error: str = ""
    latency: float = 0.0  # how long the poll took


CHANNEL_OPTS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.initial_reconnect_backoff_ms", 50),
                ("grpc.min_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]


class Monitor(threading.Thread):
    """Polls GetJob every ~50 ms into ``obs`` (a fresh channel after each failed poll, so a
    restarted coordinator is seen as soon as it answers)."""

    def __init__(self, address: str, job_id: str) -> None:
        super().__init__(name="monitor", daemon=True)
        self.address, self.job_id = address, job_id
        self.obs: list[Obs] = []
        self.halt = threading.Event()

    def run(self) -> None:
        ch: grpc.Channel | None = None
        stub = None
        req = jobs_pb2.GetJobRequest(job_id=self.job_id)
        while not self.halt.is_set():
            t0 = time.monotonic()
            if stub is None:
                ch = grpc.insecure_channel(self.address, options=CHANNEL_OPTS)
                stub = jobs_pb2_grpc.JobServiceStub(ch)
            try:
                j = stub.GetJob(req, timeout=2.0).job
                o = Obs(time.monotonic(), True, j.round, j.epoch, tuple(j.peers), j.samples,
                        jobapi.STATE_NAMES[j.state], j.last.digest if j.HasField("last") else "")
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                o = Obs(time.monotonic(), False, error=code.name if code else str(e))
                if ch is not None:
                    ch.close()
                ch, stub = None, None
            o.latency = o.t - t0
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


def last_before(obs: list[Obs], t: float) -> Obs | None:
    """The last answered poll at or before ``t``."""
    best = None
    for o in obs:
        if o.t > t:
            break
        if o.ok:
            best = o
    return best


# -- failures --------------------------------------------------------------------------------
@dataclass
class Event:
    """One injected failure and what was measured about it (seconds, monotonic)."""

    kind: str
    t: float  # injection
    wall: float
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
    how: str = ""  # peer: how the coordinator learnt of it (its log)
    collateral: list[str] = field(default_factory=list)  # other peers evicted soon after (coordinator log)
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


def current_member_slots(cluster: Cluster, members: tuple[str, ...]) -> dict[int, str]:
    """Peer slots (alive, not stopped) whose current peer id is in the ring."""
    out = {}
    for slot, p in sorted(cluster.peers.items()):
        if p.stopped or p.popen.poll() is not None:
            continue
        ids = [pid for _, pid in peer_ids(p.log) if pid in members]
        if ids:
            out[slot] = ids[-1]
    return out


def analyse(ev: Event, obs: list[Obs], cluster: Cluster, off: float, until_wall: float = math.inf) -> None:
    """Fills the event's measurements from the timeline (``off``: monotonic minus wall clock);
    ``until_wall``: when the next failure was injected (collateral evictions are looked for before it)."""
    ev.collateral = [f"{pid} ({cause}) at +{w - ev.wall:.2f}s"
                     for w, pid, cause in evictions(cluster.logs, ev.wall, min(until_wall, ev.wall + 10.0))
                     if not ev.victim_id or ev.victim_id not in pid]
    horizon = ev.t + 60.0
    det: Obs | None = None
    if ev.kind in ("sigkill", "sigstop"):
        det = first(obs, ev.t, lambda o: ev.victim_id not in o.peers, horizon)
        if det is not None:
            ev.detection_s = det.t - ev.t
        regs = peer_ids(pathlib.Path(ev.log))
        if ev.kind == "sigkill":
            new_id = regs[0][1] if regs else ""
            since = ev.t
        else:
            later = [pid for w, pid in regs if w + off > ev.t]
            new_id = later[0] if later else ""
            since = ev.t_cont if ev.t_cont is not None else ev.t
        if new_id:
            j = first(obs, since, lambda o: new_id in o.peers, horizon)
            if j is not None:
                ev.rejoin_s = j.t - since
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
            failed, w = reattach_wall(pathlib.Path(log), ev.wall, ev.wall + ev.answer_s + 2.0)
            if failed and w is None:
                missing.append(slot)
            elif w is not None:
                t_det = max(t_det, w + off)
        if missing:
            ev.note = f"no heartbeat back yet from {missing}"
            return
        ev.note = ""
        ev.detection_s = t_det - ev.t
        ev.reattach_s = t_det - ev.t
        det = last_before(obs, t_det) or ans
        if det.t < ans.t:
            det = ans
    if det is not None and ev.detection_s is not None:
        t_det = ev.t + ev.detection_s
        r_det = det.round
        nxt = first(obs, t_det, lambda o: o.round > r_det, horizon)
        if nxt is not None:
            ev.recovery_s = nxt.t - t_det
            if ev.kind == "coordinator" and ev.t_restarted is not None:
                lats = [o.latency for o in obs if ev.t_restarted <= o.t <= nxt.t]
                ev.slowest_poll_s = max(lats) if lats else None
    if ev.kind in ("sigkill", "sigstop") and ev.victim_id:
        ev.how = eviction_cause(cluster.logs, ev.victim_id, ev.wall)


def inject(kind: str, cluster: Cluster, mon: Monitor, rng: random.Random, stop_s: float,
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
        ev = Event(kind, time.monotonic(), time.time(), victim=f"peer-{slot}", victim_id=slots[slot],
                   round_before=latest.round, digest_before=latest.digest)
        if kind == "sigkill":
            proc.popen.send_signal(signal.SIGKILL)
            ev.t, ev.wall = time.monotonic(), time.time()
            proc.popen.wait(10)
            new = cluster.start_peer(slot)
            ev.t_restarted, ev.log = time.monotonic(), str(new.log)
        else:
            proc.popen.send_signal(signal.SIGSTOP)
            ev.t, ev.wall = time.monotonic(), time.time()
            proc.stopped = True
            ev.log = str(proc.log)
            pending.append((ev.t + stop_s, proc, ev))
        return ev
    assert cluster.coord is not None
    members = current_member_slots(cluster, latest.peers)
    ev = Event(kind, time.monotonic(), time.time(), victim="coordinator", round_before=latest.round,
               digest_before=latest.digest, members={f"peer-{s}": str(cluster.peers[s].log) for s in members})
    cluster.coord.popen.send_signal(signal.SIGKILL)
    ev.t, ev.wall = time.monotonic(), time.time()
    cluster.coord.popen.wait(10)
    ev.t_restarted = cluster.start_coordinator()
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


def read_rolled_back(job: jobs_pb2.JobStatus, state_dir: pathlib.Path, job_id: str) -> tuple[int | None, str]:
    """The job's rolled_back_rounds: from GetJob if the API has the field, else the state DB."""
    if "rolled_back_rounds" in job.DESCRIPTOR.fields_by_name:
        return int(job.rolled_back_rounds), "GetJob"  # type: ignore[attr-defined]
    try:
        db = sqlite3.connect(f"file:{state_dir / 'coordinator.db'}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT body FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        finally:
            db.close()
        if row is None:
            return None, "job not in the state DB"
        v = json.loads(row[0]).get("rolled_back_rounds")
        return (int(v) if v is not None else None), "state DB (not exposed by GetJob)"
    except sqlite3.Error as e:
        return None, f"state DB unreadable: {e}"


def run(name: str, a: argparse.Namespace, work: pathlib.Path, chaos: bool) -> dict[str, Any]:
    """One run: cluster, job, (failures), measurements."""
    root = work / name
    coord_args: list[str] = []
    for flag, v in (("--heartbeat-interval-ms", a.heartbeat_interval_ms), ("--peer-timeout-ms", a.peer_timeout_ms),
                    ("--round-deadline-ms", a.round_deadline_ms)):
        if v is not None:
            coord_args += [flag, str(v)]
    spec = JobSpec(rounds=MAX_ROUNDS, min_peers=2, seed=a.job_seed)
    cluster = Cluster(root, coord_args)
    mon: Monitor | None = None
    events: list[Event] = []
    anomalies: list[str] = []
    off = time.monotonic() - time.time()
    kind_rng, victim_rng = random.Random(a.seed), random.Random(a.seed + 1)
    kinds = kinds_forever(kind_rng, a.kinds)
    pending: list[tuple[float, Proc, Event]] = []
    load0 = os.getloadavg()
    try:
        cluster.start_coordinator()
        procs = [cluster.start_peer(i) for i in range(a.peers)]
        cluster.wait_registered(procs, 120)
        with jobapi.JobClient(cluster.address, timeout_s=30) as client:
            job_id = client.submit(spec)
        _say(f"[{name}] coordinator {cluster.address}, {a.peers} peers, job {job_id}; logs in {cluster.logs}")
        mon = Monitor(cluster.address, job_id)
        mon.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ((o := mon.latest()) and o.round >= 1):
            time.sleep(0.05)
        first_commit = first(mon.obs, 0, lambda o: o.round >= 1)
        if first_commit is None:
            raise BenchError(f"no round committed within 120 s (see {cluster.logs})")
        t_start = first_commit.t
        if first_commit.epoch != 1 or len(first_commit.peers) != a.peers:
            anomalies.append(f"before the window (no failure injected yet): round 1 committed under membership epoch "
                             f"{first_commit.epoch} with {len(first_commit.peers)} of {a.peers} peers; see the "
                             f"coordinator log for evictions during round 1")
        t_end = t_start + a.duration_s
        next_at = t_start + a.every_s
        next_kind = next(kinds)
        last_print = t_start
        while True:
            now = time.monotonic()
            for item in [x for x in pending if x[0] <= now]:
                pending.remove(item)
                _, proc, ev = item
                if proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGCONT)
                ev.t_cont = time.monotonic()
                proc.stopped = False
            if now >= t_end and not pending:
                break
            latest = mon.latest()
            if latest is not None and latest.state in FINISHED:
                anomalies.append(f"job ended {latest.state} at +{latest.t - t_start:.1f}s (round {latest.round})")
                break
            for slot, p in list(cluster.peers.items()):
                if p.popen.poll() is not None:
                    anomalies.append(f"{p.name} exited by itself with {p.popen.returncode} at +{now - t_start:.1f}s "
                                     f"(log {p.log.name}); started a fresh one")
                    cluster.start_peer(slot)
            if cluster.coord is not None and cluster.coord.popen.poll() is not None:
                anomalies.append(f"coordinator exited by itself with {cluster.coord.popen.returncode} at "
                                 f"+{now - t_start:.1f}s; restarted it")
                cluster.start_coordinator()
            if chaos and now >= next_at and now < t_end and not pending:
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
        while chaos and time.monotonic() < settle:
            obs = list(mon.obs)
            for i, ev in enumerate(events):
                analyse(ev, obs, cluster, off, events[i + 1].wall if i + 1 < len(events) else math.inf)
            if all(ev.recovery_s is not None and (ev.kind == "coordinator" or ev.rejoin_s is not None) for ev in events):
                break
            time.sleep(0.2)
        mon.halt.set()
        mon.join(5)
        obs = list(mon.obs)
        stub = jobapi.JobClient(cluster.address).stub
        cancel_wall = time.time()
        with contextlib.suppress(grpc.RpcError):
            stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=10)
        resp = None
        for _ in range(20):  # the coordinator may just have been restarted
            try:
                resp = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(cluster.address, options=CHANNEL_OPTS)).GetJob(
                    jobs_pb2.GetJobRequest(job_id=job_id, include_history=True), timeout=30)
                break
            except grpc.RpcError:
                time.sleep(0.5)
        if resp is None:
            raise BenchError("could not read the job's history after the run")
        for i, ev in enumerate(events):
            analyse(ev, obs, cluster, off, events[i + 1].wall if i + 1 < len(events) else cancel_wall)
    finally:
        if mon is not None:
            mon.halt.set()
        cluster.close()
    rolled_back, rb_source = read_rolled_back(resp.job, cluster.state, job_id)
    res = measure(name, a, spec, events, obs, resp, t_start, t_end, rolled_back, rb_source, anomalies, cluster)
    res["log_findings"] = scan_logs(cluster.logs, cancel_wall)
    res["evictions_in_window"] = [f"+{w - (t_start - off):.2f}s {pid} ({cause})"
                                  for w, pid, cause in evictions(cluster.logs, t_start - off, t_end - off)]
    res["load_1min_start_end"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    return res


def measure(name: str, a: argparse.Namespace, spec: JobSpec, events: list[Event], obs: list[Obs],
            resp: jobs_pb2.GetJobResponse, t_start: float, t_end: float, rolled_back: int | None, rb_source: str,
            anomalies: list[str], cluster: Cluster) -> dict[str, Any]:
    """The numbers of one run."""
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
    sizes = [int(s.size) for s in job_shards(with_defaults(spec))]
    ledger = violations([[(x.shard_id, x.data_epoch, x.start, x.stop)
                          for m in sorted(h.consumed, key=lambda m: m.peer_id) for x in m.ranges]
                         for h in hist], sizes)
    at_start, at_end = last_before(obs, t_start), last_before(obs, t_end)
    r0 = at_start.round if at_start else 0
    r1 = at_end.round if at_end else 0
    window_samples = sum(by_round[r].samples for r in range(r0 + 1, r1 + 1) if r in by_round)
    span = t_end - t_start
    commits, top = [], 0
    for o in obs:
        if o.ok:
            if o.round > top and t_start < o.t <= t_end:
                commits.append(o.t)
            top = max(top, o.round)
    gaps_s = [b - a_ for a_, b in zip([t_start] + commits, commits + [t_end])]
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
        o0, o1 = last_before(obs, t0), last_before(obs, t1)
        return (o1.round - o0.round) / (t1 - t0) if o0 and o1 and t1 > t0 else None
    return {
        "run": name,
        "job_id": resp.job.job_id,
        "final_state": jobapi.STATE_NAMES[resp.job.state],
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
        "rounds_committed_in_window": r1 - r0,
        "rounds_committed_total": n,
        "rounds_lost": rounds_lost,
        "round_numbers_ok": order_ok,
        "round_gaps": gaps[:50], "round_duplicates": dupes[:50], "rounds_rewritten": rewritten[:50],
        "round_regressions": regressions[:20],
        "rolled_back_rounds": rolled_back, "rolled_back_rounds_source": rb_source,
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
        "membership_epochs": (at_end.epoch if at_end else 0),
        "anomalies": anomalies,
        "logs": str(cluster.logs),
        "events": [{"at_s": round(e.t - t_start, 3), "kind": e.kind, "victim": e.victim, "victim_id": e.victim_id,
                    "round_before": e.round_before, "detection_s": e.detection_s, "recovery_s": e.recovery_s,
                    "rejoin_s": e.rejoin_s, "coordinator_answer_s": e.answer_s, "heartbeats_back_s": e.reattach_s,
                    "slowest_poll_after_restart_s": e.slowest_poll_s, "evicted_by": e.how,
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
    row("evictions the coordinator logged (window)", str(len(c["evictions_in_window"])),
        str(len(b.get("evictions_in_window") or [])))
    row("other (healthy) peers evicted after a failure", str(c["other_peers_evicted"]), "-")
    row("failures not measured (deadline 60 s)", str(c["unmeasured_failures"]), "-")
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
    row("data epochs / membership epochs", f"{c['data_epochs']} / {c['membership_epochs']}",
        f"{b['data_epochs']} / {b['membership_epochs']}")
    lines += ["",
              "window: from the first committed round for --duration-s; goodput = samples of the rounds committed in",
              "  the window / window length. Timings come from GetJob polled every 50 ms (nearest-rank percentiles).",
              "detection: sigkill/sigstop: from the signal until GetJob no longer lists the peer (evicted);",
              "  coordinator: from kill -9 until the restarted coordinator answers GetJob AND every ring member whose",
              "  heartbeat failed has logged a successful heartbeat again (peer log 'coordinator reachable again').",
              "recovery: from detection until GetJob shows a round committed after the one it showed at detection.",
              "peer back in the ring: sigkill: from the kill until the replacement process is a ring member;",
              "  sigstop: from SIGCONT until the peer's re-registered id is a ring member.",
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


def main() -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--duration-s", type=float, default=180.0, help="length of each run (default 180)")
    p.add_argument("--every-s", type=float, default=15.0, help="one failure this often (default 15)")
    p.add_argument("--seed", type=int, default=0, help="seeds the failure kinds and victims")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--json-out", type=pathlib.Path, default=None, help="also write the JSON object to this file")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"failure kinds to use (default {','.join(KINDS)})")
    p.add_argument("--stop-s", type=float, default=None,
                   help="how long a SIGSTOPped peer stays stopped (default: peer timeout + 2 s)")
    p.add_argument("--heartbeat-interval-ms", type=int, default=None, help="passed to dml-coordinator")
    p.add_argument("--peer-timeout-ms", type=int, default=None, help="passed to dml-coordinator")
    p.add_argument("--round-deadline-ms", type=int, default=None, help="passed to dml-coordinator")
    p.add_argument("--job-seed", type=int, default=JobSpec().seed, help="the job's seed (default JobSpec's)")
    p.add_argument("--settle-s", type=float, default=30.0,
                   help="after the window, wait up to this long for the last failure's recovery to be measured")
    p.add_argument("--skip-baseline", action="store_true", help="run only the chaos run (development)")
    p.add_argument("--work-dir", type=pathlib.Path, default=None, help="logs and state (default: a new temp dir, kept)")
    a = p.parse_args()
    a.kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    if not a.kinds or any(k not in KINDS for k in a.kinds):
        p.error(f"--kinds must name some of {', '.join(KINDS)}")
    if a.peers < 2:
        p.error("--peers must be at least 2 (the job needs 2)")
    if a.duration_s <= 0 or a.every_s <= 0:
        p.error("--duration-s and --every-s must be positive")
    if a.stop_s is None:
        a.stop_s = (a.peer_timeout_ms or CoordinatorConfig().peer_timeout_ms) / 1000 + 2.0
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
    except BenchError as e:
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
        b = {k: (None if not isinstance(v, (list, dict, str, bool)) else v) for k, v in c.items()}
        b.update(run="failure-free (skipped)", failures=0, rounds_lost="-", ledger_violations="-", round_numbers_ok=True,
                 rounds_rewritten=[], logs="-", data_epochs="-", membership_epochs="-", evictions_in_window=[],
                 rounds_per_s_first_last=[None, None], load_1min_start_end=None)
    t = targets(c, b)
    out = {"config": {"peers": a.peers, "duration_s": a.duration_s, "every_s": a.every_s, "seed": a.seed,
                      "kinds": a.kinds, "stop_s": a.stop_s, "work_dir": str(work),
                      "heartbeat_interval_ms": a.heartbeat_interval_ms or CoordinatorConfig().heartbeat_interval_ms,
                      "peer_timeout_ms": a.peer_timeout_ms or CoordinatorConfig().peer_timeout_ms},
           "chaos": {k: v for k, v in c.items() if not k.startswith("_")},
           "failure_free": {k: v for k, v in b.items() if not k.startswith("_")},
           "targets": TARGETS, "met": t}
    if a.json_out is not None:
        a.json_out.write_text(json.dumps(out, default=str, indent=1))
    if a.json:
        print(json.dumps(out, default=str))
    else:
        print(table(c, b, a, t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
