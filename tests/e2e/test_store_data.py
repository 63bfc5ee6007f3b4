"""Jobs on a dataset of the coordinator's store (``dml data put``, ``dml submit --dataset``), with
real processes: peers in folders of their own (data, cache, code: nothing shared) train
``examples/memmap.py`` on data only the store holds.

- Three peers on one job each fetch about their share of the bytes (their shards' rows,
  ``--sharding contiguous``), not the dataset, and the job ends at the accuracy of the same task,
  samples and seed trained from shared storage (three peers reading one folder, in this process).
- A second job, on another dataset: three peers, then a fourth that joins and takes shards from
  them (they keep those in their caches). The joiner is SIGKILLed, then another member: each time
  the dead peer's shards go to the survivors, and each survivor fetches nothing for the shards it
  already caches and about the bytes of those it lacks. The job succeeds with every round
  committed once, the ledger holding and the two last peers bit-identical.
"""
from __future__ import annotations

import contextlib
import json
import pathlib

import numpy as np
import pytest

from dml.client.api import JobClient, history_dict, shards_dict
from dml.client.cluster import LocalCluster, operator_token_file, registrations
from dml.common.datasets import CHUNK_BYTES
from dml.common.spec import JobSpec
from dml.coordinator.ledger import violations
from dml.peer.runner import Peer, PeerConfig
from dml.v1 import types_pb2
from tests.e2e.conftest import DONE, ROOT, SLOW_LEASE, dml, fetch_peer, job_client, wait_status
from tests.integration.helpers import (
    assert_state_dicts_identical,
    coordinator,
    join_token,
    operator_token,
    wait_for,
)

pytestmark = pytest.mark.e2e

TASK = ROOT / "examples" / "memmap.py"
FEATURES, CLASSES = 32, 8  # examples/memmap.py's model
TRAIN, TEST = 480_000, 4_000  # train_x.npy: 61 MB, 15 chunks: a third is five of them
SHARDS = 24
PEERS = 4  # three train job 1; the fourth is held by another job until job 2 has started
JOB1 = dict(rounds=25, local_steps=5, batch_size=64, min_peers=3, max_peers=3, sharding="contiguous", num_shards=SHARDS,
            seed=3)
JOB2 = dict(rounds=160, local_steps=2, batch_size=32, min_peers=2, sharding="contiguous", num_shards=SHARDS, seed=4,
            eval_every_rounds=40, checkpoint_every_rounds=40)  # the kills take about 45 rounds here


def _write(folder: pathlib.Path, seed: int) -> int:
    """The example's sensor readings (its own recipe, more rows) as the four ``.npy`` files it
    reads; returns the bytes of ``train_x.npy``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    patterns = 0.6 * rng.standard_normal((CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, TRAIN + TEST)
    x = np.tanh(patterns[y] + rng.standard_normal((TRAIN + TEST, FEATURES), dtype=np.float32)).astype(np.float32)
    for split, rows in (("train", slice(0, TRAIN)), ("test", slice(TRAIN, None))):
        np.save(folder / f"{split}_x.npy", x[rows])
        np.save(folder / f"{split}_y.npy", y[rows])
    return (folder / "train_x.npy").stat().st_size


def _args(spec: dict) -> list[str]:
    flags = {"rounds": "--rounds", "local_steps": "--local-steps", "batch_size": "--batch-size",
             "min_peers": "--min-peers", "max_peers": "--max-peers", "sharding": "--sharding", "num_shards": "--num-shards", "seed": "--seed",
             "eval_every_rounds": "--eval-every", "checkpoint_every_rounds": "--checkpoint-every"}
    return [a for k, v in spec.items() for a in (flags[k], str(v))]


def _submit(address: str, *extra: str) -> str:
    out = dml("submit", "--coordinator", address, "--task", str(TASK), *extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def _shards(address: str, job: str) -> dict[str, dict]:
    """The job's members by peer id, as ``dml shards JOB --json`` shows them."""
    with job_client(address, 30) as client:
        return {p["peer_id"]: p for p in shards_dict(client.shards(job))["peers"]}


def _fetched(peers: dict[str, dict]) -> dict[str, int]:
    return {pid: (p["data"] or {}).get("bytes_fetched", 0) for pid, p in peers.items()}


