"""The test-only pause-round fault: a process that stops itself at a known round and goes on
where it stopped when continued."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from dml.peer import faults

CHILD = """
import logging, sys
from dml.peer import faults
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
f = faults.parse_fault("pause-round:3")
log = logging.getLogger("t")
assert not faults.pause(f, 2, "round 2", log)
print("before", flush=True)
assert faults.pause(f, 3, "round 3", log)
print("after", flush=True)
"""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_pause_round_stops_the_process_at_its_round_until_continued():
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("needs /proc (Linux)")
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while _state(child.pid) != "T":
            assert child.poll() is None and time.monotonic() < deadline, "the child never stopped itself"
            time.sleep(0.05)
        time.sleep(0.2)
        assert _state(child.pid) == "T", "it stays stopped until continued"
        child.send_signal(signal.SIGCONT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == 0, err
    assert out.split() == ["before", "after"]
    assert "round 3: test fault pause-round: stopping this process" in err and "round 2:" not in err


def test_pause_round_is_only_its_kind_and_round():
    log = logging.getLogger(__name__)
    assert not faults.pause(faults.parse_fault("hold-collective:3"), 3, "t", log)
    assert not faults.pause(None, 3, "t", log)
    with pytest.raises(ValueError, match="pause-round"):
        faults.parse_fault("pause:3")
