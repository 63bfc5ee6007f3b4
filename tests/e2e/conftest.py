"""Real processes: a coordinator and peers started through their handles and always reaped.

Authentication is on, as in every LocalCluster: the fixtures point DML_TOKEN_FILE at the
coordinator's operator token, so `dml` commands run from the tests carry it."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Iterator

import pytest

from dml.client.api import JobClient, read_token
from dml.client.cluster import LocalCluster, default_log_name, operator_token_file, registrations
from tests.integration.helpers import coordinator_key, fetch_state

pytestmark = pytest.mark.e2e
ROOT = pathlib.Path(__file__).resolve().parents[2]


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
    """Polls `dml status --json` until ``pred(status)``; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    st: dict = {}
    while time.monotonic() < deadline:
        st = status(address, job)
        if pred(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last status {st}")


FAST_FAILURES = ("--heartbeat-interval-ms", "200", "--peer-timeout-ms", "1500")


def job_client(address: str, timeout_s: float = 10) -> JobClient:
    """A JobClient with the operator token DML_TOKEN_FILE names (set by the fixtures)."""
    return JobClient(address, timeout_s, token=read_token(pathlib.Path(os.environ["DML_TOKEN_FILE"])))


def fetch_peer(state_dir: pathlib.Path, address: str, job: str, rnd: int, peer_id: str):
    """A peer process's parameters of a round, fetched as an auditor holding the coordinator's
    key (STATE_DIR/secrets/coordinator.key): (digest, state_dict, raw bytes)."""
    return fetch_state(address, job, rnd, peer_id, coordinator_key(state_dir))


def _print_tracebacks(logs: pathlib.Path, tail: int) -> None:
    for log in sorted(logs.glob("*.log")) if logs.exists() else []:
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            print(f"--- {log.name} ---\n{text[-tail:]}")


@pytest.fixture
def local_cluster(tmp_path, monkeypatch) -> Iterator:
    """Factory: start a cluster of N peer processes with fast timeouts; yields (address,
    processes): the coordinator, then peer 0, 1, ... (peer i writes peer-i.log)."""
    clusters: list[LocalCluster] = []
    monkeypatch.setenv("DML_TOKEN_FILE", str(operator_token_file(tmp_path / "state")))

    def start(n: int) -> tuple[str, list[subprocess.Popen[bytes]]]:
        c = LocalCluster(tmp_path / "state", tmp_path / "logs", coordinator_args=FAST_FAILURES, cwd=ROOT)
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

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.logs = root / "logs"
        self._n = 0
        self.cluster = LocalCluster(self.state_dir, self.logs, coordinator_args=FAST_FAILURES, cwd=ROOT,
                                    log_name=self._log_name)
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
def procs(tmp_path, monkeypatch) -> Iterator[Procs]:
    """Restartable coordinator + peers, reaped at the end."""
    p = Procs(tmp_path)
    monkeypatch.setenv("DML_TOKEN_FILE", str(p.cluster.operator_token_file))
    try:
        yield p
    finally:
        p.reap()
