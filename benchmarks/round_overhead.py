"""Round overhead benchmark: where a dml round's time goes, and how much memory a peer holds.

    python benchmarks/round_overhead.py [--params-m 1,10,50] [--tasks digits-cnn] [--peers 4]
                                        [--rounds R] [--codec fp32] [--data-plane auto] [--sync params]
                                        [--local-steps 1] [--batch-size 32] [--lr 0.01]
                                        [--warmup 2] [--json]

For every model size it starts a fresh cluster on 127.0.0.1 (one ``coordinator.cli`` process and
``--peers`` ``peer.cli`` processes, ``--device cpu``, one torch/OpenMP thread each, the coordinator
on a port it picks itself), waits until every peer has registered, reads each peer's baseline RSS,
submits one ``synthetic:<N>M`` job (``min_peers`` = all peers, so every round has every peer), follows
it to the end under a deadline, reads the peers' peak RSS and the job's round history, then stops
every process (SIGTERM, then SIGKILL) before the next size. Fresh processes per size make the peak
RSS a per-size figure.

Job: task ``synthetic:<N>M`` (an MLP 256 -> hidden -> 10 with about N million parameters, exact
count from ``dml.common.tasks.builtin_params``), ``--local-steps`` SGD steps of ``--batch-size`` per peer per
round (default 1 x 32: the point is the overhead around training, so training is kept cheap),
learning rate ``--lr`` (default 0.01; synthetic:10M diverges at 0.1), wire codec ``--codec`` and
data plane ``--data-plane`` passed through to the job, and ``checkpoint_every_rounds`` = rounds + 1,
so only the final round uploads a checkpoint (a job always checkpoints its last round).

Beside the MLP sizes, ``--tasks`` (default ``digits-cnn``: a CNN trained with Adam, so the
ordinary optimizer path rather than the MLPs' plain SGD fused into backward) names built-in
tasks to measure the same way, one row each, each with its own optimizer at its own learning
rate (``--lr`` is for the MLP rows); ``--tasks ''`` measures the MLP sizes only.

Rounds (``--rounds``): by default 30 for models under 10M parameters, 20 up to 10M and 8 above
(a 50M round takes about 10 s on a 2-core machine with 4 peers; the defaults keep the whole run
under 5 minutes there). Measured rounds are ``warmup < r < rounds``: the first ``--warmup``
rounds (default 2; round 1 builds the model and, whatever the codec, averages exactly in fp32) and
the final round (checkpoint upload) are left out, so ``--rounds`` must be at least ``--warmup`` + 2.

Per-round figures, from the job history the coordinator keeps (``GetJob`` with history, as
``dml status --history --json`` prints it), all in seconds, medians over the measured rounds:

- ``round_s``: the interval between round r-1's commit and round r's commit (``committed_unix_ms``):
  the full cycle as the job sees it;
- ``train_s``: ``train_ms``, the slowest member's preparation (restoring the committed parameters)
  plus local training;
- ``exchange_s``: ``exchange_ms``, the slowest member's all-reduce (link set-up included);
  a member that finished training first waits in there for the last one;
- ``wait_s`` and ``allreduce_s`` (from the peers' DEBUG lines of their all-reduce windows,
  :func:`allreduce_split`; null when a measured round lacks them): that wait, the spread of the
  members' entries into each all-reduce (the slowest member's training, not exchange), and the
  all-reduce itself, from the last member's entry to the last leave, summed over a round's
  all-reduces (one per step with ``--sync grads``);
- ``eval_s``: ``eval_ms``, rank 0's test-set evaluation (0 in rounds that do not evaluate: by
  default only the final round does, ``--eval-every`` changes that);
- ``coord_s``: ``round_s - train_s - exchange_s - eval_s`` per round: everything else (plan
  delivery, the report, the commit, the gap until the next plan). The slowest trainer and the slowest exchanger need not be the same member, so in
  principle this can come out slightly low (even negative); it is not clamped;
- ``plan_to_commit_s``: ``duration_ms``, from the round's plan to its commit;
- ``report_s`` (when the peers' DEBUG line "train .. exchange .. report .." is found in their
  logs; null otherwise): the slowest member's time from the end of its exchange until the
  coordinator acknowledged its report. Rank 0 evaluates the test set in there, so this is mostly
  the evaluation; the rest of ``coord_s`` is plan delivery and the commit.

Memory, from ``/proc/PID/status`` of every peer process, in MB (2**20 bytes):

- ``baseline_rss_mb``: ``VmRSS`` once the peer has registered, before the job is submitted (the
  process with Python, torch and gRPC loaded); the max over peers (per peer in
  ``baseline_rss_mb_per_peer``);
- ``peak_rss_mb``: ``VmHWM`` (the lifetime peak, start-up included, so conservative) read when the
  job has finished, the max over peers (per peer in ``peak_rss_mb_per_peer``);
- ``model_mb``: parameters x 4 bytes;
- ``rss_over_baseline_x_model``: max over peers of (peak - that peer's baseline) / model_mb;
- ``evaluator_peer``: the index of the peer that was rank 0 (the first ring member: it evaluates
  the test set every round and uploads the final checkpoint), and
  ``rss_over_baseline_x_model_others``: the same ratio over the other peers only.

Also in the JSON: ``end_rss_mb_per_peer`` (VmRSS when the job has finished),
``coordinator_peak_rss_mb``, per-round maxima, ``wall_s`` and the job's settings.

Targets checked in the table (they print ok / NOT ok; the exit code does not depend on them):
coordination plus exchange (``coord_s + exchange_s``) under 1 s per round at 10M parameters and 4
peers, and every peer's peak RSS at most its baseline + 3 x the model's bytes (for the MLP rows: a
small model such as the CNN's is dwarfed by a peer's fixed memory).

``--json`` prints one JSON object per model size (as each finishes) instead of the table. Progress
goes to stderr. Exit codes: 0 done, 1 a cluster or job failed (the tail of the process logs is
printed and the logs are kept), 2 bad flags, 130 interrupted. Every wait has a deadline; every
process started is reaped on success, failure, exceptions and Ctrl-C (and gets SIGTERM if this
process dies, even by SIGKILL: dml.common.lifeline).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # inherited by the children: one compute thread each
# This process forks children (exec'd at once) while it may hold gRPC channels: its fork handlers
# are not wanted. The children get the environment as it was.
_FORK_ENV = "GRPC_ENABLE_FORK_SUPPORT"
_SET_FORK_ENV = _FORK_ENV not in os.environ
if _SET_FORK_ENV:
    os.environ[_FORK_ENV] = "false"

from dml.v1 import jobs_pb2

from dml.client.api import ApiError, JobClient, history_dict, status_dict
from dml.common.args import int_in, positive_float
from dml.common.lifeline import Lifeline
from dml.client.cluster import (ClusterError, join_token_file, operator_token_file, reap,
                                wait_for_port_file)
from dml.common.spec import CODECS, DATA_PLANES, MAX_ROUNDS, SYNCS, JobSpec
from dml.common.tasks import builtin_params, get_task, is_builtin, task_names
from dml.peer import diskcopy

MB = 1 << 20
TARGET_OVERHEAD_S = 1.0  # coord_s + exchange_s per round at 10M parameters and 4 peers
TARGET_PARAMS = 10_000_000
TARGET_PEERS = 4
TARGET_RSS_X_MODEL = 3.0  # peak RSS at most baseline + 3 x model bytes
START_TIMEOUT_S = 120.0  # the coordinator listening and every peer registered
REGISTERED_RE = re.compile(r"dml-peer (\S+) exchanging on ")
ROUND_RE = re.compile(r"job (\S+) round (\d+) epoch (\d+): train ([\d.]+)s exchange ([\d.]+)s report ([\d.]+)s")


class BenchError(Exception):
    """The benchmark could not go on (a process died, a deadline passed, the job failed)."""


# -- flags -----------------------------------------------------------------------------------
def _params_list(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part!r} (expected e.g. 1,10,50)") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"model sizes must be positive, got {part!r}")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("no model sizes given")
    return out


def task_name(params_m: float) -> str:
    """``synthetic:<N>M`` with N written without a needless ``.0``."""
    return f"synthetic:{params_m:g}M"


def task_model(task: str) -> tuple[int, str]:
    """A built-in task's parameter count and its optimizer's class name (built here with torch,
    as a peer builds them)."""
    import torch

    t = get_task(task)
    model = t.model()
    params = list(model.parameters())
    opt = t.optimizer(params) if t.optimizer is not None else torch.optim.SGD(params, lr=0.1)
    return sum(x.numel() for x in params), type(opt).__name__


def default_rounds(num_params: int) -> int:
    """30 rounds below 10M parameters, 20 up to 10M, 8 above."""
    if num_params < 9_500_000:
        return 30
    return 20 if num_params <= 10_500_000 else 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params-m", type=_params_list, default=[1.0, 10.0, 50.0],
                   help="model sizes in millions of parameters, comma-separated (default 1,10,50)")
    p.add_argument("--tasks", default="digits-cnn",
                   help="built-in tasks measured after the MLP sizes, each with its own optimizer and learning rate, "
                        "comma-separated (default digits-cnn: a CNN with Adam; '' for none)")
    p.add_argument("--peers", type=int_in(1), default=4, help="peer processes (default 4)")
    p.add_argument("--rounds", type=int_in(1), default=None,
                   help="rounds per job (default: 30 below 10M parameters, 20 up to 10M, 8 above)")
    p.add_argument("--eval-every", type=int_in(1), default=None,
                   help="rounds between rank 0's test evaluations (default: only the final round)")
    p.add_argument("--warmup", type=int_in(1), default=2,
                   help="first rounds left out of the medians (default 2; the final round is left out too)")
    p.add_argument("--codec", choices=CODECS, default="fp32", help="wire codec of the job (default fp32)")
    p.add_argument("--data-plane", choices=DATA_PLANES, default="auto", help="data plane of the job (default auto)")
    p.add_argument("--sync", choices=SYNCS, default="params",
                   help="what a round averages: params (default), or grads (one all-reduce of gradients per local step)")
    p.add_argument("--local-steps", type=int_in(1), default=1,
                   help="SGD steps per peer per round (default 1: cheap training, the overhead is measured)")
    p.add_argument("--committed-copy", choices=("memory", "disk"), default="memory",
                   help="dml-peer --committed-copy: the committed parameters in memory (default) or in a "
                        "file in the page cache (--committed-copy-dir is the log dir, or /var/tmp where that is on tmpfs)")
    p.add_argument("--batch-size", type=int_in(1), default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate (default 0.01)")
    p.add_argument("--timeout-s", type=positive_float, default=None,
                   help="deadline per job, after the cluster is up (default: 60 s + rounds x (2 + 0.6 x params in M) s)")
    p.add_argument("--log-dir", type=pathlib.Path, default=None,
                   help="keep the process logs here, one folder per size (default: a temp dir, removed)")
    p.add_argument("--json", action="store_true", help="one JSON object per model size instead of the table")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and checks the flags; a bad one exits with code 2."""
    p = build_parser()
    a = p.parse_args(argv)
    sizes = []
    for m in a.params_m:
        try:
            num_params = builtin_params(task_name(m))
        except ValueError as e:
            p.error(f"--params-m {m:g}: {e}")
        sizes.append((m, num_params))
    a.sizes = sizes
    a.task_list = [t.strip() for t in a.tasks.split(",") if t.strip()]
    for t in a.task_list:
        if not is_builtin(t) or t.startswith("synthetic:"):
            p.error(f"--tasks: {t!r} is not a built-in task other than synthetic:SIZE (those are --params-m); "
                    f"choose from {', '.join(n for n in task_names() if not n.startswith('synthetic:'))}")
    if a.rounds is not None:
        if a.rounds > MAX_ROUNDS:
            p.error(f"--rounds must be at most {MAX_ROUNDS}, got {a.rounds}")
        if a.rounds < a.warmup + 2:
            p.error(f"--rounds must be at least --warmup + 2 = {a.warmup + 2} (the first {a.warmup} rounds and "
                    f"the final one are left out of the medians), got {a.rounds}")
    elif a.warmup + 2 > min(default_rounds(n) for _, n in sizes):
        p.error(f"--warmup {a.warmup} leaves no measured round with the default rounds: pass --rounds")
    if a.local_steps * a.batch_size > 10**8:
        p.error("--local-steps x --batch-size must be at most 100M samples per round")
    if not a.lr < 100:
        p.error(f"--lr must be below 100, got {a.lr}")
    return a


