"""The product as users run it: separate processes for the coordinator, peers and the CLI."""
from __future__ import annotations

import json
import pathlib
import re
import signal
from typing import Iterator

import pytest
import torch

from dml.client.cluster import LocalCluster
from tests.e2e.conftest import FAST_FAILURES, ROOT, _print_tracebacks, dml, fetch_peer, wait_status
from tests.integration.helpers import assert_state_dicts_identical, ledger_problems

pytestmark = pytest.mark.e2e


def _peer_addresses(logs) -> dict[int, tuple[str, str]]:
    """Peer index (its log file peer-I.log) -> (peer id, exchange address), from the peers' logs."""
    out = {}
    for log in logs.glob("peer-*.log"):
        m = re.search(r"dml-peer (\S+) exchanging on (\S+)", log.read_text())
        if m:
            out[int(log.stem.split("-")[1])] = (m.group(1), m.group(2))
    return out


def _history(address: str, job: str) -> list[dict]:
    out = dml("status", "--coordinator", address, job, "--json", "--history")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["history"]


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory, cluster_tls) -> Iterator[tuple[str, pathlib.Path]]:
    """A coordinator and 3 peer processes for the tests here that leave them as they found them
    (idle, after a job that ran to its end): (address, the folder holding state/ and logs/)."""
    root = tmp_path_factory.mktemp("shared")
    with pytest.MonkeyPatch.context() as mp, LocalCluster(root / "state", root / "logs", coordinator_args=FAST_FAILURES,
                                                          cwd=ROOT, tls=cluster_tls) as c:
        mp.setenv("DML_TOKEN_FILE", str(c.operator_token_file))  # for the `dml` commands and status polls
        address = c.start_coordinator()
        for i in range(3):
            c.start_peer(i)
        yield address, root
    _print_tracebacks(root / "logs", 4000)


def test_submit_status_and_bit_identical_peers(shared_cluster, tmp_path):
    address, root = shared_cluster
    sub = dml("submit", "--coordinator", address, "--rounds", "40", "--local-steps", "5", "--min-peers", "3",
              "--checkpoint-every", "20")
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"job-\S+", job)
    seen = wait_status(address, job, lambda s: s["state"] in ("RUNNING", "SUCCEEDED"), 60, "RUNNING")
    assert seen["state"] == "RUNNING", "the job should be observed running before it ends"
    end = wait_status(address, job, lambda s: s["state"] == "SUCCEEDED", 120, "SUCCEEDED")
    assert end["round"] == end["rounds"] == 40
    assert end["metrics"]["test_accuracy"] > 0.8
    for key in ("job_id", "state", "round", "rounds", "peers"):
        assert key in end
    # Download the committed parameters from every peer process and compare bit for bit.
    addrs = _peer_addresses(root / "logs")
    assert len(addrs) == 3
    got = [fetch_peer(root / "state", a, job, 40, pid) for pid, a in addrs.values()]
    assert {g[0] for g in got} == {end["metrics"]["digest"]}
    assert_state_dicts_identical([g[1] for g in got])
    # `dml model` saves the same parameters as a torch state_dict.
    out = tmp_path / "model.pt"
    res = dml("model", "--coordinator", address, job, "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert_state_dicts_identical([got[0][1], torch.load(out, weights_only=True)])
    jobs = dml("jobs", "--coordinator", address)
    assert job in jobs.stdout and "SUCCEEDED" in jobs.stdout


def test_killed_peer_is_evicted_its_shards_move_and_job_succeeds(local_cluster, tmp_path):
    address, procs = local_cluster(3)
    # 60 rounds of 10 steps are over 5 passes over the data on two peers: enough for the ledger's
    # passes to be checked across the eviction (data_epoch > 2 below).
    rounds = 60
    sub = dml("submit", "--coordinator", address, "--rounds", str(rounds), "--local-steps", "10", "--min-peers", "2")
    job = sub.stdout.strip().splitlines()[-1]
    wait_status(address, job, lambda s: len(s["peers"]) == 3 and s["round"] >= 5, 60, "3 peers training")
    victim = procs[1]  # procs[0] is the coordinator, procs[1 + i] writes peer-i.log
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    st = wait_status(address, job, lambda s: len(s["peers"]) == 2, 15, "eviction of the killed peer")
    assert st["state"] == "RUNNING"
    end = wait_status(address, job, lambda s: s["state"] in ("SUCCEEDED", "FAILED"), 180, "the end")
    assert end["state"] == "SUCCEEDED", end
    hist = _history(address, job)
    assert [r["round"] for r in hist] == list(range(1, rounds + 1)), "no committed round lost or repeated"
    assert hist[-1]["members"] == 2
    assert ledger_problems(hist) == [], "every sample used exactly once per data epoch"
    assert hist[-1]["data_epoch"] > 2
    survivors = [(pid, a) for i, (pid, a) in _peer_addresses(tmp_path / "logs").items() if i != 0]
    got = [fetch_peer(tmp_path / "state", a, job, rounds, pid) for pid, a in survivors]
    assert len(got) == 2
    assert len({g[0] for g in got}) == 1
    assert_state_dicts_identical([g[1] for g in got])




def test_plot_of_a_finished_job(shared_cluster, tmp_path):
    address, _ = shared_cluster
    job = dml("submit", "--coordinator", address, "--rounds", "15", "--local-steps", "3", "--min-peers", "2"
              ).stdout.strip().splitlines()[-1]
    wait_status(address, job, lambda s: s["state"] == "SUCCEEDED", 90, "SUCCEEDED")
    out = dml("plot", "--coordinator", address, job, "-o", str(tmp_path / "curve.png"))
    assert out.returncode == 0, out.stderr
    assert "saved 15 rounds" in out.stdout
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