def _settled(address: str, job: str, members: set[str] | int) -> dict[str, dict]:
    """Waits until the job's members (these ids, or this many) hold every shard and each holds
    its own in its cache (fetched, or found there), then returns them."""
    got: dict[str, dict] = {}

    def done() -> bool:
        got.clear()
        got.update(_shards(address, job))
        held = sorted(s for p in got.values() for s in p["shards"])
        return ((set(got) == members if isinstance(members, set) else len(got) == members)
                and held == list(range(SHARDS))
                and all(p["data"] and set(p["shards"]) <= set(p["data"]["cached_shards"]) for p in got.values()))

    try:
        wait_for(done, 90, f"members {members} holding every shard in their caches")
    except AssertionError as e:
        raise AssertionError(f"{e}; last seen: {json.dumps(got)[:3000]}") from None
    return got


def _slots(logs: pathlib.Path, n: int) -> dict[str, tuple[int, str]]:
    """peer id -> (its slot, its exchange address), from the peer logs."""
    return {r.peer_id: (i, r.address) for i in range(n) for r in registrations(logs / f"peer-{i}.log")}


def _check_moves(before: dict[str, dict], after: dict[str, dict], x_bytes: int) -> tuple[int, int]:
    """Checks what each survivor fetched for the shards it was given when a member died: nothing
    when it already cached them all, else about their bytes (a run of contiguous shards is its
    rows' chunks, give or take the chunk at each end). Returns (shards that came from a survivor's
    cache, shards fetched)."""
    from_cache = fetched = 0
    for pid, now in after.items():
        was = before[pid]
        new = set(now["shards"]) - set(was["shards"])
        lacked = new - set(was["data"]["cached_shards"])
        grew = now["data"]["bytes_fetched"] - was["data"]["bytes_fetched"]
        from_cache += len(new - lacked)
        fetched += len(lacked)
        if not lacked:
            assert grew == 0, f"{pid} fetched {grew} bytes for shards {sorted(new)} it held in its cache"
        else:
            want, slack = len(lacked) / SHARDS * x_bytes, 2 * CHUNK_BYTES * len(lacked)  # <= 2 edge chunks a run
            assert want - slack <= grew <= want + slack, (pid, sorted(lacked), grew, want)
        print(f"  {pid}: given {sorted(new)}, {len(new) - len(lacked)} of them in its cache, fetched {grew} bytes")
    return from_cache, fetched


def _shared_storage_accuracy(src: pathlib.Path, tmp: pathlib.Path) -> float:
    """JOB1 trained by three in-process peers that all read ``src`` (shared storage)."""
    with coordinator() as srv, contextlib.ExitStack() as stack:
        for i in range(3):
            p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), plan_wait_s=1.0,
                                allow_job_code=True, data_dir=src, code_cache_dir=tmp / f"code-{i}",
                                cache_dir=tmp / f"cache-{i}")).start()
            stack.callback(p.stop)
            p.run_in_thread()
        with JobClient(srv.address, token=operator_token(srv.address)) as client:
            job = client.submit(JobSpec(task=str(TASK), **JOB1))
            wait_for(lambda: client.status(job).job.state in DONE, 120, "the shared-storage run")
            assert client.status(job).job.state == types_pb2.JOB_STATE_SUCCEEDED, client.status(job)
            return history_dict(client.history(job)[-1])["test_accuracy"]


