"""Flood probes: idle streams, inbox and shared-memory floods against a running local cluster.

    python benchmarks/flood.py [--peers 3] [--hold-s 10] [--settle-s 12] [--probes ...] [--json]

Starts a coordinator and ``--peers`` peers on 127.0.0.1 (``dml.client.cluster.LocalCluster``)
running the default ring job with rounds set very high, waits for its first commit, then runs
each probe in turn against the coordinator or peer 0:

With authentication on (the default) these calls carry no credential and are refused
UNAUTHENTICATED before they hold anything; ``--no-auth`` runs the cluster without it (a
loopback-only setup), so the same floods meet the limits themselves (per-client and long-call
caps, idle cuts, inbox and offer bounds).

- ``coord-streams``: ``--coord-streams`` (260) UploadCheckpoint streams that send nothing, held
  ``--hold-s``;
- ``peer-streams``: ``--peer-streams`` (20) PushChunks streams that send nothing, held ``--hold-s``;
- ``inbox``: PushChunks of 1 MiB chunks to ``--inbox-keys`` made-up job ids (16 chunks each,
  8 streams at a time), each stream held open ``--hold-s`` at most;
- ``shm``: ``--shm-offers`` OpenDataPlane offers asking for shared-memory slots of the largest
  size, for made-up job ids; then the same flood once more, peer 0 SIGKILLed at once, and a fresh
  peer started in its slot (its start-up cleans up after the dead one).

For each probe it prints, before / during / after (``--settle-s`` after the probe ends): the
coordinator's health latency (max over checks every 0.1 s, each with a 1 s deadline; a failed
check counts as "fail"), the job's evictions and committed rounds, the target's RSS, and the
``dml-*`` files in /dev/shm (count and apparent size), plus how the probe's own calls ended
(status codes). Every process is reaped; the logs stay under ``--work-dir``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_FORK_ENV = "GRPC_ENABLE_FORK_SUPPORT"
_SET_FORK_ENV = _FORK_ENV not in os.environ
if _SET_FORK_ENV:
    os.environ[_FORK_ENV] = "false"

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from dml.client import api as jobapi  # noqa: E402
from dml.client.cluster import ClusterError, LocalCluster, Proc, registrations  # noqa: E402
from dml.common import auth, rpc  # noqa: E402
from dml.common.tls import TlsConfig  # noqa: E402
from dml.common.spec import MAX_ROUNDS, JobSpec  # noqa: E402
from dml.v1 import control_pb2_grpc, exchange_pb2, exchange_pb2_grpc, jobs_pb2, jobs_pb2_grpc  # noqa: E402

PROBES = ("coord-streams", "peer-streams", "inbox", "shm")
SHM_DIR = pathlib.Path("/dev/shm")
CHUNK_ELEMS = 1 << 18  # 1 MiB of float32
HEALTH_TIMEOUT_S = 1.0


class BenchError(Exception):
    """The benchmark could not go on."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (None once it is gone)."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def shm_use(pid: int | None = None) -> tuple[int, float]:
    """dml's files in /dev/shm (those of ``pid`` only, if given): count and apparent MiB."""
    n, size = 0, 0
    prefix = "dml-" if pid is None else f"dml-{pid}-"
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return 0, 0.0
    for e in entries:
        if e.name.startswith(prefix):
            try:
                size += e.stat().st_size
                n += 1
            except OSError:
                pass
    return n, size / (1 << 20)


