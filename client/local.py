"""``dml local``: a coordinator and N peers as processes on 127.0.0.1, one job, then a clean exit.

The same topology as docker-compose.yml, with TLS on every port as there: the certificates
given with ``--tls-*``, else a CA and a certificate made in the state dir. Children are started
through their handles and always reaped: SIGTERM, then SIGKILL after a grace period, on success,
failure and Ctrl-C alike.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

from dml.client import cli as jobctl
from dml.client.api import ApiError, JobClient, pack_task, status_dict
from dml.client.cluster import ClusterError, LocalCluster
from dml.common import args as cliargs
from dml.common.tls import TlsConfig

DEFAULT_PORT = 50051
CLOSE_S = 2.0  # the longest dml local waits to close a job client's channel


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``dml local`` besides the job options."""
    p.add_argument("--peers", type=int, default=3, help="number of peer processes (default 3)")
    p.add_argument("--port", type=int, default=None,
                   help=f"coordinator port (default {DEFAULT_PORT} if free, else any free port; 0 for any)")
    p.add_argument("--state-dir", type=pathlib.Path, default=None, help="coordinator state (default: a temp dir)")
    p.add_argument("--output", "-o", type=pathlib.Path, default=None, help="save the trained model (state_dict) here (default: not saved)")
    p.add_argument("--json", action="store_true", help="print the final status as JSON on the last line")
    p.add_argument("--log-dir", type=pathlib.Path, default=None, help="where process logs go (default: the state dir)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="give up on the job after this many seconds")
    p.add_argument("--keep", action="store_true",
                   help="keep the cluster up after the job ends (query it, submit more jobs) until Ctrl-C")
    cliargs.add_metrics_flag(p)  # the coordinator's; each peer then serves its own on a free port
    cliargs.add_tls_flags(p)  # given: every process uses these; else certificates made in the state dir


def metrics_args(a: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The metrics flags of ``dml local``'s coordinator and of its peers: with ``--metrics-port``
    the coordinator serves there and every peer on a free port of its own (each logs its
    address); without it nobody serves metrics, whatever the environment says."""
    if a.metrics_port is None:
        return ("--metrics-port", "off"), ("--metrics-port", "off")
    return (("--metrics-port", str(a.metrics_port), "--metrics-host", a.metrics_host),
            ("--metrics-port", "0", "--metrics-host", a.metrics_host))


def _free(port: int) -> bool:
    with socket.socket() as s:
        # As gRPC does: a port left in TIME_WAIT by the last run is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def cluster(peers: int, port: int, state_dir: pathlib.Path, log_dir: pathlib.Path,
            extra_peer_args: tuple[str, ...] = (), coordinator_args: tuple[str, ...] = (),
            peer_args: dict[int, tuple[str, ...]] | None = None,
            tls: TlsConfig | None = None) -> Iterator[tuple[str, list[subprocess.Popen[bytes]], LocalCluster]]:
    """Starts a coordinator and ``peers`` peers (logs ``coordinator.log``, ``peer-I.log``), all
    over TLS (``tls``, else certificates made in ``state_dir/tls``); yields (coordinator address,
    processes: the coordinator, then peer 0, 1, ..., the cluster: ``.client()`` for a job
    client with its credentials), and reaps them all on the way out. ``peer_args`` adds flags
    to single peers, by index (e.g. one ``--slowdown``)."""
    with LocalCluster(state_dir, log_dir, port=port, coordinator_args=coordinator_args,
                      peer_args=("--device", "cpu", *extra_peer_args), tls=tls) as c:
        address = c.start_coordinator()
        for i in range(peers):
            c.start_peer(i, (peer_args or {}).get(i, ()))
        yield address, [p.popen for p in c.everything], c


def _logged_metrics_url(log: pathlib.Path, timeout_s: float) -> str:
    """The metrics address the coordinator printed to ``log`` ("" if none within ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            if "dml-coordinator metrics on " in line:
                return line.split(" metrics on ", 1)[1].strip()
        time.sleep(0.05)
    return ""


def _close_within(client: JobClient, timeout_s: float) -> None:
    """Closes ``client`` on a daemon thread, waiting at most ``timeout_s`` for it."""
    t = threading.Thread(target=client.close, name="close-job-client", daemon=True)
    t.start()
    t.join(timeout_s)


@contextlib.contextmanager
def _cli_errors() -> Iterator[None]:
    """A cluster that does not start is a one-line message and exit code 1."""
    try:
        yield
    except ClusterError as e:
        raise ApiError(str(e), 1) from None


def cmd_local(a: argparse.Namespace) -> int:
    """Runs the job on a local cluster and prints the final test accuracy."""
    if a.peers < 1:
        raise ApiError("--peers must be at least 1", 2)
    if a.tls is not None and not a.tls.can_serve:
        raise ApiError("dml local runs servers: --tls-cert and --tls-key go with --tls-ca", 2)
    # Stop the same way on each: cancel the job, reap the children. SIGINT too, explicitly: a
    # shell starts background jobs with SIGINT ignored, and Python would keep ignoring it.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    port = a.port if a.port is not None else (DEFAULT_PORT if _free(DEFAULT_PORT) else 0)
    if a.min_peers is None:
        a.min_peers = a.peers  # start with the whole cluster rather than grow it round by round
    spec, task_code = pack_task(jobctl.spec_from_args(a))  # bad task code fails before any process starts
    if spec.min_peers > a.peers:
        raise ApiError(f"--min-peers {spec.min_peers} exceeds --peers {a.peers}", 2)
    tmp = None
    state_dir = a.state_dir
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="dml-local-")
        state_dir = pathlib.Path(tmp.name)
    state_dir.mkdir(parents=True, exist_ok=True)
    log_dir = a.log_dir or state_dir / "logs"
    started = time.monotonic()
    try:
        coordinator_metrics, peer_metrics = metrics_args(a)
        with _cli_errors(), cluster(a.peers, port, state_dir, log_dir, extra_peer_args=peer_metrics,
                                    coordinator_args=coordinator_metrics, tls=a.tls) as (address, _procs, c):
            assert c.tls is not None
            print(f"coordinator on {address} (TLS), {a.peers} peers; logs in {log_dir}", file=sys.stderr)
            if a.metrics_port is not None:
                url = _logged_metrics_url(log_dir / "coordinator.log", 5.0)
                print(f"  metrics: the coordinator's at {url or 'the address in its log'}, each peer's in its log",
                      file=sys.stderr)
            env = c.client_env()
            exports = " ".join(f"{k}={env[k]}" for k in sorted(env) if k.startswith("DML_TLS_") or k == "DML_TOKEN_FILE")
            print(f"  every port runs mutual TLS, job control needs the operator token; watch from another shell:\n"
                  f"  export {exports}\n  dml status --coordinator {address} --watch", file=sys.stderr)
            client = c.client(timeout_s=30.0)
            try:
                job_id = client.submit(spec, task_code)
                own = "the task's"
                print(f"job {job_id}: {spec.task}, {spec.rounds} rounds x {spec.local_steps} local steps, "
                      f"batch {spec.batch_size or own}, lr {spec.learning_rate or own}", file=sys.stderr)
                tty = sys.stderr.isatty()
                last_round = [-1]

                def show(st: object) -> None:
                    line = jobctl.status_line(st)  # type: ignore[arg-type]
                    if tty:
                        print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
                    elif st.round != last_round[0] and (st.round % 10 == 0 or st.round == st.spec.rounds):  # type: ignore[attr-defined]
                        print(line, file=sys.stderr, flush=True)
                    last_round[0] = st.round  # type: ignore[attr-defined]

                try:
                    end = client.watch(job_id, show, max_s=a.timeout_s)
                except KeyboardInterrupt:
                    with contextlib.suppress(ApiError), c.client(timeout_s=2.0) as stopper:
                        stopper.cancel(job_id)
                    raise
                if tty:
                    print(file=sys.stderr)
                d = status_dict(end)
                if d["state"] != "SUCCEEDED":  # why, with a task's error and who declined the job
                    for line in [jobctl.status_line(end)] + jobctl.reason_lines(end) + jobctl.exclusion_lines(end):
                        print(line, file=sys.stderr)
                if a.output is not None and d["state"] == "SUCCEEDED":
                    rnd, _ = client.download(job_id, a.output, 60.0)
                    print(f"saved round {rnd} model to {a.output}", file=sys.stderr)
                if a.keep:
                    print(f"job {job_id} {d['state']}: test accuracy {jobctl.fmt_metric(d['metrics']['test_accuracy'])}; "
                          f"cluster still up on {address}, Ctrl-C to stop", file=sys.stderr, flush=True)
                    while True:
                        time.sleep(3600)
            finally:
                # Closed here, while the cluster is up, and within a deadline: after an
                # interrupted call gRPC's close can wait for it forever (and so can the garbage
                # collector's at exit); a close still waiting then ends with the process.
                _close_within(client, CLOSE_S)
        acc = d["metrics"]["test_accuracy"]
        print(f"job {job_id} {d['state']} after {d['round']} rounds in {time.monotonic() - started:.1f}s: "
              f"test accuracy {jobctl.fmt_metric(acc)}"
              + "".join(f", {k} {jobctl.fmt_metric(v)}" for k, v in d["metrics"]["test_metrics"].items()))
        if a.json:
            print(json.dumps(d))
        return 0 if d["state"] == "SUCCEEDED" else 3
    finally:
        if tmp is not None:
            tmp.cleanup()
