"""Datasets of the coordinator's store as both sides see them: names, file paths inside a
dataset, chunking, and the manifest with its digest. Standard library only (the job client
imports it).

A dataset is a list of files, each an ordered list of content-addressed chunks (the sha256 of
each chunk's bytes, hex) and its size. Its digest is the sha256 of its manifest's canonical JSON
(:func:`manifest_digest`): files sorted by path, each ``{"path", "size", "chunks"}``, compact
separators, so the client and the coordinator compute the same one.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK_BYTES = 4 << 20  # what the client cuts files into; the most one chunk may hold
MAX_FILES = 100_000  # files in one dataset
MAX_CHUNKS = 1 << 20  # chunks in one dataset (4 TiB at 4 MiB each)
MAX_PATH_BYTES = 255  # a file's path inside its dataset (gRPC strings: common.limits.MAX_ID_BYTES)
MAX_DIGESTS_PER_CALL = 4096  # HaveChunks asks about at most this many at once

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_PART = re.compile(r"^[^\x00-\x1f\x7f/\\]+$")


def name_error(name: str) -> str:
    """Why ``name`` cannot name a dataset ("" when it can): 1-64 characters of letters, digits,
    ``.``, ``_`` and ``-``, starting with a letter or digit (so never a path, never ``..``)."""
    if _NAME.fullmatch(name):
        return ""
    return (f"dataset name {name[:80]!r} is not allowed: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")


def digest_error(digest: str) -> str:
    """Why ``digest`` is no chunk digest ("" when it is: 64 lowercase hex digits)."""
    return "" if _DIGEST.fullmatch(digest) else f"malformed chunk digest {digest[:80]!r}: want 64 lowercase hex digits"


def path_error(path: str) -> str:
    """Why ``path`` cannot name a file inside a dataset ("" when it can): a relative POSIX path
    of at most :data:`MAX_PATH_BYTES` bytes whose parts are neither empty, ``.`` nor ``..`` and
    hold no backslash or control character."""
    if not path or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return f"file path {path[:80]!r} must be 1-{MAX_PATH_BYTES} bytes"
    for part in path.split("/"):
        if part in ("", ".", "..") or not _PART.fullmatch(part):
            return (f"file path {path[:80]!r} is not allowed: a relative path of names separated by '/', "
                    "none empty, '.' or '..', no backslash or control character")
    return ""


def chunk_digest(data: bytes) -> str:
    """The sha256 of ``data``, hex: a chunk's address."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of a dataset: its path inside it, its size, its chunks in order."""

    path: str
    size: int
    chunks: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        """The canonical form (the manifest's JSON)."""
        return {"path": self.path, "size": self.size, "chunks": list(self.chunks)}


def canonical(files: list[FileEntry]) -> bytes:
    """The manifest's canonical JSON: files sorted by path."""
    body = {"files": [f.to_dict() for f in sorted(files, key=lambda f: f.path)]}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def manifest_digest(files: list[FileEntry]) -> str:
    """The dataset's digest: the sha256 of :func:`canonical`."""
    return hashlib.sha256(canonical(files)).hexdigest()


def manifest_error(files: list[FileEntry]) -> str:
    """Why ``files`` is no valid manifest ("" when it is): at least one file, at most
    :data:`MAX_FILES` and :data:`MAX_CHUNKS` chunks, paths valid (:func:`path_error`), unique, and
    never both a file and a folder; digests well formed; a size that the chunks can hold (at most
    :data:`CHUNK_BYTES` each, an empty file with none, a non-empty one with at least one)."""
    if not files:
        return "a dataset needs at least one file"
    if len(files) > MAX_FILES:
        return f"a dataset holds at most {MAX_FILES} files, this one {len(files)}"
    if sum(len(f.chunks) for f in files) > MAX_CHUNKS:
        return f"a dataset holds at most {MAX_CHUNKS} chunks"
    paths = set()
    for f in files:
        if err := path_error(f.path):
            return err
        if f.path in paths:
            return f"file path {f.path!r} appears twice"
        paths.add(f.path)
    for f in files:
        parts = f.path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                return f"{'/'.join(parts[:i])!r} is both a file and the folder of {f.path!r}"
        for d in f.chunks:
            if err := digest_error(d):
                return f"{f.path}: {err}"
        if f.size < 0 or f.size > len(f.chunks) * CHUNK_BYTES or (f.size > 0) != bool(f.chunks):
            return f"{f.path}: a size of {f.size} bytes does not fit {len(f.chunks)} chunks of at most {CHUNK_BYTES}"
    return ""


def read_chunks(path: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The chunks of the file at ``path``, in order (none for an empty file)."""
    with open(path, "rb") as f:
        while data := f.read(chunk_bytes):
            yield data