@dataclass
class Monitor:
    """Checks the coordinator's health every 0.1 s and polls the job; keeps per-phase figures."""

    address: str
    job_id: str
    tls: TlsConfig | None = None  # the cluster's: its ports take nothing else
    token: str = ""  # the operator token: GetJob is job control
    phase: str = "before"
    health: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    failures: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    job: jobs_pb2.JobStatus | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Starts the two polling threads."""
        threading.Thread(target=self._health_loop, daemon=True, name="health").start()
        threading.Thread(target=self._job_loop, daemon=True, name="job").start()

    def stop(self) -> None:
        """Stops polling."""
        self._stop.set()

    def _health_loop(self) -> None:
        with rpc.channel(self.address, tls=self.tls) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not self._stop.wait(0.1):
                phase, t0 = self.phase, time.monotonic()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S)
                    self.health[phase].append(time.monotonic() - t0)
                except grpc.RpcError:
                    self.failures[phase] += 1

    def _job_loop(self) -> None:
        with rpc.channel(self.address, tls=self.tls) as ch:
            stub = jobs_pb2_grpc.JobServiceStub(auth.with_token(ch, self.token) if self.token else ch)
            while not self._stop.wait(0.25):
                try:
                    self.job = stub.GetJob(jobs_pb2.GetJobRequest(job_id=self.job_id), timeout=2.0).job
                except grpc.RpcError:
                    pass

    def health_figure(self, phase: str) -> str:
        """``max 12 ms (40 checks)``, or with the failed checks."""
        xs = self.health.get(phase, [])
        fails = self.failures.get(phase, 0)
        top = f"max {max(xs) * 1000:.0f} ms" if xs else "no answer"
        return f"{top} ({len(xs)} ok" + (f", {fails} FAILED)" if fails else ")")


def snapshot(mon: Monitor, pid: int) -> dict[str, Any]:
    """What one moment looks like: evictions, round, RSS of ``pid``, /dev/shm."""
    job = mon.job
    n, mb = shm_use()
    return {"evictions": job.evictions_total if job else None, "round": job.round if job else None,
            "rss_mb": rss_mb(pid), "shm_files": n, "shm_mb": round(mb, 1)}


def hold(event: threading.Event, first: Any = None) -> Iterator[Any]:
    """A request iterator that sends ``first`` (if any), then nothing until ``event``."""
    if first is not None:
        yield first
    event.wait()


def outcomes(futs: list[grpc.Future], timeout_s: float) -> dict[str, int]:
    """How the calls ended: status code name -> count ("OK", "open" for still running)."""
    out: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + timeout_s
    for f in futs:
        try:
            f.result(timeout=max(0.01, deadline - time.monotonic()))
            out["OK"] += 1
        except grpc.FutureTimeoutError:
            out["open"] += 1
        except grpc.RpcError as e:
            out[e.code().name if isinstance(e, grpc.Call) else "error"] += 1
    return dict(out)


def idle_streams(address: str, n: int, open_call: Callable[[grpc.Channel, threading.Event], grpc.Future],
                 hold_s: float, on_held: Callable[[], None], tls: TlsConfig | None = None) -> dict[str, int]:
    """``n`` calls that send nothing for ``hold_s``; returns how they ended (before release)."""
    release = threading.Event()
    channels = [rpc.channel(address, tls=tls) for _ in range(max(1, n // 50))]  # a few connections, like a real flood
    try:
        futs = [open_call(channels[i % len(channels)], release) for i in range(n)]
        time.sleep(hold_s)
        on_held()
        ended = outcomes(futs, 0.5)
        release.set()
        outcomes(futs, 5.0)
        return ended
    finally:
        release.set()
        for ch in channels:
            ch.close()


def probe_coord_streams(cluster: LocalCluster, a: argparse.Namespace, during: Callable[[], None]) -> dict[str, int]:
    def open_call(ch: grpc.Channel, release: threading.Event) -> grpc.Future:
        return control_pb2_grpc.PeerControlStub(ch).UploadCheckpoint.future(hold(release), timeout=a.hold_s + 30)
    return idle_streams(cluster.address, a.coord_streams, open_call, a.hold_s, during, a.tls)


def probe_peer_streams(target: str, a: argparse.Namespace, during: Callable[[], None]) -> dict[str, int]:
    def open_call(ch: grpc.Channel, release: threading.Event) -> grpc.Future:
        return exchange_pb2_grpc.PeerExchangeStub(ch).PushChunks.future(hold(release), timeout=a.hold_s + 30)
    return idle_streams(target, a.peer_streams, open_call, a.hold_s, during, a.tls)


def probe_inbox(target: str, a: argparse.Namespace, during: Callable[[], None]) -> dict[str, int]:
    data = bytes(4 * CHUNK_ELEMS)

    def push(i: int, ch: grpc.Channel) -> str:
        def chunks() -> Iterator[exchange_pb2.TensorChunk]:
            for s in range(16):
                yield exchange_pb2.TensorChunk(job_id=f"made-up-{i}", round=1, epoch=1, sender_id=f"x{i}",
                                               phase=1, step=s, offset_elems=0, count=CHUNK_ELEMS, codec=1, data=data)
        try:
            exchange_pb2_grpc.PeerExchangeStub(ch).PushChunks(chunks(), timeout=a.hold_s)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name if isinstance(e, grpc.Call) else "error"

    got: collections.Counter[str] = collections.Counter()
    with rpc.channel(target, tls=a.tls, max_message_bytes=rpc.EXCHANGE_MESSAGE_BYTES) as ch, \
            futures.ThreadPoolExecutor(8) as pool:
        for r in pool.map(lambda i: push(i, ch), range(a.inbox_keys)):
            got[r] += 1
    during()
    return dict(got)


def open_offers(target: str, n: int, tls: TlsConfig | None = None) -> dict[str, int]:
    """``n`` OpenDataPlane calls asking for the largest shared-memory slots."""
    got: collections.Counter[str] = collections.Counter()
    with rpc.channel(target, tls=tls) as ch:
        stub = exchange_pb2_grpc.PeerExchangeStub(ch)
        for i in range(n):
            try:
                r = stub.OpenDataPlane(exchange_pb2.OpenDataPlaneRequest(
                    job_id=f"made-up-{i}", round=1, epoch=1, sender_id=f"x{i % 7}", shm_slot_bytes=16 << 20),
                    timeout=5)
                got["OK with shm" if r.shm_path else "OK"] += 1
            except grpc.RpcError as e:
                got[e.code().name if isinstance(e, grpc.Call) else "error"] += 1
    return dict(got)


def probe_shm(target: str, a: argparse.Namespace, during: Callable[[], None]) -> dict[str, int]:
    got = open_offers(target, a.shm_offers, a.tls)
    during()
    return got


def wait_registered(procs: list[Proc], timeout_s: float) -> None:
    """Until each peer process has logged its registration."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        while not registrations(p.log):
            if not p.alive:
                raise BenchError(f"{p.name} exited with {p.popen.returncode} (see {p.log})")
            if time.monotonic() > deadline:
                raise BenchError(f"{p.name} did not register within {timeout_s:.0f}s")
            time.sleep(0.05)