def test_store_jobs_fetch_each_peers_share_and_survivors_fetch_only_what_they_lack(tmp_path, monkeypatch,
                                                                                   cluster_tls):
    src, src_b = tmp_path / "sensors", tmp_path / "sensors-b"
    x_bytes = _write(src, 2024)
    _write(src_b, 7)
    state = tmp_path / "state"
    monkeypatch.setenv("DML_TOKEN_FILE", str(operator_token_file(state)))
    with LocalCluster(state, tmp_path / "logs", coordinator_args=SLOW_LEASE, cwd=ROOT, tls=cluster_tls,
                      allow_job_code=True) as procs:
        address = procs.start_coordinator()
        for name, folder in (("sensors", src), ("sensors-b", src_b)):
            put = dml("data", "put", "--coordinator", address, name, str(folder), timeout=120)
            assert put.returncode == 0, put.stderr
        for i in range(PEERS):
            home = tmp_path / f"peer-{i}"
            (home / "data").mkdir(parents=True)  # empty: the data is only in the store
            procs.start_peer(i, ("--data-dir", str(home / "data"), "--cache-dir", str(home / "cache"),
                                 "--code-cache-dir", str(home / "code"), "--exchange-timeout-s", "10"))

        # 1. Each peer fetches about its third, and the job ends where shared storage does.
        job1 = _submit(address, "--dataset", "sensors", *_args(JOB1))
        end = wait_status(address, job1, lambda s: s["state"] in ("SUCCEEDED", "FAILED"), 180, "job 1 to end")
        assert end["state"] == "SUCCEEDED", end
        acc = end["metrics"]["test_accuracy"]
        fetched = _fetched(_shards(address, job1))
        dataset_bytes = sum(f.stat().st_size for f in src.iterdir())
        print(f"store dataset: {dataset_bytes} bytes; fetched per peer: {fetched}")
        assert len(fetched) == 3
        # At most a third of train_x (its shards' rows: what it trained on, and the rest of them
        # fetched ahead while it trained), give or take the chunk at each end of the run and the
        # header's, plus train_y (one chunk) and the test split for the peer that evaluates.
        rest = dataset_bytes - x_bytes
        for pid, b in fetched.items():
            assert CHUNK_BYTES <= b <= x_bytes / 3 + 3 * CHUNK_BYTES + rest, (pid, b, x_bytes)
        shared = _shared_storage_accuracy(src, tmp_path / "shared")
        print(f"test accuracy: store {acc:.4f}, shared storage {shared:.4f}")
        assert abs(acc - shared) <= 0.01, (acc, shared)

        # 2. Job 2 starts on three peers (the fourth is held by a job that keeps it until it is
        # cancelled); then the fourth joins and takes shards from the others, which keep them cached.
        out = dml("submit", "--coordinator", address, "--task", "digits", "--max-peers", "1", "--rounds", "100000")
        assert out.returncode == 0, out.stderr
        hold = out.stdout.strip().splitlines()[-1]
        (held,) = wait_status(address, hold, lambda s: len(s["peers"]) == 1, 60, "a peer to take the holding job")["peers"]
        job2 = _submit(address, "--dataset", "sensors-b", *_args(JOB2))
        _settled(address, job2, 3)
        assert dml("cancel", "--coordinator", address, hold).returncode == 0
        four = _settled(address, job2, 4)
        assert held in four and four[held]["shards"]
        slots = _slots(procs.log_dir, PEERS)

        # The joiner is SIGKILLed: its shards go back to the peers that gave them, which cache them
        # and fetch nothing for them (placement keeps the load even first: any that go to a peer
        # that never held them are fetched, as _check_moves checks).
        procs.kill_peer(slots[held][0])
        three = _settled(address, job2, set(four) - {held})
        print(f"job 2: {held} killed")
        from_cache, _ = _check_moves(four, three, x_bytes)
        assert from_cache > 0, "the joiner's shards went back to peers that cache them"

        # Then the member whose shards the others cache least: the survivors fetch them.
        victim = max(three, key=lambda p: len(set(three[p]["shards"]) - set().union(
            *(three[q]["data"]["cached_shards"] for q in three if q != p))))
        procs.kill_peer(slots[victim][0])
        two = _settled(address, job2, set(three) - {victim})
        print(f"job 2: {victim} killed")
        _, fetched = _check_moves(three, two, x_bytes)
        assert fetched > 0, "the survivors fetched the shards none of them held"

        end = wait_status(address, job2, lambda s: s["state"] in ("SUCCEEDED", "FAILED"), 240, "job 2 to end")
        assert end["state"] == "SUCCEEDED", end
        out = dml("status", "--coordinator", address, job2, "--json", "--history")
        hist = json.loads(out.stdout)["history"]
        assert [r["round"] for r in hist] == list(range(1, JOB2["rounds"] + 1)), "a round was lost or repeated"
        rounds = [[tuple(x) for m in sorted(r["consumed"]) for x in r["consumed"][m]] for r in hist]
        assert violations(rounds, [TRAIN // SHARDS] * SHARDS) == [], "a sample was trained twice in a pass"
        assert hist[-1]["members"] == len(two)
        got = [fetch_peer(state, slots[p][1], job2, JOB2["rounds"], p) for p in two]
        assert {g[0] for g in got} == {hist[-1]["digest"]}, "the survivors hold the committed model"
        assert_state_dicts_identical([g[1] for g in got])
