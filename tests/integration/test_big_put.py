"""A big `dml data put` across a coordinator restart (issue 13, must-show 4): the upload is cut
after half its chunks by stopping the in-process coordinator, the coordinator starts again on
the same state dir, and the repeated put sends only the chunks that had not arrived; every chunk
file on disk hashes to its name, none is duplicated, and the manifest's digest is the client's.

The size is ``DML_TEST_PUT_BYTES``, 1 GiB by default: 16 s of test here (2 cores shared with
other work: about 7 s for each half, most of it the store's synced 4 MiB writes, plus the scan
and the checks); ``DML_TEST_PUT_BYTES=268435456`` makes it 6 s. The source file is sparse (each
chunk differs only in its first bytes), so it costs no disk here; the store really writes every
byte, and the test deletes them."""
from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import time

import pytest

from dml.client.api import ApiError
from dml.client.data import DataClient, scan
from dml.common.datasets import CHUNK_BYTES
from dml.coordinator.server import CoordinatorServer, ServerConfig
from tests.integration.helpers import _SERVERS, FAST, coordinator, operator_token, track
from tests.integration.test_datasets import _dml, _token_file

PUT_BYTES = int(os.environ.get("DML_TEST_PUT_BYTES", str(1 << 30)))
PUT_CHUNK = "/dml.v1.DataService/PutChunk"


def _sparse_source(folder: pathlib.Path, size: int) -> pathlib.Path:
    """A file of ``size`` bytes whose chunks all differ (a distinct header at each chunk's start,
    holes elsewhere): as many distinct chunks as the file has."""
    folder.mkdir()
    path = folder / "big.bin"
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(0, size, CHUNK_BYTES):
            f.seek(i)
            f.write(f"chunk {i // CHUNK_BYTES:08d} of a big dataset\n".encode()[: size - i])
    return folder


def _put_calls(srv: CoordinatorServer) -> int:
    """PutChunk calls the coordinator answered OK (its dml_rpcs_total counter)."""
    return int(srv.metrics.registry.get_sample_value("dml_rpcs_total", {"method": PUT_CHUNK, "code": "OK"}) or 0)


def _chunk_files(state: pathlib.Path) -> dict[str, str]:
    """Every file in the store's chunk folder: name -> sha256 of its bytes."""
    out = {}
    for p in (state / "data" / "chunks").iterdir():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        out[p.name] = h.hexdigest()
    return out


@pytest.mark.skipif(PUT_BYTES < 2 * CHUNK_BYTES, reason="DML_TEST_PUT_BYTES must hold at least two chunks")
def test_a_big_put_cut_by_a_coordinator_restart_resumes_without_resending_or_damaging_a_chunk(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    src = _sparse_source(tmp_path / "src", PUT_BYTES)
    state = tmp_path / "state"
    try:
        upload = scan([src])
        n = -(-PUT_BYTES // CHUNK_BYTES)
        assert len(upload.pieces) == n, "every chunk differs"
        half = n // 2

        srv = track(CoordinatorServer(ServerConfig(host="127.0.0.1", port=0, state_dir=state, timing=FAST)).start())
        token = _token_file(tmp_path, srv.address)
        first: list[str] = []

        def stop_at_half(digest: str, size: int) -> None:
            first.append(digest)
            if len(first) == half:  # deterministic: after exactly `half` chunks the coordinator is gone
                srv.stop(0.2)

        with DataClient(srv.address, 30, token=operator_token(srv.address)) as c, \
                pytest.raises(ApiError, match="cannot reach"):
            c.put("big", upload, on_chunk=stop_at_half)
        _SERVERS.pop(srv.address, None)
        assert len(first) == half and _put_calls(srv) == half
        on_disk = _chunk_files(state)
        assert sorted(on_disk) == sorted(first) and all(name == h for name, h in on_disk.items())
        # What a coordinator killed in the middle of a chunk's write leaves: a partial temp file.
        leftover = state / "data" / "chunks" / f".{upload.files[0].chunks[half]}.dead.tmp"
        leftover.write_bytes(b"partial")
        t_cut = time.monotonic()

        with coordinator(state) as srv2:
            code, out, err = _dml(capsys, srv2.address, token, "data", "put", "big", str(src))
            assert code == 0, err
            assert f"sent {n - half} chunks" in err and f"skipped {half} already" in err, err
            assert _put_calls(srv2) == n - half, "the chunks stored before the restart were not sent again"
            code, ls, err = _dml(capsys, srv2.address, token, "data", "ls", "--json")
            assert code == 0, err
        t_put = time.monotonic()

        on_disk = _chunk_files(state)
        manifest_chunks = {d for f in upload.files for d in f.chunks}
        assert not leftover.exists()
        assert all(name == h for name, h in on_disk.items()), "every chunk file hashes to its name"
        assert set(on_disk) == manifest_chunks and len(on_disk) == n, "no chunk missing, none extra or twice"
        assert sum((state / "data" / "chunks" / d).stat().st_size for d in on_disk) == PUT_BYTES
        assert f'"digest": "{upload.digest}"' in ls and f'"bytes": {PUT_BYTES}' in ls, ls
        assert upload.digest in (state / "data" / "datasets" / "big.json").read_text()
        print(f"big put: {PUT_BYTES >> 20} MiB in {n} chunks; first half {t_cut - t0:.1f} s (with the scan), "
              f"resumed half {t_put - t_cut:.1f} s, checks {time.monotonic() - t_put:.1f} s")
    finally:
        shutil.rmtree(state, ignore_errors=True)  # do not leave the store's bytes in pytest's kept temp dirs