def run_probe(name: str, mon: Monitor, pid: int, a: argparse.Namespace, body: Callable[[Callable[[], None]], dict[str, int]]) -> dict[str, Any]:
    """before (2 s) / during (the probe) / after (``--settle-s``) figures for one probe."""
    mon.phase = f"{name}:before"
    time.sleep(2.0)
    res: dict[str, Any] = {"probe": name, "before": snapshot(mon, pid)}
    mon.phase = f"{name}:during"
    t0 = time.monotonic()

    def during() -> None:
        res["during"] = snapshot(mon, pid)

    res["calls"] = body(during)
    res["probe_s"] = round(time.monotonic() - t0, 1)
    mon.phase = f"{name}:after"
    time.sleep(a.settle_s)
    res["after"] = snapshot(mon, pid)
    for ph in ("before", "during", "after"):
        res[f"health_{ph}"] = mon.health_figure(f"{name}:{ph}")
        xs = mon.health.get(f"{name}:{ph}", [])
        res[f"health_{ph}_max_ms"] = round(max(xs) * 1000, 1) if xs else None
        res[f"health_{ph}_failed"] = mon.failures.get(f"{name}:{ph}", 0)
    return res


def shm_kill_step(cluster: LocalCluster, target: str, a: argparse.Namespace) -> dict[str, Any]:
    """Offers from a flood, the peer SIGKILLed at once, a fresh peer started in its slot."""
    proc = cluster.peers[0]
    pid = proc.popen.pid
    open_offers(target, min(a.shm_offers, 64), a.tls)
    cluster.kill(proc)
    left = shm_use(pid)
    fresh = cluster.start_peer(0, proc.args)
    wait_registered([fresh], 120)
    return {"dead_pid_files_after_kill": left[0], "dead_pid_mb_after_kill": round(left[1], 1),
            "dead_pid_files_after_restart": shm_use(pid)[0]}


