"""``--sync grads`` as users run it: peer processes, the dml CLI, a CNN trained with Adam."""
from __future__ import annotations

import pytest

from tests.e2e.conftest import dml, fetch_peer, wait_status
from tests.e2e.test_processes import _history, _peer_addresses
from tests.integration.helpers import assert_state_dicts_identical

pytestmark = pytest.mark.e2e


def test_a_grads_job_commits_with_bit_identical_peers_and_bad_combinations_exit_2(local_cluster, tmp_path):
    address, _ = local_cluster(3)
    for args, words in ((["--aggregation", "gossip"], "--sync grads needs the ring"),
                        (["--codec", "int8"], "--sync grads all-reduces gradients in fp32")):
        out = dml("submit", "--coordinator", address, "--sync", "grads", *args)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1, out.stderr
    sub = dml("submit", "--coordinator", address, "--task", "digits-cnn", "--sync", "grads", "--rounds", "8",
              "--local-steps", "4", "--batch-size", "16", "--min-peers", "3", "--checkpoint-every", "8")
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().splitlines()[-1]
    end = wait_status(address, job, lambda s: s["state"] in ("SUCCEEDED", "FAILED"), 180, "the end")
    assert end["state"] == "SUCCEEDED", end
    assert end["sync"] == "grads"
    hist = _history(address, job)
    assert [r["members"] for r in hist] == [3] * 8
    assert hist[-1]["test_accuracy"] > hist[0]["test_accuracy"]
    addrs = _peer_addresses(tmp_path / "logs")
    got = [fetch_peer(tmp_path / "state", a, job, 8, pid) for pid, a in addrs.values()]
    assert {g[0] for g in got} == {end["metrics"]["digest"]}
    assert_state_dicts_identical([g[1] for g in got])
