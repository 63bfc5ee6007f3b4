"""Gossip jobs end to end: a coordinator and peer processes on 127.0.0.1, the `dml` CLI, and a
peer killed with SIGKILL while the others exchange."""
from __future__ import annotations

import json
import pathlib
import re
import signal
import time

import pytest
import torch

from dml.client.api import history_dict, status_dict
from dml.common.tasks import get_task
from dml.peer.trainer import Trainer
from tests.e2e.conftest import dml, fetch_peer, job_client
from tests.integration.helpers import (
    assert_state_dicts_identical,
    ledger_problems,
    wait_for,
)

pytestmark = pytest.mark.e2e

TIMEOUT_MS = 2000  # --gossip-timeout-ms
FINISHED = ("SUCCEEDED", "FAILED", "CANCELLED")


def _peer_ids(logs) -> dict[int, tuple[str, str]]:
    """Peer index (its log file peer-I.log) -> (peer id, exchange address)."""
    out = {}
    for log in logs.glob("peer-*.log"):
        m = re.search(r"dml-peer (\S+) exchanging on (\S+)", log.read_text())
        if m:
            out[int(log.stem.split("-")[1])] = (m.group(1), m.group(2))
    return out


def _get(address: str, job: str, history: bool = False) -> dict:
    """The job's status (and history) over gRPC, as `dml status --json [--history]` prints it."""
    with job_client(address) as client:
        resp = client.status(job, history=history)
    d = status_dict(resp.job)
    if history:
        d["history"] = [history_dict(r) for r in resp.history]
    return d


def _wait(address: str, job: str, pred, timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    st: dict = {}
    while time.monotonic() < deadline:
        st = _get(address, job)
        if pred(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last status {st}")


def _submit(address: str, rounds: int, *extra: str) -> str:
    out = dml("submit", "--coordinator", address, "--aggregation", "gossip", "--gossip-timeout-ms", str(TIMEOUT_MS),
              "--rounds", str(rounds), "--local-steps", "5", *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def _check_history(hist: list[dict], rounds: int, members: int) -> None:
    assert [r["round"] for r in hist] == list(range(1, rounds + 1)), "a round was lost or repeated"
    gossip, last = hist[:-1], hist[-1]
    assert all(r["digest"] == "" for r in gossip), "virtual rounds carry no digest"
    assert last["digest"], "the closing ring round commits a digest"
    assert last["members"] == members
    spread = [r["consensus_distance"] for r in gossip]
    assert all(x >= 0 for x in spread)
    assert sum(x > 0 for x in spread) >= 0.8 * len(spread), f"consensus distances {spread}"
    assert last["consensus_distance"] == 0.0
    assert sum(r["bytes_sent"] for r in gossip) > 0


def test_gossip_job_succeeds_and_serves_its_final_model(local_cluster, tmp_path):
    rounds = 40
    address, _ = local_cluster(3)
    job = _submit(address, rounds, "--min-peers", "3")
    end = _wait(address, job, lambda s: s["state"] in FINISHED, 120, "the end")
    assert end["state"] == "SUCCEEDED", end
    assert end["aggregation"] == "gossip" and end["round"] == rounds
    hist = json.loads(dml("status", "--coordinator", address, job, "--json", "--history").stdout)["history"]
    _check_history(hist, rounds, 3)
    assert sum(r["samples"] for r in hist) == end["samples"]
    assert ledger_problems(hist) == [], "nobody failed: every sample once per pass"
    # The last round is one exact average: every peer holds it, bit for bit, under its digest.
    got = [fetch_peer(tmp_path / "state", a, job, rounds, pid) for pid, a in _peer_ids(tmp_path / "logs").values()]
    assert len(got) == 3 and {g[0] for g in got} == {hist[-1]["digest"]}
    assert_state_dicts_identical([g[1] for g in got])
    # `dml model` serves that model, and it scores what the status says.
    out = tmp_path / "model.pt"
    res = dml("model", "--coordinator", address, job, "-o", str(out))
    assert res.returncode == 0, res.stderr
    model = torch.load(out, weights_only=True)
    assert_state_dicts_identical([got[0][1], model])
    trainer = Trainer(get_task("digits"), 0, 0.1)
    trainer.model.load_state_dict(model)
    acc, _ = trainer.evaluate()
    assert acc == pytest.approx(end["metrics"]["test_accuracy"], abs=1e-6)
    assert acc > 0.7


def test_gossip_job_survives_a_peer_killed_mid_job(procs):
    rounds = 300
    procs.start_coordinator()
    for _ in range(3):
        procs.start_peer("--slowdown", "2")
    wait_for(lambda: len(procs.peer_addresses()) == 3, 90, "3 peers to register")
    job = _submit(procs.address, rounds, "--min-peers", "2")
    address = procs.address
    st = _wait(address, job, lambda s: s["round"] >= 10 or s["state"] in FINISHED, 90, "round 10")
    assert st["state"] == "RUNNING" and len(st["peers"]) == 3 and st["round"] < rounds // 2, f"too late: {st}"
    victim = procs.peers[0]
    (victim_id,) = re.findall(r"dml-peer (\S+) exchanging on", _log_of(procs, 0).read_text())
    assert victim_id in st["peers"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    killed_round = _get(address, job)["round"]
    after = _wait(address, job, lambda s: victim_id not in s["peers"] or s["state"] != "RUNNING", 30,
                  "eviction of the killed peer")
    assert after["state"] == "RUNNING" and len(after["peers"]) == 2, after
    end = _wait(address, job, lambda s: s["state"] in FINISHED, 120, "the end")
    assert end["state"] == "SUCCEEDED", end
    hist = _get(address, job, history=True)["history"]
    _check_history(hist, rounds, 2)
    assert victim_id not in end["peers"]
    # The survivors kept gossiping: every virtual round after the kill committed (the history
    # is checked whole above), and the dead partner cost each survivor at most one failed
    # exchange per step before it was skipped (below, with the count over the whole job). How
    # long those rounds took is no measure of it on a loaded machine.
    assert len(hist) - 1 > killed_round, f"no round committed after the kill (round {killed_round})"
    coord_log = "".join(f.read_text(errors="replace") for f in procs.logs.glob("coordinator-*.log"))
    assert re.search(rf"peer {victim_id}: no heartbeat .* evicting", coord_log), coord_log[-2000:]
    survivors = [(pid, a) for pid, a in procs.peer_addresses().items() if pid != victim_id]
    got = [fetch_peer(procs.state_dir, a, job, rounds, pid) for pid, a in survivors]
    assert len(got) == 2 and {g[0] for g in got} == {hist[-1]["digest"]}
    assert_state_dicts_identical([g[1] for g in got])
    for i in (1, 2):
        text = _log_of(procs, i).read_text(errors="replace")
        assert "Traceback" not in text
        failed = re.findall(rf"step (\d+): exchange with {victim_id} failed \((.+?)\); trying another partner", text)
        tries = len(failed)
        assert tries <= 2, f"survivor {i} tried the dead partner {tries} times"
        steps = [step for step, _ in failed]
        assert len(set(steps)) == len(steps), f"survivor {i} waited on the dead partner twice in one step: {failed}"
        assert all(why.strip() for _, why in failed), failed  # each failure says why (its timeout, a refusal)


def _log_of(procs, i: int) -> pathlib.Path:
    """The log of the ``i``-th peer process started (after one coordinator start)."""
    return procs.logs / f"peer-{i + 2}.log"