# -- processes -------------------------------------------------------------------------------
_interrupted = False


def _interrupt(signum: int, _frame: object) -> None:
    """SIGINT / SIGTERM / SIGHUP: raise KeyboardInterrupt once; later signals are ignored, so the
    clean-up they started (bounded by its own deadlines) is not itself interrupted."""
    global _interrupted
    if _interrupted:
        return
    _interrupted = True
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class Cluster:
    """A running coordinator and its peers."""

    address: str
    coordinator: subprocess.Popen[bytes]
    peers: list[subprocess.Popen[bytes]]
    peer_ids: list[str]
    logs: pathlib.Path


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if _SET_FORK_ENV:
        env.pop(_FORK_ENV, None)
    return env


_LIFELINE = Lifeline()  # the children stop when this process dies, however it dies


def _spawn(cmd: list[str], log: pathlib.Path, procs: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:  # the child holds its own descriptor
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                             **_LIFELINE.child(_child_env()))
    procs.append(p)
    return p


def _wait_registered(peers: list[subprocess.Popen[bytes]], logs: pathlib.Path, timeout_s: float) -> list[str]:
    """Waits until every peer printed that it registered; returns their ids."""
    deadline = time.monotonic() + timeout_s
    ids: list[str | None] = [None] * len(peers)
    while True:
        for i, p in enumerate(peers):
            if ids[i] is not None:
                continue
            if p.poll() is not None:
                raise BenchError(f"peer {i} exited with code {p.returncode} before registering")
            with contextlib.suppress(FileNotFoundError):
                m = REGISTERED_RE.search((logs / f"peer-{i}.log").read_text(errors="replace"))
                if m:
                    ids[i] = m.group(1)
        if all(x is not None for x in ids):
            return [x for x in ids if x is not None]
        if time.monotonic() >= deadline:
            missing = [i for i, x in enumerate(ids) if x is None]
            raise BenchError(f"peers {missing} did not register within {timeout_s:.0f}s")
        time.sleep(0.1)


