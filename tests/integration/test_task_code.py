"""Task code sent with a job, over a real coordinator: kept under STATE_DIR/code/<sha256> once,
fetched by a registered peer (its own token) and imported there, still served after a restart;
refused over the coordinator's limit (RESOURCE_EXHAUSTED), for a digest that is not the bundle's
(INVALID_ARGUMENT), and not served for a digest the job does not name (NOT_FOUND)."""
from __future__ import annotations

import pathlib

import grpc
import pytest

from dml.client.api import BAD_INPUT, FINISHED, STATE_NAMES, ApiError, JobClient, pack_task
from dml.common import taskcode
from dml.common.spec import JobSpec, spec_to_pb
from dml.peer.runner import Peer, PeerConfig
from dml.peer.taskload import ALLOW_HINT, load_task
from tests.integration.helpers import coordinator, join_token, operator_token, wait_for

TASK = "import dml, torch\n\ntask = dml.Task(model=lambda: torch.nn.Linear(2, 2), train=lambda ctx: [], name='shipped')\n"


def _task_file(tmp_path: pathlib.Path, src: str = TASK) -> pathlib.Path:
    d = tmp_path / "submitter"
    d.mkdir(exist_ok=True)
    (d / "shipped_task.py").write_text(src)
    return d / "shipped_task.py"


def _peer(address: str, tmp_path: pathlib.Path) -> Peer:
    return Peer(PeerConfig(coordinator=address, join_token=join_token(address), allow_job_code=True,
                           code_cache_dir=tmp_path / "peer-cache", data_dir=tmp_path)).start()


def test_task_code_is_kept_once_fetched_by_a_peer_and_survives_a_restart(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    spec, code = pack_task(JobSpec(task=str(_task_file(tmp_path)), rounds=1, min_peers=5))
    assert spec.task == "shipped_task.py" and spec.task_digest == taskcode.digest_of(code)
    kept = state / "code" / spec.task_digest
    with coordinator(state) as srv:
        with JobClient(srv.address, token=operator_token(srv.address)) as c:
            jid = c.submit(spec, code)
            assert kept.read_bytes() == code
            stamp = kept.stat().st_mtime_ns
            again = c.submit(JobSpec(task=str(_task_file(tmp_path)), rounds=1, min_peers=5))  # packed by the client
            assert again != jid and kept.stat().st_mtime_ns == stamp  # nothing new stored
            assert c.status(again).job.spec.task_digest == spec.task_digest
        peer = _peer(srv.address, tmp_path)
        try:
            task = load_task(peer, jid, spec_to_pb(spec))
            assert task.name == "shipped"
            assert (tmp_path / "peer-cache" / f"{spec.task_digest}.zip").read_bytes() == code
            with pytest.raises(grpc.RpcError) as e:
                peer.client.stub.FetchTaskCode(_fetch(peer.peer_id, jid, "0" * 64), timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "has no task code" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                peer.client.stub.FetchTaskCode(_fetch("someone-else", jid, spec.task_digest), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            peer.stop()
    with coordinator(state) as srv:  # restarted on the same state dir
        peer = _peer(srv.address, tmp_path / "fresh")
        try:
            resp = peer.client.stub.FetchTaskCode(_fetch(peer.peer_id, jid, spec.task_digest), timeout=10)
            assert resp.bundle == code
        finally:
            peer.stop()


def _fetch(peer_id: str, job_id: str, digest: str):  # type: ignore[no-untyped-def]
    from dml.v1 import control_pb2

    return control_pb2.FetchTaskCodeRequest(peer_id=peer_id, job_id=job_id, digest=digest)


def test_code_over_the_limit_or_with_another_digest_is_refused(tmp_path: pathlib.Path) -> None:
    spec, code = pack_task(JobSpec(task=str(_task_file(tmp_path)), rounds=1))
    with coordinator(tmp_path / "state", max_task_code_bytes=len(code) - 1) as srv, \
            JobClient(srv.address, token=operator_token(srv.address)) as c:
        with pytest.raises(ApiError, match=f"task code is {len(code)} bytes, over this coordinator's limit") as e:
            c.submit(spec, code)
        assert e.value.code == BAD_INPUT
        wrong = taskcode.pack_files({"shipped_task.py": b"task = 2\n"})
        with pytest.raises(ApiError, match="invalid job: task code's sha256 is") as e:
            c.submit(spec, wrong)
        assert e.value.code == BAD_INPUT
        with pytest.raises(ApiError, match="none came with it"):
            c.submit(spec, b"")
        with pytest.raises(ApiError, match="is not a task file"):
            c.submit(JobSpec(task="digits", rounds=1), code)
        assert not (tmp_path / "state" / "code").exists() or not any((tmp_path / "state" / "code").iterdir())


def test_a_peer_without_allow_job_code_declines_saying_how_and_the_job_runs_on_the_others(tmp_path: pathlib.Path) -> None:
    src = ("import dml, torch\n\n"
           "x = torch.randn(64, 3)\n"
           "task = dml.Task(model=lambda: torch.nn.Linear(3, 2), train=lambda ctx: dml.ArrayDataset(x, (x[:, 0] > 0).long()))\n")
    with coordinator(tmp_path / "state") as srv:
        started = []
        try:
            for allow in (False, True):
                p = Peer(PeerConfig(coordinator=srv.address, join_token=join_token(srv.address), allow_job_code=allow,
                                    plan_wait_s=1.0, data_dir=tmp_path)).start()
                p.run_in_thread()
                started.append(p)
            refuser = started[0].peer_id
            with JobClient(srv.address, token=operator_token(srv.address)) as c:
                jid = c.submit(JobSpec(task=str(_task_file(tmp_path, src)), rounds=3, local_steps=2, batch_size=8,
                                       num_shards=4))
                wait_for(lambda: STATE_NAMES[c.status(jid).job.state] in FINISHED, 60, "the job to end")
                st = c.status(jid).job
        finally:
            for p in started:
                p.stop()
    assert STATE_NAMES[st.state] == "SUCCEEDED", st.reason
    assert [(x.peer_id, x.reason) for x in st.declined] == [(refuser, ALLOW_HINT)]
    assert refuser not in st.epochs[-1].peers

