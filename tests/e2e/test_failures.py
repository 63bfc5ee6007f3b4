"""Every failure a cluster of flaky machines throws, with real processes and real signals.

Each test checks what the product promises: the job succeeds, every committed round is there
exactly once, the live peers end bit-identical, the sample ledger holds (each sample once per
data epoch in committed rounds), and the final accuracy is within 1 point of a failure-free run.
"Final accuracy" is the mean over the last 10 committed rounds: one round's accuracy on the 359
test images moves by a point from round to round, failures or not.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import time

import pytest

from dml.common.spec import JobSpec
from tests.e2e.conftest import SLOW_LEASE, dml, fetch_peer, status, wait_status
from tests.integration.helpers import (
    assert_state_dicts_identical,
    ledger_problems,
)

pytestmark = pytest.mark.e2e

ROUNDS = 200
FINAL_ROUNDS = 10
SPEC = JobSpec(rounds=ROUNDS, min_peers=2)
SUBMIT = ["--rounds", str(ROUNDS), "--min-peers", "2"]


def _submit(address: str, *extra: str) -> str:
    out = dml("submit", "--coordinator", address, *SUBMIT, *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def _history(address: str, job: str) -> list[dict]:
    out = dml("status", "--coordinator", address, job, "--json", "--history")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["history"]


def _final_accuracy(hist: list[dict]) -> float:
    return sum(r["test_accuracy"] for r in hist[-FINAL_ROUNDS:]) / FINAL_ROUNDS


def _check_finished_job(procs, job: str, baseline_acc: float, live: int) -> dict:
    end = wait_status(procs.address, job, lambda s: s["state"] in ("SUCCEEDED", "FAILED"), 240, "the end")
    assert end["state"] == "SUCCEEDED", end
    hist = _history(procs.address, job)
    assert [r["round"] for r in hist] == list(range(1, ROUNDS + 1)), "a committed round was lost or repeated"
    assert ledger_problems(hist, SPEC) == []
    assert sum(r["samples"] for r in hist) == end["samples"]
    # Every peer still registered holds the final round, bit for bit, under the committed digest.
    got = []
    for pid, addr in procs.peer_addresses().items():
        try:
            got.append(fetch_peer(procs.state_dir, addr, job, ROUNDS, pid))
        except Exception:  # noqa: BLE001 - dead or evicted peers have nothing to serve
            continue
    assert len(got) >= live, f"only {len(got)} peers hold round {ROUNDS}"
    assert {g[0] for g in got} == {hist[-1]["digest"]}
    assert_state_dicts_identical([g[1] for g in got])
    acc = _final_accuracy(hist)
    print(f"final accuracy {acc:.4f}, failure-free {baseline_acc:.4f}")
    assert abs(acc - baseline_acc) <= 0.01, f"accuracy {acc:.4f} vs failure-free {baseline_acc:.4f}"
    return end


def _start(procs, n: int, *peer_args: str) -> str:
    procs.start_coordinator()
    for _ in range(n):
        procs.start_peer(*peer_args)
    job = _submit(procs.address, "--min-peers", str(n))
    wait_status(procs.address, job, lambda s: s["round"] >= 20, 120, "round 20")
    return job


# SLOW_LEASE for the sigkill test: the victim's lease must not run out before a neighbour's
# report arrives, that report being the thing under test. The lease's clock starts at the
# victim's last heartbeat, which on a loaded machine can come well before the kill, while the
# report may take a plan, a connect and two RPCs (0.1-0.7 s measured at load 40 on 2 cores):
# with FAST_FAILURES' 1.5 s the lease sometimes won, and the test failed with nothing broken.
# How long a freshly started peer process may take to join a running job: start, warm up,
# register, take the job, join at a round boundary. Measured here (2 cores shared by five test
# runs): 24-31 s from spawn to registration alone, so the 30 s this used to be ran out before a
# restarted peer had even logged its first line.
PEER_START_S = 120


def test_sigkill_mid_exchange_then_restart(procs, baseline_acc):
    procs.cluster.coordinator_args = SLOW_LEASE
    # Small chunks make the exchange most of each round, so the kill lands mid-all-reduce.
    job = _start(procs, 3, "--chunk-elems", "256")
    victim = procs.peers[0]
    before = status(procs.address, job)
    victim.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    st = wait_status(procs.address, job, lambda s: len(s["peers"]) == 2, 40, "eviction")
    detected = time.monotonic() - t0
    assert st["epoch"] > before["epoch"]
    # Who noticed, not how fast (timings on a shared machine are noise): a ring neighbour must
    # have reported the dead peer, rather than its lease running out (20 s here, SLOW_LEASE).
    gone = set(before["peers"]) - set(st["peers"])
    assert len(gone) == 1, f"healthy peers were evicted along with the victim: {sorted(gone)}"
    (victim_id,) = gone
    coord_log = "".join(f.read_text(errors="replace") for f in procs.logs.glob("coordinator-*.log"))
    assert f"peer {victim_id} reported by" in coord_log, (
        f"{victim_id} was evicted after {detected:.2f}s, but not on a neighbour's report:\n{coord_log[-2000:]}")
    assert f"peer {victim_id}: no heartbeat" not in coord_log
    procs.start_peer("--chunk-elems", "256")  # the machine comes back
    wait_status(procs.address, job, lambda s: len(s["peers"]) == 3, PEER_START_S, "the restarted peer to join")
    _check_finished_job(procs, job, baseline_acc(3), live=3)


def test_sigstop_hung_peer_is_evicted_then_rejoins_by_itself(procs, baseline_acc):
    job = _start(procs, 3)
    victim = procs.peers[1]
    members = set(status(procs.address, job)["peers"])
    victim.send_signal(signal.SIGSTOP)
    try:
        st = wait_status(procs.address, job, lambda s: len(s["peers"]) == 2, 10, "eviction of the hung peer")
        time.sleep(1.0)  # it stays frozen a while after being evicted
    finally:
        victim.send_signal(signal.SIGCONT)
    # Evicted by its lease, the only thing that can tell a hung peer (its sockets stay open, so
    # no neighbour's connect fails before the 30 s exchange timeout): which cause, not how fast.
    (victim_id,) = members - set(st["peers"])
    coord_log = "".join(f.read_text(errors="replace") for f in procs.logs.glob("coordinator-*.log"))
    assert f"peer {victim_id}: no heartbeat" in coord_log, coord_log[-2000:]
    # It learns it was evicted (NOT_FOUND), drops its state and re-registers under a new id.
    st = wait_status(procs.address, job, lambda s: len(s["peers"]) == 3, 30, "the woken peer to rejoin")
    assert len(set(st["peers"]) - members) == 1, "it rejoins as a new member"
    _check_finished_job(procs, job, baseline_acc(3), live=3)


def test_coordinator_kill9_and_restart_loses_nothing(procs, baseline_acc):
    job = _start(procs, 3)
    procs.coordinator.send_signal(signal.SIGKILL)
    procs.coordinator.wait(10)
    db = procs.state_dir / "coordinator.db"
    with sqlite3.connect(db) as conn:  # readable and consistent right after kill -9
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    seen = _history_from_db(db, job)
    assert seen, "rounds were committed before the kill"
    procs.start_coordinator()  # the same command on the same state dir
    after = wait_status(procs.address, job, lambda s: s["round"] > seen[-1] + 5, 60, "progress after restart")
    assert after["state"] == "RUNNING" and len(after["peers"]) == 3, "peers re-attached by themselves"
    hist = _history(procs.address, job)
    assert [r["round"] for r in hist[: len(seen)]] == seen
    _check_finished_job(procs, job, baseline_acc(3), live=3)


def _history_from_db(db, job: str) -> list[int]:
    with sqlite3.connect(db) as conn:
        committed = json.loads(conn.execute("SELECT body FROM jobs WHERE job_id = ?", (job,)).fetchone()[0])["committed_round"]
        rows = [r for (r,) in conn.execute("SELECT round FROM rounds WHERE job_id = ? ORDER BY round", (job,))]
    return [r for r in rows if r <= committed]


def test_too_few_peers_waits_says_why_and_resumes(procs, baseline_acc):
    job = _start(procs, 2)
    procs.peers[0].send_signal(signal.SIGKILL)
    st = wait_status(procs.address, job, lambda s: "waiting for peers" in s["reason"], 10, "the waiting reason")
    assert st["state"] == "RUNNING" and "1 live, 2 needed" in st["reason"]
    stalled = st["round"]
    time.sleep(1.0)
    assert status(procs.address, job)["round"] == stalled, "no round commits below min_peers"
    procs.start_peer()
    wait_status(procs.address, job, lambda s: s["reason"] == "" and s["round"] > stalled, PEER_START_S, "resumption")
    _check_finished_job(procs, job, baseline_acc(2), live=2)


def test_job_whose_peers_never_return_fails_after_the_grace_period(procs):
    procs.start_coordinator()
    for _ in range(2):
        procs.start_peer()
    job = _submit(procs.address, "--min-peers", "2", "--peer-grace-s", "2")
    wait_status(procs.address, job, lambda s: s["round"] >= 3, 60, "round 3")
    procs.peers[0].send_signal(signal.SIGKILL)
    end = wait_status(procs.address, job, lambda s: s["state"] == "FAILED", 15, "failure after the grace period")
    assert "peer grace period" in end["reason"] and "1 of 2 peers" in end["reason"]
