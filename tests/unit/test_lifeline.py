"""common/lifeline.py: stop signals that cannot deadlock, and children that stop when their
parent dies. Each case runs in child processes (signals and parent deaths are per process)."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The main thread holds the stop event's lock, as it does for a moment inside done.wait(), while
# SIGTERMs arrive and Python-level handlers get their chance to run. A handler that called
# done.set() itself would wait for that lock forever (the old coordinator and peer handlers did).
HELD_LOCK = r"""
import os, signal, sys, threading, time
from dml.common import lifeline
done = threading.Event()
lifeline.on_stop_signals(lambda signum: done.set())
with done._cond:  # the lock Event.wait() holds between its check of the flag and its sleep
    for _ in range(5):
        os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100000):  # bytecode boundaries: pending Python-level handlers run here
        pass
    time.sleep(0.2)
print("stopped" if done.wait(30) else "never stopped", flush=True)
"""


def test_stop_signals_arriving_while_the_main_thread_holds_the_events_lock_stop_it():
    out = subprocess.run([sys.executable, "-c", HELD_LOCK], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "stopped", out


# A child started through a Lifeline: watches its parent, stops on SIGTERM, and writes how it
# stopped. With "late", it first waits until its parent has died, then starts watching.
CHILD = r"""
import os, sys, threading, time
from dml.common import lifeline
result, late = sys.argv[1], sys.argv[2] == "late"
parent = int(os.environ[lifeline.ENV_PID])
deadline = time.monotonic() + 60
while late and os.getppid() == parent and time.monotonic() < deadline:
    time.sleep(0.05)
done = threading.Event()
lifeline.on_stop_signals(lambda signum: done.set())
assert lifeline.watch_parent() and lifeline.ENV_FD not in os.environ
def publish(path, text):  # whole or not at all: the test polls for the file and reads it at once
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
publish(result + ".ready", str(os.getpid()))
if done.wait(120):
    publish(result, "stopped")
"""

# Starts two children through one Lifeline (and, with "leak", hands the write end to a sleeping
# process too, as a fork of the parent that never execs would hold it), then waits to be killed.
PARENT = r"""
import os, subprocess, sys, time
from dml.common.lifeline import Lifeline
out, when, leak = sys.argv[1], sys.argv[2], sys.argv[3] == "leak"
line = Lifeline()
kids = [subprocess.Popen([sys.executable, "-c", sys.argv[4], f"{out}/child-{i}", when], **line.child(os.environ))
        for i in range(2)]
if leak:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], pass_fds=line._fds)
    with open(f"{out}/holder.tmp", "w") as f:
        f.write(str(holder.pid))
    os.replace(f"{out}/holder.tmp", f"{out}/holder")
with open(f"{out}/kids.tmp", "w") as f:  # renamed into place whole: the test reads it as soon as it exists
    f.write(" ".join(str(k.pid) for k in kids))
os.replace(f"{out}/kids.tmp", f"{out}/kids")
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


def _wait_for(path: pathlib.Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path.name} within {timeout_s:.0f}s"
        time.sleep(0.05)
    return path.read_text()


@pytest.mark.parametrize("when,leak", [("early", "no"), ("late", "no"), ("early", "leak")],
                         ids=["watching-before", "watching-after", "write-end-leaked"])
def test_children_stop_when_their_parent_is_sigkilled(tmp_path, when, leak):
    """SIGKILL of the parent stops both children by SIGTERM: whether they were watching before it
    died or only began after, and (by getppid) even while another process holds the write end."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), when, leak, CHILD], cwd=ROOT)
    pids: list[int] = []
    try:
        pids = [int(p) for p in _wait_for(tmp_path / "kids", 60).split()]
        if leak == "leak":
            pids.append(int(_wait_for(tmp_path / "holder", 60)))
        if when == "early":
            for i in range(2):
                _wait_for(tmp_path / f"child-{i}.ready", 60)
        parent.kill()
        parent.wait(30)
        for i in range(2):
            assert _wait_for(tmp_path / f"child-{i}", 60) == "stopped"
            assert (tmp_path / f"child-{i}.ready").exists()
        deadline = time.monotonic() + 30  # after writing "stopped" a child only has to exit
        while any(_alive(p) for p in pids[:2]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids[:2])
    finally:
        parent.kill()
        parent.wait(30)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_process_not_started_through_a_lifeline_watches_nothing():
    from dml.common import lifeline

    env = {"PATH": "/bin"}
    assert not lifeline.watch_parent(env)
    assert env == {"PATH": "/bin"}
