"""A job on a dataset of the coordinator's store, with an in-process coordinator and peers: the
data lives only in the store (`dml data put`), the task file reads ``ctx.data_dir``, two peers
with empty data dirs fetch it into their caches and train it to SUCCEEDED; a second job on the
same dataset fetches nothing; a tampered cache chunk is fetched again."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from dml.client import cli
from dml.peer.datacache import manifest_of
from dml.peer.runner import Peer, PeerConfig
from dml.v1 import jobs_pb2, types_pb2
from tests.integration.helpers import coordinator, job_stub, join_token, operator_token, wait_for

FINISHED = (types_pb2.JOB_STATE_SUCCEEDED, types_pb2.JOB_STATE_FAILED, types_pb2.JOB_STATE_CANCELLED)

TASK = '''import numpy as np, torch
import dml


def train(ctx):
    x = np.load(ctx.path("arrays", "x.npy"))
    y = np.loadtxt(ctx.path("labels.csv"), delimiter=",", skiprows=1, dtype=np.int64)
    return dml.ArrayDataset(torch.from_numpy(x), torch.from_numpy(y))


task = dml.Task(model=lambda: torch.nn.Linear(4, 2), train=train, name="stored")
'''


def _dml(capsys: pytest.CaptureFixture[str], address: str, token: pathlib.Path, *args: str) -> str:
    capsys.readouterr()
    code = cli.run([*args, "--coordinator", address, "--token-file", str(token)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip()


def _peer(address: str, root: pathlib.Path) -> Peer:
    (root / "data").mkdir(parents=True)  # empty: the data comes from the store
    p = Peer(PeerConfig(coordinator=address, join_token=join_token(address), allow_job_code=True, plan_wait_s=1.0,
                        exchange_timeout_s=10.0, data_dir=root / "data", code_cache_dir=root / "code",
                        cache_dir=root / "cache")).start()
    p.run_in_thread()
    return p


def _finishes(address: str, jid: str) -> None:
    """Waits for job ``jid`` to finish, and checks that it succeeded (saying why not)."""
    def job() -> jobs_pb2.JobStatus:
        return job_stub(address).GetJob(jobs_pb2.GetJobRequest(job_id=jid), timeout=10).job

    wait_for(lambda: job().state in FINISHED, 60, f"job {jid} to finish")
    got = job()
    assert got.state == types_pb2.JOB_STATE_SUCCEEDED, (types_pb2.JobState.Name(got.state), got.reason)


def test_a_job_on_a_stored_dataset_trains_from_the_peers_caches(tmp_path: pathlib.Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "arrays").mkdir(parents=True)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    np.save(src / "arrays" / "x.npy", (rng.standard_normal((64, 4)) + y[:, None]).astype(np.float32))
    (src / "labels.csv").write_text("label\n" + "".join(f"{v}\n" for v in y))
    task = tmp_path / "submitter" / "stored_task.py"
    task.parent.mkdir()
    task.write_text(TASK)
    with coordinator(tmp_path / "state") as srv:
        token = tmp_path / "operator.token"
        token.write_text(operator_token(srv.address) + "\n")
        token.chmod(0o600)
        _dml(capsys, srv.address, token, "data", "put", "tab", str(src))
        submit = ("submit", "--task", str(task), "--dataset", "tab", "--rounds", "2", "--local-steps", "1",
                  "--batch-size", "8", "--min-peers", "2")
        members = [_peer(srv.address, tmp_path / f"peer{i}") for i in range(2)]
        try:
            jid = _dml(capsys, srv.address, token, *submit)
            _finishes(srv.address, jid)
            manifest = manifest_of(members[0].client.fetch_manifest("tab"))
            for p in members:
                c = p.data_cache.counters
                assert c.chunks_fetched == 2 and c.hits == 0 and c.bytes_fetched == sum(f.size for f in manifest.files)
                folder = p.data_cache.dataset_dir(manifest.digest)
                assert (folder / "labels.csv").read_bytes() == (src / "labels.csv").read_bytes()
                assert (folder / "arrays" / "x.npy").read_bytes() == (src / "arrays" / "x.npy").read_bytes()
                assert list((p.config.data_dir or tmp_path).iterdir()) == []

            jid2 = _dml(capsys, srv.address, token, *submit)
            _finishes(srv.address, jid2)
            for p in members:
                assert p.data_cache.counters.chunks_fetched == 2, "the second job fetched nothing"

            # A tampered chunk in a cache is found when the dataset is assembled again.
            cache = members[0].data_cache
            chunk = cache.chunk_path(manifest.files[0].chunks[0])
            chunk.write_bytes(b"tampered" + chunk.read_bytes()[8:])
            dataset = cache.dataset_dir(manifest.digest)
            (dataset / manifest.files[0].path).unlink()
            assert cache.materialise(manifest, members[0].client.fetch_chunk) == dataset
            assert (cache.counters.damaged, cache.counters.chunks_fetched, cache.counters.hits) == (1, 3, 1)
            assert (dataset / "labels.csv").read_bytes() == (src / "labels.csv").read_bytes()
        finally:
            for p in members:
                p.stop()
