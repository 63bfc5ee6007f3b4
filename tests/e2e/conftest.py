"""Real processes: a coordinator and peers started through their handles and always reaped.

Authentication is on, as in every LocalCluster: the fixtures point DML_TOKEN_FILE at the
coordinator's operator token, so `dml` commands run from the tests carry it.

Every e2e test runs over TLS (mutual, from a private CA): :func:`cluster_tls` makes one CA and
certificate for the package, gives it to every LocalCluster and, through DML_TLS_*, to every
process a test starts itself (`dml` commands, coordinators, peers)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Callable, Iterator

import pytest
from dml.v1 import types_pb2

from dml.client.api import JobClient, read_token, status_dict
from dml.client.cluster import LocalCluster, default_log_name, local_tls, operator_token_file, registrations
from dml.common.tls import CLUSTER_NAME, TlsConfig
from dml.common.tls import load as load_tls
from tests.integration.helpers import coordinator_key, fetch_state

pytestmark = pytest.mark.e2e
ROOT = pathlib.Path(__file__).resolve().parents[2]
DONE = (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED)


def env_tls() -> TlsConfig | None:
    """The TLS config DML_TLS_* name (set by :func:`cluster_tls`), for a test's own clients."""
    return load_tls(*(os.environ.get(n) for n in TLS_ENV[:3]), os.environ.get(TLS_ENV[3], CLUSTER_NAME))


