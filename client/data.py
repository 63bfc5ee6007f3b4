"""The dataset store as a library: upload a dataset in content-addressed chunks, list and
remove datasets (``dml data``; the coordinator side is :mod:`dml.coordinator.datastore`).

An upload cuts every file into chunks of :data:`~dml.common.datasets.CHUNK_BYTES`, asks the
coordinator which of their sha256 digests it lacks (``HaveChunks``), sends only those
(``PutChunk``, each checked there on arrival) and commits the manifest (``CommitDataset``).
Chunks that arrived before are never sent again, so a repeated upload sends nothing and one cut
short (a broken connection, a coordinator restart) resumes where it stopped when run again.
"""
from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from dml.client.api import BAD_INPUT, ApiError, api_error
from dml.common import datasets, rpc
from dml.common.datasets import FileEntry
from dml.common.tls import TlsConfig
from dml.v1 import data_pb2, data_pb2_grpc

log = logging.getLogger(__name__)

# Refusals that are the user's to fix (exit 2): a bad name or file, a name taken or in use, an
# unknown name; and a dataset over the coordinator's size limits (RESOURCE_EXHAUSTED naming them).
_BAD_INPUT_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
BYTES_PER_S = 10e6  # the slowest link a chunk's deadline allows for, beyond the call timeout


@dataclass(frozen=True)
class Piece:
    """Where one chunk of a local file is."""

    path: pathlib.Path
    offset: int
    size: int
    digest: str


@dataclass(frozen=True)
class Upload:
    """A dataset's files as read here: the manifest and where each chunk's bytes are."""

    files: list[FileEntry]
    pieces: dict[str, Piece]  # digest -> the first place it occurs

    @property
    def bytes(self) -> int:
        """The files' bytes in all."""
        return sum(f.size for f in self.files)

    @property
    def digest(self) -> str:
        """The dataset's digest (what the coordinator will show)."""
        return datasets.manifest_digest(self.files)


@dataclass(frozen=True)
class PutResult:
    """What an upload did: chunks (and their bytes) sent, and those the coordinator held already."""

    info: data_pb2.DatasetInfo
    created: bool
    sent_chunks: int
    sent_bytes: int
    skipped_chunks: int
    skipped_bytes: int


def local_files(paths: list[pathlib.Path]) -> list[tuple[str, pathlib.Path]]:
    """The files a ``dml data put`` names, as (path inside the dataset, local path), by dataset
    path: a file at its own name, a directory's files (recursively, symbolic links not followed)
    at their paths below it. An ApiError (bad input) for a missing path, a path not allowed
    inside a dataset, or two files at the same dataset path."""
    out: dict[str, pathlib.Path] = {}

    def add(rel: str, p: pathlib.Path) -> None:
        if err := datasets.path_error(rel):
            raise ApiError(f"{p}: {err}", BAD_INPUT)
        if rel in out:
            raise ApiError(f"{p} and {out[rel]} would both be {rel!r} in the dataset", BAD_INPUT)
        out[rel] = p

    for root in paths:
        if root.is_file():
            add(root.name, root)
        elif root.is_dir():
            for folder, dirs, names in os.walk(root):
                dirs.sort()
                for n in sorted(names):
                    p = pathlib.Path(folder) / n
                    if p.is_file() and not p.is_symlink():
                        add(p.relative_to(root).as_posix(), p)
        else:
            raise ApiError(f"{root}: no such file or directory", BAD_INPUT)
    if not out:
        raise ApiError(f"no files in {', '.join(map(str, paths))}", BAD_INPUT)
    return sorted(out.items())


def scan(paths: list[pathlib.Path], chunk_bytes: int = datasets.CHUNK_BYTES) -> Upload:
    """Reads the files ``paths`` name (:func:`local_files`) and digests their chunks."""
    files: list[FileEntry] = []
    pieces: dict[str, Piece] = {}
    for rel, p in local_files(paths):
        digests: list[str] = []
        offset = 0
        try:
            for data in datasets.read_chunks(str(p), chunk_bytes):
                d = datasets.chunk_digest(data)
                digests.append(d)
                pieces.setdefault(d, Piece(p, offset, len(data), d))
                offset += len(data)
        except OSError as e:
            raise ApiError(f"cannot read {p}: {e.strerror or e}", BAD_INPUT) from None
        files.append(FileEntry(rel, offset, tuple(digests)))
    if err := datasets.manifest_error(files):
        raise ApiError(err, BAD_INPUT)
    return Upload(files, pieces)


