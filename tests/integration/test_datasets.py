"""The dataset store over gRPC with an in-process coordinator: `dml data put/ls/rm` in-process,
uploads that repeat for free and resume after the coordinator stopped mid-upload, the read side
(GetDataset, GetChunk) a registered peer may call, who may call what, and hostile requests."""
from __future__ import annotations

import json
import os
import pathlib

import grpc
import pytest

from dml.client import cli
from dml.client.api import ApiError
from dml.client.data import DataClient, scan
from dml.common import auth, rpc
from dml.common.datasets import CHUNK_BYTES, chunk_digest
from dml.coordinator.server import CoordinatorServer, ServerConfig
from dml.v1 import control_pb2, control_pb2_grpc, data_pb2, data_pb2_grpc
from dml.common.version import PROTOCOL_VERSION
from tests.integration.helpers import _SERVERS, FAST, coordinator, join_token, operator_token, track


def _source(root: pathlib.Path) -> pathlib.Path:
    """A dataset folder: 4 files, 5 chunks of which 4 distinct (``copy`` repeats a chunk of ``big``)."""
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    big = os.urandom(CHUNK_BYTES + 1000)
    (src / "big.bin").write_bytes(big)
    (src / "copy.bin").write_bytes(big[:CHUNK_BYTES] + b"tail")
    (src / "sub" / "small.csv").write_bytes(b"x,y\n1,2\n")
    (src / "sub" / "empty").write_bytes(b"")
    return src


def _stub(address: str, token: str) -> data_pb2_grpc.DataServiceStub:
    ch = rpc.channel(address)
    return data_pb2_grpc.DataServiceStub(auth.with_token(ch, token) if token else ch)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def _token_file(tmp_path: pathlib.Path, address: str) -> pathlib.Path:
    f = tmp_path / "operator.token"
    f.write_text(operator_token(address) + "\n")
    f.chmod(0o600)
    return f


def _dml(capsys: pytest.CaptureFixture[str], address: str, token: pathlib.Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.run([*args, "--coordinator", address, "--token-file", str(token)])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str) -> str:
    """The CLI's error: one line starting 'dml: ', the last it wrote, and no traceback."""
    lines = err.splitlines()
    assert lines and lines[-1].startswith("dml: ") and sum(x.startswith("dml: ") for x in lines) == 1, err
    assert "Traceback" not in err, err
    return lines[-1]


def _fetched(stub: data_pb2_grpc.DataServiceStub, name: str) -> dict[str, bytes]:
    """Every file of dataset ``name`` as a peer would read it: the manifest, then each chunk."""
    man = stub.GetDataset(data_pb2.GetDatasetRequest(name=name), timeout=10)
    out = {}
    for f in man.files:
        parts = []
        for d in f.chunks:
            got = stub.GetChunk(data_pb2.GetChunkRequest(digest=d), timeout=10)
            assert got.digest == d and chunk_digest(got.data) == d
            parts.append(got.data)
        out[f.path] = b"".join(parts)
    return out


def _expected(src: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}


