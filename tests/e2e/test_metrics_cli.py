"""``--metrics-port`` on the real commands: the coordinator prints its endpoint and serves it; a
taken metrics port is a one-line error with exit code 2 for the coordinator and the peer."""
from __future__ import annotations

import pathlib
import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from tests.e2e.conftest import env_tls

pytestmark = pytest.mark.e2e
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """Each line the child prints, as it prints it."""
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return out


def _wait_line(lines: queue.Queue[str], word: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line with {word!r} within {timeout_s}s")
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if word in line:
            return line


def test_the_coordinator_prints_and_serves_its_metrics_endpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dml.coordinator.cli", "--port", "0", "--metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        line = _wait_line(_lines(proc), "metrics on", 60)
        url = line.split("metrics on", 1)[1].strip()
        # The e2e processes run with TLS (DML_TLS_*): the endpoint is HTTPS and wants a client
        # certificate of the cluster's CA. Dialed by the name its certificate carries.
        assert url.startswith("https://127.0.0.1:") and url.endswith("/metrics")
        tls = env_tls()
        assert tls is not None
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        with urllib.request.urlopen(url.replace("127.0.0.1", "localhost"), timeout=10, context=ctx) as r:
            text = r.read().decode()
        assert "dml_peers_live 0.0" in text and "dml_jobs_running 0.0" in text
        assert "# TYPE dml_rounds_committed_total counter" in text
    finally:
        proc.terminate()
        proc.wait(15)
    assert proc.returncode == 0


@pytest.mark.parametrize("cmd", [["dml.coordinator.cli", "--port", "0"],
                                 ["dml.peer.cli", "--coordinator", "127.0.0.1:1", "--device", "cpu"]],
                         ids=["coordinator", "peer"])
def test_a_taken_metrics_port_is_one_line_and_exit_2(cmd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", *cmd, "--metrics-port", str(taken)], capture_output=True,
                             text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip()
    assert f"cannot serve metrics on 127.0.0.1:{taken}" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
