"""One coordinator per port and per state dir: the second exits 2 with one line naming the first;
a coordinator killed with SIGKILL leaves no stale lock."""
from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dml.client.cluster import reap, wait_for_port_file
from dml.common import rpc
from dml.coordinator.lock import LOCK_NAME, read_holder
from tests.e2e.conftest import ROOT, env_tls

pytestmark = pytest.mark.e2e


class Coordinators:
    """Starts coordinator processes (each on its own port file and log) and reaps them all."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def argv(port: int, state_dir: pathlib.Path | None, port_file: pathlib.Path | None = None) -> list[str]:
        args = [sys.executable, "-m", "dml.coordinator.cli", "--host", "127.0.0.1", "--port", str(port)]
        if state_dir is not None:
            args += ["--state-dir", str(state_dir)]
        if port_file is not None:
            args += ["--port-file", str(port_file)]
        return args

    def start(self, port: int = 0, state_dir: pathlib.Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
        """A coordinator that is expected to start: returns it and its bound port."""
        n = len(self.procs)
        port_file = self.root / f"coordinator-{n}.port"
        proc = subprocess.Popen(self.argv(port, state_dir, port_file), stdout=open(self.root / f"coordinator-{n}.log", "ab"),
                                stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        return proc, wait_for_port_file(port_file, proc, 60)

    def refused(self, port: int = 0, state_dir: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
        """A coordinator that is expected to exit at once (killed at the timeout if it does not)."""
        return subprocess.run(self.argv(port, state_dir), capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.fixture
def coordinators(tmp_path) -> Iterator[Coordinators]:
    c = Coordinators(tmp_path)
    try:
        yield c
    finally:
        reap(c.procs)


def _serving(port: int) -> bool:
    with rpc.channel(f"127.0.0.1:{port}", tls=env_tls()) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="dml.v1.JobService"), timeout=10)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def _message(out: subprocess.CompletedProcess[str], prog: str = "dml-coordinator") -> str:
    """The one line the program says why it exits (its last; log lines and gRPC's own bind error
    may come before it)."""
    assert "Traceback" not in out.stderr, out.stderr
    ours = [line for line in out.stderr.splitlines() if line.startswith(f"{prog}:")]
    assert len(ours) == 1 and out.stderr.strip().splitlines()[-1] == ours[0], out.stderr
    return ours[0]


def test_second_coordinator_or_peer_on_a_bound_port_exits_2_naming_the_first(coordinators):
    first, port = coordinators.start()
    out = coordinators.refused(port)
    assert out.returncode == 2, out
    assert _message(out) == f"dml-coordinator: 127.0.0.1:{port} is in use by another dml coordinator (serving)"
    peer = subprocess.run([sys.executable, "-m", "dml.peer.cli", "--coordinator", f"127.0.0.1:{port}", "--host",
                           "127.0.0.1", "--port", str(port), "--device", "cpu"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert peer.returncode == 2, peer
    assert _message(peer, "dml-peer") == f"dml-peer: 127.0.0.1:{port} is in use by another dml coordinator (serving)"
    assert first.poll() is None and _serving(port), "the first coordinator is untouched"


def test_port_held_by_a_plain_program_is_named_as_such(coordinators, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = coordinators.refused(port, tmp_path / "state")
    assert out.returncode == 2, out
    assert _message(out) == f"dml-coordinator: 127.0.0.1:{port} is in use by another program"
    # It failed to bind, so it let the state dir go: the next one starts on it.
    coordinators.start(0, tmp_path / "state")


def test_second_coordinator_on_a_state_dir_exits_2_naming_the_first_until_it_is_killed(coordinators, tmp_path):
    state = tmp_path / "state"
    first, port = coordinators.start(0, state)
    out = coordinators.refused(0, state)
    assert out.returncode == 2, out
    line = _message(out)
    assert line.startswith(f"dml-coordinator: state dir {state} is held by another dml coordinator (pid {first.pid}"), line
    assert f"address 127.0.0.1:{port}" in line, line
    assert first.poll() is None and _serving(port), "the first coordinator is untouched"
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    third, third_port = coordinators.start(0, state)  # no stale lock after kill -9
    assert _serving(third_port)
    holder = read_holder(state / LOCK_NAME)
    assert (holder.pid, holder.address) == (third.pid, f"127.0.0.1:{third_port}")
