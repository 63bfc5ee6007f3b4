"""Broken peers as real processes (the test-only fault hook of peer.faults, which also skips the
broken peer's own check): one writes NaN into its parameters, another 1e30. The job must
succeed with a finite model, within 1 point of a failure-free run, and `dml status` must name
both quarantined peers with their reasons."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from tests.e2e.conftest import dml, fetch_peer, status, wait_status
from tests.e2e.test_failures import ROUNDS, SPEC, _final_accuracy, _history, _submit
from tests.integration.helpers import assert_state_dicts_identical, ledger_problems

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)  # a job of 200 rounds with four peers, and the failure-free baseline
def test_a_nan_peer_and_a_1e30_peer_are_quarantined_and_the_job_succeeds(procs, baseline_acc, tmp_path):
    procs.start_coordinator()
    procs.start_peer()
    procs.start_peer()
    procs.start_peer("--fault", "nan-params:20")
    procs.start_peer("--fault", "huge-params:40")
    # All four registered first; the job goes on with two once the broken ones are out.
    deadline = time.monotonic() + 60
    while len(procs.peer_addresses()) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(procs.peer_addresses()) == 4, procs.peer_addresses()
    job = _submit(procs.address, "--min-peers", "2")
    # The job starts with its first two takers and admits the others at a round's commit: all
    # four are members well before round 20, the first fault's (each injects from its round on).
    four = wait_status(procs.address, job, lambda s: len(s["peers"]) == 4, 60, "all four peers in the ring")
    assert four["round"] < 20, four
    wait_status(procs.address, job, lambda s: len(s["quarantined"]) == 2, 300, "both broken peers quarantined")
    end = wait_status(procs.address, job, lambda s: s["state"] in ("SUCCEEDED", "FAILED"), 400, "the end")
    assert end["state"] == "SUCCEEDED", end
    quarantined = {q["peer_id"]: q for q in end["quarantined"]}
    assert len(quarantined) == 2, end["quarantined"]
    assert sorted(q["round"] for q in quarantined.values()) == [20, 40]
    for q in quarantined.values():
        assert "sent non-finite or absurd values" in q["reason"] and q["reporters"] != q["peer_id"]
        # The reporter was an honest member then (the 1e30 peer may report the NaN one before it breaks).
        assert all(q["reporters"] != o["peer_id"] or o["round"] > q["round"] for o in quarantined.values())
    # The text status names them, with the reason.
    out = dml("status", "--coordinator", procs.address, job)
    assert out.returncode == 0, out.stderr
    for pid in quarantined:
        assert f"quarantined {pid} at round" in out.stdout, out.stdout
    hist = _history(procs.address, job)
    assert [r["round"] for r in hist] == list(range(1, ROUNDS + 1))
    assert ledger_problems(hist, SPEC) == []
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_accuracy"]) for r in hist)
    # The honest peers hold the final round bit for bit, finite; so does `dml model`'s download.
    assert hist[-1]["members"] == 2
    got = []
    for pid, addr in procs.peer_addresses().items():
        try:
            got.append(fetch_peer(procs.state_dir, addr, job, ROUNDS, pid))
        except Exception:  # noqa: BLE001 - the quarantined peers, back as idle ones, hold nothing of the job
            continue
    assert len(got) == 2 and {g[0] for g in got} == {hist[-1]["digest"]}
    out = dml("model", "--coordinator", procs.address, job, "-o", str(tmp_path / "m.pt"))
    assert out.returncode == 0, out.stderr
    model = torch.load(tmp_path / "m.pt", weights_only=True)
    assert_state_dicts_identical([got[0][1], got[1][1], model])
    assert all(bool(torch.isfinite(t).all()) for t in model.values())
    acc = _final_accuracy(hist)
    base = baseline_acc(4)
    print(f"final accuracy {acc:.4f}, failure-free {base:.4f}; quarantined {json.dumps(end['quarantined'])}")
    assert abs(acc - base) <= 0.01, f"accuracy {acc:.4f} vs failure-free {base:.4f}"
    assert status(procs.address, job)["quarantined"] == end["quarantined"]
