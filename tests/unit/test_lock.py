"""The state dir lock: one holder at a time, named to the next; freed by release or by death."""
from __future__ import annotations

import os
import pathlib
import select
import signal
import subprocess
import sys

import pytest

from dml.coordinator.lock import LOCK_NAME, Holder, StateDirLock, StateDirLocked, read_holder

ROOT = pathlib.Path(__file__).resolve().parents[2]

# A child that takes the lock, records an address, says so and waits for its stdin to close.
CHILD = """
import pathlib, sys
from dml.coordinator.lock import StateDirLock
lock = StateDirLock(pathlib.Path(sys.argv[1])).acquire()
lock.record("127.0.0.1:4321")
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_locker_is_refused_naming_the_holder_and_release_frees_it(tmp_path):
    state = tmp_path / "nested" / "state"
    first = StateDirLock(state).acquire()  # creates the dir
    first.record("127.0.0.1:50051")
    second = StateDirLock(state)
    # flock is per open file: a second open in the same process conflicts like another process.
    with pytest.raises(StateDirLocked) as e:
        second.acquire()
    assert not second.held
    assert e.value.holder.pid == os.getpid() and e.value.holder.address == "127.0.0.1:50051"
    assert f"state dir {state} is held by another dml coordinator (pid {os.getpid()}" in str(e.value)
    assert "address 127.0.0.1:50051" in str(e.value)
    first.release()
    first.release()  # idempotent
    second.acquire()
    assert read_holder(state / LOCK_NAME) == Holder(pid=os.getpid(), host=second._holder.host, address="",
                                                   started=second._holder.started)
    assert "not yet bound" in read_holder(state / LOCK_NAME).describe()
    second.release()


def test_record_needs_the_lock(tmp_path):
    with pytest.raises(RuntimeError):
        StateDirLock(tmp_path).record("127.0.0.1:1")


def test_unrecorded_or_garbled_holder_reads_as_unknown(tmp_path):
    path = tmp_path / LOCK_NAME
    assert read_holder(path) == Holder()
    path.write_text("")
    assert read_holder(path).describe() == "holder not recorded yet"
    path.write_text("{not json")
    assert read_holder(path) == Holder()


def test_another_process_holds_it_until_killed_then_it_is_free_at_once(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None
        assert select.select([child.stdout], [], [], 60)[0], "the child did not take the lock within 60 s"
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(StateDirLocked) as e:
            StateDirLock(tmp_path).acquire()
        assert e.value.holder.pid == child.pid and e.value.holder.address == "127.0.0.1:4321"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        lock = StateDirLock(tmp_path).acquire()  # the kernel dropped the dead holder's lock
        assert read_holder(tmp_path / LOCK_NAME).pid == os.getpid()
        lock.release()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)
        for f in (child.stdin, child.stdout):
            if f is not None:
                f.close()
