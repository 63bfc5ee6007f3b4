"""A state dir written by the first release (tests/fixtures/README.md) under this release's
coordinator, with real peers over gRPC: its jobs go on where they stopped."""
from __future__ import annotations

import pathlib
import shutil
import sqlite3
import subprocess
import sys

from dml.coordinator.ledger import violations
from dml.coordinator.records import Job
from dml.coordinator.store import SCHEMA_VERSION, SqliteStore
from dml.v1 import jobs_pb2, types_pb2
from tests.integration.helpers import coordinator, job_stub, peers, wait_for

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "state-0e7092d"


def ledger(job: Job) -> list[str]:
    ranges = [[tuple(x) for m in sorted(r.consumed) for x in r.consumed[m]] for r in job.history]
    return violations(ranges, job.shard_sizes)  # type: ignore[arg-type]


def test_the_jobs_of_a_first_release_state_dir_resume_with_new_peers(tmp_path: pathlib.Path) -> None:
    state = pathlib.Path(shutil.copytree(FIXTURE, tmp_path / "state"))
    with coordinator(state_dir=state) as srv:
        c = srv.coordinator
        before = {j.job_id: (j.state, j.spec.aggregation, j.committed_round) for j in c.jobs()}
        ring = next(j for j, (s, agg, _) in before.items() if s == "RUNNING" and agg == "ring")
        gossip = next(j for j, (s, agg, _) in before.items() if s == "RUNNING" and agg == "gossip")
        pending = next(j for j, (s, _, _) in before.items() if s == "PENDING")
        # The first release's peers registered with no protocol version: the coordinator evicted
        # them as it started (PROTOCOL_MISMATCH), rather than wait out their leases, and holds none.
        def mismatched(jid: str) -> set[str]:
            return {e.peer_id for e in c.state.job(jid).evictions if e.cause == "PROTOCOL_MISMATCH"}

        old_ring = mismatched(ring)
        old_members = old_ring | mismatched(gossip)
        assert old_ring and mismatched(gossip), "the old release's members were not evicted at start-up"
        assert c.view(lambda st: list(st.peers)) == [] and not set(c.state.job(ring).members) & old_members
        stub = job_stub(srv.address)
        listed = stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs
        assert {j.job_id for j in listed} == set(before)
        # Four new peers take over.
        with peers(srv.address, 4):
            def progressed() -> bool:
                return c.view(lambda st: st.jobs[ring].committed_round >= before[ring][2] + 3
                              and st.jobs[gossip].committed_round >= before[gossip][2] + 2
                              and st.jobs[pending].state == "SUCCEEDED")
            wait_for(progressed, 240, "the restored jobs to go on with the new peers")
            got = stub.GetJob(jobs_pb2.GetJobRequest(job_id=ring, include_history=True), timeout=10)
            assert got.job.state == types_pb2.JOB_STATE_RUNNING
            assert [r.round for r in got.history] == list(range(1, got.job.round + 1))
            # The old release's members were the first to go, each for its protocol.
            assert {(e.peer_id, e.cause) for e in got.job.evictions[: len(old_ring)]} == {
                (m, jobs_pb2.EVICTION_CAUSE_PROTOCOL_MISMATCH) for m in old_ring}
            for jid in (ring, gossip, pending):
                job = c.view(lambda st, jid=jid: st.jobs[jid])
                assert not old_members & set(job.members)
                problems = c.view(lambda st, job=job: ledger(job))
                if jid == gossip:
                    # At least once in the gossip phase (dml.coordinator.state): a step whose shard
                    # moved to a joiner mid-step is trained twice; no sample is ever skipped.
                    problems = [p for p in problems if "used again" not in p]
                assert problems == [], jid


def test_the_coordinator_cli_refuses_a_state_dir_of_a_newer_schema_in_one_line(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    SqliteStore(state).close()
    con = sqlite3.connect(state / "coordinator.db")
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    proc = subprocess.run([sys.executable, "-m", "dml.coordinator.cli", "--port", "0", "--state-dir", str(state),
                           "--log-level", "WARNING"],  # the start-up's info lines aside, the error is one line
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("dml-coordinator: ") and f"schema version {SCHEMA_VERSION + 1}" in line