def coordinator_command(py: str, host: str, state: pathlib.Path, port_file: pathlib.Path,
                        extra: tuple[str, ...] = ()) -> list[str]:
    """The coordinator's argv: on ``host``, port 0 (it writes the port it bound to ``port_file``)."""
    return [py, "-m", "dml.coordinator.cli", "--host", host, "--port", "0", "--state-dir", str(state),
            "--port-file", str(port_file), *extra]


def peer_command(py: str, address: str, host: str, join_token: pathlib.Path, peer_args: tuple[str, ...] = (),
                 prefix: tuple[str, ...] = ()) -> list[str]:
    """A peer's argv: ``prefix`` (e.g. ``ip netns exec NS``: it execs, so the pid spawned is the
    peer's), then ``peer.cli`` registering with ``address``, its exchange server on ``host``,
    port 0, one CPU, DEBUG logs (the round split reads them), then ``peer_args``."""
    return [*prefix, py, "-m", "dml.peer.cli", "--coordinator", address, "--host", host, "--port", "0",
            "--device", "cpu", "--log-level", "DEBUG", "--join-token-file", str(join_token), *peer_args]


@contextlib.contextmanager
def cluster(peers: int, root: pathlib.Path, peer_args: tuple[str, ...] = (), *,
            coordinator_host: str = "127.0.0.1", coordinator_args: tuple[str, ...] = (),
            peer_hosts: list[str] | None = None,
            peer_prefixes: list[tuple[str, ...]] | None = None) -> Iterator[Cluster]:
    """A coordinator (port 0, read back from its port file) and ``peers`` registered peers, each
    started with ``peer_args`` beside the usual flags (e.g. ``--allow-job-code``). By default all
    on 127.0.0.1; ``coordinator_host`` (with ``coordinator_args``, e.g. TLS flags), and per peer
    ``peer_hosts[i]`` and a command prefix ``peer_prefixes[i]`` (:func:`peer_command`) place them
    elsewhere, e.g. each peer in a network namespace of an emulated LAN. Every process is reaped
    on the way out, whatever happens."""
    hosts = peer_hosts if peer_hosts is not None else ["127.0.0.1"] * peers
    prefixes = peer_prefixes if peer_prefixes is not None else [()] * peers
    if len(hosts) != peers or len(prefixes) != peers:
        raise ValueError(f"{peers} peers, {len(hosts)} hosts, {len(prefixes)} command prefixes")
    state, logs = root / "state", root / "logs"
    state.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    port_file = state / "coordinator.port"
    port_file.unlink(missing_ok=True)
    # Logs are appended to (a process restarted within a run keeps its history), so a --log-dir
    # reused from an earlier run would hand _wait_registered, report_times and allreduce_split
    # that run's lines: a "registered" line before this peer even imported torch (a baseline
    # RSS of a few MB), and another cluster's timings.
    for name in ["coordinator.log"] + [f"peer-{i}.log" for i in range(peers)]:
        (logs / name).unlink(missing_ok=True)
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    try:
        coord = _spawn(coordinator_command(py, coordinator_host, state, port_file, coordinator_args),
                       logs / "coordinator.log", procs)
        try:
            port = wait_for_port_file(port_file, coord, START_TIMEOUT_S)
        except ClusterError as e:
            raise BenchError(str(e)) from None
        address = f"{coordinator_host}:{port}"
        peer_procs = [_spawn(peer_command(py, address, hosts[i], join_token_file(state), peer_args, prefixes[i]),
                             logs / f"peer-{i}.log", procs)
                      for i in range(peers)]
        ids = _wait_registered(peer_procs, logs, START_TIMEOUT_S)
        yield Cluster(address, coord, peer_procs, ids, logs)
    finally:
        reap(procs)