def dml(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs the `dml` job client as a separate process."""
    return subprocess.run([sys.executable, "-m", "dml.client.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def status(address: str, job: str) -> dict:
    """`dml status --json` from another process."""
    out = dml("status", "--coordinator", address, job, "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_status(address: str, job: str, pred, timeout_s: float, what: str) -> dict:
    """Polls the job's status, the object `dml status --json` prints, until ``pred(status)``;
    fails after ``timeout_s``. Read through the job API from this process (the same
    :func:`status_dict`, through JSON): a `dml` process per poll cost a third of a CPU second
    each, most of a core of the two that the processes under test share. :func:`status` is the
    `dml status` command itself."""
    deadline = time.monotonic() + timeout_s
    st: dict = {}
    with job_client(address, 30) as client:
        while time.monotonic() < deadline:
            st = json.loads(json.dumps(status_dict(client.status(job).job)))
            if pred(st):
                return st
            time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last status {st}")


FAST_FAILURES = ("--heartbeat-interval-ms", "200", "--peer-timeout-ms", "1500")
# For tests whose subject is a report (a neighbour's, a partition's), not the lease: a lease so
# long that only the report can evict anyone. With FAST_FAILURES' 1.5 s a live peer descheduled
# on a loaded machine, or a dead one whose last heartbeat came well before its death, could be
# taken out by its lease first, and the test failed with nothing broken.
SLOW_LEASE = ("--heartbeat-interval-ms", "200", "--peer-timeout-ms", "20000")
TLS_ENV = ("DML_TLS_CERT", "DML_TLS_KEY", "DML_TLS_CA", "DML_TLS_SERVER_NAME")


# -- the compose test: its preparation overlaps the rest of the session --------------------------------
COMPOSE_TEST = "test_compose.py"
_compose_prep: dict[str, object] = {}  # "bg": the Background preparation; "notes": lines for the summary


@pytest.hookimpl(trylast=True)  # after -k / -m / --deselect have had their say
def pytest_collection_modifyitems(session, config, items) -> None:
    """When the session runs the compose test: order it last and start its preparation (Docker,
    the base image, the wheelhouse, the dml image: minutes on a fresh machine) now, in a process of
    its own at the lowest priority, so that it overlaps every test before it."""
    compose = [i for i in items if i.path.name == COMPOSE_TEST]
    if not compose or "bg" in _compose_prep:
        return
    items[:] = [i for i in items if i.path.name != COMPOSE_TEST] + compose
    compose_background()


def compose_background():
    """The session's compose preparation (tests/e2e/compose_prep.py): the one the suite's runner
    (scripts/run_suite.py) started before the unit tests when the environment names it, else
    one started on first use."""
    from tests.e2e.compose_prep import Adopted, Background

    if "bg" not in _compose_prep:
        _compose_prep["bg"] = Adopted.from_env() or Background()
    return _compose_prep["bg"]


def compose_note(line: str) -> None:
    """A line the session's summary prints (why the compose test skipped, what it cost)."""
    _compose_prep.setdefault("notes", []).append(line)  # type: ignore[union-attr]


def pytest_sessionfinish(session, exitstatus) -> None:
    bg = _compose_prep.get("bg")
    if bg is not None:
        note = bg.close()  # type: ignore[union-attr]
        if note:
            compose_note(note)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for line in _compose_prep.get("notes", []):  # type: ignore[union-attr]
        terminalreporter.write_line(f"compose: {line}")


@pytest.fixture(scope="package", autouse=True)
def cluster_tls(tmp_path_factory) -> Iterator[TlsConfig]:
    """The certificates of every e2e process, also set as DML_TLS_* for the package's duration
    (so a `dml` command or a coordinator a test starts by hand runs over TLS too)."""
    tls = local_tls(tmp_path_factory.mktemp("tls"))
    mp = pytest.MonkeyPatch()
    for name, value in zip(TLS_ENV, (tls.cert, tls.key, tls.ca, tls.server_name)):
        mp.setenv(name, str(value))
    yield tls
    mp.undo()


def job_client(address: str, timeout_s: float = 10) -> JobClient:
    """A JobClient with the operator token DML_TOKEN_FILE names and the e2e certificates (both set
    by the fixtures)."""
    return JobClient(address, timeout_s, token=read_token(pathlib.Path(os.environ["DML_TOKEN_FILE"])), tls=env_tls())


def fetch_peer(state_dir: pathlib.Path, address: str, job: str, rnd: int, peer_id: str):
    """A peer process's parameters of a round, fetched as an auditor holding the coordinator's
    key (STATE_DIR/secrets/coordinator.key): (digest, state_dict, raw bytes)."""
    return fetch_state(address, job, rnd, peer_id, coordinator_key(state_dir), tls=env_tls())


def _print_tracebacks(logs: pathlib.Path, tail: int) -> None:
    for log in sorted(logs.glob("*.log")) if logs.exists() else []:
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            print(f"--- {log.name} ---\n{text[-tail:]}")


@pytest.fixture(scope="session")
def baseline_acc() -> Callable[[int], float]:
    """Factory: the final accuracy of the failure tests' job (``test_failures.SPEC`` with
    ``min_peers=n``) on ``n`` peers with no failure, cached per ``n``. It runs in this process, a
    coordinator and ``n`` peers as threads: the same code, plan and ring average as processes
    (the same accuracy, measured to the last digit at n=3), without a torch start-up per peer,
    which is most of an e2e cluster's cost on 2 cores."""
    import dataclasses

    from dml.client.api import history_dict
    from tests.e2e.test_failures import SPEC, _final_accuracy
    from tests.integration.helpers import coordinator, operator_token, peers, wait_for

    cache: dict[int, float] = {}

    def get(n: int) -> float:
        if n not in cache:
            with coordinator() as srv, peers(srv.address, n), \
                    JobClient(srv.address, token=operator_token(srv.address)) as client:
                job = client.submit(dataclasses.replace(SPEC, min_peers=n))
                wait_for(lambda: client.status(job).job.state in DONE, 240, f"the failure-free baseline on {n} peers")
                assert client.status(job).job.state == types_pb2.JOB_STATE_SUCCEEDED, client.status(job)
                cache[n] = _final_accuracy([history_dict(r) for r in client.history(job)])
        return cache[n]

    return get


@pytest.fixture
def local_cluster(tmp_path, monkeypatch, cluster_tls) -> Iterator:
    """Factory: start a cluster of N peer processes with fast timeouts; yields (address,
    processes): the coordinator, then peer 0, 1, ... (peer i writes peer-i.log)."""
    clusters: list[LocalCluster] = []
    monkeypatch.setenv("DML_TOKEN_FILE", str(operator_token_file(tmp_path / "state")))

    def start(n: int) -> tuple[str, list[subprocess.Popen[bytes]]]:
        c = LocalCluster(tmp_path / "state", tmp_path / "logs", coordinator_args=FAST_FAILURES, cwd=ROOT, tls=cluster_tls)
        clusters.append(c)
        address = c.start_coordinator()
        for i in range(n):
            c.start_peer(i)
        return address, [p.popen for p in c.everything]

    yield start
    for c in reversed(clusters):
        c.close()
    _print_tracebacks(tmp_path / "logs", 4000)


class Procs:
    """Coordinator and peer processes for failure tests: restartable, always reaped. Logs are
    numbered in start order across both kinds: coordinator-1.log, peer-2.log, peer-3.log, ..."""

    def __init__(self, root: pathlib.Path, tls: TlsConfig) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.logs = root / "logs"
        self._n = 0
        self.cluster = LocalCluster(self.state_dir, self.logs, coordinator_args=FAST_FAILURES, cwd=ROOT,
                                    log_name=self._log_name, tls=tls)
        self.peers: list[subprocess.Popen[bytes]] = []

    def _log_name(self, name: str, generation: int) -> str:
        return f"coordinator-{self._n}.log" if name == "coordinator" else default_log_name(name, generation)

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def coordinator(self) -> subprocess.Popen[bytes] | None:
        return self.cluster.coordinator.popen if self.cluster.coordinator is not None else None

    def start_coordinator(self) -> str:
        """Starts (or restarts, on the same port and state dir) the coordinator."""
        self._n += 1
        return self.cluster.start_coordinator()

    def start_peer(self, *extra: str) -> subprocess.Popen[bytes]:
        """Starts one more peer process (in slot N, writing peer-N.log)."""
        self._n += 1
        proc = self.cluster.start_peer(self._n, extra).popen
        self.peers.append(proc)
        return proc

    def peer_addresses(self) -> dict[str, str]:
        """peer id -> exchange address, from every peer log (restarted peers log a new id)."""
        return {r.peer_id: r.address for log in self.logs.glob("peer-*.log") for r in registrations(log)}

    def reap(self) -> None:
        self.cluster.close()
        _print_tracebacks(self.logs, 3000)


@pytest.fixture
def procs(tmp_path, monkeypatch, cluster_tls) -> Iterator[Procs]:
    """Restartable coordinator + peers, reaped at the end."""
    p = Procs(tmp_path, cluster_tls)
    monkeypatch.setenv("DML_TOKEN_FILE", str(p.cluster.operator_token_file))
    try:
        yield p
    finally:
        p.reap()