def test_put_ls_rm_through_the_cli_repeat_for_free_survive_a_restart_and_rm_waits_for_jobs(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _source(tmp_path)
    state = tmp_path / "state"
    with coordinator(state) as srv:
        token = _token_file(tmp_path, srv.address)
        code, out, err = _dml(capsys, srv.address, token, "data", "put", "mnist", str(src))
        assert code == 0, err
        assert "sent 4 chunks (4.0 MiB)" in err and "skipped 0" in err, err
        assert f"digest {scan([src]).digest}" in out
        code, out, err = _dml(capsys, srv.address, token, "data", "put", "mnist", str(src))
        assert code == 0 and "sent 0 chunks (0 B), skipped 4" in err and "already committed, unchanged" in out, err
    with coordinator(state) as srv:  # a restart keeps it
        code, out, err = _dml(capsys, srv.address, token, "data", "ls", "--json")
        assert code == 0, err
        (ds,) = json.loads(out)
        assert ds["name"] == "mnist" and ds["files"] == 4 and ds["chunks"] == 4
        assert ds["bytes"] == sum(len(b) for b in _expected(src).values()) and ds["digest"] == scan([src]).digest
        assert _dml(capsys, srv.address, token, "data", "ls")[1].splitlines()[1].startswith("mnist ")
        assert _fetched(_stub(srv.address, operator_token(srv.address)), "mnist") == _expected(src)

        code, _, err = _dml(capsys, srv.address, token, "submit", "--dataset", "nope", "--min-peers", "2")
        assert code == 2 and "dataset nope" in _one_error(err) and "dml data put" in err, err
        code, out, err = _dml(capsys, srv.address, token, "submit", "--dataset", "mnist", "--min-peers", "2")
        assert code == 0, err
        jid = out.strip()
        code, _, err = _dml(capsys, srv.address, token, "data", "rm", "mnist")
        assert code == 2 and "in use" in _one_error(err) and jid in err, err
        assert _dml(capsys, srv.address, token, "cancel", jid)[0] == 0
        code, out, err = _dml(capsys, srv.address, token, "data", "rm", "mnist")
        assert code == 0 and "4 chunks deleted" in out, err
        assert list((state / "data" / "chunks").iterdir()) == []
        assert _dml(capsys, srv.address, token, "data", "ls", "--json")[1].strip() == "[]"
        code, _, err = _dml(capsys, srv.address, token, "data", "rm", "mnist")
        assert code == 2 and "no dataset mnist" in _one_error(err)


def test_an_upload_cut_short_by_a_stopped_coordinator_resumes_sending_only_what_is_missing(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _source(tmp_path)
    state = tmp_path / "state"
    cfg = ServerConfig(host="127.0.0.1", port=0, state_dir=state, timing=FAST)
    srv = track(CoordinatorServer(cfg).start())
    token = _token_file(tmp_path, srv.address)
    sent: list[str] = []

    def stop_after_two(digest: str, size: int) -> None:
        sent.append(digest)
        if len(sent) == 2:
            srv.stop(0.2)  # the connection breaks between chunks

    with DataClient(srv.address, 10, token=operator_token(srv.address)) as c, \
            pytest.raises(ApiError, match="cannot reach"):
        c.put("resumed", scan([src]), on_chunk=stop_after_two)
    assert len(sent) == 2
    _SERVERS.pop(srv.address, None)
    with coordinator(state) as srv2:
        code, out, err = _dml(capsys, srv2.address, token, "data", "put", "resumed", str(src))
        assert code == 0 and "sent 2 chunks" in err and "skipped 2 already" in err, err
        assert _fetched(_stub(srv2.address, operator_token(srv2.address)), "resumed") == _expected(src)


def test_who_may_call_what_and_hostile_requests_are_refused(tmp_path: pathlib.Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with coordinator(max_dataset_bytes=10) as srv:
        op = _stub(srv.address, operator_token(srv.address))
        reg = control_pb2_grpc.PeerControlStub(auth.with_token(rpc.channel(srv.address), join_token(srv.address)))
        peer_token = reg.RegisterPeer(control_pb2.RegisterPeerRequest(protocol_version=PROTOCOL_VERSION, address="127.0.0.1:9", public_key=b"k" * 32),
                                      timeout=10).peer_token
        peer, anon = _stub(srv.address, peer_token), _stub(srv.address, "")
        joiner = _stub(srv.address, join_token(srv.address))
        d = chunk_digest(b"abc")
        put = data_pb2.PutChunkRequest(digest=d, data=b"abc")
        assert op.PutChunk(put, timeout=10).stored and not op.PutChunk(put, timeout=10).stored
        commit = data_pb2.CommitDatasetRequest(name="tiny", files=[data_pb2.DatasetFile(path="a", size=3, chunks=[d])])
        assert op.CommitDataset(commit, timeout=10).created

        # The read side takes a registered peer's credential; the rest only the operator's.
        assert peer.GetChunk(data_pb2.GetChunkRequest(digest=d), timeout=10).data == b"abc"
        assert peer.GetDataset(data_pb2.GetDatasetRequest(name="tiny"), timeout=10).dataset.bytes == 3
        for call in (lambda s: s.PutChunk(put, timeout=10), lambda s: s.CommitDataset(commit, timeout=10),
                     lambda s: s.ListDatasets(data_pb2.ListDatasetsRequest(), timeout=10),
                     lambda s: s.RemoveDataset(data_pb2.RemoveDatasetRequest(name="tiny"), timeout=10),
                     lambda s: s.HaveChunks(data_pb2.HaveChunksRequest(digests=[d]), timeout=10)):
            assert _code(lambda: call(peer)) == grpc.StatusCode.PERMISSION_DENIED  # noqa: B023
            assert _code(lambda: call(anon)) == grpc.StatusCode.UNAUTHENTICATED  # noqa: B023
            assert _code(lambda: call(joiner)) == grpc.StatusCode.UNAUTHENTICATED  # noqa: B023
        for s in (anon, joiner):
            assert _code(lambda: s.GetChunk(data_pb2.GetChunkRequest(digest=d), timeout=10)) == \
                grpc.StatusCode.UNAUTHENTICATED  # noqa: B023

        # Hostile bytes: a chunk whose digest lies, one over 4 MiB, path-like names, unknowns.
        bad = grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: op.PutChunk(data_pb2.PutChunkRequest(digest=chunk_digest(b"x"), data=b"y"),
                                         timeout=10)) == bad
        huge = b"\0" * (CHUNK_BYTES + 1)
        assert _code(lambda: op.PutChunk(data_pb2.PutChunkRequest(digest=chunk_digest(huge), data=huge),
                                         timeout=10)) == bad
        assert _code(lambda: op.GetChunk(data_pb2.GetChunkRequest(digest="../../secrets/operator.token"),
                                         timeout=10)) == bad
        assert _code(lambda: op.HaveChunks(data_pb2.HaveChunksRequest(digests=["0" * 64] * 4097), timeout=10)) == bad
        for name, path in (("../up", "a"), ("ok", "../../escape"), ("ok", "/abs")):
            req = data_pb2.CommitDatasetRequest(name=name, files=[data_pb2.DatasetFile(path=path, size=3, chunks=[d])])
            assert _code(lambda: op.CommitDataset(req, timeout=10)) == bad  # noqa: B023
        missing = data_pb2.CommitDatasetRequest(name="other", files=[
            data_pb2.DatasetFile(path="a", size=3, chunks=[chunk_digest(b"never sent")])])
        assert _code(lambda: op.CommitDataset(missing, timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION
        assert _code(lambda: peer.GetChunk(data_pb2.GetChunkRequest(digest=chunk_digest(b"nope")),
                                           timeout=10)) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: peer.GetDataset(data_pb2.GetDatasetRequest(name="unknown"),
                                             timeout=10)) == grpc.StatusCode.NOT_FOUND

        # Over the coordinator's --max-dataset-bytes (10 here): RESOURCE_EXHAUSTED before any
        # chunk travels, and the CLI says so in one line, exit 2; at commit too.
        src = tmp_path / "eleven.bin"
        src.write_bytes(b"e" * 11)
        token = _token_file(tmp_path, srv.address)
        code, _, err = _dml(capsys, srv.address, token, "data", "put", "big", str(src))
        assert code == 2 and _one_error(err).endswith("(dml-coordinator --max-dataset-bytes)"), err
        assert srv.coordinator.data.stored_bytes == 3, "no chunk of the refused dataset was sent"
        eleven = data_pb2.PutChunkRequest(digest=chunk_digest(b"e" * 11), data=b"e" * 11)
        assert op.PutChunk(eleven, timeout=10).stored
        over = data_pb2.CommitDatasetRequest(name="big", files=[
            data_pb2.DatasetFile(path="e", size=11, chunks=[eleven.digest])])
        assert _code(lambda: op.CommitDataset(over, timeout=10)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, _, err = _dml(capsys, srv.address, token, "data", "put", "../x", str(src))
        assert code == 2 and "dataset name" in _one_error(err), err
        code, _, err = _dml(capsys, srv.address, token, "data", "put", "x", str(tmp_path / "absent"))
        assert code == 2 and "no such file" in _one_error(err), err