def proc_status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a live process, in MB."""
    out = {}
    try:
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        raise BenchError(f"cannot read /proc/{pid}/status: {e}") from None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            num, unit = rest.split()
            if unit != "kB":
                raise BenchError(f"/proc/{pid}/status: unexpected unit {unit!r} for {key}")
            out[key] = int(num) * 1024 / MB
    if set(out) != {"VmRSS", "VmHWM"}:
        raise BenchError(f"/proc/{pid}/status has no VmRSS/VmHWM (not Linux, or the process is gone)")
    return out


def _alive(c: Cluster) -> None:
    for name, p in [("coordinator", c.coordinator)] + [(f"peer {i}", q) for i, q in enumerate(c.peers)]:
        if p.poll() is not None:
            raise BenchError(f"{name} exited with code {p.returncode} during the job")


def log_tails(logs: pathlib.Path, lines: int = 15) -> str:
    out = []
    for f in sorted(logs.glob("*.log")):
        with contextlib.suppress(OSError):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(out)


# -- analysis --------------------------------------------------------------------------------
def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _round(x: float | None, digits: int) -> float | None:
    """Rounded for the JSON (milliseconds are the input's resolution; RSS is read in kB)."""
    return None if x is None else round(x, digits)


def report_times(logs: pathlib.Path, peers: int, job_id: str) -> dict[tuple[int, int], float]:
    """(round, epoch) -> the slowest member's report time (s), from the peers' DEBUG lines."""
    out: dict[tuple[int, int], float] = {}
    for m in _peer_lines(logs, peers, ROUND_RE, job_id):
        key = (int(m.group(2)), int(m.group(3)))
        out[key] = max(out.get(key, 0.0), float(m.group(6)))
    return out


def _peer_lines(logs: pathlib.Path, peers: int, pattern: re.Pattern[str], job_id: str) -> Iterator[re.Match[str]]:
    """The matches of ``pattern`` (group 1: the job id) for ``job_id`` in peer-0..N-1.log; a
    missing log has none."""
    for i in range(peers):
        with contextlib.suppress(OSError):
            for m in pattern.finditer((logs / f"peer-{i}.log").read_text(errors="replace")):
                if m.group(1) == job_id:
                    yield m


WINDOWS_RE = re.compile(r"job (\S+) round (\d+) epoch (\d+): all-reduce windows ((?:[\d.]+:[\d.]+ ?)+)")


def allreduce_split(logs: pathlib.Path, peers: int, job_id: str) -> dict[tuple[int, int], tuple[float, float]]:
    """(round, epoch) -> (wait_s, allreduce_s), from every member's DEBUG line of its all-reduce
    windows (wall-clock enter and leave of each all-reduce: one per round, or one per step with
    --sync grads; all processes share this machine's clock). For each all-reduce, the wait is
    the last member's entry minus the first's (the spread of the members' training, which an
    all-reduce must wait out: training, not exchange), and the all-reduce itself the last leave
    minus the last entry; a round's figures are the sums over its all-reduces. Rounds where the
    members logged different numbers of all-reduces (a failed attempt) are left out."""
    got: dict[tuple[int, int], list[list[tuple[float, float]]]] = {}
    for m in _peer_lines(logs, peers, WINDOWS_RE, job_id):
        wins = [tuple(float(x) for x in w.split(":")) for w in m.group(4).split()]
        got.setdefault((int(m.group(2)), int(m.group(3))), []).append(wins)  # type: ignore[arg-type]
    out: dict[tuple[int, int], tuple[float, float]] = {}
    for key, members in got.items():
        if len(members) != peers or len({len(w) for w in members}) != 1:
            continue
        wait = work = 0.0
        for step in zip(*members):
            last_in = max(w[0] for w in step)
            wait += last_in - min(w[0] for w in step)
            work += max(0.0, max(w[1] for w in step) - last_in)
        out[key] = (wait, work)
    return out


def dataset_mb(task: str) -> float:
    """The task's training and test arrays, in MB: what every peer loads besides the model."""
    from dml.common.tasks import builtin_data

    d = builtin_data(task)
    return sum(x.nbytes for x in (d.x_train, d.y_train, d.x_test, d.y_test)) / MB


def round_split(history: list[dict[str, Any]], rounds: int, warmup: int,
                reports: dict[tuple[int, int], float],
                windows: dict[tuple[int, int], tuple[float, float]] | None = None) -> dict[str, Any]:
    """Medians (and maxima) of the per-round split over rounds warmup < r < rounds; with
    ``windows`` (:func:`allreduce_split`) also ``wait_s`` and ``allreduce_s``."""
    by_round = {h["round"]: h for h in history}
    windows = windows or {}
    cols: dict[str, list[float]] = {k: [] for k in ("round_s", "train_s", "exchange_s", "eval_s", "coord_s",
                                                    "plan_to_commit_s", "report_s", "wait_s", "allreduce_s")}
    measured = []
    for r in range(warmup + 1, rounds):
        h, prev = by_round.get(r), by_round.get(r - 1)
        if h is None or prev is None:
            continue
        round_s = (h["committed_unix_ms"] - prev["committed_unix_ms"]) / 1000.0
        train_s, exchange_s = h["train_ms"] / 1000.0, h["exchange_ms"] / 1000.0
        eval_s = h.get("eval_ms", 0) / 1000.0
        cols["round_s"].append(round_s)
        cols["train_s"].append(train_s)
        cols["exchange_s"].append(exchange_s)
        cols["eval_s"].append(eval_s)
        cols["coord_s"].append(round_s - train_s - exchange_s - eval_s)
        cols["plan_to_commit_s"].append(h["duration_ms"] / 1000.0)
        rep = reports.get((r, h["epoch"]))
        if rep is not None:
            cols["report_s"].append(rep)
        win = windows.get((r, h["epoch"]))
        if win is not None:
            cols["wait_s"].append(win[0])
            cols["allreduce_s"].append(win[1])
        measured.append(r)
    if not measured:
        raise BenchError(f"no measured rounds: the history has rounds {sorted(by_round)}, "
                         f"measured are {warmup + 1}..{rounds - 1}")
    out: dict[str, Any] = {"measured_rounds": len(measured)}
    for k, xs in cols.items():
        full = k not in ("report_s", "wait_s", "allreduce_s") or len(xs) == len(measured)  # partial ones would mislead
        out[k] = _round(_median(xs), 4) if full else None
        out[k + "_max"] = _round(max(xs), 4) if xs and full else None
    return out


# -- one model size --------------------------------------------------------------------------
def measure(a: argparse.Namespace, task: str, num_params: int, root: pathlib.Path, lr: float,
            optimizer: str) -> dict[str, Any]:
    """Runs one job of ``task`` (``num_params`` parameters, trained with ``optimizer``, at ``lr``:
    0 keeps the task's own) on a fresh cluster; returns its JSON row."""
    rounds = a.rounds if a.rounds is not None else default_rounds(num_params)
    model_mb = num_params * 4 / MB
    job_timeout_s = a.timeout_s if a.timeout_s is not None else 60.0 + rounds * (2.0 + 0.6 * num_params / 1e6)
    spec = JobSpec(task=task, rounds=rounds, sync=a.sync, local_steps=a.local_steps, batch_size=a.batch_size,
                   learning_rate=lr, min_peers=a.peers, num_shards=max(JobSpec().num_shards, a.peers),
                   checkpoint_every_rounds=rounds + 1, codec=a.codec, data_plane=a.data_plane,
                   eval_every_rounds=a.eval_every or rounds)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log = lambda msg: print(f"[{task}] {msg}", file=sys.stderr, flush=True)
    log(f"{num_params:,} parameters ({model_mb:.1f} MB); starting a coordinator and {a.peers} peers "
        f"(logs in {root / 'logs'})")
    peer_args: tuple[str, ...] = ()
    if a.committed_copy == "disk":
        peer_args = ("--committed-copy", "disk", "--committed-copy-dir", str(diskcopy.usable_dir(root)))
    with cluster(a.peers, root, peer_args) as c:
        base = [proc_status_mb(p.pid)["VmRSS"] for p in c.peers]
        log(f"{len(c.peers)} peers registered after {time.monotonic() - t0:.1f}s at {c.address}; baseline RSS "
            + ", ".join(f"{x:.0f}" for x in base) + " MB")
        token = operator_token_file(root / "state").read_text().strip()
        client = JobClient(c.address, timeout_s=30.0, token=token)
        job_id = client.submit(spec)
        log(f"job {job_id}: {rounds} rounds x {a.local_steps} local steps x batch {a.batch_size}, codec {a.codec}, "
            f"data plane {a.data_plane}; deadline {job_timeout_s:.0f}s")
        t_job = time.monotonic()
        shown = [0]
        ring: list[str] = []

        def show(st: jobs_pb2.JobStatus) -> None:
            _alive(c)
            if st.peers and not ring:
                ring.extend(st.peers)
            step = max(1, rounds // 5)
            if st.round != shown[0] and (st.round % step == 0 or st.round == rounds):
                shown[0] = st.round
                log(f"round {st.round}/{rounds} after {time.monotonic() - t_job:.1f}s")

        try:
            end = client.watch(job_id, show, max_s=job_timeout_s)
        except ApiError as e:
            with contextlib.suppress(ApiError):
                JobClient(c.address, timeout_s=2.0, token=token).cancel(job_id)
            raise BenchError(f"{task}: {e}") from None
        job_s = time.monotonic() - t_job
        st = status_dict(end)
        if st["state"] != "SUCCEEDED":
            raise BenchError(f"{task}: job {job_id} ended {st['state']}: {st['reason']}")
        mem = [proc_status_mb(p.pid) for p in c.peers]
        coord_mem = proc_status_mb(c.coordinator.pid)
        history = [history_dict(r) for r in client.history(job_id)]
        client.close()
        # Rounds end with the report: the peers' last DEBUG lines are written by now.
        reports = report_times(c.logs, a.peers, job_id)
        windows = allreduce_split(c.logs, a.peers, job_id)
    split = round_split(history, rounds, a.warmup, reports, windows)
    members = sorted({h["members"] for h in history})
    epochs = sorted({h["epoch"] for h in history})
    if members != [a.peers] or len(epochs) != 1:
        log(f"warning: membership changed during the job (members per round {members}, epochs {epochs}); "
            f"see the logs")
    peak = [m["VmHWM"] for m in mem]
    data_mb = dataset_mb(task)
    over = [(pk - b) / model_mb for pk, b in zip(peak, base)]
    evaluator = c.peer_ids.index(ring[0]) if ring and ring[0] in c.peer_ids else None
    others = [x for i, x in enumerate(over) if i != evaluator]
    row: dict[str, Any] = {
        "task": task, "optimizer": optimizer, "params": num_params, "peers": a.peers, "rounds": rounds, "warmup": a.warmup,
        "codec": a.codec, "data_plane": a.data_plane, "sync": a.sync, "committed_copy": a.committed_copy, "local_steps": a.local_steps, "batch_size": a.batch_size,
        "lr": lr, "job_id": job_id,
        **{k: split[k] for k in ("measured_rounds", "round_s", "train_s", "exchange_s", "eval_s", "coord_s",
                                 "plan_to_commit_s", "report_s", "wait_s", "allreduce_s")},
        "max": {k: split[k + "_max"] for k in ("round_s", "train_s", "exchange_s", "eval_s", "coord_s",
                                               "plan_to_commit_s", "report_s", "wait_s", "allreduce_s")},
        "model_mb": _round(model_mb, 3),
        "data_mb": _round(data_mb, 3),
        "rss_over_baseline_and_data_x_model": _round(max((pk - b - data_mb) / model_mb for pk, b in zip(peak, base)), 3),
        "baseline_rss_mb": _round(max(base), 2),
        "peak_rss_mb": _round(max(peak), 2),
        "rss_over_baseline_x_model": _round(max(over), 3),
        "evaluator_peer": evaluator,
        "rss_over_baseline_x_model_others": _round(max(others), 3) if others and evaluator is not None else None,
        "baseline_rss_mb_per_peer": [_round(x, 2) for x in base],
        "peak_rss_mb_per_peer": [_round(x, 2) for x in peak],
        "end_rss_mb_per_peer": [_round(m["VmRSS"], 2) for m in mem],
        "rss_over_baseline_x_model_per_peer": [_round(x, 3) for x in over],
        "coordinator_peak_rss_mb": _round(coord_mem["VmHWM"], 2),
        "members_per_round": members, "epochs": epochs,
        "job_s": _round(job_s, 2), "wall_s": _round(time.monotonic() - t0, 2),
    }
    log(f"done in {row['wall_s']:.1f}s: round {row['round_s']:.3f}s = train {row['train_s']:.3f} + exchange "
        f"{row['exchange_s']:.3f} + coord {row['coord_s']:.3f}; peak RSS {row['peak_rss_mb']:.0f} MB "
        f"({row['rss_over_baseline_x_model']:.2f} x model over baseline)")
    return row


# -- output ----------------------------------------------------------------------------------
def _f(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    lines = [
        (f"# round overhead: {a.peers} peers + coordinator as processes on 127.0.0.1, {os.cpu_count()} CPUs, "
         f"Python {platform.python_version()}; codec {a.codec}, data plane {a.data_plane}, "
         f"{a.local_steps} local step(s) x batch {a.batch_size}"),
        (f"# seconds per round, medians over rounds {a.warmup + 1}..R-1 (first {a.warmup} and the final round left "
         "out): round = commit-to-commit; train/exchange = slowest member's; wait = spread of the members' entries into the all-reduce(s), ar = last entry to last leave; eval = rank 0's test evaluation; "
         "coord = round - train - exchange - eval (report = slowest member's exchange end to report acknowledged)"),
        ("# RSS in MB (2**20 B): base = VmRSS after registering (max over peers), peak = VmHWM (max over peers), "
         "x = max over peers of (peak - base) / model, x oth = the same without rank 0 (marked * in peak per peer: "
         "it evaluates the test set and uploads the final checkpoint)"),
        (f"{'task':<14} {'optimizer':<9} {'params':>12} {'R':>3} {'round':>7} {'train':>7} {'exch':>7} {'wait':>7} {'ar':>7} {'eval':>7} {'coord':>7} {'report':>7} {'ex+co':>7} "
         f"{'model':>7} {'base':>6} {'peak':>6} {'x':>6} {'x oth':>6}  peak per peer"),
    ]
    for r in rows:
        lines.append(
            f"{r['task']:<14} {r['optimizer']:<9} {r['params']:>12,} {r['rounds']:>3} {_f(r['round_s'])} {_f(r['train_s'])} {_f(r['exchange_s'])} "
            f"{_f(r.get('wait_s')):>7} {_f(r.get('allreduce_s')):>7} {_f(r['eval_s'])} {_f(r['coord_s'])} {_f(r['report_s']):>7} {_f(r['exchange_s'] + r['coord_s']):>7} "
            f"{r['model_mb']:>7.1f} {r['baseline_rss_mb']:>6.0f} {r['peak_rss_mb']:>6.0f} "
            f"{r['rss_over_baseline_x_model']:>6.2f} {_f(r['rss_over_baseline_x_model_others'], '.2f'):>6}  "
            + " ".join(f"{x:.0f}" + ("*" if i == r["evaluator_peer"] else "")
                       for i, x in enumerate(r["peak_rss_mb_per_peer"])))
    lines.append("")
    lines.extend(checks(rows, a))
    return "\n".join(lines)


def checks(rows: list[dict[str, Any]], a: argparse.Namespace) -> list[str]:
    out = []
    near = [r for r in rows if r["task"].startswith("synthetic:") and abs(r["params"] - TARGET_PARAMS) <= 0.05 * TARGET_PARAMS]
    if not near:
        out.append(f"target coord + exchange < {TARGET_OVERHEAD_S:g} s at 10M params, {TARGET_PEERS} peers: "
                   f"not measured (add 10 to --params-m)")
    for r in near:
        v = r["exchange_s"] + r["coord_s"]
        note = "" if r["peers"] == TARGET_PEERS else f" (measured with {r['peers']} peers; the target is for {TARGET_PEERS})"
        out.append(f"target coord + exchange < {TARGET_OVERHEAD_S:g} s at 10M params, {TARGET_PEERS} peers: "
                   f"{v:.3f} s -> {'ok' if v < TARGET_OVERHEAD_S else 'NOT ok'}{note}")
    for r in rows:
        if not r["task"].startswith("synthetic:"):
            out.append(f"target peak RSS <= baseline + {TARGET_RSS_X_MODEL:g} x model: not checked for {r['task']} "
                       f"({r['model_mb']:.1f} MB model: a peer's memory is its fixed cost, peak {r['peak_rss_mb']:.0f} MB)")
            continue
        over = r["rss_over_baseline_x_model_per_peer"]
        worst = r["rss_over_baseline_x_model"]
        i = over.index(worst)
        who = f"peer {i}" + (" (rank 0)" if i == r["evaluator_peer"] else "")
        oth = r["rss_over_baseline_x_model_others"]
        out.append(f"target peak RSS <= baseline + {TARGET_RSS_X_MODEL:g} x model at {r['params']:,} params "
                   f"({r['model_mb']:.1f} MB model): worst {who} {worst:.2f} x model over its baseline"
                   + (f", other peers up to {oth:.2f} x" if oth is not None and r["evaluator_peer"] == i else "")
                   + f" -> {'ok' if worst <= TARGET_RSS_X_MODEL else 'NOT ok'}")
        wd = r["rss_over_baseline_and_data_x_model"]
        out.append(f"  counting the task's data ({r['data_mb']:.1f} MB, loaded with the job) in the baseline: "
                   f"{wd:.2f} x model -> {'ok' if wd <= TARGET_RSS_X_MODEL else 'NOT ok'}")
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    rows: list[dict[str, Any]] = []
    tmp = None
    base = a.log_dir
    if base is None:
        tmp = base = pathlib.Path(tempfile.mkdtemp(prefix="dml-round-overhead-"))
    root = base
    keep = False
    try:
        runs = [(task_name(m), n, a.lr, "SGD") for m, n in a.sizes]  # plain SGD: fused into backward
        runs += [(t, n, 0.0, opt) for t in a.task_list for n, opt in [task_model(t)]]  # 0: the task's own lr
        for task, num_params, lr, optimizer in runs:
            root = base / task.replace(":", "-")
            try:
                row = measure(a, task, num_params, root, lr, optimizer)
            except (BenchError, ApiError) as e:
                print(f"round_overhead: {e}", file=sys.stderr)
                tails = log_tails(root / "logs")
                if tails:  # written up to the stop: the last lines may be shutdown noise
                    print(tails, file=sys.stderr)
                keep = True
                print(f"round_overhead: logs kept in {root / 'logs'}", file=sys.stderr)
                return 1
            rows.append(row)
            if a.json:
                print(json.dumps(row), flush=True)
        if not a.json:
            print(table(rows, a), flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nround_overhead: interrupted; every process was stopped", file=sys.stderr)
        return 130
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
