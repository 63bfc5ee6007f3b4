"""Resource pools as users run them (issue 13, must-show 5): four peer processes in two pools of
two, a job on each pool running at the same time, a third job on a full pool waiting with the
reason in `dml status` until the first job of its pool ends, and `dml peers --json` showing who
runs what. One cluster for every assertion."""
from __future__ import annotations

import json
import time

import pytest

from dml.client.cluster import LocalCluster, registrations
from tests.e2e.conftest import ROOT, _print_tracebacks, dml, job_client, status, wait_status
from tests.e2e.test_processes import _history
from dml.v1 import types_pb2
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.e2e

POOLS = {0: "a", 1: "a", 2: "b", 3: "b"}  # peer slot -> pool
DONE = ("SUCCEEDED", "FAILED", "CANCELLED")
# Enough rounds that a job is still running when the test, polling every 20 ms, sees its first
# commit and pauses its peers: the peers idle 19x their training time after it (--slowdown 20),
# so a round takes some 50 ms of which little is CPU (the first commit was seen by round 4 here).
ROUNDS_A, ROUNDS_B, ROUNDS_C = 40, 40, 5
SLOWDOWN = "20"


def _submit(address: str, pool: str, rounds: int) -> str:
    out = dml("submit", "--coordinator", address, "--pool", pool, "--min-peers", "2", "--max-peers", "2",
              "--rounds", str(rounds), "--local-steps", "2")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def _peers_cli(address: str) -> dict[str, dict]:
    """`dml peers --json` (the real CLI), by peer id."""
    out = dml("peers", "--coordinator", address, "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    return {r["peer_id"]: r for r in map(json.loads, out.stdout.splitlines())}


def _window(hist: list[dict]) -> tuple[int, int]:
    """A job's running window from its status history: its first and last commit (unix ms)."""
    times = [r["committed_unix_ms"] for r in hist]
    assert times, "the job committed no round"
    return min(times), max(times)


def test_two_pools_run_two_jobs_at_once_and_a_third_waits_for_its_full_pool(tmp_path, monkeypatch, cluster_tls):
    # Nothing fails here: a long lease and exchange timeout, so peers paused (SIGSTOP) for the
    # snapshots below (a few seconds) keep their place and their exchanges.
    lease = ("--heartbeat-interval-ms", "200", "--peer-timeout-ms", "60000")
    with LocalCluster(tmp_path / "state", tmp_path / "logs", coordinator_args=lease, cwd=ROOT, tls=cluster_tls) as c:
        monkeypatch.setenv("DML_TOKEN_FILE", str(c.operator_token_file))
        address = c.start_coordinator()
        peer_args = ("--slowdown", SLOWDOWN, "--exchange-timeout-s", "60")
        procs = {slot: c.start_peer(slot, ("--pool", pool, *peer_args)) for slot, pool in POOLS.items()}
        wait_for(lambda: all(registrations(p.log) for p in procs.values()), 120, "four peers to register")
        pool_of = {registrations(p.log)[-1].peer_id: POOLS[slot] for slot, p in procs.items()}
        in_a = {pid for pid, pool in pool_of.items() if pool == "a"}
        in_b = set(pool_of) - in_a
        slots = {pool: [p for slot, p in procs.items() if POOLS[slot] == pool] for pool in ("a", "b")}

        ja, jb = _submit(address, "a", ROUNDS_A), _submit(address, "b", ROUNDS_B)
        jc = _submit(address, "a", ROUNDS_C)  # pool a is full while A runs
        started = time.monotonic()

        # Once each of A and B has committed a round, its pool's peers are paused: both jobs hold
        # their peers, unfinished, while `dml status` and `dml peers` look (no race with their ends).
        todo = {"a": ja, "b": jb}
        with job_client(address) as client:
            deadline = time.monotonic() + 90
            while todo and time.monotonic() < deadline:
                for pool, job in list(todo.items()):
                    st = client.status(job).job
                    assert st.state in (types_pb2.JOB_STATE_PENDING, types_pb2.JOB_STATE_RUNNING), \
                        f"job {job} ended before its peers could be paused: {st}"
                    if st.HasField("last"):  # a round committed
                        for proc in slots[pool]:
                            c.pause(proc)
                        del todo[pool]
                        print(f"paused pool {pool} at round {st.last.round} of job {job}")
                time.sleep(0.02)
        assert not todo, f"jobs {todo} committed no round in 90 s"
        try:
            seen = status(address, jc)  # the real `dml status --json`
            rows = _peers_cli(address)  # the real `dml peers --json`
        finally:
            for proc in procs.values():
                c.resume(proc)
        assert seen["state"] == "PENDING" and seen["pool"] == "a", seen
        assert seen["reason"] == (f"waiting for peers in pool 'a' to take the job: 0 ready, 0 declined, 2 needed; "
                                  f"2 busy with job {ja}"), seen
        assert {pid: (r["pool"], r["state"], r["job_id"]) for pid, r in rows.items()} == {
            pid: (pool_of[pid], "training", ja if pid in in_a else jb) for pid in pool_of}, rows

        # C starts once A has ended, on pool a's two peers, and every job succeeds.
        ends = {j: wait_status(address, j, lambda s: s["state"] in DONE, 120, f"job {j} to end") for j in (ja, jb, jc)}
        assert {j: e["state"] for j, e in ends.items()} == {ja: "SUCCEEDED", jb: "SUCCEEDED", jc: "SUCCEEDED"}, ends
        hist = {j: _history(address, j) for j in (ja, jb, jc)}
        (a0, a1), (b0, b1), (c0, c1) = (_window(hist[j]) for j in (ja, jb, jc))
        assert a0 < b1 and b0 < a1, f"A ({a0}, {a1}) and B ({b0}, {b1}) ran at the same time"
        assert c0 > a1, f"C ({c0}, {c1}) started after A ({a0}, {a1}) ended"
        assert [len(hist[j]) for j in (ja, jb, jc)] == [ROUNDS_A, ROUNDS_B, ROUNDS_C]
        assert all(r["members"] == 2 for h in hist.values() for r in h)
        with job_client(address) as client:
            ran = {j: {p for e in client.status(j).job.epochs for p in e.peers} for j in (ja, jb, jc)}
        assert ran == {ja: in_a, jb: in_b, jc: in_a}, "each job ran on its own pool's peers only"
        after = _peers_cli(address)
        assert {pid: (r["state"], r["job_id"]) for pid, r in after.items()} == {pid: ("idle", "") for pid in pool_of}
        print(f"pools e2e: {time.monotonic() - started:.1f} s from the first submit; A {a1 - a0} ms, B {b1 - b0} ms, "
              f"C {c1 - c0} ms from first to last commit")
    _print_tracebacks(tmp_path / "logs", 4000)
