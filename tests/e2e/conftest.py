"""Real processes: a coordinator and peers started through their handles and always reaped."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
from typing import Iterator

import pytest

from dml.client.local import cluster, reap

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


@pytest.fixture
def local_cluster(tmp_path) -> Iterator:
    """Factory: start a cluster of N peer processes with fast timeouts."""
    stack = []

    def start(n: int):
        cm = cluster(n, 0, tmp_path / "state", tmp_path / "logs",
                     coordinator_args=("--heartbeat-interval-ms", "200", "--peer-timeout-ms", "1500"))
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
    for log in sorted((tmp_path / "logs").glob("*.log")) if (tmp_path / "logs").exists() else []:
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            print(f"--- {log.name} ---\n{text[-4000:]}")


class Procs:
    """Coordinator and peer processes for failure tests: restartable, always reaped."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.state_dir = root / "state"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.peers: list[subprocess.Popen[bytes]] = []
        self._all: list[subprocess.Popen[bytes]] = []
        self._n = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_coordinator(self) -> str:
        """Starts (or restarts, on the same port and state dir) the coordinator."""
        from dml.client.local import wait_for_port_file

        port_file = self.root / "coordinator.port"
        port_file.unlink(missing_ok=True)
        self._n += 1
        proc = subprocess.Popen(
            [sys.executable, "-m", "dml.coordinator.cli", "--host", "127.0.0.1", "--port", str(self.port),
             "--state-dir", str(self.state_dir), "--port-file", str(port_file), "--heartbeat-interval-ms", "200",
             "--peer-timeout-ms", "1500"],
            stdout=open(self.logs / f"coordinator-{self._n}.log", "ab"), stderr=subprocess.STDOUT, cwd=ROOT)
        self._all.append(proc)
        self.coordinator = proc
        self.port = wait_for_port_file(port_file, proc, 60)
        return self.address

    def start_peer(self, *extra: str) -> subprocess.Popen[bytes]:
        """Starts one more peer process."""
        self._n += 1
        proc = subprocess.Popen(
            [sys.executable, "-m", "dml.peer.cli", "--coordinator", self.address, "--port", "0", "--device", "cpu", *extra],
            stdout=open(self.logs / f"peer-{self._n}.log", "ab"), stderr=subprocess.STDOUT, cwd=ROOT)
        self._all.append(proc)
        self.peers.append(proc)
        return proc

    def peer_addresses(self) -> dict[str, str]:
        """peer id -> exchange address, from every peer log (restarted peers log a new id)."""
        import re

        out = {}
        for log in self.logs.glob("peer-*.log"):
            for m in re.finditer(r"(?:dml-peer|peer) (peer-\S+)(?: exchanging on|: registered at) (\S+)", log.read_text()):
                out[m.group(1)] = m.group(2)
        return out

    def reap(self) -> None:
        reap(self._all)
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text:
                print(f"--- {log.name} ---\n{text[-3000:]}")


@pytest.fixture
def procs(tmp_path) -> Iterator[Procs]:
    """Restartable coordinator + peers, reaped at the end."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.reap()