def table(results: list[dict[str, Any]], kill: dict[str, Any] | None) -> str:
    """The figures as text."""
    lines = []
    for r in results:
        lines.append(f"== {r['probe']} ({r['probe_s']} s): calls {r['calls']}")
        for ph in ("before", "during", "after"):
            s = r.get(ph) or {}
            rss = f"{s['rss_mb']:.0f}" if s.get("rss_mb") is not None else "-"
            lines.append(f"  {ph:<6}  health {r[f'health_{ph}']:<26} evictions {s.get('evictions')!s:<3} "
                         f"round {s.get('round')!s:<5} rss {rss:>5} MiB  /dev/shm {s.get('shm_files')} files "
                         f"{s.get('shm_mb')} MiB")
    if kill is not None:
        lines.append(f"== shm after SIGKILL: {kill['dead_pid_files_after_kill']} files "
                     f"({kill['dead_pid_mb_after_kill']} MiB) of the dead pid; after a fresh peer started: "
                     f"{kill['dead_pid_files_after_restart']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (bad ones exit 2)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=3, help="peer processes (default 3)")
    p.add_argument("--probes", default=",".join(PROBES), help=f"which probes (default {','.join(PROBES)})")
    p.add_argument("--hold-s", type=float, default=10.0, help="how long idle streams are held (default 10)")
    p.add_argument("--settle-s", type=float, default=12.0, help="wait after each probe before 'after' (default 12: past the 10 s expiry of offers and unclaimed inboxes)")
    p.add_argument("--coord-streams", type=int, default=260, help="idle UploadCheckpoint streams (default 260)")
    p.add_argument("--peer-streams", type=int, default=20, help="idle PushChunks streams (default 20)")
    p.add_argument("--inbox-keys", type=int, default=40, help="made-up job ids to push 16 MiB each to (default 40)")
    p.add_argument("--shm-offers", type=int, default=300, help="OpenDataPlane(shm) offers (default 300)")
    p.add_argument("--no-kill", action="store_true", help="skip the SIGKILL step of the shm probe")
    p.add_argument("--no-auth", action="store_true",
                   help="run the cluster with --no-auth (loopback only), so the floods meet the limits "
                        "instead of authentication's UNAUTHENTICATED")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--work-dir", type=pathlib.Path, default=None, help="logs and state (default: a new temp dir)")
    a = p.parse_args(argv)
    a.probes = [x.strip() for x in a.probes.split(",") if x.strip()]
    if not a.probes or any(x not in PROBES for x in a.probes):
        p.error(f"--probes must name some of {', '.join(PROBES)}")
    if a.peers < 2:
        p.error("--peers must be at least 2")
    if not (a.hold_s > 0 and a.settle_s >= 0):
        p.error("--hold-s must be positive and --settle-s at least 0")
    for name in ("coord_streams", "peer_streams", "inbox_keys", "shm_offers"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    a = parse_args(argv)
    work = a.work_dir or pathlib.Path(tempfile.mkdtemp(prefix="dml-flood-"))
    env = {k: v for k, v in os.environ.items() if not (_SET_FORK_ENV and k == _FORK_ENV)}
    cluster = LocalCluster(work / "state", work / "logs", env=env, cwd=ROOT,
                           auth=not a.no_auth)
    mon: Monitor | None = None
    results: list[dict[str, Any]] = []
    kill = None
    try:
        cluster.start_coordinator()
        procs = [cluster.start_peer(i) for i in range(a.peers)]
        wait_registered(procs, 120)
        a.tls = cluster.tls  # the flood comes from inside the cluster: outsiders fail the TLS handshake
        with cluster.client(timeout_s=30) as client:
            job_id = client.submit(JobSpec(rounds=MAX_ROUNDS, min_peers=a.peers))
        mon = Monitor(cluster.address, job_id, cluster.tls, cluster.operator_token())
        mon.start()
        deadline = time.monotonic() + 120
        while not (mon.job and mon.job.round >= 1):
            if time.monotonic() > deadline:
                raise BenchError(f"no round committed within 120 s (logs in {cluster.log_dir})")
            time.sleep(0.1)
        target = registrations(cluster.peers[0].log)[-1].address
        _say(f"flood: coordinator {cluster.address}, peer 0 at {target}, job {job_id}; logs in {cluster.log_dir}")
        coord_pid = cluster.coordinator.popen.pid if cluster.coordinator else 0
        peer_pid = cluster.peers[0].popen.pid
        bodies: dict[str, tuple[int, Callable[[Callable[[], None]], dict[str, int]]]] = {
            "coord-streams": (coord_pid, lambda d: probe_coord_streams(cluster, a, d)),
            "peer-streams": (peer_pid, lambda d: probe_peer_streams(target, a, d)),
            "inbox": (peer_pid, lambda d: probe_inbox(target, a, d)),
            "shm": (peer_pid, lambda d: probe_shm(target, a, d)),
        }
        for name in a.probes:
            pid, body = bodies[name]
            _say(f"flood: probe {name}")
            results.append(run_probe(name, mon, pid, a, body))
        if "shm" in a.probes and not a.no_kill:
            kill = shm_kill_step(cluster, target, a)
    except (BenchError, ClusterError, jobapi.ApiError) as e:
        print(f"flood: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nflood: interrupted", file=sys.stderr)
        return 130
    finally:
        if mon is not None:
            mon.stop()
        cluster.close()
    if a.json:
        print(json.dumps({"probes": results, "shm_kill": kill, "work_dir": str(work)}, default=str))
    else:
        print(table(results, kill))
    return 0


if __name__ == "__main__":
    sys.exit(main())
