"""The CLIs' answers to bad input and unreachable coordinators, and `dml local` end to end."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from dml.client.local import reap
from tests.e2e.conftest import ROOT, dml

pytestmark = pytest.mark.e2e


def _unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_is_one_line_within_the_deadline():
    addr = f"127.0.0.1:{_unused_port()}"
    for args in (["status", "--coordinator", addr, "job-x", "--timeout", "2"],
                 ["submit", "--coordinator", addr, "--timeout", "2"],
                 ["jobs", "--coordinator", addr, "--timeout", "2"]):
        t0 = time.monotonic()
        out = dml(*args, timeout=30)
        assert time.monotonic() - t0 < 10
        assert out.returncode == 1
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert "cannot reach coordinator" in out.stderr and "Traceback" not in out.stderr


def test_bad_flags_exit_2_with_a_message():
    out = dml("submit", "--rounds", "many")
    assert out.returncode == 2 and "invalid int value" in out.stderr
    out = dml("status", "--coordinator", "nonsense")
    assert out.returncode == 2 and "HOST:PORT" in out.stderr
    peer = subprocess.run([sys.executable, "-m", "dml.peer.cli", "--coordinator", "nohostport"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert peer.returncode == 2 and "HOST:PORT" in peer.stderr and "Traceback" not in peer.stderr
    peer = subprocess.run([sys.executable, "-m", "dml.peer.cli", "--coordinator", "127.0.0.1:1", "--device", "tpu"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert peer.returncode == 2 and "--device" in peer.stderr


def test_invalid_job_is_rejected_by_the_coordinator_with_exit_2(local_cluster):
    address, _ = local_cluster(0)
    for args, words in ((["--rounds", "0"], "rounds"), (["--task", "mnist"], "unknown task"),
                        (["--sharding", "dirichlet:zero"], "sharding")):
        out = dml("submit", "--coordinator", address, *args)
        assert out.returncode == 2, out
        assert words in out.stderr and out.stderr.startswith("dml: invalid job:"), out.stderr
        assert "Traceback" not in out.stderr


def test_dml_local_trains_and_shuts_down(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dml.client.cli", "local", "--port", "0", "--peers", "2",
                          "--rounds", "30", "--state-dir", str(tmp_path / "s"), "-o", str(tmp_path / "m.pt")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    m = re.search(r"SUCCEEDED after 30 rounds .* test accuracy (\d\.\d+)", last)
    assert m and float(m.group(1)) > 0.8, last
    assert (tmp_path / "m.pt").stat().st_size > 0
    assert "Traceback" not in "".join(p.read_text() for p in (tmp_path / "s" / "logs").glob("*.log"))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_dml_local_reaps_every_process_when_stopped(tmp_path, how):
    """Ctrl-C (SIGINT to the group), SIGTERM, even SIGKILL of `dml local` leave no process behind."""
    proc = subprocess.Popen([sys.executable, "-m", "dml.client.cli", "local", "--port", "0", "--peers", "2",
                             "--rounds", "100000", "--state-dir", str(tmp_path / "s")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "job job-" not in line:
            line = proc.stderr.readline()
        assert "job job-" in line
        children = _children(proc.pid)
        assert len(children) == 3, children  # coordinator + 2 peers
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        else:
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == (130 if how != "sigkill" else -signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)
        for pid in children:
            assert not _alive(pid), f"child {pid} survived {how}"
    finally:
        reap([proc])


def _children(pid: int) -> list[int]:
    kids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead but not yet reaped by its parent
        return f.read().split()[2] != "Z"


@pytest.mark.parametrize("args,words", [
    (["--seed", "-1"], "--seed"), (["--num-shards", "-2"], "--num-shards"),
    (["--batch-size", "5000000000"], "--batch-size"), (["--lr", "0"], "--lr"), (["--local-steps", "0"], "--local-steps"),
])
def test_out_of_range_flags_exit_2_without_a_traceback(args, words):
    out = dml("submit", "--coordinator", "127.0.0.1:1", *args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1
