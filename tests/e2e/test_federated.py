"""Federated, peer-local data with real processes (issue 13, must-show 3): four peers each offer
their own CSV (a label-skewed split of the digits, written here) with ``dml-peer --data``, and a
``--placement local`` job trains on all four. The coordinator never receives a sample: no call
of its dataset service is made, its store holds no labels of the job, and the takes gave label
counts only. One peer is SIGKILLed mid-job: its data leaves with it, the job goes on and
succeeds on three, ``dml status`` says how much of the data is still present, and each peer's
own samples were used exactly once per pass in the committed rounds."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import sqlite3
import ssl
import time
import urllib.request

import pytest

from dml.client.cluster import LocalCluster, operator_token_file
from dml.coordinator.ledger import violations
from tests.e2e.conftest import FAST_FAILURES, ROOT, dml, env_tls, job_client, wait_status

pytestmark = pytest.mark.e2e
NAME = "digits-csv"
ROUNDS = 60
TASK = ROOT / "examples" / "digits_csv.py"


def _example():
    spec = importlib.util.spec_from_file_location("dml_example_digits_csv", TASK)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rpc_counts(log: pathlib.Path) -> dict[str, float]:
    """The coordinator's ``dml_rpcs_total`` by method (OK or not), scraped from the endpoint its
    log names."""
    m = re.search(r"metrics on (\S+)", log.read_text())
    assert m, "the coordinator logged no metrics endpoint"
    tls = env_tls()
    assert tls is not None
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    with urllib.request.urlopen(m.group(1).replace("127.0.0.1", "localhost"), timeout=10, context=ctx) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for method, value in re.findall(r'^dml_rpcs_total\{[^}]*method="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        out[method] = out.get(method, 0.0) + float(value)
    return out


def test_four_peers_train_on_their_own_csvs_and_the_job_succeeds_on_three_after_one_is_killed(
        tmp_path, monkeypatch, cluster_tls) -> None:
    folders = _example().write_split(tmp_path / "data", 4)
    rows = [sum(1 for _ in open(f / "train.csv")) - 1 for f in folders]
    state = tmp_path / "state"
    monkeypatch.setenv("DML_TOKEN_FILE", str(operator_token_file(state)))
    with LocalCluster(state, tmp_path / "logs", coordinator_args=(*FAST_FAILURES, "--metrics-port", "0"),
                      cwd=ROOT, tls=cluster_tls) as procs:
        address = procs.start_coordinator()
        for i, f in enumerate(folders):
            procs.start_peer(i, ("--data", f"{NAME}={f}"))
        with job_client(address, 30) as client:  # registered, each naming its dataset (never its path)
            deadline = time.monotonic() + 120
            while len(client.peers()) < 4:
                assert time.monotonic() < deadline, "the four peers did not register"
                time.sleep(0.2)
        listed = dml("peers", "--coordinator", address, "--json")
        assert listed.returncode == 0, listed.stderr
        peers = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
        assert len(peers) == 4 and all(p["local_datasets"] == [NAME] for p in peers), peers
        assert str(tmp_path) not in listed.stdout
        refused = dml("submit", "--coordinator", address, "--task", str(TASK), "--placement", "local",
                      "--local-data", NAME, "--sharding", "classes:2")
        assert refused.returncode == 2 and "--sharding" in refused.stderr and "Traceback" not in refused.stderr
        out = dml("submit", "--coordinator", address, "--task", str(TASK), "--placement", "local",
                  "--local-data", NAME, "--rounds", str(ROUNDS), "--min-peers", "3", "--local-steps", "4",
                  "--eval-every", "5", "--checkpoint-every", "5")
        assert out.returncode == 0, out.stderr
        job = out.stdout.strip().splitlines()[-1]

        both = wait_status(address, job, lambda s: len(s["peers"]) == 4 and s["round"] >= 5, 120,
                           "all four peers training")
        procs.kill_peer(3)  # SIGKILL at once (rounds are short): its data goes with it
        assert both["data_present"]["peers"] == 4 and both["data_present"]["fraction"] == 1.0, both
        assert both["round"] < ROUNDS - 20, "the job was nearly done before the kill"
        end = wait_status(address, job, lambda s: s["state"] in ("SUCCEEDED", "FAILED"), 180, "the end")
        assert end["state"] == "SUCCEEDED", end
        present = end["data_present"]
        assert present["peers"] == 3 and present["seen_peers"] == 4, present
        assert present["seen_samples"] == sum(rows) and present["samples"] == sum(rows[:3]), (present, rows)
        text = dml("status", "--coordinator", address, job).stdout
        pct = f"{sum(rows[:3]) / sum(rows):.0%}"
        assert f"data present {pct} ({sum(rows[:3])} of {sum(rows)} samples, 3 of 4 peers)" in text, text

        hist = json.loads(dml("status", "--coordinator", address, job, "--json", "--history").stdout)["history"]
        assert [r["round"] for r in hist] == list(range(1, ROUNDS + 1))
        shards = json.loads(dml("shards", "--coordinator", address, job, "--json").stdout)
        sizes = {s: p["samples"] for p in shards["peers"] for s in p["shards"]}
        assert sorted(sizes.values()) == sorted(rows[:3]) and len(shards["unassigned"]) == 1, shards
        sizes[shards["unassigned"][0]] = rows[3]
        assert all(sum(p["label_counts"]) == p["samples"] for p in shards["peers"]), shards  # counts, never labels
        rounds = [[tuple(x) for m in sorted(r["consumed"]) for x in r["consumed"][m]] for r in hist]
        assert violations(rounds, [sizes[s] for s in range(4)]) == []
        assert {x[0] for r in rounds[-5:] for x in r} == set(sizes) - set(shards["unassigned"])

        assert procs.coordinator is not None
        calls = _rpc_counts(procs.coordinator.log)
        assert calls.get("/dml.v1.PeerControl/TakeJob", 0) >= 4, calls
        assert not [m for m in calls if m.startswith("/dml.v1.DataService/")], calls
        acc = end["metrics"]["test_accuracy"]
        print(f"federated digits, 4 peers then 3: final test accuracy {acc:.4f} "
              f"(data present {present['fraction']:.0%})")
        assert acc > 0.85, end

    db = sqlite3.connect(state / "coordinator.db")
    try:
        labels = db.execute("SELECT body FROM labels WHERE job_id = ?", (job,)).fetchall()
    finally:
        db.close()
    assert all(not row[0] for row in labels), "the coordinator stored labels of a local job"
