"""``--data-plane torch`` with real processes: a member SIGKILLed mid-collective is named by the
survivors, the group is formed again without it and no round is lost; then, while the survivors
stand stopped at a known round (so the job is surely mid-way, however fast its rounds are on a
quiet machine), the coordinator is killed with -9 and restarted, and the job still succeeds with every round committed once, the
ledger clean and the survivors bit-identical. Peers run over TLS, so they are started with
``--allow-torch-plane`` (the plane's own sockets are not encrypted)."""
from __future__ import annotations

import signal
import time

import pytest

from dml.common.spec import JobSpec
from tests.e2e.conftest import SLOW_LEASE, dml, fetch_peer, status, wait_status
from tests.e2e.test_failures import _history
from tests.integration.helpers import assert_state_dicts_identical, ledger_problems

pytestmark = pytest.mark.e2e

ROUNDS = 10
HOLD_AT = 3  # the victim holds this round's collective, once every other member has entered it
# The survivors stop themselves (SIGSTOP) at the start of this round, until the test continues
# them: a digits round takes 10-15 ms on a quiet machine, so the whole job used to end within
# 0.15 s of the kill, before the test could see the two-member ring or kill the coordinator.
PAUSE_AT = HOLD_AT + 3
SPEC = JobSpec(rounds=ROUNDS, min_peers=2, data_plane="torch", local_steps=5)
SUBMIT = ["--rounds", str(ROUNDS), "--min-peers", "2", "--data-plane", "torch", "--local-steps", "5",
          "--checkpoint-every", "2"]


def _wait_log(path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path.name} within {timeout_s:.0f}s")


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (state T in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_member_killed_mid_collective_then_a_coordinator_kill9_lose_no_round(procs):
    procs.cluster.coordinator_args = SLOW_LEASE  # only the survivors' report may take the victim out
    procs.start_coordinator()
    out = dml("submit", "--coordinator", procs.address, "--data-plane", "torch", "--codec", "int8")
    assert out.returncode == 2 and "--data-plane torch all-reduces in fp32" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    victim = procs.start_peer("--allow-torch-plane", "--fault", f"hold-collective:{HOLD_AT}")
    victim_log = procs.logs / f"peer-{procs._n}.log"
    survivors = [procs.start_peer("--allow-torch-plane", "--fault", f"pause-round:{PAUSE_AT}") for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(procs.peer_addresses()) < 3 and time.monotonic() < deadline:  # all three take the job at once
        time.sleep(0.2)
    sub = dml("submit", "--coordinator", procs.address, *SUBMIT)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().splitlines()[-1]
    _wait_log(victim_log, "test fault hold-collective: every other member is in collective", 120)
    before = status(procs.address, job)
    assert before["round"] == HOLD_AT - 1 and len(before["peers"]) == 3, before
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    st = wait_status(procs.address, job, lambda s: len(s["peers"]) == 2, 40, "the victim taken out")
    assert st["epoch"] > before["epoch"]
    (victim_id,) = set(before["peers"]) - set(st["peers"])
    coord_log = "".join(f.read_text(errors="replace") for f in procs.logs.glob("coordinator-*.log"))
    assert f"peer {victim_id} reported by" in coord_log, coord_log[-2000:]
    assert f"peer {victim_id}: no heartbeat" not in coord_log
    deadline = time.monotonic() + 60
    while not all(_stopped(p.pid) for p in survivors):  # both at PAUSE_AT's start: the job cannot move
        assert time.monotonic() < deadline, "the survivors did not reach their pause"
        time.sleep(0.1)
    paused = status(procs.address, job)
    assert paused["state"] == "RUNNING" and paused["round"] == PAUSE_AT - 1 and len(paused["peers"]) == 2, paused
    peer_logs = "".join(f.read_text(errors="replace") for f in procs.logs.glob("peer-*.log") if f != victim_log)
    # The survivors' collective failed at once and named the dead member; they formed a new group.
    assert f"suspect {victim_id}" in peer_logs and "process group formed (gloo, rank 1 of 2)" in peer_logs
    # ... at once, by the broken connection, well within the collective's deadline (its timer never fired).
    assert "did not finish within" not in peer_logs
    procs.coordinator.send_signal(signal.SIGKILL)
    procs.coordinator.wait(10)
    procs.start_coordinator()  # the same state dir and port
    for p in survivors:
        p.send_signal(signal.SIGCONT)
    end = wait_status(procs.address, job, lambda s: s["state"] in ("SUCCEEDED", "FAILED"), 120, "the end")
    assert end["state"] == "SUCCEEDED", end
    hist = _history(procs.address, job)
    assert [r["round"] for r in hist] == list(range(1, ROUNDS + 1)), "a committed round was lost or repeated"
    assert ledger_problems(hist, SPEC) == []
    assert [r["members"] for r in hist[HOLD_AT - 1:]] == [2] * (ROUNDS - HOLD_AT + 1)
    got = [fetch_peer(procs.state_dir, a, job, ROUNDS, pid) for pid, a in procs.peer_addresses().items()
           if pid != victim_id]
    assert len(got) == 2 and {g[0] for g in got} == {hist[-1]["digest"]}
    assert_state_dicts_identical([g[1] for g in got])