def _read(piece: Piece) -> bytes:
    """A chunk's bytes read again, checked against the digest taken when the file was scanned."""
    try:
        with open(piece.path, "rb") as f:
            f.seek(piece.offset)
            data = f.read(piece.size)
    except OSError as e:
        raise ApiError(f"cannot read {piece.path}: {e.strerror or e}", BAD_INPUT) from None
    if datasets.chunk_digest(data) != piece.digest:
        raise ApiError(f"{piece.path} changed while it was being uploaded; run the command again", BAD_INPUT)
    return data


class DataClient:
    """A connection to one coordinator's DataService, with the operator token; every call has a
    deadline of ``timeout_s`` (a chunk's, more by its size). Use it as a context manager."""

    def __init__(self, address: str, timeout_s: float, token: str = "", tls: TlsConfig | None = None) -> None:
        from dml.client.api import check_address
        from dml.common.auth import with_token

        self.address = check_address(address)
        self.timeout_s = timeout_s
        self.tls = tls
        self._raw = rpc.channel(address, tls=tls)
        self.stub = data_pb2_grpc.DataServiceStub(with_token(self._raw, token) if token else self._raw)

    def __enter__(self) -> DataClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._raw.close()

    def call(self, fn: Callable[..., Any], request: Any, size: int = 0) -> Any:
        """One RPC; a refusal that is the user's to fix is an ApiError (bad input) with the
        coordinator's message, any other error as :func:`~dml.client.api.api_error` words it."""
        try:
            return fn(request, timeout=self.timeout_s + size / BYTES_PER_S)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            over = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-data" in (e.details() or "")
            if code in _BAD_INPUT_CODES or over:
                raise ApiError(f"the coordinator refused: {e.details()}", BAD_INPUT) from None
            raise api_error(e, self.address, self.tls is not None) from None

    def missing(self, digests: list[str], dataset_bytes: int = 0) -> set[str]:
        """Those of ``digests`` the coordinator lacks (refused at once when ``dataset_bytes``
        is over its per-dataset limit)."""
        lacking: set[str] = set()
        step = datasets.MAX_DIGESTS_PER_CALL
        for i in range(0, max(len(digests), 1), step):
            req = data_pb2.HaveChunksRequest(digests=digests[i:i + step], dataset_bytes=dataset_bytes)
            resp = self.call(self.stub.HaveChunks, req)
            lacking.update(resp.missing)
        return lacking

    def put(self, name: str, upload: Upload, on_chunk: Callable[[str, int], None] | None = None) -> PutResult:
        """Uploads the chunks of ``upload`` the coordinator lacks, then commits it as ``name``
        (``on_chunk(digest, size)`` after each chunk sent)."""
        if err := datasets.name_error(name):
            raise ApiError(err, BAD_INPUT)
        lacking = self.missing(list(upload.pieces), upload.bytes)
        sent = sent_bytes = 0
        for d, piece in upload.pieces.items():
            if d not in lacking:
                continue
            data = _read(piece)
            self.call(self.stub.PutChunk, data_pb2.PutChunkRequest(digest=d, data=data), size=len(data))
            sent += 1
            sent_bytes += len(data)
            if on_chunk is not None:
                on_chunk(d, len(data))
        req = data_pb2.CommitDatasetRequest(name=name, files=[
            data_pb2.DatasetFile(path=f.path, size=f.size, chunks=list(f.chunks)) for f in upload.files])
        resp = self.call(self.stub.CommitDataset, req, size=req.ByteSize())
        distinct = sum(p.size for p in upload.pieces.values())
        return PutResult(resp.dataset, resp.created, sent, sent_bytes, len(upload.pieces) - sent, distinct - sent_bytes)

    def list(self) -> list[data_pb2.DatasetInfo]:
        """Every committed dataset, by name."""
        return list(self.call(self.stub.ListDatasets, data_pb2.ListDatasetsRequest()).datasets)

    def remove(self, name: str) -> data_pb2.RemoveDatasetResponse:
        """Removes dataset ``name`` (refused while a pending or running job names it)."""
        return self.call(self.stub.RemoveDataset, data_pb2.RemoveDatasetRequest(name=name))

    def manifest(self, name: str) -> data_pb2.GetDatasetResponse:
        """Dataset ``name`` and its files."""
        return self.call(self.stub.GetDataset, data_pb2.GetDatasetRequest(name=name))


def info_dict(d: data_pb2.DatasetInfo) -> dict[str, Any]:
    """A dataset as ``dml data ls --json`` prints it."""
    return {"name": d.name, "files": d.files, "bytes": d.bytes, "chunks": d.chunks, "digest": d.digest,
            "created_unix_ms": d.created_unix_ms}
