"""Real processes: a coordinator and peers started through their handles and always reaped."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
from typing import Iterator

import pytest

from coordinator.local import cluster

pytestmark = pytest.mark.e2e
ROOT = pathlib.Path(__file__).resolve().parents[2]


def dml(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs the `dml` job client as a separate process."""
    return subprocess.run([sys.executable, "-m", "coordinator.jobctl", *args], capture_output=True, text=True,
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
